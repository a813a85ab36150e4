"""The sandboxed runner against hostile and broken train.py scripts: nothing survives, nothing floods."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from engine_fakes import FAKE_HARNESS_SHA256, FAKE_METRIC, BusyMachine, alive, working_in, write_harness

from agent.budget import Budget
from agent.events import Event, LogLine, StepMetric
from agent.sandbox.containment import Containment, probe
from agent.sandbox.judging import JudgePool, WarmJudge
from agent.sandbox.process import group_members, kill_stale_run, scrub_environment
from agent.sandbox.runner import run_training
from agent.sandbox.spec import HANDOVER_MIN_S, RunResult, RunSpec, handover_window

LONG = Budget.parse("600")
"""A budget no test run reaches: its deadline, or the test's stop, ends it first."""


def _run(
    tmp_path: Path,
    script: str,
    *,
    deadline: float = 20.0,
    events: list[Event] | None = None,
    stop: threading.Event | None = None,
    containment: Containment | None = None,
    judge: WarmJudge | None = None,
    metric: str = FAKE_METRIC,
    **limits: object,
) -> RunResult:
    workspace = tmp_path / "ws"
    workspace.mkdir(exist_ok=True)
    (workspace / "train.py").write_text(textwrap.dedent(script))
    write_harness(workspace, metric=metric)
    spec = RunSpec(
        workspace=workspace,
        scratch=tmp_path / "scratch" / "7-0",
        exp_id=7,
        seed=3,
        log_path=tmp_path / "runs" / "7" / "run.log",
        deadline_s=deadline,
        python=sys.executable,
        **{"budget": LONG, **limits},  # type: ignore[arg-type]
    )
    sink = events.append if events is not None else (lambda e: None)
    return run_training(spec, sink, stop=stop, containment=containment, judge=judge)


def _assert_no_survivors(result: RunResult, *pid_files: Path) -> None:
    assert result.pid is not None
    assert group_members(result.pid) == [], "processes of the run's group survived"
    for pid_file in pid_files:
        pid = int(pid_file.read_text())
        try:
            proc = psutil.Process(pid)
            assert proc.status() == psutil.STATUS_ZOMBIE, f"pid {pid} survived"
        except psutil.NoSuchProcess:
            pass


OK_SCRIPT = """
    from prepare import report
    print("step     1 | loss 2.5000 | lr 1e-3 | tok/s 100 | 0.1s")
    report(2.345678)
"""


def test_ok_run(tmp_path: Path) -> None:
    events: list[Event] = []
    result = _run(tmp_path, OK_SCRIPT, events=events)
    assert (result.outcome, result.val_bpb, result.exit_code) == ("ok", 2.345678, 0)
    assert result.summary["seed"] == 3 and result.summary["val_bpb"] == 2.345678
    assert not (tmp_path / "scratch" / "7-0").exists()  # the run's folder is gone after judging
    assert result.log_path.read_text().startswith("step     1 | loss 2.5000")
    metrics = [e for e in events if isinstance(e, StepMetric)]
    assert [(m.exp_id, m.step, m.loss, m.tokens_per_s) for m in metrics] == [(7, 1, 2.5, 100.0)]
    _assert_no_survivors(result)


def test_a_run_gets_what_train_py_imports_and_never_the_metric(tmp_path: Path) -> None:
    script = """
        import os
        from prepare import report
        print("in the run's folder:", " ".join(sorted(os.listdir("."))))
        report(2.5)
    """
    result = _run(tmp_path, script)
    assert result.outcome == "ok", result.reason
    assert "in the run's folder: corpus.py prepare.py train.py" in result.log_path.read_text()


@pytest.mark.parametrize(
    "script",
    [
        "while True:\n    pass\n",
        "import time\ntime.sleep(1e9)\n",
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.01)\n",
    ],
    ids=["busy-loop", "sleep", "ignores-sigterm"],
)
def test_a_hang_is_killed_at_the_deadline(tmp_path: Path, script: str) -> None:
    result = _run(tmp_path, "print('started', flush=True)\n" + script, deadline=1.5)
    assert result.outcome == "timeout"
    assert "deadline" in result.reason
    assert result.seconds < 1.5 + 3.0 + 5.0  # deadline + SIGTERM grace + slack for a loaded machine
    _assert_no_survivors(result)


def test_a_forked_child_dies_with_the_run(tmp_path: Path) -> None:
    script = f"""
        import os, time
        pid = os.fork()
        if pid == 0:
            open({str(tmp_path / "child.pid")!r}, "w").write(str(os.getpid()))
            time.sleep(1e9)
        open({str(tmp_path / "parent.pid")!r}, "w").write(str(os.getpid()))
        print("forked", pid, flush=True)
        time.sleep(1e9)
    """
    result = _run(tmp_path, script, deadline=2.0)
    assert result.outcome == "timeout"
    _assert_no_survivors(result, tmp_path / "child.pid", tmp_path / "parent.pid")


def test_a_child_left_behind_by_a_finished_run_is_killed(tmp_path: Path) -> None:
    script = f"""
        import os, sys, time
        from prepare import report
        if os.fork() == 0:
            open({str(tmp_path / "child.pid")!r}, "w").write(str(os.getpid()))
            time.sleep(1e9)  # holds the run's stdout open
        while not os.path.exists({str(tmp_path / "child.pid")!r}):
            time.sleep(0.01)
        report(2.5)
    """
    result = _run(tmp_path, script, deadline=30.0)
    assert result.outcome == "ok"
    assert result.seconds < 15.0  # did not wait for the deadline
    _assert_no_survivors(result, tmp_path / "child.pid")


def test_a_stdout_flood_stays_under_the_log_cap(tmp_path: Path) -> None:
    cap = 64 * 1024
    script = """
        import sys
        from prepare import report
        line = "x" * 1000 + "\\n"
        for _ in range(20000):  # 20 MB
            sys.stdout.write(line)
        sys.stdout.write("y" * 300000)  # one huge line without a newline
        print()
        report(2.5)
    """
    events: list[Event] = []
    result = _run(tmp_path, script, events=events, log_cap_bytes=cap, deadline=60.0)
    assert result.truncated
    size = result.log_path.stat().st_size
    assert size <= cap + 200, size
    text = result.log_path.read_text()
    assert "bytes of output dropped" in text
    assert "val_bpb:          2.500000" in text  # the tail is kept
    assert result.outcome == "ok" and result.val_bpb == 2.5  # the summary is still found
    log_events = [e for e in events if isinstance(e, LogLine)]
    assert len(log_events) < 200  # the flood is not forwarded line by line either


def test_endless_flood_times_out_under_the_cap(tmp_path: Path) -> None:
    cap = 32 * 1024
    result = _run(tmp_path, "while True:\n    print('z' * 500)\n", log_cap_bytes=cap, deadline=1.5)
    assert result.outcome == "timeout"
    assert result.log_path.stat().st_size <= cap + 200
    _assert_no_survivors(result)


def test_carriage_return_progress_lines(tmp_path: Path) -> None:
    script = """
        import sys
        from prepare import report
        for i in range(1, 4):
            sys.stdout.write(f"step {i:5d} | loss {3 - i * 0.5:.4f} | lr 1e-3 | tok/s 10 | {i}s\\r")
        sys.stdout.write("\\n")
        print("eval done")
        report(2.5)
    """
    events: list[Event] = []
    result = _run(tmp_path, script, events=events)
    lines = [(e.text, e.replace) for e in events if isinstance(e, LogLine)]
    assert lines[:4] == [
        ("step     1 | loss 2.5000 | lr 1e-3 | tok/s 10 | 1s", False),
        ("step     2 | loss 2.0000 | lr 1e-3 | tok/s 10 | 2s", True),
        ("step     3 | loss 1.5000 | lr 1e-3 | tok/s 10 | 3s", True),
        ("eval done", False),
    ]
    assert [e.step for e in events if isinstance(e, StepMetric)] == [1, 2, 3]
    log = result.log_path.read_text().splitlines()
    assert log[:2] == ["step     3 | loss 1.5000 | lr 1e-3 | tok/s 10 | 3s", "eval done"]


def test_crash_keeps_the_traceback_tail(tmp_path: Path) -> None:
    result = _run(tmp_path, "def f():\n    raise ValueError('shape mismatch')\nf()\n")
    assert result.outcome == "crash" and result.exit_code == 1
    assert "ValueError: shape mismatch" in result.reason
    assert "Traceback" in result.log_tail and "ValueError: shape mismatch" in result.log_tail


def test_fail_line_is_nan(tmp_path: Path) -> None:
    result = _run(tmp_path, "import sys\nprint('FAIL: loss is nan at step 12')\nsys.exit(1)\n")
    assert result.outcome == "nan" and result.reason == "FAIL: loss is nan at step 12"


def test_a_run_that_hands_nothing_over_is_invalid(tmp_path: Path) -> None:
    result = _run(tmp_path, "print('done, I promise')\n")
    assert result.outcome == "invalid" and "left no claims.json" in result.reason


def test_a_printed_summary_without_a_handed_over_model_is_invalid(tmp_path: Path) -> None:
    result = _run(tmp_path, "print('---')\nprint('val_bpb:          1.000000')\n")
    assert result.outcome == "invalid" and "left no claims.json" in result.reason


def test_the_printed_value_is_not_the_score(tmp_path: Path) -> None:
    result = _run(tmp_path, "from prepare import report\nreport(2.5, printed=1.25)\n")
    assert (result.outcome, result.val_bpb) == ("ok", 2.5)
    assert result.summary["val_bpb"] == 2.5


def test_files_left_in_a_stale_scratch_folder_do_not_count(tmp_path: Path) -> None:
    stale = tmp_path / "scratch" / "7-0"
    stale.mkdir(parents=True)
    (stale / "claims.json").write_text('{"export": "ok"}')
    (stale / "model.pt2").write_text('{"val_bpb": 1.0}')
    result = _run(tmp_path, "print('---')\nprint('val_bpb:          1.000000')\n")
    assert result.outcome == "invalid"


@pytest.mark.parametrize(
    ("make", "why"),
    [
        ("os.mkfifo('model.pt2')", "a FIFO"),
        ("os.symlink('/etc/passwd', 'model.pt2')", "symbolic link"),
        ("os.mkdir('model.pt2')", "a folder"),
        ("open('model.pt2', 'wb').truncate(11 * 1024 * 1024)", "over the"),
    ],
    ids=["fifo", "symlink", "folder", "too-big"],
)
def test_a_hand_over_that_is_not_a_small_regular_file_is_refused(tmp_path: Path, make: str, why: str) -> None:
    script = f"""
        import json, os
        json.dump({{"export": "ok"}}, open("claims.json", "w"))
        {make}
        print("---")
        print("val_bpb:          1.000000")
    """
    result = _run(tmp_path, script, model_cap_mb=10, deadline=20.0)
    assert result.outcome == "invalid" and why in result.reason, result.reason
    assert result.seconds < 15


def test_claims_that_are_a_fifo_cannot_hang_the_engine(tmp_path: Path) -> None:
    result = _run(tmp_path, "import os\nos.mkfifo('claims.json')\n")
    assert result.outcome == "invalid" and "FIFO" in result.reason


def test_memory_watchdog(tmp_path: Path) -> None:
    script = """
        import time
        blocks = []
        for _ in range(40):
            blocks.append(bytearray(25 * 1024 * 1024))  # touched: resident
            time.sleep(0.05)
        time.sleep(1e9)
    """
    result = _run(tmp_path, script, memory_mb=200, deadline=30.0)
    assert result.outcome == "oom" and "200 MB" in result.reason
    _assert_no_survivors(result)


def test_address_space_cap_turns_a_huge_allocation_into_oom(tmp_path: Path) -> None:
    result = _run(tmp_path, "x = bytearray(4 * 1024 ** 3)\n", address_space_mb=1024)
    assert result.outcome == "oom"
    assert "MemoryError" in result.log_tail


def test_stop_kills_the_run_now(tmp_path: Path) -> None:
    stop = threading.Event()

    def sink(event: Event) -> None:
        if isinstance(event, LogLine) and event.text == "started":
            stop.set()

    spec_events: list[Event] = []
    write_harness(tmp_path)
    (tmp_path / "train.py").write_text("import time\nprint('started', flush=True)\ntime.sleep(1e9)\n")
    spec = RunSpec(
        workspace=tmp_path,
        scratch=tmp_path / "scratch" / "1-0",
        exp_id=1,
        seed=1,
        log_path=tmp_path / "run.log",
        deadline_s=120,
        budget=LONG,
        python=sys.executable,
    )
    result = run_training(spec, lambda e: (spec_events.append(e), sink(e)), stop=stop)
    assert result.outcome == "interrupted" and result.seconds < 30
    _assert_no_survivors(result)


def test_environment_is_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HTTPS_PROXY",
        "http_proxy",
        "GITHUB_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "OPENAI_API_KEY",
        "MY_PASSWORD",
    ):
        monkeypatch.setenv(name, "secret")
    monkeypatch.setenv("AUTORESEARCH_CRASH_AT", "after_commit")
    kept = scrub_environment(os.environ)
    assert "PATH" in kept and "HOME" in kept
    script = """
        import json, os
        print("ENV", json.dumps(sorted(os.environ)))
    """
    result = _run(tmp_path, script)
    line = next(x for x in result.log_path.read_text().splitlines() if x.startswith("ENV "))
    names = set(__import__("json").loads(line[4:]))
    assert not names & {
        "HTTPS_PROXY",
        "http_proxy",
        "GITHUB_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "OPENAI_API_KEY",
    }
    assert "MY_PASSWORD" not in names and "AUTORESEARCH_CRASH_AT" not in names
    assert {"AUTORESEARCH_SEED", "PYTHONUNBUFFERED", "OMP_WAIT_POLICY"} <= names
    assert not [name for name in names if "RESULT" in name]  # the run never learns where the result goes


def test_budget_reaches_the_run(tmp_path: Path) -> None:
    script = "import os\nprint('BUDGET', os.environ.get('AUTORESEARCH_BUDGET'))\n"
    _run(tmp_path, script, budget=Budget.parse("7s"))
    assert "BUDGET 7\n" in (tmp_path / "runs" / "7" / "run.log").read_text()


def test_no_network(tmp_path: Path) -> None:
    containment = probe()
    if containment.level == "none":
        pytest.skip(f"no network namespace here: {containment.detail}")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    script = f"""
        import os, socket
        lines = open("/proc/net/dev").read().splitlines()[2:]  # per network namespace, unlike /sys/class/net
        print("IFACES", sorted(line.split(":")[0].strip() for line in lines))
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=2)
            print("NET yes")
        except OSError as exc:
            print("NET no", type(exc).__name__)
    """
    try:
        result = _run(tmp_path, script, containment=containment)
    finally:
        listener.close()
    text = result.log_path.read_text()
    assert "NET no" in text
    assert "IFACES ['lo']" in text


def test_kill_stale_run_only_kills_our_run(tmp_path: Path) -> None:
    assert not kill_stale_run(os.getpid(), tmp_path)  # not working under the scratch root: left alone
    assert psutil.pid_exists(os.getpid())
    # A run a killed engine left behind (where it could not die with it: no setpriv): its group is killed.
    scratch = tmp_path / "7-0"
    scratch.mkdir()
    argv = [
        sys.executable,
        "-c",
        "import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\ntime.sleep(60)",
    ]
    with subprocess.Popen(argv, cwd=scratch, start_new_session=True) as stale:
        deadline = time.monotonic() + 30
        while len(group_members(stale.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        members = group_members(stale.pid)
        assert len(members) == 2
        assert kill_stale_run(stale.pid, tmp_path)
        assert stale.wait(timeout=10) < 0  # by a signal (TERM, then KILL)
    assert working_in(scratch) == []


_ENGINE = """
import sys, threading
from pathlib import Path
from agent.sandbox.containment import probe
from agent.budget import Budget
from agent.sandbox.runner import run_training
from agent.sandbox.spec import RunSpec
tmp = Path(sys.argv[1])
spec = RunSpec(workspace=tmp / "ws", scratch=tmp / "scratch" / "7-0", exp_id=7, seed=1,
               log_path=tmp / "runs" / "7" / "run.log", deadline_s=120.0, budget=Budget.parse("600"),
               python=sys.executable)
containment = probe() if sys.argv[2] == "full" else None
slot = threading.Thread(target=run_training, args=(spec, lambda event: None), kwargs={"containment": containment})
slot.start()
slot.join()
"""


@pytest.mark.parametrize("level", ["none", "full"])
def test_a_run_dies_with_the_engine_that_started_it(tmp_path: Path, level: str) -> None:
    """kill -9 of the engine (or of a Ray worker, with its node) takes its runs along at once: a run in its own
    session would otherwise train on, unsupervised, until its deadline."""
    if level == "full" and (found := probe()).level != "full":
        pytest.skip(f"no full containment here: {found.detail}")
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "train.py").write_text("import time\ntime.sleep(120)\n")
    write_harness(workspace)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    with subprocess.Popen([sys.executable, "-c", _ENGINE, str(tmp_path), level], cwd=root, env=env) as engine:
        scratch = tmp_path / "scratch"
        try:
            deadline = time.monotonic() + 60
            while not working_in(scratch) and time.monotonic() < deadline:
                assert engine.poll() is None, "the engine ended before its run started"
                time.sleep(0.1)
            assert working_in(scratch), "the run never started"
            time.sleep(1.0)  # into train.py
        finally:
            engine.kill()
    deadline = time.monotonic() + 10
    while working_in(scratch) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = working_in(scratch)
    for pid in survivors:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
    assert survivors == []


def _warm_judge(
    tmp_path: Path, containment: Containment | None = None, metric: str = FAKE_METRIC
) -> WarmJudge:
    workspace = tmp_path / "ws"
    workspace.mkdir(exist_ok=True)
    write_harness(workspace, metric=metric)
    return WarmJudge(
        workspace, tmp_path / "scratch" / "judge", python=sys.executable, env={}, containment=containment
    )


@pytest.mark.parametrize("level", ["none", "full"])
def test_the_warm_judge_scores_run_after_run_with_one_process(tmp_path: Path, level: str) -> None:
    containment = probe() if level == "full" else None
    if containment is not None and containment.level != "full":
        pytest.skip(f"no full containment here: {containment.detail}")
    judge = _warm_judge(tmp_path, containment)
    try:
        first = _run(tmp_path, OK_SCRIPT, judge=judge)
        second = _run(tmp_path, "from prepare import report\nreport(2.25)\n", judge=judge)
        assert (first.outcome, first.val_bpb, second.outcome, second.val_bpb) == ("ok", 2.345678, "ok", 2.25)
        assert judge.started == 1
        assert "[judge] ok val_bpb 2.25" in second.log_path.read_text()
        assert not list((tmp_path / "scratch" / "judge").glob("7-0"))  # each request folder is removed
    finally:
        judge.close()


HOSTILE_METRIC = FAKE_METRIC.replace(
    "def judge(model_path, claims):\n",
    """def judge(model_path, claims):
    import os, pathlib, time
    seen = pathlib.Path(model_path).parent.parent / "seen"
    for fd in range(3, 256):  # every descriptor it got: an answer forged into the server's reply pipe
        try:
            os.write(fd, b'{"exit": 7}\\n')
        except OSError:
            pass
    if os.fork() == 0:  # a daemon, out of its process group, that would outlive this request
        os.setsid()
        if os.fork() == 0:
            seen.with_name(f"daemon-{os.getpid()}").write_text("")
            time.sleep(300)
        os._exit(0)
    deadline = time.monotonic() + 10
    while not list(seen.parent.glob("daemon-*")) and time.monotonic() < deadline:
        time.sleep(0.01)  # it runs before this request ends
""",
)
"""A judge whose code misbehaves (as unpickled code would): it writes forged answers to every descriptor it
has, and leaves a daemon running. Each request must still get its own answer, and the daemon must not live on."""


@pytest.mark.parametrize("level", ["none", "full"])
def test_one_request_of_the_warm_judge_cannot_reach_the_next(tmp_path: Path, level: str) -> None:
    containment = probe() if level == "full" else None
    if containment is not None and containment.level != "full":
        pytest.skip(f"no full containment here: {containment.detail}")
    judge = _warm_judge(tmp_path, containment, metric=HOSTILE_METRIC)
    try:
        first = _run(tmp_path, OK_SCRIPT, judge=judge, metric=HOSTILE_METRIC)
        second = _run(
            tmp_path, "from prepare import report\nreport(2.25)\n", judge=judge, metric=HOSTILE_METRIC
        )
        assert (first.outcome, first.val_bpb, second.outcome, second.val_bpb) == ("ok", 2.345678, "ok", 2.25)
        daemons = [int(p.name.split("-")[1]) for p in (tmp_path / "scratch" / "judge").glob("daemon-*")]
        assert daemons, "the daemon never started: no proof"
        if containment is None:  # pids of another PID namespace mean nothing here; /proc of the judge's does
            assert not [pid for pid in daemons if alive(pid)], "a daemon of an earlier request lives on"
        assert judge.started == 1  # the same warm server answered both, in order
    finally:
        judge.close()


WAITS_FOR_ANOTHER_METRIC = FAKE_METRIC.replace(
    "def judge(model_path, claims):\n",
    """def judge(model_path, claims):
    import os, pathlib, time
    arrivals = pathlib.Path(os.environ["ARRIVALS"])
    (arrivals / str(os.getpid())).write_text("")
    deadline = time.monotonic() + 5
    while len(list(arrivals.iterdir())) < 2:  # the other run's model, judged at the same time
        if time.monotonic() > deadline:
            raise SystemExit("judged alone: the other model waits behind this one")
        time.sleep(0.02)
""",
)
"""A judge that scores a model only while another is being scored: two runs judged at once both pass."""


@pytest.mark.parametrize("judges", ["pool", "one warm judge"])
def test_runs_judged_at_once_do_not_wait_for_each_other(tmp_path: Path, judges: str) -> None:
    """A machine's runs each lease a warm judge of their own (`JudgePool`): a model slow to score holds its own
    judge, not the verdicts of the other trainers. One warm judge shared by both (as once) makes one wait."""
    workspace, arrivals = tmp_path / "ws", tmp_path / "arrivals"
    workspace.mkdir()
    arrivals.mkdir()
    (workspace / "train.py").write_text(textwrap.dedent(OK_SCRIPT))
    write_harness(workspace, metric=WAITS_FOR_ANOTHER_METRIC)

    def warm(root: Path) -> WarmJudge:
        return WarmJudge(
            workspace, root, python=sys.executable, env={"ARRIVALS": str(arrivals)}, containment=None
        )

    judge = JudgePool(warm, tmp_path / "scratch") if judges == "pool" else warm(tmp_path / "scratch" / "j")
    results: dict[int, RunResult] = {}

    def run(exp_id: int) -> None:
        spec = RunSpec(
            workspace=workspace,
            scratch=tmp_path / "scratch" / f"{exp_id}-0",
            exp_id=exp_id,
            seed=3,
            log_path=tmp_path / "runs" / f"{exp_id}.log",
            deadline_s=30.0,
            python=sys.executable,
            budget=LONG,
        )
        results[exp_id] = run_training(spec, lambda e: None, judge=judge)

    threads = [threading.Thread(target=run, args=(exp_id,)) for exp_id in (1, 2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        judge.close()
    outcomes = sorted(str(r.outcome) for r in results.values())
    if judges == "pool":
        assert outcomes == ["ok", "ok"], [r.reason for r in results.values()]
        assert isinstance(judge, JudgePool) and judge.started == 2
    else:  # the primitive: one judge for both, and the first model judged waits alone
        assert outcomes == ["invalid", "ok"], [r.reason for r in results.values()]
        assert "judged alone" in (tmp_path / "scratch" / "j.log").read_text()


def test_a_failing_score_is_invalid_and_the_warm_judge_goes_on(tmp_path: Path) -> None:
    judge = _warm_judge(tmp_path)
    garbage = """
        import json
        json.dump({"export": "ok"}, open("claims.json", "w"))
        open("model.pt2", "w").write("not json")
        print("---")
        print("val_bpb:          1.000000")
    """
    try:
        bad = _run(tmp_path, garbage, judge=judge)
        assert bad.outcome == "invalid" and "the judge failed (exit 1)" in bad.reason
        good = _run(tmp_path, OK_SCRIPT, judge=judge)
        assert (good.outcome, good.val_bpb, judge.started) == ("ok", 2.345678, 1)
    finally:
        judge.close()


def test_a_dead_warm_judge_is_started_again(tmp_path: Path) -> None:
    judge = _warm_judge(tmp_path)
    try:
        assert _run(tmp_path, OK_SCRIPT, judge=judge).outcome == "ok"
        assert judge.proc is not None
        os.killpg(judge.proc.pid, 9)
        judge.proc.wait()
        again = _run(tmp_path, OK_SCRIPT, judge=judge)
        assert (again.outcome, judge.started) == ("ok", 2)
    finally:
        judge.close()


def test_the_warm_judge_ends_when_the_engine_closes_its_input(tmp_path: Path) -> None:
    judge = _warm_judge(tmp_path)
    judge.folder("1-0")
    proc = judge.proc
    assert proc is not None and proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0
    judge.close()


def test_peak_memory_is_the_runs_own_not_the_engines(tmp_path: Path) -> None:
    ballast = bytearray(600 * 1024 * 1024)  # the engine holds a big model: a fork would inherit its peak
    ballast[::4096] = b"x" * len(ballast[::4096])
    script = """
        import time
        from prepare import report
        block = bytearray(80 * 1024 * 1024)
        block[:: 4096] = b"y" * len(block[:: 4096])
        time.sleep(1.5)
        report(2.5)
    """
    result = _run(tmp_path, script)
    del ballast
    assert result.outcome == "ok" and result.peak_memory_mb is not None
    assert 80 < result.peak_memory_mb < 300, result.peak_memory_mb
    assert result.summary["peak_memory_mb"] == round(result.peak_memory_mb, 1)


def test_what_the_rest_of_the_machine_did_is_measured_never_claimed(tmp_path: Path) -> None:
    claims_quiet = """
        import time
        from prepare import report
        time.sleep(SECONDS)
        report(2.5)
        print("other_load:       0.00")
    """
    # Too short to say: the run's claim is dropped and nothing stands in for it.
    (tmp_path / "short").mkdir()
    (tmp_path / "busy").mkdir()
    short = _run(tmp_path / "short", claims_quiet.replace("SECONDS", "0.5"))
    assert short.outcome == "ok" and "other_load" not in short.summary
    # Six seconds beside a busy process on every core: the runner's measure, not the claim.
    with BusyMachine():
        busy = _run(tmp_path / "busy", claims_quiet.replace("SECONDS", "6"))
    assert busy.outcome == "ok" and busy.summary["other_load"] >= 1.0, busy.summary


def test_a_stop_during_start_up_does_not_kill_the_run(tmp_path: Path) -> None:
    # The budget is spent while the run is still importing: the stop signal must not kill it (its default
    # action) before the harness has installed its handler.
    script = """
        import time
        time.sleep(1.5)
        from prepare import report
        report(2.5)
    """
    result = _run(tmp_path, script, budget=Budget.parse("0.3"), handover_s=10.0)
    assert (result.outcome, result.val_bpb) == ("ok", 2.5), result.reason
    assert result.budget_spent is not None and result.budget_spent >= 0.3


@pytest.mark.parametrize("forged", ["prepare.py", "corpus.py", "metric.py"])
@pytest.mark.parametrize("warm", [False, True], ids=["one-shot", "warm"])
def test_the_judge_imports_only_the_frozen_harness(tmp_path: Path, warm: bool, forged: str) -> None:
    # A run without full containment could rewrite a file of the workspace's harness (the metric with a kinder
    # judge, or the prepare.py it imports): the judge checks every recorded SHA-256 before it imports anything.
    kinder = "\ndef judge(model_path, claims):\n    return {'status': 'ok', 'val_bpb': 0.1}\n"
    script = f"""
        import pathlib
        from prepare import report
        report(2.5)
        forged = pathlib.Path({str(tmp_path / "ws" / forged)!r})
        forged.write_text(forged.read_text() + {kinder!r})
    """
    judge = _warm_judge(tmp_path) if warm else None
    if judge is not None:
        judge.harness_hashes = FAKE_HARNESS_SHA256
    try:
        result = _run(tmp_path, script, judge=judge, harness_hashes=FAKE_HARNESS_SHA256)
    finally:
        if judge is not None:
            judge.close()
    assert result.outcome == "invalid" and "not the frozen harness" in result.reason, result.reason
    assert forged in result.reason and result.val_bpb is None


def test_the_judge_refuses_a_harness_file_whose_hash_was_never_recorded(tmp_path: Path) -> None:
    # A workspace made before metric.py existed did not record it: its metric is never imported.
    recorded = {name: FAKE_HARNESS_SHA256[name] for name in ("prepare.py", "corpus.py")}
    result = _run(tmp_path, OK_SCRIPT, harness_hashes=recorded)
    assert result.outcome == "invalid" and "metric.py" in result.reason and "never frozen" in result.reason
    assert result.val_bpb is None
    assert (tmp_path / "ws" / "metric.py").read_text() == FAKE_METRIC  # there all along: only unrecorded


# ---- the hand-over window ----------------------------------------------------------------------------------

TRAINS_ON_WHEN_TOLD = """
    import signal, time
    told = []
    signal.signal(signal.SIGUSR1, lambda *a: told.append(time.monotonic()))  # the stop, heard and ignored
    steps = 0
    while not told or time.monotonic() - told[0] < 4.0:  # four more seconds of training nobody paid for
        time.sleep(0.05)
        steps += 1
    from prepare import report
    report(2.5, steps=steps)
"""


def test_the_hand_over_window_is_twice_the_baselines_not_a_free_lap(tmp_path: Path) -> None:
    """A run that hears the stop and trains on gains whatever the window allows. The window is twice the
    baseline's measured hand-over (at least 2 s), not the engine's fixed cap."""
    budget = Budget.parse("1")
    for folder in ("cap", "window"):
        (tmp_path / folder).mkdir()
    free = _run(tmp_path / "cap", TRAINS_ON_WHEN_TOLD, budget=budget, handover_s=10.0)
    assert free.outcome == "ok", free.reason  # the primitive: under the old 10 s window it trained 4 s more
    assert free.summary["handover_seconds"] >= 4.0
    window = handover_window(10.0, 0.6)  # an honest baseline's hand-over, measured as the runner does
    assert window == HANDOVER_MIN_S
    started = time.monotonic()
    result = _run(tmp_path / "window", TRAINS_ON_WHEN_TOLD, budget=budget, handover_s=window)
    assert (result.outcome, result.killed_for) == ("invalid", "overrun"), result.reason
    assert "2.0 s after its budget was spent" in result.reason
    assert time.monotonic() - started < 1.0 + window + 3.0
    assert (handover_window(10.0, None), handover_window(10.0, 3.0), handover_window(10.0, 30.0)) == (
        10,
        6,
        10,
    )


def test_training_seconds_and_the_hand_over_are_measured_from_outside(tmp_path: Path) -> None:
    script = """
        import signal, time
        told = []
        signal.signal(signal.SIGUSR1, lambda *a: told.append(1))
        while not told:
            time.sleep(0.02)
        time.sleep(0.3)  # the export
        from prepare import report
        report(2.5)  # claims 0.1 training seconds
    """
    result = _run(tmp_path, script, budget=Budget.parse("1.5"), handover_s=10.0)
    assert result.outcome == "ok", result.reason
    assert result.summary["training_seconds"] == pytest.approx(1.5, abs=0.4)  # not the claimed 0.1
    assert 0.3 <= result.summary["handover_seconds"] < 2.0
