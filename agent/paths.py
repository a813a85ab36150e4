"""Every path the app uses, in one place; AUTORESEARCH_HOME moves them all (tests use it)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "autoresearch"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The source checkout: holds program.md, models/ and nanogpt/."""


def _home() -> Path | None:
    value = os.environ.get("AUTORESEARCH_HOME")
    return Path(value).expanduser().resolve() if value else None


def data_dir() -> Path:
    """User data: the default workspace and the assembled models."""
    home = _home()
    return home / "data" if home else Path(platformdirs.user_data_dir(APP_NAME))


def cache_dir() -> Path:
    """Prepared corpora, tokenizers and the CPU peak-FLOPs measurement (AUTORESEARCH_CACHE overrides)."""
    if value := os.environ.get("AUTORESEARCH_CACHE"):
        return Path(value).expanduser().resolve()
    home = _home()
    return home / "cache" if home else Path(platformdirs.user_cache_dir(APP_NAME))


def config_dir() -> Path:
    """User configuration."""
    home = _home()
    return home / "config" if home else Path(platformdirs.user_config_dir(APP_NAME))


def user_models_dir() -> Path:
    """Where the embedded model is assembled and where users may drop GGUF files."""
    return data_dir() / "models"


def project_models_dir() -> Path:
    """The checkout's models/ folder (its GGUF files are git-ignored)."""
    return PROJECT_ROOT / "models"


def default_workspace() -> Path:
    """The research workspace used when none is named."""
    return data_dir() / "workspace"


def nanogpt_dir() -> Path:
    """The pristine sandbox: prepare.py (frozen) and train.py (the starting point)."""
    return PROJECT_ROOT / "nanogpt"


def default_program_md() -> Path:
    """The default research instructions copied into a new workspace."""
    return PROJECT_ROOT / "program.md"
