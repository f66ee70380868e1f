"""The CUDA path measured in one command: population evaluation, quantized bases, determinism, search spaces.

One prepared run for a lent GPU (one H200, a few minutes, no internet, only the working tree travels),
so every model is random-initialised from a config shaped like a real one (no weights are downloaded;
speed depends on shapes, not on values). bfloat16 on CUDA, fixed-length generation (EOS ignored).

Sections (each guarded: an error or a missing piece is recorded and the next section runs; an internal
time budget skips a section, recording why, rather than overrunning ``--budget-s``):

* ``p1``: the hf backend's batched population evaluation (docs/design.md, "One generation": the whole
  population of a rank in one batched generate) ÷ transformers ``generate`` of the same N sequences on
  the plain base model, at λ = 1, 32, 96 (N = max λ sequences, candidate = i mod λ), tokens/s and peak
  GPU memory each, for the SmolLM2-135M, Qwen2.5-1.5B and Qwen2.5-7B shapes. The measurement is
  bench/bench_eval.py's (a) and (b), with CUDA synchronisation and CUDA peak memory instead of RSS.
* ``quantized``: the same on torchao int8 and int4 weight-only bases (essa_hpc/quantize.py, the hf
  backend's ``model.quantization``), each also as a ratio to the bf16 plain ``generate``.
* ``determinism``: on the 135M shape, the same token ids and rewards from two runs of the backend
  (greedy and seeded sampling), and the real run loop under ``mpiexec -n 1`` (twice) and ``-n 2``
  sharing the one GPU: training generations sampled (seeded per generation, candidate and prompt),
  validation greedy. The run loop logs rewards, not token ids, so its reward is a digest of each
  completion's text (a CRC32 per completion): equal logged rewards mean equal completions.
* ``search_spaces``: ``search.space`` values other than the default (issue 18's low-rank and
  full-parameter ES), discovered when the script runs from the config's keys; each runs through the
  run loop beside the default space with the same settings (generate-phase tokens/s, update time).
  Absent spaces are recorded as not available.

``--smoke`` runs every section on the CPU with tiny shapes of the same architectures (float32) in
seconds; tests/test_gpu_check.py runs it in CI. Results go to ``<out>/gpu_<device>.json``, rewritten
after every section, so a run cut short keeps what it measured.

    python bench/gpu_check.py --out bench/results/     # on the GPU machine; under 8 minutes
    python bench/gpu_check.py --smoke --out /tmp/gc/   # CPU, tiny shapes

The launch line on the lent machine (what to carry and install) is in the README, "GPU check (to run)".
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCHEMA = "essa_hpc.gpu_check/1"
# python modules every section needs (pip name, import name); checked before anything is built
REQUIRED = [
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("numpy", "numpy"),
    ("pyyaml", "yaml"),
    ("h5py", "h5py"),
    ("cma", "cma"),
    ("mpi4py", "mpi4py"),
    ("tokenizers", "tokenizers"),
]
OPTIONAL = [("torchao", "torchao"), ("peft", "peft"), ("threadpoolctl", "threadpoolctl")]

# configs shaped like the real models (their config.json values for what sets the cost; no weights)
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "qwen2.5-1.5b": {
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
}
# --smoke: the same architectures, tiny (seconds on a CPU)
SMOKE_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
SMOKE_VOCAB = 384
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # models.ByteTokenizer's
DETERMINISM_SHAPE = "smollm2-135m"
# rough seconds a unit needs on the H200 (build + measure), from the shapes' sizes; a unit whose estimate
# exceeds the budget left is skipped with the reason
NEED_S = {"smollm2-135m": 15.0, "qwen2.5-1.5b": 30.0, "qwen2.5-7b": 60.0}
RESERVE_S = 8.0  # kept back for writing the result


class BudgetExceeded(Exception):
    """Raised by SIGALRM when a unit runs past the time the budget left it."""


class Budget:
    """Wall-clock budget from process start; units are skipped or cut short rather than overrun it."""

    def __init__(self, total_s: float, t0: float) -> None:
        self.total_s = total_s
        self.t0 = t0

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.t0)

    @contextlib.contextmanager
    def alarm(self) -> Iterator[None]:
        """SIGALRM at the end of the budget (less the reserve): the unit in progress stops there."""

        def fire(signum: int, frame: Any) -> None:
            raise BudgetExceeded(f"stopped at the time budget ({self.total_s:.0f} s)")

        limit = max(0.5, self.left() - RESERVE_S)
        old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def guarded(budget: Budget, need_s: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one unit: skipped if its estimate exceeds the budget left, its error recorded, never raised."""
    left = budget.left() - RESERVE_S
    if left < need_s:
        return {"status": "skipped", "reason": f"time budget: {left:.0f} s left, this needs about {need_s:.0f} s"}
    t = time.monotonic()
    try:
        with budget.alarm():
            out = fn()
        out.setdefault("status", "done")
    except BudgetExceeded as e:
        out = {"status": "aborted", "reason": str(e)}
    except Exception as e:
        out = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    out["wall_s"] = time.monotonic() - t
    return out


# --------------------------------------------------------------------------------------------- environment


def missing_modules() -> list[str]:
    return [pip for pip, mod in REQUIRED if importlib.util.find_spec(mod) is None]


def find_mpiexec() -> str | None:
    """$ESSA_MPIEXEC, beside the interpreter, beside a --target install on sys.path, or on PATH."""
    env = os.environ.get("ESSA_MPIEXEC")
    if env:
        return env
    cands = [Path(sys.executable).parent / "mpiexec"] + [Path(p) / "bin" / "mpiexec" for p in sys.path if p]
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("mpiexec")


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version()}
    for pip, mod in REQUIRED + OPTIONAL:
        try:
            m = importlib.import_module(mod)
            out[pip] = str(getattr(m, "__version__", "?"))
        except Exception as e:  # torchao may fail to import against another torch build
            out[pip] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return out


def device_info(torch: Any, smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"kind": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    p = torch.cuda.get_device_properties(0)
    return {
        "kind": "cuda",
        "name": torch.cuda.get_device_name(0),
        "memory_gib": p.total_memory / 2**30,
        "multiprocessors": p.multi_processor_count,
        "cuda": torch.version.cuda,
        "cores": os.cpu_count(),
    }


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "device"


# --------------------------------------------------------------------------------------------- models


def shape_config(name: str, smoke: bool) -> dict[str, Any]:
    cfg = dict(SHAPES[name])
    if smoke:
        cfg.update(SMOKE_SIZES)
        cfg["vocab_size"] = SMOKE_VOCAB
        cfg["max_position_embeddings"] = 512
    cfg.update(SPECIAL_IDS)
    return cfg


def build_model(cfg: dict[str, Any], dtype: Any, device: Any, seed: int) -> Any:
    """A random-initialised causal LM from the config, built on the device itself (7B in seconds)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(cfg)
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    model.generation_config.pad_token_id = SPECIAL_IDS["pad_token_id"]
    model.generation_config.eos_token_id = SPECIAL_IDS["eos_token_id"]
    return model


def free(torch: Any) -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Meter:
    """Seconds (CUDA-synchronised) and peak memory of one call: CUDA max_memory_allocated on a GPU, the
    peak RSS growth of bench_eval.timed on the CPU."""

    def __init__(self, torch: Any, cuda: bool) -> None:
        self.torch, self.cuda = torch, cuda

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, float, Any]:
        from bench.bench_eval import timed

        if not self.cuda:
            dt, _cpu, peak, out = timed(fn)
            return dt, peak, out
        t = self.torch
        t.cuda.synchronize()
        t.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        t.cuda.synchronize()
        return time.perf_counter() - t0, t.cuda.max_memory_allocated() / 2**20, out

    def resident_mb(self) -> float:
        from bench.bench_eval import status_mb

        return float(self.torch.cuda.memory_allocated() / 2**20) if self.cuda else status_mb("VmRSS")


# --------------------------------------------------------------------------------------------- P1


class Setup:
    """What every measuring section shares: settings, device, dtype, the prompts, the meter."""

    def __init__(self, args: argparse.Namespace, torch: Any) -> None:
        from bench.bench_eval import SYSTEM, arithmetic
        from essa_hpc.models import ByteTokenizer, render_chat

        self.args = args
        self.torch = torch
        self.smoke = bool(args.smoke)
        self.cuda = not self.smoke
        self.device = torch.device("cuda:0" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.lambdas: list[int] = list(args.lambdas)
        self.n = max(self.lambdas)
        self.T = int(args.max_new_tokens)
        self.rounds = int(args.rounds)
        self.meter = Meter(torch, self.cuda)
        self.tok_cls = ByteTokenizer
        self.render = render_chat
        self.questions = [q for q, _ in arithmetic(self.n)]
        self.system = SYSTEM

    def tokenizer(self, vocab: int) -> Any:
        return self.tok_cls(vocab)

    def prompts(self, tok: Any) -> list[str]:
        return [self.render(tok, q, self.system) for q in self.questions]


def svd_for(model: Any, rank: int, seed: int) -> Any:
    """bench_eval's random q/k/v/o LoRA (B ≠ 0, so candidates differ) as the backend's frozen SVD bases."""
    from bench.bench_eval import TARGETS, random_adapter
    from essa_hpc import svd_lora

    sd = random_adapter(model, rank, seed)
    return svd_lora.build(sd, scaling=2.0, targets=TARGETS)


def measure_population(s: Setup, model: Any, tok: Any, lambdas: list[int], rounds: int, with_base_loop: bool) -> dict[str, Any]:
    """bench_eval's (a) transformers generate, (a') our loop on the plain model, (b) the population at each λ."""
    import numpy as np

    from bench.bench_eval import hf_generate
    from essa_hpc.backends.base import Request
    from essa_hpc.backends.hf import HFBackend

    N, T = s.n, s.T
    prompts = s.prompts(tok)
    svd = svd_for(model, s.args.rank, seed=0)
    rng = np.random.default_rng(0)
    pops = {lam: rng.normal(scale=0.3, size=(lam, svd.solution_length)) for lam in lambdas}
    reqs_base = [Request(0, p, i) for i, p in enumerate(prompts)]
    base_be = HFBackend(model, tok, None, max_new_tokens=T)
    be = HFBackend(model, tok, svd, max_new_tokens=T, max_batch_sequences=max(256, N))

    def plain(fn: Callable[[], Any]) -> Any:
        be.close()
        try:
            return fn()
        finally:
            be._patch(svd)

    width = max(len(t) for t in tok(prompts)["input_ids"])
    resident = s.meter.resident_mb()
    plain(lambda: hf_generate(model, tok, prompts[:4], 2))  # warm-up: allocator, kernels, first-call costs
    be.generate(pops[lambdas[0]], reqs_base[:4], max_new_tokens=2)

    best: dict[str, float] = {}
    peak: dict[str, float] = {}

    def record(key: str, dt: float, pk: float) -> None:
        best[key] = min(best.get(key, float("inf")), dt)
        peak[key] = max(peak.get(key, 0.0), pk)

    counts: dict[str, int] = {}
    for rnd in range(rounds):
        dt, pk, out = s.meter(lambda: plain(lambda: hf_generate(model, tok, prompts, T)))
        counts["plain"] = int(out.shape[0] * (out.shape[1] - width))  # rows × generated positions (left-padded prompts)
        record("plain", dt, pk)
        if with_base_loop and rnd == 0:
            dt, pk, outs = s.meter(lambda: plain(lambda: base_be.generate(None, reqs_base, ignore_eos=True)))
            counts["our_loop_base"] = sum(c.tokens for c in outs)
            record("our_loop_base", dt, pk)
        for lam in lambdas:
            reqs = [Request(i % lam, p, i) for i, p in enumerate(prompts)]
            dt, pk, outs = s.meter(lambda reqs=reqs, lam=lam: be.generate(pops[lam], reqs, ignore_eos=True))
            counts[f"l{lam}"] = sum(c.tokens for c in outs)
            record(f"l{lam}", dt, pk)
    be.close()

    def entry(key: str) -> dict[str, Any]:
        return {
            "tokens": counts[key],
            "seconds": best[key],
            "tokens_per_s": counts[key] / best[key],
            "peak_mem_mb": peak[key],
        }

    res: dict[str, Any] = {"resident_mb": resident, "solution_length": svd.solution_length, "plain": entry("plain")}
    if "our_loop_base" in counts:
        res["our_loop_base"] = entry("our_loop_base")
    res["population"] = {}
    for lam in lambdas:
        e = entry(f"l{lam}")
        e["ratio_to_plain"] = e["tokens_per_s"] / res["plain"]["tokens_per_s"]
        res["population"][str(lam)] = e
    return res


def p1_shape(s: Setup, name: str) -> dict[str, Any]:
    cfg = shape_config(name, s.smoke)
    t = time.perf_counter()
    model = build_model(cfg, s.dtype, s.device, seed=0)
    build_s = time.perf_counter() - t
    try:
        res = measure_population(s, model, s.tokenizer(cfg["vocab_size"]), s.lambdas, s.rounds, with_base_loop=True)
        res.update(
            {
                "config": cfg,
                "parameters": int(sum(p.numel() for p in model.parameters())),
                "build_s": build_s,
                "target_ratio_0.95_met": all(v["ratio_to_plain"] >= 0.95 for v in res["population"].values()),
            }
        )
        return res
    finally:
        del model
        free(s.torch)


def quantized_shape(s: Setup, name: str, scheme: str, bf16_plain_tps: float | None) -> dict[str, Any]:
    from essa_hpc.quantize import quantize_model

    cfg = shape_config(name, s.smoke)
    model = build_model(cfg, s.dtype, s.device, seed=0)
    try:
        t = time.perf_counter()
        quantize_model(model, scheme)
        if s.cuda:
            s.torch.cuda.synchronize()
        q_s = time.perf_counter() - t
        lam = [max(s.lambdas)]  # one λ and one round: quantized kernels can be slow, the budget is short
        res = measure_population(s, model, s.tokenizer(cfg["vocab_size"]), lam, 1, with_base_loop=False)
        res["quantize_s"] = q_s
        if bf16_plain_tps:
            res["plain"]["ratio_to_bf16_plain"] = res["plain"]["tokens_per_s"] / bf16_plain_tps
            for v in res["population"].values():
                v["ratio_to_bf16_plain"] = v["tokens_per_s"] / bf16_plain_tps
        return res
    finally:
        del model
        free(s.torch)


# --------------------------------------------------------------------------------------------- determinism


def digest_reward(text: str) -> float:
    """A reward that is a digest of the whole completion: equal rewards ⇔ (but for CRC collisions) equal text."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) / 2**32


PLUGIN = (
    "import zlib\n"
    "def digest(prompts, completions, **kw):\n"
    "    return [zlib.crc32(c.encode('utf-8', 'surrogatepass')) / 2**32 for c in completions]\n"
)


def save_model_folder(s: Setup, cfg: dict[str, Any], path: Path) -> Path:
    """The random model + a character-level fast tokenizer padded to the model's vocabulary, as an HF
    folder, so that the run loop loads it through model.path as it would a user's model (as
    models.save_tiny_model, at a real model's shape: every id decodes to its own string)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    words = specials + chars
    words += [f"<{i}>" for i in range(len(words), cfg["vocab_size"])]
    tk = Tokenizer(tk_models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    model = build_model(cfg, s.dtype, s.device, seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    free(s.torch)
    return path


def in_process_determinism(s: Setup) -> dict[str, Any]:
    """Two runs (a fresh backend each) of one population, greedy and seeded sampling: ids and rewards."""
    import numpy as np

    from essa_hpc.backends.base import Request
    from essa_hpc.backends.hf import HFBackend

    cfg = shape_config(DETERMINISM_SHAPE, s.smoke)
    model = build_model(cfg, s.dtype, s.device, seed=0)
    tok = s.tokenizer(cfg["vocab_size"])
    try:
        svd = svd_for(model, s.args.rank, seed=1)
        lam = min(8, s.n)
        X = np.random.default_rng(1).normal(scale=0.5, size=(lam, svd.solution_length))
        prompts = s.prompts(tok)[: max(lam, min(s.n, 16))]
        reqs = [Request(i % lam, p, 1000 + i) for i, p in enumerate(prompts)]
        out: dict[str, Any] = {"candidates": lam, "requests": len(reqs), "max_new_tokens": s.T}
        for mode, temp, top_p in (("greedy", 0.0, 1.0), ("sampled", 1.0, 0.95)):
            runs = []
            for _ in range(2):
                be = HFBackend(model, tok, svd, max_new_tokens=s.T, temperature=temp, top_p=top_p)
                ids = be.generate_ids(X, reqs, ignore_eos=True)
                be.close()
                rewards = [digest_reward(tok.decode(t)) for t in ids]
                runs.append((ids, rewards))
            (ids_a, rew_a), (ids_b, rew_b) = runs
            out[mode] = {
                "identical_token_ids": int(sum(a == b for a, b in zip(ids_a, ids_b))),
                "identical_rewards": int(sum(a == b for a, b in zip(rew_a, rew_b))),
                "of": len(reqs),
                "distinct_completions": len({tuple(t) for t in ids_a}),
                "same": ids_a == ids_b and rew_a == rew_b,
            }
        return out
    finally:
        del model
        free(s.torch)


def run_loop_args(s: Setup, folder: Path, runs: Path, name: str, extra: list[str]) -> list[str]:
    small = s.smoke
    sets = {
        "model.path": str(folder),
        "model.device": "cuda:0" if s.cuda else "cpu",
        "model.threads": "1",
        "lora.init": "random",
        "lora.rank": "4" if small else "8",
        "lora.alpha_fraction": "0.25",
        "search.popsize": "4" if small else "8",
        "search.sigma0": "2",
        "task.name": "arithmetic",
        "task.batch_size": "2" if small else "4",
        "task.plugins": "[gpucheck_plugin:digest]",
        "backend.max_new_tokens": "6" if small else "16",
        "backend.temperature": "1.0",
        "backend.top_p": "0.95",
        "eval.every": "0",
        "eval.size": "4" if small else "8",
        "eval.temperature": "0.0",
        "run.generations": "2" if small else "3",
        "run.dir": str(runs),
        "run.name": name,
        "log.progress": "false",
        "log.checkpoint_every": "1000",
    }
    for item in extra:
        k, _, v = item.partition("=")
        sets[k] = v
    out = [sys.executable, "-m", "essa_hpc.run"]
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def child_env(plugin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "HYDRA_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(plugin_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_all(cmds: dict[str, list[str]], env: dict[str, str], timeout: float) -> dict[str, tuple[int, str]]:
    """Start the commands together (each in its own process group), wait up to ``timeout``, then stop
    what is left by its group id; the return code and the tail of the output of each."""
    procs = {}
    out = {}
    with contextlib.ExitStack() as stack:
        logs = {name: stack.enter_context(tempfile.TemporaryFile(mode="w+")) for name in cmds}
        deadline = time.monotonic() + timeout
        try:
            for name, cmd in cmds.items():
                procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[name], stderr=subprocess.STDOUT, start_new_session=True)
            while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        for name, p in procs.items():
            logs[name].seek(0)
            out[name] = (int(p.returncode), logs[name].read()[-1500:])
    return out


def read_log(path: Path) -> dict[str, Any]:
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        names = json.loads(f["gen/timings"].attrs["phases"])
        out = {k: np.asarray(f[k][()]) for k in ("gen/rewards", "gen/sigma", "gen/tokens", "gen/timings", "final/mean")}
        out["phases"] = names
        out["eval"] = {k: np.asarray(f["eval"][k][()]) for k in f["eval"] if k not in ("gen", "wall_time")}
    return out


def mpi_determinism(s: Setup, work: Path, budget: Budget) -> dict[str, Any]:
    """The run loop on the 135M shape: mpiexec -n 1 (twice on the GPU) and -n 2 on the one device."""
    import numpy as np

    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise RuntimeError("no mpiexec found (beside the interpreter, on sys.path/../bin or PATH; or set ESSA_MPIEXEC)")
    folder = save_model_folder(s, shape_config(DETERMINISM_SHAPE, s.smoke), work / "model135m")
    plug = work / "plugin"
    plug.mkdir(exist_ok=True)
    (plug / "gpucheck_plugin.py").write_text(PLUGIN)
    runs = work / "runs"
    variants = {"n1": 1, "n2": 2} if s.smoke else {"n1": 1, "n1_again": 1, "n2": 2}
    cmds = {name: [mpiexec, "-n", str(n), *run_loop_args(s, folder, runs, name, [])] for name, n in variants.items()}
    t = time.monotonic()
    done = run_all(cmds, child_env(plug), timeout=max(5.0, budget.left() - RESERVE_S - 2))
    out: dict[str, Any] = {"mpiexec": mpiexec, "runs": {}, "concurrent_wall_s": time.monotonic() - t}
    logs = {}
    for name, (rc, tail) in done.items():
        out["runs"][name] = {"ranks": variants[name], "exit": rc}
        if rc != 0:
            out["runs"][name]["output_tail"] = tail
            continue
        logs[name] = read_log(runs / name / "log.h5")
        out["runs"][name]["reward_std"] = float(logs[name]["gen/rewards"].std())
    if "n1" not in logs:
        out["status"] = "error"
        out["error"] = "the mpiexec -n 1 run failed (output_tail)"
        return out
    ref = logs["n1"]
    for name, lg in logs.items():
        if name == "n1":
            continue
        out["runs"][name]["vs_n1"] = {
            "sampled_rewards_identical": bool(np.array_equal(lg["gen/rewards"], ref["gen/rewards"])),
            # where they differ: the share of (generation, candidate) rewards that still agree (a
            # difference means a completion changed with the batch composition, docs/design.md "Invariant")
            "sampled_rewards_identical_fraction": float(np.mean(lg["gen/rewards"] == ref["gen/rewards"]))
            if lg["gen/rewards"].shape == ref["gen/rewards"].shape
            else 0.0,
            "greedy_validation_identical": bool(all(np.array_equal(lg["eval"][k], ref["eval"][k], equal_nan=True) for k in ref["eval"])),
            "final_mean_identical": bool(np.array_equal(lg["final/mean"], ref["final/mean"])),
            "sigma_identical": bool(np.array_equal(lg["gen/sigma"], ref["gen/sigma"])),
            "tokens_per_generation_identical": bool(np.array_equal(lg["gen/tokens"].sum(1), ref["gen/tokens"].sum(1))),
        }
    out["same"] = all(
        all(x for k, x in v["vs_n1"].items() if k.endswith("identical")) for v in out["runs"].values() if "vs_n1" in v
    ) and len(logs) == len(variants)
    out["rewards_vary"] = out["runs"]["n1"]["reward_std"] > 0
    return out


# --------------------------------------------------------------------------------------------- search spaces


def discover_spaces() -> dict[str, Any]:
    """search.space values the config accepts now (issue 18 adds the key); the default space first."""
    from essa_hpc import config

    if "search.space" not in config.all_keys():
        return {"available": False, "reason": "not available: this checkout has no search.space key"}
    default = getattr(config.SearchSection(), "space", None)
    found, rejected = [], {}
    for name in ("lowrank", "full", "low_rank", "lowrank_es", "full_es"):
        try:
            config.load_config(overrides=[f"search.space={name}", "backend.name=fake", "task.name=fake"], check_paths=False)
            found.append(name)
        except Exception as e:
            rejected[name] = str(e).splitlines()[0][:200]
    return {"available": bool(found), "default": default, "spaces": found, "rejected": rejected}


def spaces_section(s: Setup, work: Path, budget: Budget) -> dict[str, Any]:
    import numpy as np

    disc = discover_spaces()
    if not disc["available"]:
        return {"status": "not available", **disc}
    folder = work / "model135m"
    if not (folder / "config.json").is_file():
        save_model_folder(s, shape_config(DETERMINISM_SHAPE, s.smoke), folder)
    plug = work / "plugin"
    plug.mkdir(exist_ok=True)
    (plug / "gpucheck_plugin.py").write_text(PLUGIN)
    runs = work / "runs_spaces"
    out: dict[str, Any] = {**disc, "results": {}}
    spaces = [str(disc["default"]), *disc["spaces"]] if disc["default"] else list(disc["spaces"])
    for space in dict.fromkeys(spaces):
        extra = [f"search.space={space}", "backend.temperature=0.0", "run.generations=3" if s.smoke else "run.generations=5"]
        cmd = {space: run_loop_args(s, folder, runs, f"space_{space}", extra)}
        rc, tail = run_all(cmd, child_env(plug), timeout=max(5.0, budget.left() - RESERVE_S - 2))[space]
        if rc != 0:
            out["results"][space] = {"status": "error", "exit": rc, "output_tail": tail}
            continue
        lg = read_log(runs / f"space_{space}" / "log.h5")
        P = {p: i for i, p in enumerate(lg["phases"])}
        tim = lg["gen/timings"][1:] if lg["gen/timings"].shape[0] > 1 else lg["gen/timings"]
        gen_s = tim[:, :, P["generate"]].max(axis=1)
        toks = lg["gen/tokens"][-len(gen_s) :].sum(axis=1)
        out["results"][space] = {
            "generate_tokens_per_s": float(np.median(toks / gen_s)),
            "update_ms_median": float(np.median(tim[:, :, P["tell"]].max(axis=1)) * 1e3),
            "generations_timed": len(gen_s),
        }
    base = out["results"].get(str(disc["default"]), {})
    for r in out["results"].values():
        if "generate_tokens_per_s" in r and "generate_tokens_per_s" in base:
            r["ratio_to_default_space"] = r["generate_tokens_per_s"] / base["generate_tokens_per_s"]
    return out


# --------------------------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes of the same architectures, seconds")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for gpu_<device>.json")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock budget from start (default 450 on the GPU, 300 smoke)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--sections", default="p1,determinism,quantized,search_spaces", help="comma list, run in this order")
    ap.add_argument("--lambdas", type=int, nargs="+", default=None, help="default 1 32 96 (smoke 1 2 4)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (smoke 4)")
    ap.add_argument("--rounds", type=int, default=None, help="timed repetitions, best kept (default 2, smoke 1)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank of the random adapter")
    ap.add_argument("--quant", default="int8,int4", help="torchao schemes for the quantized section")
    args = ap.parse_args(argv)
    args.budget_s = args.budget_s or (300.0 if args.smoke else 450.0)
    args.lambdas = args.lambdas or ([1, 2, 4] if args.smoke else [1, 32, 96])
    args.max_new_tokens = args.max_new_tokens or (4 if args.smoke else 64)
    args.rounds = args.rounds or (1 if args.smoke else 2)
    return args


def fail(msg: str) -> None:
    from essa_hpc.exit_codes import BAD_INPUT

    print(f"gpu_check: {msg}", file=sys.stderr)
    sys.exit(BAD_INPUT)


def main(argv: list[str] | None = None) -> None:
    t0 = time.monotonic()
    args = parse(argv)
    missing = missing_modules()
    if missing:
        fail(
            f"missing Python packages: {', '.join(missing)}; install them first, e.g. "
            f"python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site "
            f"(README, 'GPU check (to run)')"
        )
    shapes = [x for x in args.shapes.split(",") if x]
    sections = [x for x in args.sections.split(",") if x]
    bad = [x for x in shapes if x not in SHAPES] + [x for x in sections if x not in ("p1", "determinism", "quantized", "search_spaces")]
    if bad:
        fail(f"unknown shape or section {bad}; shapes are {list(SHAPES)}, sections p1, determinism, quantized, search_spaces")
    if any(lam < 1 for lam in args.lambdas) or args.max_new_tokens < 1 or args.rounds < 1:
        fail("--lambdas, --max-new-tokens and --rounds must be >= 1")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        fail("no CUDA device is visible; on a CPU use --smoke")
    torch.set_num_threads(1 if args.smoke else min(8, os.cpu_count() or 1))
    budget = Budget(args.budget_s, t0)
    s = Setup(args, torch)
    dev = device_info(torch, args.smoke)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (f"gpu_smoke_{slug(dev['name'])}.json" if args.smoke else f"gpu_{slug(dev['name'])}.json")
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": "smoke" if args.smoke else "gpu",
        "what": "random-initialised models shaped like the named ones; generated tokens/s at fixed length (EOS ignored); "
        "ratios are the hf backend's population evaluation over transformers generate of the same sequences",
        "device": dev,
        "versions": versions(),
        "settings": {
            "budget_s": args.budget_s,
            "dtype": str(s.dtype).replace("torch.", ""),
            "lambdas": s.lambdas,
            "n_sequences": s.n,
            "max_new_tokens": s.T,
            "rounds": s.rounds,
            "lora_rank": args.rank,
            "shapes": shapes,
            "sections": sections,
        },
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sections": {},
    }

    def write() -> None:
        result["wall_s"] = time.monotonic() - t0
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
        tmp.replace(path)

    scale = 0.1 if args.smoke else 1.0  # the estimates are the GPU's; tiny shapes need a fraction
    work = Path(tempfile.mkdtemp(prefix="essa_gpu_check_"))
    try:
        for sec in sections:
            print(f"gpu_check: {sec} ({budget.left():.0f} s left)", flush=True)
            if sec == "p1":
                res: dict[str, Any] = {"shapes": {}}
                for name in shapes:
                    res["shapes"][name] = guarded(budget, NEED_S[name] * scale, lambda name=name: p1_shape(s, name))
                    write()
            elif sec == "quantized":
                res = {"shapes": {}}
                for name in shapes:
                    res["shapes"][name] = {}
                    p1 = result["sections"].get("p1", {}).get("shapes", {}).get(name, {})
                    bf16 = p1.get("plain", {}).get("tokens_per_s")
                    for scheme in [q for q in args.quant.split(",") if q]:
                        res["shapes"][name][scheme] = guarded(
                            budget, NEED_S[name] * scale, lambda name=name, scheme=scheme, bf16=bf16: quantized_shape(s, name, scheme, bf16)
                        )
                        write()
            elif sec == "determinism":
                res = {
                    "shape": DETERMINISM_SHAPE,
                    "in_process": guarded(budget, 10 * scale, lambda: in_process_determinism(s)),
                }
                result["sections"][sec] = res
                write()
                res["mpiexec"] = guarded(budget, 60 * scale, lambda: mpi_determinism(s, work, budget))
            else:
                res = guarded(budget, 40 * scale, lambda: spaces_section(s, work, budget))
            result["sections"][sec] = res
            write()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["summary"] = summary(result)
    write()
    print(json.dumps(result["summary"], indent=1, default=float))
    print(f"wrote {path}")


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The figures a reader wants first: P1 ratios per shape and λ, quantized ratios, determinism verdicts."""
    sec = result["sections"]
    out: dict[str, Any] = {"p1_ratio": {}, "quantized_ratio_to_bf16_plain": {}, "statuses": {}}
    for name, r in sec.get("p1", {}).get("shapes", {}).items():
        out["statuses"][f"p1/{name}"] = r["status"]
        if r["status"] == "done":
            out["p1_ratio"][name] = {lam: v["ratio_to_plain"] for lam, v in r["population"].items()}
    for name, by in sec.get("quantized", {}).get("shapes", {}).items():
        for scheme, r in by.items():
            out["statuses"][f"quantized/{name}/{scheme}"] = r["status"]
            if r["status"] == "done" and "ratio_to_bf16_plain" in r["plain"]:
                pop = next(iter(r["population"].values()))
                out["quantized_ratio_to_bf16_plain"][f"{name}/{scheme}"] = {
                    "plain": r["plain"]["ratio_to_bf16_plain"],
                    "population": pop["ratio_to_bf16_plain"],
                }
    det = sec.get("determinism", {})
    for part in ("in_process", "mpiexec"):
        if part in det:
            out["statuses"][f"determinism/{part}"] = det[part]["status"]
    ip = det.get("in_process", {})
    if ip.get("status") == "done":
        out["determinism_two_runs"] = {m: ip[m]["same"] for m in ("greedy", "sampled")}
    mp = det.get("mpiexec", {})
    if mp.get("status") == "done":
        out["determinism_mpiexec_same"] = mp["same"]
    if "search_spaces" in sec:
        out["statuses"]["search_spaces"] = sec["search_spaces"]["status"]
    ratios = [v for by in out["p1_ratio"].values() for v in by.values()]
    out["p1_target_0.95_met"] = bool(ratios) and all(v >= 0.95 for v in ratios)
    return out


if __name__ == "__main__":
    main()
