"""The warm start: a short LoRA SFT with peft (the one gradient stage of ESSA, paper §3.1).

Each example becomes ``render_chat(tokenizer, prompt, system) + response + eos``, tokenized as two parts
(prompt tokens exactly as the model sees them at generation time, then response tokens), and the loss is
the mean cross-entropy over the response tokens and the eos only. LoRA (rank, lora_alpha, targets from
``cfg.lora``) goes on the target Linear layers; AdamW with a short linear warmup and cosine decay; bf16
autocast on CUDA, float32 on CPU. The result is a standard PEFT adapter folder (adapter_config.json +
adapter_model.safetensors, plus sft_stats.json), written atomically.

The base model is wrapped in place and unwrapped again afterwards (``peft ... unload()``), so the
``Loaded`` model comes back unchanged (eval mode, no grad) and can serve the search right away.

``cached_sft_adapter`` keys the adapter by everything that changes it (model, task data, system
prompt, LoRA shape, SFT settings, seed) and reuses it from ``<cache>/sft/<key>``. Under MPI one rank
calls it and the others wait at a barrier (docs/design.md, "Run directory": caches).

CLI: ``python -m essa_hpc.sft [--config F] [--set k=v ...] [--out DIR]`` (also ``essa-sft``); without
--out the adapter goes to (or is reused from) the cache and its path is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from essa_hpc import exit_codes, models
from essa_hpc.config import Config, LoraSection, SftSection
from essa_hpc.svd_lora import atomic_dir, target_linears
from essa_hpc.tasks.base import Example

STATS_FILE = "sft_stats.json"
CACHE_VERSION = 1
Log = Callable[[str], Any]


class SftError(ValueError):
    """SFT cannot run on this input (no reference responses, nothing left after truncation, …)."""


@dataclasses.dataclass
class _Tokenized:
    ids: list[int]
    n_prompt: int  # loss starts at position n_prompt (the first response token)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]


def tokenize_examples(
    tokenizer: Any, examples: Sequence[Example], system_prompt: str | None, max_length: int
) -> tuple[list[_Tokenized], int, int]:
    """(sequences, skipped for lack of a response, skipped because the prompt fills max_length)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SftError("the tokenizer has no eos_token_id; SFT teaches the model to stop with it")
    out, no_response, too_long = [], 0, 0
    for ex in examples:
        if ex.response is None:
            no_response += 1
            continue
        prompt = _encode(tokenizer, models.render_chat(tokenizer, ex.prompt, system_prompt))
        response = [*_encode(tokenizer, ex.response), int(eos)]
        if len(prompt) >= max_length:
            too_long += 1
            continue
        out.append(_Tokenized(ids=(prompt + response)[:max_length], n_prompt=len(prompt)))
    return out, no_response, too_long


def _batch(seqs: Sequence[_Tokenized], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (−100 outside the response) for one micro batch."""
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, s in enumerate(seqs):
        n = len(s.ids)
        ids[row, :n] = torch.tensor(s.ids)
        mask[row, :n] = 1
        labels[row, s.n_prompt : n] = ids[row, s.n_prompt : n]
    return ids.to(device), mask.to(device), labels.to(device)


def _response_loss_sum(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the labelled tokens. Applies the LM head only where there is a label
    (prompt positions are most of a sequence; the vocabulary projection is the costly part)."""
    target = labels[:, 1:]
    keep = target != -100
    cfg = getattr(model, "config", None)
    plain_head = getattr(cfg, "final_logit_softcapping", None) is None and not hasattr(cfg, "logit_scale")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if plain_head and decoder is not None and head is not None:
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        logits = head(hidden[keep])
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
    return torch.nn.functional.cross_entropy(logits.float(), target[keep], reduction="sum")


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_sft(
    loaded: models.Loaded,
    examples: Sequence[Example],
    system_prompt: str | None,
    lora: LoraSection,
    sft: SftSection,
    out_dir: str | Path,
    seed: int,
    log: Log = print,
    micro_batch_size: int | None = None,
    meta: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> dict[str, Any]:
    """LoRA SFT on (prompt, reference response) pairs; writes a PEFT adapter folder to out_dir atomically.

    Uses the first ``sft.examples`` examples that have a ``response``. Steps: ``sft.steps``, or
    ceil(``sft.epochs``·n / ``sft.batch_size``) when that is 0. ``micro_batch_size`` splits each step's
    batch for memory (the update is the same). Returns stats: loss_first, loss_last, loss_tail_mean,
    steps, examples, tokens, response_tokens, seconds, tokens_per_s, device.
    """
    from peft import LoraConfig, get_peft_model

    model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    target_linears(model, lora.targets)  # clear error before any work when no module matches
    seqs, no_response, too_long = tokenize_examples(tok, list(examples)[: sft.examples], system_prompt, sft.max_length)
    if no_response:
        log(f"sft: {no_response} example(s) have no reference response and are skipped")
    if too_long:
        log(f"sft: {too_long} example(s) have prompts of sft.max_length={sft.max_length} tokens or more and are skipped")
    if not seqs:
        raise SftError(
            f"sft: no usable examples out of {min(len(examples), sft.examples)} "
            "(each needs a reference response and a prompt shorter than sft.max_length)"
        )
    n = len(seqs)
    steps = sft.steps if sft.steps > 0 else max(1, math.ceil(sft.epochs * n / sft.batch_size))
    micro = max(1, min(micro_batch_size or sft.batch_size, sft.batch_size))
    warmup = max(1, min(10, steps // 10))
    rng = np.random.default_rng(seed)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    alpha: Any = int(lora.lora_alpha) if float(lora.lora_alpha).is_integer() else lora.lora_alpha  # peft annotates int
    peft_cfg = LoraConfig(
        r=lora.rank, lora_alpha=alpha, target_modules=list(lora.targets), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    losses: list[float] = []
    tokens = resp_tokens = 0
    start = time.perf_counter()
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=sft.learning_rate, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup))
        peft_model.train()
        order: list[int] = []
        every = max(1, steps // 10)
        log(
            f"sft: {n} examples, {steps} steps of {sft.batch_size}, rank {lora.rank}, lora_alpha {lora.lora_alpha}, "
            f"lr {sft.learning_rate:g}, {len(params) // 2} adapted modules, device {device}"
        )
        for step in range(steps):
            while len(order) < sft.batch_size:
                order += rng.permutation(n).tolist()
            batch = [seqs[i] for i in order[: sft.batch_size]]
            del order[: sft.batch_size]
            n_labels = sum(len(s.ids) - s.n_prompt for s in batch)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for lo in range(0, len(batch), micro):
                ids, mask, labels = _batch(batch[lo : lo + micro], pad_id, device)
                with autocast:
                    loss = _response_loss_sum(model, ids, mask, labels) / n_labels
                loss.backward()
                total += float(loss.detach())
                tokens += int(mask.sum())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            resp_tokens += n_labels
            if not math.isfinite(total):
                raise SftError(f"sft: the loss became {total} at step {step + 1}; lower sft.learning_rate (now {sft.learning_rate:g})")
            losses.append(total)
            if step == 0 or (step + 1) % every == 0 or step + 1 == steps:
                el = time.perf_counter() - start
                log(
                    f"sft step {step + 1}/{steps}  loss {total:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                    f"{tokens / max(el, 1e-9):.0f} tok/s  {el:.1f}s"
                )
        seconds = time.perf_counter() - start
        tail = losses[-max(1, steps // 10) :]
        stats = {
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "loss_tail_mean": float(np.mean(tail)),
            "steps": steps,
            "examples": n,
            "skipped_no_response": no_response,
            "skipped_too_long": too_long,
            "tokens": tokens,
            "response_tokens": resp_tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "device": str(device),
            "seed": seed,
        }
        with atomic_dir(out_dir, replace=overwrite) as tmp:
            peft_model.save_pretrained(str(tmp))
            (tmp / "README.md").unlink(missing_ok=True)
            (tmp / STATS_FILE).write_text(json.dumps({**stats, **({"meta": meta} if meta else {})}, indent=2, sort_keys=True) + "\n")
    finally:
        peft_model.unload()  # puts the original Linear modules back into loaded.model
        model.eval()
        model.requires_grad_(False)
    log(
        f"sft: loss {stats['loss_first']:.4f} -> {stats['loss_tail_mean']:.4f} in {seconds:.1f}s "
        f"({stats['tokens_per_s']:.0f} tok/s); adapter at {out_dir}"
    )
    return stats


def _examples_digest(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.response], ensure_ascii=False).encode())
        h.update(b"\0")
    return h.hexdigest()


def sft_cache_key(cfg: Config, examples: Sequence[Example], system_prompt: str | None) -> dict[str, Any]:
    """Everything that changes the SFT adapter; its hash names the cache folder."""
    m, t, lo = cfg.model, cfg.task, cfg.lora
    used = list(examples)[: cfg.sft.examples]
    return {
        "version": CACHE_VERSION,
        "model": {"path": m.path, "gguf_file": m.gguf_file, "dtype": m.dtype, "quantization": m.quantization},
        "task": {
            "name": t.name,
            "path": t.path,
            "digits": t.digits,
            "operations": list(t.operations),
            "prompt_field": t.prompt_field,
            "answer_field": t.answer_field,
        },
        "system_prompt": system_prompt,
        "examples": {"count": len(used), "sha256": _examples_digest(used)},
        "lora": {"rank": lo.rank, "lora_alpha": lo.lora_alpha, "targets": list(lo.targets)},
        "sft": dataclasses.asdict(cfg.sft),
        "seed": cfg.run.seed,
    }


def sft_cache_dir(cfg: Config, examples: Sequence[Example], system_prompt: str | None) -> Path:
    key = sft_cache_key(cfg, examples, system_prompt)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return models.cache_root(cfg.model.cache_dir) / "sft" / digest


def cached_sft_adapter(
    cfg: Config, loaded: models.Loaded, examples: Sequence[Example], system_prompt: str | None, log: Log = print
) -> Path:
    """The SFT adapter for this config and data: reused from the cache, or trained and cached atomically."""
    path = sft_cache_dir(cfg, examples, system_prompt)
    if (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file():
        log(f"sft: reusing the cached adapter {path}")
        return path
    log(f"sft: training a warm-start adapter (cached at {path})")
    train_sft(
        loaded,
        examples,
        system_prompt,
        cfg.lora,
        cfg.sft,
        path,
        cfg.run.seed,
        log=log,
        meta=sft_cache_key(cfg, examples, system_prompt),
        overwrite=False,
    )
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m essa_hpc.sft`` / ``essa-sft``: train (or reuse) the warm-start adapter of a config."""
    from essa_hpc.config import ConfigError, load_config
    from essa_hpc.svd_lora import AdapterError
    from essa_hpc.tasks.base import TaskError

    ap = argparse.ArgumentParser(prog="essa-sft", description="LoRA SFT warm start for ESSA; writes a PEFT adapter folder.")
    ap.add_argument("--config", help="YAML config file (default: the embedded default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, e.g. sft.steps=50 (repeatable)")
    ap.add_argument("--out", help="adapter folder to write (replaced atomically); default: the SFT cache, path printed")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        models.set_threads(cfg.model.threads, 1)
        from essa_hpc.tasks import make_task, sft_examples

        task = make_task(cfg)
        examples = sft_examples(task, cfg)
        system = cfg.task.system_prompt if cfg.task.system_prompt is not None else getattr(task, "system_prompt", None)
        loaded = models.load(cfg.model)
        if args.out:
            stats = train_sft(loaded, examples, system, cfg.lora, cfg.sft, Path(args.out), cfg.run.seed)
            path = Path(args.out)
        else:
            path = cached_sft_adapter(cfg, loaded, examples, system)
            stats = json.loads((path / STATS_FILE).read_text()) if (path / STATS_FILE).is_file() else {}
            stats.pop("meta", None)
    except (ConfigError, models.ModelError, AdapterError, SftError, TaskError) as e:
        print(f"essa-sft: error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    print(json.dumps({"adapter": str(path), **stats}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
