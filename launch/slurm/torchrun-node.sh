#!/bin/bash
# One copy runs on each node of a training job (train.sbatch starts it with
# `srun --ntasks-per-node=1`): torchrun with c10d rendezvous on the job's first node.
# Arguments: the training script and its Hydra overrides. Environment (set by train.sbatch):
#   PYTHON, RDZV_HOST, RDZV_PORT, RDZV_ID, CKPT_GRACE_S, LOG_DIR; optional GPUS_PER_NODE.
set -euo pipefail

# One log per node and attempt, named by Slurm's node name (srun's %N is the host name, which
# differs where several slurmd share a host).
log=$LOG_DIR/node-${SLURMD_NODENAME:-$(hostname -s)}-$SLURM_JOB_ID-r${SLURM_RESTART_COUNT:-0}.log
exec >>"$log" 2>&1

# Processes per node: GPUS_PER_NODE if set, else the GPUs Slurm gave this job on this node
# (SLURM_GPUS_ON_NODE, set with --gpus-per-node/--gres), else every GPU nvidia-smi lists,
# else 1 (a CPU node; gloo).
nproc=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
if [ -z "$nproc" ] && command -v nvidia-smi >/dev/null 2>&1; then
    nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
[ -n "$nproc" ] && [ "$nproc" -gt 0 ] 2>/dev/null || nproc=1

echo "[torchrun-node] $(date -u +%FT%TZ) node=${SLURMD_NODENAME:-?} node_id=$SLURM_NODEID" \
     "cpus_per_task=${SLURM_CPUS_PER_TASK:-1} nproc_per_node=$nproc rendezvous=$RDZV_HOST:$RDZV_PORT id=$RDZV_ID"

# --signals-to-handle adds SIGUSR1: Slurm delivers the step's signal to every process of the
# step, torchrun included, and an unhandled SIGUSR1 would kill torchrun while its workers are
# still saving (the step ends when its tasks end, and Slurm then kills what is left). With it,
# torchrun forwards the signal to its workers and waits up to --shutdown-timeout seconds for
# them to checkpoint and exit; it then exits 1 (not the workers' 85), which train.sbatch knows.
# is_host: emulated nodes that share one address all think they host the rendezvous; on a
# real cluster this says the same thing as torchrun's own detection (node 0 = first hostname).
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" \
    --nproc-per-node="$nproc" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" \
    --rdzv-id="$RDZV_ID" \
    --rdzv-conf="is_host=$(( SLURM_NODEID == 0 ))" \
    --max-restarts=0 \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="$CKPT_GRACE_S" \
    "$@"
