#!/usr/bin/env bash
# One node, N GPUs train and M GPUs generate: a vLLM server on the last M GPUs, training on the first N.
#   launch/vllm_server_split.sh RECIPE [N_TRAIN] [M_GENERATE] [ACCELERATE_CONFIG]
# Defaults: 6 train, 2 generate, launch/zero3.yaml. The recipe must say `use_vllm: true`; this script sets
# `vllm_mode: server` and points the trainer at the server. Extra flags after the four arguments go to training.
set -euo pipefail
RECIPE=${1:?usage: $0 RECIPE [N_TRAIN] [M_GENERATE] [ACCELERATE_CONFIG] [--field value ...]}
N_TRAIN=${2:-6}
M_GENERATE=${3:-2}
CONFIG=${4:-launch/zero3.yaml}
shift $(( $# < 4 ? $# : 4 ))
PORT=${VLLM_PORT:-8000}

train_gpus=$(seq -s, 0 $((N_TRAIN - 1)))
serve_gpus=$(seq -s, "$N_TRAIN" $((N_TRAIN + M_GENERATE - 1)))

# The server: tensor parallel over its GPUs, image settings and limits from the same recipe.
CUDA_VISIBLE_DEVICES=$serve_gpus vlm-rl vllm-serve --config "$RECIPE" \
    --vllm_server_host 127.0.0.1 --vllm_server_port "$PORT" --vllm_tensor_parallel_size "$M_GENERATE" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT

# The trainer waits for the server (vllm_server_timeout, 240 s by default) before its first step.
CUDA_VISIBLE_DEVICES=$train_gpus accelerate launch --config_file "$CONFIG" --num_processes "$N_TRAIN" \
    -m vlm_rl.train --config "$RECIPE" --use_vllm true --vllm_mode server \
    --vllm_server_host 127.0.0.1 --vllm_server_port "$PORT" "$@"
