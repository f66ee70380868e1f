"""The communicator: the only module that imports MPI.

Every rank runs the same optimizer from the same seed, so what crosses the network per generation is
one ``Allgather`` of fixed-size records (docs/design.md, "One generation"). A rank packs what it has
to say as small named records (``Scored`` per piece of work, one ``Report`` per rank) and ``unpack``
turns the gathered array back into one named ``Gathered``, checked; no caller touches the fields:

    (valid, stop, candidate, part, seed, reward_fx, n, failures, timeouts, tokens, digest, timings[K])

``reward_fx`` is the candidate's reward sum in 32.32 fixed point (int64). Integer addition is
associative, so a candidate whose minibatch is split across ranks sums to exactly the same value as
one evaluated whole on one rank: the logged rewards are bit-identical for every world size. The
optimizer digest of the state *before* this generation's ``ask`` rides in the same records, so the
state check costs no extra collective, and so do the stop requests and the phase timings (phases.py).

Without ``mpiexec``/``srun`` (no PMI variables in the environment) a single-process stand-in is used
and mpi4py is never imported.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from essa_hpc import exit_codes
from essa_hpc.phases import PHASES

FIXED_POINT = 2.0**32
DIGEST_BYTES = 16

RECORD = np.dtype(
    [
        ("valid", np.uint8),
        ("stop", np.uint8),
        ("cand", np.int32),
        ("part", np.int32),
        ("seed", np.uint64),
        ("reward_fx", np.int64),
        ("n", np.int32),
        ("failures", np.int32),
        ("timeouts", np.int32),
        ("tokens", np.int64),
        ("digest", f"S{DIGEST_BYTES}"),
        ("timings", np.float64, (len(PHASES),)),
    ]
)
STOP_BUDGET = 1  # the record's stop bits: this rank's clock says run.time_budget_s is spent
STOP_SIGNAL = 2  # a stop signal (SIGUSR2/SIGTERM/SIGINT) reached this rank
STOP_INTERRUPT = 4  # ... and it was SIGINT (Ctrl-C): the exit status is exit_codes.INTERRUPTED, not REQUEUE


class DistError(RuntimeError):
    """Ranks disagree or a gathered record is wrong; the message names the ranks and candidates."""


@dataclass(frozen=True)
class Work:
    cand: int  # candidate index in 0..popsize-1
    part: int  # which slice of the candidate's minibatch (0 when whole)
    lo: int  # first prompt index in the minibatch
    hi: int  # one past the last


def assign(popsize: int, batch: int, world: int) -> list[list[Work]]:
    """Who evaluates what, a pure function of (λ, batch, world): every rank computes the same table.

    λ ≥ world: candidates dealt round-robin, each evaluated whole on one rank.
    λ < world: the λ·batch (candidate, prompt) items are dealt in contiguous runs of ⌊λ·batch/world⌋ or
    ⌈λ·batch/world⌉ items per rank (docs/design.md, "Balanced dealing"), so no rank waits on a
    candidate that fewer ranks share than the others; a run may span the end of one candidate and the
    start of the next, and then the rank holds two pieces. Ranks take the runs in the order
    (r mod λ, r div λ): with world a multiple of λ that is exactly "rank r works for candidate r mod λ".
    A candidate split over ranks sums to the same value as one evaluated whole (exact fixed-point
    partial sums), so the dealing never changes results. Ranks whose run would be empty (more ranks
    than items) get no work.
    """
    if popsize < 1 or batch < 1 or world < 1:
        raise ValueError(f"assign: need popsize, batch, world >= 1, got {popsize}, {batch}, {world}")
    table: list[list[Work]] = [[] for _ in range(world)]
    if popsize >= world:
        for c in range(popsize):
            table[c % world].append(Work(c, 0, 0, batch))
        return table
    order = sorted(range(world), key=lambda r: (r % popsize, r // popsize))
    bounds = np.linspace(0, popsize * batch, world + 1).round().astype(np.int64)
    parts = [0] * popsize  # pieces of each candidate dealt so far: the next piece's part number
    for position, r in enumerate(order):
        k, hi = int(bounds[position]), int(bounds[position + 1])
        while k < hi:
            c = k // batch
            end = min(hi, (c + 1) * batch)
            table[r].append(Work(c, parts[c], k - c * batch, end - c * batch))
            parts[c] += 1
            k = end
    return table


def shard(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous [lo, hi) share of n items for a rank (validation sharding)."""
    bounds = np.linspace(0, n, world + 1).round().astype(int)
    return int(bounds[rank]), int(bounds[rank + 1])


def reward_limit(batch_size: int) -> float:
    """The largest reward magnitude a run scores (larger ones count as failures, evaluation.score).

    A candidate's rewards are summed exactly in 32.32 fixed point in an int64 (to_fixed): n rewards of
    magnitude < 2^30 / n cannot overflow it. The limit depends only on task.batch_size, not on how a
    minibatch is split over ranks, so which rewards count as failures never depends on the rank count:
    2^20 for batches up to 512 prompts, 2^29 / batch beyond.
    """
    return min(2.0**20, 2.0**29 / max(1, int(batch_size)))


def to_fixed(values: np.ndarray) -> int:
    """Sum of rewards in 32.32 fixed point; refuses magnitudes that could overflow int64."""
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(v).all():
        raise DistError("a reward is NaN or inf; tasks must replace failures with task.failure_reward")
    if v.size and np.abs(v).max() >= 2.0**30 / max(1, v.size):
        raise DistError(f"reward magnitude {np.abs(v).max():.3g} too large for exact fixed-point sums; rescale the reward")
    return int(np.round(v * FIXED_POINT).astype(np.int64).sum())


def splitmix64(*parts: int) -> int:
    """Deterministic 64-bit seed from integers (SplitMix64 finalizer chained over the parts)."""
    mask = (1 << 64) - 1
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z ^ (int(p) & mask)) & mask
        z = (z + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z = z ^ (z >> 31)
    return z


def candidate_seed(run_seed: int, gen: int, cand: int) -> int:
    return splitmix64(run_seed, gen, cand, 0xC4)


def common_seed(run_seed: int, gen: int) -> int:
    """Seed shared by every candidate of generation `gen` (search.common_random_numbers): with it, the
    sampled completions of two candidates differ only where their own logits differ (common random
    numbers), so at T > 0 the candidates' reward differences are not swamped by sampling noise."""
    return splitmix64(run_seed, gen, 0xC5)


def validation_seed(run_seed: int, prompt_index: int, sample: int) -> int:
    """Seed of validation sample `sample` of prompt `prompt_index`: the same in every validation of a run
    and in `essa_hpc.evaluate`, so a final adapter's standalone metrics match its last validation."""
    return sample_seed(splitmix64(run_seed, 0xE7A1), prompt_index, sample)


def sample_seed(cand_seed: int, prompt_index: int, sample: int = 0) -> int:
    """Seed of one (generation, candidate, prompt, sample): independent of how work was dealt."""
    return splitmix64(cand_seed, prompt_index, sample) & ((1 << 63) - 1)


class Comm:
    """The communicator the run loop uses; MPI-backed or a single process."""

    def __init__(self, mpi_comm: Any = None) -> None:
        self._comm = mpi_comm
        # local_rank: this rank's index among the ranks of its node, the one input of the GPU placement
        # rule (essa_hpc.placement); the communicator knows it, so no launcher variable is read for it.
        if mpi_comm is None:
            self.rank, self.size, self.ranks_on_node, self.local_rank = 0, 1, 1, 0
        else:
            from mpi4py import MPI

            self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
            node = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
            self.ranks_on_node, self.local_rank = node.Get_size(), node.Get_rank()
            node.Free()

    @property
    def is_mpi(self) -> bool:
        return self._comm is not None

    def allgather_records(self, mine: np.ndarray, slots: int) -> np.ndarray:
        """THE collective of a generation: every rank's records, padded to `slots`, into [world, slots]."""
        if mine.size > slots:
            raise DistError(f"rank {self.rank}: {mine.size} records exceed the {slots} slots per rank")
        send = np.zeros(slots, dtype=RECORD)
        send[: mine.size] = mine
        if self._comm is None:
            return send.reshape(1, slots)
        recv = np.empty(self.size * slots, dtype=RECORD)
        self._comm.Allgather(send.view(np.uint8), recv.view(np.uint8))
        return recv.reshape(self.size, slots)

    def allgather(self, obj: Any) -> list[Any]:
        """Small Python objects (validation results, host names): not in the per-generation path."""
        return [obj] if self._comm is None else self._comm.allgather(obj)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj if self._comm is None else self._comm.bcast(obj, root=root)

    def barrier(self) -> None:
        if self._comm is not None:
            self._comm.Barrier()

    def abort(self, code: int = 1) -> None:
        if self._comm is not None:
            self._comm.Abort(code)
        raise SystemExit(code)


def launched_by_mpi() -> bool:
    """True under mpiexec/mpirun (MPICH PMI, Open MPI) or srun with an MPI plugin."""
    keys = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")
    return any(k in os.environ for k in keys)


def init() -> Comm:
    # Under srun every task is a rank; a task that cannot see the others would run the whole job alone
    # and write the same run directory as its siblings. ESSA_ALLOW_SINGLE_RANK=1 (set by essa-submit's
    # warned fallback) lets one task run by itself.
    in_step = "SLURM_STEP_ID" in os.environ and os.environ.get("ESSA_ALLOW_SINGLE_RANK") != "1"
    ntasks = int(os.environ.get("SLURM_NTASKS", "1") or 1) if in_step else 1
    if not launched_by_mpi():
        if ntasks > 1:
            raise DistError(
                f"srun started {ntasks} tasks but none has MPI (PMI) variables: every task would run alone "
                "and write the same run directory; use srun --mpi=pmix with mpi4py built against the site MPI "
                "(env/MPI.md), or mpirun"
            )
        return Comm(None)
    from mpi4py import MPI

    comm = Comm(MPI.COMM_WORLD)
    if ntasks > 1 and comm.size != ntasks:
        raise DistError(
            f"srun started {ntasks} tasks but MPI sees a world of {comm.size}: mpi4py does not speak this "
            "launcher's PMI (the PyPI mpich wheel does not speak PMIx); see env/MPI.md"
        )
    return comm


def hostname() -> str:
    return socket.gethostname()


@contextlib.contextmanager
def abort_on_error(comm: Comm) -> Iterator[None]:
    """An uncaught exception on any rank kills the whole job, so no rank waits forever on a dead one.

    The failing rank prints who it is and what went wrong before the abort.
    """
    try:
        yield
    except SystemExit:
        raise
    except KeyboardInterrupt:  # Ctrl-C outside the run loop's handler: one line, the interrupted status
        if comm.is_mpi and comm.size > 1:
            sys.stderr.write(f"essa-run: rank {comm.rank}/{comm.size} interrupted (SIGINT) outside the run loop\n")
            sys.stderr.flush()
            comm.abort(exit_codes.INTERRUPTED)
        raise
    except BaseException as e:
        if comm.is_mpi and comm.size > 1:
            sys.stderr.write(f"essa-run: rank {comm.rank}/{comm.size} on {hostname()} failed: {e.__class__.__name__}: {e}\n")
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            comm.abort(1)
        raise


def check_records(recs: np.ndarray, table: list[list[Work]], popsize: int, seeds: np.ndarray) -> None:
    """What arrived must be exactly the work table: every (candidate, part) once, from the right rank,
    with the expected seed. Anything else is a bug or a diverged rank: stop with the details."""
    for r, works in enumerate(table):
        got = recs[r][recs[r]["valid"] == 1]
        if len(got) != len(works):
            raise DistError(f"rank {r} sent {len(got)} records, expected {len(works)}")
        for rec, w in zip(got, works):
            if int(rec["cand"]) != w.cand or int(rec["part"]) != w.part:
                raise DistError(f"rank {r} sent candidate {int(rec['cand'])} part {int(rec['part'])}, expected {w.cand} part {w.part}")
            if int(rec["seed"]) != int(seeds[w.cand]):
                raise DistError(f"rank {r}: seed of candidate {w.cand} is {int(rec['seed'])}, expected {int(seeds[w.cand])}")
            if int(rec["n"]) != w.hi - w.lo:
                raise DistError(f"rank {r}: candidate {w.cand} part {w.part} scored {int(rec['n'])} samples, expected {w.hi - w.lo}")
    covered = np.zeros(popsize, dtype=np.int64)
    for works in table:
        for w in works:
            covered[w.cand] += 1
    if (covered == 0).any():
        raise DistError(f"candidates {np.flatnonzero(covered == 0).tolist()} were evaluated by no rank")


def combine(recs: np.ndarray, popsize: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-candidate mean reward, sample counts and tokens, from the gathered records (exact sums)."""
    flat = recs.reshape(-1)
    flat = flat[flat["valid"] == 1]
    total = np.zeros(popsize, dtype=object)  # Python ints: exact, no overflow
    n = np.zeros(popsize, dtype=np.int64)
    for rec in flat:
        c = int(rec["cand"])
        total[c] += int(rec["reward_fx"])
        n[c] += int(rec["n"])
    mean = np.array([float(t) / FIXED_POINT / max(1, int(k)) for t, k in zip(total, n)], dtype=np.float64)
    tokens = np.zeros(recs.shape[0], dtype=np.int64)
    for r in range(recs.shape[0]):
        tokens[r] = int(recs[r]["tokens"][recs[r]["valid"] == 1].sum())
    return mean, n, tokens


def diverged_ranks(digests: list[bytes]) -> list[int]:
    """Ranks whose optimizer digest differs from rank 0's (rank 0 is the reference)."""
    return [r for r, d in enumerate(digests) if d != digests[0]]


# ----------------------------------------------------------------------------------------------------
# the generation's message, by name


@dataclass(frozen=True)
class Scored:
    """One piece of this rank's work, scored: its rewards (summed in fixed point when packed) and tokens."""

    work: Work
    seed: int  # the candidate's seed (checked on arrival against every rank's own)
    rewards: np.ndarray  # float64 [work.hi - work.lo], one per prompt of the slice
    tokens: int


@dataclass(frozen=True)
class Report:
    """What a rank says once per generation besides its scores; it rides in the rank's first record."""

    stop: int  # STOP_BUDGET | STOP_SIGNAL bits
    failures: int  # reward-function failures on this rank
    timeouts: int
    digest: bytes  # optimizer state before this generation's ask (DIGEST_BYTES)
    timings: np.ndarray  # float64 [len(PHASES)]: phases.Phases.outgoing()


@dataclass(frozen=True)
class Gathered:
    """Every rank's records of one generation, checked against the work table and combined."""

    rewards: np.ndarray  # float64 [popsize]: mean reward per candidate, from exact fixed-point sums
    tokens: np.ndarray  # int64 [world]: tokens generated per rank
    stop: int  # the union of every rank's stop bits: all ranks see the same and stop together
    failures: int  # summed over ranks
    timeouts: int
    digests: list[bytes]  # per rank
    timings: np.ndarray  # float64 [world, len(PHASES)]


def scored(work: Sequence[Work], seeds: np.ndarray, rewards: np.ndarray, tokens: np.ndarray) -> list[Scored]:
    """This rank's work with its scores, from per-prompt arrays in work order (work by work, prompt by prompt)."""
    out, k = [], 0
    for w in work:
        n = w.hi - w.lo
        out.append(Scored(w, int(seeds[w.cand]), rewards[k : k + n], int(tokens[k : k + n].sum())))
        k += n
    return out


def pack(scored: Sequence[Scored], report: Report) -> np.ndarray:
    """This rank's records: one per piece of work (at least one, which carries the report)."""
    recs = np.zeros(max(1, len(scored)), dtype=RECORD)
    for i, s in enumerate(scored):
        recs[i]["valid"], recs[i]["cand"], recs[i]["part"], recs[i]["seed"] = 1, s.work.cand, s.work.part, s.seed
        recs[i]["reward_fx"], recs[i]["n"], recs[i]["tokens"] = to_fixed(s.rewards), len(s.rewards), s.tokens
    first = recs[0]
    first["stop"], first["failures"], first["timeouts"] = report.stop, report.failures, report.timeouts
    first["digest"], first["timings"] = report.digest, report.timings
    return recs


def unpack(recs: np.ndarray, table: list[list[Work]], popsize: int, seeds: np.ndarray) -> Gathered:
    """The gathered [world, slots] records, checked (check_records), as one named Gathered."""
    check_records(recs, table, popsize, seeds)
    rewards, _, tokens = combine(recs, popsize)
    first = recs[:, 0]
    return Gathered(
        rewards=rewards,
        tokens=tokens,
        stop=int(np.bitwise_or.reduce(first["stop"])),
        failures=int(first["failures"].sum()),
        timeouts=int(first["timeouts"].sum()),
        digests=[bytes(d) for d in first["digest"]],
        timings=np.array(first["timings"], dtype=np.float64),
    )
