#!/bin/bash
# essa_debug.sh — a small ESSA job to check the plumbing (SLURM, MPI, run directory, requeue) in minutes.
#
# Launch (from the repository root):
#   sbatch slurm/essa_debug.sh                                   # 1 node, 4 CPU ranks, fake backend, 10 generations
#   sbatch -p debug slurm/essa_debug.sh --set run.generations=3  # script arguments are run arguments
#   ESSA_PRESET=cpu_default sbatch slurm/essa_debug.sh           # the embedded SmolLM2 model on CPU (needs the CPU env)
#   ESSA_LAUNCHER=mpirun sbatch slurm/essa_debug.sh              # the site's mpirun instead of srun --mpi=pmix
#   ESSA_DRY_RUN=1 bash slurm/essa_debug.sh                      # print the launch line, run nothing
# Resources: 1 node, 4 tasks × 2 CPUs, no GPU, 30 min. Preset: configs/fake_scaling.yaml (backend.name=fake:
#            an analytic reward, no model), so only the distributed engine, the log and the launch are tested.
# Knobs: slurm/README.md (ESSA_* environment variables; "$@" goes to python -m essa_hpc.run).
#SBATCH --job-name=essa-debug
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --signal=B:USR2@60
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

ESSA_PRESET=${ESSA_PRESET:-fake_scaling}
ESSA_GENERATIONS=${ESSA_GENERATIONS:-10}
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
