"""The vectorised tile epilogues of csrc/rows.cpp against its scalar ``coefficients`` path.

Entry tiles (NCHW) of the kinds CROSS_ENTROPY, OUTLIER_EXPOSURE and ENERGY without a cost matrix take
the lane-vectorised forward epilogue and backward coefficients; a cost matrix of ones (ω = 1 exactly)
sends the same entries through the scalar per-entry path. Both must agree on the row values, every
statistic, the energy output and the gradients, for full contiguous tiles, full tiles that straddle
two images, and a partial last tile, with OOD, ignored and too-large labels in every tile.
"""

import pytest
import torch

from oodkernels import _cpp

pytestmark = pytest.mark.skipif(
    not _cpp.required() and not _cpp.available(), reason=f"C++ extension unavailable: {_cpp.status()}"
)

C = 5
IGNORE = 3
# 2 images of 16·20 = 320 entries; fp32 tiles of 256: one full contiguous tile, one full tile across the
# two images, one partial tile of 128 (fp64 tiles of 128: five, the last one partial)
SHAPE = (2, C, 16, 20)


def _inputs(dtype):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(SHAPE, generator=gen, dtype=dtype) * 3
    targets = torch.randint(-2, C, (SHAPE[0],) + SHAPE[2:], generator=gen)
    targets.view(-1)[::97] = C  # too large: NaN rows
    # non-finite lanes in the full tile and in the straddling one: a NaN logit, a +inf max, an all -inf entry
    logits[0, 2, 0, 5] = float("nan")
    logits[0, 1, 10, 10] = float("inf")
    logits[1, :, 3, 3] = float("-inf")
    return logits, targets


def _close(got, want, what):
    tol = 1e-12 if got.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", [0, 1, 2], ids=["cross_entropy", "outlier_exposure", "energy"])
def test_vector_tile_epilogue_equals_scalar_path(kind, dtype):
    _cpp.available()
    ops = torch.ops.oodkernels
    logits, targets = _inputs(dtype)
    ones = torch.ones(C, C, dtype=dtype)
    n = targets.numel()
    go = torch.linspace(-1.5, 2.0, n, dtype=dtype)
    out = {}
    for name, cost in (("vector", None), ("scalar", ones)):
        args = (cost, kind, 0.3, -3.0, -2.5, IGNORE, 0, 0)
        values, stats = ops.cpu_row_loss_fwd(logits, targets, *args)
        grad = ops.cpu_row_loss_bwd(go, logits, targets, cost, stats, *args[1:])
        out[name] = (values, stats, grad)
    (values, stats, grad), (s_values, s_stats, s_grad) = out["vector"], out["scalar"]
    assert values.isnan().sum() >= (targets == C).sum() > 0  # the too-large labels (and the NaN entry)
    assert (values == 0).any() and (grad != 0).any()
    _close(values, s_values, "values")
    _close(stats, s_stats, "stats")
    _close(grad, s_grad, "grad")


@pytest.mark.parametrize("weighted", [False, True], ids=["energy", "weighted_energy"])
@pytest.mark.parametrize("kind", [0, 2], ids=["cross_entropy", "energy"])
def test_vector_tile_epilogue_energy_variant_equals_scalar_path(kind, weighted):
    """row_loss_energy_fwd / _bwd: the energy output and its upstream gradient through both paths."""
    _cpp.available()
    ops = torch.ops.oodkernels
    logits, targets = _inputs(torch.float32)
    weight = torch.linspace(-0.5, 1.5, C) if weighted else None
    n = targets.numel()
    go = torch.linspace(-1.0, 1.0, n)
    ge = torch.linspace(2.0, -0.5, n)
    out = {}
    for name, cost in (("vector", None), ("scalar", torch.ones(C, C))):
        args = (cost, kind, 0.2, -3.0, -2.5, IGNORE, 0, 0)
        values, energy, stats = ops.cpu_row_loss_energy_fwd(logits, targets, *args, weight)
        grad, grad_w = ops.cpu_row_loss_energy_bwd(go, ge, logits, targets, cost, stats, energy, weight, *args[1:])
        out[name] = (values, energy, stats, grad, grad_w)
    for what, got, want in zip(("values", "energy", "stats", "grad", "grad_w"), out["vector"], out["scalar"]):
        _close(got, want, what)
