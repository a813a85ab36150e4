"""The judge: scores a run's exported model in a clean process that never imports train.py.

The runner starts it as `python -I judge.py score HARNESS MODEL CLAIMS OUT` in a folder the run never saw.
HARNESS is a folder holding the workspace's frozen harness, copied there by the engine with each file's SHA-256
checked: prepare.py and corpus.py (what train.py imports) and metric.py (what only the judge imports). Each is
imported here by path, as module `corpus`, `prepare` (it imports corpus), then `metric` (it imports prepare), whose
`judge(model, claims)` computes the result, written to OUT. `python -I` keeps this file's folder, the working
directory, PYTHONPATH and user site-packages off `sys.path`, so nothing a run left behind can be imported.
`prepare HARNESS OUT` runs the metric's `prepare_for_runs()` once before contained runs (the data cache, and
which files training must not read). `serve HARNESS` is the warm judge (`agent.sandbox.judging.WarmJudge`):
torch and the harness imported once, a forked child per model.

Standard library only: the harness brings torch. Runs as a script, so it imports nothing of `agent`.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

HARNESS = ("corpus", "prepare", "metric")
"""The frozen harness's modules (agent.sandbox.spec.HARNESS_FILES), in import order: prepare imports corpus,
metric imports prepare."""


def load_harness(folder: Path) -> ModuleType:
    """Import the frozen harness from `folder` (each module by its file's path, never from `sys.path`); the
    metric, whose `judge` scores."""
    for name in HARNESS:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import the harness's {name}.py from {folder}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # `from prepare import ...` in metric.py (and corpus in prepare) finds it
        spec.loader.exec_module(module)
    return sys.modules[HARNESS[-1]]


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def score(metric: ModuleType, model: Path, claims_path: Path, out: Path) -> int:
    """Score one exported model with the metric's judge; the result goes to `out`."""
    claims = json.loads(claims_path.read_text(encoding="utf-8")) if claims_path.is_file() else {}
    result = dict(metric.judge(str(model), claims if isinstance(claims, dict) else {}))
    write_atomic(out, result)
    if (
        result.get("status") == "probe"
    ):  # a probe's model (agent/sandbox/probe.py): a fingerprint, never a score
        print(f"judge: probe fingerprint {result.get('fingerprint')} {result.get('reason') or ''}".rstrip())
        return 0
    print(
        f"judge: {result.get('status')} val_bpb {result.get('val_bpb')} {result.get('reason') or ''}".rstrip()
    )
    return 0


def serve(harness: Path) -> int:
    """The warm judge: import the harness (and torch) once, then for each request line on stdin
    (`{"model", "claims", "out"}`) fork a fresh child that scores it, and answer `{"exit": code}` on stdout.
    Everything else anyone prints goes to stderr. Ends when stdin closes (the engine is gone).

    A child keeps nothing of the server's but stderr (not the requests, not the reply pipe), and whatever it
    leaves running dies before the answer is written (the server is its subreaper): what one request did cannot
    reach the next."""
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    _become_subreaper()
    metric = load_harness(harness)
    if "torch" in sys.modules:
        _warm(harness)
    for line in sys.stdin:
        request = json.loads(line)
        child = os.fork()
        if child == 0:
            nothing = os.open(os.devnull, os.O_RDONLY)
            os.dup2(nothing, 0)  # not the engine's requests ...
            os.close(protocol.fileno())  # ... nor the pipe the answers go to
            try:
                code = score(metric, Path(request["model"]), Path(request["claims"]), Path(request["out"]))
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(child, 0)
        _kill_strays()
        protocol.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")
        protocol.flush()
    return 0


PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    """Orphans of this process's descendants become its children (Linux), so that `_kill_strays` finds a daemon
    a request's child left (a double fork escapes any process group)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _kill_strays() -> None:
    """Kill every process left under this one (what a request's child started) and reap it."""
    for _ in range(50):  # a stray's own children are reparented here in turn
        strays = _children(os.getpid())
        if not strays:
            return
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in strays:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _children(parent: int) -> list[int]:
    """The processes whose parent is `parent` (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            found.append(int(entry))
    return found


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
        metric = load_harness(Path(argv[1]))
        prepared = metric.prepare_for_runs() if hasattr(metric, "prepare_for_runs") else {}
        told: dict[str, Any] = {
            key: [str(p) for p in prepared.get(key, [])] for key in ("hidden", "readable")
        }
        if prepared.get("data"):
            told["data"] = str(prepared["data"])
        write_atomic(Path(argv[2]), told)
        return 0
    if len(argv) == 5 and argv[0] == "score":
        harness, model, claims_path, out = (Path(a) for a in argv[1:])
        return score(load_harness(harness), model, claims_path, out)
    if len(argv) == 2 and argv[0] == "serve":
        return serve(Path(argv[1]))
    print(
        "usage: judge.py prepare HARNESS OUT | score HARNESS MODEL CLAIMS OUT | serve HARNESS "
        "(HARNESS: the folder holding the frozen prepare.py, corpus.py and metric.py)",
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
