"""Run containment with real namespaces: read-only filesystem, private /tmp, hidden files, own PIDs, no network."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import pytest
from engine_fakes import outside_tmp

from agent.sandbox import containment
from agent.sandbox.containment import SETUP_FAILED, Containment, contain, probe

ROOT = Path(__file__).resolve().parent.parent
FULL = Containment("full", containment.FULL_SUMMARY, "")


def full_or_skip() -> None:
    found = probe()
    if found.level != "full":
        pytest.skip(f"namespaces are not available here ({found.level}): {found.detail}")


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    folder = tmp_path / "scratch"
    folder.mkdir()
    return folder


def run(
    script: str,
    scratch: Path,
    *args: str,
    hidden: Sequence[Path] = (),
    readable: Sequence[Path] = (),
    tmp_mb: int = 8,
    network: bool = False,
    extra: Sequence[str] = (),
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """Run a python -S `script` contained, with `scratch` as its writable cwd."""
    argv = contain(
        [sys.executable, "-S", "-c", script, *args],
        FULL,
        cwd=scratch,
        writable=[scratch],
        readable=readable,
        hidden=hidden,
        tmp_mb=tmp_mb,
        network=network,
    )
    if extra:  # private init options, e.g. --legacy-remount, go before its "--"
        at = argv.index(containment._init_source()) + 1
        argv[at:at] = list(extra)
    return subprocess.run(
        argv, cwd=scratch, input="data on stdin", capture_output=True, text=True, timeout=timeout
    )


def marked(marker: str) -> list[psutil.Process]:
    """Live processes with `marker` in an item of their command line."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if any(marker in item for item in cmdline) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def wait_gone(marker: str, within_s: float = 5.0) -> list[psutil.Process]:
    deadline = time.monotonic() + within_s
    while (left := marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def marker() -> Iterator[str]:
    """A unique argv item for the processes a test starts; any still alive at the end are killed."""
    value = f"autoresearch-test-{uuid.uuid4().hex}"
    yield value
    for proc in marked(value):
        proc.kill()


# -- without namespaces --------------------------------------------------------------------------------------


def test_level_none_returns_argv_unchanged(tmp_path: Path) -> None:
    argv = ["python", "train.py", "--flag"]
    none = Containment("none", containment.NONE_SUMMARY, "test")
    assert contain(argv, none, cwd=tmp_path, writable=[tmp_path], hidden=[tmp_path / "x"]) == argv
    network = Containment("network", containment.NETWORK_SUMMARY, "test")
    assert contain(argv, network, cwd=tmp_path, network=True) == argv


def test_level_network_prefixes_unshare(tmp_path: Path) -> None:
    network = Containment("network", containment.NETWORK_SUMMARY, "test")
    argv = contain(["python", "train.py"], network, cwd=tmp_path)
    assert Path(argv[0]).name == "unshare"
    assert "--net" in argv
    assert argv[-3:] == ["--", "python", "train.py"]


def test_environment_caps_the_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTORESEARCH_CONTAINMENT", "none")
    assert probe() == Containment("none", containment.NONE_SUMMARY, "AUTORESEARCH_CONTAINMENT=none")
    monkeypatch.setenv("AUTORESEARCH_CONTAINMENT", "network")
    capped = probe()
    assert capped.level in ("network", "none")
    assert capped.detail.startswith("AUTORESEARCH_CONTAINMENT=network")
    assert probe() is capped  # probed once
    monkeypatch.setenv("AUTORESEARCH_CONTAINMENT", "sandbox")
    with pytest.raises(ValueError, match="none, network, full"):
        probe()


def test_network_level_has_no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTORESEARCH_CONTAINMENT", "network")
    found = probe()
    if found.level != "network":
        pytest.skip(f"`unshare -n` does not work here: {found.detail}")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        script = "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=2)"
        argv = contain(
            [sys.executable, "-S", "-c", script, str(server.getsockname()[1])], found, cwd=tmp_path
        )
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "OSError" in done.stderr or "Error" in done.stderr


# -- full: mount, PID and network namespaces -----------------------------------------------------------------

FILESYSTEM = r"""
import ctypes, errno, os, sys
engine_pid, repo, home, parent, host_only, private, hidden_file, hidden_dir, in_tmp = sys.argv[1:]
report = []
def check(name, ok):
    report.append(name if ok else f"FAILED {name}")
def refused(action, *args):
    try:
        action(*args)
    except OSError as exc:
        return exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    return False
def write(path):
    with open(path, "w") as f:
        f.write("x")
write("written.txt")
check("cwd is the scratch dir", os.getcwd() == os.path.join(parent, "scratch"))
check("repo read-only", refused(write, os.path.join(repo, "escaped.txt")))
check("cwd's parent read-only", refused(write, os.path.join(parent, "escaped.txt")))
check("home read-only", refused(write, os.path.join(home, "escaped.txt")))
check("host /tmp out of sight", not os.path.exists(host_only))
check("/tmp holds only the way to cwd and the code", sorted(os.listdir("/tmp")) == sorted(filter(None, in_tmp.split(","))))
write(private)
check("hidden file reads empty", open(hidden_file, "rb").read() == b"")
check("hidden file's mask read-only", refused(os.chmod, hidden_file, 0o600))
check("hidden folder empty", os.listdir(hidden_dir) == [])
check("hidden folder read-only", refused(write, os.path.join(hidden_dir, "new.txt")))
write("/dev/null")
check("/dev/null inode read-only", refused(os.chmod, "/dev/null", 0o600))
check("no disks in /dev", not any(n.startswith(("sd", "vd", "nvme", "loop")) for n in os.listdir("/dev")))
check("stdin empty", sys.stdin.read() == "")
status = open("/proc/self/status").read()
check("no capabilities", "CapEff:\t0000000000000000" in status and "CapBnd:\t0000000000000000" in status)
libc = ctypes.CDLL(None, use_errno=True)
check("cannot remount /", libc.mount(None, b"/", None, 32 | 4096, None) != 0)
check("own PIDs", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) == [1, os.getpid()])
try:
    os.kill(int(engine_pid), 0)
    check("engine pid unknown", False)
except ProcessLookupError:
    check("engine pid unknown", True)
print("\n".join(report))
print("error output passes through", file=sys.stderr)
"""


@pytest.mark.parametrize("remount", ["mount_setattr", "legacy"])
def test_filesystem_is_read_only_but_scratch(scratch: Path, tmp_path: Path, remount: str) -> None:
    full_or_skip()
    host_only = tmp_path / "host-only.txt"
    host_only.write_text("host")
    private = Path(f"/tmp/autoresearch-private-{uuid.uuid4().hex}")
    # Hidden paths on the read-only filesystem (under the host /tmp a path is out of sight anyway).
    hidden_file, hidden_dir = ROOT / "README.md", ROOT / "nanogpt"
    # What the private /tmp may show: the way to the scratch folder, and the checkout and interpreter where
    # they live under the host's /tmp (as a CI clone may).
    seen = [tmp_path, ROOT, Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent]
    in_tmp = ",".join(sorted({p.resolve().parts[2] for p in seen if p.resolve().is_relative_to("/tmp")}))
    args = [os.getpid(), ROOT, Path.home(), tmp_path, host_only, private, hidden_file, hidden_dir, in_tmp]
    extra = ["--legacy-remount"] if remount == "legacy" else []
    done = run(
        FILESYSTEM, scratch, *map(str, args), hidden=[hidden_file, hidden_dir], readable=[ROOT], extra=extra
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 17, done.stdout  # every check ran
    assert "FAILED" not in done.stdout, done.stdout
    assert done.stderr == "error output passes through\n"
    assert (scratch / "written.txt").read_text() == "x"
    assert not (tmp_path / "escaped.txt").exists()
    assert not private.exists()
    assert hidden_file.read_text().startswith("# local-autoresearch")
    assert Path("/dev/null").stat().st_mode & 0o777 == 0o666


SEES = """
import json, os, sys
ws, data = sys.argv[1], sys.argv[2]
seen = {
    "workspace": sorted(os.listdir(ws)),
    "beside its folder": sorted(os.listdir("..")),
    "cache": sorted(os.listdir(os.path.dirname(data))),
    "train": open(os.path.join(data, "train.bin")).read(),
    "val": open(os.path.join(data, "val.bin")).read(),
    "corpus": os.listdir(sys.argv[3]) if os.path.exists(sys.argv[3]) else None,
    "home": os.path.exists(os.path.expanduser("~/.cache")),
}
import numpy  # the interpreter's libraries are in sight
open("written.txt", "w").write("x")
try:
    open(os.path.join(data, "train.bin"), "w")
    seen["data writable"] = True
except OSError:
    seen["data writable"] = False
print(json.dumps(seen))
"""


@pytest.mark.parametrize("allowlist", [True, False], ids=["allowlist", "whole host read-only"])
def test_with_an_allowlist_a_run_sees_nothing_of_the_host_but_it(allowlist: bool) -> None:
    """A workspace outside /tmp (where users keep them): with an allowlist (`in_sight`: the system's and the
    interpreter's folders) its run sees its own folder, the prepared data (the validation split hidden) and
    nothing else of it, of the cache, or of the corpus; without one (as before) it saw them all, read-only."""
    full_or_skip()
    with outside_tmp("allowlist") as base:
        ws, cache, corpus = base / "ws", base / "cache", base / "mytexts"
        scratch = ws / ".autoresearch" / "scratch" / "3-0"
        data = cache / "data" / "abc-v256"
        for folder in (scratch, ws / "runs" / "1", data, cache / "data" / "other-v256", corpus, ws / ".git"):
            folder.mkdir(parents=True)
        (scratch.parent / "judge").mkdir()
        (ws / "runs" / "1" / "run.log").write_text("weights, printed")
        (data / "train.bin").write_text("train")
        (data / "val.bin").write_text("validation")
        (corpus / "a.txt").write_text("the text")
        argv = contain(
            [sys.executable, "-c", SEES, str(ws), str(data), str(corpus)],
            FULL,
            cwd=scratch,
            writable=[scratch],
            readable=[data],
            hidden=[data / "val.bin", corpus],
            only=containment.in_sight(sys.executable) if allowlist else None,
        )
        done = subprocess.run(argv, cwd=scratch, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout)
        assert (seen["train"], seen["val"], seen["data writable"]) == ("train", "", False)
        assert seen["corpus"] == (None if allowlist else [])  # not there at all, or hidden
        assert (scratch / "written.txt").read_text() == "x"
        if allowlist:
            assert seen["workspace"] == [".autoresearch"] and seen["beside its folder"] == ["3-0"]
            assert seen["cache"] == ["abc-v256"] and not seen["home"]
        else:  # the primitive: the same run, the whole host read-only, saw the earlier run's log and the rest
            assert seen["workspace"] == [".autoresearch", ".git", "runs"]
            assert seen["beside its folder"] == ["3-0", "judge"] and seen["cache"] == [
                "abc-v256",
                "other-v256",
            ]


def test_a_system_folder_that_holds_the_workspace_is_left_out_of_the_allowlist() -> None:
    """A workspace kept under a system folder (/opt/research, say) would be in sight with all of it."""
    seen = containment.in_sight(sys.executable)
    assert Path("/usr") in seen and Path("/etc") in seen
    apart = containment.in_sight(sys.executable, apart=Path("/usr/share/my-research"))
    assert Path("/usr") not in apart and Path("/etc") in apart


def test_hidden_path_inside_writable_is_masked(scratch: Path) -> None:
    full_or_skip()
    (scratch / "val.bin").write_bytes(b"secret")
    script = "import sys; sys.stdout.write(repr(open('val.bin', 'rb').read()))"
    done = run(script, scratch, hidden=[scratch / "val.bin"])
    assert (done.returncode, done.stdout) == (0, "b''")


def test_a_readable_folder_under_tmp_stays_in_sight_read_only(scratch: Path, tmp_path: Path) -> None:
    full_or_skip()
    cache = tmp_path / "cache"  # under the host's /tmp, which the private /tmp covers
    (cache / "data").mkdir(parents=True)
    (cache / "data" / "train.bin").write_bytes(b"train")
    (cache / "data" / "val.bin").write_bytes(b"secret")
    script = f"""
import sys
data = {str(cache / "data")!r}
out = [open(data + "/train.bin", "rb").read(), open(data + "/val.bin", "rb").read()]
try:
    open(data + "/new", "w")
    out.append("wrote")
except OSError as exc:
    out.append(exc.strerror)
sys.stdout.write(repr(out))
"""
    done = run(script, scratch, readable=[cache], hidden=[cache / "data" / "val.bin"])
    assert (done.returncode, done.stdout) == (0, "[b'train', b'', 'Read-only file system']"), done.stderr


def test_private_tmp_is_size_limited(scratch: Path) -> None:
    full_or_skip()
    script = r"""
import errno
for folder in ("/tmp", "/dev/shm"):
    try:
        with open(folder + "/big", "wb") as f:
            for _ in range(3):
                f.write(b"x" * 1024 * 1024)
                f.flush()
        print(folder, "no limit")
    except OSError as exc:
        print(folder, errno.errorcode[exc.errno])
"""
    done = run(script, scratch, tmp_mb=2)
    assert done.stdout.split() == ["/tmp", "ENOSPC", "/dev/shm", "ENOSPC"], done.stderr


@pytest.mark.parametrize(
    ("script", "status"),
    [("pass", 0), ("raise SystemExit(3)", 3), ("import os; os.kill(os.getpid(), 9)", 137)],
)
def test_exit_status_passes_through(scratch: Path, script: str, status: int) -> None:
    full_or_skip()
    assert run(script, scratch).returncode == status


def test_failed_setup_never_runs_the_command(scratch: Path, tmp_path: Path) -> None:
    full_or_skip()
    argv = contain(
        [sys.executable, "-S", "-c", "print('ran')"], FULL, cwd=scratch, writable=[tmp_path / "missing"]
    )
    done = subprocess.run(argv, cwd=scratch, capture_output=True, text=True, timeout=30)
    assert done.returncode == SETUP_FAILED
    assert done.stdout == ""
    assert "autoresearch containment: opening" in done.stderr
    assert "the run was not started" in done.stderr


def test_missing_command_is_127(scratch: Path) -> None:
    full_or_skip()
    argv = contain(["no-such-program-here"], FULL, cwd=scratch, writable=[scratch])
    done = subprocess.run(argv, cwd=scratch, capture_output=True, text=True, timeout=30)
    assert done.returncode == 127
    assert "cannot run no-such-program-here" in done.stderr


def test_no_network_unless_asked(scratch: Path) -> None:
    full_or_skip()
    script = r"""
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()
    print("connected")
except OSError as exc:
    print("refused", exc.errno)
"""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(2)
        port = str(server.getsockname()[1])
        assert run(script, scratch, port).stdout.startswith("refused")
        assert run(script, scratch, port, network=True).stdout == "connected\n"


DAEMON = r"""
import os, sys, time
python, marker = sys.argv[1:]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        null = os.open(os.devnull, os.O_RDWR)  # a daemon lets go of the run's output pipe
        for fd in (1, 2):
            os.dup2(null, fd)
        sleep = "open('daemon.ready', 'w').close(); import time; time.sleep(60)"
        os.execv(python, [python, "-S", "-c", sleep, marker + "-daemon"])
    os._exit(0)
while not os.path.exists("daemon.ready"):
    time.sleep(0.01)
print("daemon running")
"""


def test_daemon_dies_with_the_run(scratch: Path, marker: str) -> None:
    full_or_skip()
    done = run(DAEMON, scratch, sys.executable, marker)
    assert (done.returncode, done.stdout) == (0, "daemon running\n"), done.stderr
    assert marked(marker) == []


def test_daemon_outlives_an_uncontained_run(scratch: Path, marker: str) -> None:
    """The control for the test above: without the PID namespace the daemon survives."""
    done = subprocess.run(
        [sys.executable, "-S", "-c", DAEMON, sys.executable, marker],
        cwd=scratch,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        timeout=30,
    )
    assert done.stdout == b"daemon running\n"
    assert len(marked(marker + "-daemon")) == 1  # the fixture kills it


@contextlib.contextmanager
def running_daemon(scratch: Path, marker: str) -> Iterator[subprocess.Popen[bytes]]:
    """A contained run in its own process group whose main process started a daemon and sleeps."""
    script = DAEMON.replace('print("daemon running")', 'print("daemon running", flush=True); time.sleep(60)')
    argv = contain(
        [sys.executable, "-S", "-c", script, sys.executable, marker], FULL, cwd=scratch, writable=[scratch]
    )
    with subprocess.Popen(argv, cwd=scratch, stdout=subprocess.PIPE, start_new_session=True) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"daemon running\n"
            assert len(marked(marker + "-daemon")) == 1
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("target", ["process group", "outer process"])
def test_sigkill_of_the_outer_process_kills_the_run(scratch: Path, marker: str, target: str) -> None:
    full_or_skip()
    with running_daemon(scratch, marker) as proc:
        if target == "process group":
            os.killpg(proc.pid, signal.SIGKILL)  # the daemon left the group: only the namespace takes it
        else:
            proc.kill()  # `unshare --kill-child` takes PID 1, and PID 1 the namespace
        proc.wait(timeout=10)
        assert wait_gone(marker) == []


def test_sigterm_of_the_group_reaches_every_process(scratch: Path, marker: str) -> None:
    full_or_skip()
    with running_daemon(scratch, marker) as proc:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        assert marked(marker) == []


UNPRIVILEGED = r"""
import subprocess, sys
from pathlib import Path
from agent.sandbox.containment import contain, probe
found = probe()
print(found.level, found.detail)
if found.level == "full":
    scratch = Path(sys.argv[1])
    inner = (
        "import os\n"
        "try:\n    open(os.path.join(sys.argv[1], 'README.md'), 'a')\n    repo = 'writable'\n"
        "except OSError:\n    repo = 'read-only'\n"
        "open('inside.txt', 'w').write(f'uid {os.getuid()}, repo {repo}')\n"
    )
    argv = contain([sys.executable, "-S", "-c", "import sys\n" + inner, sys.argv[2]], found, cwd=scratch, writable=[scratch])
    print(argv[1])
    print(subprocess.run(argv, cwd=scratch).returncode)
"""


def test_unprivileged_user_namespaces() -> None:
    """The path for users who are not root: `unshare --map-root-user`, where the kernel allows it."""
    full_or_skip()
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to start a process as another user")
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    candidates = dict.fromkeys([sys.executable, shutil.which("python3") or "", "/usr/bin/python3"])
    in_userns = [*as_nobody, "unshare", "--map-root-user"]
    runnable = [
        p for p in candidates if p and subprocess.run([*in_userns, p, "-S", "-c", ""]).returncode == 0
    ]
    if not runnable:
        pytest.skip(f"user nobody may not run any of {list(candidates)} in a user namespace")
    with tempfile.TemporaryDirectory(prefix="autoresearch-userns-") as folder:
        os.chmod(folder, 0o777)
        done = subprocess.run(
            [*as_nobody, runnable[0], "-c", UNPRIVILEGED, folder, str(ROOT)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        level, _, detail = done.stdout.partition(" ")
        if level != "full":
            pytest.skip(f"unprivileged user namespaces do not work here: {detail.strip()}")
        assert done.stdout.splitlines()[1:] == ["--map-root-user", "0"], done.stderr
        inside = Path(folder, "inside.txt")
        assert inside.read_text() == "uid 0, repo read-only"
        assert inside.stat().st_uid == 65534
