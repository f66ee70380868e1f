#!/bin/bash
# essa_7b_gsm8k.sh — ESSA on Qwen2.5-Math-7B-Instruct, GSM8K, 8 GPUs, one rank per GPU
# (the paper's best GSM8K setting: LoRA r32, λ96, 100 prompts per candidate, α 0.1).
#
# Launch (from the repository root):
#   sbatch slurm/essa_7b_gsm8k.sh
#   ESSA_MODEL=/scratch/models/Qwen2.5-Math-7B-Instruct ESSA_DATA=/scratch/data/gsm8k/train.jsonl \
#     ESSA_ADAPTER=/scratch/adapters/qwen7b-gsm8k-sft sbatch -p gpu -A myproj slurm/essa_7b_gsm8k.sh
#   ESSA_POPSIZE=48 sbatch slurm/essa_7b_gsm8k.sh --set lora.alpha_fraction=1.0
# Resources: 1 node × 8 GPUs (≥ 24 GB each), 8 ranks, 8 CPUs per rank, 12 h; requeued on preemption or at the
#            time limit (USR2 300 s before it), and the requeued job resumes from the run's checkpoint.
# Preset: configs/qwen7b_gsm8k_8gpu.yaml. Knobs: slurm/README.md (ESSA_* variables; "$@" = run arguments).
#SBATCH --job-name=essa-7b-gsm8k
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR2@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

ESSA_PRESET=${ESSA_PRESET:-qwen7b_gsm8k_8gpu}
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
