"""A module for --model tests.sleepy_import:build whose import never ends (tests/test_model.py)."""

import sys
import time

print("mnist_dist test: importing, forever", file=sys.stderr, flush=True)
while True:
    time.sleep(3600)


def build(input_shape, num_classes):  # never reached
    raise AssertionError
