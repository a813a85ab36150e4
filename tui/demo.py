"""A recorded research session as engine events: for snapshots, the benchmark, and a look without training."""

from __future__ import annotations

import math

from agent.events import (
    Decided,
    EngineState,
    Event,
    LogLine,
    NoiseMeasured,
    ProposalReady,
    ProposalStarted,
    ProposalToken,
    ReviewRequested,
    RunFinished,
    RunStarted,
    StateChanged,
    StepMetric,
)
from tui.state import HeaderInfo

DEMO_DIFF = """\
--- a/train.py
+++ b/train.py
@@ -12,7 +12,7 @@
 # Hyperparameters: the agent edits these.
 N_LAYER = 4
 N_HEAD = 4
-N_EMBD = 128
+N_EMBD = 192
 BLOCK_SIZE = 128
 BATCH_SIZE = 16
-LEARNING_RATE = 3e-3
+LEARNING_RATE = 2e-3
"""


def _side(diff: str, sign: str) -> str:
    """The text a one-hunk diff changes from (sign '-') or to ('+'): its context lines with its own."""
    body = diff.splitlines()[3:]  # past ---, +++ and the hunk header
    return "".join(line[1:] + "\n" for line in body if line[:1] in (" ", sign))


DEMO_BASE = _side(DEMO_DIFF, "-")
"""The part of train.py DEMO_DIFF applies to, as the best has it (what a review is asked on)."""

DEMO_CANDIDATE = _side(DEMO_DIFF, "+")
"""The same part with DEMO_DIFF applied."""

IDEAS = [
    ("raise the learning rate to 4e-3", 2.61, "keep"),
    ("swap GELU for ReLU squared", 2.64, "discard"),
    ("add dropout 0.1", None, "crash"),
    ("wider model: N_EMBD 192, LR 2e-3", 2.57, "keep"),
    ("cosine decay to 10% instead of 0", 2.575, "discard"),
    ("weight decay 0.1 on matrices only", None, "timeout"),
]


def demo_header() -> HeaderInfo:
    """A header as an engine snapshot would fill it (fixed, for deterministic snapshots)."""
    return HeaderInfo(
        workspace="/srv/research/autoresearch/workspace",
        branch="autoresearch/nov27",
        model="qwen2.5-coder-1.5b",
        device="cpu (8 cores)",
        budget="60 s",
        state=EngineState.IDLE,
    )


def run(exp_id: int, description: str, val_bpb: float | None, outcome: str, steps: int = 40) -> list[Event]:
    """The events of one run: start, progress lines with their metrics, finish."""
    events: list[Event] = [
        RunStarted(exp_id=exp_id, description=description, commit=f"{exp_id:07x}", seed=1, budget="60 s")
    ]
    floor = val_bpb if val_bpb is not None else 3.0
    for step in range(0, steps * 10, 10):
        loss = floor * 1.05 + 1.8 * math.exp(-step / 90) + 0.03 * math.sin(step / 7 + exp_id)
        tok = 18000 + 40 * exp_id
        events.append(
            LogLine(
                exp_id=exp_id,
                text=f"step {step:5d} | loss {loss:.4f} | lr 3.00e-03 | tok/s {tok} | {step / 6.5:.1f}s",
            )
        )
        events.append(StepMetric(exp_id=exp_id, step=step, loss=loss, tokens_per_s=float(tok)))
    if outcome == "ok":
        events.append(LogLine(exp_id=exp_id, text="---"))
        events.append(LogLine(exp_id=exp_id, text=f"val_bpb:          {val_bpb:.6f}"))
    else:
        events.append(LogLine(exp_id=exp_id, text=f"FAIL: {outcome}"))
    events.append(
        RunFinished(
            exp_id=exp_id,
            outcome=outcome,
            val_bpb=val_bpb,
            seconds=60.4 + exp_id,
            summary={"peak_memory_mb": 512.0},
            log_tail=f"step  390 | loss {floor:.4f}\n---\nval_bpb: {val_bpb}"
            if val_bpb
            else f"FAIL: {outcome}",
        )
    )
    return events


def recorded_session(with_review: bool = False) -> list[Event]:
    """A baseline, six experiments (keeps, discards, a crash, a timeout), then a proposal being thought up."""
    events: list[Event] = [StateChanged(state=EngineState.BASELINE)]
    events += run(0, "baseline", 2.70, "ok")
    events.append(
        Decided(exp_id=0, status="baseline", val_bpb=2.70, best_bpb=2.70, margin=0.01, reason="baseline")
    )
    events.append(NoiseMeasured(values=(2.70, 2.704, 2.698), spread=0.006, margin=0.01))
    best = 2.70
    for exp_id, (description, value, status) in enumerate(IDEAS, start=1):
        events.append(StateChanged(state=EngineState.PROPOSING))
        events.append(ProposalStarted(proposer="llama", model="qwen2.5-coder-1.5b"))
        events.append(ProposalReady(exp_id=exp_id, description=description, diff=DEMO_DIFF, proposer="llama"))
        events.append(StateChanged(state=EngineState.RUNNING))
        outcome = "ok" if status in ("keep", "discard") else status
        events += run(exp_id, description, value, outcome)
        if status == "keep" and value is not None:
            best = value
        reason = {
            "keep": "beats the best by more than the margin",
            "discard": "not better than the best",
        }.get(status, f"the run ended with {status}")
        events.append(
            Decided(exp_id=exp_id, status=status, val_bpb=value, best_bpb=best, margin=0.01, reason=reason)
        )
    events.append(StateChanged(state=EngineState.PROPOSING))
    events.append(ProposalStarted(proposer="llama", model="qwen2.5-coder-1.5b"))
    reasoning = "The wider model helped; the remaining gap is optimisation, so try a short warmup."
    for word in reasoning.split():
        events.append(ProposalToken(text=word + " "))
    if with_review:
        events.append(
            ProposalReady(
                exp_id=7,
                description="linear warmup over the first 50 steps",
                diff=DEMO_DIFF,
                proposer="llama",
            )
        )
        events.append(
            ReviewRequested(
                exp_id=7,
                description="linear warmup over the first 50 steps",
                diff=DEMO_DIFF,
                base_text=DEMO_BASE,
                candidate_text=DEMO_CANDIDATE,
            )
        )
        events.append(StateChanged(state=EngineState.WAITING_REVIEW))
    return events


def parallel_runs(steps: int = 30) -> list[Event]:
    """Two trainers at once after the recorded session: #7 on trainer 1, #8 on trainer 2 (a Ray node), their
    lines and metrics interleaved as the engine sends them."""
    starts = [
        RunStarted(
            exp_id=7, description="linear warmup over 50 steps", commit="7", seed=1, budget="60 s", slot=0
        ),
        RunStarted(
            exp_id=8,
            description="N_HEAD 8",
            commit="8",
            seed=1,
            budget="60 s",
            slot=1,
            where="node-b (gpu 1)",
        ),
    ]
    events: list[Event] = [StateChanged(state=EngineState.RUNNING), *starts]
    streams = [run(7, "", 2.55, "ok", steps)[1:-3], run(8, "", 2.60, "ok", steps)[1:-3]]
    for pair in zip(*streams, strict=True):
        events.extend(pair)
    return events


def main() -> int:
    """`python -m tui.demo`: the cockpit replaying the recorded session (no engine, no training)."""
    from tui.app import CockpitApp

    app = CockpitApp(header=demo_header())
    app.feed(recorded_session(with_review=False))
    return app.run() or 0


if __name__ == "__main__":
    raise SystemExit(main())
