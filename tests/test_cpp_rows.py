"""C++-only tests of the row family on the CPU backend (csrc/rows.cpp); the bodies shared with the Triton kernels
(every criterion and score against the reference over layouts, reductions, label patterns, dtypes and options;
gradcheck, opcheck, compile, the autograd edge cases, extreme logits and NaN) run on both backends in
tests/test_fused_rows.py.

Here: (N, C, L) and transposed segmentation logits through the entry tiles; forced small class chunks (the
online merge across chunks); labels out of range; that no Triton launcher runs on the cpp backend; the raw ops
against the Triton interpreter; bad kinds; int32 targets; the clamped entropy's vectorised passes; the build
switches. Skipped when the extension cannot be built, unless ``OODKERNELS_REQUIRE_CPP=1`` (CI), where the first
test that asks for it fails instead.
"""

import math

import pytest
import torch
from _backends import requires_cpp
from _backends import use_backend
from _rows import SEGMENTATION
from _rows import C
from _rows import compare
from _rows import criteria
from _rows import rand_logits
from _rows import rand_targets

import oodkernels as ok
from oodkernels import _cpp
from oodkernels import testing
from oodkernels.ops import row_ops

pytestmark = [pytest.mark.filterwarnings("ignore:Discarding samples"), requires_cpp]


@pytest.fixture
def cpp(monkeypatch):
    use_backend(monkeypatch, "cpp")


def _compare(monkeypatch, fn, inputs, atol=None, rtol=None, grad_output=None):
    return compare("cpp", monkeypatch, fn, inputs, atol, rtol, grad_output)


def test_cpp_n_c_l_and_transposed_segmentation(monkeypatch):
    """(N, C, L) and a (N, C, H, W) view with permuted spatial axes: the entry tiles through any strides."""
    ce = ok.loss.CrossEntropyLoss(reduction="none")
    logits = rand_logits((3, C, 40))
    targets = rand_targets(logits.shape, "mixed")
    _compare(monkeypatch, ce, [logits, targets], grad_output=torch.randn(3, 40))
    energy = ok.loss.EnergyRegularizedLoss(alpha=0.1, margin_in=-3.0, margin_out=-2.5)
    swapped = rand_logits((2, C, 6, 5)).transpose(2, 3)  # (2, C, 5, 6), w stride 6
    _compare(monkeypatch, energy, [swapped, rand_targets(swapped.shape, "mixed")])


@pytest.mark.parametrize("chunk", [1, 3, 8, None], ids=lambda c: f"chunk{c or '-default'}")
@pytest.mark.parametrize("shape", [(9, 37), (2, 37, 6, 5)], ids=str)
@pytest.mark.parametrize("name", ["EnergyRegularizedLoss", "OutlierExposureLoss", "LogitNorm", "MarginConfidenceLoss"])
def test_cpp_class_chunks_agree(monkeypatch, name, shape, chunk):
    """Class chunks of C = 37 merge online across chunks, in both traversals: forced small chunks, and the
    default ones (one chunk per row; two for the entry tiles, whose chunks hold 24 classes)."""
    if len(shape) == 4 and name not in SEGMENTATION:
        pytest.skip(f"{name} is classification only")
    logits = rand_logits(shape)
    row = logits.movedim(1, -1).reshape(-1, 37)  # a view: entry r's classes
    row[2, 30] = row[2, 5] = 9.0  # a tie across chunks: the first index is the argmax
    row[3, 28] = 1e4  # a far larger maximum in the second default tile chunk: the first chunk's sums rescale to 0
    row[4, :] = float("-inf")  # -inf everywhere ...
    row[4, 33] = 1.0  # ... but in the last chunk
    targets = rand_targets(shape, "mixed", n_classes=37)
    criterion = criteria(37)[name]()
    if chunk is None:
        _compare(monkeypatch, criterion, [logits, targets])
        return
    with row_ops.forced_blocks(1, chunk):
        _compare(monkeypatch, criterion, [logits, targets])


def test_cpp_invalid_labels_give_nan_rows(cpp):
    from oodkernels import config

    config.data_checks = False  # the debug check would raise first
    logits = rand_logits((4, C))
    value = ok.functional.cross_entropy(logits, torch.tensor([0, C, 2, C + 5]), reduction="none")
    assert torch.isnan(value[[1, 3]]).all() and torch.isfinite(value[[0, 2]]).all()


def test_cpp_is_used_and_reported(cpp, monkeypatch):
    """The cpp backend runs the C++ operators (never the Triton launchers) and backend_info says so."""

    def fail(*args, **kwargs):
        raise AssertionError("the Triton launcher ran on the cpp backend")

    monkeypatch.setattr(row_ops._launchers(), "row_loss_forward", fail)
    monkeypatch.setattr(row_ops._launchers(), "row_loss_backward", fail)
    monkeypatch.setattr(row_ops._launchers(), "row_scores", fail)
    logits = rand_logits((6, C)).requires_grad_()
    targets = rand_targets(logits.shape, "mixed", n_classes=C - 1)
    for make in criteria().values():
        make()(logits, targets).backward()
    ok.scores.energy(logits.detach())
    info = ok.backend_info()
    assert info["operations"]["outlier_exposure_loss"]["cpu"] == "cpp"
    assert info["cpp"] == "available"
    monkeypatch.setenv("OODKERNELS_BACKEND", "auto")
    assert ok.backend_info()["operations"]["energy_score"]["cpu"] == "cpp"


# ----------------------------------------------------------------------------------------------
# against the Triton interpreter, bad input, build switches
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, C), (1, C, 2, 3)], ids=str)
@pytest.mark.parametrize("kind", range(6))
def test_cpp_ops_equal_triton_interpreter(monkeypatch, kind, shape):
    """The raw ops: row values, every statistic and the gradient of C++ == the Triton kernels."""
    if len(shape) == 4 and kind == 5:
        pytest.skip("LogitNorm is classification only")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    logits = rand_logits(shape, dtype=torch.float64)
    targets = rand_targets(shape, "mixed")
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


def test_cpp_unknown_kind_raises(cpp):
    logits = rand_logits((4, C))
    targets = rand_targets(logits.shape, "mixed")
    with pytest.raises(RuntimeError, match="row kind 99 is not implemented by the C\\+\\+ backend"):
        torch.ops.oodkernels.row_loss_fwd(logits, targets, None, 99, 0.1, 0.0, 0.0, None, 0, 0)
    stats = torch.zeros(5, 4)
    with pytest.raises(RuntimeError, match="row kind 99 is not implemented"):
        torch.ops.oodkernels.row_loss_bwd(torch.ones(4), logits, targets, None, stats, 99, 0.1, 0.0, 0.0, None, 0, 0)
    with pytest.raises(RuntimeError, match="score kind 7 is not implemented"):
        torch.ops.oodkernels.row_scores(logits, 7, 1.0, 0, 0)


def test_cpp_int32_targets_read_like_int64(monkeypatch):
    logits = rand_logits((2, C, 8, 4))
    targets = rand_targets(logits.shape, "mixed")
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
