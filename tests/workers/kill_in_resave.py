"""`python -m mnist_dist.train FLAGS` that kills itself (SIGKILL) half-way through re-saving a
checkpoint: after the old copy was renamed to step_N.old, before the new one took its name."""

import os
import signal
import sys

from mnist_dist import checkpoint, config, train

real_replace = os.replace


def replace_then_die(src, dst):
    real_replace(src, dst)
    if str(dst).endswith(".old"):
        print(f"kill_in_resave: killed after renaming {src} to {dst}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint.os.replace = replace_then_die
sys.exit(train.main(config.parse_args(sys.argv[1:])))
