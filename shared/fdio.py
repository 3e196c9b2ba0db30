"""Writing whole buffers to file descriptors (pipes, sockets, files).

``os.write`` may write less than it was given (a pipe or socket that is
full, a signal); every caller that must write everything uses this one
loop.  No buffering, no copying: the data is written from where it lies.
"""

from __future__ import annotations

import os


def write_all(fd: int, data) -> None:
    """Write all of ``data`` (any bytes-like object) to ``fd``."""
    with memoryview(data) as view:
        while view:
            view = view[os.write(fd, view):]
