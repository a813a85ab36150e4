"""The core is headless: importing agent/ and nanogpt/ never pulls in textual (nor torch for the agent)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def core_modules() -> list[str]:
    names = [f"agent.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "agent")])]
    return sorted(names) + ["nanogpt.prepare"]


def test_the_core_never_imports_textual() -> None:
    modules = core_modules()
    assert "agent.engine" in modules and "agent.cli" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.'))\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"textual imported by the core: {proc.stdout}"


def test_no_core_source_mentions_textual() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("agent", "nanogpt")
        for path in (ROOT / folder).rglob("*.py")
        if any(
            line.lstrip().startswith(("import textual", "from textual"))
            for line in path.read_text().splitlines()
        )
    ]
    assert offenders == []
