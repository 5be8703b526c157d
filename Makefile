# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench gpu-check clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned here only: 2.13.0 is the CPU build this machine kind carries on local disk.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tools.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

# The device check (issue 12): every test marked gpu + the GPU benchmarks, one JSON line.
# Needs a CUDA device (exits 77, "no CUDA device", without one); installs the gpu extra (kvikio).
gpu-check: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[gpu,test]'
	$(BIN)/python -m benchmarks.gpu_check

clean-venv:
	rm -rf $(VENV)
