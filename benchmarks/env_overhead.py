"""Rollout overhead of the environment: whole rollout time / bare backend forward time.

For full rollouts at each batch size it times, side by side in one run:

* bare: the K velocity forwards the rollout needs (``backend.velocity`` on the same batch), nothing else;
* rollout: ``env.reset()`` then K x (``policy(td)`` + ``env.step(td)``), i.e. env + policy + kernel maths
  + reward at the end.

and prints the ratio rollout / bare (target: at most 1.10 at batch 256; the env must never be the
bottleneck of a real model), and the same ratio without the terminal decode + reward models (timed
separately), which is the environment's own overhead. Repeats are interleaved; medians are reported.

    python benchmarks/env_overhead.py                 # digits backend, CPU
    python benchmarks/env_overhead.py --backend toy --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from flowgym.policy import FlowPolicy
from flowgym.registration import make_env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def bare_forwards(env, policy, td) -> float:
    backend = env.backend
    latent, cond = td.get("latent"), td.get("conditioning")
    sigmas = env.sigmas
    _sync(env.device)
    start = time.perf_counter()
    for k in range(env.num_steps):
        sigma = sigmas[k].expand(latent.shape[0])
        latent = backend.velocity(latent, sigma, cond, policy.guidance_scale)
    _sync(env.device)
    return time.perf_counter() - start


@torch.no_grad()
def full_rollout(env, policy) -> float:
    _sync(env.device)
    start = time.perf_counter()
    td = env.reset()
    for _ in range(env.num_steps):
        td = env.step(policy(td)).get("next")
    _sync(env.device)
    return time.perf_counter() - start


@torch.no_grad()
def reward_only(env) -> float:
    """The terminal decode + reward models alone (part of the rollout, not of the env's own overhead)."""
    latent = env._state["latent"]
    prompts = env._state["prompts"]
    _sync(env.device)
    start = time.perf_counter()
    env.rewards(env.backend.decode(latent), prompts)
    _sync(env.device)
    return time.perf_counter() - start


def measure(backend: str, batch: int, device: str, repeats: int, group_size: int = 8) -> dict[str, float]:
    env = make_env(backend, num_prompts=batch // group_size, group_size=group_size, device=device, seed=0)
    policy = FlowPolicy(env.backend, seed=0)
    td = env.reset()
    for _ in range(2):  # warm-up (allocator, prompt cache, lazy init)
        bare_forwards(env, policy, td)
        full_rollout(env, policy)
    bare, whole, reward = [], [], []
    for _ in range(repeats):
        bare.append(bare_forwards(env, policy, td))
        whole.append(full_rollout(env, policy))
        reward.append(reward_only(env))
    b, w, r = statistics.median(bare), statistics.median(whole), statistics.median(reward)
    return {"batch": batch, "bare_ms": b * 1e3, "rollout_ms": w * 1e3, "reward_ms": r * 1e3,
            "ratio": w / b, "ratio_without_reward": (w - r) / b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="digits", choices=["digits", "toy"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"backend={args.backend} device={args.device} ({device_name}), torch threads={torch.get_num_threads()}")
    print(f"{'batch':>6} {'bare ms':>9} {'rollout ms':>11} {'reward ms':>10} {'ratio':>7} {'ratio w/o reward':>17}")
    for batch in args.batches:
        r = measure(args.backend, batch, args.device, args.repeats)
        print(
            f"{r['batch']:>6} {r['bare_ms']:>9.2f} {r['rollout_ms']:>11.2f} {r['reward_ms']:>10.2f} "
            f"{r['ratio']:>7.3f} {r['ratio_without_reward']:>17.3f}"
        )


if __name__ == "__main__":
    main()
