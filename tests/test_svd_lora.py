"""svd_lora: packing, rebuilding, reading and writing PEFT adapters, and every bad adapter we refuse.

Tiny random Llama models (models.tiny_model) and real peft adapters; no mocks.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from essa_hpc import models, svd_lora
from essa_hpc.svd_lora import AdapterError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one torch thread is ~10× faster than several on a shared, oversubscribed machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_state(rank: int = 3, layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (12, 10), "v_proj": (6, 10)}
    sd = {}
    for layer in range(layers):
        for leaf, (m, n) in shapes.items():
            name = f"base_model.model.model.layers.{layer}.self_attn.{leaf}"
            sd[f"{name}.lora_A.weight"] = torch.randn(rank, n, generator=g)
            sd[f"{name}.lora_B.weight"] = torch.randn(m, rank, generator=g) * 0.1
    return sd


def _peft_model(seed: int = 0, rank: int = RANK, rslora: bool = False):
    """A tiny Llama with a peft LoRA whose B is non-zero (as after SFT)."""
    from peft import LoraConfig, get_peft_model

    base = models.tiny_model(seed=0).model
    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(r=rank, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, use_rslora=rslora))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    pm.eval()
    return pm


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("adapter") / "sft"
    _peft_model().save_pretrained(str(d))
    return d


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 14, 20, 33, 40, 7, 8, 100, 3, 60]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- packing


@settings(max_examples=40, deadline=None)
@given(
    parametrization=st.sampled_from(svd_lora.PARAMETRIZATIONS),
    alpha=st.sampled_from([1.0, 0.5, 0.34]),
    seed=st.integers(0, 10_000),
)
def test_pack_unpack_round_trip(parametrization: str, alpha: float, seed: int) -> None:
    svd = svd_lora.build(_random_state(seed=seed % 7), 2.0, alpha, parametrization)
    x = np.random.default_rng(seed).uniform(-1.5, 1.5, svd.solution_length)
    sig = svd.sigmas(x)
    np.testing.assert_allclose(svd.pack(sig), x, rtol=1e-10, atol=1e-10)
    assert svd.unpack(x)[0][0].shape == (3,)
    # the batched map is element for element the same arithmetic
    X = np.stack([x, -x, np.zeros_like(x)])
    batch = svd.sigma_batch(X)
    for c in range(3):
        for (sa, sb), (ba, bb) in zip(svd.sigmas(X[c]), batch):
            assert torch.equal(sa, ba[c]) and torch.equal(sb, bb[c])
    # the unsearched tail stays at its SFT values
    k = svd.k_A
    for m, (sa, sb) in zip(svd.modules, sig):
        assert torch.equal(sa[k:], m.A.S[k:]) and torch.equal(sb[k:], m.B.S[k:])


@pytest.mark.parametrize("parametrization", svd_lora.PARAMETRIZATIONS)
def test_zero_is_the_sft_adapter(parametrization: str) -> None:
    sd = _random_state(rank=3)
    svd = svd_lora.build(sd, 0.75, 1.0, parametrization)
    x = svd.zeros()
    np.testing.assert_array_equal(svd.pack(svd.sigmas(x)), x)
    pairs = svd_lora.lora_pairs(sd)
    deltas = svd.delta_weights(x)
    for name, (A, B) in pairs.items():
        want = 0.75 * (B @ A)
        assert _rel(deltas[name].float(), want) < 1e-5
        A2, B2 = svd.factors(x)[name]
        assert _rel(A2.float(), A) < 1e-5 and _rel(B2.float(), B) < 1e-5
    for m in svd.modules:  # a valid thin SVD: orthonormal bases, descending non-negative values
        for f in (m.A, m.B):
            r = f.S.numel()
            assert torch.allclose(f.U.mT @ f.U, torch.eye(r, dtype=torch.float64), atol=1e-12)
            assert torch.allclose(f.V.mT @ f.V, torch.eye(r, dtype=torch.float64), atol=1e-12)
            assert bool((f.S[:-1] >= f.S[1:]).all()) and bool((f.S >= 0).all())


def test_packing_order_layer_module_then_A_before_B() -> None:
    svd = svd_lora.build(_random_state(rank=2), 1.0, 1.0, "offset")  # targets not given: canonical q before v
    names = [m.name for m in svd.modules]
    assert names == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    layout = svd.layout()
    assert svd.solution_length == len(layout) == 4 * (2 + 2)
    assert layout[:5] == [(names[0], "A", 0), (names[0], "A", 1), (names[0], "B", 0), (names[0], "B", 1), (names[1], "A", 0)]
    # a unit step at coordinate j moves exactly the singular value layout[j] names (offset: by 1)
    for j, (name, factor, idx) in enumerate(layout):
        x = svd.zeros()
        x[j] = 1.0
        i = names.index(name)
        sa, sb = svd.sigmas(x)[i]
        m = svd.modules[i]
        moved = sa - m.A.S if factor == "A" else sb - m.B.S
        assert moved[idx] == pytest.approx(1.0) and int((moved != 0).sum()) == 1
    # an explicit targets list sets the module order within a layer; α < 1 searches the top values only
    svd2 = svd_lora.build(_random_state(rank=2), 1.0, 0.5, "offset", targets=["v_proj", "q_proj"])
    assert svd2.modules[0].name.endswith("v_proj") and svd2.k_A == svd2.k_B == 1 and svd2.solution_length == 8
    assert all(bool((m.A.S[:-1] >= m.A.S[1:]).all()) for m in svd2.modules)  # descending σ


def test_relative_steps_in_units_of_mean_sigma() -> None:
    svd = svd_lora.build(_random_state(rank=2), 1.0, 1.0, "relative")
    x = svd.zeros()
    x[2] = 0.5  # first module, B, largest value
    m = svd.modules[0]
    assert float(svd.sigmas(x)[0][1][0] - m.B.S[0]) == pytest.approx(0.5 * float(m.B.S.mean()))
    with pytest.raises(ValueError, match="expected"):
        svd.sigmas(np.zeros(3))


# ----------------------------------------------------------------------------- reading adapters


def test_from_peft_dir_and_from_model_agree(adapter_dir: Path) -> None:
    pm = _peft_model()
    a = svd_lora.from_peft_dir(adapter_dir, 1.0, "relative", model=models.tiny_model().model)
    b = svd_lora.from_model(pm, 1.0, "relative")
    assert [m.name for m in a.modules] == [m.name for m in b.modules]
    assert a.solution_length == 2 * 4 * 2 * RANK
    assert a.modules[0].scaling == pytest.approx(8 / RANK)
    for ma, mb in zip(a.modules, b.modules):
        assert torch.allclose(ma.A.S, mb.A.S) and torch.allclose(ma.B.S, mb.B.S)
    assert a.peft_config["r"] == RANK and a.peft_config["lora_alpha"] == 8


def test_rslora_scaling(tmp_path: Path) -> None:
    _peft_model(rslora=True).save_pretrained(str(tmp_path / "rs"))
    svd = svd_lora.from_peft_dir(tmp_path / "rs")
    assert svd.modules[0].scaling == pytest.approx(8 / math.sqrt(RANK))


# ----------------------------------------------------------------------------- export, peft load, merge


def test_export_loads_in_peft_with_the_same_logits(adapter_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    svd = svd_lora.from_peft_dir(adapter_dir, 1.0, "relative")
    sft_logits = _logits(_peft_model())

    # x = 0: the exported adapter is the SFT adapter
    svd_lora.export_adapter(svd, svd.zeros(), tmp_path / "x0", base_model_name_or_path="tiny")
    assert _rel(_logits(PeftModel.from_pretrained(models.tiny_model().model, str(tmp_path / "x0"))), sft_logits) < 1e-4

    # x ≠ 0: peft's forward equals a model whose Linear weights are W + ΔW(x)
    x = np.random.default_rng(1).normal(0, 0.3, svd.solution_length)
    out = svd_lora.export_adapter(svd, x, tmp_path / "x1", base_model_name_or_path="tiny")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == RANK and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == "tiny"
    assert sorted(cfg["target_modules"]) == sorted(TARGETS) and not cfg["use_dora"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert all(t.dtype == torch.float32 for t in tensors.values())
    for name, (A, B) in svd.factors(x).items():  # export equals factors()
        assert _rel(tensors[f"base_model.model.{name}.lora_A.weight"].double(), A) < 1e-6
        assert _rel(tensors[f"base_model.model.{name}.lora_B.weight"].double(), B) < 1e-6

    peft_logits = _logits(PeftModel.from_pretrained(models.tiny_model().model, str(out)))
    manual = models.tiny_model().model
    with torch.no_grad():
        for name, delta in svd.delta_weights(x).items():
            w = manual.get_submodule(name).weight
            w.copy_((w.double() + delta).float())
    manual_logits = _logits(manual)
    assert _rel(peft_logits, manual_logits) < 1e-4
    assert _rel(peft_logits, sft_logits) > 1e-3  # x really moved the model

    # merged weights saved with save_pretrained give the same logits, and the base model is untouched
    base = models.tiny_model().model
    before = _logits(base)
    merged_dir = svd_lora.merge_and_save(base, svd, x, tmp_path / "merged")
    assert torch.equal(_logits(base), before)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert _rel(_logits(merged), manual_logits) < 1e-5

    # re-export replaces the folder atomically
    svd_lora.export_adapter(svd, svd.zeros(), tmp_path / "x1")
    assert (
        _rel(
            load_file(str(out / "adapter_model.safetensors"))["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
            svd_lora.lora_pairs(load_file(str(adapter_dir / "adapter_model.safetensors")))["model.layers.0.self_attn.q_proj"][1],
        )
        < 1e-6
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_random_init(tmp_path: Path) -> None:
    from peft import PeftModel

    model = models.tiny_model().model
    a = svd_lora.random_init(model, 4, 8.0, TARGETS, seed=7)
    b = svd_lora.random_init(model, 4, 8.0, TARGETS, seed=7)
    c = svd_lora.random_init(model, 4, 8.0, TARGETS, seed=8)
    assert a.solution_length == 2 * 4 * 8
    for ma, mb in zip(a.modules, b.modules):
        assert torch.equal(ma.A.matrix(), mb.A.matrix()) and torch.equal(ma.B.U, mb.B.U)
    assert not torch.equal(a.modules[0].A.matrix(), c.modules[0].A.matrix())
    m0 = a.modules[0]
    assert float(m0.A.matrix().abs().max()) <= 1 / math.sqrt(32) + 1e-12  # Kaiming-uniform(a=√5) bound 1/√fan_in
    assert torch.allclose(m0.B.U.mT @ m0.B.U, torch.eye(4, dtype=torch.float64))
    assert all(float(d.abs().max()) == 0 for d in a.delta_weights(a.zeros()).values())  # B = 0
    x = np.full(a.solution_length, 0.1)
    assert all(float(d.abs().max()) > 0 for d in a.delta_weights(x).values())
    out = svd_lora.export_adapter(a, x, tmp_path / "rand")
    pm = PeftModel.from_pretrained(models.tiny_model().model, str(out))
    assert _rel(_logits(pm), _logits(models.tiny_model().model)) > 1e-4
    with pytest.raises(AdapterError, match="multiplicative"):
        svd_lora.random_init(model, 4, 8.0, TARGETS, seed=7, parametrization="multiplicative")
    with pytest.raises(AdapterError, match="match no Linear"):
        svd_lora.random_init(model, 4, 8.0, ["qkv"], seed=7)
    with pytest.raises(AdapterError, match="exceeds"):
        svd_lora.random_init(model, 20, 8.0, TARGETS, seed=7)


def test_atomic_dir_leaves_nothing_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), svd_lora.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- bad adapters


def _variant(adapter_dir: Path, tmp_path: Path, config: dict | None = None, tensors=None) -> Path:
    d = tmp_path / "bad"
    shutil.copytree(adapter_dir, d)
    if config is not None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(config)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        sd = load_file(str(d / "adapter_model.safetensors"))
        tensors(sd)
        save_file(sd, str(d / "adapter_model.safetensors"))
    return d


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _nan(sd):
    sd[Q_A][0, 0] = float("nan")


def _wide(sd):
    sd[Q_A] = torch.randn(RANK, 40)


def _moved(sd):
    sd[Q_A.replace("layers.0", "layers.5")] = sd.pop(Q_A)
    sd[Q_B.replace("layers.0", "layers.5")] = sd.pop(Q_B)


def _dora(sd):
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)


@pytest.mark.parametrize(
    "config, tensors, match",
    [
        ({"use_dora": True}, None, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 8}}, None, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": 32}}, None, "alpha_pattern"),
        ({"peft_type": "IA3"}, None, "peft_type"),
        ({"lora_alpha": 0}, None, "lora_alpha"),
        ({"r": 2}, None, "r=2"),
        (None, _nan, "q_proj: weights contain NaN"),
        (None, _wide, r"layers\.0\.self_attn\.q_proj.*32×40.*32×32"),
        (None, _moved, r"layers\.5\.self_attn\.q_proj: not found in the base model"),
        (None, _dora, "lora_magnitude_vector"),
    ],
    ids=[
        "dora",
        "modules_to_save",
        "rank_pattern",
        "alpha_pattern",
        "not_lora",
        "alpha0",
        "r_mismatch",
        "nan",
        "shape",
        "missing_module",
        "dora_weights",
    ],
)
def test_bad_adapters(adapter_dir: Path, tmp_path: Path, config, tensors, match: str) -> None:
    d = _variant(adapter_dir, tmp_path, config, tensors)
    with pytest.raises(AdapterError, match=match):
        svd_lora.from_peft_dir(d, 1.0, "relative", model=models.tiny_model().model)


def test_bad_adapter_files_and_ranks(adapter_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="no such folder"):
        svd_lora.from_peft_dir(tmp_path / "nope")
    d = _variant(adapter_dir, tmp_path)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors is missing"):
        svd_lora.from_peft_dir(d)
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"adapter_config\.json is missing"):
        svd_lora.from_peft_dir(d)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "adapter_config.json").write_text("{not json")
    (tmp_path / "junk" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match=r"adapter_config\.json"):
        svd_lora.from_peft_dir(tmp_path / "junk")
    # α·r → 0 searched values
    with pytest.raises(AdapterError, match=r"floor\(0.1·4\) = 0"):
        svd_lora.from_peft_dir(adapter_dir, 0.1)
    # rank larger than the matrix (k_proj of the tiny model is 16×32)
    big = tmp_path / "big"
    big.mkdir()
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps({**cfg, "r": 20}))
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.randn(20, 32),
            "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.randn(16, 20),
        },
        str(big / "adapter_model.safetensors"),
    )
    with pytest.raises(AdapterError, match=r"k_proj: rank 20 exceeds the matrix dimensions 16×32"):
        svd_lora.from_peft_dir(big)
    with pytest.raises(AdapterError, match="multiplicative"):
        svd_lora.build({Q_A: torch.randn(2, 8), Q_B: torch.zeros(8, 2)}, 1.0, 1.0, "multiplicative")
    with pytest.raises(AdapterError, match="lora_B weight is missing"):
        svd_lora.build({Q_A: torch.randn(2, 8)}, 1.0)
