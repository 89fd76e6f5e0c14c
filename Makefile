# The two README commands: `make train` and `make test`. Both build .venv from nothing when it is missing.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.vime-installed
PIP       := $(BIN)/pip
CONSTRAIN := -c constraints-cpu.txt
MODEL     := models/tiny-qwen2
RECIPE    ?= configs/grpo_tiny_cpu.yaml

.PHONY: install train test lint typecheck contracts check model clean

install: $(STAMP)

# torch first (the local CPU build), then everything else pinned to it; PyPI's torchvision/torchaudio/torchcodec
# are CUDA builds that break `import vllm` on this torch, so they go.
$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip $(CONSTRAIN)
	$(PIP) install -q torch==2.13.0 $(CONSTRAIN)
	$(PIP) install -q -e '.[cpu,dev]' $(CONSTRAIN)
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import torch, vllm, megatron.core, vime; print('vime install ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

$(MODEL)/config.json: | $(STAMP)
	$(BIN)/vime make-model --arch qwen2 --size tiny --out $(MODEL)

model: $(MODEL)/config.json

train: $(STAMP) $(MODEL)/config.json
	$(BIN)/vime train -c $(RECIPE)

# Static checks first (seconds), then the suite (minutes): a lint error, a type error against a protocol or a
# broken import contract fails `make test` before any server starts.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

contracts: $(STAMP)
	$(BIN)/lint-imports

check: lint typecheck contracts

test: check
	$(BIN)/python -m pytest -q -ra --durations=30

clean:
	rm -rf $(VENV) models runs outputs
