"""Guards for the private parts of Ray that agent/trainers/ray_internals.py uses: an upgrade that moves them
fails here, by name, instead of as a Ray instance that listens beyond loopback."""

from __future__ import annotations

import importlib
import inspect

import pytest

ray = pytest.importorskip("ray")  # installed by scripts/setup.sh: skipped only where Ray truly is absent


def test_the_bootstrap_address_is_still_read_by_services() -> None:
    from ray._private import services

    assert list(inspect.signature(services.canonicalize_bootstrap_address).parameters)[0] == "addr"


def test_the_cluster_switch_is_still_where_loopback_only_sets_it() -> None:
    from ray._private import ray_constants

    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)


def test_the_token_notice_logger_still_exists() -> None:
    importlib.import_module("ray._private.authentication.authentication_token_setup")
