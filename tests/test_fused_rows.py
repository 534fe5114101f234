"""The fused row kernels, Triton (the interpreter on a CPU) and C++, against the plain-PyTorch reference.

The bodies shared by both kernel backends (param ``backend``; the C++ one skipped when the extension cannot be
built, an error under ``OODKERNELS_REQUIRE_CPP=1``), through the public API with ``OODKERNELS_BACKEND`` forced
vs ``reference``: every row criterion and score, values and gradients for every reduction, label pattern,
layout, dtype and option; fp64 gradcheck; opcheck of the custom ops; torch.compile; the autograd edge cases
(grad_output per row, retain_graph, double backward); extreme logits and NaN; C = 1 and 2. The cases differ per
backend: few small ones with forced small blocks in the interpreter, every layout and both C++ traversals
(class-contiguous rows; full and partial entry tiles) on C++. Triton-only tests (block shapes, int64 offsets,
the streaming path for wide rows, the launchers in use) follow; the C++-only ones are in tests/test_cpp_rows.py.
"""

import pytest
import torch
import triton
import triton.language as tl
from _backends import BACKENDS
from _backends import kernel_device
from _backends import over_backends
from _backends import spy_calls
from _backends import use_backend
from _rows import NONE_RAISES
from _rows import SEGMENTATION
from _rows import C
from _rows import compare
from _rows import criteria
from _rows import rand_logits
from _rows import rand_targets
from _rows import run

import oodkernels as ok
from oodkernels import testing
from oodkernels.kernels.rows import _entry_offsets
from oodkernels.ops import row_ops

pytestmark = pytest.mark.filterwarnings("ignore:Discarding samples")

#: the Triton cases of a test over the layouts (run in the interpreter on a CPU: few)
LAYOUTS = [
    ((12, C), "contiguous"),
    ((12, C), "transposed"),
    ((12, C), "sliced"),
    ((2, C, 3, 4), "contiguous"),
    ((2, C, 3, 4), "channels_last"),
]
#: the C++ cases: (B, C) rows run the class-contiguous traversal; the rest the entry tiles. (1, C, 16, 16) holds
#: a full 256-entry fp32 tile (in-place loads and stores; two full 128-entry fp64 tiles), (2, C, 8, 8) a tile
#: across two images, (2, C, 3, 4) a partial one, (C, B).T a transposed tile.
CPP_LAYOUTS = [
    ((12, C), "contiguous"),
    ((12, C), "transposed"),
    ((12, C), "sliced"),
    ((2, C, 3, 4), "contiguous"),
    ((2, C, 8, 8), "contiguous"),
    ((1, C, 16, 16), "contiguous"),
    ((2, C, 3, 4), "channels_last"),
    ((2, C, 3, 4), "sliced"),
]
#: the shape param of a Triton case that runs one shape per criterion: (2, C, 3, 4) for the criteria that take
#: segmentation logits, (12, C) rows for the classification-only one (the interpreter runs no more than that)
PER_CRITERION = "per-criterion"
#: the cases of a test over every criterion: one shape each on Triton; rows and full entry tiles on C++
CRITERION_SHAPES = over_backends(triton=[(PER_CRITERION,)], cpp=[((12, C),), ((2, C, 16, 16),)])


def _shape(shape, name):
    """The logits' shape of a ``CRITERION_SHAPES`` case for ``name`` (skipped: segmentation for LogitNorm)."""
    if shape == PER_CRITERION:
        return (2, C, 3, 4) if name in SEGMENTATION else (12, C)
    if len(shape) == 4 and name not in SEGMENTATION:
        pytest.skip(f"{name} is classification only")
    return shape


@pytest.fixture(autouse=True)
def _tensors_on_the_kernel_device(request):
    yield from kernel_device(request)


@pytest.fixture
def fused(monkeypatch):
    """Run the public API on the Triton kernels (interpreted on a CPU)."""
    use_backend(monkeypatch, "triton")


# ----------------------------------------------------------------------------------------------
# criteria against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood", "empty"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", None])
@pytest.mark.parametrize("name", list(criteria()))
@pytest.mark.parametrize("backend,shape,layout", over_backends(triton=LAYOUTS, cpp=CPP_LAYOUTS), ids=str)
def test_criteria_equal_reference(monkeypatch, backend, shape, layout, name, reduction, pattern):
    if len(shape) == 4 and name not in SEGMENTATION:
        pytest.skip(f"{name} is classification only")
    if reduction is None and name in NONE_RAISES:
        pytest.skip("reduction=None raises (tested in the contract suite)")
    logits = rand_logits(shape, layout=layout)
    targets = rand_targets(shape, pattern, name=name)
    if pattern == "empty":
        logits = logits[:0]
    criterion = criteria()[name]()
    criterion.reduction = reduction
    use_backend(monkeypatch, "reference")
    reference_value = criterion(logits, targets)
    go = None
    if reference_value.dim() > 0:
        go = torch.randn(reference_value.shape, generator=torch.Generator().manual_seed(5))
    compare(backend, monkeypatch, criterion, [logits, targets], grad_output=go)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(criteria()))
@pytest.mark.parametrize("backend,shape", CRITERION_SHAPES, ids=str)
def test_criteria_dtypes(monkeypatch, backend, shape, name, dtype):
    shape = _shape(shape, name)
    logits = rand_logits(shape, dtype=dtype)
    targets = rand_targets(shape, "mixed", name=name)
    criterion = criteria()[name]()
    value, grads = run(backend, monkeypatch, criterion, [logits, targets])
    ref_value, ref_grads = run("reference", monkeypatch, criterion, [logits, targets])
    assert value.dtype == dtype and grads[0].dtype == dtype
    atol, rtol = testing.tolerances(dtype)
    if dtype in (torch.bfloat16, torch.float16):
        # both round one fp32 computation once; allow one ulp of the result's magnitude
        atol = max(atol, float(torch.finfo(dtype).eps) * float(ref_value.abs().max()))
    testing.assert_close(value, ref_value, atol=atol, rtol=rtol)
    testing.assert_close(grads[0], ref_grads[0], atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", list(criteria()))
@pytest.mark.parametrize(
    "backend,segmentation_shape,blocks",
    over_backends(triton=[((1, C, 2, 2), (4, 2))], cpp=[((1, C, 2, 3), (1, 3))]),
    ids=str,
)
def test_gradcheck_fp64_multi_block(monkeypatch, backend, segmentation_shape, blocks, name):
    """Several row blocks (Triton) / class chunks (C++) per input."""
    use_backend(monkeypatch, backend)
    shape = segmentation_shape if name in SEGMENTATION else (5, C)
    logits = rand_logits(shape, dtype=torch.float64, scale=1.5).requires_grad_()
    targets = rand_targets(shape, "mixed", name=name)
    criterion = criteria()[name]()
    criterion.reduction = "none" if name not in NONE_RAISES else "sum"
    # in the interpreter fast mode (a random directional derivative): every interpreted launch costs ~50 ms
    fast = backend == "triton"
    with row_ops.forced_blocks(*blocks):
        assert torch.autograd.gradcheck(lambda x: criterion(x, targets), (logits,), fast_mode=fast)


ONE_AND_TWO_CLASSES_CPP = ["CrossEntropyLoss", "OutlierExposureLoss", "ConfidencePenaltyLoss", "LogitNorm"]
ONE_AND_TWO_CLASSES_TRITON = ONE_AND_TWO_CLASSES_CPP + ["EnergyRegularizedLoss", "MarginConfidenceLoss"]


@pytest.mark.parametrize("n_classes", [1, 2])
@pytest.mark.parametrize(
    "backend,name",
    over_backends(
        triton=[(name,) for name in ONE_AND_TWO_CLASSES_TRITON], cpp=[(name,) for name in ONE_AND_TWO_CLASSES_CPP]
    ),
)
def test_one_and_two_classes(monkeypatch, backend, name, n_classes):
    logits = rand_logits((8, n_classes))
    targets = testing.make_targets((8,), n_classes, "mixed", device=logits.device)
    compare(backend, monkeypatch, criteria(n_classes)[name](), [logits, targets])


# LogitNorm of a row holding -inf has an infinite norm: x/s is NaN in the reference and the kernel alike
# (compared below), and numpy, which runs the interpreter, warns while computing it
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("name", list(criteria()))
@pytest.mark.parametrize("backend,shape", over_backends(triton=[((8, C),)], cpp=[((8, C),), ((1, C, 8, 8),)]), ids=str)
def test_extreme_logits(monkeypatch, backend, shape, name):
    """±1e4 and -inf in non-target columns: finite where the reference (in fp64) is finite."""
    if len(shape) == 4 and name not in SEGMENTATION:
        pytest.skip(f"{name} is classification only")
    logits = rand_logits(shape, dtype=torch.float64)
    rows = logits.movedim(1, -1).reshape(-1, C)  # a view: entries in target order
    rows[0, 3] = 1e4
    rows[1, 2] = -1e4
    rows[2, 5] = float("-inf")
    rows[3, 0] = -1e4
    rows[5, 6] = float("-inf")
    flat = torch.tensor([3, 0, 1, 2, -1, -1, 4, 5] * (rows.shape[0] // 8))
    targets = flat.reshape((shape[0], *shape[2:]))
    criterion = criteria()[name]()
    compare(backend, monkeypatch, criterion, [logits, targets])
    # fp32 against the fp64 evaluation of the same inputs
    value, _ = run(backend, monkeypatch, criterion, [logits.float(), targets])
    exact, _ = run("reference", monkeypatch, criterion, [logits, targets])
    testing.assert_close(value.double(), exact, atol=1e-5, rtol=1e-5)


# the all -inf row: numpy, which runs the interpreter, warns on its -inf - (-inf), log(0) and 0/0
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("backend,shape", over_backends(triton=[((4, C),)], cpp=[((4, C),), ((1, C, 2, 2),)]), ids=str)
def test_nan_and_all_inf_rows(monkeypatch, backend, shape):
    """A NaN logit makes its row's value and gradient NaN, and no other row's (an all -inf row beside it)."""
    use_backend(monkeypatch, backend)
    logits = rand_logits(shape)
    rows = logits.movedim(1, -1).reshape(-1, C)
    rows[1, 2] = float("nan")
    rows[3] = float("-inf")
    targets = torch.tensor([0, 1, 2, 3]).reshape((shape[0], *shape[2:]))
    x = logits.requires_grad_()
    value = ok.functional.cross_entropy(x, targets, reduction="none").reshape(-1)
    assert torch.isnan(value[1]) and torch.isfinite(value[[0, 2]]).all()
    value[[0, 1, 2]].sum().backward()
    grad = x.grad.movedim(1, -1).reshape(-1, C)
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2]]).all()


# ----------------------------------------------------------------------------------------------
# autograd edge cases
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,shape", over_backends(triton=[((2, C, 3, 4),)], cpp=[((2, C, 8, 8),)]), ids=str)
def test_grad_output_not_last_layer(monkeypatch, backend, shape):
    """loss·3, a random per-entry grad_output for 'none', and a stride-0 grad_output from .sum()."""
    logits = rand_logits(shape)
    targets = rand_targets(logits.shape, "mixed")
    energy = ok.loss.EnergyRegularizedLoss(alpha=0.1, margin_in=-3.0, margin_out=-2.5)
    compare(backend, monkeypatch, lambda x, y: energy(x, y) * 3, [logits, targets])
    energy.reduction = "none"
    per_entry = torch.randn(shape[0], *shape[2:])
    compare(backend, monkeypatch, energy, [logits, targets], grad_output=per_entry)
    compare(backend, monkeypatch, lambda x, y: energy(x, y).sum(), [logits, targets])  # stride-0 grad_output


@pytest.mark.parametrize(
    "backend,shape", over_backends(triton=[((10, C),)], cpp=[((10, C),), ((2, C, 8, 8),)]), ids=str
)
def test_retain_graph_twice_gives_identical_gradients(monkeypatch, backend, shape):
    use_backend(monkeypatch, backend)
    logits = rand_logits(shape).requires_grad_()
    targets = rand_targets(logits.shape, "mixed")
    loss = ok.loss.OutlierExposureLoss()(logits, targets)
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    logits.grad = None
    loss.backward()
    assert torch.equal(first, logits.grad)


@pytest.mark.parametrize(
    "backend,shape,name",
    over_backends(
        triton=[((2, C, 3, 4), "EnergyRegularizedLoss")],
        cpp=[((2, C, 3, 4), "EnergyRegularizedLoss"), ((2, C, 8, 8), "OutlierExposureLoss")],
    ),
    ids=str,
)
def test_inputs_are_not_mutated(monkeypatch, backend, shape, name):
    use_backend(monkeypatch, backend)
    logits = rand_logits(shape).requires_grad_()
    targets = rand_targets(logits.shape, "mixed")
    before, targets_before = logits.detach().clone(), targets.clone()
    loss = getattr(ok.loss, name)()(logits, targets)
    go = torch.tensor(2.0)
    loss.backward(go)
    assert torch.equal(logits.detach(), before) and torch.equal(targets, targets_before) and go.item() == 2.0


@pytest.mark.parametrize(
    "backend,shape", over_backends(triton=[((2, C, 3, 4),)], cpp=[((2, C, 3, 4),), ((2, C, 8, 8),)]), ids=str
)
def test_is_deterministic(monkeypatch, backend, shape):
    """Two forwards and backwards of the same inputs: bitwise the same value and gradient."""
    use_backend(monkeypatch, backend)
    logits = rand_logits(shape).requires_grad_()
    targets = rand_targets(logits.shape, "mixed")
    results = []
    for _ in range(2):
        logits.grad = None
        value = ok.loss.OutlierExposureLoss()(logits, targets)
        value.backward()
        results.append((value.detach(), logits.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    logits = rand_logits((10, C))
    targets = rand_targets(logits.shape, "mixed")
    with torch.no_grad():
        value = ok.loss.EnergyRegularizedLoss()(logits, targets)
    assert not value.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_tensor_is_not_overwritten(monkeypatch, backend):
    """An op before the loss that saved its output (exp) still gets the right gradient (P1)."""
    raw = rand_logits((10, C))
    targets = rand_targets(raw.shape, "mixed")
    compare(backend, monkeypatch, lambda p, y: ok.loss.EntropicOpenSetLoss()(p.exp(), y), [raw, targets])


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    logits = rand_logits((6, C), dtype=torch.float64).requires_grad_()
    targets = rand_targets(logits.shape, "mixed")
    (grad,) = torch.autograd.grad(ok.loss.OutlierExposureLoss()(logits, targets), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through the fused row kernels is not supported"):
        grad.sum().backward()


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------


_CTOR = {
    "BackgroundClassLoss": {"n_classes": "num_classes"},
    "OutlierExposureLoss": {"alpha": "alpha"},
    "EnergyRegularizedLoss": {"alpha": "alpha", "margin_in": "m_in", "margin_out": "m_out"},
    "ConfidencePenaltyLoss": {"lambda_ood": "lambda_ood"},
    "MarginConfidenceLoss": {"margin": "margin"},
    "LogitNorm": {"t": "t"},
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(criteria()))
@pytest.mark.parametrize("backend,shape", CRITERION_SHAPES, ids=str)
def test_options_equal_reference(monkeypatch, backend, shape, name, reduction):
    """weight, cost matrix (ω = cost[y, argmax]) and ignore_index (C++: in both traversals)."""
    shape = _shape(shape, name)
    logits = rand_logits(shape)
    targets = rand_targets(shape, "mixed", name=name).clone()
    targets.view(-1)[::5] = 255  # void entries
    weight = torch.rand(targets.shape) + 0.5
    cost = torch.rand(C, C) + 0.5
    base = criteria()[name]()
    kwargs = {k: getattr(base, a) for k, a in _CTOR.get(name, {}).items()}
    criterion = type(base)(**kwargs, cost_matrix=cost, ignore_index=255)
    criterion.reduction = reduction
    go = None
    if reduction == "none":
        use_backend(monkeypatch, "reference")
        go = torch.randn(criterion(logits, targets, weight).shape)
    compare(backend, monkeypatch, lambda x, y, w: criterion(x, y, w), [logits, targets, weight], grad_output=go)


# ----------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("score", ["energy", "max_softmax", "max_logit", "entropy"])
@pytest.mark.parametrize(
    "backend,shape,layout,blocks",
    over_backends(
        triton=[(shape, layout, (4, 4)) for shape, layout in LAYOUTS],
        cpp=[(shape, layout, (1, 3)) for shape, layout in CPP_LAYOUTS],
    ),
    ids=str,
)
def test_scores_equal_reference(monkeypatch, backend, shape, layout, blocks, score, dtype):
    logits = rand_logits(shape, dtype=dtype, layout=layout)
    kwargs = {"t": 1.7} if score in ("energy", "max_softmax") else {}
    fn = getattr(ok.scores, score)
    use_backend(monkeypatch, backend)
    with row_ops.forced_blocks(*blocks):
        value = fn(logits, **kwargs)
    use_backend(monkeypatch, "reference")
    expected = fn(logits, **kwargs)
    assert value.dtype == expected.dtype == dtype and value.shape == expected.shape
    atol, rtol = testing.tolerances(dtype)
    if dtype == torch.bfloat16:
        atol = max(atol, float(torch.finfo(dtype).eps) * float(expected.abs().max()))
    testing.assert_close(value, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_keep_gradients_through_the_reference(monkeypatch, backend):
    """A score of logits that require grad stays differentiable (it runs the reference then)."""
    use_backend(monkeypatch, backend)
    logits = rand_logits((5, C)).requires_grad_()
    ok.scores.energy(logits).sum().backward()
    testing.assert_close(logits.grad, -torch.softmax(logits.detach(), 1))


# ----------------------------------------------------------------------------------------------
# registration: opcheck, compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_row_ops(monkeypatch, backend):
    """Every kind forward and backward on channels-last logits (C++: NCHW too), the cost matrix, the scores."""
    from torch.library import opcheck

    use_backend(monkeypatch, backend)
    logits = rand_logits((2, C, 3, 2)).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last
    if backend == "triton":
        cases, blocks = [logits], (4, 4)
    else:
        cases, blocks = [logits, rand_logits((2, C, 8, 4))], (0, 3)
    for x in cases:
        targets = rand_targets(x.shape, "mixed")
        for kind in range(6):
            args = (x.detach().requires_grad_(), targets, None, kind, 0.3, -3.0, -2.5, None, *blocks)
            opcheck(torch.ops.oodkernels.row_loss_fwd.default, args)
            _, stats = torch.ops.oodkernels.row_loss_fwd(x.detach(), *args[1:])
            bwd_args = (torch.randn(targets.numel()), x.detach(), targets, None, stats, *args[3:])
            opcheck(torch.ops.oodkernels.row_loss_bwd.default, bwd_args)
    targets = rand_targets(logits.shape, "mixed")
    cost = torch.rand(C, C)
    opcheck(torch.ops.oodkernels.row_loss_fwd.default, (logits, targets, cost, 2, 0.1, -3.0, -2.5, 255, 0, 0))
    for which in range(4):
        opcheck(torch.ops.oodkernels.row_scores.default, (logits, which, 1.5, 0, 0))
    opcheck(torch.ops.oodkernels.row_scores.default, (logits[:0], 0, 1.0, 0, 0))


@pytest.mark.parametrize(
    "backend,name,segmentation_shape",
    over_backends(
        triton=[
            (name, (2, C, 3, 4))
            for name in ["EnergyRegularizedLoss", "OutlierExposureLoss", "LogitNorm", "BackgroundClassLoss"]
        ],
        cpp=[(name, (2, C, 8, 4)) for name in ["EnergyRegularizedLoss", "LogitNorm", "BackgroundClassLoss"]],
    ),
    ids=str,
)
def test_compile_fullgraph(monkeypatch, compile_reset, backend, name, segmentation_shape):
    from oodkernels import config

    use_backend(monkeypatch, backend)
    config.data_checks = False  # no host read: nothing breaks the graph
    logits = rand_logits(segmentation_shape if name in SEGMENTATION else (10, C))
    targets = rand_targets(logits.shape, "mixed", name=name)
    criterion = criteria()[name]()
    eager_x = logits.clone().requires_grad_()
    eager = criterion(eager_x, targets)
    eager.backward()
    compiled_x = logits.clone().requires_grad_()
    compiled = torch.compile(criterion, fullgraph=True, backend="aot_eager")(compiled_x, targets)
    compiled.backward()
    testing.assert_close(compiled.detach(), eager.detach())
    testing.assert_close(compiled_x.grad, eager_x.grad)


# ----------------------------------------------------------------------------------------------
# Triton only: tilings, the launchers in use, int64 offsets, the streaming path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [(1, 1), (4, 2), (16, 4), (64, 8)])
@pytest.mark.parametrize("name", ["EnergyRegularizedLoss", "OutlierExposureLoss", "LogitNorm", "MarginConfidenceLoss"])
def test_fused_block_shapes_agree(monkeypatch, name, block):
    """Every tiling, single- and multi-block, gives the reference values (C = 13 crosses block edges)."""
    logits = rand_logits((9, 13))
    targets = rand_targets((9, 13), "mixed", n_classes=13)
    criterion = criteria(13)[name]()
    with row_ops.forced_blocks(*block):
        compare("triton", monkeypatch, criterion, [logits, targets])


def test_fused_is_used(fused, monkeypatch):
    """The triton backend really runs the kernels (not the reference) for the row criteria."""
    calls = spy_calls(monkeypatch, row_ops._launchers(), "row_loss_reduced_forward")
    logits = rand_logits((6, C))
    targets = rand_targets(logits.shape, "mixed", n_classes=C - 1)  # valid for every criterion, background too
    for make in criteria().values():
        make()(logits, targets)
    ok.functional.outlier_exposure_loss(logits, targets)
    assert len(calls) == len(criteria()) + 1
    info = ok.backend_info()
    assert info["operations"]["outlier_exposure_loss"]["cuda"] == "triton"


@triton.jit
def _offsets_probe(Out, start, inner, width, s_o, s_h, s_w, BLOCK: tl.constexpr):
    rows = start + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(Out + tl.arange(0, BLOCK), _entry_offsets(rows, inner, width, s_o, s_h, s_w))


def test_int64_offsets():
    """Entry offsets are int64: rows near 2^31 with a large stride do not wrap (the interpreter reproduces
    int32 wrap-around, KERNEL_GUIDE P6)."""
    out = torch.zeros(4, dtype=torch.int64)
    start, inner, width, s_o, s_h, s_w = 2**31 - 2, 6, 3, 7000, 1000, 1
    _offsets_probe[(1,)](out, start, inner, width, s_o, s_h, s_w, BLOCK=4)
    expected = []
    for r in range(start, start + 4):
        o, i = divmod(r, inner)
        h, w = divmod(i, width)
        expected.append(o * s_o + h * s_h + w * s_w)
    assert out.tolist() == expected and max(expected) > 2**32


@pytest.mark.parametrize("name", ["EnergyRegularizedLoss", "LogitNorm", "OutlierExposureLoss"])
def test_fused_wide_rows_use_the_streaming_path(monkeypatch, name):
    """C = 5000 exceeds the heuristic's 4096-column block: the default launch streams two blocks."""
    from oodkernels.kernels.rows import launch_config

    assert launch_config(5000, torch.float32)[1] < 5000
    logits = rand_logits((3, 5000))
    targets = torch.tensor([4999, -1, 17])
    compare("triton", monkeypatch, criteria(5000)[name](), [logits, targets])
