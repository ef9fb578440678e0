#!/usr/bin/env bash
# A SLURM array of search workers on one study in PostgreSQL.
#
#   1. once, from a login node (creates schema, study and stored recipe; runs nothing):
#        export SEARCH_PG_PASSWORD=...            # never written into the recipe or the study
#        python -m search run recipes/cifar10.yaml --workers 0 \
#            --set 'study.storage=postgresql+psycopg://search:${SEARCH_PG_PASSWORD}@db.example.org/search'
#   2. sbatch --export=ALL,SEARCH_PG_PASSWORD scripts/slurm_workers.sh cifar10
#
# Each array task is one worker on one GPU. The study total (n_trials) is shared: workers stop
# when it is taken. A preempted or killed worker's trial is failed after 2x study.heartbeat and
# run again by another worker; re-submitting the array resumes the study.
#SBATCH --job-name=search-workers
#SBATCH --array=0-7
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --signal=B:TERM@120
set -euo pipefail
STUDY=${1:?usage: sbatch scripts/slurm_workers.sh STUDY_NAME}
export SEARCH_STORAGE=${SEARCH_STORAGE:-'postgresql+psycopg://search:${SEARCH_PG_PASSWORD}@db.example.org/search'}
# Compute nodes are often offline: weights and data come from caches filled by `search prefetch`.
export TORCH_HOME=${TORCH_HOME:-$HOME/.cache/torch} HF_HUB_OFFLINE=1
# exec: SLURM's TERM (sent 120 s before the time limit) reaches the worker, which ends its trial
# as FAIL "interrupted" and closes the storage cleanly.
exec python -m search worker --study "$STUDY"
