"""`python -m mnist_dist.doctor`: one process in this one, 3 real gloo processes, one process that never
answers, and what the table says of rows that differ. The two-node SLURM check is in test_slurm.py."""

import re
import sys
import time

import pytest

from mnist_dist import doctor

from .helpers import in_process, launch, run

ROW = re.compile(r"^(ok|FAIL)\s+(\d+)\s+(\S+)\s+(\d+|\?)\s+(\S+)", re.M)


def rows(output: str) -> dict[int, str]:
    """rank -> 'ok' or 'FAIL', from the table."""
    return {int(m.group(2)): m.group(1) for m in ROW.finditer(output)}


def test_one_process_prints_its_row_with_versions_and_data(tmp_path):
    import accelerate
    import torch

    done = in_process(doctor.main, "--dataset", "mnist-5k", "--cpu", "--output-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert rows(done.stdout) == {0: "ok"}
    assert torch.__version__ in done.stdout and accelerate.__version__ in done.stdout
    assert "all-reduce: one process, nothing to measure" in done.stdout and "all well" in done.stdout
    assert not (tmp_path / "run").exists() and list(tmp_path.iterdir()) == []  # nothing left behind


def test_a_bad_dataset_fails_its_row_and_names_the_directory(tmp_path):
    done = in_process(doctor.main, "--data-dir", str(tmp_path / "nowhere"), "--cpu", "--output-dir", str(tmp_path))
    assert done.returncode == 1
    assert rows(done.stdout) == {0: "FAIL"}
    assert re.search(r"rank 0: data: .*nowhere", done.stdout), done.stdout


@pytest.mark.slow
def test_three_processes_agree_and_measure_the_all_reduce(tmp_path):
    import torch

    began = time.monotonic()
    proc = launch(3, "--dataset", "mnist-5k", "--output-dir", str(tmp_path / "run"), module="mnist_dist.doctor",
                  launcher="mnist_dist.launch", timeout=120)
    print(f"the doctor on 3 processes took {time.monotonic() - began:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 process(es), backend gloo" in proc.stdout
    assert rows(proc.stdout) == {0: "ok", 1: "ok", 2: "ok"}
    table = [line.split() for line in proc.stdout.splitlines() if ROW.match(line)]
    # ok, rank, host, local, device, free memory (2 words), torch, accelerate, mnist_dist, commit, data, ...
    assert len(table) == 3 and len({tuple(line[7:12]) for line in table}) == 1  # versions, commit, data agree
    assert table[0][7] == torch.__version__ and re.fullmatch(r"[0-9a-f]{12}", table[0][11])  # the data's fingerprint
    for size in ("4 KiB", "64 MiB"):
        found = re.search(rf"all-reduce \(gloo\) of {size}: ([\d.]+) ms, bus bandwidth ([\d.]+) GB/s", proc.stdout)
        assert found and float(found.group(1)) > 0, proc.stdout
    assert float(found.group(2)) > 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_process_that_never_answers_is_named_within_the_timeout(tmp_path):
    """Rank 1's import of --model never ends (tests/sleepy_rank.py): rank 0 names it after --timeout 3."""
    began = time.monotonic()
    proc = launch(2, "--dataset", "mnist-5k", "--output-dir", str(tmp_path), "--timeout", "3",
                  "--model", "tests.sleepy_rank:build", module="mnist_dist.doctor", launcher="mnist_dist.launch",
                  timeout=120)
    took = time.monotonic() - began
    print(f"the doctor with a silent rank 1 ended after {took:.1f} s (--timeout 3)")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert rows(proc.stdout) == {0: "ok", 1: "FAIL"}
    assert "rank 1: did not answer within --timeout 3 s" in proc.stdout
    assert took < 3 + 40  # start-up, the timeout and the launcher's stop; the sleeper alone never ends
    assert "Traceback" not in proc.stdout + proc.stderr.split("mnist_dist.doctor: FAILED")[0]
    assert list(tmp_path.iterdir()) == []


def test_rows_that_differ_from_the_main_process_are_marked(capsys):
    def row(rank, **changed):
        return {"rank": rank, "host": f"node{rank}", "local_rank": 0, "device": "cpu", "free_memory_gib": 8.0,
                "torch": "2.14.1", "accelerate": "1.16.0", "mnist_dist": "0.1.0", "commit": "abc", "data": "d1",
                "free_disk_gib": 50.0, "clock": 1000.0, "problems": [], **changed}

    failed = doctor.report([row(0), row(1, commit="def"), row(2, data="d2", clock=1003.0), row(3)], "gloo")
    status = doctor.verdict(failed)
    out = capsys.readouterr().out
    assert status == 1 and failed == [1, 2] and rows(out) == {0: "ok", 1: "FAIL", 2: "FAIL", 3: "ok"}
    assert "rank 1: commit def, the main process's abc" in out
    assert "rank 2: data d2, the main process's d1" in out and "rank 2: clock +3.0 s" in out
    assert "FAILED on rank(s) 1, 2" in out


def test_an_output_directory_the_main_process_did_not_write_in_is_not_shared(tmp_path):
    elsewhere = tmp_path / "main" / doctor.PROBE_NAME.format("probe")  # the main process's file, not seen here
    (tmp_path / "here").mkdir()
    facts, problem = doctor.output_check(tmp_path / "here", (str(elsewhere), "token"))
    assert "not shared" in problem and facts["free_gib"] > 0
    (tmp_path / "here" / "probe").write_text("token")
    assert doctor.output_check(tmp_path / "here", (str(tmp_path / "here" / "probe"), "token"))[1] is None


def test_the_doctor_takes_the_runs_flags_and_refuses_a_bad_one():
    proc = run([sys.executable, "-m", "mnist_dist.doctor", "--epochs", "0"], timeout=60)
    assert proc.returncode == 2 and "--epochs" in proc.stderr and "python -m mnist_dist.doctor" in proc.stderr
    assert "Traceback" not in proc.stderr
