#!/usr/bin/env bash
# Many machines: run this on every node, the same command except NODE_RANK.
#   node 0:  NODE_RANK=0 RDZV_HOST=10.0.0.1 NNODES=2 NPROC=8 launch/examples/torchrun_multi_node.sh
#   node 1:  NODE_RANK=1 RDZV_HOST=10.0.0.1 NNODES=2 NPROC=8 launch/examples/torchrun_multi_node.sh
# RDZV_HOST:RDZV_PORT must be reachable from every node (node 0 hosts the c10d
# store). RUN_DIR must be on a file system every node sees (rank 0 writes
# logs and checkpoints, every rank reads them on --resume).
# Try it on one machine with two terminals: RDZV_HOST=127.0.0.1 NPROC=1.
set -euo pipefail
cd "$(dirname "$0")/../.."

NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}
NPROC=${NPROC:-1}
RDZV_HOST=${RDZV_HOST:?set RDZV_HOST to the address of node 0}
RDZV_PORT=${RDZV_PORT:-29400}
RDZV_ID=${RDZV_ID:-moe-train}
CONFIG=${CONFIG:-configs/tiny.yaml}
RUN_DIR=${RUN_DIR:-runs/multinode}
# The address other nodes reach this one at (rank 0's becomes MASTER_ADDR).
LOCAL_ADDR=${LOCAL_ADDR:-$(hostname -I 2>/dev/null | awk '{print $1}')}
if [ "$RDZV_HOST" = 127.0.0.1 ] || [ "$RDZV_HOST" = localhost ]; then LOCAL_ADDR=127.0.0.1; fi

exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv_id "$RDZV_ID" \
    ${LOCAL_ADDR:+--local_addr "$LOCAL_ADDR"} \
    launch/train.py --config "$CONFIG" --run-dir "$RUN_DIR" "$@"
