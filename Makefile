# The README's two commands. Each does all of its own set-up on a fresh machine that has only Python, and a
# second run reuses what the first set up:
#
#     make demo    the main job (python -m oodkernels.demo): what the fused kernels buy, classification and
#                  per-pixel segmentation, each trained fused and reference side by side
#     make test    the test suite (.ci/run calls this target)
#
# Set-up (target `setup`, once): a project virtualenv in .venv that sees the system's site-packages, so a
# machine that already has torch (a CUDA build, say) keeps it; where there is none, torch's CPU build is
# installed pinned (torch==2.13.0, as CI does: an unpinned torch would pull several GB of CUDA wheels); then
# the package with its test and demo extras, the C++ CPU extension built once ahead of time, and pytorch-ood
# 0.4.0 (the test oracle, without its dependencies). `make clean` removes .venv.

PYTHON ?= python3
VENV ?= .venv
TORCH_CPU ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.oodkernels-setup

.PHONY: demo test setup clean

demo: $(STAMP)
	$(PY) -m oodkernels.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_CPU)"
	$(PY) -m pip install "setuptools>=77" wheel
	OODKERNELS_BUILD_EXT=1 $(PY) -m pip install --no-build-isolation -e ".[test,demo]"
	$(PY) -m pip install --no-deps "pytorch-ood==0.4.0"
	@touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
