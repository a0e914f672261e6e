# The two commands of the README: `make demo` and `make test`. Both set up .venv first; `make test`
# also sets up .venv-triton36 (the GPU image's Triton 3.6) and runs the suite under both.
VENV ?= .venv
PY := $(VENV)/bin/python
VENV36 ?= .venv-triton36
PY36 := $(VENV36)/bin/python
# Triton kernels run on CPU tensors through its interpreter when no GPU is present.
export TRITON_INTERPRET ?= 1
# A recipe's pipeline fails when its first command does (the suites' output is piped).
SHELL := bash
.SHELLFLAGS := -o pipefail -c

.PHONY: demo lint test test-triton39 test-triton36 bench render gpu-wheels aot costmodel mutants clean

$(VENV)/.installed: pyproject.toml constraints.txt tools/install.sh
	bash tools/install.sh $(VENV)
	touch $@

$(VENV36)/.installed: pyproject.toml constraints.txt constraints-triton36.txt tools/install.sh
	bash tools/install.sh $(VENV36) constraints-triton36.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) -m distill_fused

# The linter (rules and why: pyproject.toml's [tool.ruff]), before any test.
lint: $(VENV)/.installed
	$(PY) -m ruff check .

# The linter first; then the suite under the newest Triton (3.9) and, beside it, its kernel tests
# (the `kernels` marker: their numerics against the oracle, their GPU compile) under the GPU
# image's Triton (3.6), once both environments exist (set up one after the other). The first
# runs in two worker processes (pytest-xdist, a file to a worker), the second in one: the
# three share the two cores, and the Triton interpreter is single-threaded. Progress shows as
# it goes, each line headed by its Triton's version (unbuffered, not held back by make).
test: lint $(VENV36)/.installed
	@echo "the suite under Triton 3.9 and its kernel tests under Triton 3.6, side by side (about 12 minutes on a quiet 2-core machine)"
	$(MAKE) --no-print-directory -j2 test-triton39 test-triton36

test-triton39: $(VENV)/.installed
	$(PY) -u -m pytest -q -n 2 --dist loadfile tests 2>&1 | sed -u 's/^/[triton 3.9] /'

# Without the cache plugin: the two runs would write .pytest_cache at once. Of the tests run
# once per backend, only triton's (the other backends do not touch Triton).
test-triton36: $(VENV36)/.installed
	$(PY36) -u -m pytest -q -p no:cacheprovider -m kernels --only-backend triton tests 2>&1 | sed -u 's/^/[triton 3.6] /'

# Writes bench/results/<device>.json (this device's latest run), then renders every results
# file into bench/RESULTS.md, bench/speedup.png and the README's tables, and lists which of
# those files changed (all are tracked: git diff shows how, git checkout undoes it).
bench: $(VENV)/.installed
	$(PY) -m pytest -q bench -p no:cacheprovider
	$(PY) bench/render.py

render: $(VENV)/.installed
	$(PY) bench/render.py

# What bench/gpu_check.sh installs on a GPU machine (carried there in .whl/, which git ignores):
# this package's wheel, built from this checkout, and auraloss's, which the GPU image lacks.
# Rebuild before each GPU run: the wheel is the code that runs there.
gpu-wheels: $(VENV)/.installed
	rm -rf .whl && mkdir .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .whl auraloss==0.4.0
	rm -rf build
	$(PY) -m pip wheel -q --no-deps -w .whl .
	git describe --always --dirty > .whl/BUILT_FROM
	@echo "wheels for bench/gpu_check.sh in .whl/ (built from $$(cat .whl/BUILT_FROM)):"; ls .whl

# The tables of every kernel specialization compiled for sm_90 and sm_80 (no GPU needed), by
# the GPU image's Triton (3.6).
aot: $(VENV36)/.installed
	env -u TRITON_INTERPRET $(PY36) tests/gpu_compile.py --tables bench/results

# The cost model of a training step on an H100 (a prediction; no GPU needed; the GPU image's
# Triton), beside the figures of the kernels before issue 13.
costmodel: $(VENV36)/.installed
	env -u TRITON_INTERPRET $(PY36) bench/costmodel.py --before bench/results/costmodel-h100-before.json \
		--write bench/results/costmodel-h100.md

# Small edits of the package (tools/mutants.py) that the suite must catch: slow (not in CI).
mutants: $(VENV)/.installed
	$(PY) tools/mutants.py --record tests/MUTANTS.md

clean:
	rm -rf $(VENV) $(VENV36) build src/*.egg-info .pytest_cache .benchmarks
