"""The trainer: the loop collect -> advantages -> update -> evaluate -> log / checkpoint.

It never branches on the algorithm: the loss module (``algos.losses``) supplies the objective and its
default advantage estimator, the policy supplies the kernel. Its parts, each in its own module:

* ``algos.config``: the validated ``RunConfig`` (one dataclass per section, every default in one place);
* ``algos.strategy``: device placement, mixed precision, backward, gradient and metric reduction,
  checkpoint saving (``SingleDevice`` today);
* ``algos.updater``: mini-batches, micro-batches, gradient clipping, the optimizer step, the EMA;
* ``algos.evaluation``: the ODE evaluation, the drift KL, the prior-capability metrics;
* ``algos.run_logger``: ``metrics.jsonl`` and torchrl's loggers.

Read top to bottom:

1. ``collect``: ``trainer.rollout_batches`` batched episodes of B = prompts x group samples with the
   stochastic policy, in inference mode; per step the state, the action, the old log-prob, mean, std
   and velocity; the drift KL to the reference along the way.
2. ``training_pairs``: the estimator turns terminal rewards into one advantage per sample; samples
   whose advantage is exactly 0 carry no gradient and are dropped (Flow-GRPO does the same).
3. ``update``: the updater's optimizer steps over the (sample, stochastic step) pairs.
4. ``evaluate``: the evaluator, every ``trainer.eval_every`` iterations and at the end.

Losses on final clean samples (``batch_kind == "samples"``, ``algos.losses.sample_base``: DiffusionNFT,
AWM) differ in what the update gets, and nothing else: ``training_batch`` builds one row per sample
(``training_samples``) instead of the pairs; rollouts are collected inside ``loss.sampling()``
(DiffusionNFT samples with its old policy); with the ODE kernel (their default) no rollout step is
stochastic; checkpoints carry the loss's parameter copies (``loss.training_state()``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import torch
from tensordict import TensorDict

from algos.advantages import ADVANTAGES, make_advantage
from algos.collectives import rank_seed
from algos.checkpoint import CheckpointError, complete_checkpoints, load_checkpoint, mark_broken
from algos.config import (
    POLICY_KEYS,
    RunConfig,
    check_rollout_split,
    check_sample_split,
    env_arguments,
    load_config,
    validate_config,
)
from algos.distributed import strategy_from_config
from algos.ema import ParameterEMA
from algos.health import check_finite, check_rollout
from algos.evaluation import Evaluator, drift_kl, drift_sample_indices, final_rewards, trajectory_drift
from algos.losses import SAMPLES, get_loss_class
from algos.losses.sample_base import batch_kind
from algos.run_logger import RunLogger
from algos.sample_grid import grid_cells, save_grid, save_side_by_side, tile
from algos.strategy import Strategy
from algos.updater import Updater
from flowgym.env import FlowDenoiseEnv, resolve_prompts
from flowgym.policy import FlowPolicy
from flowgym.registration import check_policy_arguments, env_arguments_with_defaults, make_env
from flowgym.registry import import_plugin
from flowgym.rewards import REWARDS

__all__ = ["Trainer", "global_batch", "shard_groups", "validate_config"]

_log = logging.getLogger(__name__)
#: the entries of a checkpoint's state.pt that resume needs (see ``Trainer.state``)
_STATE_KEYS = ("iteration", "optimizer", "rng")
_STEP_KEYS = ("latent", "sigma", "sigma_next", "stochastic", "step", "action", "sample_log_prob", "loc", "scale", "velocity")


def _policy_arguments(cfg: RunConfig, loss_class: type) -> dict[str, Any]:
    """The policy's arguments: the algo section's, else the loss class's ``policy_defaults``, else
    ``FlowPolicy``'s own defaults."""
    given = {key: getattr(cfg.algo, key) for key in POLICY_KEYS if getattr(cfg.algo, key) is not None}
    return {**dict(loss_class.policy_defaults), **given}


def _accepted_keywords(builder: Any) -> list[str] | None:
    """The keyword arguments ``builder`` (a class or a function) accepts, following ``**kwargs`` up a
    class's bases; None when that cannot be told (a ``**kwargs`` that reaches outside the project)."""
    names: list[str] = []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    functions = [k.__init__ for k in builder.__mro__ if "__init__" in vars(k)] if isinstance(builder, type) else [builder]
    for function in functions:
        if not getattr(function, "__module__", "").startswith(("algos", "flowgym")):
            return None
        parameters = inspect.signature(function).parameters.values()
        names += [p.name for p in parameters if p.kind in kinds and p.name not in ("self", "policy") and p.name not in names]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return names
    return None


def _check_keywords(builder: Any, given: Mapping[str, Any], where: str) -> None:
    """An unknown key of a free-form config section, named with the accepted ones before any work."""
    accepted = _accepted_keywords(builder)
    unknown = sorted(set(given) - set(accepted)) if accepted is not None else []
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; accepted keys of {where}: {sorted(accepted)}")


def shard_groups(num_prompts: int, rollout_batches: int, world_size: int) -> tuple[int, int]:
    """How an iteration's ``num_prompts x rollout_batches`` groups split over ``world_size`` processes,
    whole groups each: ``(prompts per episode, episodes)`` of one process. The episode's prompts are
    split when ``num_prompts`` divides (every process runs every episode, smaller); else the
    episodes when ``rollout_batches`` divides (the SD3.5 recipes' 1 prompt x 48 episodes); else a
    ``ValueError`` naming the world sizes that work."""
    if num_prompts % world_size == 0:
        return num_prompts // world_size, rollout_batches
    if rollout_batches % world_size == 0:
        return num_prompts, rollout_batches // world_size
    groups = num_prompts * rollout_batches
    accepted = sorted({n for n in range(1, groups + 1) if num_prompts % n == 0 or rollout_batches % n == 0})
    raise ValueError(
        f"env.num_prompts={num_prompts} x trainer.rollout_batches={rollout_batches} groups do not split over "
        f"{world_size} processes (each process samples whole groups: one of the two must be a multiple of the "
        f"world size); world sizes that work: {accepted}")


def global_batch(strategy: Strategy, rollout: dict[str, Any], groups: int, prompt_list: list[str] | None = None) -> dict[str, Any]:
    """``rollout`` with the whole iteration's batch of every process beside this process's share:
    ``global`` = ``{reward, reward_terms, prompts, group_id}`` gathered in rank order (each process's
    group ids, in ``[0, groups)``, offset by ``rank * groups``), ``share`` = this process's rows in
    it, and ``drift_kl`` averaged over processes (each holds as many samples; NaN on all alike when
    skipped). On one process ``global`` is its own batch.

    One collective in the common case: rewards, terms, group ids, the prompts' indices in
    ``prompt_list`` and the drift travel as one float64 table (every process has as many rows); prompts
    outside ``prompt_list`` are gathered as strings."""
    world = strategy.world_size
    if world == 1:
        rollout["global"] = {key: rollout[key] for key in ("reward", "reward_terms", "prompts", "group_id")}
        rollout["share"] = slice(0, rollout["reward"].shape[0])
        return rollout
    reward, terms = rollout["reward"], rollout["reward_terms"]
    n, names = reward.shape[0], sorted(terms)
    index_of = {p: i for i, p in enumerate(prompt_list or [])}
    indices = torch.tensor([index_of.get(p, -1) for p in rollout["prompts"]], dtype=torch.float64)
    columns = [reward, *(terms[k] for k in names), rollout["group_id"] + strategy.rank * groups, indices,
               torch.full((n,), float(rollout["drift_kl"]))]
    table = torch.stack([c.detach().to(reward.device, torch.float64).reshape(n) for c in columns], dim=1)
    table = strategy.all_gather_cat(table)  # (world * n, columns)
    if bool((table[:, -2] < 0).any()):
        prompts = [p for part in strategy.all_gather_objects(list(rollout["prompts"])) for p in part]
    else:
        prompts = [prompt_list[int(i)] for i in table[:, -2].tolist()]  # type: ignore[index]
    rollout["global"] = {
        "reward": table[:, 0].to(reward.dtype),
        "reward_terms": {k: table[:, 1 + i].to(terms[k].dtype) for i, k in enumerate(names)},
        "prompts": prompts,
        "group_id": table[:, 1 + len(names)].to(rollout["group_id"].dtype),
    }
    rollout["share"] = slice(strategy.rank * n, (strategy.rank + 1) * n)
    rollout["drift_kl"] = float(table[::n, -1].mean())
    return rollout


class Trainer:
    """Online RL fine-tuning of a flow model on a ``FlowDenoiseEnv``.

    ``cfg``: a ``RunConfig`` or a mapping of its sections (the resolved Hydra config, see
    ``configs/config.yaml``); ``run_dir`` receives metrics, logs and checkpoints; ``strategy``
    places the work (one device by default, chosen by ``cfg.device``).
    """

    def __init__(
        self, cfg: Mapping[str, Any] | RunConfig, run_dir: str | Path, *, progress: bool = True, strategy: Strategy | None = None
    ) -> None:
        cfg = load_config(cfg)
        self.cfg = cfg
        t, e, a = cfg.trainer, cfg.env, cfg.algo
        import_plugin(e.module)  # a model family defined outside flowgym registers itself
        import_plugin(a.module)  # a method defined outside algos.losses registers itself
        loss_class = get_loss_class(a.name)
        advantage_name = a.advantage or loss_class.default_advantage
        advantage_kwargs = dict(a.advantage_kwargs)
        _check_keywords(ADVANTAGES.lookup(advantage_name), advantage_kwargs, "algo.advantage_kwargs")
        _check_keywords(loss_class, a.loss, "algo.loss")
        for name, kwargs in cfg.reward.kwargs.items():  # before the model loads (minutes for SD3.5)
            _check_keywords(REWARDS.lookup(name), dict(kwargs or {}), f"reward.kwargs.{name}")
        if "weights" in inspect.signature(ADVANTAGES.lookup(advantage_name)).parameters:
            advantage_kwargs.setdefault("weights", dict(cfg.reward.weights) or None)  # GDPO weighs the terms like the env
        self.advantage = make_advantage(advantage_name, **advantage_kwargs)
        #: what the update trains on: "transitions" ((sample, step) pairs) or "samples" (clean x0 per sample)
        self.batch_kind = batch_kind(loss_class)
        policy_arguments = _policy_arguments(cfg, loss_class)
        check_policy_arguments(policy_arguments, prefix="algo.")  # with the loss's defaults (CPS: eta in [0, 1])
        env_args = env_arguments(e)
        if self.batch_kind == SAMPLES and policy_arguments.get("kernel") == "ode":
            # a per-sample method sampling with the ODE: no rollout step draws noise (for these
            # methods env.stochastic_steps only says where a stochastic kernel would inject it)
            env_args["stochastic_steps"] = "none"
        # everything that can be checked without the model is checked before it is built
        resolved_env = env_arguments_with_defaults(e.name, env_args)
        if getattr(self.advantage, "group_relative", False) and resolved_env["group_size"] < 2:
            raise ValueError(f"advantage {advantage_name!r} is group-relative and needs env.group_size >= 2; got {resolved_env['group_size']}")
        if self.batch_kind == SAMPLES:
            check_sample_split(cfg, resolved_env["num_prompts"], resolved_env["group_size"])
        else:
            check_rollout_split(cfg, resolved_env["num_prompts"], resolved_env["group_size"], resolved_env["num_steps"], resolved_env["stochastic_steps"])

        self.run_dir = Path(run_dir)
        self.progress = progress
        # trainer.distributed was checked above (load_config): a bad value fails before any process group
        self.strategy = strategy if strategy is not None else strategy_from_config(t.distributed, cfg.device, mixed_precision=t.mixed_precision)
        self.device = self.strategy.device
        rank, world = self.strategy.rank, self.strategy.world_size
        prompts_per_process, self.rollout_batches = shard_groups(resolved_env["num_prompts"], t.rollout_batches, world)
        env_args["num_prompts"] = prompts_per_process  # whole groups per process and episode
        if self.strategy.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        seed = int(cfg.seed)
        torch.manual_seed(seed)  # the same on every process: models are built identically
        if cfg.num_threads is not None:
            torch.set_num_threads(int(cfg.num_threads))

        # prompts come from one stream shared by all processes; noise from a stream per (seed, rank)
        self.env: FlowDenoiseEnv = make_env(
            e.name, backend_options=e.backend, **env_args,
            rewards=dict(cfg.reward.weights) or None, reward_kwargs=dict(cfg.reward.kwargs),
            device=self.device, seed=seed, prompt_shard=(rank, world),
            noise_seed=rank_seed(seed, rank, world) if world > 1 else None,
        )
        self.backend = self.env.backend
        self.strategy.setup(self.backend.velocity_model())  # FSDP shards before anything copies the parameters
        if t.compile:
            # in place (nn.Module.compile): the backend, the policy, the loss and DDP keep calling the same
            # module; shapes that change (rollout batch, micro-batches) are recompiled once, then dynamic
            self.backend.velocity_model().compile(mode=t.compile_mode)
        self.policy = FlowPolicy(self.backend, **policy_arguments, seed=rank_seed(seed + 1, rank, world))
        self.loss_module = loss_class(self.policy, **dict(a.loss))

        policy_params = list(self.policy.trainable_parameters())
        if not policy_params:
            raise ValueError("the backend exposes no trainable parameters")
        known = {id(p) for p in policy_params}
        self.extra_params = {n: p for n, p in self.loss_module.named_parameters() if p.requires_grad and id(p) not in known}
        ema = ParameterEMA(policy_params, t.ema.decay, t.ema.every) if t.ema.enabled else None
        self.updater = Updater(
            self.loss_module, policy_params + list(self.extra_params.values()), t, self.strategy,
            seed=rank_seed(seed + 2, rank, world), ema=ema,
        )
        self.strategy.prepare(self.loss_module)
        self.evaluator = Evaluator(
            self.policy, self.env.rewards, self._eval_sets(), num_steps=t.eval_num_steps or self.env.num_steps,
            shift=self.env.shift, device=self.device, seed=seed, autocast=self.strategy.autocast,
            batch_size=t.eval_batch_size, guidance_scale=t.eval_guidance_scale, drift_rows_per_forward=t.drift_rows_per_forward,
            strategy=self.strategy,
        )
        self.iteration = 0
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.logger = RunLogger(self.run_dir, cfg.logger, enabled=self.strategy.is_main)

    # ------------------------------------------------------------------ parts a caller may reach
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.updater.optimizer

    @property
    def ema(self) -> ParameterEMA | None:
        return self.updater.ema

    @property
    def metrics_path(self) -> Path:
        return self.logger.metrics_path

    def _all_params(self) -> list[torch.nn.Parameter]:
        return self.updater.parameters()

    def _eval_sets(self) -> dict[str, list[str]]:
        per_prompt = int(self.cfg.env.eval_samples_per_prompt)
        train, held = self.cfg.env.eval_train_prompts, self.cfg.env.eval_prompts
        sets = {"train": resolve_prompts(self.backend, train) if train else self.env.prompt_list}
        if held:
            sets["heldout"] = resolve_prompts(self.backend, held)
        return {name: [p for p in prompts for _ in range(per_prompt)] for name, prompts in sets.items()}

    # ------------------------------------------------------------------ 1. rollout
    @torch.no_grad()
    def collect(self) -> dict[str, Any]:
        """``trainer.rollout_batches`` batched episodes with the stochastic policy, concatenated.

        Each episode holds whole groups, so group-relative advantages see complete groups; several
        episodes per iteration give a large rollout (48 prompts x 24 samples) at a batch that fits.
        """
        self.env.iteration = self.iteration  # the clock of a sliding stochastic window (MixGRPO)
        batches = self.rollout_batches  # this process's episodes
        if self.cfg.trainer.async_rewards and batches > 1:
            episodes = self._collect_overlapped(batches)
        else:
            episodes = [self._collect_episode() for _ in range(batches)]
        if len(episodes) == 1:
            rollout = episodes[0]
        else:
            offset = self.env.num_prompts
            drift = [e["drift_kl"] for e in episodes]
            rollout = {
                "drift_kl": sum(drift) / len(drift),
                "trajectory": torch.cat([e["trajectory"] for e in episodes], dim=0),
                "conditioning": torch.cat([e["conditioning"] for e in episodes], dim=0),
                "reward": torch.cat([e["reward"] for e in episodes]),
                "reward_terms": {k: torch.cat([e["reward_terms"][k] for e in episodes]) for k in episodes[0]["reward_terms"]},
                "prompts": [p for e in episodes for p in e["prompts"]],
                "group_id": torch.cat([e["group_id"] + i * offset for i, e in enumerate(episodes)]),
            }
        return self.with_global_batch(rollout)

    def with_global_batch(self, rollout: dict[str, Any]) -> dict[str, Any]:
        """``rollout`` with every process's batch beside its own (``global_batch``)."""
        return global_batch(self.strategy, rollout, self.env.num_prompts * self.rollout_batches, self.env.prompt_list)

    def _sampling(self) -> contextlib.AbstractContextManager[Any]:
        """The context rollouts are collected in: the loss's ``sampling()`` for a per-sample loss."""
        return self.loss_module.sampling() if self.batch_kind == SAMPLES else contextlib.nullcontext()

    def _rollout(self) -> TensorDict:
        with self.strategy.autocast(), self._sampling():
            return self.env.rollout(self.env.num_steps, self.policy)

    def _collect_episode(self) -> dict[str, Any]:
        traj = self._rollout()
        return self._episode(traj, self.rollout_drift(traj), *final_rewards(traj))

    def _collect_overlapped(self, batches: int) -> list[dict[str, Any]]:
        """``batches`` episodes whose rewards are computed in a background thread while the next
        episode is sampled (``trainer.async_rewards``): the same rewards, in less wall time when the
        reward is a server or a model that leaves the sampler's device or cores free."""
        pending = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowgym-rewards") as pool:
            for _ in range(batches):
                with self.env.rewards_deferred():
                    traj = self._rollout()
                scored = pool.submit(self.env.score_images, self.env.last_images, list(self.env.episode.prompts))
                pending.append((traj, self.rollout_drift(traj), scored))
            return [self._episode(traj, drift, *scored.result()) for traj, drift, scored in pending]

    def _episode(self, traj: TensorDict, drift: torch.Tensor, reward: torch.Tensor, reward_terms: dict[str, torch.Tensor]) -> dict[str, Any]:
        check_rollout(traj, reward, reward_terms, self.iteration + 1)
        return {
            "drift_kl": float(drift),
            "trajectory": traj.select(*_STEP_KEYS),  # [B, K]
            "conditioning": traj.get("conditioning")[:, 0],
            "reward": reward,
            "reward_terms": reward_terms,
            "prompts": traj.get("prompt")[:, 0].tolist(),
            "group_id": traj.get("group_id")[:, 0].contiguous(),
        }

    def rollout_drift(self, traj: TensorDict) -> torch.Tensor:
        """The drift KL of this iteration's rollout (NaN where the config skips it: ``trainer.drift_*``)."""
        t = self.cfg.trainer
        if not t.drift_every_iteration or (self.iteration + 1) % t.drift_every:
            return torch.tensor(float("nan"))
        # trainer.drift_samples counts the whole iteration's samples: each process takes its share
        share = None if t.drift_samples is None else -(-int(t.drift_samples) // self.strategy.world_size)
        samples = drift_sample_indices(traj.batch_size[0], share)
        return trajectory_drift(self.backend, self.policy, traj, self.strategy.autocast, samples=samples,
                                rows_per_forward=t.drift_rows_per_forward)

    def drift_kl(self, td: TensorDict) -> torch.Tensor:
        """The drift KL of the training policy at ``td``'s states (``algos.evaluation.drift_kl``)."""
        return drift_kl(self.backend, self.policy, td, self.strategy.autocast)

    # ------------------------------------------------------------------ 2-3. advantages and updates
    def advantages(self, rollout: Mapping[str, Any]) -> torch.Tensor:
        """The rollout's advantages (B,), checked finite (``algos.health``). Computed from the rewards of
        every process (``rollout["global"]``), so that group statistics, the global std, GDPO and
        per-prompt running statistics equal one process's on the same global batch; this process's
        share is returned."""
        batch = rollout.get("global", rollout)
        advantage = self.advantage(batch["reward"], batch["reward_terms"], batch["prompts"], batch["group_id"])
        check_finite(advantage, "the advantage", self.iteration + 1)
        # every process's count of trained samples, known here without a collective (the updater's plan)
        world = self.strategy.world_size
        trained = advantage != 0 if self.cfg.trainer.drop_zero_advantage else torch.ones_like(advantage, dtype=torch.bool)
        self.samples_per_process = trained.reshape(world, -1).sum(1).tolist() if world > 1 else None
        return advantage[rollout.get("share", slice(None))]

    def training_pairs(self, rollout: Mapping[str, Any]) -> TensorDict:
        """Flat (sample, stochastic step) pairs with their advantage; zero-advantage samples dropped."""
        advantage = self.advantages(rollout)
        traj = rollout["trajectory"]
        B, K = traj.batch_size
        traj.set("advantage", advantage.to(traj.device).float()[:, None].expand(B, K))
        traj.set("sample_index", torch.arange(B, device=traj.device)[:, None].expand(B, K))
        keep = traj.get("stochastic")
        self.placeholder = traj[keep][:1] if self.strategy.world_size > 1 else None
        steps = int(keep[0].sum())  # the stochastic steps, the same for every sample of every process
        self.rows_per_process = [n * steps for n in self.samples_per_process] if self.samples_per_process else None
        if self.cfg.trainer.drop_zero_advantage:
            keep = keep & (traj.get("advantage") != 0)
        return traj[keep]

    def training_samples(self, rollout: Mapping[str, Any]) -> TensorDict:
        """One row per sample for a per-sample loss (``algos.losses.sample_base``): the final clean
        latent ``sample``, the rollout's ``sigmas`` (B, K), the ``advantage`` and the ``sample_index``;
        zero-advantage samples dropped when ``trainer.drop_zero_advantage``."""
        advantage = self.advantages(rollout)
        traj = rollout["trajectory"]
        B = traj.batch_size[0]
        samples = TensorDict(
            {
                "sample": traj.get("action")[:, -1].contiguous(),  # the last step's action: the clean sample
                "sigmas": traj.get("sigma").contiguous(),
                "advantage": advantage.to(traj.device).float(),
                "sample_index": torch.arange(B, device=traj.device),
            },
            batch_size=[B],
            device=traj.device,
        )
        self.placeholder = samples[:1] if self.strategy.world_size > 1 else None
        self.rows_per_process = None  # the updater counts a per-sample loss's rows itself
        if self.cfg.trainer.drop_zero_advantage:
            samples = samples[samples.get("advantage") != 0]
        return samples

    def training_batch(self, rollout: Mapping[str, Any]) -> TensorDict:
        """What the update trains on, by the loss's ``batch_kind``: pairs, or one row per sample."""
        return self.training_samples(rollout) if self.batch_kind == SAMPLES else self.training_pairs(rollout)

    def update(self, pairs: TensorDict, conditioning: TensorDict) -> dict[str, float]:
        return self.updater.update(pairs, conditioning, iteration=self.iteration + 1, placeholder=getattr(self, "placeholder", None),
                                   rows_per_process=getattr(self, "rows_per_process", None))

    # ------------------------------------------------------------------ 4. evaluation
    def evaluate(self) -> dict[str, float]:
        """ODE sampling on each eval prompt set: reward terms, prior capability, drift KL; the sample
        grid of the train split is written to ``samples/iter_<n>.png`` (``logger.sample_grid``)."""
        results = self.evaluator.evaluate(self.ema)
        self.write_sample_grid()
        return results

    def write_sample_grid(self) -> Path | None:
        """``samples/iter_<n>.png`` of the last evaluation's train split (fixed prompts and noise), also
        sent to the image loggers; None when disabled, not the main process, or nothing was evaluated."""
        c = self.cfg.logger
        if not (c.sample_grid and self.strategy.is_main and "train" in self.evaluator.samples):
            return None
        images, prompts = self.evaluator.samples["train"]
        if images is None or images.dim() != 4:
            return None
        rows, names = grid_cells(images, prompts, c.grid_prompts, c.grid_samples)
        path = save_grid(self.run_dir / "samples" / f"iter_{self.iteration:04d}.png", rows, names,
                         f"{self.cfg.algo.name} on {self.cfg.env.name}, iteration {self.iteration} (ODE, fixed noise)")
        self.logger.log_image("samples/train", tile(rows), self.iteration)
        return path

    def finish(self) -> None:
        """After the last iteration: the first-vs-last sample grid and the run report (curves, report.md)."""
        if not self.strategy.is_main:
            return
        grids = sorted((self.run_dir / "samples").glob("iter_*.png"))
        if self.cfg.logger.sample_grid and len(grids) >= 2:
            first, last = grids[0], grids[-1]
            save_side_by_side(self.run_dir / "samples" / "first_vs_last.png", first, last,
                              first.stem.replace("_", " "), last.stem.replace("_", " "))
        if self.cfg.logger.report and self.logger.metrics_path.exists():
            from algos.report import write_report

            write_report([self.run_dir], self.run_dir)

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict[str, float]]:
        """Run (or continue) training to ``trainer.iterations``; returns the metric rows."""
        t = self.cfg.trainer
        rows = self.logger.read(self.iteration)
        if self.iteration == 0 and t.eval_every:
            rows.append(self.logger.log({"iteration": 0, "world_size": self.strategy.world_size, **self.evaluate()}))
        bar = self._progress_bar(t.iterations)
        while self.iteration < t.iterations:
            start = time.perf_counter()
            rollout = self.collect()
            pairs = self.training_batch(rollout)
            stats = self.update(pairs, rollout["conditioning"])
            self.iteration += 1
            batch = rollout["global"]  # every process's samples: the metrics are global
            row: dict[str, float] = {
                "iteration": self.iteration,
                "world_size": self.strategy.world_size,
                "reward": float(batch["reward"].mean()),
                "reward_std": float(batch["reward"].std()),
                "drift_kl": rollout["drift_kl"],
            }
            for name, value in batch["reward_terms"].items():
                row[f"reward/{name}"] = float(value.mean())
            row.update(stats)
            if t.eval_every and (self.iteration % t.eval_every == 0 or self.iteration == t.iterations):
                row.update(self.evaluate())
            row["time_s"] = time.perf_counter() - start
            rows.append(self.logger.log(row))
            if bar is not None:
                bar.update(1)
                # drift: KL to the pretrained model (when measured per rollout); step_kl: old -> new policy of the update
                bar.set_postfix(reward=f"{row['reward']:.3f}", drift=f"{row.get('drift_kl', float('nan')):.2e}",
                                step_kl=f"{row.get('kl_old_new_mean', float('nan')):.2e}")
            if t.checkpoint_every and (self.iteration % t.checkpoint_every == 0 or self.iteration == t.iterations):
                self.save()
        if bar is not None:
            bar.close()
        self.finish()
        return rows

    def _progress_bar(self, total: int):
        if not self.progress or not self.strategy.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=self.iteration, desc=self.cfg.algo.name, unit="it")

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """What a checkpoint's ``state.pt`` holds besides the weights. With several processes (every one
        calls it: FSDP gathers the optimizer state) ``rng`` is rank 0's and ``rng_ranks`` every rank's."""
        rng = self._rng_state()
        return {
            "iteration": self.iteration,
            "world_size": self.strategy.world_size,
            "rng_ranks": self.strategy.all_gather_objects(rng) if self.strategy.world_size > 1 else None,
            "optimizer": self.strategy.optimizer_state_dict(self.optimizer, self.loss_module),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "extra_params": {k: v.detach().cpu() for k, v in self.extra_params.items()},
            "advantage": self.advantage.state_dict() if hasattr(self.advantage, "state_dict") else None,
            # a per-sample loss's old / EMA parameter copies and its step count
            "loss": self.loss_module.training_state() if self.batch_kind == SAMPLES else None,
            "rng": rng,
        }

    def _rng_state(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "env": self.env.generator_state(),
            "policy": self.policy.generator_state(),
            "shuffle": self.updater.shuffle_generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def save(self) -> Path | None:
        """Write a checkpoint (every process calls it; only the main process writes)."""
        weights = self.strategy.trainable_state_dict(self.backend)
        return self.strategy.save_checkpoint(self.checkpoint_dir, self.iteration, weights, self.state())

    def resume(self, path: str | Path | None = None) -> bool:
        """Load the newest intact checkpoint (of this run, or under ``path``); False if there is none.

        A checkpoint that cannot be read (truncated or garbage file, missing state entry) is reported
        (a warning naming the file and what is wrong), renamed to ``<name>.broken`` and the next older
        one is tried; ``CheckpointError`` when none is intact. A checkpoint folder given as ``path``
        is loaded as is (no fallback). A checkpoint that reads fine but does not fit this run (other
        trained parameters) is a ``ValueError`` naming it.
        """
        directory = Path(path) if path is not None else self.checkpoint_dir
        if (directory / "checkpoints").is_dir():
            directory = directory / "checkpoints"
        explicit = (directory / "COMPLETE").exists()
        candidates = [directory] if explicit else complete_checkpoints(directory)
        if not candidates:
            return False
        broken: list[str] = []
        for checkpoint in candidates:
            try:
                weights, state = load_checkpoint(checkpoint, device=self.device, required=_STATE_KEYS)
                self._check_state(checkpoint, weights, state)
            except CheckpointError as error:
                if explicit:
                    raise
                broken.append(str(error))
                moved = mark_broken(checkpoint) if self.strategy.is_main else checkpoint
                _log.warning("broken checkpoint %s, renamed %s: %s", checkpoint, moved.name, error)
                continue
            self._load_state(checkpoint, weights, state)
            if broken:
                _log.warning("resumed from %s, the newest intact checkpoint", checkpoint)
            return True
        raise CheckpointError(f"no intact checkpoint under {directory}: " + "; ".join(broken))

    def _check_state(self, checkpoint: Path, weights: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> None:
        """What ``_load_state`` relies on, checked before anything is changed."""
        optimizer, rng = state["optimizer"], state["rng"]
        if not (isinstance(optimizer, dict) and {"state", "param_groups"} <= set(optimizer)):
            raise CheckpointError(f"{checkpoint}/state.pt: its 'optimizer' entry is not an optimizer state")
        if not (isinstance(rng, dict) and {"torch", "env", "policy", "shuffle"} <= set(rng)):
            raise CheckpointError(f"{checkpoint}/state.pt: its 'rng' entry lacks the torch / env / policy / shuffle states")
        if self.batch_kind == SAMPLES and state.get("loss") is None:
            raise CheckpointError(f"{checkpoint}/state.pt holds no state of the {self.cfg.algo.name!r} loss (its old / EMA policy copies)")
        ours = self.backend.trainable_state_dict()
        if set(weights) != set(ours) or any(weights[k].shape != v.shape for k, v in ours.items()):
            raise ValueError(
                f"{checkpoint}/weights.safetensors holds other trained parameters than this run's "
                f"({len(weights)} tensors, this run trains {len(ours)}): a checkpoint of another env.backend "
                "or algo configuration; resume it with the config it was written with, or start a new run"
            )
        groups = [len(group["params"]) for group in optimizer["param_groups"]]
        if groups != [len(group["params"]) for group in self.optimizer.param_groups]:
            raise ValueError(f"{checkpoint}/state.pt: its optimizer state holds {groups} parameters per group; "
                             "this run's optimizer does not (a checkpoint of another configuration)")

    def _load_state(self, checkpoint: Path, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.strategy.load_trainable_state_dict(self.backend, weights)
        self.strategy.load_optimizer_state_dict(self.optimizer, self.loss_module, state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        with torch.no_grad():
            for name, value in (state.get("extra_params") or {}).items():
                self.extra_params[name].copy_(value)
        if state.get("advantage") is not None and hasattr(self.advantage, "load_state_dict"):
            self.advantage.load_state_dict(state["advantage"])
        if self.batch_kind == SAMPLES:
            self.loss_module.load_training_state(state["loss"])
        self.iteration = int(state["iteration"])
        self._load_rng(checkpoint, state)

    def _load_rng(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """This process's random streams: exactly as saved on the same world size; on another, the
        shared prompt stream as saved and fresh noise / shuffle streams per (seed, rank, iteration)."""
        rank, world = self.strategy.rank, self.strategy.world_size
        saved_world = int(state.get("world_size") or 1)
        ranks = state.get("rng_ranks")
        if saved_world == world:
            rng = ranks[rank] if world > 1 and ranks else state["rng"]
            torch.set_rng_state(rng["torch"])
            self.env.set_generator_state(rng["env"])
            self.policy.set_generator_state(rng["policy"])
            self.updater.shuffle_generator.set_state(rng["shuffle"])
            if rng.get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            return
        rng = state["rng"]  # rank 0's: its prompt stream is the one every process shared
        torch.set_rng_state(rng["torch"])
        env_state = rng["env"]
        self.env.set_generator_state(env_state["shared"] if isinstance(env_state, Mapping) else env_state)
        seed = int(self.cfg.seed) + 7919 * self.iteration  # new streams, still a function of (seed, rank)
        if world > 1:
            self.env.set_noise_seed(rank_seed(seed, rank, world))
        self.policy.set_seed(rank_seed(seed + 1, rank, world))
        self.updater.shuffle_generator.manual_seed(rank_seed(seed + 2, rank, world))
        message = (f"resumed {checkpoint} (written by {saved_world} process(es)) on {world}: same weights, optimizer "
                   f"state and iteration {self.iteration}; the noise and shuffle streams changed (new streams per rank)")
        _log.warning(message)
        if self.strategy.is_main:
            print(message)
