"""Offline analysis (analysis/): loading logs into tables (also live ones, SWMR), the derived numbers,
and the report command on logs written by the real run loop under real mpiexec at 1, 2 and 4 ranks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

# the analysis extra (pip install 'essa_hpc[analysis]'); without it this module is skipped, saying so
pd = pytest.importorskip("pandas", reason="the offline analysis needs the analysis extra: pip install 'essa_hpc[analysis]'")
pytest.importorskip("matplotlib", reason="the offline analysis needs the analysis extra: pip install 'essa_hpc[analysis]'")

from essa_hpc.analysis import latency, report  # noqa: E402
from essa_hpc.analysis.load import (  # noqa: E402
    LogError,
    find_logs,
    load_runs,
    overhead_share,
    read_run,
    throughput,
    time_to_target,
    tokens_per_sample,
)
from essa_hpc.dist import PHASES  # noqa: E402
from essa_hpc.runlog import RunLog  # noqa: E402

from .conftest import REPO, cli_env, run_cli  # noqa: E402

K = len(PHASES)
IX = {p: i for i, p in enumerate(PHASES)}


# ----------------------------------------------------------------------------------------------------
# synthetic logs written with the real writer (essa_hpc.runlog.RunLog)


def synth_log(
    path: Path, *, world: int = 2, lam: int = 6, gens: int = 5, batch: int = 3, finish: bool = True, name: str | None = None
) -> dict[str, np.ndarray]:
    """A log with known content: generate = 0.01 s per sample, 1 token per sample, late phases known."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = {
        "run": {"name": name or path.parent.name, "dir": str(path.parent.parent)},
        "task": {"name": "fake", "batch_size": batch},
        "backend": {"name": "fake"},
        "search": {"popsize": lam},
        "eval": {"k": 1, "every": 2},
    }
    log = RunLog(
        path,
        config_json=json.dumps(cfg),
        world_size=world,
        hostnames=[f"node{r // 2}" for r in range(world)],
        popsize=lam,
        solution_length=4,
        metrics=["accuracy", "mean_reward"],
    )
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(gens, lam))
    per_rank = lam * batch / world
    early = np.zeros((world, K))
    early[:, IX["generate"]] = per_rank * 0.01
    early[:, IX["reward"]] = 0.002
    early[:, IX["other"]] = 0.001
    late = np.zeros((world, K))
    late[:, IX["allgather"]], late[:, IX["tell"]], late[:, IX["log"]] = 0.003, 0.001, 0.001
    late_eval = late.copy()
    late_eval[:, IX["eval"]] = 0.05
    wall = 2.0 + np.cumsum(np.full(gens, 0.1))
    log.append_eval(0, 1.5, {"accuracy": 0.1, "mean_reward": -1.0})
    prev = None
    for g in range(gens):
        log.append_generation(
            rewards=rewards[g],
            seeds=np.arange(lam, dtype=np.uint64) + g,
            sigma=0.5 * 0.9**g,
            wall_time=wall[g],
            timings=early,
            tokens=np.full(world, int(per_rank)),
            failures=g % 2,
            timeouts=0,
            digest=b"d" * 16,
            prev_late_timings=prev,
        )
        prev = late
        if (g + 1) % 2 == 0:
            log.append_eval(g + 1, wall[g] + 0.05, {"accuracy": 0.1 + 0.2 * (g + 1) / 2, "mean_reward": -1.0 + 0.1 * g})
            prev = late_eval
    if finish:
        log.patch_late_timings(gens - 1, prev)
        log.write_final(np.zeros(4), np.zeros(4))
    log.close()
    return {"rewards": rewards, "wall": wall, "early": early, "late": late}


def test_tables_of_a_synthetic_log(tmp_path: Path) -> None:
    ref = synth_log(tmp_path / "r1" / "log.h5", world=2, lam=6, gens=5, batch=3)
    run = read_run(tmp_path / "r1" / "log.h5")
    g = run.gen
    assert run.name == "r1" and len(g) == 5 and g["gen"].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(run.rewards, ref["rewards"])
    np.testing.assert_allclose(g["reward_mean"], ref["rewards"].mean(axis=1))
    np.testing.assert_allclose(g["reward_max"], ref["rewards"].max(axis=1))
    np.testing.assert_allclose(g["reward_median"], np.median(ref["rewards"], axis=1))
    np.testing.assert_allclose(g["reward_q25"], np.quantile(ref["rewards"], 0.25, axis=1))
    np.testing.assert_allclose(g["sigma"], 0.5 * 0.9 ** np.arange(5))
    assert g["failures"].tolist() == [0, 1, 0, 1, 0]
    assert g["tokens"].tolist() == [18] * 5
    np.testing.assert_allclose(g["wall_time"], ref["wall"])
    np.testing.assert_allclose(g["train_time"], ref["wall"] - 1.5)
    # first generation starts after the warm-start validation (wall 1.5); evals after gens 1 and 3 are removed
    np.testing.assert_allclose(g["gen_s"], np.diff(np.concatenate([[1.5], ref["wall"]])))
    np.testing.assert_allclose(g["iter_s"], [0.6, 0.1, 0.1 - 0.05, 0.1, 0.1 - 0.05])
    np.testing.assert_allclose(g["generate_s"], 0.09)

    v = run.validation
    assert v["gen"].tolist() == [0, 2, 4] and set(v.columns) >= {"run", "gen", "wall_time", "train_time", "accuracy", "mean_reward"}
    np.testing.assert_allclose(v["accuracy"], [0.1, 0.3, 0.5])

    t = run.timings
    assert len(t) == 5 * 2 * K and set(t["rank"]) == {0, 1} and list(t["phase"].cat.categories) == list(PHASES)
    with h5py.File(tmp_path / "r1" / "log.h5", "r") as f:
        raw = f["gen/timings"][()]
    back = t.pivot_table(index=["gen", "rank"], columns="phase", values="seconds", observed=False)[list(PHASES)].to_numpy()
    np.testing.assert_allclose(back, raw.reshape(-1, K))
    assert t[(t["phase"] == "eval") & (t["gen"] == 1)]["seconds"].tolist() == [0.05, 0.05]

    m = run.meta
    assert (m["world_size"], m["popsize"], m["d"], m["batch_size"], m["finished"], m["n_hosts"]) == (2, 6, 4, 3, True, 1)
    assert m["metrics"] == ["accuracy", "mean_reward"] and m["config"]["task"]["name"] == "fake"
    assert run.ranks["tokens"].sum() == 90 and len(run.ranks) == 10

    # derived numbers
    assert throughput(run) == pytest.approx(90 / (ref["wall"][-1] - 1.5))
    assert tokens_per_sample(run) == pytest.approx(1.0)
    assert time_to_target(run, "accuracy", 0.3) == pytest.approx((ref["wall"][1] + 0.05 - 1.5, 2))
    assert time_to_target(run, "accuracy", 0.3, since_start=True)[0] == pytest.approx(ref["wall"][1] + 0.05)
    assert np.isnan(time_to_target(run, "accuracy", 0.9)[0])
    work = 5 * 2 * (0.09 + 0.002)
    over = 5 * 2 * (0.001 + 0.003 + 0.001 + 0.001) + 2 * 2 * 0.05
    assert overhead_share(run) == pytest.approx(over / (work + over))


def test_many_runs_find_and_errors(tmp_path: Path) -> None:
    for w in (1, 2, 4):
        synth_log(tmp_path / "runs" / f"w{w}" / "log.h5", world=w, lam=8, gens=3, batch=2, name="same")
    runs = load_runs([tmp_path / "runs"])
    assert len(runs) == 3 and len(set(runs.names)) == 3  # equal run.name made unique
    assert sorted(runs.metadata()["world_size"]) == [1, 2, 4]
    t = runs.timings()
    assert t.groupby("run")["rank"].nunique().sort_values().tolist() == [1, 2, 4]
    assert len(runs.generations()) == 9 and runs.metrics == ["accuracy", "mean_reward"]
    assert find_logs([str(tmp_path / "runs" / "*" / "log.h5")]) == find_logs([tmp_path / "runs"])
    with pytest.raises(LogError, match="no file matches"):
        find_logs([str(tmp_path / "nothing*")])
    with pytest.raises(LogError, match="no such file"):
        find_logs([tmp_path / "missing.h5"])
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(LogError, match="not an ESSA run log"):
        read_run(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(LogError, match="cannot open"):
        read_run(tmp_path / "text.h5")


WRITER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from essa_hpc.dist import PHASES
    from essa_hpc.runlog import RunLog
    log = RunLog(sys.argv[1], config_json=json.dumps({"run": {"name": "live"}, "task": {"batch_size": 2}}), world_size=2,
                 hostnames=["h", "h"], popsize=4, solution_length=3, metrics=["accuracy"])
    log.append_eval(0, 0.5, {"accuracy": 0.0})
    t = np.ones((2, len(PHASES)))
    for g in range(6):
        log.append_generation(rewards=np.full(4, float(g)), seeds=np.arange(4, dtype=np.uint64), sigma=1.0, wall_time=1.0 + g,
                              timings=t, tokens=np.array([4, 4]), failures=0, timeouts=0, digest=b"x" * 16,
                              prev_late_timings=t if g else None)
        if g == 2:
            print("ready", flush=True)
            sys.stdin.readline()
    log.patch_late_timings(5, t)
    log.write_final(np.zeros(3), None)
    log.close()
""")


def test_live_log_swmr(tmp_path: Path) -> None:
    path = tmp_path / "live" / "log.h5"
    path.parent.mkdir()
    p = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        cwd=REPO,
        env=cli_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
        run = load_runs([path]).runs[0]  # the writer still holds the file open in SWMR mode
        assert run.meta["finished"] is False and len(run.gen) == 3
        assert run.gen["reward_mean"].tolist() == [0.0, 1.0, 2.0]
        t = run.timings
        late_last = t[(t["gen"] == 2) & t["phase"].isin(["allgather", "tell", "log", "checkpoint", "eval"])]["seconds"]
        assert late_last.isna().all() and len(late_last) == 10  # not yet patched by the writer
        assert t[t["gen"] < 2]["seconds"].notna().all()
        p.stdin.write("go\n")
        p.stdin.close()
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
    run = read_run(path)
    assert run.meta["finished"] is True and len(run.gen) == 6 and run.timings["seconds"].notna().all()


# ----------------------------------------------------------------------------------------------------
# report pieces on known inputs


def test_scaling_efficiency_known_inputs() -> None:
    s, e = report.scaling_efficiency([1, 2, 4], [8.0, 4.0, 2.5])
    np.testing.assert_allclose(s, [1.0, 2.0, 3.2])
    np.testing.assert_allclose(e, [1.0, 1.0, 0.8])
    s, e = report.scaling_efficiency([2, 4, 8], [10.0, 6.0, 4.0])  # baseline 2 ranks
    np.testing.assert_allclose(s, [1.0, 10 / 6, 2.5])
    np.testing.assert_allclose(e, [1.0, 10 / 6 / 2, 2.5 / 4])
    s, e = report.scaling_efficiency([1, 2, 4], [np.nan, 4.0, 1.0])  # no time at 1 rank: baseline is 2 ranks
    assert np.isnan(s[0]) and s[1:] == pytest.approx([1.0, 4.0]) and e[1:] == pytest.approx([1.0, 2.0])
    s, e = report.scaling_efficiency([1, 2], [np.nan, np.nan])
    assert np.isnan(s).all() and np.isnan(e).all()

    summary = pd.DataFrame(
        {
            "run": list("abcde"),
            "group": ["g"] * 4 + ["h"],
            "world_size": [1, 2, 2, 4, 1],
            "time_to_target_s": [12.0, 7.0, 5.0, 4.0, 3.0],
            "iter_s": [1.0, 0.5, 0.5, 0.4, 0.2],
            "tokens_per_s": [1.0] * 5,
        }
    )
    tab = report.scaling_table(summary)
    g = tab[tab["group"] == "g"]
    assert g["world_size"].tolist() == [1, 2, 4] and g["runs"].tolist() == [1, 2, 1]
    np.testing.assert_allclose(g["time_to_target_s"], [12.0, 6.0, 4.0])  # median of the two 2-rank runs
    np.testing.assert_allclose(g["speedup_ttt"], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(g["efficiency_ttt"], [1.0, 1.0, 0.75])
    np.testing.assert_allclose(g["efficiency_iter"], [1.0, 1.0, 0.625])
    assert tab[tab["group"] == "h"]["speedup_ttt"].tolist() == [1.0]


def test_metric_and_target_choice(tmp_path: Path) -> None:
    for w in (1, 2):
        synth_log(tmp_path / f"w{w}" / "log.h5", world=w, gens=4)
    runs = load_runs([tmp_path / "w1", tmp_path / "w2"])
    assert report.choose_metric(runs) == "mean_reward"  # the fake backend's primary metric
    assert report.choose_metric(runs, "accuracy") == "accuracy"
    with pytest.raises(LogError, match="pass@1"):
        report.choose_metric(runs, "pass@1")
    # accuracy: start 0.1, best 0.5 for both -> 0.1 + 0.9·0.4
    assert report.default_target(runs, "accuracy") == pytest.approx(0.46)
    assert report.md_table(pd.DataFrame({"a": [1, np.nan], "b": ["x|y", 2.5e-7]}), {"a": "A", "b": "B"}).splitlines() == [
        "| A | B |",
        "| --- | --- |",
        "| 1 | x\\|y |",
        "| – | 2.500e-07 |",
    ]


# ----------------------------------------------------------------------------------------------------
# the real run loop under mpiexec, then the report command

WORLD_SIZES = (1, 2, 4)
POPSIZE, BATCH, GENS, SLEEP = 8, 4, 10, 0.005
FAKE = [
    "--set",
    "backend.name=fake",
    "--set",
    "task.name=fake",
    "--set",
    "backend.fake_dim=8",
    "--set",
    f"backend.fake_sleep_s={SLEEP}",
    "--set",
    f"search.popsize={POPSIZE}",
    "--set",
    f"task.batch_size={BATCH}",
    "--set",
    f"run.generations={GENS}",
    "--set",
    "eval.every=2",
    "--set",
    "eval.size=8",
    "--set",
    "search.sigma0=0.3",
    "--set",
    "log.progress=false",
]


@pytest.fixture(scope="module")
def mpi_logs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """One run per world size, launched side by side (each under its own real mpiexec)."""
    tmp = tmp_path_factory.mktemp("analysis_runs")

    def launch(n: int) -> subprocess.CompletedProcess[str]:
        return run_cli([*FAKE, "--set", f"run.dir={tmp}", "--set", f"run.name=n{n}"], REPO, ranks=n, timeout=240)

    with ThreadPoolExecutor(len(WORLD_SIZES)) as pool:
        results = dict(zip(WORLD_SIZES, pool.map(launch, WORLD_SIZES)))
    for n, r in results.items():
        assert r.returncode == 0, f"{n} ranks:\n{r.stdout}\n{r.stderr}"
    return {n: tmp / f"n{n}" / "log.h5" for n in WORLD_SIZES}


@pytest.mark.mpi
def test_tables_equal_hdf5_of_real_runs(mpi_logs: dict[int, Path]) -> None:
    runs = load_runs(list(mpi_logs.values()))
    assert runs.names == ["n1", "n2", "n4"]
    gens = runs.generations()
    for n, path in mpi_logs.items():
        run = runs[f"n{n}"]
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            raw = {
                k: f[k][()]
                for k in (
                    "gen/rewards",
                    "gen/sigma",
                    "gen/wall_time",
                    "gen/tokens",
                    "gen/timings",
                    "eval/gen",
                    "eval/mean_reward",
                    "gen/reward_mean",
                    "gen/failures",
                )
            }
        mine = gens[gens["run"] == f"n{n}"]
        np.testing.assert_array_equal(run.rewards, raw["gen/rewards"])
        np.testing.assert_array_equal(mine["reward_mean"], raw["gen/rewards"].mean(axis=1))
        np.testing.assert_array_equal(mine["reward_mean"], raw["gen/reward_mean"])
        np.testing.assert_array_equal(mine["reward_max"], raw["gen/rewards"].max(axis=1))
        np.testing.assert_array_equal(mine["sigma"], raw["gen/sigma"])
        np.testing.assert_array_equal(mine["wall_time"], raw["gen/wall_time"])
        np.testing.assert_array_equal(mine["failures"], raw["gen/failures"])
        np.testing.assert_array_equal(mine["tokens"], raw["gen/tokens"].sum(axis=1))
        assert (mine["tokens"] == POPSIZE * BATCH).all()  # the fake backend: one token per sample
        v = run.validation
        np.testing.assert_array_equal(v["gen"], raw["eval/gen"])
        np.testing.assert_array_equal(v["mean_reward"], raw["eval/mean_reward"])
        assert v["gen"].tolist() == [0, 2, 4, 6, 8, 10]
        # timings: every rank, every phase, values as logged
        t = run.timings
        assert len(t) == GENS * n * K and sorted(t["rank"].unique()) == list(range(n))
        back = t.pivot_table(index=["gen", "rank"], columns="phase", values="seconds", observed=False)[list(PHASES)].to_numpy()
        np.testing.assert_array_equal(back, raw["gen/timings"].reshape(-1, K))
        assert run.ranks["tokens"].sum() == raw["gen/tokens"].sum() and run.ranks["rank"].nunique() == n
        m = run.meta
        assert (m["world_size"], m["popsize"], m["d"], m["batch_size"], m["finished"]) == (n, POPSIZE, 8, BATCH, True)
        assert len(m["hostnames"]) == n and m["config"]["backend"]["fake_sleep_s"] == SLEEP
        # each rank generates its share: λ·B/n samples of SLEEP seconds at least
        assert (run.ranks["generate_s"] >= SLEEP * POPSIZE * BATCH / n * 0.99).all()
    # the engine's invariant, visible in the tables: the same rewards at every world size
    np.testing.assert_array_equal(runs["n1"].rewards, runs["n4"].rewards)
    fit = latency.fit_eta_gen(runs.rank_stats())
    assert SLEEP * 0.99 <= fit.eta_gen < SLEEP * 10 and set(fit.per_run) == {"n1", "n2", "n4"}


@pytest.mark.mpi
def test_report_command_on_real_runs(mpi_logs: dict[int, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    logs = [str(p) for p in mpi_logs.values()]
    r = subprocess.run(
        [sys.executable, "-m", "analysis.report", *logs, "--out", str(out)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    md = (out / "summary.md").read_text()
    for needle in ("# ESSA run report", "mean_reward", "## Scaling", "## Latency model", "32b-h100", "η_gen", "n1", "n2", "n4"):
        assert needle in md, needle
    stems = [
        "reward_vs_generation",
        "reward_vs_time",
        "validation_mean_reward_vs_generation",
        "validation_mean_reward_vs_time",
        "phases_n1",
        "phases_n2",
        "phases_n4",
        "phase_shares",
        "scaling",
        "latency_projection",
        "predicted_vs_measured",
    ]
    for stem in stems:
        png, pdf = out / f"{stem}.png", out / f"{stem}.pdf"
        assert png.stat().st_size > 1024 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
        assert pdf.stat().st_size > 1024 and pdf.read_bytes()[:5] == b"%PDF-", stem

    runs_csv = pd.read_csv(out / "runs.csv")
    assert runs_csv["world_size"].tolist() == [1, 2, 4] and (runs_csv["status"] == "finished").all()
    assert runs_csv["time_to_target_s"].notna().all()  # the default target is one every run reached
    assert ((runs_csv["overhead_share"] > 0) & (runs_csv["overhead_share"] < 1)).all()
    assert (runs_csv["tokens_per_s"] > 0).all()
    sc = pd.read_csv(out / "scaling.csv")
    assert sc["world_size"].tolist() == [1, 2, 4] and sc["speedup_ttt"].iloc[0] == 1.0
    np.testing.assert_allclose(sc["efficiency_ttt"], sc["speedup_ttt"] / sc["world_size"])
    np.testing.assert_allclose(sc["speedup_iter"], sc["iter_s"].iloc[0] / sc["iter_s"])
    proj = pd.read_csv(out / "latency_projection.csv")
    assert set(proj["preset"]) == set(latency.PRESETS) and proj["G"].min() == 8 and proj["G"].max() == 1024
    pvm = pd.read_csv(out / "predicted_vs_measured.csv")
    assert pvm["world_size"].tolist() == [1, 2, 4]
    # T_essa ∝ 1/G with the one fitted η_gen
    np.testing.assert_allclose(pvm["predicted_s"] * pvm["world_size"], pvm["predicted_s"].iloc[0], rtol=1e-6)
    assert len(pd.read_csv(out / "timings.csv")) == GENS * (1 + 2 + 4) * K


def test_report_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([str(tmp_path / "none*"), "--out", str(tmp_path / "out")]) == 2
    assert "no file matches" in capsys.readouterr().err
    synth_log(tmp_path / "a" / "log.h5")
    assert report.main([str(tmp_path / "a"), "--metric", "nope", "--out", str(tmp_path / "out")]) == 2
    assert "--metric 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are known to be good
