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
from oodkernels.reference._common import LabelOutOfRangeError

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


def test_fp32_exp_within_one_ulp(cpp):
    """The C++ kernels' own fp32 exp (csrc/centers.cpp vec_exp) against the correctly rounded e^x.

    CAC's statistic S = Σ_{c≠y} exp(min(d_y − d_c, 50)) is one exp when d_y − d_c = x in one column and −inf in
    the others: with K = 11, y = 0 and the finite column moving over 1..10, x passes through every lane of a
    full 8-wide chunk and of the overlapped tail.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.empty(40000).uniform_(-110.0, 50.0, generator=g),  # subnormal results and underflow to 0 included
        torch.empty(20000).uniform_(-1.0, 1.0, generator=g),
        torch.tensor([0.0, -0.0, 50.0, -87.33, -103.9, -104.0, float("-inf"), float("nan")]),
    ])  # fmt: skip
    n, k = x.numel(), 11
    dist = torch.full((n, k), float("inf"))
    dist[:, 0] = x
    dist[torch.arange(n), 1 + torch.arange(n) % (k - 1)] = 0.0
    y = torch.zeros(n, dtype=torch.int64)
    _, stats = torch.ops.oodkernels.cpu_center_loss_fwd(dist, None, y, None, 0, 1.0, 0.0, 0.0, 0.0, False, 0, 0, 0)
    got, expected = stats[1], torch.exp(x.double()).float()
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    ulps = (got.view(torch.int32).long() - expected.view(torch.int32).long()).abs()[~torch.isnan(got)]
    assert ulps.max().item() <= 1, (ulps.max(), x[~torch.isnan(got)][ulps.argmax()])


def _aten_ops(fn) -> set:
    """The names of the ATen ops ``fn()`` dispatches (the C++ operators' internal calls included)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 2.5, -0.5])
def test_scaled_identity_centers_run_no_gemm(cpp, dtype, scale):
    """Centers s·I (CAC's anchors): the cross term is s·x, bitwise what the GEMM gives, and no GEMM runs; a row
    with an inf or a NaN still gets the GEMM's all-NaN row; one entry off the pattern brings the GEMM back."""
    n = 2 * K
    x = features(n, K, dtype=dtype)
    x[3, 2] = float("inf")
    x[5, 0] = float("nan")
    anchors = torch.eye(K, dtype=dtype) * scale
    anchors[0, 1] = -0.0  # a signed zero is still a zero
    args = (dtype, False, 0, 0, 0)
    got = torch.ops.oodkernels.cpu_center_sq_distances(x, anchors, *args)
    expected = ref_centers.sq_distances(x, anchors)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)  # bitwise, NaN rows included
    assert not torch.isfinite(got[3]).any() and torch.isnan(got[5]).all()  # inf·0 = NaN across the row
    finite = torch.isfinite(x).all(1)
    xf = x[finite]
    assert "aten::mm" not in _aten_ops(lambda: torch.ops.oodkernels.cpu_center_sq_distances(xf, anchors, *args))
    assert "aten::mm" in _aten_ops(lambda: torch.ops.oodkernels.cpu_center_sq_distances(x, anchors, *args))
    almost = anchors.clone()
    almost[K - 1, K - 2] = 1e-30
    assert "aten::mm" in _aten_ops(lambda: torch.ops.oodkernels.cpu_center_sq_distances(xf, almost, *args))
    # the distance backward's dX product G·M: s·G, and a G row with an inf takes the GEMM (NaN spread over the row)
    dist = torch.ops.oodkernels.cpu_center_sq_distances(xf, anchors, *args)
    grad = features(xf.shape[0], K, dtype=dtype, seed=4)
    grad[2, 1] = float("inf")
    grad_x, _ = torch.ops.oodkernels.cpu_center_sq_distances_grads(grad, dist, xf, anchors, True, False, False, 0, 0, 0)
    g = grad * (dist > 0)
    expected_x = 2 * (g.sum(1, keepdim=True) * xf - g @ anchors)
    testing.assert_close(grad_x, expected_x)  # NaN equal to NaN
    assert not torch.isfinite(grad_x[2]).any()


@pytest.mark.parametrize("name", list(FROM_DISTANCES))
def test_cac_anchors_module_path_against_reference(monkeypatch, name):
    """The module path ``crit(crit.distance(z), y)`` with identity anchors (CAC's) and trainable anchors s·I:
    values and gradients for the features (and the anchors) against the reference."""
    kwargs = ONE_CALL[name][1]
    x = features(d=K).requires_grad_()
    anchors = (torch.eye(K) * 1.5).requires_grad_()
    y = labels("mixed")

    def step(z, m, t):
        return FROM_DISTANCES[name](ok.functional.pairwise_sq_distances(z, m), t, *kwargs.values())

    compare("cpp", monkeypatch, step, [x, anchors, y])
    compare("cpp", monkeypatch, lambda z, m, t: ONE_CALL[name][0](z, m, t, **kwargs), [x, anchors, y])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_center_pass(cpp, monkeypatch, dtype):
    """One center with D >= the vector width (DeepSVDD/SAD): one pass over the rows, no GEMM, the reference's
    values and gradients within rounding; narrower rows keep the GEMM (bitwise the reference's). A zero in the
    saved distances makes the backward recompute the row's raw expansion with that same pass."""
    x = features(64, 37, dtype=dtype, seed=3)
    x[5] = -x[5]  # a strided copy below too
    mu = features(1, 37, dtype=dtype, seed=4)
    args = (dtype, False, 0, 0, 0)
    got = torch.ops.oodkernels.cpu_center_sq_distances(x, mu, *args)
    tol = FP32 if dtype == torch.float32 else testing.tolerances(dtype)
    testing.assert_close(got, ref_centers.sq_distances(x, mu), atol=tol[0], rtol=tol[1])
    strided = torch.cat([x, x], 1)[:, ::2]
    testing.assert_close(
        torch.ops.oodkernels.cpu_center_sq_distances(strided, mu, *args), ref_centers.sq_distances(strided, mu),
        atol=tol[0], rtol=tol[1],
    )  # fmt: skip
    assert "aten::mm" not in _aten_ops(lambda: torch.ops.oodkernels.cpu_center_sq_distances(x, mu, *args))
    narrow = x[:, :3]
    assert torch.equal(
        torch.ops.oodkernels.cpu_center_sq_distances(narrow, mu[:, :3], *args),
        ref_centers.sq_distances(narrow, mu[:, :3]),
    )
    # DeepSVDD's criterion, values and gradients against the reference
    svdd = ok.loss.DeepSVDDLoss(n_dim=37, center=mu[0].float()).to(dtype)
    ref = ok.reference.DeepSVDDLoss(n_dim=37, center=mu[0].float()).to(dtype)
    compare("cpp", monkeypatch, lambda z: svdd(z), [x.clone().requires_grad_()], tol=tol, other="reference")
    testing.assert_close(svdd(x), ref(x), atol=tol[0], rtol=tol[1])
    # saved zeros on rows far from μ (raw > 0): the recompute passes their gradient; elsewhere dist > 0 passes
    dist = got.clone()
    dist[[1, 7]] = 0.0
    grad = torch.linspace(-1.0, 1.0, 64, dtype=dtype).reshape(64, 1)
    grad_x, grad_m = torch.ops.oodkernels.cpu_center_sq_distances_grads(grad, dist, x, mu, True, True, False, 0, 0, 0)
    testing.assert_close(grad_x, 2 * grad * (x - mu), atol=tol[0], rtol=tol[1])
    testing.assert_close(grad_m, -2 * (grad * (x - mu)).sum(0, keepdim=True), atol=tol[0], rtol=tol[1])


def _eager_and_custom_op(fn_step, fn_op, inputs, create_graph=False):
    """Values and gradients of the C++ eager step and of the custom op on the same inputs (fresh leaves)."""
    results = []
    for fn in (fn_step, fn_op):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                  for t in inputs]  # fmt: skip
        out = fn(*leaves)
        wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        grad_out = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
        grads = torch.autograd.grad(out, wrt, grad_out, create_graph=create_graph)
        results.append((out.detach(), [g.detach() for g in grads]))
    return results


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("needs", ["x", "m", "both"])
def test_eager_steps_equal_the_custom_ops(cpp, needs, create_graph):
    """The eager C++ steps (one C++ autograd function per op) give bitwise the custom ops' values and gradients,
    for every subset of inputs that needs a gradient and under create_graph (whose second backward raises)."""
    x = features().requires_grad_(needs in ("x", "both"))
    m = features(K, seed=2).requires_grad_(needs in ("m", "both"))
    y = labels("mixed")
    la = center_ops.launch_args()
    ops = torch.ops.oodkernels
    pairs = {
        "distances": (
            lambda a, c: ops.cpu_center_sq_distances_step(a, c, torch.float32, *la),
            lambda a, c: ops.center_sq_distances(a, c, torch.float32, *la),
        ),
        "mchad": (
            lambda a, c: ops.cpu_center_loss_step(a, c, y, torch.tensor([2.0]), 2, 0.3, 0.5, 0.7, 0.2, *la),
            lambda a, c: ops.center_loss_fwd(a, c, y, torch.tensor([2.0]), 2, 0.3, 0.5, 0.7, 0.2, *la)[0],
        ),
        "cac": (
            lambda a, c: ops.cpu_center_loss_step(a, c, y, None, 0, 0.7, 0.0, 0.0, 0.0, *la),
            lambda a, c: ops.center_loss_fwd(a, c, y, None, 0, 0.7, 0.0, 0.0, 0.0, *la)[0],
        ),
        "assigned": (
            lambda a, c: ops.cpu_assigned_sq_distances_step(a, c, y.clamp(min=0)),
            lambda a, c: ops.assigned_sq_distances(a, c, y.clamp(min=0)),
        ),
    }
    for name, (step, op) in pairs.items():
        (value, grads), (expected, expected_grads) = _eager_and_custom_op(step, op, [x, m], create_graph)
        assert torch.equal(value, expected), name
        assert len(grads) == len(expected_grads), name
        for got, want in zip(grads, expected_grads):
            # the C++ step's products run over the nonzeros of a sparse G, the custom op's through addmm
            testing.assert_close(got, want, atol=FP32[0], rtol=FP32[1], name=name)
    # the distance-matrix loss: G is the gradient itself, bitwise
    dist = ref_centers.sq_distances(x.detach(), m.detach()).requires_grad_()
    (value, grads), (expected, expected_grads) = _eager_and_custom_op(
        lambda d: ops.cpu_center_loss_step(d, None, y, None, 0, 0.7, 0.0, 0.0, 0.0, *la),
        lambda d: ops.center_loss_fwd(d, None, y, None, 0, 0.7, 0.0, 0.0, 0.0, *la)[0],
        [dist],
        create_graph,
    )
    assert torch.equal(value, expected) and torch.equal(grads[0], expected_grads[0])


def test_eager_calls_take_the_steps_and_compiled_ones_the_custom_ops(cpp):
    """Eager CPU calls run the C++ steps; torch.compile traces the custom ops (opcheck's and the compiler's view)."""
    x = features().requires_grad_()
    m = features(K, seed=2)
    y = labels("all_id")

    def step(z):
        return ok.functional.cac_distance_loss(ok.functional.pairwise_sq_distances(z, m), y) + (
            ok.ops.centers.assigned_sq_distances(z, m, y).sum()
        )

    step_names = ("center_sq_distances", "center_loss_reduced", "assigned_sq_distances")
    steps = {f"oodkernels::cpu_{name}_step" for name in step_names}
    custom_ops = {f"oodkernels::{name}" for name in ("center_sq_distances", "center_loss_fwd", "assigned_sq_distances")}
    eager = _aten_ops(lambda: step(x).backward())
    assert steps <= eager and not custom_ops & eager, eager
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(x)  # compiles outside the profile
    traced = _aten_ops(lambda: compiled(x).backward())
    assert custom_ops <= traced and not steps & traced, traced


def _torch_reduction(monkeypatch):
    """The criteria's reduction in torch ops over the per-row values (what compiled and CUDA calls run)."""
    monkeypatch.setattr(center_ops, "run_loss_reduced", lambda *args: None)


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood", "empty"])
@pytest.mark.parametrize("name", list(ONE_CALL))
def test_reduced_step_equals_the_torch_reduction(cpp, monkeypatch, name, pattern):
    """The eager reduced step (values, masks, normalisers and check values in one C++ autograd function) against
    the per-row step and the reduction in torch ops, both from features and from a distance matrix: values and
    gradients within fp32 rounding (its sums run in fp64), an empty ID set an attached 0 on both."""
    fn, kwargs = ONE_CALL[name]
    n = 0 if pattern == "empty" else B
    x = features(n).requires_grad_()
    m = features(K, seed=2).requires_grad_()
    y = labels(pattern, n=n)
    dist = ref_centers.sq_distances(features(n), m.detach()).requires_grad_()
    calls = {
        "features": (lambda a, c: fn(a, c, y, **kwargs), [x, m]),
        "distances": (lambda d: FROM_DISTANCES[name](d, y, *kwargs.values()), [dist]),
    }
    for path, (call, inputs) in calls.items():
        reduced = _eager_and_custom_op(call, call, inputs)[0]
        with monkeypatch.context() as patch:
            _torch_reduction(patch)
            torch_reduced = _eager_and_custom_op(call, call, inputs)[0]
        value, grads = reduced
        expected, expected_grads = torch_reduced
        assert value.shape == expected.shape == () and value.dtype == expected.dtype, path
        testing.assert_close(value, expected, atol=FP32[0], rtol=FP32[1], name=f"{path} value")
        for got, want in zip(grads, expected_grads):
            testing.assert_close(got, want, atol=FP32[0], rtol=FP32[1], name=f"{path} gradient")
        if pattern in ("all_ood", "empty") and name != "mchad":
            assert value.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads), path


def test_reduced_step_runs_and_reports_its_checks(cpp):
    """The reduced step is what an eager criterion runs; its totals carry the data checks: the drop-unknown
    warning (CAC, Center), the label range error (CAC, MCHAD), with the reference's messages."""
    x = features().requires_grad_()
    m = features(K, seed=2)
    y = labels("mixed")
    eager = _aten_ops(lambda: ok.functional.center_loss(x, m, y).backward())
    assert "oodkernels::cpu_center_loss_reduced_step" in eager and "oodkernels::cpu_center_loss_step" not in eager
    with pytest.warns(UserWarning, match="Discarding samples with targets < 0"):
        ok.functional.cac_loss(x, m, y)
    too_large = y.clone()
    too_large[3] = K
    for fn in (ok.functional.cac_loss, ok.functional.mchad_loss):
        with pytest.raises(LabelOutOfRangeError, match=rf"targets: label {K} is out of range for {K} classes"):
            fn(x, m, too_large)
    ok.functional.center_loss(x, m, too_large)  # Center has no label range check (the reference's)
    out, totals = torch.ops.oodkernels.cpu_center_loss_reduced_step(
        x, m, y, None, 0, 1.0, 0.0, 0.0, 0.0, torch.float32, *center_ops.launch_args()
    )
    n_ood = int((y < 0).sum())
    assert totals.dtype == torch.float64 and totals.tolist()[2:] == [B - n_ood, n_ood, float(y.max())]


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
