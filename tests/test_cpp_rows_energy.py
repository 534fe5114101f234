"""The C++ CPU backend of the row family's energy variants and new scores (csrc/rows.cpp).

``oodkernels::row_loss_energy_fwd`` / ``row_loss_energy_bwd`` (energy output, optional class weights and
their gradient) and ``row_scores`` WHICH 4 (weighted energy) / 5 (exact entropy) on the C++ path: the raw
ops against the Triton interpreter (every output, both traversals, forced class chunks); every criterion
built on them (ce_and_energy, Confidence, Objectosphere, VOSReg, EnergyMargin, the paired API) and the two
scores against the plain-PyTorch reference over layouts, dtypes, label patterns and reductions; fp64
gradcheck; opcheck; torch.compile(fullgraph=True); determinism of dL/dw across thread counts; the autograd
edge cases.

Skipped when the extension cannot be built, unless ``OODKERNELS_REQUIRE_CPP=1`` (CI).
"""

import pytest
import torch
from torch import nn

import oodkernels as ok
from oodkernels import _cpp
from oodkernels import testing
from oodkernels.ops import row_ops

pytestmark = [
    pytest.mark.filterwarnings("ignore:Discarding samples"),
    pytest.mark.skipif(
        not _cpp.required() and not _cpp.available(), reason=f"C++ extension unavailable: {_cpp.status()}"
    ),
]

C = 7
D = 5


@pytest.fixture
def cpp(monkeypatch):
    monkeypatch.setenv("OODKERNELS_BACKEND", "cpp")


def _run(backend, monkeypatch, fn, inputs, params=(), grad_output=None):
    monkeypatch.setenv("OODKERNELS_BACKEND", backend)
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    for p in params:
        p.grad = None
    value = fn(*leaves)
    go = torch.ones_like(value) if grad_output is None else grad_output.to(value.dtype)
    value.backward(go)
    grads = [t.grad for t in leaves if t.requires_grad] + [None if p.grad is None else p.grad.clone() for p in params]
    return value.detach(), grads


def _compare(monkeypatch, fn, inputs, params=(), grad_output=None, atol=None, rtol=None):
    value, grads = _run("cpp", monkeypatch, fn, inputs, params, grad_output)
    ref_value, ref_grads = _run("reference", monkeypatch, fn, inputs, params, grad_output)
    assert value.dtype == ref_value.dtype and value.shape == ref_value.shape
    testing.assert_close(value, ref_value, atol=atol, rtol=rtol, name="value")
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None:
            assert g is None or not g.any()
            continue
        testing.assert_close(g, r, atol=atol, rtol=rtol, name=f"gradient {i}")
    return value


def _logits(shape, dtype=torch.float32, layout="contiguous"):
    return testing.make_logits(shape[0], shape[1], shape[2:], dtype=dtype, layout=layout)


def _targets(shape, pattern):
    return testing.make_targets(shape, C, pattern)


def _vos_modules(dtype=torch.float32):
    torch.manual_seed(3)
    phi = nn.Linear(1, 2).to(dtype)
    weights = nn.Linear(C, 1).to(dtype)
    nn.init.uniform_(weights.weight, -0.3, 1.0)  # some negative weights: relu's zero branch
    return phi, weights


# (B, C) rows run the class-contiguous traversal; the rest the entry tiles: (1, C, 16, 16) a full 256-entry
# fp32 tile (in-place loads and stores), (2, C, 8, 8) one across two images, (2, C, 3, 4) a partial one,
# channels-last / sliced / transposed gathered ones
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


# ----------------------------------------------------------------------------------------------
# the raw ops against the Triton interpreter
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(
    "shape,layout", [((6, C), "contiguous"), ((1, C, 16, 16), "contiguous"), ((1, C, 2, 3), "sliced")], ids=str
)
@pytest.mark.parametrize("kind", range(6))
def test_cpp_energy_ops_equal_triton_interpreter(monkeypatch, kind, shape, layout, weighted):
    """values, energy, stats, dL/dlogits and dL/dw of C++ == the Triton kernels (fp64, class chunks of 2)."""
    if len(shape) == 4 and kind == 5:
        pytest.skip("LogitNorm is classification only")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    logits = _logits(shape, dtype=torch.float64, layout=layout)
    targets = _targets((shape[0], *shape[2:]), "mixed")
    cost = torch.rand(C, C, dtype=torch.float64) + 0.5
    weight = torch.rand(C, dtype=torch.float64) - 0.3 if weighted else None  # some negative: relu's zero branch
    params = (kind, 0.3, -3.0, -2.5, None, 4, 2)
    gen = torch.Generator().manual_seed(7)
    go, ge = torch.randn(2, targets.numel(), dtype=torch.float64, generator=gen)
    out = {}
    for backend in ("cpp", "triton"):
        monkeypatch.setenv("OODKERNELS_BACKEND", backend)
        values, energy, stats = torch.ops.oodkernels.row_loss_energy_fwd(logits, targets, cost, *params, weight)
        grad, grad_w = torch.ops.oodkernels.row_loss_energy_bwd(
            go, ge, logits, targets, cost, stats, energy, weight, *params
        )
        out[backend] = (values, energy, stats, grad, grad_w)
    for got, want, what in zip(out["cpp"], out["triton"], ("values", "energy", "stats", "grad", "grad_w")):
        assert got.shape == want.shape and got.dtype == want.dtype, what
        testing.assert_close(got, want, atol=1e-10, rtol=1e-8, name=what)
    assert out["cpp"][4].shape == ((C,) if weighted else (0,))


@pytest.mark.parametrize("shape", [(6, C), (1, C, 8, 4)], ids=str)
@pytest.mark.parametrize("which", [4, 5])
def test_cpp_new_scores_equal_triton_interpreter(monkeypatch, which, shape):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    logits = _logits(shape, dtype=torch.float64)
    weight = torch.rand(C, dtype=torch.float64) - 0.3 if which == 4 else None
    t = 1.0 if which == 4 else 1.3  # exact entropy: v = x/t in the softmax, raw x in the expectation
    out = {}
    for backend in ("cpp", "triton"):
        monkeypatch.setenv("OODKERNELS_BACKEND", backend)
        out[backend] = torch.ops.oodkernels.row_scores(logits, which, t, 4, 2, weight)
    testing.assert_close(out["cpp"], out["triton"], atol=1e-10, rtol=1e-8)


# ----------------------------------------------------------------------------------------------
# the criteria against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, 3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("uniform_ood", [False, True])
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=str)
def test_cpp_ce_and_energy_equals_reference(monkeypatch, shape, layout, weighted, uniform_ood, chunk):
    logits = _logits(shape, layout=layout)
    targets = _targets((shape[0], *shape[2:]), "mixed")
    weight = (torch.rand(1, C) - 0.2).requires_grad_() if weighted else None
    go_ce, go_e = torch.randn(2, targets.numel())

    def fn(x):
        ce, energy = ok.functional.ce_and_energy(x, targets, weight, uniform_ood)
        return (ce * go_ce).sum() + (energy * go_e).sum()

    with row_ops.forced_blocks(1, chunk) if chunk else torch.enable_grad():
        _compare(monkeypatch, fn, [logits], params=[weight] if weighted else [])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(9, C), (2, C, 16, 16)], ids=str)
def test_cpp_ce_and_energy_dtypes(monkeypatch, shape, dtype):
    logits = _logits(shape, dtype=dtype)
    targets = _targets((shape[0], *shape[2:]), "mixed")
    weight = (torch.rand(C, dtype=torch.float64 if dtype == torch.float64 else torch.float32) - 0.2).requires_grad_()
    go_ce, go_e = torch.randn(2, targets.numel())

    def fn(x):
        ce, energy = ok.functional.ce_and_energy(x, targets, weight)
        return (ce * go_ce).sum() + (energy * go_e).sum()

    atol, rtol = testing.tolerances(dtype)
    if dtype in (torch.bfloat16, torch.float16):
        atol = 0.05  # the gradient is stored in the half dtype: one ulp at magnitude ~4-8, rounded by each side
    _compare(monkeypatch, fn, [logits], params=[weight], atol=atol, rtol=rtol)


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood", "empty"])
def test_cpp_confidence_loss(monkeypatch, pattern):
    logits = _logits((10, C))
    targets = _targets((10,), pattern)
    confidence = torch.rand(10, 1)
    if pattern == "empty":
        logits, confidence = logits[:0], confidence[:0]
    _compare(monkeypatch, ok.loss.ConfidenceLoss(alpha=0.7), [logits, confidence, targets[: logits.shape[0]]])


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", None])
def test_cpp_objectosphere_loss(monkeypatch, reduction, pattern):
    logits = _logits((10, C), layout="transposed")
    features = torch.randn(10, D) * 0.5
    targets = _targets((10,), pattern)
    criterion = ok.loss.ObjectosphereLoss(alpha=0.5, xi=1.2, reduction=reduction)
    go = torch.randn(10) if reduction in ("none", None) else None
    _compare(monkeypatch, criterion, [logits, features, targets], grad_output=go)


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood", "empty"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=str)
def test_cpp_vos_reg_loss(monkeypatch, shape, layout, reduction, pattern):
    phi, weights = _vos_modules()
    criterion = ok.loss.VOSRegLoss(phi, weights, alpha=0.3, reduction=reduction)
    logits = _logits(shape, layout=layout)
    targets = _targets((shape[0], *shape[2:]), pattern)
    if pattern == "empty":
        logits = logits[:0]
        targets = targets[:0]
    go = torch.randn(targets.shape) if reduction == "none" else None
    _compare(monkeypatch, criterion, [logits, targets], params=list(criterion.parameters()), grad_output=go)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_cpp_batch_coupled_dtypes(monkeypatch, dtype):
    logits = _logits((2, C, 2, 3), dtype=dtype)
    targets = _targets((2, 2, 3), "mixed")
    phi, weights = _vos_modules()
    atol, rtol = testing.tolerances(dtype)
    if dtype != torch.float64:
        atol = 0.05  # one half-precision ulp at magnitude ~4-8, rounded once by each side
    value = _compare(monkeypatch, ok.loss.VOSRegLoss(phi, weights), [logits, targets], atol=atol, rtol=rtol)
    assert value.dtype == dtype
    flat = _logits((8, C), dtype=dtype)
    confidence = torch.rand(8, dtype=dtype)
    _compare(monkeypatch, ok.loss.ConfidenceLoss(), [flat, confidence, _targets((8,), "mixed")], atol=atol, rtol=rtol)


def test_cpp_energy_margin_loss(monkeypatch):
    torch.manual_seed(1)
    phi = nn.Linear(1, 2)
    criterion = ok.loss.EnergyMarginLoss(full_train_loss=0.2, eta=0.5)
    criterion.lam.fill_(0.3)
    criterion.lam2.fill_(-2.0)  # the constant branch of the second ALM term
    logits = _logits((12, C))
    targets = _targets((12,), "mixed")
    _compare(monkeypatch, lambda x, y: criterion(x, y, phi) * 3, [logits, targets], params=list(phi.parameters()))


@pytest.mark.parametrize("shape", [(6, C), (2, C, 3, 4)], ids=str)
def test_cpp_paired_api(monkeypatch, shape):
    logits_in = _logits(shape)
    logits_out = _logits((shape[0] + 1, *shape[1:]), layout="contiguous") * 0.5
    targets_in = torch.randint(0, C, (shape[0], *shape[2:]))
    _compare(
        monkeypatch,
        lambda a, b: ok.paired.outlier_exposure(a, targets_in, b, lambda_oe=0.4),
        [logits_in, logits_out],
    )
    # margin 10: the hinge is active, its gradient reaches both batches
    _compare(
        monkeypatch,
        lambda a, b: ok.paired.energy_margin(a, targets_in, b, lambda_energy=0.3, margin=10.0),
        [logits_in, logits_out],
    )


# ----------------------------------------------------------------------------------------------
# the new scores against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("score", ["weighted_energy", "exact_entropy"])
def test_cpp_new_scores_equal_reference(monkeypatch, score, shape, layout, dtype):
    logits = _logits(shape, dtype=dtype, layout=layout)
    w = torch.rand(C) - 0.2
    if score == "weighted_energy":

        def fn(x):
            return ok.scores.weighted_energy(x, w)
    else:

        def fn(x):
            return ok.scores.entropy(x, clip=False)

    monkeypatch.setenv("OODKERNELS_BACKEND", "cpp")
    with row_ops.forced_blocks(1, 3):
        value = fn(logits)
    value_default_chunks = fn(logits)
    monkeypatch.setenv("OODKERNELS_BACKEND", "reference")
    expected = fn(logits)
    assert value.dtype == expected.dtype and value.shape == expected.shape
    atol, rtol = testing.tolerances(dtype)
    if dtype == torch.bfloat16:
        atol = max(atol, float(torch.finfo(dtype).eps) * float(expected.abs().max()))
    if score == "exact_entropy" and dtype != torch.float64:
        # one read: H = lse − E_p[x] cancels two numbers of size max|x| (the Triton kernel's formula too),
        # so a confident row is a few ulps of max|x| off in fp32, where −Σ p·log p is not
        atol = max(atol, 4 * float(torch.finfo(dtype).eps) * float(logits.float().abs().max()))
    testing.assert_close(value, expected, atol=atol, rtol=rtol)
    testing.assert_close(value_default_chunks, expected, atol=atol, rtol=rtol)


def test_cpp_weighted_energy_all_weights_nonpositive_is_inf(cpp):
    """Every relu(w) = 0: ln 0 = -inf, the score +inf (the Triton kernels' and the reference's value)."""
    logits = _logits((4, C))
    w = -torch.rand(C)
    assert torch.isposinf(torch.ops.oodkernels.row_scores(logits, 4, 1.0, 0, 0, w)).all()


# ----------------------------------------------------------------------------------------------
# gradcheck, opcheck, compile, determinism, autograd edge cases
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, C), (1, C, 3, 4)], ids=str)
def test_cpp_energy_gradcheck_fp64(cpp, shape):
    x = _logits(shape, dtype=torch.float64).requires_grad_()
    y = _targets((shape[0], *shape[2:]), "mixed")
    w = (torch.rand(C, dtype=torch.float64) + 0.1).requires_grad_()
    op = torch.ops.oodkernels.row_loss_energy_fwd
    for kind in (0, 1, 2):

        def fn(x, w, kind=kind):
            values, energy, _ = op(x, y, None, kind, 0.3, -3.0, -2.0, None, 0, 2, w)
            return values, energy

        assert torch.autograd.gradcheck(fn, (x, w), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: op(x, y, None, 0, 0.0, 0.0, 0.0, None, 0, 2, None)[1], (x,))


def test_cpp_vos_gradcheck_fp64(cpp):
    phi, weights = _vos_modules(torch.float64)
    criterion = ok.loss.VOSRegLoss(phi, weights, reduction="none")
    logits = _logits((2, C, 2, 3), dtype=torch.float64).requires_grad_()
    targets = _targets((2, 2, 3), "mixed")
    assert torch.autograd.gradcheck(lambda x: criterion(x, targets), (logits,))


def test_opcheck_energy_ops_and_scores_on_cpp(cpp):
    from torch.library import opcheck

    for logits in (_logits((2, C, 3, 2), layout="channels_last"), _logits((2, C, 8, 4)), _logits((9, C))):
        targets = _targets((logits.shape[0], *logits.shape[2:]), "mixed")
        w = torch.rand(C) - 0.2
        for weight in (None, w):
            for requires_grad in (False, True):
                x = logits.detach().requires_grad_(requires_grad)
                wt = None if weight is None else weight.detach().requires_grad_(requires_grad)
                args = (x, targets, None, 1, 1.0, 0.0, 0.0, None, 0, 3, wt)
                opcheck(torch.ops.oodkernels.row_loss_energy_fwd.default, args)
            _, energy, stats = torch.ops.oodkernels.row_loss_energy_fwd(
                logits, targets, None, 0, 0.0, 0.0, 0.0, None, 0, 0, weight
            )
            gv, ge = torch.randn(2, targets.numel())
            bwd = (gv, ge, logits, targets, None, stats, energy, weight, 0, 0.0, 0.0, 0.0, None, 0, 0)
            opcheck(torch.ops.oodkernels.row_loss_energy_bwd.default, bwd)
        opcheck(torch.ops.oodkernels.row_scores.default, (logits, 4, 1.0, 0, 3, w))
        opcheck(torch.ops.oodkernels.row_scores.default, (logits, 5, 1.0, 0, 0))
    opcheck(
        torch.ops.oodkernels.row_loss_energy_fwd.default,
        (logits[:0], targets[:0], None, 0, 0.0, 0.0, 0.0, None, 0, 0, None),
    )
    opcheck(torch.ops.oodkernels.row_scores.default, (logits[:0], 4, 1.0, 0, 0, w))


def test_cpp_compile_fullgraph(cpp, compile_reset):
    from oodkernels import config

    config.data_checks = False
    phi, weights = _vos_modules()
    criterion = ok.loss.VOSRegLoss(phi, weights)
    logits = _logits((2, C, 8, 4))
    targets = _targets((2, 8, 4), "mixed")
    eager_x = logits.clone().requires_grad_()
    eager = criterion(eager_x, targets)
    eager.backward()
    eager_w = weights.weight.grad.clone()
    weights.weight.grad = None
    compiled_x = logits.clone().requires_grad_()
    compiled = torch.compile(criterion, fullgraph=True, backend="aot_eager")(compiled_x, targets)
    compiled.backward()
    testing.assert_close(compiled.detach(), eager.detach())
    testing.assert_close(compiled_x.grad, eager_x.grad)
    testing.assert_close(weights.weight.grad, eager_w)
    w = torch.rand(C)

    def both(x):
        return ok.scores.weighted_energy(x, w) + ok.scores.entropy(x, clip=False)

    testing.assert_close(torch.compile(both, fullgraph=True, backend="aot_eager")(logits), both(logits))


@pytest.mark.parametrize("shape", [(300, C), (3, C, 20, 20)], ids=str)
def test_cpp_class_weight_gradient_is_deterministic_across_threads(cpp, shape):
    """dL/dw is summed from fixed blocks in block order: the same bits with 1 and 2 threads."""
    logits = _logits(shape)
    targets = _targets((shape[0], *shape[2:]), "mixed")
    w = torch.rand(C) - 0.2
    _, energy, stats = torch.ops.oodkernels.row_loss_energy_fwd(logits, targets, None, 0, 0.0, 0.0, 0.0, None, 0, 0, w)
    gv, ge = torch.randn(2, targets.numel())
    args = (gv, ge, logits, targets, None, stats, energy, w, 0, 0.0, 0.0, 0.0, None, 0, 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.oodkernels.row_loss_energy_bwd(*args)
        torch.set_num_threads(2)
        two = torch.ops.oodkernels.row_loss_energy_bwd(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert one[1].abs().sum() > 0


def test_cpp_retain_graph_not_mutated_and_double_backward(cpp):
    phi, weights = _vos_modules()
    logits = _logits((2, C, 3, 4)).requires_grad_()
    targets = _targets((2, 3, 4), "mixed")
    before, w_before = logits.detach().clone(), weights.weight.detach().clone()
    loss = ok.loss.VOSRegLoss(phi, weights)(logits, targets)
    loss.backward(retain_graph=True)
    first, first_w = logits.grad.clone(), weights.weight.grad.clone()
    logits.grad = None
    weights.weight.grad = None
    loss.backward()
    assert torch.equal(logits.grad, first) and torch.equal(weights.weight.grad, first_w)
    assert torch.equal(logits.detach(), before) and torch.equal(weights.weight.detach(), w_before)
    x = _logits((5, C), dtype=torch.float64).requires_grad_()
    _, energy = ok.functional.ce_and_energy(x, _targets((5,), "mixed"))
    (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="row_loss_energy_bwd: double backward"):
        grad.sum().backward()


def test_cpp_energy_ops_are_used(monkeypatch):
    """Under auto, CPU tensors of every criterion on the energy ops run the C++ implementations."""
    calls = []
    original = row_ops._kernels.row_loss_energy_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(row_ops._kernels, "row_loss_energy_forward", spy)
    monkeypatch.setenv("OODKERNELS_BACKEND", "auto")
    logits, targets = _logits((6, C)), _targets((6,), "mixed")
    phi, weights = _vos_modules()
    ok.loss.VOSRegLoss(phi, weights)(logits, targets)
    ok.loss.ConfidenceLoss()(logits, torch.rand(6), targets)
    ok.paired.energy_margin(logits, targets.clamp_min(0), logits)
    assert not calls  # the Triton launcher never ran
    operations = ok.backend_info()["operations"]
    for name in ("ce_and_energy", "vos_reg_loss", "confidence_loss", "weighted_energy_score", "paired_energy_margin"):
        assert operations[name]["cpu"] == "cpp", name
