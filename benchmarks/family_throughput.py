"""Per-family throughput: samples per second of a rollout and of an update, for every diffusers family.

For each family (``sd3``, ``flux``, ``flux2_klein``, ``qwen_image``) the run config is composed with Hydra
exactly as ``python -m algos.run env=<family>_tiny reward=jpeg_compressibility`` would compose it
(``algo=flow_dppo``, the default), a ``Trainer`` is built from it, and two numbers are measured, each the
median over ``--repeats`` runs after one warm-up:

* rollout: ``env.rollout(env.num_steps, env.make_policy())`` under ``torch.no_grad()``: one batched
  episode of ``num_prompts x group_size`` samples with the family's default policy (Flow-SDE at 0.7, no
  guidance), i.e. K transformer forwards, the step kernel, the VAE decode and the reward. Samples / s.
* update: ``trainer.update(pairs, conditioning)``, what one ``Trainer`` iteration runs after its
  rollout: forward + backward of every trained (sample, stochastic step) pair through the transformer
  with LoRA, in ``trainer.num_minibatches`` AdamW steps, on the pairs of one real rollout. Reported as
  samples / s (the rollout's samples whose pairs were trained) and pairs / s.

``--real`` measures the real configs (``env=<family>``: the hub models at 512 px) the same way when CUDA
is present; the weights must be available locally or through the hub (a missing model prints its one
line and the family is skipped). Without CUDA ``--real`` is skipped with a message.

    python benchmarks/family_throughput.py --threads 1                 # the tiny configs, on the CPU
    python benchmarks/family_throughput.py --real --repeats 3          # + the real configs on a GPU
    python benchmarks/family_throughput.py --real --override env.num_prompts=1 env.group_size=8

The images of the tiny pipelines are noise (random weights); the numbers measure the code path only.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from algos.trainer import Trainer  # noqa: E402
from flowgym.hub import ModelNotAvailableError  # noqa: E402

FAMILIES = ("sd3", "flux", "flux2_klein", "qwen_image")
CONFIGS = str(ROOT / "configs")
#: no evaluation, checkpoints, sample grids or reports: only the measured work
QUIET = [
    "reward=jpeg_compressibility", "trainer.eval_every=0", "trainer.checkpoint_every=0",
    "logger.backends=[csv]", "logger.sample_grid=false", "logger.report=false",
]


def compose_run(env: str, device: str, threads: int | None, overrides: list[str]) -> dict[str, Any]:
    extra = [f"env={env}", f"device={device}", *QUIET, *overrides]
    if threads is not None:
        extra.append(f"num_threads={threads}")
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=extra)
    return OmegaConf.to_container(cfg, resolve=True)


def timed(function: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    """Median wall time of ``function`` over ``repeats`` calls after one warm-up; its last result."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    result = function()  # warm-up: lazy initialisation, allocator, caches
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = function()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(env_name: str, device: str, threads: int | None, repeats: int, overrides: list[str]) -> dict[str, Any]:
    """Rollout and update throughput of one env config (see the module docstring)."""
    cfg = compose_run(env_name, device, threads, overrides)
    with tempfile.TemporaryDirectory(prefix="flowgym-throughput-") as run_dir:
        trainer = Trainer(cfg, run_dir, progress=False)
        env = trainer.env
        batch = env.num_prompts * env.group_size
        policy = env.make_policy()

        def rollout() -> None:
            with torch.no_grad():
                env.rollout(env.num_steps, policy)

        rollout_s, _ = timed(rollout, repeats, trainer.device)

        collected = trainer.collect()  # one real rollout of the trainer's policy: the pairs an iteration trains on
        pairs = trainer.training_batch(collected)
        conditioning = collected["conditioning"]
        update_s, _ = timed(lambda: trainer.update(pairs, conditioning), repeats, trainer.device)
        trained_samples = int(torch.unique(pairs.get("sample_index")).numel())
        return {
            "config": f"env={env_name}",
            "batch": batch,
            "steps": env.num_steps,
            "resolution": trainer.backend.resolution,
            "rollout_s": rollout_s,
            "rollout_sps": batch / rollout_s,
            "pairs": int(pairs.batch_size[0]),
            "trained_samples": trained_samples,
            "update_s": update_s,
            "update_sps": trained_samples / update_s,
            "update_pps": pairs.batch_size[0] / update_s,
        }


HEADER = (
    f"{'family':<12} {'config':<22} {'px':>4} {'batch':>5} {'K':>3} {'rollout s':>10} {'rollout samples/s':>18} "
    f"{'pairs':>6} {'update s':>9} {'update samples/s':>17} {'update pairs/s':>15}"
)


def row(family: str, r: dict[str, Any]) -> str:
    return (
        f"{family:<12} {r['config']:<22} {r['resolution']:>4} {r['batch']:>5} {r['steps']:>3} {r['rollout_s']:>10.3f} "
        f"{r['rollout_sps']:>18.2f} {r['pairs']:>6} {r['update_s']:>9.3f} {r['update_sps']:>17.2f} {r['update_pps']:>15.2f}"
    )


def run_table(title: str, suffix: str, families: list[str], device: str, args: argparse.Namespace) -> None:
    print(f"\n{title}")
    print(HEADER)
    for family in families:
        try:
            print(row(family, measure(f"{family}{suffix}", device, args.threads, args.repeats, args.override)), flush=True)
        except ModelNotAvailableError as error:
            print(f"{family:<12} skipped: {error}", flush=True)
        except torch.cuda.OutOfMemoryError:
            print(f"{family:<12} OOM (lower env.num_prompts / env.group_size with --override)", flush=True)
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (num_threads); default: torch's")
    parser.add_argument("--real", action="store_true", help="also the real configs (env=<family>) on CUDA")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every config")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    import diffusers

    print(
        f"flowgym family throughput: torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"median of {args.repeats} after 1 warm-up"
    )
    run_table("tiny offline pipelines (env=<family>_tiny, algo=flow_dppo, reward=jpeg_compressibility), device cpu",
              "_tiny", args.families, "cpu", args)
    if not args.real:
        return
    if not torch.cuda.is_available():
        print("\n--real skipped: no CUDA device here (torch.cuda.is_available() is False); "
              "the real configs (FLUX.1-dev, FLUX.2-klein-base-9B, Qwen-Image, SD3.5-medium) need a GPU")
        return
    name = torch.cuda.get_device_name()
    run_table(f"real configs (env=<family>, algo=flow_dppo, reward=jpeg_compressibility), device cuda ({name})",
              "", args.families, "cuda", args)


if __name__ == "__main__":
    main()
