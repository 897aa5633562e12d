#!/usr/bin/env bash
# Many machines under the DeepSpeed launcher.
#
# With passwordless ssh (pdsh) from node 0 to every host of the hostfile, run
# once, on node 0:
#   HOSTFILE=launch/hostfile.example MASTER_ADDR=node0 launch/examples/deepspeed_multi_node.sh
#
# Without ssh, run on every node with its NODE_RANK (the same hostfile everywhere):
#   NO_SSH=1 NODE_RANK=0 MASTER_ADDR=node0 launch/examples/deepspeed_multi_node.sh   # on node0
#   NO_SSH=1 NODE_RANK=1 MASTER_ADDR=node0 launch/examples/deepspeed_multi_node.sh   # on node1
#
# Environment variables for the remote ranks (NCCL_SOCKET_IFNAME, ...) go into
# a .deepspeed_env file (NAME=VALUE lines) in this directory or in $HOME.
# RUN_DIR must be on a file system every node sees.
set -euo pipefail
cd "$(dirname "$0")/../.."

HOSTFILE=${HOSTFILE:-launch/hostfile.example}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of the first host}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-configs/tiny.yaml}
DS_CONFIG=${DS_CONFIG:-configs/deepspeed/zero2.json}
RUN_DIR=${RUN_DIR:-runs/deepspeed-multinode}

EXTRA=()
if [ -n "${NO_SSH:-}" ]; then
    EXTRA=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK with NO_SSH}")
fi

exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    ${EXTRA[@]+"${EXTRA[@]}"} \
    launch/train.py --config "$CONFIG" --deepspeed_config "$DS_CONFIG" --run-dir "$RUN_DIR" "$@"
