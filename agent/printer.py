"""The headless display: every event as one readable line, or as one JSON line (`--json`)."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import TextIO

from agent import events as ev
from agent.events import Event, EventSink, first_line, last_line


def _bpb(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def format_event(event: Event, verbose: bool = False) -> str | None:
    """One line for a person, or None for events not worth a line (streamed tokens, unless verbose)."""
    match event:
        case ev.StateChanged(state=state, detail=detail):
            return f"== {state}{f' ({detail})' if detail else ''}" if verbose else None
        case ev.RunStarted(
            exp_id=exp_id, description=description, seed=seed, budget=budget, promotion=rung
        ) if rung:
            return f"#{exp_id} promotion {rung}, seed {seed}, budget {budget}: {description}"
        case ev.RunFinished(
            exp_id=exp_id, outcome=outcome, val_bpb=val_bpb, seconds=seconds, promotion=rung
        ) if rung:
            return f"#{exp_id} promotion {rung} done {outcome}, val_bpb {_bpb(val_bpb)}, {seconds:.1f} s"
        case ev.Transferred(message=message):
            return message
        case ev.RunStarted(exp_id=exp_id, description=description, commit=commit, seed=seed, budget=budget):
            return f"#{exp_id} run  seed {seed}, budget {budget}, commit {commit[:7]}: {description}"
        case ev.LogLine(exp_id=exp_id, text=text, replace=replace):
            if replace and not verbose:
                return None
            return f"#{exp_id} |    {text}"
        case ev.StepMetric():
            return None
        case ev.RunFinished(exp_id=exp_id, outcome=outcome, val_bpb=val_bpb, seconds=seconds, log_tail=tail):
            line = f"#{exp_id} done {outcome}, val_bpb {_bpb(val_bpb)}, {seconds:.1f} s"
            if outcome != "ok" and tail:
                # The end of a failed run's log says why it failed: its last line, cut as a reason is.
                line += f" — {last_line(tail)}"
            return line
        case ev.NoiseMeasured(values=values, spread=spread, margin=margin):
            shown = ", ".join(f"{v:.6f}" for v in values)
            return f"noise floor: baseline {shown} (spread {spread:.6f}); margin {margin:.6f} bpb"
        case ev.ProposalStarted(proposer=proposer, model=model):
            return f"proposing ({proposer}{f', {model}' if model else ''})…" if verbose else None
        case ev.ProposalToken():
            return None
        case ev.ProposalReady(exp_id=exp_id, description=description, proposer=proposer, diff=diff):
            changed = sum(
                1 for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))
            )
            return f"#{exp_id} idea {description} [{proposer}, {changed} changed lines]"
        case ev.ProposalRejected(exp_id=exp_id, reason=reason):
            who = f"#{exp_id} " if exp_id is not None else ""
            return f"{who}rejected: {first_line(reason)}"
        case ev.ProposerWaiting(reason=reason, retry_in_s=retry, failures=failures, failing_for_s=failing):
            since = f", failing for {failing:.0f} s" if failures > 1 else ""
            return f"proposer failed ({first_line(reason)}); asking again in {retry:.0f} s{since}"
        case ev.ReviewRequested(exp_id=exp_id, description=description):
            return f"#{exp_id} waiting for review: {description}"
        case ev.Decided(exp_id=exp_id, status=status, val_bpb=val_bpb, best_bpb=best, reason=reason, by=by):
            if status == "rejected":
                return None  # already said by ProposalRejected
            who = "" if by == "engine" else f" (by {by})"
            return (
                f"#{exp_id} {status.upper()}{who}: val_bpb {_bpb(val_bpb)}, best {_bpb(best)} — "
                f"{first_line(reason)}"
            )
        case ev.ModelLoading(name=name, progress=progress, message=message):
            if progress is not None and not verbose and 0 < progress < 1:
                return None
            pct = f" {progress:.0%}" if progress is not None else ""
            return f"model {name}: loading{pct} {message}".rstrip()
        case ev.ModelLoaded(name=name, seconds=seconds):
            return f"model {name}: ready in {seconds:.1f} s"
        case ev.EngineError(message=message, detail=detail, fatal=fatal):
            line = f"{'FATAL' if fatal else 'error'}: {message}"
            if verbose and detail:
                line += "\n" + detail.rstrip()
            return line
        case ev.Info(message=message):
            return message
    return f"{event.kind}: {ev.to_dict(event)}" if verbose else None


def make_printer(stream: TextIO | None = None, as_json: bool = False, verbose: bool = False) -> EventSink:
    """An EventSink writing lines to `stream` (stdout), safe to call from the engine thread."""
    out = stream or sys.stdout
    lock = threading.Lock()

    def sink(event: Event) -> None:
        if as_json:
            line: str | None = json.dumps(ev.to_dict(event), default=str, ensure_ascii=False)
        else:
            line = format_event(event, verbose)
            if line is not None:  # a message of several lines is indented under its time
                line = f"{time.strftime('%H:%M:%S', time.localtime(event.ts))} {line}".replace(
                    "\n", "\n" + " " * 9
                )
        if line is None:
            return
        with lock:
            out.write(line + "\n")
            out.flush()

    return sink
