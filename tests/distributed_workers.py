"""Code that runs inside the processes ``tests/test_distributed.py`` starts (``torch.multiprocessing``
spawn, gloo on CPU). Each check compares what 2 ranks compute with what one process computes on the
union of their data, and records the largest difference in ``<out>/rank<r>.json``."""

from __future__ import annotations

import gc
import json
import math
import os
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from algos.advantages import make_advantage
from algos.distributed import DDPStrategy
from algos.evaluation import final_rewards
from algos.losses import LOSSES, SAMPLES
from algos.strategy import SingleDevice
from algos.trainer import Trainer, global_batch
from algos.updater import Updater
from flowgym.env import FlowDenoiseEnv

#: loss variants whose gradients are compared: every registered loss, and Flow-DPPO's kept count
LOSS_CASES: list[tuple[str, dict[str, Any]]] = [(name, {}) for name in LOSSES.names()] + [("flow_dppo", {"normalize": "kept"})]
MICRO_BATCHES: tuple[int | None, ...] = (None, 5)


def case_name(loss: str, kwargs: dict[str, Any], micro: int | None) -> str:
    extra = "".join(f"-{k}={v}" for k, v in sorted(kwargs.items()))
    return f"grad/{loss}{extra}/micro={micro}"


def small_config(loss: str, kwargs: dict[str, Any], **trainer: Any) -> dict[str, Any]:
    return {
        "seed": 0,
        "env": {"name": "digits", "num_prompts": 2, "group_size": 4, "num_steps": 4, "stochastic_steps": "all_but_last"},
        "algo": {"name": loss, "loss": dict(kwargs)},
        "trainer": {"iterations": 1, "num_minibatches": 1, "eval_every": 0, "checkpoint_every": 0, **trainer},
        "logger": {"backends": [], "sample_grid": False, "report": False},
    }


def _union_batch(trainer: Trainer) -> tuple[Any, Any]:
    """The same training batch on every rank: a seeded rollout of 4 groups (its own env and noise,
    not the rank's), its advantages and, for a per-sample loss, its prepared timesteps and noise."""
    env = FlowDenoiseEnv(trainer.backend, num_prompts=4, group_size=4, num_steps=4, seed=11,
                         stochastic_steps="none" if trainer.batch_kind == SAMPLES and trainer.policy.kernel_name == "ode" else "all_but_last")
    trainer.policy.set_seed(5)
    with torch.no_grad(), trainer._sampling():
        traj = env.rollout(env.num_steps, trainer.policy)
    rollout = global_batch(SingleDevice("cpu"), trainer._episode(traj, torch.tensor(math.nan), *final_rewards(traj)), 4)
    batch = trainer.training_batch(rollout)
    if trainer.batch_kind == SAMPLES:
        batch.set("conditioning", rollout["conditioning"][batch.get("sample_index")])
        batch = trainer.loss_module.prepare(batch, generator=torch.Generator().manual_seed(3))
    return batch, rollout["conditioning"]


def _pieces(batch: Any, conditioning: Any, micro: int | None) -> list[Any]:
    pieces = list(batch.split(micro)) if micro else [batch]
    for piece in pieces:
        if "conditioning" not in piece.keys():
            piece.set("conditioning", conditioning[piece.get("sample_index")])
    return pieces


def gradient_case(rank: int, world: int, loss: str, kwargs: dict[str, Any], micro: int | None) -> dict[str, float]:
    """Largest |DDP gradient over ``world`` ranks - one process's gradient over their union| ("diff")
    and the largest |gradient element| of the reference ("scale")."""
    # zero-advantage rows kept: every row of the union is trained on (some losses give them a gradient)
    cfg = small_config(loss, kwargs, micro_batch_size=micro, drop_zero_advantage=False)
    trainer = Trainer(cfg, Path(os.environ["FLOWGYM_TEST_OUT"]) / "run", progress=False, strategy=DDPStrategy("cpu"))
    batch, conditioning = _union_batch(trainer)
    with torch.no_grad():  # move off the rollout's policy, so ratios, clips and masks are not trivial
        generator = torch.Generator().manual_seed(17)
        for p in trainer.updater.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    n = batch.batch_size[0]
    cut = (3 * n) // 5  # uneven shares: the loss must be normalised by the global row count
    assert n >= 5 and 2 * cut != n
    local = batch[:cut] if rank == 0 else batch[cut:]
    trainer.updater.gradients(_pieces(local.clone(), conditioning, micro), {})
    distributed = [p.grad.detach().clone() for p in trainer.updater.parameters()]
    single = Updater(trainer.loss_module, trainer.updater.parameters(), trainer.cfg.trainer, SingleDevice("cpu"), seed=0)
    single.gradients(_pieces(batch.clone(), conditioning, micro), {})
    reference = [p.grad.detach().clone() for p in single.parameters()]
    scale = max(float(r.abs().max()) for r in reference)
    assert scale > 0, "the reference gradient is zero: the check would prove nothing"
    return {"diff": max(float((d - r).abs().max()) for d, r in zip(distributed, reference)), "scale": scale}


def advantage_case(rank: int, world: int, name: str) -> float:
    """Largest |advantage from gathered rewards - one process's advantage of the global batch|, over
    three iterations (per-prompt statistics carry state from one to the next)."""
    strategy = DDPStrategy.__new__(DDPStrategy)  # the collectives only: no model to wrap
    strategy.rank, strategy.world_size = rank, world
    kwargs = {"weights": {"a": 1.0, "b": 0.5}} if name == "gdpo" else {}
    if name == "per_prompt":
        kwargs = {"buffer_size": 8, "min_count": 4}
    distributed, single = make_advantage(name, **kwargs), make_advantage(name, **kwargs)
    groups, group_size = 3, 4
    worst = 0.0
    for iteration in range(3):
        generator = torch.Generator().manual_seed(100 + iteration)
        n = groups * group_size
        terms = {"a": torch.rand(world * n, generator=generator), "b": torch.rand(world * n, generator=generator)}
        terms["a"][:group_size] = 0.5  # a group of equal rewards: zero-std handling must agree too
        total = terms["a"] + 0.5 * terms["b"]
        prompts = [f"p{(i // group_size) % 5}" for i in range(world * n)]
        group_id = torch.arange(world * n) // group_size
        share = slice(rank * n, (rank + 1) * n)
        rollout = {"reward": total[share], "reward_terms": {k: v[share] for k, v in terms.items()},
                   "prompts": prompts[share], "group_id": group_id[share] - rank * groups, "drift_kl": math.nan}
        rollout = global_batch(strategy, rollout, groups)
        g = rollout["global"]
        mine = distributed(g["reward"], g["reward_terms"], g["prompts"], g["group_id"])[rollout["share"]]
        expected = single(total, terms, prompts, group_id)[share]
        worst = max(worst, float((mine - expected).abs().max()))
    return worst


def noise_case(rank: int, world: int) -> dict[str, Any]:
    """One DDP trainer's first rollout: this rank's initial latents, actions and prompts."""
    trainer = Trainer(small_config("flow_dppo", {}), Path(os.environ["FLOWGYM_TEST_OUT"]) / "noise", progress=False,
                      strategy=DDPStrategy("cpu"))
    rollout = trainer.collect()
    traj = rollout["trajectory"]
    return {
        "initial": traj.get("latent")[:, 0].flatten().tolist()[:64],
        "action": traj.get("action")[:, 0].flatten().tolist()[:64],
        "prompts": rollout["prompts"],
        "global_prompts": rollout["global"]["prompts"],
    }


def run_checks(rank: int, world: int, out: str) -> None:
    """The spawned function: init gloo through a file store, run every check, write the results."""
    os.environ["FLOWGYM_TEST_OUT"] = str(Path(out) / f"rank{rank}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    results: dict[str, Any] = {}
    try:
        for loss, kwargs in LOSS_CASES:
            for micro in MICRO_BATCHES:
                results[case_name(loss, kwargs, micro)] = gradient_case(rank, world, loss, kwargs, micro)
        for name in ("gdpo", "group", "group_std", "per_prompt"):
            results[f"advantage/{name}"] = advantage_case(rank, world, name)
        results["noise"] = noise_case(rank, world)
    except Exception:
        results["error"] = traceback.format_exc()
        raise
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()
        gc.collect()  # the DDP reducers of the checks' trainers go before the process group they hold
        dist.destroy_process_group()
