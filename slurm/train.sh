#!/usr/bin/env bash
# Train mnist_dist on a SLURM cluster: one `accelerate launch` per node (as mnist_dist.launch,
# whose exit status is the training processes'), through srun.
#
#   sbatch --gpus-per-node=8 slurm/train.sh [mnist_dist.train flags...]   # 1 node, 8 GPUs
#   sbatch --nodes=4 --gpus-per-node=8 slurm/train.sh --epochs 20         # 4 nodes
#   MNIST_DIST_CPU=1 sbatch --nodes=2 slurm/train.sh                      # CPU-only nodes (gloo)
#   sbatch --array=0-4 --output=%x-%A_%a.out slurm/train.sh               # 5 runs: --seed 0..4
#   sbatch --nodes=4 --gpus-per-node=8 slurm/train.sh --doctor [flags]     # check the nodes first (docs/hangs.md)
#
# Requests: one task per node runs that node's launcher and every training process on it, so
# give it the node's GPUs (--gpus-per-node, or --gres=gpu:N) and CPUs (--cpus-per-task, or
# --exclusive as below). Processes per node follow what SLURM granted: SLURM_GPUS_ON_NODE, else
# CUDA_VISIBLE_DEVICES, else nvidia-smi.
#
# Site settings (environment variables; sbatch passes your environment to the job):
#   MNIST_DIST_ACTIVATE        shell code run first on every node, e.g.
#                              "source ~/venvs/mnist/bin/activate" or "module load cuda/12.4"
#   MNIST_DIST_DATA_DIR        IDX files to train on (passed as --data-dir); default: --dataset
#   MNIST_DIST_OUTPUT_DIR      default: outputs/slurm-$SLURM_JOB_ID (the same after a requeue); an
#                              array task i uses outputs/slurm-<array job>_i (or MNIST_DIST_OUTPUT_DIR/i)
#   MNIST_DIST_ACCELERATE_CONFIG  an accelerate config file (precision, torch.compile, ...), e.g.
#                              accelerate_configs/multi_gpu.yaml; the rendezvous still comes from SLURM
#   WANDB_MODE                 online | offline | disabled (default: online if logged in, else offline)
#   MNIST_DIST_CPU=1           CPU processes connected over gloo, for clusters without GPUs and tests
#   MNIST_DIST_PROCS_PER_NODE  processes per node; default: the GPUs visible on the node (1 on CPU)
#   MNIST_DIST_PORT            rendezvous port; default: 20000 + job id mod 20000 (two jobs on one
#                              node do not collide)
#
# Preemption: SLURM sends USR1 90 s before the time limit (--signal=B:USR1@90). This script then
# asks every training process to stop (SIGTERM through the launchers), they save a checkpoint
# and exit, and the job requeues itself; the requeued job resumes with --resume auto into the
# same output directory and the same W&B run.
#
#SBATCH --job-name=mnist_dist
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=01:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@90
#SBATCH --requeue

set -euo pipefail

module=mnist_dist.train
if [ "${1:-}" = --doctor ]; then  # mnist_dist.doctor, launched as the run would be, with the run's flags
    module=mnist_dist.doctor
    shift
fi

if [ -n "${MNIST_DIST_ACTIVATE:-}" ]; then
    eval "$MNIST_DIST_ACTIVATE"
fi

nodes=${SLURM_JOB_NUM_NODES:?run this script with sbatch}
# the first node hosts the rendezvous; use its address from SLURM (an IP where node names
# do not resolve), turned into an IP where it is a name
main_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
main_addr=$(scontrol show node "$main_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
main_ip=$(getent ahostsv4 "$main_addr" 2>/dev/null | awk 'NR==1 {print $1}')
main_ip=${main_ip:-$main_addr}
port=${MNIST_DIST_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
output_dir=${MNIST_DIST_OUTPUT_DIR:-outputs/slurm-$SLURM_JOB_ID}
seed_flags=()
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then  # each task of an array: a run of its own, seeded by its index
    output_dir=${MNIST_DIST_OUTPUT_DIR:+$MNIST_DIST_OUTPUT_DIR/$SLURM_ARRAY_TASK_ID}
    output_dir=${output_dir:-outputs/slurm-${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID}
    seed_flags=(--seed "$SLURM_ARRAY_TASK_ID")  # before the user's flags: a --seed given wins
fi

train_flags=(--output-dir "$output_dir" --resume auto "${seed_flags[@]}")
[ -n "${MNIST_DIST_DATA_DIR:-}" ] && train_flags+=(--data-dir "$MNIST_DIST_DATA_DIR")
[ "${MNIST_DIST_CPU:-0}" = 1 ] && train_flags+=(--cpu)

echo "mnist_dist: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $nodes node(s): $SLURM_JOB_NODELIST;" \
     "rendezvous $main_ip:$port; output $output_dir"

preempted=0
on_usr1() {
    preempted=1
    echo "mnist_dist: USR1 received: asking the training processes to checkpoint and stop"
    # SIGTERM to every task of the job's steps (the launchers), not to this batch shell;
    # each launcher forwards it to its training processes
    scancel --signal=TERM "$SLURM_JOB_ID" || true
}
trap on_usr1 USR1

# one launcher per node; the per-node values are evaluated inside each task
srun --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    set -euo pipefail
    if [ "${MNIST_DIST_CPU:-0}" = 1 ]; then
        per_node=${MNIST_DIST_PROCS_PER_NODE:-1}
        export ACCELERATE_USE_CPU=1
    else  # the GPUs SLURM granted this node, before asking the driver
        per_node=${MNIST_DIST_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
        if [ -z "$per_node" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
            per_node=$(echo "$CUDA_VISIBLE_DEVICES" | tr , "\n" | grep -c .)
        fi
        if [ -z "$per_node" ] && command -v nvidia-smi >/dev/null; then
            per_node=$(nvidia-smi -L | wc -l)
        fi
        if [ "${per_node:-0}" -eq 0 ]; then
            echo "mnist_dist: no GPU on $(hostname): ask SLURM for them (sbatch --gpus-per-node=N)," \
                 "or set MNIST_DIST_CPU=1 to train on CPU-only nodes" >&2
            exit 2
        fi
    fi
    launch_flags=(--mixed_precision no --dynamo_backend no)
    if [ -n "${MNIST_DIST_ACCELERATE_CONFIG:-}" ]; then  # its settings; the command line still wins
        launch_flags=(--config_file "$MNIST_DIST_ACCELERATE_CONFIG")
    fi
    if [ $(( $0 * per_node )) -eq 1 ]; then  # a single process: no rendezvous
        if [ -z "${MNIST_DIST_ACCELERATE_CONFIG:-}" ]; then
            exec python -m "$3" "${@:4}"
        fi
        exec python -m mnist_dist.launch "${launch_flags[@]}" --num_processes 1 -m "$3" "${@:4}"
    fi
    exec python -m mnist_dist.launch "${launch_flags[@]}" \
        --multi_gpu --num_machines "$0" --num_processes $(( $0 * per_node )) \
        --machine_rank "$SLURM_NODEID" --main_process_ip "$1" --main_process_port "$2" \
        --rdzv_backend static --same_network -m "$3" "${@:4}"
' "$nodes" "$main_ip" "$port" "$module" "${train_flags[@]}" "$@" &
srun_pid=$!

status=0
wait "$srun_pid" || status=$?
while kill -0 "$srun_pid" 2>/dev/null; do  # `wait` returns early when USR1 arrives
    status=0
    wait "$srun_pid" || status=$?
done

if [ "$preempted" = 1 ]; then
    echo "mnist_dist: requeueing job $SLURM_JOB_ID; it will resume from the last checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
