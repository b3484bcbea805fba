# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch 2.13.0 is pinned for the dev environment: a local CPU wheel exists on the developers' machines and CI,
# any other version (or an unpinned torch) pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
DEEPSPEED_PIN := deepspeed==0.19.8

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]" "$(TORCH_PIN)"
	# DeepSpeed (tests and benchmarks of the DeepSpeed converters run the real thing on CPU). Its setup.py imports
	# torch, so it builds against the venv's torch (--no-build-isolation; an isolated build would fetch another
	# torch), and DS_BUILD_OPS=0 skips compiling CUDA/C++ ops.
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation "$(DEEPSPEED_PIN)" "$(TORCH_PIN)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ckpt.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,bench]" "$(TORCH_PIN)"
	$(PY) -m benchmarks.save_load
	$(PY) -m benchmarks.training_stall
	$(PY) -m benchmarks.reshard
	$(PY) -m benchmarks.convert
	$(PY) -m benchmarks.flush_floor
	$(PY) -m benchmarks.e2e_every10
	$(PY) -m benchmarks.daemon
	$(PY) -m benchmarks.erasure
	$(PY) -m benchmarks.hostile_costs

clean:
	rm -rf $(VENV) build *.egg-info
