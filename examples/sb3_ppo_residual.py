"""Stable-Baselines3 PPO on the digits env through residual actions (``flowgym.residual_action``).

The plain gym view's action is the absolute next latent, which a generic agent cannot learn from
scratch. With ``make_residual_env`` the action is a residual in units of the step's std around the
pretrained sampler's step mean (the zero action is the pretrained sampler), so PPO starts from the
pretrained model and only has to learn a correction. The reward is the ``digits_bold`` pair
(``digit_alignment + ink``): alignment is already ~1.0 for the pretrained model, ink (~0.31) has room.

    .venv/bin/python examples/sb3_ppo_residual.py                 # ~4 min of training, then evaluation
    .venv/bin/python examples/sb3_ppo_residual.py --budget-s 20   # a quick smoke run

Evaluation: the same fixed env seeds (prompt and initial noise) before and after training, with
PPO's deterministic (mean) action; the pretrained sampler's own rewards on those seeds are printed
as baselines (zero action = its mean path; a ~ N(0, I) = the stochastic sampler).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger

from flowgym.residual_action import make_residual_env

REWARDS = {"digit_alignment": 1.0, "ink": 1.0}  # configs/reward/digits_bold.yaml


class WallClockBudget(BaseCallback):
    """Stops ``learn`` once ``seconds`` of wall time have passed."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds, self.start = float(seconds), time.perf_counter()

    def _on_training_start(self) -> None:
        self.start = time.perf_counter()

    def _on_step(self) -> bool:
        return time.perf_counter() - self.start < self.seconds


def evaluate(env, act, seeds) -> dict[str, float]:
    """Mean total reward and reward terms over one episode per seed; ``act(obs, k)`` gives the action."""
    totals, terms = [], {}
    for seed in seeds:
        obs, _ = env.reset(seed=int(seed))
        terminated, k = False, 0
        while not terminated:
            obs, reward, terminated, truncated, info = env.step(act(obs, k))
            k += 1
        totals.append(reward)
        for name, value in info["reward_terms"].items():
            terms.setdefault(name, []).append(value)
    return {"reward": float(np.mean(totals)), **{name: float(np.mean(v)) for name, v in terms.items()}}


def line(name: str, result: dict[str, float]) -> str:
    return f"{name:<34} reward {result['reward']:.4f}  " + "  ".join(
        f"{k} {v:.4f}" for k, v in result.items() if k != "reward"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=240.0, help="wall-clock training budget in seconds")
    parser.add_argument("--eval-episodes", type=int, default=64, help="fixed eval seeds 10_000 .. 10_000 + n - 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    parser.add_argument("--log-std-init", type=float, default=0.0, help="initial log-std of the residual: 0 starts at the pretrained stochastic sampler")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    env = make_residual_env("FlowDenoise-Digits-v0", rewards=REWARDS, seed=args.seed)
    eval_env = make_residual_env("FlowDenoise-Digits-v0", rewards=REWARDS)
    seeds = list(range(10_000, 10_000 + args.eval_episodes))
    zeros = np.zeros(env.action_space.shape, dtype=np.float32)
    noise = np.random.default_rng(0)
    print(f"latent / action size {int(np.prod(env.action_space.shape))}, action box "
          f"[{env.action_space.low.min():g}, {env.action_space.high.max():g}], "
          f"{eval_env.unwrapped.core.num_steps} steps, {args.eval_episodes} eval seeds, torch threads {torch.get_num_threads()}")
    print(line("pretrained mean sampler (a = 0)", evaluate(eval_env, lambda obs, k: zeros, seeds)))
    print(line("pretrained sampler (a ~ N(0, I))", evaluate(
        eval_env, lambda obs, k: noise.standard_normal(zeros.shape).astype(np.float32), seeds)))

    model = PPO(
        "MultiInputPolicy", env, n_steps=1000, batch_size=250, n_epochs=10, gamma=1.0, gae_lambda=1.0,
        learning_rate=args.learning_rate, ent_coef=0.0, policy_kwargs=dict(log_std_init=args.log_std_init),
        seed=args.seed, device="cpu", verbose=0,
    )
    # Without a logger of its own, SB3 writes an empty log folder under /tmp on every learn().
    model.set_logger(Logger(folder=None, output_formats=[]))

    def ppo_action(obs, k):
        return model.predict(obs, deterministic=True)[0]

    before = evaluate(eval_env, ppo_action, seeds)
    print(line("PPO before training (mean action)", before))
    t_train = time.perf_counter()
    model.learn(total_timesteps=10**9, callback=WallClockBudget(args.budget_s))
    train_s = time.perf_counter() - t_train
    after = evaluate(eval_env, ppo_action, seeds)
    print(f"trained {model.num_timesteps} env steps ({model.num_timesteps // eval_env.unwrapped.core.num_steps} "
          f"episodes) in {train_s:.1f} s")
    print(line("PPO after training (mean action)", after))
    print(f"eval reward {before['reward']:.4f} -> {after['reward']:.4f} ({after['reward'] - before['reward']:+.4f}); "
          f"total wall time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
