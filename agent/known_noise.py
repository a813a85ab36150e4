"""The noise this machine is known to have: every session's baseline spread, remembered in the user's cache.

A session measures its noise from a few baseline seeds, and two or three seeds can happen to agree (a 2-seed
spread of zero was seen twice): the margin would fall to its minimum and every lucky run would be kept. The
same train.py at the same budget on the same device was measured before, by earlier sessions on this machine:
the median of their standard deviations floors the margin (`decisions.noise_floor`). One JSON line per measured
baseline; lines that cannot be read are skipped (the file is a hint, never a reason to stop).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

from agent import paths

FILE_NAME = "known-noise.jsonl"
"""Its name in the user's cache (`paths.cache_dir()`)."""
_KEPT = 50
"""The newest records per key that count (an old machine's or an old setup's noise ages out)."""


def in_cache() -> Path:
    """Where the command line and the cockpit keep it: the user's cache."""
    return paths.cache_dir() / FILE_NAME


def _key(device: str, budget: str, code: str) -> dict[str, str]:
    return {"device": device, "budget": budget, "code": code}


def known_std(path: Path, device: str, budget: str, code: str) -> float | None:
    """The median standard deviation of the baselines of train.py `code` (its hash) measured at `budget` on
    `device` by earlier sessions; None when there are none."""
    key = _key(device, budget, code)
    stds: list[float] = []
    with contextlib.suppress(OSError):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                if all(record.get(k) == v for k, v in key.items()):
                    stds.append(float(record["std"]))
            except (ValueError, TypeError, KeyError, AttributeError):
                continue
    stds = [s for s in stds[-_KEPT:] if s >= 0.0]
    return statistics.median(stds) if stds else None


def remember(
    path: Path, device: str, budget: str, code: str, std: float, seeds: int, workspace: Path
) -> None:
    """Add a session's measured baseline noise (its seeds' standard deviation) to the record."""
    record: dict[str, object] = {**_key(device, budget, code), "std": std, "seeds": seeds}
    record.update(workspace=str(workspace), at=round(time.time(), 1))
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
