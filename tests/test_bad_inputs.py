"""Hostile inputs and faults: every case ends with a known exit status, a message with the right words,
and what must survive on disk untouched: no hang, no traceback, no silent loss (docs/design.md,
"Faults and hostile inputs").

``CASES`` is the table future changes extend: a case is a command line of one of the tools
(``essa_hpc.run`` on the fake backend, ``essa_hpc.evaluate``, ``analysis.report``), a setup that
prepares the files it meets (a finished two-generation run, a damaged log, a foreign checkpoint...),
the exit status, the words stdout+stderr must contain, and the files that must be byte-identical
afterwards (or still absent). The tools run in this process, through their ``main`` (the same code
as the command line, without an interpreter start per case); the faults that need a process of their
own (signals, SIGKILL, another rank count under mpiexec) are the subprocess tests below the table.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from essa_hpc import exit_codes

from .conftest import REPO, cli_env, run_cli

RUN = "r"  # the run name every case uses; its directory is <tmp>/runs/r


def fake(*extra: str, generations: int = 2) -> list[str]:
    """essa-run arguments of a tiny fake-backend run in <tmp>/runs/r (the tmp folder is substituted)."""
    sets = [
        "backend.name=fake",
        "task.name=fake",
        "backend.fake_dim=4",
        "task.batch_size=2",
        "search.popsize=4",
        "eval.size=2",
        "eval.every=0",
        f"run.generations={generations}",
        "run.dir={tmp}/runs",
        f"run.name={RUN}",
    ]
    out: list[str] = []
    for s in sets:
        out += ["--set", s]
    return out + list(extra)


# ----------------------------------------------------------------------------------------------------
# setups: each prepares <tmp> from a finished two-generation run (BASE) or from nothing


def finished(tmp: Path) -> None:
    """A finished two-generation run (checkpoint at generation 2) in <tmp>/runs/r."""
    shutil.copytree(BASE["dir"], tmp / "runs" / RUN)


def truncated_log(tmp: Path) -> None:
    finished(tmp)
    log = tmp / "runs" / RUN / "log.h5"
    os.truncate(log, log.stat().st_size // 2)  # a full disk or a node lost mid-write


def garbage_log(tmp: Path) -> None:
    finished(tmp)
    (tmp / "runs" / RUN / "log.h5").write_bytes(os.urandom(4096))


def foreign_log(tmp: Path) -> None:
    """Valid HDF5, but not a run log."""
    finished(tmp)
    with h5py.File(tmp / "runs" / RUN / "log.h5", "w") as f:
        f["x"] = np.arange(3)


def deleted_log(tmp: Path) -> None:
    finished(tmp)
    (tmp / "runs" / RUN / "log.h5").unlink()


def two_rank_log(tmp: Path) -> None:
    """The log says two ranks wrote it (as a run under mpiexec -n 2 would); this job has one."""
    finished(tmp)
    with h5py.File(tmp / "runs" / RUN / "log.h5", "r+", libver="latest") as f:
        f.attrs["world_size"] = 2


def list_checkpoint(tmp: Path) -> None:
    finished(tmp)
    (tmp / "runs" / RUN / "checkpoints" / "latest.pkl").write_bytes(pickle.dumps([1, 2, 3]))


def garbage_checkpoint(tmp: Path) -> None:
    finished(tmp)
    (tmp / "runs" / RUN / "checkpoints" / "latest.pkl").write_bytes(b"\x80\x05garbage")


def non_utf8_config(tmp: Path) -> None:
    (tmp / "c.yaml").write_bytes(b"run:\n  name: caf\xe9\n")


def config_folder(tmp: Path) -> None:
    (tmp / "c.yaml").mkdir()


def huge_float_yaml(tmp: Path) -> None:
    (tmp / "c.yaml").write_text("search:\n  sigma0: 1e400\n")


def scientific_yaml(tmp: Path) -> None:
    (tmp / "c.yaml").write_text("search:\n  sigma0: 3e-1\nsft:\n  learning_rate: 2e-4\ntask:\n  failure_reward: -1E0\n")


def out_is_a_file(tmp: Path) -> None:
    finished(tmp)
    (tmp / "report").write_text("a file")


def killed_writer_log(tmp: Path) -> None:
    """A log whose writer died by SIGKILL: its "open for write" flag is still set."""
    (tmp / "runs" / RUN).mkdir(parents=True)
    shutil.copy(BASE["killed"], tmp / "runs" / RUN / "log.h5")


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]
    code: int
    words: tuple[str, ...]
    setup: Callable[[Path], None] | None = None
    untouched: tuple[str, ...] = ()  # paths under <tmp>: byte-identical afterwards, or still absent
    tool: str = "run"  # run | evaluate | report


LOG, CKPT = f"runs/{RUN}/log.h5", f"runs/{RUN}/checkpoints/latest.pkl"
PLUGIN = "task.plugins=[tests.bad_plugins:{}]"

CASES = [
    # --- config files and values
    Case("config-not-utf8", ["--config", "{tmp}/c.yaml", *fake()], 2, ("--config", "not UTF-8", "0xe9"), non_utf8_config, ("runs",)),
    Case("config-is-a-folder", ["--config", "{tmp}/c.yaml", *fake()], 2, ("--config", "is a folder"), config_folder, ("runs",)),
    Case("float-1e400-set", fake("--set", "search.sigma0=1e400"), 2, ("search.sigma0", "finite", "1e400", "range"), None, ("runs",)),
    Case("float-1e400-yaml", ["--config", "{tmp}/c.yaml", *fake()], 2, ("search.sigma0", "finite", "range"), huge_float_yaml, ("runs",)),
    Case("float-nan", fake("--set", "search.sigma0=.nan"), 2, ("search.sigma0", "finite"), None, ("runs",)),
    Case("scientific-set", fake("--set", "search.sigma0=3e-1", "--set", "run.generations=1e0"), 0, ("done",)),
    Case("scientific-yaml", ["--config", "{tmp}/c.yaml", *fake()], 0, ("done",), scientific_yaml),
    Case("run-name-dotdot", fake("--set", "run.name=.."), 2, ("run.name", "'..'"), None, ("runs/config.yaml", "runs/log.h5", "config.yaml")),  # noqa: E501
    Case("run-name-dot", fake("--set", "run.name=."), 2, ("run.name",), None, ("runs/config.yaml", "runs/log.h5")),
    Case("target-metric-typo", fake("--set", "run.target_metric=mean_rewrd", "--set", "run.target_value=0"), 2,
         ("run.target_metric", "mean_rewrd", "mean_reward"), None, ("runs",)),
    Case("adapter-on-fake", fake("--set", "lora.adapter={tmp}"), 0, ("warning: lora.adapter=", "is ignored", "backend.name=fake")),
    Case("max-failed-negative", fake("--set", "task.max_failed_generations=-1"), 2, ("task.max_failed_generations",), None, ("runs",)),
    # --- the run directory: never lose work silently
    Case("overwrite-resumable-run", fake("--set", "run.overwrite=true"), 2, ("run.overwrite", "resumable", "generation 2"), finished, (LOG, CKPT)),  # noqa: E501
    Case("resume-changed-key-named", fake("--set", "search.popsize=5"), 2, ("another configuration", "search.popsize", "4 -> 5"), finished,
         (LOG, CKPT)),
    Case("resume-cosmetic-keys", fake("--set", "log.progress=false", "--set", "log.checkpoint_every=3", generations=3), 0,
         ("resuming at generation 2", "done"), finished),
    Case("resume-deleted-log", fake(generations=3), 2, ("log.h5 is missing", "generation 2", "row 0"), deleted_log, (CKPT, LOG)),
    Case("resume-truncated-log", fake(generations=3), 2, ("log.h5", "truncated"), truncated_log, (LOG, CKPT, LOG + ".resume")),
    Case("resume-garbage-log", fake(generations=3), 2, ("log.h5", "not an HDF5 file"), garbage_log, (LOG, CKPT, LOG + ".resume")),
    Case("resume-foreign-log", fake(generations=3), 2, ("log.h5", "not an essa_hpc run log"), foreign_log, (LOG, CKPT)),
    Case("resume-other-rank-count", fake(generations=3), 2, ("written by 2 rank(s)", "this job has 1"), two_rank_log, (LOG, CKPT)),
    Case("checkpoint-wrong-type", fake(generations=3), 2, ("latest.pkl", "not an essa_hpc checkpoint", "list"), list_checkpoint, (LOG, CKPT)),  # noqa: E501
    Case("checkpoint-garbage", fake(generations=3), 2, ("latest.pkl", "unreadable checkpoint", "previous.pkl"), garbage_checkpoint,
         (LOG, CKPT)),
    Case("resume-without-checkpoint", fake("--resume"), 2, ("--resume", "no checkpoint"), None, ("runs/r",)),
    # --- rewards: a plugin never crashes a run, and never fails silently
    Case("reward-huge-finite", fake("--set", PLUGIN.format("huge"), "--set", "task.max_failed_generations=0"), 0,
         ("reward failures 8/8", "beyond", "dist.reward_limit", "first distinct errors")),
    Case("reward-huge-sigma0", fake("--set", "search.sigma0=1e5", "--set", "task.max_failed_generations=2", generations=5), 1,
         ("beyond", "every reward failed in 2 generation(s)", "task.max_failed_generations", "exit 1"), None),
    Case("reward-raises", fake("--set", PLUGIN.format("raises"), generations=4), 1,
         ("reward failures 8/8", "raised RuntimeError: boom", "every reward failed in 3 generation(s)", "checkpointed"), None),
    Case("reward-nan", fake("--set", PLUGIN.format("nan"), "--set", "task.max_failed_generations=0"), 0,
         ("reward failures 8/8", "is nan", "first distinct errors")),
    Case("reward-wrong-length", fake("--set", PLUGIN.format("short"), "--set", "task.max_failed_generations=1"), 1,
         ("returned 7 rewards for 8 completions", "every reward failed in 1 generation(s)")),
    Case("reward-timeout", fake("--set", PLUGIN.format("slow"), "--set", "task.reward_timeout_s=0.05", "--set", "task.max_failed_generations=0",  # noqa: E501
                                generations=1), 0, ("reward failures 8/8 (8 timeouts)", "timed out after 0.05 s")),
    Case("reward-some-fail", fake("--set", PLUGIN.format("half"), generations=2), 0, ("reward failures 4/8", "is None", "done")),
    # --- essa-evaluate and analysis.report
    Case("evaluate-size-0", ["--size", "0"], 2, ("--size 0 (eval.size)", ">= 1"), None, (), "evaluate"),
    Case("report-out-is-a-file", [LOG, "--out", "{tmp}/report"], 2, ("--out", "is a file"), out_is_a_file, ("report",), "report"),
    Case("report-truncated-log", [LOG, "--out", "{tmp}/rep"], 2, ("truncated",), truncated_log, (LOG, "rep"), "report"),
    Case("report-garbage-log", [LOG, "--out", "{tmp}/rep"], 2, ("not an HDF5 file",), garbage_log, (LOG, "rep"), "report"),
    Case("report-killed-writer", [LOG, "--out", "{tmp}/rep"], 0, ("1 run(s)",), killed_writer_log, (LOG,), "report"),
]  # fmt: skip


def snapshot(tmp: Path, paths: tuple[str, ...]) -> dict[str, str | None]:
    """sha256 of each file (a folder: of its listing and files), None where absent."""
    out: dict[str, str | None] = {}
    for rel in paths:
        p = tmp / rel
        if not p.exists():
            out[rel] = None
        elif p.is_dir():
            h = hashlib.sha256()
            for q in sorted(p.rglob("*")):
                h.update(str(q.relative_to(p)).encode())
                if q.is_file():
                    h.update(q.read_bytes())
            out[rel] = h.hexdigest()
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def invoke(tool: str, argv: list[str]) -> int:
    if tool == "run":
        from essa_hpc.run import main
    elif tool == "evaluate":
        from essa_hpc.evaluate import main
    else:
        from essa_hpc.analysis.report import main
    return int(main(argv))


BASE: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def base_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One finished two-generation run, and one log whose writer was killed, that the setups copy."""
    root = tmp_path_factory.mktemp("base")
    argv = [a.replace("{tmp}", str(root)) for a in fake("--set", "log.progress=false")]
    assert invoke("run", argv) == 0
    BASE["dir"] = root / "runs" / RUN
    killed = root / "killed.h5"
    code = (
        "import os, signal, numpy as np\n"
        "from essa_hpc.runlog import RunLog\n"
        f"log = RunLog({str(killed)!r}, config_json='{{}}', world_size=1, hostnames=['h'], popsize=4,"
        " solution_length=3, metrics=['mean_reward'])\n"
        "for g in range(2):\n"
        "    log.append_generation(rewards=np.zeros(4), seeds=np.arange(4, dtype=np.uint64), sigma=1.0, wall_time=g,"
        " timings=np.zeros((1, 8)),"
        " tokens=np.ones(1, dtype=np.int64), failures=0, timeouts=0, digest=b'0' * 16)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    BASE["killed"] = killed


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if case.setup is not None:
        case.setup(tmp_path)
    before = snapshot(tmp_path, case.untouched)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in case.argv]
    cwd = os.getcwd()
    os.chdir(tmp_path)  # relative paths (the report's log) are the case's own
    try:
        code = invoke(case.tool, argv)
    finally:
        os.chdir(cwd)
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == case.code, text
    assert "Traceback" not in text, text
    missing = [w for w in case.words if w not in text]
    assert not missing, f"{missing} not in:\n{text}"
    assert snapshot(tmp_path, case.untouched) == before, f"{case.untouched} changed"
    if case.code == exit_codes.BAD_INPUT:
        assert len(out.err.strip().splitlines()) == 1, out.err  # one line on stderr


# ----------------------------------------------------------------------------------------------------
# faults that need a process of their own


def _start(tmp: Path, *extra: str) -> subprocess.Popen[str]:
    argv = [a.replace("{tmp}", str(tmp)) for a in fake(*extra, generations=100000)]
    return subprocess.Popen(
        [sys.executable, "-m", "essa_hpc.run", *argv], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(pred: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 300) -> None:
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "timed out waiting for the run"
        time.sleep(0.1)


def test_sigint_checkpoints_and_exits_interrupted(tmp_path: Path) -> None:
    """Ctrl-C of a single-rank run is an interruption like SIGTERM: checkpoint, exit 130, resumable."""
    proc = _start(tmp_path, "--set", "backend.fake_sleep_s=0.05", "--set", "log.checkpoint_every=1000")
    ckpt = tmp_path / "runs" / RUN / "checkpoints" / "latest.pkl"
    try:
        _wait_for(ckpt.exists, proc)  # the generation-0 checkpoint: the loop is running
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == exit_codes.INTERRUPTED, err
    assert "interrupted (SIGINT); checkpointed at generation" in out and "Traceback" not in err
    with open(ckpt, "rb") as fh:
        assert pickle.load(fh)["gen"] >= 1


def test_second_stop_signal_ends_a_stuck_run_at_once(tmp_path: Path) -> None:
    """A reward that hangs: the first SIGTERM asks for a checkpoint at the generation's end, which never
    comes; the second ends the process at once with the requeue status."""
    proc = _start(tmp_path, "--set", PLUGIN.format("stuck"), "--set", "task.reward_timeout_s=600")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the run's first line: setup is done, the handlers are in place
        assert line.startswith("essa-run:"), line
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == exit_codes.REQUEUE, err
    assert "second stop signal (SIGTERM)" in err


def test_killed_writer_log_opens_in_the_tools() -> None:
    """After SIGKILL a plain h5py open fails ("already open for write"); the tools' readers do not."""
    from essa_hpc.analysis.load import read_run
    from essa_hpc.runlog import open_live, swmr_writer_flag

    path = BASE["killed"]
    assert swmr_writer_flag(path)
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r")
    with open_live(path) as f:
        assert f["gen/sigma"].shape[0] == 2
    assert read_run(path).meta["generations"] == 2


@pytest.mark.mpi
def test_resume_under_another_rank_count_rewrites_nothing(tmp_path: Path) -> None:
    finished(tmp_path)
    before = snapshot(tmp_path, (LOG, CKPT, f"runs/{RUN}/config.yaml"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in fake(generations=3)]
    r = run_cli(argv, REPO, ranks=2)
    assert r.returncode == exit_codes.BAD_INPUT, r.stderr
    assert "written by 1 rank(s), this job has 2" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(tmp_path, (LOG, CKPT, f"runs/{RUN}/config.yaml")) == before


# ----------------------------------------------------------------------------------------------------
# the pieces behind the table, as unit tests


@pytest.mark.parametrize(
    "override,key,value",
    [
        ("search.sigma0=1e-3", "sigma0", 1e-3),
        ("search.sigma0=2E-4", "sigma0", 2e-4),
        ("search.sigma0=+5.e-1", "sigma0", 0.5),
        ("run.target_value=-1e-2", "target_value", -0.01),
        ("task.plugin_weights=[1e-1]", "plugin_weights", [0.1]),
        ("run.generations=1e3", "generations", 1000),
    ],
)
def test_scientific_notation_everywhere(override: str, key: str, value: object) -> None:
    from essa_hpc.config import load_config

    extra = ["task.plugins=[tests.bad_plugins:half]"] if "plugin_weights" in override else []
    extra += ["run.target_metric=accuracy"] if "target_value" in override else []
    cfg = load_config(overrides=[override, *extra], check_paths=False)
    section = {"sigma0": cfg.search, "target_value": cfg.run, "plugin_weights": cfg.task, "generations": cfg.run}[key]
    assert getattr(section, key) == value


def test_scientific_notation_in_yaml_and_sweeps(tmp_path: Path) -> None:
    from essa_hpc.config import load_config
    from essa_hpc.sweep import parse_sweep

    scientific_yaml(tmp_path)
    cfg = load_config(tmp_path / "c.yaml", check_paths=False)
    assert (cfg.search.sigma0, cfg.sft.learning_rate, cfg.task.failure_reward) == (0.3, 2e-4, -1.0)
    key, values = parse_sweep("search.sigma0=1e-1,3e-1")
    assert [cfg.replace(**{key: v}).search.sigma0 for v in values] == [0.1, 0.3]
    again = load_config(overrides=[], check_paths=False).replace(**{"sft.learning_rate": "5e-4"})
    assert again.sft.learning_rate == 5e-4


@pytest.mark.parametrize("value", ["1e400", "-1e400", ".inf", ".nan", str(10**400)])
def test_non_finite_floats_are_refused(value: str) -> None:
    from essa_hpc.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"search\.sigma0: expected a finite number"):
        load_config(overrides=[f"search.sigma0={value}"], check_paths=False)


def test_digest_ignores_cosmetic_keys_and_old_checkpoints_resume(tmp_path: Path) -> None:
    import json

    from essa_hpc import checkpoint
    from essa_hpc.config import ADDED_SINCE_FIRST_RELEASE, Config, digest_diff

    # the first release's defaults: its 3-step SFT warm start, and the full CMA mean step of before search.cmean
    # and its sep-CMA with λ 16 × 16 prompts
    a = Config().replace(
        **{
            "sft.steps": 3,
            "sft.learning_rate": 2e-3,
            "search.cmean": 1.0,
            "search.diagonal": True,
            "search.popsize": 16,
            "task.batch_size": 16,
        }
    )
    for key, value in (("log.progress", False), ("run.dir", "/elsewhere"), ("run.name", "moved"), ("log.checkpoint_every", 7)):
        assert a.replace(**{key: value}).digest() == a.digest(), key
    assert a.replace(**{"search.sigma0": 0.5}).digest() != a.digest()
    # the digest older versions wrote: the dict without grpo and the four stop keys, and without the keys added since
    d = a.to_dict()
    d.pop("grpo")
    for sec, name in (("run", "generations"), ("run", "time_budget_s"), ("run", "train_budget_s"), ("run", "overwrite")):
        d[sec].pop(name)
    for key in ADDED_SINCE_FIRST_RELEASE:
        d[key.split(".")[0]].pop(key.split(".")[1], None)
    old = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    assert a.legacy_digest() == old
    # golden: the first release (commit 9cb55ed) wrote these digests for the defaults and for one changed config
    assert a.legacy_digest() == "77c3821f2381b6e9"
    assert a.replace(**{"search.sigma0": 0.5, "task.batch_size": 32}).legacy_digest() == "056eaf9ecd001190"
    assert a.replace(**{"search.space": "lowrank", "search.optimizer": "es"}).legacy_digest() is None  # a new key set: not an old run
    assert a.replace(**{"search.cmean": 0.5}).legacy_digest() is None  # pycma's c_m was 1 before the key existed
    assert Config().legacy_digest() != a.legacy_digest()  # today's defaults train another SFT: not an old default run
    checkpoint.save(tmp_path, {"gen": 1, "config_digest": old})
    assert checkpoint.load(tmp_path, a.digest(), accept=(a.legacy_digest(),))["gen"] == 1
    assert digest_diff(a.to_dict(), a.replace(**{"search.popsize": 5, "log.progress": False}).to_dict()) == "search.popsize: 16 -> 5"


def test_hdf5_superblock_checks(tmp_path: Path) -> None:
    from essa_hpc.runlog import LogFileError, check_file, hdf5_problem, swmr_writer_flag

    good = BASE["dir"] / "log.h5"
    assert hdf5_problem(good) is None and not swmr_writer_flag(good)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size - 1])
    assert "truncated" in str(hdf5_problem(cut))
    with pytest.raises(LogFileError, match="truncated"):
        check_file(cut, live_retries=0)
    (tmp_path / "empty.h5").write_bytes(b"")
    (tmp_path / "text.h5").write_text("hello")
    for name in ("empty.h5", "text.h5"):
        assert "not an HDF5 file" in str(hdf5_problem(tmp_path / name))
    assert "is a folder" in str(hdf5_problem(tmp_path))
    (tmp_path / "head.h5").write_bytes(good.read_bytes()[:20])  # cut inside the superblock itself
    assert "superblock" in str(hdf5_problem(tmp_path / "head.h5"))


def test_reward_limit_is_independent_of_the_dealing() -> None:
    from essa_hpc import dist

    assert dist.reward_limit(16) == dist.reward_limit(512) == 2.0**20
    assert dist.reward_limit(4096) == 2.0**29 / 4096
    for batch in (1, 16, 512, 4096):
        limit = dist.reward_limit(batch)
        dist.to_fixed(np.full(batch, limit * 0.999))  # a whole minibatch at the limit sums without overflow


def test_failure_tally_stops_only_after_consecutive_all_failed_generations() -> None:
    from essa_hpc.run import FailureTally

    t = FailureTally(8)
    for failures, stop in ((8, False), (8, False), (3, False), (8, False), (8, False), (8, True)):
        t.add(failures, [["a: boom"], ["a: boom", "b: nan"]] if failures else [])
        assert t.stop_due(3) is stop
        assert not t.stop_due(0)
    assert t.errors == ["a: boom", "b: nan"]
    assert "43 of 48 completions in 6 of 6 generation(s)" in t.summary(6)[0]
