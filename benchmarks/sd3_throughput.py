"""SD3 throughput: images per second for rollouts and for training steps, on any device.

Two numbers per configuration, both medians over ``--repeats`` runs after one warm-up:

* rollout: ``env.reset()`` then K x (``policy(td)`` + ``env.step(td)``) over a batch of B images:
  K transformer forwards (twice the batch with CFG), the step kernel, the terminal VAE decode and
  the JPEG-compressibility reward, i.e. exactly what the trainer's ``collect`` does (minus the
  optional drift-KL forward). Reported as images / s.
* train step: one optimizer step of a loss module (``algos.losses.make_loss``) on N (sample,
  stochastic step) pairs taken from a real rollout: forward + backward through the transformer
  with LoRA, gradient-norm clipping, AdamW. Reported as pairs / s (N = B by default).
* end to end: images / s of rollout + training for a recipe that trains T steps per image
  (T = 3 for the Flow-DPPO window, 9 for Flow-GRPO): ``1 / (1 / rollout_ips + T / train_pps)``.

Models (``--model``):

* ``tiny``: the random tiny SD3 pipeline (``flowgym.testing.tiny_sd3``) saved to a temporary folder
  and loaded through ``make_backend("sd3", model=<folder>)``: a smoke test of the whole path.
* ``sd35-random``: an SD3.5-medium-architecture ``SD3Transformer2DModel`` (24 joint blocks, 24
  heads x 64, dual attention in blocks 0-12, RMS qk-norm, patch 2, 16 latent channels, 2.26B
  parameters) and the real-size SD3 VAE, with random weights (no download), bf16 on CUDA. Text
  encoders are replaced by random conditioning of the real shapes (prompt_embeds
  ``(77 + max_sequence_length, 4096)`` = (333, 4096), pooled (2048,)): they run once per prompt
  and are cached, so they do not enter either number.
* anything else: a hub id or a local diffusers folder, loaded by ``SD3Backend.from_pretrained``.

Every configuration is measured in one process on one backend; out-of-memory is caught and
reported as ``OOM`` in the table.

    python benchmarks/sd3_throughput.py --device cpu --model tiny
    python benchmarks/sd3_throughput.py --device cuda --model sd35-random --batch-sizes 4 8 \\
        --gradient-checkpointing both

Results are printed and appended (a dated section with the device name) to
``benchmarks/results/sd3_throughput.md`` (``--output``; ``--no-record`` to skip).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import math
import platform
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch
from tensordict import TensorDict

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from algos.losses import make_loss  # noqa: E402
from flowgym.backends.sd3 import SD3Backend  # noqa: E402
from flowgym.env import FlowDenoiseEnv  # noqa: E402
from flowgym.policy import FlowPolicy  # noqa: E402
from flowgym.registration import make_backend, make_env  # noqa: E402

DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "sd3_throughput.md"

#: ``transformer/config.json`` of stabilityai/stable-diffusion-3.5-medium
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}

#: ``vae/config.json`` of SD3 / SD3.5 (16 latent channels, 8x downsampling)
SD3_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

PROMPTS = [f"benchmark prompt {i}: a photo of object number {i}" for i in range(64)]


# ---------------------------------------------------------------------------------- models
class RandomTextSD3Backend(SD3Backend):
    """``SD3Backend`` whose prompt encoding is random conditioning of the real shapes.

    ``prompt_embeds (77 + max_sequence_length, joint_attention_dim)`` and
    ``pooled_prompt_embeds (pooled_projection_dim,)``, deterministic per prompt (seeded by its
    CRC32). For throughput measurements only: no text encoder is loaded.
    """

    def _encode(self, prompts: list[str]) -> TensorDict:
        config = self.transformer.config
        tokens = 77 + self.max_sequence_length
        embeds, pooled = [], []
        for prompt in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
            embeds.append(torch.randn(tokens, config.joint_attention_dim, generator=g))
            pooled.append(torch.randn(config.pooled_projection_dim, generator=g))
        dtype = self.transformer.pos_embed.proj.weight.dtype
        return TensorDict(
            {"prompt_embeds": torch.stack(embeds).to(self.device, dtype), "pooled_prompt_embeds": torch.stack(pooled).to(self.device, dtype)},
            batch_size=[len(prompts)],
            device=self.device,
        )


def build_sd35_random(
    device: torch.device, dtype: torch.dtype, resolution: int, lora_rank: int, lora_alpha: float, max_sequence_length: int
) -> SD3Backend:
    """SD3.5-medium-architecture transformer + SD3 VAE with random weights, on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device):  # initialise directly on the device (2.5B parameters)
        transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER).to(dtype)
        vae = AutoencoderKL(**SD3_VAE).to(dtype)
    stub = torch.nn.Identity()
    return RandomTextSD3Backend(
        transformer, vae, stub, None, stub, None,
        resolution=resolution, lora_rank=lora_rank, lora_alpha=lora_alpha,
        max_sequence_length=max_sequence_length, scheduler_shift=3.0, model_id="sd35-random",
    ).to(device)


def build_backend(args: argparse.Namespace, folder: str | None) -> SD3Backend:
    """The backend under test: ``sd35-random`` built in memory, anything else through ``make_backend``."""
    device = torch.device(args.device)
    if args.model == "sd35-random":
        from flowgym.backends.sd3 import resolve_dtype

        return build_sd35_random(
            device, resolve_dtype(args.dtype, device), args.resolution, args.lora_rank, args.lora_alpha,
            args.max_sequence_length,
        )
    return make_backend(
        "sd3", model=folder, resolution=args.resolution, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        max_sequence_length=args.max_sequence_length, dtype=args.dtype, device=args.device,
    )


def make_benchmark_env(args: argparse.Namespace, batch: int, backend: SD3Backend) -> FlowDenoiseEnv:
    """B = ``batch`` images: prompts x group (group = gcd(batch, --group-size)), JPEG reward."""
    group = math.gcd(batch, args.group_size)
    return make_env(
        "sd3", backend=backend, num_prompts=batch // group, group_size=group, num_steps=args.num_steps,
        prompts=PROMPTS, rewards={"jpeg_compressibility": 1.0}, stochastic_steps="all_but_last",
        device=args.device, seed=0,
    )


# ---------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict[str, float], key: str) -> Iterator[None]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        out[key] = max(out.get(key, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)


@torch.no_grad()
def rollout(env: FlowDenoiseEnv, policy: FlowPolicy, keep: bool = False) -> tuple[float, TensorDict | None, TensorDict | None]:
    """Seconds for one full rollout; with ``keep``, also the (B, K) trajectory and the conditioning."""
    keys = ("latent", "sigma", "sigma_next", "stochastic", "action", "sample_log_prob", "loc", "scale", "velocity")
    _sync(env.device)
    start = time.perf_counter()
    td = env.reset()
    conditioning = td.get("conditioning") if keep else None
    steps = []
    for _ in range(env.num_steps):
        td = policy(td)
        if keep:
            steps.append(td.select(*keys).clone())
        td = env.step(td).get("next")
    _sync(env.device)
    seconds = time.perf_counter() - start
    return seconds, (torch.stack(steps, dim=1) if keep else None), conditioning


def training_pairs(trajectory: TensorDict, conditioning: TensorDict, n: int, seed: int = 0) -> TensorDict:
    """``n`` random (sample, stochastic step) pairs of a rollout with random advantages, as the trainer builds them."""
    B, K = trajectory.batch_size
    trajectory.set("sample_index", torch.arange(B, device=trajectory.device)[:, None].expand(B, K))
    pairs = trajectory[trajectory.get("stochastic")]
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(pairs.batch_size[0], generator=g)
    index = index.repeat(math.ceil(n / len(index)))[:n].to(pairs.device)
    batch = pairs[index]
    batch.set("conditioning", conditioning[batch.get("sample_index")])
    batch.set("advantage", torch.randn(n, generator=g).to(pairs.device))
    return batch


def train_step(loss_module, optimizer: torch.optim.Optimizer, batch: TensorDict, device: torch.device) -> float:
    """Seconds for one optimizer step: loss forward, backward, grad-norm clip, AdamW step."""
    _sync(device)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    out = loss_module(batch)
    loss = sum(v for k, v in out.items() if k.startswith("loss_"))
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    _sync(device)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {float(loss)}")
    return time.perf_counter() - start


def _oom_errors() -> tuple[type[BaseException], ...]:
    return (torch.cuda.OutOfMemoryError,) if hasattr(torch.cuda, "OutOfMemoryError") else (RuntimeError,)


def measure(args: argparse.Namespace, env: FlowDenoiseEnv, guidance: float, checkpointing: list[bool]) -> Iterator[dict[str, Any]]:
    """Rows for one (batch, CFG): the rollout is measured once (no gradients, so checkpointing does not
    matter), the training step once per gradient-checkpointing setting."""
    device = torch.device(args.device)
    backend = env.backend
    B = env.batch_size[0]
    kernel = "cps" if args.loss == "cps" else "flow_sde"
    policy = FlowPolicy(backend, kernel=kernel, noise_level=0.8 if kernel == "cps" else 0.7, guidance_scale=guidance, seed=0)
    base: dict[str, Any] = {"batch": B, "cfg": guidance}
    times: list[float] = []
    try:
        with peak_memory(device, base, "rollout_gib"):
            _, trajectory, conditioning = rollout(env, policy, keep=True)  # warm-up, and the training data
            for _ in range(args.repeats):
                times.append(rollout(env, policy)[0])
        base["rollout_s"] = statistics.median(times)
        base["rollout_ips"] = B / base["rollout_s"]
    except _oom_errors():
        base["rollout_error"] = "OOM"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        yield base
        return
    n = args.train_pairs or B
    batch = training_pairs(trajectory, conditioning, n)
    del trajectory
    for ckpt in checkpointing:
        row = {**base, "ckpt": "on" if ckpt else "off", "pairs": n}
        row.pop("train_gib", None)
        if ckpt:
            backend.transformer.enable_gradient_checkpointing()
        else:
            backend.transformer.disable_gradient_checkpointing()
        loss_module = make_loss(args.loss, policy)
        optimizer = torch.optim.AdamW(list(loss_module.trainable_parameters()), lr=3e-4, weight_decay=1e-4)
        times = []
        try:
            with peak_memory(device, row, "train_gib"):
                train_step(loss_module, optimizer, batch, device)  # warm-up (AdamW state allocation)
                for _ in range(args.repeats):
                    times.append(train_step(loss_module, optimizer, batch, device))
            row["train_s"] = statistics.median(times)
            row["train_pps"] = n / row["train_s"]
            for T in (3, 9):
                row[f"e2e_{T}"] = 1.0 / (1.0 / row["rollout_ips"] + T / row["train_pps"])
        except _oom_errors():
            row["train_error"] = "OOM"
        finally:
            optimizer.zero_grad(set_to_none=True)
            del optimizer, loss_module
            if device.type == "cuda":
                torch.cuda.empty_cache()
        yield row
    backend.transformer.disable_gradient_checkpointing()


# ---------------------------------------------------------------------------------- report
COLUMNS = [
    ("batch", "batch", "{}"),
    ("ckpt", "grad ckpt", "{}"),
    ("cfg", "CFG", "{:g}"),
    ("rollout_s", "rollout s", "{:.3f}"),
    ("rollout_ips", "rollout img/s", "{:.2f}"),
    ("rollout_gib", "rollout peak GiB", "{:.1f}"),
    ("pairs", "train pairs", "{}"),
    ("train_s", "train step s", "{:.3f}"),
    ("train_pps", "train pairs/s", "{:.2f}"),
    ("train_gib", "train peak GiB", "{:.1f}"),
    ("e2e_3", "e2e img/s (T=3)", "{:.2f}"),
    ("e2e_9", "e2e img/s (T=9)", "{:.2f}"),
]


def format_row(row: dict[str, Any]) -> list[str]:
    cells = []
    for key, _, fmt in COLUMNS:
        if key in row:
            cells.append(fmt.format(row[key]))
        elif key.startswith("rollout") and "rollout_error" in row:
            cells.append(row["rollout_error"] if key == "rollout_s" else "-")
        elif key.startswith("train") and "train_error" in row:
            cells.append(row["train_error"] if key == "train_s" else "-")
        else:
            cells.append("-")
    return cells


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(format_row(r)) + " |" for r in rows]
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def describe(args: argparse.Namespace, backend: SD3Backend) -> str:
    import diffusers

    params = sum(p.numel() for p in backend.transformer.parameters())
    lora = sum(p.numel() for p in backend.trainable_parameters())
    text = 77 + backend.max_sequence_length
    cuda = f", CUDA {torch.version.cuda}" if torch.device(args.device).type == "cuda" else ""
    return (
        f"model `{args.model}` ({_count(params)} transformer parameters, {_count(lora)} LoRA r{backend.lora_rank}), "
        f"dtype {backend.dtype}, resolution {backend.resolution} (latents {tuple(backend.latent_shape)}), "
        f"{text} text tokens, K={args.num_steps} steps, loss `{args.loss}`, {args.repeats} repeats (median); "
        f"torch {torch.__version__}{cuda}, diffusers {diffusers.__version__}"
    )


def start_record(path: Path, header: str, description: str, command: str) -> None:
    """Append a dated section and the table header; rows follow with ``record_row`` as they are measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a") as handle:
        if new:
            handle.write(
                "# SD3 throughput\n\nMeasured by `benchmarks/sd3_throughput.py`: rollout = reset + K x (policy + env step) "
                "+ VAE decode + JPEG reward; train step = one AdamW step of the loss on N (sample, step) pairs "
                "(forward + backward through the transformer with LoRA); e2e = images/s of rollout plus training "
                "T stochastic steps per image. Peak GiB = torch.cuda.max_memory_allocated. Newest sections last.\n"
            )
        table_head = markdown_table([]).rstrip("\n")
        handle.write(f"\n## {header}\n\n{description}\n\n`{command}`\n\n{table_head}\n")


def record_row(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write("| " + " | ".join(format_row(row)) + " |\n")


# ---------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", help="tiny, sd35-random, or a hub id / local diffusers folder")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 4 8")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 for tiny, 512 otherwise")
    parser.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens; default 16 for tiny, 256 otherwise")
    parser.add_argument("--lora-rank", type=int, default=None, help="default: 4 for tiny, 32 otherwise")
    parser.add_argument("--lora-alpha", type=float, default=None, help="default: 2 x rank")
    parser.add_argument("--dtype", default=None, help="default: bf16 on CUDA, float32 on CPU")
    parser.add_argument("--loss", default="flow_dppo", choices=["flow_dppo", "grpo", "cps", "ppo_clip"])
    parser.add_argument("--train-pairs", type=int, default=None, help="(sample, step) pairs per optimizer step; default: the batch size")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--gradient-checkpointing", choices=["off", "on", "both"], default="off")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to --output")
    args = parser.parse_args(argv)
    tiny = args.model == "tiny"
    args.batch_sizes = args.batch_sizes or [4, 8]
    args.resolution = args.resolution or (64 if tiny else 512)
    args.max_sequence_length = args.max_sequence_length or (16 if tiny else 256)
    args.lora_rank = args.lora_rank if args.lora_rank is not None else (4 if tiny else 32)
    args.lora_alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    command = "python benchmarks/sd3_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if args.model == "tiny":
            from flowgym.testing.tiny_sd3 import save_tiny_sd3

            folder = str(save_tiny_sd3(Path(tmp) / "tiny_sd3"))
        start = time.perf_counter()
        backend = build_backend(args, folder)
        print(f"built {args.model} in {time.perf_counter() - start:.1f} s", flush=True)
        name, description = device_name(device), describe(args, backend)
        print(f"{name}: {description}", flush=True)
        if not args.no_record:
            start_record(args.output, f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, {name}", description, command)
        settings = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
        for guidance in args.guidance_scales:
            for batch in args.batch_sizes:
                env = make_benchmark_env(args, batch, backend)
                for row in measure(args, env, guidance, settings):
                    rows.append(row)
                    print(" | ".join(f"{title}={cell}" for (_, title, _), cell in zip(COLUMNS, format_row(row))), flush=True)
                    if not args.no_record:
                        record_row(args.output, row)
                del env
    print(f"\n{name}: {description}\n\n{markdown_table(rows)}")
    if not args.no_record:
        print(f"\nappended to {args.output}")
    return rows


if __name__ == "__main__":
    main()
