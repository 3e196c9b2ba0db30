"""Builtin builders run in process by the builder child (spec §8.4, §8.10).

Holds ``run_builtin``, the entry point for a derivation whose builder is
``builtin:<name>``, and the small builders themselves:

* ``builtin:buildenv``: see ``buildenv``;
* ``builtin:fetchurl``: ``url`` (``file://``, ``http://``, ``https://``
  without certificate checks, as 2.8, since the output hash is checked),
  ``unpack = "1"`` (the download is a NAR, xz-decompressed when the URL
  ends in ``.xz``, restored to ``$out``), ``executable = "1"`` (mode 0755);
  for ``outputHashMode = "flat"`` each ``hashed-mirrors`` entry is tried
  first at ``<mirror>/<algo>/<base16 hash>``;
* ``builtin:unpack-channel``: unpack tarball ``src`` into ``$out``, which
  must then hold exactly one entry, renamed to ``channelName``.

As in Nix, a failure writes one ``error: …`` line to the log (stderr, the
pty) and gives exit status 1; warnings are ``@nix`` JSON log lines.

Process: the forked builder child, after it dropped to the build user (it
never runs as root); not inside bubblewrap, so what a sandboxed builder
could see is emulated by a restricted ``PathView``: the input closure and
the outputs.  ``file://`` URLs are resolved through it.

Trust: ``env`` is the client's derivation environment (with placeholders
already rewritten by the caller).  ``out_dir_map`` (logical output path ->
host path to create) and the input map come from the daemon.  Tarball
members are created below ``$out`` through directory descriptors opened
with ``O_NOFOLLOW``; names with ``..``, device nodes and links escaping
``$out`` are refused.  NARs go through the hardened parser and restorer.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import ssl
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import BinaryIO

from nixwarden.shared import nar
from nixwarden.shared.hashes import Hash, HashAlgo
from nixwarden.shared.logtypes import error_line, warning_line
from nixwarden.supervisor.build.buildenv import BuildenvError, builtin_buildenv
from nixwarden.supervisor.build.pathview import PathView
from nixwarden.supervisor.store.restore import Restorer

#: Seconds a download may stall (Nix's ``stalled-download-timeout``).
DOWNLOAD_TIMEOUT = 300
_CHUNK = 64 * 1024
_LVL_WARN = 1
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}


class BuiltinError(Exception):
    """A builtin builder failed; the message goes to the build log."""


def run_builtin(builder: str, env: Mapping[str, str], out_dir_map: Mapping[str, str], *,
                store_dir: str = "/nix/store", inputs: Mapping[str, str] | None = None,
                hashed_mirrors: Sequence[str] = (), log: BinaryIO | None = None) -> int:
    """Run builtin ``builder`` (``builtin:<name>``) and return its exit status.

    Args:
        builder: the derivation's builder string.
        env: the derivation environment (``out``, ``url``, …).
        out_dir_map: logical output path -> host path where it is created.
        store_dir: the logical store directory.
        inputs: logical store path -> host path of the input closure; when
            given (sandboxed builds) nothing else is readable; None means
            the host file system as is (non-sandboxed builds).
        hashed_mirrors: the ``hashed-mirrors`` setting.
        log: where log lines go (default: stderr, i.e. the pty).

    Returns:
        0 on success, 1 after writing Nix's error line to ``log``.
    """
    log = log if log is not None else sys.stderr.buffer
    entries = dict(inputs or {})
    entries.update(out_dir_map)
    view = PathView(store_dir, entries, restricted=inputs is not None)
    warn = _warner(log)
    try:
        _dispatch(builder, env, view, hashed_mirrors, warn)
    except (BuiltinError, BuildenvError, nar.NarError) as e:
        return _fail(log, str(e))
    except OSError as e:
        return _fail(log, _describe_os_error(e))
    return 0


def _dispatch(builder: str, env: Mapping[str, str], view: PathView,
              mirrors: Sequence[str], warn: Callable[[str], None]) -> None:
    if builder == "builtin:fetchurl":
        builtin_fetchurl(env, view, mirrors)
    elif builder == "builtin:buildenv":
        builtin_buildenv(env, view, warn)
    elif builder == "builtin:unpack-channel":
        builtin_unpack_channel(env, view)
    else:
        raise BuiltinError(f"unsupported builtin builder '{builder[8:]}'")


def _fail(log: BinaryIO, message: str) -> int:
    log.write((error_line(message) + "\n").encode("utf-8", "surrogateescape"))
    log.flush()
    return 1


def _warner(log: BinaryIO) -> Callable[[str], None]:
    """Warnings as Nix's JSON logger in a builtin child prints them."""
    def warn(message: str) -> None:
        line = json.dumps({"action": "msg", "level": _LVL_WARN,
                           "msg": warning_line(message)}, ensure_ascii=False)
        log.write(b"@nix " + line.encode("utf-8", "surrogateescape") + b"\n")
        log.flush()
    return warn


def _describe_os_error(e: OSError) -> str:
    if e.filename is not None:
        return f"'{e.filename}': {e.strerror}"
    return e.strerror or str(e)


def _get_attr(env: Mapping[str, str], name: str) -> str:
    try:
        return env[name]
    except KeyError:
        raise BuiltinError(f"attribute '{name}' missing") from None


# -- builtin:fetchurl ---------------------------------------------------------


def builtin_fetchurl(env: Mapping[str, str], view: PathView,
                     mirrors: Sequence[str] = ()) -> None:
    """Download ``url`` to ``$out`` (spec §8.10).

    Raises:
        BuiltinError: missing attribute or failed download.
        nar.NarError: ``unpack`` and the download is no valid NAR.
        OSError: writing the output failed.
    """
    out = _get_attr(env, "out")
    main_url = _get_attr(env, "url")
    unpack = env.get("unpack", "") == "1"
    xz = unpack and main_url.endswith(".xz")
    executable = env.get("executable") == "1"
    if _get_attr(env, "outputHashMode") == "flat":
        for url in _mirror_urls(env, mirrors):
            try:
                _fetch(url, view, view.host(out), unpack=unpack, xz=xz, executable=executable)
                return
            except (BuiltinError, nar.NarError, OSError):
                _remove_partial(view.host(out))
    _fetch(main_url, view, view.host(out), unpack=unpack, xz=xz, executable=executable)


def _mirror_urls(env: Mapping[str, str], mirrors: Sequence[str]) -> Iterator[str]:
    if not mirrors or not env.get("outputHash"):
        return
    algo_name = _get_attr(env, "outputHashAlgo")
    try:
        h = Hash.parse(env["outputHash"], HashAlgo.parse(algo_name) if algo_name else None)
    except ValueError:
        return
    for mirror in mirrors:
        yield mirror.rstrip("/") + f"/{h.algo.value}/{h.to_base16()}"


def _fetch(url: str, view: PathView, dest: str, *, unpack: bool, xz: bool,
           executable: bool) -> None:
    with _open_url(url, view) as source:
        chunks = _read_chunks(source, url)
        if xz:
            chunks = _unxz(chunks)
        if unpack:
            _restore_nar(chunks, dest)
        else:
            _write_chunks(chunks, dest)
    if executable:
        os.chmod(dest, 0o755)


def _open_url(url: str, view: PathView) -> BinaryIO:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "file":
        try:
            return open(view.resolve(urllib.parse.unquote(parsed.path)), "rb")
        except OSError as e:
            raise BuiltinError(f"unable to download '{url}': {e.strerror}") from None
    if parsed.scheme not in ("http", "https"):
        raise BuiltinError(f"unable to download '{url}': unsupported URL scheme")
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({} if parsed.hostname in _LOOPBACK else None),
        urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
    try:
        return opener.open(url, timeout=DOWNLOAD_TIMEOUT)
    except urllib.error.HTTPError as e:
        raise BuiltinError(f"unable to download '{url}': HTTP error {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise BuiltinError(f"unable to download '{url}': {reason}") from None


def _read_chunks(source: BinaryIO, url: str) -> Iterator[bytes]:
    while True:
        try:
            chunk = source.read(_CHUNK)
        except OSError as e:
            raise BuiltinError(f"unable to download '{url}': {e}") from None
        if not chunk:
            return
        yield chunk


def _unxz(chunks: Iterator[bytes]) -> Iterator[bytes]:
    dec = lzma.LZMADecompressor(lzma.FORMAT_XZ)
    try:
        for chunk in chunks:
            yield dec.decompress(chunk, _CHUNK)
            while not dec.needs_input and not dec.eof:
                yield dec.decompress(b"", _CHUNK)
            if dec.eof:
                break
    except lzma.LZMAError as e:
        raise BuiltinError(f"error while decompressing xz file: {e}") from None
    if not dec.eof:
        raise BuiltinError("error while decompressing xz file: truncated input")


def _write_chunks(chunks: Iterator[bytes], dest: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(dest, flags, 0o666)
    try:
        for chunk in chunks:
            with memoryview(chunk) as view:
                while view:
                    view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _restore_nar(chunks: Iterator[bytes], dest: str) -> None:
    parent_fd = os.open(os.path.dirname(dest) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    restorer = Restorer(parent_fd, os.path.basename(dest))
    parser = nar.NarParser()
    try:
        for chunk in chunks:
            for event in parser.feed(chunk):
                restorer.apply(event)
        for event in parser.feed(b""):
            restorer.apply(event)
    finally:
        restorer.close()
        os.close(parent_fd)


def _remove_partial(dest: str) -> None:
    if not os.path.lexists(dest):
        return
    if os.path.isdir(dest) and not os.path.islink(dest):
        for _top, _dirs, _files, fd in os.fwalk(dest):
            os.fchmod(fd, 0o700)
        shutil.rmtree(dest)
    else:
        os.unlink(dest)


# -- builtin:unpack-channel ---------------------------------------------------


def builtin_unpack_channel(env: Mapping[str, str], view: PathView) -> None:
    """Unpack ``src`` into ``$out`` and rename its single entry to ``channelName``.

    Raises:
        BuiltinError: missing attribute, bad tarball or name, not one entry.
        OSError: file system failures.
    """
    out = _get_attr(env, "out")
    channel_name = _get_attr(env, "channelName")
    src = _get_attr(env, "src")
    if channel_name in ("", ".", "..") or "/" in channel_name:
        raise BuiltinError(f"invalid channel name '{channel_name}'")
    out_host = view.host(out)
    os.makedirs(out_host, 0o755, exist_ok=True)
    try:
        archive = tarfile.open(view.resolve(src), "r:*")
    except (tarfile.TarError, OSError) as e:
        raise BuiltinError(f"cannot open tarball '{src}': {e}") from None
    with archive:
        extract_tar(archive, out_host)
    entries = os.listdir(out_host)
    if len(entries) != 1:
        raise BuiltinError(f"channel tarball '{src}' contains more than one file")
    os.rename(f"{out_host}/{entries[0]}", f"{out_host}/{channel_name}")


def extract_tar(archive: tarfile.TarFile, dest: str) -> None:
    """Extract ``archive`` below directory ``dest`` without leaving it.

    Raises:
        BuiltinError: an unsafe or unsupported member.
    """
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for member in archive:
            _extract_member(archive, member, root_fd)
    except tarfile.TarError as e:
        raise BuiltinError(f"failed to extract archive: {e}") from None
    finally:
        os.close(root_fd)


def _member_parts(name: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BuiltinError(f"tarball member '{name}' leaves the output")
    return parts


def _open_parent(root_fd: int, parts: list[str]) -> int:
    """A descriptor for the directory holding ``parts[-1]`` (made as needed)."""
    fd = os.dup(root_fd)
    for comp in parts[:-1]:
        try:
            os.mkdir(comp, 0o755, dir_fd=fd)
        except FileExistsError:
            pass
        try:
            nxt = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def _extract_member(archive: tarfile.TarFile, member: tarfile.TarInfo, root_fd: int) -> None:
    parts = _member_parts(member.name)
    if not parts:
        return
    parent = _open_parent(root_fd, parts)
    leaf = parts[-1]
    try:
        if member.isdir():
            try:
                os.mkdir(leaf, 0o755, dir_fd=parent)
            except FileExistsError:
                pass
            return
        _unlink_existing(parent, leaf)
        if member.issym():
            os.symlink(member.linkname, leaf, dir_fd=parent)
        elif member.islnk():
            target_parts = _member_parts(member.linkname)
            src_parent = _open_parent(root_fd, target_parts)
            try:
                os.link(target_parts[-1], leaf, src_dir_fd=src_parent, dst_dir_fd=parent,
                        follow_symlinks=False)
            finally:
                os.close(src_parent)
        elif member.isreg():
            _extract_file(archive, member, parent, leaf)
        else:
            raise BuiltinError(f"tarball member '{member.name}' has an unsupported type")
    finally:
        os.close(parent)


def _unlink_existing(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise BuiltinError(f"tarball member '{name}' replaces a directory") from None


def _extract_file(archive: tarfile.TarFile, member: tarfile.TarInfo, dir_fd: int,
                  leaf: str) -> None:
    mode = 0o755 if member.mode & 0o111 else 0o644
    fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as f, archive.extractfile(member) as data:
        while chunk := data.read(_CHUNK):
            f.write(chunk)
