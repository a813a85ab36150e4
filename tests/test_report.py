"""progress.png and the report's numbers: every label drawn inside the figure, the gains summed right."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from agent.ledger import Experiment
from agent.report import progress_figure, summarize, write_progress_png

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


def test_summary_counts_gains_over_the_best_before() -> None:
    summary = summarize(session())
    assert (summary.baseline_bpb, summary.best_bpb, summary.best_exp_id) == (2.50, 2.20, 7)
    assert summary.n_experiments == 7 and summary.n_kept == 3
    assert [i.exp_id for i in summary.improvements] == [7, 2, 5]
    assert [round(i.delta, 6) for i in summary.improvements] == [0.11, 0.10, 0.09]
