"""Where the package's non-Python files are: the slurm/ scripts and the configs/ presets.

In a checkout they are the repository's ``slurm/`` and ``configs/`` folders beside ``essa_hpc/``; an
installed wheel carries the same files as package data under ``essa_hpc/data/`` (pyproject.toml maps
the two folders there), found with :mod:`importlib.resources`. Either way :func:`home` is the folder
that holds ``slurm/`` and ``configs/``: the batch scripts' ``ESSA_HOME`` (docs/design.md, Packaging).
The scripts are run by bash, so they must be real files: a zipped install is refused with a message.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

DATA = "data"  # essa_hpc/data/{slurm,configs} inside a wheel


class ResourceError(FileNotFoundError):
    """The package's data files are missing (a broken install); the message says where it looked."""


def package_dir() -> Path:
    """The folder of the imported ``essa_hpc`` package (a checkout's or site-packages')."""
    files = importlib.resources.files("essa_hpc")
    path = Path(str(files)).resolve()
    if not path.is_dir():
        raise ResourceError(f"essa_hpc is imported from {files}, not a folder: install it unzipped (pip install essa_hpc)")
    return path


def import_root() -> Path:
    """The folder to put on PYTHONPATH so that child processes import this same copy of essa_hpc."""
    return package_dir().parent


def home() -> Path:
    """The folder holding ``slurm/`` and ``configs/``: the installed package data, else the checkout."""
    pkg = package_dir()
    for candidate in (pkg / DATA, pkg.parent):
        if (candidate / "slurm" / "common.sh").is_file():
            return candidate
    raise ResourceError(f"slurm/common.sh not found in {pkg / DATA} (installed package data) nor in {pkg.parent} (a checkout)")


def slurm_script(name: str) -> Path:
    """A file of ``slurm/`` (``common.sh``, ``essa_rank.sh``, ``essa_debug.sh``...)."""
    path = home() / "slurm" / name
    if not path.is_file():
        raise ResourceError(f"slurm/{name}: no such script in {path.parent}")
    return path


def preset(name: str) -> Path:
    """A config preset of ``configs/`` by file name or stem (``fake_scaling`` or ``fake_scaling.yaml``)."""
    stem = name[:-5] if name.endswith(".yaml") else name
    path = home() / "configs" / f"{stem}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in (home() / "configs").glob("*.yaml"))
        raise ResourceError(f"config preset {name!r}: not among {have} in {path.parent}")
    return path
