#!/usr/bin/env bash
# One machine, NGPUS ranks under the DeepSpeed launcher and engine (ZeRO from
# DS_CONFIG). On a CPU-only machine DeepSpeed picks its CPU accelerator and
# gloo, and --num_gpus is the number of CPU ranks.
#   launch/examples/deepspeed_single_node.sh
#   NGPUS=8 DS_CONFIG=configs/deepspeed/zero2_bf16.json launch/examples/deepspeed_single_node.sh --set train.precision=bf16
set -euo pipefail
cd "$(dirname "$0")/../.."

NGPUS=${NGPUS:-2}
CONFIG=${CONFIG:-configs/tiny.yaml}
DS_CONFIG=${DS_CONFIG:-configs/deepspeed/zero2.json}
RUN_DIR=${RUN_DIR:-runs/deepspeed-$(date +%Y%m%d-%H%M%S)}
MASTER_PORT=${MASTER_PORT:-29500}

exec deepspeed --num_gpus "$NGPUS" --master_port "$MASTER_PORT" \
    launch/train.py --config "$CONFIG" --deepspeed_config "$DS_CONFIG" --run-dir "$RUN_DIR" "$@"
