#!/bin/bash
# essa_72b_tp.sh — ESSA on Qwen2.5-72B-Instruct in bf16 with tensor parallelism: each rank owns ESSA_TP GPUs
# (a TP vLLM engine), so ranks per node = GPUs per node / ESSA_TP; slurm/essa_rank.sh sets each rank's
# CUDA_VISIBLE_DEVICES from its local rank (SLURM_LOCALID): rank L gets GPUs L*TP .. L*TP+TP-1.
#
# Launch (from the repository root):
#   sbatch slurm/essa_72b_tp.sh                                  # TP=4: 4 nodes × 8 GPUs = 8 ranks of 4 GPUs
#   ESSA_TP=2 sbatch --ntasks-per-node=4 slurm/essa_72b_tp.sh    # TP=2 (tight on 80 GB GPUs: 72 GB of weights each)
#   ESSA_TP=8 sbatch --ntasks-per-node=1 --nodes=8 slurm/essa_72b_tp.sh
#   ESSA_MODEL=/scratch/models/Qwen2.5-72B-Instruct ESSA_DATA=/scratch/data/prm800k/train.jsonl sbatch slurm/essa_72b_tp.sh
# Resources: N nodes × 8 GPUs (80 GB), 8/ESSA_TP ranks per node, 16 CPUs per rank, 24 h; requeued on preemption
#            or at the time limit; the requeued job resumes. The script stops at once (exit 2) when
#            ranks per node × ESSA_TP differs from the GPUs per node.
# Preset: configs/qwen72b_tp.yaml (vLLM backend; backend.tensor_parallel_size is set from ESSA_TP). Knobs: slurm/README.md.
#SBATCH --job-name=essa-72b-tp
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=2
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR2@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

ESSA_PRESET=${ESSA_PRESET:-qwen72b_tp}
ESSA_TP=${ESSA_TP:-4}

# Find the repository: SLURM runs a copy of this script from its spool folder, so look at ESSA_HOME,
# then beside this file, then the folder sbatch was called from, then the pip-installed package's data.
if [ -z "${ESSA_HOME:-}" ]; then
    for d in "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.."; do
        if [ -f "$d/slurm/common.sh" ]; then ESSA_HOME=$(cd "$d" && pwd) && break; fi
    done
fi
if [ -z "${ESSA_HOME:-}" ]; then
    ESSA_HOME=$("${ESSA_PYTHON:-python}" -c 'from essa_hpc.resources import home; print(home())' 2>/dev/null) || ESSA_HOME=
fi
[ -f "${ESSA_HOME:-}/slurm/common.sh" ] || { echo "essa: error: cannot find slurm/common.sh; set ESSA_HOME=/path/to/essa_hpc" >&2; exit 2; }
export ESSA_HOME
# shellcheck source=slurm/common.sh
. "$ESSA_HOME/slurm/common.sh"
essa_main "$@"
