#!/bin/bash
# essa_72b_int4.sh — ESSA on Qwen2.5-72B-Instruct quantized to INT4 (AWQ, or GPTQ-Int4), one rank per GPU.
#
# Launch (from the repository root):
#   sbatch slurm/essa_72b_int4.sh                                # 2 nodes × 8 GPUs = 16 ranks, AWQ checkpoint
#   ESSA_MODEL=/scratch/models/Qwen2.5-72B-Instruct-GPTQ-Int4 ESSA_SET="model.quantization=gptq" \
#     sbatch --nodes=8 slurm/essa_72b_int4.sh                    # GPTQ instead of AWQ, 64 GPUs
#   ESSA_DATA=/scratch/data/prm800k/train.jsonl sbatch slurm/essa_72b_int4.sh --set search.popsize=96
# Resources: N nodes × 8 GPUs (≥ 80 GB each: INT4 weights are ~40 GB, the rest is KV cache), 8 ranks per node,
#            8 CPUs per rank, 24 h; requeued on preemption or at the time limit; the requeued job resumes.
# Preset: configs/qwen72b_int4.yaml (vLLM backend). Knobs: slurm/README.md.
#SBATCH --job-name=essa-72b-int4
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

ESSA_PRESET=${ESSA_PRESET:-qwen72b_int4}
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
