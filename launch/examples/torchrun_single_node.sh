#!/usr/bin/env bash
# One machine, NPROC ranks (one per GPU; on a CPU-only machine, gloo ranks).
#   launch/examples/torchrun_single_node.sh            # 2 ranks, configs/tiny.yaml
#   NPROC=8 CONFIG=my.yaml RUN_DIR=runs/x launch/examples/torchrun_single_node.sh --set train.max_steps=50
set -euo pipefail
cd "$(dirname "$0")/../.."

NPROC=${NPROC:-2}
CONFIG=${CONFIG:-configs/tiny.yaml}
RUN_DIR=${RUN_DIR:-runs/torchrun-$(date +%Y%m%d-%H%M%S)}

# --standalone: a private rendezvous on this machine (free port, no MASTER_* needed).
exec torchrun --standalone --nnodes 1 --nproc_per_node "$NPROC" \
    launch/train.py --config "$CONFIG" --run-dir "$RUN_DIR" "$@"
