"""A sweep's study is its journal file, `study.journal`: one JSON record of Optuna's a line, appended under
Optuna's lock by every worker, on every machine that shares the directory. Damage to it must never destroy
the study: a torn last record (a crash or a full disk mid-append) is set aside before anything is appended;
any other damage is an error naming the line, and `python -m mnist_dist.sweep SPEC --rebuild` rebuilds the
study from the runs (docs/experiments.md#a-damaged-journal).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from .sweep_spec import SpecError

MAX_RECORD_BYTES = 2**20  # a journal line: Optuna writes a few hundred bytes per record
REBUILD_HINT = "the runs' results.json are intact: docs/experiments.md#a-damaged-journal says how to go on"


class Journal(JournalFileBackend):
    """Optuna's journal file (one JSON record a line, appended under Optuna's lock), whose every append first
    sets aside a torn last record (a worker on any machine that died, or found the disk full, mid-append), so
    that a record never continues another's line and so corrupts the study for every reader."""

    def __init__(self, path: Path):
        self.path, self.lock = path, JournalFileSymlinkLock(str(path))
        super().__init__(str(path), lock_obj=self.lock)

    def append_logs(self, logs: list[dict]) -> None:
        self.lock.acquire()
        try:
            self.mend_tail()
            with open(self.path, "ab") as f:  # as Optuna's own append
                f.write(("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
        finally:
            self.lock.release()

    def check(self) -> None:
        """Read each record once, under the lock, before Optuna replays them: a damaged one is an error naming
        its line, before anything is appended; a torn last one is set aside."""
        self.lock.acquire()
        try:
            with open(self.path, "rb") as f:
                for number, line in enumerate(iter(lambda: f.readline(MAX_RECORD_BYTES + 1), b""), start=1):
                    if len(line) > MAX_RECORD_BYTES:
                        raise SpecError(f"{self.path}:{number}: a line over {MAX_RECORD_BYTES // 2**20} MiB, not a "
                                        f"record of Optuna's; {REBUILD_HINT}")
                    if not line.endswith(b"\n"):
                        break  # the torn last line: mended below
                    try:
                        record = json.loads(line)
                    except ValueError as err:
                        raise SpecError(f"{self.path}:{number}: a damaged record ({err}); {REBUILD_HINT}") from None
                    if not isinstance(record, dict) or "op_code" not in record:
                        raise SpecError(f"{self.path}:{number}: not a record of Optuna's journal; {REBUILD_HINT}")
            self.mend_tail()
        except OSError as err:
            raise SpecError(f"{self.path}: cannot read or mend it ({err.strerror or err})") from None
        finally:
            self.lock.release()

    def mend_tail(self) -> None:
        """Move the bytes after the last line end (a record cut short) to a file beside the journal."""
        with open(self.path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            start = end
            while start > 0:  # back to the last line end, a block at a time
                f.seek(max(0, start - 65536))
                block = f.read(start - max(0, start - 65536))
                cut = block.rfind(b"\n")
                if cut >= 0:
                    start = start - len(block) + cut + 1
                    break
                start -= len(block)
            f.seek(start)
            torn = f.read()
        if not torn:
            return
        aside = self.path.with_name(f"{self.path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            aside.write_bytes(torn)
            kept = f"set aside in {aside.name}"
        except OSError as err:  # the full disk that tore it, say: a record cut short is of no use to anyone
            kept = f"dropped ({aside.name} could not be written: {err.strerror or err})"
        os.truncate(self.path, start)
        print(f"mnist_dist.sweep: warning: {self.path} ended in a torn record ({len(torn)} bytes, from a crash or a "
              f"full disk while it was written): {kept}; the study goes on from the record before it",
              file=sys.stderr, flush=True)
