# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench gpu-check clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned here only: 2.13.0 is the CPU build this machine kind carries on local disk.
	$(BIN)/python -m pip install -q torch==2.13.0
	# the extras the two commands use: the model (demo), plots, the benchmarks' quick modes (tests)
	$(BIN)/python -m pip install -q -e '.[model,plot,bench,test]'
	# compile every cache kernel once, now: a fresh install's first open then loads machine code
	$(BIN)/tierstore warmup --simulator
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tierstore_cli.demo

# The fast tier (the edit-test loop, <= 4 min on 2 cores): everything not marked slow.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# The whole suite (CI runs this; goal <= 12 min on 2 cores. Fresh clone, no other job: 11:00 on
# 2026-12-07 at 11:50 UTC, 14:42 at 14:40 UTC on a slower hour of this VM, 10:18 at 17:55 UTC with
# 1,710 tests on the VM's current host):
# the fast tier plus the slow tests (the soak matrix, crash and fault matrices, spawned ranks
# and processes, the benchmarks' quick modes, tests that train their own checkpoint). The
# slowest 30 are listed at the end, to see where the time goes.
test-all: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30 tests

# Every benchmark with a quick mode, at its tiny size (seconds to a minute each): a check
# that they run, not figures. Full-size runs and their commands: docs/benchmarks.md.
QUICK_BENCHES := bench_lookup bench_host_gather bench_mixed bench_cold bench_policies bench_hasher \
	bench_distributed bench_e2e

bench: $(STAMP)
	set -e; for b in $(QUICK_BENCHES); do echo "== python -m benchmarks.$$b --quick"; \
		$(BIN)/python -m benchmarks.$$b --quick; done

# The device check (issue 12): every test marked gpu + the GPU benchmarks, one JSON line.
# Needs a CUDA device (exits 77, "no CUDA device", without one); installs the gpu extra (kvikio).
gpu-check: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[gpu,test]'
	$(BIN)/python -m benchmarks.gpu_check

clean-venv:
	rm -rf $(VENV)
