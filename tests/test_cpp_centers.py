"""The C++ CPU center ops (csrc/centers.cpp) against the plain-PyTorch reference, and against the Triton kernels.

Through the public API with ``OODKERNELS_BACKEND=cpp`` vs ``reference``: distances, the one-call losses, the
distance-matrix losses and every center criterion's module path, values and gradients with respect to features
and centers (fixed and learnable) for every label pattern, reduction, dtype and layout; the row-chunked GEMM
(``block_b``) against one chunk; fp64 gradcheck, opcheck, torch.compile; the autograd edge cases; the float32
cancellation of the expansion. Skipped when the extension cannot be built (an error under
``OODKERNELS_REQUIRE_CPP=1``).
"""

import pytest
import torch

import oodkernels as ok
from oodkernels import _cpp
from oodkernels import testing
from oodkernels.ops import center_ops
from oodkernels.reference import centers as ref_centers

pytestmark = [
    pytest.mark.filterwarnings("ignore:Discarding samples", "ignore:IILoss. fewer than two"),
    pytest.mark.skipif(not _cpp.available(), reason=f"C++ extension unavailable: {_cpp.status()}"),
]

B, K, D = 13, 7, 11
#: rows per GEMM chunk forced in most tests (4 chunks of B = 13 rows, the last one partial)
SMALL = (4, 4, 4)
#: KERNEL_GUIDE §5: the center family's fp32 tolerances (GEMM summation order)
FP32 = (1e-5, 5e-4)


@pytest.fixture
def cpp(monkeypatch):
    monkeypatch.setenv("OODKERNELS_BACKEND", "cpp")


def _features(n=B, d=D, dtype=torch.float32, scale=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    assert out.dtype == dtype
    return out


def _labels(pattern, n=B, k=K):
    return testing.make_targets((n,), k, pattern)


def _run(backend, monkeypatch, fn, inputs, grad_output=None, blocks=SMALL):
    """Value and gradients of ``fn(*inputs)`` on ``backend``; float inputs that require grad are fresh leaves."""
    monkeypatch.setenv("OODKERNELS_BACKEND", backend)
    leaves = [
        t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) and t.is_floating_point()
        else t
        for t in inputs
    ]  # fmt: skip
    with center_ops.forced_blocks(*blocks):
        value = fn(*leaves)
    grads = []
    if value.requires_grad:
        go = torch.ones_like(value) if grad_output is None else grad_output.to(value.dtype)
        value.backward(go)
        grads = [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    return value.detach(), grads


def _compare(monkeypatch, fn, inputs, grad_output=None, tol=FP32, blocks=SMALL, other="reference"):
    value, grads = _run("cpp", monkeypatch, fn, inputs, grad_output, blocks)
    expected, ref_grads = _run(other, monkeypatch, fn, inputs, grad_output, blocks)
    atol, rtol = tol
    testing.assert_close(value, expected, atol=atol, rtol=rtol, name="value")
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        g = torch.zeros_like(r) if g is None else g
        r = torch.zeros_like(g) if r is None else r
        testing.assert_close(g, r, atol=atol, rtol=rtol, name=f"gradient {i}")
    return value, grads


# ----------------------------------------------------------------------------------------------
# distances
# ----------------------------------------------------------------------------------------------


#: strided views built inside the differentiated function (the runner's leaves are fresh contiguous clones)
LAYOUTS = {
    "contiguous": lambda t: t,
    "transposed": lambda t: t.t().contiguous().t(),
    "sliced": lambda t: torch.cat([t, t], 1)[:, 1::2],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_sq_distances_equal_reference(monkeypatch, dtype, layout):
    view = LAYOUTS[layout]
    x = _features(dtype=dtype).requires_grad_()
    m = _features(K, dtype=dtype, seed=2).requires_grad_()
    go = torch.randn(B, K, dtype=dtype).t().contiguous().t()  # a transposed grad_output too
    tol = FP32 if dtype == torch.float32 else testing.tolerances(dtype)
    _compare(monkeypatch, lambda a, c: ok.functional.pairwise_sq_distances(view(a), view(c)), [x, m], go, tol)
    # same upcast operands, same ATen GEMM and norms, same expansion order: bitwise the reference
    xv, mv = view(x.detach()), view(m.detach())
    assert layout == "contiguous" or not (xv.is_contiguous() and mv.is_contiguous())
    monkeypatch.setenv("OODKERNELS_BACKEND", "cpp")
    assert torch.equal(ok.functional.pairwise_sq_distances(xv, mv), ref_centers.sq_distances(xv, mv))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_distances_half_inputs_match_reference_bitwise(monkeypatch, dtype):
    """bf16/fp16 in: upcast to fp32, one rounding at the end, like the reference; gradients in the input dtype."""
    x = _features(dtype=dtype).requires_grad_()
    m = _features(K, dtype=dtype, seed=2).requires_grad_()
    value, grads = _run("cpp", monkeypatch, ok.functional.pairwise_sq_distances, [x, m])
    expected, ref_grads = _run("reference", monkeypatch, ok.functional.pairwise_sq_distances, [x, m])
    assert value.dtype == dtype and torch.equal(value, expected)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        testing.assert_close(g, r)


def test_pairwise_distances_mixed_dtypes(monkeypatch):
    """pytorch-ood's pairwise_distances(x) (y = x), and fp32 with fp64 (promoted to fp64, computed in fp64)."""
    x = _features().requires_grad_()
    _compare(monkeypatch, lambda a: ok.functional.pairwise_distances(a), [x], blocks=(0, 0, 0))
    m = _features(K, seed=3, dtype=torch.float64).requires_grad_()
    value, _ = _compare(monkeypatch, ok.functional.pairwise_distances, [x, m], tol=testing.tolerances(torch.float64))
    assert value.dtype == torch.float64


@pytest.mark.parametrize("k,d", [(1, 1), (1, 300), (300, 3), (3, 4096), (9, 0)])
def test_distances_extreme_widths(monkeypatch, k, d):
    x = _features(5, d).requires_grad_()
    m = _features(k, d, seed=4).requires_grad_()
    _compare(monkeypatch, ok.functional.pairwise_sq_distances, [x, m], torch.randn(5, k), blocks=(0, 0, 0))


def test_cancellation_matches_the_reference_clamp(monkeypatch):
    """LOSS_CONTRACT §2.6: the fp32 expansion cancels to 0.0 (exact 9.5e-7) and the C++ path keeps it; where the
    rounding makes the raw expansion negative (D = 1: x = 1000, m = 1000.0009155 give raw = −0.125) the clamp
    cuts the gradient to exactly 0, as torch.clamp does."""
    x = torch.tensor([[1000.0, 1000.0]]).requires_grad_()
    m = torch.tensor([[1000.001, 1000.0]]).requires_grad_()
    value, grads = _run("cpp", monkeypatch, ok.functional.pairwise_sq_distances, [x, m])
    expected, ref_grads = _run("reference", monkeypatch, ok.functional.pairwise_sq_distances, [x, m])
    assert value.item() == expected.item() == 0.0
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)
    x1 = torch.tensor([[1000.0]]).requires_grad_()
    m1 = torch.tensor([[1000.0009155273438]]).requires_grad_()
    raw = x1.detach() ** 2 + m1.detach() ** 2 - 2 * x1.detach() * m1.detach()
    assert raw.item() < 0
    for fn in (ok.functional.pairwise_sq_distances, lambda a, c: ok.functional.center_loss(a, c, torch.tensor([0]))):
        value, grads = _run("cpp", monkeypatch, fn, [x1, m1])
        expected, _ = _run("reference", monkeypatch, fn, [x1, m1])
        assert value.item() == expected.item()
        assert torch.equal(grads[0], torch.zeros_like(x1)) and torch.equal(grads[1], torch.zeros_like(m1))


def test_equal_points_clamp_boundary(monkeypatch):
    x = torch.tensor([[1.0, 2.0], [0.5, -0.25]])
    _compare(monkeypatch, ok.functional.pairwise_sq_distances, [x.clone().requires_grad_(), x.clone().requires_grad_()])


# ----------------------------------------------------------------------------------------------
# losses: one call from features, and from a distance matrix
# ----------------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood", "empty"])
@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("name", list(ONE_CALL))
def test_one_call_losses_equal_reference(monkeypatch, name, fixed, pattern):
    fn, kwargs = ONE_CALL[name]
    n = 0 if pattern == "empty" else B
    x = _features(n).requires_grad_()
    m = _features(K, seed=2).requires_grad_(not fixed)
    y = _labels(pattern, B)[:n]
    _, grads = _compare(monkeypatch, lambda a, c, t: fn(a, c, t, **kwargs) * 3, [x, m, y])
    assert len(grads) == (1 if fixed else 2)
    if pattern in ("all_ood", "empty") and name != "mchad":
        assert all(torch.count_nonzero(g) == 0 for g in grads)
    elif pattern != "empty":
        assert torch.count_nonzero(grads[0]) > 0


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(ONE_CALL))
def test_one_call_layouts_and_chunks(monkeypatch, name, layout):
    """Strided features and centers; the default chunk (one GEMM) and 1-row chunks agree with the reference."""
    fn, kwargs = ONE_CALL[name]
    view = LAYOUTS[layout]
    x = _features(scale=0.5).requires_grad_()
    m = _features(K, seed=2, scale=0.5).requires_grad_()
    y = _labels("mixed")
    for blocks in ((0, 0, 0), (1, 1, 1)):
        _compare(monkeypatch, lambda a, c, t: fn(view(a), view(c), t, **kwargs), [x, m, y], blocks=blocks)


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood", "empty"])
@pytest.mark.parametrize("name", list(FROM_DISTANCES))
def test_distance_matrix_losses_equal_reference(monkeypatch, name, pattern):
    kwargs = ONE_CALL[name][1]
    n = 0 if pattern == "empty" else B
    dist = ref_centers.sq_distances(_features(n), _features(K, seed=2))
    y = _labels(pattern, B)[:n]
    go = torch.tensor(2.5)
    for view in LAYOUTS.values():
        _compare(
            monkeypatch,
            lambda d, t, view=view: FROM_DISTANCES[name](view(d), t, *kwargs.values()),
            [dist.requires_grad_(), y],
            go,
        )


@pytest.mark.parametrize("name", list(FROM_DISTANCES))
def test_distance_matrix_half_dtypes(monkeypatch, name):
    """bf16 distances: ACC fp32 inside, the loss and dL/d(distances) in bf16 (one rounding)."""
    kwargs = ONE_CALL[name][1]
    dist = ref_centers.sq_distances(_features(), _features(K, seed=2)).to(torch.bfloat16)
    y = _labels("mixed")
    value, grads = _run(
        "cpp", monkeypatch, lambda d, t: FROM_DISTANCES[name](d, t, *kwargs.values()), [dist.requires_grad_(), y]
    )
    expected, ref_grads = _run(
        "reference",
        monkeypatch,
        lambda d, t: FROM_DISTANCES[name](d, t, *kwargs.values()),
        [dist.double().requires_grad_(), y],
    )
    assert value.dtype == grads[0].dtype == torch.bfloat16
    testing.assert_close(value.double(), expected, atol=1e-2, rtol=2e-2, check_dtype=False)
    testing.assert_close(grads[0].double(), ref_grads[0], atol=1e-2, rtol=2e-2, check_dtype=False)


def test_pinned_values(cpp):
    """LOSS_CONTRACT §8.5 a1-a3 (CAC's tuplet and exponent clamp), k1, k2 on the C++ path."""
    cac = ok.functional.cac_distance_loss
    d1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    assert abs(cac(d1, torch.tensor([0, 1])).item() - 1.4076060) < 1e-6
    assert abs(cac(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([2])).item() - 5.4076060) < 1e-5
    d3 = torch.tensor([[100.0, 0.0, 0.0]], requires_grad=True)
    value = cac(d3, torch.tensor([0]))
    assert abs(value.item() - 150.6931472) < 1e-4
    value.backward()
    testing.assert_close(d3.grad, torch.tensor([[1.0, 0.0, 0.0]]))
    k1 = ok.functional.center_distance_loss(torch.tensor([[1.5, 9.0, 9.0]]), torch.tensor([0]), 1.0)
    assert abs(k1.item() - (0.5 + 2e-12) / 3) < 1e-7
    d = torch.tensor([[0.5, 3, 3], [3, 1.5, 3], [1, 1, 3], [5, 0.5, 0.2]])
    k2 = ok.functional.mchad_distance_loss(d, torch.tensor([0, 1, -1, -1]), 1.0, 2.0)
    assert abs(k2.item() - 14.0538281) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(ONE_CALL))
def test_one_call_dtypes(monkeypatch, name, dtype):
    """Output in the features' dtype; fp64 against the reference, bf16/fp16 against fp64 of the same inputs."""
    fn, kwargs = ONE_CALL[name]
    x = _features(dtype=dtype).requires_grad_()
    m = _features(K, seed=2, dtype=dtype).requires_grad_()
    y = _labels("mixed")
    value, grads = _run("cpp", monkeypatch, lambda a, c, t: fn(a, c, t, **kwargs), [x, m, y])
    exact, exact_grads = _run(
        "reference", monkeypatch, lambda a, c, t: fn(a, c, t, **kwargs), [x.double(), m.double(), y]
    )
    assert value.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == dtype
    atol, rtol = testing.tolerances(dtype)
    if dtype != torch.float64:
        atol = max(atol, 4 * float(torch.finfo(dtype).eps) * float(exact.abs().max()))
    testing.assert_close(value.double(), exact, atol=atol, rtol=rtol, check_dtype=False)
    for g, r in zip(grads, exact_grads):
        scale = float(r.abs().max())
        testing.assert_close(
            g.double(), r, atol=max(atol, 4 * float(torch.finfo(dtype).eps) * scale), rtol=rtol, check_dtype=False
        )


@pytest.mark.parametrize("name", list(ONE_CALL))
def test_one_center_and_one_dim(monkeypatch, name):
    """K = 1 and D = 1 (single-column rows: lse, tuplet sum over no other column)."""
    fn, kwargs = ONE_CALL[name]
    for k, d in ((1, D), (K, 1), (1, 1)):
        x = _features(d=d).requires_grad_()
        m = _features(k, d, seed=2).requires_grad_()
        y = torch.where(_labels("mixed") >= 0, _labels("mixed") % k, -1)
        _compare(monkeypatch, lambda a, c, t: fn(a, c, t, **kwargs), [x, m, y])


# ----------------------------------------------------------------------------------------------
# the criteria: distance(z) then forward
# ----------------------------------------------------------------------------------------------


def _criteria():
    return {
        "CACLoss": lambda: ok.loss.CACLoss(n_classes=K, magnitude=2.0, alpha=0.7),
        "CenterLoss": lambda: ok.loss.CenterLoss(n_classes=K, n_dim=D, radius=0.3),
        "CenterLoss_fixed": lambda: ok.loss.CenterLoss(n_classes=K, n_dim=K, magnitude=2.0, fixed=True),
        "MCHADLoss": lambda: ok.loss.MCHADLoss(n_classes=K, n_dim=D, radius=0.3, margin=4.5, weight_oe=0.01),
    }


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood", "empty"])
@pytest.mark.parametrize("name", list(_criteria()))
def test_criteria_module_path_equal_reference(monkeypatch, name, pattern):
    criterion = _criteria()[name]()
    dim = criterion.centers.n_features
    n = 0 if pattern == "empty" else B
    z = _features(n, dim).requires_grad_()
    y = _labels(pattern, B)[:n]
    params = criterion.centers.params

    def step(z, y):
        params.grad = None
        return criterion(criterion.distance(z), y)

    value, grads = _run("cpp", monkeypatch, step, [z, y])
    center_grad = None if params.grad is None else params.grad.clone()
    expected, ref_grads = _run("reference", monkeypatch, step, [z, y])
    testing.assert_close(value, expected, atol=FP32[0], rtol=FP32[1])
    testing.assert_close(grads[0], ref_grads[0], atol=FP32[0], rtol=FP32[1])
    if params.requires_grad:
        testing.assert_close(center_grad, params.grad, atol=FP32[0], rtol=FP32[1], name="center gradient")
    else:
        assert center_grad is None


@pytest.mark.parametrize("train", [True, False])
def test_ii_loss_equal_reference(monkeypatch, train):
    results = []
    for backend in ("cpp", "reference"):
        torch.manual_seed(0)
        criterion = ok.loss.IILoss(n_classes=K, n_embedding=D, alpha=0.5).train(train)
        if not train:
            criterion.running_centers.running_centers.copy_(_features(K, seed=5))
        x = _features().requires_grad_()
        monkeypatch.setenv("OODKERNELS_BACKEND", backend)
        value = criterion(x, _labels("mixed"))
        value.backward()
        dist = criterion.distance(x.detach())
        pred = criterion.predict(x.detach())
        results.append((value.detach(), x.grad, criterion.running_centers.running_centers.clone(), dist, pred))
    for got, expected in zip(*results):
        testing.assert_close(got, expected, atol=FP32[0], rtol=FP32[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", None])
@pytest.mark.parametrize("name", ["DeepSVDDLoss", "DeepSADLoss"])
def test_one_center_criteria_equal_reference(monkeypatch, name, reduction):
    center = _features(1, D, seed=6)[0]
    if name == "DeepSVDDLoss":
        criterion = ok.loss.DeepSVDDLoss(n_dim=D, reduction=reduction, radius=1.5, center=center)
    else:
        criterion = ok.loss.DeepSADLoss(n_dim=D, eta=0.5, reduction=reduction, center=center)
    x = _features(scale=1.5).requires_grad_()
    y = _labels("mixed")
    monkeypatch.setenv("OODKERNELS_BACKEND", "reference")
    shape = criterion(x, y).shape
    go = torch.randn(shape) if len(shape) else None
    _compare(monkeypatch, criterion, [x, y], grad_output=go)
    _compare(monkeypatch, lambda a: criterion.distance(a), [x], grad_output=torch.randn(B))


def test_criteria_bf16(monkeypatch):
    criterion = ok.loss.MCHADLoss(n_classes=K, n_dim=D, radius=0.3, margin=4.5, weight_oe=0.01)
    z = _features(dtype=torch.bfloat16)
    y = _labels("mixed")
    value, _ = _run("cpp", monkeypatch, lambda a, t: criterion(criterion.distance(a), t), [z, y])
    expected, _ = _run("reference", monkeypatch, lambda a, t: criterion(criterion.distance(a), t), [z, y])
    assert value.dtype == torch.bfloat16
    testing.assert_close(value, expected, atol=1e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------------
# C++ against the Triton kernels (interpreted)
# ----------------------------------------------------------------------------------------------


def test_cpp_equals_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = _features(6, 5).requires_grad_()
    m = _features(3, 5, seed=2).requires_grad_()
    y = torch.tensor([0, 2, -1, 1, 5 % 3, -2])
    kwargs = ONE_CALL["mchad"][1]
    _compare(monkeypatch, lambda a, c, t: ok.functional.mchad_loss(a, c, t, **kwargs), [x, m, y], other="triton")
    _compare(monkeypatch, lambda a, c, t: ok.functional.cac_loss(a, c, t, alpha=0.7), [x, m, y], other="triton")
    dist = ref_centers.sq_distances(x.detach(), m.detach()).requires_grad_()
    _compare(monkeypatch, ok.functional.center_distance_loss, [dist, y], other="triton")
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


# ----------------------------------------------------------------------------------------------
# autograd edge cases, registration, errors
# ----------------------------------------------------------------------------------------------


def test_per_entry_grad_output_and_retain_graph(cpp):
    x = _features().requires_grad_()
    m = _features(K, seed=2).requires_grad_()
    dist = ok.functional.pairwise_sq_distances(x, m)
    go = torch.randn(B, K)
    dist.backward(go, retain_graph=True)
    first = (x.grad.clone(), m.grad.clone())
    x.grad = m.grad = None
    dist.backward(go)
    assert torch.equal(first[0], x.grad) and torch.equal(first[1], m.grad)
    xr, mr = x.detach().clone().requires_grad_(), m.detach().clone().requires_grad_()
    ref_centers.sq_distances(xr, mr).backward(go)
    testing.assert_close(x.grad, xr.grad, atol=FP32[0], rtol=FP32[1])
    testing.assert_close(m.grad, mr.grad, atol=FP32[0], rtol=FP32[1])


def test_upstream_op_and_inputs_not_mutated(monkeypatch):
    raw = _features().requires_grad_()
    m = _features(K, seed=2).requires_grad_()
    y = _labels("mixed")
    before = (raw.detach().clone(), m.detach().clone(), y.clone())
    _compare(monkeypatch, lambda a, c, t: ok.functional.mchad_loss(a.tanh() * 2, c, t, margin=4.0), [raw, m, y])
    assert torch.equal(raw.detach(), before[0]) and torch.equal(m.detach(), before[1]) and torch.equal(y, before[2])
    dist = ref_centers.sq_distances(raw.detach(), m.detach())
    saved = dist.clone()
    monkeypatch.setenv("OODKERNELS_BACKEND", "cpp")
    ok.functional.cac_distance_loss(dist.requires_grad_(), y).backward()
    assert torch.equal(dist.detach(), saved)


def test_double_backward_raises(cpp):
    x = _features(dtype=torch.float64).requires_grad_()
    m = _features(K, seed=2, dtype=torch.float64)
    (grad,) = torch.autograd.grad(ok.functional.cac_loss(x, m, _labels("all_id")), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through the fused center kernels is not supported"):
        grad.sum().backward()


def test_gradcheck_fp64_every_op(cpp):
    x = _features(5, 3, dtype=torch.float64).requires_grad_()
    m = _features(3, 3, seed=2, dtype=torch.float64).requires_grad_()
    y = torch.tensor([0, 2, -1, 1, 0])
    margin = torch.tensor([2.5], dtype=torch.float64)
    with center_ops.forced_blocks(2, 2, 2):
        assert torch.autograd.gradcheck(lambda a, c: ok.functional.pairwise_sq_distances(a, c), (x, m))
        for kind, params, mg in [
            (0, (0.7, 0, 0, 0), None),
            (1, (0.3, 0, 0, 0), None),
            (2, (0.3, 0.5, 0.7, 0.2), margin),
        ]:

            def features_op(a, c, mg=mg, kind=kind, params=params):
                return torch.ops.oodkernels.center_loss_fwd(a, c, y, mg, kind, *params, *center_ops.launch_args())[0]

            def distances_op(d, mg=mg, kind=kind, params=params):
                return torch.ops.oodkernels.center_loss_fwd(d, None, y, mg, kind, *params, *center_ops.launch_args())[0]

            assert torch.autograd.gradcheck(features_op, (x, m))
            dist = ref_centers.sq_distances(x.detach(), m.detach()).requires_grad_()
            assert torch.autograd.gradcheck(distances_op, (dist,))


def test_opcheck_center_ops(cpp):
    from torch.library import opcheck

    x = _features(6, 5).t().contiguous().t()
    m = _features(3, 5, seed=2)
    y = torch.tensor([0, 2, -1, 1, 0, -3])
    margin = torch.tensor([2.5])
    blocks = (False, 4, 2, 2)
    opcheck(torch.ops.oodkernels.center_sq_distances.default, (x.requires_grad_(), m, torch.float32, *blocks))
    opcheck(torch.ops.oodkernels.center_sq_distances.default, (x.detach()[:0], m, torch.float32, *blocks))
    opcheck(torch.ops.oodkernels.center_sq_distances.default, (x.detach(), m.double(), torch.bfloat16, *blocks))
    opcheck(torch.ops.oodkernels.center_sq_distances_bwd.default, (torch.randn(6, 3), x.detach(), m, *blocks))
    dist = ref_centers.sq_distances(x.detach(), m)
    for kind, mg in [(0, None), (1, None), (2, margin)]:
        args = (x.detach().requires_grad_(), m.requires_grad_(), y, mg, kind, 0.3, 0.5, 0.7, 0.2, *blocks)
        opcheck(torch.ops.oodkernels.center_loss_fwd.default, args)
        opcheck(torch.ops.oodkernels.center_loss_fwd.default, (dist, None, y, mg, kind, 0.3, 0.5, 0.7, 0.2, *blocks))
        opcheck(
            torch.ops.oodkernels.center_loss_fwd.default,
            (dist.bfloat16().requires_grad_(), None, y, mg, kind, 0.3, 0.5, 0.7, 0.2, *blocks),
        )
        _, stats = torch.ops.oodkernels.center_loss_fwd(
            x.detach(), m.detach(), y, mg, kind, 0.3, 0.5, 0.7, 0.2, *blocks
        )
        bwd = (torch.randn(6), x.detach(), m.detach(), y, mg, stats, kind, 0.3, 0.5, 0.7, 0.2, *blocks)
        opcheck(torch.ops.oodkernels.center_loss_bwd.default, bwd)


@pytest.mark.parametrize("path", ["module", "one_call"])
def test_compile_fullgraph(cpp, compile_reset, path):
    from oodkernels import config

    config.data_checks = False  # no host read: nothing breaks the graph
    criterion = ok.loss.MCHADLoss(n_classes=K, n_dim=D, radius=0.3, margin=4.5, weight_oe=0.01)
    y = _labels("mixed")
    if path == "module":

        def fn(z):
            return criterion(criterion.distance(z), y)
    else:
        anchors = _features(K, seed=2)

        def fn(z):
            return ok.functional.cac_loss(z, anchors, y, alpha=0.7)

    z = _features()
    eager_z = z.clone().requires_grad_()
    eager = fn(eager_z)
    eager.backward()
    compiled_z = z.clone().requires_grad_()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(compiled_z)
    compiled.backward()
    testing.assert_close(compiled.detach(), eager.detach())
    testing.assert_close(compiled_z.grad, eager_z.grad)


def test_cpp_ops_are_used_and_reported(cpp, monkeypatch):
    """With the cpp backend no Triton launcher runs, and backend_info says cpp for CPU tensors (auto too)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a Triton launcher ran on the cpp backend")

    for name in ("loss_forward", "loss_backward", "sq_distances", "sq_distances_grad"):
        monkeypatch.setattr(center_ops._kernels, name, forbidden)
    z = _features().requires_grad_()
    criterion = ok.loss.CenterLoss(n_classes=K, n_dim=D)
    criterion(criterion.distance(z), _labels("mixed")).backward()
    ok.functional.cac_loss(z, _features(K, seed=2), _labels("mixed")).backward()
    ok.loss.DeepSVDDLoss(n_dim=D)(z).sum().backward()
    for backend in ("cpp", "auto"):
        monkeypatch.setenv("OODKERNELS_BACKEND", backend)
        operations = ok.backend_info()["operations"]
        for name in ok.ops.centers.FUSED:
            assert operations[name]["cpu"] == "cpp", name
    monkeypatch.setenv("OODKERNELS_BACKEND", "reference")
    assert not center_ops._on_cpp(z)


def test_bad_inputs_raise(cpp):
    x, m = _features(), _features(K, seed=2)
    y = _labels("mixed")
    with pytest.raises(RuntimeError, match="center kind 7 is not implemented by the C\\+\\+ backend"):
        torch.ops.oodkernels.center_loss_fwd(x, m, y, None, 7, 0.0, 0.0, 0.0, 0.0, False, 0, 0, 0)
    with pytest.raises(RuntimeError, match="MCHAD needs a one-element margin tensor"):
        torch.ops.oodkernels.center_loss_fwd(x, m, y, None, 2, 0.0, 0.0, 0.0, 0.0, False, 0, 0, 0)
    with pytest.raises(RuntimeError, match="expected features \\(B, D\\) and centers \\(K, D\\)"):
        torch.ops.oodkernels.center_sq_distances(x, m[:, :3], torch.float32, False, 0, 0, 0)
    with pytest.raises(RuntimeError, match="expected integer targets of shape"):
        torch.ops.oodkernels.center_loss_fwd(x, m, y[:3], None, 0, 0.0, 0.0, 0.0, 0.0, False, 0, 0, 0)
    # the public API's errors are the reference's (raised before any kernel)
    with pytest.raises(ValueError, match="centers: expected centers of shape"):
        ok.functional.mchad_loss(x, m[:, :3], y)
    with pytest.raises(TypeError, match="targets"):
        ok.functional.cac_loss(x, m, y.float())
    with pytest.raises(IndexError, match="out of range"):
        ok.functional.cac_loss(x, m, torch.full((B,), K))
