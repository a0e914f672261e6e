# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# Triton kernels run on CPU tensors through its interpreter when no GPU is present.
export TRITON_INTERPRET ?= 1

.PHONY: demo test bench render clean

$(VENV)/.installed: pyproject.toml constraints.txt tools/install.sh
	bash tools/install.sh $(VENV)
	touch $@

demo: $(VENV)/.installed
	$(PY) -m distill.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) -m pytest -q bench -p no:cacheprovider
	$(PY) bench/render.py

render: $(VENV)/.installed
	$(PY) bench/render.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .benchmarks
