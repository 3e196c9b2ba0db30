"""No path-info cache on the daemon side, as with the real nix-daemon 2.8.

nix-daemon opens each connection's store with ``path-info-cache-size = 0``
("the client already does that"): a long connection sees at once a path
that another client deleted or added, and one it deleted itself.  A cache
in nixwarden's worker would make its query benchmark look better and its
answers stale, so this scenario pins the behaviour: it runs on both
daemons, one after the other, on one store, and the observations must be
identical.
"""

from __future__ import annotations

import shutil

import pytest

from conftest import needs_nix
from lib.nixenv import NixEnv, new_root, start_nix_daemon, start_nixwarden
from lib.wclient import WClient

pytestmark = [needs_nix, pytest.mark.interop]

DELETE_SPECIFIC = 3
COLLECT_GARBAGE = 20
NO_LIMIT = 2**64 - 1  # maxFreed as clients send it (nix-daemon 2.8 stops at once on 0)


def _delete_on(client: WClient, path: str) -> list[str]:
    """CollectGarbage(deleteSpecific) on ``client``'s own connection."""
    u64 = client.u64
    client.op(COLLECT_GARBAGE, u64(DELETE_SPECIFIC) + client.strs([path]) + u64(0)
              + u64(NO_LIMIT) + u64(0) * 3)
    deleted = client.r_strs()
    client.r_u64(), client.r_u64()
    return deleted


def _scenario(env: NixEnv, start) -> dict:
    """Queries on one long connection while paths come and go around it."""
    tag = start.__name__
    paths = {name: env.add_text(f"{name}-{tag}", f"{name} {tag}\n")
             for name in ("seen", "checked", "own", "late")}
    # "late" is made invalid first, to be added again while the connection lives.
    env.run("nix-store", "--delete", paths["late"], remote="local")
    daemon = start(env)
    seen: dict[str, object] = {}
    try:
        conn = WClient(env.socket_path, minor=34)
        seen["seen-before"] = conn.query_path_info(paths["seen"]) is not None
        seen["checked-before"] = conn.is_valid_path(paths["checked"])
        seen["own-before"] = conn.query_path_info(paths["own"]) is not None
        seen["late-before"] = conn.query_path_info(paths["late"]) is not None
        # Another client deletes two paths the connection has looked at.
        env.run("nix-store", "--delete", paths["seen"], paths["checked"])
        seen["seen-qpi-after-other-delete"] = conn.query_path_info(paths["seen"]) is not None
        seen["seen-valid-after-other-delete"] = conn.is_valid_path(paths["seen"])
        seen["checked-valid-after-other-delete"] = conn.is_valid_path(paths["checked"])
        # The connection deletes a path itself.
        seen["own-deleted"] = len(_delete_on(conn, paths["own"]))
        seen["own-qpi-after-own-delete"] = conn.query_path_info(paths["own"]) is not None
        # Another client adds the path this connection found missing.
        env.run("nix-store", "--add", f"{env.root}/home/late-{tag}")
        seen["late-qpi-after-other-add"] = conn.query_path_info(paths["late"]) is not None
        seen["late-valid-after-other-add"] = conn.is_valid_path(paths["late"])
        conn.close()
    finally:
        daemon.stop()
    return seen


@pytest.fixture(scope="module")
def env():
    root = new_root()
    yield NixEnv(root)
    shutil.rmtree(root, ignore_errors=True)


def test_same_observations_as_nix_daemon(env):
    want = _scenario(env, start_nix_daemon)
    got = _scenario(env, start_nixwarden)
    assert want == {  # what nix-daemon shows: the scenario is not vacuous
        "seen-before": True, "checked-before": True, "own-before": True,
        "late-before": False, "seen-qpi-after-other-delete": False,
        "seen-valid-after-other-delete": False, "checked-valid-after-other-delete": False,
        "own-deleted": 1, "own-qpi-after-own-delete": False,
        "late-qpi-after-other-add": True, "late-valid-after-other-add": True}
    assert got == want
