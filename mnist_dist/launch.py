"""`accelerate launch` whose exit status says what the training processes did.

    python -m mnist_dist.launch [accelerate launch flags] -m mnist_dist.train [train flags]

It takes `accelerate launch`'s flags and runs Accelerate's own launcher (torchrun underneath) in a
thread of this process. What it changes, for schedulers and scripts that read the status:
- SIGTERM and SIGUSR1 (and Ctrl-C) go to every training process, which saves a checkpoint; the status is 75
  when all did (`accelerate launch` exits 143 on SIGTERM and dies on SIGUSR1, torchrun exits 1);
- a command the training processes refuse ends it with their 2, not a ChildFailedError page;
- a node that waits for the others at the rendezvous says so, and a signal ends its wait;
- SIGUSR2 goes to every training process, which writes its Python stack (docs/hangs.md) and goes on.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import psutil

from .stopping import EXIT_OUTSIDE, EXIT_PREEMPTED, QuickExit

EXIT_USAGE = 2  # the training processes refused the command (they said why)
WAITING_NOTE = "MNIST_DIST_WAITING_NOTE"  # seconds at the rendezvous before a node says it waits (default 10)
stop_signals: list[int] = []  # the signals forwarded so far


def forward_stop(signum, frame) -> None:
    """Pass the stop to every training process; the launcher's thread then sees them end. Ctrl-C and
    SIGHUP (a closed terminal) stop them with a checkpoint too, sent on as SIGTERM; a second Ctrl-C ends
    them at once."""
    workers = psutil.Process().children()
    if not workers:
        if not stop_signals:
            sys.exit(128 + signum)  # still at the rendezvous: nothing started, nothing saved
        return  # the workers have stopped: their status stands
    if signum == signal.SIGINT and signal.SIGINT in stop_signals:  # a second Ctrl-C: stop now
        for worker in workers:
            worker.kill()
        os.write(2, b"mnist_dist.launch: second Ctrl-C: training processes killed; --resume auto continues from "
                    b"the newest checkpoint\n")
        os._exit(128 + signal.SIGINT)
    stop_signals.append(signum)
    # Ctrl-C and SIGHUP go on as SIGTERM: a worker still starting, before its handlers, ends quietly
    sent = signum if signum in (signal.SIGTERM, signal.SIGUSR1) else signal.SIGTERM
    for worker in workers:
        worker.send_signal(sent)
    print(f"mnist_dist.launch: {signal.Signals(signum).name} sent on as {signal.Signals(sent).name} to {len(workers)} "
          "training process(es); they stop at their next check with a checkpoint", file=sys.stderr, flush=True)


def forward_stacks(signum, frame) -> None:
    """SIGUSR2: every training process writes its Python stack into the run's stacks/ and trains on."""
    for worker in psutil.Process().children():
        worker.send_signal(signal.SIGUSR2)


def exit_status(codes: list[int]) -> int:
    """The launch's status from its training processes' statuses: theirs (75 after a stop signal, 2
    otherwise) when each process ended with it or was stopped by the launcher once one had (SIGTERM); 74
    when every process was killed by a signal or failed for a cause outside the run (the disk, a lost peer)."""
    expected = EXIT_PREEMPTED if stop_signals else EXIT_USAGE
    if expected in codes and set(codes) <= {expected, -signal.SIGTERM}:
        return expected  # 75: the checkpoint is complete (saving it is collective); 2: the first said why
    outside = all(code in (EXIT_OUTSIDE, EXIT_PREEMPTED) or code < 0 for code in codes)
    said = ", ".join(f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
                     else f"exit {code}" for code in sorted(codes))
    print(f"mnist_dist.launch: the training processes ended with {said}; errors they printed are above",
          file=sys.stderr)
    return EXIT_OUTSIDE if outside else 1


def note_while_waiting(args, first: float) -> None:
    """On a node of several, say where it waits while the other nodes have not joined yet (a thread): after
    `first` seconds, then every minute."""
    waited = first
    time.sleep(first)
    # num_machines is known once Accelerate has read the config file; children: the rendezvous is done
    while (args.num_machines or 1) > 1 and not psutil.Process().children():
        print(f"mnist_dist.launch: node {args.machine_rank} of {args.num_machines} has waited {waited} s for "
              f"the others at {args.main_process_ip}:{args.main_process_port} (the rendezvous)",
              file=sys.stderr, flush=True)
        time.sleep(60)
        waited += 60


def launch(args, outcome: dict) -> None:
    """Accelerate's launch of `args` (a thread): its exit status, or the error to raise, into `outcome`."""
    from accelerate.commands.launch import launch_command
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        launch_command(args)
        outcome["status"] = 0
    except ChildFailedError as err:  # failures: rank -> the process's exit code and end time
        outcome["status"] = exit_status([failure.exitcode for failure in err.failures.values()])
    except subprocess.CalledProcessError as err:  # Accelerate's one-process launch
        outcome["status"] = exit_status([err.returncode])
    except SystemExit as err:
        outcome["status"] = err.code
    except BaseException as err:  # re-raised in the main thread
        outcome["error"] = err


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command_parser

    args = launch_command_parser().parse_args(argv)
    if args.max_restarts:  # the agent would restart a group that a signal stopped
        print("mnist_dist.launch: error: --max_restarts: restarts are torchrun's (docs/resume.md, Fault tolerance); "
              "mnist_dist.launch stops on a signal", file=sys.stderr)
        return EXIT_USAGE
    first = os.environ.get(WAITING_NOTE, "10")
    if not (first.isascii() and first.isdigit() and len(first) <= 5 and 1 <= int(first) <= 86_400):
        print(f"mnist_dist.launch: error: {WAITING_NOTE}={first[:80]!r}: must be a whole number of seconds from 1 to "
              "86400", file=sys.stderr)
        return EXIT_USAGE
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward_stop)
    signal.signal(signal.SIGUSR2, forward_stacks)
    # forward_stop does what the agent would: drop its warning that it cannot from a thread
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        lambda record: "child thread" not in record.getMessage())
    threading.Thread(target=note_while_waiting, args=(args, int(first)), daemon=True).start()
    # the launch runs in a thread and the main thread only waits, so the stop signals are handled even
    # while the launch blocks in C++ (the rendezvous); the elastic agent, away from the main thread,
    # leaves SIGTERM and SIGUSR1 to forward_stop
    outcome = {}
    thread = threading.Thread(target=launch, args=(args, outcome), daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):  # the status is decided
        signal.signal(sig, signal.SIG_IGN)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["status"]


if __name__ == "__main__":
    QuickExit().end(main)  # made before accelerate loads torch: no teardown of it once the workers have ended
