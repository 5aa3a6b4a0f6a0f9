"""The trainer: rollout -> advantages -> inner epochs x mini-batches of updates -> eval / log / checkpoint.

It never branches on the algorithm: the loss module (``algos.losses``) supplies the objective and its
default advantage estimator, the policy supplies the kernel. Read top to bottom:

1. ``collect``: one batched episode of B = prompts x group samples with the stochastic policy, in
   inference mode; per step it keeps the state, the action, the old log-prob, mean, std and velocity.
2. ``advantages``: the estimator turns terminal rewards into one advantage per sample; samples whose
   advantage is exactly 0 carry no gradient and are dropped (Flow-GRPO does the same).
3. ``update``: the (sample, stochastic step) pairs are shuffled and split into mini-batches, one
   optimizer step each, for ``inner_epochs`` passes; AdamW, gradient-norm clipping, optional EMA.
4. ``evaluate``: the deterministic ODE sampler on the train and held-out prompts: rewards, the
   prior-capability metrics and the drift KL to the reference policy, measured identically for every
   algorithm (exact KL between the Flow-SDE(a=0.7) step Gaussians of the current and the reference
   velocity along the ODE trajectory, averaged over dimensions and over all steps but the last).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from tensordict import NonTensorStack, TensorDict

from algos.advantages import make_advantage
from algos.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from algos.ema import ParameterEMA
from algos.losses import make_loss
from flowgym.env import FlowDenoiseEnv, stochastic_step_mask
from flowgym.kernels import flow_sde_step, gaussian_kl
from flowgym.metrics import prior_capability
from flowgym.policy import FlowPolicy
from flowgym.registration import make_env

__all__ = ["Trainer", "validate_config"]

#: the kernel and noise level at which drift KL is measured, the same for every algorithm
DRIFT_KERNEL_NOISE = 0.7
_STEP_KEYS = ("latent", "sigma", "sigma_next", "stochastic", "step", "action", "sample_log_prob", "loc", "scale", "velocity")


def _final_rewards(traj: TensorDict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The terminal reward ``(B,)`` and reward terms of a ``[B, K]`` trajectory, as contiguous copies:
    reductions over the strided last-step view would sum in another order."""
    reward = traj.get(("next", "reward"))[:, -1].reshape(-1).contiguous()
    terms = {name: value[:, -1].reshape(-1).contiguous() for name, value in traj.get(("next", "reward_terms")).items()}
    return reward, terms


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available; use device=cpu or device=auto")
    return device


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Reject invalid values before any work is done, saying what is accepted."""
    t, e, a = cfg["trainer"], cfg["env"], cfg["algo"]

    def positive(section: Mapping, key: str, where: str, integer: bool = False) -> None:
        value = section[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if integer:
            ok = ok and float(value).is_integer()
        if not ok:
            kind = "a positive integer" if integer else "a positive number"
            raise ValueError(f"{where}.{key} must be {kind}; got {value!r}")

    for key in ("iterations", "inner_epochs", "num_minibatches"):
        positive(t, key, "trainer", integer=True)
    positive(t, "lr", "trainer")
    if t["weight_decay"] < 0:
        raise ValueError(f"trainer.weight_decay must be >= 0; got {t['weight_decay']}")
    if t["max_grad_norm"] is not None and t["max_grad_norm"] <= 0:
        raise ValueError(f"trainer.max_grad_norm must be > 0 or null; got {t['max_grad_norm']}")
    for key in ("num_prompts", "group_size", "num_steps"):
        positive(e, key, "env", integer=True)
    for key, value in (a.get("loss") or {}).items():
        if key in ("threshold", "clip_range", "beta", "delta") and (not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"algo.loss.{key} must be a number >= 0; got {value!r}")
    if a.get("noise_level", 0.7) <= 0:
        raise ValueError(f"algo.noise_level must be > 0 (trained steps need a Gaussian); got {a.get('noise_level')}")
    advantage = a.get("advantage") or ""
    if advantage.startswith("group") or advantage == "gdpo":
        if e["group_size"] < 2:
            raise ValueError(f"advantage {advantage!r} is group-relative and needs env.group_size >= 2; got {e['group_size']}")
    stochastic = stochastic_step_mask(e["stochastic_steps"], e["num_steps"], torch.Generator().manual_seed(0))
    if "rollout_batches" in t:
        positive(t, "rollout_batches", "trainer", integer=True)
    if t.get("micro_batch_size") is not None:
        positive(t, "micro_batch_size", "trainer", integer=True)
    pairs = e["num_prompts"] * e["group_size"] * int(stochastic.sum()) * int(t.get("rollout_batches", 1))
    if pairs == 0:
        raise ValueError("env.stochastic_steps leaves no stochastic step to train on")
    if pairs % t["num_minibatches"]:
        raise ValueError(
            f"the rollout's {pairs} (sample, step) pairs do not split into trainer.num_minibatches="
            f"{t['num_minibatches']} equal mini-batches; choose a divisor of {pairs}"
        )


class Trainer:
    """Online RL fine-tuning of a flow model on a ``FlowDenoiseEnv``.

    ``cfg`` is the resolved Hydra config as a plain dict (see ``configs/config.yaml``);
    ``run_dir`` receives metrics, logs and checkpoints.
    """

    def __init__(self, cfg: Mapping[str, Any], run_dir: str | Path, *, progress: bool = True) -> None:
        validate_config(cfg)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        t, e, a = cfg["trainer"], cfg["env"], cfg["algo"]
        self.device = resolve_device(cfg.get("device", "auto"))
        seed = int(cfg["seed"])
        torch.manual_seed(seed)

        env_kwargs = {k: v for k, v in e.items() if k not in ("name", "eval_prompts", "eval_samples_per_prompt", "backend")}
        backend_kwargs = dict(e.get("backend") or {})
        rewards = dict(cfg["reward"]["weights"])
        reward_kwargs = dict(cfg["reward"].get("kwargs") or {})
        self.env: FlowDenoiseEnv = make_env(
            e["name"], **backend_kwargs, **env_kwargs, rewards=rewards, reward_kwargs=reward_kwargs,
            device=self.device, seed=seed,
        )
        self.backend = self.env.backend
        self.policy = FlowPolicy(
            self.backend,
            kernel=a.get("kernel", "flow_sde"),
            noise_level=a.get("noise_level", 0.7),
            guidance_scale=a.get("guidance_scale", 1.0),
            reduce=a.get("reduce", "mean"),
            log_prob_convention=a.get("log_prob_convention", "exact"),
            seed=seed + 1,
        )
        if a.get("module"):
            # a method defined outside algos.losses registers itself on import (one file + one yaml)
            importlib.import_module(a["module"])
        self.loss_module = make_loss(a["name"], self.policy, **dict(a.get("loss") or {}))
        advantage_name = a.get("advantage") or self.loss_module.default_advantage
        self.advantage = make_advantage(advantage_name, **dict(a.get("advantage_kwargs") or {}))
        if getattr(self.advantage, "group_relative", False) and e["group_size"] < 2:
            raise ValueError(f"advantage {advantage_name!r} is group-relative and needs env.group_size >= 2")

        policy_params = list(self.policy.trainable_parameters())
        if not policy_params:
            raise ValueError("the backend exposes no trainable parameters")
        known = {id(p) for p in policy_params}
        self.extra_params = {n: p for n, p in self.loss_module.named_parameters() if p.requires_grad and id(p) not in known}
        self.optimizer = torch.optim.AdamW(
            policy_params + list(self.extra_params.values()), lr=t["lr"], weight_decay=t["weight_decay"]
        )
        ema_cfg = t.get("ema") or {}
        self.ema = ParameterEMA(policy_params, ema_cfg.get("decay", 0.9), ema_cfg.get("every", 8)) if ema_cfg.get("enabled") else None
        self.shuffle_generator = torch.Generator().manual_seed(seed + 2)
        self.autocast = self.device.type == "cuda" and t.get("mixed_precision", True) and self.backend.dtype == torch.float32

        self.eval_sets = self._eval_sets(e)
        self.iteration = 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self._loggers = self._make_loggers(cfg.get("logger") or {})

    # ------------------------------------------------------------------ set-up helpers
    def _eval_sets(self, e: Mapping[str, Any]) -> dict[str, list[str]]:
        per_prompt = int(e.get("eval_samples_per_prompt", 8))
        sets = {"train": self.env.prompt_list}
        held = e.get("eval_prompts")
        if held:
            sets["heldout"] = self.backend.resolve_prompt_set(held) if isinstance(held, str) else list(held)
        return {name: [p for p in prompts for _ in range(per_prompt)] for name, prompts in sets.items()}

    def _make_loggers(self, cfg: Mapping[str, Any]) -> list:
        from torchrl.record.loggers import CSVLogger, TensorboardLogger

        loggers = []
        backends = list(cfg.get("backends", ["csv", "tensorboard"]))
        for name in backends:
            if name == "csv":
                loggers.append(CSVLogger(exp_name="csv", log_dir=str(self.run_dir / "logs")))
            elif name == "tensorboard":
                loggers.append(TensorboardLogger(exp_name="tensorboard", log_dir=str(self.run_dir / "logs")))
            elif name == "wandb":
                import importlib.util

                if importlib.util.find_spec("wandb") is None:
                    raise ValueError("logger backend 'wandb' needs the wandb package: pip install wandb")
                from torchrl.record.loggers import WandbLogger

                loggers.append(WandbLogger(exp_name=cfg.get("wandb_name", "flowgym"), project=cfg.get("wandb_project", "flowgym"), save_dir=str(self.run_dir)))
            else:
                raise ValueError(f"unknown logger backend {name!r}; accepted: csv, tensorboard, wandb")
        return loggers

    # ------------------------------------------------------------------ 1. rollout
    @torch.no_grad()
    def collect(self) -> dict[str, Any]:
        """``trainer.rollout_batches`` batched episodes with the stochastic policy, concatenated.

        Each episode holds whole groups, so group-relative advantages see complete groups; several
        episodes per iteration give a large rollout (48 prompts x 24 samples) at a batch that fits.
        """
        episodes = [self._collect_episode() for _ in range(int(self.cfg["trainer"].get("rollout_batches", 1)))]
        if len(episodes) == 1:
            return episodes[0]
        offset = self.env.num_prompts
        drift = [e["drift_kl"] for e in episodes]
        return {
            "drift_kl": sum(drift) / len(drift),
            "trajectory": torch.cat([e["trajectory"] for e in episodes], dim=0),
            "conditioning": torch.cat([e["conditioning"] for e in episodes], dim=0),
            "reward": torch.cat([e["reward"] for e in episodes]),
            "reward_terms": {k: torch.cat([e["reward_terms"][k] for e in episodes]) for k in episodes[0]["reward_terms"]},
            "prompts": [p for e in episodes for p in e["prompts"]],
            "group_id": torch.cat([e["group_id"] + i * offset for i, e in enumerate(episodes)]),
        }

    def _collect_episode(self) -> dict[str, Any]:
        traj = self._rollout(self.env)
        measure_drift = bool(self.cfg["trainer"].get("drift_every_iteration", True))
        drift = self._trajectory_drift(traj) if measure_drift else []
        reward, reward_terms = _final_rewards(traj)
        return {
            "drift_kl": float(torch.stack(drift).mean()) if drift else float("nan"),
            "trajectory": traj.select(*_STEP_KEYS),  # [B, K]
            "conditioning": traj.get("conditioning")[:, 0],
            "reward": reward,
            "reward_terms": reward_terms,
            "prompts": traj.get("prompt")[:, 0].tolist(),
            "group_id": traj.get("group_id")[:, 0].contiguous(),
        }

    def _rollout(self, env: FlowDenoiseEnv, request: TensorDict | None = None) -> TensorDict:
        """One whole episode of ``env`` with the policy: the fused ``env.rollout``, the model under
        autocast when mixed precision is on (the env's decode and rewards never are)."""
        with self._autocast():
            return env.rollout(env.num_steps, self.policy, tensordict=request)

    def _trajectory_drift(self, traj: TensorDict) -> list[torch.Tensor]:
        """``drift_kl`` at every step of ``traj`` but the last, one step (one reference forward) at a time."""
        return [self.drift_kl(traj[:, k]) for k in range(traj.batch_size[1] - 1)]

    # ------------------------------------------------------------------ 2-3. advantages and updates
    def training_pairs(self, rollout: Mapping[str, Any]) -> TensorDict:
        """Flat (sample, stochastic step) pairs with their advantage; zero-advantage samples dropped."""
        advantage = self.advantage(rollout["reward"], rollout["reward_terms"], rollout["prompts"], rollout["group_id"])
        traj = rollout["trajectory"]
        B, K = traj.batch_size
        traj.set("advantage", advantage.to(traj.device).float()[:, None].expand(B, K))
        traj.set("sample_index", torch.arange(B, device=traj.device)[:, None].expand(B, K))
        keep = traj.get("stochastic")
        if self.cfg["trainer"].get("drop_zero_advantage", True):
            keep = keep & (traj.get("advantage") != 0)
        return traj[keep]

    def update(self, pairs: TensorDict, conditioning: TensorDict) -> dict[str, float]:
        t = self.cfg["trainer"]
        sums: dict[str, list[float]] = {}
        num_updates = 0
        for epoch in range(t["inner_epochs"]):
            if pairs.batch_size[0] == 0:
                break
            order = torch.randperm(pairs.batch_size[0], generator=self.shuffle_generator).to(pairs.device)
            micro = t.get("micro_batch_size") or pairs.batch_size[0]
            batches = []
            for chunk in order.chunk(t["num_minibatches"]):
                pieces = []
                for piece in chunk.split(micro):  # gradient accumulation over micro-batches
                    batch = pairs[piece]
                    batch.set("conditioning", conditioning[batch.get("sample_index")])
                    if epoch == 0 and t.get("refresh_old_policy", False):
                        # matrix kernels round differently per batch size: recompute the old policy on
                        # exactly these batches, before any update, so the first ratios are exactly 1
                        with torch.no_grad(), self._autocast():
                            self.loss_module.refresh_old_policy(batch)
                    pieces.append(batch)
                batches.append(pieces)
            for pieces in batches:
                self.optimizer.zero_grad(set_to_none=True)
                total = sum(piece.batch_size[0] for piece in pieces)
                for batch in pieces:
                    with self._autocast():
                        out = self.loss_module(batch)
                    loss = sum(v for k, v in out.items() if k.startswith("loss_"))
                    # each micro-batch's mean loss weighted by its share: the mini-batch mean
                    (loss * (batch.batch_size[0] / total)).backward()
                    for key, value in out.items():
                        if value.numel() == 1:
                            sums.setdefault(key, []).append(float(value.detach()))
                if t["max_grad_norm"] is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self._all_params(), t["max_grad_norm"])
                    sums.setdefault("grad_norm", []).append(float(grad_norm))
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update()
                num_updates += 1
        stats = {}
        for key, values in sums.items():
            finite = [v for v in values if not math.isnan(v)]
            if not finite:
                stats[key] = float("nan")
            elif key.endswith("_max"):
                stats[key] = max(finite)
            elif key.endswith("_min"):
                stats[key] = min(finite)
            else:
                stats[key] = sum(finite) / len(finite)
        stats["num_updates"] = num_updates
        stats["num_pairs"] = int(pairs.batch_size[0])
        return stats

    def _all_params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _autocast(self):
        if self.autocast:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ 4. evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """ODE sampling on each eval prompt set: reward terms, prior capability, drift KL."""
        results: dict[str, float] = {}
        context = self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()
        with context:
            for split, prompts in self.eval_sets.items():
                results.update(self._evaluate_prompts(split, prompts))
        return results

    def drift_kl(self, td: TensorDict) -> torch.Tensor:
        """Mean exact KL between the current and the reference policy's step Gaussians at ``td``'s states.

        Measured the same way for every algorithm: both velocities go through the Flow-SDE kernel at
        noise level 0.7 (whatever kernel the algorithm trains with), KL averaged over dimensions
        and samples. ``td`` must already hold the current policy's ``velocity``.
        """
        with self._autocast(), self.policy.reference():
            v_ref = self.backend.velocity(
                td.get("latent").to(self.backend.dtype), td.get("sigma"), td.get("conditioning"), self.policy.guidance_scale
            ).float()
        args = (td.get("sigma"), td.get("sigma_next"), DRIFT_KERNEL_NOISE)
        loc_now, std = flow_sde_step(td.get("latent"), td.get("velocity"), *args)
        loc_ref, _ = flow_sde_step(td.get("latent"), v_ref, *args)
        return gaussian_kl(loc_now, loc_ref, std).mean()

    def _evaluate_prompts(self, split: str, prompts: list[str]) -> dict[str, float]:
        """ODE samples for ``prompts`` in chunks of ``trainer.eval_batch_size``; metrics over all of them."""
        t = self.cfg["trainer"]
        num_steps = int(t.get("eval_num_steps") or self.env.num_steps)
        chunk = int(t.get("eval_batch_size") or len(prompts))
        guidance = t.get("eval_guidance_scale")
        previous_guidance = self.policy.guidance_scale
        rewards, terms, images, drift = [], {}, [], []
        try:
            if guidance is not None:
                self.policy.guidance_scale = float(guidance)
            for start in range(0, len(prompts), chunk):
                part = prompts[start : start + chunk]
                env = FlowDenoiseEnv(
                    self.backend, num_prompts=1, group_size=len(part), num_steps=num_steps,
                    shift=self.env.shift, prompts=part, rewards=self.env.rewards, stochastic_steps="none",
                    device=self.device, seed=int(self.cfg["seed"]) + 1000 + start,
                )
                request = TensorDict({}, batch_size=env.batch_size, device=self.device)
                request.set("prompt", NonTensorStack(*part, batch_size=env.batch_size))
                traj = self._rollout(env, request)
                drift.extend(self._trajectory_drift(traj))
                reward, reward_terms = _final_rewards(traj)
                rewards.append(reward)
                for name, value in reward_terms.items():
                    terms.setdefault(name, []).append(value)
                images.append(env.last_images)
        finally:
            self.policy.guidance_scale = previous_guidance
        out = {f"eval/{split}/reward": float(torch.cat(rewards).mean())}
        for name, values in terms.items():
            out[f"eval/{split}/{name}"] = float(torch.cat(values).mean())
        out[f"eval/{split}/drift_kl"] = float(torch.stack(drift).mean()) if drift else 0.0
        for name, value in prior_capability(self.backend.name, torch.cat(images), prompts).items():
            out[f"eval/{split}/{name}"] = float(value)
        return out

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict[str, float]]:
        """Run (or continue) training to ``trainer.iterations``; returns the metric rows."""
        t = self.cfg["trainer"]
        rows = self._read_metrics()
        if self.iteration == 0 and t.get("eval_every", 0):
            rows.append(self._log({"iteration": 0, **self.evaluate()}))
        bar = self._progress_bar(t["iterations"])
        while self.iteration < t["iterations"]:
            start = time.perf_counter()
            rollout = self.collect()
            pairs = self.training_pairs(rollout)
            stats = self.update(pairs, rollout["conditioning"])
            self.iteration += 1
            row: dict[str, float] = {
                "iteration": self.iteration,
                "reward": float(rollout["reward"].mean()),
                "reward_std": float(rollout["reward"].std()),
                "drift_kl": rollout["drift_kl"],
            }
            for name, value in rollout["reward_terms"].items():
                row[f"reward/{name}"] = float(value.mean())
            row.update(stats)
            eval_every = t.get("eval_every", 0)
            if eval_every and (self.iteration % eval_every == 0 or self.iteration == t["iterations"]):
                row.update(self.evaluate())
            row["time_s"] = time.perf_counter() - start
            rows.append(self._log(row))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row.get('kl_old_new_mean', float('nan')):.2e}")
            every = t.get("checkpoint_every", 0)
            if every and (self.iteration % every == 0 or self.iteration == t["iterations"]):
                self.save()
        if bar is not None:
            bar.close()
        return rows

    def _progress_bar(self, total: int):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=self.iteration, desc=f"{self.cfg['algo']['name']}", unit="it")

    def _log(self, row: dict[str, float]) -> dict[str, float]:
        # not-applicable diagnostics (NaN) are written as JSON null
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        for logger in self._loggers:
            for key, value in row.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    logger.log_scalar(key, value, step=int(row["iteration"]))
        return row

    def _read_metrics(self) -> list[dict[str, float]]:
        """Rows already logged up to the current iteration (later rows of a crashed run are dropped)."""
        if not self.metrics_path.exists():
            return []
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["iteration"] <= self.iteration]
        if self.iteration == 0:
            rows = []
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "extra_params": {k: v.detach().cpu() for k, v in self.extra_params.items()},
            "advantage": self.advantage.state_dict() if hasattr(self.advantage, "state_dict") else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "env": self.env.generator_state(),
                "policy": self.policy.generator_state(),
                "shuffle": self.shuffle_generator.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def save(self) -> Path:
        return save_checkpoint(self.checkpoint_dir, self.iteration, self.backend.trainable_state_dict(), self.state())

    def resume(self, path: str | Path | None = None) -> bool:
        """Load the newest complete checkpoint (of this run, or under ``path``); False if none."""
        directory = Path(path) if path is not None else self.checkpoint_dir
        if (directory / "checkpoints").is_dir():
            directory = directory / "checkpoints"
        checkpoint = latest_checkpoint(directory) if not (directory / "COMPLETE").exists() else directory
        if checkpoint is None:
            return False
        weights, state = load_checkpoint(checkpoint, device=self.device)
        self.backend.load_trainable_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        with torch.no_grad():
            for name, value in state["extra_params"].items():
                self.extra_params[name].copy_(value)
        if state.get("advantage") is not None and hasattr(self.advantage, "load_state_dict"):
            self.advantage.load_state_dict(state["advantage"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.env.set_generator_state(rng["env"])
        self.policy.set_generator_state(rng["policy"])
        self.shuffle_generator.set_state(rng["shuffle"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.iteration = int(state["iteration"])
        return True

