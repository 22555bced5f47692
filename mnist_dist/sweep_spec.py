"""A sweep's SPEC file (YAML): what to train, what to vary, how to choose. Read and checked whole
before any trial starts; every error names the SPEC's file and line.

    dir: outputs/sweeps/scaling      # the sweep's directory: its study, trials and summary
    flags:                           # mnist_dist.train flags of every trial (names without --)
      dataset: mnist-5k
      cpu: true
      val-fraction: 0.1
    space:                           # a list: a grid; {low, high, log, step}: a range (random or tpe)
      normalization: [none, half, dataset]
    seeds: 3                         # each point trains with seeds 0, 1, 2 (or a list); scored by the median
    choose_on: val_accuracy          # or val_loss; the test set never chooses
    processes: 1                     # training processes per trial; more go through mnist_dist.launch
    pruner: median                   # stop losing points early: none, median, successive_halving, hyperband
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import yaml

from . import config

MAX_SPEC_BYTES = 2**20
MAX_NODES = 10_000  # YAML nodes: a SPEC is tens of lines
MAX_POINTS = 1_000  # grid points (before seeds): each is checked with the trainer's own parser
MAX_SEEDS = 100
MAX_DEPTH = 8  # YAML nesting: a SPEC nests 3 deep (space, a flag, a range)
MAX_VALUE_CHARS = 4096  # a path or a --model-args object; under Python's 4,300-digit integers
KEYS = ("dir", "flags", "space", "seeds", "choose_on", "sampler", "trials", "processes", "accelerate_config", "pruner",
        "within")
SAMPLERS = ("grid", "random", "tpe")
# Optuna's pruners and their settings: name -> (setting -> (lowest value, Optuna's argument, default)). Steps are
# the runs' optimizer steps, at which their validation scores are reported
PRUNERS = {
    "none": {},
    "median": {"startup_trials": (0, "n_startup_trials", 1), "warmup_steps": (0, "n_warmup_steps", 0)},
    "successive_halving": {"min_resource": (1, "min_resource", 1), "reduction_factor": (2, "reduction_factor", 3)},
    "hyperband": {"min_resource": (1, "min_resource", 1), "max_resource": (1, "max_resource", None),
                  "reduction_factor": (2, "reduction_factor", 3)},
}
METRICS = {f"val_{name}": better for name, better in config.SCORES.items()}  # a trial's, from results.json's validation
SET_BY_SWEEP = {"seed": "use `seeds`", "output_dir": "each trial runs in DIR/trials/N/seed-S",
                "resume": "each trial runs with --resume auto", "overwrite": "a sweep never removes a trial's run",
                "run_name": "each run is named DIR-trial-N-seed-S in W&B"}


class SpecError(ValueError):
    """A SPEC that cannot run; the message names the file and line."""


@dataclass
class Spec:
    path: Path
    dir: Path
    flags: dict  # flag name (dashes) -> YAML value
    space: dict  # flag name -> list of values, or {"low", "high", "log", "step"}
    seeds: list[int]
    choose_on: str = "val_accuracy"
    sampler: str = "grid"
    trials: int | None = None  # random and tpe: points to try
    processes: int = 1
    accelerate_config: str | None = None
    pruner: dict = field(default_factory=lambda: {"name": "none"})  # its name and settings (PRUNERS)
    within: float = 0.005  # the summary names the cheapest point whose score is this close to the best's
    lines: dict = field(default_factory=dict, repr=False, compare=False)  # key path -> line number

    @property
    def direction(self) -> str:
        return METRICS[self.choose_on]

    def grid(self) -> list[dict]:
        """Every point of a grid sampler's space, in the SPEC's order."""
        names = list(self.space)
        return [dict(zip(names, values)) for values in itertools.product(*(self.space[n] for n in names))]

    def points(self) -> int:
        return len(self.grid()) if self.sampler == "grid" else self.trials

    def train_flags(self, params: dict) -> list[str]:
        """mnist_dist.train's flags for the point `params`: no pictures (nobody looks at a trial's; the SPEC's
        `pictures: true` draws them), the SPEC's flags, then the point's."""
        return [arg for name, value in {"pictures": False, **self.flags, **params}.items()
                for arg in as_flag(name, value)]

    def trial_dir(self, number: int) -> Path:
        """Where trial `number` keeps its lock, its error and each seed's run (seed-S/) and log (seed-S.log)."""
        return self.dir / "trials" / f"{number:04d}"

    def to_dict(self) -> dict:
        """What makes the sweep: a directory is refused to a SPEC that differs in any of it."""
        made = {k: getattr(self, k) for k in ("flags", "space", "seeds", "choose_on", "sampler", "trials",
                                              "processes", "accelerate_config")}
        return made | ({"pruner": self.pruner} if self.pruned else {})  # a sweep of before pruners: the same

    @property
    def pruned(self) -> bool:
        """Whether losing points are stopped early (a pruner other than none)."""
        return self.pruner["name"] != "none"


def as_flag(name: str, value) -> list[str]:
    """One flag on the command line: True -> --name, False -> --no-name, else --name value."""
    if value is True:
        return [f"--{name}"]
    if value is False:
        return [f"--no-{name}"]
    return [f"--{name}", str(value)]


def read_spec(path: str | Path) -> Spec:
    """The SPEC at `path`, checked whole (SpecError naming the line otherwise)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"{path}: larger than {MAX_SPEC_BYTES // 2**20} MiB; a SPEC is tens of lines")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot read it ({err})") from None
    try:
        check_bounded(path, text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text) if root is not None else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise SpecError(f"{path}:{mark.line + 1 if mark else 1}: not YAML ({getattr(err, 'problem', err)})") from None
    except ValueError as err:  # an integer past Python's 4,300 digits
        raise SpecError(f"{path}: a value YAML cannot load ({err})") from None
    lines = {}
    if root is not None:
        note_lines(root, (), lines)
    return check_spec(path, values, lines)


def check_bounded(path: Path, text: str) -> None:
    """Refuse, before anything is built, what a SPEC never needs: aliases (an alias of an alias grows
    without bound), more than MAX_NODES values, nesting deeper than MAX_DEPTH."""
    depth = 0
    for count, event in enumerate(yaml.parse(text, Loader=yaml.SafeLoader)):
        depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
        if isinstance(event, yaml.AliasEvent) or count > MAX_NODES or depth > MAX_DEPTH:
            raise SpecError(f"{path}:{event.start_mark.line + 1}: YAML aliases (*name), nesting deeper than "
                            f"{MAX_DEPTH} and SPECs over {MAX_NODES:,} values are refused; write each value out")
        if isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_VALUE_CHARS:
            raise SpecError(f"{path}:{event.start_mark.line + 1}: a value over {MAX_VALUE_CHARS:,} characters")


def note_lines(node, key: tuple, lines: dict) -> None:
    """Each value's line by its key path, e.g. ('space', 'lr', 0); a key's own line for the whole entry."""
    lines[key] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            note_lines(v, key + (k.value,), lines)
            lines[key + (k.value,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            note_lines(v, key + (i,), lines)


class Failure:
    """Raises the SpecError of a key path, at the line the key is on: fail(("space", "lr", 1), "why")."""

    def __init__(self, path: Path, lines: dict):
        self.path, self.lines = path, lines

    def __call__(self, key: tuple, why: str) -> NoReturn:
        # a key YAML loads as something else (a date, a number) is found by its nearest enclosing entry
        line = next((self.lines[key[:n]] for n in range(len(key), 0, -1) if key[:n] in self.lines), 1)
        raise SpecError(f"{self.path}:{line}: {'.'.join(map(str, key)) + ': ' if key else ''}{why}")


def check_spec(path: Path, values, lines: dict) -> Spec:
    fail = Failure(path, lines)
    if not isinstance(values, dict):
        fail((), "a SPEC is a mapping with `flags`, `space`, `seeds`, ... (see docs/experiments.md)")
    for key in values:
        if key not in KEYS:
            fail((key,), f"unknown key; a SPEC has {', '.join(KEYS)}")
    flags, space = check_flags_and_space(values, fail)
    sampler, trials = check_sampler(values, space, fail)
    processes = values.get("processes", 1)
    if not (is_int(processes) and 1 <= processes <= 4096):
        fail(("processes",), "training processes per trial: an integer from 1")
    accelerate_config = values.get("accelerate_config")
    if accelerate_config is not None and not (isinstance(accelerate_config, str) and os.path.isfile(accelerate_config)):
        fail(("accelerate_config",), f"{accelerate_config!r}: not a file (an accelerate config, e.g. accelerate_configs/cpu.yaml)")
    if accelerate_config is not None and processes == 1:
        fail(("accelerate_config",), "launches trials of 2 or more processes: give `processes` too")
    where = values.get("dir")
    if where is not None and not (isinstance(where, str) and where):
        fail(("dir",), "the sweep's directory: a path")
    # resolved first: `x/nothere/..` and `a/x/../../a` are the directories they name, checked as such
    where = Path(os.path.realpath(where or Path("outputs") / "sweeps" / path.stem))
    choose_on = check_metric(values, fail)
    spec = Spec(path, where, flags, space, check_seeds(values, fail), choose_on, sampler, trials,
                processes, accelerate_config, check_pruner(values, fail), check_within(values, choose_on, fail), lines)
    check_with_trainer(spec, fail)
    check_can_prune(spec, fail)
    return spec


def check_pruner(values: dict, fail: Failure) -> dict:
    """`pruner`: a name, or a mapping of its name and settings (whole numbers, from PRUNERS)."""
    given = values.get("pruner", "none")
    pruner = {"name": given} if isinstance(given, str) else dict(given) if isinstance(given, dict) else None
    if pruner is None or not isinstance(pruner.get("name"), str) or pruner["name"] not in PRUNERS:
        named = pruner.get("name") if isinstance(pruner, dict) else given
        fail(("pruner", "name") if isinstance(given, dict) and "name" in given else ("pruner",),
             f"{named!r}: choose {', '.join(PRUNERS)} (or a mapping: name: median, with its settings)")
    settings = PRUNERS[pruner["name"]]
    for key, value in pruner.items():
        if key == "name":
            continue
        if key not in settings:
            fail(("pruner", key), f"not a setting of the {pruner['name']} pruner; it takes "
                                  f"{', '.join(settings) or 'none'}")
        if not (is_int(value) and value >= settings[key][0]):
            fail(("pruner", key), f"{value!r}: a whole number from {settings[key][0]}")
    return pruner


def check_within(values: dict, choose_on: str, fail: Failure) -> float:
    """`within`: how far from the best score a cheaper point may be and still be named (an accuracy's fraction:
    0.005 is half a point; a loss's difference)."""
    within = values.get("within", 0.005)
    top = 1 if "accuracy" in choose_on else math.inf
    if not (isinstance(within, (int, float)) and not isinstance(within, bool) and 0 <= within < top):
        fail(("within",), f"{within!r}: a number from 0" + (" to below 1 (a fraction of accuracy: 0.005 is half a "
                                                             "point)" if top == 1 else " (a difference of loss)"))
    return float(within)


def check_can_prune(spec: Spec, fail: Failure) -> None:
    """A pruner needs something to compare: more than its startup trials, and points that report more than
    one validation score (epoch ends, --eval-every points). The first seed's curve decides for its point."""
    if not spec.pruned:
        return
    startup = spec.pruner.get("startup_trials", 1)
    if spec.pruner["name"] == "median" and spec.points() <= startup:
        fail(("pruner",), f"the median pruner compares a run with the {startup} trial(s) finished before it, and the "
                          f"sweep has {spec.points()} point(s): it could never prune; lower startup_trials or drop it")
    for params in (spec.grid() if spec.sampler == "grid" else [{}]):
        cfg, _ = trainer_parse(spec.train_flags(params))
        if cfg is not None and cfg.epochs == 1 and cfg.eval_every is None:
            where = ("flags", "epochs") if "epochs" in spec.flags else ("pruner",)
            fail(where, f"the point {params or spec.flags} reports one validation score (1 epoch, no eval-every): "
                        "nothing to prune on; add `eval-every: N` (steps) or more epochs")


def check_flags_and_space(values: dict, fail: Failure) -> tuple[dict, dict]:
    """`flags` (flag -> value) and `space` (flag -> a list, or a range as a dict)."""
    flags, space = values.get("flags") or {}, values.get("space")
    if not isinstance(flags, dict):
        fail(("flags",), "must be a mapping of mnist_dist.train flags to values")
    if not isinstance(space, dict) or not space:
        fail(("space",), "must be a mapping of at least one mnist_dist.train flag to its values")
    kinds = {name.replace("_", "-"): kind for name, kind in config.flag_kinds().items()}
    for name, value in flags.items():
        check_flag_name("flags", name, kinds, fail)
        check_scalar(("flags", name), value, fail)
    for name, axis in space.items():
        check_flag_name("space", name, kinds, fail)
        if name in flags:
            fail(("space", name), "is in `flags` too; give it in one place")
        space[name] = check_axis(name, axis, kinds[name], fail)
    return flags, space


def check_sampler(values: dict, space: dict, fail: Failure) -> tuple[str, int | None]:
    """The sampler (grid by default where every entry is a list, else tpe), and the points to draw."""
    sampler = values.get("sampler") or ("grid" if all(isinstance(v, list) for v in space.values()) else "tpe")
    if sampler not in SAMPLERS:
        fail(("sampler",), f"{sampler!r}: choose {', '.join(SAMPLERS)}")
    ranges = [name for name, axis in space.items() if isinstance(axis, dict)]
    if sampler == "grid" and ranges:
        fail(("space", ranges[0]), "a range needs sampler: random or tpe (a grid takes lists)")
    trials = values.get("trials")
    if sampler == "grid" and trials is not None:
        fail(("trials",), "a grid tries each of its points; `trials` is for random and tpe")
    if sampler != "grid" and not (is_int(trials) and 1 <= trials <= MAX_POINTS):
        where = ("trials",) if "trials" in values else ("sampler",) if "sampler" in values else ("space", ranges[0])
        fail(where, f"the {sampler} sampler (ranges draw points) needs `trials`: points to try, 1 to {MAX_POINTS:,}")
    return sampler, trials


def check_seeds(values: dict, fail: Failure) -> list[int]:
    seeds = values.get("seeds", 1)
    if is_int(seeds) and 1 <= seeds <= MAX_SEEDS:
        seeds = list(range(seeds))
    if not (isinstance(seeds, list) and seeds and len(seeds) <= MAX_SEEDS
            and all(is_int(s) and 0 <= s < 2**32 for s in seeds) and len(set(seeds)) == len(seeds)):
        fail(("seeds",), f"a count (1 to {MAX_SEEDS}) or a list of distinct seeds from 0 to 2**32 - 1")
    return seeds


def check_metric(values: dict, fail: Failure) -> str:
    choose_on = values.get("choose_on", "val_accuracy")
    if not isinstance(choose_on, str):
        fail(("choose_on",), f"choose {' or '.join(METRICS)}")
    if choose_on.startswith("test"):
        fail(("choose_on",), f"{choose_on}: the test set never chooses; choose on {' or '.join(METRICS)}")
    if choose_on not in METRICS:
        fail(("choose_on",), f"{choose_on!r}: choose {' or '.join(METRICS)}")
    return choose_on


def check_flag_name(section: str, name, kinds: dict, fail) -> None:
    if not isinstance(name, str) or name.replace("_", "-") not in kinds:
        fail((section, name), "unknown mnist_dist.train flag (python -m mnist_dist.train --help lists them)")
    if "_" in name:
        fail((section, name), f"write flags as on the command line: {name.replace('_', '-')}")
    if name.replace("-", "_") in SET_BY_SWEEP:
        fail((section, name), f"set by the sweep: {SET_BY_SWEEP[name.replace('-', '_')]}")


def check_scalar(key: tuple, value, fail: Failure) -> None:
    if not isinstance(value, (str, int, float, bool)) or isinstance(value, float) and not math.isfinite(value):
        fail(key, f"{value!r}: a flag takes one value (a string, number or true/false)")


def check_axis(name: str, axis, kind: type, fail: Failure):
    """A space entry: a non-empty list of values, or a numeric range."""
    if isinstance(axis, list):
        if not axis:
            fail(("space", name), "an empty list: give the values to try")
        for i, value in enumerate(axis):
            check_scalar(("space", name, i), value, fail)
        if kind is float:  # YAML 1.1 leaves 1e-3 a string: as a number, [1e-3, 0.001] lists one value twice
            axis = [as_number(v) if as_number(v) is not None else v for v in axis]
        if len({str(v) for v in axis}) < len(axis):
            fail(("space", name), "lists a value twice")
        return axis
    if not isinstance(axis, dict):
        fail(("space", name), "a list of values (a grid), or a range {low, high} (random or tpe)")
    if kind not in (int, float):
        fail(("space", name), f"--{name} is not a number: give a list of values")
    for key in axis:
        if key not in ("low", "high", "log", "step"):
            fail(("space", name, key), "unknown; a range has low, high, log, step")
    low, high = as_number(axis.get("low")), as_number(axis.get("high"))
    if low is None or high is None or not low < high:
        fail(("space", name), "a range needs numbers low < high")
    if kind is int and not (low == int(low) and high == int(high)):
        fail(("space", name), f"--{name} takes integers: low and high must be integers")
    if kind is int:
        low, high = int(low), int(high)
    log, step = axis.get("log", False), axis.get("step")
    if not isinstance(log, bool) or log and low <= 0:
        fail(("space", name, "log"), "true or false; a log range needs low > 0")
    if step is not None and (as_number(step) is None or as_number(step) <= 0 or log):
        fail(("space", name, "step"), "a number > 0, without log")
    if step is not None and kind is int and as_number(step) != int(as_number(step)):
        fail(("space", name, "step"), f"--{name} takes integers: an integer step")
    return {"low": low, "high": high, "log": log, "step": as_number(step) if step is not None else None,
            "int": kind is int}


def as_number(value) -> float | None:
    """A YAML number, or a string YAML 1.1 leaves unparsed such as 1e-3."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_with_trainer(spec: Spec, fail: Failure) -> None:
    """mnist_dist.train's own parser on the SPEC's flags, then on each value alone, then on each point:
    a value the trainer would refuse is an error here, before any trial starts."""
    _, refusal = trainer_parse(spec.train_flags({}))
    if refusal:
        named = [name for name in spec.flags if re.search(f"--{re.escape(name)}(?![\\w-])", refusal)] or [None]
        fail(("flags", named[0]) if named[0] else ("flags",), refusal)
    ends = {name: axis if isinstance(axis, list) else [axis["low"], axis["high"]] for name, axis in spec.space.items()}
    if math.prod(len(values) for values in ends.values()) > MAX_POINTS:  # before a parse per value (~20 ms each)
        fail(("space",), f"more than {MAX_POINTS:,} points; split the sweep")
    checked = {}  # argv -> its parse: a one-flag space's points are its values, each parsed once
    for name, values in ends.items():
        for i, value in enumerate(values):
            argv = tuple(spec.train_flags({name: value}))
            cfg, refusal = checked[argv] = trainer_parse(list(argv))
            if refusal:
                fail(("space", name, i) if isinstance(spec.space[name], list) else ("space", name), refusal)
    for values in itertools.product(*ends.values()):
        params = dict(zip(ends, values))
        argv = tuple(spec.train_flags(params))
        cfg, refusal = checked[argv] if argv in checked else trainer_parse(list(argv))
        if refusal:
            fail(("space",), f"the point {params} is refused: {refusal}")
        if cfg.val_fraction <= 0:
            where = ("flags", "val-fraction") if "val-fraction" in spec.flags else ("flags",)
            fail(where, "choosing on validation needs a validation split: set `val-fraction: 0.1` in flags")


def trainer_parse(argv: list[str]) -> tuple[config.TrainConfig | None, str | None]:
    """mnist_dist.train's parse of `argv`: (its config, None), or (None, what the parser refused)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return config.parse_args(argv), None
    except SystemExit:
        return None, err.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
