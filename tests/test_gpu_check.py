"""bench/gpu_check.py --smoke: every section runs for real on the CPU (tiny shapes), and the result file
has the schema the GPU run writes, with figures that come from real runs (finite, positive, counted).

The smoke run is one subprocess shared by the tests of this module (tiny random models of the three
architectures, real hf-backend decode loops, real torchao where installed, the real run loop under a real
mpiexec -n 1 and -n 2). No timing is asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO, cli_env

# the smoke run starts mpiexec -n 1 and -n 2 (tier 2); on a shared, loaded box it can outlast the 600 s default
pytestmark = [pytest.mark.mpi, pytest.mark.timeout(1800)]
SCRIPT = REPO / "bench" / "gpu_check.py"
SHAPES = ("smollm2-135m", "qwen2.5-1.5b", "qwen2.5-7b")


def real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu_check")
    r = subprocess.run(
        # a budget no CI machine reaches: every section runs (the budget's skipping is for the GPU's minutes)
        [sys.executable, str(SCRIPT), "--smoke", "--budget-s", "3000", "--out", str(out)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = list(out.glob("gpu_smoke_*.json"))
    assert len(files) == 1, files
    return dict(json.loads(files[0].read_text()))


def test_schema_and_settings(smoke: dict[str, Any]) -> None:
    assert smoke["schema"] == "essa_hpc.gpu_check/1"
    assert smoke["mode"] == "smoke"
    assert smoke["device"]["kind"] == "cpu"
    assert set(smoke["sections"]) == {"p1", "determinism", "quantized", "search_spaces"}
    st = smoke["settings"]
    assert st["lambdas"] == [1, 2, 4] and st["n_sequences"] == 4 and st["max_new_tokens"] == 4
    assert real(smoke["wall_s"])
    assert "summary" in smoke and isinstance(smoke["summary"]["p1_target_0.95_met"], bool)


def test_p1_ratios_are_measured(smoke: dict[str, Any]) -> None:
    st = smoke["settings"]
    for name in SHAPES:
        r = smoke["sections"]["p1"]["shapes"][name]
        assert r["status"] == "done", r
        assert r["config"]["model_type"] == ("llama" if name.startswith("smollm2") else "qwen2")
        assert r["parameters"] > 0
        # fixed length: every sequence generated exactly max_new_tokens, in both paths
        assert r["plain"]["tokens"] == st["n_sequences"] * st["max_new_tokens"]
        assert r["our_loop_base"]["tokens"] == r["plain"]["tokens"]
        assert set(r["population"]) == {"1", "2", "4"}
        for lam, e in r["population"].items():
            assert e["tokens"] == r["plain"]["tokens"], lam
            for key in ("seconds", "tokens_per_s", "ratio_to_plain"):
                assert real(e[key]), (name, lam, key, e)
            assert e["peak_mem_mb"] >= 0
            assert math.isclose(e["ratio_to_plain"], e["tokens_per_s"] / r["plain"]["tokens_per_s"])
        assert smoke["summary"]["p1_ratio"][name] == {k: v["ratio_to_plain"] for k, v in r["population"].items()}


def test_quantized_section_ran_or_says_why(smoke: dict[str, Any]) -> None:
    q = smoke["sections"]["quantized"]["shapes"]
    assert set(q) == set(SHAPES)
    for name in SHAPES:
        assert set(q[name]) == {"int8", "int4"}
        for r in q[name].values():
            assert r["status"] in ("done", "error"), r
            if r["status"] == "error":
                assert r["error"], r  # a failed torchao path records its error and the run goes on
                continue
            assert real(r["quantize_s"])
            assert real(r["plain"]["ratio_to_bf16_plain"])
            (pop,) = r["population"].values()
            assert real(pop["ratio_to_plain"]) and real(pop["ratio_to_bf16_plain"])
    try:
        import torchao  # noqa: F401
    except ImportError:
        return
    # with torchao installed, int8 weight-only runs on the CPU
    assert all(q[name]["int8"]["status"] == "done" for name in SHAPES), q


def test_determinism_two_runs_and_ranks(smoke: dict[str, Any]) -> None:
    d = smoke["sections"]["determinism"]
    ip = d["in_process"]
    assert ip["status"] == "done", ip
    for mode in ("greedy", "sampled"):
        assert ip[mode]["same"] is True, ip[mode]
        assert ip[mode]["identical_token_ids"] == ip[mode]["of"] == ip["requests"]
    assert ip["sampled"]["distinct_completions"] > 1  # seeded sampling: not one completion for every request
    mp = d["mpiexec"]
    assert mp["status"] == "done", mp
    assert mp["runs"]["n1"]["exit"] == 0 and mp["runs"]["n2"]["exit"] == 0, mp
    assert mp["rewards_vary"] is True
    vs = mp["runs"]["n2"]["vs_n1"]
    assert all(v for k, v in vs.items() if k.endswith("identical")), vs
    assert vs["sampled_rewards_identical_fraction"] == 1.0
    assert mp["same"] is True
    assert smoke["summary"]["determinism_mpiexec_same"] is True


def test_search_spaces_discovered_at_run_time(smoke: dict[str, Any]) -> None:
    sp = smoke["sections"]["search_spaces"]
    from essa_hpc import config

    if "search.space" not in config.all_keys():
        assert sp["status"] == "not available" and "search.space" in sp["reason"], sp
        return
    assert sp["status"] in ("done", "not available"), sp
    for r in sp.get("results", {}).values():
        assert "error" in r or real(r["generate_tokens_per_s"]), r


def test_refuses_without_cuda_and_bad_options(tmp_path: Path) -> None:
    env = cli_env()
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2, r.stderr
    assert "no CUDA device" in r.stderr and "--smoke" in r.stderr
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--shapes", "llama-70b", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "llama-70b" in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())  # nothing written before the inputs were checked
