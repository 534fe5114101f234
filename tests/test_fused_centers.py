"""The fused center-distance kernels (Triton; the interpreter on a CPU) against the plain-PyTorch reference.

Through the public API with ``OODKERNELS_BACKEND=triton`` vs ``reference``: distances, the one-call losses
and every center criterion's module path (``distance(z)`` then ``forward``), values and gradients with
respect to features and centers for every label pattern, reduction and dtype; fp64 gradcheck and opcheck of
every op; torch.compile; the autograd edge cases; the float32 cancellation of the expansion.
"""

import pytest
import torch

import oodkernels as ok
from oodkernels import testing
from oodkernels.ops import center_ops
from oodkernels.reference import centers as ref_centers
from oodkernels.reference import distances as ref_distances

pytestmark = pytest.mark.filterwarnings("ignore:Discarding samples", "ignore:IILoss. fewer than two")

#: on a machine with a GPU the kernels run natively on CUDA tensors; otherwise interpreted on CPU tensors
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, K, D = 13, 7, 11
#: multi-tile paths in every direction (B, K and D all cross tile edges)
SMALL = (4, 4, 4)
#: KERNEL_GUIDE §5: the center family's fp32 tolerances (GEMM summation order)
FP32 = (1e-5, 5e-4)


@pytest.fixture(autouse=True)
def _tensors_on_the_kernel_device():
    if DEVICE == "cpu":
        yield
        return
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


def _backend(monkeypatch, backend):
    monkeypatch.setenv("OODKERNELS_BACKEND", backend)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def fused(monkeypatch):
    _backend(monkeypatch, "triton")


def _features(n=B, d=D, dtype=torch.float32, scale=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
    assert out.dtype == dtype
    return out


def _labels(pattern, n=B, k=K):
    return testing.make_targets((n,), k, pattern, device=DEVICE)


def _fresh_leaf(t):
    """A new leaf with ``t``'s values, requires_grad flag and strides (a clone would make a slice contiguous)."""
    leaf = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    leaf.copy_(t.detach())
    assert leaf.stride() == t.stride()
    return leaf.requires_grad_(t.requires_grad)


def _run(backend, monkeypatch, fn, inputs, grad_output=None, blocks=SMALL):
    """Value and gradients of ``fn(*inputs)`` on ``backend``; float inputs that require grad are fresh leaves."""
    _backend(monkeypatch, backend)
    leaves = [_fresh_leaf(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    with center_ops.forced_blocks(*blocks):
        value = fn(*leaves)
    grads = []
    if value.requires_grad:
        go = torch.ones_like(value) if grad_output is None else grad_output.to(value.dtype)
        value.backward(go)
        grads = [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    return value.detach(), grads


def _compare(monkeypatch, fn, inputs, grad_output=None, tol=FP32, blocks=SMALL):
    value, grads = _run("triton", monkeypatch, fn, inputs, grad_output, blocks)
    expected, ref_grads = _run("reference", monkeypatch, fn, inputs, grad_output, blocks)
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


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_sq_distances_equal_reference(monkeypatch, dtype, layout):
    x = _features(dtype=dtype)
    m = _features(K, dtype=dtype, seed=2)
    if layout == "transposed":
        x = x.t().contiguous().t()
    elif layout == "sliced":
        wide = torch.zeros(K, 2 * D, dtype=dtype, device=DEVICE)
        wide[:, ::2] = m
        m = wide[:, ::2]
        assert m.stride(1) == 2
    go = torch.randn(B, K, dtype=dtype, device=DEVICE)
    tol = FP32 if dtype == torch.float32 else testing.tolerances(dtype)
    _compare(monkeypatch, ok.functional.pairwise_sq_distances, [x.requires_grad_(), m.requires_grad_()], go, tol)


def test_pairwise_distances_and_default_blocks(monkeypatch):
    """pytorch-ood's pairwise_distances(x) (y = x) and the launch heuristic's tiles (one tile here)."""
    x = _features().requires_grad_()
    _compare(monkeypatch, lambda a: ok.functional.pairwise_distances(a), [x], blocks=(0, 0, 0))
    m = _features(K, seed=3).requires_grad_()
    _compare(monkeypatch, ok.functional.pairwise_distances, [x, m])


@pytest.mark.parametrize("k,d", [(1, 1), (1, 300), (300, 3), (3, 4096)])
def test_distances_extreme_widths(monkeypatch, k, d):
    """K and D from 1 to 4096 through the default launch (D = 4096 streams 128 slices)."""
    x = _features(5, d).requires_grad_()
    m = _features(k, d, seed=4).requires_grad_()
    _compare(monkeypatch, ok.functional.pairwise_sq_distances, [x, m], torch.randn(5, k), blocks=(0, 0, 0))


def test_cancellation_matches_the_reference_clamp(monkeypatch):
    """LOSS_CONTRACT §2.6: x = (1000, 1000), m = (1000.001, 1000) in fp32 give 0.0 by expansion (exact 9.5e-7).

    The fused kernel keeps the reference's behaviour, it does not fix it silently: the same value 0.0 and the
    same gradient. (The raw expansion is exactly 0.0 here, so torch.clamp(min=0) passes the gradient through;
    that gradient, 2·(x − m), itself cancels at magnitude 2000, fp32 ulp 1.2e-4, hence atol 5e-4.)
    Where the rounding makes the raw expansion negative the clamp cuts the gradient to exactly 0. With D = 1
    the expansion has one product and no summation order, so kernel and reference round alike:
    x = 1000, m = 1000.0009155 give raw = −0.125.
    """
    x = torch.tensor([[1000.0, 1000.0]], device=DEVICE).requires_grad_()
    m = torch.tensor([[1000.001, 1000.0]], device=DEVICE).requires_grad_()
    value, grads = _run("triton", monkeypatch, ok.functional.pairwise_sq_distances, [x, m])
    expected, ref_grads = _run("reference", monkeypatch, ok.functional.pairwise_sq_distances, [x, m])
    assert value.item() == expected.item() == 0.0
    assert ((x.double() - m.double()) ** 2).sum().item() > 9e-7
    for g, r in zip(grads, ref_grads):
        testing.assert_close(g, r, atol=5e-4, rtol=0)

    x1 = torch.tensor([[1000.0]], device=DEVICE).requires_grad_()
    m1 = torch.tensor([[1000.0009155273438]], device=DEVICE).requires_grad_()
    raw = x1.detach() ** 2 + m1.detach() ** 2 - 2 * x1.detach() * m1.detach()
    assert raw.item() < 0
    for backend in ("triton", "reference"):
        value, grads = _run(backend, monkeypatch, ok.functional.pairwise_sq_distances, [x1, m1])
        assert value.item() == 0.0
        assert torch.equal(grads[0], torch.zeros_like(x1)) and torch.equal(grads[1], torch.zeros_like(m1))


def test_equal_points_clamp_boundary(monkeypatch):
    """x == m: the raw expansion is (near) 0; the fused gradient follows the same clamp rule as the reference."""
    x = torch.tensor([[1.0, 2.0], [0.5, -0.25]], device=DEVICE)
    _compare(monkeypatch, ok.functional.pairwise_sq_distances, [x.clone().requires_grad_(), x.clone().requires_grad_()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_distances_half_inputs(monkeypatch, dtype):
    x = _features(dtype=dtype)
    m = _features(K, dtype=dtype, seed=2)
    value, _ = _run("triton", monkeypatch, ok.functional.pairwise_sq_distances, [x, m])
    exact = ref_centers.sq_distances(x.double(), m.double())
    assert value.dtype == dtype
    atol, rtol = testing.tolerances(dtype)
    testing.assert_close(value.double(), exact, atol=atol, rtol=rtol, check_dtype=False)


def test_tf32_is_opt_in(fused):
    x, m = _features(), _features(K, seed=2)
    exact = ref_centers.sq_distances(x.double(), m.double()).float()
    with center_ops.tf32_dot():
        loose = ok.functional.pairwise_sq_distances(x, m)
    testing.assert_close(loose, exact, atol=1e-2, rtol=1e-2)
    assert center_ops.launch_args()[0] is False


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
    if pattern in ("all_ood", "empty") and name != "mchad":
        assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood"])
@pytest.mark.parametrize("name", list(FROM_DISTANCES))
def test_distance_matrix_losses_equal_reference(monkeypatch, name, pattern):
    kwargs = ONE_CALL[name][1]
    dist = ref_centers.sq_distances(_features(), _features(K, seed=2)).requires_grad_()
    y = _labels(pattern)
    _compare(monkeypatch, lambda d, t: FROM_DISTANCES[name](d, t, *kwargs.values()), [dist, y])


def test_cac_clamp_and_pinned_values(fused):
    """Fix a (paper tuplet) and the exponent clamp at 50: LOSS_CONTRACT §8.5 a1-a3, on the fused kernel."""
    cac = ok.functional.cac_distance_loss
    d1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]], device=DEVICE)
    assert abs(cac(d1, torch.tensor([0, 1], device=DEVICE)).item() - 1.4076060) < 1e-6
    assert (
        abs(cac(torch.tensor([[1.0, 2.0, 3.0]], device=DEVICE), torch.tensor([2], device=DEVICE)).item() - 5.4076060)
        < 1e-5
    )
    d3 = torch.tensor([[100.0, 0.0, 0.0]], device=DEVICE, requires_grad=True)
    value = cac(d3, torch.tensor([0], device=DEVICE))
    assert abs(value.item() - 150.6931472) < 1e-4
    value.backward()
    # above the clamp the tuplet's gradient is 0: only the anchor term's α = 1 at the target remains
    testing.assert_close(d3.grad, torch.tensor([[1.0, 0.0, 0.0]], device=DEVICE))


def test_mchad_and_center_pinned_values(fused):
    """LOSS_CONTRACT §8.5 k1, k2 on the fused kernel."""
    k1 = ok.functional.center_distance_loss(torch.tensor([[1.5, 9.0, 9.0]]), torch.tensor([0]), 1.0)
    assert abs(k1.item() - (0.5 + 2e-12) / 3) < 1e-7
    d = torch.tensor([[0.5, 3, 3], [3, 1.5, 3], [1, 1, 3], [5, 0.5, 0.2]])
    k2 = ok.functional.mchad_distance_loss(d, torch.tensor([0, 1, -1, -1]), 1.0, 2.0)
    assert abs(k2.item() - 14.0538281) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(ONE_CALL))
def test_one_call_dtypes(monkeypatch, name, dtype):
    """Output in the features' dtype; bf16/fp16 against the fp64 evaluation of the same inputs."""
    fn, kwargs = ONE_CALL[name]
    x = _features(dtype=dtype).requires_grad_()
    m = _features(K, seed=2, dtype=dtype).requires_grad_()
    y = _labels("mixed")
    value, grads = _run("triton", monkeypatch, lambda a, c, t: fn(a, c, t, **kwargs), [x, m, y])
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


# ----------------------------------------------------------------------------------------------
# the criteria: distance(z) then forward, both fused
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
    criterion = _criteria()[name]().to(DEVICE)
    dim = criterion.centers.n_features
    n = 0 if pattern == "empty" else B
    z = _features(n, dim).requires_grad_()
    y = _labels(pattern, B)[:n]
    params = criterion.centers.params

    def step(z, y):
        params.grad = None
        return criterion(criterion.distance(z), y)

    value, grads = _run("triton", monkeypatch, step, [z, y])
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
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        criterion = ok.loss.IILoss(n_classes=K, n_embedding=D, alpha=0.5).to(DEVICE).train(train)
        if not train:
            criterion.running_centers.running_centers.copy_(_features(K, seed=5))
        x = _features().requires_grad_()
        _backend(monkeypatch, backend)
        with center_ops.forced_blocks(*SMALL):
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
    _backend(monkeypatch, "reference")
    shape = criterion(x, y).shape
    go = torch.randn(shape, device=DEVICE) if len(shape) else None
    _compare(monkeypatch, criterion, [x, y], grad_output=go)
    _compare(monkeypatch, lambda a: criterion.distance(a), [x], grad_output=torch.randn(B, device=DEVICE))


def test_criteria_dtypes(monkeypatch):
    """bf16 in, bf16 out, through the module path of MCHAD (distances in bf16, loss in fp32, one rounding)."""
    criterion = ok.loss.MCHADLoss(n_classes=K, n_dim=D, radius=0.3, margin=4.5, weight_oe=0.01).to(DEVICE)
    z = _features(dtype=torch.bfloat16)
    y = _labels("mixed")
    value, _ = _run("triton", monkeypatch, lambda a, t: criterion(criterion.distance(a), t), [z, y])
    expected, _ = _run("reference", monkeypatch, lambda a, t: criterion(criterion.distance(a), t), [z, y])
    assert value.dtype == torch.bfloat16
    testing.assert_close(value, expected, atol=1e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------------
# autograd edge cases, registration
# ----------------------------------------------------------------------------------------------


def test_per_entry_grad_output_and_retain_graph(fused):
    """A random (B, K) grad_output on the distances reaches both GEMM gradients; backward twice is identical."""
    x = _features().requires_grad_()
    m = _features(K, seed=2).requires_grad_()
    with center_ops.forced_blocks(*SMALL):
        dist = ok.functional.pairwise_sq_distances(x, m)
    go = torch.randn(B, K, device=DEVICE)
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
    """tanh before the loss (it saves its output) gets the reference gradient; nothing is written in place."""
    raw = _features().requires_grad_()
    m = _features(K, seed=2).requires_grad_()
    y = _labels("mixed")
    before = (raw.detach().clone(), m.detach().clone(), y.clone())
    _compare(monkeypatch, lambda a, c, t: ok.functional.mchad_loss(a.tanh() * 2, c, t, margin=4.0), [raw, m, y])
    assert torch.equal(raw.detach(), before[0]) and torch.equal(m.detach(), before[1]) and torch.equal(y, before[2])


def test_double_backward_raises(fused):
    x = _features(dtype=torch.float64).requires_grad_()
    m = _features(K, seed=2, dtype=torch.float64)
    (grad,) = torch.autograd.grad(ok.functional.cac_loss(x, m, _labels("all_id")), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through the fused center kernels is not supported"):
        grad.sum().backward()
    (grad,) = torch.autograd.grad(ok.functional.pairwise_sq_distances(x, m).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


def test_gradcheck_fp64_every_op(fused):
    """fp64 gradcheck (fast mode) of the distance op and of each loss kind, from features and from distances."""
    x = _features(5, 3, dtype=torch.float64).requires_grad_()
    m = _features(3, 3, seed=2, dtype=torch.float64).requires_grad_()
    y = torch.tensor([0, 2, -1, 1, 0], device=DEVICE)
    margin = torch.tensor([2.5], dtype=torch.float64, device=DEVICE)
    with center_ops.forced_blocks(2, 2, 2):
        assert torch.autograd.gradcheck(lambda a, c: ok.functional.pairwise_sq_distances(a, c), (x, m), fast_mode=True)
        for kind, params, mg in [
            (0, (0.7, 0, 0, 0), None),
            (1, (0.3, 0, 0, 0), None),
            (2, (0.3, 0.5, 0.7, 0.2), margin),
        ]:

            def features_op(a, c, mg=mg, kind=kind, params=params):
                return torch.ops.oodkernels.center_loss_fwd(a, c, y, mg, kind, *params, *center_ops.launch_args())[0]

            def distances_op(d, mg=mg, kind=kind, params=params):
                return torch.ops.oodkernels.center_loss_fwd(d, None, y, mg, kind, *params, *center_ops.launch_args())[0]

            assert torch.autograd.gradcheck(features_op, (x, m), fast_mode=True)
            dist = ref_centers.sq_distances(x.detach(), m.detach()).requires_grad_()
            assert torch.autograd.gradcheck(distances_op, (dist,), fast_mode=True)


def test_opcheck_center_ops(fused):
    from torch.library import opcheck

    x = _features(6, 5).t().contiguous().t()  # transposed rows
    m = _features(3, 5, seed=2)
    y = torch.tensor([0, 2, -1, 1, 0, -3], device=DEVICE)
    margin = torch.tensor([2.5], device=DEVICE)
    blocks = (False, 4, 2, 2)
    opcheck(torch.ops.oodkernels.center_sq_distances.default, (x.requires_grad_(), m, torch.float32, *blocks))
    opcheck(torch.ops.oodkernels.center_sq_distances.default, (x.detach()[:0], m, torch.float32, *blocks))
    opcheck(torch.ops.oodkernels.center_sq_distances_bwd.default, (torch.randn(6, 3), x.detach(), m, *blocks))
    dist = ref_centers.sq_distances(x.detach(), m)
    for kind, mg in [(0, None), (1, None), (2, margin)]:
        args = (x.detach().requires_grad_(), m.requires_grad_(), y, mg, kind, 0.3, 0.5, 0.7, 0.2, *blocks)
        opcheck(torch.ops.oodkernels.center_loss_fwd.default, args)
        opcheck(torch.ops.oodkernels.center_loss_fwd.default, (dist, None, y, mg, kind, 0.3, 0.5, 0.7, 0.2, *blocks))
        _, stats = torch.ops.oodkernels.center_loss_fwd(
            x.detach(), m.detach(), y, mg, kind, 0.3, 0.5, 0.7, 0.2, *blocks
        )
        gv = torch.randn(6)
        bwd = (gv, x.detach(), m.detach(), y, mg, stats, kind, 0.3, 0.5, 0.7, 0.2, *blocks)
        opcheck(torch.ops.oodkernels.center_loss_bwd.default, bwd)


@pytest.mark.parametrize("path", ["module", "one_call"])
def test_compile_fullgraph(fused, compile_reset, path):
    from oodkernels import config

    config.data_checks = False  # no host read: nothing breaks the graph
    criterion = ok.loss.MCHADLoss(n_classes=K, n_dim=D, radius=0.3, margin=4.5, weight_oe=0.01).to(DEVICE)
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


def test_fused_kernels_are_used(fused, monkeypatch):
    calls = []
    for name in ("loss_forward", "sq_distances"):
        original = getattr(center_ops._kernels, name)

        def spy(*args, _original=original, **kwargs):
            calls.append(1)
            return _original(*args, **kwargs)

        monkeypatch.setattr(center_ops._kernels, name, spy)
    criterion = ok.loss.CenterLoss(n_classes=K, n_dim=D)
    z = _features()
    criterion(criterion.distance(z), _labels("mixed"))
    ok.functional.cac_loss(z, _features(K, seed=2), _labels("mixed"))
    ok.loss.DeepSVDDLoss(n_dim=D)(z)
    assert len(calls) == 4
    assert ok.backend_info()["operations"]["mchad_loss"]["cuda"] == "triton"


def test_warnings_and_errors(fused):
    z = _features()
    m = _features(K, seed=2)
    with pytest.warns(UserWarning, match="Discarding samples with targets < 0"):
        ok.functional.center_loss(z, m, _labels("mixed"))
    with pytest.raises(ValueError, match="centers: expected centers of shape"):
        ok.functional.mchad_loss(z, m[:, :3], _labels("mixed"))
    with pytest.raises(ValueError, match="features: expected embeddings"):
        ok.functional.cac_loss(z[0], m, _labels("mixed"))
    with pytest.raises(TypeError, match="targets"):
        ok.functional.cac_loss(z, m, _labels("mixed").float())
    with pytest.raises(ValueError, match="targets"):
        ok.functional.center_loss(z, m, _labels("mixed")[:3])
    with pytest.raises(IndexError, match="out of range"):
        ok.functional.cac_loss(z, m, torch.full((B,), K, device=DEVICE))
    with pytest.raises(ValueError, match="distances to n_classes"):
        ok.loss.CACLoss(n_classes=K + 1)(torch.rand(B, K), _labels("mixed"))
    assert ref_distances.check_features_and_centers(z, m) is None
