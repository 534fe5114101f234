"""Test helpers shared by the Triton and the C++ test files: which backend runs, on which device.

``BACKENDS`` parametrizes a test body that is the same on both kernel backends; the ``cpp`` param is
skipped when the extension cannot be built, except under ``OODKERNELS_REQUIRE_CPP=1`` (CI), where it runs
and fails. ``over_backends`` builds the params of a body whose cases differ per backend (the Triton cases
run in the interpreter on a CPU, so they stay few).
"""

import pytest
import torch

from oodkernels import _cpp

#: on a machine with a GPU the Triton kernels run natively on CUDA tensors; otherwise interpreted on CPU tensors
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: skip a C++ test when the extension is unavailable, unless OODKERNELS_REQUIRE_CPP=1 (then it runs and fails)
requires_cpp = pytest.mark.skipif(
    not _cpp.required() and not _cpp.available(), reason=f"C++ extension unavailable: {_cpp.status()}"
)

BACKENDS = [pytest.param("triton", id="triton"), pytest.param("cpp", id="cpp", marks=requires_cpp)]


def device_of(backend):
    """The device whose tensors ``backend`` runs on: the C++ kernels are CPU-only."""
    return "cpu" if backend == "cpp" else DEVICE


def use_backend(monkeypatch, backend):
    """Force ``OODKERNELS_BACKEND`` for the rest of the test (the interpreter on a CPU for Triton)."""
    monkeypatch.setenv("OODKERNELS_BACKEND", backend)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def over_backends(triton, cpp):
    """Params ``(backend, *case)`` for the cases of each backend: ``triton`` and ``cpp`` are lists of tuples of
    the other argvalues (a one-tuple for one argument)."""
    return [pytest.param("triton", *case) for case in triton] + [
        pytest.param("cpp", *case, marks=requires_cpp) for case in cpp
    ]


def kernel_device(request):
    """Generator body of an autouse fixture: tensors built by the test live where its backend runs.

    The backend is the test's ``backend`` param, else ``triton``; on a CPU machine nothing changes.
    """
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend", "triton") if callspec is not None else "triton"
    device = device_of(backend)
    if device == "cpu":
        yield
        return
    torch.set_default_device(device)
    yield
    torch.set_default_device(None)


def current_device():
    return torch.get_default_device()


def spy_calls(monkeypatch, owner, *names):
    """Wrap ``owner.<name>`` for each name (a kernel launcher) so that every call appends the name to the list
    returned; the originals still run."""
    calls = []
    for name in names:
        original = getattr(owner, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    return calls


def fresh_leaf(t, requires_grad=None):
    """A new leaf with ``t``'s values and strides (a clone would make a sliced, non-dense view contiguous, and the
    kernel would never see its strides); ``requires_grad`` defaults to ``t``'s flag."""
    leaf = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    leaf.copy_(t.detach())
    assert leaf.stride() == t.stride()
    return leaf.requires_grad_(t.requires_grad if requires_grad is None else requires_grad)


def value_and_grads(fn, leaves, grad_output=None):
    """``fn(*leaves)`` detached, and the gradients of the leaves that require grad after one backward of it
    (``grad_output``, else ones; none when the value does not require grad)."""
    value = fn(*leaves)
    grads = []
    if value.requires_grad:
        go = torch.ones_like(value) if grad_output is None else grad_output.to(value.dtype)
        value.backward(go)
        grads = [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    return value.detach(), grads
