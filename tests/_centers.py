"""Shared pieces of the center-family tests (tests/test_fused_centers.py and tests/test_cpp_centers.py).

``run`` evaluates a function of features / centers / distances on one backend and returns its value and
gradients; ``compare`` checks a kernel backend against the reference (or another backend).
"""

import torch
from _backends import current_device
from _backends import fresh_leaf
from _backends import use_backend
from _backends import value_and_grads

import oodkernels as ok
from oodkernels import testing
from oodkernels.ops import center_ops

B, K, D = 13, 7, 11
#: multi-tile / multi-chunk paths in every direction (B, K and D all cross tile edges; 4 GEMM chunks of 13 rows)
SMALL = (4, 4, 4)
#: KERNEL_GUIDE §5: the center family's fp32 tolerances (GEMM summation order)
FP32 = (1e-5, 5e-4)

#: strided views built inside the differentiated function (so the kernels see them, whatever the leaves are)
LAYOUTS = {
    "contiguous": lambda t: t,
    "transposed": lambda t: t.t().contiguous().t(),
    "sliced": lambda t: torch.cat([t, t], 1)[:, 1::2],
}

ONE_CALL = {
    "center": (ok.functional.center_loss, {"radius": 0.3}),
    "cac": (ok.functional.cac_loss, {"alpha": 0.7}),
    "mchad": (
        ok.functional.mchad_loss,
        {"radius": 0.3, "margin": 4.5, "weight_center": 0.5, "weight_nll": 0.7, "weight_oe": 0.01},
    ),
}
FROM_DISTANCES = {
    "center": ok.functional.center_distance_loss,
    "cac": ok.functional.cac_distance_loss,
    "mchad": ok.functional.mchad_distance_loss,
}


def features(n=B, d=D, dtype=torch.float32, scale=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = (torch.randn(n, d, generator=g, dtype=torch.float64, device="cpu") * scale).to(dtype)
    out = out.to(current_device())
    assert out.dtype == dtype
    return out


def labels(pattern, n=B, k=K):
    return testing.make_targets((n,), k, pattern, device=current_device())


def run(backend, monkeypatch, fn, inputs, grad_output=None, blocks=SMALL):
    """Value and gradients of ``fn(*inputs)`` on ``backend``; float inputs that require grad are fresh leaves."""
    use_backend(monkeypatch, backend)
    leaves = [fresh_leaf(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    with center_ops.forced_blocks(*blocks):
        return value_and_grads(fn, leaves, grad_output)


def compare(backend, monkeypatch, fn, inputs, grad_output=None, tol=FP32, blocks=SMALL, other="reference"):
    """``fn`` on ``backend`` against ``other``: the value and every gradient within ``tol`` = (atol, rtol)."""
    value, grads = run(backend, monkeypatch, fn, inputs, grad_output, blocks)
    expected, ref_grads = run(other, monkeypatch, fn, inputs, grad_output, blocks)
    atol, rtol = tol
    testing.assert_close(value, expected, atol=atol, rtol=rtol, name="value")
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        g = torch.zeros_like(r) if g is None else g
        r = torch.zeros_like(g) if r is None else r
        testing.assert_close(g, r, atol=atol, rtol=rtol, name=f"gradient {i}")
    return value, grads
