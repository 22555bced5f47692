"""`mnist_dist.train FLAGS` that also writes, from every process, the step its run ended at: OUT/rank-N.json
holds {"world_size", "step", "stopped_early"} (argv: OUT FLAGS...)."""

import json
import sys
from pathlib import Path

from mnist_dist import config, reporting, train

OUT = Path(sys.argv[1])
results_of = reporting.results_of


def noted(run, state, *args):
    accelerator = run.accelerator
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"rank-{accelerator.process_index}.json").write_text(json.dumps(
        {"world_size": accelerator.num_processes, "step": state.global_step, "stopped_early": state.stopped_early}))
    return results_of(run, state, *args)


reporting.results_of = noted
sys.exit(train.main(config.parse_args(sys.argv[2:])))
