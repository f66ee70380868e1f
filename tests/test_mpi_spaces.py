"""Tier 2: lowrank and full ES through the real run loop on a tiny saved model under real mpiexec.

For each seeded space, three runs of 5 generations: 1 rank; 2 ranks interrupted after 3 generations
and resumed (the checkpoint replays the updates); 3 ranks. The exported weights, the rewards and the
digests must be bit-identical (docs/design.md, "Search spaces").
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from essa_hpc import models

from .conftest import REPO, cli_env, run_cli

PLUGIN = "def digits(prompts, completions, **kw):\n    return [sum(c.isdigit() for c in t) / max(1, len(t)) for t in completions]\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("tiny")
    models.save_tiny_model(root / "model")
    (root / "spaceplug.py").write_text(PLUGIN)
    env = cli_env()
    env["PYTHONPATH"] = f"{root}:{env['PYTHONPATH']}"
    return root, env


def space_args(root: Path, out: Path, name: str, space: str, gens: int) -> list[str]:
    space, _, rank = space.partition("-r")  # "lowrank-r1": the rank-1 forward path (the default rank)
    sets = [
        f"model.path={root / 'model'}",
        f"run.dir={out}",
        f"run.name={name}",
        f"run.generations={gens}",
        f"search.space={space}",
        "search.optimizer=es",
        "search.popsize=4",
        "search.sigma0=0.5" if space == "full" else "search.sigma0=0.3",
        "search.learning_rate=0.2",
        "search.fitness_shaping=centered_ranks",
        f"search.rank={rank or 2}",
        "task.batch_size=2",
        "eval.size=2",
        "eval.every=0",
        "backend.max_new_tokens=5",
        "task.plugins=[spaceplug:digits]",
        "log.progress=false",
    ]
    return [a for s in sets for a in ("--set", s)]


def weights(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.mark.mpi
@pytest.mark.parametrize("space", ["lowrank", "lowrank-r1", "full"])
def test_weights_identical_on_1_2_3_ranks_and_across_resume(space: str, tiny: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, env = tiny
    runs = {"n1": (1, [5]), "n2cut": (2, [3, 5]), "n3": (3, [5])}
    for name, (ranks, stages) in runs.items():
        for gens in stages:  # n2cut: 3 generations, then the same command resumes from the checkpoint to 5
            r = run_cli(space_args(root, tmp_path, name, space, gens), REPO, ranks=ranks, env=env)
            assert r.returncode == 0, r.stdout + r.stderr
    logs = {}
    for name in runs:
        with h5py.File(tmp_path / name / "log.h5", "r") as f:
            logs[name] = {k: f[k][()] for k in ("gen/rewards", "gen/digest", "gen/sigma")}
    ref, ref_w = logs["n1"], weights(tmp_path / "n1")
    assert ref["gen/rewards"].shape == (5, 4) and ref["gen/rewards"].std() > 0, "rewards should differ between candidates"
    base = weights(root)  # the tiny model as saved (model.safetensors)
    assert any(not np.array_equal(ref_w[k], base[k]) for k in ref_w), "5 generations of es should move the target weights"
    for name in ("n2cut", "n3"):
        for key in ("gen/rewards", "gen/digest", "gen/sigma"):
            assert np.array_equal(logs[name][key], ref[key]), f"{space} {name}: {key} differs"
        w = weights(tmp_path / name)
        assert sorted(w) == sorted(ref_w)
        for k in ref_w:
            assert np.array_equal(w[k], ref_w[k]), f"{space} {name}: {k} differs"
    assert (tmp_path / "n3" / "model" / "delta" / "delta.safetensors").is_file()
