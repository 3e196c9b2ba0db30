"""Nix configuration: nix.conf files, ``NIX_CONFIG`` and flags into ``Settings``.

Runs in the supervisor at start-up; ``Settings.with_overrides`` also runs
per connection when a client's ``SetOptions`` arrives (the session applies
it, the worker never sees more than the result).

Layering (daemon-behaviour.md §6.1, lowest first): built-in defaults,
``$NIX_CONF_DIR/nix.conf``, the user files (``$NIX_USER_CONF_FILES`` or the
XDG lookup, first listed wins), ``$NIX_CONFIG``, then the command line.
configargparse does the layering: every configuration source is a default
config file of one ``configargparse.ArgumentParser`` read by
``NixConfFileParser`` (Nix syntax, §6.2), and every assignment — from a
file or from ``--option``/``--NAME``/``--no-NAME``/``--extra-NAME`` — is an
argparse action appending one ``Assignment`` to the namespace, so that all
of them are applied in the order Nix applies them.

Warnings are returned as message texts without the ``warning: `` prefix;
the caller prints them.

Trust: the files and the environment belong to whoever starts the daemon
(root); they are trusted but validated, and a bad value in them stops the
daemon.  Client overrides (``with_overrides``) are untrusted input: for an
untrusted client only the allow-list of worker-protocol.md §5.16 passes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import posixpath
from collections import OrderedDict
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

import configargparse

from nixwarden.supervisor import settings_table as table
from nixwarden.supervisor.settings_table import InvalidValue, SettingSpec, Value

ReadFile = Callable[[str], "str | None"]
"""Returns a file's text, None if it does not exist ('' if unreadable)."""

MAX_INCLUDE_DEPTH = 32
CONF_ITEM_PREFIX = "--nixwarden-conf-"
UNTRUSTED_ALLOWED = frozenset({
    "timeout", "max-silent-time", "build-poll-interval", "connect-timeout"})


class ConfigError(Exception):
    """A fatal configuration error.

    ``usage`` is True for Nix's ``UsageError`` cases, which print the
    ``Try '<prog> --help' for more information.`` line after the message.
    """

    def __init__(self, message: str, *, usage: bool = True, origin: str = ""):
        super().__init__(message)
        self.message = message
        self.usage = usage
        self.origin = origin


@dataclass(frozen=True, slots=True)
class Assignment:
    """One ``NAME = VALUE`` from some source, in application order.

    ``strict``: a bad value is fatal (files, ``NIX_CONFIG``, ``--NAME``);
    otherwise it is a warning (``--option``, client overrides).
    ``user``: counts as "overridden" (everything but the system nix.conf).
    """

    name: str
    value: str
    origin: str
    strict: bool = True
    user: bool = True


def read_text_file(path: str) -> str | None:
    """Default ``ReadFile``: missing -> None, unreadable -> '' (Nix ignores it)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return ""


# ---------------------------------------------------------------------------
# nix.conf syntax (daemon-behaviour.md §6.2, libutil/config.cc applyConfig)
# ---------------------------------------------------------------------------

def parse_nix_conf(text: str, path: str, read_file: ReadFile = read_text_file,
                   *, user: bool = True, _depth: int = 0) -> list[Assignment]:
    """Parse nix.conf text into assignments, following includes.

    Args:
        text: the file contents.
        path: the file's path (or ``NIX_CONFIG``); used in messages and as
            the base for relative includes.
        read_file: reads included files.
        user: mark the assignments as user settings (see ``Assignment``).

    Returns:
        Assignments in file order, includes expanded in place.

    Raises:
        ConfigError: an illegal line, or a missing ``include`` file.
    """
    result: list[Assignment] = []
    for line in text.split("\n"):
        line = line.split("#", 1)[0]
        tokens = table.tokenize(line)
        if not tokens:
            continue
        if len(tokens) < 2:
            raise _illegal(line, path)
        if tokens[0] in ("include", "!include"):
            result += _include(tokens, line, path, read_file, user, _depth)
        elif tokens[1] != "=":
            raise _illegal(line, path)
        else:
            result.append(Assignment(tokens[0], " ".join(tokens[2:]), path,
                                     strict=True, user=user))
    return result


def _illegal(line: str, path: str) -> ConfigError:
    return ConfigError(f"illegal configuration line '{line}' in '{path}'")


def _include(tokens, line, path, read_file, user, depth) -> list[Assignment]:
    if len(tokens) != 2:
        raise _illegal(line, path)
    if depth >= MAX_INCLUDE_DEPTH:
        raise ConfigError(f"too many nested includes at '{path}'", usage=False)
    target = posixpath.normpath(
        posixpath.join(posixpath.dirname(path) or os.getcwd(), tokens[1]))
    text = read_file(target)
    if text is None:
        if tokens[0] == "!include":
            return []
        raise ConfigError(f"file '{target}' included from '{path}' not found",
                          usage=False)
    return parse_nix_conf(text, target, read_file, user=user, _depth=depth + 1)


# ---------------------------------------------------------------------------
# Sources and configargparse plumbing
# ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ConfigSource:
    """One layer: a file path, or inline text (``NIX_CONFIG``)."""

    label: str
    text: str | None = None
    user: bool = True


def user_config_files(environ: Mapping[str, str]) -> list[str]:
    """``$NIX_USER_CONF_FILES``, else the XDG files, highest priority first."""
    listed = environ.get("NIX_USER_CONF_FILES")
    if listed is not None:
        return [p for p in listed.split(":") if p]
    home = environ.get("HOME", "/")
    config_home = environ.get("XDG_CONFIG_HOME") or posixpath.join(home, ".config")
    dirs = (environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":")
    return [posixpath.join(d, "nix/nix.conf") for d in [config_home] + dirs if d]


def conf_dir(environ: Mapping[str, str]) -> str:
    """``$NIX_CONF_DIR`` or ``/etc/nix``."""
    return environ.get("NIX_CONF_DIR") or "/etc/nix"


def config_sources(environ: Mapping[str, str]) -> list[ConfigSource]:
    """All configuration layers, lowest priority first (§6.1)."""
    sources = [ConfigSource(posixpath.join(conf_dir(environ), "nix.conf"),
                            user=False)]
    sources += [ConfigSource(p) for p in reversed(user_config_files(environ))]
    if "NIX_CONFIG" in environ:
        sources.append(ConfigSource("NIX_CONFIG", text=environ["NIX_CONFIG"]))
    return sources


class _SourceStream(io.StringIO):
    """The stream configargparse hands to ``NixConfFileParser.parse``."""

    def __init__(self, text: str, source: ConfigSource, key: str):
        super().__init__(text)
        self.name = source.label
        self.source = source
        self.key = key


class NixConfFileParser(configargparse.ConfigFileParser):
    """configargparse config-file parser for Nix's nix.conf syntax.

    Each source's assignments come back under that source's own hidden key,
    so configargparse never drops one layer's item because another layer
    set the same key; the item action re-creates the ``Assignment``.
    """

    def __init__(self, read_file: ReadFile = read_text_file):
        super().__init__()
        self._read_file = read_file

    def get_syntax_description(self):
        return "Nix configuration syntax (nix.conf(5)): NAME = VALUE"

    def parse(self, stream):
        source = stream.source
        items = parse_nix_conf(stream.read(), source.label, self._read_file,
                               user=source.user)
        if not items:
            return OrderedDict()
        encoded = [json.dumps([a.name, a.value, a.origin, a.user]) for a in items]
        return OrderedDict([(stream.key, encoded)])


def _record(namespace, assignment: Assignment) -> None:
    items = list(getattr(namespace, "assignments", None) or [])
    items.append(assignment)
    namespace.assignments = items


class _ConfItemAction(argparse._AppendAction):
    """Hidden ``--nixwarden-conf-N=<json>``: one assignment from a file."""

    def __call__(self, parser, namespace, values, option_string=None):
        name, value, origin, user = json.loads(values)
        _record(namespace, Assignment(name, value, origin, True, user))


class _OptionAction(argparse.Action):
    """``--option NAME VALUE``: a bad value is only a warning (Nix 2.8)."""

    def __call__(self, parser, namespace, values, option_string=None):
        name, value = json.loads(values)      # bound by NixArgumentParser._bind
        _record(namespace, Assignment(name, value, "--option", strict=False))


class _SettingAction(argparse.Action):
    """``--NAME VALUE``, ``--extra-NAME VALUE``, ``--NAME``/``--no-NAME``."""

    def __init__(self, option_strings, dest, setting, fixed=None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.setting = setting
        self.fixed = fixed

    def __call__(self, parser, namespace, values, option_string=None):
        value = self.fixed if self.fixed is not None else values
        _record(namespace, Assignment(self.setting, value, option_string))


class _LegacyIntAction(argparse.Action):
    """nix-daemon's ``--cores``/``--max-silent-time``/``--timeout N``."""

    def __call__(self, parser, namespace, values, option_string=None):
        _record(namespace, Assignment(self.dest, _legacy_int(values),
                                      option_string))


def _legacy_int(text: str) -> str:
    """Nix's ``string2IntWithUnitPrefix<uint64_t>`` with its messages."""
    digits = text
    if text and text[-1].isalpha():
        unit = text[-1].upper()
        if unit not in "KMGT":
            raise argparse.ArgumentError(None, f"invalid unit specifier '{unit}'")
        digits = text[:-1]
    value = table.parse_int_with_unit(text)
    if value is None or value < 0 or not digits.isdigit():
        raise argparse.ArgumentError(None, f"'{digits}' is not an integer")
    return str(value)


class NixArgumentParser(configargparse.ArgumentParser):
    """configargparse parser with the Nix configuration layers attached.

    Nix flags take their arguments verbatim (``-j --version`` sets max-jobs
    to ``--version``) and have no ``--flag=value`` form; before argparse
    sees the user's arguments, each flag is bound to its arguments as one
    ``--flag=<value>`` token (``--option``: a JSON pair), and user tokens of
    that form are rejected.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arity: dict[str, tuple[int, str]] = {}

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        count = {None: 1, 0: 0}.get(action.nargs, action.nargs)
        longest = max(action.option_strings, key=len, default="")
        for flag in action.option_strings:
            self.arity[flag] = (count, longest)
        return action

    def error(self, message):
        raise argparse.ArgumentError(None, message)

    def parse_known_args(self, args=None, namespace=None, **kwargs):
        return super().parse_known_args(self._bind(list(args or [])), namespace,
                                        **kwargs)

    def _bind(self, args: list[str]) -> list[str]:
        bound, i = [], 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                return bound + args[i:]
            if arg.startswith("--") and ("=" in arg or arg.startswith(CONF_ITEM_PREFIX)):
                raise argparse.ArgumentError(None, f"unrecognised flag '{arg}'")
            count, longest = self.arity.get(arg, (0, arg))
            if count and i + count >= len(args):
                raise argparse.ArgumentError(
                    None, f"flag '{arg}' requires {count} argument(s)")
            if count == 0:
                bound.append(arg)
                i += 1
                continue
            values = args[i + 1:i + 1 + count]
            text = values[0] if count == 1 else json.dumps(values)
            bound.append(f"{longest}={text}")
            i += 1 + count
        return bound


def build_parser(environ: Mapping[str, str], read_file: ReadFile = read_text_file,
                 prog: str = "nixwarden") -> NixArgumentParser:
    """A configargparse parser reading every layer and every setting flag.

    Callers add their own flags, then parse with ``parse_known_args(argv,
    env_vars={})`` and hand ``namespace.assignments`` to
    ``settings_from_assignments``.
    """
    sources = config_sources(environ)
    parser = NixArgumentParser(
        prog=prog, add_help=False, allow_abbrev=False, exit_on_error=False,
        config_file_parser_class=NixConfFileParser(read_file),
        default_config_files=[_opener(s, i, read_file) for i, s in enumerate(sources)],
        add_config_file_help=False, add_env_var_help=False)
    parser.set_defaults(assignments=[])
    for index in range(len(sources)):
        parser.add_argument(f"{CONF_ITEM_PREFIX}{index}", action=_ConfItemAction,
                            dest="conf_items", help=argparse.SUPPRESS)
    add_setting_arguments(parser)
    return parser


def _opener(source: ConfigSource, index: int, read_file: ReadFile):
    def open_source():
        text = source.text if source.text is not None else read_file(source.label)
        return _SourceStream(text or "", source, f"{CONF_ITEM_PREFIX}{index}")
    open_source.__name__ = source.label
    return open_source


def add_setting_arguments(parser: NixArgumentParser) -> None:
    """Add ``--option`` and one flag family per known setting (§5.2)."""
    parser.add_argument("--option", action=_OptionAction, metavar="NAME VALUE",
                        dest="conf_items")
    parser.arity["--option"] = (2, "--option")
    for spec in table.SETTINGS.values():
        _add_flags_for(parser, spec)


def _add_flags_for(parser, spec: SettingSpec) -> None:
    name = spec.name
    common = {"dest": "conf_items", "setting": name, "action": _SettingAction}
    if spec.kind == "bool":
        parser.add_argument(*_short(name), f"--{name}", nargs=0, fixed="true", **common)
        parser.add_argument(f"--no-{name}", nargs=0, fixed="false", **common)
    elif spec.kind == "sandbox-mode":
        for flag, mode in (("", "true"), ("no-", "false"), ("relaxed-", "relaxed")):
            parser.add_argument(f"--{flag}{name}", nargs=0, fixed=mode, **common)
    elif name in ("cores", "max-silent-time", "timeout"):
        parser.add_argument(f"--{name}", action=_LegacyIntAction, dest=name,
                            metavar="N", default=argparse.SUPPRESS)
    else:
        parser.add_argument(*_short(name), f"--{name}", metavar="VALUE", **common)
    if spec.appendable:
        parser.add_argument(f"--extra-{name}", metavar="VALUE",
                            **{**common, "setting": f"extra-{name}"})


def _short(name: str) -> tuple[str, ...]:
    return {"max-jobs": ("-j",), "keep-failed": ("-K",),
            "keep-going": ("-k",)}.get(name, ())


# ---------------------------------------------------------------------------
# Defaults and application
# ---------------------------------------------------------------------------

def dynamic_defaults(environ: Mapping[str, str], euid: int) -> dict[str, str]:
    """Defaults that depend on the environment, as Nix 2.8 computes them."""
    cdir = conf_dir(environ)
    remote_systems = environ.get("NIX_REMOTE_SYSTEMS")
    builders = (" ".join("@" + p for p in remote_systems.split(":") if p)
                if remote_systems is not None else f"@{cdir}/machines")
    features = ["benchmark", "big-parallel", "nixos-test"]
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        features.append("kvm")
    return {
        "store": environ.get("NIX_REMOTE", "auto"),
        "build-users-group": "nixbld" if euid == 0 else "",
        "cores": str(max(1, os.cpu_count() or 1)),
        "builders": builders,
        "netrc-file": f"{cdir}/netrc",
        "system": _system_type(),
        "extra-platforms": "i686-linux" if _system_type() == "x86_64-linux" else "",
        "system-features": " ".join(features),
        "ssl-cert-file": environ.get("NIX_SSL_CERT_FILE")
                         or environ.get("SSL_CERT_FILE", ""),
    }


def _system_type() -> str:
    machine = platform.machine().lower()
    cpu = {"amd64": "x86_64", "arm64": "aarch64", "i386": "i686",
           "i586": "i686"}.get(machine, machine)
    return f"{cpu}-{platform.system().lower()}"


def default_values(environ: Mapping[str, str], euid: int) -> dict[str, Value]:
    """Typed built-in defaults for every known setting."""
    texts = {spec.name: spec.default for spec in table.SETTINGS.values()}
    texts.update(dynamic_defaults(environ, euid))
    return {name: table.parse_value(table.SETTINGS[name], text)[0]
            for name, text in texts.items()}


def resolve_name(name: str) -> tuple[SettingSpec | None, bool]:
    """Spec for NAME or ``extra-NAME`` (append), as ``Config::set`` does."""
    spec = table.lookup(name)
    if spec is not None:
        return spec, False
    if name.startswith("extra-"):
        spec = table.lookup(name[len("extra-"):])
        if spec is not None and spec.appendable:
            return spec, True
    return None, False


def apply_one(values: dict[str, Value], name: str, text: str) -> list[str] | None:
    """Apply one assignment to ``values`` in place.

    Returns:
        warnings (unknown experimental features), or None if NAME is unknown.

    Raises:
        InvalidValue: the value is bad for the setting's kind.
    """
    spec, append = resolve_name(name)
    if spec is None:
        return None
    value, warnings = table.parse_value(spec, text, values[spec.name], append)
    values[spec.name] = value
    return warnings


def settings_from_assignments(
        assignments: Iterable[Assignment], environ: Mapping[str, str],
        euid: int) -> tuple["Settings", list[str]]:
    """Apply assignments over the defaults.

    Returns:
        ``(settings, warnings)``; unknown names give one ``unknown setting
        'NAME'`` warning each, sorted by name (Nix keeps them in a map).

    Raises:
        ConfigError: a bad value from a strict source (Nix's UsageError).
    """
    values = default_values(environ, euid)
    warnings: list[str] = []
    unknown: set[str] = set()
    overridden: set[str] = set()
    for item in assignments:
        try:
            more = apply_one(values, item.name, item.value)
        except InvalidValue as e:
            if item.strict:
                raise ConfigError(str(e), origin=item.origin) from None
            warnings.append(f"error: {e}")
            continue
        if more is None:
            unknown.add(item.name)
            continue
        warnings += more
        if item.user:
            overridden.add(resolve_name(item.name)[0].name)
    warnings += [f"unknown setting '{name}'" for name in sorted(unknown)]
    return Settings(MappingProxyType(values), frozenset(overridden)), warnings


def load_settings(environ: Mapping[str, str], euid: int, argv: Iterable[str] = (),
                  read_file: ReadFile = read_text_file) -> tuple["Settings", list[str]]:
    """All layers plus setting flags in ``argv`` (no daemon flags).

    Raises:
        ConfigError: as ``settings_from_assignments``, for illegal lines,
            missing includes, and unknown flags or missing flag arguments.
    """
    parser = build_parser(environ, read_file)
    try:
        namespace, rest = parser.parse_known_args(list(argv), env_vars={})
    except argparse.ArgumentError as e:
        raise ConfigError(e.message) from None
    if rest:
        raise ConfigError(f"unrecognised flag '{rest[0]}'")
    return settings_from_assignments(namespace.assignments, environ, euid)


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------

def _prop(name: str):
    return property(lambda self: self.get(name), doc=f"The `{name}` setting.")


@dataclass(frozen=True, slots=True, eq=True)
class Settings:
    """Immutable typed settings; copies share nothing mutable.

    ``values`` maps canonical names to typed values (bool, int, str,
    tuple of str; ``sandbox`` is True, False or ``"relaxed"``).
    ``overridden`` names the settings set by a user-level source (user
    files, ``NIX_CONFIG``, flags, client overrides), as Nix tracks it.
    """

    values: Mapping[str, Value]
    overridden: frozenset[str] = frozenset()

    @classmethod
    def defaults(cls, environ: Mapping[str, str], euid: int) -> "Settings":
        """Built-in defaults only."""
        return cls(MappingProxyType(default_values(environ, euid)))

    def get(self, name: str) -> Value:
        """Typed value of a setting (canonical name or alias); KeyError if unknown."""
        spec = table.lookup(name)
        if spec is None:
            raise KeyError(name)
        return self.values[spec.name]

    def raw(self, name: str) -> str:
        """Nix's textual form of a setting's value."""
        spec = table.lookup(name)
        if spec is None:
            raise KeyError(name)
        return table.render_value(spec, self.values[spec.name])

    def feature_enabled(self, feature: str) -> bool:
        """Whether an experimental feature is enabled."""
        return feature in self.get("experimental-features")

    def with_values(self, changes: Mapping[str, Value]) -> "Settings":
        """A copy with some typed values replaced (canonical names)."""
        values = dict(self.values)
        values.update(changes)
        return replace(self, values=MappingProxyType(values),
                       overridden=self.overridden | frozenset(changes))

    def with_network_mode(self, *, offline: bool, refresh: bool) -> "Settings":
        """Apply the ``nix`` CLI's ``--offline``/``--refresh`` (nix/main.cc, 2.8).

        ``--offline`` turns off substitution and treats downloads as fresh,
        for settings not set by the user; ``--refresh`` sets tarball-ttl 0.
        """
        changes: dict[str, Value] = {}
        if offline:
            offline_values = {"substitute": False, "tarball-ttl": table.UINT_MAX,
                              "download-attempts": 0, "connect-timeout": 1}
            changes.update({k: v for k, v in offline_values.items()
                            if k not in self.overridden})
        if refresh:
            changes["tarball-ttl"] = 0
        if not changes:
            return self
        values = dict(self.values)
        values.update(changes)
        return replace(self, values=MappingProxyType(values))

    def with_overrides(self, pairs: Iterable[tuple[str, str]], *,
                       trusted: bool) -> tuple["Settings", list[str]]:
        """Apply a client's ``SetOptions`` overrides (worker-protocol.md §5.16).

        Args:
            pairs: (name, value) as the client sent them.
            trusted: whether the client is trusted.

        Returns:
            ``(settings, warnings)``; each warning is a text to send to the
            client as ``warning: <text>``.  (Nix 2.4-2.23 logged the
            restricted-setting message at debug level only.)
        """
        values = dict(self.values)
        changed: set[str] = set()
        warnings: list[str] = []
        for name, value in pairs:
            warnings += _override_one(values, changed, name, value, trusted)
        if not changed:
            return self, warnings
        return replace(self, values=MappingProxyType(values),
                       overridden=self.overridden | frozenset(changed)), warnings

    trusted_users = _prop("trusted-users")
    allowed_users = _prop("allowed-users")
    build_users_group = _prop("build-users-group")
    store = _prop("store")
    sandbox = _prop("sandbox")
    max_jobs = _prop("max-jobs")
    cores = _prop("cores")
    substituters = _prop("substituters")
    trusted_substituters = _prop("trusted-substituters")
    trusted_public_keys = _prop("trusted-public-keys")
    require_sigs = _prop("require-sigs")
    secret_key_files = _prop("secret-key-files")
    keep_outputs = _prop("keep-outputs")
    keep_derivations = _prop("keep-derivations")
    worker_user = _prop("nixwarden-worker-user")

    @property
    def experimental_features(self) -> frozenset[str]:
        """Enabled experimental features."""
        return frozenset(self.get("experimental-features"))


# ---------------------------------------------------------------------------
# SetOptions overrides (worker-protocol.md §5.16)
# ---------------------------------------------------------------------------

def _override_one(values: dict, changed: set, name: str, value: str,
                  trusted: bool) -> list[str]:
    if name == "ssh-auth-sock" or name in ("experimental-features",
                                           "extra-experimental-features"):
        return []
    if name == "plugin-files":
        return ["Ignoring the client-specified plugin-files."]
    if trusted or name in UNTRUSTED_ALLOWED or (name == "builders" and value == ""):
        return _apply_override(values, changed, name, value)
    if name in ("substituters", "binary-caches"):
        return _filter_substituters(values, changed, value)
    return [f"ignoring the client-specified setting '{name}', because it is "
            "a restricted setting and you are not a trusted user"]


def _apply_override(values: dict, changed: set, name: str, value: str) -> list[str]:
    try:
        warnings = apply_one(values, name, value)
    except InvalidValue as e:
        return [f"error: {e}"]
    if warnings is None:                       # unknown: silently ignored
        return []
    changed.add(resolve_name(name)[0].name)
    return warnings


def _filter_substituters(values: dict, changed: set, value: str) -> list[str]:
    allowed = set(values["trusted-substituters"]) | set(values["substituters"])
    accepted, warnings = [], []
    for url in table.tokenize(value):
        if url in allowed:
            accepted.append(url)
        elif not url.endswith("/") and url + "/" in allowed:
            accepted.append(url + "/")
        else:
            warnings.append(f"ignoring untrusted substituter '{url}'")  # Nix 2.8's text
    values["substituters"] = tuple(accepted)
    changed.add("substituters")
    return warnings
