"""Parsing a run's output: progress lines, the FAIL line and the `---` summary block of the harness."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PROGRESS = re.compile(r"^step\s+(\d+)\s+\|\s+loss\s+(\S+)\s+\|.*\btok/s\s+([\d.]+)")
"""The contract's progress line: `step    42 | loss 2.3456 | lr 4.00e-03 | tok/s 18234 | 12.3s`."""
_KEY_VALUE = re.compile(r"^([A-Za-z_][\w]*)\s*:\s*(.*?)\s*$")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


@dataclass(frozen=True)
class Progress:
    """One parsed progress line."""

    step: int
    loss: float
    tokens_per_s: float


def parse_progress(line: str) -> Progress | None:
    """The step, loss and tokens/s of a progress line, or None for any other line."""
    match = PROGRESS.match(line.strip())
    if not match:
        return None
    try:
        return Progress(int(match.group(1)), float(match.group(2)), float(match.group(3)))
    except ValueError:
        return None


def _value(text: str) -> Any:
    """A summary value: a float where it reads as a number, else the text ('invalid (non-causal)', '3.0e12 FLOPs')."""
    if _NUMBER.match(text) or text.lower() in ("nan", "inf", "-inf"):
        return float(text)
    return text


def parse_summary(lines: Iterable[str]) -> dict[str, Any] | None:
    """The key/value pairs after the last `---` line, or None when there is no summary block.

    Numbers become floats (`num_steps` and `seed` ints); anything else stays text, so `val_bpb` may be a
    float or a string such as 'invalid (non-causal)'. A block without a `val_bpb` key is not a summary.
    """
    block: list[str] | None = None
    for line in lines:
        stripped = line.strip()
        if stripped == "---":
            block = []
        elif block is not None:
            block.append(stripped)
    if block is None:
        return None
    summary: dict[str, Any] = {}
    for line in block:
        match = _KEY_VALUE.match(line)
        if match:
            summary[match.group(1)] = _value(match.group(2))
    for key in ("num_steps", "seed"):
        value = summary.get(key)
        if isinstance(value, float) and value.is_integer():
            summary[key] = int(value)
    return summary if "val_bpb" in summary else None


def find_fail(lines: Iterable[str]) -> str | None:
    """The harness's FAIL line (NaN or exploding loss), if any."""
    for line in lines:
        if line.lstrip().startswith("FAIL"):
            return line.strip()
    return None


def summary_bpb(summary: dict[str, Any]) -> float | None:
    """The printed val_bpb as a finite float, or None (missing, 'invalid (...)', nan)."""
    value = summary.get("val_bpb")
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None
