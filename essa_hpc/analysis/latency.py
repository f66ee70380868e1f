"""The per-iteration latency model of the ESSA paper's Appendix B (arXiv 2507.04453), and its fit to logs.

Notation (one iteration = one GRPO gradient step, or one ESSA generation; G GPUs):

    GRPO, a fraction θ of the GPUs trains (forward + backward), 1 − θ generate rollouts:
        T_grad(θ) = (B_grad / G) · max(m_fb·η_fb / θ, m_gen·η_gen / (1 − θ)) + 2·M_params·(G − 1) / (G·bw)
    The max is smallest where both arguments are equal (Lemma B.1):
        θ* = m_fb·η_fb / (m_fb·η_fb + m_gen·η_gen)
        T*_grad = (B_grad / G)·(m_fb·η_fb + m_gen·η_gen) + 2·M_params·(G − 1) / (G·bw)
    ESSA, every GPU generates for its share of the population; one small collective:
        T_essa = N_pop·B_essa·m_gen·η_gen / G + M_essa·(G − 1) / (G·bw),   M_essa = 8 bytes
    Population bound (Theorem B.2): T_essa ≤ T*_grad  ⇔  N_pop ≤ N_max(G) with
        N_max(G) = [B_grad·(m_fb·η_fb + m_gen·η_gen) + (2·M_params − M_essa)·(G − 1) / bw] / (B_essa·m_gen·η_gen)
    N_max grows linearly with G: the bigger the cluster, the larger the population ESSA affords per
    gradient step of the same duration.

Symbols: B_grad sequences per gradient step; m_fb tokens per sequence in forward + backward (prompt +
completion); m_gen generated tokens per sequence; η_fb seconds per token for forward + backward on one
GPU; η_gen seconds per generated token on one GPU (decoding at the engine's batch size); M_params bytes
of the gradient all-reduced (ring all-reduce moves 2·(G − 1)/G of it per GPU); bw the bottleneck link
bandwidth in bytes/s; N_pop the population λ; B_essa prompts per candidate. The model is continuous (θ·G
need not be an integer, N_pop·B_essa/G need not divide evenly) and has no latency terms, like the paper's.

The paper's symbols and eq. (1). The paper writes m_fb and m_gen for the GPUs of one training and
one generation model instance and η_fb, η_gen for the seconds one instance spends per sequence; above,
m is tokens per sequence and η seconds per token on one GPU. Only the products enter the formulas, and
both products are GPU-seconds per sequence (paper: m GPUs × η s; here: m tokens × η GPU-s/token), so
every formula above reads the same in the paper's symbols. The paper's M_essa is what a candidate
sends: its seed and reward, 2 × 4 bytes (M_ESSA_PAPER_BYTES); the Allgather of a generation moves
N_pop·M_essa. Our reading of eq. (1), the bound without ESSA's communication (a few hundred bytes
against GRPO's gigabytes):

    (1)  N_pop ≤ (B_grad / B_essa)·(1 + m_fb·η_fb / (m_gen·η_gen)) + 2·M_params·(G − 1) / (B_essa·m_gen·η_gen·bw)

and the exact form beside it (`population_bound_exact`), T_essa ≤ T*_grad with the Allgather of
N_pop·M_essa bytes kept:

    N_pop ≤ [B_grad·(m_fb·η_fb + m_gen·η_gen) + 2·M_params·(G − 1)/bw] / [B_essa·m_gen·η_gen + M_essa·(G − 1)/bw]

Both are continuous. Whole items: with I = ⌊G / m_gen⌋ instances and λ·B_essa (candidate, prompt)
items, a generation lasts as long as the busiest instance, ⌈λ·B_essa / I⌉ items with balanced dealing
(dist.assign when I > λ), so ESSA's generation time is the continuous term divided by
`dealing_efficiency` (docs/design.md, "Balanced dealing"; "candidate" dealing is the earlier rule,
rank r takes candidate r mod λ and splits it with the ranks of the same candidate).

η_gen is fitted from our own logs (`fit_eta_gen`): the seconds each rank spent in the "generate" phase
(/gen/timings) against the tokens it generated (/gen/tokens). η_fb, M_params and bw come from arguments
or from PRESETS, whose numbers are assumptions documented in `Preset.notes` and analysis/README.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

M_ESSA_BYTES = 8.0  # t_essa's default M_essa: the bytes of one candidate's record
M_ESSA_PAPER_BYTES = 2 * 4.0  # the paper's M_essa: one candidate's seed and reward, 4 bytes each

H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM datasheet: dense BF16 tensor-core peak (no sparsity)
NVLINK_BW = 900e9  # H100 SXM NVLink 4: 900 GB/s total per GPU (NVIDIA datasheet)
INFINIBAND_BW = 50e9  # one NDR 400 Gb/s InfiniBand port per GPU = 50 GB/s
GPUS_PER_NODE = 8  # HGX H100 8-GPU nodes: NVLink inside a node, InfiniBand between nodes
U_FB = 0.40  # assumed model FLOPs utilization of training (forward + backward)
U_GEN = 0.10  # assumed utilization of batched decoding (memory- and scheduling-bound)


# ----------------------------------------------------------------------------------------------------
# the formulas


def t_grad(
    theta: float, G: float, *, B_grad: float, m_fb: float, eta_fb: float, m_gen: float, eta_gen: float, M_params: float, peak_bw: float
) -> float:
    """T_grad(θ): GRPO iteration time with a fraction θ ∈ (0, 1) of G GPUs training, 1 − θ generating."""
    if not 0.0 < theta < 1.0:
        raise ValueError(f"theta must lie in (0, 1), got {theta}")
    compute = (B_grad / G) * max(m_fb * eta_fb / theta, m_gen * eta_gen / (1.0 - theta))
    return compute + allreduce_time(G, M_params, peak_bw)


def allreduce_time(G: float, M_params: float, peak_bw: float) -> float:
    """Ring all-reduce of M_params bytes over G GPUs: 2·M·(G − 1) / (G·bw)."""
    return 2.0 * M_params * (G - 1) / (G * peak_bw)


def theta_star(*, m_fb: float, eta_fb: float, m_gen: float, eta_gen: float) -> float:
    """Lemma B.1: the split that equalizes training and generation time."""
    a, b = m_fb * eta_fb, m_gen * eta_gen
    return a / (a + b)


def t_grad_star(
    G: float, *, B_grad: float, m_fb: float, eta_fb: float, m_gen: float, eta_gen: float, M_params: float, peak_bw: float
) -> float:
    """Lemma B.1: T_grad at θ*, (B_grad/G)·(m_fb·η_fb + m_gen·η_gen) + all-reduce."""
    return (B_grad / G) * (m_fb * eta_fb + m_gen * eta_gen) + allreduce_time(G, M_params, peak_bw)


def t_essa(G: float, *, N_pop: float, B_essa: float, m_gen: float, eta_gen: float, peak_bw: float, M_essa: float = M_ESSA_BYTES) -> float:
    """ESSA iteration time: N_pop·B_essa·m_gen·η_gen / G + M_essa·(G − 1) / (G·bw)."""
    return N_pop * B_essa * m_gen * eta_gen / G + M_essa * (G - 1) / (G * peak_bw)


def population_bound(
    G: float,
    *,
    B_grad: float,
    m_fb: float,
    eta_fb: float,
    m_gen: float,
    eta_gen: float,
    M_params: float,
    peak_bw: float,
    B_essa: float,
    M_essa: float = M_ESSA_BYTES,
) -> float:
    """Theorem B.2: the largest (real) N_pop with T_essa ≤ T*_grad; floor() it for a whole population."""
    budget = B_grad * (m_fb * eta_fb + m_gen * eta_gen) + (2.0 * M_params - M_essa) * (G - 1) / peak_bw
    return budget / (B_essa * m_gen * eta_gen)


def population_bound_eq1(
    G: float, *, B_grad: float, m_fb: float, eta_fb: float, m_gen: float, eta_gen: float, M_params: float, peak_bw: float, B_essa: float
) -> float:
    """Eq. (1) as we read it, in the paper's symbols (module docstring): the population bound without
    ESSA's own communication, (B_grad/B_essa)·(1 + m_fb·η_fb/(m_gen·η_gen)) + 2·M_params·(G − 1)/(B_essa·m_gen·η_gen·bw)."""
    a, b = m_fb * eta_fb, m_gen * eta_gen
    return (B_grad / B_essa) * (1.0 + a / b) + 2.0 * M_params * (G - 1) / (B_essa * b * peak_bw)


def population_bound_exact(
    G: float,
    *,
    B_grad: float,
    m_fb: float,
    eta_fb: float,
    m_gen: float,
    eta_gen: float,
    M_params: float,
    peak_bw: float,
    B_essa: float,
    M_essa: float = M_ESSA_PAPER_BYTES,
) -> float:
    """The exact form of eq. (1): the largest real N_pop with N_pop·B_essa·m_gen·η_gen/G + N_pop·M_essa·(G − 1)/(G·bw)
    ≤ T*_grad, i.e. ESSA's Allgather of N_pop records of M_essa bytes kept (module docstring)."""
    budget = B_grad * (m_fb * eta_fb + m_gen * eta_gen) + 2.0 * M_params * (G - 1) / peak_bw
    return budget / (B_essa * m_gen * eta_gen + M_essa * (G - 1) / peak_bw)


def busiest_items(N_pop: int, B_essa: int, instances: int, dealing: str = "balanced") -> int:
    """(candidate, prompt) items of the busiest instance in one generation.

    balanced: dist.assign's rule, ⌈λ·B/I⌉ when I > λ, else whole candidates round-robin (⌈λ/I⌉·B).
    candidate: the earlier rule for I > λ, rank r takes candidate r mod λ; a candidate with the fewest
    ranks, ⌊I/λ⌋, gives each of them ⌈B/⌊I/λ⌋⌉ items.
    """
    if N_pop < 1 or B_essa < 1 or instances < 1:
        raise ValueError(f"busiest_items: need N_pop, B_essa, instances >= 1, got {N_pop}, {B_essa}, {instances}")
    if dealing not in ("balanced", "candidate"):
        raise ValueError(f"dealing: expected balanced or candidate, got {dealing!r}")
    if N_pop >= instances:
        return math.ceil(N_pop / instances) * B_essa
    if dealing == "balanced":
        return math.ceil(N_pop * B_essa / instances)
    return math.ceil(B_essa / (instances // N_pop))


def dealing_efficiency(N_pop: int, B_essa: int, instances: int, dealing: str = "balanced") -> float:
    """Parallel efficiency of one generation's dealing: the mean load λ·B/I over the busiest instance's."""
    return N_pop * B_essa / instances / busiest_items(N_pop, B_essa, instances, dealing)


# ----------------------------------------------------------------------------------------------------
# presets (assumptions, see Preset.notes and analysis/README.md)


@dataclass(frozen=True)
class Preset:
    """A model on a GPU type: the hardware-side numbers of the model."""

    name: str
    params: float  # parameter count
    eta_fb: float  # s per token, forward + backward, one GPU
    eta_gen: float  # s per generated token, one GPU
    bytes_per_param: float = 2.0  # bf16 gradients
    intra_bw: float = NVLINK_BW
    inter_bw: float = INFINIBAND_BW
    gpus_per_node: int = GPUS_PER_NODE
    notes: str = ""

    @property
    def M_params(self) -> float:
        return self.params * self.bytes_per_param

    def peak_bw(self, G: int) -> float:
        """The bottleneck link: NVLink while the job fits in one node, InfiniBand beyond."""
        return self.intra_bw if self.gpus_per_node >= G else self.inter_bw


def h100_preset(name: str, params: float, source: str) -> Preset:
    """η from FLOP counts: training 6·N FLOPs/token at U_FB, decoding 2·N FLOPs/token at U_GEN of H100 peak."""
    return Preset(
        name=name,
        params=params,
        eta_fb=6.0 * params / (U_FB * H100_BF16_DENSE_FLOPS),
        eta_gen=2.0 * params / (U_GEN * H100_BF16_DENSE_FLOPS),
        notes=(
            f"{source}; {params / 1e9:.1f}e9 parameters, bf16 gradients (2 bytes/param); "
            f"eta_fb = 6N/({U_FB:.2f}·989 TFLOP/s), eta_gen = 2N/({U_GEN:.2f}·989 TFLOP/s) per GPU "
            f"(tensor parallelism folds into per-GPU throughput); bw = 900 GB/s NVLink for G <= 8, "
            f"50 GB/s InfiniBand NDR beyond"
        ),
    )


PRESETS: dict[str, Preset] = {
    "7b-h100": h100_preset("7b-h100", 7.61e9, "Qwen2.5-7B / Qwen2.5-Math-7B (model card: 7.61B parameters)"),
    "32b-h100": h100_preset("32b-h100", 32.5e9, "Qwen2.5-32B (model card: 32.5B parameters)"),
    "72b-h100": h100_preset("72b-h100", 72.7e9, "Qwen2.5-72B (model card: 72.7B parameters)"),
}


@dataclass(frozen=True)
class Workload:
    """The algorithm-side numbers. Defaults: ESSA's PRM800K/Qwen2.5-32B config (λ 48, 256 prompts per
    candidate, paper Table 7/8); the GRPO step (512 sequences = 64 prompts × 8 samples, 256 prompt +
    512 completion tokens) is an assumption, not a number from the paper."""

    B_grad: float = 512
    m_fb: float = 768
    m_gen: float = 512
    N_pop: float = 48
    B_essa: float = 256
    M_essa: float = M_ESSA_BYTES


DEFAULT_G: tuple[int, ...] = tuple(2**k for k in range(3, 11))  # 8 … 1024


def project(preset: Preset, workload: Workload = Workload(), Gs: Iterable[int] = DEFAULT_G) -> pd.DataFrame:
    """Predicted per-iteration times of GRPO (at θ*) and ESSA, speed-up and population bounds per G:
    n_pop_bound (Theorem B.2, M_essa per iteration as given), n_pop_eq1 (eq. (1) as we read it) and
    n_pop_exact (its exact form, M_essa = 2 × 4 bytes per candidate), and the dealing efficiency of
    one GPU per instance (balanced, and the earlier per-candidate rule)."""
    w = workload
    rows = []
    for G in Gs:
        bw = preset.peak_bw(G)
        common = {"m_fb": w.m_fb, "eta_fb": preset.eta_fb, "m_gen": w.m_gen, "eta_gen": preset.eta_gen}
        tg = t_grad_star(G, B_grad=w.B_grad, M_params=preset.M_params, peak_bw=bw, **common)
        te = t_essa(G, N_pop=w.N_pop, B_essa=w.B_essa, m_gen=w.m_gen, eta_gen=preset.eta_gen, peak_bw=bw, M_essa=w.M_essa)
        nmax = population_bound(G, B_grad=w.B_grad, M_params=preset.M_params, peak_bw=bw, B_essa=w.B_essa, M_essa=w.M_essa, **common)
        paper = {"B_grad": w.B_grad, "M_params": preset.M_params, "peak_bw": bw, "B_essa": w.B_essa, **common}
        n_pop, b_essa = max(1, round(w.N_pop)), max(1, round(w.B_essa))
        rows.append(
            {
                "preset": preset.name,
                "G": int(G),
                "peak_bw": bw,
                "theta_star": theta_star(**common),
                "t_grad_star": tg,
                "t_grad_allreduce": allreduce_time(G, preset.M_params, bw),
                "t_essa": te,
                "speedup": tg / te,
                "n_pop_bound": math.floor(nmax),
                "n_pop_eq1": math.floor(population_bound_eq1(G, **paper)),
                "n_pop_exact": math.floor(population_bound_exact(G, **paper)),
                "dealing_efficiency": dealing_efficiency(n_pop, b_essa, int(G)),
                "dealing_efficiency_candidate": dealing_efficiency(n_pop, b_essa, int(G), "candidate"),
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# fitting and comparing with measured runs


@dataclass
class EtaFit:
    """η_gen = Σ generate seconds / Σ tokens over (generation, rank) cells with tokens > 0."""

    eta_gen: float
    tokens: int
    seconds: float
    cells: int
    per_run: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def fit_eta_gen(rank_stats: pd.DataFrame) -> EtaFit:
    """Fit η_gen from a rank table with columns run, tokens, generate_s (analysis.load.Runs.rank_stats()).

    The ratio of sums is the least-squares slope of seconds on tokens through the origin weighted by
    1/tokens, i.e. every token counts once; a rank that generated nothing tells nothing and is skipped.
    """
    d = rank_stats[(rank_stats["tokens"] > 0) & np.isfinite(rank_stats["generate_s"])]
    if d.empty:
        raise ValueError("fit_eta_gen: no (generation, rank) cell with tokens > 0 and a generate time")
    per_run = {str(r): float(g["generate_s"].sum() / g["tokens"].sum()) for r, g in d.groupby("run", sort=False)}
    tok, sec = int(d["tokens"].sum()), float(d["generate_s"].sum())
    return EtaFit(eta_gen=sec / tok, tokens=tok, seconds=sec, cells=len(d), per_run=per_run)


def predict_measured(
    measured: pd.DataFrame, eta_gen: float, *, peak_bw: float = INFINIBAND_BW, M_essa: float = M_ESSA_BYTES
) -> pd.DataFrame:
    """Predicted T_essa for measured runs.

    `measured` has one row per run with world_size, popsize, batch_size, tokens_per_sample and the
    measured medians iter_s (whole iteration) and generate_s (slowest rank's generate phase). Adds
    `predicted_s` (the paper's T_essa with the fitted η_gen) and the ratios measured / predicted.
    """
    out = measured.copy()
    out["predicted_s"] = [
        t_essa(
            int(r.world_size),
            N_pop=float(r.popsize),
            B_essa=float(r.batch_size),
            m_gen=float(r.tokens_per_sample),
            eta_gen=eta_gen,
            peak_bw=peak_bw,
            M_essa=M_essa,
        )
        for r in out.itertuples()
    ]
    out["generate_over_predicted"] = out["generate_s"] / out["predicted_s"]
    out["iter_over_predicted"] = out["iter_s"] / out["predicted_s"]
    return out


def predict_curve(
    Gs: Iterable[int],
    *,
    N_pop: float,
    B_essa: float,
    m_gen: float,
    eta_gen: float,
    peak_bw: float = INFINIBAND_BW,
    M_essa: float = M_ESSA_BYTES,
) -> np.ndarray:
    return np.array([t_essa(G, N_pop=N_pop, B_essa=B_essa, m_gen=m_gen, eta_gen=eta_gen, peak_bw=peak_bw, M_essa=M_essa) for G in Gs])
