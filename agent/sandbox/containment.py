"""Run containment: wraps a command so that it runs in Linux namespaces, as far as this machine allows.

Three levels, probed once by starting a contained `true`:

- `full`: new mount, PID and network namespaces (util-linux `unshare`; with `--map-root-user` when not root).
  A small Python init (`_init_program`, PID 1 inside) makes every mount read-only except the `writable` paths,
  puts a private size-limited tmpfs on /tmp and /dev/shm, a minimal /dev (null, zero, full, random, urandom,
  tty and the GPU nodes), masks the `hidden` paths, mounts a /proc that shows only the run's processes, then
  forks the command with no capabilities (empty bounding set, no_new_privs) and exits with its status, which
  kills everything left in the PID namespace.
- `network`: only an empty network namespace (`unshare -n`).
- `none`: the command runs as it is.

AUTORESEARCH_CONTAINMENT=none|network|full caps the level.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LEVELS = ("none", "network", "full")
"""Containment levels, weakest first."""
SETUP_FAILED = 125
"""Exit status of a contained run whose namespace setup failed; the command was not started."""
ENV_VAR = "AUTORESEARCH_CONTAINMENT"
_PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Containment:
    """Which containment a run gets on this machine."""

    level: str
    """"full" (mount+pid+net namespaces), "network" (only `unshare -n` works), or "none"."""
    summary: str
    """One line for humans: what a run is kept from."""
    detail: str
    """Why not full, if not; else ""."""

    @property
    def full(self) -> bool:
        """Runs get the namespaces (and so the init that reports signals as 128 + N and forwards SIGUSR1)."""
        return self.level == "full"

    def capped(self, cap: str | None) -> Containment:
        """This containment, or `cap` ("none", "network", "full") where that is weaker."""
        if cap is None or LEVELS.index(cap) >= LEVELS.index(self.level):
            return self
        return Containment(cap, _SUMMARIES[cap], f"capped at {cap}")


FULL_SUMMARY = "namespaces: read-only filesystem, private /tmp, own PIDs, no network"
NETWORK_SUMMARY = "network namespace only: no network; filesystem and processes shared with the host"
NONE_SUMMARY = "no containment: network, filesystem and processes shared with the host"
_SUMMARIES = {"full": FULL_SUMMARY, "network": NETWORK_SUMMARY, "none": NONE_SUMMARY}


def probe() -> Containment:
    """What this machine allows; probed once (cached) by actually starting a contained `true`.

    AUTORESEARCH_CONTAINMENT=none|network|full caps the level; another value raises ValueError.
    """
    cap = os.environ.get(ENV_VAR, "").strip().lower() or "full"
    if cap not in LEVELS:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(LEVELS)}, not {cap!r}")
    return _probe(cap)


@functools.cache
def _probe(cap: str) -> Containment:
    if cap == "none":
        return Containment("none", NONE_SUMMARY, f"{ENV_VAR}=none")
    if not sys.platform.startswith("linux"):
        return Containment("none", NONE_SUMMARY, f"Linux namespaces are not available on {sys.platform}")
    if shutil.which("unshare") is None:
        return Containment("none", NONE_SUMMARY, "unshare (util-linux) is not installed")
    why_not_full = f"{ENV_VAR}=network"
    if cap == "full":
        full = Containment("full", FULL_SUMMARY, "")
        error = _try(full)
        if not error:
            return full
        why_not_full = _why_not(error)
    network = Containment("network", NETWORK_SUMMARY, why_not_full)
    error = _try(network)
    if not error:
        return network
    return Containment("none", NONE_SUMMARY, f"{why_not_full}; `unshare -n` failed too: {error}")


def _try(containment: Containment) -> str:
    """Start a contained `true` (with a writable and a hidden path); "" if it worked, else what went wrong."""
    with tempfile.TemporaryDirectory(prefix="autoresearch-probe-") as folder:
        scratch = Path(folder) / "scratch"
        scratch.mkdir()
        secret = Path(folder) / "secret"
        secret.write_text("x")
        argv = contain(["true"], containment, cwd=scratch, writable=[scratch], hidden=[secret], tmp_mb=1)
        try:
            done = subprocess.run(
                argv, cwd=scratch, stdin=subprocess.DEVNULL, capture_output=True, timeout=_PROBE_TIMEOUT_S
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return str(exc)
    if done.returncode == 0:
        return ""
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def _why_not(error: str) -> str:
    """Why namespaces failed, with the kernel setting to blame where one is known."""
    if os.geteuid() != 0:
        for setting, blocked, text in (
            ("kernel/apparmor_restrict_unprivileged_userns", "1", "restricted by AppArmor"),
            ("kernel/unprivileged_userns_clone", "0", "disabled"),
            ("user/max_user_namespaces", "0", "disabled"),
        ):
            try:
                value = Path("/proc/sys", setting).read_text().strip()
            except OSError:
                continue
            if value == blocked:
                name = setting.replace("/", ".")
                return f"unprivileged user namespaces are {text} ({name}={value}): {error}"
    return f"namespaces failed: {error}"


def _interpreter_under_tmp() -> list[Path]:
    """This interpreter's environment where it lives under /tmp (a checkout there, as CI may make): the private
    /tmp would hide it, so it is kept in sight, read-only."""
    folders = {
        Path(sys.prefix).resolve(),
        Path(sys.base_prefix).resolve(),
        Path(sys.executable).resolve().parent,
    }
    return sorted(folder for folder in folders if folder.is_relative_to("/tmp") and folder.is_dir())


SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/sys")
"""The host's system folders a contained run sees with an allowlist (`in_sight`): programs, libraries (CUDA's
among them), their configuration, and /sys for the CPU's and GPUs' description."""


_ASK_PYTHON = (
    "import json, sys\n"
    "print(json.dumps({'prefixes': [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix],"
    " 'executable': sys.executable, 'path': sys.path}))"
)


@functools.cache
def interpreter_folders(python: str) -> tuple[Path, ...]:
    """Where `python` finds itself and what it imports, asked of it once: its prefixes (a venv, the base
    interpreter, even under a home folder), its executable's folder and the folders of its import path that are
    site-packages or inside a prefix. Others (an editable install's checkout, the working directory) are not."""
    environment = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
    done = subprocess.run(
        [python, "-c", _ASK_PYTHON],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        cwd="/",
        check=True,
    )
    told = json.loads(done.stdout)
    prefixes = [Path(p) for p in told["prefixes"]]
    executable = Path(told["executable"])
    folders = {*prefixes, executable.parent, executable.resolve().parent}
    for entry in told["path"]:
        folder = Path(entry) if entry and os.path.isabs(entry) else None
        if folder is None or not folder.is_dir():
            continue
        if folder.name in ("site-packages", "dist-packages") or any(
            folder.is_relative_to(p) for p in prefixes
        ):
            folders.add(folder)
    folders |= {folder.resolve() for folder in folders}  # a symlinked venv is a link in the run's tree too
    return tuple(sorted(folder for folder in folders if folder.is_dir()))


def in_sight(python: str, apart: Path | None = None) -> tuple[Path, ...]:
    """The allowlist of a training run: the system folders and `python`'s own (`interpreter_folders`), but for
    a folder that holds `apart` (the workspace: one kept under /opt would be in sight with all of /opt)."""
    found = tuple(Path(p) for p in SYSTEM if os.path.lexists(p)) + interpreter_folders(python)
    if apart is None:
        return found
    apart = apart.resolve()
    return tuple(p for p in found if not apart.is_relative_to(p.resolve()))


def contain(
    argv: Sequence[str],
    containment: Containment,
    *,
    cwd: Path,
    writable: Sequence[Path] = (),
    readable: Sequence[Path] = (),
    hidden: Sequence[Path] = (),
    only: Sequence[Path] | None = None,
    tmp_mb: int = 512,
    network: bool = False,
    stdin: bool = False,
) -> list[str]:
    """The argv that runs `argv` contained as `containment` allows (at level "none": argv unchanged).

    At "full": `cwd` is the working directory inside; `writable` paths stay read-write and everything else is
    read-only; `readable` paths stay in sight read-only even under the private /tmp (a data cache there);
    `hidden` files read as empty (a bind of /dev/null) and `hidden` folders as empty read-only
    folders (a path missing at start is skipped); /tmp and /dev/shm are private tmpfs of `tmp_mb` MiB each;
    with `only` (an allowlist, as `in_sight` makes it) the command sees nothing of the host but those paths
    (read-only; a symlink among them stays a symlink) and the paths above: a tree of its own, where the
    host's other folders do not exist; without, it sees the host's whole tree, read-only.
    stdin is /dev/null (`stdin=True` passes the caller's through: the warm judge reads its requests there); stdout
    and stderr pass through. The exit status is argv's exit code, 128+N if it died
    of signal N, and SETUP_FAILED (125, with a line on stderr) if the namespace could not be set up, in which
    case argv never ran. Every process of the run dies when argv's main process exits or when the outer
    process is killed. SIGTERM, SIGINT and SIGHUP sent to the outer process group reach every process inside;
    SIGUSR1 sent to the init (the runner's "budget spent") reaches the command's main process.
    At "network" (and at "full" with `network=True`, which keeps the host network) the caller's cwd and
    filesystem apply: start the result with `cwd=` set; `writable`, `hidden` and `tmp_mb` only apply at "full".
    """
    argv = list(argv)
    if containment.level == "none" or (containment.level == "network" and network):
        return argv
    if containment.level not in LEVELS:
        raise ValueError(f"unknown containment level {containment.level!r}")
    unshare = shutil.which("unshare")
    if unshare is None:
        raise RuntimeError("unshare (util-linux) is not installed; probe() again")
    prefix = [unshare] if os.geteuid() == 0 else [unshare, "--map-root-user"]
    if containment.level == "network":
        return [*prefix, "--net", "--", *argv]
    if tmp_mb < 1:
        raise ValueError(f"tmp_mb must be at least 1, not {tmp_mb}")
    namespaces = ["--mount", "--pid"] if network else ["--mount", "--pid", "--net"]
    options = ["--cwd", str(cwd.resolve()), "--tmp-mb", str(tmp_mb), *(["--keep-stdin"] if stdin else [])]
    for path in writable:
        options += ["--writable", str(path.resolve())]
    for path in [*readable, *_interpreter_under_tmp()]:
        options += ["--readable", str(path.resolve())]
    for path in hidden:
        options += ["--hidden", str(path.resolve())]
    for path in only or ():
        options += ["--only", os.path.abspath(path)]  # not resolved: /lib -> usr/lib is made again as a link
    return [
        *prefix,
        *namespaces,
        "--fork",
        "--kill-child",
        "--",
        sys.executable,
        "-I",
        "-S",
        "-c",
        _init_source(),
        *options,
        "--",
        *argv,
    ]


@functools.cache
def _init_source() -> str:
    """`_init_program` as a program for `python -I -S -c`."""
    return f"from __future__ import annotations\n{inspect.getsource(_init_program)}\n_init_program()\n"


def _init_program() -> None:
    """PID 1 of a contained run: set up the mounts, fork+exec the command without capabilities, exit with its status.

    Runs inside the new namespaces as `python -I -S -c` (stdlib only, few imports: it adds to every run's
    start). Arguments: --cwd P --tmp-mb N [--writable P]... [--readable P]... [--hidden P]... [--only P]...
    [--keep-stdin]
    Fails closed: any failed step prints one line on stderr and exits 125 before the command starts.
    """
    import _signal as signal  # the signal module without its enums: 6 ms less per run
    import ctypes
    import os
    import stat
    import sys

    ms_rdonly, ms_nosuid, ms_nodev, ms_noexec = 1, 2, 4, 8
    ms_remount, ms_bind, ms_rec, ms_private = 32, 4096, 16384, 1 << 18
    libc = ctypes.CDLL(None, use_errno=True)

    def fail(what: str) -> None:
        os.write(2, f"autoresearch containment: {what}; the run was not started\n".encode())
        os._exit(125)

    def errno_text() -> str:
        return os.strerror(ctypes.get_errno())

    def mount(
        source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
    ) -> None:
        result = libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        )
        if result != 0:
            fail(f"mount {fstype or source or ''} on {target} failed: {errno_text()}")

    class MountAttr(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]

    legacy = "--legacy-remount" in sys.argv

    def set_readonly(target: str, readonly: bool, recursive: bool) -> None:
        """Make the mount at `target` (and the mounts under it, if `recursive`) read-only or read-write."""
        nonlocal legacy
        if not legacy:
            attr = MountAttr(1, 0, 0, 0) if readonly else MountAttr(0, 1, 0, 0)  # MOUNT_ATTR_RDONLY
            at_fdcwd, at_recursive, sys_mount_setattr = -100, 0x8000, 442
            flags = at_recursive if recursive else 0
            result = libc.syscall(
                ctypes.c_long(sys_mount_setattr),
                ctypes.c_int(at_fdcwd),
                ctypes.c_char_p(target.encode()),
                ctypes.c_uint(flags),
                ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            )
            if result == 0:
                return
            if ctypes.get_errno() != 38:  # ENOSYS: a kernel older than 5.12 remounts one mount at a time
                fail(f"making {target} {'read-only' if readonly else 'writable'} failed: {errno_text()}")
            legacy = True
        targets = [target]
        if recursive:
            with open("/proc/self/mountinfo", "rb") as mountinfo:
                points = [line.split()[4].decode() for line in mountinfo]
            # mountinfo escapes space, tab, newline and backslash as octal
            for escape, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                points = [point.replace(escape, char) for point in points]
            under = target.rstrip("/") + "/"
            targets = [
                p for p in dict.fromkeys(points) if p == target or p.startswith(under) or target == "/"
            ]
        for point in targets:
            try:
                kept = os.statvfs(point).f_flag & (ms_nosuid | ms_nodev | ms_noexec)  # ST_* equal MS_* here
            except OSError:
                continue  # a mount point hidden under another mount
            mount(None, point, None, ms_remount | ms_bind | kept | (ms_rdonly if readonly else 0))

    args = sys.argv[1:]
    split = args.index("--")
    options, argv = args[:split], args[split + 1 :]
    cwd, tmp_mb, keep_stdin = "/", 512, False
    writable: list[str] = []
    readable: list[str] = []
    hidden: list[str] = []
    only: list[str] = []
    values = iter(options)
    for name in values:
        if name == "--cwd":
            cwd = next(values)
        elif name == "--tmp-mb":
            tmp_mb = int(next(values))
        elif name == "--writable":
            writable.append(next(values))
        elif name == "--readable":
            readable.append(next(values))
        elif name == "--keep-stdin":
            keep_stdin = True
        elif name == "--hidden":
            hidden.append(next(values))
        elif name == "--only":
            only.append(next(values))

    mount(None, "/", None, ms_rec | ms_private)  # nothing mounted here reaches the host
    # Open what will be bind-mounted while it is still in sight (the /tmp and /dev mounts below cover it).
    fds: dict[str, int] = {}
    links: dict[str, str] = {}  # allowed paths that are symlinks (/lib -> usr/lib): made again as links
    devices = ["null", "zero", "full", "random", "urandom", "tty"]
    devices += sorted(name for name in os.listdir("/dev") if name.startswith("nvidia") or name == "dri")
    for path in [*writable, *readable, *only, *(f"/dev/{name}" for name in devices)]:
        try:
            if path in only and os.path.islink(path):
                links[path] = os.readlink(path)
                continue
            fds[path] = os.open(path, os.O_PATH)
        except OSError as exc:
            if path in writable or path in readable or path == "/dev/null":
                fail(f"opening {path} failed: {exc.strerror}")

    # With --only the run's tree is built on an empty tmpfs (staged over the host's /tmp) and made the root at
    # the end: the host's other paths are not there at all. Without, it is the host's tree, read-only.
    root = "/tmp" if only else ""

    def at(path: str) -> str:
        return root + path

    private_tmp = at("/tmp/")
    skeletons: set[str] = set()  # folders created in the private /tmp to hold a writable path's mount point

    def bind(path: str, target: str, recursive: bool = False) -> None:
        """Bind-mount the opened `path` on `target`, creating `target` (a folder or an empty file) if missing."""
        if not os.path.lexists(target):
            if target.startswith(private_tmp):
                skeletons.add(private_tmp + target[len(private_tmp) :].split("/")[0])
            is_dir = stat.S_ISDIR(os.fstat(fds[path]).st_mode)
            try:
                os.makedirs(target if is_dir else os.path.dirname(target), exist_ok=True)
                if not is_dir:
                    os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError as exc:
                fail(f"creating the mount point {target} failed: {exc.strerror}")
        mount(f"/proc/self/fd/{fds[path]}", target, None, ms_bind | (ms_rec if recursive else 0))

    if only:
        mount("tmpfs", root, "tmpfs", ms_nosuid | ms_nodev, "mode=755,size=1m")
        for folder in ("/dev", "/proc", "/tmp"):
            os.mkdir(at(folder))
    else:
        set_readonly("/", readonly=True, recursive=True)
    mount("tmpfs", at("/dev"), "tmpfs", ms_nosuid | ms_noexec, "mode=755,size=1m")
    for name in devices:
        if f"/dev/{name}" in fds:
            bind(f"/dev/{name}", at(f"/dev/{name}"), recursive=True)
    for name, link in (("fd", "/proc/self/fd"), ("stdin", "0"), ("stdout", "1"), ("stderr", "2")):
        os.symlink(link if name == "fd" else f"/proc/self/fd/{link}", at(f"/dev/{name}"))
    os.mkdir(at("/dev/shm"))
    tmpfs = f"mode=1777,size={tmp_mb}m"
    mount("tmpfs", at("/dev/shm"), "tmpfs", ms_nosuid | ms_nodev, tmpfs)
    set_readonly(at("/dev"), readonly=True, recursive=False)
    mount("tmpfs", at("/tmp"), "tmpfs", ms_nosuid | ms_nodev, tmpfs)
    for path in sorted(only, key=len):  # a folder before the folders inside it
        if path in links:
            if not os.path.lexists(at(path)):
                os.makedirs(os.path.dirname(at(path)), exist_ok=True)
                os.symlink(links[path], at(path))
        elif path in fds:
            bind(path, at(path), recursive=True)
            set_readonly(at(path), readonly=True, recursive=True)
    for path in writable:
        bind(path, at(path), recursive=True)
        set_readonly(at(path), readonly=False, recursive=False)
    for path in readable:
        bind(path, at(path), recursive=True)
        set_readonly(at(path), readonly=True, recursive=True)
    for path in skeletons.difference(at(p) for p in writable):  # the way to a writable path is read-only
        mount(path, path, None, ms_bind | ms_rec)
        set_readonly(path, readonly=True, recursive=False)
    for path in hidden:
        if os.path.isdir(at(path)):
            mount(
                "tmpfs", at(path), "tmpfs", ms_rdonly | ms_nosuid | ms_nodev | ms_noexec, "mode=555,size=4k"
            )
        elif os.path.lexists(at(path)):
            bind("/dev/null", at(path))
            set_readonly(at(path), readonly=True, recursive=False)
    # A /proc of this PID namespace: the engine and the host's processes are out of sight.
    mount("proc", at("/proc"), "proc", ms_rdonly | ms_nosuid | ms_nodev | ms_noexec)
    if only:  # the staged tree becomes the root: what is not in it is nowhere (switch_root's move and chroot)
        set_readonly(root, readonly=True, recursive=False)
        ms_move = 8192
        os.chdir(root)
        mount(root, "/", None, ms_move)
        os.chroot(".")
        os.chdir("/")
    for fd in fds.values():
        os.close(fd)

    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def forward(signum: int, frame: object) -> None:
        try:  # noqa: SIM105 (contextlib would add an import to every run's start)
            os.kill(-1, signum)  # every process in the namespace but this one
        except ProcessLookupError:
            pass

    for signum in forwarded:
        signal.signal(signum, forward)
    child = os.fork()
    if child == 0:
        try:
            if not keep_stdin:
                null = os.open("/dev/null", os.O_RDONLY)
                os.dup2(null, 0)
                os.close(null)
            os.chdir(cwd)
        except OSError as exc:
            fail(f"entering {cwd} failed: {exc.strerror}")
        pr_capbset_drop, pr_set_no_new_privs, pr_cap_ambient, pr_cap_ambient_clear_all = 24, 38, 47, 4
        if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
            fail(f"setting no_new_privs failed: {errno_text()}")
        if libc.prctl(pr_cap_ambient, pr_cap_ambient_clear_all, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
            fail(f"clearing ambient capabilities failed: {errno_text()}")
        for capability in range(64):
            if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
                if ctypes.get_errno() == 22:  # EINVAL: past the last capability this kernel knows
                    break
                fail(f"dropping capability {capability} failed: {errno_text()}")
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (two words each): all empty
        if libc.capset(header, data) != 0:
            fail(f"dropping capabilities failed: {errno_text()}")
        for signum in (*forwarded, signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores SIGPIPE and SIGXFSZ
            signal.signal(signum, signal.SIG_DFL)
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            os.write(2, f"autoresearch containment: cannot run {argv[0]}: {exc.strerror}\n".encode())
            os._exit(127 if isinstance(exc, FileNotFoundError) else 126)

    def stop_training(signum: int, frame: object) -> None:
        try:  # noqa: SIM105
            os.kill(child, signum)  # the runner's "budget spent": for the run's main process only
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGUSR1, stop_training)
    while True:
        pid, status = os.waitpid(-1, 0)  # reaps orphans too
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)  # exit of PID 1 kills the rest of the namespace
