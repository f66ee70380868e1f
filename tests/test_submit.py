"""essa_hpc.submit without a cluster: sweep expansion, golden sbatch scripts, submission through fake
`sbatch`, submitit's LocalExecutor end to end (and its checkpoint/requeue path), and submitit's
SlurmExecutor against an emulated SLURM (fake sbatch/srun/scontrol over the venv's real mpiexec).

Golden files live in tests/golden/; refresh them with ``ESSA_UPDATE_GOLDEN=1 pytest tests/test_submit.py``.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import pytest
import yaml

pytest.importorskip("submitit", reason="essa_hpc.submit needs the slurm extra: pip install 'essa_hpc[slurm]'")

from essa_hpc import submit as S
from essa_hpc.config import ConfigError, load_config

from .conftest import BIN, REPO
from .test_slurm import FakeSlurm, python_calls, sets, shellcheck_exe

GOLDEN = Path(__file__).parent / "golden"
TINY = ["backend.fake_dim=8", "backend.fake_sleep_s=0", "search.popsize=6", "task.batch_size=4", "eval.size=4", "run.generations=3"]


@pytest.fixture
def fake(tmp_path: Path) -> FakeSlurm:
    return FakeSlurm(tmp_path)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("ESSA_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with ESSA_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} changed; review the diff and refresh with ESSA_UPDATE_GOLDEN=1"


# ----------------------------------------------------------------------------------------------------
# sweeps


def test_parse_sweep_reads_values_as_yaml() -> None:
    assert S.parse_sweep("lora.rank=8,32") == ("lora.rank", [8, 32])
    assert S.parse_sweep("lora.alpha_fraction=0.1, 1.0") == ("lora.alpha_fraction", [0.1, 1.0])
    assert S.parse_sweep("search.diagonal=true,false") == ("search.diagonal", [True, False])
    assert S.parse_sweep("task.name=gsm8k,math") == ("task.name", ["gsm8k", "math"])
    assert S.parse_sweep("lora.targets=[[q_proj, v_proj], [q_proj]]") == ("lora.targets", [["q_proj", "v_proj"], ["q_proj"]])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lora.rnk=8,32", "unknown config key 'lora.rnk' (did you mean lora.rank"),
        ("lora.rank", "expected key=v1,v2"),
        ("lora.rank=8,,32", "empty value"),
        ("lora.rank=8,8", "value 8 appears twice"),
        ("run.name=a,b", "derived per point"),
        ("lora.targets=[q_proj", "cannot parse"),
    ],
)
def test_parse_sweep_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as e:
        S.parse_sweep(spec)
    assert message in str(e.value)


def test_table7_grid_expands_to_every_point_with_its_name(tmp_path: Path) -> None:
    sweeps = ["lora.rank=8,32", "search.popsize=24,48,96", "lora.alpha_fraction=0.25,1.0"]
    points, folder = S.build_points(
        str(REPO / "configs" / "fake_scaling.yaml"), ["task.batch_size=4"], sweeps, name="base", run_dir=str(tmp_path / "runs")
    )
    assert len(points) == 12
    assert folder == tmp_path / "runs" / "sweeps" / "base"
    assert points[0].name == "base_r8_p24_a0.25" and points[1].name == "base_r8_p24_a1.0"
    assert points[-1].name == "base_r32_p96_a1.0"
    assert len({p.name for p in points}) == 12
    for p in points:
        assert p.config.run.name == p.name
        assert p.run_dir == tmp_path / "runs" / p.name
        assert (p.config.lora.rank, p.config.search.popsize, p.config.lora.alpha_fraction) == (
            p.values["lora.rank"],
            p.values["search.popsize"],
            p.values["lora.alpha_fraction"],
        )
        assert p.config.task.batch_size == 4 and p.config.backend.name == "fake"
        assert p.config_path == folder / "configs" / f"{p.name}.yaml"
    assert not folder.exists(), "building points writes nothing"


def test_single_run_is_one_point_named_after_the_config(tmp_path: Path) -> None:
    points, _ = S.build_points(str(REPO / "configs" / "fake_scaling.yaml"), [], [], run_dir=str(tmp_path))
    assert [(p.name, p.values) for p in points] == [("fake_scaling", {})]


def test_point_names_for_other_keys() -> None:
    assert (
        S.point_name("b", {"search.diagonal": False, "lora.adapter": "/x/sft-a/", "lora.targets": ["q_proj", "v_proj"]})
        == "b_diagonal-false_adapter-sft-a_targets-q-proj+v-proj"
    )
    assert S.point_name("b", {"search.sigma0": 0.05, "run.seed": 7, "task.batch_size": 100}) == "b_s0.05_seed7_b100"


def test_bad_point_names_the_point(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"floor\(α·r\).*sweep point \{'lora.rank': 8, 'lora.alpha_fraction': 0.1\}"):
        S.build_points(None, ["backend.name=fake"], ["lora.rank=8,32", "lora.alpha_fraction=0.1"], run_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="both get the run name 'x_adapter-a'"):
        S.build_points(None, ["backend.name=fake"], ["lora.adapter=/p/a,/q/a"], name="x", run_dir=str(tmp_path), check_paths=False)
    with pytest.raises(ConfigError, match="more than once"):
        S.expand([S.parse_sweep("lora.rank=8"), S.parse_sweep("lora.rank=16")])


# ----------------------------------------------------------------------------------------------------
# resources and small pieces


def test_resources_rank_layout() -> None:
    assert S.Resources.build(gpus_per_node=8, tp=1, nodes=2).ranks == 16
    tp4 = S.Resources.build(gpus_per_node=8, tp=4, nodes=4)
    assert (tp4.tasks_per_node, tp4.ranks) == (2, 8)
    assert S.Resources.build(tasks_per_node=4).ranks == 4
    with pytest.raises(ConfigError, match="not a multiple of --tp 3"):
        S.Resources.build(gpus_per_node=8, tp=3)
    with pytest.raises(ConfigError, match="with GPUs it is --gpus-per-node / --tp = 8"):
        S.Resources.build(gpus_per_node=8, tasks_per_node=4)
    with pytest.raises(ConfigError, match="--tp 2 needs GPUs"):
        S.Resources.build(tp=2)


@pytest.mark.parametrize(
    ("text", "minutes"), [("90", 90), ("01:30:00", 90), ("2-00:00:00", 2880), ("10:30", 11), ("1-12:00", 2160), ("00:00:01", 1)]
)
def test_parse_time(text: str, minutes: int) -> None:
    assert S.parse_time(text) == minutes


def test_format_time() -> None:
    assert (S.format_time(90), S.format_time(2880 + 61)) == ("01:30:00", "2-01:01:00")
    with pytest.raises(ConfigError):
        S.parse_time("soon")


def test_gpu_slice_matches_the_rank_wrapper() -> None:
    assert S.gpu_slice("0,1,2,3,4,5,6,7", 1, 4) == "4,5,6,7"
    assert S.gpu_slice("0,1,2,3,4,5,6,7", 3, 1) == "3"
    assert S.gpu_slice("2,3", 1, 2) is None, "exactly tp GPUs visible: SLURM bound them already"
    assert S.gpu_slice("", 0, 1) is None and S.gpu_slice(None, 0, 1) is None and S.gpu_slice("NoDevFiles", 0, 1) is None
    with pytest.raises(RuntimeError, match=r"local rank 2 needs GPUs 4\.\.5"):
        S.gpu_slice("0,1,2,3", 2, 2)


def test_forward_signal_by_mpi_flavor(fake: FakeSlurm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_RECORD", str(fake.record))
    monkeypatch.setenv("FAKE_MPI_FLAVOR", "openmpi")
    assert S.forward_signal_for(str(fake.bin / "mpirun")) == signal.SIGUSR2
    monkeypatch.setenv("FAKE_MPI_FLAVOR", "hydra")
    assert S.forward_signal_for(str(fake.bin / "mpirun")) == signal.SIGTERM
    mpiexec = BIN / "mpiexec"
    if mpiexec.exists():  # the venv's MPICH wheel: Hydra relays TERM, not USR2
        assert S.forward_signal_for(str(mpiexec)) == signal.SIGTERM


def test_checkpoint_resubmits_the_same_command() -> None:
    job = S.EssaJob(["--config", "/x.yaml"], "/runs/x", tp=2, ranks=4)
    delayed = job.checkpoint()
    assert delayed.function.argv == ["--config", "/x.yaml"] and delayed.function.restarts == 1
    assert (delayed.function.tp, delayed.function.ranks, delayed.args, delayed.kwargs) == (2, 4, (), {})
    assert pickle.loads(pickle.dumps(delayed.function)) == delayed.function


# ----------------------------------------------------------------------------------------------------
# plain sbatch scripts: golden files, and what they launch


GOLDEN_CASES = {
    "gpu_2x8_one_rank_per_gpu.sbatch": dict(
        res=S.Resources.build(gpus_per_node=8, nodes=2, cpus_per_task=8, time_min=1440, partition="gpu", account="proj-essa"),
        name="qwen32b_prm800k_r8_p48",
    ),
    "gpu_4x8_tp4.sbatch": dict(
        res=S.Resources.build(
            gpus_per_node=8, tp=4, nodes=4, cpus_per_task=16, time_min=1440, mem_gb=0, setup=("module load cuda/12.4 openmpi/4.1",)
        ),
        name="qwen72b_tp",
    ),
    "cpu_debug.sbatch": dict(
        res=S.Resources.build(tasks_per_node=4, time_min=30, signal_delay_s=60, srun_mpi="pmi2", max_requeues=5, qos="debug"),
        name="fake_scaling_p24",
        run_args=("--resume",),
    ),
}


def render_case(case: dict[str, Any]) -> str:
    name = case["name"]
    return S.render_sbatch(
        name,
        f"/scratch/runs/sweeps/base/configs/{name}.yaml",
        case["res"],
        essa_home="/opt/essa_hpc",
        run_dir="/scratch/runs",
        python="/opt/venv/bin/python",
        log_dir="/scratch/runs/sweeps/base/logs",
        run_args=case.get("run_args", ()),
    )


@pytest.mark.parametrize("golden", sorted(GOLDEN_CASES))
def test_render_sbatch_golden(golden: str, tmp_path: Path) -> None:
    text = render_case(GOLDEN_CASES[golden])
    check_golden(golden, text)
    script = tmp_path / golden
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    exe = shellcheck_exe()
    if exe is not None:
        r = subprocess.run([exe, "-s", "bash", "-e", "SC1091", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def test_rendered_script_launches_its_point(fake: FakeSlurm, tmp_path: Path) -> None:
    points, _ = S.build_points(str(REPO / "configs" / "fake_scaling.yaml"), TINY, ["search.popsize=4,8"], run_dir=str(tmp_path / "runs"))
    p = points[1]
    S.write_config(p)
    res = S.Resources.build(gpus_per_node=4, tp=2, nodes=1)
    script = tmp_path / "p.sbatch"
    script.write_text(S.render_sbatch(p.name, p.config_path, res, REPO, p.config.run.dir, fake.python, tmp_path, ["--resume"]))
    env = fake.env(
        SLURM_JOB_ID="77",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_GPUS_ON_NODE="4",
        CUDA_VISIBLE_DEVICES="0,1,2,3",
        ESSA_MODEL="/stray/model",
        ESSA_RUN_NAME="stray",
    )
    r = subprocess.run(["bash", str(script), "--set", "run.generations=9"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--ntasks=2" in fake.calls("srun")[0]["argv"]
    calls = python_calls(fake)
    assert sorted(c["env"]["CUDA_VISIBLE_DEVICES"] for c in calls) == ["0,1", "2,3"]
    argv = calls[0]["argv"]
    assert argv[2:4] == ["--config", str(p.config_path)]
    assert sets(argv) == [f"run.dir={tmp_path / 'runs'}", f"run.name={p.name}", "backend.tensor_parallel_size=2", "run.generations=9"]
    assert argv[-3:] == ["--resume", "--set", "run.generations=9"]
    # the config the job reads is the point's, and loads as is
    assert load_config(p.config_path).search.popsize == 8


# ----------------------------------------------------------------------------------------------------
# the command line


def test_cli_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = S.main(
        [
            "--config",
            str(REPO / "configs" / "qwen7b_gsm8k_8gpu.yaml"),
            "--no-check-paths",
            "--gpus-per-node",
            "8",
            "--run-dir",
            str(tmp_path / "runs"),
            "--sweep",
            "lora.rank=16,32",
            "--sweep",
            "search.popsize=24,48,96",
            "--cluster",
            "sbatch",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "6 run(s) on cluster sbatch" in out and "1 node(s) x 8 rank(s) = 8 rank(s)" in out
    assert "qwen7b_gsm8k_r32_p96" in out and "#SBATCH --gpus-per-node=8" in out
    assert not (tmp_path / "runs").exists()


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert S.main(["--sweep", "search.popsiz=4", "--cluster", "local", "--run-dir", str(tmp_path)]) == 2
    assert "did you mean search.popsize" in capsys.readouterr().err
    assert S.main(["--gpus-per-node", "8", "--tp", "3", "--cluster", "local", "--run-dir", str(tmp_path)]) == 2
    assert S.main(["--time", "later", "--cluster", "local", "--run-dir", str(tmp_path)]) == 2
    assert not (tmp_path / "sweeps").exists()


def test_cli_without_slurm_asks_for_a_cluster(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun (the slurm tier may have installed one in /usr/bin)
    assert S.main(["--run-dir", "/nonexistent"]) == 2
    assert "use --cluster local" in capsys.readouterr().err


def test_cli_sbatch_cluster_submits_scripts_and_indexes_them(fake: FakeSlurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in fake.env().items():
        monkeypatch.setenv(k, v)
    rc = S.main(
        [
            "--config",
            str(REPO / "configs" / "fake_scaling.yaml"),
            "--run-dir",
            str(tmp_path / "runs"),
            "--cluster",
            "sbatch",
            "--sweep",
            "search.popsize=24,48",
            "--tasks-per-node",
            "4",
            "--time",
            "30",
            "--setup",
            "module load mpi",
        ]
    )
    assert rc == 0
    folder = tmp_path / "runs" / "sweeps" / "fake_scaling"
    subs = fake.calls("sbatch")
    assert [Path(c["argv"][-1]).name for c in subs] == ["fake_scaling_p24.sbatch", "fake_scaling_p48.sbatch"]
    assert "export ESSA_CONFIG=" + str(folder / "configs" / "fake_scaling_p48.yaml") in subs[1]["script"]
    assert "#SBATCH --ntasks-per-node=4" in subs[0]["script"] and "module load mpi" in subs[0]["script"]
    index = yaml.safe_load((folder / "sweep.json").read_text())["points"]
    assert [(r["name"], r["job_id"], r["point"]) for r in index] == [
        ("fake_scaling_p24", "4242", {"search.popsize": 24}),
        ("fake_scaling_p48", "4242", {"search.popsize": 48}),
    ]
    assert load_config(index[0]["config"]).search.popsize == 24
    csv_lines = (folder / "sweep.csv").read_text().splitlines()
    assert csv_lines[0].startswith("index,name,job_id") and len(csv_lines) == 3
    assert (folder / "logs").is_dir()


def test_cli_slurm_cluster_goes_through_submitit(fake: FakeSlurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in fake.env().items():
        monkeypatch.setenv(k, v)
    rc = S.main(
        [
            "--config",
            str(REPO / "configs" / "qwen72b_tp.yaml"),
            "--no-check-paths",
            "--run-dir",
            str(tmp_path / "runs"),
            "--gpus-per-node",
            "8",
            "--nodes",
            "4",
            "--time",
            "24:00:00",
            "--partition",
            "gpu",
            "--no-wait",
            "--sweep",
            "search.popsize=24,48",
            "--setup",
            "module load openmpi",
        ]
    )
    assert rc == 0
    (sub,) = fake.calls("sbatch")  # a sweep is one job array
    script = sub["script"]
    for line in (
        "#SBATCH --signal=USR2@300",
        "#SBATCH --requeue",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --gpus-per-task=4",
        "#SBATCH --nodes=4",
        "#SBATCH --time=1440",
        "#SBATCH --partition=gpu",
        "#SBATCH --array=0-1%2",
        "module load openmpi",
        "--mpi=pmix",
    ):
        assert line in script, line
    index = yaml.safe_load((tmp_path / "runs" / "sweeps" / "qwen72b_tp" / "sweep.json").read_text())["points"]
    assert [r["job_id"] for r in index] == ["4242_0", "4242_1"]
    assert load_config(index[1]["config"], check_paths=False).backend.tensor_parallel_size == 4


def test_local_cluster_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = S.main(
        [
            "--config",
            str(REPO / "configs" / "fake_scaling.yaml"),
            "--cluster",
            "local",
            "--run-dir",
            str(tmp_path / "runs"),
            "--name",
            "loc",
            "--time",
            "10",
            *(a for s in TINY for a in ("--set", s)),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    with h5py.File(tmp_path / "runs" / "loc" / "log.h5", "r") as f:
        assert f["gen/rewards"].shape == (3, 6)
    index = yaml.safe_load((tmp_path / "runs" / "sweeps" / "loc" / "sweep.json").read_text())["points"]
    assert index[0]["exit_code"] == 0 and index[0]["cluster"] == "local"


@pytest.mark.mpi
def test_debug_cluster_two_ranks_under_mpiexec(tmp_path: Path) -> None:
    if not (BIN / "mpiexec").exists():
        pytest.skip("no mpiexec in the venv")
    points, folder = S.build_points(str(REPO / "configs" / "fake_scaling.yaml"), TINY, [], run_dir=str(tmp_path))
    (rec,) = S.submit(points, S.Resources.build(tasks_per_node=2, time_min=10), "debug", folder)
    assert rec.exit_code == 0
    with h5py.File(points[0].run_dir / "log.h5", "r") as f:
        assert f.attrs["world_size"] == 2


def test_tasks_without_mpi_fall_back_to_one_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in [k for k in os.environ if k.startswith(("PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPI_LOCAL"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    points, _ = S.build_points(str(REPO / "configs" / "fake_scaling.yaml"), TINY, [], run_dir=str(tmp_path))
    job = S.EssaJob(S.run_argv(points[0]), str(points[0].run_dir))
    S.write_config(points[0])
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert job() == {"exit_code": 0, "rank": 2, "run_dir": str(points[0].run_dir), "idle": True}
    assert not points[0].run_dir.exists()
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert job()["exit_code"] == 0
    assert "Falling back to ONE rank on task 0" in capsys.readouterr().err
    assert (points[0].run_dir / "log.h5").exists()


# ----------------------------------------------------------------------------------------------------
# preemption through submitit: the run exits 75, submitit's handler checkpoints and requeues


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def wait_text(path_glob: Any, text: str, timeout: float = 240) -> Path:
    t0 = time.time()
    while time.time() - t0 < timeout:
        for p in path_glob():
            if text in p.read_text(errors="replace"):
                return p
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared")


def test_local_executor_preempt_checkpoint_requeue_resume(tmp_path: Path) -> None:
    gens = 30
    points, folder = S.build_points(
        str(REPO / "configs" / "fake_scaling.yaml"),
        [*TINY, f"run.generations={gens}", "backend.fake_sleep_s=0.005", "eval.every=0", "log.checkpoint_every=100"],
        [],
        run_dir=str(tmp_path),
    )
    res = S.Resources.build(time_min=10)
    ex = S.make_executor("local", folder, res, "essa-test")
    S.write_config(points[0])
    job = ex.submit(S.EssaJob(S.run_argv(points[0]), str(points[0].run_dir)))
    try:
        log = wait_text(lambda: (folder / "submitit").glob("*_0_log.out"), "gen    2/")
        (task,) = children(job._process.pid)
        os.kill(task, signal.SIGUSR2)  # what SLURM does before the time limit
        (result,) = job.results()
    finally:
        job.cancel()
    text = log.read_text()
    assert "exit 75 (requeue)" in text and "Calling checkpoint method" in text
    assert "resuming at generation" in text
    assert result["exit_code"] == 0 and result["restarts"] == 1
    with h5py.File(points[0].run_dir / "log.h5", "r") as f:
        assert f["gen/rewards"].shape == (gens, 6)


def rank_pids(folder: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd[1:4] == [b"-u", b"-m", b"submitit.core._submit"] and str(folder).encode() in cmd:  # the ranks
                pids.append(int(proc.name))
    return pids


@pytest.mark.mpi
def test_slurm_executor_on_emulated_slurm_two_ranks_preempted_and_requeued(
    fake: FakeSlurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """submitit's own sbatch script, run by a fake sbatch; its `srun` starts 2 tasks over the venv's real
    mpiexec (PMI variables, so mpi4py spans both); USR2 to both ranks as SLURM would; rank 0 requeues
    through submitit (`scontrol requeue`, emulated by rerunning the script), and the run resumes."""
    if not (BIN / "mpiexec").exists():
        pytest.skip("no mpiexec in the venv")
    gens = 30
    for k, v in fake.env(FAKE_SBATCH_EXEC="1", FAKE_SRUN_MODE="mpiexec", FAKE_MPIEXEC=str(BIN / "mpiexec")).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    points, folder = S.build_points(
        str(REPO / "configs" / "fake_scaling.yaml"),
        [*TINY, f"run.generations={gens}", "backend.fake_sleep_s=0.01", "eval.every=0", "log.checkpoint_every=100"],
        [],
        run_dir=str(tmp_path / "runs"),
    )
    res = S.Resources.build(tasks_per_node=2, time_min=60, srun_mpi="pmi2")
    (rec,) = S.submit(points, res, "slurm", folder, wait=False)
    assert rec.job_id == "4242"
    sub_folder = folder / "submitit"
    try:
        wait_text(lambda: sub_folder.glob("4242_0_log.out"), "gen    2/")
        pids = rank_pids(sub_folder)
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGUSR2)
        wait_text(lambda: sub_folder.glob("4242_0_log.out"), "essa-run: done.", timeout=300)
        wait_text(lambda: sub_folder.glob("4242_0_result.pkl"), "", timeout=60)
    finally:
        for pid in rank_pids(sub_folder):
            os.kill(pid, signal.SIGKILL)
    log = (sub_folder / "4242_0_log.out").read_text()
    assert "2 rank(s)" in log, "mpi4py spans both srun tasks"
    assert "exit 75 (requeue)" in log and "Requeued job 4242" in log and "resuming at generation" in log
    assert [c["argv"] for c in fake.calls("scontrol")] == [["requeue", "4242"]]
    ok, result = pickle.loads((sub_folder / "4242_0_result.pkl").read_bytes())
    assert ok == "success" and result["exit_code"] == 0 and result["restarts"] == 1
    with h5py.File(points[0].run_dir / "log.h5", "r") as f:
        assert f["gen/rewards"].shape == (gens, 6) and f.attrs["world_size"] == 2
    assert sys.executable  # the jobs ran this interpreter (submitit's default python)
