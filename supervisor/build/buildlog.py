"""Build logs on disk, as Nix stores them (spec local-store §8.9).

``<log dir>/drvs/<first two chars of the drv base name>/<rest>`` with
``.bz2`` when ``compress-build-log`` is on, written as the builder
produces output, so ``nix-store -l`` and ``nix log`` read it back.
Process: session.
"""

from __future__ import annotations

import bz2
import os


def log_path(log_dir: str, drv_base: str, compress: bool) -> str:
    return os.path.join(log_dir, "drvs", drv_base[:2],
                        drv_base[2:] + (".bz2" if compress else ""))


class BuildLogWriter:
    """An incrementally written (optionally bzip2-compressed) build log."""

    def __init__(self, log_dir: str, drv_base: str, compress: bool = True):
        self.path = log_path(log_dir, drv_base, compress)
        try:
            self._file = open(self.path, "wb")
        except FileNotFoundError:  # the first log under this prefix
            os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
            self._file = open(self.path, "wb")
        self._bz = bz2.BZ2Compressor() if compress else None

    def write(self, data: bytes) -> None:
        if self._bz is not None:
            data = self._bz.compress(data)
        if data:
            self._file.write(data)

    def close(self) -> None:
        if self._file.closed:
            return
        if self._bz is not None:
            self._file.write(self._bz.flush())
        self._file.close()


def store_build_log(log_dir: str, drv_base: str, chunks, *, compress: bool) -> None:
    """Store a log a client uploaded (AddBuildLog): written to a temporary
    name and renamed into place; an existing log is kept (spec §8.9)."""
    final = log_path(log_dir, drv_base, compress)
    if os.path.exists(final):
        for _ in chunks:
            pass
        return
    writer = BuildLogWriter(log_dir, drv_base, compress)
    temp = f"{final}.tmp.{os.getpid()}"
    os.rename(writer.path, temp)
    try:
        for data in chunks:
            writer.write(data)
        writer.close()
        os.rename(temp, final)
    except BaseException:
        writer.close()
        os.unlink(temp)
        raise
