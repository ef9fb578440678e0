#!/usr/bin/env bash
# A SLURM array of search workers on one study in PostgreSQL, through one storage proxy.
#
#   1. once, from a login node (creates schema, study and stored recipe; runs nothing):
#        export SEARCH_PG_PASSWORD=...            # never written into the recipe or the study
#        python -m search run recipes/cifar10.yaml --workers 0 \
#            --set 'study.storage=postgresql+psycopg://search:${SEARCH_PG_PASSWORD}@db.example.org/search'
#   2. one proxy next to the database (its host, or a node on the cluster's private network;
#      the protocol is unauthenticated, so never on a public address). It holds at most
#      --threads database connections, however many workers there are:
#        SEARCH_PG_PASSWORD=... python -m search proxy --host 0.0.0.0 --port 13000 --threads 10 \
#            --storage 'postgresql+psycopg://search:${SEARCH_PG_PASSWORD}@db.example.org/search'
#   3. sbatch --array=0-255 scripts/slurm_workers.sh cifar10
#      (workers need no database password: SEARCH_STORAGE=grpc://proxy.example.org:13000)
#
# Each array task is one worker on one GPU. The study total (n_trials) is shared: workers stop
# when it is taken. A preempted worker (SIGTERM) queues its trial again at once; a killed one's
# is failed after 10 silent heartbeats. Either way another worker resumes it from its last epoch
# (set study.checkpoint_dir to a path every node reads); re-submitting the array resumes the study. Without a proxy, set
# SEARCH_STORAGE to the database URL (and export SEARCH_PG_PASSWORD): fine for a few dozen
# workers, until the database's connection limit ("too many clients").
#SBATCH --job-name=search-workers
#SBATCH --array=0-7
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --signal=B:TERM@120
set -euo pipefail
STUDY=${1:?usage: sbatch scripts/slurm_workers.sh STUDY_NAME}
export SEARCH_STORAGE=${SEARCH_STORAGE:-grpc://proxy.example.org:13000}
# Compute nodes are often offline: weights and data come from caches filled by `search prefetch`.
export TORCH_HOME=${TORCH_HOME:-$HOME/.cache/torch} HF_HUB_OFFLINE=1
# exec: SLURM's TERM (sent 120 s before the time limit) reaches the worker, which ends its trial
# as FAIL "interrupted" and closes the storage cleanly.
exec python -m search worker --study "$STUDY"
