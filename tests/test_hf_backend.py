"""hf backend on a tiny random Llama: equivalence to peft, batch invariance, chunking, quantization, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from essa_hpc import svd_lora
from essa_hpc.backends.base import Request
from essa_hpc.backends.hf import HFBackend, SvdLoraLinear
from essa_hpc.models import tiny_model

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
R, ALPHA = 4, 8.0
PROMPTS = ["hi", "what is 2+2?", "a somewhat longer prompt, for padding", "x", "12 + 30 =", "tell me a story about a cat"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is ~10x faster than two on a shared, busy 2-core box."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def peft_model():
    """A peft model with random (non-zero) LoRA factors on a tiny model with seed 0."""
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    return peft.get_peft_model(tiny_model(0).model, cfg).eval()


@pytest.fixture(scope="module")
def svd(peft_model):
    return svd_lora.build(peft_model.state_dict(), scaling=ALPHA / R, targets=TARGETS)


@pytest.fixture(scope="module")
def backend(svd):
    tm = tiny_model(0)
    return HFBackend(tm.model, tm.tokenizer, svd, max_new_tokens=12)


@pytest.fixture(scope="module")
def population(svd):
    return np.random.default_rng(0).normal(scale=0.5, size=(5, svd.solution_length))


def load_candidate(peft_model, svd, x):
    """The naive way: rebuild candidate x's factors and load them into the peft model."""
    for name, (A, B) in svd.factors(x).items():
        mod = peft_model.base_model.model.get_submodule(name)
        mod.lora_A["default"].weight.data.copy_(A.float())
        mod.lora_B["default"].weight.data.copy_(B.float())


def requests(n_cand, prompts=PROMPTS, seed0=100):
    return [Request(candidate=i % n_cand, prompt=p, seed=seed0 + i) for i, p in enumerate(prompts * 2)]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_module_names_and_wrappers(backend, svd):
    assert svd.modules[0].name == "model.layers.0.self_attn.q_proj"
    assert len(backend.wrappers) == len(svd.modules) == 2 * len(TARGETS)
    assert isinstance(backend.model.get_submodule("model.layers.1.self_attn.o_proj"), SvdLoraLinear)


def test_logits_match_peft_per_candidate(backend, svd, peft_model, population):
    """A padded population batch (row i under candidate i) against peft carrying each candidate's adapter."""
    tok = backend.tokenizer
    enc = tok(PROMPTS[:5], return_tensors="pt", padding=True)
    got = backend.forward_logits(population, list(range(5)), enc["input_ids"], enc["attention_mask"])
    for c in range(5):
        load_candidate(peft_model, svd, population[c])
        ids = torch.tensor([tok.encode(PROMPTS[c])])
        with torch.no_grad():
            ref = peft_model(input_ids=ids).logits[0]
        n = ids.shape[1]
        assert rel(got[c, -n:], ref) < 1e-4
    # x = 0 is the SFT adapter itself
    load_candidate(peft_model, svd, np.zeros(svd.solution_length))
    ids = enc["input_ids"][2:3]
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
    assert rel(backend.forward_logits(np.zeros((1, svd.solution_length)), [0], ids), ref) < 1e-4


def test_greedy_batch_invariance(backend, population):
    reqs = requests(len(population))
    batched = backend.generate_ids(population, reqs)
    alone = [backend.generate_ids(population, [r])[0] for r in reqs]
    assert batched == alone
    assert all(len(t) == 12 for t in batched)  # the random model never emits EOS in 12 steps here
    # candidates matter: same prompt, different candidates -> different completions
    same_prompt = [Request(c, PROMPTS[1], 0) for c in range(len(population))]
    assert len({tuple(t) for t in backend.generate_ids(population, same_prompt)}) > 1


def test_sampling_seeded_per_request(backend, population):
    reqs = requests(len(population))
    kw = {"temperature": 1.0, "top_p": 0.9}
    batched = backend.generate_ids(population, reqs, **kw)
    alone = [backend.generate_ids(population, [r], **kw)[0] for r in reversed(reqs)][::-1]
    assert batched == alone
    again = backend.generate_ids(population, [Request(r.candidate, r.prompt, r.seed + 1) for r in reqs], **kw)
    assert again != batched
    greedy = backend.generate_ids(population, reqs)
    assert greedy != batched


def test_chunking_identical(backend, population):
    reqs = requests(len(population))
    full = backend.generate_ids(population, reqs, temperature=0.7)
    backend.max_batch_sequences = 3
    try:
        chunked = backend.generate_ids(population, reqs, temperature=0.7)
    finally:
        backend.max_batch_sequences = 256
    assert chunked == full


def test_eos_stop_and_completion_text(backend, population):
    reqs = requests(len(population))[:4]
    ref = backend.generate_ids(population, reqs)
    # pretend the 4th generated token of row 0 is EOS: rows end at its first occurrence, others are untouched
    eos = ref[0][3]
    saved = backend.eos_ids
    backend.eos_ids = [eos]
    try:
        ids = backend.generate_ids(population, reqs)
    finally:
        backend.eos_ids = saved
    assert len(ids[0]) <= 4
    for a, b in zip(ids, ref):
        assert a == (b[: b.index(eos) + 1] if eos in b else b)
    # stop strings cut the text and end the row early
    full = backend.generate(population, reqs[:1])[0]
    stop = full.text[5:7]
    backend.stop = [stop]
    try:
        cut = backend.generate(population, reqs[:1])[0]
    finally:
        backend.stop = []
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.tokens < full.tokens == 12


def test_context_budget_and_base_model(backend, population):
    # a prompt 4 tokens short of the context (128) generates at most 4 tokens
    long = "y" * 124
    out = backend.generate(population, [Request(0, long, 1), Request(1, "hi", 2)])
    assert out[0].tokens == 4 and out[1].tokens == 12
    # svd=None: the plain base model; it equals the wrapped model with no σ table set
    tm = tiny_model(0)
    base = HFBackend(tm.model, tm.tokenizer, None, max_new_tokens=6)
    ids = torch.tensor([tm.tokenizer.encode("abc")])
    with torch.no_grad():
        assert torch.equal(backend.model(input_ids=ids).logits, tm.model(input_ids=ids).logits)
    assert base.generate(None, [Request(0, "abc", 0)])[0].tokens == 6


def test_close_restores_layers(svd):
    tm = tiny_model(0)
    q = tm.model.get_submodule("model.layers.0.self_attn.q_proj")
    be = HFBackend(tm.model, tm.tokenizer, svd)
    assert tm.model.get_submodule("model.layers.0.self_attn.q_proj") is not q
    be.close()
    assert tm.model.get_submodule("model.layers.0.self_attn.q_proj") is q


def test_bad_input(backend, population, svd):
    d = svd.solution_length
    assert backend.generate(population, []) == []
    with pytest.raises(ValueError, match=r"request 1 \(candidate 1\).*129 tokens.*context is 128"):
        backend.generate(population, [Request(0, "ok", 0), Request(1, "z" * 129, 0)])
    with pytest.raises(ValueError, match=f"d = solution_length = {d}"):
        backend.generate(population[:, :-1], [Request(0, "ok", 0)])
    with pytest.raises(ValueError, match="request 0: candidate 5 out of range; 5 candidate vectors"):
        backend.generate(population, [Request(5, "ok", 0)])
    with pytest.raises(ValueError, match="request 0: candidate -1 out of range"):
        backend.generate(population, [Request(-1, "ok", 0)])
    with pytest.raises(ValueError, match="NaN or inf"):
        backend.generate(np.full((1, d), np.nan), [Request(0, "ok", 0)])
    with pytest.raises(ValueError, match=r"request 0: seed -3"):
        backend.generate(population, [Request(0, "ok", -3)], temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        backend.generate(population, [Request(0, "ok", 0)], top_p=0.0)
    tm = tiny_model(1, hidden_size=16)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: adapter maps 32 -> 32 features, the base layer 16 -> 16"):
        HFBackend(tm.model, tm.tokenizer, svd)


def test_quantized_int8_runs(svd, population):
    pytest.importorskip("torchao")
    from essa_hpc.quantize import QuantizationError, quantization_of, quantize_model

    ref_model = tiny_model(0)
    tm = tiny_model(0)
    quantize_model(tm.model, "int8")
    assert quantization_of(tm.model) == "int8"
    quantize_model(tm.model, "int8")  # idempotent
    with pytest.raises(QuantizationError, match="already quantized as int8"):
        quantize_model(tm.model, "int4")
    with pytest.raises(QuantizationError, match=r"model\.quantization=awq"):
        quantize_model(ref_model.model, "awq")
    q = HFBackend(tm.model, tm.tokenizer, svd, max_new_tokens=8)
    f = HFBackend(ref_model.model, ref_model.tokenizer, svd, max_new_tokens=8)
    enc = tm.tokenizer(PROMPTS[:3], return_tensors="pt", padding=True)
    lq = q.forward_logits(population, [0, 1, 2], enc["input_ids"], enc["attention_mask"])
    lf = f.forward_logits(population, [0, 1, 2], enc["input_ids"], enc["attention_mask"])
    assert rel(lq, lf) < 0.05  # int8 weights: a small drift, not a different model
    out = q.generate(population, requests(len(population))[:4])
    assert [c.tokens for c in out] == [8] * 4


def test_make_backend(svd):
    from essa_hpc.backends import make_backend
    from essa_hpc.config import Config

    tm = tiny_model(0)
    cfg = Config().replace(**{"backend.name": "hf", "backend.max_new_tokens": 5, "backend.max_batch_sequences": 7})
    be = make_backend(cfg, tm, svd)
    assert isinstance(be, HFBackend) and be.max_new_tokens == 5 and be.max_batch_sequences == 7
    assert be.solution_length == svd.solution_length
