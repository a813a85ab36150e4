"""The judge: scores a run's exported model in a clean process that never imports train.py.

The runner starts it as `python -I judge.py score HARNESS MODEL CLAIMS OUT` in a folder the run never saw:
HARNESS is the workspace's frozen prepare.py (its SHA-256 checked, copied by the engine), imported here by
path; its `judge(model, claims)` computes the result, which is written to OUT. `python -I` keeps this file's
folder, the working directory, PYTHONPATH and user site-packages off `sys.path`, so nothing a run left behind
can be imported. `prepare HARNESS OUT` runs the harness's `prepare_for_runs()` once before contained runs
(the data cache, and which files training must not read). `serve HARNESS` is the warm judge
(`agent.runner.WarmJudge`): torch and the harness imported once, a forked child per model.

Standard library only: the harness brings torch. Runs as a script, so it imports nothing of `agent`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any


def load_harness(path: Path) -> ModuleType:
    """Import the frozen harness from `path` as module `prepare`."""
    spec = importlib.util.spec_from_file_location("prepare", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the harness {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare"] = module
    spec.loader.exec_module(module)
    return module


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def score(harness: ModuleType, model: Path, claims_path: Path, out: Path) -> int:
    """Score one exported model with the harness's judge; the result goes to `out`."""
    claims = json.loads(claims_path.read_text(encoding="utf-8")) if claims_path.is_file() else {}
    if not hasattr(harness, "judge"):
        result = {"status": "invalid", "reason": "this workspace's prepare.py has no judge (too old)"}
    else:
        result = dict(harness.judge(str(model), claims if isinstance(claims, dict) else {}))
    write_atomic(out, result)
    if result.get("status") == "probe":  # a probe's model (agent/noop.py): a fingerprint, never a score
        print(f"judge: probe fingerprint {result.get('fingerprint')} {result.get('reason') or ''}".rstrip())
        return 0
    print(
        f"judge: {result.get('status')} val_bpb {result.get('val_bpb')} {result.get('reason') or ''}".rstrip()
    )
    return 0


def serve(harness_path: Path) -> int:
    """The warm judge: import the harness (and torch) once, then for each request line on stdin
    (`{"model", "claims", "out"}`) fork a fresh child that scores it, and answer `{"exit": code}` on stdout.
    Everything else anyone prints goes to stderr. Ends when stdin closes (the engine is gone)."""
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    harness = load_harness(harness_path)
    if "torch" in sys.modules:
        _warm(harness_path.parent)
    for line in sys.stdin:
        request = json.loads(line)
        child = os.fork()
        if child == 0:
            try:
                code = score(harness, Path(request["model"]), Path(request["claims"]), Path(request["out"]))
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(child, 0)
        protocol.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")
        protocol.flush()
    return 0


def _warm(folder: Path) -> None:
    """Export, save and load a tiny model once: the first `torch.export.load` in a process costs ~1 s of imports
    and set-up that every forked child then inherits ready. No tensor math here: a parent that has started
    OpenMP threads must not fork."""
    import torch

    path = folder / "warm.pt2"
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
    torch.export.save(program, str(path))
    torch.export.load(str(path)).module()
    path.unlink()


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "prepare":
        harness = load_harness(Path(argv[1]))
        prepared = harness.prepare_for_runs() if hasattr(harness, "prepare_for_runs") else {}
        write_atomic(Path(argv[2]), {"hidden": [str(p) for p in prepared.get("hidden", [])]})
        return 0
    if len(argv) == 5 and argv[0] == "score":
        harness_path, model, claims_path, out = (Path(a) for a in argv[1:])
        return score(load_harness(harness_path), model, claims_path, out)
    if len(argv) == 2 and argv[0] == "serve":
        return serve(Path(argv[1]))
    print(
        "usage: judge.py prepare HARNESS OUT | score HARNESS MODEL CLAIMS OUT | serve HARNESS",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except Exception:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the result is written: skip torch's slow interpreter teardown (~0.8 s)
