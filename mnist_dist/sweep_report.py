"""What a sweep reports, from its study and its runs' results.json: trials.csv (every run), summary.md
(each point's median over seeds, the point chosen on validation and then its test accuracy) and
metric.png (the metric against each swept flag)."""

from __future__ import annotations

import csv
import io
import os
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .readback import UnreadableFile, read_json
from .sweep_spec import Spec, as_flag

CSV_NAME, SUMMARY_NAME, PLOT_NAME = "trials.csv", "summary.md", "metric.png"
OUTCOME_KEYS = ("val_accuracy", "val_loss", "test_accuracy", "seconds_per_epoch")
ERROR_NAME = "error.txt"  # a failed trial's error, beside its runs


@dataclass
class Summary:
    headline: str  # what the sweep chose, in a line
    all_failed: bool


def read_outcome(run_dir: Path) -> dict | None:
    """A finished run's numbers from its results.json: the final model on the validation split and the test
    set, and its training seconds per epoch; None while it has none (not yet finished)."""
    try:
        results = read_json(run_dir / "results.json")
        outcome = {"val_accuracy": results["validation"]["accuracy"], "val_loss": results["validation"]["loss"],
                   "test_accuracy": results["test_accuracy"],
                   "seconds_per_epoch": results["train_seconds"] / max(results["epochs"], 1)}
    except (FileNotFoundError, UnreadableFile, KeyError, TypeError):
        return None
    return outcome if all(isinstance(v, (int, float)) for v in outcome.values()) else None


def median(values: list[float]) -> float:
    return statistics.median(values)


def shown(metric: str, value: float) -> str:
    return f"{value:.2%}" if "accuracy" in metric else f"{value:.4f}"


def trial_rows(spec: Spec, trials: list) -> list[dict]:
    """One row per run: the trial, its seed, its point, its numbers (blank until the run is finished)."""
    rows = []
    for trial in trials:
        where = spec.trial_dir(trial.number)
        error = (where / ERROR_NAME).read_text(errors="replace") if (where / ERROR_NAME).is_file() else ""
        for seed in spec.seeds:
            outcome = read_outcome(where / f"seed-{seed}")
            status = "finished" if outcome else trial.state.name.lower()
            rows.append({"trial": trial.number, "seed": seed, "status": status, **trial.params,
                         **{k: (outcome or {}).get(k, "") for k in OUTCOME_KEYS},
                         "run_dir": str(where / f"seed-{seed}"), "error": error.strip().splitlines()[0] if error else "",
                         "flags": " ".join(spec.train_flags(trial.params) + as_flag("seed", seed))})
    return rows


def write_reports(spec: Spec, study) -> Summary:
    """trials.csv, summary.md and metric.png in the sweep's directory (each replaced whole); the headline."""
    trials = study.get_trials(deepcopy=False)  # read once: each read replays the study's journal
    rows = trial_rows(spec, trials)
    columns = ["trial", "seed", "status", *spec.space, *OUTCOME_KEYS, "run_dir", "error", "flags"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(spec.dir / CSV_NAME, text.getvalue())
    summary, headline = summary_text(spec, trials, rows)
    write_atomic(spec.dir / SUMMARY_NAME, summary)
    if any(row["status"] == "finished" for row in rows):
        plot_metric(spec, rows, spec.dir / PLOT_NAME)
    failed = [t for t in trials if t.state.name == "FAIL"]
    return Summary(headline, all_failed=bool(failed) and len(failed) == len(trials))


def summary_text(spec: Spec, trials: list, rows: list[dict]) -> tuple[str, str]:
    """summary.md: each point's medians, best first, then the chosen point and its test accuracy."""
    metric = spec.choose_on
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    counts = {state: sum(t.state.name == state for t in trials) for state in ("COMPLETE", "FAIL", "RUNNING")}
    lines = [f"# Sweep {spec.dir}", "",
             f"SPEC `{spec.path}`; {spec.sampler} sampler; seeds {', '.join(map(str, spec.seeds))}; each point scored "
             f"by its median `{metric}` over the seeds, on the validation split. {counts['COMPLETE']} of "
             f"{spec.points()} points done, {counts['FAIL']} failed, {counts['RUNNING']} running "
             f"({time.strftime('%Y-%m-%d %H:%M')}, {os.uname().nodename}).", ""]
    best_first = sorted(complete, key=lambda t: (-t.value if spec.direction == "maximize" else t.value, t.number))
    lines += ["| " + " | ".join([*spec.space, f"{metric} (median)", "s/epoch (median)", "trial"]) + " |",
              "|" + " --- |" * (len(spec.space) + 3)]
    for t in best_first:
        seconds = [r["seconds_per_epoch"] for r in rows if r["trial"] == t.number and r["status"] == "finished"]
        lines.append("| " + " | ".join([*(cell(t.params[n]) for n in spec.space), shown(metric, t.value),
                                        f"{median(seconds):.2f}" if seconds else "", str(t.number)]) + " |")
    for t in trials:
        if t.state.name == "FAIL":
            error = next(r["error"] for r in rows if r["trial"] == t.number)
            lines.append(f"\nTrial {t.number} ({describe(t.params)}) failed: {error}")
    if not best_first:
        headline = f"mnist_dist.sweep: {spec.dir}: no point finished yet ({counts['FAIL']} failed)"
        return "\n".join(lines + ["", headline]) + "\n", headline
    chosen = best_first[0]
    tests = [r["test_accuracy"] for r in rows if r["trial"] == chosen.number]
    headline = (f"mnist_dist.sweep: chose {describe(chosen.params)} (median {metric} {shown(metric, chosen.value)}); "
                f"its test accuracy, median over {len(tests)} seed(s): {median(tests):.2%}; {spec.dir / SUMMARY_NAME}")
    lines += ["", f"**Chosen on validation:** {describe(chosen.params)} (trial {chosen.number}), median {metric} "
                  f"{shown(metric, chosen.value)}.", "",
              f"**Its test accuracy** (the test set chose nothing): median {median(tests):.2%} "
              f"({', '.join(f'{a:.2%}' for a in tests)} for seeds {', '.join(map(str, spec.seeds))})."]
    return "\n".join(lines) + "\n", headline


def cell(value) -> str:
    """A swept value as the summary shows it: as the SPEC wrote it, a drawn float to 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) and len(str(value)) > 6 else str(value)


def describe(params: dict) -> str:
    return ", ".join(f"{k} {cell(v)}" for k, v in params.items())


def plot_metric(spec: Spec, rows: list[dict], path: Path) -> None:
    """The metric of each finished run against each swept flag (dots: seeds; line: medians)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "finished"]
    fig, axes = plt.subplots(1, len(spec.space), figsize=(max(6.0, 4.5 * len(spec.space)), 4), squeeze=False)
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
    tmp = temporary(path)
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def temporary(path: Path) -> Path:
    """A name beside `path` that no other worker (thread, process, machine) writes at once."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp")


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one; workers on several machines may each write it."""
    tmp = temporary(path)
    tmp.write_text(text)
    os.replace(tmp, path)
