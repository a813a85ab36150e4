"""The output parser: progress lines, the FAIL line, the `---` summary, and how a finished run is classified."""

from __future__ import annotations

import math

from agent.sandbox.judging import judged
from agent.sandbox.runner import classify
from agent.sandbox.summary import find_fail, parse_progress, parse_summary, summary_bpb

SUMMARY = """\
step    42 | loss 2.3456 | lr 4.00e-03 | tok/s 18234 | 12.3s
---
val_bpb:          2.712345
training_seconds: 60.1
total_seconds:    71.3
peak_memory_mb:   512.3
mfu_percent:      3.21
total_tokens_M:   1.05
num_steps:        512
num_params_M:     0.46
train_flops:      2.9e12
budget:           3.0e12 FLOPs
seed:             1
""".splitlines()


def test_progress_line_is_parsed() -> None:
    progress = parse_progress("step    42 | loss 2.3456 | lr 4.00e-03 | tok/s 18234 | 12.3s")
    assert progress is not None
    assert (progress.step, progress.loss, progress.tokens_per_s) == (42, 2.3456, 18234.0)


def test_other_lines_are_not_progress() -> None:
    assert parse_progress("device cpu | params 0.44M | budget 60 s") is None
    assert parse_progress("step 3 | loss nan-ish | lr 1 | tok/s x") is None
    assert parse_progress("") is None


def test_nan_loss_parses_as_nan() -> None:
    progress = parse_progress("step 5 | loss nan | lr 1e-3 | tok/s 10 | 0.1s")
    assert progress is not None and math.isnan(progress.loss)


def test_summary_block_values() -> None:
    summary = parse_summary(SUMMARY)
    assert summary is not None
    assert summary["val_bpb"] == 2.712345
    assert summary["num_steps"] == 512 and isinstance(summary["num_steps"], int)
    assert summary["seed"] == 1
    assert summary["train_flops"] == 2.9e12
    assert summary["budget"] == "3.0e12 FLOPs"
    assert summary_bpb(summary) == 2.712345


def test_the_last_block_counts() -> None:
    lines = ["---", "val_bpb: 9.0", "noise", "---", "val_bpb: 1.5"]
    summary = parse_summary(lines)
    assert summary is not None and summary["val_bpb"] == 1.5


def test_no_summary() -> None:
    assert parse_summary(["step 1 | loss 2 | lr 1 | tok/s 3"]) is None
    assert parse_summary(["---", "not: a summary"]) is None  # no val_bpb


def test_invalid_val_bpb_text() -> None:
    summary = parse_summary(["---", "val_bpb:          invalid (non-causal)"])
    assert summary is not None
    assert summary["val_bpb"] == "invalid (non-causal)"
    assert summary_bpb(summary) is None


def test_fail_line() -> None:
    assert find_fail(["step 1", "FAIL: loss is nan at step 12", "x"]) == "FAIL: loss is nan at step 12"
    assert find_fail(["all fine"]) is None


def _result(val: float | None = 2.712345, status: str = "ok") -> dict[str, object]:
    return {"val_bpb": val, "status": status, "reason": "" if status == "ok" else "non-causal: leaks"}


def test_a_clean_exit_goes_to_the_judge() -> None:
    assert classify(0, SUMMARY, None) is None


def test_the_judges_number_is_the_result() -> None:
    found = judged(_result())
    assert (found.outcome, found.val_bpb, found.reason) == ("ok", 2.712345, "")


def test_the_judges_refusal_is_invalid_with_its_reason() -> None:
    found = judged(_result(None, "invalid"))
    assert found.outcome == "invalid" and found.val_bpb is None and "non-causal: leaks" in found.reason


def test_a_non_finite_judged_value_is_nan() -> None:
    assert judged(_result(float("nan"))).outcome == "nan"


def test_classify_fail_line_is_nan() -> None:
    bad = classify(1, ["FAIL: loss is nan at step 12"], "FAIL: loss is nan at step 12")
    assert bad is not None and (bad.outcome, bad.val_bpb, bad.reason) == (
        "nan",
        None,
        "FAIL: loss is nan at step 12",
    )


def test_classify_crash_keeps_the_last_line() -> None:
    tail = ["Traceback (most recent call last):", '  File "train.py", line 3', "ValueError: bad shape"]
    bad = classify(1, tail, None)
    assert bad is not None and bad.outcome == "crash" and "ValueError: bad shape" in bad.reason


def test_classify_memory_error_is_oom() -> None:
    for exit_code, tail in ((1, ["Traceback", "MemoryError"]), (-9, ["..."])):
        bad = classify(exit_code, tail, None)
        assert bad is not None and bad.outcome == "oom"


def test_a_containment_failure_is_named_only_with_its_line() -> None:
    failed = classify(125, ["autoresearch containment: mount failed; the run was not started"], None)
    assert failed is not None and "containment could not be set up" in failed.reason
    own = classify(125, ["my script exits 125"], None)
    assert own is not None and "containment" not in own.reason
