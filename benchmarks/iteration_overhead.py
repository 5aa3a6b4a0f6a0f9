"""One trainer iteration against the model compute it cannot avoid, on the default digits task.

For each batch size, timed alternately in one process (repeats interleaved, medians reported):

* ``iteration``: ``Trainer.collect`` + ``training_batch`` + ``update`` (evaluation off), with the
  per-rollout drift KL on one sample per group (``trainer.drift_samples = num_prompts``);
  ``iteration_full_drift``: the same with the drift KL on every sample;
* ``compute``: what any such iteration must run -- the K velocity forwards of the rollout, the
  decode and the reward model, and for every optimiser step a forward + backward of the velocity
  model over the mini-batch's trained pairs and a fused AdamW step (learning rate 0, so the
  weights stay put); no env, no loss module, no bookkeeping;
* ``update`` against ``update_floor``: the trainer's updates alone, against the forward + backward +
  optimiser steps over the same pairs;
* ``drift`` (one reference forward over all states) against ``drift_per_step`` (one per step);
* fused AdamW against the per-tensor ``foreach`` AdamW on the trained parameters;
* ``rollout_vs_flowgrpo``: the env's rollout (``env.rollout`` with the training policy) against a
  Flow-GRPO-style per-step loop (``flow_grpo_loop.py``: velocity forward + Flow-SDE step with its
  log-prob, a device sync per step, then decode and reward) on the same env, on the digits model at
  each batch and on the tiny SD3 pipeline with guidance 4.5 (``--sd3-batch``, 10 steps, 32 px);
* ``sd3_tiny_vs_digits_iteration``: one iteration of the default trainer on the tiny SD3 pipeline at
  64 px (``env=sd3_tiny reward=jpeg_compressibility env.backend.resolution=64``: the case that once took
  50-115 s per iteration) against one on the default digits task, with its collect and update parts.

Ends with one machine-readable line per ratio, ``ratio <name> <value>``.

    python benchmarks/iteration_overhead.py                  # batches 64 and 256, CPU
    python benchmarks/iteration_overhead.py --batches 64 --repeats 5 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path
from typing import Callable

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from algos.evaluation import drift_kl, trajectory_drift
from algos.trainer import Trainer
from flow_grpo_loop import flow_grpo_rollout
from flowgym.policy import FlowPolicy
from flowgym.registration import make_env
from timing import interleaved_medians

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


#: the quiet trainer every timed iteration uses: no evaluation, checkpoints, images or report
QUIET = ["trainer.eval_every=0", "trainer.checkpoint_every=0", "logger.backends=[csv]", "logger.sample_grid=false",
         "logger.report=false"]
#: the tiny SD3 case of the issue: ``save_tiny_sd3``'s pipeline at 64 px under the default trainer
TINY_SD3_ITERATION = ["env=sd3_tiny", "reward=jpeg_compressibility", "env.backend.resolution=64"]


def trainer_from(overrides: list[str], device: str, run_dir: Path) -> Trainer:
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*QUIET, *overrides, f"device={device}"])
    return Trainer(OmegaConf.to_container(cfg, resolve=True), run_dir, progress=False)


def make_trainer(batch: int, device: str, run_dir: Path, group_size: int = 8) -> Trainer:
    return trainer_from([f"env.num_prompts={batch // group_size}", f"env.group_size={group_size}",
                         f"trainer.drift_samples={batch // group_size}"], device, run_dir)


def trainer_iteration(trainer: Trainer) -> Callable[[], None]:
    """One iteration without evaluation: collect, advantages, updates."""
    def run() -> None:
        rollout = trainer.collect()
        trainer.update(trainer.training_batch(rollout), rollout["conditioning"])
    return run


def tiny_sd3_beside_digits(device: str, repeats: int, tmp: Path) -> dict[str, float]:
    """Milliseconds per iteration of the default trainer on the tiny SD3 pipeline at 64 px (its own
    default sizes: 2 prompts x 4 samples, 4 steps, drift every iteration) and on the default digits task,
    alternately, with the SD3 iteration's rollout and update parts."""
    sd3 = trainer_from(TINY_SD3_ITERATION, device, tmp / "sd3_iteration")
    digits = trainer_from([], device, tmp / "digits_iteration")
    state: dict[str, object] = {}

    def sd3_collect() -> None:
        state["rollout"] = sd3.collect()
        state["pairs"] = sd3.training_batch(state["rollout"])

    sd3_collect()
    t = interleaved_medians({
        "sd3_iteration": trainer_iteration(sd3), "digits_iteration": trainer_iteration(digits),
        "sd3_collect": sd3_collect, "sd3_update": lambda: sd3.update(state["pairs"], state["rollout"]["conditioning"]),
    }, repeats, sd3.env.device)
    return {name: value * 1e3 for name, value in t.items()}


def measure(batch: int, device: str, repeats: int, run_dir: Path) -> dict[str, float]:
    trainer = make_trainer(batch, device, run_dir)
    env, backend, policy = trainer.env, trainer.backend, trainer.policy
    dev = env.device
    params = trainer.updater.parameters()
    floor_optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=trainer.cfg.trainer.weight_decay, fused=True)
    foreach_optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=trainer.cfg.trainer.weight_decay, foreach=True)
    state: dict[str, object] = {}

    def iteration(full_drift: bool = False) -> None:
        trainer.cfg.trainer.drift_samples = None if full_drift else env.num_prompts
        rollout = trainer.collect()
        pairs = trainer.training_batch(rollout)
        trainer.update(pairs, rollout["conditioning"])
        state.update(rollout=rollout, pairs=pairs)

    @torch.no_grad()
    def rollout_compute() -> None:
        td = state["reset"]
        latent, cond = td.get("latent"), td.get("conditioning")
        for k in range(env.num_steps):
            latent = backend.velocity(latent, env.sigmas[k].expand(latent.shape[0]), cond, policy.guidance_scale)
        env.rewards(backend.decode(latent), env.episode.prompts)

    def minibatch_steps(optimizer: torch.optim.Optimizer) -> None:
        pairs, cond = state["pairs"], state["rollout"]["conditioning"]
        t = trainer.cfg.trainer
        for _ in range(t.inner_epochs):
            for chunk in torch.arange(pairs.batch_size[0], device=dev).chunk(t.num_minibatches):
                rows = pairs[chunk]
                optimizer.zero_grad(set_to_none=True)
                v = backend.velocity(rows.get("latent"), rows.get("sigma"), cond[rows.get("sample_index")], policy.guidance_scale)
                v.float().square().mean().backward()
                optimizer.step()

    def update() -> None:
        trainer.update(state["pairs"], state["rollout"]["conditioning"])

    def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
        for p in params:
            p.grad = state["grads"][id(p)]
        optimizer.step()

    def drift(batched: bool) -> None:
        traj = state["traj"]
        if batched:
            trajectory_drift(backend, policy, traj, trainer.strategy.autocast)
        else:
            torch.stack([drift_kl(backend, policy, traj[:, k], trainer.strategy.autocast) for k in range(env.num_steps - 1)]).mean()

    iteration()  # warm-up, and the pairs / rollout the other parts reuse
    state["reset"] = env.reset()
    with torch.no_grad():
        state["traj"] = env.rollout(env.num_steps, policy)
    state["grads"] = {id(p): torch.randn_like(p) for p in params}
    runs: dict[str, Callable[[], None]] = {
        "iteration": iteration,
        "iteration_full_drift": lambda: iteration(full_drift=True),
        "rollout_compute": rollout_compute,
        "update_floor": lambda: minibatch_steps(floor_optimizer),
        "update": update,
        "drift": lambda: drift(True),
        "drift_per_step": lambda: drift(False),
        "adamw_fused": lambda: optimizer_step(floor_optimizer),
        "adamw_foreach": lambda: optimizer_step(foreach_optimizer),
    }
    t = interleaved_medians(runs, repeats, dev)
    compute = t["rollout_compute"] + t["update_floor"]
    return {
        "batch": batch,
        "pairs": int(state["pairs"].batch_size[0]),
        **{f"{name}_ms": value * 1e3 for name, value in t.items()},
        f"iteration_b{batch}": t["iteration"] / compute,
        f"iteration_full_drift_b{batch}": t["iteration_full_drift"] / compute,
        f"update_b{batch}": t["update"] / t["update_floor"],
        f"drift_batched_vs_per_step_b{batch}": t["drift"] / t["drift_per_step"],
        f"adamw_fused_vs_foreach_b{batch}": t["adamw_fused"] / t["adamw_foreach"],
    }


def rollout_against_flowgrpo(env, policy: FlowPolicy, repeats: int) -> dict[str, float]:
    """The env's rollout and the Flow-GRPO-style loop on ``env``, alternately; medians in ms and their ratio."""
    generator = torch.Generator(device=env.device).manual_seed(0)

    @torch.no_grad()
    def rollout() -> None:
        env.rollout(env.num_steps, policy)

    t = interleaved_medians({"rollout": rollout, "flowgrpo": lambda: flow_grpo_rollout(
        env, policy.noise_level, policy.guidance_scale, generator)}, repeats, env.device)
    return {"rollout_ms": t["rollout"] * 1e3, "flowgrpo_ms": t["flowgrpo"] * 1e3, "ratio": t["rollout"] / t["flowgrpo"]}


def tiny_sd3_env(batch: int, device: str):
    """The tiny offline SD3 pipeline (``env=sd3_tiny``'s model) at 32 px, 10 steps, the JPEG reward."""
    return make_env("sd3", backend_options={"model": "tiny:sd3", "resolution": 32, "max_sequence_length": 32, "lora_rank": 4,
                                            "lora_alpha": 8}, num_prompts=max(batch // 4, 1), group_size=4, num_steps=10,
                    prompts=["a red cube on a table", "two cats", "a lighthouse at night", "a bowl of fruit"],
                    rewards={"jpeg_compressibility": 1.0}, device=device, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sd3-batch", type=int, default=8, help="batch of the tiny SD3 comparison")
    parser.add_argument("--skip-sd3-iteration", action="store_true",
                        help="leave out the tiny SD3 trainer iteration at 64 px beside the digits one")
    args = parser.parse_args()
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"digits task, device={args.device} ({device_name}), torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"repeats={args.repeats} (medians, parts interleaved)")
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batches:
            r = measure(batch, args.device, args.repeats, Path(tmp) / f"b{batch}")
            print(f"batch {batch} ({r['pairs']} trained pairs):")
            for name in ("iteration", "iteration_full_drift", "rollout_compute", "update_floor", "update", "drift",
                         "drift_per_step", "adamw_fused", "adamw_foreach"):
                print(f"  {name:>22} {r[name + '_ms']:9.2f} ms")
            ratios.update({k: v for k, v in r.items() if not k.endswith("_ms") and k not in ("batch", "pairs")})
            trainer = make_trainer(batch, args.device, Path(tmp) / f"flowgrpo{batch}")
            f = rollout_against_flowgrpo(trainer.env, trainer.policy, args.repeats)
            print(f"  {'rollout':>22} {f['rollout_ms']:9.2f} ms   Flow-GRPO-style loop {f['flowgrpo_ms']:9.2f} ms")
            ratios[f"rollout_vs_flowgrpo_digits_b{batch}"] = f["ratio"]
        env = tiny_sd3_env(args.sd3_batch, args.device)
        policy = FlowPolicy(env.backend, guidance_scale=4.5, seed=0)
        f = rollout_against_flowgrpo(env, policy, max(3, args.repeats // 2))
        print(f"tiny SD3 pipeline, batch {env.batch_size[0]}, 10 steps, CFG 4.5: rollout {f['rollout_ms']:.1f} ms, "
              f"Flow-GRPO-style loop {f['flowgrpo_ms']:.1f} ms")
        ratios["rollout_vs_flowgrpo_sd3"] = f["ratio"]
        if not args.skip_sd3_iteration:
            it = tiny_sd3_beside_digits(args.device, max(3, args.repeats // 2), Path(tmp))
            print(f"tiny SD3 pipeline (save_tiny_sd3, 64 px, default trainer: 2 prompts x 4, 4 steps): iteration "
                  f"{it['sd3_iteration']:.1f} ms (collect {it['sd3_collect']:.1f}, update {it['sd3_update']:.1f}); "
                  f"default digits iteration {it['digits_iteration']:.1f} ms")
            ratios["sd3_tiny_vs_digits_iteration"] = it["sd3_iteration"] / it["digits_iteration"]
    for name, value in ratios.items():
        print(f"ratio {name} {value:.3f}")


if __name__ == "__main__":
    main()
