"""A module for --model tests.sleepy_rank:build whose import never ends on the process of RANK 1 (a node whose
file system hangs), and builds a one-layer model elsewhere (tests/test_doctor.py)."""

import os
import sys
import time

from torch import nn

if os.environ.get("RANK") == "1":
    print("mnist_dist test: rank 1 importing, forever", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


def build(input_shape, num_classes):
    return nn.Linear(784, num_classes)
