"""The sweep grammar of ``essa-submit --sweep``: axes, the grid of points, and the run name of a point.

Pure functions of their arguments (no files, no SLURM), so a submission can be planned, printed with
``--dry-run`` and tested without submitting anything; ``essa_hpc.submit`` turns the points into
validated configs and jobs.

    --sweep lora.rank=8,32 --sweep search.popsize=24,48,96     -> 2 x 3 points, the first axis slowest
    --sweep 'task.plugins=[[a:f], [a:f, b:g]]'                 -> a YAML list when a value is itself a list

Each value is read as a YAML scalar, exactly as ``--set key=value`` reads it; the key must be a config
key (a near miss gets a suggestion). A point's run name is the base name plus one tag per swept key
(``base_r8_p24``: the usual keys have short tags, the paper's r x λ x α grid reads at a glance).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any

import yaml

from essa_hpc.config import ConfigError, _suggest, all_keys, parse_override

# Short names of the usual sweep keys in run names (the paper's Table 7 grid: r × λ × α).
ABBREVIATIONS = {
    "lora.rank": "r",
    "search.popsize": "p",
    "lora.alpha_fraction": "a",
    "task.batch_size": "b",
    "search.sigma0": "s",
    "run.seed": "seed",
    "backend.temperature": "t",
}
NOT_SWEEPABLE = ("run.name", "run.dir")  # derived per point: its run name, and the submission's run.dir


def parse_sweep(spec: str) -> tuple[str, list[Any]]:
    """``key=v1,v2,...`` (values read as YAML) or ``key=[[a, b], [c]]`` (a YAML list of values)."""
    key, sep, raw = spec.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key or not raw:
        raise ConfigError(f"--sweep {spec!r}: expected key=v1,v2,... e.g. search.popsize=24,48,96")
    keys = all_keys()
    if key not in keys:
        raise ConfigError(f"--sweep {spec!r}: unknown config key {key!r}{_suggest(key, keys)}")
    if key in NOT_SWEEPABLE:
        raise ConfigError(f"--sweep {spec!r}: {key} is derived per point (use --name / --run-dir)")
    if raw.startswith("["):
        try:
            values = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--sweep {key}: cannot parse {raw!r} as a YAML list: {e}") from None
        if not isinstance(values, list):
            raise ConfigError(f"--sweep {key}: expected a YAML list of values, got {raw!r}")
    else:
        values = [parse_override(f"{key}={v.strip()}")[1] for v in raw.split(",")]
    if not values or any(v == "" for v in values):
        raise ConfigError(f"--sweep {spec!r}: empty value in the list")
    seen: list[Any] = []
    for v in values:
        if v in seen:
            raise ConfigError(f"--sweep {key}: value {v!r} appears twice")
        seen.append(v)
    return key, values


def expand(axes: Sequence[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """The grid: every combination, the first axis varying slowest; no axes -> one empty point."""
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ConfigError(f"--sweep: key(s) {', '.join(dup)} given more than once; list all values in one --sweep")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(vals for _, vals in axes))]


def _fmt(value: Any) -> str:
    """A value as a file-name-safe tag: lists joined by +, paths by their last part."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, (list, tuple)):
        text = "+".join(_fmt(v) for v in value)
    elif isinstance(value, str) and "/" in value:
        text = value.rstrip("/").rsplit("/", 1)[-1]
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def point_name(base: str, point: dict[str, Any]) -> str:
    """Run name of a point: base + one tag per swept key, e.g. base_r8_p24_a1.0 (lora.rank, search.popsize, α)."""
    tags = []
    for key, value in point.items():
        short = ABBREVIATIONS.get(key)
        tags.append(f"{short}{_fmt(value)}" if short else f"{key.split('.', 1)[1]}-{_fmt(value)}")
    return "_".join([base, *tags])
