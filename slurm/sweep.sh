#!/usr/bin/env bash
# A sweep on a SLURM cluster: each task of the array is one worker of the SPEC's study, pulling trials
# until none is left (python -m mnist_dist.sweep SPEC; docs/experiments.md).
#
#   sbatch --array=0-7 slurm/sweep.sh experiments/depth-fashion.yaml                    # 8 workers
#   sbatch --array=0-3 --gpus-per-node=2 slurm/sweep.sh SPEC.yaml   # SPEC: processes: 2, one trial on 2 GPUs
#   MNIST_DIST_ACTIVATE="source ~/venvs/mnist/bin/activate" sbatch --array=0-7 slurm/sweep.sh SPEC.yaml
#
# The SPEC's `dir` must be on a file system every node sees: the study (a journal file) and the trials'
# runs live there, and a worker takes over a trial whose worker is gone through its lock file (flock,
# which NFS and Lustre mounted with `flock` support). Start with --workers N per task for N trials at once.
#
# Preemption: SLURM sends USR1 90 s before the time limit; the worker's runs save a checkpoint and stop,
# and the task requeues itself. Any worker, this one after its requeue or another, continues the trial.
#
#SBATCH --job-name=mnist_dist-sweep
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --time=04:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@90
#SBATCH --requeue

set -euo pipefail

if [ -n "${MNIST_DIST_ACTIVATE:-}" ]; then
    eval "$MNIST_DIST_ACTIVATE"
fi
: "${SLURM_JOB_ID:?run this script with sbatch}"
echo "mnist_dist: sweep worker, job $SLURM_JOB_ID (array task ${SLURM_ARRAY_TASK_ID:-none}," \
     "restart ${SLURM_RESTART_COUNT:-0}) on $(hostname)"

preempted=0
on_usr1() {
    preempted=1
    echo "mnist_dist: USR1 received: the worker's runs save a checkpoint and stop"
    kill -TERM "$worker_pid" 2>/dev/null || true
}
trap on_usr1 USR1

python -m mnist_dist.sweep "$@" &
worker_pid=$!
status=0
wait "$worker_pid" || status=$?
while kill -0 "$worker_pid" 2>/dev/null; do  # `wait` returns early when USR1 arrives
    status=0
    wait "$worker_pid" || status=$?
done

if [ "$preempted" = 1 ]; then
    echo "mnist_dist: requeueing job $SLURM_JOB_ID; a worker continues its trial from the last checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
