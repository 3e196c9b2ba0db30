"""Tests for supervisor/cli.py (daemon-behaviour.md §5, §11, §12, §13)."""

import os
import re
import shutil
import subprocess

import pytest

from nixwarden.shared.version import NIX_COMPAT_VERSION, NIXWARDEN_VERSION
from nixwarden.supervisor import cli
from nixwarden.supervisor.cli import CliExit

ENV = {"NIX_CONF_DIR": "/conf", "NIX_USER_CONF_FILES": "", "HOME": "/home/u"}
TRY = "Try 'nixwarden daemon --help' for more information.\n"
TRUST_ON = ["--extra-experimental-features", "daemon-trust-override"]


def parse(*argv, files=None, env=None):
    environ = dict(ENV, **(env or {}))
    return cli.parse_daemon_args(["daemon", *argv], environ, euid=0,
                                 read_file=lambda p: (files or {}).get(p))


def exit_of(*argv, **kwargs):
    with pytest.raises(CliExit) as e:
        parse(*argv, **kwargs)
    return e.value


def test_defaults():
    o = parse()
    assert (o.stdio, o.trust_override, o.process_ops, o.verbosity, o.log_format,
            o.print_build_logs, o.offline, o.refresh) == (
        False, None, False, 3, "raw", False, False, False)
    assert o.warnings == [] and o.settings.max_jobs == 1


def test_daemon_flags():
    o = parse("--daemon", "--stdio", "-L", "--log-format", "internal-json")
    assert o.stdio and o.print_build_logs and o.log_format == "internal-json"
    assert parse("--print-build-logs").print_build_logs
    assert parse("-Q", ).log_format == "raw"
    assert parse("--readonly-mode").readonly_mode
    assert parse("--no-gc-warning").warnings == []


@pytest.mark.parametrize("fmt", cli.LOG_FORMATS)
def test_log_formats(fmt):
    assert parse("--log-format", fmt).log_format == fmt


def test_bad_log_format_has_no_usage_hint():
    e = exit_of("--log-format", "bogus")
    assert (e.status, e.stderr) == (1, "error: option 'log-format' has an invalid value 'bogus'\n")


@pytest.mark.parametrize("argv,level", [
    ([], 3), (["-v"], 4), (["-vvv"], 6), (["-v", "--verbose"], 5), (["-vvvvvvv"], 7),
    (["--quiet"], 2), (["--quiet"] * 5, 0), (["--debug"], 6), (["--debug", "-v"], 7),
    (["-vvvv", "--debug"], 6),
])
def test_verbosity(argv, level):
    assert parse(*argv).verbosity == level


@pytest.mark.parametrize("flags,expected", [
    (["--force-trusted"], "trusted"),
    (["--force-untrusted"], "untrusted"),
    (["--force-trusted", "--force-untrusted"], "untrusted"),
    (["--force-untrusted", "--force-trusted"], "trusted"),
    (["--force-trusted", "--default-trust"], None),
    (["--default-trust", "--force-untrusted"], "untrusted"),
])
def test_trust_flags_last_wins(flags, expected):
    assert parse(*TRUST_ON, *flags).trust_override == expected


@pytest.mark.parametrize("flag", ["--force-trusted", "--force-untrusted", "--default-trust"])
def test_trust_flags_need_feature(flag):
    e = exit_of(flag)
    assert e.status == 1
    assert e.stderr == ("error: experimental Nix feature 'daemon-trust-override' is "
                        "disabled; add '--extra-experimental-features "
                        "daemon-trust-override' to enable it\n")


def test_feature_from_nix_conf_and_after_the_flag():
    files = {"/conf/nix.conf": "experimental-features = daemon-trust-override\n"}
    assert parse("--force-untrusted", files=files).trust_override == "untrusted"
    assert parse("--force-trusted", *TRUST_ON).trust_override == "trusted"
    assert parse("--force-trusted", "--option", "experimental-features",
                 "daemon-trust-override").trust_override == "trusted"


def test_process_ops_gated_by_mounted_ssh_store():
    e = exit_of("--stdio", "--process-ops")
    assert "experimental Nix feature 'mounted-ssh-store' is disabled" in e.stderr
    o = parse("--stdio", "--process-ops", "--extra-experimental-features",
              "mounted-ssh-store")
    assert o.process_ops


def test_nix_command_is_not_required():
    assert parse("--stdio").stdio


@pytest.mark.parametrize("argv,message", [
    (["--bogus"], "unrecognised flag '--bogus'"),
    (["foo"], "unexpected argument 'foo'"),
    (["--stdio", "foo"], "unexpected argument 'foo'"),
    (["--max-jobs=3"], "unrecognised flag '--max-jobs=3'"),
    (["--nixwarden-conf-0=[]"], "unrecognised flag '--nixwarden-conf-0=[]'"),
    (["--stdi"], "unrecognised flag '--stdi'"),
    (["-j"], "flag '-j' requires 1 argument(s)"),
    (["--stdio", "--store"], "flag '--store' requires 1 argument(s)"),
    (["--max-jobs"], "flag '--max-jobs' requires 1 argument(s)"),
    (["--option", "x"], "flag '--option' requires 2 argument(s)"),
    (["--max-jobs", "x"], "configuration setting 'max-jobs' should be 'auto' or an integer"),
    (["--cores", "x"], "invalid unit specifier 'X'"),
    (["--max-silent-time", "-1"], "'-1' is not an integer"),
])
def test_usage_errors(argv, message):
    e = exit_of(*argv)
    assert (e.status, e.stdout, e.stderr) == (1, "", f"error: {message}\n{TRY}")


def test_config_file_errors():
    e = exit_of(files={"/conf/nix.conf": "sandbox = maybe\n"})
    assert e.stderr == f"error: option 'sandbox' has invalid value 'maybe'\n{TRY}"
    e = exit_of(files={"/conf/nix.conf": "include gone\n"})
    assert e.stderr == "error: file '/conf/gone' included from '/conf/nix.conf' not found\n"


def test_warnings_are_collected():
    o = parse("--option", "nosuch", "1", "--option", "sandbox", "maybe",
              files={"/conf/nix.conf": "other = 2\n"})
    assert o.warnings == ["error: option 'sandbox' has invalid value 'maybe'",
                          "unknown setting 'nosuch'", "unknown setting 'other'"]
    assert o.warning_lines().splitlines()[1] == "warning: unknown setting 'nosuch'"


def test_setting_flags_reach_settings():
    o = parse("--store", "local?root=/r", "-j", "4", "-K", "-k", "--fallback", "--cores", "2",
              "--timeout", "3", "--max-silent-time", "9", "--no-sandbox",
              "--option", "trusted-users", "root alice", "--extra-trusted-users", "bob")
    s = o.settings
    assert s.store == "local?root=/r" and s.max_jobs == 4 and s.cores == 2
    assert s.get("keep-failed") and s.get("keep-going") and s.get("fallback")
    assert s.get("timeout") == 3 and s.get("max-silent-time") == 9
    assert s.sandbox is False and s.trusted_users == ("root", "alice", "bob")


def test_offline_and_refresh():
    o = parse("--offline")
    assert o.offline and o.settings.get("substitute") is False
    o = parse("--refresh")
    assert o.refresh and o.settings.get("tarball-ttl") == 0


def test_version():
    e = exit_of("--version")
    assert (e.status, e.stdout, e.stderr) == (0, f"nixwarden (Nix) {NIX_COMPAT_VERSION}\n", "")
    assert e.stdout.splitlines()[0].split()[-1] == NIX_COMPAT_VERSION
    e = exit_of("-v", "--version")
    lines = e.stdout.splitlines()
    assert lines[0] == f"nixwarden (Nix) {NIX_COMPAT_VERSION}"
    assert f"nixwarden version: {NIXWARDEN_VERSION}" in lines
    assert "System configuration file: /conf/nix.conf" in lines


def test_version_wins_over_later_errors_only():
    assert exit_of("--version", "--bogus").status == 0
    assert exit_of("--version", "--max-jobs", "x").status == 0
    assert exit_of("--max-jobs", "x", "--version").status == 1
    assert exit_of("-j", "--version").stderr.startswith(
        "error: configuration setting 'max-jobs' should be 'auto' or an integer")
    assert exit_of("--bogus", "--version").status == 1
    assert exit_of("--version", files={"/conf/nix.conf": "cores = x\n"}).status == 1


def test_top_level():
    env = dict(ENV)
    with pytest.raises(CliExit) as e:
        cli.parse_daemon_args(["--version"], env, euid=0)
    assert e.value.stdout == f"nixwarden (Nix) {NIX_COMPAT_VERSION}\n"
    with pytest.raises(CliExit) as e:
        cli.parse_daemon_args(["--help"], env, euid=0)
    assert e.value.status == 0 and "nixwarden daemon" in e.value.stdout
    for argv, message in ([[], "no subcommand specified"],
                          [["foo"], "'foo' is not a recognised command"],
                          [["--bogus"], "unrecognised flag '--bogus'"]):
        with pytest.raises(CliExit) as e:
            cli.parse_daemon_args(argv, env, euid=0)
        assert e.value.stderr == (f"error: {message}\n"
                                  "Try 'nixwarden --help' for more information.\n")
    # `nixwarden --stdio` is what ssh-ng:// clients run (remote-program).
    assert cli.parse_daemon_args(["--stdio"], env, euid=0, read_file=lambda p: None).stdio
    o = cli.parse_daemon_args(["-v", "daemon", "--stdio"], env, euid=0,
                              read_file=lambda p: None)
    assert o.stdio and o.verbosity == 4


HELP_OPTIONS = """--stdio --force-trusted --force-untrusted --default-trust --process-ops
--daemon --help --version -v --verbose --quiet --debug --log-format -L
--print-build-logs --offline --refresh --option --extra- -j --max-jobs -K -k
--fallback --cores --max-silent-time --timeout --store --readonly-mode
--no-gc-warning -Q --no-build-output""".split()


def test_help_mentions_everything():
    e = exit_of("--help")
    assert e.status == 0 and e.stderr == ""
    missing = [o for o in HELP_OPTIONS if not re.search(re.escape(o) + r"\b", e.stdout)]
    assert missing == []
    for topic in ("nixwarden-worker-user", "NIX_DAEMON_SOCKET_PATH", "NIX_REMOTE=unix://",
                  "LISTEN_FDS", "daemon-trust-override", "mounted-ssh-store",
                  ".local/share/nix/root", "worker"):
        assert topic in e.stdout


def test_emit():
    import io
    out, err = io.StringIO(), io.StringIO()
    assert CliExit(1, "o", "e").emit(out, err) == 1
    assert (out.getvalue(), err.getvalue()) == ("o", "e")


def test_options_are_frozen():
    o = parse()
    with pytest.raises(Exception):
        o.stdio = True


# --- differential: the same command lines given to real nix-daemon 2.8 -----------

NIX_DAEMON = shutil.which("nix-daemon")


@pytest.mark.skipif(NIX_DAEMON is None, reason="real nix-daemon not installed")
@pytest.mark.parametrize("argv", [
    ["--bogus"], ["foo"], ["--max-jobs", "x"],
    ["--cores", "x"], ["--max-silent-time", "-1"], ["--max-jobs=3"],
    ["--log-format", "bogus"],
])
def test_messages_match_real_nix_daemon(tmp_path, argv):
    (tmp_path / "nix.conf").write_text("")
    env = {"PATH": os.environ.get("PATH", ""), "NIX_CONF_DIR": str(tmp_path),
           "NIX_USER_CONF_FILES": "/dev/null", "HOME": str(tmp_path)}
    real = subprocess.run(["nix-daemon", *argv, "--version"], env=env, timeout=30,
                          capture_output=True, text=True)
    e = exit_of(*argv, "--version")
    assert real.returncode == e.status == 1
    assert real.stderr.replace("'nix-daemon --help'", "'nixwarden daemon --help'") == e.stderr


@pytest.mark.skipif(NIX_DAEMON is None, reason="real nix-daemon not installed")
@pytest.mark.parametrize("argv", [["-j"], ["--option", "x"], ["--stdio", "--store"]])
def test_missing_argument_matches_real_nix_daemon(tmp_path, argv):
    """Only argument lists that fail before the daemon would start."""
    (tmp_path / "nix.conf").write_text("")
    env = {"PATH": os.environ.get("PATH", ""), "NIX_CONF_DIR": str(tmp_path),
           "NIX_USER_CONF_FILES": "/dev/null", "HOME": str(tmp_path)}
    real = subprocess.run(["nix-daemon", *argv], env=env, timeout=10,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    e = exit_of(*argv)
    assert real.returncode == e.status == 1
    assert real.stderr.replace("'nix-daemon --help'", "'nixwarden daemon --help'") == e.stderr
