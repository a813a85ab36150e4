"""Shared fixtures: every test runs with its own AUTORESEARCH_HOME; prepared data is shared per session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared-data cache for the whole session (preparing is cheap, but not free)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def ar_home(tmp_path: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private AUTORESEARCH_HOME so that no test touches the real user dirs."""
    home = tmp_path / "arhome"
    home.mkdir()
    monkeypatch.setenv("AUTORESEARCH_HOME", str(home))
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(shared_cache))
    monkeypatch.delenv("AUTORESEARCH_BUDGET", raising=False)
    monkeypatch.delenv("AUTORESEARCH_CORPUS", raising=False)
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "cpu")  # tests build on the cpu profile, GPU machines too
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    yield home


@pytest.fixture
def python() -> str:
    """The interpreter that runs training children."""
    return sys.executable
