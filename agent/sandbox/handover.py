"""Reading what a run leaves for the engine, safely: small regular files only, never through a link, FIFO or
device, checked on the open descriptor (no race between check and read); and the frozen harness, by its hashes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.sandbox.spec import HARNESS_FILES, MAX_SOURCE_BYTES


class UnsafeFile(Exception):
    """A file a run left for the engine that is not a small regular file; the message says what it is."""


def read_regular(path: Path, limit: int, dir_fd: int | None = None) -> bytes:
    """The bytes of `path` if it is a regular file of at most `limit` bytes; else UnsafeFile.

    Opened without following a symbolic link and without blocking (a FIFO cannot hang the engine), checked
    with fstat on the open descriptor (no race between the check and the read).
    """
    fd = _open_regular(path, limit, dir_fd)
    try:
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise UnsafeFile(f"{path.name} grew past the {limit:,}-byte limit while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _open_regular(path: Path, limit: int, dir_fd: int | None) -> int:
    """A read descriptor of `path` if it is a regular file of at most `limit` bytes (UnsafeFile otherwise)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(f"{path.name} is a symbolic link") from None
        raise UnsafeFile(f"{path.name} cannot be opened: {exc.strerror}") from None
    info = os.fstat(fd)
    problem = ""
    if not stat.S_ISREG(info.st_mode):
        problem = f"{path.name} is not a regular file ({_file_kind(info.st_mode)})"
    elif info.st_size > limit:
        problem = f"{path.name} is {info.st_size:,} bytes, over the {limit:,}-byte limit"
    if problem:
        os.close(fd)
        raise UnsafeFile(problem)
    return fd


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_json_object(path: Path, limit: int, dir_fd: int | None = None) -> dict[str, Any]:
    """A small JSON object from a file a run could have tampered with; UnsafeFile/ValueError say why not."""
    data = json.loads(read_regular(path, limit, dir_fd).decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


class HarnessChanged(Exception):
    """A file of the workspace's frozen harness no longer has the SHA-256 recorded at init, or has none."""


def frozen_harness(workspace: Path, expected: Mapping[str, str] | None) -> dict[str, bytes]:
    """Every file of the workspace's frozen harness (HARNESS_FILES), by name, each refused (HarnessChanged) unless
    it has the SHA-256 recorded for it at init (`expected`; None: unchecked): the judge must never import a
    harness a run (one without full containment) could have rewritten, nor a file the workspace never froze."""
    files = {}
    for name in HARNESS_FILES:
        if expected is not None and name not in expected:
            raise HarnessChanged(f"{name} in {workspace} has no SHA-256 recorded: it was never frozen")
        try:
            data = read_regular(workspace / name, MAX_SOURCE_BYTES)
        except (OSError, UnsafeFile) as exc:
            raise HarnessChanged(f"{name} in {workspace} cannot be read: {exc}") from None
        if expected is not None and hashlib.sha256(data).hexdigest() != expected[name]:
            raise HarnessChanged(f"{name} in {workspace} is not the frozen harness any more")
        files[name] = data
    return files


def write_harness(files: Mapping[str, bytes], folder: Path) -> None:
    """Put the frozen harness's files (from `frozen_harness`) into `folder`, where a judge imports them."""
    for name, data in files.items():
        (folder / name).write_bytes(data)


def copy_regular(name: Path, target: Path, limit: int, dir_fd: int) -> None:
    """Copy a regular file of at most `limit` bytes out of the run's folder (UnsafeFile otherwise)."""
    fd = _open_regular(name, limit, dir_fd)
    try:
        copied = 0
        with target.open("wb") as fh:
            while chunk := os.read(fd, 1 << 20):
                copied += len(chunk)
                if copied > limit:
                    raise UnsafeFile(f"{name} grew past the {limit:,}-byte limit while being copied")
                fh.write(chunk)
    finally:
        os.close(fd)
