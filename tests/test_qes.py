"""QES on a tiny random model quantized in-process with torchao (essa_hpc/spaces/qes.py).

Real torchao layouts (int8 ``Int8Tensor``, int4 ``IntxUnpackedToInt8Tensor``), real forward passes:
no code ever leaves its integer range, a candidate is undone exactly, the replayed residual equals the
stored one bit for bit, the flips are counted, and a state dict resumes bit-identically.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torchao")

from essa_hpc.models import tiny_model
from essa_hpc.quantize import quantize_model
from essa_hpc.search import centered_ranks
from essa_hpc.spaces import qes

torch.set_num_threads(1)


def quantized(scheme: str, seed: int = 0) -> torch.nn.Module:
    model = tiny_model(seed=seed, hidden_size=32, layers=1).model
    return quantize_model(model, scheme)


def space_of(scheme: str, **kw: object) -> qes.QESSpace:
    return qes.QESSpace(qes.find_codes(quantized(scheme)), 11, **kw)  # type: ignore[arg-type]


def codes_of(space: qes.QESSpace) -> list[torch.Tensor]:
    return [c.data.clone() for c in space.codes]


def in_range(space: qes.QESSpace) -> bool:
    return all(int(c.data.min()) >= c.lo and int(c.data.max()) <= c.hi for c in space.codes)


def candidate(gen: int, cand: int, sigma: float) -> np.ndarray:
    """The es optimizer's seed-code row of candidate ``cand``: (g, pair, ±σ)."""
    return np.array([gen, cand // 2, sigma if cand % 2 == 0 else -sigma], dtype=np.float64)


def step_rows(gen: int, rewards: np.ndarray, lr: float, sigma: float) -> np.ndarray:
    """The es optimizer's update rows (g, k, w_k), w_k = α/(λσ)(f̂_2k − f̂_2k+1) with centered ranks (ES-3)."""
    u = centered_ranks(rewards)
    w = lr / (u.size * sigma) * (u[0::2] - u[1::2])
    return np.stack([np.full(w.size, float(gen)), np.arange(w.size, dtype=np.float64), w], axis=1)


def run_updates(space: qes.QESSpace, gens: range, lr: float, sigma: float, popsize: int = 4, rng_seed: int = 7) -> list[qes.Update]:
    return [space.update(step_rows(g, np.random.default_rng((rng_seed, g)).normal(size=popsize), lr, sigma)) for g in gens]


@pytest.mark.parametrize("scheme,lo,hi,layout", [("int8", -128, 127, "Int8Tensor"), ("int4", -8, 7, "IntxUnpackedToInt8Tensor")])
def test_layouts_found_with_their_ranges(scheme: str, lo: int, hi: int, layout: str) -> None:
    codes = qes.find_codes(quantized(scheme))
    assert len(codes) == 7  # q, k, v, o, gate, up, down of the one layer; the LM head stays float
    assert {(c.lo, c.hi, c.layout) for c in codes} == {(lo, hi, layout)}
    assert all(c.data.dtype == torch.int8 for c in codes)


def test_unquantized_and_unsupported_models_are_refused() -> None:
    with pytest.raises(qes.QESError, match=r"model\.quantization"):
        qes.find_codes(tiny_model(hidden_size=32, layers=1).model)
    from torchao.quantization import to_nf4

    model = tiny_model(hidden_size=32, layers=1).model
    lin = model.model.layers[0].self_attn.q_proj
    lin.weight = torch.nn.Parameter(to_nf4(lin.weight.detach(), 32, 2), requires_grad=False)
    with pytest.raises(qes.QESError, match=r"model\.quantization: layer .*q_proj stores its weight as NF4Tensor"):
        qes.find_codes(model)


@pytest.mark.parametrize("key,kwargs", [("search.qes_window", {"window": 0}), ("search.qes_residual", {"residual": "fp16"})])
def test_bad_settings_name_the_key(key: str, kwargs: dict) -> None:
    with pytest.raises(qes.QESError, match=key.replace(".", r"\.")):
        space_of("int4", **kwargs)


def test_noise_is_counter_based_and_differs_between_same_shape_tensors() -> None:
    a = qes.code_noise(3, 5, 1, 0, (16, 32), 0.7, 15)
    assert torch.equal(a, qes.code_noise(3, 5, 1, 0, (16, 32), 0.7, 15))  # a pure function of its counters
    assert torch.equal(-a, qes.code_noise(3, 5, 1, 0, (16, 32), -0.7, 15))  # the antithetic twin, exactly
    assert not torch.equal(a, qes.code_noise(3, 5, 1, 1, (16, 32), 0.7, 15))  # same shape, next tensor
    assert not torch.equal(a, qes.code_noise(3, 6, 1, 0, (16, 32), 0.7, 15))  # next generation
    big = qes.code_noise(3, 5, 1, 0, (64, 512), 4.0, 15)
    assert int(big.abs().max()) <= 15 and 3.5 < float(big.float().std()) < 4.5
    assert abs(float((big.float() - 4.0 * qes.unit_noise(3, 5, 1, 0, (64, 512))).mean())) < 0.02  # E[u | z] = σz


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_perturb_stays_in_range_and_restores_exactly(scheme: str) -> None:
    model = quantized(scheme)
    space = qes.QESSpace(qes.find_codes(model), 11)
    before = codes_of(space)
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    logits0 = model(ids).logits
    sigma = 6.0 if scheme == "int4" else 20.0  # large: many entries reach the range and are masked
    masked = 0
    for cand in range(4):
        with space.perturbed(candidate(0, cand, sigma)):
            assert in_range(space)
            assert any(not torch.equal(c.data, b) for c, b in zip(space.codes, before, strict=True))
            assert not torch.allclose(model(ids).logits, logits0)  # the forward pass reads the perturbed codes
            assert space._pending is not None
            masked += sum(m.size for m in space._pending.masked)
        assert all(torch.equal(c.data, b) for c, b in zip(space.codes, before, strict=True))
    assert masked > 0  # the masking at the range was exercised
    assert torch.equal(model(ids).logits, logits0)
    with space.perturbed(np.zeros(3)):  # the zero row: the current codes
        assert all(torch.equal(c.data, b) for c, b in zip(space.codes, before, strict=True))


def test_antithetic_pair_moves_the_codes_in_opposite_directions() -> None:
    space = space_of("int8")
    base = codes_of(space)
    moves = []
    for cand in (0, 1):
        p = space.perturb(candidate(4, cand, 0.8))
        moves.append(([c.data.to(torch.int16) - b.to(torch.int16) for c, b in zip(space.codes, base, strict=True)], p.masked))
        space.restore(p)
    (up, m_up), (down, m_down) = moves
    for u, d, mu, md in zip(up, down, m_up, m_down, strict=True):
        keep = torch.ones(u.numel(), dtype=torch.bool)
        keep[torch.from_numpy(mu)] = False
        keep[torch.from_numpy(md)] = False
        assert torch.equal(u.view(-1)[keep], -d.view(-1)[keep])
    assert sum(int((u != 0).sum()) for u in up) > 0


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_replayed_residual_equals_stored_and_codes_agree(scheme: str) -> None:
    window, sigma, lr = 5, 0.6, 0.5
    spaces = {mode: space_of(scheme, window=window, decay=0.9, residual=mode) for mode in qes.RESIDUALS}
    flips = 0
    for g in range(7):  # crosses a reset (after update 5)
        rows = step_rows(g, np.random.default_rng((1, g)).normal(size=6), lr, sigma)
        got = {mode: s.update(rows) for mode, s in spaces.items()}
        assert got["replay"] == got["stored"]
        flips += got["replay"].flipped
        replay, stored = spaces["replay"], spaces["stored"]
        for a, b in zip(replay.residual(), stored.residual(), strict=True):
            assert torch.equal(a, b)  # bit for bit
            assert float(a.abs().max()) <= 0.5
        for a, b in zip(stored.replayed_residual(), stored.residual(), strict=True):
            assert torch.equal(a, b)
        assert replay.weight_digest() == stored.weight_digest()
        assert in_range(replay)
        if (g + 1) % window:
            assert any(float(r.abs().max()) > 0 for r in replay.residual())  # something is carried
    assert flips > 0
    assert spaces["replay"].digest() != spaces["stored"].digest()  # the state differs (stored residuals), the codes agree


def test_error_feedback_flips_codes_that_single_steps_cannot() -> None:
    """Updates below half a code flip little without a residual (K = 1) and more with one."""
    counts = {}
    for window in (1, 8):
        space = space_of("int8", window=window)
        counts[window] = sum(s.flipped for s in run_updates(space, range(8), lr=0.4, sigma=0.5))
    assert counts[1] < counts[8]
    assert counts[8] > 0


def test_flips_are_counted_and_clamped_at_the_range() -> None:
    space = space_of("int4", window=3)
    before = codes_of(space)
    st = space.update(step_rows(0, np.array([3.0, -1.0, 0.5, 2.0]), 20.0, 1.0))
    changed = sum(int((c.data != b).sum()) for c, b in zip(space.codes, before, strict=True))
    assert st.flipped == changed > 0
    assert st.blocked > 0  # a large step is cut at [-8, 7]
    assert st.attempted >= st.flipped and st.codes == sum(c.numel for c in space.codes)
    assert in_range(space)


def test_state_dict_resumes_bit_identically() -> None:
    full = space_of("int4", window=4)
    run_updates(full, range(6), lr=0.3, sigma=0.6)
    first = space_of("int4", window=4)
    run_updates(first, range(3), lr=0.3, sigma=0.6)
    saved = first.state_dict()
    resumed = space_of("int4", window=4)
    resumed.load_state_dict(saved)
    assert resumed.digest() == first.digest()
    run_updates(resumed, range(3, 6), lr=0.3, sigma=0.6)
    assert resumed.digest() == full.digest()
    other = space_of("int4", window=5)
    with pytest.raises(ValueError, match="window"):
        other.load_state_dict(saved)
