"""`python -m mnist_dist.train FLAGS` that sends itself SIGUSR1, on no timer, as its Nth stretch of
steps (between two checks) begins, STOP_IN=stretch:N, as its Nth batch begins (with accumulation, inside
an optimizer step), STOP_IN=batch:N, or as its Nth evaluation begins, STOP_IN=evaluation:N."""

import os
import signal
import sys

from mnist_dist import config, train

WHERE, NTH = os.environ["STOP_IN"].split(":")
calls = 0


def stop_on_nth_call(real):
    def call(*args, **kwargs):
        global calls
        calls += 1
        if calls == int(NTH):
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args, **kwargs)
    return call


if WHERE == "stretch":
    train.EagerSteps.run = stop_on_nth_call(train.EagerSteps.run)
elif WHERE == "batch":
    train.train_step = stop_on_nth_call(train.train_step)
else:
    train.test_metrics = stop_on_nth_call(train.test_metrics)
sys.exit(train.main(config.parse_args(sys.argv[1:])))
