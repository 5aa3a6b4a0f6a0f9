"""The updater's lean path: fused AdamW where the parameters allow it, diagnostics read back once."""

from __future__ import annotations

import math

import pytest
import torch

from algos.trainer import Trainer
from algos.updater import fused_adamw_supported, summarise
from test_trainer import config


def test_fused_adamw_is_chosen_for_float_parameters_on_one_cpu_or_cuda_device():
    floats = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]
    assert fused_adamw_supported(floats)
    assert not fused_adamw_supported([])
    assert not fused_adamw_supported([torch.nn.Parameter(torch.zeros(3, device="meta"))])


def test_fused_and_per_tensor_adamw_take_the_same_steps():
    torch.manual_seed(0)
    start = [torch.randn(5, 4), torch.randn(7)]
    runs = {}
    for fused in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-4, fused=fused or None)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            optimizer.step()
        runs[fused] = params
    for a, b in zip(runs[False], runs[True]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", ["null", "true", "false"])
def test_the_trainer_uses_the_configured_optimizer(tmp_path, fused):
    trainer = Trainer(config(f"trainer.fused_optimizer={fused}"), tmp_path, progress=False)
    assert bool(trainer.optimizer.defaults["fused"]) is (fused != "false")


def test_summarise_reads_tensors_back_as_the_same_floats():
    values = [torch.tensor(0.1), torch.tensor(float("nan")), torch.tensor(0.7)]
    as_tensors = summarise({"loss": values, "ratio_max": [torch.tensor(1.5), torch.tensor(2.5)], "n": [3.0]})
    as_floats = summarise({"loss": [float(v) for v in values], "ratio_max": [1.5, 2.5], "n": [3.0]})
    assert as_tensors == pytest.approx(as_floats) and as_tensors["ratio_max"] == 2.5
    assert as_tensors["loss"] == (float(torch.tensor(0.1)) + float(torch.tensor(0.7))) / 2
    assert math.isnan(summarise({"x": [torch.tensor(float("nan"))]})["x"])
