"""Reasons for a run to stop at its next check point with a checkpoint: SIGTERM or SIGUSR1 (what
SLURM and launchers send before a time limit or preemption), or its launcher gone. No torch here:
the CLI installs the handlers before the heavy imports, so a signal at any moment is caught.
"""

from __future__ import annotations

import os
import signal

# exit status of a run that stopped on SIGTERM/SIGUSR1 after saving a checkpoint: "try again"
# (EX_TEMPFAIL); a scheduler or wrapper requeues the job and `--resume auto` continues it
EXIT_PREEMPTED = 75


class StopSignals:
    """Turn SIGTERM / SIGUSR1 into a flag that the loop reads between steps: a signal never interrupts
    a step or a checkpoint. Under torchrun or `accelerate launch` (LOCAL_RANK set) a launcher that died
    counts too: its workers would otherwise train on unsupervised and unstoppable."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        self._launcher = os.getppid() if "LOCAL_RANK" in os.environ else None

    def __enter__(self) -> "StopSignals":
        if not self._previous:  # entered once, however often a caller enters it
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum

    def reason(self) -> str | None:
        """Why this process should stop, or None."""
        if self.received:
            return f"signal {signal.Signals(self.received).name}"
        if self._launcher is not None and os.getppid() != self._launcher:
            return f"the loss of its launcher (process {self._launcher})"
        return None
