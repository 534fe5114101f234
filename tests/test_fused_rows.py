"""The fused row kernels (Triton; the interpreter on a CPU) against the plain-PyTorch reference.

Every row criterion and score, through the public API with ``OODKERNELS_BACKEND=triton`` vs
``OODKERNELS_BACKEND=reference``: values and gradients for every reduction, label pattern, layout,
dtype and option; fp64 gradcheck; opcheck of the custom ops; torch.compile; the autograd edge
cases (grad_output per row, retain_graph, double backward); extreme logits; C = 1 and 2; the
multi-block online softmax (forced small blocks).
"""

import pytest
import torch
import triton
import triton.language as tl
from _backends import DEVICE

import oodkernels as ok
from oodkernels import testing
from oodkernels.kernels.rows import _entry_offsets
from oodkernels.ops import row_ops

pytestmark = pytest.mark.filterwarnings("ignore:Discarding samples")

C = 7


@pytest.fixture(autouse=True)
def _tensors_on_the_kernel_device():
    """On a GPU machine every tensor the tests build lives on CUDA; on a CPU nothing changes."""
    if DEVICE == "cpu":
        yield
        return
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


def _interpret(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _criteria(n_classes=C):
    return {
        "CrossEntropyLoss": lambda: ok.loss.CrossEntropyLoss(),
        "BackgroundClassLoss": lambda: ok.loss.BackgroundClassLoss(n_classes=n_classes - 1),
        "OutlierExposureLoss": lambda: ok.loss.OutlierExposureLoss(alpha=0.3),
        "EntropicOpenSetLoss": lambda: ok.loss.EntropicOpenSetLoss(),
        # margins inside the range of random logits' energies, so both hinges are active on some rows
        "EnergyRegularizedLoss": lambda: ok.loss.EnergyRegularizedLoss(alpha=0.1, margin_in=-3.0, margin_out=-2.5),
        "ConfidencePenaltyLoss": lambda: ok.loss.ConfidencePenaltyLoss(lambda_ood=0.3),
        "MarginConfidenceLoss": lambda: ok.loss.MarginConfidenceLoss(margin=0.4),
        "LogitNorm": lambda: ok.loss.LogitNorm(t=0.7),
    }


SEGMENTATION = {
    "CrossEntropyLoss",
    "BackgroundClassLoss",
    "OutlierExposureLoss",
    "EntropicOpenSetLoss",
    "EnergyRegularizedLoss",
    "ConfidencePenaltyLoss",
    "MarginConfidenceLoss",
}
NONE_RAISES = {"BackgroundClassLoss", "LogitNorm"}


@pytest.fixture
def fused(monkeypatch):
    """Run the public API on the Triton kernels (interpreted on a CPU)."""
    monkeypatch.setenv("OODKERNELS_BACKEND", "triton")
    _interpret(monkeypatch)


def _run(backend, monkeypatch, fn, inputs, grad_output=None):
    """Value and input gradients of ``fn(*inputs)`` on ``backend``, on fresh leaf copies."""
    monkeypatch.setenv("OODKERNELS_BACKEND", backend)
    _interpret(monkeypatch)
    leaves = [
        t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in inputs
    ]
    value = fn(*leaves)
    grads = []
    if value.requires_grad:
        go = torch.ones_like(value) if grad_output is None else grad_output.to(value.dtype)
        value.backward(go)
        grads = [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    return value.detach(), grads


def _compare(monkeypatch, fn, inputs, atol=None, rtol=None, grad_output=None):
    value, grads = _run("triton", monkeypatch, fn, inputs, grad_output)
    ref_value, ref_grads = _run("reference", monkeypatch, fn, inputs, grad_output)
    testing.assert_close(value, ref_value, atol=atol, rtol=rtol, name="value")
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        g = torch.zeros_like(inputs[i]) if g is None else g
        r = torch.zeros_like(inputs[i]) if r is None else r
        testing.assert_close(g, r, atol=atol, rtol=rtol, name=f"gradient {i}")
    return value


def _logits(shape, dtype=torch.float32, layout="contiguous", scale=3.0):
    return testing.make_logits(shape[0], shape[1], shape[2:], dtype=dtype, layout=layout, scale=scale, device=DEVICE)


def _targets(logit_shape, pattern, n_classes=C, name=None):
    """Labels for ``logit_shape``; BackgroundClassLoss(n_classes=C-1) takes ID labels below C-1 only."""
    shape = (logit_shape[0], *logit_shape[2:])
    if name == "BackgroundClassLoss":
        n_classes = n_classes - 1
    return testing.make_targets(shape, n_classes, pattern, device=DEVICE)


LAYOUTS = [
    ((12, C), "contiguous"),
    ((12, C), "transposed"),
    ((12, C), "sliced"),
    ((2, C, 3, 4), "contiguous"),
    ((2, C, 3, 4), "channels_last"),
]


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood", "empty"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", None])
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(_criteria()))
def test_fused_equals_reference(monkeypatch, name, shape, layout, reduction, pattern):
    if len(shape) == 4 and name not in SEGMENTATION:
        pytest.skip(f"{name} is classification only")
    if reduction is None and name in NONE_RAISES:
        pytest.skip("reduction=None raises (tested in the contract suite)")
    logits = _logits(shape, layout=layout)
    targets = _targets(shape, pattern, name=name)
    if pattern == "empty":
        logits = logits[:0]
    criterion = _criteria()[name]()
    criterion.reduction = reduction
    monkeypatch.setenv("OODKERNELS_BACKEND", "reference")
    reference_value = criterion(logits, targets)
    go = None
    if reference_value.dim() > 0:
        go = torch.randn(reference_value.shape, generator=torch.Generator().manual_seed(5))
    _compare(monkeypatch, criterion, [logits, targets], grad_output=go)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(_criteria()))
def test_fused_dtypes(monkeypatch, name, dtype):
    shape = (2, C, 3, 4) if name in SEGMENTATION else (12, C)
    logits = _logits(shape, dtype=dtype)
    targets = _targets(shape, "mixed", name=name)
    criterion = _criteria()[name]()
    value, grads = _run("triton", monkeypatch, criterion, [logits, targets])
    ref_value, ref_grads = _run("reference", monkeypatch, criterion, [logits, targets])
    assert value.dtype == dtype and grads[0].dtype == dtype
    atol, rtol = testing.tolerances(dtype)
    if dtype in (torch.bfloat16, torch.float16):
        # both round one fp32 computation once; allow one ulp of the result's magnitude
        atol = max(atol, float(torch.finfo(dtype).eps) * float(ref_value.abs().max()))
    testing.assert_close(value, ref_value, atol=atol, rtol=rtol)
    testing.assert_close(grads[0], ref_grads[0], atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", list(_criteria()))
def test_fused_gradcheck_fp64_multi_block(fused, name):
    # small inputs and fast mode (a random directional derivative): every interpreted launch costs ~50 ms
    shape = (1, C, 2, 2) if name in SEGMENTATION else (5, C)
    logits = _logits(shape, dtype=torch.float64, scale=1.5).requires_grad_()
    targets = _targets(shape, "mixed", name=name)
    criterion = _criteria()[name]()
    criterion.reduction = "none" if name not in NONE_RAISES else "sum"
    with row_ops.forced_blocks(4, 2):
        assert torch.autograd.gradcheck(lambda x: criterion(x, targets), (logits,), fast_mode=True)


@pytest.mark.parametrize("block", [(1, 1), (4, 2), (16, 4), (64, 8)])
@pytest.mark.parametrize("name", ["EnergyRegularizedLoss", "OutlierExposureLoss", "LogitNorm", "MarginConfidenceLoss"])
def test_fused_block_shapes_agree(monkeypatch, name, block):
    """Every tiling, single- and multi-block, gives the reference values (C = 13 crosses block edges)."""
    logits = _logits((9, 13))
    targets = _targets((9, 13), "mixed", n_classes=13)
    criterion = _criteria(13)[name]()
    with row_ops.forced_blocks(*block):
        _compare(monkeypatch, criterion, [logits, targets])


@pytest.mark.parametrize("n_classes", [1, 2])
@pytest.mark.parametrize(
    "name",
    [
        "CrossEntropyLoss",
        "OutlierExposureLoss",
        "EnergyRegularizedLoss",
        "ConfidencePenaltyLoss",
        "MarginConfidenceLoss",
        "LogitNorm",
    ],
)
def test_fused_one_and_two_classes(monkeypatch, name, n_classes):
    logits = _logits((8, n_classes))
    targets = testing.make_targets((8,), n_classes, "mixed", device=DEVICE)
    _compare(monkeypatch, _criteria(n_classes)[name](), [logits, targets])


# LogitNorm of a row holding -inf has an infinite norm: x/s is NaN in the reference and the kernel alike
# (compared below), and numpy, which runs the interpreter, warns while computing it
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("name", list(_criteria()))
def test_fused_extreme_logits(monkeypatch, name):
    """±1e4 and -inf in non-target columns: finite where the reference (in fp64) is finite."""
    logits = _logits((8, C), dtype=torch.float64)
    logits[0, 3] = 1e4
    logits[1, 2] = -1e4
    logits[2, 5] = float("-inf")
    logits[3, 0] = -1e4
    logits[5, 6] = float("-inf")
    targets = torch.tensor([3, 0, 1, 2, -1, -1, 4, 5])
    criterion = _criteria()[name]()
    _compare(monkeypatch, criterion, [logits, targets])
    # fp32 against the fp64 evaluation of the same inputs
    value, _ = _run("triton", monkeypatch, criterion, [logits.float(), targets])
    exact, _ = _run("reference", monkeypatch, criterion, [logits, targets])
    testing.assert_close(value.double(), exact, atol=1e-5, rtol=1e-5)


def test_fused_nan_propagates(monkeypatch, fused):
    logits = _logits((4, C))
    logits[1, 2] = float("nan")
    value = ok.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), reduction="none")
    assert torch.isnan(value[1]) and torch.isfinite(value[[0, 2, 3]]).all()


def test_fused_grad_output_not_last_layer(monkeypatch):
    """loss·3, a random per-row grad_output for 'none', and a stride-0 grad_output from .sum()."""
    logits = _logits((2, C, 3, 4))
    targets = _targets(logits.shape, "mixed")
    energy = ok.loss.EnergyRegularizedLoss(alpha=0.1, margin_in=-3.0, margin_out=-2.5)
    _compare(monkeypatch, lambda x, y: energy(x, y) * 3, [logits, targets])
    energy.reduction = "none"
    per_pixel = torch.randn(2, 3, 4)
    _compare(monkeypatch, energy, [logits, targets], grad_output=per_pixel)
    _compare(monkeypatch, lambda x, y: energy(x, y).sum(), [logits, targets])  # stride-0 grad_output


def test_fused_retain_graph_twice_gives_identical_gradients(fused):
    logits = _logits((10, C)).requires_grad_()
    targets = _targets(logits.shape, "mixed")
    loss = ok.loss.OutlierExposureLoss()(logits, targets)
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    logits.grad = None
    loss.backward()
    assert torch.equal(first, logits.grad)


def test_fused_upstream_tensor_is_not_overwritten(monkeypatch):
    """An op before the loss that saved its output (exp) still gets the right gradient (P1)."""
    raw = _logits((10, C))
    targets = _targets(raw.shape, "mixed")
    _compare(monkeypatch, lambda p, y: ok.loss.EntropicOpenSetLoss()(p.exp(), y), [raw, targets])


def test_fused_double_backward_raises(fused):
    logits = _logits((6, C), dtype=torch.float64).requires_grad_()
    targets = _targets(logits.shape, "mixed")
    (grad,) = torch.autograd.grad(ok.loss.OutlierExposureLoss()(logits, targets), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through the fused row kernels is not supported"):
        grad.sum().backward()


def test_fused_inputs_are_not_mutated(fused):
    logits = _logits((2, C, 3, 4)).requires_grad_()
    targets = _targets(logits.shape, "mixed")
    before, targets_before = logits.detach().clone(), targets.clone()
    loss = ok.loss.EnergyRegularizedLoss()(logits, targets)
    go = torch.tensor(2.0)
    loss.backward(go)
    assert torch.equal(logits.detach(), before) and torch.equal(targets, targets_before) and go.item() == 2.0


def test_fused_is_deterministic(fused):
    logits = _logits((2, C, 3, 4)).requires_grad_()
    targets = _targets(logits.shape, "mixed")
    results = []
    for _ in range(2):
        logits.grad = None
        value = ok.loss.OutlierExposureLoss()(logits, targets)
        value.backward()
        results.append((value.detach(), logits.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_fused_no_grad_forward(fused):
    logits = _logits((10, C))
    targets = _targets(logits.shape, "mixed")
    with torch.no_grad():
        value = ok.loss.EnergyRegularizedLoss()(logits, targets)
    assert not value.requires_grad


def test_fused_is_used(fused, monkeypatch):
    """The triton backend really runs the kernels (not the reference) for the row criteria."""
    calls = []
    original = row_ops._launchers().row_loss_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(row_ops._launchers(), "row_loss_forward", spy)
    logits = _logits((6, C))
    targets = _targets(logits.shape, "mixed", n_classes=C - 1)  # valid for every criterion, background too
    for make in _criteria().values():
        make()(logits, targets)
    ok.functional.outlier_exposure_loss(logits, targets)
    assert len(calls) == len(_criteria()) + 1
    info = ok.backend_info()
    assert info["operations"]["outlier_exposure_loss"]["cuda"] == "triton"


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(_criteria()))
def test_fused_options_equal_reference(monkeypatch, name, reduction):
    seg = name in SEGMENTATION
    shape = (2, C, 3, 4) if seg else (12, C)
    logits = _logits(shape)
    targets = _targets(shape, "mixed", name=name).clone()
    targets.view(-1)[::5] = 255  # void entries
    weight = torch.rand(targets.shape) + 0.5
    cost = torch.rand(C, C) + 0.5
    criterion = _criteria()[name]()
    criterion = type(criterion)(**{**_ctor_args(criterion), "cost_matrix": cost, "ignore_index": 255})
    criterion.reduction = reduction
    go = None
    if reduction == "none":
        monkeypatch.setenv("OODKERNELS_BACKEND", "reference")
        shape_out = criterion(logits, targets, weight).shape
        go = torch.randn(shape_out)
    _compare(monkeypatch, lambda x, y, w: criterion(x, y, w), [logits, targets, weight], grad_output=go)


def _ctor_args(criterion):
    import inspect

    args = {}
    for p in inspect.signature(type(criterion).__init__).parameters.values():
        if p.name in ("self", "cost_matrix", "ignore_index") or p.kind is p.VAR_KEYWORD:
            continue
        for attr in (p.name, {"margin_in": "m_in", "margin_out": "m_out", "n_classes": "num_classes"}.get(p.name)):
            if attr and hasattr(criterion, attr):
                args[p.name] = getattr(criterion, attr)
                break
    return args


# ----------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("score", ["energy", "max_softmax", "max_logit", "entropy"])
def test_fused_scores_equal_reference(monkeypatch, score, shape, layout, dtype):
    logits = _logits(shape, dtype=dtype, layout=layout)
    kwargs = {"t": 1.7} if score in ("energy", "max_softmax") else {}
    fn = getattr(ok.scores, score)
    monkeypatch.setenv("OODKERNELS_BACKEND", "triton")
    _interpret(monkeypatch)
    with row_ops.forced_blocks(4, 4):
        value = fn(logits, **kwargs)
    monkeypatch.setenv("OODKERNELS_BACKEND", "reference")
    expected = fn(logits, **kwargs)
    assert value.dtype == expected.dtype == dtype and value.shape == expected.shape
    atol, rtol = testing.tolerances(dtype)
    if dtype == torch.bfloat16:
        atol = max(atol, float(torch.finfo(dtype).eps) * float(expected.abs().max()))
    testing.assert_close(value, expected, atol=atol, rtol=rtol)


def test_fused_scores_keep_gradients_through_the_reference(fused):
    """A score of logits that require grad stays differentiable (it runs the reference then)."""
    logits = _logits((5, C)).requires_grad_()
    ok.scores.energy(logits).sum().backward()
    testing.assert_close(logits.grad, -torch.softmax(logits.detach(), 1))


# ----------------------------------------------------------------------------------------------
# registration: opcheck, compile
# ----------------------------------------------------------------------------------------------


def test_opcheck_row_ops(fused):
    from torch.library import opcheck

    logits = _logits((2, C, 3, 2)).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last
    targets = _targets(logits.shape, "mixed")
    for kind in range(6):
        args = (logits.detach().requires_grad_(), targets, None, kind, 0.3, -3.0, -2.5, None, 4, 4)
        opcheck(torch.ops.oodkernels.row_loss_fwd.default, args)
        _, stats = torch.ops.oodkernels.row_loss_fwd(logits.detach(), targets, None, kind, 0.3, -3.0, -2.5, None, 4, 4)
        grad_values = torch.randn(targets.numel())
        bwd_args = (grad_values, logits.detach(), targets, None, stats, kind, 0.3, -3.0, -2.5, None, 4, 4)
        opcheck(torch.ops.oodkernels.row_loss_bwd.default, bwd_args)
    cost = torch.rand(C, C)
    opcheck(torch.ops.oodkernels.row_loss_fwd.default, (logits.detach(), targets, cost, 2, 0.1, -3.0, -2.5, 255, 0, 0))
    for which in range(4):
        opcheck(torch.ops.oodkernels.row_scores.default, (logits.detach(), which, 1.5, 0, 0))
    opcheck(torch.ops.oodkernels.row_scores.default, (logits.detach()[:0], 0, 1.0, 0, 0))


@pytest.mark.parametrize("name", ["EnergyRegularizedLoss", "OutlierExposureLoss", "LogitNorm", "BackgroundClassLoss"])
def test_fused_compile_fullgraph(fused, compile_reset, name):
    from oodkernels import config

    config.data_checks = False  # no host read: nothing breaks the graph
    logits = _logits((2, C, 3, 4) if name in SEGMENTATION else (10, C))
    targets = _targets(logits.shape, "mixed", name=name)
    criterion = _criteria()[name]()
    eager_x = logits.clone().requires_grad_()
    eager = criterion(eager_x, targets)
    eager.backward()
    compiled_x = logits.clone().requires_grad_()
    compiled = torch.compile(criterion, fullgraph=True, backend="aot_eager")(compiled_x, targets)
    compiled.backward()
    testing.assert_close(compiled.detach(), eager.detach())
    testing.assert_close(compiled_x.grad, eager_x.grad)


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
    logits = _logits((3, 5000))
    targets = torch.tensor([4999, -1, 17])
    _compare(monkeypatch, _criteria(5000)[name](), [logits, targets])
