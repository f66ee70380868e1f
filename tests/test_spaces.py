"""Search spaces and the es optimizer on a tiny random Llama: noise, antithetic pairs, batched lowrank
evaluation against one-at-a-time weights, full-space restore, replay and export, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from essa_hpc import exit_codes, noise
from essa_hpc.backends.hf import HFBackend
from essa_hpc.config import load_config
from essa_hpc.models import save_tiny_model, tiny_model
from essa_hpc.search import ES, make_optimizer
from essa_hpc.spaces import BatchedPerturbation, SequentialPerturbation, Space, SpaceError
from essa_hpc.spaces.full import FullSpace
from essa_hpc.spaces.lowrank import LowRankSpace

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def ids_and_mask(tok, prompts):
    enc = [list(tok([p], add_special_tokens=False)["input_ids"][0]) for p in prompts]
    W = max(map(len, enc))
    ids = torch.zeros((len(enc), W), dtype=torch.long)
    mask = torch.zeros((len(enc), W), dtype=torch.long)
    for i, t in enumerate(enc):
        ids[i, W - len(t) :] = torch.tensor(t)
        mask[i, W - len(t) :] = 1
    return ids, mask


def plain_logits(model, ids, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


# -------------------------------------------------------------------------------------------- noise


def test_counter_based_noise_is_a_pure_function_of_its_key():
    a = noise.normal(7, 3, 5, 2, 100)
    assert a.dtype == np.float32
    assert np.array_equal(a, noise.normal(7, 3, 5, 2, 100))
    for key in ((7, 3, 5, 1), (7, 3, 4, 2), (7, 2, 5, 2), (8, 3, 5, 2)):  # another stream, index, generation, seed
        assert not np.array_equal(a, noise.normal(*key, 100))


def test_two_same_shape_matrices_get_different_noise():
    tm = tiny_model(0)
    low = LowRankSpace(tm, TARGETS, rank=2, run_seed=1, base_model="tiny")
    q = [t for t in low.weights.targets if t.name.endswith("q_proj")]
    assert len(q) == 2 and q[0].shape == q[1].shape  # layer 0 and layer 1
    A0, B0 = low.factors(q[0], 0, 0)
    A1, B1 = low.factors(q[1], 0, 0)
    assert A0.shape == A1.shape and not torch.equal(A0, A1) and not torch.equal(B0, B1)
    full = FullSpace(tiny_model(0), TARGETS, run_seed=1, base_model="tiny")
    f = [t for t in full.weights.targets if t.name.endswith("q_proj")]
    e0, e1 = full.epsilon(f[0], 0, 0), full.epsilon(f[1], 0, 0)
    assert e0.shape == e1.shape and not torch.equal(e0, e1)
    assert abs(float(e0.std()) - 1.0) < 0.2  # standard normal entries


# -------------------------------------------------------------------------------------------- es


def test_antithetic_pairs_cancel_and_the_step_follows_the_estimator():
    es = ES(dim=3, popsize=6, sigma0=0.5, learning_rate=0.2, seed=3, antithetic=True, fitness_shaping="none", seeded=True)
    X = es.ask(0)
    assert np.array_equal(X[:, 1], [0, 0, 1, 1, 2, 2]) and np.allclose(X[:, 2], [0.5, -0.5] * 3)
    rewards = np.array([1.0, 1.0, 0.3, 0.3, 0.9, 0.1])  # pairs 0 and 1 tie: their noise cancels
    es.tell(X, -rewards)
    step = es.step()
    assert step[0, 2] == 0.0 and step[1, 2] == 0.0
    assert step[2, 2] == pytest.approx(0.2 / (6 * 0.5) * (0.9 - 0.1))  # α/(nσ) (u+ − u−), (ES-3)
    assert np.array_equal(es.mean, np.zeros(3))  # seed codes: the weights are the mean
    # explicit coding: a mean that moves by Σ_k w_k ε_k, and not at all when every pair ties
    ex = ES(dim=5, popsize=4, sigma0=0.1, learning_rate=1.0, seed=3, fitness_shaping="centered_ranks")
    Xe = ex.ask(0)
    assert np.allclose(Xe[0], -Xe[1]) and np.allclose(Xe[2], -Xe[3])  # mirrored around m = 0
    ex.tell(Xe, -np.array([2.0, 2.0, 5.0, 5.0]))
    assert np.array_equal(ex.mean, np.zeros(5))
    Xe = ex.ask(1)
    ex.tell(Xe, -np.array([1.0, 0.0, 0.0, 0.0]))
    u = np.array([0.5, -1 / 6, -1 / 6, -1 / 6])  # centered ranks with the tie averaged
    eps0 = noise.normal(3, 1, 0, noise.OPTIMIZER_STREAM, 5, dtype=np.float64)
    assert np.allclose(ex.mean, 1.0 / (4 * 0.1) * (u[0] - u[1]) * eps0)


def test_es_is_deterministic_and_resumes_from_its_state():
    def drive(es, gens, start=0):
        for g in range(start, gens):
            X = es.ask(g)
            es.tell(X, -np.sin(X.sum(axis=1) + g))
        return es

    a = drive(ES(4, 8, 0.3, 0.1, 11, fitness_shaping="zscore", lr_decay=0.9, sigma_decay=0.95), 5)
    b = drive(ES(4, 8, 0.3, 0.1, 11, fitness_shaping="zscore", lr_decay=0.9, sigma_decay=0.95), 3)
    c = ES(4, 8, 0.3, 0.1, 11, fitness_shaping="zscore", lr_decay=0.9, sigma_decay=0.95)
    c.load_state_dict(b.state_dict())
    drive(c, 5, start=3)
    assert np.array_equal(a.mean, c.mean) and a.digest() == c.digest()
    assert a.sigma == pytest.approx(0.3 * 0.95**5)


# -------------------------------------------------------------------------------------------- lowrank


@pytest.mark.parametrize("rank", [1, 2])  # rank 1 has its own vecdot/addcmul path
def test_batched_lowrank_evaluation_equals_each_perturbation_applied_alone(rank):
    tm = tiny_model(0)
    space = LowRankSpace(tm, TARGETS, rank=rank, run_seed=5, base_model="tiny")
    assert isinstance(space, Space) and isinstance(space, BatchedPerturbation)
    X = np.array([[4, 0, 0.7], [4, 0, -0.7], [4, 1, 0.3], [4, 2, 0.0]])
    backend = HFBackend(tm.model, tm.tokenizer, space, max_new_tokens=4)
    ids, mask = ids_and_mask(tm.tokenizer, ["hello there", "x", "12 + 30 ="])
    cands = [0, 1, 2, 3, 2, 0]  # rows of several candidates mixed in one batch
    rows = torch.tensor([0, 1, 2, 0, 1, 2])
    batched = backend.forward_logits(X, cands, ids[rows], mask[rows])
    backend.close()
    assert not any(type(m).__name__ == "LowRankLinear" for m in tm.model.modules())
    ref = tiny_model(0)
    ref_space = LowRankSpace(ref, TARGETS, rank=rank, run_seed=5, base_model="tiny")
    for j, (c, r) in enumerate(zip(cands, rows.tolist())):
        saved = [t.param.clone() for t in ref_space.weights.targets]
        with torch.no_grad():
            for t in ref_space.weights.targets:
                t.param.add_(ref_space.perturbation(t, X[c]))
        alone = plain_logits(ref.model, ids[r : r + 1], mask[r : r + 1])
        with torch.no_grad():
            for t, s in zip(ref_space.weights.targets, saved):
                t.param.copy_(s)
        real = mask[r].bool()  # padded positions' logits are not part of any completion
        torch.testing.assert_close(batched[j][real], alone[0][real], atol=2e-4, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[3], atol=1e-3)  # candidate 0 vs the unperturbed candidate 3, same row


def test_lowrank_update_replay_digest_and_export(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    save_tiny_model(tmp_path / "base")
    cfg = load_config(overrides=[f"model.path={tmp_path / 'base'}", "search.space=lowrank", "search.optimizer=es", "search.popsize=4"])
    from essa_hpc import models

    loaded = models.load(cfg.model)
    space = LowRankSpace(loaded, TARGETS, rank=1, run_seed=9, base_model=str(tmp_path / "base"))
    before = {t.name: t.param.clone() for t in space.weights.targets}
    opt = make_optimizer(cfg.search, 3, 9, seeded=True)
    d0 = space.digest()
    for g in range(3):
        X = opt.ask(g)
        opt.tell(X, -np.array([0.1, 0.5, 0.2, 0.9]) * (g + 1))
        space.apply(opt)
    assert space.digest() != d0
    again = LowRankSpace(models.load(cfg.model), TARGETS, rank=1, run_seed=9, base_model="x")
    again.load_state_dict(space.state_dict())  # replay: the same weights bit for bit
    for a, b in zip(space.weights.targets, again.weights.targets):
        assert torch.equal(a.param, b.param)
    space.export(opt.mean, tmp_path / "model")
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    delta = load_file(str(tmp_path / "model" / "delta" / "delta.safetensors"))
    params = dict(out.named_parameters())
    for t in space.weights.targets:
        key = f"{t.name}.weight"
        assert torch.equal(params[key].data, t.param)
        torch.testing.assert_close(before[t.name] + delta[key], t.param, atol=1e-6, rtol=1e-5)
        assert not torch.equal(before[t.name], t.param)


# -------------------------------------------------------------------------------------------- full


def test_full_space_evaluates_one_candidate_at_a_time_and_restores_exactly():
    tm = tiny_model(0)
    space = FullSpace(tm, ["q_proj", "up_proj"], run_seed=2, base_model="tiny")
    assert isinstance(space, SequentialPerturbation) and not isinstance(space, BatchedPerturbation)
    pristine = [t.param.clone() for t in space.weights.targets]
    backend = HFBackend(tm.model, tm.tokenizer, space, max_new_tokens=4)
    X = np.array([[1, 0, 0.05], [1, 0, -0.05], [1, 1, 0.05]])
    ids, mask = ids_and_mask(tm.tokenizer, ["hello there", "12 + 30 ="])
    got = backend.forward_logits(X, [2, 0, 1], ids[[0, 1, 1]], mask[[0, 1, 1]])
    for t, p in zip(space.weights.targets, pristine):
        assert torch.equal(t.param, p), "perturbed weights must be restored bit for bit"
    for j, (c, r) in enumerate(zip([2, 0, 1], [0, 1, 1])):
        with torch.no_grad():
            for t in space.weights.targets:
                t.param.add_(space.perturbation(t, X[c]))
        alone = plain_logits(tm.model, ids[r : r + 1], mask[r : r + 1])
        with torch.no_grad():
            for t, p in zip(space.weights.targets, pristine):
                t.param.copy_(p)
        real = mask[r].bool()
        torch.testing.assert_close(got[j][real], alone[0][real], atol=2e-4, rtol=1e-4)
    from essa_hpc.backends.base import Request

    outs = backend.generate(X, [Request(0, "hi", 0), Request(2, "hi", 0), Request(0, "ab", 0)])
    assert len(outs) == 3
    for t, p in zip(space.weights.targets, pristine):
        assert torch.equal(t.param, p)


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["search.space=sideways"], "search.space"),
        (["search.space=lowrank"], "search.optimizer"),  # cma cannot drive a seeded space
        (["search.space=full", "search.optimizer=es", "backend.name=fake"], "backend.name"),
        (["search.optimizer=es", "search.popsize=5"], "search.popsize"),  # antithetic pairs
    ],
)
def test_bad_space_config_exits_2_naming_the_key(overrides, key, capsys, tmp_path):
    from essa_hpc import run

    args = [a for o in overrides for a in ("--set", o)] + ["--set", f"run.dir={tmp_path}"]
    err = _exits_2_in_one_line(run.main(args), capsys)
    assert key in err
    assert not any(tmp_path.iterdir())


def _exits_2_in_one_line(status: int, capsys) -> str:
    """The bad-input contract: exit 2 and one line on stderr, no traceback; returns that line."""
    assert status == exit_codes.BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("space", ["lowrank", "full", "qes"])
def test_a_weight_space_refuses_an_adapter_it_would_ignore(space, capsys, tmp_path):
    """lora.adapter with a space that searches the base weights: exit 2 naming the key and essa-merge,
    before any model is loaded (a silently ignored starting point would make a comparison meaningless)."""
    from essa_hpc import run

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    runs = tmp_path / "runs"
    args = ["--set", f"search.space={space}", "--set", "search.optimizer=es", "--set", "search.popsize=4"]
    args += ["--set", f"lora.adapter={adapter}", "--set", f"run.dir={runs}"]
    args += ["--set", "model.quantization=int8"] if space == "qes" else []
    err = _exits_2_in_one_line(run.main(args), capsys)
    assert "lora.adapter" in err and "essa-merge" in err
    assert not runs.exists() or not any(runs.iterdir())


def test_targets_matching_nothing_exit_2_naming_the_key(capsys, tmp_path):
    from essa_hpc import run

    save_tiny_model(tmp_path / "m")
    args = ["--set", f"model.path={tmp_path / 'm'}", "--set", f"run.dir={tmp_path / 'runs'}"]
    for o in ("search.space=lowrank", "search.optimizer=es", "search.popsize=4", "search.targets=[nope_proj]"):
        args += ["--set", o]
    assert run.main(args) == exit_codes.BAD_INPUT
    err = capsys.readouterr().err
    assert "search.targets" in err and "nope_proj" in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SpaceError, match=r"search\.targets"):
        LowRankSpace(tiny_model(0), ["nope_proj"], 1, 0, "tiny")
