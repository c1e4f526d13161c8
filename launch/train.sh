#!/usr/bin/env bash
# Launch `mupfast.train` with the deepspeed launcher, on one node or several.
#
#   launch/train.sh CONFIG [section.key=value ...]
#
# Environment:
#   NUM_GPUS     GPUs per node to use (default: all the launcher sees)
#   INCLUDE      e.g. "localhost:0,1" or "worker-0@worker-1:0,2" (overrides NUM_GPUS)
#   HOSTFILE     a hostfile (see launch/hostfile.example) for multi-node runs over ssh/pdsh
#   MASTER_PORT  rendezvous port; default: a free port, so concurrent jobs on one host don't collide
#   DS_ENV_FILE  a .deepspeed_env file of variables exported on every node (see deepspeed_env.example)
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: launch/train.sh CONFIG [section.key=value ...]" >&2
    exit 2
fi
config=$1; shift
[ -f "$config" ] || { echo "error: config file not found: $config" >&2; exit 2; }
python=${PYTHON:-python3}
port=${MASTER_PORT:-$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
args=(--master_port "$port")
if [ -n "${HOSTFILE:-}" ]; then args+=(--hostfile "$HOSTFILE"); fi
if [ -n "${INCLUDE:-}" ]; then
    args+=(--include "$INCLUDE")
elif [ -n "${NUM_GPUS:-}" ]; then
    args+=(--num_gpus "$NUM_GPUS")
fi
exec "$python" -m deepspeed.launcher.runner "${args[@]}" --module mupfast.train --config "$config" "$@"
