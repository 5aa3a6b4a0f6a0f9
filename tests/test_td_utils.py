"""The tensordict fast paths give what tensordict's public constructors give."""

from __future__ import annotations

import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict

from flowgym.td_utils import set_prebuilt, stack_non_tensors, tensordict_unchecked


def leaves(n: int) -> list[NonTensorData]:
    return [NonTensorData(f"prompt {i % 3}", batch_size=[], device="cpu") for i in range(n)]


def test_stack_non_tensors_matches_the_public_constructor():
    items = leaves(7)
    fast, public = stack_non_tensors(items), NonTensorStack(*items)
    assert type(fast) is type(public)
    assert fast.batch_size == public.batch_size == torch.Size([7]) and fast.device == public.device
    assert fast.tolist() == public.tolist()
    assert fast[4].data == public[4].data and fast[2:5].tolist() == public[2:5].tolist()
    # stacks of stacks along a later dim: the trajectory layout [B, K]
    fast_2d = stack_non_tensors([fast] * 4, stack_dim=1)
    public_2d = NonTensorStack(*[public] * 4, stack_dim=1)
    assert fast_2d.batch_size == public_2d.batch_size == torch.Size([7, 4])
    assert fast_2d.tolist() == public_2d.tolist()
    assert fast_2d[5, 2].data == "prompt 2" and fast_2d[:, 3].tolist() == public[:].tolist()
    td = TensorDict({"x": torch.zeros(7, 4)}, batch_size=[7, 4])
    set_prebuilt(td, "prompt", fast_2d)
    assert td[6, 1]["prompt"] == "prompt 0" and td.get("prompt").tolist() == public_2d.tolist()


def test_tensordict_unchecked_matches_the_public_constructor():
    source = {
        "a": torch.arange(6.0).reshape(2, 3),
        "nested": {"b": torch.ones(2, 3, 4, dtype=torch.bool)},
        "prompt": stack_non_tensors([stack_non_tensors(leaves(2))] * 3, stack_dim=1),
    }
    fast = tensordict_unchecked(source, batch_size=(2, 3), device=torch.device("cpu"))
    public = TensorDict(source, batch_size=[2, 3], device="cpu")
    assert fast.batch_size == public.batch_size and fast.device == public.device
    assert sorted(fast.keys(True, True), key=str) == sorted(public.keys(True, True), key=str)
    assert (fast.exclude("prompt") == public.exclude("prompt")).all()
    assert fast.get(("nested", "b")).shape == (2, 3, 4) and fast.get("nested").batch_size == (2, 3)
    assert fast[1, 2]["prompt"] == public[1, 2]["prompt"] == "prompt 1"
    assert fast.reshape(-1).batch_size == (6,)
