"""Callables for --model package.module:function that a run must refuse or stop (tests/test_model.py)."""

import math
import os
import sys
import time

import torch
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


class Net(nn.Module):
    """A linear model whose forward a subclass bends in one way or another."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x):
        return self.fc(x)


class FixedBatch(Net):
    def forward(self, x):
        return self.fc(x)[:2]  # right for the 2-image check only


class OtherShapeInTraining(Net):
    def forward(self, x):
        out = self.fc(x)
        return out[:, :-1] if self.training else out


class Detached(Net):
    def forward(self, x):
        return self.fc(x).detach()


class IntegerLogits(Net):
    def forward(self, x):
        return self.fc(x).round().long()


class NoParameters(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        return x[:, :self.num_classes] * 1.0


class NoCopy(Net):
    """Trains, but cannot be deep-copied (it holds a generator, as some data-holding modules do)."""

    def __init__(self, input_shape, num_classes):
        super().__init__(input_shape, num_classes)
        self.stream = (i for i in range(3))


def float64_default(input_shape, num_classes):
    torch.set_default_dtype(torch.float64)
    return Net(input_shape, num_classes)


def changes_directory(input_shape, num_classes):
    os.chdir("/")
    return Net(input_shape, num_classes)


def sets_threads(input_shape, num_classes):
    torch.set_num_threads(torch.get_num_threads() + 1)
    return Net(input_shape, num_classes)


def exits(input_shape, num_classes):
    sys.exit(3)


def interrupts(input_shape, num_classes):
    raise KeyboardInterrupt


def sleeps_forever(input_shape, num_classes):
    print("mnist_dist test: building, forever", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


def lazy(input_shape, num_classes):
    """Lazy layers (their weights made by the first batch) and BatchNorm: a model that trains."""
    return nn.Sequential(nn.LazyLinear(32), nn.LazyBatchNorm1d(), nn.ReLU(), nn.Linear(32, num_classes))


class StallsOnRank(nn.Module):
    """A linear model whose 20th training forward pass on the process of RANK `rank` never returns: a peer stalled
    in Python (a hung file system, a deadlocked thread) that can still say where it is (tests/test_distributed.py)."""

    def __init__(self, input_shape, num_classes, rank: int = 1):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_classes)
        self.calls, self.stalling = 0, os.environ.get("RANK") == str(rank)

    def forward(self, x):
        if self.training and self.stalling:
            self.calls += 1
            if self.calls == 20:
                stall_forever()
        return self.fc(x)


def stall_forever():
    while True:
        time.sleep(3600)
