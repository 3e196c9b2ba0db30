"""Writing whole buffers to file descriptors (pipes, sockets, files).

``os.write`` and ``os.writev`` may write less than they were given (a
pipe or socket that is full, a signal); every caller that must write
everything uses these loops.  No buffering, no copying: the data is
written from where it lies.
"""

from __future__ import annotations

import os


def write_all(fd: int, data) -> None:
    """Write all of ``data`` (any bytes-like object) to ``fd``."""
    with memoryview(data) as view:
        while view:
            view = view[os.write(fd, view):]


def writev_all(fd: int, buffers: list) -> None:
    """Write all of ``buffers`` (bytes-like objects), in order, to ``fd``,
    gathered by ``os.writev`` rather than joined first."""
    bufs = list(buffers)
    while bufs:
        n = os.writev(fd, bufs)
        done = 0
        while done < len(bufs) and n >= len(bufs[done]):
            n -= len(bufs[done])
            done += 1
        bufs = bufs[done:]
        if n:
            bufs[0] = memoryview(bufs[0])[n:]
