# The two commands a new user types: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean

install: $(STAMP)

# Torch comes from the local wheel cache (torch==2.14.1 / torchvision==0.29.1).
# pillow-simd replaces Pillow last, with --no-deps, so nothing reinstalls Pillow over it.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -m pip uninstall --quiet -y pillow pillow-simd || true
	CC="cc -mavx2" $(PY) -m pip install --quiet --no-deps --no-cache-dir --force-reinstall pillow-simd
	$(PY) -c "import PIL; assert 'post' in PIL.__version__, PIL.__version__; print('pillow-simd', PIL.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Every benchmark in quick mode (a few minutes on 2 cores); BENCH_ARGS=--full for the full runs,
# BENCH_ARGS="--only loader" for one. Results and plots: benchmarks/results/, docs/benchmarks.md.
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) outputs .demo
