# shellcheck shell=bash
# essa_hpc: the shared part of every slurm/essa_*.sh batch script (sourced, never run on its own).
#
# A batch script sets its defaults (ESSA_PRESET, ESSA_TP, ...), sources this file and calls
# `essa_main "$@"`. Everything below is driven by environment variables, so no script needs editing;
# slurm/README.md has the full table. The most used ones:
#
#   ESSA_CONFIG      config YAML (default: configs/$ESSA_PRESET.yaml)
#   ESSA_MODEL ESSA_ADAPTER ESSA_DATA ESSA_VAL_DATA        model.path lora.adapter task.path task.val_path
#   ESSA_POPSIZE ESSA_LORA_RANK ESSA_ALPHA ESSA_BATCH ESSA_GENERATIONS ESSA_SEED
#                    search.popsize lora.rank lora.alpha_fraction task.batch_size run.generations run.seed
#   ESSA_RUN_NAME    run.name (default: <preset>_<job id>: stable across requeues, so a requeued job resumes)
#   ESSA_RUN_DIR     run.dir (default: $ESSA_SCRATCH/essa_hpc/runs where the site sets $SCRATCH, else
#                    <repo>/runs in a checkout, else <submit dir>/runs); ESSA_SCRATCH defaults to $SCRATCH
#   HF_HOME HF_HUB_OFFLINE   the Hugging Face cache and offline mode, passed through to every rank
#                    (compute nodes without internet: download on the login node, then HF_HUB_OFFLINE=1)
#   HDF5_USE_FILE_LOCKING    FALSE unless set: NFS/Lustre/GPFS mounts without flock make HDF5 refuse to open files
#   ESSA_TP          GPUs per rank (backend.tensor_parallel_size); ranks per node = GPUs per node / ESSA_TP
#   ESSA_SET         extra overrides, whitespace separated: "search.sigma0=0.3 eval.every=10"
#   "$@"             script arguments go last to python -m essa_hpc.run (--set k=v, --resume, ...)
#   ESSA_LAUNCHER    srun (default; srun --mpi=$ESSA_SRUN_MPI, pmix by default), mpirun, or none (one rank)
#   ESSA_MODULES     modules to load ("gcc/12 openmpi/4.1 cuda/12.4"); ESSA_VENV / ESSA_CONDA_ENV: environment
#   ESSA_RESUME=1    pass --resume (a checkpoint must exist); without it a rerun resumes when one exists
#   ESSA_DRY_RUN=1   print the launch command and exit
#
# Preemption and time limits (the signal design):
#   The scripts ask for `#SBATCH --signal=B:USR2@300`: 300 s before the time limit SLURM signals the
#   *batch shell only* (B:). The shell traps USR2 (and TERM, which SLURM sends on preemption) and
#   forwards one signal to the launcher it started in the background: USR2 to srun (srun relays it to
#   every task) or to Open MPI's mpirun (which relays USR1/USR2), SIGTERM to MPICH/Intel MPI (Hydra)
#   mpiexec (which relays TERM but dies of USR2). essa_hpc.run treats USR2 and TERM alike: the flag
#   rides in the next Allgather, every rank stops at the same generation boundary, rank 0 checkpoints
#   and the run exits 75. The shell then calls `scontrol requeue $SLURM_JOB_ID`; the requeued job runs
#   this same script with the same environment and job id, hence the same run directory, and
#   essa_hpc.run resumes from its checkpoint automatically.
#   Why B: and not plain --signal=USR2@300 (which SLURM sends to the job steps only): (1) ranks that
#   mpirun starts inside the batch step would never see a step-only signal, (2) the shell must know
#   the job is ending to requeue it, even when the run dies before it installs its handler (model
#   loading), and (3) Hydra's mpiexec must get TERM, not USR2. Raise the lead time when one
#   generation takes longer: `sbatch --signal=B:USR2@900 slurm/essa_32b.sh`.

ESSA_REQUEUE_EXIT_CODE=75   # essa_hpc/exit_codes.py: REQUEUE
ESSA_BAD_INPUT_EXIT_CODE=2  # essa_hpc/exit_codes.py: BAD_INPUT

essa_log() { printf 'essa: %s\n' "$*"; }
essa_warn() { printf 'essa: warning: %s\n' "$*" >&2; }
essa_die() { printf 'essa: error: %s\n' "$*" >&2; exit "$ESSA_BAD_INPUT_EXIT_CODE"; }

# Shell-quoted rendering of a command (for logs and ESSA_DRY_RUN).
essa_quote() {
    local out="" a
    for a in "$@"; do out+=" $(printf '%q' "$a")"; done
    printf '%s\n' "${out# }"
}

essa_is_uint() { [[ "${1:-}" =~ ^[0-9]+$ ]]; }
essa_is_posint() { [[ "${1:-}" =~ ^[1-9][0-9]*$ ]]; }

# Modules, then a venv or conda environment. Optional: unset variables do nothing.
essa_setup_env() {
    local mod
    if [ -n "${ESSA_MODULES:-}" ]; then
        if ! command -v module >/dev/null 2>&1; then
            essa_die "ESSA_MODULES='$ESSA_MODULES' but this shell has no 'module' command (Lmod/Environment Modules)"
        fi
        for mod in $ESSA_MODULES; do
            module load "$mod" || essa_die "module load $mod failed"
        done
    fi
    if [ -n "${ESSA_VENV:-}" ]; then
        [ -f "$ESSA_VENV/bin/activate" ] || essa_die "ESSA_VENV=$ESSA_VENV: no bin/activate there (expected a python venv)"
        # shellcheck disable=SC1091  # the user's venv, not known to shellcheck
        . "$ESSA_VENV/bin/activate"
    fi
    if [ -n "${ESSA_CONDA_ENV:-}" ]; then
        command -v conda >/dev/null 2>&1 || essa_die "ESSA_CONDA_ENV=$ESSA_CONDA_ENV but no 'conda' on PATH (load its module first)"
        eval "$(conda shell.bash hook)" || essa_die "conda shell.bash hook failed"
        conda activate "$ESSA_CONDA_ENV" || essa_die "conda activate $ESSA_CONDA_ENV failed"
    fi
    # A checkout's package runs even when it is not pip-installed in the environment; an installed
    # package's data folder (ESSA_HOME = site-packages/essa_hpc/data) holds no Python to put on the path.
    if [ -d "$ESSA_HOME/essa_hpc" ]; then
        export PYTHONPATH="$ESSA_HOME${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONUNBUFFERED=1
    # HDF5 takes an flock on every file it opens; many cluster mounts (NFS, some Lustre/GPFS) refuse flock
    # and h5py then fails with "unable to lock file". The log has one writer (rank 0), so no lock is needed.
    export HDF5_USE_FILE_LOCKING="${HDF5_USE_FILE_LOCKING:-FALSE}"
}

# Defaults for everything the launch needs; call after the batch script set its own defaults.
essa_defaults() {
    ESSA_PRESET=${ESSA_PRESET:-cpu_default}
    ESSA_CONFIG=${ESSA_CONFIG:-$ESSA_HOME/configs/$ESSA_PRESET.yaml}
    ESSA_SCRATCH=${ESSA_SCRATCH:-${SCRATCH:-}}
    if [ -z "${ESSA_RUN_DIR:-}" ]; then
        # runs write checkpoints and a log every generation: scratch, not an NFS home, where the site has one
        if [ -n "$ESSA_SCRATCH" ]; then
            ESSA_RUN_DIR=$ESSA_SCRATCH/essa_hpc/runs
        elif [ -d "$ESSA_HOME/essa_hpc" ]; then
            ESSA_RUN_DIR=$ESSA_HOME/runs
        else
            ESSA_RUN_DIR=${SLURM_SUBMIT_DIR:-$PWD}/runs
        fi
    fi
    ESSA_RUN_NAME=${ESSA_RUN_NAME:-${ESSA_PRESET}_${SLURM_JOB_ID:-local}}
    ESSA_TP=${ESSA_TP:-1}
    ESSA_LAUNCHER=${ESSA_LAUNCHER:-srun}
    ESSA_SRUN_MPI=${ESSA_SRUN_MPI:-pmix}
    ESSA_MPIRUN=${ESSA_MPIRUN:-mpirun}
    ESSA_PYTHON=${ESSA_PYTHON:-python}
    ESSA_NTASKS=${ESSA_NTASKS:-${SLURM_NTASKS:-1}}
    ESSA_REQUEUE=${ESSA_REQUEUE:-1}
    ESSA_MAX_REQUEUES=${ESSA_MAX_REQUEUES:-100}
    export ESSA_TP ESSA_GPU_MAP="${ESSA_GPU_MAP:-1}"

    [ -f "$ESSA_CONFIG" ] || essa_die "ESSA_CONFIG=$ESSA_CONFIG: no such file (presets are in $ESSA_HOME/configs/)"
    essa_is_posint "$ESSA_TP" || essa_die "ESSA_TP=$ESSA_TP: expected a positive integer (GPUs per rank)"
    essa_is_posint "$ESSA_NTASKS" || essa_die "ESSA_NTASKS=$ESSA_NTASKS: expected a positive integer (ranks)"
    essa_is_uint "$ESSA_MAX_REQUEUES" || essa_die "ESSA_MAX_REQUEUES=$ESSA_MAX_REQUEUES: expected a non-negative integer"
    case "$ESSA_RUN_NAME" in
        "" | */*) essa_die "ESSA_RUN_NAME='$ESSA_RUN_NAME': expected a non-empty name without '/'" ;;
    esac
    case "$ESSA_LAUNCHER" in
        srun | mpirun | none) ;;
        *) essa_die "ESSA_LAUNCHER=$ESSA_LAUNCHER: expected srun, mpirun or none" ;;
    esac
}

# One rank per GPU group: GPUs on this node must equal ranks on this node × ESSA_TP.
essa_check_gpus() {
    local gpus=${SLURM_GPUS_ON_NODE:-} per_node=${SLURM_NTASKS_PER_NODE:-}
    per_node=${per_node%%(*}  # "8(x2)" -> "8"
    if essa_is_uint "$gpus" && essa_is_uint "$per_node" && [ "$gpus" -gt 0 ] && [ "${ESSA_GPU_MAP}" != 0 ]; then
        if [ $((per_node * ESSA_TP)) -ne "$gpus" ]; then
            essa_die "$gpus GPUs per node but $per_node ranks per node × ESSA_TP=$ESSA_TP GPUs per rank = $((per_node * ESSA_TP)); " \
                "submit with --ntasks-per-node=$((gpus / ESSA_TP)) (or set ESSA_GPU_MAP=0 when the site binds GPUs itself)"
        fi
    fi
}

# The arguments of `python -m essa_hpc.run`, in override order: preset < ESSA_* < ESSA_SET < "$@".
essa_build_run_args() {
    local kv item
    ESSA_RUN_ARGS=(--config "$ESSA_CONFIG" --set "run.dir=$ESSA_RUN_DIR" --set "run.name=$ESSA_RUN_NAME")
    for kv in \
        "model.path=${ESSA_MODEL:-}" \
        "lora.adapter=${ESSA_ADAPTER:-}" \
        "task.path=${ESSA_DATA:-}" \
        "task.val_path=${ESSA_VAL_DATA:-}" \
        "search.popsize=${ESSA_POPSIZE:-}" \
        "lora.rank=${ESSA_LORA_RANK:-}" \
        "lora.alpha_fraction=${ESSA_ALPHA:-}" \
        "task.batch_size=${ESSA_BATCH:-}" \
        "run.generations=${ESSA_GENERATIONS:-}" \
        "run.seed=${ESSA_SEED:-}"; do
        [ -n "${kv#*=}" ] && ESSA_RUN_ARGS+=(--set "$kv")
    done
    ESSA_RUN_ARGS+=(--set "backend.tensor_parallel_size=$ESSA_TP")
    for item in ${ESSA_SET:-}; do
        case "$item" in
            *=*) ESSA_RUN_ARGS+=(--set "$item") ;;
            *) essa_die "ESSA_SET: '$item' is not key=value (entries are whitespace separated)" ;;
        esac
    done
    case "${ESSA_RESUME:-0}" in
        1 | true | yes) ESSA_RUN_ARGS+=(--resume) ;;
    esac
    ESSA_RUN_ARGS+=("$@")
}

# The full command line: launcher, per-rank wrapper (GPU mapping), python.
essa_build_launch() {
    local -a extra=()
    local rank_wrapper=(bash "$ESSA_HOME/slurm/essa_rank.sh")
    case "$ESSA_LAUNCHER" in
        srun)
            read -r -a extra <<<"${ESSA_SRUN_ARGS:-}"
            ESSA_LAUNCH=(srun "--mpi=$ESSA_SRUN_MPI" --kill-on-bad-exit=1 "--ntasks=$ESSA_NTASKS")
            # srun >= 22.05 no longer inherits --cpus-per-task from the allocation
            [ -n "${SLURM_CPUS_PER_TASK:-}" ] && ESSA_LAUNCH+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
            ESSA_LAUNCH+=("${extra[@]}" "${rank_wrapper[@]}")
            ;;
        mpirun)
            read -r -a extra <<<"${ESSA_MPIRUN_ARGS:-}"
            ESSA_LAUNCH=("$ESSA_MPIRUN" -n "$ESSA_NTASKS" "${extra[@]}" "${rank_wrapper[@]}")
            ;;
        none)
            [ "$ESSA_NTASKS" -eq 1 ] || essa_die "ESSA_LAUNCHER=none runs one rank, but ESSA_NTASKS=$ESSA_NTASKS"
            ESSA_LAUNCH=("${rank_wrapper[@]}")
            ;;
    esac
    ESSA_LAUNCH+=("$ESSA_PYTHON" -m essa_hpc.run "${ESSA_RUN_ARGS[@]}")
}

# Which signal makes the launcher relay a stop request to every rank (see the header).
essa_forward_signal() {
    if [ -n "${ESSA_FORWARD_SIGNAL:-}" ]; then
        printf '%s\n' "${ESSA_FORWARD_SIGNAL#SIG}"
        return
    fi
    case "$ESSA_LAUNCHER" in
        srun) echo USR2 ;;
        mpirun)
            if "$ESSA_MPIRUN" --version 2>&1 | grep -qiE 'open ?mpi|open-mpi|OpenRTE|prrte'; then
                echo USR2
            else
                echo TERM
            fi
            ;;
        *) echo USR2 ;;  # the python process itself
    esac
}

# Before starting N ranks: the launcher exists and the interpreter can import essa_hpc.
essa_preflight() {
    local version
    if ! command -v "${ESSA_LAUNCH[0]}" >/dev/null 2>&1; then
        essa_die "launcher '${ESSA_LAUNCH[0]}' not found (ESSA_LAUNCHER=$ESSA_LAUNCHER): run inside a SLURM job (sbatch)," \
            "load the MPI module (ESSA_MODULES), or set ESSA_LAUNCHER=mpirun / none"
    fi
    if ! version=$("$ESSA_PYTHON" -c 'import sys, essa_hpc, essa_hpc.run; print(sys.version.split()[0], essa_hpc.__version__)' 2>&1); then
        essa_die "ESSA_PYTHON=$ESSA_PYTHON cannot import essa_hpc (${version##*$'\n'}): activate its environment" \
            "(ESSA_VENV=/path/to/venv or ESSA_CONDA_ENV=name) or set ESSA_PYTHON"
    fi
    essa_log "python ${version% *}, essa_hpc ${version#* }"
}

ESSA_CHILD=""
ESSA_SIGNALLED=""

essa_on_signal() {
    local sig=$1
    if [ -z "$ESSA_SIGNALLED" ]; then
        essa_log "batch shell got SIG$sig at $(date '+%F %T'): asking every rank to checkpoint at the next generation boundary"
    fi
    ESSA_SIGNALLED=$sig
    if [ -n "$ESSA_CHILD" ] && kill -0 "$ESSA_CHILD" 2>/dev/null; then
        kill -s "$ESSA_FWD_SIG" "$ESSA_CHILD" 2>/dev/null || true
    fi
}

# scontrol requeue this job (same id, same environment: the run resumes from its checkpoint).
essa_requeue() {
    local why=$1 restarts=${SLURM_RESTART_COUNT:-0}
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        essa_log "$why; not inside a SLURM job: rerun the same command to resume from the checkpoint"
        return 1
    fi
    case "$ESSA_REQUEUE" in
        0 | false | no)
            essa_log "$why; ESSA_REQUEUE=$ESSA_REQUEUE: not requeueing. Resubmit the same command (ESSA_RUN_NAME=$ESSA_RUN_NAME) to resume"
            return 1
            ;;
    esac
    if [ "$restarts" -ge "$ESSA_MAX_REQUEUES" ]; then
        essa_log "$why; already restarted $restarts times (ESSA_MAX_REQUEUES=$ESSA_MAX_REQUEUES): not requeueing"
        return 1
    fi
    essa_log "$why; scontrol requeue $SLURM_JOB_ID (restart $((restarts + 1))); run $ESSA_RUN_DIR/$ESSA_RUN_NAME resumes from its checkpoint"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        essa_warn "scontrol requeue $SLURM_JOB_ID failed (the site may forbid requeueing); resubmit with ESSA_RUN_NAME=$ESSA_RUN_NAME to resume"
        return 1
    fi
}

essa_main() {
    trap 'essa_on_signal USR2' USR2
    trap 'essa_on_signal TERM' TERM
    essa_defaults
    essa_setup_env
    essa_check_gpus
    essa_build_run_args "$@"
    essa_build_launch
    ESSA_FWD_SIG=$(essa_forward_signal)

    essa_log "job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) | ${SLURM_JOB_NUM_NODES:-1} node(s) | $ESSA_NTASKS rank(s) × $ESSA_TP GPU(s)/rank | launcher $ESSA_LAUNCHER"
    essa_log "run directory $ESSA_RUN_DIR/$ESSA_RUN_NAME | config $ESSA_CONFIG"
    essa_log "HF cache ${HF_HUB_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}/hub} (HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}) | HDF5_USE_FILE_LOCKING=$HDF5_USE_FILE_LOCKING"
    essa_log "launch: $(essa_quote "${ESSA_LAUNCH[@]}")"
    case "${ESSA_DRY_RUN:-0}" in
        1 | true | yes) return 0 ;;
    esac
    essa_preflight

    local rc=0 again
    if [ -n "$ESSA_SIGNALLED" ]; then  # the signal came during setup: nothing ran, nothing to save
        essa_requeue "stop signal before the launch" || true
        exit "$ESSA_REQUEUE_EXIT_CODE"
    fi
    # In the background so that `wait` returns when a trapped signal arrives (bash defers traps
    # until a foreground command ends); then keep waiting for the launcher's real exit status.
    "${ESSA_LAUNCH[@]}" &
    ESSA_CHILD=$!
    while :; do
        wait "$ESSA_CHILD"
        rc=$?
        kill -0 "$ESSA_CHILD" 2>/dev/null || break
    done
    wait "$ESSA_CHILD" 2>/dev/null
    again=$?
    [ "$again" -ne 127 ] && rc=$again  # the status, even if the trap interrupted the last wait

    if [ "$rc" -eq "$ESSA_REQUEUE_EXIT_CODE" ]; then
        essa_requeue "the run checkpointed and exited $rc (stop requested)" || true
        exit "$rc"
    fi
    if [ "$rc" -ne 0 ] && [ "$rc" -ne "$ESSA_BAD_INPUT_EXIT_CODE" ] && [ -n "$ESSA_SIGNALLED" ]; then
        # killed by the stop signal before the run could handle it (e.g. while loading the model)
        essa_requeue "the launcher exited $rc after SIG$ESSA_SIGNALLED" || true
        exit "$ESSA_REQUEUE_EXIT_CODE"
    fi
    [ "$rc" -eq 0 ] && essa_log "done: $ESSA_RUN_DIR/$ESSA_RUN_NAME"
    exit "$rc"
}
