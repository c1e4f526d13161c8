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
# The GPU machine's image: Triton 3.6.0 and torch 2.11.0, where everything else is compiled and traced with
# this venv's versions. Side-installed into $(PREFLIGHT) (git-ignored) and put first on PYTHONPATH for the
# checks that need them (tests/test_kernel_targets.py looks there: keep GPU_IMAGE_TRITON = PREFLIGHT_TRITON).
# PyPI's torch for Linux is the CUDA build with its NVIDIA libraries (~4.6 GB installed, it imports without a
# GPU); where download.pytorch.org is reachable, PREFLIGHT_TORCH_INDEX=https://download.pytorch.org/whl/cpu
# fetches the ~200 MB CPU build instead.
PREFLIGHT        := .preflight
PREFLIGHT_TRITON ?= 3.6.0
PREFLIGHT_TORCH  ?= 2.11.0
PREFLIGHT_TORCH_INDEX ?=
SIDE_TRITON      := $(PREFLIGHT)/triton-$(PREFLIGHT_TRITON)
SIDE_TORCH       := $(PREFLIGHT)/torch-$(PREFLIGHT_TORCH)

.PHONY: install demo test test-fast test-latest constraints bench gpu-check lint format clean \
	preflight preflight-triton preflight-torch

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

# A side install: pip --target into a fresh folder, marked complete only when pip succeeded (a half-written
# folder is never used). Few retries and a short timeout: `make test` goes on without it when offline.
define side_install
	rm -rf $(1)
	$(PY) -m pip install -q --retries 1 --timeout 30 --target $(1) $(2)
	touch $(1)/.installed
endef

$(SIDE_TRITON)/.installed: | $(STAMP)
	$(call side_install,$(SIDE_TRITON),--no-deps "triton==$(PREFLIGHT_TRITON)")

# numpy < 2.4: Triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 refuses.
$(SIDE_TORCH)/.installed: | $(STAMP)
	$(call side_install,$(SIDE_TORCH),$(if $(PREFLIGHT_TORCH_INDEX),--index-url $(PREFLIGHT_TORCH_INDEX)) \
		"torch==$(PREFLIGHT_TORCH)" "numpy<2.4")

preflight-triton: $(SIDE_TRITON)/.installed  ## side-install the GPU image's Triton (PREFLIGHT_TRITON) in .preflight/

preflight-torch: $(SIDE_TORCH)/.installed  ## side-install the GPU image's torch (PREFLIGHT_TORCH, its Triton with it)

demo: $(STAMP)  ## train the tiny μP model on CPU on the embedded corpus
	$(VENV)/bin/mupfast train --config configs/tiny.yaml

# The GPU image's Triton first (the compile-target test compiles the sampled kernel configs with it too); never
# fatal: without PyPI that test is skipped and says why.
test: $(STAMP)  ## the whole test suite (CPU; Triton kernels run under the interpreter)
	@$(MAKE) --no-print-directory preflight-triton \
		|| echo "warning: could not side-install triton==$(PREFLIGHT_TRITON); its compile test will be skipped" >&2
	# --durations: the slowest tests in every CI log, the ones to sample or move under `slow`
	$(PY) -m pytest -q -ra --durations=25

# The GPU image's versions, on CPU: every sampled kernel config compiles for sm_80 and sm_90a with this venv's
# Triton and with PREFLIGHT_TRITON (tests/test_kernel_targets.py); then, under PREFLIGHT_TORCH (and the Triton
# it pins), the kernels' operators: registration (opcheck), fake implementations, autograd, dynamo and
# AOTAutograd tracing, triton_op bodies traced to kernel nodes, under that Triton's interpreter; and the model's
# compile tests (one graph for every block, with and without activation checkpointing).
preflight: $(STAMP) preflight-triton preflight-torch  ## kernel compiles and operator tracing under the GPU image's Triton and torch (CPU)
	$(PY) -m pytest -q -ra -p no:cacheprovider tests/test_kernel_targets.py
	PYTHONPATH=$(abspath $(SIDE_TORCH)) $(PY) -c 'import torch, triton; print("torch", torch.__version__, "triton", \
		triton.__version__); assert torch.__version__.split("+")[0] == "$(PREFLIGHT_TORCH)"'
	PYTHONPATH=$(abspath $(SIDE_TORCH)) $(PY) -m pytest -q -ra -p no:cacheprovider \
		-W "ignore:Conversion of an array with ndim:DeprecationWarning" tests/test_kernel_ops.py tests/test_compile.py

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
	rm -rf $(VENV) $(LATEST_VENV) $(PREFLIGHT) runs data .pytest_cache
