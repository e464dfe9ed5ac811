# One-command entry points; each creates .venv on first use (needs only python3).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first, pinned, so that diffusers does not pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo app convert-demo test test-slow bench clean

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q -e '.[torch,engine,beam,models,gcs,export,app,dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m layerjax.demo --workdir out/demo

# The web app on the demo's packed model (after `make demo`): http://127.0.0.1:7860
app: $(VENV)/.installed
	@test -d out/demo/model || { echo 'make app: no out/demo/model: run make demo first'; exit 2; }
	$(PY) -m layerjax.app --model out/demo/model

convert-demo: $(VENV)/.installed
	$(PY) -m layerjax.convert.demo out/convert_demo

# Two processes, each file's tests in one of them (its module fixtures built once): most
# tests compile small programs, single-threaded in LLVM, so two share the 2-core box well.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) bench/mmdit_step.py

clean:
	rm -rf $(VENV) out
