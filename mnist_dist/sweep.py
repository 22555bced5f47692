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
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import optuna
from filelock import FileLock, Timeout
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.trial import TrialState

from .readback import UnreadableFile, read_json
from .stopping import EXIT_OUTSIDE, EXIT_PREEMPTED
from .sweep_journal import REBUILD_HINT, Journal
from .sweep_report import (
    ERROR_NAME, INTERRUPTED_NAME, WORKER_LOCK, asked_whole, held, median, point_in_words, point_key, points_of,
    read_outcome, write_atomic, write_reports,
)
from .sweep_pruning import PRUNED_NAME, Curve, Decider, make_pruner, pruned_text, trial_of
from .sweep_spec import Spec, SpecError, read_spec

JOURNAL, SPEC_RECORD, ASK_LOCK, POINT_NAME = "study.journal", "sweep.json", ".ask.lock", "point.json"
STUDY_NAME = "sweep"
LOG_TAIL_LINES = 20  # of a failed run's log, kept as the trial's error
PRUNE_LOOK_S = 0.5  # how often a pruned sweep's worker reads its run's new scores


class TrialFailed(Exception):
    """A run of the trial failed for a reason of its point (its flags, its model, a non-finite loss): final."""


class TrialPruned(Exception):
    """The pruner stopped the trial's first run (with a checkpoint): args (step, score)."""


class TrialInterrupted(Exception):
    """A run of the trial was ended from outside (a signal, the disk, the storage, a lost peer): its checkpoints
    stay, and the next start of the sweep continues it."""


def open_study(spec: Spec):
    """The sweep directory's study, created by the first worker; a directory holding another sweep is refused."""
    claim_dir(spec)
    journal = Journal(spec.dir / JOURNAL)
    journal.check()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.create_study(study_name=STUDY_NAME, storage=JournalStorage(journal), direction=spec.direction,
                                   sampler=make_sampler(spec), pruner=make_pruner(spec), load_if_exists=True)
    except OSError as err:
        raise SpecError(f"{journal.path}: cannot read or write it ({err.strerror or err})") from None
    except Exception as err:  # records that parse but that Optuna cannot replay: named, never a traceback
        raise SpecError(f"{journal.path}: Optuna cannot replay the study from it ({type(err).__name__}: {err}); "
                        f"{REBUILD_HINT}") from None


def make_sampler(spec: Spec):
    if spec.sampler in ("grid", "random"):  # a grid's points are enqueued (`enqueue_grid`): none is drawn
        # unseeded: two workers with one seed would draw the same points
        return optuna.samplers.RandomSampler()
    # constant_liar: a running trial counts as a poor result, so parallel workers spread out
    return optuna.samplers.TPESampler(constant_liar=True)


def points_to_queue(spec: Spec, points: list) -> list[dict]:
    """Points that no trial stands for (`points`: `points_of` the study's trials), to be queued (asked in order
    by `ask`): the grid's points not in the study yet, or whose trial a worker killed inside `ask` left
    half-made; and any point whose finished trial's results were deleted, to be trained again. (Optuna's
    GridSampler would stop the study from outside `optimize`.)"""
    standing = {point_key(spec, p.params) for p in points if p.status != "gone"}
    wanted = spec.grid() if spec.sampler == "grid" else [p.params for p in points if p.status == "gone"]
    queued = {}
    for params in wanted:
        key = point_key(spec, params)
        if key not in standing:
            queued.setdefault(key, params)
    return list(queued.values())


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
    worker at a time, under the ask lock, so that workers starting together agree). Nothing is created in a
    directory that is refused."""
    line = spec.lines.get(("dir",), 1)
    try:
        if spec.dir.exists() and not spec.dir.is_dir():
            raise SpecError(f"{spec.path}:{line}: dir: {spec.dir} is a file, not a directory; choose another dir")
        if spec.dir.is_dir():
            check_only_a_sweep(spec, line)
        spec.dir.mkdir(parents=True, exist_ok=True)
        (spec.dir / ASK_LOCK).touch()  # an unwritable place fails here, not in an endless wait for the lock
        with FileLock(spec.dir / ASK_LOCK):
            check_only_a_sweep(spec, line)  # again, now that no other worker is making it
            record = spec.dir / SPEC_RECORD
            wanted = json.loads(json.dumps(spec.to_dict()))  # as it reads back: tuples become lists
            if not record.exists():
                write_atomic(record, json.dumps(wanted, indent=2) + "\n")
                return
            try:
                there = read_json(record)
            except UnreadableFile as err:
                raise SpecError(f"{spec.dir}: {err}; move the directory away, or choose another dir") from None
    except OSError as err:
        raise SpecError(f"{spec.path}:{line}: dir: {spec.dir}: cannot make or write the sweep's directory there "
                        f"({err.strerror or err}); choose another dir") from None
    differ = [key for key in wanted if there.get(key) != wanted[key]]
    if differ:
        raise SpecError(f"{spec.path}: dir: {spec.dir} holds a sweep of another SPEC (it differs in "
                        f"{', '.join(differ)}); choose another dir for this one, or put the SPEC back")


def check_only_a_sweep(spec: Spec, line: int) -> None:
    """A directory that exists is a sweep's (it has the SPEC's record) or holds nothing but what the first
    worker is making; else it is someone else's and is refused."""
    if (spec.dir / SPEC_RECORD).exists():
        return
    others = [p.name for p in spec.dir.iterdir() if p.name != ASK_LOCK and not p.name.startswith(SPEC_RECORD + ".")]
    if others:
        raise SpecError(f"{spec.path}:{line}: dir: {spec.dir} holds files of something other than a sweep "
                        f"({', '.join(sorted(others)[:3])}); choose another dir")


class Worker:
    """Trains trials, one at a time, until the study has none left for it (a thread; several share a study)."""

    def __init__(self, spec: Spec, study, name: str, stop: threading.Event, left: dict[int, str]):
        self.spec, self.study, self.name, self.stop = spec, study, name, stop
        self.left = left  # trial -> why its run was ended from outside: shared by the team, left for the next start
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
        """A running trial whose worker is gone, else a queued or new point, else None; with the trial's lock."""
        with FileLock(self.spec.dir / ASK_LOCK):  # one worker at a time looks and asks, on every machine
            trials = self.study.get_trials(deepcopy=False)
            for trial in trials:
                if trial.state != TrialState.RUNNING or trial.number in self.left:
                    continue
                lock = self.trial_lock(trial.number)
                if lock is None:
                    continue  # its worker is at it
                if not asked_whole(self.spec, trial):  # its worker died inside `ask`: its point is queued again below
                    self.study.tell(trial.number, state=TrialState.FAIL)
                    lock.release()
                    continue
                print(f"{self.name}: trial {trial.number} was left unfinished: continuing it", flush=True)
                (self.spec.trial_dir(trial.number) / INTERRUPTED_NAME).unlink(missing_ok=True)
                (self.spec.trial_dir(trial.number) / PRUNED_NAME).unlink(missing_ok=True)  # a prune the study missed
                self.record_point(trial.number, trial.params)  # its worker may have died before it did
                return trial.number, trial.params, lock
            points = points_of(self.spec, self.study.get_trials(deepcopy=False))
            queued = points_to_queue(self.spec, points)
            for params in queued:
                self.study.enqueue_trial(params)
            waiting = queued or any(p.status == "waiting" for p in points)
            standing = sum(p.status != "gone" for p in points)
            if not waiting and (self.spec.sampler == "grid" or standing >= self.spec.points()):
                return None
            trial = self.study.ask(distributions(self.spec))
            lock = self.trial_lock(trial.number)
            if lock is None:  # a directory of another study's (a journal replaced by hand)
                raise SpecError(f"{self.spec.trial_dir(trial.number)}: another worker holds it, though the study has "
                                f"just made trial {trial.number}; {REBUILD_HINT}")
            self.record_point(trial.number, trial.params)
            return trial.number, trial.params, lock

    def record_point(self, number: int, params: dict) -> None:
        """The point beside its runs: what a study rebuilt from the trial directories reads (`rebuild`); and in
        the study, for optuna-dashboard, its runs' directories and flags (the trial's user attributes)."""
        where = self.spec.trial_dir(number) / POINT_NAME
        if not where.is_file():
            write_atomic(where, json.dumps(params) + "\n")
        trial = trial_of(self.study, number)
        if "run_dirs" not in self.study.get_trials(deepcopy=False)[number].user_attrs:
            trial.set_user_attr("run_dirs", [str(self.spec.trial_dir(number) / f"seed-{s}") for s in self.spec.seeds])
            trial.set_user_attr("flags", " ".join(self.spec.train_flags(params)))

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
        """Each seed's run, then the trial's score (the median) to the study. A failure of the point's own is
        recorded with its error; a run ended from outside leaves the trial to the next start."""
        scores = []
        for seed in self.spec.seeds:
            run_dir = self.spec.trial_dir(number) / f"seed-{seed}"
            trained_before = finished(run_dir)  # by an earlier start: its results are read, not launched again
            # the first seed's scores go to the trial by step (the dashboard's curves), and decide for the point
            # where a pruner is set; those on disk first (a killed worker's)
            decider = Decider(self.study, number, run_dir, self.spec.choose_on) \
                if seed == self.spec.seeds[0] and not trained_before else None
            try:
                if decider and not run_in_progress(run_dir) and (at := decider.prune_at(first_look=True)):
                    raise TrialPruned(*at)
                if not trained_before and not self.train(number, params, seed, decider):
                    return  # stopped: the trial stays running, for the next worker to continue
            except TrialPruned as pruned:
                self.prune(number, *pruned.args)
                return
            except TrialFailed as err:
                self.fail(number, str(err))
                return
            except TrialInterrupted as err:
                self.leave(number, str(err))
                return
            outcome = read_outcome(run_dir)
            if outcome is None:
                self.fail(number, f"seed {seed}: the run ended without a results.json with a validation score")
                return
            scores.append(outcome[self.spec.choose_on])
            print(f"{self.name}: trial {number} seed {seed} ({point_in_words(params)}): {self.spec.choose_on} "
                  f"{outcome[self.spec.choose_on]:.4f}, {outcome['seconds_per_epoch']:.1f} s/epoch"
                  + (" (trained by an earlier start)" if trained_before else ""), flush=True)
        self.study.tell(number, median(scores))

    def fail(self, number: int, error: str) -> None:
        """Record trial `number` as failed, with its error; the sweep goes on."""
        write_atomic(self.spec.trial_dir(number) / ERROR_NAME, error + "\n")
        self.study.tell(number, state=TrialState.FAIL)
        print(f"{self.name}: trial {number} failed: {error.splitlines()[0]}", flush=True)

    def prune(self, number: int, step: int, value: float) -> None:
        """Record trial `number` as pruned at `step`: final, its other seeds are not trained."""
        said = pruned_text(self.spec, step, value, self.spec.trial_dir(number) / f"seed-{self.spec.seeds[0]}")
        write_atomic(self.spec.trial_dir(number) / PRUNED_NAME, said + "\n")
        self.study.tell(number, state=TrialState.PRUNED)
        print(f"{self.name}: trial {number} {said}", flush=True)

    def leave(self, number: int, why: str) -> None:
        """Leave trial `number` running, for the next start of the sweep to continue from its checkpoints; this
        start trains the other points and exits 1."""
        self.left[number] = why
        try:
            write_atomic(self.spec.trial_dir(number) / INTERRUPTED_NAME, why + "\n")
        except OSError as err:  # the disk that ended the run may refuse this too; the trial is left all the same
            print(f"{self.name}: could not record why trial {number} stopped ({err})", file=sys.stderr, flush=True)
        print(f"{self.name}: trial {number} was ended from outside ({why.splitlines()[0]}); left for the next start "
              "of the sweep to continue from its checkpoint", flush=True)

    def train(self, number: int, params: dict, seed: int, decider: Decider | None = None) -> bool:
        """One seed's run of the trial, to its end (True) or to the sweep's stop signal (False); TrialFailed,
        TrialInterrupted, or TrialPruned when `decider` stopped it, otherwise."""
        run_dir = self.spec.trial_dir(number) / f"seed-{seed}"
        if not self.wait_while_locked(run_dir):
            return False
        if finished(run_dir):  # the run a killed worker left behind ended while this one waited for it
            return True
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
            status, pruned = self.wait_for_run(decider)
        if status == 0:  # finished before the pruner's stop took effect: its results stand, its seeds follow
            return True
        if pruned and status == EXIT_PREEMPTED:  # stopped with a checkpoint, as the pruner asked (whatever else came)
            raise TrialPruned(*pruned)
        if self.stop.is_set():
            return False
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        if from_outside(status):
            said = next((line.split("error: ", 1)[1] for line in reversed(tail) if "error: " in line), "")
            raise TrialInterrupted(f"seed {seed}: mnist_dist.train {ended_how(status)}{': ' + said if said else ''} "
                                   f"({log_path})")
        raise TrialFailed(f"seed {seed}: mnist_dist.train exited with {status} ({log_path}):\n" + "\n".join(tail))

    def wait_for_run(self, decider: Decider | None) -> tuple[int, tuple[int, float] | None]:
        """The run's exit status; with a `decider`, its scores reported as they appear, and the run stopped as
        SIGTERM does (every process saves a checkpoint) where the pruner says so: (status, (step, score))."""
        pruned = None
        while True:
            try:
                status = self.process.wait(timeout=None if decider is None else PRUNE_LOOK_S)
                break
            except subprocess.TimeoutExpired:
                try:
                    if pruned is None and (pruned := decider.prune_at()):
                        self.process.send_signal(signal.SIGTERM)  # mnist_dist.launch passes it to every process
                except Exception as err:  # the study's storage: the run trains on, undecided, and says so
                    print(f"{self.name}: cannot report the run's scores to the study ({type(err).__name__}: {err}); "
                          "it trains on without the pruner", file=sys.stderr, flush=True)
                    decider = None
        if decider is not None:
            with contextlib.suppress(Exception):  # the last evaluation's score, for the record (decided above)
                decider.report_new()
        return status, pruned

    def wait_while_locked(self, run_dir: Path) -> bool:
        """Wait for a run that a killed worker left behind (its lock still held) to end: two never share a directory."""
        from .runs import LOCK_NAME  # here: --help answers before torch loads

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


# signals a process's own code raises (a crash of the model's or a library's code): the point's failure
CRASHES = {signal.SIGSEGV, signal.SIGABRT, signal.SIGILL, signal.SIGFPE, signal.SIGBUS}


def from_outside(status: int) -> bool:
    """Whether a run's exit status says nothing about its point: killed by a signal from outside (the OOM
    killer, a lost node, a person), stopped by one with a checkpoint (75), or failed for the disk, the storage
    or a lost peer (74; mnist_dist.launch's too when its processes were killed)."""
    if status < 0:
        return -status not in CRASHES
    return status > 128 or status in (EXIT_OUTSIDE, EXIT_PREEMPTED)


def ended_how(status: int) -> str:
    signum = -status if status < 0 else status - 128 if status > 128 else None
    if signum in {s.value for s in signal.Signals}:
        return f"was killed by {signal.Signals(signum).name}"
    return "stopped with a checkpoint on a signal" if status == EXIT_PREEMPTED else f"exited with {status}"


def rebuild(spec: Spec):
    """A new study from the trial directories, the old journal set aside (damaged, or lost): each trial keeps its
    number and directory; a trial whose runs all finished is complete with their median, one with an error.txt
    failed, any other queued again (the next start continues its runs from their checkpoints). A number without
    a point or runs (one abandoned inside `ask`) stays a failed trial without a point, so numbers line up. Done
    under the ask lock, with no worker at work, into a new file that replaces the journal only when whole."""
    claim_dir(spec)  # this SPEC's directory, or refused before anything moves
    journal, trials = spec.dir / JOURNAL, sorted((spec.dir / "trials").glob("[0-9]*"))
    with FileLock(spec.dir / ASK_LOCK):
        busy = [p.name for p in trials if held(p / WORKER_LOCK)]
        if busy:
            raise SpecError(f"{spec.dir}: a worker trains trial(s) {', '.join(busy)} now; stop every worker of the "
                            "sweep, then --rebuild")
        made = distributions(spec)
        points = {int(p.name): read_point(p / POINT_NAME) for p in trials if p.name.isdigit()}
        unplaced = [f"{n:04d}" for n, params in points.items() if not in_space(spec, made, params)
                    and (params is not None or any(spec.trial_dir(n).glob("seed-*")))]
        if unplaced:
            raise SpecError(f"{spec.dir}: trials {', '.join(unplaced)} have no point.json of this SPEC's space (made "
                            "before mnist_dist recorded it, or damaged): --rebuild cannot place their runs")
        fresh = journal.with_name(f"{JOURNAL}.rebuilding")
        fresh.unlink(missing_ok=True)
        study = optuna.create_study(study_name=STUDY_NAME, storage=JournalStorage(Journal(fresh)),
                                    direction=spec.direction)
        for number in range(max(points, default=-1) + 1):
            add_rebuilt(spec, study, made, number, points.get(number))
        if journal.exists():
            aside = journal.with_name(f"{JOURNAL}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(journal, aside)
            print(f"mnist_dist.sweep: {journal} set aside as {aside.name}", flush=True)
        os.replace(fresh, journal)
    print(f"mnist_dist.sweep: the study rebuilt from {len(points)} trial directories", flush=True)
    return open_study(spec)


def read_point(path: Path) -> dict | None:
    try:
        return read_json(path)
    except (FileNotFoundError, UnreadableFile):
        return None


def add_rebuilt(spec: Spec, study, made: dict, number: int, params: dict | None) -> None:
    """Trial `number` of a rebuilt study, as its directory says it stands."""
    if params is None:  # no runs either: a trial abandoned inside `ask`, its point asked again
        study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
        return
    where = spec.trial_dir(number)
    runs = [read_outcome(where / f"seed-{seed}") for seed in spec.seeds]
    curve = dict(Curve(where / f"seed-{spec.seeds[0]}", spec.choose_on).new_points())  # the scores by step
    attrs = {"run_dirs": [str(where / f"seed-{seed}") for seed in spec.seeds], "flags": " ".join(spec.train_flags(params))}
    if all(runs):
        study.add_trial(optuna.trial.create_trial(params=params, distributions=made, intermediate_values=curve,
                                                  value=median([run[spec.choose_on] for run in runs]), user_attrs=attrs))
    elif (where / ERROR_NAME).is_file():
        study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params=params, distributions=made))
    elif (where / PRUNED_NAME).is_file():  # final
        study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, params=params, distributions=made,
                                                  intermediate_values=curve, user_attrs=attrs))
    else:
        study.enqueue_trial(params)


def in_space(spec: Spec, made: dict, params) -> bool:
    """Whether a point.json holds a point of the SPEC's space (Optuna checks each value against its distribution)."""
    if not (isinstance(params, dict) and set(params) == set(spec.space)):
        return False
    try:
        optuna.trial.create_trial(params=params, distributions=made, value=0.0)
    except (ValueError, TypeError):
        return False
    return True


def launcher(spec: Spec) -> list[str]:
    """How a trial's run starts: mnist_dist.train, or mnist_dist.launch of N processes that all get its flags."""
    if spec.processes == 1:
        return [sys.executable, "-m", "mnist_dist.train"]
    how = (["--config_file", spec.accelerate_config] if spec.accelerate_config else
           ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"])
    return [sys.executable, "-m", "mnist_dist.launch", *how, "--num_processes", str(spec.processes),
            "--main_process_port", str(free_port()), "-m", "mnist_dist.train"]


def run_in_progress(run_dir: Path) -> bool:
    """Whether a process still trains in `run_dir` (its run lock held: a killed worker's run, still going)."""
    from .runs import LOCK_NAME  # here: --help answers before torch loads

    return held(run_dir / LOCK_NAME)


def finished(run_dir: Path) -> bool:
    """Whether the run in `run_dir` has finished: its results.json is there and describes the model beside it."""
    from .reporting import read_results  # here: --help answers before torch loads

    return read_results(run_dir)[0] is not None


def free_port() -> int:
    """A port free now, for one trial's rendezvous: two trials on one machine do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(spec: Spec, study, workers: int) -> str:
    """`workers` workers on this machine until the study has nothing left for them: 'done', 'stopped' (a
    signal), 'left' (a run was ended from outside: its trial waits for the next start) or 'crashed' (an error
    ended a worker)."""
    stop, left = threading.Event(), {}
    host = f"{socket.gethostname()}:{os.getpid()}"
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    team = [Worker(spec, study, f"sweep worker {host}" + (f" (array task {task})" if task else "")
                   + (f" #{i}" if workers > 1 else ""), stop, left) for i in range(workers)]

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
    return "stopped" if stop.is_set() else "crashed" if crashed else "left" if left else "done"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mnist_dist.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="the sweep's SPEC file (YAML; docs/experiments.md)")
    parser.add_argument("--workers", type=int, default=1, help="trials trained at once on this machine (default: 1)")
    parser.add_argument("--report", action="store_true", help="only write trials.csv, summary.md and metric.png "
                        "from the trials so far")
    parser.add_argument("--rebuild", action="store_true", help="set the study's journal aside and rebuild the study "
                        "from the trial directories (their point.json and results.json), then go on")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.workers <= 256:
        parser.error(f"--workers {args.workers}: must be from 1 to 256")
    try:
        spec = read_spec(args.spec)
        study = rebuild(spec) if args.rebuild else open_study(spec)
    except SpecError as err:
        print(f"mnist_dist.sweep: error: {err}", file=sys.stderr)
        return 2
    ended = "done" if args.report else run_workers(spec, study, args.workers)
    with FileLock(spec.dir / ASK_LOCK):  # no worker takes a trial while its lock is looked at (`held`)
        summary = write_reports(spec, study)
    print(summary.headline, flush=True)
    if ended == "stopped":
        return EXIT_PREEMPTED
    # 1: a worker crashed, a point is not trained yet (start again to continue it), or every point failed
    return 0 if ended == "done" and summary.whole and summary.chose else 1


if __name__ == "__main__":
    sys.exit(main())
