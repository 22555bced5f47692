"""Files written whole or not at all: each is written beside its final name under a temporary one, then
renamed over it, so that a reader (a resume, a sweep worker, another node) sees the old file or the new one,
never half of one, and a kill or a full disk half-way leaves the old one. No torch here: the sweep's own
process writes through it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from pathlib import Path


@contextlib.contextmanager
def replacing(path: Path, *, durable: bool = False, shared: bool = False):
    """Yield the temporary name to write `path` under; once the block has written it, rename it over `path`.
    `durable`: fsync it first (a crash then leaves the new file or the old, never an empty one). `shared`: a
    temporary name of this machine's, process's and thread's own, for files that several writers may write
    at once (a sweep's reports, the dataset cache on a shared file system). A failure leaves `path` as it was."""
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp" if shared
                         else f"{path.name}.tmp")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # nothing of it left behind (a directory in its way stays)
            tmp.unlink()
        raise


def write_text(path: Path, text: str, *, durable: bool = False, shared: bool = False) -> None:
    """`text` into `path`, whole or not at all (`replacing`)."""
    with replacing(path, durable=durable, shared=shared) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: dict) -> None:
    """`obj` into `path`, whole and on disk for good. Strict JSON: a NaN or infinity raises ValueError before
    anything is written."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n", durable=True)


def fsync_dir(path: Path) -> None:
    """Make the names in directory `path` (a rename into it) last through a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
