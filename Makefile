# Set-up and entry points. `make demo` and `make test` each do all set-up on a fresh machine.
#
# The virtual environment sees the system's packages, so a GPU machine keeps its own CUDA
# torch and triton; a machine without torch gets the pinned CPU wheel (an unpinned torch
# would pull multi-GB CUDA wheels). Without CUDA the kernels run under Triton's
# interpreter, which needs numpy < 2.4.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastpref-ready

.PHONY: demo test bench-quick clean

$(STAMP): pyproject.toml
	python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "triton==3.6.*"
	$(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || $(PY) -m pip install -q "numpy<2.4"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

demo: $(STAMP)
	$(PY) -m fastpref.example

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
