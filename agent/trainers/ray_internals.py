"""Every part of Ray this project touches that is not Ray's public API, in one place (as `tui/internals.py` does
for Textual), with why, and what to check on an upgrade (pinned: ray==2.60.0 in pyproject.toml; the guard
tests are in tests/test_ray_internals.py; tests/test_ray_trainers.py checks every socket is loopback).

- `ray._private.services.canonicalize_bootstrap_address`: Ray's own reading of "auto" and of an ADDRESS
  (`cluster_address`). Check it still returns "host:port" or None.
- `ray._private.ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR` and `ENABLE_RAY_CLUSTER` (`loopback_only`): keep a
  loopback address where Ray would swap in a routable one. Check both names still exist and are read at start.
- the logger `ray._private.authentication.authentication_token_setup` (`quiet_token_notice`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
from collections.abc import Iterator

LOOPBACK = "127.0.0.1"


def is_loopback(address: str) -> bool:
    """Whether `address` (host or host:port) is this machine's loopback."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cluster_address(address: str) -> str:
    """host:port of the cluster `address` names ("auto": the one Ray finds on this machine), a loopback host
    kept as it is (Ray alone would swap it for this machine's routable address)."""
    from ray._private import services  # Ray's own reading of "auto"; see loopback_only

    with loopback_only():
        found = services.canonicalize_bootstrap_address(address)
    if found is None:
        raise RuntimeError(f"no Ray cluster found at {address!r} (start one with `ray start --head`)")
    return str(found)


TOKEN = secrets.token_hex(32)
"""The token a local instance requires of every client (Ray turns token authentication on for a new local
instance): one random token per process, in the environment its processes inherit (Ray alone would generate
one and save it in ~/.ray/auth_token)."""


@contextlib.contextmanager
def quiet_token_notice() -> Iterator[None]:
    """Ray logs a warning that token authentication is on: it is, by design, and the cockpit's screen is not
    the place to say so."""
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        yield
    finally:
        notice.setLevel(level)


_DEAD_PROXY = f"http://{LOOPBACK}:9"
"""A closed loopback port (discard): where Ray's own HTTP requests go instead of the network."""


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """While Ray starts (or joins a cluster at a loopback address): Ray on 127.0.0.1 only, in this process and in
    the processes it starts (they inherit the environment set here; this process's is restored afterwards).

    Two Ray behaviours need it (2.60; tests/test_ray_trainers.py checks every socket is loopback):
    - `_node_ip_address="127.0.0.1"` (or an address 127.0.0.1:PORT) alone is not enough on Linux: Ray replaces a
      loopback address with the machine's routable one ("remotely reachable"), then listens and connects there.
      It keeps the loopback address only where multi-node clusters are off (its Windows/macOS default), which
      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 says: read when `ray` is imported (in this process the constant is set
      for the time being) and by the processes Ray starts.
    - The head's dashboard process (started even with the dashboard off, for its usage-stats module) asks cloud
      metadata servers (169.254.169.254, metadata.google.internal: a DNS query) which cloud it runs on, usage
      stats off or not. Its HTTP proxy is pointed at a closed loopback port, loopback itself exempt: the requests
      fail on this machine. Training runs never see the proxy (the runner drops *PROXY* variables).
    """
    from ray._private import ray_constants  # the Ray internal this module touches, here only

    overrides = {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        overrides[name] = _DEAD_PROXY
    for name in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
        overrides[name] = f"{LOOPBACK},localhost,::1"
    saved_env = {name: os.environ.get(name) for name in overrides}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(overrides)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
