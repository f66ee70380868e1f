"""Submit ESSA runs to SLURM: one run, or a sweep over a grid of config values.

    python -m essa_hpc.submit --config configs/qwen32b_prm800k.yaml --nodes 2 --gpus-per-node 8 --time 24:00:00
    python -m essa_hpc.submit --config configs/qwen7b_gsm8k_8gpu.yaml --gpus-per-node 8 --time 12:00:00 \\
        --sweep lora.rank=8,32 --sweep search.popsize=24,48,96 --sweep lora.alpha_fraction=0.1,1.0
    python -m essa_hpc.submit --config configs/fake_scaling.yaml --cluster local --set run.generations=3
    python -m essa_hpc.submit ... --dry-run            # print what would be submitted; write nothing

Clusters (--cluster): ``slurm`` (submitit's SlurmExecutor: a job, or a job array for a sweep, whose
tasks srun starts, one per rank; the job side is essa_hpc.job), ``sbatch`` (plain sbatch scripts from
:func:`render_sbatch`, the slurm/common.sh machinery of the slurm/*.sh scripts, submitted with
``sbatch``), ``local`` (submitit's LocalExecutor on this machine; several ranks run under the venv's
``mpiexec``), ``debug`` (submitit's DebugExecutor, in this process).

Why two SLURM paths. They differ in who launches the ranks and who hears the end of the allocation.
Under ``slurm`` submitit's srun starts every rank in process, signals the tasks directly
(``--signal=USR2@delay``) and requeues through its own handler: job arrays for sweeps, results back in
Python, but srun with PMIx is required. Under ``sbatch`` the batch shell of slurm/common.sh starts the
launcher (srun, Open MPI's mpirun or MPICH/Intel Hydra's mpiexec), hears ``B:USR2`` itself, forwards
the signal each launcher relays and requeues with scontrol even when the run died before installing
its handler; its script is a file a user can read, edit and resubmit without Python or submitit.
Sites without srun PMIx, or whose MPI is started by mpirun, need the second; sweeps and local tests
want the first.

Every point of a sweep (essa_hpc.sweep: the grammar, the grid and the run names) gets its own run
directory ``<run.dir>/<base>_<r8_p24_a1.0...>``; the resolved config of each point is written to
``<run.dir>/sweeps/<base>/configs/<name>.yaml`` and the index of the submission (point -> run name, job
id, config path) to ``sweep.json`` and ``sweep.csv`` beside it.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from essa_hpc import config as config_mod
from essa_hpc.config import Config, ConfigError, load_config
from essa_hpc.exit_codes import BAD_INPUT, FAILURE, OK
from essa_hpc.job import REPO, EssaJob
from essa_hpc.job import forward_signal_for as forward_signal_for  # re-exported: tests/test_submit.py
from essa_hpc.placement import gpu_slice as gpu_slice  # re-exported: tests/test_submit.py checks the rule here
from essa_hpc.sweep import expand, parse_sweep, point_name

try:
    import submitit
    from submitit.core.utils import FailedSubmissionError
except ImportError as e:  # pragma: no cover - submitit is in env/requirements-*.txt and the [slurm] extra
    raise ImportError("essa_hpc.submit needs submitit: pip install 'submitit>=1.5' (or pip install -e '.[slurm]')") from e

CLUSTERS = ("slurm", "sbatch", "local", "debug")
# slurm/common.sh variables that would change a point's config: unset in rendered scripts
POINT_KNOBS = (
    "ESSA_PRESET",
    "ESSA_MODEL",
    "ESSA_ADAPTER",
    "ESSA_DATA",
    "ESSA_VAL_DATA",
    "ESSA_POPSIZE",
    "ESSA_LORA_RANK",
    "ESSA_ALPHA",
    "ESSA_BATCH",
    "ESSA_GENERATIONS",
    "ESSA_SEED",
    "ESSA_SET",
    "ESSA_RESUME",
)


class SubmitError(RuntimeError):
    """The submission itself failed (sbatch refused, no executor); nothing about the config."""


# ----------------------------------------------------------------------------------------------------
# resources


@dataclass(frozen=True)
class Resources:
    """What one job asks SLURM for. Ranks = nodes × tasks_per_node; a rank owns ``tp`` GPUs."""

    nodes: int = 1
    gpus_per_node: int = 0
    tp: int = 1
    tasks_per_node: int = 1  # CPU jobs; with GPUs it is gpus_per_node // tp
    cpus_per_task: int | None = None
    time_min: int = 240
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem_gb: int | None = None
    signal_delay_s: int = 300
    srun_mpi: str = "pmix"
    max_requeues: int = 100
    setup: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(what)

        need(self.nodes >= 1, f"--nodes: expected >= 1, got {self.nodes}")
        need(self.gpus_per_node >= 0, f"--gpus-per-node: expected >= 0, got {self.gpus_per_node}")
        need(self.tp >= 1, f"--tp: expected >= 1 GPUs per rank, got {self.tp}")
        need(self.tasks_per_node >= 1, f"--tasks-per-node: expected >= 1, got {self.tasks_per_node}")
        need(self.time_min >= 1, f"--time: expected at least one minute, got {self.time_min}")
        need(self.signal_delay_s >= 0, f"--signal-delay: expected >= 0 s, got {self.signal_delay_s}")
        need(self.max_requeues >= 0, f"--max-requeues: expected >= 0, got {self.max_requeues}")
        need(self.cpus_per_task is None or self.cpus_per_task >= 1, f"--cpus-per-task: expected >= 1, got {self.cpus_per_task}")
        if self.gpus_per_node:
            need(
                self.gpus_per_node % self.tp == 0,
                f"--gpus-per-node {self.gpus_per_node} is not a multiple of --tp {self.tp} (GPUs per rank)",
            )
            need(
                self.tasks_per_node == self.gpus_per_node // self.tp,
                f"--tasks-per-node {self.tasks_per_node}: with GPUs it is --gpus-per-node / --tp = {self.gpus_per_node // self.tp}",
            )
        else:
            need(self.tp == 1, f"--tp {self.tp} needs GPUs (--gpus-per-node)")

    @classmethod
    def build(cls, gpus_per_node: int = 0, tp: int = 1, tasks_per_node: int | None = None, **kw: Any) -> Resources:
        """Derive tasks per node from GPUs per node and TP (one rank per TP group of GPUs)."""
        if tasks_per_node is None:
            tasks_per_node = gpus_per_node // tp if gpus_per_node and gpus_per_node % tp == 0 and gpus_per_node >= tp else 1
        return cls(gpus_per_node=gpus_per_node, tp=tp, tasks_per_node=tasks_per_node, **kw)

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks_per_node


def parse_time(text: str) -> int:
    """Minutes from ``90``, ``HH:MM:SS``, ``MM:SS`` or ``D-HH:MM[:SS]`` (SLURM's formats); rounds up."""
    t = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        raise ConfigError(f"--time {text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    if days is None and b is None:
        return int(a)
    parts = [int(a), int(b or 0), int(c or 0)]
    if days is None and c is None:  # MM:SS
        total_s = parts[0] * 60 + parts[1]
    else:  # [D-]HH:MM[:SS]
        total_s = int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    return max(1, -(-total_s // 60))


def format_time(minutes: int) -> str:
    days, rest = divmod(minutes, 1440)
    text = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{text}" if days else text


# ----------------------------------------------------------------------------------------------------
# points of a submission


@dataclass(frozen=True)
class Point:
    index: int
    values: dict[str, Any]  # swept key -> value (empty for a single run)
    name: str  # run.name
    config: Config  # resolved
    config_path: Path  # where the resolved config is (or would be) written

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir


def build_points(
    config_path: str | None,
    overrides: Sequence[str],
    sweeps: Sequence[str],
    name: str | None = None,
    run_dir: str | None = None,
    folder: Path | None = None,
    check_paths: bool = True,
    tp: int | None = None,
) -> tuple[list[Point], Path]:
    """Validate the base config, expand the grid, validate every point. Nothing is written here.

    Returns the points and the submission folder (default ``<run.dir>/sweeps/<base>``).
    """
    extra = list(overrides)
    if run_dir is not None:
        extra.append(f"run.dir={run_dir}")
    if tp is not None:
        extra.append(f"backend.tensor_parallel_size={tp}")
    base_cfg = load_config(config_path, extra, check_paths=False)
    base = name or base_cfg.run.name
    if not base or "/" in base:
        raise ConfigError(f"--name {base!r}: expected a non-empty name without '/'")
    abs_dir = str(Path(base_cfg.run.dir).expanduser().resolve())
    base_cfg = base_cfg.replace(**{"run.dir": abs_dir})
    folder = (folder or Path(abs_dir) / "sweeps" / base).resolve()
    points: list[Point] = []
    names: dict[str, dict[str, Any]] = {}
    for i, values in enumerate(expand([parse_sweep(s) for s in sweeps])):
        pname = point_name(base, values)
        if pname in names:
            raise ConfigError(f"--sweep: points {names[pname]} and {values} both get the run name {pname!r}")
        names[pname] = values
        try:
            cfg = base_cfg.replace(**values, **{"run.name": pname})
            config_mod.validate(cfg, check_paths=check_paths)
        except ConfigError as e:
            where = f" (sweep point {values})" if values else ""
            raise ConfigError(f"{e}{where}") from None
        points.append(Point(i, values, pname, cfg, folder / "configs" / f"{pname}.yaml"))
    return points, folder


def write_config(point: Point) -> None:
    """The resolved config of a point, atomically (jobs read it; a rerun rewrites the same text)."""
    point.config_path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        f"# sweep point {point.name}: {json.dumps(point.values, sort_keys=False)}\n"
        f"# launch: python -m essa_hpc.run --config {point.config_path}\n" + point.config.to_yaml()
    )
    tmp = point.config_path.with_name(f".{point.config_path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(point.config_path)


def run_argv(point: Point, resume: bool = False) -> list[str]:
    """Arguments of ``python -m essa_hpc.run`` for a point: its resolved config (and --resume)."""
    return ["--config", str(point.config_path), *(["--resume"] if resume else [])]


# ----------------------------------------------------------------------------------------------------
# plain sbatch scripts


def render_sbatch(
    name: str,
    config_path: str | Path,
    res: Resources,
    essa_home: str | Path = REPO,
    run_dir: str | Path | None = None,
    python: str = "python",
    log_dir: str | Path | None = None,
    run_args: Sequence[str] = (),
    launcher: str = "srun",
) -> str:
    """The text of a plain sbatch script for one point, using slurm/common.sh (the same launch,
    GPU mapping, signal forwarding and requeue as the slurm/*.sh scripts).

    Deterministic in its arguments (golden-file tests); knobs stay overridable at submit time
    (``ESSA_LAUNCHER=mpirun sbatch x.sbatch``) because every export keeps a value already set.
    """
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"# essa_hpc run {name}: generated by `python -m essa_hpc.submit`; resubmit with `sbatch <this file>`",
        "# (a resubmission, like SLURM's requeue, resumes from the run directory's checkpoint).",
        f"# config: {config_path}",
        f"# ranks: {res.nodes} node(s) x {res.tasks_per_node} rank(s) = {res.ranks}; {res.tp} GPU(s) per rank",
        f"#SBATCH --job-name={q('essa-' + name)}",
        f"#SBATCH --nodes={res.nodes}",
        f"#SBATCH --ntasks-per-node={res.tasks_per_node}",
    ]
    if res.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={res.gpus_per_node}")
    if res.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={res.cpus_per_task}")
    if res.mem_gb is not None:
        lines.append(f"#SBATCH --mem={res.mem_gb}G" if res.mem_gb else "#SBATCH --mem=0")  # 0: all of each node
    lines.append(f"#SBATCH --time={format_time(res.time_min)}")
    for opt, value in (("partition", res.partition), ("account", res.account), ("qos", res.qos), ("constraint", res.constraint)):
        if value:
            lines.append(f"#SBATCH --{opt}={q(value)}")
    # B: the batch shell gets the signal and forwards it to the launcher (slurm/common.sh explains why)
    lines += [
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR2@{res.signal_delay_s}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={q(str(Path(log_dir) / '%x-%j.out') if log_dir else '%x-%j.out')}",
        "",
    ]
    # The point's identity is fixed; knobs of the launch keep a value set at submit time.
    fixed = {"ESSA_HOME": str(essa_home), "ESSA_CONFIG": str(config_path), "ESSA_RUN_NAME": name, "ESSA_TP": str(res.tp)}
    if run_dir is not None:
        fixed["ESSA_RUN_DIR"] = str(run_dir)
    lines += [f"export {key}={q(value)}" for key, value in fixed.items()]
    defaults = {"ESSA_PYTHON": python, "ESSA_LAUNCHER": launcher, "ESSA_SRUN_MPI": res.srun_mpi, "ESSA_MAX_REQUEUES": str(res.max_requeues)}
    lines += [f'export {key}="${{{key}:-{_dq(value)}}}"' for key, value in defaults.items()]
    lines.append(f"unset {' '.join(POINT_KNOBS)}  # the resolved config is the point; script arguments still apply")
    if res.setup:
        lines += ["", "# setup", *res.setup]
    lines += ["", '. "$ESSA_HOME/slurm/common.sh"', " ".join(["essa_main", *(q(a) for a in run_args), '"$@"']), ""]
    return "\n".join(lines)


def _dq(text: str) -> str:
    """Escape for the inside of a double-quoted shell word."""
    return re.sub(r'([\\"$`])', r"\\\1", text)


# ----------------------------------------------------------------------------------------------------
# submission


@dataclass
class Record:
    """One line of the sweep index."""

    index: int
    name: str
    point: dict[str, Any]
    run_dir: str
    config: str
    job_id: str
    cluster: str
    submitted_at: str
    command: str
    exit_code: int | None = None


def write_index(folder: Path, records: Sequence[Record]) -> None:
    """sweep.json (kept across submissions: a point submitted again replaces its entry) and sweep.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.json"
    old: list[dict[str, Any]] = []
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("points", [])
        except (ValueError, AttributeError):
            old = []
    new = [vars(r) for r in records]
    names = {r["name"] for r in new}
    merged = [r for r in old if r.get("name") not in names] + new
    merged.sort(key=lambda r: (r.get("index", 0), r.get("name", "")))
    tmp = folder / ".sweep.json.tmp"
    tmp.write_text(json.dumps({"points": merged}, indent=1, default=str) + "\n")
    tmp.replace(path)
    buf = io.StringIO()
    fields = ["index", "name", "job_id", "cluster", "run_dir", "config", "point", "exit_code", "submitted_at", "command"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in merged:
        writer.writerow({**r, "point": json.dumps(r.get("point", {}), sort_keys=False)})
    tmp_csv = folder / ".sweep.csv.tmp"
    tmp_csv.write_text(buf.getvalue())
    tmp_csv.replace(folder / "sweep.csv")


def make_executor(cluster: str, folder: Path, res: Resources, job_name: str, python: str | None = None) -> Any:
    """submitit's executor for a cluster, with one task per rank and the requeue/signal settings."""
    init: dict[str, Any] = {"slurm_max_num_timeout": res.max_requeues, "local_max_num_timeout": res.max_requeues}
    if python:  # the jobs' interpreter (default: this one, which must exist on the compute nodes)
        init.update(slurm_python=python, local_python=python)
    ex = submitit.AutoExecutor(folder=folder / "submitit", cluster=cluster, **init)
    params: dict[str, Any] = {"name": job_name, "timeout_min": res.time_min}
    if cluster == "slurm":
        params.update(
            nodes=res.nodes,
            tasks_per_node=res.tasks_per_node,
            slurm_signal_delay_s=res.signal_delay_s,  # --signal=USR2@delay: srun tasks (the ranks) get it
            slurm_additional_parameters={"requeue": True},
        )
        if res.gpus_per_node:
            params["slurm_gpus_per_task"] = res.tp  # SLURM binds each task (rank) to its tp GPUs
        if res.cpus_per_task:
            params["cpus_per_task"] = res.cpus_per_task
        if res.mem_gb is not None:
            params["mem_gb"] = res.mem_gb
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(res, key):
                params[f"slurm_{key}"] = getattr(res, key)
        if res.srun_mpi:
            params["slurm_srun_args"] = [f"--mpi={res.srun_mpi}"]
        if res.setup:
            params["slurm_setup"] = list(res.setup)
    elif cluster == "local":
        params.update(tasks_per_node=1, gpus_per_node=res.gpus_per_node)
    ex.update_parameters(**params)
    return ex


def submit(
    points: Sequence[Point],
    res: Resources,
    cluster: str,
    folder: Path,
    resume: bool = False,
    wait: bool = True,
    python: str | None = None,
    out: Any = None,
) -> list[Record]:
    """Write the points' configs, submit them, write the index. Returns one record per point."""
    out = out or sys.stdout
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    records: list[Record] = []
    job_name = f"essa-{points[0].name}" if len(points) == 1 else f"essa-{folder.name}"
    ex = None if cluster == "sbatch" else make_executor(cluster, folder, res, job_name, python)
    python = python or sys.executable
    for p in points:
        write_config(p)
    if ex is None:
        log_dir = folder / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        for p in points:
            text = render_sbatch(p.name, p.config_path, res, REPO, p.config.run.dir, python, log_dir, run_argv(p, resume)[2:])
            script = folder / "sbatch" / f"{p.name}.sbatch"
            script.parent.mkdir(parents=True, exist_ok=True)
            script.write_text(text)
            job_id = sbatch(script)
            records.append(
                Record(p.index, p.name, p.values, str(p.run_dir), str(p.config_path), job_id, cluster, stamp, f"sbatch {script}")
            )
            print(f"essa-submit: {p.name}: job {job_id} ({script})", file=out)
        write_index(folder, records)
        return records

    spawn = cluster in ("local", "debug")
    jobs = []
    fns = [EssaJob(run_argv(p, resume), str(p.run_dir), res.tp, res.ranks, spawn) for p in points]
    if cluster == "slurm" and len(points) > 1:
        with ex.batch():
            jobs = [ex.submit(fn) for fn in fns]
    else:
        jobs = [ex.submit(fn) for fn in fns]
    for p, fn, job in zip(points, fns, jobs):
        cmd = f"python -m essa_hpc.run {shlex.join(fn.argv)}"
        records.append(Record(p.index, p.name, p.values, str(p.run_dir), str(p.config_path), str(job.job_id), cluster, stamp, cmd))
        print(f"essa-submit: {p.name}: job {job.job_id} ({res.ranks} rank(s); run {p.run_dir})", file=out)
    write_index(folder, records)
    if wait and cluster in ("local", "debug"):
        for rec, job in zip(records, jobs):
            try:
                results = job.results()
                rec.exit_code = max(int(r.get("exit_code", 0)) for r in results)
            except Exception as e:  # the job's error, re-raised by submitit
                print(f"essa-submit: {rec.name}: failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}", file=out)
                rec.exit_code = FAILURE
            print(f"essa-submit: {rec.name}: exit {rec.exit_code}; logs in {job.paths.stdout.parent}", file=out)
        write_index(folder, records)
    return records


def sbatch(script: Path) -> str:
    """``sbatch script`` -> the job id."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise SubmitError("no sbatch on PATH: run on a SLURM login node, or use --cluster local / --dry-run")
    proc = subprocess.run([exe, str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch {script} failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    m = re.search(r"job (\d+)", proc.stdout) or re.fullmatch(r"\s*(\d+)(;\S+)?\s*", proc.stdout)
    if not m:
        raise SubmitError(f"sbatch {script}: cannot find a job id in its output {proc.stdout.strip()!r}")
    return m.group(1)


def describe_dry_run(
    points: Sequence[Point], res: Resources, cluster: str, folder: Path, resume: bool, python: str | None, out: Any = None
) -> None:
    w = (out or sys.stdout).write
    w(f"essa-submit (dry run): {len(points)} run(s) on cluster {cluster}; nothing is written or submitted\n")
    w(
        f"  per run: {res.nodes} node(s) x {res.tasks_per_node} rank(s) = {res.ranks} rank(s), {res.tp} GPU(s) per rank, "
        f"time {format_time(res.time_min)}, requeue on preemption/time limit (USR2 {res.signal_delay_s} s before)\n"
    )
    w(f"  submission folder: {folder} (configs/, sweep.json, sweep.csv)\n")
    if cluster == "slurm":
        gpus = f" --gpus-per-task={res.tp}" if res.gpus_per_node else ""
        w(
            f"  submitit: sbatch --nodes={res.nodes} --ntasks-per-node={res.tasks_per_node}{gpus} --signal=USR2@{res.signal_delay_s} "
            f"--requeue{' (one job array)' if len(points) > 1 else ''}; srun --mpi={res.srun_mpi or '<site default>'}\n"
        )
    for p in points:
        w(f"  [{p.index}] {p.name}  {json.dumps(p.values) if p.values else ''}\n")
        w(f"      run dir {p.run_dir}\n      python -m essa_hpc.run {shlex.join(run_argv(p, resume))}\n")
    if cluster == "sbatch" and points:
        p = points[0]
        w(f"--- sbatch script of {p.name} ---\n")
        w(
            render_sbatch(
                p.name, p.config_path, res, REPO, p.config.run.dir, python or sys.executable, folder / "logs", run_argv(p, resume)[2:]
            )
        )


# ----------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="essa-submit",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Resources: ranks = nodes x (gpus-per-node / tp), one rank per tp GPUs; CPU jobs: --tasks-per-node. See slurm/README.md.",
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--config", help="YAML config or preset (configs/*.yaml); default: the embedded default")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    g.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="sweep a key over values (repeatable; the grid is the product), e.g. lora.rank=8,32",
    )
    g.add_argument("--name", help="base run name (default: run.name of the config); sweep points add _r8_p24...")
    g.add_argument("--run-dir", help="run.dir: folder of the run directories (default: the config's)")
    g.add_argument("--folder", help="submission folder for configs, index and logs (default: <run.dir>/sweeps/<name>)")
    g.add_argument("--resume", action="store_true", help="pass --resume (each run must have a checkpoint)")
    g.add_argument("--no-check-paths", action="store_true", help="do not check that model/data paths exist here")
    c = p.add_argument_group("where")
    c.add_argument(
        "--cluster", choices=CLUSTERS, help="slurm (submitit), sbatch (plain scripts), local, debug; default: slurm when srun is on PATH"
    )
    c.add_argument("--dry-run", action="store_true", help="print what would be submitted, write nothing")
    c.add_argument("--no-wait", action="store_true", help="local/debug: return after submitting")
    c.add_argument("--python", help="python of the jobs (default: this one)")
    r = p.add_argument_group("resources")
    r.add_argument("--nodes", type=int, default=1)
    r.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: a CPU job)")
    r.add_argument("--tp", type=int, help="GPUs per rank (default: the config's backend.tensor_parallel_size)")
    r.add_argument("--tasks-per-node", type=int, help="ranks per node for CPU jobs (with GPUs: gpus-per-node / tp)")
    r.add_argument("--cpus-per-task", type=int)
    r.add_argument("--time", default="04:00:00", help="time limit: minutes or [D-]HH:MM:SS (default 04:00:00)")
    r.add_argument("-p", "--partition")
    r.add_argument("-A", "--account")
    r.add_argument("--qos")
    r.add_argument("--constraint")
    r.add_argument("--mem-gb", type=int)
    r.add_argument("--signal-delay", type=int, default=300, help="seconds before the time limit the run is told to stop (300)")
    r.add_argument("--srun-mpi", default="pmix", help="srun --mpi= plugin (pmix; '' for the site default)")
    r.add_argument("--max-requeues", type=int, default=100, help="time-limit requeues before giving up (100)")
    r.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run in the job before the launch, e.g. 'module load openmpi/4.1' (repeatable)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cluster = args.cluster
    if cluster is None:
        if shutil.which("srun") is None and not args.dry_run:
            print(
                "essa-submit: no SLURM here (no srun on PATH): use --cluster local to run on this machine, "
                "or --dry-run to see what would be submitted",
                file=sys.stderr,
            )
            return BAD_INPUT
        cluster = "slurm"
    try:
        base_tp = args.tp
        if base_tp is None:
            base_tp = load_config(args.config, args.set, check_paths=False).backend.tensor_parallel_size if args.gpus_per_node else 1
        res = Resources.build(
            gpus_per_node=args.gpus_per_node,
            tp=base_tp,
            tasks_per_node=args.tasks_per_node,
            nodes=args.nodes,
            cpus_per_task=args.cpus_per_task,
            time_min=parse_time(args.time),
            partition=args.partition,
            account=args.account,
            qos=args.qos,
            constraint=args.constraint,
            mem_gb=args.mem_gb,
            signal_delay_s=args.signal_delay,
            srun_mpi=args.srun_mpi,
            max_requeues=args.max_requeues,
            setup=tuple(args.setup),
        )
        points, folder = build_points(
            args.config,
            args.set,
            args.sweep,
            args.name,
            args.run_dir,
            Path(args.folder) if args.folder else None,
            check_paths=not args.no_check_paths,
            tp=res.tp if args.gpus_per_node else None,
        )
    except ConfigError as e:
        print(f"essa-submit: {e}", file=sys.stderr)
        return BAD_INPUT
    if args.dry_run:
        describe_dry_run(points, res, cluster, folder, args.resume, args.python)
        return OK
    try:
        records = submit(points, res, cluster, folder, resume=args.resume, wait=not args.no_wait, python=args.python)
    except (SubmitError, FailedSubmissionError, OSError) as e:
        print(f"essa-submit: {e}", file=sys.stderr)
        return FAILURE
    print(f"essa-submit: index {folder / 'sweep.json'} ({len(records)} run(s))")
    if any(r.exit_code not in (None, OK) for r in records):
        return FAILURE
    return OK


if __name__ == "__main__":
    raise SystemExit(main())
