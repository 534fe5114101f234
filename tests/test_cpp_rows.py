"""The C++ CPU backend of the row family (csrc/rows.cpp) against the plain-PyTorch reference.

Every row criterion and score through the public API with ``OODKERNELS_BACKEND=cpp`` vs
``reference``: values and gradients for every reduction, label pattern, layout, dtype and option;
both traversals (class-contiguous rows; entry tiles for NCHW / (N, C, L) / transposed, with full
and partial tiles); forced small class chunks (the online merge across chunks); fp64 gradcheck;
opcheck of the public ops on the C++ path; torch.compile(fullgraph=True); the autograd edge cases;
a few cases against the Triton interpreter; bad kinds; the build switches.

Skipped when the extension cannot be built, unless ``OODKERNELS_REQUIRE_CPP=1`` (CI), where the
first test that asks for it fails instead.
"""

import math

import pytest
import torch

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


@pytest.fixture
def cpp(monkeypatch):
    monkeypatch.setenv("OODKERNELS_BACKEND", "cpp")


def _criteria(n_classes=C):
    return {
        "CrossEntropyLoss": lambda: ok.loss.CrossEntropyLoss(),
        "BackgroundClassLoss": lambda: ok.loss.BackgroundClassLoss(n_classes=n_classes - 1),
        "OutlierExposureLoss": lambda: ok.loss.OutlierExposureLoss(alpha=0.3),
        "EntropicOpenSetLoss": lambda: ok.loss.EntropicOpenSetLoss(),
        "EnergyRegularizedLoss": lambda: ok.loss.EnergyRegularizedLoss(alpha=0.1, margin_in=-3.0, margin_out=-2.5),
        "ConfidencePenaltyLoss": lambda: ok.loss.ConfidencePenaltyLoss(lambda_ood=0.3),
        "MarginConfidenceLoss": lambda: ok.loss.MarginConfidenceLoss(margin=0.4),
        "LogitNorm": lambda: ok.loss.LogitNorm(t=0.7),
    }


CLASSIFICATION_ONLY = {"LogitNorm"}
NONE_RAISES = {"BackgroundClassLoss", "LogitNorm"}


def _run(backend, monkeypatch, fn, inputs, grad_output=None):
    monkeypatch.setenv("OODKERNELS_BACKEND", backend)
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


def _compare(monkeypatch, fn, inputs, atol=None, rtol=None, grad_output=None, backend="cpp"):
    value, grads = _run(backend, monkeypatch, fn, inputs, grad_output)
    ref_value, ref_grads = _run("reference", monkeypatch, fn, inputs, grad_output)
    testing.assert_close(value, ref_value, atol=atol, rtol=rtol, name="value")
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        testing.assert_close(g, r, atol=atol, rtol=rtol, name=f"gradient {i}")
    return value


def _logits(shape, dtype=torch.float32, layout="contiguous", scale=3.0):
    return testing.make_logits(shape[0], shape[1], shape[2:], dtype=dtype, layout=layout, scale=scale)


def _targets(logit_shape, pattern, n_classes=C, name=None):
    shape = (logit_shape[0], *logit_shape[2:])
    if name == "BackgroundClassLoss":
        n_classes = n_classes - 1
    return testing.make_targets(shape, n_classes, pattern)


# (B, C) rows run the class-contiguous traversal; the rest the entry tiles. (1, C, 16, 16) holds a full
# 256-entry fp32 tile (in-place loads and stores; two full 128-entry fp64 tiles), (2, C, 8, 8) a tile across
# two images, (2, C, 3, 4) a partial one, (C, B).T a transposed tile.
LAYOUTS = [
    ((12, C), "contiguous"),
    ((12, C), "transposed"),
    ((12, C), "sliced"),
    ((2, C, 3, 4), "contiguous"),
    ((2, C, 8, 8), "contiguous"),
    ((1, C, 16, 16), "contiguous"),
    ((2, C, 3, 4), "channels_last"),
    ((2, C, 3, 4), "sliced"),
]


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood", "empty"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", None])
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(_criteria()))
def test_cpp_equals_reference(monkeypatch, name, shape, layout, reduction, pattern):
    if len(shape) == 4 and name in CLASSIFICATION_ONLY:
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


def test_cpp_n_c_l_and_transposed_segmentation(monkeypatch):
    """(N, C, L) and a (N, C, H, W) view with permuted spatial axes: the entry tiles through any strides."""
    ce = ok.loss.CrossEntropyLoss(reduction="none")
    logits = _logits((3, C, 40))
    targets = _targets(logits.shape, "mixed")
    _compare(monkeypatch, ce, [logits, targets], grad_output=torch.randn(3, 40))
    energy = ok.loss.EnergyRegularizedLoss(alpha=0.1, margin_in=-3.0, margin_out=-2.5)
    swapped = _logits((2, C, 6, 5)).transpose(2, 3)  # (2, C, 5, 6), w stride 6
    _compare(monkeypatch, energy, [swapped, _targets(swapped.shape, "mixed")])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(12, C), (2, C, 16, 16)], ids=str)
@pytest.mark.parametrize("name", list(_criteria()))
def test_cpp_dtypes(monkeypatch, name, shape, dtype):
    if len(shape) == 4 and name in CLASSIFICATION_ONLY:
        pytest.skip(f"{name} is classification only")
    logits = _logits(shape, dtype=dtype)
    targets = _targets(shape, "mixed", name=name)
    criterion = _criteria()[name]()
    value, grads = _run("cpp", monkeypatch, criterion, [logits, targets])
    ref_value, ref_grads = _run("reference", monkeypatch, criterion, [logits, targets])
    assert value.dtype == dtype and grads[0].dtype == dtype
    atol, rtol = testing.tolerances(dtype)
    if dtype in (torch.bfloat16, torch.float16):
        atol = max(atol, float(torch.finfo(dtype).eps) * float(ref_value.abs().max()))
    testing.assert_close(value, ref_value, atol=atol, rtol=rtol)
    testing.assert_close(grads[0], ref_grads[0], atol=atol, rtol=rtol)


@pytest.mark.parametrize("chunk", [1, 3, 8, None], ids=lambda c: f"chunk{c or '-default'}")
@pytest.mark.parametrize("shape", [(9, 37), (2, 37, 6, 5)], ids=str)
@pytest.mark.parametrize("name", ["EnergyRegularizedLoss", "OutlierExposureLoss", "LogitNorm", "MarginConfidenceLoss"])
def test_cpp_class_chunks_agree(monkeypatch, name, shape, chunk):
    """Class chunks of C = 37 merge online across chunks, in both traversals: forced small chunks, and the
    default ones (one chunk per row; two for the entry tiles, whose chunks hold 24 classes)."""
    if len(shape) == 4 and name in CLASSIFICATION_ONLY:
        pytest.skip(f"{name} is classification only")
    logits = _logits(shape)
    row = logits.movedim(1, -1).reshape(-1, 37)  # a view: entry r's classes
    row[2, 30] = row[2, 5] = 9.0  # a tie across chunks: the first index is the argmax
    row[3, 28] = 1e4  # a far larger maximum in the second default tile chunk: the first chunk's sums rescale to 0
    row[4, :] = float("-inf")  # -inf everywhere ...
    row[4, 33] = 1.0  # ... but in the last chunk
    targets = _targets(shape, "mixed", n_classes=37)
    criterion = _criteria(37)[name]()
    if chunk is None:
        _compare(monkeypatch, criterion, [logits, targets])
        return
    with row_ops.forced_blocks(1, chunk):
        _compare(monkeypatch, criterion, [logits, targets])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(12, C), (2, C, 16, 16)], ids=str)
@pytest.mark.parametrize("name", list(_criteria()))
def test_cpp_options_equal_reference(monkeypatch, name, shape, reduction):
    """weight, cost matrix (ω = cost[y, argmax]) and ignore_index, in both traversals."""
    if len(shape) == 4 and name in CLASSIFICATION_ONLY:
        pytest.skip(f"{name} is classification only")
    logits = _logits(shape)
    targets = _targets(shape, "mixed", name=name).clone()
    targets.view(-1)[::5] = 255
    weight = torch.rand(targets.shape) + 0.5
    cost = torch.rand(C, C) + 0.5
    base = _criteria()[name]()
    kwargs = {k: getattr(base, a) for k, a in _CTOR.get(name, {}).items()}
    criterion = type(base)(**kwargs, cost_matrix=cost, ignore_index=255)
    criterion.reduction = reduction
    go = None
    if reduction == "none":
        monkeypatch.setenv("OODKERNELS_BACKEND", "reference")
        go = torch.randn(criterion(logits, targets, weight).shape)
    _compare(monkeypatch, lambda x, y, w: criterion(x, y, w), [logits, targets, weight], grad_output=go)


_CTOR = {
    "BackgroundClassLoss": {"n_classes": "num_classes"},
    "OutlierExposureLoss": {"alpha": "alpha"},
    "EnergyRegularizedLoss": {"alpha": "alpha", "margin_in": "m_in", "margin_out": "m_out"},
    "ConfidencePenaltyLoss": {"lambda_ood": "lambda_ood"},
    "MarginConfidenceLoss": {"margin": "margin"},
    "LogitNorm": {"t": "t"},
}


@pytest.mark.parametrize("name", list(_criteria()))
def test_cpp_gradcheck_fp64(cpp, name):
    shape = (5, C) if name in CLASSIFICATION_ONLY else (1, C, 2, 3)
    logits = _logits(shape, dtype=torch.float64, scale=1.5).requires_grad_()
    targets = _targets(shape, "mixed", name=name)
    criterion = _criteria()[name]()
    criterion.reduction = "none" if name not in NONE_RAISES else "sum"
    with row_ops.forced_blocks(1, 3):
        assert torch.autograd.gradcheck(lambda x: criterion(x, targets), (logits,))


@pytest.mark.parametrize("n_classes", [1, 2])
@pytest.mark.parametrize("name", ["CrossEntropyLoss", "OutlierExposureLoss", "ConfidencePenaltyLoss", "LogitNorm"])
def test_cpp_one_and_two_classes(monkeypatch, name, n_classes):
    logits = _logits((8, n_classes))
    targets = testing.make_targets((8,), n_classes, "mixed")
    _compare(monkeypatch, _criteria(n_classes)[name](), [logits, targets])


@pytest.mark.parametrize("shape", [(8, C), (1, C, 8, 8)], ids=str)
@pytest.mark.parametrize("name", list(_criteria()))
def test_cpp_extreme_logits(monkeypatch, name, shape):
    """±1e4 and -inf in non-target columns: finite where the reference (in fp64) is finite."""
    if len(shape) == 4 and name in CLASSIFICATION_ONLY:
        pytest.skip(f"{name} is classification only")
    logits = _logits(shape, dtype=torch.float64)
    rows = logits.movedim(1, -1).reshape(-1, C)  # a view: entries in target order
    rows[0, 3] = 1e4
    rows[1, 2] = -1e4
    rows[2, 5] = float("-inf")
    rows[3, 0] = -1e4
    rows[5, 6] = float("-inf")
    flat = torch.tensor([3, 0, 1, 2, -1, -1, 4, 5] * (rows.shape[0] // 8))
    targets = flat.reshape((shape[0], *shape[2:]))
    criterion = _criteria()[name]()
    _compare(monkeypatch, criterion, [logits, targets])
    value, _ = _run("cpp", monkeypatch, criterion, [logits.float(), targets])
    exact, _ = _run("reference", monkeypatch, criterion, [logits, targets])
    testing.assert_close(value.double(), exact, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, C), (1, C, 2, 2)], ids=str)
def test_cpp_nan_and_all_inf_rows(cpp, shape):
    logits = _logits(shape)
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


def test_cpp_invalid_labels_give_nan_rows(cpp):
    from oodkernels import config

    config.data_checks = False  # the debug check would raise first
    logits = _logits((4, C))
    value = ok.functional.cross_entropy(logits, torch.tensor([0, C, 2, C + 5]), reduction="none")
    assert torch.isnan(value[[1, 3]]).all() and torch.isfinite(value[[0, 2]]).all()


def test_cpp_grad_output_not_last_layer(monkeypatch):
    logits = _logits((2, C, 8, 8))
    targets = _targets(logits.shape, "mixed")
    energy = ok.loss.EnergyRegularizedLoss(alpha=0.1, margin_in=-3.0, margin_out=-2.5)
    _compare(monkeypatch, lambda x, y: energy(x, y) * 3, [logits, targets])
    energy.reduction = "none"
    _compare(monkeypatch, energy, [logits, targets], grad_output=torch.randn(2, 8, 8))
    _compare(monkeypatch, lambda x, y: energy(x, y).sum(), [logits, targets])  # stride-0 grad_output


def test_cpp_retain_graph_inputs_not_mutated_deterministic(cpp):
    logits = _logits((2, C, 8, 8)).requires_grad_()
    targets = _targets(logits.shape, "mixed")
    before, targets_before = logits.detach().clone(), targets.clone()
    loss = ok.loss.OutlierExposureLoss()(logits, targets)
    go = torch.tensor(2.0)
    loss.backward(go, retain_graph=True)
    first = logits.grad.clone()
    logits.grad = None
    loss.backward(go)
    assert torch.equal(first, logits.grad)
    assert torch.equal(logits.detach(), before) and torch.equal(targets, targets_before) and go.item() == 2.0
    again = ok.loss.OutlierExposureLoss()(logits, targets)
    assert torch.equal(again, loss)


def test_cpp_upstream_tensor_is_not_overwritten(monkeypatch):
    raw = _logits((10, C))
    targets = _targets(raw.shape, "mixed")
    _compare(monkeypatch, lambda p, y: ok.loss.EntropicOpenSetLoss()(p.exp(), y), [raw, targets])


def test_cpp_double_backward_raises(cpp):
    logits = _logits((6, C), dtype=torch.float64).requires_grad_()
    targets = _targets(logits.shape, "mixed")
    (grad,) = torch.autograd.grad(ok.loss.OutlierExposureLoss()(logits, targets), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through the fused row kernels is not supported"):
        grad.sum().backward()


def test_cpp_is_used_and_reported(cpp, monkeypatch):
    """The cpp backend runs the C++ operators (never the Triton launchers) and backend_info says so."""

    def fail(*args, **kwargs):
        raise AssertionError("the Triton launcher ran on the cpp backend")

    monkeypatch.setattr(row_ops._launchers(), "row_loss_forward", fail)
    monkeypatch.setattr(row_ops._launchers(), "row_loss_backward", fail)
    monkeypatch.setattr(row_ops._launchers(), "row_scores", fail)
    logits = _logits((6, C)).requires_grad_()
    targets = _targets(logits.shape, "mixed", n_classes=C - 1)
    for make in _criteria().values():
        make()(logits, targets).backward()
    ok.scores.energy(logits.detach())
    info = ok.backend_info()
    assert info["operations"]["outlier_exposure_loss"]["cpu"] == "cpp"
    assert info["cpp"] == "available"
    monkeypatch.setenv("OODKERNELS_BACKEND", "auto")
    assert ok.backend_info()["operations"]["energy_score"]["cpu"] == "cpp"


# ----------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("score", ["energy", "max_softmax", "max_logit", "entropy"])
def test_cpp_scores_equal_reference(monkeypatch, score, shape, layout, dtype):
    logits = _logits(shape, dtype=dtype, layout=layout)
    kwargs = {"t": 1.7} if score in ("energy", "max_softmax") else {}
    fn = getattr(ok.scores, score)
    monkeypatch.setenv("OODKERNELS_BACKEND", "cpp")
    with row_ops.forced_blocks(1, 3):
        value = fn(logits, **kwargs)
    monkeypatch.setenv("OODKERNELS_BACKEND", "reference")
    expected = fn(logits, **kwargs)
    assert value.dtype == expected.dtype == dtype and value.shape == expected.shape
    atol, rtol = testing.tolerances(dtype)
    if dtype == torch.bfloat16:
        atol = max(atol, float(torch.finfo(dtype).eps) * float(expected.abs().max()))
    testing.assert_close(value, expected, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------
# against the Triton interpreter, registration, compile, bad input, build switches
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, C), (1, C, 2, 3)], ids=str)
@pytest.mark.parametrize("kind", range(6))
def test_cpp_ops_equal_triton_interpreter(monkeypatch, kind, shape):
    """The raw ops: row values, every statistic and the gradient of C++ == the Triton kernels."""
    if len(shape) == 4 and kind == 5:
        pytest.skip("LogitNorm is classification only")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    logits = _logits(shape, dtype=torch.float64)
    targets = _targets(shape, "mixed")
    cost = torch.rand(C, C, dtype=torch.float64) + 0.5
    args = (cost, kind, 0.3, -3.0, -2.5, None, 4, 4)
    out = {}
    for backend in ("cpp", "triton"):
        monkeypatch.setenv("OODKERNELS_BACKEND", backend)
        values, stats = torch.ops.oodkernels.row_loss_fwd(logits, targets, *args)
        go = torch.linspace(-1, 2, targets.numel(), dtype=torch.float64)
        grad = torch.ops.oodkernels.row_loss_bwd(go, logits, targets, cost, stats, *args[1:])
        out[backend] = (values, stats, grad)
    for got, want, what in zip(out["cpp"], out["triton"], ("values", "stats", "grad")):
        testing.assert_close(got, want, atol=1e-10, rtol=1e-8, name=what)


def test_opcheck_row_ops_on_cpp(cpp):
    from torch.library import opcheck

    logits = _logits((2, C, 3, 2)).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last
    nchw = _logits((2, C, 8, 4))
    for x in (logits, nchw):
        targets = _targets(x.shape, "mixed")
        for kind in range(6):
            args = (x.detach().requires_grad_(), targets, None, kind, 0.3, -3.0, -2.5, None, 0, 3)
            opcheck(torch.ops.oodkernels.row_loss_fwd.default, args)
            _, stats = torch.ops.oodkernels.row_loss_fwd(x.detach(), *args[1:])
            bwd_args = (torch.randn(targets.numel()), x.detach(), targets, None, stats, *args[3:])
            opcheck(torch.ops.oodkernels.row_loss_bwd.default, bwd_args)
    targets = _targets(logits.shape, "mixed")
    cost = torch.rand(C, C)
    opcheck(torch.ops.oodkernels.row_loss_fwd.default, (logits, targets, cost, 2, 0.1, -3.0, -2.5, 255, 0, 0))
    for which in range(4):
        opcheck(torch.ops.oodkernels.row_scores.default, (logits, which, 1.5, 0, 0))
    opcheck(torch.ops.oodkernels.row_scores.default, (logits[:0], 0, 1.0, 0, 0))


@pytest.mark.parametrize("name", ["EnergyRegularizedLoss", "LogitNorm", "BackgroundClassLoss"])
def test_cpp_compile_fullgraph(cpp, compile_reset, name):
    from oodkernels import config

    config.data_checks = False
    logits = _logits((10, C) if name in CLASSIFICATION_ONLY else (2, C, 8, 4))
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


def test_cpp_unknown_kind_raises(cpp):
    logits = _logits((4, C))
    targets = _targets(logits.shape, "mixed")
    with pytest.raises(RuntimeError, match="row kind 99 is not implemented by the C\\+\\+ backend"):
        torch.ops.oodkernels.row_loss_fwd(logits, targets, None, 99, 0.1, 0.0, 0.0, None, 0, 0)
    stats = torch.zeros(5, 4)
    with pytest.raises(RuntimeError, match="row kind 99 is not implemented"):
        torch.ops.oodkernels.row_loss_bwd(torch.ones(4), logits, targets, None, stats, 99, 0.1, 0.0, 0.0, None, 0, 0)
    with pytest.raises(RuntimeError, match="score kind 7 is not implemented"):
        torch.ops.oodkernels.row_scores(logits, 7, 1.0, 0, 0)


def test_cpp_int32_targets_read_like_int64(monkeypatch):
    logits = _logits((2, C, 8, 4))
    targets = _targets(logits.shape, "mixed")
    monkeypatch.setenv("OODKERNELS_BACKEND", "cpp")
    a = torch.ops.oodkernels.row_loss_fwd(logits, targets, None, 2, 0.1, -3.0, -2.5, None, 0, 0)
    b = torch.ops.oodkernels.row_loss_fwd(logits, targets.int(), None, 2, 0.1, -3.0, -2.5, None, 0, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_compile_flags_vectorise_where_the_cpu_can():
    assert "-DCPU_CAPABILITY_AVX2" in _cpp.compile_flags("AVX2")
    avx512 = _cpp.compile_flags("AVX512")
    assert "-DCPU_CAPABILITY_AVX512" in avx512 and "-mavx512f" in avx512 and "-DCPU_CAPABILITY_AVX2" not in avx512
    default = _cpp.compile_flags("DEFAULT")
    assert "-O3" in default and not any("CPU_CAPABILITY" in f or f.startswith("-m") for f in default)


def test_required_turns_a_failed_build_into_an_error(monkeypatch, tmp_path):
    """OODKERNELS_REQUIRE_CPP=1 (CI) makes an unbuildable extension an error, not a silent fallback."""
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(_cpp, "_SOURCES_DIR", str(tmp_path))
    monkeypatch.setattr(_cpp, "JIT_NAME", "oodkernels_cpu_test_broken")
    monkeypatch.setattr(_cpp, "_state", {"tried": False, "loaded": False, "reason": "not requested yet"})
    monkeypatch.setattr(_cpp, "_aot_library", lambda: None)
    monkeypatch.setenv("OODKERNELS_REQUIRE_CPP", "1")
    with pytest.raises(RuntimeError, match="OODKERNELS_REQUIRE_CPP=1 but the C\\+\\+ CPU extension could not be built"):
        _cpp.available()
    monkeypatch.delenv("OODKERNELS_REQUIRE_CPP")
    monkeypatch.setattr(_cpp, "_state", {"tried": False, "loaded": False, "reason": "not requested yet"})
    with pytest.warns(RuntimeWarning, match="the C\\+\\+ CPU extension could not be built: "):
        assert _cpp.available() is False
    assert "JIT build failed" in _cpp.status()


# the clamped entropy's vectorised second pass: full and partial vectors (C = 16 a multiple of every vector
# width, C = 19 of none), full and partial tiles, confident rows (the clamp active at both ends), NaN, ±inf
# entries and a temperature (the raw op's t, which the public score leaves at 1)
def _entropy_inputs(shape, dtype, layout):
    n_rows = shape[0] * math.prod(shape[2:])
    rows = testing.make_logits(n_rows, shape[1], (), dtype=torch.float64, scale=3.0)  # entry r's classes
    rows[0] *= 40.0  # confident: q_max clamps to 1, the rest to 1e-7
    rows[1, 3] = float("nan")
    rows[2, 5] = float("-inf")
    rows[3, 1] = float("inf")
    rows[4, :-1] = float("-inf")  # one-hot softmax: every other q clamps to 1e-7
    x = rows.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1).contiguous().to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.t().contiguous().t()
    return x


@pytest.mark.parametrize("t", [1.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((9, 16), "contiguous"),
        ((9, 19), "contiguous"),
        ((9, 19), "transposed"),
        ((2, 19, 3, 7), "contiguous"),
        ((1, 16, 16, 16), "contiguous"),
        ((2, 19, 3, 7), "channels_last"),
    ],
    ids=str,
)
def test_cpp_clamped_entropy_vector_passes(cpp, shape, layout, dtype, t):
    logits = _entropy_inputs(shape, dtype, layout)
    value = torch.ops.oodkernels.row_scores(logits, 3, t, 0, 0)
    v = logits.to(torch.float64).movedim(1, -1).reshape(-1, shape[1]) / t
    q = torch.softmax(v, dim=-1).clamp(1e-7, 1.0)
    expected = -(q * q.log()).sum(-1)
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isnan(value[1]) and torch.isnan(value[3]) and torch.isfinite(value[0])
    # the confident rows: 1·ln 1 + (C − 1)·1e-7·(−ln 1e-7) exactly where the clamp acts on every lane
    assert abs(float(value[4]) - (shape[1] - 1) * 1e-7 * -math.log(1e-7)) < 1e-9
    atol, rtol = testing.tolerances(value.dtype)
    testing.assert_close(value, expected.to(value.dtype), atol=atol, rtol=rtol)
