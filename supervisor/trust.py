"""Who may connect, and who is trusted: the only place this is decided.

Implements spec daemon-behaviour §3.2: ``trusted-users`` and
``allowed-users`` entries are a user name, ``@group`` (primary group or
listed member in the group database) or ``*``; members of
``build-users-group`` are refused even when trusted; ``--force-trusted``
and ``--force-untrusted`` replace the whole decision.  Process: supervisor.

Trust: the input is the kernel's peer credentials (SO_PEERCRED) and the
daemon's own settings; nothing the client sends is consulted.
"""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass


@dataclass(frozen=True)
class PeerCred:
    pid: int | None
    uid: int | None
    gid: int | None


@dataclass(frozen=True)
class Identity:
    """A connection's identity, fixed at accept time and held by its session."""

    pid: int | None
    uid: int | None
    gid: int | None
    user: str | None
    trusted: bool


class Refused(Exception):
    """The peer may not connect; the message is Nix's."""


def user_name(uid: int | None) -> str | None:
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int | None) -> str | None:
    if gid is None:
        return None
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def matches(entries, user: str | None, group: str | None) -> bool:
    """Does any of ``entries`` (names, ``@group``, ``*``) match the peer?"""
    for entry in entries:
        if entry == "*":
            return True
        if user is None:
            continue
        if entry.startswith("@"):
            if group == entry[1:] or _is_member(entry[1:], user):
                return True
        elif entry == user:
            return True
    return False


def _is_member(group: str, user: str) -> bool:
    try:
        return user in grp.getgrnam(group).gr_mem
    except KeyError:
        return False


def decide(cred: PeerCred, *, trusted_users, allowed_users, build_users_group: str,
           force: str | None) -> Identity:
    """Return the connection's identity or raise ``Refused``.

    Args:
        force: ``"trusted"``/``"untrusted"`` from the force flags, else None.
    """
    user = user_name(cred.uid)
    if force is not None:
        return Identity(cred.pid, cred.uid, cred.gid, user, force == "trusted")
    group = group_name(cred.gid)
    trusted = matches(trusted_users, user, group)
    if (not trusted and not matches(allowed_users, user, group)) or (
            build_users_group and group == build_users_group):
        raise Refused(f"user '{user}' is not allowed to connect to the Nix daemon")
    return Identity(cred.pid, cred.uid, cred.gid, user, trusted)
