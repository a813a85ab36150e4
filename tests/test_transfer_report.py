"""The promotion's report: the transfer table's numbers, and transfer.png drawn from the same plan."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
from test_report import experiment

from agent.ledger import PromotionRun
from agent.promotion import Plan, Rung, Step
from agent.report import TRANSFER_WIDTH, transfer_figure, transfer_text, write_transfer_png

BASELINE = (2.400, 2.402, 2.398)
"""The baseline at 4x over seeds 1, 2, 3: sample std 0.002, so the rung's margin is 2 x 0.002 = 0.004."""


EXPERIMENTS = [
    experiment(0, "baseline", None, "baseline"),
    experiment(2, "keep", None, "raise the learning rate to 3e-3"),
    experiment(5, "keep", None, "swap the GELU for a SwiGLU feed-forward with a wider hidden layer " * 2),
]


def run(
    rung: str,
    code_hash: str,
    val_bpb: float | None,
    seed: int = 1,
    outcome: str = "ok",
    reason: str = "",
    without_id: int | None = None,
) -> PromotionRun:
    return PromotionRun(
        rung=rung,
        code_hash=code_hash,
        seed=seed,
        exp_id=None,
        without_id=without_id,
        budget=rung,
        outcome=outcome,
        val_bpb=val_bpb,
        reason=reason,
        seconds=1.0,
        log_path="",
        log_tail="",
        pid=None,
        started_at=0.0,
        finished_at=1.0,
    )


STEPS = (Step(2, "h2", 0, "h0", 0.0200), Step(5, "h5", 2, "h2", 0.0150))
"""#2 on the baseline, then #5 on #2: the best's lineage."""


def plan_at_4x() -> Plan:
    """#2 transfers (+0.0200 > 0.004), #5 does not (+0.0020); the leave-one-out pass is measured."""
    runs = [run("4x", "h0", value, seed) for seed, value in enumerate(BASELINE, start=1)]
    runs += [run("4x", "h2", 2.380), run("4x", "h5", 2.378)]
    runs += [run("4x", "w2", 2.395, without_id=2), run("4x", "w5", 2.381, without_id=5)]
    return Plan(
        rungs=(Rung(4),),
        seeds=(1, 2, 3),
        baseline_hash="h0",
        steps=STEPS,
        runs=tuple(runs),
        best_id=5,
        best_hash="h5",
        without={2: "w2", 5: "w5"},
    )


def plan_at_two_rungs() -> Plan:
    """At 4x as above, the leave-one-out pass not asked for; at 16x (margin 0.004 again) #2 gains +0.0100 and
    #5 crashed."""
    runs = list(plan_at_4x().runs[:5])
    runs += [run("16x", "h0", value - 0.1, seed) for seed, value in enumerate(BASELINE, start=1)]
    runs.append(run("16x", "h2", 2.290))
    runs.append(run("16x", "h5", None, outcome="crash", reason="CUDA error: an illegal memory access"))
    return Plan(
        rungs=(Rung(4), Rung(16)),
        seeds=(1, 2, 3),
        baseline_hash="h0",
        steps=STEPS,
        runs=tuple(runs),
        best_id=5,
        best_hash="h5",
    )


def rows(text: str) -> dict[str, str]:
    """The table's rows by keep: '#2' -> its line."""
    return {
        line.split()[0]: line
        for line in text.splitlines()
        if line.startswith("  #") and "kept change" not in line
    }


def test_the_table_gives_each_keeps_gain_verdict_and_contribution() -> None:
    text = transfer_text(plan_at_4x(), EXPERIMENTS)
    table = rows(text)
    assert list(table) == ["#2", "#5"]  # oldest first
    assert table["#2"].split()[-4:] == ["+0.0200", "+0.0200", "transfers", "+0.0170"]
    assert table["#5"].split()[-6:] == ["+0.0150", "+0.0020", "does", "not", "transfer", "+0.0030"]
    assert "raise the learning rate to 3e-3" in table["#2"]
    assert "4x 0.0040" in text
    assert "best vs baseline at 4x: total gain +0.0220; sum of the keeps' contributions +0.0200" in text
    assert all(len(line) <= TRANSFER_WIDTH for line in text.splitlines())


def test_a_failed_run_is_shortened_in_the_table_and_told_in_full_under_it() -> None:
    text = transfer_text(plan_at_two_rungs(), EXPERIMENTS)
    table = rows(text)
    assert table["#2"].split()[-5:] == ["+0.0200", "transfers", "+0.0100", "transfers", "-"]
    assert "failed: crash" in table["#5"]
    assert "#5: it failed at 16x: crash (CUDA error: an illegal memory access)" in text
    assert "4x 0.0040, 16x 0.0040" in text
    assert "contributions at 16x: not measured yet" in text
    assert all(len(line) <= TRANSFER_WIDTH for line in text.splitlines())


def test_what_is_not_measured_yet_says_so() -> None:
    full = plan_at_4x()
    runs = tuple(r for r in full.runs if r.code_hash not in ("w5", "h0") or r.seed != 1)
    text = transfer_text(replace(full, runs=runs), EXPERIMENTS)
    assert rows(text)["#2"].split()[-3:] == ["-", "pending", "+0.0170"]
    assert "4x -" in text
    assert "total gain not measured yet; sum of the keeps' contributions not known yet" in text
    assert "  #5: not measured (yet), or a run failed" in text
    assert all(len(line) <= TRANSFER_WIDTH for line in text.splitlines())


def test_nothing_kept_is_nothing_to_promote() -> None:
    text = transfer_text(replace(plan_at_4x(), steps=(), without=None), EXPERIMENTS)
    assert text == "promotion to 4x: nothing kept to promote"


def test_transfer_png_is_written(tmp_path: Path) -> None:
    path = tmp_path / "report" / "transfer.png"
    write_transfer_png(plan_at_two_rungs(), EXPERIMENTS, path)
    assert path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_figure_plots_measured_verdicts_filled_or_hollow_and_leaves_out_the_rest() -> None:
    fig = transfer_figure(plan_at_two_rungs(), EXPERIMENTS)
    try:
        ax = fig.axes[0]
        labels = sorted(text.get_text() for text in ax.texts)
        # #2 at 4x and 16x, #5 at 4x only (it crashed at 16x)
        assert labels == ["#2 raise the learning rate…"] * 2 + ["#5 swap the GELU for a Swi…"]
        legend = ax.get_legend()
        assert legend is not None
        assert [text.get_text() for text in legend.get_texts()] == [
            "4x: transfers",
            "4x: does not transfer",
            "16x: transfers",
            "y = x",
        ]
        assert "1 pending or failed, not shown" in ax.get_title()
        filled, hollow = (len(points.get_facecolor()) for points in ax.collections[:2])
        assert (filled, hollow) == (1, 0)  # #2 at 4x filled, #5 at 4x hollow
    finally:
        plt.close(fig)
