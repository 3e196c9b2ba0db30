"""Tests for supervisor/config.py and settings_table.py (daemon-behaviour.md §6)."""

import os
import shutil
import subprocess

import pytest

from nixwarden.supervisor import config, settings_table
from nixwarden.supervisor.config import Assignment, ConfigError, Settings

BASE_ENV = {"NIX_CONF_DIR": "/conf", "NIX_USER_CONF_FILES": "", "HOME": "/home/u"}


def fake_fs(files):
    """A ReadFile over a dict: missing -> None."""
    return lambda path: files.get(path)


def load(files=None, argv=(), env=None, euid=0):
    environ = dict(BASE_ENV, **(env or {}))
    return config.load_settings(environ, euid, argv, fake_fs(files or {}))


# --- nix.conf syntax -------------------------------------------------------

def test_parse_comments_tokens_and_joining():
    text = "# comment\n  substituters   =  a \t b   # trailing\n\nkeep-outputs = true\n"
    items = config.parse_nix_conf(text, "/c/nix.conf", fake_fs({}))
    assert [(a.name, a.value) for a in items] == [
        ("substituters", "a b"), ("keep-outputs", "true")]
    assert items[0].origin == "/c/nix.conf" and items[0].strict


def test_parse_empty_value():
    items = config.parse_nix_conf("build-users-group =\n", "/c", fake_fs({}))
    assert items == [Assignment("build-users-group", "", "/c")]


@pytest.mark.parametrize("line", ["foo", "foo bar", "a b = c", "include a b"])
def test_illegal_line(line):
    with pytest.raises(ConfigError) as e:
        config.parse_nix_conf(line + "\n", "/etc/nix/nix.conf", fake_fs({}))
    assert e.value.message == f"illegal configuration line '{line}' in '/etc/nix/nix.conf'"
    assert e.value.usage


def test_include_relative_to_including_file():
    files = {"/c/sub/more.conf": "cores = 3\ninclude ../last.conf\n",
             "/c/last.conf": "max-jobs = 4\n"}
    items = config.parse_nix_conf("a = 1\ninclude sub/more.conf\nb = 2\n",
                                  "/c/nix.conf", fake_fs(files))
    assert [(a.name, a.origin) for a in items] == [
        ("a", "/c/nix.conf"), ("cores", "/c/sub/more.conf"),
        ("max-jobs", "/c/last.conf"), ("b", "/c/nix.conf")]


def test_missing_include_is_an_error_without_usage_hint():
    with pytest.raises(ConfigError) as e:
        config.parse_nix_conf("include nothere\n", "/c/nix.conf", fake_fs({}))
    assert e.value.message == "file '/c/nothere' included from '/c/nix.conf' not found"
    assert not e.value.usage


def test_bang_include_missing_is_skipped():
    assert config.parse_nix_conf("!include nothere\n", "/c/nix.conf", fake_fs({})) == []


def test_include_loop_is_bounded():
    files = {"/c/nix.conf": "include nix.conf\n"}
    with pytest.raises(ConfigError):
        config.parse_nix_conf(files["/c/nix.conf"], "/c/nix.conf", fake_fs(files))


# --- values and kinds ------------------------------------------------------

def test_defaults_as_nix_2_8():
    s, warnings = load()
    assert warnings == []
    assert s.trusted_users == ("root",)
    assert s.allowed_users == ("*",)
    assert s.build_users_group == "nixbld"
    assert s.max_jobs == 1
    assert s.cores == max(1, os.cpu_count() or 1)
    assert s.sandbox is True
    assert s.substituters == ("https://cache.nixos.org/",)
    assert s.trusted_public_keys == (
        "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",)
    assert s.require_sigs is True and s.keep_derivations is True
    assert s.keep_outputs is False
    assert s.store == "auto"
    assert s.worker_user == "nixwarden"
    assert s.experimental_features == frozenset()
    assert s.raw("builders") == "@/conf/machines"


def test_uid_and_env_dependent_defaults():
    s, _ = load(euid=1000, env={"NIX_REMOTE": "daemon", "NIX_REMOTE_SYSTEMS": "/a:/b"})
    assert s.build_users_group == ""
    assert s.store == "daemon"
    assert s.raw("builders") == "@/a @/b"


def test_aliases_and_extra():
    files = {"/conf/nix.conf": "binary-caches = a\nextra-binary-caches = b\n"
             "build-max-jobs = 7\nbuild-cores = 2\nbuild-timeout = 9\n"
             "build-use-substitutes = false\ntrusted-binary-caches = z y\n"
             "extra-trusted-users = alice\nextra-sandbox-paths = /b /a\n"}
    s, warnings = load(files)
    assert warnings == []
    assert s.substituters == ("a", "b")
    assert s.max_jobs == 7 and s.cores == 2 and s.get("timeout") == 9
    assert s.get("substitute") is False and s.get("build-use-substitutes") is False
    assert s.trusted_substituters == ("y", "z")        # a set: sorted
    assert s.trusted_users == ("root", "alice")
    assert s.raw("sandbox-paths") == "/a /b"


def test_extra_on_non_list_setting_is_unknown():
    _, warnings = load({"/conf/nix.conf": "extra-cores = 2\n"})
    assert warnings == ["unknown setting 'extra-cores'"]


@pytest.mark.parametrize("name,value,message", [
    ("sandbox", "maybe", "option 'sandbox' has invalid value 'maybe'"),
    ("keep-outputs", "maybe", "Boolean setting 'keep-outputs' has invalid value 'maybe'"),
    ("cores", "x", "setting 'cores' has invalid value 'x'"),
    ("cores", "-1", "setting 'cores' has invalid value '-1'"),
    ("cores", " 5x", "setting 'cores' has invalid value '5x'"),
    ("max-jobs", "x", "configuration setting 'max-jobs' should be 'auto' or an integer"),
    ("build-hook", "relative", "not an absolute path: 'relative'"),
])
def test_invalid_value_in_file_is_fatal(name, value, message):
    with pytest.raises(ConfigError) as e:
        load({"/conf/nix.conf": f"{name} = {value}\n"})
    assert e.value.message == message and e.value.usage


def test_invalid_value_with_option_is_a_warning():
    s, warnings = load(argv=["--option", "sandbox", "maybe"])
    assert warnings == ["error: option 'sandbox' has invalid value 'maybe'"]
    assert s.sandbox is True


def test_bool_spellings_and_sandbox_modes():
    s, _ = load({"/conf/nix.conf": "keep-outputs = yes\nrequire-sigs = 0\nsandbox = relaxed\n"})
    assert s.keep_outputs is True and s.require_sigs is False
    assert s.sandbox == "relaxed" and s.raw("sandbox") == "relaxed"


def test_int_unit_suffix_and_max_jobs_auto():
    s, _ = load({"/conf/nix.conf": "min-free = 1G\nmax-jobs = auto\n"})
    assert s.get("min-free") == 1 << 30
    assert s.max_jobs == max(1, os.cpu_count() or 1)


def test_experimental_features_unknown_warns():
    s, warnings = load({"/conf/nix.conf": "experimental-features = nix-command bogus\n"})
    assert s.experimental_features == {"nix-command"}
    assert warnings == ["unknown experimental feature 'bogus'"]


def test_unknown_settings_warn_once_sorted():
    files = {"/conf/nix.conf": "zzz = 1\naaa = 2\nzzz = 3\n"}
    _, warnings = load(files, argv=["--option", "mmm", "x"])
    assert warnings == ["unknown setting 'aaa'", "unknown setting 'mmm'",
                        "unknown setting 'zzz'"]


def test_every_table_default_parses_and_renders():
    for spec in settings_table.SETTINGS.values():
        value, _ = settings_table.parse_value(spec, spec.default)
        assert settings_table.render_value(spec, value) == " ".join(spec.default.split()) \
            or spec.kind in ("strset", "max-jobs")


def test_daemon_settings_of_spec_6_3_are_known():
    names = """store trusted-users allowed-users build-users-group auto-allocate-uids
    sandbox sandbox-fallback sandbox-paths max-jobs cores max-silent-time timeout
    keep-failed keep-going fallback substitute substituters trusted-substituters
    trusted-public-keys require-sigs secret-key-files keep-outputs keep-derivations
    auto-optimise-store min-free max-free min-free-check-interval gc-reserved-space
    builders builders-use-substitutes post-build-hook pre-build-hook connect-timeout
    build-poll-interval max-substitution-jobs log-lines max-build-log-size
    keep-build-log compress-build-log narinfo-cache-negative-ttl
    narinfo-cache-positive-ttl system extra-platforms system-features
    experimental-features use-cgroups use-sqlite-wal fsync-metadata json-log-path
    nixwarden-worker-user""".split()
    assert [n for n in names if settings_table.lookup(n) is None] == []


# --- layering (§6.1) -------------------------------------------------------

def test_precedence_system_user_files_nix_config_command_line():
    env = {"NIX_USER_CONF_FILES": "/u/first.conf:/u/second.conf",
           "NIX_CONFIG": "log-lines = 4\nextra-substituters = env"}
    files = {"/conf/nix.conf": "log-lines = 1\ncores = 1\nmax-jobs = 1\n"
                               "substituters = sys\ntimeout = 1\n",
             "/u/second.conf": "cores = 2\nmax-jobs = 2\nextra-substituters = second\n",
             "/u/first.conf": "max-jobs = 3\nextra-substituters = first\ntimeout = 3\n"}
    s, _ = load(files, env=env, argv=["--timeout", "5", "--extra-substituters", "cli"])
    assert s.cores == 2                           # second user file over nix.conf
    assert s.max_jobs == 3                        # first listed user file wins
    assert s.get("log-lines") == 4                # NIX_CONFIG over files
    assert s.get("timeout") == 5                  # command line over everything
    assert s.substituters == ("sys", "second", "first", "env", "cli")
    assert "log-lines" in s.overridden and "substituters" in s.overridden


def test_system_conf_is_not_overridden():
    s, _ = load({"/conf/nix.conf": "keep-outputs = true\n"})
    assert "keep-outputs" not in s.overridden


def test_xdg_lookup_when_user_conf_files_unset():
    env = {"NIX_USER_CONF_FILES": None}
    environ = {k: v for k, v in dict(BASE_ENV, **env).items() if v is not None}
    environ.update(XDG_CONFIG_HOME="/x/home", XDG_CONFIG_DIRS="/x/d1:/x/d2")
    assert config.user_config_files(environ) == [
        "/x/home/nix/nix.conf", "/x/d1/nix/nix.conf", "/x/d2/nix/nix.conf"]
    environ = {"HOME": "/home/u"}
    assert config.user_config_files(environ) == [
        "/home/u/.config/nix/nix.conf", "/etc/xdg/nix/nix.conf"]
    files = {"/x/d2/nix/nix.conf": "cores = 7\nmax-jobs = 7\n",
             "/x/home/nix/nix.conf": "cores = 8\n"}
    s, _ = config.load_settings(dict(environ, XDG_CONFIG_HOME="/x/home",
                                     XDG_CONFIG_DIRS="/x/d1:/x/d2",
                                     NIX_CONF_DIR="/conf"), 0, (), fake_fs(files))
    assert (s.cores, s.max_jobs) == (8, 7)


def test_command_line_setting_flags():
    s, warnings = load(argv=["--no-require-sigs", "--keep-outputs", "--relaxed-sandbox",
                             "--store", "local", "-j", "5", "-K", "-k", "--fallback",
                             "--cores", "1K", "--max-silent-time", "7",
                             "--option", "binary-caches", "x",
                             "--extra-experimental-features", "flakes"])
    assert warnings == []
    assert s.require_sigs is False and s.keep_outputs is True
    assert s.sandbox == "relaxed" and s.store == "local" and s.max_jobs == 5
    assert s.get("keep-failed") and s.get("keep-going") and s.get("fallback")
    assert s.cores == 1024 and s.get("max-silent-time") == 7
    assert s.substituters == ("x",)
    assert s.experimental_features == {"flakes"}


def test_command_line_order_is_kept():
    s, _ = load(argv=["--max-jobs", "2", "--option", "max-jobs", "3"])
    assert s.max_jobs == 3
    s, _ = load(argv=["--option", "max-jobs", "3", "--max-jobs", "2"])
    assert s.max_jobs == 2


def test_flag_with_bad_value_is_fatal():
    with pytest.raises(ConfigError) as e:
        load(argv=["--max-jobs", "x"])
    assert e.value.usage and e.value.origin == "--max-jobs"


def test_offline_and_refresh():
    s, _ = load()
    off = s.with_network_mode(offline=True, refresh=False)
    assert off.get("substitute") is False
    assert off.get("tarball-ttl") == 2**32 - 1
    assert off.get("download-attempts") == 0 and off.get("connect-timeout") == 1
    user, _ = load(argv=["--substitute"])
    assert user.with_network_mode(offline=True, refresh=False).get("substitute") is True
    assert s.with_network_mode(offline=False, refresh=True).get("tarball-ttl") == 0


# --- Settings object -------------------------------------------------------

def test_settings_is_immutable_and_copies_share_nothing():
    s, _ = load()
    with pytest.raises(Exception):
        s.values["cores"] = 5
    with pytest.raises(Exception):
        s.store = "x"
    t = s.with_values({"cores": 9})
    assert (s.cores, t.cores) == (max(1, os.cpu_count() or 1), 9)
    with pytest.raises(KeyError):
        s.get("no-such-setting")


# --- SetOptions overrides (worker-protocol.md §5.16) ------------------------

@pytest.fixture
def daemon_settings():
    s, _ = load({"/conf/nix.conf":
                 "substituters = https://cache.nixos.org/ https://a.example/\n"
                 "trusted-substituters = https://t.example\n"})
    return s


def test_untrusted_allow_list(daemon_settings):
    s, warnings = daemon_settings.with_overrides(
        [("timeout", "5"), ("max-silent-time", "6"), ("build-poll-interval", "7"),
         ("connect-timeout", "8"), ("builders", "")], trusted=False)
    assert warnings == []
    assert [s.get(n) for n in ("timeout", "max-silent-time", "build-poll-interval",
                               "connect-timeout", "builders")] == [5, 6, 7, 8, ""]


def test_untrusted_restricted_settings(daemon_settings):
    s, warnings = daemon_settings.with_overrides(
        [("builders", "ssh://x"), ("build-timeout", "5"), ("keep-outputs", "true"),
         ("sandbox", "false")], trusted=False)
    assert s == daemon_settings
    assert warnings == [
        f"ignoring the client-specified setting '{n}', because it is a restricted "
        "setting and you are not a trusted user"
        for n in ("builders", "build-timeout", "keep-outputs", "sandbox")]


def test_untrusted_substituters_filtered(daemon_settings):
    s, warnings = daemon_settings.with_overrides(
        [("binary-caches", "https://a.example https://t.example https://evil.example/ "
                           "https://cache.nixos.org/")], trusted=False)
    assert s.substituters == ("https://a.example/", "https://t.example",
                              "https://cache.nixos.org/")
    assert warnings == ["ignoring untrusted substituter 'https://evil.example/'"]


def test_ignored_for_everyone(daemon_settings):
    for trusted in (False, True):
        s, warnings = daemon_settings.with_overrides(
            [("experimental-features", "ca-derivations"), ("ssh-auth-sock", "/x"),
             ("plugin-files", "/p.so")], trusted=trusted)
        assert s.experimental_features == frozenset()
        assert s.raw("plugin-files") == ""
        assert warnings == ["Ignoring the client-specified plugin-files."]


def test_trusted_overrides(daemon_settings):
    s, warnings = daemon_settings.with_overrides(
        [("keep-outputs", "true"), ("no-such", "1"), ("sandbox", "maybe"),
         ("substituters", "https://anything/"), ("extra-trusted-public-keys", "k:1")],
        trusted=True)
    assert warnings == ["error: option 'sandbox' has invalid value 'maybe'"]
    assert s.keep_outputs is True and s.sandbox is True
    assert s.substituters == ("https://anything/",)
    assert s.trusted_public_keys[-1] == "k:1"
    assert daemon_settings.keep_outputs is False


def test_configargparse_is_the_layering_engine():
    parser = config.build_parser(dict(BASE_ENV), fake_fs({"/conf/nix.conf": "cores = 3\n"}))
    import configargparse
    assert isinstance(parser, configargparse.ArgumentParser)
    namespace, rest = parser.parse_known_args(["--cores", "4"], env_vars={})
    assert rest == []
    assert [(a.name, a.value) for a in namespace.assignments] == [("cores", "3"),
                                                                  ("cores", "4")]


# --- differential: the same files given to real nix-daemon 2.8 -----------------

NIX_DAEMON = shutil.which("nix-daemon")
needs_nix = pytest.mark.skipif(NIX_DAEMON is None, reason="real nix-daemon not installed")


def real_nix_daemon(tmp_path, conf, *args, stdin=None):
    (tmp_path / "nix.conf").write_text(conf)
    env = {"PATH": os.environ.get("PATH", ""), "NIX_CONF_DIR": str(tmp_path),
           "NIX_USER_CONF_FILES": "/dev/null", "HOME": str(tmp_path)}
    return subprocess.run([NIX_DAEMON, *args], env=env, input=stdin, timeout=30,
                          capture_output=True, text=True)


def ours(tmp_path, conf, *argv):
    env = {"NIX_CONF_DIR": str(tmp_path), "NIX_USER_CONF_FILES": "/dev/null"}
    (tmp_path / "nix.conf").write_text(conf)
    return config.load_settings(env, 0, argv)


@needs_nix
@pytest.mark.parametrize("conf", [
    "sandbox = maybe\n", "keep-outputs = maybe\n", "cores = x\n", "max-jobs = x\n",
    "foo\n", "include nothere\n",
])
def test_bad_file_matches_real_nix(tmp_path, conf):
    real = real_nix_daemon(tmp_path, conf, "--version")
    with pytest.raises(ConfigError) as e:
        ours(tmp_path, conf)
    assert real.returncode == 1
    assert real.stderr.splitlines()[0] == f"error: {e.value.message}"
    assert ("\nTry '" in real.stderr) == e.value.usage


@needs_nix
def test_option_warning_and_unknown_setting_match_real_nix(tmp_path):
    conf = f"nosuch = 1\nstore = local?root={tmp_path}/root\n"
    real = real_nix_daemon(tmp_path, conf, "--option", "sandbox", "maybe",
                           "--option", "another", "2", "--stdio", stdin="")
    _, warnings = ours(tmp_path, conf, "--option", "sandbox", "maybe",
                       "--option", "another", "2")
    real_warnings = [line[len("warning: "):] for line in real.stderr.splitlines()
                     if line.startswith("warning: ")]
    assert real_warnings == warnings
