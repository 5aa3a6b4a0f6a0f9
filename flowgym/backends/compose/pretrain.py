"""Pretrain the compose task's scorer CNN and its text-conditioned flow model from scratch.

    python -m flowgym.backends.compose.pretrain --seed 0 --out flowgym/assets

1. the scorer's ``DigitCellCNN`` on cell crops of the ``scorer`` glyph split (random offset,
   intensity gain, Gaussian noise and speckle), then its reading accuracy on 1,000 seeded
   canvases of the ``eval`` glyph split;
2. the flow model (``ComposeTransformer`` + ``ComposeTextEncoder``, trained jointly) on canvases
   drawn on the fly for train prompts (category chosen uniformly, then a train prompt of it;
   ``sample_scene(pretraining=True)``, glyphs of the ``flow`` split), rectified-flow loss, AdamW,
   cosine learning rate, EMA, 10 % empty prompts for classifier-free guidance;
3. an evaluation of the EMA model with the Euler ODE on category-balanced train and held-out prompt
   lists, several seeds, and a small grid of guidance scales / shifts on seed 0.

Writes ``compose_scorer.safetensors``, ``compose_flow.safetensors``, ``compose_text.safetensors``,
``compose_tokenizer.json`` and ``compose_pretrain.json`` (config, seeds, wall times, scores).
The full run took 56 minutes on 2 CPU cores of a shared machine (compose_pretrain.json "seconds"); ``--quick`` is a shortened run for tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowgym.backends.compose import grammar
from flowgym.backends.compose.backend import (
    DEFAULT_GUIDANCE,
    DEFAULT_SHIFT,
    FLOW_FILE,
    METADATA_FILE,
    TEXT_FILE,
    TOKENIZER_FILE,
    ComposeBackend,
    sample_ode,
)
from flowgym.backends.compose.canvas import (
    CELL_SIZE,
    DIGITS,
    GLYPH_SIZE,
    GLYPH_SPLIT_FRACTIONS,
    GLYPH_SPLIT_SEED,
    glyph_split,
    render_canvases,
)
from flowgym.backends.weights import save_module
from flowgym.backends.compose.model import (
    ComposeTextEncoder,
    ComposeTransformer,
    image_to_latent,
    load_tokenizer,
    tokenize,
    tokenizer_vocabulary,
    write_tokenizer,
)
from flowgym.backends.compose.scorer import SCORER_FILE, ComposeScorer, DigitCellCNN, objects_read_right

__all__ = ["PretrainConfig", "evaluate", "main", "pretrain", "scorer_accuracy", "train_flow", "train_scorer"]


@dataclass
class PretrainConfig:
    """Hyperparameters of the pretraining run (defaults: the shipped model)."""

    seed: int = 0
    scorer_steps: int = 1_500
    scorer_batch: int = 256
    scorer_lr: float = 2e-3
    scorer_arch: dict = field(default_factory=lambda: {"channels": 16, "feature_dim": 32})
    scorer_eval_canvases: int = 1_000
    flow_steps: int = 6_000
    flow_batch: int = 64
    flow_lr: float = 2e-3
    flow_warmup: int = 200
    flow_ema: float = 0.999
    prompt_dropout: float = 0.1
    flow_arch: dict = field(default_factory=lambda: {"patch_size": 4, "layers": 4, "heads": 4, "head_dim": 32})
    text_arch: dict = field(default_factory=lambda: {"width": 64, "layers": 2, "heads": 2})
    eval_per_category: int = 32
    eval_seeds: tuple = (0, 1, 2)
    eval_steps: int = 10
    eval_shift: float = DEFAULT_SHIFT
    eval_guidance: float = DEFAULT_GUIDANCE
    grid_guidance: tuple = (1.0, 2.0, 4.0)
    grid_shift: tuple = (1.0, 3.0)

    @classmethod
    def quick(cls, seed: int = 0) -> "PretrainConfig":
        """A shortened run (well under a minute on 2 cores) that writes loadable files."""
        return cls(
            seed=seed, scorer_steps=60, scorer_batch=64, scorer_eval_canvases=100, flow_steps=20, flow_batch=16, flow_warmup=5,
            flow_ema=0.9, flow_arch={"patch_size": 4, "layers": 1, "heads": 2, "head_dim": 16},
            text_arch={"width": 32, "layers": 1, "heads": 2}, eval_per_category=2, eval_seeds=(0,),
            eval_steps=4, grid_guidance=(), grid_shift=(),
        )  # fmt: skip


def _cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay from ``base`` to ``base / 20``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- scorer
def scorer_crops(glyphs: Tensor, generator: torch.Generator) -> Tensor:
    """Augmented cell crops ``(B, 1, 16, 16)`` of glyphs ``(B, 12, 12)``: random offset 0-4, gain
    0.6-1.2, Gaussian noise (std up to 0.08) and sparse speckle, clamped to [0, 1]."""
    b = glyphs.shape[0]
    crops = torch.zeros(b, 1, CELL_SIZE, CELL_SIZE)
    off = torch.randint(0, CELL_SIZE - GLYPH_SIZE + 1, (b, 2), generator=generator)
    for i in range(b):
        y, x = int(off[i, 0]), int(off[i, 1])
        crops[i, 0, y : y + GLYPH_SIZE, x : x + GLYPH_SIZE] = glyphs[i]
    gain = 0.6 + 0.6 * torch.rand(b, 1, 1, 1, generator=generator)
    noise = torch.randn(crops.shape, generator=generator) * (0.08 * torch.rand(b, 1, 1, 1, generator=generator))
    speckle = (torch.rand(crops.shape, generator=generator) < 0.01).float() * torch.rand(crops.shape, generator=generator)
    return (crops * gain + noise + speckle).clamp(0.0, 1.0)


def train_scorer(config: PretrainConfig, log_every: int = 0) -> DigitCellCNN:
    """Cross-entropy training on augmented crops of the ``scorer`` glyph split (eval mode on return)."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    torch.manual_seed(config.seed + 1)
    glyphs, labels = glyph_split("scorer")
    target = torch.tensor([DIGITS.index(int(d)) for d in labels])
    model = DigitCellCNN(**config.scorer_arch)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.scorer_lr, weight_decay=1e-3)
    model.train()
    for step in range(config.scorer_steps):
        idx = torch.randint(len(glyphs), (config.scorer_batch,), generator=generator)
        loss = F.cross_entropy(model(scorer_crops(glyphs[idx], generator)), target[idx])
        for group in optimiser.param_groups:
            group["lr"] = _cosine_lr(step, config.scorer_steps, config.scorer_lr)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"scorer step {step + 1}/{config.scorer_steps} loss {loss.item():.4f}", flush=True)
    return model.eval().requires_grad_(False)


def scorer_accuracy(scorer: ComposeScorer, num_canvases: int = 1000, seed: int = 0) -> dict[str, float]:
    """Reading accuracy on ``num_canvases`` seeded canvases (prompts from ``all``, ``eval`` glyphs)."""
    rng = np.random.default_rng(seed)
    everything = grammar.all_prompts()
    prompts = [everything[i] for i in rng.integers(len(everything), size=num_canvases)]
    scenes = [grammar.sample_scene(p, rng) for p in prompts]
    images = render_canvases(scenes, rng, split="eval")
    out = objects_read_right(scorer, images, scenes)
    out["strict_on_real"] = float(scorer.score(images, prompts).strict.mean())
    return out


# --------------------------------------------------------------------------- flow model
def _sample_sigmas(n: int, generator: torch.Generator) -> Tensor:
    """Training noise levels: half uniform on [0, 1], half logit-normal(0, 1) (SD3)."""
    uniform = torch.rand(n, generator=generator)
    logit_normal = torch.sigmoid(torch.randn(n, generator=generator))
    return torch.where(torch.rand(n, generator=generator) < 0.5, uniform, logit_normal)


class _PromptSampler:
    """Category-balanced train prompts with scenes satisfying them (pretraining=True)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        train = grammar.prompt_sets()["train"]
        self.by_category = {c: [p for p in train if grammar.parse_prompt(p).category == c] for c in grammar.CATEGORIES}
        self.categories = [c for c in grammar.CATEGORIES if self.by_category[c]]

    def __call__(self, n: int) -> tuple[list[str], Tensor]:
        prompts = []
        for c in self.rng.integers(len(self.categories), size=n):
            pool = self.by_category[self.categories[c]]
            prompts.append(pool[self.rng.integers(len(pool))])
        scenes = [grammar.sample_scene(p, self.rng, pretraining=True) for p in prompts]
        return prompts, render_canvases(scenes, self.rng, split="flow")


def train_flow(
    config: PretrainConfig, tokenizer_path: str | Path, log_every: int = 0
) -> tuple[ComposeTransformer, ComposeTextEncoder, list[dict]]:
    """Joint rectified-flow training of transformer and text encoder; returns the EMA copies (eval
    mode) and the loss log. Loss: ``mean ||v(x_s, s, text) - (eps - x_0)||^2``, the prompt
    replaced by ``""`` with probability ``prompt_dropout``."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(str(tokenizer_path))
    sampler = _PromptSampler(config.seed)
    vocab = tokenizer_vocabulary()
    text = ComposeTextEncoder(len(vocab), eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"],
                              bos_token_id=vocab["<bos>"], **config.text_arch)  # fmt: skip
    model = ComposeTransformer(text_width=config.text_arch["width"], **config.flow_arch)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    ema_text = copy.deepcopy(text).requires_grad_(False)
    params = [*model.parameters(), *text.parameters()]
    optimiser = torch.optim.AdamW(params, lr=config.flow_lr, weight_decay=1e-4)
    train_prompts = grammar.prompt_sets()["train"]
    id_table = tokenize(tokenizer, ["", *train_prompts])
    row = {p: i + 1 for i, p in enumerate(train_prompts)}
    log: list[dict] = []
    start = time.perf_counter()
    running = 0.0
    for step in range(config.flow_steps):
        prompts, images = sampler(config.flow_batch)
        rows = torch.tensor([row[p] for p in prompts])
        rows[torch.rand(len(rows), generator=generator) < config.prompt_dropout] = 0
        x0 = image_to_latent(images)
        eps = torch.randn(x0.shape, generator=generator)
        s = _sample_sigmas(len(x0), generator)
        xs = (1.0 - s)[:, None, None, None] * x0 + s[:, None, None, None] * eps
        hidden, pooled = text(id_table[rows])
        loss = F.mse_loss(model(xs, s, hidden, pooled), eps - x0)
        for group in optimiser.param_groups:
            group["lr"] = _cosine_lr(step, config.flow_steps, config.flow_lr, config.flow_warmup)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        decay = min(config.flow_ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_model, model), (ema_text, text)):
                for p_ema, p in zip(ema.parameters(), live.parameters()):
                    p_ema.lerp_(p, 1.0 - decay)
        running += loss.item()
        if log_every and (step + 1) % log_every == 0:
            entry = {"step": step + 1, "loss": running / log_every, "seconds": time.perf_counter() - start}
            log.append(entry)
            running = 0.0
            print(f"flow step {step + 1}/{config.flow_steps} loss {entry['loss']:.4f} {entry['seconds']:.0f}s", flush=True)
    return ema_model.eval(), ema_text.eval(), log


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    backend: ComposeBackend,
    scorer: ComposeScorer,
    prompt_set: str,
    per_category: int = 32,
    seed: int = 0,
    num_steps: int = 10,
    shift: float = DEFAULT_SHIFT,
    guidance_scale: float = DEFAULT_GUIDANCE,
) -> dict[str, float]:
    """Scores of ODE samples for ``per_category`` prompts per category of ``prompt_set`` (seeded:
    the prompt choice by ``balanced_prompts(seed)``, the noise by ``seed``)."""
    prompts = grammar.balanced_prompts(backend.resolve_prompt_set(prompt_set), per_category, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    images = sample_ode(backend, prompts, num_steps, shift, guidance_scale, generator)
    metrics = scorer.metrics(images, prompts)
    metrics["num_samples"] = len(prompts)
    return metrics


def _mean_over(runs: list[dict]) -> dict[str, float]:
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {k: float(np.nanmean([r[k] for r in runs])) for k in keys}


def pretrain(config: PretrainConfig, out: str | Path, log_every: int = 0) -> dict:
    """Train the scorer and the flow model, save them to ``out``, evaluate, write the json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cnn = train_scorer(config, log_every=log_every and max(1, config.scorer_steps // 5))
    scorer_seconds = time.perf_counter() - start
    save_module(cnn, out / SCORER_FILE, extra={"seed": config.seed, "steps": config.scorer_steps})
    scorer = ComposeScorer(cnn)
    reading = scorer_accuracy(scorer, config.scorer_eval_canvases, seed=config.seed)
    print("scorer", json.dumps(reading), flush=True)
    write_tokenizer(out / TOKENIZER_FILE)
    t_flow = time.perf_counter()
    model, text, loss_log = train_flow(config, out / TOKENIZER_FILE, log_every)
    flow_seconds = time.perf_counter() - t_flow
    save_module(model, out / FLOW_FILE, extra={"seed": config.seed, "steps": config.flow_steps})
    save_module(text, out / TEXT_FILE, extra={"seed": config.seed, "steps": config.flow_steps})
    backend = ComposeBackend(out)
    t_eval = time.perf_counter()
    results: dict[str, dict] = {}
    for prompt_set in ("train", "heldout"):
        runs = [
            evaluate(backend, scorer, prompt_set, config.eval_per_category, seed, config.eval_steps,
                     config.eval_shift, config.eval_guidance)
            for seed in config.eval_seeds
        ]  # fmt: skip
        results[prompt_set] = {"mean": _mean_over(runs), "per_seed": runs}
        print(prompt_set, json.dumps({k: round(v, 3) for k, v in results[prompt_set]["mean"].items()}), flush=True)
    grid = []
    for guidance in config.grid_guidance:
        for shift in config.grid_shift:
            m = evaluate(backend, scorer, "train", config.eval_per_category, 0, config.eval_steps, shift, guidance)
            grid.append({"guidance_scale": guidance, "shift": shift, **{k: m[k] for k in m if k.startswith("compose")}})
            print("grid", guidance, shift, round(m["compose"], 3), round(m["compose_partial"], 3), flush=True)
    eval_seconds = time.perf_counter() - t_eval
    metadata = {
        "config": asdict(config),
        "glyph_split": {"seed": GLYPH_SPLIT_SEED, "fractions": GLYPH_SPLIT_FRACTIONS},
        "prompt_split": {k: len(v) for k, v in grammar.prompt_sets().items()},
        "scorer_reading": reading,
        "eval": {
            "prompt_sets": ["train", "heldout"], "seeds": list(config.eval_seeds),
            "per_category": config.eval_per_category, "num_steps": config.eval_steps,
            "shift": config.eval_shift, "guidance_scale": config.eval_guidance, "sampler": "Euler ODE",
            **results,
        },  # fmt: skip
        "guidance_shift_grid": grid,
        "loss_log": loss_log,
        "seconds": {
            "scorer": scorer_seconds, "flow": flow_seconds, "flow_per_step": flow_seconds / max(1, config.flow_steps),
            "eval": eval_seconds, "total": time.perf_counter() - start,
        },  # fmt: skip
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "parameters": {
            "transformer": sum(p.numel() for p in model.parameters()),
            "text_encoder": sum(p.numel() for p in text.parameters()),
            "scorer": sum(p.numel() for p in cnn.parameters()),
        },
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
    return metadata


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m flowgym.backends.compose.pretrain")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the glyph and prompt splits are fixed)")
    parser.add_argument("--out", type=Path, default=Path("flowgym/assets"), help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="flow-model optimiser steps (default 6000)")
    parser.add_argument("--scorer-steps", type=int, default=None, help="scorer CNN optimiser steps")
    parser.add_argument("--lr", type=float, default=None, help="flow-model learning rate")
    parser.add_argument("--quick", action="store_true", help="shortened run (under a minute)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--log-every", type=int, default=200, help="print the loss every N steps (0: never)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = PretrainConfig.quick(args.seed) if args.quick else PretrainConfig(seed=args.seed)
    for name, attr in (("steps", "flow_steps"), ("scorer_steps", "scorer_steps")):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1")
            setattr(config, attr, value)
    if args.lr is not None:
        config.flow_lr = args.lr
    metadata = pretrain(config, args.out, args.log_every)
    print(json.dumps({"eval": {k: metadata["eval"][k]["mean"] for k in ("train", "heldout")},
                      "seconds": metadata["seconds"]}, indent=1))  # fmt: skip
    return metadata


if __name__ == "__main__":
    main()
