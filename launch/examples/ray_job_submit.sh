#!/usr/bin/env bash
# Submit a training job to a running Ray cluster.
#
# A cluster on this machine only (loopback):
#   export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled
#   ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1
#   launch/examples/ray_job_submit.sh
#   ray stop
# A real cluster: `ray start --head` on the head node, `ray start --address=HEAD:6379`
# on the others, then RAY_DASHBOARD=http://HEAD:8265 NUM_WORKERS=16 USE_GPU=1 this script.
#
# RUN_DIR must be an absolute path every node sees: the job runs from a copy of
# this directory, and the workers of a restarted group resume from its checkpoints.
set -euo pipefail
cd "$(dirname "$0")/../.."

RAY_DASHBOARD=${RAY_DASHBOARD:-http://127.0.0.1:8265}
NUM_WORKERS=${NUM_WORKERS:-2}
MAX_FAILURES=${MAX_FAILURES:-3}
CONFIG=${CONFIG:-configs/tiny.yaml}
RUN_DIR=${RUN_DIR:-$PWD/runs/ray-$(date +%Y%m%d-%H%M%S)}
PYTHON=${PYTHON:-python}

exec ray job submit --address "$RAY_DASHBOARD" --working-dir . -- \
    "$PYTHON" launch/ray_train.py --config "$CONFIG" --num-workers "$NUM_WORKERS" \
    --max-failures "$MAX_FAILURES" --run-dir "$RUN_DIR" ${USE_GPU:+--use-gpu} "$@"
