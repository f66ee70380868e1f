"""Task data: read records from files, map fields to Examples, split, and draw minibatches.

Formats (chosen by suffix, or by what a folder holds):

* ``.jsonl`` — one JSON object per line (blank lines skipped); errors name the line.
* ``.json`` — a list of objects, or an object holding one under ``data`` / ``examples`` / ``rows``;
  a ``.json`` file that is really JSON Lines (as ``datasets.Dataset.to_json`` writes) is read as such.
* ``.csv`` — a header row, then one record per row (values are strings).
* ``.parquet`` — through pandas (needs pyarrow or fastparquet).
* a folder written by ``datasets.save_to_disk`` (needs the ``datasets`` package): a Dataset, or a
  DatasetDict whose ``train`` split trains and whose ``validation`` / ``test`` split validates.
* any other folder holding ``train.<ext>`` (and optionally ``validation.<ext>`` / ``val.<ext>`` /
  ``test.<ext>``) in one of the formats above, e.g. ``shared/data/gsm8k/``.

Record numbers in errors are 1-based: the line of a JSONL file, the data row of a CSV file, the
position in a JSON list, parquet file or HF dataset.

Minibatches are a pure function of (run seed, generation): every rank draws the same prompts, so
candidates are compared on common random numbers and the rank count never changes what is drawn.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from essa_hpc.tasks.base import Example, TaskError

FORMATS = (".jsonl", ".json", ".csv", ".parquet")
TRAIN_NAMES = ("train",)
VAL_NAMES = ("validation", "val", "valid", "dev", "test")
MINIBATCH_SALT = 0xB47C4  # keeps minibatch streams apart from other streams derived from the run seed
SPLIT_SALT = 0x5B117  # the held-out validation slice (independent of the run seed: comparable runs)
SFT_SALT = 0x5F75F  # the SFT reservation (task.sft_size), likewise independent of the run seed


@dataclass(frozen=True)
class Record:
    number: int  # 1-based line / row / position, for error messages
    data: dict[str, Any]


def shared_data_dir() -> Path:
    """Where the project's reference data lives: $ESSA_SHARED_DATA, else ../shared/data beside the repo."""
    env = os.environ.get("ESSA_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


# ---------------------------------------------------------------------------------------------- reading


def _jsonl(path: Path) -> list[Record]:
    out = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}: line {number} is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise TaskError(f"{path}: line {number}: expected a JSON object, got {type(obj).__name__}")
            out.append(Record(number, obj))
    return out


def _json(path: Path) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines under a .json name
            return _jsonl(path)
        raise TaskError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(obj, dict):
        for key in ("data", "examples", "rows"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
        else:
            raise TaskError(
                f"{path}: expected a list of objects (or an object with a 'data' list), got an object with keys {sorted(obj)[:8]}"
            )
    if not isinstance(obj, list):
        raise TaskError(f"{path}: expected a list of objects, got {type(obj).__name__}")
    out = []
    for number, row in enumerate(obj, start=1):
        if not isinstance(row, dict):
            raise TaskError(f"{path}: record {number}: expected a JSON object, got {type(row).__name__}")
        out.append(Record(number, row))
    return out


def _csv(path: Path) -> list[Record]:
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: tolerate a spreadsheet BOM
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return []
        out = []
        for number, row in enumerate(reader, start=1):
            if None in row:
                raise TaskError(f"{path}: row {number} has more values than the header has columns")
            out.append(Record(number, dict(row)))
        return out


def _parquet(path: Path) -> list[Record]:
    try:
        import pandas as pd

        frame = pd.read_parquet(path)
    except ImportError as e:
        raise TaskError(f"{path}: reading parquet needs pandas with pyarrow (pip install pyarrow): {e}") from None
    return [Record(i, _plain(row)) for i, row in enumerate(frame.to_dict(orient="records"), start=1)]


def _plain(row: dict[Any, Any]) -> dict[str, Any]:
    """numpy arrays / scalars from parquet or arrow -> plain Python (lists, ints, floats, None)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, np.ndarray):
            v = [_plain({"x": x})["x"] for x in v.tolist()] if v.dtype == object else v.tolist()
        elif isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, dict):
            v = _plain(v)
        out[str(k)] = v
    return out


def _hf_dataset(path: Path, split: str | None) -> list[Record]:
    try:
        import datasets
    except ImportError:
        raise TaskError(
            f"{path}: is a folder saved by datasets.save_to_disk; reading it needs the datasets package (pip install datasets)"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        wanted = (split,) if split else TRAIN_NAMES
        chosen = next((n for n in wanted if n in ds), None)
        if chosen is None:
            raise TaskError(f"{path}: DatasetDict has splits {names}; none of {list(wanted)}")
        ds = ds[chosen]
    return [Record(i, _plain(dict(row))) for i, row in enumerate(ds, start=1)]


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def find_split_file(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        for ext in FORMATS:
            p = folder / f"{name}{ext}"
            if p.is_file():
                return p
    return None


def hf_split_names(path: Path) -> list[str]:
    meta = path / "dataset_dict.json"
    if not meta.is_file():
        return []
    try:
        return list(json.loads(meta.read_text()).get("splits", []))
    except (json.JSONDecodeError, AttributeError):
        return []


def read_records(path: str | Path, split: str | None = None, key: str = "task.path") -> list[Record]:
    """All records of a file or folder (see the module doc). ``split`` picks a DatasetDict split."""
    p = Path(path)
    if not p.exists():
        raise TaskError(f"{key}: no such file or folder: {p}")
    if p.is_dir():
        if is_hf_dataset_dir(p):
            return _hf_dataset(p, split)
        f = find_split_file(p, (split,) if split else TRAIN_NAMES)
        if f is None:
            want = split or "train"
            raise TaskError(f"{key}: folder {p} holds neither a dataset saved by save_to_disk nor {want}{{{','.join(FORMATS)}}}")
        p = f
    suffix = p.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _jsonl(p)
        if suffix == ".json":
            return _json(p)
        if suffix == ".csv":
            return _csv(p)
        if suffix == ".parquet":
            return _parquet(p)
    except UnicodeDecodeError as e:
        raise TaskError(f"{key}: {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    raise TaskError(f"{key}: {p}: unknown format {suffix!r}; expected one of {', '.join(FORMATS)} or a save_to_disk folder")


def validation_source(path: str | Path) -> tuple[Path, str | None] | None:
    """The validation counterpart inside a training folder (a val/test file or DatasetDict split), if any."""
    p = Path(path)
    if not p.is_dir():
        return None
    if is_hf_dataset_dir(p):
        names = hf_split_names(p)
        chosen = next((n for n in VAL_NAMES if n in names), None)
        return (p, chosen) if chosen else None
    f = find_split_file(p, VAL_NAMES)
    return (f, None) if f else None


# ------------------------------------------------------------------------------------------- mapping


def field_value(rec: Record, name: str, source: str, required: bool = True) -> Any:
    """rec[name] (a dotted name reaches into nested objects); a missing field names file and row."""
    cur: Any = rec.data
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur or cur[part] is None:
            if not required:
                return None
            have = sorted(rec.data)[:12]
            raise TaskError(
                f"{source}: record {rec.number} has no field {name!r} (fields: {have}); set task.prompt_field / task.answer_field"
            )
        cur = cur[part]
    return cur


def to_examples(
    records: Sequence[Record],
    source: str,
    prompt_field: str,
    answer_field: str | None = None,
    answer_required: bool = True,
    id_fields: Sequence[str] = ("id", "key", "unique_id", "idx"),
    response_field: str | None = None,
) -> list[Example]:
    """Map records to Examples: prompt and answer from the named fields, the rest into Example.columns.

    Ids come from the first of ``id_fields`` present, else ``<file stem>:<record number>``.
    """
    stem = Path(source).stem or "row"
    out = []
    for rec in records:
        prompt = field_value(rec, prompt_field, source)
        if not isinstance(prompt, str):
            raise TaskError(f"{source}: record {rec.number}: field {prompt_field!r} should be text, got {type(prompt).__name__}")
        answer = field_value(rec, answer_field, source, required=answer_required) if answer_field else None
        response = field_value(rec, response_field, source, required=False) if response_field else None
        ident = next((rec.data[f] for f in id_fields if rec.data.get(f) is not None), None)
        used = {prompt_field, answer_field}
        columns = {k: v for k, v in rec.data.items() if k not in used}
        out.append(
            Example(
                id=str(ident) if ident is not None else f"{stem}:{rec.number}",
                prompt=prompt,
                answer=answer,
                response=response if isinstance(response, str) else None,
                columns=columns,
            )
        )
    return out


# -------------------------------------------------------------------------------------------- splits


def held_out(examples: Sequence[Example], size: int, max_fraction: float = 0.2) -> tuple[list[Example], list[Example]]:
    """(train, validation): a fixed pseudo-random slice of at most ``size`` examples (and at most
    ``max_fraction`` of the data, at least one) is held out for validation; the rest trains.

    The slice depends only on the number of examples, not on the run seed, so runs with different
    seeds validate on the same prompts.
    """
    n = len(examples)
    if n < 2:
        raise TaskError(f"cannot hold out a validation slice from {n} example(s); give task.val_path or more data")
    k = max(1, min(size, math.floor(n * max_fraction)))
    order = np.random.default_rng([SPLIT_SALT, n]).permutation(n)
    val_idx = set(order[:k].tolist())
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [examples[i] for i in sorted(val_idx)]
    return train, val


def reserve_sft(examples: Sequence[Example], sft_size: int, train_size: int = 0) -> tuple[list[Example], list[Example]]:
    """(ESSA's training split, the SFT split): ``sft_size`` examples drawn for the warm start, disjoint
    from what ESSA trains on, as the paper keeps them (GSM8K: 1,495 SFT and 5,978 ESSA questions of
    7,473; docs/design.md, "The paper's settings"). The draw depends only on the number of examples, not
    on the run seed, so every run of a setting warm-starts on the same examples; both parts keep the
    file's order. ``train_size`` > 0 caps ESSA's part (its first examples).
    """
    n = len(examples)
    if sft_size <= 0:
        train = list(examples)
        return (train[:train_size] if train_size else train), []
    if sft_size >= n:
        raise TaskError(f"task.sft_size={sft_size}: the training data has only {n} examples; ESSA needs some left to train on")
    chosen = set(np.random.default_rng([SFT_SALT, n]).permutation(n)[:sft_size].tolist())
    sft = [e for i, e in enumerate(examples) if i in chosen]
    train = [e for i, e in enumerate(examples) if i not in chosen]
    if train_size > len(train):
        raise TaskError(f"task.train_size={train_size}: only {len(train)} examples are left after task.sft_size={sft_size}")
    return (train[:train_size] if train_size else train), sft


def task_sft_split(task: Any) -> list[Example]:
    """A task's reserved SFT split (task.sft_size), or [] for a task that reserves none."""
    method = getattr(task, "sft_examples", None)
    return list(method()) if callable(method) else []


def require_nonempty(examples: Sequence[Example], what: str) -> None:
    if not examples:
        raise TaskError(f"{what}: the split is empty (no records)")


def minibatch(examples: Sequence[Example], seed: int, gen: int, size: int) -> list[Example]:
    """The prompts of generation ``gen``: ``min(size, len(examples))`` distinct examples drawn from
    ``numpy.random.default_rng([seed, gen, MINIBATCH_SALT])``; the same on every rank and rank count."""
    n = len(examples)
    if n == 0:
        raise TaskError("minibatch: the training split is empty")
    if size < 1:
        raise TaskError(f"minibatch: size must be >= 1, got {size}")
    rng = np.random.default_rng([int(seed), int(gen), MINIBATCH_SALT])
    idx = rng.choice(n, size=min(size, n), replace=False)
    return [examples[int(i)] for i in idx]


def check_prompt_lengths(
    examples: Iterable[Example], tokenizer: Any, system_prompt: str | None, max_context: int, max_new_tokens: int
) -> int:
    """Raise a TaskError naming the longest prompt when prompt + generation exceeds the context.

    Prompts are rendered exactly as the backends render them (models.render_chat). Returns the
    longest rendered prompt's length in tokens.
    """
    from essa_hpc.models import render_chat

    exs = list(examples)
    if not exs:
        return 0
    texts = [render_chat(tokenizer, e.prompt, system_prompt) for e in exs]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    lengths = [len(x) for x in ids]
    worst = int(np.argmax(lengths))
    if lengths[worst] + max_new_tokens > max_context:
        raise TaskError(
            f"prompt {exs[worst].id!r} is {lengths[worst]} tokens with the chat template; with "
            f"backend.max_new_tokens={max_new_tokens} that exceeds the model's context of {max_context} tokens "
            f"(shorten the prompts, lower backend.max_new_tokens, or drop the long examples)"
        )
    return lengths[worst]
