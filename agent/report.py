"""The research report: progress.png (val_bpb per experiment, keeps highlighted, running best) and a summary."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agent.ledger import Experiment
from agent.proposals import proposer_label

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.text import Annotation


@dataclass(frozen=True)
class Improvement:
    """A kept experiment and how much it gained over the best before it (positive: lower bpb)."""

    exp_id: int
    description: str
    val_bpb: float
    delta: float
    by_user: bool = False
    """Kept by an override rather than by the engine (its gain may be negative)."""
    proposer: str = ""
    """Who proposed it (`Proposal.proposer`)."""


@dataclass(frozen=True)
class Summary:
    """Baseline -> best, the noise margin, counts, and the kept changes in the order they were kept."""

    baseline_bpb: float | None
    best_bpb: float | None
    best_exp_id: int | None
    n_experiments: int
    n_kept: int
    counts: dict[str, int]
    improvements: tuple[Improvement, ...]
    """Each keep against the best before it, in the order they were kept."""
    margin: float | None = None
    """The keep margin from the baseline's spread over seeds (the ledger's `noise`); None when unknown."""
    margin_measured: bool = True
    """False when the margin is the configured default (a single baseline run)."""
    by_proposer: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Who proposed the experiments after the baseline: name -> (experiments, keeps)."""


@dataclass(frozen=True)
class Kept:
    """One step of the chain of bests: an experiment that was the baseline or kept."""

    exp_id: int
    status: str
    val_bpb: float
    description: str = ""
    by_user: bool = False
    proposer: str = ""


def kept_changes(chain: Iterable[Kept]) -> tuple[float | None, list[Improvement]]:
    """The baseline's val_bpb and each keep's gain over the best before it, from the chain in order.

    The best before a keep is the experiment kept last before it (the train.py it replaced), so the gains
    add up to baseline - last kept, and a keep forced by the user can show a loss.
    """
    baseline: float | None = None
    previous: float | None = None
    improvements: list[Improvement] = []
    for step in chain:
        if step.status == "baseline" and baseline is None:
            baseline = step.val_bpb
        elif step.status == "keep" and previous is not None:
            improvements.append(
                Improvement(
                    step.exp_id,
                    step.description,
                    step.val_bpb,
                    previous - step.val_bpb,
                    step.by_user,
                    step.proposer,
                )
            )
        if baseline is not None:
            previous = step.val_bpb
    return baseline, improvements


def margin_of(noise: object) -> tuple[float | None, bool]:
    """The margin and whether it was measured, from the ledger's `noise` meta (None when there is none)."""
    if not isinstance(noise, dict) or not isinstance(noise.get("margin"), int | float):
        return None, True
    return float(noise["margin"]), bool(noise.get("measured", True))


def ledger_noise(ledger_path: Path) -> object:
    """The ledger's `noise` meta (the baseline's spread and the keep margin), or None."""
    from agent.ledger import Ledger

    ledger = Ledger(ledger_path)
    try:
        return ledger.get_meta("noise")
    finally:
        ledger.close()


def times_margin(change: float, margin: float | None) -> float | None:
    """How many margins a change in bpb amounts to (None without a positive margin)."""
    return abs(change) / margin if margin else None


def margin_words(change: float, margin: float | None, measured: bool = True, digits: int = 6) -> str:
    """ ", 7.6 × the margin (0.011000)" for a change in bpb; "" without a margin."""
    ratio = times_margin(change, margin)
    if ratio is None or margin is None:
        return ""
    what = "the margin" if measured else "the default margin"
    return f", {ratio:.1f} × {what} ({margin:.{digits}f})"


def gain_words(
    baseline_bpb: float, best_bpb: float, margin: float | None, measured: bool = True, digits: int = 6
) -> str:
    """The change from the baseline to the best with its noise margin: "-0.084000 bpb, 7.6 × the margin"."""
    change = best_bpb - baseline_bpb
    return f"{change:+.{digits}f} bpb" + margin_words(change, margin, measured, digits)


def summarize(experiments: list[Experiment], noise: object = None) -> Summary:
    """The numbers of a report, from the ledger's experiments (oldest first) and its `noise` meta."""
    decided = [e for e in experiments if e.phase == "decided"]
    counts: dict[str, int] = {}
    for exp in decided:
        counts[exp.status] = counts.get(exp.status, 0) + 1
    chain = [
        Kept(e.id, e.status, e.val_bpb, e.description, e.decided_by == "user", e.proposer)
        for e in decided
        if e.status in ("baseline", "keep") and e.val_bpb is not None
    ]
    baseline, improvements = kept_changes(chain)
    best = min(chain, key=lambda e: e.val_bpb, default=None)
    margin, measured = margin_of(noise)
    by_proposer: dict[str, tuple[int, int]] = {}
    for exp in decided:
        if exp.id != 0 and exp.proposer:
            n, kept = by_proposer.get(exp.proposer, (0, 0))
            by_proposer[exp.proposer] = (n + 1, kept + (exp.status == "keep"))
    return Summary(
        baseline_bpb=baseline,
        best_bpb=best.val_bpb if best else None,
        best_exp_id=best.exp_id if best else None,
        n_experiments=len([e for e in decided if e.id != 0]),
        n_kept=counts.get("keep", 0),
        counts=counts,
        improvements=tuple(improvements),
        margin=margin,
        margin_measured=measured,
        by_proposer=by_proposer,
    )


def summary_text(summary: Summary, top: int | None = None) -> str:
    """The report as lines of text (`top`: list only the last `top` kept changes)."""
    if summary.baseline_bpb is None:
        return "no baseline yet: run `autoresearch run --headless` first"
    lines = []
    if summary.best_bpb is not None:
        change = summary.best_bpb - summary.baseline_bpb
        pct = 100 * change / summary.baseline_bpb if summary.baseline_bpb else 0.0
        lines.append(
            f"baseline {summary.baseline_bpb:.6f} -> best {summary.best_bpb:.6f} (#{summary.best_exp_id}): "
            f"{change:+.6f} bpb ({pct:+.2f}%)" + margin_words(change, summary.margin, summary.margin_measured)
        )
    if summary.margin is None:
        lines.append("noise margin not measured yet (it comes from the baseline's seeds)")
    elif not summary.margin_measured:
        lines.append(f"noise margin {summary.margin:.6f} bpb: the default (one baseline run, no spread)")
    counted = ", ".join(
        f"{n} {status}" for status, n in sorted(summary.counts.items()) if status != "baseline"
    )
    lines.append(f"{summary.n_experiments} experiments after the baseline{': ' + counted if counted else ''}")
    if summary.by_proposer:
        lines.append(
            "proposed by: "
            + ", ".join(
                f"{proposer_label(name)} {n} ({kept} kept)"
                for name, (n, kept) in sorted(summary.by_proposer.items(), key=lambda item: -item[1][0])
            )
        )
    shown = summary.improvements
    if top is not None and len(shown) > top:
        lines.append(f"kept changes, in order ({len(shown) - top} earlier ones not shown):")
        shown = shown[-top:]
    elif shown:
        lines.append("kept changes, in order (each against the best before it):")
    first = len(summary.improvements) - len(shown) + 1
    for rank, imp in enumerate(shown, start=first):
        ratio = times_margin(imp.delta, summary.margin)
        margins = f"{ratio:5.1f} × margin" if ratio is not None else ""
        override = "  (kept by you)" if imp.by_user else ""
        by = f"  [{proposer_label(imp.proposer)}]" if imp.proposer else ""
        lines.append(
            f"  {rank:2d}. #{imp.exp_id:<4d} {-imp.delta:+.6f}  {imp.val_bpb:.6f}  {margins}  "
            f"{imp.description}{override}{by}".rstrip()
        )
    return "\n".join(lines)


LABEL_OFFSET = 6
"""Points between a kept experiment and its label."""


def write_progress_png(experiments: list[Experiment], path: Path) -> Path:
    """Plot val_bpb per experiment (discards faint, keeps green and labelled, the running best as a step line)."""
    import matplotlib.pyplot as plt

    fig = progress_figure(experiments)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def progress_figure(experiments: list[Experiment]) -> Figure:
    """The figure of progress.png, laid out, every label inside it; close it with `plt.close`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decided = [e for e in experiments if e.phase == "decided" and e.val_bpb is not None]
    kept = [e for e in decided if e.status in ("baseline", "keep")]
    discarded = [e for e in decided if e.status == "discard"]
    failed = [
        e
        for e in experiments
        if e.phase == "decided" and e.status in ("crash", "timeout", "oom", "nan", "invalid")
    ]
    fig, ax = plt.subplots(figsize=(14, 7))
    labels: list[Annotation] = []
    if discarded:
        ax.scatter(
            [e.id for e in discarded],
            [float(e.val_bpb or 0.0) for e in discarded],
            c="#bbbbbb",
            s=14,
            label="discarded",
            zorder=2,
        )
    if kept:
        ax.scatter(
            [e.id for e in kept],
            [float(e.val_bpb or 0.0) for e in kept],
            c="#2ecc71",
            s=50,
            edgecolors="black",
            linewidths=0.5,
            label="kept",
            zorder=4,
        )
        best_x, best_y, best = [], [], float("inf")
        for exp in kept:
            assert exp.val_bpb is not None
            best = min(best, exp.val_bpb)
            best_x.append(exp.id)
            best_y.append(best)
        last = max(e.id for e in experiments) if experiments else best_x[-1]
        best_x.append(last)
        best_y.append(best)
        ax.step(
            best_x,
            best_y,
            where="post",
            color="#27ae60",
            linewidth=2,
            alpha=0.7,
            label="running best",
            zorder=3,
        )
        for exp in kept:
            label = exp.description if len(exp.description) <= 45 else exp.description[:42] + "..."
            text = ax.annotate(
                label,
                (exp.id, exp.val_bpb),
                xytext=(LABEL_OFFSET, LABEL_OFFSET),
                textcoords="offset points",
                fontsize=8,
                color="#1a7a3a",
                rotation_mode="anchor",
            )
            _point_label(text, right=True, up=True)
            # The layout makes room for the axes, not for labels: they are placed inside the figure below.
            text.set_in_layout(False)
            labels.append(text)
    if failed:
        top = max((e.val_bpb for e in decided if e.val_bpb is not None), default=1.0)
        ax.scatter(
            [e.id for e in failed],
            [top] * len(failed),
            marker="x",
            c="#e74c3c",
            s=20,
            label="crash / timeout / invalid",
            zorder=2,
        )
    ax.set_xlabel("experiment #")
    ax.set_ylabel("validation bpb (lower is better)")
    n_kept = len([e for e in kept if e.status == "keep"])
    ax.set_title(
        f"autoresearch progress: {len([e for e in experiments if e.id != 0])} experiments, {n_kept} kept"
    )
    ax.grid(True, alpha=0.2)
    if decided:
        ax.legend(loc="upper right", fontsize=9)
    fig.tight_layout()
    _keep_labels_inside(fig, labels)
    return fig


def _point_label(text: Annotation, *, right: bool, up: bool) -> None:
    """Set `text` to run from its point at 30 degrees: up and to the right, or mirrored."""
    text.set_position((LABEL_OFFSET if right else -LABEL_OFFSET, LABEL_OFFSET if up else -LABEL_OFFSET))
    text.set_rotation(30 if right == up else -30)
    text.set_horizontalalignment("left" if right else "right")
    text.set_verticalalignment("bottom" if up else "top")


def _keep_labels_inside(fig: Figure, labels: list[Annotation]) -> None:
    """Mirror a label that would leave the figure (a long description on the last point, or the top one)."""
    if not labels:
        return
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    bounds = fig.bbox
    for text in labels:
        extent = text.get_window_extent(renderer)
        right = extent.x1 <= bounds.x1
        up = extent.y1 <= bounds.y1
        if not (right and up):
            _point_label(text, right=right, up=up)
