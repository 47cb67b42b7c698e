#!/bin/sh
# One expert-parallel rank per MIG instance: run under mpirun, it gives local rank i the (i+1)-th MIG
# instance that `nvidia-smi -L` lists (CUDA_VISIBLE_DEVICES=MIG-<uuid>), then runs the command.
#   mpirun -np 2 scripts/mig-rank.sh arbiter serve --transport mpi --device cuda:0 --model DIR ...
# ARBITER_MIG_UUIDS="MIG-a MIG-b": use these instances (in local-rank order) instead of the listing.
set -eu
rank=${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-}}
if [ -z "$rank" ]; then
  echo "mig-rank.sh: no local rank (OMPI_COMM_WORLD_LOCAL_RANK); run it under mpirun" >&2
  exit 2
fi
if [ -n "${ARBITER_MIG_UUIDS:-}" ]; then
  uuids=$(printf '%s\n' $ARBITER_MIG_UUIDS)
else
  uuids=$(nvidia-smi -L | sed -n 's/.*(UUID: \(MIG-[^)]*\)).*/\1/p')
fi
uuid=$(printf '%s\n' "$uuids" | sed -n "$((rank + 1))p")
if [ -z "$uuid" ]; then
  echo "mig-rank.sh: local rank $rank has no MIG instance ($(printf '%s\n' "$uuids" | grep -c . || true) listed)" >&2
  exit 2
fi
CUDA_VISIBLE_DEVICES=$uuid
export CUDA_VISIBLE_DEVICES
exec "$@"
