"""How long this process has been running, from the moment the OS started it (imports included), or
from mnist_dist's import where the process ran another program before it (a shell's exec).

On Linux the start tick in /proc/self/stat is read against the clock it counts on (CLOCK_BOOTTIME),
to 10 ms: psutil's create_time adds /proc/stat's whole-second boot time and reads up to a second
early (giampaolo/psutil#877). Elsewhere psutil's value is exact.
"""

from __future__ import annotations

import os
import sys
import time


def _process_age() -> float:
    """Seconds since the OS started this process."""
    if sys.platform.startswith("linux"):
        with open("/proc/self/stat", "rb") as f:
            # field 22 is starttime; the command name (field 2, in brackets) may hold spaces
            start_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    import psutil  # an Accelerate dependency

    return time.time() - psutil.Process().create_time()


# A process keeps its start time across exec: a shell that ran pip for a minute and then exec'd python
# would count that minute. mnist_dist/__init__.py imports this module first, so an age beyond what an
# interpreter takes to start is another program's, and the clock starts at this import instead.
EXEC_GAP_S = 30.0
_AGE = _process_age()
PROCESS_START = time.time() - (_AGE if _AGE < EXEC_GAP_S else 0.0)  # wall clock, seconds


def since_process_start() -> float:
    """Seconds from the OS starting this process to now: interpreter, imports and all."""
    return time.time() - PROCESS_START
