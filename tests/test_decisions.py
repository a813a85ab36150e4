"""Noise floor and verdicts: the margin comes from the baseline's spread; marginal wins are confirmed."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.decisions import noise_floor, verdict, verdict_confirmed


def test_single_run_uses_the_default_margin() -> None:
    noise = noise_floor([2.5], min_margin=0.002, default_margin=0.01)
    assert noise.margin == 0.01 and not noise.measured and noise.std == 0.0
    assert "default" in noise.describe()


def test_margin_is_twice_the_sample_std() -> None:
    values = [2.50, 2.52, 2.54]
    noise = noise_floor(values, min_margin=0.002, default_margin=0.01)
    assert noise.std == pytest.approx(statistics.stdev(values))
    assert noise.margin == pytest.approx(2 * statistics.stdev(values))
    assert noise.spread == pytest.approx(0.04)
    assert noise.mean == pytest.approx(2.52)
    assert noise.measured


def test_quiet_noise_is_floored_by_min_margin() -> None:
    noise = noise_floor([2.5, 2.5, 2.5], min_margin=0.002, default_margin=0.01)
    assert noise.margin == 0.002


def test_no_values_is_an_error() -> None:
    with pytest.raises(ValueError):
        noise_floor([], 0.002, 0.01)


def test_clear_win_is_kept() -> None:
    found = verdict(2.40, best_bpb=2.50, margin=0.01)
    assert found.status == "keep"
    assert "margin" in found.reason


def test_marginal_win_needs_confirmation() -> None:
    assert verdict(2.485, best_bpb=2.50, margin=0.01).status == "confirm"
    assert verdict(2.485, best_bpb=2.50, margin=0.01, confirm_marginal=False).status == "keep"


def test_inside_the_noise_is_discarded() -> None:
    found = verdict(2.495, best_bpb=2.50, margin=0.01)
    assert found.status == "discard" and "noise" in found.reason


def test_worse_is_discarded() -> None:
    found = verdict(2.6, best_bpb=2.50, margin=0.01)
    assert found.status == "discard" and "not better" in found.reason


def test_confirmation_keeps_only_if_the_mean_beats_best_minus_margin() -> None:
    assert verdict_confirmed([2.485, 2.487], best_bpb=2.50, margin=0.01).status == "keep"
    assert verdict_confirmed([2.485, 2.50], best_bpb=2.50, margin=0.01).status == "discard"


@given(
    val=st.floats(min_value=0.5, max_value=9.0),
    best=st.floats(min_value=0.5, max_value=9.0),
    margin=st.floats(min_value=1e-4, max_value=0.5),
)
def test_a_keep_always_beats_best_by_more_than_the_margin(val: float, best: float, margin: float) -> None:
    found = verdict(val, best, margin)
    if found.status == "keep":
        assert best - val >= 2 * margin
    if found.status == "confirm":
        assert margin < best - val < 2 * margin
    if best - val <= margin:
        assert found.status == "discard"
