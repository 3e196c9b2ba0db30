"""The table of configuration settings nixwarden knows (daemon-behaviour.md §6.3).

Runs in the supervisor only, at start-up (and when a session applies a
client's ``SetOptions`` overrides).  The table lists every global setting of
Nix 2.8 (``libstore/globals.hh``, ``libstore/filetransfer.hh``,
``libutil/archive.cc``, ``libutil/logging.hh``, ``libexpr/eval.hh``,
``libfetchers/fetch-settings.hh``, ``nix/develop.cc``), the settings of
daemon-behaviour.md §6.3 that newer Nix added, a few other common newer
names (so that a ``nix.conf`` written for a newer Nix does not warn), and
nixwarden's own settings, all prefixed ``nixwarden-``.

Each default is written in Nix's textual form; defaults that depend on the
environment (``store``, ``cores``, ``build-users-group`` …) are filled in
by ``config.dynamic_defaults``.  Kinds:

* ``bool``: ``true``/``yes``/``1``, ``false``/``no``/``0``
* ``int``: decimal, optionally bounded below by ``minimum`` (Nix's unsigned
  types use ``minimum=0``)
* ``str``, ``path`` (absolute, canonicalised; empty only if ``allow_empty``)
* ``strlist`` (ordered), ``strset`` (sorted, duplicates dropped),
  ``strmap`` (``KEY=VALUE`` words), ``features`` (experimental features)
* ``sandbox-mode`` (``true``/``false``/``relaxed``), ``max-jobs`` (integer
  or ``auto``)

Trust: the table itself is constant code.  Values for these names come from
root-owned files, the daemon's environment and command line, and — filtered
by ``config.Settings.with_overrides`` — from clients.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

KINDS = frozenset({
    "bool", "int", "str", "path", "strlist", "strset", "strmap", "features",
    "sandbox-mode", "max-jobs",
})

APPENDABLE_KINDS = frozenset({"strlist", "strset", "strmap", "features"})

UINT64_MAX = 2**64 - 1
UINT_MAX = 2**32 - 1


@dataclass(frozen=True, slots=True)
class SettingSpec:
    """One known setting: its canonical name, kind, default text and aliases."""

    name: str
    kind: str
    default: str
    aliases: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    allow_empty: bool = True
    description: str = ""

    @property
    def appendable(self) -> bool:
        """Whether ``extra-NAME`` may append to this setting."""
        return self.kind in APPENDABLE_KINDS


def _b(name, default, *aliases, description=""):
    return SettingSpec(name, "bool", "true" if default else "false",
                       tuple(aliases), description=description)


def _u(name, default, *aliases, maximum=UINT64_MAX):
    return SettingSpec(name, "int", str(default), tuple(aliases), minimum=0,
                       maximum=maximum)


def _i(name, default, *aliases):
    return SettingSpec(name, "int", str(default), tuple(aliases),
                       minimum=-(2**63), maximum=2**63 - 1)


def _s(name, default, *aliases, kind="str", description=""):
    return SettingSpec(name, kind, default, tuple(aliases),
                       description=description)


_NIX_SETTINGS = (
    # libstore/globals.hh (Nix 2.8)
    _s("store", "auto"),
    _b("keep-failed", False),
    _b("keep-going", False),
    _b("fallback", False, "build-fallback"),
    _u("log-lines", 10),
    SettingSpec("max-jobs", "max-jobs", "1", ("build-max-jobs",), minimum=0,
                maximum=UINT_MAX),
    _u("cores", 1, "build-cores", maximum=UINT_MAX),
    _s("system", "x86_64-linux"),
    _i("max-silent-time", 0, "build-max-silent-time"),
    _i("timeout", 0, "build-timeout"),
    _s("build-hook", "", kind="path"),
    _s("builders", "@/etc/nix/machines"),
    _b("builders-use-substitutes", False),
    _i("gc-reserved-space", 8 * 1024 * 1024),
    _b("fsync-metadata", True),
    _b("use-sqlite-wal", True),
    _b("sync-before-registering", False),
    _b("substitute", True, "build-use-substitutes"),
    _s("build-users-group", ""),
    _b("impersonate-linux-26", False, "build-impersonate-linux-26"),
    _b("keep-build-log", True, "build-keep-log"),
    _b("compress-build-log", True, "build-compress-log"),
    _u("max-build-log-size", 0, "build-max-log-size"),
    _u("build-poll-interval", 5, maximum=UINT_MAX),
    _b("keep-outputs", False, "gc-keep-outputs"),
    _b("keep-derivations", True, "gc-keep-derivations"),
    _b("auto-optimise-store", False),
    _b("keep-env-derivations", False, "env-keep-derivations"),
    _s("sandbox", "true", "build-use-chroot", "build-use-sandbox",
       kind="sandbox-mode"),
    _s("sandbox-paths", "", "build-chroot-dirs", "build-sandbox-paths",
       kind="strset"),
    _b("sandbox-fallback", True),
    _u("repeat", 0, "build-repeat"),
    _s("sandbox-dev-shm-size", "50%"),
    _s("sandbox-build-dir", "/build"),
    _s("allowed-impure-host-deps", "", kind="strset"),
    _b("darwin-log-sandbox-violations", False),
    _b("run-diff-hook", False),
    _s("diff-hook", "", kind="path"),
    _b("enforce-determinism", True),
    _s("trusted-public-keys",
       "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",
       "binary-cache-public-keys", kind="strlist"),
    _s("secret-key-files", "", kind="strlist"),
    _u("tarball-ttl", 3600, maximum=UINT_MAX),
    _b("require-sigs", True),
    _s("extra-platforms", "", kind="strset"),
    _s("system-features", "benchmark big-parallel nixos-test", kind="strset"),
    _s("substituters", "https://cache.nixos.org/", "binary-caches",
       kind="strlist"),
    _s("trusted-substituters", "", "trusted-binary-caches", kind="strset"),
    _s("trusted-users", "root", kind="strlist"),
    _u("narinfo-cache-negative-ttl", 3600, maximum=UINT_MAX),
    _u("narinfo-cache-positive-ttl", 30 * 24 * 3600, maximum=UINT_MAX),
    _s("allowed-users", "*", kind="strlist"),
    _b("print-missing", True),
    _s("pre-build-hook", ""),
    _s("post-build-hook", ""),
    _s("netrc-file", "/etc/nix/netrc"),
    _b("filter-syscalls", True),
    _b("allow-new-privileges", False),
    _s("ignored-acls", "security.selinux system.nfs4_acl", kind="strset"),
    _s("hashed-mirrors", "", kind="strlist"),
    _u("min-free", 0),
    _u("max-free", UINT64_MAX),
    _u("min-free-check-interval", 5),
    _s("plugin-files", "", kind="strlist"),
    _s("experimental-features", "", kind="features"),
    _u("nar-buffer-size", 32 * 1024 * 1024),
    _b("allow-symlinked-store", False),
    # libstore/filetransfer.hh
    _b("http2", True),
    _s("user-agent-suffix", ""),
    _u("http-connections", 25, "binary-caches-parallel-connections"),
    _u("connect-timeout", 0),
    _u("stalled-download-timeout", 300),
    _u("download-attempts", 5, maximum=UINT_MAX),
    # libutil/archive.cc, libutil/logging.hh
    _b("use-case-hack", False),
    _b("preallocate-contents", False),
    _b("show-trace", False),
    # libexpr/eval.hh
    _b("allow-unsafe-native-code-during-evaluation", False),
    _s("nix-path", "", kind="strlist"),
    _b("restrict-eval", False),
    _b("pure-eval", False),
    _b("allow-import-from-derivation", True),
    _s("allowed-uris", "", kind="strlist"),
    _b("trace-function-calls", False),
    _b("eval-cache", True),
    # libfetchers/fetch-settings.hh
    _s("access-tokens", "", kind="strmap"),
    _b("allow-dirty", True),
    _b("warn-dirty", True),
    _s("flake-registry",
       "https://github.com/NixOS/flake-registry/raw/master/flake-registry.json"),
    _b("use-registries", True),
    _b("accept-flake-config", False),
    _s("commit-lockfile-summary", ""),
    # nix/develop.cc
    _s("bash-prompt", ""),
    _s("bash-prompt-suffix", ""),
)

# Settings of newer Nix (daemon-behaviour.md §6.3 and common nix.conf names),
# accepted so that such files do not warn; nixwarden gives most no effect.
_NEWER_NIX_SETTINGS = (
    _b("auto-allocate-uids", False),
    _u("start-id", 872415232, maximum=UINT_MAX),
    _u("id-count", 8388608, maximum=UINT_MAX),
    _b("use-cgroups", False),
    _u("max-substitution-jobs", 16, "substitution-max-jobs", maximum=UINT_MAX),
    _s("json-log-path", ""),
    _s("ssl-cert-file", ""),
    _b("use-xdg-base-directories", False),
    _b("always-allow-substitutes", False),
    _u("download-buffer-size", 64 * 1024 * 1024),
    _s("build-dir", ""),
    _b("fsync-store-paths", False),
    _u("warn-large-path-threshold", 0),
    _s("upgrade-nix-store-path-url", ""),
    _b("trace-verbose", False),
)

_NIXWARDEN_SETTINGS = (
    _s("nixwarden-worker-user", "nixwarden",
       description="the unprivileged account that worker processes run as"),
)


def _index(specs) -> dict[str, SettingSpec]:
    table: dict[str, SettingSpec] = {}
    for spec in specs:
        if spec.name not in table:
            table[spec.name] = spec
    return table


SETTINGS: dict[str, SettingSpec] = _index(
    _NIX_SETTINGS + _NEWER_NIX_SETTINGS + _NIXWARDEN_SETTINGS)
"""Canonical name -> spec, in table order."""

ALIASES: dict[str, str] = {
    alias: spec.name for spec in SETTINGS.values() for alias in spec.aliases
}
"""Old name -> canonical name (e.g. ``binary-caches`` -> ``substituters``)."""

EXPERIMENTAL_FEATURES = frozenset({
    # Nix 2.8
    "ca-derivations", "impure-derivations", "flakes", "nix-command",
    "recursive-nix", "no-url-literals", "fetch-closure",
    # newer Nix; the daemon flags of daemon-behaviour.md §13 need two of them
    "auto-allocate-uids", "cgroups", "daemon-trust-override",
    "dynamic-derivations", "fetch-tree", "git-hashing", "mounted-ssh-store",
    "parse-toml-timestamps", "read-only-local-store", "local-overlay-store",
    "configurable-impure-env", "verified-fetches", "pipe-operators",
    "external-builders",
})


def lookup(name: str) -> SettingSpec | None:
    """The spec for a canonical name or an alias, or None if unknown."""
    spec = SETTINGS.get(name)
    if spec is None and name in ALIASES:
        spec = SETTINGS[ALIASES[name]]
    return spec


# ---------------------------------------------------------------------------
# Values: Nix's text form <-> typed Python values
# ---------------------------------------------------------------------------

class InvalidValue(ValueError):
    """A value text that the setting's kind rejects; the message is Nix's."""


Value = bool | int | str | tuple[str, ...]

_UNIT_SHIFT = {"K": 10, "M": 20, "G": 30, "T": 40}


def parse_int_with_unit(text: str) -> int | None:
    """Decimal integer with an optional K/M/G/T suffix (powers of 1024).

    Newer Nix accepts the suffix in ``nix.conf`` (daemon-behaviour.md §6.2);
    Nix 2.8 accepted it only in the legacy ``--cores``-style flags.
    """
    shift = 0
    if text and text[-1].upper() in _UNIT_SHIFT:
        shift = _UNIT_SHIFT[text[-1].upper()]
        text = text[:-1]
    if not _is_decimal(text):
        return None
    return int(text) << shift


def _is_decimal(text: str) -> bool:
    digits = text[1:] if text.startswith("-") else text
    return digits.isascii() and digits.isdigit()


def _parse_int(spec: SettingSpec, text: str) -> int:
    value = parse_int_with_unit(text)
    low = spec.minimum if spec.minimum is not None else -(2**63)
    high = spec.maximum if spec.maximum is not None else 2**63 - 1
    if value is None or not low <= value <= high:
        raise InvalidValue(
            f"setting '{spec.name}' has invalid value '{text}'")
    return value


def _parse_bool(spec: SettingSpec, text: str) -> bool:
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise InvalidValue(
        f"Boolean setting '{spec.name}' has invalid value '{text}'")


def _parse_sandbox(spec: SettingSpec, text: str) -> bool | str:
    modes = {"true": True, "false": False, "relaxed": "relaxed"}
    if text not in modes:
        raise InvalidValue(f"option '{spec.name}' has invalid value '{text}'")
    return modes[text]


def _parse_max_jobs(spec: SettingSpec, text: str) -> int:
    if text == "auto":
        return max(1, os.cpu_count() or 1)
    if _is_decimal(text) and 0 <= int(text) <= (spec.maximum or UINT_MAX):
        return int(text)
    raise InvalidValue(
        f"configuration setting '{spec.name}' should be 'auto' or an integer")


def _parse_path(spec: SettingSpec, text: str) -> str:
    if text == "":
        if spec.allow_empty:
            return ""
        raise InvalidValue(f"setting '{spec.name}' cannot be empty")
    if not text.startswith("/"):
        raise InvalidValue(f"not an absolute path: '{text}'")
    return "/" + "/".join(p for p in posixpath.normpath(text).split("/") if p)


def tokenize(text: str) -> list[str]:
    """Split on Nix's whitespace (space, tab, CR, LF) only."""
    return [w for w in re.split(r"[ \t\r\n]+", text) if w]


def _merge(spec: SettingSpec, old: tuple[str, ...], new: list[str],
           append: bool) -> tuple[str, ...]:
    base = list(old) if append else []
    if spec.kind == "strlist":
        return tuple(base + new)
    if spec.kind == "strmap":
        table: dict[str, str] = {}
        for word in base + [w for w in new if "=" in w]:
            key, _, val = word.partition("=")
            table.setdefault(key, val)        # std::map::emplace keeps the first
        return tuple(f"{k}={v}" for k, v in sorted(table.items()))
    return tuple(sorted(set(base + new)))


def parse_value(spec: SettingSpec, text: str, old: Value | None = None,
                append: bool = False) -> tuple[Value, list[str]]:
    """Convert Nix text to the typed value of ``spec``.

    Args:
        spec: the setting.
        text: the value text (tokens joined by single spaces).
        old: the current value; needed when ``append`` is true.
        append: ``extra-NAME`` semantics (list-like kinds only).

    Returns:
        ``(value, warnings)``; warnings name unknown experimental features.

    Raises:
        InvalidValue: with Nix 2.8's message for this kind.
    """
    kind = spec.kind
    if kind == "bool":
        return _parse_bool(spec, text), []
    if kind == "int":
        return _parse_int(spec, text), []
    if kind == "sandbox-mode":
        return _parse_sandbox(spec, text), []
    if kind == "max-jobs":
        return _parse_max_jobs(spec, text), []
    if kind == "path":
        return _parse_path(spec, text), []
    if kind == "str":
        return text, []
    words = tokenize(text)
    warnings = []
    if kind == "features":
        warnings = [f"unknown experimental feature '{w}'"
                    for w in words if w not in EXPERIMENTAL_FEATURES]
        words = [w for w in words if w in EXPERIMENTAL_FEATURES]
    return _merge(spec, old or (), words, append), warnings


def render_value(spec: SettingSpec, value: Value) -> str:
    """Nix's textual form of a typed value (what ``nix show-config`` prints)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return " ".join(value)
    return str(value)
