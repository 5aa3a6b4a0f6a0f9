"""A custom RL loop without the trainer: TorchRL env + FlowPolicy + any loss module.

    python examples/custom_loop.py --loss flow_dppo --iterations 20

Swap ``--loss`` for grpo, ppo_clip or cps (cps wants ``--kernel cps --noise-level 0.8``).
"""

import argparse

import torch

import flowgym
from algos.advantages import make_advantage
from algos.losses import make_loss
from flowgym.policy import FlowPolicy

parser = argparse.ArgumentParser()
parser.add_argument("--loss", default="flow_dppo")
parser.add_argument("--kernel", default="flow_sde")
parser.add_argument("--noise-level", type=float, default=0.7)
parser.add_argument("--iterations", type=int, default=20)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

# 8 prompts x a group of 8 samples, digits 0-4, bold-but-recognisable reward
env = flowgym.make_env(
    "digits", num_prompts=8, group_size=8, seed=args.seed,
    rewards={"digit_alignment": 1.0, "ink": 1.0}, stochastic_steps=list(range(8)),
)
policy = FlowPolicy(env.backend, kernel=args.kernel, noise_level=args.noise_level, seed=args.seed)
loss_module = make_loss(args.loss, policy)
advantage = make_advantage(loss_module.default_advantage)
optimizer = torch.optim.AdamW(loss_module.trainable_parameters(), lr=3e-4, weight_decay=1e-4)

for iteration in range(args.iterations):
    # 1. rollout: one episode of the whole batch, K denoising steps, no gradients
    with torch.no_grad():
        trajectory = env.rollout(env.num_steps, policy, break_when_any_done=True)  # [B, K]
    final = trajectory[:, -1].get("next")
    rewards = final.get("reward").reshape(-1)
    terms = {k: v.reshape(-1) for k, v in final.get("reward_terms").items()}

    # 2. one advantage per sample, broadcast to its stochastic steps
    adv = advantage(rewards, terms, final.get("prompt").tolist(), final.get("group_id"))
    trajectory.set("advantage", adv[:, None].expand(trajectory.batch_size))
    pairs = trajectory[trajectory.get("stochastic") & (trajectory.get("advantage") != 0)]

    # 3. two mini-batches, one optimizer step each
    for chunk in torch.randperm(pairs.batch_size[0]).chunk(2):
        out = loss_module(pairs[chunk])
        loss = sum(v for k, v in out.items() if k.startswith("loss_"))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(loss_module.trainable_parameters(), 1.0)
        optimizer.step()

    print(
        f"iter {iteration + 1:3d}  reward {rewards.mean():.3f}  "
        + "  ".join(f"{k} {v.mean():.3f}" for k, v in terms.items())
        + f"  kl(old,new) {float(out['kl_old_new_mean']):.2e}"
    )
