"""What runs inside a submitit job: one ESSA run, its ranks, its GPUs and its requeue.

Ranks under SLURM: srun starts one task per rank (``--mpi=pmix``, see env/MPI.md); each task runs
:class:`EssaJob`, which binds the task's GPUs (:func:`essa_hpc.placement.bind_rank_gpus` from
submitit's local rank) and calls ``essa_hpc.run.main(argv)`` in process, so mpi4py initializes from
srun's PMIx. Without PMI/PMIx variables (srun without ``--mpi=pmix``) or when mpi4py sees one rank per
task (an mpi4py not built against the site MPI), task 0 runs the job alone as one rank and says so.
On the local and debug clusters one task starts ``mpiexec -n ranks`` through slurm/essa_rank.sh, as
the batch scripts do.

Preemption and time limits: the job asks for ``--signal=USR2@<delay>`` (no ``B:``: SLURM signals the
srun tasks, i.e. every rank, directly) and ``--requeue``. The run checkpoints at the next generation
boundary and exits with ``exit_codes.REQUEUE``; then task 0 hands over to submitit's own USR2 handler,
which calls :meth:`EssaJob.checkpoint` (a DelayedSubmission of the same command), requeues the job
(``scontrol requeue``) and the requeued job resumes from the run directory's checkpoint.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from essa_hpc import resources
from essa_hpc.exit_codes import OK, REQUEUE
from essa_hpc.placement import bind_rank_gpus

try:
    import submitit
    from submitit.core.utils import DelayedSubmission
    from submitit.helpers import Checkpointable
except ImportError as e:  # pragma: no cover - submitit is in env/requirements-*.txt and the [slurm] extra
    raise ImportError("essa_hpc.submit needs submitit: pip install 'submitit>=1.5' (or pip install -e '.[slurm]')") from e

# ESSA_HOME: the folder with slurm/ and configs/ (the checkout, or the installed package's data)
REPO = resources.home()


def forward_signal_for(mpiexec: str) -> signal.Signals:
    """Which signal a launcher relays to its ranks: Open MPI relays USR2, MPICH/Intel Hydra only TERM."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
        text = out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError):
        text = ""
    return signal.SIGUSR2 if re.search(r"open ?mpi|open-mpi|openrte|prrte", text, re.I) else signal.SIGTERM


def find_mpiexec() -> str:
    exe = Path(sys.executable).parent / "mpiexec"
    found = str(exe) if exe.exists() else shutil.which("mpiexec")
    if not found:
        raise RuntimeError("several ranks on this machine need mpiexec (pip install mpich, or load an MPI module)")
    return found


def _job_env() -> Any:
    try:
        return submitit.JobEnvironment()
    except Exception:  # not inside a submitit job (a plain call)
        return None


@dataclass
class EssaJob(Checkpointable):
    """One ESSA run as a submitit job: every task (rank) calls ``essa_hpc.run.main(argv)``.

    ``ranks`` > 1 with ``spawn=True`` (the local/debug clusters) starts ``mpiexec -n ranks`` from the
    one task instead. Returns ``{"exit_code", "run_dir", "rank", ...}``; a run that fails (exit status
    other than 0 or 75) raises, so submitit marks the job failed (not on the debug cluster, where
    submitit would open pdb).
    """

    argv: list[str]
    run_dir: str
    tp: int = 1
    ranks: int = 1
    spawn: bool = False
    restarts: int = field(default=0)

    def __call__(self) -> dict[str, Any]:
        env = _job_env()
        cluster = getattr(env, "cluster", "none")
        rank = int(getattr(env, "global_rank", 0)) if env is not None else 0
        ntasks = int(getattr(env, "num_tasks", 1)) if env is not None else 1
        requeue_handler = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
        if self.spawn and self.ranks > 1:
            rc = self._run_mpiexec()
        else:
            bind_rank_gpus(int(getattr(env, "local_rank", 0)) if env is not None else 0, self.tp)
            if ntasks > 1 and not self._mpi_matches(ntasks, rank):
                if rank != 0:
                    return {"exit_code": OK, "rank": rank, "run_dir": self.run_dir, "idle": True}  # task 0 runs alone
                os.environ["ESSA_ALLOW_SINGLE_RANK"] = "1"  # the warned-about fallback: dist.init must not refuse it
            rc = self._run_in_process()
        result = {"exit_code": rc, "rank": rank, "run_dir": self.run_dir, "restarts": self.restarts}
        if rc == REQUEUE:
            if cluster in ("slurm", "local") and callable(requeue_handler):
                # task 0: submitit calls self.checkpoint(), requeues the job and exits; other tasks: returns
                if rank == 0:
                    print(f"essa-submit: the run stopped on request (exit {REQUEUE}); requeueing through submitit", flush=True)
                requeue_handler(signal.SIGUSR2, None)
            return result
        if rc != OK and cluster != "debug":
            raise RuntimeError(f"essa-run exited with status {rc} on task {rank} (run directory {self.run_dir}); see the job's log")
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """The same command again: the requeued job finds the run's checkpoint and resumes from it."""
        return DelayedSubmission(replace(self, restarts=self.restarts + 1))

    def _mpi_matches(self, ntasks: int, rank: int) -> bool:
        """True when MPI spans the job's tasks; otherwise warn (task 0) and fall back to one rank."""
        from essa_hpc import dist

        if dist.launched_by_mpi():
            os.environ["ESSA_ALLOW_SINGLE_RANK"] = "1"  # only probing the size here
            try:
                size = dist.init().size
            finally:
                os.environ.pop("ESSA_ALLOW_SINGLE_RANK", None)
            if size == ntasks:
                return True
            why = (
                f"mpi4py sees {size} rank(s) in a job of {ntasks} tasks: it is not built against the MPI that srun's "
                "PMIx plugin serves (env/MPI.md: build mpi4py with the site's mpicc)"
            )
        else:
            why = (
                f"srun started {ntasks} tasks without PMI/PMIx variables: pass --srun-mpi pmix (srun --mpi=pmix) "
                "or set the site's MpiDefault (env/MPI.md)"
            )
        if rank == 0:
            print(
                f"essa-submit: WARNING: {why}. Falling back to ONE rank on task 0; the other {ntasks - 1} task(s) stay idle.",
                file=sys.stderr,
                flush=True,
            )
        return False

    def _run_in_process(self) -> int:
        from essa_hpc import run

        saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
        try:
            return int(run.main(list(self.argv)))
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def _run_mpiexec(self) -> int:
        mpiexec = find_mpiexec()
        fwd = forward_signal_for(mpiexec)
        # slurm/essa_rank.sh gives each rank its GPUs from the MPI's local rank, as in the batch scripts
        rank_wrapper = ["bash", str(resources.slurm_script("essa_rank.sh"))]
        cmd = [mpiexec, "-n", str(self.ranks), *rank_wrapper, sys.executable, "-m", "essa_hpc.run", *self.argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "HYDRA_"))}
        env["PYTHONPATH"] = str(resources.import_root()) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["ESSA_TP"] = str(self.tp)
        print(f"essa-submit: {shlex.join(cmd)}", flush=True)
        proc = subprocess.Popen(cmd, env=env)

        def relay(signum: int, frame: Any) -> None:
            proc.send_signal(fwd)

        saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
        try:
            for sig in saved:
                signal.signal(sig, relay)
            return proc.wait()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
