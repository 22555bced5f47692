"""Reasons for a run to stop at its next check point with a checkpoint: SIGTERM or SIGUSR1 (what
SLURM and launchers send before a time limit or preemption), Ctrl-C, or its launcher gone. No torch here:
the CLI installs the handlers before the heavy imports, so a signal at any moment is caught.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import signal
import sys

# exit status of a run that stopped on SIGTERM/SIGUSR1 after saving a checkpoint: "try again"
# (EX_TEMPFAIL); a scheduler or wrapper requeues the job and `--resume auto` continues it
EXIT_PREEMPTED = 75
# exit status of a run that failed for a cause outside it (EX_IOERR): the disk or the storage failed, or a
# peer was lost. Its checkpoints are intact; `--resume auto` continues it once the cause is gone, and a
# sweep leaves its trial for the next start instead of failing the point
EXIT_OUTSIDE = 74


class StoppedAtOnce(BaseException):
    """A stop signal inside `StopSignals.at_once`: the run ends where it is, with nothing to save. A
    BaseException, so that code of a user's that catches Exception does not swallow it."""


class StopSignals:
    """Turn SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) into a flag that the loop reads between steps: a signal
    never interrupts a step or a checkpoint. Under torchrun or `accelerate launch` (LOCAL_RANK set) a
    launcher that died counts too: its workers would otherwise train on unsupervised and unstoppable.

    A second Ctrl-C of a process that no launcher supervises ends it at once, without a checkpoint
    (the newest one stays whole: checkpoints appear by a rename). Under a launcher the launcher passes
    Ctrl-C on as well, so a worker sees each Ctrl-C twice: there the launcher ends the workers."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name))
    # every thread's Python stack: to stderr, and while the run trains to its stacks/ (distributed.StallWatch)
    STACKS = getattr(signal, "SIGUSR2", None)

    def __init__(self):
        self.received: int | None = None
        self._interrupted = False  # a Ctrl-C came
        self._previous = {}
        self._entered = 0
        self._launcher = os.getppid() if "LOCAL_RANK" in os.environ else None
        self._at_once: str | None = None  # what runs now that a stop ends at once (`at_once`)

    def __enter__(self) -> "StopSignals":
        if not self._entered:  # installed once, and kept until the outermost `with` ends
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            if self.STACKS is not None:
                self._previous[self.STACKS] = signal.getsignal(self.STACKS)
                stacks_to(sys.stderr)
        self._entered += 1
        return self

    def __exit__(self, *exc) -> None:
        self._entered -= 1
        if self._entered:
            return
        if self.STACKS is not None:
            with contextlib.suppress(ValueError):
                faulthandler.unregister(self.STACKS)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @contextlib.contextmanager
    def at_once(self, what: str):
        """Within: a stop signal ends the run at once (StoppedAtOnce), for code that may never come back to a
        check, such as a model of a user's being imported and built, before there is anything to save."""
        if self.received:
            raise StoppedAtOnce(f"{self.reason()} during start-up; nothing new to save (it came before {what})")
        self._at_once = what
        try:
            yield
        finally:
            self._at_once = None

    def ignore_from_now(self) -> None:
        """Once the exit status is decided: further SIGTERM and SIGUSR1 change nothing. (Python's shutdown
        puts its handlers back to the default, which would let a late SIGTERM kill a process that saved its
        checkpoint with status 143; an ignored signal it leaves ignored.) Ctrl-C still ends a hung exit."""
        for sig in self.SIGNALS:
            if sig != signal.SIGINT:
                signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self._interrupted and self._launcher is None:
                os.write(2, b"\nmnist_dist: second Ctrl-C: stopped at once; --resume auto continues from the newest "
                            b"checkpoint\n")
                os._exit(128 + signal.SIGINT)
            self._interrupted = True
        self.received = self.received or signum
        if self._at_once:
            raise StoppedAtOnce(f"{self.reason()} during start-up; nothing new to save (it came while {self._at_once})")

    def reason(self) -> str | None:
        """Why this process should stop, or None."""
        if self.received:
            return f"signal {signal.Signals(self.received).name}"
        if self._launcher is not None and os.getppid() != self._launcher:
            return f"the loss of its launcher (process {self._launcher})"
        return None


class QuickExit:
    """Ends the process as soon as the other atexit handlers (W&B's, multiprocessing's, the trackers') have
    run, without the interpreter's teardown of torch, which takes 1-2 s and does nothing a finished run needs
    (measured on the 2-core VM: a process that imported torch takes ~1 s from its last atexit handler to its
    end; every file mnist_dist writes is closed by then). Made before torch is imported, so that its handler
    runs last. `status`: the exit status (1 until set: an uncaught exception's)."""

    def __init__(self):
        self.status = 1
        atexit.register(self._exit)

    def end(self, main, then=None) -> None:
        """Exit with the status `main()` returns (after `then()`), or with that of a SystemExit it raises."""
        try:
            self.status = main()
        except SystemExit as err:  # sys.exit(code) on the way: its code, not 1
            self.status = err.code if isinstance(err.code, int) else int(err.code is not None)
            raise
        if then is not None:
            then()
        sys.exit(self.status)

    def _exit(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed pipe: nothing left to say
                stream.flush()
        os._exit(self.status)


def stacks_to(file) -> bool:
    """SIGUSR2 writes every thread's Python stack to `file` (faulthandler: also while the main thread waits in a
    collective, where a Python handler would not run). False, and SIGUSR2 ignored, where `file` has no
    descriptor (a test's captured stderr)."""
    try:
        faulthandler.register(signal.SIGUSR2, file=file, all_threads=True)  # again: another file
        return True
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is both an OSError and a ValueError
        with contextlib.suppress(ValueError):
            faulthandler.unregister(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # its default would end the process
        return False
