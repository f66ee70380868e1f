"""The package as a user installs it: the wheel carries analysis, slurm scripts and presets; the
installed copy (not a checkout) runs essa-run, essa-report and essa-submit outside the repository.

docs/design.md, Packaging: slurm/ and configs/ travel as package data under essa_hpc/data/ and are
found with importlib.resources (essa_hpc/resources.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

from essa_hpc import resources
from essa_hpc.config import ConfigError, load_config

from .conftest import BIN, REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_folder_is_in_the_wheel_list() -> None:
    """pyproject lists packages explicitly (package-dir maps the data folders): a new subpackage must be added."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "essa_hpc").rglob("__init__.py")}
    assert found - listed == set(), f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    for pkg, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        assert (REPO / folder).is_dir(), (pkg, folder)


def test_resources_in_a_checkout() -> None:
    assert resources.home() == REPO.resolve()
    assert resources.slurm_script("common.sh") == REPO.resolve() / "slurm" / "common.sh"
    assert resources.preset("fake_scaling") == REPO.resolve() / "configs" / "fake_scaling.yaml"
    with pytest.raises(resources.ResourceError, match="not among"):
        resources.preset("no_such_preset")


def test_config_accepts_a_preset_name_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ here: the name resolves to the copy the package carries
    assert load_config("fake_scaling", check_paths=False).backend.name == "fake"
    assert load_config("configs/fake_scaling.yaml", check_paths=False).run.name == "fake_scaling"
    with pytest.raises(ConfigError, match="no such file"):
        load_config("configs/nope.yaml", check_paths=False)


def test_extras_name_what_they_enable() -> None:
    deps = " ".join(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "tqdm" not in deps  # nothing imports it
    assert any(d.startswith("submitit") for d in extras["slurm"])
    assert {d.split(">")[0] for d in extras["analysis"]} == {"pandas", "matplotlib"}
    assert any(d.startswith("torchao") for d in extras["quant"])
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts["essa-report"] == "essa_hpc.analysis.report:main"


def _copy_source(dst: Path) -> Path:
    """The files a wheel is built from, copied so the build leaves nothing in the checkout."""
    keep = ("essa_hpc", "slurm", "configs")
    dst.mkdir()
    for name in keep:
        shutil.copytree(REPO / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    return dst


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout(tmp_path: Path) -> None:
    """Build the wheel, install it (no deps) into a fresh venv that sees this venv's packages, and use
    the installed commands from a folder outside the checkout, with no PYTHONPATH."""
    pytest.importorskip("submitit", reason="essa-submit needs the slurm extra")
    pytest.importorskip("pandas", reason="essa-report needs the analysis extra")
    if not (BIN / "mpiexec").exists():
        pytest.skip("no mpiexec in this venv (pip install mpich): the two-rank local submission needs it")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("PMI_", "PMIX_", "OMPI_", "HYDRA_"))}
    env["OMP_NUM_THREADS"] = "1"
    src = _copy_source(tmp_path / "src")
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)], tmp_path, env)
    (wheel,) = wheels.glob("essa_hpc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in (
        "essa_hpc/data/slurm/common.sh",
        "essa_hpc/data/slurm/essa_rank.sh",
        "essa_hpc/data/slurm/essa_debug.sh",
        "essa_hpc/data/configs/fake_scaling.yaml",
        "essa_hpc/analysis/report.py",
        "essa_hpc/resources.py",
    ):
        assert member in names, member

    # A venv made from this interpreter's base python, the wheel installed into it alone; then this
    # venv's site-packages (torch, h5py, ...) are appended through a .pth line, after the new venv's
    # own, so the wheel's essa_hpc comes first (this venv's editable-install hook is not run from there).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env, timeout=120)
    vpy = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path, env)
    site = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).stdout.strip())
    (site / "_essa_test_shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{BIN}{os.pathsep}{env.get('PATH', '')}"  # BIN: the mpich wheel's mpiexec
    # the mpich wheel's libmpi lies in this venv's lib/, where mpi4py looks relative to sys.prefix
    env["LD_LIBRARY_PATH"] = f"{Path(sys.prefix) / 'lib'}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(vpy), "-c", "import essa_hpc, essa_hpc.resources as r; print(essa_hpc.__file__); print(r.home())"], work, env)
    pkg_file, home = where.stdout.split()
    assert Path(pkg_file).is_relative_to(venv) and not Path(pkg_file).is_relative_to(REPO), pkg_file
    assert Path(home) == (site / "essa_hpc" / "data").resolve()

    tiny = ["backend.fake_dim=8", "backend.fake_sleep_s=0", "search.popsize=6", "task.batch_size=4", "eval.size=4", "run.generations=2"]
    sets = [a for s in tiny for a in ("--set", s)]
    _run([str(venv / "bin" / "essa-run"), "--config", "fake_scaling", "--set", "run.dir=runs", "--set", "run.name=w1", *sets], work, env)
    assert (work / "runs" / "w1" / "log.h5").is_file()
    rep = _run([str(venv / "bin" / "essa-report"), "runs/w1/log.h5", "--out", "report", "--formats", "png"], work, env)
    assert (work / "report" / "summary.md").is_file(), rep.stdout

    dry = _run([str(venv / "bin" / "essa-submit"), "--config", "fake_scaling", "--cluster", "sbatch", "--dry-run", *sets], work, env)
    assert f"export ESSA_HOME={home}" in dry.stdout
    assert (Path(home) / "slurm" / "common.sh").is_file()
    # local cluster, two ranks: mpiexec runs slurm/essa_rank.sh from the package data, ranks import the wheel
    sub = [str(venv / "bin" / "essa-submit"), "--config", "fake_scaling", "--cluster", "local", "--tasks-per-node", "2"]
    _run([*sub, "--run-dir", "runs", "--name", "w2", "--time", "10", *sets], work, env)
    import h5py

    with h5py.File(work / "runs" / "w2" / "log.h5", "r") as f:
        assert f.attrs["world_size"] == 2
        assert f["gen/rewards"].shape == (2, 6)
