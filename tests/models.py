"""Callables for --model package.module:function that a run must refuse (tests/test_model.py)."""

import math

from torch import nn


def not_a_module(input_shape, num_classes):
    return {"layers": 2}


def wrong_output(input_shape, num_classes):
    return nn.Linear(math.prod(input_shape), num_classes + 1)
