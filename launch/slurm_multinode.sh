#!/usr/bin/env bash
# GRPO on several nodes with SLURM: one `accelerate launch` per node, each starting one process per GPU.
#   sbatch --nodes 2 launch/slurm_multinode.sh recipes/<recipe>.yaml [--field value ...]
# The recipe is the same as on one GPU; ZeRO-3 comes from launch/multi_node_zero3.yaml (set ACCELERATE_CONFIG to
# use another, e.g. launch/zero2.yaml or launch/zero3_offload.yaml). Shared storage is assumed for the repo and
# `output_dir`: only the main process writes the model, every process reads checkpoints when resuming.
#SBATCH --job-name=vlm-rl-grpo
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

RECIPE=${1:?usage: sbatch --nodes N launch/slurm_multinode.sh <recipe.yaml> [--field value ...]}
shift
CONFIG=${ACCELERATE_CONFIG:-launch/multi_node_zero3.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}

# One task per node; SLURM_NODEID tells each its machine rank. Single quotes: expanded on the node, not here.
# --kill-on-bad-exit: a node that fails (its `step_timeout` expired, a peer lost) ends the others' launchers too,
# a node whose process is stuck and cannot act on its own included (docs/reliability.md#faults).
srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  accelerate launch --config_file "$0" \
    --num_machines "$SLURM_NNODES" --num_processes $(( SLURM_NNODES * $1 )) \
    --machine_rank "$SLURM_NODEID" --main_process_ip "$2" --main_process_port "$3" \
    -m vlm_rl.train --config "${@:4}"
' "$CONFIG" "$GPUS_PER_NODE" "$MAIN_NODE" "$MAIN_PORT" "$RECIPE" "$@"
