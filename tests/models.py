"""Callables for --model package.module:function that a run must refuse (tests/test_model.py)."""

import math

from torch import nn


def not_a_module(input_shape, num_classes):
    return {"layers": 2}


def wrong_output(input_shape, num_classes):
    return nn.Linear(math.prod(input_shape), num_classes + 1)


class HeadFirst(nn.Module):
    """Its logits' layer registered before another Linear: the logits' width is 10, its last Linear's 32."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.head = nn.Linear(32, num_classes)
        self.body = nn.Linear(math.prod(input_shape), 32)

    def forward(self, x):
        return self.head(self.body(x).relu())
