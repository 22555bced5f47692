"""Check a launch before a long run: every process checks itself, and the main process prints one table.

    python -m mnist_dist.doctor --dataset mnist-5k --cpu
    accelerate launch --config_file accelerate_configs/cpu.yaml --num_processes 2 -m mnist_dist.doctor --cpu
    torchrun --nproc-per-node 8 -m mnist_dist.doctor
    sbatch --nodes 4 --gpus-per-node 8 slurm/train.sh --doctor

Launch it exactly as the run (same launcher, same flags): it reads the data the run would read, builds its
--model, and probes its --output-dir, so a node on another commit, a data file missing on one node or an
output directory that is not shared shows before the run starts. A process that does not answer within
--timeout is named by torch.distributed's monitored barrier rather than waited on. Exit 0 when every row is
well, 1 with the failing rows marked, 2 for a bad flag. Reading the table: docs/hangs.md.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

from .config import ConfigError, TrainConfig, parse_args
from .stopping import QuickExit, stacks_to

CLOCK_SKEW_S = 1.0  # NTP keeps nodes within milliseconds; a second off is a clock nobody synchronises
FREE_DISK_GIB = 1.0  # checkpoints of the built-in models are MBs; below this a long run's saves may fail
SIZES = (("4 KiB", 2**12), ("64 MiB", 2**26))  # the all-reduce's small (latency) and large (bandwidth) tensor
PROBE_NAME = ".mnist_dist-doctor-{}"  # the probe file the main process writes in the output directory's place


def versions() -> dict:
    """torch, accelerate and mnist_dist's versions and the git commit of mnist_dist's checkout ('-': none)."""
    import accelerate
    import torch

    from . import __version__
    from .tracking import git_commit

    return {"torch": torch.__version__, "accelerate": accelerate.__version__, "mnist_dist": __version__,
            "commit": (git_commit() or "-")[:12]}


def probe_place(cfg: TrainConfig) -> Path:
    """Where the run writes: its --output-dir, else outputs/; the nearest of its parents that exists (the
    doctor creates nothing there but its probe file)."""
    place = Path(cfg.output_dir or "outputs").absolute()
    while not place.is_dir() and place != place.parent:
        place = place.parent
    return place


def data_check(cfg: TrainConfig) -> tuple[str | None, list[str], str | None]:
    """(the data's fingerprint, short; its class names; what went wrong) as the run would load it."""
    from . import data, sources

    try:
        splits = sources.load_splits(cfg.dataset, cfg.data_dir, cfg.cache_dir, cfg.image_column, cfg.label_column)
    except (data.DataError, ConfigError, OSError) as err:
        return None, [], f"data: {err}"
    digest = hashlib.sha256(json.dumps(data.fingerprint(splits), sort_keys=True).encode()).hexdigest()[:12]
    return digest, list(splits["train"].class_names), None


def model_check(cfg: TrainConfig, class_names: list[str], device) -> tuple[str | None, str | None]:
    """(the --model's size in words, what went wrong): built and run on a batch, as the run does."""
    from . import data, model

    try:
        with model.left_as_found(cfg.model):
            # the input scaling changes nothing the check looks at
            built, _ = model.new_model(cfg, class_names, data.SCALINGS["half"], device)
    except ConfigError as err:
        return None, str(err)
    return f"{model.parameter_count(built):,} parameters", None


def output_check(place: Path, probe: tuple[str, str] | None) -> tuple[dict, str | None]:
    """Whether this process can write where the run writes, sees the main process's probe file there (a file
    system every node shares), and how much room it has."""
    facts = {"place": str(place)}
    try:
        mine = place / PROBE_NAME.format(uuid.uuid4().hex)
        mine.write_text("mnist_dist doctor")
        mine.unlink()
        facts["free_gib"] = shutil.disk_usage(place).free / 2**30
    except OSError as err:
        return facts, f"output: cannot write in {place} ({err.strerror or err})"
    if probe is None:
        return facts, "output: the main process could not write its probe file"
    path, token = probe
    try:
        seen = Path(path).read_text()  # its contents, not its inode: FUSE mounts number inodes each their own
    except OSError:
        seen = None
    if seen != token:
        return facts, f"output: {place} is not the main process's (its probe file {path} is not here): not shared"
    if facts["free_gib"] < FREE_DISK_GIB:
        return facts, f"output: {facts['free_gib']:.2f} GiB free in {place} (under {FREE_DISK_GIB:g} GiB)"
    return facts, None


def free_memory_gib(device) -> float:
    """Free memory of this process's device: the GPU's (torch.cuda.mem_get_info), else the host's available."""
    import psutil
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**30
    return psutil.virtual_memory().available / 2**30


def check_process(cfg: TrainConfig, accelerator, probe) -> dict:
    """This process's row: who and where it is, and the checks that need no other process. A check that
    raises is the row's problem, never the end of the doctor."""
    row = {"rank": accelerator.process_index, "host": socket.gethostname(),
           "local_rank": accelerator.local_process_index, "device": str(accelerator.device), "problems": []}

    def check(what: str, run):
        try:
            return run()
        except Exception as err:  # anything: said in the row, and the table still comes
            row["problems"].append(f"{what}: {type(err).__name__}: {err}")
            return None

    row["free_memory_gib"] = check("free memory", lambda: free_memory_gib(accelerator.device))
    row |= check("versions", versions) or {}
    row["data"], class_names, problem = check("data", lambda: data_check(cfg)) or (None, [], None)
    row["problems"] += [problem] if problem else []
    if class_names:
        row["model"], problem = check("model", lambda: model_check(cfg, class_names, accelerator.device)) or (None, None)
        row["problems"] += [problem] if problem else []
    output, problem = check("output", lambda: output_check(probe_place(cfg), probe)) or ({}, None)
    row["problems"] += [problem] if problem else []
    return row | {"free_disk_gib": output.get("free_gib")}


def compare_rows(rows: list[dict]) -> None:
    """Mark what differs from the main process's row (versions, commit, data) and a clock off from its."""
    first = rows[0]
    for row in rows[1:]:
        for key in ("torch", "accelerate", "mnist_dist", "commit", "data"):
            if row.get(key) is not None and first.get(key) is not None and row[key] != first[key]:
                row["problems"].append(f"{key} {row[key]}, the main process's {first[key]}")
    for row in rows:
        if row.get("clock") is not None and first.get("clock") is not None:
            row["skew_s"] = row["clock"] - first["clock"]
            if abs(row["skew_s"]) > CLOCK_SKEW_S:
                row["problems"].append(f"clock {row['skew_s']:+.1f} s from the main process's (over {CLOCK_SKEW_S:g} s)")


def all_reduce_times(world: int, device) -> list[str]:
    """A timed all-reduce of a small and a 64 MiB float32 tensor, in words: the median time, and the bus
    bandwidth as nccl-tests reckons it (size / time x 2 (n-1) / n: the bytes each link carries)."""
    import torch
    import torch.distributed as dist

    said = []
    for label, size in SIZES:
        tensor, times = torch.ones(size // 4, device=device), []
        for attempt in range(7 if size < 2**20 else 4):  # the first is a warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            began = time.perf_counter()
            dist.all_reduce(tensor)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - began)
        seconds = sorted(times[1:])[len(times[1:]) // 2]
        said.append(f"all-reduce ({dist.get_backend()}) of {label}: {1e3 * seconds:.2f} ms, bus bandwidth "
                    f"{size / seconds * 2 * (world - 1) / world / 1e9:.3f} GB/s")
    return said


def table(rows: list[dict]) -> str:
    """One row per process ('ok', 'FAIL', or '?': not gathered), then each row's problems and notes."""
    head = ("", "rank", "host", "local", "device", "free mem", "torch", "accelerate", "mnist_dist", "commit", "data",
            "free disk", "clock")
    lines = [head]
    for row in rows:
        gib = lambda key: "-" if row.get(key) is None else f"{row[key]:.1f} GiB"  # noqa: E731
        skew = "-" if row.get("skew_s") is None else f"{1e3 * row['skew_s']:+.0f} ms"
        status = "FAIL" if row["problems"] else "?" if row.get("note") else "ok"
        lines.append((status, str(row["rank"]), row.get("host", "?"), str(row.get("local_rank", "?")),
                      row.get("device", "?"), gib("free_memory_gib"), row.get("torch", "?"), row.get("accelerate", "?"),
                      row.get("mnist_dist", "?"), row.get("commit", "?"), row.get("data") or "-", gib("free_disk_gib"),
                      skew))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    for row in rows:
        text += [f"  rank {row['rank']}: {problem}" for problem in row["problems"]]
        text += [f"  rank {row['rank']}: {row['note']}"] if row.get("note") else []
    return "\n".join(text)


def report(rows: list[dict], backend: str | None) -> list[int]:
    """Print the table (the main process); return the failed ranks."""
    compare_rows(rows)
    print(f"mnist_dist.doctor: {len(rows)} process(es)" + (f", backend {backend}" if backend else ""), flush=True)
    print(table(rows), flush=True)
    return [row["rank"] for row in rows if row["problems"]]


def verdict(failed: list[int]) -> int:
    """The last line, and the exit status: 1 when a row failed."""
    print("mnist_dist.doctor: " + (f"FAILED on rank(s) {', '.join(map(str, failed))}; what to do: docs/hangs.md"
                                   if failed else "all well"), flush=True)
    return 1 if failed else 0


def diagnose(cfg: TrainConfig) -> int:
    """The checks, on every process; the main process prints the table. Returns the exit status."""
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from .distributed import check_coupled

    accelerator = Accelerator(cpu=cfg.cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.timeout))])
    check_coupled(accelerator, "mnist_dist.doctor")
    main, place = accelerator.is_main_process, probe_place(cfg)
    if accelerator.num_processes == 1:
        probe = write_probe(place)
        try:
            failed = report([check_process(cfg, accelerator, probe)], None)
        finally:
            remove_probe(probe)
        print("all-reduce: one process, nothing to measure")
        return verdict(failed)
    # gloo, whatever the run's backend: the exchanges of Python objects and the monitored barrier. Its timeout
    # is longer than --timeout, so that only the main process's barrier enforces --timeout
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=2 * cfg.timeout + 60))
    hosts = [None] * accelerator.num_processes
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    probe = [write_probe(place) if main else None]
    dist.broadcast_object_list(probe, src=0, group=group)
    try:
        return check_all(cfg, accelerator, group, hosts, probe[0])
    finally:
        if main:
            remove_probe(probe[0])


def check_all(cfg: TrainConfig, accelerator, group, hosts: list[str], probe) -> int:
    """Every process's checks, the barrier that names who does not come, the clocks, the table, the all-reduce."""
    import torch.distributed as dist

    row = check_process(cfg, accelerator, probe)
    try:  # the one wait on every process: who does not come within --timeout is named, not waited on
        dist.monitored_barrier(group=group, timeout=timedelta(seconds=cfg.timeout), wait_all_ranks=True)
    except RuntimeError as err:
        return not_answered(accelerator, row, hosts, err, cfg.timeout)
    row["clock"] = time.time()  # right after a barrier: the nodes' clocks, read within milliseconds
    rows = [None] * accelerator.num_processes
    dist.all_gather_object(rows, row, group=group)
    failed = report(rows, dist.get_backend()) if accelerator.is_main_process else []
    try:  # last: a network the run's backend cannot use hangs or fails here, after the table
        said = all_reduce_times(accelerator.num_processes, accelerator.device)
    except RuntimeError as err:
        said, failed = [f"all-reduce ({dist.get_backend()}) failed: {err}"], failed + [accelerator.process_index]
    if not accelerator.is_main_process:
        return 1 if failed else 0
    print("\n".join(said), flush=True)
    return verdict(sorted(set(failed)))


def write_probe(place: Path) -> tuple[str, str] | None:
    """The main process's probe file (path, contents) in `place`, which every process then looks for; a name of
    its own, so that doctors started together (an array job) do not read each other's."""
    token = uuid.uuid4().hex
    path = place / PROBE_NAME.format(token)
    try:
        path.write_text(token)
    except OSError:
        return None
    return str(path), token


def remove_probe(probe: tuple[str, str] | None) -> None:
    if probe:
        Path(probe[0]).unlink(missing_ok=True)


def not_answered(accelerator, row: dict, hosts: list[str], err: BaseException, timeout: int) -> int:
    """The monitored barrier failed on the main process: it names who did not come (the others answered, but
    their rows were not gathered). Returns 1."""
    from .distributed import failed_ranks

    if not accelerator.is_main_process:
        print(f"mnist_dist.doctor: rank {row['rank']}: the check did not finish: the main process's table names who "
              f"did not answer; where it printed none, it is the one (rank 0 on {hosts[0]}) ({err})", file=sys.stderr,
              flush=True)
        return 1
    missing = failed_ranks(err)
    rows = [row] + [{"rank": r, "host": hosts[r], "problems": [f"did not answer within --timeout {timeout} s"]}
                    if r in missing else {"rank": r, "host": hosts[r], "problems": [], "note": "answered; its row was not gathered"}
                    for r in range(1, accelerator.num_processes)]
    if not missing:
        row["problems"].append(f"the monitored barrier failed: {err}")
    report(rows, None)
    return verdict([r["rank"] for r in rows if r["problems"]])


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv, prog="python -m mnist_dist.doctor", description=(  # the run's flags: a bad one exits 2
        "Check a launch before a long run: launch it as the run, with the run's flags (docs/hangs.md)."))
    from .distributed import LaunchError

    stacks_to(sys.stderr)  # SIGUSR2, forwarded by mnist_dist.launch as to a run: the stacks, and on
    try:
        return diagnose(cfg)
    except LaunchError as err:
        print(f"mnist_dist.doctor: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # no interpreter teardown of torch: left to it, gloo's threads can abort a finished check (SIGABRT)
    QuickExit().end(main)
