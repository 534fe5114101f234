"""C++-only tests of the CPU center ops (csrc/centers.cpp); the bodies shared with the Triton kernels
(values and gradients against the reference, gradcheck, opcheck, compile, autograd edge cases, errors of the
public API) run on both backends in tests/test_fused_centers.py.

Here: the row-chunked GEMM (``block_b``) with strided features and centers against one chunk; bf16 distance
matrices; one center and one dimension; C++ against the Triton kernels (interpreted), the raw ops' statistics
included; that no Triton launcher runs on the cpp backend; the raw ops' own errors. Skipped when the extension
cannot be built (an error under ``OODKERNELS_REQUIRE_CPP=1``).
"""

import pytest
import torch
from _backends import requires_cpp
from _backends import use_backend
from _centers import FP32
from _centers import FROM_DISTANCES
from _centers import LAYOUTS
from _centers import ONE_CALL
from _centers import B
from _centers import D
from _centers import K
from _centers import compare
from _centers import features
from _centers import labels
from _centers import run

import oodkernels as ok
from oodkernels import testing
from oodkernels.ops import center_ops
from oodkernels.reference import centers as ref_centers

pytestmark = [pytest.mark.filterwarnings("ignore:Discarding samples", "ignore:IILoss. fewer than two"), requires_cpp]


@pytest.fixture
def cpp(monkeypatch):
    use_backend(monkeypatch, "cpp")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(ONE_CALL))
def test_one_call_layouts_and_chunks(monkeypatch, name, layout):
    """Strided features and centers; the default chunk (one GEMM) and 1-row chunks agree with the reference."""
    fn, kwargs = ONE_CALL[name]
    view = LAYOUTS[layout]
    x = features(scale=0.5).requires_grad_()
    m = features(K, seed=2, scale=0.5).requires_grad_()
    y = labels("mixed")
    for blocks in ((0, 0, 0), (1, 1, 1)):
        compare("cpp", monkeypatch, lambda a, c, t: fn(view(a), view(c), t, **kwargs), [x, m, y], blocks=blocks)


@pytest.mark.parametrize("name", list(FROM_DISTANCES))
def test_distance_matrix_half_dtypes(monkeypatch, name):
    """bf16 distances: ACC fp32 inside, the loss and dL/d(distances) in bf16 (one rounding)."""
    kwargs = ONE_CALL[name][1]
    dist = ref_centers.sq_distances(features(), features(K, seed=2)).to(torch.bfloat16)
    y = labels("mixed")
    value, grads = run(
        "cpp", monkeypatch, lambda d, t: FROM_DISTANCES[name](d, t, *kwargs.values()), [dist.requires_grad_(), y]
    )
    expected, ref_grads = run(
        "reference",
        monkeypatch,
        lambda d, t: FROM_DISTANCES[name](d, t, *kwargs.values()),
        [dist.double().requires_grad_(), y],
    )
    assert value.dtype == grads[0].dtype == torch.bfloat16
    testing.assert_close(value.double(), expected, atol=1e-2, rtol=2e-2, check_dtype=False)
    testing.assert_close(grads[0].double(), ref_grads[0], atol=1e-2, rtol=2e-2, check_dtype=False)


@pytest.mark.parametrize("name", list(ONE_CALL))
def test_one_center_and_one_dim(monkeypatch, name):
    """K = 1 and D = 1 (single-column rows: lse, tuplet sum over no other column)."""
    fn, kwargs = ONE_CALL[name]
    for k, d in ((1, D), (K, 1), (1, 1)):
        x = features(d=d).requires_grad_()
        m = features(k, d, seed=2).requires_grad_()
        y = torch.where(labels("mixed") >= 0, labels("mixed") % k, -1)
        compare("cpp", monkeypatch, lambda a, c, t: fn(a, c, t, **kwargs), [x, m, y])


def test_cpp_equals_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = features(6, 5).requires_grad_()
    m = features(3, 5, seed=2).requires_grad_()
    y = torch.tensor([0, 2, -1, 1, 5 % 3, -2])
    kwargs = ONE_CALL["mchad"][1]
    mchad = ok.functional.mchad_loss
    compare("cpp", monkeypatch, lambda a, c, t: mchad(a, c, t, **kwargs), [x, m, y], other="triton")
    compare("cpp", monkeypatch, lambda a, c, t: ok.functional.cac_loss(a, c, t, alpha=0.7), [x, m, y], other="triton")
    dist = ref_centers.sq_distances(x.detach(), m.detach()).requires_grad_()
    compare("cpp", monkeypatch, ok.functional.center_distance_loss, [dist, y], other="triton")
    # the raw ops themselves, stats included (labels >= K give the same NaN / no-target handling)
    y_bad = torch.tensor([0, 2, -1, 1, 3, -2])
    margin = torch.tensor([2.5])
    for kind, mg in [(0, None), (1, None), (2, margin)]:
        outs = []
        for backend in ("cpp", "triton"):
            monkeypatch.setenv("OODKERNELS_BACKEND", backend)
            args = (x.detach(), m.detach(), y_bad, mg, kind, 0.3, 0.5, 0.7, 0.2, False, 2, 2, 2)
            values, stats = torch.ops.oodkernels.center_loss_fwd(*args)
            g = torch.ops.oodkernels.center_loss_bwd(
                torch.randn(6, generator=torch.Generator().manual_seed(0)), *args[:4], stats, *args[4:]
            )
            # the row with label 3 >= K has a NaN value in both; its internal S / lse statistics are NaN in C++
            # and finite in Triton (whose tl.minimum drops the NaN gap), so the statistics compare on valid rows
            outs.append((values, stats[:, y_bad < 3], g))
        for got, expected in zip(*outs):
            testing.assert_close(got, expected, atol=FP32[0], rtol=FP32[1])
        assert torch.isnan(outs[0][0][4]) == (kind != 1)


def test_cpp_ops_are_used_and_reported(cpp, monkeypatch):
    """With the cpp backend no Triton launcher runs, and backend_info says cpp for CPU tensors (auto too)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a Triton launcher ran on the cpp backend")

    for name in ("loss_forward", "loss_backward", "sq_distances", "sq_distances_grad"):
        monkeypatch.setattr(center_ops._launchers(), name, forbidden)
    z = features().requires_grad_()
    criterion = ok.loss.CenterLoss(n_classes=K, n_dim=D)
    criterion(criterion.distance(z), labels("mixed")).backward()
    ok.functional.cac_loss(z, features(K, seed=2), labels("mixed")).backward()
    ok.loss.DeepSVDDLoss(n_dim=D)(z).sum().backward()
    for backend in ("cpp", "auto"):
        monkeypatch.setenv("OODKERNELS_BACKEND", backend)
        operations = ok.backend_info()["operations"]
        for name in ok.ops.centers.FUSED:
            assert operations[name]["cpu"] == "cpp", name
    monkeypatch.setenv("OODKERNELS_BACKEND", "reference")
    assert not center_ops._on_cpp(z)


def test_bad_inputs_raise(cpp):
    """The raw C++ ops' own checks (the public API's errors: tests/test_fused_centers.py)."""
    x, m = features(), features(K, seed=2)
    y = labels("mixed")
    with pytest.raises(RuntimeError, match="center kind 7 is not implemented by the C\\+\\+ backend"):
        torch.ops.oodkernels.center_loss_fwd(x, m, y, None, 7, 0.0, 0.0, 0.0, 0.0, False, 0, 0, 0)
    with pytest.raises(RuntimeError, match="MCHAD needs a one-element margin tensor"):
        torch.ops.oodkernels.center_loss_fwd(x, m, y, None, 2, 0.0, 0.0, 0.0, 0.0, False, 0, 0, 0)
    with pytest.raises(RuntimeError, match="expected features \\(B, D\\) and centers \\(K, D\\)"):
        torch.ops.oodkernels.center_sq_distances(x, m[:, :3], torch.float32, False, 0, 0, 0)
    with pytest.raises(RuntimeError, match="expected integer targets of shape"):
        torch.ops.oodkernels.center_loss_fwd(x, m, y[:3], None, 0, 0.0, 0.0, 0.0, 0.0, False, 0, 0, 0)
    assert B == x.shape[0]
