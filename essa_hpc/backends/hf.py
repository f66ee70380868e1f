"""transformers backend: every candidate of a rank in one batched decode loop over one base model.

How a population shares one model
---------------------------------
Each adapted projection ``W`` (a ``nn.Linear``, possibly quantized) is wrapped by `SvdLoraLinear`. For a
candidate c the SVD-LoRA update is (svd_lora.py)

    ΔW_c = s · B_c · A_c,   A_c = U_A diag(σ_A[c]) V_Aᵀ  (r×n),   B_c = U_B diag(σ_B[c]) V_Bᵀ  (m×r).

transformers applies a linear layer to row vectors, y = x Wᵀ, so for a row x (1×n) of candidate c

    x ΔW_cᵀ = s · x A_cᵀ B_cᵀ
            = s · x V_A diag(σ_A[c]) U_Aᵀ · V_B diag(σ_B[c]) U_Bᵀ
            = ((((x V_A) ⊙ σ_A[c]) · M) ⊙ (s·σ_B[c])) · U_Bᵀ,     M = U_Aᵀ V_B  (r×r).

``diag(σ)`` on the right of a row vector is an element-wise product, so everything that differs between
candidates is two r-vectors per matrix (σ_A[c] and s·σ_B[c]); the frozen V_A (n×r), M (r×r) and U_Bᵀ
(r×m) are shared by the whole population. Cost per token: n·r + r² + r·m multiply-adds next to the base
layer's n·m (r = 8, n = m = 576: 2.8 %). No weight is merged and no adapter is loaded per candidate; before
a batch the backend hands every wrapper a per-row table ``σ[row] = σ[candidate of row]``.

Decoding
--------
A plain decode loop with a KV cache (left padding, attention mask, explicit position ids, logits of the
last position only), so that a request's completion depends on nothing but its own prompt, candidate
and seed:

* greedy: argmax (first index on ties);
* sampling: temperature, then top-p, then inverse-CDF sampling with one uniform per (request, step)
  drawn from ``numpy.random.PCG64(request.seed)``: the same numbers on every rank and device, whatever
  else is in the batch;
* rows finish independently (EOS, stop string, max_new_tokens, or the model's context); finished rows are
  dropped from the batch (the KV cache is compacted) once a quarter of the rows are done, and the loop
  ends when every row is done; stop strings cut the decoded text (the stop string is not kept).

Numerically a row's logits still differ in the last bits between batch compositions: padded rows see
different kernel blockings and masked-key reductions (embedded model, float32 CPU: up to ~5e-5 absolute
on logits of O(10); an unpadded row is bitwise equal). Token ids therefore agree unless two tokens tie
to within that margin; tests/test_hf_backend.py checks greedy and sampled ids alone vs inside a
population on the tiny model, and bench/bench_eval.py on the embedded model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from essa_hpc.backends.base import Completion, GenerationArgs, Request, resolve_generation
from essa_hpc.spaces.base import BatchedPerturbation, RowModule, SequentialPerturbation, distinct
from essa_hpc.svd_lora import LoraModuleSVD, SvdLora

COMPACT_FRACTION = 0.25  # drop finished rows from the batch once this fraction of the active rows is done


class SvdLoraLinear(nn.Module):
    """``base(x) + s·((((x V_A) ⊙ σ_A[row]) M) ⊙ σ_B[row]) U_Bᵀ`` with per-row σ tables (see module doc).

    Without a σ table set (outside `HFBackend.rows` or a generate call) it is exactly the base layer.
    """

    V_A: torch.Tensor
    M: torch.Tensor
    U_Bt: torch.Tensor

    def __init__(self, base: nn.Module, module: LoraModuleSVD, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.base = base
        self.name = module.name
        self.scaling = float(module.scaling)
        self.in_features = int(module.A.V.shape[0])
        self.out_features = int(module.B.U.shape[0])
        M = module.A.U.mT @ module.B.V  # float64, r×r
        self.register_buffer("V_A", module.A.V.to(device=device, dtype=dtype).contiguous(), persistent=False)
        self.register_buffer("M", M.to(device=device, dtype=dtype).contiguous(), persistent=False)
        self.register_buffer("U_Bt", module.B.U.mT.to(device=device, dtype=dtype).contiguous(), persistent=False)
        self.sa: torch.Tensor | None = None  # [rows, 1, r]
        self.sb: torch.Tensor | None = None  # [rows, 1, r], scaling folded in

    def set_rows(self, sa: torch.Tensor | None, sb: torch.Tensor | None) -> None:
        self.sa, self.sb = sa, sb

    def select(self, table: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> None:
        """Batch row i runs candidate ``rows[i]`` of the (σ_A, s·σ_B) table (spaces.base.RowModule)."""
        sa, sb = table
        self.set_rows(sa.index_select(0, rows), sb.index_select(0, rows))

    def clear(self) -> None:
        self.set_rows(None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.sa is None or self.sb is None:
            return y
        if x.dim() != 3 or x.shape[0] != self.sa.shape[0]:
            raise RuntimeError(f"{self.name}: input {tuple(x.shape)} does not match the {self.sa.shape[0]} rows of the σ table")
        h = x.to(self.V_A.dtype) @ self.V_A
        h = (h * self.sa) @ self.M
        h = h * self.sb
        if h.dtype == y.dtype:
            return y.add_(h @ self.U_Bt)
        return y.add_((h @ self.U_Bt).to(y.dtype))


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, leaf = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), leaf


def _float_dtype(model: Any) -> torch.dtype:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and emb.weight.dtype.is_floating_point:
        return emb.weight.dtype
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


class HFBackend:
    """Population evaluation on one transformers causal LM (CPU or one GPU, optionally quantized).

    ``generate(vectors, requests)`` evaluates all candidates of this rank in one batched decode loop,
    chunked only by ``max_batch_sequences``. ``svd=None`` evaluates the plain base model (any vectors
    of shape [n, 0] or None).

    ``svd`` is a search space's backend view (docs/design.md, "Search spaces"): an ``SvdLora`` (the
    σ-table wrappers above), a ``BatchedPerturbation`` (the space's own per-row wrappers, the same one
    batched loop) or a ``SequentialPerturbation`` (requests grouped by candidate, each group decoded
    while the space holds that candidate's weights).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        svd: SvdLora | BatchedPerturbation | SequentialPerturbation | None,
        *,
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        max_batch_sequences: int = 256,
        adapter_dtype: torch.dtype | None = None,
        ignore_eos: bool = False,
        sort_by_length: bool = True,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"backend.max_new_tokens: expected >= 1, got {max_new_tokens}")
        if max_batch_sequences < 1:
            raise ValueError(f"backend.max_batch_sequences: expected >= 1, got {max_batch_sequences}")
        self.model = model
        self.tokenizer = tokenizer
        self.svd = svd
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.stop = [s for s in stop if s]
        self.max_batch_sequences = max_batch_sequences
        self.ignore_eos = ignore_eos
        self.sort_by_length = sort_by_length
        self.device = next(model.parameters()).device
        self.adapter_dtype = adapter_dtype or _float_dtype(model)
        self.solution_length = svd.solution_length if svd is not None else 0
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 10**9
        self.pad_id = self._pad_id()
        self.eos_ids = self._eos_ids()
        self.wrappers: list[RowModule] = []
        self._originals: list[tuple[str, nn.Module]] = []
        self.sequential = svd if isinstance(svd, SequentialPerturbation) and not isinstance(svd, SvdLora) else None
        if isinstance(svd, SvdLora):
            self._patch(svd)
        elif isinstance(svd, BatchedPerturbation):
            self.wrappers = [w for _, w in svd.wrap(self.model, self.adapter_dtype, self.device)]

    @classmethod
    def from_config(cls, cfg: Any, loaded: Any, svd: Any) -> HFBackend:
        """From a Config (backend section) and a models.Loaded."""
        b = cfg.backend
        return cls(
            loaded.model,
            loaded.tokenizer,
            svd,
            max_new_tokens=b.max_new_tokens,
            temperature=b.temperature,
            top_p=b.top_p,
            stop=list(b.stop),
            max_batch_sequences=b.max_batch_sequences,
        )

    # ----------------------------------------------------------------------------------------- patching

    def _patch(self, svd: SvdLora) -> None:
        for m in svd.modules:
            try:
                base = self.model.get_submodule(m.name)
            except AttributeError:
                raise ValueError(
                    f"adapter module {m.name}: no such module in the base model "
                    f"({type(self.model).__name__}); does the adapter belong to this model?"
                ) from None
            n_in, n_out = getattr(base, "in_features", None), getattr(base, "out_features", None)
            if n_in is None or n_out is None:
                raise ValueError(f"adapter module {m.name}: the base module is a {type(base).__name__}, not a linear layer")
            if (m.A.V.shape[0], m.B.U.shape[0]) != (n_in, n_out):
                raise ValueError(
                    f"adapter module {m.name}: adapter maps {m.A.V.shape[0]} -> {m.B.U.shape[0]} features, the base layer {n_in} -> {n_out}"
                )
            wrapper = SvdLoraLinear(base, m, self.adapter_dtype, self.device)
            parent, leaf = _parent(self.model, m.name)
            setattr(parent, leaf, wrapper)
            self._originals.append((m.name, base))
            self.wrappers.append(wrapper)

    def close(self) -> None:
        """Put the original layers back (the model is the plain base model again)."""
        if isinstance(self.svd, BatchedPerturbation) and not isinstance(self.svd, SvdLora):
            self.svd.unwrap(self.model)
        for name, base in reversed(self._originals):
            parent, leaf = _parent(self.model, name)
            setattr(parent, leaf, base)
        self._originals.clear()
        self.wrappers.clear()

    # ----------------------------------------------------------------------------------------- tables

    def sigma_tables(self, vectors: np.ndarray) -> list[Any]:
        """Per wrapper (σ_A[c, 1, r], s·σ_B[c, 1, r]) in the adapter dtype on the model's device (a
        batched space: its own per-candidate tables; a sequential one: none)."""
        if isinstance(self.svd, BatchedPerturbation) and not isinstance(self.svd, SvdLora):
            return self.svd.tables(vectors, self.adapter_dtype, self.device)
        if not isinstance(self.svd, SvdLora):
            return []
        out = []
        for w, (sa, sb) in zip(self.wrappers, self.svd.sigma_batch(vectors)):
            assert isinstance(w, SvdLoraLinear)  # an SVD-LoRA installs its own wrappers (_wrap)
            on_device = self.device, self.adapter_dtype
            out.append((sa.to(*on_device).unsqueeze(1), (w.scaling * sb).to(*on_device).unsqueeze(1)))
        return out

    @contextmanager
    def rows(self, tables: list[Any], candidates: torch.Tensor) -> Iterator[None]:
        """Within the block, batch row i runs candidate ``candidates[i]``."""
        try:
            self._select(tables, candidates)
            yield
        finally:
            for w in self.wrappers:
                w.clear()

    def _select(self, tables: list[Any], candidates: torch.Tensor) -> None:
        idx = candidates.to(self.device)
        for w, table in zip(self.wrappers, tables):
            w.select(table, idx)

    def check_vectors(self, vectors: np.ndarray | None, n_requests_hint: int = 0) -> np.ndarray:
        if vectors is None:
            if self.solution_length:
                raise ValueError(f"candidate vectors missing: expected an array [n_candidates, {self.solution_length}]")
            return np.zeros((max(1, n_requests_hint), 0))
        X = np.asarray(vectors, dtype=np.float64)
        if X.ndim == 1:
            X = X[None, :]
        if X.ndim != 2 or X.shape[1] != self.solution_length:
            raise ValueError(
                f"candidate vectors have shape {tuple(np.shape(vectors))}; expected [n_candidates, d] "
                f"with d = solution_length = {self.solution_length}"
            )
        if not np.isfinite(X).all():
            bad = sorted({int(i) for i in np.argwhere(~np.isfinite(X))[:, 0]})
            raise ValueError(f"candidate vectors {bad[:8]} contain NaN or inf")
        return X

    @torch.inference_mode()
    def forward_logits(
        self, vectors: np.ndarray, candidates: Sequence[int], input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Full-sequence logits with row i under candidate ``candidates[i]`` (for tests and scoring)."""
        X = self.check_vectors(vectors)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.sequential is not None:  # one candidate's rows at a time, under its weights
            out = None
            for c in distinct(candidates):
                sel = torch.tensor([i for i, ci in enumerate(candidates) if int(ci) == c])
                with self.sequential.perturbed(X[c]):
                    logits = self._plain_logits(input_ids[sel], attention_mask[sel])
                out = logits.new_empty((len(candidates), *logits.shape[1:])) if out is None else out
                out[sel.to(out.device)] = logits
            assert out is not None
            return out
        cand = torch.as_tensor(list(candidates), dtype=torch.long)
        with self.rows(self.sigma_tables(X), cand):
            return self._plain_logits(input_ids, attention_mask)

    def _plain_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=pos.to(self.device),
            use_cache=False,
        )
        return out.logits

    # ----------------------------------------------------------------------------------------- generate

    def generate(
        self,
        vectors: np.ndarray | None,
        requests: Sequence[Request],
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        ignore_eos: bool | None = None,
    ) -> list[Completion]:
        """One completion per request, in request order; all candidates in one batched loop per chunk.

        Arguments left as None take the backend's settings; ``ignore_eos`` generates exactly
        max_new_tokens per request (benchmarks).
        """
        ids = self.generate_ids(vectors, requests, max_new_tokens, temperature, top_p, ignore_eos)
        return [Completion(text=self._cut(self.tokenizer.decode(t, skip_special_tokens=True)), tokens=len(t)) for t in ids]

    def generate_ids(
        self,
        vectors: np.ndarray | None,
        requests: Sequence[Request],
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        ignore_eos: bool | None = None,
    ) -> list[list[int]]:
        """Generated token ids per request (EOS included where a row ended on it), before stop-string cutting."""
        if len(requests) == 0:
            return []
        X = self.check_vectors(vectors, len(requests))
        defaults = GenerationArgs(self.max_new_tokens, self.temperature, self.top_p, self.ignore_eos)
        g = resolve_generation(defaults, requests, X.shape[0], max_new_tokens, temperature, top_p, ignore_eos)
        max_new, temp, tp, no_eos = g.max_new_tokens, g.temperature, g.top_p, g.ignore_eos
        ids = self._tokenize([r.prompt for r in requests])
        for i, t in enumerate(ids):
            if len(t) == 0:
                raise ValueError(f"request {i} (candidate {requests[i].candidate}): the prompt is empty (0 tokens)")
            if len(t) >= self.context:
                raise ValueError(
                    f"request {i} (candidate {requests[i].candidate}): the prompt has {len(t)} tokens, "
                    f"the model's context is {self.context} (max_position_embeddings); shorten the prompt"
                )
        results: list[list[int]] = [[] for _ in requests]
        if self.sequential is not None:  # one candidate at a time, its requests in one batched loop
            for c in distinct([int(r.candidate) for r in requests]):
                group = [i for i, r in enumerate(requests) if int(r.candidate) == c]
                with self.sequential.perturbed(X[c]):
                    self._decode_all([], ids, requests, group, results, max_new, temp, tp, no_eos)
            return results
        self._decode_all(self.sigma_tables(X), ids, requests, list(range(len(requests))), results, max_new, temp, tp, no_eos)
        return results

    def _decode_all(
        self,
        tables: list[Any],
        ids: list[list[int]],
        requests: Sequence[Request],
        subset: list[int],
        results: list[list[int]],
        max_new: int,
        temp: float,
        top_p: float,
        no_eos: bool,
    ) -> None:
        """Decode the requests ``subset`` (indices into ``requests``) in chunks of max_batch_sequences."""
        tp = top_p
        order = sorted(subset, key=lambda i: len(ids[i])) if self.sort_by_length else list(subset)
        step = self.max_batch_sequences
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            toks = self._decode_chunk(
                tables,
                [ids[i] for i in chunk],
                [int(requests[i].candidate) for i in chunk],
                [int(requests[i].seed) for i in chunk],
                max_new,
                temp,
                tp,
                no_eos,
            )
            for i, t in zip(chunk, toks):
                results[i] = t

    def _tokenize(self, prompts: list[str]) -> list[list[int]]:
        enc = self.tokenizer(prompts, add_special_tokens=False)
        return [list(map(int, t)) for t in enc["input_ids"]]

    def _pad_id(self) -> int:
        for v in (
            getattr(self.tokenizer, "pad_token_id", None),
            getattr(self.model.config, "pad_token_id", None),
            getattr(self.tokenizer, "eos_token_id", None),
        ):
            if isinstance(v, int):
                return v
        return 0

    def _eos_ids(self) -> list[int]:
        out: set[int] = set()
        gc = getattr(self.model, "generation_config", None)
        for v in (
            getattr(self.tokenizer, "eos_token_id", None),
            getattr(gc, "eos_token_id", None),
            getattr(self.model.config, "eos_token_id", None),
        ):
            if isinstance(v, int):
                out.add(v)
            elif isinstance(v, (list, tuple)):
                out.update(int(x) for x in v)
        return sorted(out)

    def _cut(self, text: str) -> str:
        cut = len(text)
        for s in self.stop:
            k = text.find(s)
            if k >= 0:
                cut = min(cut, k)
        return text[:cut]

    def _has_stop(self, tokens: list[int]) -> bool:
        if not self.stop:
            return False
        tail = max(len(s) for s in self.stop) + 8  # a stop string spans at most this many tokens (plus margin)
        text = self.tokenizer.decode(tokens[-tail:], skip_special_tokens=True)
        if not any(s in text for s in self.stop):
            return False
        full = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in full for s in self.stop)

    def _select_tokens(self, logits: torch.Tensor, temp: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
        """Next token per row: argmax at temp 0, else inverse-CDF sampling with the row's uniform u ∈ [0, 1)."""
        if temp == 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.double() / temp, dim=-1)
        if top_p < 1.0:
            sp, si = torch.sort(probs, dim=-1, descending=True, stable=True)
            before = sp.cumsum(-1) - sp  # mass strictly before each token
            sp = sp.masked_fill(before >= top_p, 0.0)  # keep the smallest prefix with mass >= top_p
            c = sp.cumsum(-1)
            k = torch.searchsorted(c, (u * c[:, -1]).unsqueeze(1), right=True).clamp_(max=c.shape[1] - 1)
            # never land on a zeroed tail token through rounding: step back to the last kept one
            kept = (sp > 0).sum(-1, keepdim=True) - 1
            k = torch.minimum(k, kept)
            return si.gather(1, k).squeeze(1)
        c = probs.cumsum(-1)
        k = torch.searchsorted(c, (u * c[:, -1]).unsqueeze(1), right=True).clamp_(max=c.shape[1] - 1)
        return k.squeeze(1)

    @torch.inference_mode()
    def _decode_chunk(
        self,
        tables: list[Any],
        prompts: list[list[int]],
        cands: list[int],
        seeds: list[int],
        max_new: int,
        temp: float,
        top_p: float,
        ignore_eos: bool,
    ) -> list[list[int]]:
        from transformers import DynamicCache

        dev = self.device
        B = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        W = int(lens.max())
        input_ids = torch.full((B, W), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, W), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, W - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, W - len(p) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        budget = torch.clamp(self.context - lens, max=max_new)  # per row: max_new_tokens, or what the context leaves
        uniforms = None
        if temp > 0:
            uniforms = torch.from_numpy(np.stack([np.random.Generator(np.random.PCG64(s)).random(max_new) for s in seeds]))
        eos = set(self.eos_ids)
        out: list[list[int]] = [[] for _ in range(B)]
        finished = [False] * B
        active = torch.arange(B)  # original row of each batch row
        cand = torch.tensor(cands, dtype=torch.long)
        cache = DynamicCache(config=self.model.config)
        mask_d = mask.to(dev)
        next_pos = lens.clone()
        try:
            self._select(tables, cand)
            logits = self.model(
                input_ids=input_ids.to(dev),
                attention_mask=mask_d,
                position_ids=pos.to(dev),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1, :]
            for step in range(max_new):
                u = uniforms[active, step].to(dev) if uniforms is not None else torch.empty(0)
                tok = self._select_tokens(logits.float(), temp, top_p, u).cpu()
                rows = active.tolist()
                for j, row in enumerate(rows):
                    if finished[row]:
                        continue
                    t = int(tok[j])
                    out[row].append(t)
                    if len(out[row]) >= int(budget[row]) or (not ignore_eos and t in eos) or (self.stop and self._has_stop(out[row])):
                        finished[row] = True
                done = torch.tensor([finished[row] for row in rows], dtype=torch.bool)
                if bool(done.all()):
                    break
                if int(done.sum()) >= max(1.0, COMPACT_FRACTION * len(rows)):
                    # drop finished rows: cache, mask, σ tables and bookkeeping shrink to the active rows
                    keep = (~done).nonzero().squeeze(1)
                    cache.reorder_cache(keep.to(dev))  # type: ignore[arg-type]
                    mask_d = mask_d.index_select(0, keep.to(dev))
                    active, tok, next_pos = active[keep], tok[keep], next_pos[keep]
                    self._select(tables, cand[active])
                mask_d = torch.cat([mask_d, mask_d.new_ones((len(active), 1))], dim=1)
                logits = self.model(
                    input_ids=tok.unsqueeze(1).to(dev),
                    attention_mask=mask_d,
                    position_ids=next_pos.unsqueeze(1).to(dev),
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1, :]
                next_pos = next_pos + 1
        finally:
            for w in self.wrappers:
                w.clear()
        return out


def create(cfg: Any, loaded: Any, svd: Any) -> HFBackend:
    """make_backend's entry: quantize the base model as ``model.quantization`` asks, then wrap it."""
    if loaded is None:
        raise ValueError("backend.name=hf needs a loaded model (models.load)")
    from essa_hpc.quantize import quantize_model

    quantize_model(loaded.model, cfg.model.quantization)
    return HFBackend.from_config(cfg, loaded, svd)
