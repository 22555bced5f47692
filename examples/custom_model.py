"""An example of `--model package.module:function`: your own network, trained, resumed, evaluated and
loaded by mnist_dist like its built-in ones.

    python -m mnist_dist.train --dataset mnist-5k --model examples.custom_model:build --model-args '{"width": 64}'

mnist_dist calls `build(input_shape, num_classes, **model_args)`: `input_shape` is (1, 28, 28), and the
module gets each batch as [batch, 784] normalized pixels and returns [batch, num_classes] logits. The
run's config.json records "examples.custom_model:build" and the arguments, so evaluate, predict and a
resume import this file again: run them from the directory that holds `examples/` (or make it a package
you install).
"""

import math

from torch import nn


class Wide(nn.Module):
    """One hidden layer of `width` units with a GELU, and a skip connection from the pixels to the logits."""

    def __init__(self, inputs: int, num_classes: int, width: int):
        super().__init__()
        self.hidden, self.out = nn.Linear(inputs, width), nn.Linear(width, num_classes)
        self.skip = nn.Linear(inputs, num_classes, bias=False)

    def forward(self, x):
        return self.out(nn.functional.gelu(self.hidden(x))) + self.skip(x)


def build(input_shape: tuple[int, ...], num_classes: int, width: int = 128) -> nn.Module:
    return Wide(math.prod(input_shape), num_classes, width)
