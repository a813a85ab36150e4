"""The research report: progress.png (val_bpb per experiment, keeps highlighted, running best) and a summary."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agent.ledger import Experiment
from agent.promotion import FAILS, TRANSFERS, Additivity, Plan, Step, Verdict, measured
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


TRANSFER_WIDTH = 100
"""The transfer table fits this many columns (with one or two rungs)."""

_GAIN = 8
"""Width of a signed gain with four decimals: '+0.0123'."""
_VERDICT = 17
"""Width of a verdict word: 'does not transfer'."""


def transfer_text(plan: Plan, experiments: Sequence[Experiment]) -> str:
    """The promotion as text: each keep of the best's lineage (oldest first) with its gain at the session's
    budget and at each rung, its verdict there and its leave-one-out contribution at the largest rung; then
    each rung's noise margin and whether the contributions add up to the best's gain at scale."""
    rungs = ", ".join(rung.name for rung in plan.rungs)
    if not plan.steps:
        return f"promotion to {rungs}: nothing kept to promote"
    described = {e.id: e.description for e in experiments}
    verdicts = plan.verdicts()
    found = plan.additivity()
    contributions = {c.exp_id: c.contribution for c in found.contributions} if found else {}
    last = plan.rungs[-1].name
    room = max(12, TRANSFER_WIDTH - _transfer_fixed(len(plan.rungs)))
    lines = [
        f"promotion to {rungs} the session's budget (1x): each keep's gain in bpb over its parent, "
        f"seed {plan.seeds[0]}",
        f"(transfers: the gain beats the rung's noise margin; w/o @{last}: what the best loses without it)",
        "  "
        + f"{'#':<5} {'kept change':<{room}} {'1x':>{_GAIN}}"
        + "".join(f"   {rung.name:>{_GAIN}} {'':<{_VERDICT}}" for rung in plan.rungs)
        + f"  {'w/o @' + last:>{_GAIN}}",
    ]
    notes: list[str] = []
    for step in plan.steps:
        line = f"  #{step.exp_id:<4} {_shorten(described.get(step.exp_id, ''), room):<{room}} {_signed(step.gain)}"
        for v in verdicts[step.exp_id]:
            line += f"   {_signed(v.gain)} {_verdict_word(plan, step, v):<{_VERDICT}}"
            if v.gain is None and v.reason:
                notes.append(f"#{step.exp_id}: {v.reason}")
        lines.append(f"{line}  {_signed(contributions.get(step.exp_id))}")
    lines += ["  " + _shorten(note, TRANSFER_WIDTH - 2) for note in notes]
    lines.append(_noise_line(plan))
    lines += _additivity_lines(plan, found)
    return "\n".join(lines)


def _transfer_fixed(n_rungs: int) -> int:
    """The transfer table's width but for the description: indent, id, the gains, verdicts and gaps."""
    return 2 + 5 + 1 + 1 + _GAIN + n_rungs * (3 + _GAIN + 1 + _VERDICT) + 2 + _GAIN


def _signed(value: float | None) -> str:
    """A gain in bpb, signed with four decimals, right-aligned; '-' when unknown."""
    return f"{value:+{_GAIN}.4f}" if value is not None else f"{'-':>{_GAIN}}"


def _shorten(text: str, width: int) -> str:
    """`text` on one line, cut to `width` with an ellipsis."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _verdict_word(plan: Plan, step: Step, found: Verdict) -> str:
    """The verdict in a word or two; a failed run says how it failed ('failed: crash', 'parent crash')."""
    if found.gain is not None or not found.reason:
        return found.state
    if found.state == FAILS:
        run = measured(plan.runs, found.rung, step.code_hash, plan.seeds[0])
        return f"failed: {run.outcome}" if run is not None else "failed"
    run = measured(plan.runs, found.rung, step.parent_hash, plan.seeds[0])
    return f"parent {run.outcome}" if run is not None else found.state


def _noise_line(plan: Plan) -> str:
    """Each rung's noise margin, from the baseline's seeds there ('-' until they are all measured)."""
    parts = []
    for rung in plan.rungs:
        noise = plan.noise(rung)
        if noise is None:
            parts.append(f"{rung.name} -")
        else:
            parts.append(f"{rung.name} {noise.margin:.4f}" + ("" if noise.measured else " (default)"))
    seeds = ", ".join(str(seed) for seed in plan.seeds)
    return f"noise margin (the baseline over seeds {seeds}): " + ", ".join(parts)


def _additivity_lines(plan: Plan, found: Additivity | None) -> list[str]:
    """Whether the keeps' leave-one-out contributions add up to the best's gain over the baseline at scale."""
    last = plan.rungs[-1].name
    if found is None:
        return [
            f"contributions at {last}: not measured yet (the leave-one-out pass comes at the end of a session)"
        ]
    total = f"total gain {found.total:+.4f}" if found.total is not None else "total gain not measured yet"
    summed = found.summed
    if summed is not None:
        return [f"best vs baseline at {found.rung}: {total}; sum of the keeps' contributions {summed:+.4f}"]
    lines = [f"best vs baseline at {found.rung}: {total}; sum of the keeps' contributions not known yet:"]
    lines += [
        "  " + _shorten(f"#{c.exp_id}: {c.reason or 'not measured yet'}", TRANSFER_WIDTH - 2)
        for c in found.contributions
        if c.contribution is None
    ]
    return lines


RUNG_MARKERS = ("o", "s", "^", "D", "v", "P")
"""One marker per rung, smallest first (cycled past six)."""
RUNG_COLORS = ("#2980b9", "#8e44ad", "#d35400", "#16a085", "#c0392b", "#7f8c8d")
"""One colour per rung, smallest first (cycled past six)."""


def write_transfer_png(plan: Plan, experiments: Sequence[Experiment], path: Path) -> None:
    """Plot each keep's gain at the session's budget against its gain at each rung (see `transfer_figure`)."""
    import matplotlib.pyplot as plt

    fig = transfer_figure(plan, experiments)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def transfer_figure(plan: Plan, experiments: Sequence[Experiment]) -> Figure:
    """Gain at the session's budget (x) against gain at each rung (y): one marker and colour per rung, filled
    where the keep transfers, hollow where it does not, each point labelled with its keep; pending and failed
    runs are left out. On the y = x line a gain holds at scale unchanged; below y = 0 it reverses. Close it
    with `plt.close`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 7))
    described = {e.id: _shorten(e.description, 24) for e in experiments}
    values: list[float] = []
    labels: list[tuple[float, float, str]] = []
    left_out = 0
    for i, rung in enumerate(plan.rungs):
        marker, color = RUNG_MARKERS[i % len(RUNG_MARKERS)], RUNG_COLORS[i % len(RUNG_COLORS)]
        shown = _transfer_points(plan, i)
        left_out += len(plan.steps) - len(shown)
        for state, face in ((TRANSFERS, color), (FAILS, "none")):
            chosen = [(x, y, exp_id) for x, y, exp_id, verdict in shown if verdict == state]
            if not chosen:
                continue
            xs, ys, _ = zip(*chosen, strict=True)
            ax.scatter(
                xs,
                ys,
                marker=marker,
                s=60,
                facecolors=face,
                edgecolors=color,
                linewidths=1.5,
                label=f"{rung.name}: {state}",
                zorder=3,
            )
            labels += [(x, y, f"#{exp_id} {described.get(exp_id, '')}".rstrip()) for x, y, exp_id in chosen]
            values += [*xs, *ys]
        noise = plan.noise(rung)
        if noise is not None:
            ax.axhline(noise.margin, color=color, linestyle=":", linewidth=1, alpha=0.7)
    low, high = _limits(values)
    for x, y, label in labels:
        # Labels run away from the nearer side, so that they stay inside the figure.
        right = x <= (low + high) / 2
        ax.annotate(
            label,
            (x, y),
            xytext=(5 if right else -5, 5),
            textcoords="offset points",
            horizontalalignment="left" if right else "right",
            fontsize=8,
        )
    ax.plot([low, high], [low, high], color="#7f8c8d", linestyle="--", linewidth=1, label="y = x", zorder=1)
    ax.axhline(0.0, color="black", linewidth=0.8, zorder=1)
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel("gain at the session's budget (bpb, over its parent)")
    ax.set_ylabel("gain at the rung (bpb, over its parent; dotted: the rung's noise margin)")
    rungs = ", ".join(rung.name for rung in plan.rungs)
    pending = f"; {left_out} pending or failed, not shown" if left_out else ""
    ax.set_title(f"do the keeps' gains transfer to {rungs} the budget? ({len(plan.steps)} keeps{pending})")
    ax.grid(True, alpha=0.2)
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    return fig


def _transfer_points(plan: Plan, index: int) -> list[tuple[float, float, int, str]]:
    """(gain at the session's budget, gain at rung `index`, keep id, verdict) of each keep measured there."""
    verdicts = plan.verdicts()
    points = []
    for step in plan.steps:
        found = verdicts[step.exp_id][index]
        if step.gain is not None and found.gain is not None:
            points.append((step.gain, found.gain, step.exp_id, found.state))
    return points


def _limits(values: Sequence[float]) -> tuple[float, float]:
    """Square axis limits around `values` and 0, with a margin (a small default window when empty)."""
    low, high = min([0.0, *values]), max([0.0, *values])
    pad = (high - low) * 0.1 or 0.01
    return low - pad, high + pad
