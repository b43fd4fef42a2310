# Set-up and entry points. `make demo` and `make test` each do all set-up on a fresh machine.
#
# A machine without torch gets the pinned CPU wheel (an unpinned torch would pull
# multi-GB CUDA wheels); a GPU machine keeps its own CUDA torch and triton. Without CUDA
# the kernels run under Triton's interpreter, which needs numpy < 2.4. Installing needs no
# network where everything is already there (--no-build-isolation).
# Use a python3 that already has torch (a GPU machine's, or the user's environment) as it
# is; otherwise make .venv with the pinned CPU torch.
VENV ?= .venv
PY := $(shell python3 -c "import torch" >/dev/null 2>&1 && command -v python3 || echo $(VENV)/bin/python)
STAMP := .fastpref-ready

.PHONY: demo test bench-quick clean

$(STAMP): pyproject.toml
	[ -x "$(PY)" ] || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "triton==3.6.*"
	$(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || $(PY) -m pip install -q "numpy<2.4"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,train]" || $(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

demo: $(STAMP)
	$(PY) -m fastpref.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# Loss-block benchmark: the headline GPU subset on CUDA, the device-independent figures elsewhere.
bench-quick: $(STAMP)
	$(PY) benchmarks/bench_losses.py $$($(PY) -c "import torch; print('--quick' if torch.cuda.is_available() else '--cpu-quick')")

clean:
	rm -rf $(VENV) $(STAMP) build *.egg-info
