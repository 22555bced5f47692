"""A throw-away SLURM cluster on this machine: munged, slurmctld and N slurmd ("node1".."nodeN").

    python -m tests.slurm_cluster start DIR [--nodes 2]   # prints `export SLURM_CONF=DIR/slurm.conf`
    python -m tests.slurm_cluster stop DIR

Installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing (root,
apt-get). Daemons are started and stopped by their PID files, never by process name, so a
real SLURM installation on the same machine is left alone. No cgroups, accounting or MPI:
proctrack/linuxproc, task/none. Every node is this machine (NodeAddr=127.0.0.1, one slurmd
port each); `cred_expire=10` and a fast scheduler make a requeued job start again in ~12 s.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]  # Debian's: .ci/run installs them, as the README says


def installed() -> bool:
    return all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged"))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    def __init__(self, root: str | Path, nodes: int = 2):
        self.root = Path(root).resolve()
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "Cluster":
        self.stop()
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool", "munge", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        os.chmod(self.root / "munge", 0o711)  # munged insists on this mode for its socket directory
        key = self.root / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        subprocess.run(
            ["munged", "--force", f"--key-file={key}", f"--socket={self.socket}",
             f"--pid-file={self.root / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
             f"--seed-file={self.root / 'munge.seed'}"],
            check=True,
        )
        self._write_conf()
        subprocess.run(["slurmctld", "-f", str(self.conf), "-i"], check=True, env=self.env)
        for node in self.nodes:
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", node], check=True, env=self.env)
        self._wait_idle()
        return self

    def stop(self) -> None:
        """SIGKILL to every daemon (a throw-away cluster has no state to save: slurmctld takes ~4.5 s to end
        on SIGTERM), then wait until each has ended: gone, or a zombie that nobody reaps."""
        pidfiles = [self.root / f"slurmd.{n}.pid" for n in self.nodes] + [
            self.root / "slurmctld.pid", self.root / "munged.pid"]
        daemons = []
        for pidfile in pidfiles:
            try:
                daemons.append(psutil.Process(int(pidfile.read_text().split()[0])))
                daemons[-1].kill()
            except (OSError, ValueError, IndexError, psutil.Error):
                pass
            pidfile.unlink(missing_ok=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_running(d) for d in daemons):
            time.sleep(0.02)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ use

    @property
    def socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def run(self, *args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, scontrol, ...) against this cluster."""
        return subprocess.run(list(args), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              timeout=timeout, **kw)

    def _write_conf(self) -> None:
        host = socket.gethostname()
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        cpus = os.cpu_count() or 1
        r = self.root
        lines = [
            "ClusterName=mnistdist",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket},cred_expire=10",
            "SlurmUser=root",
            "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=bf_interval=1,sched_interval=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MinJobAge=600",
            "KillWait=30",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.%n.log'}",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES")
        self.conf.write_text("\n".join(lines) + "\n")

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            if all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.2)
        raise RuntimeError(f"SLURM nodes not idle after {timeout} s: {self.run('sinfo', '-N').stdout}\n"
                           f"see {self.root / 'log'}")


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("start", "stop"):
        print(__doc__)
        return 2
    nodes = int(argv[argv.index("--nodes") + 1]) if "--nodes" in argv else 2
    cluster = Cluster(argv[1], nodes)
    if argv[0] == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
