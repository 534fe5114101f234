"""The center-distance kernels, Triton (the interpreter on a CPU) and C++, against the plain-PyTorch reference.

The bodies shared by both kernel backends (param ``backend``; the C++ one skipped when the extension cannot be
built, an error under ``OODKERNELS_REQUIRE_CPP=1``), through the public API with ``OODKERNELS_BACKEND`` forced
vs ``reference``: distances, the one-call losses, the distance-matrix losses and every center criterion's
module path (``distance(z)`` then ``forward``), values and gradients with respect to features and centers for
every label pattern, reduction, dtype and layout; fp64 gradcheck and opcheck of every op; torch.compile; the
autograd edge cases; the float32 cancellation of the expansion; the public API's errors. Triton-only tests
(TF32, the launchers in use) follow; the C++-only ones are in tests/test_cpp_centers.py.
"""

import pytest
import torch
from _backends import BACKENDS
from _backends import kernel_device
from _backends import over_backends
from _backends import spy_calls
from _backends import use_backend
from _centers import FP32
from _centers import FROM_DISTANCES
from _centers import LAYOUTS
from _centers import ONE_CALL
from _centers import SMALL
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
from oodkernels.reference import distances as ref_distances

pytestmark = pytest.mark.filterwarnings("ignore:Discarding samples", "ignore:IILoss. fewer than two")

#: the GEMM chunk of the C++ paths whose tests ran with its default (one chunk) before the merge
DEFAULT = (0, 0, 0)


@pytest.fixture(autouse=True)
def _tensors_on_the_kernel_device(request):
    yield from kernel_device(request)


@pytest.fixture
def fused(monkeypatch):
    use_backend(monkeypatch, "triton")


# ----------------------------------------------------------------------------------------------
# distances
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pairwise_sq_distances_equal_reference(monkeypatch, backend, dtype, layout):
    view = LAYOUTS[layout]
    x = features(dtype=dtype).requires_grad_()
    m = features(K, dtype=dtype, seed=2).requires_grad_()
    go = torch.randn(B, K, dtype=dtype).t().contiguous().t()  # a transposed grad_output too
    tol = FP32 if dtype == torch.float32 else testing.tolerances(dtype)
    compare(backend, monkeypatch, lambda a, c: ok.functional.pairwise_sq_distances(view(a), view(c)), [x, m], go, tol)
    xv, mv = view(x.detach()), view(m.detach())
    assert layout == "contiguous" or not (xv.is_contiguous() and mv.is_contiguous())
    if backend == "cpp":
        # same upcast operands, same ATen GEMM and norms, same expansion order: bitwise the reference
        use_backend(monkeypatch, "cpp")
        assert torch.equal(ok.functional.pairwise_sq_distances(xv, mv), ref_centers.sq_distances(xv, mv))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairwise_distances_one_input_and_mixed_dtypes(monkeypatch, backend):
    """pytorch-ood's pairwise_distances(x) (y = x) through the launch heuristic's tiles / the default chunk;
    with centers; on C++ also fp32 with fp64 (promoted to fp64, computed in fp64)."""
    x = features().requires_grad_()
    compare(backend, monkeypatch, lambda a: ok.functional.pairwise_distances(a), [x], blocks=DEFAULT)
    m = features(K, seed=3).requires_grad_()
    compare(backend, monkeypatch, ok.functional.pairwise_distances, [x, m])
    if backend == "cpp":
        m64 = features(K, seed=3, dtype=torch.float64).requires_grad_()
        tol = testing.tolerances(torch.float64)
        value, _ = compare(backend, monkeypatch, ok.functional.pairwise_distances, [x, m64], tol=tol)
        assert value.dtype == torch.float64


WIDTHS = [(1, 1), (1, 300), (300, 3), (3, 4096)]


@pytest.mark.parametrize("backend,k,d", over_backends(triton=WIDTHS, cpp=WIDTHS + [(9, 0)]))
def test_distances_extreme_widths(monkeypatch, backend, k, d):
    """K and D from 0 to 4096 through the default launch (D = 4096 streams 128 slices in Triton)."""
    x = features(5, d).requires_grad_()
    m = features(k, d, seed=4).requires_grad_()
    compare(backend, monkeypatch, ok.functional.pairwise_sq_distances, [x, m], torch.randn(5, k), blocks=DEFAULT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancellation_matches_the_reference_clamp(monkeypatch, backend):
    """LOSS_CONTRACT §2.6: x = (1000, 1000), m = (1000.001, 1000) in fp32 give 0.0 by expansion (exact 9.5e-7).

    The kernels keep the reference's behaviour, they do not fix it silently: the same value 0.0 and the
    same gradient. (The raw expansion is exactly 0.0 here, so torch.clamp(min=0) passes the gradient through;
    that gradient, 2·(x − m), itself cancels at magnitude 2000, fp32 ulp 1.2e-4, hence atol 5e-4 for Triton;
    C++ runs the reference's own ATen ops, bitwise.)
    Where the rounding makes the raw expansion negative the clamp cuts the gradient to exactly 0. With D = 1
    the expansion has one product and no summation order, so kernel and reference round alike:
    x = 1000, m = 1000.0009155 give raw = −0.125.
    """
    x = torch.tensor([[1000.0, 1000.0]]).requires_grad_()
    m = torch.tensor([[1000.001, 1000.0]]).requires_grad_()
    value, grads = run(backend, monkeypatch, ok.functional.pairwise_sq_distances, [x, m])
    expected, ref_grads = run("reference", monkeypatch, ok.functional.pairwise_sq_distances, [x, m])
    assert value.item() == expected.item() == 0.0
    assert ((x.double() - m.double()) ** 2).sum().item() > 9e-7
    for g, r in zip(grads, ref_grads):
        if backend == "cpp":
            assert torch.equal(g, r)
        else:
            testing.assert_close(g, r, atol=5e-4, rtol=0)

    x1 = torch.tensor([[1000.0]]).requires_grad_()
    m1 = torch.tensor([[1000.0009155273438]]).requires_grad_()
    raw = x1.detach() ** 2 + m1.detach() ** 2 - 2 * x1.detach() * m1.detach()
    assert raw.item() < 0
    for fn in (ok.functional.pairwise_sq_distances, lambda a, c: ok.functional.center_loss(a, c, torch.tensor([0]))):
        value, grads = run(backend, monkeypatch, fn, [x1, m1])
        expected, _ = run("reference", monkeypatch, fn, [x1, m1])
        assert value.item() == expected.item()
        assert torch.equal(grads[0], torch.zeros_like(x1)) and torch.equal(grads[1], torch.zeros_like(m1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_distance_backward_reads_the_clamp_from_the_saved_distances(monkeypatch, backend):
    """The distance op's backward knows the clamp from its saved output ``dist``: ``dist > 0`` passes the
    gradient without recomputing anything, and only a tile / chunk of rows holding an exact 0 recomputes its raw
    expansion (bitwise the forward's) to tell ``raw < 0`` (stopped) from ``raw == 0`` (passed, as torch.clamp).

    Rows 0-3 are x = (1000, 0) against m0 = (1000.0009155, 0): raw = −0.125 in fp32; rows 4-7 are
    x = (1000, 1000) against m1 = (1000.001, 1000): raw = 0.0 exactly. The ``dist`` given is made up, so what
    the op passes shows what it recomputed: with 4-row tiles / chunks each group is its own tile.
    """
    use_backend(monkeypatch, backend)
    blocks = (False, 4, 4, 4)
    x = torch.tensor([[1000.0, 0.0]] * 4 + [[1000.0, 1000.0]] * 4)
    m = torch.tensor([[1000.0009155273438, 0.0], [1000.001, 1000.0]])
    grad = torch.randn(8, 2)

    def expected(passes):  # dX = 2·(rowsum(G)⊙X − G·M), dM = 2·(colsum(G)⊙M − Gᵀ·X) in float64
        g, xd, md = torch.where(passes, grad, 0.0).double(), x.double(), m.double()
        return 2 * (g.sum(1, keepdim=True) * xd - g @ md), 2 * (g.sum(0)[:, None] * md - g.t() @ xd)

    def check(dist, passes):
        grad_x, grad_m = torch.ops.oodkernels.center_sq_distances_grads(grad, dist, x, m, True, True, *blocks)
        want_x, want_m = expected(passes)
        testing.assert_close(grad_x.double(), want_x, atol=2e-3, rtol=1e-5)
        testing.assert_close(grad_m.double(), want_m, atol=2e-3, rtol=1e-5)

    every = torch.ones(8, 2, dtype=torch.bool)
    # every distance > 0: nothing recomputed, the gradient passes even where the true raw value is negative
    check(torch.ones(8, 2), every)
    # exact zeros at (rows 0-3, m0): that tile recomputes raw = -0.125 and stops the gradient there
    dist = torch.ones(8, 2)
    dist[:4, 0] = 0.0
    stopped = every.clone()
    stopped[:4, 0] = False
    check(dist, stopped)
    # exact zeros at (rows 4-7, m1): raw == 0 exactly, the gradient passes
    dist = torch.ones(8, 2)
    dist[4:, 1] = 0.0
    check(dist, every)
    # only one input needs a gradient: the other output is a (0,) placeholder
    grad_x, grad_m = torch.ops.oodkernels.center_sq_distances_grads(grad, dist, x, m, True, False, *blocks)
    assert grad_x.shape == x.shape and grad_m.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_distance_gradient_matches_the_dense_one(monkeypatch, backend):
    """CenterLoss's gradient reaches one distance per row: the C++ backward then runs its products over the
    nonzeros of G (O(nnz·D)) instead of two GEMMs; the gradients equal the reference's for the module path,
    with many rows per center, OOD rows (no gradient) and a few centers no row reaches."""
    y = torch.randint(-1, 10, (64,), generator=torch.Generator().manual_seed(4))

    def center(z, centers):  # the module path: distance(z), then forward(distances, y)
        return ok.functional.center_distance_loss(ok.functional.pairwise_sq_distances(z, centers), y, radius=0.1)

    z, centers = features(64, 16, seed=6).requires_grad_(), features(12, 16, seed=7).requires_grad_()
    compare(backend, monkeypatch, center, [z, centers], blocks=DEFAULT)


@pytest.mark.parametrize("n_centers", [1, 3, 8, 9])
@pytest.mark.parametrize("backend", BACKENDS)
def test_few_centers_dense_gradient_matches_the_reference(monkeypatch, backend, n_centers):
    """A dense upstream gradient over K <= 8 centers: the C++ backward runs its row loop (rank-K updates in
    one pass over X) instead of addmm; K = 9 takes the GEMMs. Both gradients equal the reference's."""
    x, centers = features(40, 24, seed=8).requires_grad_(), features(n_centers, 24, seed=9).requires_grad_()
    go = torch.randn(40, n_centers, generator=torch.Generator().manual_seed(10))
    compare(backend, monkeypatch, ok.functional.pairwise_sq_distances, [x, centers], go, blocks=DEFAULT)


# ----------------------------------------------------------------------------------------------
# distances to assigned centers (II's intra-class spread)
# ----------------------------------------------------------------------------------------------


def assigned(x, centers, index):
    return ok.ops.assigned_sq_distances(x, centers, index)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_assigned_sq_distances_equal_reference(monkeypatch, backend, dtype, layout):
    """70 rows over 5 centers, one of them assigned to no row (its gradient is 0), D = 150: several row tiles
    and D slices in Triton; values, the features' and the centers' gradients against the reference."""
    view = LAYOUTS[layout]
    index = torch.tensor([0, 1, 3, 4] * 17 + [1, 0])  # center 2 is nobody's
    x = features(70, 150, dtype=dtype, seed=11).requires_grad_()
    centers = features(5, 150, dtype=dtype, seed=12).requires_grad_()
    go = torch.randn(70, generator=torch.Generator().manual_seed(13), dtype=dtype)
    value, grads = compare(backend, monkeypatch, lambda a, c: assigned(view(a), view(c), index), [x, centers], go)
    assert value.dtype == dtype and value.shape == (70,)
    assert grads[1][2].abs().max() == 0 and grads[1][0].abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_assigned_sq_distances_mixed_dtypes(monkeypatch, backend):
    """bf16 features and fp32 centers: accumulated in fp32, returned in the promoted fp32; gradients in each
    input's dtype; close to the exact fp64 values (the reference rounds its bf16 difference, the kernels do not)."""
    index = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    x = features(7, 33, dtype=torch.bfloat16, seed=14).requires_grad_()
    centers = features(3, 33, seed=15).requires_grad_()
    use_backend(monkeypatch, backend)
    value = assigned(x, centers, index)
    value.sum().backward()
    assert value.dtype == torch.float32 and x.grad.dtype == torch.bfloat16 and centers.grad.dtype == torch.float32
    exact = ref_centers.assigned_sq_distances(x.detach().double(), centers.detach().double(), index)
    testing.assert_close(value.double(), exact, atol=1e-5, rtol=1e-5)
    exact_grad = 2 * (x.detach().double() - centers.detach().double()[index])
    testing.assert_close(x.grad.double(), exact_grad, *testing.tolerances(torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_assigned_sq_distances_strided_index_and_bad_metadata(monkeypatch, backend):
    """A strided index view reads as its values; a wrong index dtype or shape is an error naming it."""
    use_backend(monkeypatch, backend)
    x, centers = features(5, 3), features(3, 3, seed=2)
    index = torch.tensor([0, 9, 2, 9, 1, 9, 2, 9, 0, 9])[::2]
    expected = ref_centers.assigned_sq_distances(x, centers, index)
    testing.assert_close(assigned(x, centers, index), expected, atol=FP32[0], rtol=FP32[1])
    with pytest.raises(ValueError, match=r"index: expected int64 of shape \(5,\), got torch.int32"):
        assigned(x, centers, index.int())
    with pytest.raises(ValueError, match=r"index: expected int64 of shape \(5,\), got torch.int64 of shape \(4,\)"):
        assigned(x, centers, index[:4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_assigned_sq_distances_index_out_of_range(monkeypatch, backend):
    """The C++ op raises naming the index; a Triton kernel cannot raise, so the row is NaN (never a number read
    from outside the centers)."""
    use_backend(monkeypatch, backend)
    x, centers = features(4, 3), features(2, 3, seed=2)
    index = torch.tensor([0, 2, 1, 0])
    if backend == "cpp":
        with pytest.raises(RuntimeError, match=r"index\[1\] = 2 is not below 2"):
            assigned(x, centers, index)
        return
    value = assigned(x, centers, index)
    assert value[1].isnan() and not value[[0, 2, 3]].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_assigned_sq_distances_rows_without_a_center(monkeypatch, backend, dtype):
    """A negative index (II's OOD rows) gives 0 and exactly 0 gradient, the row unread: NaN and inf features there
    change neither the other rows nor dM, on every backend and in the reference."""
    use_backend(monkeypatch, backend)
    index = torch.tensor([1, -1, 0, -3, 2, -1, 1])
    x = features(7, 19, dtype=dtype, seed=21)
    x[1] = float("nan")
    x[3] = float("inf")
    x[5, 4] = float("-inf")
    centers = features(3, 19, dtype=dtype, seed=22)
    go = torch.linspace(-1.0, 2.0, 7, dtype=dtype)
    finite = index >= 0
    for fn in (assigned, ref_centers.assigned_sq_distances):
        a, c = x.clone().requires_grad_(), centers.clone().requires_grad_()
        value = fn(a, c, index)
        value.backward(go)
        assert torch.equal(value[~finite], torch.zeros(3, dtype=dtype)), fn
        assert torch.equal(a.grad[~finite], torch.zeros(3, 19, dtype=dtype)), fn
        assert value.isfinite().all() and a.grad.isfinite().all() and c.grad.isfinite().all(), fn
        # the assigned rows alone give the same values and dM
        a2, c2 = x[finite].clone().requires_grad_(), centers.clone().requires_grad_()
        alone = ref_centers.assigned_sq_distances(a2, c2, index[finite])
        alone.backward(go[finite])
        tol = FP32 if dtype == torch.float32 else (1e-12, 1e-12)
        testing.assert_close(value[finite], alone.detach(), atol=tol[0], rtol=tol[1])
        testing.assert_close(a.grad[finite], a2.grad, atol=tol[0], rtol=tol[1])
        testing.assert_close(c.grad, c2.grad, atol=tol[0], rtol=tol[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_assigned_sq_distances_gradcheck_opcheck_compile(monkeypatch, compile_reset, backend):
    from torch.library import opcheck

    use_backend(monkeypatch, backend)
    index = torch.tensor([1, 0, -1, 3, 3, 0])
    x = features(6, 5, dtype=torch.float64, seed=16).requires_grad_()
    centers = features(4, 5, dtype=torch.float64, seed=17).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: assigned(a, c, index), (x, centers))
    xs = x.detach().float().t().contiguous().t()  # transposed rows
    opcheck(torch.ops.oodkernels.assigned_sq_distances.default, (xs.requires_grad_(), centers.detach().float(), index))
    opcheck(torch.ops.oodkernels.assigned_sq_distances.default, (xs.detach()[:0], centers.detach().float(), index[:0]))
    for need in ((True, True), (True, False), (False, True)):
        args = (torch.randn(6), xs.detach(), centers.detach().float(), index, *need)
        opcheck(torch.ops.oodkernels.assigned_sq_distances_grads.default, args)
    eager_x = x.detach().float().requires_grad_()
    eager = assigned(eager_x, centers.detach().float(), index).sum()
    eager.backward()
    compiled_x = x.detach().float().requires_grad_()
    fn = torch.compile(lambda a: assigned(a, centers.detach().float(), index).sum(), fullgraph=True,
                       backend="aot_eager")  # fmt: skip
    compiled = fn(compiled_x)
    compiled.backward()
    testing.assert_close(compiled.detach(), eager.detach())
    testing.assert_close(compiled_x.grad, eager_x.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_distance_backward_with_exact_zeros_matches_the_reference(monkeypatch, backend, dtype):
    """Centers that duplicate some features, in small integers (every product and sum exact in any order, so
    the raw expansion of a duplicate is exactly 0 on every backend): the distance matrix holds exact zeros in
    some 4 x 4 tiles (C++: 4-row chunks) and none in others, so the recompute path runs beside the plain mask
    path, in bf16/fp16/fp32, and the values and gradients equal the reference's. (At a duplicate x_i = m_k the
    pass/stop decision multiplies x_i − m_k = 0, so it is observed in the two tests above, not here.)"""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (12, 6), generator=g).to(dtype)
    m = torch.cat([x[[1, 6]], torch.randint(-3, 4, (6, 6), generator=g).to(dtype)])
    go = torch.randn(12, 8, generator=g).to(dtype)
    tol = FP32 if dtype == torch.float32 else testing.tolerances(dtype)
    value, _ = compare(backend, monkeypatch, ok.functional.pairwise_sq_distances, [x.requires_grad_(),
                       m.requires_grad_()], go, tol, blocks=(4, 4, 4))  # fmt: skip
    zeros = value == 0
    assert zeros[1, 0] and zeros[6, 1] and not zeros[8:].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_points_clamp_boundary(monkeypatch, backend):
    """x == m: the raw expansion is (near) 0; the kernels' gradient follows the same clamp rule as the reference."""
    x = torch.tensor([[1.0, 2.0], [0.5, -0.25]])
    compare(
        backend,
        monkeypatch,
        ok.functional.pairwise_sq_distances,
        [x.clone().requires_grad_(), x.clone().requires_grad_()],
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_distances_half_inputs(monkeypatch, backend, dtype):
    """bf16/fp16 in: upcast to fp32, one rounding at the end; on C++ bitwise the reference, gradients in the
    input dtype."""
    x = features(dtype=dtype).requires_grad_(backend == "cpp")
    m = features(K, dtype=dtype, seed=2).requires_grad_(backend == "cpp")
    value, grads = run(backend, monkeypatch, ok.functional.pairwise_sq_distances, [x, m])
    exact = ref_centers.sq_distances(x.detach().double(), m.detach().double())
    assert value.dtype == dtype
    atol, rtol = testing.tolerances(dtype)
    testing.assert_close(value.double(), exact, atol=atol, rtol=rtol, check_dtype=False)
    if backend == "cpp":
        expected, ref_grads = run("reference", monkeypatch, ok.functional.pairwise_sq_distances, [x, m])
        assert torch.equal(value, expected)
        for g, r in zip(grads, ref_grads):
            assert g.dtype == dtype
            testing.assert_close(g, r)


def test_tf32_is_opt_in(fused):
    x, m = features(), features(K, seed=2)
    exact = ref_centers.sq_distances(x.double(), m.double()).float()
    with center_ops.tf32_dot():
        loose = ok.functional.pairwise_sq_distances(x, m)
    testing.assert_close(loose, exact, atol=1e-2, rtol=1e-2)
    assert center_ops.launch_args()[0] is False


# ----------------------------------------------------------------------------------------------
# losses: one call from features, and from a distance matrix
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood", "empty"])
@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("name", list(ONE_CALL))
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_call_losses_equal_reference(monkeypatch, backend, name, fixed, pattern):
    fn, kwargs = ONE_CALL[name]
    n = 0 if pattern == "empty" else B
    x = features(n).requires_grad_()
    m = features(K, seed=2).requires_grad_(not fixed)
    y = labels(pattern, B)[:n]
    _, grads = compare(backend, monkeypatch, lambda a, c, t: fn(a, c, t, **kwargs) * 3, [x, m, y])
    assert len(grads) == (1 if fixed else 2)
    if pattern in ("all_ood", "empty") and name != "mchad":
        assert all(torch.count_nonzero(g) == 0 for g in grads)
    elif pattern != "empty":
        assert torch.count_nonzero(grads[0]) > 0


PATTERNS = ["mixed", "all_id", "all_ood"]


@pytest.mark.parametrize(
    "backend,name,pattern",
    over_backends(
        triton=[(name, p) for name in FROM_DISTANCES for p in PATTERNS],
        cpp=[(name, p) for name in FROM_DISTANCES for p in PATTERNS + ["empty"]],
    ),
)
def test_distance_matrix_losses_equal_reference(monkeypatch, backend, name, pattern):
    """Every layout of the distance matrix on C++ (the contiguous one on Triton), a scalar grad_output."""
    kwargs = ONE_CALL[name][1]
    n = 0 if pattern == "empty" else B
    dist = ref_centers.sq_distances(features(n), features(K, seed=2))
    y = labels(pattern, B)[:n]
    go = torch.tensor(2.5)
    views = LAYOUTS.values() if backend == "cpp" else [LAYOUTS["contiguous"]]
    for view in views:
        compare(
            backend,
            monkeypatch,
            lambda d, t, view=view: FROM_DISTANCES[name](view(d), t, *kwargs.values()),
            [dist.requires_grad_(), y],
            go,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_cac_clamp_and_pinned_values(monkeypatch, backend):
    """Fix a (paper tuplet) and the exponent clamp at 50: LOSS_CONTRACT §8.5 a1-a3."""
    use_backend(monkeypatch, backend)
    cac = ok.functional.cac_distance_loss
    d1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    assert abs(cac(d1, torch.tensor([0, 1])).item() - 1.4076060) < 1e-6
    assert abs(cac(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([2])).item() - 5.4076060) < 1e-5
    d3 = torch.tensor([[100.0, 0.0, 0.0]], requires_grad=True)
    value = cac(d3, torch.tensor([0]))
    assert abs(value.item() - 150.6931472) < 1e-4
    value.backward()
    # above the clamp the tuplet's gradient is 0: only the anchor term's α = 1 at the target remains
    testing.assert_close(d3.grad, torch.tensor([[1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mchad_and_center_pinned_values(monkeypatch, backend):
    """LOSS_CONTRACT §8.5 k1, k2."""
    use_backend(monkeypatch, backend)
    k1 = ok.functional.center_distance_loss(torch.tensor([[1.5, 9.0, 9.0]]), torch.tensor([0]), 1.0)
    assert abs(k1.item() - (0.5 + 2e-12) / 3) < 1e-7
    d = torch.tensor([[0.5, 3, 3], [3, 1.5, 3], [1, 1, 3], [5, 0.5, 0.2]])
    k2 = ok.functional.mchad_distance_loss(d, torch.tensor([0, 1, -1, -1]), 1.0, 2.0)
    assert abs(k2.item() - 14.0538281) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(ONE_CALL))
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_call_dtypes(monkeypatch, backend, name, dtype):
    """Output in the features' dtype; fp64 against the reference, bf16/fp16 against fp64 of the same inputs."""
    fn, kwargs = ONE_CALL[name]
    x = features(dtype=dtype).requires_grad_()
    m = features(K, seed=2, dtype=dtype).requires_grad_()
    y = labels("mixed")
    value, grads = run(backend, monkeypatch, lambda a, c, t: fn(a, c, t, **kwargs), [x, m, y])
    exact, exact_grads = run(
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
@pytest.mark.parametrize("backend", BACKENDS)
def test_criteria_module_path_equal_reference(monkeypatch, backend, name, pattern):
    criterion = _criteria()[name]().to(torch.get_default_device())
    dim = criterion.centers.n_features
    n = 0 if pattern == "empty" else B
    z = features(n, dim).requires_grad_()
    y = labels(pattern, B)[:n]
    params = criterion.centers.params

    def step(z, y):
        params.grad = None
        return criterion(criterion.distance(z), y)

    value, grads = run(backend, monkeypatch, step, [z, y])
    center_grad = None if params.grad is None else params.grad.clone()
    expected, ref_grads = run("reference", monkeypatch, step, [z, y])
    testing.assert_close(value, expected, atol=FP32[0], rtol=FP32[1])
    testing.assert_close(grads[0], ref_grads[0], atol=FP32[0], rtol=FP32[1])
    if params.requires_grad:
        testing.assert_close(center_grad, params.grad, atol=FP32[0], rtol=FP32[1], name="center gradient")
    else:
        assert center_grad is None


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ii_loss_equal_reference(monkeypatch, backend, train):
    """Small Triton tiles; the C++ default chunk."""
    results = []
    for name in (backend, "reference"):
        torch.manual_seed(0)
        criterion = ok.loss.IILoss(n_classes=K, n_embedding=D, alpha=0.5).to(torch.get_default_device()).train(train)
        if not train:
            criterion.running_centers.running_centers.copy_(features(K, seed=5))
        x = features().requires_grad_()
        use_backend(monkeypatch, name)
        with center_ops.forced_blocks(*(SMALL if backend == "triton" else DEFAULT)):
            value = criterion(x, labels("mixed"))
            value.backward()
            dist = criterion.distance(x.detach())
            pred = criterion.predict(x.detach())
        results.append((value.detach(), x.grad, criterion.running_centers.running_centers.clone(), dist, pred))
    for got, expected in zip(*results):
        testing.assert_close(got, expected, atol=FP32[0], rtol=FP32[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", None])
@pytest.mark.parametrize("name", ["DeepSVDDLoss", "DeepSADLoss"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_center_criteria_equal_reference(monkeypatch, backend, name, reduction):
    center = features(1, D, seed=6)[0]
    if name == "DeepSVDDLoss":
        criterion = ok.loss.DeepSVDDLoss(n_dim=D, reduction=reduction, radius=1.5, center=center)
    else:
        criterion = ok.loss.DeepSADLoss(n_dim=D, eta=0.5, reduction=reduction, center=center)
    x = features(scale=1.5).requires_grad_()
    y = labels("mixed")
    use_backend(monkeypatch, "reference")
    shape = criterion(x, y).shape
    go = torch.randn(shape) if len(shape) else None
    compare(backend, monkeypatch, criterion, [x, y], grad_output=go)
    compare(backend, monkeypatch, lambda a: criterion.distance(a), [x], grad_output=torch.randn(B))


@pytest.mark.parametrize("backend", BACKENDS)
def test_criteria_dtypes(monkeypatch, backend):
    """bf16 in, bf16 out, through the module path of MCHAD (distances in bf16, loss in fp32, one rounding)."""
    criterion = ok.loss.MCHADLoss(n_classes=K, n_dim=D, radius=0.3, margin=4.5, weight_oe=0.01)
    criterion = criterion.to(torch.get_default_device())
    z = features(dtype=torch.bfloat16)
    y = labels("mixed")
    value, _ = run(backend, monkeypatch, lambda a, t: criterion(criterion.distance(a), t), [z, y])
    expected, _ = run("reference", monkeypatch, lambda a, t: criterion(criterion.distance(a), t), [z, y])
    assert value.dtype == torch.bfloat16
    testing.assert_close(value, expected, atol=1e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------------
# autograd edge cases, registration, errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_entry_grad_output_and_retain_graph(monkeypatch, backend):
    """A random (B, K) grad_output on the distances reaches both GEMM gradients; backward twice is identical."""
    use_backend(monkeypatch, backend)
    x = features().requires_grad_()
    m = features(K, seed=2).requires_grad_()
    with center_ops.forced_blocks(*(SMALL if backend == "triton" else DEFAULT)):
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_op_and_inputs_not_mutated(monkeypatch, backend):
    """tanh before the loss (it saves its output) gets the reference gradient; nothing is written in place."""
    raw = features().requires_grad_()
    m = features(K, seed=2).requires_grad_()
    y = labels("mixed")
    before = (raw.detach().clone(), m.detach().clone(), y.clone())
    compare(backend, monkeypatch, lambda a, c, t: ok.functional.mchad_loss(a.tanh() * 2, c, t, margin=4.0), [raw, m, y])
    assert torch.equal(raw.detach(), before[0]) and torch.equal(m.detach(), before[1]) and torch.equal(y, before[2])
    dist = ref_centers.sq_distances(raw.detach(), m.detach())
    saved = dist.clone()
    use_backend(monkeypatch, backend)
    ok.functional.cac_distance_loss(dist.requires_grad_(), y).backward()
    assert torch.equal(dist.detach(), saved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    x = features(dtype=torch.float64).requires_grad_()
    m = features(K, seed=2, dtype=torch.float64)
    (grad,) = torch.autograd.grad(ok.functional.cac_loss(x, m, labels("all_id")), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through the fused center kernels is not supported"):
        grad.sum().backward()
    (grad,) = torch.autograd.grad(ok.functional.pairwise_sq_distances(x, m).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64_every_op(monkeypatch, backend):
    """fp64 gradcheck of the distance op and of each loss kind, from features and from distances (fast mode in
    the interpreter, full on C++)."""
    use_backend(monkeypatch, backend)
    fast = backend == "triton"
    x = features(5, 3, dtype=torch.float64).requires_grad_()
    m = features(3, 3, seed=2, dtype=torch.float64).requires_grad_()
    y = torch.tensor([0, 2, -1, 1, 0])
    margin = torch.tensor([2.5], dtype=torch.float64)
    with center_ops.forced_blocks(2, 2, 2):
        assert torch.autograd.gradcheck(lambda a, c: ok.functional.pairwise_sq_distances(a, c), (x, m), fast_mode=fast)
        for kind, params, mg in [
            (0, (0.7, 0, 0, 0), None),
            (1, (0.3, 0, 0, 0), None),
            (2, (0.3, 0.5, 0.7, 0.2), margin),
        ]:

            def features_op(a, c, mg=mg, kind=kind, params=params):
                return torch.ops.oodkernels.center_loss_fwd(a, c, y, mg, kind, *params, *center_ops.launch_args())[0]

            def distances_op(d, mg=mg, kind=kind, params=params):
                return torch.ops.oodkernels.center_loss_fwd(d, None, y, mg, kind, *params, *center_ops.launch_args())[0]

            assert torch.autograd.gradcheck(features_op, (x, m), fast_mode=fast)
            dist = ref_centers.sq_distances(x.detach(), m.detach()).requires_grad_()
            assert torch.autograd.gradcheck(distances_op, (dist,), fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_center_ops(monkeypatch, backend):
    """Every center op; the bf16 output / bf16 distances variants on C++ only (interpreter time)."""
    from torch.library import opcheck

    use_backend(monkeypatch, backend)
    x = features(6, 5).t().contiguous().t()  # transposed rows
    m = features(3, 5, seed=2)
    y = torch.tensor([0, 2, -1, 1, 0, -3])
    margin = torch.tensor([2.5])
    blocks = (False, 4, 2, 2)
    half = backend == "cpp"
    opcheck(torch.ops.oodkernels.center_sq_distances.default, (x.requires_grad_(), m, torch.float32, *blocks))
    opcheck(torch.ops.oodkernels.center_sq_distances.default, (x.detach()[:0], m, torch.float32, *blocks))
    if half:
        opcheck(torch.ops.oodkernels.center_sq_distances.default, (x.detach(), m.double(), torch.bfloat16, *blocks))
    dist = ref_centers.sq_distances(x.detach(), m)
    with_zero = dist.clone()
    with_zero[1, 2] = 0.0  # a tile / chunk that recomputes its raw values
    for saved in (dist, with_zero):
        for need in ((True, True), (True, False), (False, True)):
            grad_args = (torch.randn(6, 3), saved, x.detach(), m, *need, *blocks)
            opcheck(torch.ops.oodkernels.center_sq_distances_grads.default, grad_args)
    for kind, mg in [(0, None), (1, None), (2, margin)]:
        args = (x.detach().requires_grad_(), m.requires_grad_(), y, mg, kind, 0.3, 0.5, 0.7, 0.2, *blocks)
        opcheck(torch.ops.oodkernels.center_loss_fwd.default, args)
        opcheck(torch.ops.oodkernels.center_loss_fwd.default, (dist, None, y, mg, kind, 0.3, 0.5, 0.7, 0.2, *blocks))
        if half:
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
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(monkeypatch, compile_reset, backend, path):
    from oodkernels import config

    use_backend(monkeypatch, backend)
    config.data_checks = False  # no host read: nothing breaks the graph
    criterion = ok.loss.MCHADLoss(n_classes=K, n_dim=D, radius=0.3, margin=4.5, weight_oe=0.01)
    criterion = criterion.to(torch.get_default_device())
    y = labels("mixed")
    if path == "module":

        def fn(z):
            return criterion(criterion.distance(z), y)
    else:
        anchors = features(K, seed=2)

        def fn(z):
            return ok.functional.cac_loss(z, anchors, y, alpha=0.7)

    z = features()
    eager_z = z.clone().requires_grad_()
    eager = fn(eager_z)
    eager.backward()
    compiled_z = z.clone().requires_grad_()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(compiled_z)
    compiled.backward()
    testing.assert_close(compiled.detach(), eager.detach())
    testing.assert_close(compiled_z.grad, eager_z.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_warnings_and_errors(monkeypatch, backend):
    """The public API's warnings and errors are the reference's, raised before any kernel."""
    use_backend(monkeypatch, backend)
    z = features()
    m = features(K, seed=2)
    with pytest.warns(UserWarning, match="Discarding samples with targets < 0"):
        ok.functional.center_loss(z, m, labels("mixed"))
    with pytest.raises(ValueError, match="centers: expected centers of shape"):
        ok.functional.mchad_loss(z, m[:, :3], labels("mixed"))
    with pytest.raises(ValueError, match="features: expected embeddings"):
        ok.functional.cac_loss(z[0], m, labels("mixed"))
    with pytest.raises(TypeError, match="targets"):
        ok.functional.cac_loss(z, m, labels("mixed").float())
    with pytest.raises(ValueError, match="targets"):
        ok.functional.center_loss(z, m, labels("mixed")[:3])
    with pytest.raises(IndexError, match="out of range"):
        ok.functional.cac_loss(z, m, torch.full((B,), K))
    with pytest.raises(ValueError, match="distances to n_classes"):
        ok.loss.CACLoss(n_classes=K + 1)(torch.rand(B, K), labels("mixed"))
    assert ref_distances.check_features_and_centers(z, m) is None


# ----------------------------------------------------------------------------------------------
# Triton only
# ----------------------------------------------------------------------------------------------


def test_fused_kernels_are_used(fused, monkeypatch):
    calls = spy_calls(monkeypatch, center_ops._launchers(), "loss_forward", "sq_distances")
    criterion = ok.loss.CenterLoss(n_classes=K, n_dim=D)
    z = features()
    criterion(criterion.distance(z), labels("mixed"))
    ok.functional.cac_loss(z, features(K, seed=2), labels("mixed"))
    ok.loss.DeepSVDDLoss(n_dim=D)(z)
    assert len(calls) == 4
    spread = spy_calls(monkeypatch, center_ops._launchers(), "assigned_sq_distances")
    ok.loss.IILoss(n_classes=K, n_embedding=D)(z, labels("mixed"))
    assert spread == ["assigned_sq_distances"]
    assert ok.backend_info()["operations"]["mchad_loss"]["cuda"] == "triton"
