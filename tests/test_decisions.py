"""Noise floor and verdicts: the margin comes from the baseline's spread; marginal wins are confirmed."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.decisions import (
    MAX_DISTURBED_RERUNS,
    Rules,
    RunAgain,
    Verdict,
    baseline_runs,
    disturbance,
    next_step,
    noise_floor,
    undisturbed,
    verdict,
    verdict_confirmed,
)
from agent.ledger import RunRecord


def _run(seed: int, val_bpb: float | None, outcome: str = "ok", load: float | None = None) -> RunRecord:
    summary = {} if load is None else {"other_load": load}
    return RunRecord(
        1, 0, seed, outcome, val_bpb, "", 60.0, None, 60.0, 61.0, "", "", summary, None, 0.0, 1.0
    )


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


def test_two_seeds_that_happen_to_agree_are_floored_by_the_machines_known_noise() -> None:
    # Two seeds 0.0001 apart once set the margin to its 0.002 minimum: every lucky run beyond it was kept.
    alone = noise_floor([2.5000, 2.5001], min_margin=0.002, default_margin=0.01)
    assert alone.margin == 0.002
    floored = noise_floor([2.5000, 2.5001], min_margin=0.002, default_margin=0.01, known_std=0.006)
    assert floored.margin == pytest.approx(0.012) and floored.measured
    assert "known std 0.0060" in floored.describe()
    # A session noisier than the machine's record keeps its own, larger margin.
    noisy = noise_floor([2.50, 2.56], min_margin=0.002, default_margin=0.01, known_std=0.006)
    assert noisy.margin == pytest.approx(2 * statistics.stdev([2.50, 2.56]))
    # One run: the known noise stands in for the default.
    one = noise_floor([2.5], min_margin=0.002, default_margin=0.01, known_std=0.003)
    assert one.margin == pytest.approx(0.006) and not one.measured and "known" in one.describe()


def test_a_run_is_disturbed_only_by_a_busier_machine_than_its_reference() -> None:
    # One competing busy process beside a run on 2 cores: about 0.7 cores; the engine's quiet machine: ~0.05.
    assert disturbance(0.75, [0.05, 0.08], cores=2).startswith("the machine was busy")
    assert disturbance(0.30, [0.05], cores=2) == ""  # under 0.15 x 2 cores more
    assert disturbance(0.75, [0.70, 0.72], cores=2) == ""  # a steady load: the reference had it too
    assert disturbance(0.05, [0.75], cores=2) == ""  # quieter than the reference
    assert disturbance(None, [0.05], cores=2) == disturbance(0.9, [None], cores=2) == ""  # not measured


def test_a_disturbed_run_is_left_out_and_run_again_until_the_reruns_are_spent() -> None:
    quiet = [0.05]
    assert undisturbed([0.06], quiet, 2) == ([0], "")
    kept, why = undisturbed([0.9], quiet, 2)
    assert kept == [] and why  # the only run was disturbed: run it again
    assert undisturbed([0.9, 0.07], quiet, 2) == ([1], "")  # the rerun was quiet: it alone counts
    kept, why = undisturbed([0.9] * MAX_DISTURBED_RERUNS, quiet, 2)
    assert kept == [] and why
    # Past the reruns the machine stays busy: every run counts, and it is decided.
    assert undisturbed([0.9] * (MAX_DISTURBED_RERUNS + 1), quiet, 2) == (
        list(range(MAX_DISTURBED_RERUNS + 1)),
        "",
    )
    assert undisturbed([None, 0.9], quiet, 2)[0] == [0]  # a failed run (no load) is never left out


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


def test_the_next_step_of_an_experiment_from_its_runs() -> None:
    rules = Rules(base_seed=1, confirm_marginal=True, cores=2)
    reference = [_run(1, 2.50, load=0.05), _run(2, 2.51, load=0.07)]

    def step(runs: list[RunRecord], with_rules: Rules = rules) -> RunAgain | Verdict:
        return next_step(runs, reference, 2.5, 0.01, with_rules)[0]

    assert step([]) == RunAgain(1)  # its first run
    keep, discard = step([_run(1, 2.45, load=0.06)]), step([_run(1, 2.60, load=0.06)])
    assert isinstance(keep, Verdict) and keep.status == "keep"
    assert isinstance(discard, Verdict) and discard.status == "discard"
    assert step([_run(1, None, outcome="crash")]) == Verdict("crash", "the run failed")
    marginal = step([_run(1, 2.485, load=0.06)])
    assert isinstance(marginal, RunAgain) and marginal.seed == 2 and "marginal win" in marginal.say
    held = step([_run(1, 2.485), _run(2, 2.486)])
    assert isinstance(held, Verdict) and held.status == "keep" and "held up" in held.reason
    # A disturbed first run is run again with its seed; its rerun alone is decided on, and counts.
    disturbed = step([_run(1, 2.70, load=0.9)])
    assert isinstance(disturbed, RunAgain) and disturbed.seed == 1 and "the machine was busy" in disturbed.say
    rerun = _run(1, 2.45, load=0.05)
    found, counted = next_step([_run(1, 2.70, load=0.9), rerun], reference, 2.5, 0.01, rules)
    assert isinstance(found, Verdict) and found.status == "keep" and counted == [rerun]
    # A disturbed confirmation run is run again with the confirmation's seed.
    again = step([_run(1, 2.485, load=0.05), _run(2, 2.52, load=0.9)])
    assert isinstance(again, RunAgain) and again.seed == 2
    # Without weighing (several trainers, Ray), every run counts as measured.
    unweighed = step([_run(1, 2.70, load=0.9)], Rules(cores=None))
    assert isinstance(unweighed, Verdict) and unweighed.status == "discard"


def test_the_baseline_counts_each_seeds_newest_quiet_run_and_runs_a_disturbed_seed_again() -> None:
    rules = Rules(cores=2)
    runs = [_run(1, 2.50, load=0.05), _run(2, 2.70, load=1.1), _run(3, 2.52, load=0.06)]
    counted, again = baseline_runs(runs, [1, 2, 3], rules)
    assert [r.seed for r in counted] == [1, 3] and list(again) == [2]
    counted, again = baseline_runs([*runs, _run(2, 2.51, load=0.04)], [1, 2, 3], rules)
    assert [r.val_bpb for r in counted] == [2.50, 2.51, 2.52] and again == {}
    failed = [_run(1, 2.50, load=0.05), _run(2, None, outcome="interrupted")]
    assert [r.seed for r in baseline_runs(failed, [1, 2], rules)[0]] == [
        1
    ]  # not ok: not counted, not disturbed
    assert len(baseline_runs(runs, [1, 2, 3], Rules(cores=None))[0]) == 3
