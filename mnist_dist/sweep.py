"""Sweeps: many mnist_dist.train runs through one Optuna study, chosen on validation.

    python -m mnist_dist.sweep experiments/scaling-mnist-5k.yaml              # one trial at a time
    python -m mnist_dist.sweep experiments/scaling-mnist-5k.yaml --workers 2  # two at once
    sbatch --array=0-7 slurm/sweep.sh experiments/depth-fashion.yaml         # eight workers on a cluster

The SPEC (mnist_dist/sweep_spec.py, docs/experiments.md) names the sweep's directory. It holds one Optuna
study in a journal file (`study.journal`, which workers on several machines share through a shared file
system), and each trial in `trials/N/`: a point of the space trained once per seed, each seed a whole run
in `trials/N/seed-S/` with `--resume auto`. A trial belongs to the worker holding its lock
(`trials/N/.worker.lock`, an flock the OS drops when the worker dies): a worker that finds a running trial
whose lock is free continues it, so a killed or requeued worker's trial resumes from its checkpoint, and a
finished sweep started again runs nothing. At the end: trials.csv, summary.md and metric.png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import optuna
from filelock import FileLock, Timeout
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from .readback import UnreadableFile, read_json
from .stopping import EXIT_PREEMPTED
from .sweep_report import ERROR_NAME, describe, median, read_outcome, write_atomic, write_reports
from .sweep_spec import Spec, SpecError, read_spec

JOURNAL, SPEC_RECORD, ASK_LOCK, WORKER_LOCK = "study.journal", "sweep.json", ".ask.lock", ".worker.lock"
STUDY_NAME = "sweep"
LOG_TAIL_LINES = 20  # of a failed run's log, kept as the trial's error


class TrialFailed(Exception):
    """A run of the trial ended with an error; the message says which and why."""


def open_study(spec: Spec):
    """The sweep directory's study, created by the first worker; a directory holding another sweep is refused."""
    claim_dir(spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(spec.dir / JOURNAL)))
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, direction=spec.direction,
                               sampler=make_sampler(spec), load_if_exists=True)


def make_sampler(spec: Spec):
    if spec.sampler in ("grid", "random"):  # a grid's points are enqueued (`enqueue_grid`): none is drawn
        # unseeded: two workers with one seed would draw the same points
        return optuna.samplers.RandomSampler()
    # constant_liar: a running trial counts as a poor result, so parallel workers spread out
    return optuna.samplers.TPESampler(constant_liar=True)


def enqueue_grid(spec: Spec, study) -> None:
    """A grid's points not in the study yet, in the SPEC's order, as waiting trials that `ask` hands out one
    by one (under the ask lock). Optuna's GridSampler would stop the study from outside `optimize`."""
    for params in spec.grid():
        study.enqueue_trial(params, skip_if_exists=True)  # a point that has a trial, in any state, has had its turn


def distributions(spec: Spec) -> dict:
    made = {}
    for name, axis in spec.space.items():
        if isinstance(axis, list):
            made[name] = CategoricalDistribution(axis)
        elif axis["int"]:
            made[name] = IntDistribution(int(axis["low"]), int(axis["high"]), log=axis["log"],
                                         step=int(axis["step"] or 1))
        else:
            made[name] = FloatDistribution(axis["low"], axis["high"], log=axis["log"], step=axis["step"])
    return made


def claim_dir(spec: Spec) -> None:
    """The sweep's directory is this SPEC's: made for it, or made earlier by the same SPEC (checked by one
    worker at a time, under the ask lock, so that workers starting together agree)."""
    record = spec.dir / SPEC_RECORD
    existed = spec.dir.exists()
    spec.dir.mkdir(parents=True, exist_ok=True)
    with FileLock(spec.dir / ASK_LOCK):
        others = [p.name for p in spec.dir.iterdir() if p.name != ASK_LOCK]
        if existed and not record.exists() and others:
            raise SpecError(f"{spec.path}:{spec.lines.get(('dir',), 1)}: dir: {spec.dir} holds files of something "
                            f"other than a sweep ({', '.join(sorted(others)[:3])}); choose another dir")
        wanted = json.loads(json.dumps(spec.to_dict()))  # as it reads back: tuples become lists
        if not record.exists():
            write_atomic(record, json.dumps(wanted, indent=2) + "\n")
            return
        try:
            there = read_json(record)
        except UnreadableFile as err:
            raise SpecError(f"{spec.dir}: {err}; move the directory away, or choose another dir") from None
    differ = [key for key in wanted if there.get(key) != wanted[key]]
    if differ:
        raise SpecError(f"{spec.path}: dir: {spec.dir} holds a sweep of another SPEC (it differs in "
                        f"{', '.join(differ)}); choose another dir for this one, or put the SPEC back")


class Worker:
    """Trains trials, one at a time, until the study has none left for it (a thread; several share a study)."""

    def __init__(self, spec: Spec, study, name: str, stop: threading.Event):
        self.spec, self.study, self.name, self.stop = spec, study, name, stop
        self.process: subprocess.Popen | None = None  # the run in progress, for the stop signal
        self.crashed: str | None = None  # what ended this worker, if not the end of the sweep

    def run(self) -> None:
        try:
            self.work()
        except Exception as err:  # the storage, the disk, a bug: said, and the sweep's status says so
            self.crashed = f"{type(err).__name__}: {err}"
            traceback.print_exc()
            print(f"{self.name}: stopped by an error ({self.crashed}); its trial stays unfinished for the next "
                  "worker", file=sys.stderr, flush=True)

    def work(self) -> None:
        while not self.stop.is_set():
            taken = self.next_trial()
            if taken is None:
                return
            number, params, lock = taken
            try:
                self.run_trial(number, params)
            finally:
                lock.release()

    def next_trial(self) -> tuple[int, dict, FileLock] | None:
        """A running trial whose worker is gone, else a new point from the sampler, else None; with its lock."""
        with FileLock(self.spec.dir / ASK_LOCK):  # one worker at a time looks and asks, on every machine
            for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                lock = self.trial_lock(trial.number)
                if lock is None:
                    continue  # its worker is at it
                if set(trial.params) != set(self.spec.space):  # its worker died inside `ask`
                    self.study.tell(trial.number, state=TrialState.FAIL)
                    lock.release()
                    continue
                print(f"{self.name}: trial {trial.number} was left unfinished: continuing it", flush=True)
                return trial.number, trial.params, lock
            if self.spec.sampler == "grid":
                if not self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                    enqueue_grid(self.spec, self.study)  # the first worker; or points a worker killed while it enqueued lost
                if not self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                    return None
            elif len(self.study.get_trials(deepcopy=False)) >= self.spec.points():
                return None
            trial = self.study.ask(distributions(self.spec))
            return trial.number, trial.params, self.trial_lock(trial.number)

    def trial_lock(self, number: int) -> FileLock | None:
        where = self.spec.trial_dir(number)
        where.mkdir(parents=True, exist_ok=True)
        lock = FileLock(where / WORKER_LOCK, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return None
        return lock

    def run_trial(self, number: int, params: dict) -> None:
        """Each seed's run, then the trial's score (the median) to the study; a failure is recorded with its error."""
        scores = []
        for seed in self.spec.seeds:
            try:
                if not self.train(number, params, seed):
                    return  # stopped: the trial stays running, for the next worker to continue
            except TrialFailed as err:
                self.fail(number, str(err))
                return
            outcome = read_outcome(self.spec.trial_dir(number) / f"seed-{seed}")
            if outcome is None:
                self.fail(number, f"seed {seed}: the run ended without a results.json with a validation score")
                return
            scores.append(outcome[self.spec.choose_on])
            print(f"{self.name}: trial {number} seed {seed} ({describe(params)}): {self.spec.choose_on} "
                  f"{outcome[self.spec.choose_on]:.4f}, {outcome['seconds_per_epoch']:.1f} s/epoch", flush=True)
        self.study.tell(number, median(scores))

    def fail(self, number: int, error: str) -> None:
        """Record trial `number` as failed, with its error; the sweep goes on."""
        write_atomic(self.spec.trial_dir(number) / ERROR_NAME, error + "\n")
        self.study.tell(number, state=TrialState.FAIL)
        print(f"{self.name}: trial {number} failed: {error.splitlines()[0]}", flush=True)

    def train(self, number: int, params: dict, seed: int) -> bool:
        """One seed's run of the trial, to its end (True) or to a stop signal (False); TrialFailed otherwise."""
        run_dir = self.spec.trial_dir(number) / f"seed-{seed}"
        if not self.wait_while_locked(run_dir):
            return False
        argv = [*launcher(self.spec), *self.spec.train_flags(params), "--seed", str(seed),
                "--output-dir", str(run_dir), "--resume", "auto"]
        # W&B: one group per sweep, a name per run; each run's config holds its flags
        env = {**os.environ, "WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP") or f"sweep-{self.spec.dir.name}",
               "WANDB_NAME": f"{self.spec.dir.name}-trial-{number}-seed-{seed}"}
        log_path = self.spec.trial_dir(number) / f"seed-{seed}.log"
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
            if self.stop.is_set():  # a stop that came while it started
                self.process.terminate()
            status = self.process.wait()
        if status == 0:
            return True
        if status == EXIT_PREEMPTED or self.stop.is_set():
            return False
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        raise TrialFailed(f"seed {seed}: mnist_dist.train exited with {status} ({log_path}):\n" + "\n".join(tail))

    def wait_while_locked(self, run_dir: Path) -> bool:
        """Wait for a run that a killed worker left behind (its lock still held) to end: two never share a directory."""
        from .runs import LOCK_NAME  # here: runs imports torch, which the sweep's own process never needs

        if not (run_dir / LOCK_NAME).exists():
            return True
        lock, said = FileLock(run_dir / LOCK_NAME), False
        while not self.stop.is_set():
            try:
                lock.acquire(timeout=1)
                lock.release()
                return True
            except Timeout:
                if not said:
                    print(f"{self.name}: waiting for the process that still trains {run_dir} to end", flush=True)
                    said = True
        return False


def launcher(spec: Spec) -> list[str]:
    """How a trial's run starts: mnist_dist.train, or mnist_dist.launch of N processes that all get its flags."""
    if spec.processes == 1:
        return [sys.executable, "-m", "mnist_dist.train"]
    how = (["--config_file", spec.accelerate_config] if spec.accelerate_config else
           ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"])
    return [sys.executable, "-m", "mnist_dist.launch", *how, "--num_processes", str(spec.processes),
            "--main_process_port", str(free_port()), "-m", "mnist_dist.train"]


def free_port() -> int:
    """A port free now, for one trial's rendezvous: two trials on one machine do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(spec: Spec, study, workers: int) -> str:
    """`workers` workers on this machine until the study has nothing left for them: 'done', 'stopped' (a
    signal) or 'crashed' (an error ended a worker)."""
    stop = threading.Event()
    host = f"{socket.gethostname()}:{os.getpid()}"
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    team = [Worker(spec, study, f"sweep worker {host}" + (f" (array task {task})" if task else "")
                   + (f" #{i}" if workers > 1 else ""), stop) for i in range(workers)]

    def on_signal(signum, frame):
        stop.set()
        for worker in team:  # each run saves a checkpoint and exits 75; a restarted sweep continues it
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        print(f"mnist_dist.sweep: {signal.Signals(signum).name}: the runs save a checkpoint and stop; "
              "start the sweep again to continue", file=sys.stderr, flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(sig, on_signal)
    threads = [threading.Thread(target=worker.run, name=worker.name) for worker in team]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)  # the main thread stays free for the signal handler
    crashed = [worker.crashed for worker in team if worker.crashed]
    return "stopped" if stop.is_set() else "crashed" if crashed else "done"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mnist_dist.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="the sweep's SPEC file (YAML; docs/experiments.md)")
    parser.add_argument("--workers", type=int, default=1, help="trials trained at once on this machine (default: 1)")
    parser.add_argument("--report", action="store_true", help="only write trials.csv, summary.md and metric.png "
                        "from the trials so far")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.workers <= 256:
        parser.error(f"--workers {args.workers}: must be from 1 to 256")
    try:
        spec = read_spec(args.spec)
        study = open_study(spec)
    except SpecError as err:
        print(f"mnist_dist.sweep: error: {err}", file=sys.stderr)
        return 2
    ended = "done" if args.report else run_workers(spec, study, args.workers)
    summary = write_reports(spec, study)
    print(summary.headline, flush=True)
    if ended == "stopped":
        return EXIT_PREEMPTED
    return 1 if ended == "crashed" or summary.all_failed else 0


if __name__ == "__main__":
    sys.exit(main())
