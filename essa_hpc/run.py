"""The ESSA run: ``python -m essa_hpc.run [--config F] [--set k=v ...] [--resume]``, also under mpirun/srun.

Reads top to bottom like a recipe (docs/design.md, "One generation"):

    config -> run directory policy -> model, task, SVD-LoRA, backend -> optimizer -> log
    for each generation:
        1. ask            every rank draws the same population from the same optimizer state
        2. the minibatch  a pure function of (run.seed, generation)
        3. my share       this rank's (candidate, slice of the minibatch) pieces, scored
        4. one Allgather  scores, stop requests, optimizer digests and timings in fixed-size records
        5. check and tell the records against the work table, the digests against rank 0's; tell(X, -reward)
        6. log, checkpoint, validate
        7. stop together  on a signal, a spent time budget, a reached target or the last generation
    export the mean (and best) adapter

Only rank 0 writes; it prints through ``say`` and the other ranks hold a null run log, so the loop has
no rank tests but the checkpoint's. With no arguments it runs the embedded default:
SmolLM2-135M-Instruct on generated arithmetic, after a short cached LoRA SFT warm start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from essa_hpc import checkpoint, dist, exit_codes, phases
from essa_hpc.config import Config, ConfigError, describe, load_config
from essa_hpc.evaluation import Evaluator, build_evaluator, score, validate

if TYPE_CHECKING:
    from essa_hpc.runlog import NullLog, RunLog
    from essa_hpc.search import Optimizer

REQUEUE_EXIT_CODE = exit_codes.REQUEUE  # the name the tests and older callers import


class RunError(RuntimeError):
    """A problem with the run directory or the run's inputs found before expensive work."""


# ----------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="essa-run", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with config sections (see --help-config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. search.popsize=48")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint (required to exist)")
    p.add_argument("--help-config", action="store_true", help="print every config key with its default and meaning")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the run's own handler is in place (imports, config)
        print("essa-run: interrupted (SIGINT) outside the run loop", file=sys.stderr)
        return exit_codes.INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(describe())
        return exit_codes.OK
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"essa-run: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    try:
        comm = dist.init()
    except dist.DistError as e:
        print(f"essa-run: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    with dist.abort_on_error(comm):
        try:
            return run(cfg, comm, resume=args.resume)
        except bad_input_errors() as e:
            # Bad input is usually seen by every rank alike: rank 0 reports it. A rank that alone saw
            # it (other ranks may be waiting in a collective) reports it after a grace period, and
            # then the whole job stops with the same status.
            if comm.rank == 0:
                print(f"essa-run: {e}", file=sys.stderr, flush=True)
            if comm.size > 1:
                if comm.rank != 0:
                    time.sleep(3.0)
                    print(f"essa-run (rank {comm.rank}): {e}", file=sys.stderr, flush=True)
                comm.abort(exit_codes.BAD_INPUT)
            return exit_codes.BAD_INPUT


def legacy(cfg: Config) -> tuple[str, ...]:
    """The older digests a checkpoint may carry and still resume under this config."""
    old = cfg.legacy_digest()
    return (old,) if old else ()


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "fix your input": exit status BAD_INPUT and one line, no traceback.

    The model and adapter errors are looked up only where their modules are loaded (an error of a
    module never imported cannot have been raised): a fake-backend run that refuses its input does not
    import torch just to say so.
    """
    from essa_hpc.runlog import LogFileError
    from essa_hpc.tasks.base import TaskError

    errors: list[type[BaseException]] = [RunError, checkpoint.CheckpointError, ConfigError, TaskError, LogFileError]
    for module, name in (("essa_hpc.models", "ModelError"), ("essa_hpc.svd_lora", "AdapterError"), ("essa_hpc.spaces", "SpaceError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


# ----------------------------------------------------------------------------------------------------
# the run


def run(cfg: Config, comm: dist.Comm, resume: bool = False) -> int:
    """One ESSA run. Every rank runs this same function in lockstep, one Allgather per generation, and
    returns the same exit status: OK; REQUEUE after SIGUSR2/SIGTERM or INTERRUPTED after SIGINT
    (checkpointed, resume later); FAILURE when every reward failed for task.max_failed_generations
    generations in a row (checkpointed: fix the reward and resume)."""
    started = time.perf_counter()
    stop_flag = StopFlag()  # before the setup, so a stop signal during it is honoured (or, repeated, ends it at once)
    try:
        return _run(cfg, comm, resume, started, stop_flag)
    finally:
        stop_flag.restore()


def _run(cfg: Config, comm: dist.Comm, resume: bool, started: float, stop_flag: StopFlag) -> int:
    from essa_hpc import search
    from essa_hpc.spaces import VectorSpace, state_digest
    from essa_hpc.tasks import minibatch

    threads = set_threads(cfg, comm)
    resuming = prepare_run_dir(cfg, comm, resume)
    ev = build_evaluator(cfg, comm)
    if cfg.backend.name == "fake" and cfg.lora.adapter:
        say(comm, f"essa-run: warning: lora.adapter={cfg.lora.adapter} is ignored: backend.name=fake loads no model or adapter")
    popsize, batch_size, dim = cfg.search.popsize, cfg.task.batch_size, ev.dim
    space = ev.space or VectorSpace(cfg.search.space, dim, export=ev.export)  # how a candidate becomes a model change
    if len(ev.train) < batch_size:
        raise RunError(f"task.batch_size={batch_size} but the training split has only {len(ev.train)} examples")
    try:
        opt = search.make_optimizer(cfg.search, dim, cfg.run.seed, seeded=space.seeded)
    except ValueError as e:
        raise RunError(str(e)) from None
    table = dist.assign(popsize, batch_size, comm.size)  # who scores what: the same table on every rank
    my_work, slots = table[comm.rank], max(1, max(len(w) for w in table))
    state = checkpoint.load_state(cfg.run_dir, cfg.digest(), accept=legacy(cfg), config=cfg.to_dict()) if resuming else checkpoint.State()
    if resuming:
        opt.load_state_dict(state.optimizer)
        space.load_state_dict(state.space)  # a seeded space replays its updates: the same weights bit for bit
    first_gen, elapsed_before, primary = state.gen, state.elapsed, ev.metric_names[0]
    log = open_log(cfg, comm, ev, resume_gen=first_gen if resuming else None)
    say(
        comm,
        f"essa-run: {cfg.run_dir} | {comm.size} rank(s) × {threads} thread(s) | λ={popsize} d={dim} batch={batch_size} | "
        f"backend={cfg.backend.name} task={cfg.task.name}" + (f" | resuming at generation {first_gen}" if resuming else ""),
    )

    def clock() -> float:  # wall seconds across restarts: what run.time_budget_s counts
        return elapsed_before + time.perf_counter() - started

    validating = {"seconds": 0.0}  # validation inside the loop, left out of the training clock
    trained_before, loop_started = state.trained, 0.0

    def trained() -> float:  # training seconds across restarts, validation excluded: what run.train_budget_s counts
        return trained_before + (clock() - loop_started) - validating["seconds"]

    def validation(gen: int, vector: np.ndarray) -> dict[str, float]:
        metrics = validate(ev, cfg, comm, vector)
        state.record_validation(gen, metrics, vector, primary)
        log.append_eval(gen, clock(), metrics)
        return metrics

    if not resuming:
        m0 = validation(0, np.zeros(dim))
        say(comm, "  validation at start (x = 0, the warm start): " + ", ".join(f"{k}={v:.4f}" for k, v in m0.items()))
        if comm.rank == 0:  # from here on the run directory is resumable: a crash in generation 1 blocks no rerun
            checkpoint.save_state(
                cfg.run_dir,
                dataclasses.replace(state, optimizer=opt.state_dict(), elapsed=clock(), space=space.state_dict()),
                cfg.digest(),
                cfg.to_dict(),
            )

    timer, reason, done = phases.Phases(), None, first_gen
    failed = FailureTally(popsize * batch_size)
    loop_started = clock()
    for gen in range(first_gen, cfg.run.generations):
        timer.begin()
        with timer.time("other"):
            # 1. ask: the digest of the state before it rides in this generation's records (step 5)
            # (a seeded space adds a hash of its weights on the generations that check digests)
            digest = bytes.fromhex(state_digest(opt.digest(), space, gen % cfg.search.digest_every == 0))[: dist.DIGEST_BYTES]
            population = opt.ask(gen)
            seeds = np.array([dist.candidate_seed(cfg.run.seed, gen, c) for c in range(popsize)], dtype=np.uint64)
            # 2. the minibatch: the same prompts on every rank, whatever the world size
            batch = minibatch(ev.train, cfg.run.seed, gen, batch_size)
            # 3. my share: one item per (my candidate, prompt of its slice), seeded independently of the dealing
            my_candidates = sorted({w.cand for w in my_work})
            row = {c: i for i, c in enumerate(my_candidates)}
            # (search.common_random_numbers: every candidate samples a prompt with the same seed)
            noise = [dist.common_seed(cfg.run.seed, gen)] * popsize if cfg.search.common_random_numbers else [int(s) for s in seeds]
            items = [(row[w.cand], batch[p], dist.sample_seed(noise[w.cand], p)) for w in my_work for p in range(w.lo, w.hi)]
        scores = score(ev, population[my_candidates], items, limit=dist.reward_limit(batch_size), failure_reward=cfg.task.failure_reward)
        timer.add("generate", scores.generate_s)
        timer.add("reward", scores.reward_s)

        # 4. one Allgather: my scores, my stop request, my optimizer digest and my timings
        report = dist.Report(stop_flag.bits(cfg, clock(), trained()), scores.failures, scores.timeouts, digest, timer.outgoing())
        with timer.time("allgather"):
            gathered = comm.allgather_records(dist.pack(dist.scored(my_work, seeds, scores.rewards, scores.tokens), report), slots)

        # 5. check and tell: every rank tells its optimizer the same rewards, so the states stay equal
        with timer.time("tell"):
            got = dist.unpack(gathered, table, popsize, seeds)
            if gen % cfg.search.digest_every == 0:
                check_digests(cfg, comm, opt, got.digests, gen)
            opt.tell(population, -got.rewards)  # the optimizer minimizes
            space.apply(opt)  # a seeded space adds the update to its weights; a vector space has nothing to do

        # 6. log, checkpoint, validate
        with timer.time("log"):
            this_gen, previous_late = phases.split(got.timings)
            log.append_generation(
                rewards=got.rewards,
                seeds=seeds,
                sigma=opt.sigma,
                wall_time=clock(),
                timings=this_gen,
                tokens=got.tokens,
                failures=got.failures,
                timeouts=got.timeouts,
                digest=digest,
                prev_late_timings=previous_late if gen > first_gen else None,
            )
        done = gen + 1
        # every rank learns the same failure counts (gathered) and so decides alike whether to ask for messages
        failed.add(got.failures + got.timeouts, comm.allgather(scores.errors) if got.failures + got.timeouts else [])
        all_failed = failed.stop_due(cfg.task.max_failed_generations)
        metrics = None
        if not all_failed and validation_due(cfg, done, stop_reason(cfg, done, got.stop)):
            with timer.time("eval"):
                metrics = validation(done, opt.mean.copy())
            validating["seconds"] += timer.seconds("eval")
        reason = "failed" if all_failed else stop_reason(cfg, done, got.stop, metrics)
        with timer.time("checkpoint"):
            if comm.rank == 0 and (done % cfg.log.checkpoint_every == 0 or reason is not None):
                saved = dataclasses.replace(
                    state, gen=done, optimizer=opt.state_dict(), elapsed=clock(), trained=trained(), space=space.state_dict()
                )
                checkpoint.save_state(cfg.run_dir, saved, cfg.digest(), cfg.to_dict())
        if cfg.log.progress:
            say(comm, progress_line(cfg, comm, done, got, opt.sigma, timer, primary, metrics) + failed.progress(got))

        # 7. stop together: the stop bits are every rank's and the metrics the same on all, so all agree
        if reason is not None:
            break

    # the end: the last generation's late phases, the final vectors, the adapters
    exit_code = {"signal": exit_codes.REQUEUE, "interrupt": exit_codes.INTERRUPTED, "failed": exit_codes.FAILURE}.get(
        reason or "", exit_codes.OK
    )
    say_stop(cfg, comm, reason, done, exit_code)
    for line in failed.summary(done - first_gen):
        say(comm, line)
    log.finish(np.stack(comm.allgather(timer.late())), opt.mean, state.best.vector)
    if comm.rank == 0 and exit_code == exit_codes.OK and ev.export is not None:
        from essa_hpc.export import write_model_card

        space.export(opt.mean, cfg.run_dir / space.export_name)
        if not space.seeded:  # an adapter folder gets its model card (a seeded space writes a model folder)
            write_model_card(cfg, cfg.run_dir / space.export_name, "mean", state.evals, state.best.gen, primary)
        if state.best.vector is not None and not space.seeded:  # a seeded space's past points are gone (their weights moved on)
            space.export(state.best.vector, cfg.run_dir / f"{space.export_name}_best")
            write_model_card(cfg, cfg.run_dir / f"{space.export_name}_best", "best", state.evals, state.best.gen, primary)
    comm.barrier()
    if comm.rank == 0 and exit_code == exit_codes.OK:
        summary(cfg, state, primary, getattr(ev.backend, "diagnostics", dict)())
    ev.backend.close()
    return exit_code


# ----------------------------------------------------------------------------------------------------
# pieces the loop uses


def say(comm: dist.Comm, msg: str) -> None:
    """Print once, from rank 0 (every rank computes the same message)."""
    if comm.rank == 0:
        print(msg, flush=True)


class StopFlag:
    """SIGUSR2/SIGTERM/SIGINT only set this flag; it travels in the next Allgather so all ranks stop together.

    SIGINT (Ctrl-C) is an interruption like SIGTERM, with its own exit status (exit_codes.INTERRUPTED),
    so a batch script does not requeue a run a user stopped. A second stop signal before the run
    reaches a generation boundary (a long setup, a stuck reward) ends the process at once with the
    same status, without a new checkpoint: a stop signal always stops the process.
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.interrupted = False
        self._previous: dict[int, Any] = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (a library caller): signals stay as they are
                break

    def _handler(self, signum: int, frame: Any) -> None:
        interrupt = signum == signal.SIGINT
        if self.requested:
            code = exit_codes.INTERRUPTED if (interrupt or self.interrupted) else exit_codes.REQUEUE
            sys.stderr.write(
                f"essa-run: second stop signal ({signal.Signals(signum).name}); exiting now without a new checkpoint (exit {code})\n"
            )
            sys.stderr.flush()
            os._exit(code)
        self.requested = True
        self.interrupted = interrupt
        if interrupt:
            sys.stderr.write("essa-run: Ctrl-C: checkpointing at the end of this generation (Ctrl-C again to exit now)\n")
            sys.stderr.flush()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def bits(self, cfg: Config, elapsed: float, trained: float = 0.0) -> int:
        """This rank's stop request for its report: a signal arrived, and/or its clock spent a budget
        (run.time_budget_s of wall time, run.train_budget_s of training time)."""
        r = cfg.run
        over_budget = (r.time_budget_s > 0 and elapsed >= r.time_budget_s) or (r.train_budget_s > 0 and trained >= r.train_budget_s)
        signalled = (dist.STOP_SIGNAL if self.requested else 0) | (dist.STOP_INTERRUPT if self.interrupted else 0)
        return (dist.STOP_BUDGET if over_budget else 0) | signalled


class FailureTally:
    """Reward failures across the run: the progress line's count, the first distinct messages, and
    task.max_failed_generations consecutive all-failed generations as a stop (docs/design.md,
    "Faults and hostile inputs"). Every rank holds the same tally (the counts and the messages are
    gathered), so all ranks decide alike."""

    def __init__(self, per_generation: int) -> None:
        self.per_generation = per_generation
        self.total = 0
        self.generations = 0  # generations with at least one failure
        self.streak = 0  # consecutive generations in which every reward failed
        self.errors: list[str] = []

    def add(self, failures: int, errors_by_rank: list[list[str]]) -> None:
        self.total += failures
        self.generations += failures > 0
        self.streak = self.streak + 1 if failures >= self.per_generation else 0
        for errs in errors_by_rank:
            for e in errs:
                if e not in self.errors and len(self.errors) < MAX_REPORTED_ERRORS:
                    self.errors.append(e)

    def stop_due(self, limit: int) -> bool:
        return limit > 0 and self.streak >= limit

    def progress(self, got: dist.Gathered) -> str:
        n = got.failures + got.timeouts
        if not n:
            return ""
        first = f": {self.errors[0]}" if self.errors else ""
        return f" | reward failures {n}/{self.per_generation}" + (f" ({got.timeouts} timeouts)" if got.timeouts else "") + first[:160]

    def summary(self, generations: int) -> list[str]:
        if not self.total:
            return []
        lines = [
            f"essa-run: reward failures: {self.total} of {self.per_generation * max(1, generations)} completions "
            f"in {self.generations} of {generations} generation(s) were scored task.failure_reward; the first distinct errors:"
        ]
        return lines + [f"  {e}" for e in self.errors]


MAX_REPORTED_ERRORS = 5


def stop_reason(cfg: Config, done: int, stop_bits: int, metrics: dict[str, float] | None = None) -> str | None:
    """Why the run stops after generation `done`, or None to go on: the one place that decides.

    Every rank calls it with the same arguments (the stop bits are the union of every rank's request,
    gathered in the Allgather; validation metrics are the same on every rank), so all stop together.
    In order of precedence:

    - "interrupt": SIGINT (Ctrl-C) reached a rank: checkpoint, exit INTERRUPTED, resume later.
    - "signal": SIGUSR2/SIGTERM reached a rank; an interruption: checkpoint, exit REQUEUE, resume later.
    - "budget": run.time_budget_s or run.train_budget_s is spent on some rank's clock; the run ends (validated, exported).
    - "target": this generation's validation reached run.target_value in run.target_metric.
    - "last": run.generations are done.
    """
    r = cfg.run
    if stop_bits & dist.STOP_INTERRUPT:
        return "interrupt"
    if stop_bits & dist.STOP_SIGNAL:
        return "signal"
    if stop_bits & dist.STOP_BUDGET:
        return "budget"
    target, value = r.target_metric, r.target_value
    if metrics is not None and target is not None and value is not None and metrics.get(target, -math.inf) >= value:
        return "target"
    if done >= r.generations:
        return "last"
    return None


def validation_due(cfg: Config, done: int, reason: str | None) -> bool:
    """Every eval.every generations, and at the run's end (its last generation, or a spent budget).

    A signalled stop is an interruption, not an end: no extra validation, so the resumed run's log
    matches an uninterrupted one.
    """
    return bool(cfg.eval.every and done % cfg.eval.every == 0) or done >= cfg.run.generations or reason == "budget"


def say_stop(cfg: Config, comm: dist.Comm, reason: str | None, done: int, exit_code: int) -> None:
    if reason == "signal":
        say(comm, f"essa-run: stop signal received; checkpointed at generation {done}; exit {exit_code} (requeue)")
    elif reason == "interrupt":
        say(comm, f"essa-run: interrupted (SIGINT); checkpointed at generation {done}; exit {exit_code}; rerun the same command to resume")
    elif reason == "failed":
        say(
            comm,
            f"essa-run: every reward failed in {cfg.task.max_failed_generations} generation(s) in a row (task.max_failed_generations); "
            f"stopped at generation {done}, checkpointed; exit {exit_code}: fix the reward function and rerun to resume",
        )
    elif reason == "budget":
        budgets = [
            f"{name} of {s} s" for name, s in (("time budget", cfg.run.time_budget_s), ("training budget", cfg.run.train_budget_s)) if s > 0
        ]
        say(comm, f"essa-run: {' or '.join(budgets)} spent at generation {done}")
    elif reason == "target":
        say(comm, f"essa-run: {cfg.run.target_metric} reached {cfg.run.target_value} at generation {done}")


def progress_line(
    cfg: Config,
    comm: dist.Comm,
    done: int,
    got: dist.Gathered,
    sigma: float,
    timer: phases.Phases,
    primary: str,
    metrics: dict[str, float] | None,
) -> str:
    tokens_per_s = got.tokens.sum() / max(1e-9, timer.seconds("generate")) / comm.size
    val = "" if metrics is None else f" | val {primary}={metrics[primary]:.4f}"
    return (
        f"gen {done:4d}/{cfg.run.generations} | reward mean {got.rewards.mean():+.4f} max {got.rewards.max():+.4f} | "
        f"σ {sigma:.4g} | {timer.since_begin():6.2f} s | {tokens_per_s:7.1f} tok/s/rank{val}"
    )


def check_digests(cfg: Config, comm: dist.Comm, opt: Optimizer, digests: list[bytes], gen: int) -> None:
    """Every rank's optimizer state before this generation's ask must be rank 0's: stop, naming the ranks
    that differ, or (search.digest_repair) copy rank 0's state to every rank."""
    bad = dist.diverged_ranks(digests)
    if not bad:
        return
    if not cfg.search.digest_repair:
        raise dist.DistError(
            f"optimizer state diverged at generation {gen}: ranks {bad} differ from rank 0 "
            "(set search.digest_repair=true to copy rank 0's state instead)"
        )
    say(comm, f"essa-run: ranks {bad} diverged at generation {gen}; repairing from rank 0")
    opt.load_state_dict(comm.bcast(opt.state_dict() if comm.rank == 0 else None))


def set_threads(cfg: Config, comm: dist.Comm) -> int:
    """Torch/BLAS threads per rank (the fake backend needs no torch: a fast start for engine tests)."""
    if cfg.backend.name == "fake":
        return 1
    from essa_hpc import models

    return int(models.set_threads(cfg.model.threads, comm.ranks_on_node))


def prepare_run_dir(cfg: Config, comm: dist.Comm, resume: bool) -> bool:
    """Decide before any expensive work: resume, start fresh, or refuse. Returns True to resume.

    Never loses work silently (docs/design.md, "Faults and hostile inputs"): an existing run with a log
    but no checkpoint needs run.overwrite=true; a run with a checkpoint past generation 0 is resumed,
    never replaced (run.overwrite=true refuses it); a resume first checks that its checkpoint and its
    log are usable by this job (intact, same rank count, holding the checkpoint's generations), so a
    refused resume has rewritten nothing.
    """
    run_dir = cfg.run_dir
    decision: tuple[str, str] = ("fresh", "")
    if comm.rank == 0:
        try:
            has_ckpt = checkpoint.exists(run_dir)
            if resume and not has_ckpt:
                decision = ("error", f"--resume: {run_dir} has no checkpoint to resume from")
            elif has_ckpt and cfg.run.overwrite and not resume:
                gen = int(checkpoint.load(run_dir, None).get("gen", 0))  # any configuration: only its progress matters here
                if gen > 0:
                    decision = (
                        "error",
                        f"run.overwrite=true: {run_dir} holds a resumable run (checkpoint at generation {gen}), which "
                        "run.overwrite never replaces; drop run.overwrite to resume it, pick another run.name, or delete the folder",
                    )
                # else: nothing searched yet (the generation-0 checkpoint); starting over loses nothing
            elif has_ckpt:
                state = checkpoint.load(run_dir, cfg.digest(), accept=legacy(cfg), config=cfg.to_dict())
                from essa_hpc.runlog import check_resumable

                check_resumable(run_dir / "log.h5", world_size=comm.size, popsize=cfg.search.popsize, gen=int(state.get("gen", 0)))
                decision = ("resume", "")
            elif (run_dir / "log.h5").exists() and not cfg.run.overwrite:
                decision = (
                    "error",
                    f"{run_dir} already holds a run (log.h5) with no checkpoint; pick another run.name or set run.overwrite=true",
                )
            if decision[0] != "error":
                problem = unwritable(run_dir)
                if problem:
                    decision = ("error", f"run.dir: cannot write the run directory {run_dir}: {problem}")
        except bad_input_errors() as e:
            decision = ("error", str(e))
    decision = comm.bcast(decision)
    if decision[0] == "error":
        raise RunError(decision[1])
    return decision[0] == "resume"


def unwritable(run_dir: Path) -> str | None:
    """Why files cannot be created in run_dir (probing the nearest existing ancestor), or None."""
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".essa-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return f"{probe} is not writable ({e.strerror})"
    return None


def write_run_dir(cfg: Config) -> None:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(f"# launch: python -m essa_hpc.run --config {run_dir / 'config.yaml'}\n" + cfg.to_yaml())
    tmp.replace(run_dir / "config.yaml")


def open_log(cfg: Config, comm: dist.Comm, ev: Evaluator, resume_gen: int | None) -> RunLog | NullLog:
    """Rank 0 writes config.yaml and opens log.h5 (rewound to resume_gen when resuming); the others get a NullLog."""
    from essa_hpc.runlog import NullLog, RunLog
    from essa_hpc.tracker import make_tracker

    hosts = comm.allgather(dist.hostname())
    log: RunLog | NullLog = NullLog()
    if comm.rank == 0:
        write_run_dir(cfg)
        log = RunLog(
            cfg.run_dir / "log.h5",
            config_json=cfg.to_json(),
            world_size=comm.size,
            hostnames=hosts,
            popsize=cfg.search.popsize,
            solution_length=ev.dim,
            metrics=ev.metric_names,
            resume_gen=resume_gen,
            tracker=make_tracker(cfg.log.report_to, cfg.run_dir, cfg.run.name, cfg.log.wandb_project, json.loads(cfg.to_json())),
        )
    comm.barrier()
    return log


def summary(cfg: Config, state: checkpoint.State, primary: str, backend: dict[str, Any]) -> None:
    run_dir, evals, best = cfg.run_dir, state.evals, state.best
    print(f"essa-run: done. run directory {run_dir}", flush=True)
    print(f"  log: {run_dir / 'log.h5'}")
    if (run_dir / "adapter").exists():
        print(f"  adapter (final mean): {run_dir / 'adapter'}")
    if (run_dir / "model").exists():
        print(f"  model (final weights, HF folder; the delta alone in model/delta): {run_dir / 'model'}")
    if (run_dir / "adapter_best").exists():
        print(f"  adapter (best validation, generation {best.gen}): {run_dir / 'adapter_best'}")
    if evals:
        first, last = evals[0][1], evals[-1][1]
        print(
            f"  held-out {primary}: {first[primary]:.4f} at start -> {last[primary]:.4f} after {evals[-1][0]} generations "
            f"(best {best.value:.4f} at generation {best.gen})"
        )
    record = {"evals": evals, "best_gen": best.gen, "best": best.value} | ({"backend": backend} if backend else {})
    (run_dir / "summary.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
