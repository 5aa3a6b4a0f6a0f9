"""Advantage estimators against hand computations (plain Python arithmetic, no torch reductions)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from algos.advantages import (
    ADVANTAGES,
    PerPromptStatTracker,
    gdpo_advantages,
    group_relative_advantages,
    make_advantage,
    register_advantage,
    weighted_sum_advantages,
)
from algos.losses import LOSSES


def _mean(xs):
    return sum(xs) / len(xs)


def _pstd(xs):
    return statistics.pstdev(xs)


def _close(actual: torch.Tensor, expected: list[float], tol: float = 1e-5) -> None:
    assert actual.dtype == torch.float32
    assert actual.tolist() == pytest.approx(expected, rel=tol, abs=tol)


REWARDS = [1.0, 2.0, 4.0, 0.5, 3.0, 3.0, 3.0, 3.0, -1.0, 0.0, 2.0, 7.0]
GROUPS = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]


def test_group_advantages_global_std_by_hand():
    eps = 1e-4
    s = _pstd(REWARDS)
    expected = []
    for r, g in zip(REWARDS, GROUPS):
        members = [x for x, h in zip(REWARDS, GROUPS) if h == g]
        expected.append(0.0 if len(set(members)) == 1 else max(-5, min(5, (r - _mean(members)) / (s + eps))))
    out = group_relative_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS))
    _close(out, expected)
    # the zero-variance group (group 1) is exactly zero
    assert torch.all(out[4:8] == 0)


def test_group_advantages_per_group_std_by_hand():
    eps = 1e-4
    expected = []
    for r, g in zip(REWARDS, GROUPS):
        members = [x for x, h in zip(REWARDS, GROUPS) if h == g]
        expected.append(0.0 if len(set(members)) == 1 else (r - _mean(members)) / (_pstd(members) + eps))
    _close(group_relative_advantages(REWARDS, GROUPS, std="group"), expected)


def test_group_advantages_clipping_by_hand():
    # one success among 30 in group 0, group 1 all zeros: global std is small, the outlier's A > 5
    rewards = [0.0] * 29 + [1.0] + [0.0] * 30
    groups = [0] * 30 + [1] * 30
    s = _pstd(rewards)
    raw_outlier = (1.0 - 1 / 30) / (s + 1e-4)
    assert raw_outlier > 5
    out = group_relative_advantages(rewards, groups)
    assert out[29].item() == 5.0
    assert out[0].item() == pytest.approx((0 - 1 / 30) / (s + 1e-4), rel=1e-5)
    assert torch.all(out[30:] == 0)
    unclipped = group_relative_advantages(rewards, groups, clip=None)
    assert unclipped[29].item() == pytest.approx(raw_outlier, rel=1e-5)
    # per-group std: sqrt(G - 1) bounds |A|; with G = 30 the outlier's A = 5.385 is clipped too
    per_group = group_relative_advantages(rewards, groups, std="group", clip=None)
    assert per_group[29].item() == pytest.approx((1 - 1 / 30) / (_pstd(rewards[:30]) + 1e-4), rel=1e-5)


def test_zero_variance_groups_are_exactly_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.2])  # 0.1 is not representable: the mean rounds
    groups = torch.tensor([0, 0, 0, 1, 1, 2])  # a singleton group has zero variance as well
    for std in ("global", "group"):
        out = group_relative_advantages(rewards, groups, std=std)
        assert torch.all(out == 0)
    with pytest.raises(ValueError, match="zero_std"):
        group_relative_advantages(rewards, groups, zero_std="drop")  # type: ignore[arg-type]


def test_group_ids_need_not_be_contiguous_or_sorted():
    rewards = torch.tensor([1.0, 5.0, 2.0, 9.0])
    shuffled = group_relative_advantages(rewards, torch.tensor([7, 3, 7, 3]), std="group")
    ordered = group_relative_advantages(rewards[[0, 2, 1, 3]], torch.tensor([0, 0, 1, 1]), std="group")
    _close(shuffled[[0, 2, 1, 3]], ordered.tolist())


def test_weighted_sum_advantages_by_hand():
    terms = {"a": torch.tensor([1.0, 0.0, 2.0, 2.0]), "b": torch.tensor([0.0, 4.0, 1.0, 3.0])}
    weights = {"a": 2.0, "b": 0.5}
    total = [2 * a + 0.5 * b for a, b in zip(terms["a"].tolist(), terms["b"].tolist())]  # [2, 2, 4.5, 5.5]
    groups = [0, 0, 1, 1]
    s = _pstd(total)
    expected = [0.0, 0.0, (4.5 - 5) / (s + 1e-4), (5.5 - 5) / (s + 1e-4)]
    _close(weighted_sum_advantages(terms, weights, groups), expected)
    with pytest.raises(ValueError, match="no weight"):
        weighted_sum_advantages(terms, {"a": 1.0}, groups)


def test_gdpo_by_hand():
    a = [1.0, 3.0, 2.0, 2.0, 0.0, 10.0]
    b = [0.0, 0.0, 5.0, 1.0, 2.0, 4.0]
    groups = [0, 0, 1, 1, 2, 2]
    weights = {"a": 1.0, "b": 2.0}
    eps = 1e-4

    def within(values):
        out = []
        for v, g in zip(values, groups):
            members = [x for x, h in zip(values, groups) if h == g]
            out.append(0.0 if len(set(members)) == 1 else (v - _mean(members)) / (_pstd(members) + eps))
        return out

    s = [weights["a"] * x + weights["b"] * y for x, y in zip(within(a), within(b))]
    expected = [(v - _mean(s)) / (_pstd(s) + eps) for v in s]
    out = gdpo_advantages({"a": torch.tensor(a), "b": torch.tensor(b)}, weights, groups)
    _close(out, expected)
    # a reward with a 1000x scale does not drown the other one, unlike the weighted sum
    scaled = gdpo_advantages({"a": torch.tensor(a) * 1000, "b": torch.tensor(b)}, weights, groups)
    _close(scaled, expected, tol=1e-4)


def test_gdpo_zero_variance_group_is_zero():
    out = gdpo_advantages({"a": torch.tensor([1.0, 1.0, 0.0, 2.0]), "b": torch.tensor([3.0, 3.0, 1.0, 0.0])}, None, [0, 0, 1, 1])
    assert out[0] == 0 and out[1] == 0 and out[2] != 0


def test_per_prompt_tracker_by_hand():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3, eps=1e-6, clip=None)
    eps = 1e-6
    # batch 1: each prompt has 2 < 3 rewards -> batch statistics
    p1, r1 = ["x", "x", "y", "y"], [1.0, 3.0, 10.0, 20.0]
    out1 = tracker.update(p1, torch.tensor(r1))
    m, s = _mean(r1), _pstd(r1)
    _close(out1, [(r - m) / (s + eps) for r in r1])
    # batch 2: "x" reaches 4 >= 3 -> its own buffer [1, 3, 5, 7]; "y" has 3 -> its buffer [10, 20, 0]
    p2, r2 = ["x", "x", "y"], [5.0, 7.0, 0.0]
    out2 = tracker.update(p2, r2)
    bx, by = [1.0, 3.0, 5.0, 7.0], [10.0, 20.0, 0.0]
    _close(out2, [(5 - _mean(bx)) / (_pstd(bx) + eps), (7 - _mean(bx)) / (_pstd(bx) + eps), (0 - _mean(by)) / (_pstd(by) + eps)])
    # batch 3: "x"'s buffer keeps only its 4 most recent rewards [5, 7, 9, 11]; "z" is new -> batch stats
    p3, r3 = ["x", "x", "z"], [9.0, 11.0, 4.0]
    out3 = tracker.update(p3, r3)
    bx = [5.0, 7.0, 9.0, 11.0]
    _close(out3, [(9 - _mean(bx)) / (_pstd(bx) + eps), (11 - _mean(bx)) / (_pstd(bx) + eps), (4 - _mean(r3)) / (_pstd(r3) + eps)])
    assert tracker.stats()["x"][2] == 4
    tracker.reset()
    assert tracker.stats() == {}


def test_per_prompt_tracker_clips_and_validates():
    tracker = PerPromptStatTracker(buffer_size=None, min_count=1, clip=2.0)
    tracker.update(["p"] * 9, [0.0] * 9)
    out = tracker.update(["p"], [100.0])
    assert out.item() == 2.0
    with pytest.raises(ValueError, match="never be used"):
        PerPromptStatTracker(buffer_size=4, min_count=8)
    with pytest.raises(ValueError, match="prompts"):
        tracker.update(["p"], [1.0, 2.0])


def test_registry_uniform_interface():
    rewards = torch.tensor([0.0, 1.0, 3.0, 2.0, 2.0, 5.0])
    terms = {"r1": rewards.clone(), "r2": torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])}
    prompts = ["a", "a", "a", "b", "b", "b"]
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    assert {"group", "group_std", "per_prompt", "gdpo"} <= set(ADVANTAGES)
    for name in (n for n in ADVANTAGES if not n.startswith("test_")):  # other test files register probes
        estimator = make_advantage(name)
        out = estimator(rewards, terms, prompts, groups)
        assert out.shape == (6,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    _close(make_advantage("group")(rewards, terms, prompts, groups), group_relative_advantages(rewards, groups).tolist())
    _close(make_advantage("group_std")(rewards, terms, prompts, groups), group_relative_advantages(rewards, groups, std="group").tolist())
    _close(make_advantage("gdpo", weights={"r1": 1.0, "r2": 0.5})(rewards, terms, prompts, groups), gdpo_advantages(terms, {"r1": 1.0, "r2": 0.5}, groups).tolist())
    with pytest.raises(ValueError, match="accepted"):
        make_advantage("nope")
    with pytest.raises(ValueError, match="clip"):
        make_advantage("group", clip=-1.0)
    # every loss's default estimator exists
    for cls in LOSSES.values():
        assert cls.default_advantage in ADVANTAGES


def test_register_advantage_extends_the_registry():
    @register_advantage("test_raw_reward")
    class Raw:
        def __call__(self, rewards_total, reward_terms, prompts, group_ids):
            return rewards_total.float()

    try:
        out = make_advantage("test_raw_reward")(torch.tensor([1.0, 2.0]), {}, ["a", "b"], torch.tensor([0, 1]))
        assert out.tolist() == [1.0, 2.0]
    finally:
        ADVANTAGES.pop("test_raw_reward")


def test_invalid_inputs():
    with pytest.raises(ValueError, match="NaN"):
        group_relative_advantages([1.0, math.nan], [0, 0])
    with pytest.raises(ValueError, match="group_ids"):
        group_relative_advantages([1.0, 2.0], [0])
    with pytest.raises(ValueError, match="eps"):
        group_relative_advantages([1.0, 2.0], [0, 0], eps=0.0)
    with pytest.raises(ValueError, match="std"):
        group_relative_advantages([1.0, 2.0], [0, 0], std="batch")  # type: ignore[arg-type]


def test_tracker_state_round_trip_and_group_flags():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    tracker.update(["a", "a", "b"], [1.0, 2.0, 3.0])
    restored = PerPromptStatTracker(buffer_size=3, min_count=2)
    restored.load_state_dict(tracker.state_dict())
    assert restored.state_dict() == {"a": [1.0, 2.0], "b": [3.0]}
    torch.testing.assert_close(restored.update(["a", "b"], [4.0, 0.0]), tracker.update(["a", "b"], [4.0, 0.0]))
    assert make_advantage("group").group_relative and make_advantage("gdpo").group_relative
    assert not make_advantage("per_prompt").group_relative
