"""Collect the wheels the lent GPU machine lacks for bench/gpu_check.py into ``.whl/`` (git-ignored).

That machine (Python 3.12, CUDA torch, transformers, peft, mpi4py, h5py, pyyaml, threadpoolctl; no
internet) lacks ``cma`` (the run loop's optimizer: required) and ``torchao`` (the quantized section:
optional, that section records the error without it). Each is taken, in this order, from ``pip
download`` for CPython 3.12 manylinux, from the local package index, or, for torchao, by packing the
copy installed in this interpreter into a wheel (torchao's Python code is what the weight-only
configs use; its compiled kernels load only on the torch they were built for, and say so).

    python bench/gpu_wheels.py            # -> .whl/*.whl (a few MB); then carry ".whl" to the device
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WANT = {"cma": "4.5.0", "torchao": "0.18.0"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]


def pip_download(name: str, version: str, dest: Path, timeout: float) -> bool:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    cmd += ["--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), f"{name}=={version}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0 and any(dest.glob(f"{name}-{version}-*.whl"))


def pack_installed(name: str, dest: Path) -> Path:
    """A wheel of the distribution installed here (its files under site-packages, as RECORD lists them)."""
    dist = md.distribution(name)
    files = [f for f in dist.files or [] if not str(f).startswith("..") and "__pycache__" not in str(f)]
    tags = [line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines() if line.startswith("Tag:")]
    out = dest / f"{name}-{dist.version}-{tags[0] if tags else 'py3-none-any'}.whl"
    info = f"{name}-{dist.version}.dist-info"
    record = []
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            src = Path(str(dist.locate_file(f)))
            if not src.is_file() or str(f).endswith("RECORD"):
                continue
            data = src.read_bytes()
            z.writestr(str(f), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{f},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=str(REPO / ".whl"))
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per pip download")
    args = ap.parse_args()
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, version in WANT.items():
        if any(dest.glob(f"{name}-{version}-*.whl")):
            print(f"{name}: already in {dest}")
            continue
        if pip_download(name, version, dest, args.timeout):
            print(f"{name}: downloaded")
            continue
        local = sorted(Path("/opt/pypi/files").glob(f"{name}-{version}-py3-none-any.whl"))
        if local:
            shutil.copy(local[0], dest)
            print(f"{name}: copied {local[0]}")
            continue
        try:
            print(f"{name}: packed the installed copy into {pack_installed(name, dest).name}")
        except md.PackageNotFoundError:
            print(f"{name}: not found (gpu_check.py {'fails at the start' if name == 'cma' else 'records the error'} without it)")
    total = sum(p.stat().st_size for p in dest.glob("*.whl"))
    print(f"{dest}: {', '.join(p.name for p in sorted(dest.glob('*.whl')))} ({total / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
