"""The headless core never imports textual, and the engine and CLI do not pull in torch."""

from __future__ import annotations

import json
import subprocess
import sys

from engine_fakes import ROOT

MODULES = [
    "agent.engine",
    "agent.cli",
    "agent.runner",
    "agent.ledger",
    "agent.workspace",
    "agent.ideas",
    "agent.printer",
    "agent.report",
    "agent.decisions",
]


def test_core_imports_neither_textual_nor_torch() -> None:
    code = (
        "import json, sys\n"
        + "".join(f"import {name}\n" for name in MODULES)
        + "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'torch', 'matplotlib'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(out.stdout) == []
