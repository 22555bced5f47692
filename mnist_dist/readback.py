"""The one reader of every JSON file mnist_dist reads back: training_state.json, config.json,
results.json, metrics.jsonl and a best model's metadata.

A file read back may have been cut short by a kill, edited by hand or written by someone else, so
it is bounded before it is trusted: its size, its encoding, its nesting and its integers (no
10**400). A file that fails is an `UnreadableFile` naming it. What each field must hold (its type,
a finite number in its range) is the caller's check, which names the field (`train_state.check_state`,
`model.check_config`, `reporting.check_results`, `tracking.read_records`). The rule is the same
everywhere: a file found automatically (by --resume auto) that fails is skipped with a warning; a
file the user named fails the command, naming it.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

MAX_BYTES = 16 * 2**20  # a training state with a 1,000-epoch history is about 0.5 MiB
MAX_LINE_BYTES = 2**20  # one metrics.jsonl record is about 300 bytes
MAX_DEPTH = 32  # mnist_dist's files nest 4 levels deep
MAX_INT_DIGITS = 18  # counts and steps fit in 64 bits; a longer integer is damage, not data
SHOWN_CHARS = 80  # how much of a bad value an error message repeats

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


class UnreadableFile(ValueError):
    """A file that is not the bounded JSON mnist_dist wrote; the message names it (`where`) and `why`."""

    def __init__(self, where: str, why: str):
        super().__init__(f"{where}: {why}")
        self.why = why


def read_json(path: str | Path, limit: int = MAX_BYTES):
    """The JSON value in the file at `path`, bounded (see the module's docstring). A missing file raises
    FileNotFoundError; anything else wrong with it, UnreadableFile."""
    path = Path(path)
    if path.is_dir():
        raise UnreadableFile(str(path), "a directory, not a file")
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise UnreadableFile(str(path), f"unreadable ({err.strerror or err})") from None
    if len(raw) > limit:
        raise UnreadableFile(str(path), f"larger than {limit / 2**20:g} MiB, which no file of mnist_dist's is")
    return parse_json(raw, str(path))


def parse_json(raw: bytes | str, where: str):
    """The bounded JSON value in `raw`; `where` names it in errors (a file, a line of one)."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UnreadableFile(where, f"not UTF-8 text (byte {err.start})") from None
    depth = nesting(raw)
    if depth > MAX_DEPTH:
        raise UnreadableFile(where, f"nested {depth} levels deep; mnist_dist's files nest at most {MAX_DEPTH}")
    try:
        return json.loads(raw, parse_int=_bounded_int)
    except _LongInteger as err:
        raise UnreadableFile(where, f"{err}, longer than any count mnist_dist writes") from None
    except ValueError as err:
        raise UnreadableFile(where, f"not valid JSON ({err})") from None


def nesting(text: str) -> int:
    """How deeply the arrays and objects of JSON `text` nest, without parsing it (no recursion)."""
    brackets = re.sub(r"[^\[\]{}]", "", _STRING.sub("", text))
    return max(itertools.accumulate(1 if c in "[{" else -1 for c in brackets), default=0)


def shown(value) -> str:
    """`value` as an error message repeats it: at most SHOWN_CHARS characters."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + f"... ({len(text):,} characters)"


class _LongInteger(ValueError):
    pass


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _LongInteger(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def is_count(value, least: int) -> bool:
    """Whether `value` is an integer (not a bool) of at least `least`."""
    return type(value) is int and value >= least


def is_number(value, least: float = -math.inf) -> bool:
    """Whether `value` is a finite int or float of at least `least`."""
    return type(value) in (int, float) and math.isfinite(value) and value >= least
