"""Test configuration.

Without a CUDA device the Triton kernels run in the interpreter: ``TRITON_INTERPRET`` must be set
before anything imports ``oodkernels`` (pytest loads this file before collecting tests).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import oodkernels  # noqa: E402,F401

if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import _interpreter  # noqa: E402
    except ImportError:  # triton is not installed (the no-triton runs)
        pass
    else:
        _interpreter.install()


@pytest.fixture(autouse=True)
def _seed_and_restore_checks():
    """Every test starts from seed 0 with data checks on, and cannot leak a flag change."""
    from oodkernels import config

    torch.manual_seed(0)
    saved = config.data_checks
    config.data_checks = True
    yield
    config.data_checks = saved


@pytest.fixture
def compile_reset():
    """Reset Dynamo's caches around a torch.compile test (stale graphs leak between cases)."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()
