"""slurm/common.sh's cluster conventions (slurm/README.md, Cluster conventions): the run directory on
scratch where the site has one, HDF5 file locking off unless set, the HF cache variables passed to every
rank, and the scripts finding an installed package's data. Fake SLURM tools, as in tests/test_slurm.py."""

from __future__ import annotations

from pathlib import Path

from .test_slurm import FakeSlurm, fake, run_script, slurm_env

__all__ = ["fake"]  # the fixture, imported for pytest


def test_run_dir_defaults_to_scratch_where_set(fake: FakeSlurm, tmp_path: Path) -> None:
    env = slurm_env(fake, nodes=1, per_node=1, gpus=0, SCRATCH=str(tmp_path / "scratch"), ESSA_DRY_RUN="1")
    r = run_script("essa_debug.sh", env)
    assert r.returncode == 0, r.stderr
    assert f"run directory {tmp_path / 'scratch'}/essa_hpc/runs/fake_scaling_4242" in r.stdout
    env["ESSA_SCRATCH"] = str(tmp_path / "work")  # a site whose scratch variable has another name
    assert f"run directory {tmp_path / 'work'}/essa_hpc/runs/" in run_script("essa_debug.sh", env).stdout
    env["ESSA_RUN_DIR"] = str(tmp_path / "mine")  # an explicit run dir wins
    assert f"run directory {tmp_path / 'mine'}/fake_scaling_4242" in run_script("essa_debug.sh", env).stdout


def test_hdf5_locking_off_and_hf_cache_passed_to_ranks(fake: FakeSlurm, tmp_path: Path) -> None:
    # an interpreter that answers the preflight check and writes each rank's whole environment
    dump = tmp_path / "envs"
    dump.mkdir()
    py = tmp_path / "envpython"
    py.write_text(f'#!/bin/bash\nif [ "$1" = -c ]; then echo "3.11.9 0.1.0"; exit 0; fi\nenv -0 > {dump}/env.$$\n')
    py.chmod(0o755)
    env = slurm_env(
        fake, nodes=1, per_node=2, gpus=0, ESSA_RUN_DIR=str(tmp_path / "runs"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1"
    )
    env["ESSA_PYTHON"] = str(py)
    for key in ("HDF5_USE_FILE_LOCKING", "SCRATCH", "HF_HUB_CACHE"):
        env.pop(key, None)
    r = run_script("essa_debug.sh", env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"HF cache {tmp_path / 'hf'}/hub (HF_HUB_OFFLINE=1) | HDF5_USE_FILE_LOCKING=FALSE" in r.stdout
    ranks = [dict(kv.split("=", 1) for kv in f.read_text().split("\0") if "=" in kv) for f in sorted(dump.iterdir())]
    assert len(ranks) == 2
    for e in ranks:
        assert e["HDF5_USE_FILE_LOCKING"] == "FALSE"
        assert e["HF_HOME"] == str(tmp_path / "hf") and e["HF_HUB_OFFLINE"] == "1"
    assert f"--set run.dir={tmp_path / 'runs'}" in r.stdout
    env["HDF5_USE_FILE_LOCKING"] = "TRUE"  # a site that has working locks keeps them
    assert "HDF5_USE_FILE_LOCKING=TRUE" in run_script("essa_debug.sh", {**env, "ESSA_DRY_RUN": "1"}).stdout
