"""Rollout overhead of the environment: whole rollout time / bare backend forward time.

For full rollouts at each batch size it times, side by side in one run (repeats interleaved,
medians reported):

* bare: the K velocity forwards a rollout needs (``backend.velocity`` on the same batch), nothing else;
* rollout: ``env.rollout(env.num_steps, policy)`` -- reset, K policy steps with noise, kernel and
  log-prob, the terminal decode and reward, and the ``[B, K]`` trajectory (TorchRL's layout),
  through the fused path ``FlowDenoiseEnv.rollout`` takes for a ``FlowPolicy``. Timed with the
  ``ink`` reward (two tensor ops), so that the env's own work is measured rather than a reward model;
* stepwise: ``env.reset()`` then K x ``env.step(policy(td))``, TorchRL's per-step API (what custom
  loops and the gymnasium views use), same reward, without keeping a trajectory;
* with the task's reward model: the same rollout with the ``digit_alignment`` classifier, and that
  decode + classifier alone ("models");
* noise: the Gaussian draws no rollout can avoid (initial noise + one draw per stochastic step);
* floor: a bare loop with only what any rollout that keeps its trajectory must do -- the forwards,
  the noise, the kernel's mean and sample (five tensor operations) and writing latent, velocity,
  mean, action and next latent into ``[B, K]`` buffers -- and no env, prompts or log-probs.

and prints

* ``env ratio`` = rollout / bare: env + policy + kernel maths over the velocity forwards they
  serve (target: at most 1.10 at batch 256; the env must never be the bottleneck of a real model);
* ``stepwise ratio``: the same for the per-step API;
* ``all-in ratio`` = rollout with the reward model / (bare + models): the whole rollout over all
  the model compute it needs;
* ``noise share`` = noise / bare: the part of the env ratio that is the sampler itself;
* ``floor ratio`` = floor / bare: what this machine allows any such rollout, env or not;
* ``env_vs_floor`` = rollout / floor: what the env adds to that floor (the ``ratio env_vs_floor_b<batch>`` lines).

    python benchmarks/env_overhead.py                 # digits backend, CPU
    python benchmarks/env_overhead.py --backend toy --device cuda
"""

from __future__ import annotations

import argparse
import platform

import torch

from flowgym.policy import FlowPolicy
from flowgym.registration import make_env
from timing import interleaved_medians


@torch.no_grad()
def bare_forwards(env, policy, td) -> None:
    latent, cond = td.get("latent"), td.get("conditioning")
    for k in range(env.num_steps):
        latent = env.backend.velocity(latent, env.sigmas[k].expand(latent.shape[0]), cond, policy.guidance_scale)


@torch.no_grad()
def fused_rollout(env, policy) -> None:
    env.rollout(env.num_steps, policy)


@torch.no_grad()
def stepwise_rollout(env, policy) -> None:
    td = env.reset()
    for _ in range(env.num_steps):
        td = env.step(policy(td)).get("next")


@torch.no_grad()
def reward_models(env) -> None:
    env.rewards(env.backend.decode(env.episode.latent), env.episode.prompts)


@torch.no_grad()
def floor_loop(env, policy, td) -> None:
    latent, cond = td.get("latent"), td.get("conditioning")
    B, K = latent.shape[0], env.num_steps
    buffers = [latent.new_empty((B, K, *latent.shape[1:])) for _ in range(5)]
    generator = policy._noise_generator(env.device)
    for k in range(K):
        buffers[0][:, k] = latent
        velocity = env.backend.velocity(latent, env.sigmas[k].expand(B), cond, policy.guidance_scale)
        loc = latent * 0.99
        loc.add_(velocity * -0.1)
        latent = torch.randn(loc.shape, generator=generator, device=loc.device).mul_(0.1).add_(loc)
        buffers[1][:, k], buffers[2][:, k], buffers[3][:, k], buffers[4][:, k] = velocity, loc, latent, latent


def noise_draws(env, policy) -> None:
    draws = 1 + int(env.episode_stochastic_mask.sum())
    shape = (env.batch_size[0], *env.backend.latent_shape)
    generator = policy._noise_generator(env.device)
    for _ in range(draws):
        torch.randn(shape, generator=generator, device=env.device)


def measure(backend: str, batch: int, device: str, repeats: int, group_size: int = 8) -> dict[str, float]:
    kwargs = {"num_prompts": batch // group_size, "group_size": group_size, "device": device, "seed": 0}
    env = make_env(backend, rewards={"ink": 1.0}, **kwargs)
    full_env = make_env(backend, backend=env.backend, **kwargs)  # the task's default reward model
    policy = FlowPolicy(env.backend, seed=0)
    td = env.reset()
    runs = {
        "bare": lambda: bare_forwards(env, policy, td),
        "rollout": lambda: fused_rollout(env, policy),
        "stepwise": lambda: stepwise_rollout(env, policy),
        "full_rollout": lambda: fused_rollout(full_env, policy),
        "models": lambda: reward_models(full_env),
        "noise": lambda: noise_draws(env, policy),
        "floor": lambda: floor_loop(env, policy, td),
    }
    t = interleaved_medians(runs, repeats, env.device, warmup=3)
    return {
        "batch": batch,
        **{f"{name}_ms": value * 1e3 for name, value in t.items()},
        "env_ratio": t["rollout"] / t["bare"],
        "stepwise_ratio": t["stepwise"] / t["bare"],
        "all_in_ratio": t["full_rollout"] / (t["bare"] + t["models"]),
        "noise_share": t["noise"] / t["bare"],
        "floor_ratio": t["floor"] / t["bare"],
        "env_vs_floor": t["rollout"] / t["floor"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="digits", choices=["digits", "toy"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"backend={args.backend} device={args.device} ({device_name}), torch threads={torch.get_num_threads()}, "
          f"repeats={args.repeats} (medians)")
    header = ("batch", "bare ms", "rollout ms", "stepwise ms", "models ms", "full ms", "noise ms",
              "env ratio", "stepwise ratio", "all-in ratio", "noise share", "floor ratio")
    print(" ".join(f"{h:>13}" for h in header))
    results = []
    for batch in args.batches:
        r = measure(args.backend, batch, args.device, args.repeats)
        values = (r["batch"], r["bare_ms"], r["rollout_ms"], r["stepwise_ms"], r["models_ms"], r["full_rollout_ms"], r["noise_ms"],
                  r["env_ratio"], r["stepwise_ratio"], r["all_in_ratio"], r["noise_share"], r["floor_ratio"])
        results.append(r)
        print(" ".join(f"{v:>13}" if isinstance(v, int) else f"{v:>13.3f}" for v in values))
    for r in results:  # the floor-relative target: the env's rollout over the floor loop (no env)
        print(f"ratio env_vs_floor_b{r['batch']} {r['env_vs_floor']:.3f}")


if __name__ == "__main__":
    main()
