"""The ESSA run: ``python -m essa_hpc.run [--config F] [--set k=v ...] [--resume]``, also under mpirun/srun.

Reads top to bottom like a recipe (DESIGN.md, "One generation"):

    config -> run directory policy -> model, task, SVD-LoRA, backend -> optimizer -> log
    for g in generations:
        X = ask(g); minibatch(seed, g); evaluate my share; ONE Allgather; check; tell(X, −reward)
        log (rank 0); checkpoint; validate; stop on request / budget / target
    export the mean (and best) adapter

With no arguments it runs the embedded default: SmolLM2-135M-Instruct on generated arithmetic, after a
short cached LoRA SFT warm start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from essa_hpc import checkpoint, dist
from essa_hpc.config import Config, ConfigError, describe, load_config
from essa_hpc.evaluation import build_evaluator, score, validate

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "preempted, checkpointed, please requeue"; slurm/ scripts rely on it
EXIT_BAD_INPUT = 2


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
    args = parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"essa-run: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        comm = dist.init()
    except dist.DistError as e:
        print(f"essa-run: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
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
                comm.abort(EXIT_BAD_INPUT)
            return EXIT_BAD_INPUT


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "fix your input": exit status 2 and one line, no traceback."""
    from essa_hpc.models import ModelError
    from essa_hpc.svd_lora import AdapterError
    from essa_hpc.tasks.base import TaskError

    return (RunError, checkpoint.CheckpointError, ConfigError, TaskError, ModelError, AdapterError)


# ----------------------------------------------------------------------------------------------------
# pieces the loop uses


class StopFlag:
    """SIGUSR2/SIGTERM only set this flag; it travels in the next Allgather so all ranks stop together."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True


def say(comm: dist.Comm, msg: str) -> None:
    if comm.rank == 0:
        print(msg, flush=True)


def prepare_run_dir(cfg: Config, comm: dist.Comm, resume: bool) -> bool:
    """Decide before any expensive work: resume, start fresh, or refuse. Returns True to resume.

    Never overwrites silently: an existing run with a log but no checkpoint needs run.overwrite=true.
    """
    run_dir = cfg.run_dir
    decision: tuple[str, str] = ("fresh", "")
    if comm.rank == 0:
        try:
            has_ckpt = checkpoint.exists(run_dir)
            if resume and not has_ckpt:
                decision = ("error", f"--resume: {run_dir} has no checkpoint to resume from")
            elif has_ckpt and not cfg.run.overwrite:
                checkpoint.load(run_dir, cfg.digest())  # raises on a config mismatch
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
        except checkpoint.CheckpointError as e:
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


# ----------------------------------------------------------------------------------------------------
# the run


def run(cfg: Config, comm: dist.Comm, resume: bool = False) -> int:
    t_start = time.perf_counter()
    from essa_hpc.search import make_optimizer
    from essa_hpc.tasks import minibatch

    threads = 1
    if cfg.backend.name != "fake":  # the fake backend needs no torch (fast start for engine tests)
        from essa_hpc import models

        threads = models.set_threads(cfg.model.threads, comm.ranks_on_node)
    resuming = prepare_run_dir(cfg, comm, resume)
    run_dir = cfg.run_dir
    stop = StopFlag()

    ev = build_evaluator(cfg, comm)
    lam, B, d = cfg.search.popsize, cfg.task.batch_size, ev.dim
    if len(ev.train) < B:
        raise RunError(f"task.batch_size={B} but the training split has only {len(ev.train)} examples")
    try:
        opt = make_optimizer(cfg.search, d, cfg.run.seed)
    except ValueError as e:
        raise RunError(str(e)) from None
    table = dist.assign(lam, B, comm.size)
    mine, slots = table[comm.rank], max(1, max(len(w) for w in table))
    primary = ev.metric_names[0]

    start_gen, elapsed0 = 0, 0.0
    best: dict[str, Any] = {"value": -math.inf, "vector": None, "gen": -1}
    evals_done: list[tuple[int, dict[str, float]]] = []
    if resuming:
        state = checkpoint.load(run_dir, cfg.digest())
        opt.load_state_dict(state["optimizer"])
        start_gen, elapsed0, best, evals_done = state["gen"], state["elapsed"], state["best"], state["evals"]
    hosts = comm.allgather(dist.hostname())
    log = None
    if comm.rank == 0:
        write_run_dir(cfg)
        from essa_hpc.runlog import RunLog

        log = RunLog(
            run_dir / "log.h5",
            config_json=cfg.to_json(),
            world_size=comm.size,
            hostnames=hosts,
            popsize=lam,
            solution_length=d,
            metrics=ev.metric_names,
            resume_gen=start_gen if resuming else None,
        )
    comm.barrier()
    say(
        comm,
        f"essa-run: {run_dir} | {comm.size} rank(s) × {threads} thread(s) | λ={lam} d={d} batch={B} | "
        f"backend={cfg.backend.name} task={cfg.task.name}" + (f" | resuming at generation {start_gen}" if resuming else ""),
    )

    def clock() -> float:
        return elapsed0 + time.perf_counter() - t_start

    def do_eval(gen: int, vec: np.ndarray) -> dict[str, float]:
        m = validate(ev, cfg, comm, vec)
        evals_done.append((gen, m))
        if log is not None:
            log.append_eval(gen, clock(), m)
        if m[primary] > best["value"]:
            best.update(value=m[primary], vector=vec.copy(), gen=gen)
        return m

    if not resuming:
        m0 = do_eval(0, np.zeros(d))
        say(comm, "  validation at start (x = 0, the warm start): " + ", ".join(f"{k}={v:.4f}" for k, v in m0.items()))

    late = np.zeros(len(dist.PHASES))  # after-Allgather phases of the previous generation (see runlog)
    P = {p: i for i, p in enumerate(dist.PHASES)}
    exit_code, gen = 0, start_gen
    for gen in range(start_gen, cfg.run.generations):
        tg = time.perf_counter()
        digest_before = bytes.fromhex(opt.digest())[: dist.DIGEST_BYTES]
        X = opt.ask(gen)
        seeds = np.array([dist.candidate_seed(cfg.run.seed, gen, c) for c in range(lam)], dtype=np.uint64)
        batch = minibatch(ev.train, cfg.run.seed, gen, B)
        cands = sorted({w.cand for w in mine})
        row = {c: i for i, c in enumerate(cands)}
        items = [(row[w.cand], batch[p], dist.sample_seed(int(seeds[w.cand]), p)) for w in mine for p in range(w.lo, w.hi)]
        t_prep = time.perf_counter() - tg
        scores = score(ev, X[cands], items)
        values, tokens, failures, timeouts = scores.rewards, scores.tokens, scores.failures, scores.timeouts
        t_gen, t_rew = scores.generate_s, scores.reward_s

        # --- one Allgather of fixed-size records -------------------------------------------------
        recs = np.zeros(max(1, len(mine)), dtype=dist.RECORD)
        k = 0
        for i, w in enumerate(mine):
            n = w.hi - w.lo
            recs[i] = (
                1,
                0,
                w.cand,
                w.part,
                seeds[w.cand],
                dist.to_fixed(values[k : k + n]),
                n,
                0,
                0,
                int(tokens[k : k + n].sum()),
                b"",
                np.zeros(len(dist.PHASES)),
            )
            k += n
        over_budget = cfg.run.time_budget_s > 0 and clock() >= cfg.run.time_budget_s
        recs[0]["stop"] = (1 if over_budget else 0) | (2 if stop.requested else 0)
        recs[0]["failures"], recs[0]["timeouts"], recs[0]["digest"] = failures, timeouts, digest_before
        timings = late.copy()
        timings[P["generate"]], timings[P["reward"]], timings[P["other"]] = t_gen, t_rew, t_prep
        recs[0]["timings"] = timings
        ta = time.perf_counter()
        gathered = comm.allgather_records(recs, slots)
        t_allgather = time.perf_counter() - ta

        # --- every rank: check, combine, tell ---------------------------------------------------
        tt = time.perf_counter()
        if gen % cfg.search.digest_every == 0:
            bad = dist.diverged_ranks([bytes(gathered[r][0]["digest"]) for r in range(comm.size)])
            if bad:
                handle_divergence(cfg, comm, opt, bad, gen)
        dist.check_records(gathered, table, lam, seeds)
        rewards, _, rank_tokens = dist.combine(gathered, lam)
        opt.tell(X, -rewards)
        t_tell = time.perf_counter() - tt
        stop_bits = int(np.bitwise_or.reduce(gathered[:, 0]["stop"]))
        stop_now, signalled = stop_bits != 0, bool(stop_bits & 2)

        # --- rank 0 logs; checkpoints; validation ---------------------------------------------
        tl = time.perf_counter()
        if log is not None:
            per_rank = np.stack([gathered[r][0]["timings"] for r in range(comm.size)])
            prev_late = per_rank.copy()
            now = per_rank.copy()
            for p in ("allgather", "tell", "log", "checkpoint", "eval"):
                now[:, P[p]] = 0.0
            for p in ("generate", "reward", "other"):
                prev_late[:, P[p]] = 0.0
            log.append_generation(
                rewards=rewards,
                seeds=seeds,
                sigma=opt.sigma,
                wall_time=clock(),
                timings=now,
                tokens=rank_tokens,
                failures=int(gathered[:, 0]["failures"].sum()),
                timeouts=int(gathered[:, 0]["timeouts"].sum()),
                digest=digest_before,
                prev_late_timings=prev_late if gen > start_gen else None,
            )
        t_log = time.perf_counter() - tl
        done = gen + 1
        t_eval = 0.0
        # a signalled stop is an interruption, not an end: no extra validation, so the resumed run's
        # log matches an uninterrupted one; a spent time budget does end the run
        last = done >= cfg.run.generations or (stop_now and not signalled)
        metrics_now = None
        if (cfg.eval.every and done % cfg.eval.every == 0) or last:
            te = time.perf_counter()
            metrics_now = do_eval(done, opt.mean.copy())
            t_eval = time.perf_counter() - te
        target_hit = (
            cfg.run.target_metric is not None
            and metrics_now is not None
            and cfg.run.target_value is not None
            and metrics_now.get(cfg.run.target_metric, -math.inf) >= cfg.run.target_value
        )
        tc = time.perf_counter()
        if comm.rank == 0 and (done % cfg.log.checkpoint_every == 0 or stop_now or last or target_hit):
            checkpoint.save(
                run_dir,
                {
                    "gen": done,
                    "optimizer": opt.state_dict(),
                    "elapsed": clock(),
                    "best": best,
                    "evals": evals_done,
                    "config_digest": cfg.digest(),
                },
            )
        t_ckpt = time.perf_counter() - tc
        late = np.zeros(len(dist.PHASES))
        late[P["allgather"]], late[P["tell"]], late[P["log"]], late[P["checkpoint"]], late[P["eval"]] = (
            t_allgather,
            t_tell,
            t_log,
            t_ckpt,
            t_eval,
        )
        if cfg.log.progress:
            tok_s = rank_tokens.sum() / max(1e-9, t_gen) / comm.size
            val = "" if metrics_now is None else f" | val {primary}={metrics_now[primary]:.4f}"
            say(
                comm,
                f"gen {done:4d}/{cfg.run.generations} | reward mean {rewards.mean():+.4f} max {rewards.max():+.4f} | "
                f"σ {opt.sigma:.4g} | {time.perf_counter() - tg:6.2f} s | {tok_s:7.1f} tok/s/rank{val}",
            )
        if signalled:
            say(comm, f"essa-run: stop signal received; checkpointed at generation {done}; exit {REQUEUE_EXIT_CODE} (requeue)")
            exit_code = REQUEUE_EXIT_CODE
            break
        if stop_now:
            say(comm, f"essa-run: time budget of {cfg.run.time_budget_s} s spent at generation {done}")
            break
        if target_hit:
            say(comm, f"essa-run: {cfg.run.target_metric} reached {cfg.run.target_value} at generation {done}")
            break

    # --- the end: late timings of the last generation, final vectors, adapters -------------------
    lates = comm.allgather(late)
    if log is not None:
        if log.generations:
            log.patch_late_timings(log.generations - 1, np.stack(lates))
        best_vec = best["vector"] if best["vector"] is not None else None
        log.write_final(opt.mean, best_vec)
        log.close()
    if comm.rank == 0 and ev.export is not None and exit_code == 0:
        ev.export(opt.mean, run_dir / "adapter")
        if best["vector"] is not None:
            ev.export(np.asarray(best["vector"]), run_dir / "adapter_best")
    comm.barrier()
    if exit_code == 0 and comm.rank == 0:
        summary(cfg, evals_done, primary, best)
    ev.backend.close()
    return exit_code


def handle_divergence(cfg: Config, comm: dist.Comm, opt: Any, bad: list[int], gen: int) -> None:
    if not cfg.search.digest_repair:
        raise dist.DistError(
            f"optimizer state diverged at generation {gen}: ranks {bad} differ from rank 0 "
            "(set search.digest_repair=true to copy rank 0's state instead)"
        )
    say(comm, f"essa-run: ranks {bad} diverged at generation {gen}; repairing from rank 0")
    opt.load_state_dict(comm.bcast(opt.state_dict() if comm.rank == 0 else None))


def summary(cfg: Config, evals: list[tuple[int, dict[str, float]]], primary: str, best: dict[str, Any]) -> None:
    run_dir = cfg.run_dir
    print(f"essa-run: done. run directory {run_dir}", flush=True)
    print(f"  log: {run_dir / 'log.h5'}")
    if (run_dir / "adapter").exists():
        print(f"  adapter (final mean): {run_dir / 'adapter'}")
    if (run_dir / "adapter_best").exists():
        print(f"  adapter (best validation, generation {best['gen']}): {run_dir / 'adapter_best'}")
    if evals:
        first, lastm = evals[0][1], evals[-1][1]
        print(
            f"  held-out {primary}: {first[primary]:.4f} at start -> {lastm[primary]:.4f} after {evals[-1][0]} generations "
            f"(best {best['value']:.4f} at generation {best['gen']})"
        )
    (run_dir / "summary.json").write_text(json.dumps({"evals": evals, "best_gen": best["gen"], "best": best["value"]}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
