"""A picture of what training did: prompts x seeds, pretrained beside trained, from the same noise.

    python examples/sample_grid.py outputs/flow_dppo-compose/<run> --out grid.png
    python examples/sample_grid.py RUN_DIR --prompts "a 3" "three 2s" --seeds 4

Reads the run's resolved config (``<run>/.hydra/config.yaml``, written by ``python -m algos.run``),
rebuilds its environment, loads the newest checkpoint and samples each prompt with the
deterministic ODE, once with the reference (pretrained) policy and once with the trained one,
from the same initial noise per seed. Without ``--prompts`` it takes the first prompts of the
training set and of the held-out set (``--per-set`` of each).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import OmegaConf
from tensordict import NonTensorStack, TensorDict

from algos.trainer import Trainer
from flowgym.env import FlowDenoiseEnv


def sample(trainer: Trainer, prompts: Sequence[str], seeds: int, *, reference: bool, seed: int = 1234) -> torch.Tensor:
    """Images ``(len(prompts), seeds, C, H, W)``: ODE samples, the same initial noise for both models."""
    rows = []
    for index, prompt in enumerate(prompts):
        env = FlowDenoiseEnv(
            trainer.backend, num_prompts=1, group_size=seeds, num_steps=trainer.env.num_steps, shift=trainer.env.shift,
            prompts=[prompt], rewards=trainer.env.rewards, stochastic_steps="none", device=trainer.device,
            seed=seed + index,
        )
        request = TensorDict({}, batch_size=env.batch_size, device=trainer.device)
        request.set("prompt", NonTensorStack(*([prompt] * seeds), batch_size=env.batch_size))
        policy = trainer.evaluator.policy
        with torch.no_grad(), (policy.reference() if reference else contextlib.nullcontext()):
            env.rollout(env.num_steps, policy, tensordict=request)
        rows.append(env.last_images.detach().cpu())
    return torch.stack(rows)


def draw(prompts: Sequence[str], before: torch.Tensor, after: torch.Tensor, out: Path, title: str) -> None:
    """A grid: one row per prompt, the pretrained samples on the left, the trained ones on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, seeds = before.shape[:2]
    fig, axes = plt.subplots(n, 2 * seeds, figsize=(1.1 * 2 * seeds + 1.6, 1.1 * n + 0.6), squeeze=False)
    for row in range(n):
        for col in range(2 * seeds):
            image = (before if col < seeds else after)[row, col % seeds]
            ax = axes[row][col]
            if image.shape[0] == 1:
                ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(prompts[row], rotation=0, ha="right", va="center", fontsize=8)
            if row == 0 and col % seeds == 0:
                ax.set_title("pretrained" if col < seeds else "trained", fontsize=9, loc="left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder written by python -m algos.run")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/sample_grid.png)")
    parser.add_argument("--prompts", nargs="*", default=None, help="prompts to draw (default: from the train and held-out sets)")
    parser.add_argument("--per-set", type=int, default=4, help="prompts taken from each set without --prompts")
    parser.add_argument("--seeds", type=int, default=3, help="samples per prompt and model")
    args = parser.parse_args(argv)
    config_file = args.run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise SystemExit(f"{config_file} does not exist: pass a run folder written by python -m algos.run")
    cfg = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    cfg["logger"] = {**cfg.get("logger", {}), "backends": []}
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(cfg, scratch, progress=False)
        if not trainer.resume(args.run_dir):
            raise SystemExit(f"no complete checkpoint under {args.run_dir / 'checkpoints'}")
    prompts = args.prompts
    if not prompts:  # the first distinct prompts of each evaluation set (train, then held-out)
        prompts = [p for prompts_of_set in trainer.evaluator.eval_sets.values() for p in list(dict.fromkeys(prompts_of_set))[: args.per_set]]
    before = sample(trainer, prompts, args.seeds, reference=True)
    after = sample(trainer, prompts, args.seeds, reference=False)
    out = args.out or args.run_dir / "sample_grid.png"
    draw(prompts, before, after, out, f"{cfg['algo']['name']} on {cfg['env']['name']}, iteration {trainer.iteration}")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
