#!/usr/bin/env bash
# Fine-tune on several nodes with Slurm: `sbatch examples/slurm_train.sh [dvc repro targets]` from the repository.
#
# Written for Slurm (sbatch + srun); on Kubernetes (an indexed Job) or SkyPilot the same last lines run on each node,
# with the node's index in place of SLURM_NODEID and machine rank 0's address in MASTER_ADDR. params.yaml must say:
#   train.num_machines: <the nodes below>        train.num_processes: <GPUs per node>
#   paths.checkpoints: a folder on a file system that every node reaches (each process saves its state there)
#   paths.vision_cache: a folder on each node's own disk (the default, .cache/..., is one when each node has its own
#     clone; with the repository on a shared file system, give a node-local absolute path such as /scratch/...)
# Every node needs the same commit and the pipeline's inputs (data/processed, models/base): `dvc pull` or the shared
# file system. README "Several nodes" has the rest.
#SBATCH --job-name=florence-ops-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail

if [ -z "${FLORENCE_OPS_ON_NODE:-}" ]; then  # the batch step: start this script once on every node
  export FLORENCE_OPS_ON_NODE=1
  exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$0" "$@"
fi

# The rendezvous runs on machine rank 0, the allocation's first node; its port is train.main_process_port.
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
if [ "$SLURM_NODEID" -eq 0 ]; then
  exec dvc repro "$@"  # the train stage launches this node's processes as machine rank 0 and writes the outputs
else
  exec florence-ops train --machine-rank "$SLURM_NODEID"  # joins the train stage's processes; writes nothing
fi
