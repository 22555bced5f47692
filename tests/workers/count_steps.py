"""`python -m mnist_dist.train FLAGS` that counts, in each process, its gradient all-reduces (a DDP
communication hook around torch's own all-reduce hook) and its batches (train_step calls), and writes
them to $COUNT_DIR/rank-R.json when the run ends."""

import json
import os
import sys
from pathlib import Path

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from mnist_dist import config, loop, steps, train

counts = {"all_reduces": 0, "batches": 0}


def counting_all_reduce(state, bucket):
    counts["all_reduces"] += 1
    return default_hooks.allreduce_hook(state, bucket)


def hook_model(real):
    def make_runner(run, *rest):
        run.model.register_comm_hook(None, counting_all_reduce)  # the prepared DDP model, before its first step
        return real(run, *rest)
    return make_runner


def count_batches(real):
    def train_step(*args, **kwargs):
        counts["batches"] += 1
        return real(*args, **kwargs)
    return train_step


loop.make_runner = hook_model(loop.make_runner)
steps.train_step = count_batches(steps.train_step)
rc = train.main(config.parse_args(sys.argv[1:]))
Path(os.environ["COUNT_DIR"], f"rank-{os.environ['RANK']}.json").write_text(json.dumps(counts))
sys.exit(rc)
