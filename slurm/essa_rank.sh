#!/bin/bash
# essa_hpc per-rank wrapper: give this rank its GPUs, then exec the command (python -m essa_hpc.run ...).
#
#   srun  ... bash slurm/essa_rank.sh python -m essa_hpc.run ...     (slurm/common.sh builds this line)
#   mpirun ... bash slurm/essa_rank.sh python -m essa_hpc.run ...
#
# A rank owns ESSA_TP GPUs (1: one rank per GPU; 2 or 4: a tensor-parallel vLLM engine per rank). The
# local rank comes from the launcher (SLURM_LOCALID under srun, OMPI_COMM_WORLD_LOCAL_RANK under Open
# MPI, MPI_LOCALRANKID under MPICH/Intel MPI). The placement rule is essa_hpc/placement.py's, mirrored
# here because it must act before Python starts (tests/test_placement.py checks that they agree): from
# the GPUs the step can see (CUDA_VISIBLE_DEVICES, indices or UUIDs) local rank L gets entries
# [L*TP, (L+1)*TP). When exactly ESSA_TP GPUs are visible, SLURM already bound them to this task
# (--gpus-per-task) and they are kept. ESSA_GPU_MAP=0 leaves CUDA_VISIBLE_DEVICES alone. No GPUs
# visible (CPU runs): nothing to map.
# Quiet on success (rank 0 alone prints, in python); a mapping problem stops this rank with its reason.

local_rank=${SLURM_LOCALID:-${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-${PMI_LOCAL_RANK:-0}}}}
tp=${ESSA_TP:-1}
export ESSA_LOCAL_RANK=$local_rank

if [ $# -eq 0 ]; then
    echo "essa_rank.sh: usage: essa_rank.sh COMMAND [ARGS...]" >&2
    exit 2
fi
if ! [[ "$tp" =~ ^[1-9][0-9]*$ ]] || ! [[ "$local_rank" =~ ^[0-9]+$ ]]; then
    echo "essa_rank.sh: ESSA_TP=$tp and the local rank $local_rank must be integers (TP >= 1)" >&2
    exit 2
fi

visible=${CUDA_VISIBLE_DEVICES:-}
if [ "${ESSA_GPU_MAP:-1}" != 0 ] && [ -n "$visible" ] && [ "$visible" != NoDevFiles ]; then
    IFS=, read -r -a devices <<<"$visible"
    n=${#devices[@]}
    if [ "$n" -ne "$tp" ]; then
        first=$((local_rank * tp))
        if [ $((first + tp)) -gt "$n" ]; then
            echo "essa_rank.sh: local rank $local_rank on $(hostname) needs GPUs $first..$((first + tp - 1)) (ESSA_TP=$tp)" \
                "but only $n are visible (CUDA_VISIBLE_DEVICES=$visible): ranks per node × ESSA_TP must equal GPUs per node" >&2
            exit 2
        fi
        mine=$(
            IFS=,
            echo "${devices[*]:first:tp}"
        )
        export CUDA_VISIBLE_DEVICES=$mine
    fi
fi

exec "$@"
