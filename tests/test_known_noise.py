"""The machine's known noise: each session's baseline spread remembered, its median read back by key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import known_noise


def test_the_median_of_earlier_sessions_of_the_same_code_budget_and_device(tmp_path: Path) -> None:
    record = tmp_path / "cache" / known_noise.FILE_NAME
    assert known_noise.known_std(record, "cpu", "60", "abc") is None  # nothing yet (no file)
    for std in (0.004, 0.010, 0.006):
        known_noise.remember(record, "cpu", "60", "abc", std, 3, tmp_path / "ws")
    known_noise.remember(record, "cpu", "30", "abc", 0.5, 3, tmp_path / "ws")  # another budget
    known_noise.remember(record, "cuda", "60", "abc", 0.5, 2, tmp_path / "ws")  # another device
    known_noise.remember(record, "cpu", "60", "def", 0.5, 3, tmp_path / "ws")  # another train.py
    assert known_noise.known_std(record, "cpu", "60", "abc") == pytest.approx(0.006)
    assert known_noise.known_std(record, "cpu", "30", "abc") == pytest.approx(0.5)


def test_a_damaged_record_is_read_around_never_a_reason_to_stop(tmp_path: Path) -> None:
    record = tmp_path / known_noise.FILE_NAME
    record.write_bytes(
        b'\xff\xfe not json\n{"device": "cpu"}\n[1, 2]\n{"device": "cpu", "budget": "60", "code": "abc", "std": "x"}\n'
    )
    assert known_noise.known_std(record, "cpu", "60", "abc") is None
    known_noise.remember(record, "cpu", "60", "abc", 0.008, 2, tmp_path)
    assert known_noise.known_std(record, "cpu", "60", "abc") == pytest.approx(0.008)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert known_noise.known_std(folder, "cpu", "60", "abc") is None  # unreadable: nothing known
    known_noise.remember(folder, "cpu", "60", "abc", 0.008, 2, tmp_path)  # unwritable: nothing kept, no error
