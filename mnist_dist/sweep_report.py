"""What a sweep reports, from its study and its runs' results.json: trials.csv (every run), summary.md
(each point's median over seeds, the point chosen on validation and then its test accuracy) and
metric.png (the metric against each swept flag)."""

from __future__ import annotations

import csv
import io
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from . import atomic
from .readback import UnreadableFile, read_json
from .config import SCORES
from .sweep_spec import METRICS, Spec, as_flag

CSV_NAME, SUMMARY_NAME, PLOT_NAME, COST_PLOT_NAME = "trials.csv", "summary.md", "metric.png", "cost.png"
OUTCOME_KEYS = (*METRICS, "test_accuracy", "seconds_per_epoch", "train_seconds", "flops_per_sample")
ERROR_NAME = "error.txt"  # a failed trial's error, beside its runs
PRUNED_NAME = "pruned.txt"  # a pruned trial's: the step its first run reached and its score there
INTERRUPTED_NAME = "interrupted.txt"  # why a trial's run was ended from outside (the next start continues it)
WORKER_LOCK = ".worker.lock"  # a trial's: held by the worker training it, dropped by the OS when that worker dies


@dataclass
class Summary:
    headline: str  # what the sweep chose, and among how many of its points, in a line
    chose: bool  # a point was chosen
    whole: bool  # every point was trained, or failed for a reason of its own


@dataclass
class Point:
    """A trial that is a point of the space (one a worker died while asking is none), and what became of it."""
    trial: object  # optuna's FrozenTrial
    params: dict
    runs: dict  # seed -> its outcome (read_outcome), None until that run finished
    # finished | failed | pruned (stopped early by the pruner) | interrupted (ended from outside) | unfinished (its
    # worker is gone) | running (a worker trains it now) | waiting (queued) | gone (finished, then its results
    # were deleted)
    status: str
    why: str = ""  # the failure's or the interruption's first line
    metric: str = "val_accuracy"  # the SPEC's choose_on

    @property
    def score(self) -> float:
        """The point's median metric over its seeds (finished points only)."""
        return median([run[self.metric] for run in self.runs.values()])

    @property
    def seconds(self) -> float:
        """The point's median training seconds over its seeds (finished points only)."""
        return median([run["train_seconds"] for run in self.runs.values()])

    @property
    def flops(self) -> float | None:
        """FLOPs of training on a sample (the model's: the same for every seed); None where uncounted."""
        return next(iter(self.runs.values()))["flops_per_sample"]


def read_outcome(run_dir: Path) -> dict | None:
    """A finished run's numbers from its results.json: the final model on the validation split and the test
    set, and its training seconds per epoch; None while it has none (not yet finished)."""
    try:
        results = read_json(run_dir / "results.json")
        outcome = {**{f"val_{name}": results["validation"][name] for name in SCORES},
                   "test_accuracy": results["test_accuracy"], "train_seconds": results["train_seconds"],
                   "seconds_per_epoch": results["train_seconds"] / max(results["epochs"], 1)}
        flops = results.get("flops_per_sample")  # None: a model of yours FlopCounterMode could not count
    except (FileNotFoundError, UnreadableFile, KeyError, TypeError, AttributeError):
        return None
    if not all(isinstance(v, (int, float)) for v in outcome.values()):
        return None
    return outcome | {"flops_per_sample": flops if isinstance(flops, (int, float)) else None}


def median(values: list[float]) -> float:
    return statistics.median(values)


def score_text(metric: str, value: float) -> str:
    return f"{value:.2%}" if "accuracy" in metric else f"{value:.4f}"


def asked_whole(spec: Spec, trial) -> bool:
    """Whether `trial` has a value for every swept flag: a worker killed inside Optuna's `ask` leaves some out."""
    return set(trial.params) == set(spec.space)


def point_key(spec: Spec, params: dict) -> tuple:
    return tuple(str(params[name]) for name in spec.space)


def first_line(path: Path) -> str:
    text = path.read_text(errors="replace").strip() if path.is_file() else ""
    return text.splitlines()[0] if text else ""


def points_of(spec: Spec, trials: list) -> list[Point]:
    """The trials that are points, each with its runs' outcomes and its status, derived from the study's state
    and the runs' results.json (the truth: a finished trial whose results were deleted is `gone`)."""
    made = []
    for trial in trials:
        state = trial.state.name
        if state == "WAITING":  # queued, not asked yet: its point is Optuna's fixed_params
            made.append(Point(trial, trial.system_attrs.get("fixed_params", {}), {}, "waiting", metric=spec.choose_on))
            continue
        if not asked_whole(spec, trial):
            continue
        where = spec.trial_dir(trial.number)
        runs = {seed: read_outcome(where / f"seed-{seed}") for seed in spec.seeds}
        if all(runs.values()):
            status, why = "finished", ""
        elif state == "FAIL":
            status, why = "failed", first_line(where / ERROR_NAME)
        elif state == "PRUNED":
            status, why = "pruned", first_line(where / PRUNED_NAME)
        elif state == "COMPLETE":
            status, why = "gone", "its runs' results.json are gone: trained again as a new trial"
        elif held(where / WORKER_LOCK):
            status, why = "running", ""
        elif (where / INTERRUPTED_NAME).is_file():
            status, why = "interrupted", first_line(where / INTERRUPTED_NAME)
        else:
            status, why = "unfinished", "its worker is gone"
        made.append(Point(trial, trial.params, runs, status, why, metric=spec.choose_on))
    return made


def held(lock_path: Path) -> bool:
    """Whether a worker holds this lock now (on any machine that shares the directory)."""
    if not lock_path.exists():
        return False
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


def trial_rows(spec: Spec, points: list[Point]) -> list[dict]:
    """One row per run: the trial, its seed, its point, its numbers (blank until the run is finished)."""
    rows = []
    for point in points:
        where = spec.trial_dir(point.trial.number)
        for seed in spec.seeds:
            outcome = point.runs.get(seed)
            rows.append({"trial": point.trial.number, "seed": seed, "status": "finished" if outcome else point.status,
                         **point.params, **{k: (outcome or {}).get(k, "") for k in OUTCOME_KEYS},
                         "run_dir": str(where / f"seed-{seed}"), "error": point.why,
                         "flags": " ".join(spec.train_flags(point.params) + as_flag("seed", seed))})
    return rows


def write_reports(spec: Spec, study) -> Summary:
    """trials.csv, summary.md and metric.png in the sweep's directory (each replaced whole); the headline."""
    points = points_of(spec, study.get_trials(deepcopy=False))  # read once: each read replays the study's journal
    rows = trial_rows(spec, points)
    columns = ["trial", "seed", "status", *spec.space, *OUTCOME_KEYS, "run_dir", "error", "flags"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(spec.dir / CSV_NAME, text.getvalue())
    summary, text = summary_text(spec, points)
    write_atomic(spec.dir / SUMMARY_NAME, text)
    if any(row["status"] == "finished" for row in rows):
        plot_metric(spec, rows, spec.dir / PLOT_NAME)
    finished = tally(spec, points)[0]  # the points summary.md ranks: every seed finished
    if finished:
        plot_cost(spec, finished, spec.dir / COST_PLOT_NAME)
    return summary


def tally(spec: Spec, points: list[Point]) -> tuple[list[Point], list[Point], list[Point], dict[str, str]]:
    """The finished points, the points that failed for a reason of their own, the points the pruner stopped,
    and the others (named -> status), of what the sweep promised: a grid its points (a point trained twice
    counts once), random and tpe `trials` draws, a trial each (one whose results are gone counts through the
    trial that trains its point again)."""
    if spec.sampler == "grid":
        key_of = lambda p: point_key(spec, p.params)  # noqa: E731
        promised = [point_key(spec, params) for params in spec.grid()]
    else:
        again = {point_key(spec, p.params) for p in points if p.status != "gone"}
        points = [p for p in points if p.status != "gone" or point_key(spec, p.params) not in again]
        key_of = lambda p: p.trial.number  # noqa: E731
        promised = [p.trial.number for p in points]
    finished, failed, pruned, newest = {}, {}, {}, {}
    for point in points:
        key = key_of(point)
        newest[key] = point  # a point's newest trial says where it stands
        if point.status == "finished":
            finished.setdefault(key, point)
        elif point.status == "failed":
            failed.setdefault(key, point)
        elif point.status == "pruned":
            pruned.setdefault(key, point)
    failed = {key: point for key, point in failed.items() if key not in finished}
    pruned = {key: point for key, point in pruned.items() if key not in finished and key not in failed}
    others = {}
    for key in dict.fromkeys(promised):
        if key in finished or key in failed or key in pruned:
            continue
        point = newest.get(key)
        if point:
            others[f"{point_in_words(point.params)} ({point.status}{': ' + point.why if point.why else ''})"] = point.status
        else:
            others[f"{point_in_words(dict(zip(spec.space, key)))} (not trained yet)"] = "waiting"
    if spec.points() > len(promised):
        others[f"{spec.points() - len(promised)} point(s) not drawn yet"] = "waiting"
    return list(finished.values()), list(failed.values()), list(pruned.values()), others


def summary_text(spec: Spec, points: list[Point]) -> tuple[Summary, str]:
    """summary.md: each finished point's medians, best first, the failed and untrained points named, then the
    chosen point (among how many of the promised ones) and its test accuracy."""
    metric, total = spec.choose_on, spec.points()
    finished, failed, pruned, others = tally(spec, points)
    whole = set(others.values()) <= {"running"}  # every point decided (trained, failed, pruned), or in training
    stopped = (f", {len(pruned)} stopped early by the {spec.pruner['name']} pruner (on the first seed's validation "
               "scores)") if spec.pruned else ""
    lines = [f"# Sweep {spec.dir}", "",
             f"SPEC `{spec.path}`; {spec.sampler} sampler; seeds {', '.join(map(str, spec.seeds))}; each point scored "
             f"by its median `{metric}` over the seeds, on the validation split. {len(finished)} of {total} points "
             f"trained, {len(failed)} failed for a reason of their own{stopped}, "
             f"{total - len(finished) - len(failed) - len(pruned)} not trained ({time.strftime('%Y-%m-%d %H:%M')}, "
             f"{os.uname().nodename}).", ""]
    sign = -1 if spec.direction == "maximize" else 1
    best_first = sorted(finished, key=lambda p: (sign * p.score, p.trial.number))
    front = pareto_front(finished, sign)
    lines += ["| " + " | ".join([*spec.space, f"{metric} (median)", "train s (median)", "MFLOP/sample",
                                 "s/epoch (median)", "front", "trial"]) + " |",
              "|" + " --- |" * (len(spec.space) + 6)]
    for p in best_first:
        seconds = median([run["seconds_per_epoch"] for run in p.runs.values()])
        flops = "-" if p.flops is None else f"{p.flops / 1e6:.3g}"
        lines.append("| " + " | ".join([*(cell(p.params[n]) for n in spec.space), score_text(metric, p.score),
                                        f"{p.seconds:.2f}", flops, f"{seconds:.2f}",
                                        "yes" if p.trial.number in front else "", str(p.trial.number)]) + " |")
    if finished:
        lines.append(f"\n`front`: the Pareto front of {metric} against training seconds (no other point is better "
                     "in one and as good in the other); seconds are this machine's, with what else ran beside them.")
    for p in sorted(failed, key=lambda p: p.trial.number):
        lines.append(f"\nTrial {p.trial.number} ({point_in_words(p.params)}) failed: {p.why}")
    for p in sorted(pruned, key=lambda p: p.trial.number):
        lines.append(f"\nTrial {p.trial.number} ({point_in_words(p.params)}) {p.why}")
    if others:
        lines.append("\nNot trained yet: " + "; ".join(others))
    among = (f"among {len(finished)} of {total} points" + (f", {len(pruned)} pruned" if pruned else "")
             + (f" (not trained: {'; '.join(others)})" if others else ""))
    if not best_first:
        headline = f"mnist_dist.sweep: {spec.dir}: nothing to choose {among}; {len(failed)} failed"
        return Summary(headline, chose=False, whole=whole), "\n".join(lines + ["", headline]) + "\n"
    chosen = best_first[0]
    tests = [run["test_accuracy"] for run in chosen.runs.values()]
    headline = (f"mnist_dist.sweep: chose {among}: {point_in_words(chosen.params)} (median {metric} "
                f"{score_text(metric, chosen.score)}); its test accuracy, median over {len(tests)} seed(s): "
                f"{median(tests):.2%}; {spec.dir / SUMMARY_NAME}")
    lines += ["", f"**Chosen on validation:** {point_in_words(chosen.params)} (trial {chosen.trial.number}), "
                  f"median {metric} {score_text(metric, chosen.score)}; chose {among}.", "",
              f"**Its test accuracy** (the test set chose nothing): median {median(tests):.2%} "
              f"({', '.join(f'{a:.2%}' for a in tests)} for seeds {', '.join(map(str, spec.seeds))}).", "",
              cheapest_text(spec, finished, chosen, sign)]
    return Summary(headline, chose=True, whole=whole), "\n".join(lines) + "\n"


def pareto_front(points: list[Point], sign: int) -> set[int]:
    """Trial numbers of the points that no other point beats on both score and training seconds (`sign`: -1
    where a higher score is better)."""
    def beats(q: Point, p: Point) -> bool:
        at_least = sign * q.score <= sign * p.score and q.seconds <= p.seconds
        return at_least and (sign * q.score < sign * p.score or q.seconds < p.seconds)

    return {p.trial.number for p in points if not any(beats(q, p) for q in points if q is not p)}


def cheapest_within(spec: Spec, points: list[Point], best: Point, sign: int) -> Point:
    """The point of least median training seconds among those within `spec.within` of the best score."""
    near = [p for p in points if sign * (p.score - best.score) <= spec.within + 1e-12]
    return min(near, key=lambda p: (p.seconds, p.trial.number))


def cheapest_text(spec: Spec, points: list[Point], best: Point, sign: int) -> str:
    cheap = cheapest_within(spec, points, best, sign)
    margin = f"{spec.within:.2%}" if "accuracy" in spec.choose_on else f"{spec.within:g}"
    if cheap is best:
        return f"**Cheapest within {margin} of the best** (`within`): the chosen point itself."
    return (f"**Cheapest within {margin} of the best** (`within`): {point_in_words(cheap.params)} (trial "
            f"{cheap.trial.number}), median {spec.choose_on} {score_text(spec.choose_on, cheap.score)} in "
            f"{cheap.seconds:.1f} s of training, against {best.seconds:.1f} s for the chosen point "
            f"({best.seconds / max(cheap.seconds, 1e-9):.1f}x).")


def cell(value) -> str:
    """A swept value as the summary shows it: as the SPEC wrote it, a drawn float to 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) and len(str(value)) > 6 else str(value)


def point_in_words(params: dict) -> str:
    return ", ".join(f"{k} {cell(v)}" for k, v in params.items())


def plot_metric(spec: Spec, rows: list[dict], path: Path) -> None:
    """The metric of each finished run against each swept flag (dots: seeds; line: medians)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: the backend and figures of whoever imported this stay theirs

    done = [r for r in rows if r["status"] == "finished"]
    fig = Figure(figsize=(max(6.0, 4.5 * len(spec.space)), 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(spec.space), squeeze=False)
    for ax, name in zip(axes[0], spec.space):
        axis = spec.space[name]
        at = (lambda v: axis.index(v)) if isinstance(axis, list) else float
        ax.scatter([at(r[name]) for r in done], [r[spec.choose_on] for r in done], s=12, alpha=0.6)
        medians = sorted({at(r[name]): median([s[spec.choose_on] for s in done if s[name] == r[name]]) for r in done}.items())
        ax.plot([x for x, _ in medians], [y for _, y in medians], marker="o", color="black", linewidth=1)
        if isinstance(axis, list):
            ax.set_xticks(range(len(axis)), [str(v) for v in axis], rotation=40 if len(axis) > 4 else 0,
                          ha="right" if len(axis) > 4 else "center")
        elif axis["log"]:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(spec.choose_on)
    fig.suptitle(f"{spec.dir.name}: {spec.choose_on}, validation split (dots: seeds; line: median)", fontsize=9)
    fig.tight_layout()
    with atomic.replacing(path, shared=True) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def plot_cost(spec: Spec, finished: list[Point], path: Path) -> None:
    """Each finished point's median score against its median training seconds, the Pareto front drawn through
    them, the chosen point and the cheapest within `within` of it marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    sign = -1 if spec.direction == "maximize" else 1
    best = min(finished, key=lambda p: (sign * p.score, p.trial.number))
    cheap, front = cheapest_within(spec, finished, best, sign), pareto_front(finished, sign)
    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.scatter([p.seconds for p in finished], [p.score for p in finished], s=16, color="grey", label="points")
    edge = sorted((p.seconds, p.score) for p in finished if p.trial.number in front)
    ax.step([x for x, _ in edge], [y for _, y in edge], where="post", color="black", linewidth=1,
            label="Pareto front")
    ax.scatter([best.seconds], [best.score], s=60, facecolors="none", edgecolors="tab:blue", label="chosen")
    ax.scatter([cheap.seconds], [cheap.score], s=110, marker="s", facecolors="none", edgecolors="tab:orange",
               label=f"cheapest within {spec.within:g}")
    for p in finished:
        ax.annotate(str(p.trial.number), (p.seconds, p.score), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 1, 2, 5, 10, 20, ... seconds, written plainly
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training seconds (median over seeds, log scale)")
    ax.set_ylabel(f"{spec.choose_on} (median)")
    ax.legend(fontsize=7)
    fig.suptitle(f"{spec.dir.name}: {spec.choose_on} against the cost of training (numbers: trials)", fontsize=9)
    fig.tight_layout()
    with atomic.replacing(path, shared=True) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one; workers on several machines may each write it."""
    atomic.write_text(path, text, shared=True)
