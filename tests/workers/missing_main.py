"""Two processes over gloo, each with a StallWatch on $OUT; rank 0 never comes to the monitored barrier that
names who is missing (a stalled main process). Rank 1 writes what StallWatch.missing() said and how long it
waited to $OUT/rank-1.json; rank 0 sleeps until the test kills it."""

import json
import sys
import time
from pathlib import Path

from accelerate import Accelerator

from mnist_dist.distributed import StallWatch

out, timeout = Path(sys.argv[1]), int(sys.argv[2])
accelerator = Accelerator(cpu=True)
assert accelerator.num_processes == 2, accelerator.num_processes
watch = StallWatch(accelerator, out, timeout, step=0)
if accelerator.process_index == 0:
    time.sleep(3600)
began = time.monotonic()
missing = watch.missing()
(out / "rank-1.json").write_text(json.dumps({"missing": missing, "waited": time.monotonic() - began}))
watch.close()
