"""Short directories for Unix sockets.

A Unix socket's path may be at most 107 bytes (``sidecar.app.config.UNIX_PATH_MAX``: the kernel's ``sun_path``),
and a directory under pytest's ``tmp_path`` (``/tmp/pytest-of-USER/pytest-N/<test name>0/...``) or a work
directory nested a few levels deeper easily makes a socket path longer than that: gRPC then refuses it,
on the client's side only with a log line (``Path name should not have more than 107 characters``) and a
channel that never connects. Sockets therefore live in a directory of their own directly under ``/tmp``
(not ``$TMPDIR``, which may be long itself), made per use and removed by its owner.
"""

from __future__ import annotations

import pathlib
import tempfile

from sidecar.app.config import UNIX_PATH_MAX

SOCKET_ROOT = "/tmp"


def short_socket_dir(prefix: str = "ds-") -> pathlib.Path:
    """A new, empty directory for sockets, with room for a socket name of 64 bytes (the owner removes it)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=SOCKET_ROOT))
    assert len(str(path)) + 1 + 64 <= UNIX_PATH_MAX, path
    return path
