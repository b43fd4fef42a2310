# Set-up and entry points. `make demo` and `make test` each do all set-up on a fresh machine.
#
# Everything runs in the project's own virtual environment `.venv`, made on first use, unless
# you point the Makefile at an interpreter: `make test PYTHON=/path/to/python` (e.g. a GPU
# machine's python, which keeps its own CUDA torch and triton).
# A machine without torch gets the pinned CPU wheel (an unpinned torch would pull multi-GB
# CUDA wheels); without CUDA the kernels run under Triton's interpreter, which needs
# numpy < 2.4. Every install step is loud and a failed one stops make: no silent fallback.
# The readiness stamp lives inside the environment it describes, so deleting `.venv` (or
# editing pyproject.toml) makes the next command set up again.
VENV := .venv
ifdef PYTHON
PY := $(PYTHON)
STAMP := .fastpref-ready-$(subst /,_,$(PYTHON))
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastpref-ready
endif

.PHONY: setup demo test lint format bench-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml
ifdef PYTHON
	@command -v "$(PY)" >/dev/null || { echo "make: PYTHON=$(PY) is not an interpreter" >&2; exit 1; }
else
	@[ -x "$(PY)" ] || { echo "make: creating $(VENV)"; python3 -m venv $(VENV); }
endif
	@$(PY) -c "import setuptools" 2>/dev/null || $(PY) -m pip install "setuptools>=64"
	@$(PY) -c "import torch" 2>/dev/null || { echo "make: installing torch==2.13.0 (CPU)"; $(PY) -m pip install torch==2.13.0; }
	@$(PY) -c "import triton" 2>/dev/null || { echo "make: installing triton 3.6"; $(PY) -m pip install "triton==3.6.*"; }
	@$(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || $(PY) -m pip install "numpy<2.4"
	$(PY) -m pip install --no-build-isolation -e ".[test,train,dev,video]"
	@$(PY) -c "import fastpref, diffusers, peft, transformers, pytest, xdist, ruff, av" || { echo "make: the installed environment is incomplete" >&2; exit 1; }
	touch $@

demo: $(STAMP)
	$(PY) -m fastpref.demo

# Every test that can run here: the loss suite under Triton's interpreter (compiled on CUDA),
# the trainer, and the benchmark's own tests. GPU-only tests skip on a machine without CUDA.
# Two workers, one thread each: the suite is many small single-threaded tests (fits 10 min on 2 cores);
# whole files per worker, so a module's fixtures are built once.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile tests benchmarks/test_bench_losses.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Loss-block benchmark: the headline GPU subset on CUDA, the device-independent figures elsewhere.
bench-quick: $(STAMP)
	$(PY) benchmarks/bench_losses.py $$($(PY) -c "import torch; print('--quick' if torch.cuda.is_available() else '--cpu-quick')")

clean:
	rm -rf $(VENV) .fastpref-ready* build *.egg-info
