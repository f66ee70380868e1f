#!/bin/bash
# essa_32b.sh — ESSA on Qwen2.5-32B-Instruct, PRM800K (MATH problems), 16–128 GPUs, one rank per GPU
# (the paper's PRM800K setting: LoRA r8, λ48, 256 prompts per candidate).
#
# Launch (from the repository root):
#   sbatch slurm/essa_32b.sh                                     # 2 nodes × 8 GPUs = 16 ranks
#   sbatch --nodes=16 slurm/essa_32b.sh                          # 16 nodes × 8 GPUs = 128 ranks
#   ESSA_MODEL=/scratch/models/Qwen2.5-32B-Instruct ESSA_DATA=/scratch/data/prm800k/train.jsonl \
#     sbatch --nodes=4 -p gpu -A myproj slurm/essa_32b.sh --set run.generations=300
#   sbatch --nodes=4 --ntasks-per-node=4 --gpus-per-node=4 slurm/essa_32b.sh   # 4-GPU nodes
# Resources: N nodes × 8 GPUs (≥ 80 GB each: the bf16 weights are 64 GB), 8 ranks per node, 8 CPUs per rank, 24 h;
#            requeued on preemption or at the time limit (USR2 300 s before it); the requeued job resumes.
# Preset: configs/qwen32b_prm800k.yaml. Knobs: slurm/README.md (ESSA_* variables; "$@" = run arguments).
#SBATCH --job-name=essa-32b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR2@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

ESSA_PRESET=${ESSA_PRESET:-qwen32b_prm800k}
ESSA_TP=${ESSA_TP:-1}

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
