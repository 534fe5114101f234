"""Shared pieces of the row-energy tests (tests/test_fused_extra.py and tests/test_cpp_rows_energy.py).

``run`` evaluates a criterion on one backend and returns its value and the gradients of the float inputs and
of ``params``; ``compare`` checks a kernel backend against the reference.
"""

import torch
from _backends import current_device
from _backends import fresh_leaf
from _backends import use_backend
from torch import nn

from oodkernels import testing

C = 7
D = 5

#: (B, C) rows run the C++ class-contiguous traversal; the rest the entry tiles: (1, C, 16, 16) a full 256-entry
#: fp32 tile (in-place loads and stores), (2, C, 8, 8) one across two images, (2, C, 3, 4) a partial one,
#: channels-last / sliced / transposed gathered ones
LAYOUTS = [
    ((9, C), "contiguous"),
    ((9, C), "transposed"),
    ((9, C), "sliced"),
    ((2, C, 8, 8), "contiguous"),
    ((1, C, 16, 16), "contiguous"),
    ((2, C, 3, 4), "contiguous"),
    ((2, C, 3, 4), "channels_last"),
    ((2, C, 3, 4), "sliced"),
]


def run(backend, monkeypatch, fn, inputs, params=(), grad_output=None):
    """Value of ``fn(*inputs)`` on ``backend`` and the gradients of its float inputs, then of ``params``."""
    use_backend(monkeypatch, backend)
    # fresh leaves that keep the inputs' strides (a clone would make the sliced layouts contiguous)
    leaves = [fresh_leaf(t, requires_grad=t.is_floating_point()) for t in inputs]
    for p in params:
        p.grad = None
    value = fn(*leaves)
    go = torch.ones_like(value) if grad_output is None else grad_output.to(value.dtype)
    value.backward(go)
    grads = [t.grad for t in leaves if t.requires_grad] + [None if p.grad is None else p.grad.clone() for p in params]
    return value.detach(), grads


def compare(backend, monkeypatch, fn, inputs, params=(), grad_output=None, atol=None, rtol=None):
    """``fn`` on ``backend`` against the reference: dtype, shape, value and every gradient."""
    value, grads = run(backend, monkeypatch, fn, inputs, params, grad_output)
    ref_value, ref_grads = run("reference", monkeypatch, fn, inputs, params, grad_output)
    assert value.dtype == ref_value.dtype and value.shape == ref_value.shape
    testing.assert_close(value, ref_value, atol=atol, rtol=rtol, name="value")
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None:
            assert g is None or not g.any()
            continue
        testing.assert_close(g, r, atol=atol, rtol=rtol, name=f"gradient {i}")
    return value


def rand_logits(shape, dtype=torch.float32, layout="contiguous"):
    return testing.make_logits(shape[0], shape[1], shape[2:], dtype=dtype, layout=layout, device=current_device())


def rand_targets(shape, pattern):
    return testing.make_targets(shape, C, pattern, device=current_device())


def vos_modules(dtype=torch.float32):
    torch.manual_seed(3)
    phi = nn.Linear(1, 2).to(dtype)
    weights = nn.Linear(C, 1).to(dtype)
    nn.init.uniform_(weights.weight, -0.3, 1.0)  # some negative weights: relu's zero branch
    return phi, weights
