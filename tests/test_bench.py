"""The benchmark harness (algos.bench): the quick suite end to end, caching, reports; the DRPO example."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from algos.bench import suites as bench_suites
from algos.bench import BenchOptions, Job, compose_config, is_complete, job_key, main, run_suite
from algos.bench.ratio_noise import (
    calibrated_clip_range,
    decision_stats,
    log_ratio_decomposition,
    per_step_stats,
    spearman,
)
from flowgym.kernels import gaussian_log_prob

CELL = re.compile(r"^(-?[0-9.]+(?:e[+-]?[0-9]+)?) ± ([0-9.]+(?:e[+-]?[0-9]+)?)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _quiet(_: str) -> None:
    pass


@pytest.fixture(autouse=True)
def _restore_loss_registry():
    """Tests here register DRPO (examples.new_method); unregister it afterwards so the registry that
    other test modules see (e.g. the list of accepted loss names) is unchanged."""
    from algos.losses import LOSSES

    before = dict(LOSSES)
    yield
    for name in set(LOSSES) - set(before):
        del LOSSES[name]
    if "drpo" not in before:
        sys.modules.pop("examples.new_method.drpo_loss", None)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick suite run once (2 seeds, 2 worker processes) into a temporary folder."""
    root = tmp_path_factory.mktemp("bench")
    summary = run_suite("quick", BenchOptions(seeds=2), out=root / "out", cache=root / "cache", num_workers=2, log=_quiet)
    return root, summary


def _markdown_tables(text: str) -> list[list[list[str]]]:
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
            current.append([c.strip().replace("\\|", "|") for c in cells])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def test_quick_suite_writes_reports_plots_and_real_numbers(quick):
    root, summary = quick
    out = Path(summary["out"])
    assert out == root / "out" / "quick"
    assert summary["suites"] == list(bench_suites.ALL)
    assert summary["runs"]["executed"] == summary["runs"]["total"] > 0
    assert (out / "index.md").exists()
    for name in bench_suites.ALL:
        report = json.loads((out / f"{name}.json").read_text())
        markdown = (out / f"{name}.md").read_text()
        assert report["plots"], name
        for plot in report["plots"]:
            data = (out / plot).read_bytes()
            assert data[:8] == PNG_MAGIC and 5_000 < len(data) < 400_000, (name, plot, len(data))
            assert f"]({plot})" in markdown
        # every table of the JSON appears in the markdown, with the same numbers
        md_tables = _markdown_tables(markdown)
        assert len(md_tables) == len(report["tables"]), name
        for table, md in zip(report["tables"], md_tables):
            assert md[0] == table["headers"]
            assert len(md) - 2 == len(table["rows"])
            for row, md_row in zip(table["rows"], md[2:]):
                for key, text in zip(table["columns"], md_row):
                    cell = row[key]
                    if isinstance(cell, dict) and cell["mean"] is not None:
                        match = CELL.match(text)
                        assert match, (name, key, text)
                        assert math.isclose(float(match.group(1)), cell["mean"], rel_tol=2e-3, abs_tol=1e-12), (name, key, text, cell)
                        assert math.isfinite(cell["std"]) and cell["std"] >= 0

    def column(suite: str, key: str, table: int = 0) -> list[dict]:
        report = json.loads((out / f"{suite}.json").read_text())
        return [row[key] for row in report["tables"][table]["rows"]]

    # the key numbers are real: finite, over both seeds, and in their natural ranges
    for cell in column("frontier", "reward") + column("reuse", "reward") + column("multiobjective", "gain_total"):
        assert cell["n"] == 2 and math.isfinite(cell["mean"]), cell
    drifts = column("frontier", "drift")
    assert all(c["mean"] > 0 for c in drifts)
    accuracy = column("forgetting", "eval/heldout/digit_accuracy")
    assert all(0.0 <= c["mean"] <= 1.0 for c in accuracy)
    assert all(c["mean"] > 0 for c in column("forgetting", "eval/heldout/digit_fd"))
    noise = json.loads((out / "ratio_noise.json").read_text())
    assert noise["headline"]["decomposition_max_abs_error"] < 1e-4  # log r = noise - D on the real model
    assert all(0.0 <= c["mean"] <= 1.0 for c in column("ratio_noise", "disagree"))


def test_second_call_uses_the_cache_and_rewrites_reports(quick):
    root, first = quick
    (Path(first["out"]) / "frontier.md").unlink()
    again = run_suite("quick", BenchOptions(seeds=2), out=root / "out", cache=root / "cache", num_workers=2, log=_quiet)
    assert again["runs"] == {"total": first["runs"]["total"], "executed": 0, "cached": first["runs"]["total"]}
    assert (Path(again["out"]) / "frontier.md").exists()
    # the same numbers come back from the cached runs
    a = json.loads((Path(first["out"]) / "reuse.json").read_text())["tables"]
    b = json.loads((Path(again["out"]) / "reuse.json").read_text())["tables"]
    assert a == b


def test_incomplete_or_different_runs_are_not_taken_from_the_cache(quick, tmp_path):
    root, _ = quick
    key_dir = next(p for p in (root / "cache").iterdir() if (p / "metrics.jsonl").exists())
    stored = json.loads((key_dir / "job.json").read_text())
    job = Job(stored["kind"], stored["config"], stored["params"])
    assert job_key(job) == key_dir.name
    copy = tmp_path / key_dir.name
    shutil.copytree(key_dir, copy)
    assert is_complete(copy, job)
    other = Job(job.kind, {**job.config, "seed": job.config["seed"] + 100}, job.params)
    assert not is_complete(copy, other) and job_key(other) != job_key(job)
    # a setting added later, at the value that reproduces the old behaviour, keeps the cached run;
    # any other value of it is another run
    before = Job(job.kind, {**job.config, "trainer": {k: v for k, v in job.config["trainer"].items() if k != "compile"}}, job.params)
    assert job_key(before) == job_key(job) and is_complete(copy, before)
    compiled = Job(job.kind, {**job.config, "trainer": {**job.config["trainer"], "compile": True}}, job.params)
    assert job_key(compiled) != job_key(job) and not is_complete(copy, compiled)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # a run that died before its last iteration
    assert not is_complete(copy, job)
    shutil.copytree(key_dir, tmp_path / "no_marker")
    (tmp_path / "no_marker" / "done.json").unlink()
    assert not is_complete(tmp_path / "no_marker", job)


def test_cli_compare_benchmarks_drpo_against_flow_dppo_sharing_cached_runs(quick, capsys):
    root, _ = quick
    out = root / "cli"
    summary = main(["compare", "--quick", "--seeds", "2", "--jobs", "1", "--algos", "drpo,flow_dppo",
                    "--out", str(out), "--cache", str(root / "cache")])
    # flow_dppo at its default config is the same resolved config the quick suites ran: cached
    assert summary["runs"] == {"total": 4, "executed": 2, "cached": 2}
    report = json.loads((out / "quick" / "compare.json").read_text())
    rows = report["tables"][0]["rows"]
    assert [r["method"] for r in rows] == ["DRPO", "Flow-DPPO"]
    assert all(math.isfinite(r["reward"]["mean"]) for r in rows)
    assert f"delta={compose_config('drpo')['algo']['loss']['delta']}" in rows[0]["config"]
    assert (out / "quick" / "compare_drpo_flow_dppo.png").read_bytes()[:8] == PNG_MAGIC
    assert "[bench] done" in capsys.readouterr().out


def test_unknown_suite_and_bad_options_are_rejected():
    with pytest.raises(ValueError, match="unknown suite"):
        bench_suites.expand("nonsense")
    with pytest.raises(ValueError, match="seeds"):
        BenchOptions(seeds=0)
    with pytest.raises(SystemExit):
        main(["nonsense"])


# --------------------------------------------------------------------------- DRPO, the extension example
def _drpo_formula(ratio: torch.Tensor, advantage: torch.Tensor, delta: float) -> torch.Tensor:
    return -(ratio * advantage - advantage.abs() * (ratio - 1) ** 2 / (2 * delta))


def test_drpo_trains_from_its_config_and_its_loss_is_the_formula(tmp_path):
    from examples.new_method.drpo_loss import DRPOLoss, drpo_objective
    from algos.trainer import Trainer

    cfg = compose_config("drpo", [*bench_suites.COMMON, *bench_suites.QUICK_SIZE, "device=cpu"], seed=0)
    assert cfg["algo"]["module"] == "examples.new_method.drpo_loss"
    trainer = Trainer(cfg, tmp_path, progress=False)
    assert isinstance(trainer.loss_module, DRPOLoss) and trainer.loss_module.penalty_delta == cfg["algo"]["loss"]["delta"]
    rows = trainer.train()
    assert [r["iteration"] for r in rows] == list(range(cfg["trainer"]["iterations"] + 1))
    for row in rows[1:]:
        assert math.isfinite(row["loss_objective"]) and 0 <= row["clip_frac_high"] <= 1
    assert rows[-1]["drift_kl"] > 0  # it did update the model
    # on a real batch, after the updates (ratios != 1), the loss is the formula's mean
    rollout = trainer.collect()
    pairs = trainer.training_pairs(rollout)
    pairs.set("conditioning", rollout["conditioning"][pairs.get("sample_index")])
    trainer.optimizer.zero_grad()
    out = trainer.loss_module(pairs)
    with torch.no_grad():
        batch = trainer.loss_module.evaluate(pairs)
    expected = _drpo_formula(batch.ratio, batch.advantage, trainer.loss_module.penalty_delta).mean()
    torch.testing.assert_close(out["loss_objective"].detach(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(drpo_objective(batch.ratio, batch.advantage, 1e-4).mean(), _drpo_formula(batch.ratio, batch.advantage, 1e-4).mean())


@given(
    st.lists(st.tuples(st.floats(-0.05, 0.05), st.floats(-5, 5)), min_size=1, max_size=20),
    st.sampled_from([1e-5, 1e-4, 1e-2, 0.3]),
)
def test_drpo_objective_value_gradient_and_maximiser(pairs, delta):
    from examples.new_method.drpo_loss import drpo_objective

    log_ratio = torch.tensor([p[0] for p in pairs], dtype=torch.float64, requires_grad=True)
    advantage = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    ratio = log_ratio.exp()
    loss = drpo_objective(ratio, advantage, delta)
    torch.testing.assert_close(loss, _drpo_formula(ratio, advantage, delta))
    loss.sum().backward()
    # d loss / d log r = -(A - |A| (r - 1) / delta) * r
    r = ratio.detach()
    torch.testing.assert_close(log_ratio.grad, -(advantage - advantage.abs() * (r - 1) / delta) * r)
    # the surrogate peaks at ratio = 1 + sign(A) * delta (zero gradient there)
    peak = (1 + advantage.sign() * delta).requires_grad_(True)
    drpo_objective(peak, advantage, delta).sum().backward()
    torch.testing.assert_close(peak.grad, torch.zeros_like(peak), atol=1e-9, rtol=0)


def test_drpo_rejects_bad_arguments():
    from examples.new_method.drpo_loss import drpo_objective

    with pytest.raises(ValueError, match="delta"):
        drpo_objective(torch.ones(3), torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="same shape"):
        drpo_objective(torch.ones(3), torch.ones(2), 1e-4)


# --------------------------------------------------------------------------- ratio-noise maths
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 2.0), st.floats(1e-4, 0.3))
def test_log_ratio_decomposition_is_the_exact_gaussian_log_ratio(seed, std, shift):
    g = torch.Generator().manual_seed(seed)
    loc_old = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    loc_new = loc_old + shift * torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    scale = torch.full((5, 1, 1, 1), std, dtype=torch.float64)
    action = loc_old + scale * torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    noise, signal = log_ratio_decomposition(action, loc_old, loc_new, scale)
    exact = gaussian_log_prob(action, loc_new, scale) - gaussian_log_prob(action, loc_old, scale)
    torch.testing.assert_close((noise + signal).float(), exact, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(-signal, ((loc_new - loc_old) ** 2 / (2 * scale**2)).float().mean(dim=(1, 2, 3)))


def test_noise_term_has_the_predicted_spread():
    # many actions at one state: std of the mean-reduced log-ratio = sqrt(2 D / n)
    g = torch.Generator().manual_seed(0)
    n, samples, std = 64, 20000, 0.5
    loc_old = torch.zeros(1, n, dtype=torch.float64)
    loc_new = 0.01 * torch.randn(1, n, generator=g, dtype=torch.float64)
    action = loc_old + std * torch.randn(samples, n, generator=g, dtype=torch.float64)
    noise, signal = log_ratio_decomposition(action, loc_old.expand(samples, n), loc_new.expand(samples, n), torch.full((samples, 1), std, dtype=torch.float64))
    d = float(-signal[0])
    stats = per_step_stats(np.zeros(samples), (noise + signal).numpy(), np.full(samples, d), noise.numpy(), n)[0]
    assert abs(stats["log_ratio_std"] / stats["noise_std_predicted"] - 1) < 0.03
    assert abs(stats["log_ratio_mean"] + d) < 4 * stats["noise_std_predicted"] / math.sqrt(samples)


def test_decision_stats_on_hand_made_pairs():
    # ratio outside band / D over threshold:  (yes, yes), (yes, no), (no, yes), (no, no)
    log_ratio = np.log([1.01, 0.98, 1.0001, 0.9999])
    kl = np.array([1e-3, 1e-7, 1e-3, 1e-7])
    advantage = np.array([1.0, -1.0, 1.0, 0.0])
    s = decision_stats(log_ratio, kl, advantage, clip_range=1e-3, delta=1e-5)
    assert s["ratio_outside"] == 0.5 and s["kl_outside"] == 0.5
    assert s["disagree"] == 0.5 and s["over_constrained"] == 0.25 and s["under_constrained"] == 0.25
    # among A != 0: pair 0 blocked by both, pair 1 by the clip only (D small), pair 2 by the mask only
    assert s["clip_blocked"] == pytest.approx(2 / 3) and s["mask_blocked"] == pytest.approx(2 / 3)
    assert s["blocked_disagree"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        decision_stats(log_ratio, kl[:2], advantage, 1e-3, 1e-5)


def test_calibrated_clip_range_flags_as_many_pairs_and_spearman():
    rng = np.random.default_rng(0)
    kl = rng.uniform(0, 2e-5, 400)
    log_ratio = rng.normal(0, 1e-3, 400)
    eps = calibrated_clip_range(log_ratio, kl, 1e-5)
    s = decision_stats(log_ratio, kl, np.ones(400), eps, 1e-5)
    assert abs(s["ratio_outside"] - s["kl_outside"]) <= 1 / 400
    assert math.isnan(calibrated_clip_range(log_ratio, kl, 1.0))  # nothing flagged by D
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
