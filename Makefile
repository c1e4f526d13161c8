# Each target creates/updates the local virtual environment (.venv) it needs.
# TORCH_SPEC picks the torch build: the default is the CPU build this project is developed with;
# on a GPU machine use e.g. `make test TORCH_SPEC="torch>=2.4" TRITON_SPEC=triton` (or install torch first).
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# Triton for the CPU test environment, where kernels run under its interpreter. 3.9.0's interpreter
# corrupts the heap in our attention tests (std::bad_alloc, then a segfault in test_kernel_ops on a
# fresh clone); 3.8.0 runs them clean. pyproject keeps <3.10, so a GPU image's triton is left alone.
TRITON_SPEC ?= triton>=3.0,<3.9
# The versions the suite last passed with: a fresh clone installs these, so a new release of a
# dependency cannot break `make test` (and CI) by surprise. pyproject.toml keeps ranges for users;
# `make test-latest` tries the newest versions they allow, `make constraints` records them after.
# `make … CONSTRAINTS=` installs without it (a GPU image with its own torch and triton).
CONSTRAINTS ?= constraints.txt
PIN         = $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
STAMP      := $(VENV)/.installed
LATEST_VENV ?= .venv-latest

.PHONY: install demo test test-fast test-latest constraints bench gpu-check lint format clean

# DeepSpeed's build imports torch: without --no-build-isolation pip would fetch a second (CUDA) torch.
define make_venv
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(1)/bin/python -m pip install -q $(2) "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(1)/bin/python -m pip install -q $(2) --no-build-isolation -e ".[dev,hpo]"
endef

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	$(call make_venv,$(VENV),$(PIN))
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## train the tiny μP model on CPU on the embedded corpus
	$(VENV)/bin/mupfast train --config configs/tiny.yaml

test: $(STAMP)  ## the whole test suite (CPU; Triton kernels run under the interpreter)
	# --durations: the slowest tests in every CI log, the ones to sample or move under `slow`
	$(PY) -m pytest -q -ra --durations=25

test-latest:  ## the suite with the newest versions pyproject allows, in .venv-latest (not in CI)
	$(call make_venv,$(LATEST_VENV),--upgrade --upgrade-strategy eager)
	$(LATEST_VENV)/bin/python -m pytest -q -ra --durations=25

constraints:  ## after `make test-latest` passes: record its versions as the ones `make test` installs
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable \
		| grep -v -E '^(torch|pip|setuptools|wheel)==' > constraints.txt

test-fast: $(STAMP)  ## everything but the multi-rank and slow tests
	$(PY) -m pytest -q -m "not slow and not distributed"

bench: $(STAMP)  ## benchmarks (GPU where present), results under benchmarks/results/
	$(PY) -m pytest benchmarks/suite -q -p no:cacheprovider \
		--benchmark-json=benchmarks/results/$$(date +%F)-suite-pytest-benchmark.json
	$(PY) -m benchmarks.bench_attention
	$(PY) -m benchmarks.bench_cross_entropy
	$(PY) -m benchmarks.bench_clip_adamw
	$(PY) -m benchmarks.bench_newton_schulz
	$(PY) -m benchmarks.bench_moe_dispatch
	$(PY) -m benchmarks.bench_e2e
	$(PY) -m benchmarks.bench_prepare
	$(PY) -m benchmarks.bench_activation_memory

# On a GPU machine the image's python runs it; on a CPU the dry run needs the project's venv (the
# system python3 has no torch, and every part failed).
gpu-check: $(if $(wildcard /dev/nvidiactl),,$(STAMP))  ## the one-call GPU check (benchmarks/gpu_check.sh; --dry-run on a CPU)
	$(if $(wildcard /dev/nvidiactl),,PYTHON=$(VENV)/bin/python) bash benchmarks/gpu_check.sh $(if $(wildcard /dev/nvidiactl),,--dry-run)

lint: $(STAMP)
	$(VENV)/bin/ruff check mupfast kernels tests benchmarks experiments
	$(VENV)/bin/ruff format --check mupfast kernels tests benchmarks experiments

format: $(STAMP)
	$(VENV)/bin/ruff check --fix mupfast kernels tests benchmarks experiments
	$(VENV)/bin/ruff format mupfast kernels tests benchmarks experiments

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs data .pytest_cache
