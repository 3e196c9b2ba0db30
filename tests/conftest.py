"""Shared pytest fixtures: isolated Nix stores and daemons on them."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from lib.nixenv import NixEnv, new_root, start_nix_daemon, start_nixwarden  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
needs_nix = pytest.mark.skipif(shutil.which("nix-store") is None,
                               reason="needs the real Nix (tests/run installs nix-bin)")


TEST_USER = "nwtest"


@pytest.fixture(scope="session")
def test_user():
    """An unprivileged account for client-side tests (created if missing; root only)."""
    from lib.accounts import ensure_user
    if os.geteuid() != 0:
        pytest.skip("needs root to create a test user")
    return ensure_user(TEST_USER)


@pytest.fixture
def nixenv():
    root = new_root()
    yield NixEnv(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def nixwarden(nixenv):
    daemon = start_nixwarden(nixenv)
    yield daemon
    daemon.stop()


@pytest.fixture
def nix_daemon_factory():
    started = []

    def start(env, *args, **kwargs):
        d = start_nix_daemon(env, *args, **kwargs)
        started.append(d)
        return d
    yield start
    for d in started:
        d.stop()
