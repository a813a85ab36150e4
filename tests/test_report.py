"""progress.png and the report's numbers: every label drawn inside the figure, the gains summed right."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from agent import cli
from agent.ledger import Experiment, Ledger
from agent.report import (
    Kept,
    gain_words,
    kept_changes,
    ledger_noise,
    margin_of,
    progress_figure,
    summarize,
    summary_text,
    write_progress_png,
)
from agent.workspace import Workspace

LONG = "swap the GELU for a SwiGLU feed-forward with a wider hidden layer"
"""A description long enough to be cut at 45 characters, as a long label on the last point."""


def experiment(exp_id: int, status: str, val_bpb: float | None, description: str = "") -> Experiment:
    return Experiment(
        id=exp_id,
        parent_commit=None,
        commit=f"{exp_id:07d}",
        description=description or ("baseline" if exp_id == 0 else f"idea {exp_id}"),
        proposal="{}",
        diff="",
        proposer="ideas",
        model=None,
        status=status,
        val_bpb=val_bpb,
        peak_memory_mb=None,
        training_seconds=None,
        total_seconds=None,
        seeds=(1,),
        log_path=None,
        started_at=None,
        finished_at=None,
        decided_by="engine",
        reason="",
        log_tail="",
        temperature=None,
        seed=None,
    )


def session(last_description: str = LONG) -> list[Experiment]:
    """A baseline, discards, a crash and keeps, the last experiment a keep with a long description."""
    return [
        experiment(0, "baseline", 2.50),
        experiment(1, "discard", 2.52),
        experiment(2, "keep", 2.40, "lower the learning rate to 1e-3 and warm up for longer"),
        experiment(3, "crash", None),
        experiment(4, "discard", 2.45),
        experiment(5, "keep", 2.31, "add rotary position embeddings"),
        experiment(6, "discard", 2.33),
        experiment(7, "keep", 2.20, last_description),
    ]


def outside(fig: Figure) -> list[str]:
    """The texts of the figure's axes that are drawn beyond its edges."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    bounds = fig.bbox
    cut = []
    for ax in fig.axes:
        for text in [*ax.texts, ax.title, ax.xaxis.label, ax.yaxis.label]:
            extent = text.get_window_extent(renderer)
            if (
                extent.x0 < bounds.x0
                or extent.x1 > bounds.x1
                or extent.y0 < bounds.y0
                or extent.y1 > bounds.y1
            ):
                cut.append(text.get_text())
    return cut


@pytest.mark.parametrize(
    "experiments",
    [
        session(),
        session()[:2] + [experiment(2, "keep", 2.49, LONG)],  # the top and the right edge at once
        [experiment(0, "baseline", 2.5, LONG)],  # one point, in the middle of everything
        [experiment(i, "keep" if i else "baseline", 2.5 - i / 100, LONG) for i in range(40)],
    ],
    ids=["long-last-label", "top-right", "one-point", "forty-keeps"],
)
def test_every_label_is_inside_the_figure(experiments: list[Experiment]) -> None:
    fig = progress_figure(experiments)
    try:
        labels = [text.get_text() for text in fig.axes[0].texts]
        kept = [e for e in experiments if e.status in ("baseline", "keep")]
        assert len(labels) == len(kept)
        assert LONG[:42] + "..." in labels
        assert outside(fig) == []
    finally:
        plt.close(fig)


def test_the_last_label_runs_left_of_its_point_and_the_others_right() -> None:
    fig = progress_figure(session())
    try:
        *earlier, last = fig.axes[0].texts
        assert last.get_horizontalalignment() == "right"  # it would have run past the right edge
        assert {text.get_horizontalalignment() for text in earlier} == {"left"}
    finally:
        plt.close(fig)


def test_progress_png_is_written(tmp_path: Path) -> None:
    path = write_progress_png(session(), tmp_path / "out" / "progress.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert plt.get_fignums() == []  # the figure was closed


def test_summary_lists_the_keeps_in_order_with_the_gain_over_the_best_before() -> None:
    summary = summarize(session())
    assert (summary.baseline_bpb, summary.best_bpb, summary.best_exp_id) == (2.50, 2.20, 7)
    assert summary.n_experiments == 7 and summary.n_kept == 3
    assert [i.exp_id for i in summary.improvements] == [2, 5, 7]
    assert [round(i.delta, 6) for i in summary.improvements] == [0.10, 0.09, 0.11]
    assert summary.margin is None
    assert "noise margin not measured yet" in summary_text(summary)


def test_a_forced_keep_shows_its_loss_and_the_next_gain_counts_from_it() -> None:
    chain = [
        Kept(0, "baseline", 2.5),
        Kept(3, "keep", 2.6, "forced", by_user=True),
        Kept(5, "keep", 2.4, "better"),
    ]
    baseline, gains = kept_changes(chain)
    assert baseline == 2.5
    assert [(g.exp_id, round(g.delta, 6), g.by_user) for g in gains] == [(3, -0.1, True), (5, 0.2, False)]


def test_gain_words_state_the_change_and_the_margin() -> None:
    assert gain_words(2.7, 2.616, 0.011, digits=3) == "-0.084 bpb, 7.6 × the margin (0.011)"
    assert gain_words(2.7, 2.616, 0.02, measured=False, digits=3).endswith("4.2 × the default margin (0.020)")
    assert gain_words(2.7, 2.616, None, digits=3) == "-0.084 bpb"
    assert gain_words(2.7, 2.616, 0.0, digits=3) == "-0.084 bpb"  # no margin to count in


def ledger_with_session(path: Path, noise: dict[str, object] | None) -> Path:
    """A real SQLite ledger holding `session()` (the keep of #5 forced by the user) and the noise meta."""
    ledger = Ledger(path)
    try:
        for exp in session():
            ledger.create(
                exp.id,
                exp.status,
                "decided",
                description=exp.description,
                val_bpb=exp.val_bpb,
                decided_by="user" if exp.id == 5 else "engine",
            )
        ledger.create(8, "running", "running", description="in flight")
        if noise is not None:
            ledger.set_meta("noise", noise)
    finally:
        ledger.close()
    return path


def test_the_report_of_a_real_ledger_states_the_gain_in_margins(tmp_path: Path) -> None:
    path = ledger_with_session(
        tmp_path / "ledger.db",
        {"values": [2.49, 2.5, 2.51], "std": 0.01, "spread": 0.02, "margin": 0.02, "measured": True},
    )
    ledger = Ledger(path)
    try:
        experiments = ledger.experiments()
    finally:
        ledger.close()
    summary = summarize(experiments, ledger_noise(path))
    assert summary.margin == 0.02 and summary.margin_measured
    assert [i.exp_id for i in summary.improvements] == [2, 5, 7]  # the running #8 is not counted
    lines = summary_text(summary).splitlines()
    assert lines[0] == (
        "baseline 2.500000 -> best 2.200000 (#7): -0.300000 bpb (-12.00%), 15.0 × the margin (0.020000)"
    )
    assert lines[1] == "7 experiments after the baseline: 1 crash, 3 discard, 3 keep"
    assert lines[2] == "kept changes, in order (each against the best before it):"
    assert lines[3] == (
        "   1. #2    -0.100000  2.400000    5.0 × margin  lower the learning rate to 1e-3 and warm up for longer"
    )
    assert lines[4].startswith("   2. #5") and lines[4].endswith(
        "add rotary position embeddings  (kept by you)"
    )
    assert "-0.110000  2.200000    5.5 × margin  " + LONG in lines[5]
    assert len(lines) == 6
    only_last = summary_text(summary, top=1).splitlines()
    assert "2 earlier ones not shown" in only_last[2] and only_last[3].startswith("   3. #7")


def test_a_default_margin_is_said_to_be_one(tmp_path: Path) -> None:
    path = ledger_with_session(
        tmp_path / "ledger.db",
        {"values": [2.5], "std": 0.0, "spread": 0.0, "margin": 0.05, "measured": False},
    )
    margin, measured = margin_of(ledger_noise(path))
    assert (margin, measured) == (0.05, False)
    ledger = Ledger(path)
    try:
        text = summary_text(summarize(ledger.experiments(), ledger_noise(path)))
    finally:
        ledger.close()
    assert "6.0 × the default margin (0.050000)" in text.splitlines()[0]
    assert "noise margin 0.050000 bpb: the default (one baseline run, no spread)" in text


def test_autoresearch_report_prints_the_gain_and_the_kept_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = Workspace.init(tmp_path / "ws")
    ledger_with_session(
        ws.ledger_path,
        {"values": [2.4, 2.5, 2.6], "std": 0.1, "spread": 0.2, "margin": 0.2, "measured": True},
    )
    assert cli.main(["report", "--workspace", str(ws.path)]) == 0
    out = capsys.readouterr().out
    assert "-0.300000 bpb (-12.00%), 1.5 × the margin (0.200000)" in out
    assert out.index("   1. #2") < out.index("   2. #5") < out.index("   3. #7")
    assert (ws.path / "progress.png").read_bytes()[:4] == b"\x89PNG"
