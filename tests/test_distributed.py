"""Scale-out on torch.distributed, with real processes on CPU (gloo): spawned ranks for the exactness
checks (``distributed_workers.py``), ``torchrun`` for the runs a user launches."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
import torch.multiprocessing as mp
from safetensors.torch import load_file

import distributed_workers as workers

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> list[dict]:
    """Every exactness check, run once by 2 spawned ranks; their results by rank."""
    out = tmp_path_factory.mktemp("spawned")
    mp.spawn(workers.run_checks, args=(WORLD, str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("micro", workers.MICRO_BATCHES)
@pytest.mark.parametrize("loss,kwargs", workers.LOSS_CASES, ids=[workers.case_name(l, k, None).split("/")[1] for l, k in workers.LOSS_CASES])
def test_ddp_gradient_over_two_ranks_equals_the_single_process_gradient_of_their_union(spawned, loss, kwargs, micro):
    # the ranks hold 60 % / 40 % of the pairs: a plain mean of per-rank means would be off
    for rank in range(WORLD):
        result = spawned[rank][workers.case_name(loss, kwargs, micro)]
        assert result["diff"] <= 1e-6, result


@pytest.mark.parametrize("name", ["gdpo", "group", "group_std", "per_prompt"])
def test_advantages_from_gathered_rewards_equal_the_single_process_advantages(spawned, name):
    for rank in range(WORLD):
        assert spawned[rank][f"advantage/{name}"] <= 1e-6


def test_every_estimator_of_the_project_is_checked():
    from algos.advantages import ADVANTAGES

    # (other tests may register estimators of their own; the project's are those of algos.advantages)
    ours = sorted(n for n in ADVANTAGES.names() if ADVANTAGES.lookup(n).__module__ == "algos.advantages")
    assert ours == ["gdpo", "group", "group_std", "per_prompt"]


def test_ranks_draw_different_noise_and_disjoint_shares_of_one_prompt_stream(spawned):
    a, b = spawned[0]["noise"], spawned[1]["noise"]
    assert a["initial"] != b["initial"] and a["action"] != b["action"]  # no two ranks share noise
    assert a["global_prompts"] == b["global_prompts"]  # one global batch, the same on every rank
    assert a["global_prompts"] == a["prompts"] + b["prompts"]
    assert not set(a["prompts"]) & set(b["prompts"])  # 4 distinct digits drawn without replacement, split in 2


def torchrun(tmp: Path, *overrides: str, nproc: int = WORLD, extra: tuple[str, ...] = (), timeout: int = 300,
             env: dict | None = None) -> subprocess.CompletedProcess:
    command = [*TORCHRUN, f"--nproc_per_node={nproc}", *extra, "-m", "algos.run", *BASE, *overrides]
    if not extra:
        command[len(TORCHRUN):len(TORCHRUN)] = [f"--master_port={free_port()}"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(command, cwd=tmp, env=environment, capture_output=True, text=True, timeout=timeout)


BASE = ("trainer.iterations=2", "trainer.eval_every=2", "trainer.checkpoint_every=1", "num_threads=1",
        "env.num_prompts=4", "env.eval_samples_per_prompt=2", "logger.backends=[csv]", "logger.report=false")


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    out = torchrun(tmp, f"hydra.run.dir={tmp / 'run'}")
    assert out.returncode == 0, out.stderr[-4000:]
    return tmp / "run"


def test_torchrun_two_ranks_write_one_metrics_file_and_one_checkpoint_series(ddp_run):
    assert sorted(p.name for p in ddp_run.parent.iterdir()) == ["run"]  # rank 1's hydra folder removed
    rows = rows_of(ddp_run)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(r["world_size"] == WORLD for r in rows)
    assert rows[-1]["num_pairs"] == 4 * 8 * 8  # the global count: 4 groups of 8 samples x 8 stochastic steps
    assert sorted(p.name for p in (ddp_run / "checkpoints").iterdir()) == ["iter-000001", "iter-000002", "latest"]
    state = torch.load(ddp_run / "checkpoints" / "iter-000002" / "state.pt", weights_only=True)
    assert state["world_size"] == WORLD and len(state["rng_ranks"]) == WORLD


def test_a_repeated_two_rank_run_is_bit_identical_and_resume_continues_exactly(ddp_run, tmp_path):
    again = torchrun(tmp_path, f"hydra.run.dir={tmp_path / 'again'}", "trainer.iterations=3")
    assert again.returncode == 0, again.stderr[-4000:]
    straight = rows_of(tmp_path / "again")
    assert without_time(straight[:3]) == without_time(rows_of(ddp_run))  # repeated: the same numbers
    a = load_file(ddp_run / "checkpoints" / "iter-000002" / "weights.safetensors")
    b = load_file(tmp_path / "again" / "checkpoints" / "iter-000002" / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    copy = tmp_path / "copy"  # the module's run stays as it is for the other tests
    shutil.copytree(ddp_run, copy)
    resumed = torchrun(tmp_path, f"resume={copy}", "trainer.iterations=3", f"hydra.run.dir={tmp_path / 'resume'}")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    rows = rows_of(copy)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert without_time(rows[3:]) == without_time(straight[3:])  # the same world size continues exactly


def test_resume_on_another_world_size_keeps_weights_and_iteration_and_says_the_noise_changed(ddp_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(ddp_run, run)
    out = subprocess.run(
        [sys.executable, "-m", "algos.run", *BASE, f"resume={run}", "trainer.iterations=3", f"hydra.run.dir={tmp_path / 'one'}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "noise and shuffle streams changed" in out.stdout + out.stderr
    rows = rows_of(run)
    assert [r["iteration"] for r in rows][-1] == 3 and rows[-1]["world_size"] == 1


def test_two_nodes_with_a_localhost_rendezvous_complete(tmp_path):
    port = free_port()
    extra = ("--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=flowgym-test")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launches = [
        subprocess.Popen([*TORCHRUN, "--nproc_per_node=1", *extra, f"--node_rank={node}", "-m", "algos.run", *BASE,
                          "trainer.iterations=1", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in range(2)
    ]
    results = [p.communicate(timeout=300) for p in launches]
    assert [p.returncode for p in launches] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    rows = rows_of(tmp_path / "run")
    assert rows[-1]["iteration"] == 1 and rows[-1]["world_size"] == 2


def test_fsdp2_on_two_ranks_trains_and_checkpoints_the_digits_model_like_ddp(ddp_run, tmp_path):
    out = torchrun(tmp_path, "trainer.distributed.strategy=fsdp", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr[-4000:]
    fsdp, ddp = rows_of(tmp_path / "run"), rows_of(ddp_run)[:3]
    assert [r["iteration"] for r in fsdp] == [0, 1, 2]
    for a, b in zip(fsdp, ddp):  # the same maths, sharded: the same training curve
        for key in ("reward", "eval/train/reward", "kl_old_new_mean", "grad_norm"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    weights = load_file(tmp_path / "run" / "checkpoints" / "iter-000002" / "weights.safetensors")
    reference = load_file(ddp_run / "checkpoints" / "iter-000002" / "weights.safetensors")
    assert weights.keys() == reference.keys()  # gathered, full tensors: the one-process format
    assert all(weights[k].shape == reference[k].shape for k in weights)
    assert max(float((weights[k] - reference[k]).abs().max()) for k in weights) < 1e-4
    state = torch.load(tmp_path / "run" / "checkpoints" / "iter-000002" / "state.pt", weights_only=True)
    assert all(not hasattr(v, "device_mesh") for entry in state["optimizer"]["state"].values() for v in entry.values())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_with_the_adapters_off_reference_trains_under_both_strategies(tmp_path, strategy):
    # the compose model: peft LoRA on an MMDiT, the reference = adapters disabled (beta > 0 uses it in the loss)
    out = torchrun(tmp_path, "env=compose", "reward=compose_dense", "env.num_prompts=2", "env.group_size=4", "trainer.iterations=1",
                   "trainer.eval_every=0", "trainer.checkpoint_every=1", "algo.loss.beta=0.01", f"trainer.distributed.strategy={strategy}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr[-4000:]
    row = rows_of(tmp_path / "run")[-1]
    assert row["world_size"] == 2 and row["kl_ref"] >= 0 and row["num_updates"] == 2
    weights = load_file(tmp_path / "run" / "checkpoints" / "iter-000001" / "weights.safetensors")
    assert weights and all("lora" in name for name in weights)  # the adapters only, gathered


FAILING_PLUGIN = '''
import torch.distributed as dist
from flowgym.rewards import register_reward
from flowgym.rewards.base import Reward


@register_reward("fails_on_rank_one")
class FailsOnRankOne(Reward):
    """0 on every rank, until rank 1's second call raises (other ranks then wait in a collective)."""
    calls = 0

    def __call__(self, images, prompts):
        FailsOnRankOne.calls += 1
        if dist.is_initialized() and dist.get_rank() == 1 and FailsOnRankOne.calls >= 2:
            raise RuntimeError("injected failure on rank 1")
        return images.new_zeros(images.shape[0])
'''


def test_a_rank_that_raises_ends_the_job_non_zero_within_60_seconds(tmp_path):
    (tmp_path / "fails_on_rank_one.py").write_text(FAILING_PLUGIN)
    start = time.monotonic()
    out = torchrun(tmp_path, "algo.module=fails_on_rank_one", "+reward.weights.fails_on_rank_one=1.0",
                   "trainer.iterations=4", "trainer.eval_every=0", f"hydra.run.dir={tmp_path / 'run'}",
                   env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}, timeout=120)
    elapsed = time.monotonic() - start
    assert out.returncode != 0
    assert "injected failure on rank 1" in out.stderr
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"


def test_a_bad_distributed_value_fails_before_any_process_group_with_the_accepted_values(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "algos.run", "trainer.distributed.strategy=horovod", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "trainer.distributed.strategy must be one of ['auto', 'single', 'ddp', 'fsdp']; got 'horovod'" in out.stderr
    assert not (tmp_path / "run").exists()


def test_ddp_without_torchrun_says_how_to_launch(monkeypatch):
    from algos.config import DistributedConfig
    from algos.distributed import strategy_from_config

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="launch with torchrun --nproc_per_node=N"):
        strategy_from_config(DistributedConfig(strategy="ddp"))


@given(st.integers(0, 2**62), st.integers(2, 64))
def test_rank_seeds_are_distinct_and_one_process_keeps_its_seed(seed, world):
    from algos.collectives import rank_seed

    seeds = [rank_seed(seed, rank, world) for rank in range(world)]
    assert len(set(seeds)) == world
    assert rank_seed(seed, 0, 1) == seed
    assert seeds == [rank_seed(seed, rank, world) for rank in range(world)]  # a function of (seed, rank)


def test_one_process_has_no_process_group():
    import torch.distributed as dist

    from algos.config import DistributedConfig
    from algos.distributed import strategy_from_config
    from algos.strategy import SingleDevice

    strategy = strategy_from_config(DistributedConfig(), "cpu")
    assert isinstance(strategy, SingleDevice) and strategy.world_size == 1 and not dist.is_initialized()


def test_groups_that_do_not_split_over_the_ranks_name_the_accepted_world_sizes():
    from algos.trainer import Trainer, shard_groups

    assert shard_groups(8, 1, 2) == (4, 1)  # the episode's prompts split
    assert shard_groups(1, 48, 8) == (1, 6)  # the SD3.5 recipes: 1 prompt x 48 episodes, episodes split
    with pytest.raises(ValueError, match=r"env.num_prompts=4 x trainer.rollout_batches=1 groups do not split over 3 processes.*\[1, 2, 4\]"):
        shard_groups(4, 1, 3)

    class ThreeRanks(workers.SingleDevice):
        world_size = 3

    with pytest.raises(ValueError, match=r"do not split over 3 processes"):  # before any model is built
        Trainer(workers.small_config("flow_dppo", {}) | {"env": {"name": "digits", "num_prompts": 4}}, "/tmp/unused",
                strategy=ThreeRanks("cpu"))


def test_two_ranks_split_the_episodes_when_the_prompts_do_not_split(tmp_path):
    out = torchrun(tmp_path, "env.num_prompts=1", "trainer.rollout_batches=4", "trainer.eval_every=0",
                   "trainer.iterations=1", "trainer.checkpoint_every=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr[-4000:]
    row = rows_of(tmp_path / "run")[-1]
    assert row["world_size"] == 2 and row["num_pairs"] == 4 * 8 * 8  # 4 groups of 8 samples, 8 steps each
