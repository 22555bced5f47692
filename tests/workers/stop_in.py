"""`python -m mnist_dist.train FLAGS` that sends itself SIGUSR1, on no timer, as its Nth stretch of
steps (between two checks) begins, STOP_IN=stretch:N, as its Nth batch begins (with accumulation, inside
an optimizer step), STOP_IN=batch:N, as its Nth evaluation begins, STOP_IN=evaluation:N, as its Nth
checkpoint is about to be saved, STOP_IN=checkpoint:N, or its outputs written, STOP_IN=outputs:1.
STOP_SIGNAL names another signal (SIGKILL), or several sent one after the other (SIGINT,SIGINT)."""

import os
import signal
import sys

from mnist_dist import checkpoint, config, reporting, selection, steps, train

WHERE, NTH = os.environ["STOP_IN"].split(":")
calls = 0


def stop_on_nth_call(real):
    def call(*args, **kwargs):
        global calls
        calls += 1
        if calls == int(NTH):
            for name in os.environ.get("STOP_SIGNAL", "SIGUSR1").split(","):
                os.kill(os.getpid(), getattr(signal, name))  # handled before the next is sent
        return real(*args, **kwargs)
    return call


if WHERE == "stretch":
    steps.EagerSteps.run = stop_on_nth_call(steps.EagerSteps.run)
elif WHERE == "batch":
    steps.train_step = stop_on_nth_call(steps.train_step)
elif WHERE == "checkpoint":  # the Nth checkpoint, before it is written
    checkpoint.save = stop_on_nth_call(checkpoint.save)
elif WHERE == "outputs":  # the outputs of a finished run, before they are written
    reporting.write_outputs = stop_on_nth_call(reporting.write_outputs)
else:
    selection.Scorer.score = stop_on_nth_call(selection.Scorer.score)
sys.exit(train.main(config.parse_args(sys.argv[1:])))
