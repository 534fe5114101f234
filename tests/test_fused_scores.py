"""The fused scores added by issue #5: weighted energy (max-subtracted), exact entropy, the ``dtype=``
option; (B, C) and (N, C, H, W) read in place; forward-only kernels vs the reference."""

import pytest
import torch

import oodkernels as ok
from oodkernels import testing
from oodkernels.ops import row_ops

C = 7
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv("OODKERNELS_BACKEND", "triton")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _both(monkeypatch, fn, *args, **kwargs):
    monkeypatch.setenv("OODKERNELS_BACKEND", "triton")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with row_ops.forced_blocks(4, 4):
        value = fn(*args, **kwargs)
    monkeypatch.setenv("OODKERNELS_BACKEND", "reference")
    return value, fn(*args, **kwargs)


LAYOUTS = [
    ((12, C), "contiguous"),
    ((12, C), "transposed"),
    ((2, C, 3, 4), "contiguous"),
    ((2, C, 3, 4), "channels_last"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("score", ["weighted_energy", "entropy_exact"])
def test_new_scores_equal_reference(monkeypatch, score, shape, layout, dtype):
    logits = testing.make_logits(shape[0], shape[1], shape[2:], dtype=dtype, layout=layout, device=DEVICE)
    if score == "weighted_energy":
        w = torch.rand(1, C, device=DEVICE) - 0.2
        value, expected = _both(monkeypatch, ok.scores.weighted_energy, logits, w)
    else:
        value, expected = _both(monkeypatch, ok.scores.entropy, logits, clip=False)
    assert value.dtype == expected.dtype == dtype and value.shape == expected.shape == (shape[0], *shape[2:])
    atol, rtol = testing.tolerances(dtype)
    if dtype == torch.bfloat16:
        atol = max(atol, float(torch.finfo(dtype).eps) * float(expected.abs().max()))
    testing.assert_close(value, expected, atol=atol, rtol=rtol)


def test_exact_entropy_differs_from_the_clipped_one(fused):
    logits = torch.tensor([[30.0, 0.0, 0.0, 0.0]], device=DEVICE)  # p ≈ 1e-13 for three classes
    exact = ok.scores.entropy(logits, clip=False)
    p = torch.softmax(logits.double(), 1)
    testing.assert_close(exact.double(), -(p * p.log()).sum(1), atol=1e-9, rtol=1e-4)
    assert ok.scores.entropy(logits) > 3e-6 > exact  # the clamp adds 3·1e-7·ln(1e7)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # numpy runs the interpreter
def test_weighted_energy_pinned_g1(fused):
    """LOSS_CONTRACT §8.5 g1: max subtraction, no overflow; all weights <= 0 gives +inf."""
    logits = torch.tensor([[1000.0, 0.0], [1000.0, 1000.0]], device=DEVICE)
    value = ok.scores.weighted_energy(logits, torch.ones(2, device=DEVICE))
    testing.assert_close(value.double(), torch.tensor([-1000.0, -1000.6931472], dtype=torch.float64), atol=1e-4)
    assert torch.isinf(ok.scores.weighted_energy(logits, -torch.ones(2, device=DEVICE))).all()


@pytest.mark.parametrize("score", ["energy", "max_softmax", "max_logit", "entropy", "weighted_energy"])
def test_scores_fp32_output_on_request(monkeypatch, score):
    logits = testing.make_logits(2, C, (3, 4), dtype=torch.bfloat16, device=DEVICE)
    args = (torch.rand(C, device=DEVICE),) if score == "weighted_energy" else ()
    fn = getattr(ok.scores, score)
    value, expected = _both(monkeypatch, fn, logits, *args, dtype=torch.float32)
    assert value.dtype == expected.dtype == torch.float32
    testing.assert_close(value, expected)  # fp32 tolerance: nothing was rounded to bf16
    with pytest.raises(TypeError, match="dtype"):
        fn(logits, *args, dtype=torch.int32)


def test_weighted_energy_bad_inputs(fused):
    logits = torch.randn(4, C, device=DEVICE)
    with pytest.raises(ValueError, match="weights: expected shape"):
        ok.scores.weighted_energy(logits, torch.ones(C + 1, device=DEVICE))
    with pytest.raises(ValueError, match="Unsupported input shape"):
        ok.scores.weighted_energy(torch.randn(2, C, 3, device=DEVICE), torch.ones(C, device=DEVICE))
    with pytest.raises(TypeError, match="weights"):
        ok.scores.weighted_energy(logits, torch.ones(C, dtype=torch.long, device=DEVICE))


def test_weighted_energy_with_grad_runs_the_reference(fused):
    logits = torch.randn(5, C, device=DEVICE, requires_grad=True)
    w = torch.rand(C, device=DEVICE, requires_grad=True)
    ok.scores.weighted_energy(logits, w).sum().backward()
    assert logits.grad is not None and w.grad is not None


def test_opcheck_new_scores(fused):
    from torch.library import opcheck

    logits = testing.make_logits(2, C, (3, 2), layout="channels_last", device=DEVICE)
    w = torch.rand(C, device=DEVICE)
    opcheck(torch.ops.oodkernels.row_scores.default, (logits, 4, 1.0, 4, 4, w))
    opcheck(torch.ops.oodkernels.row_scores.default, (logits, 5, 1.0, 0, 0))
    opcheck(torch.ops.oodkernels.row_scores.default, (logits[:0], 4, 1.0, 0, 0, w))


def test_scores_compile_fullgraph(fused, compile_reset):
    logits = testing.make_logits(2, C, (3, 4), device=DEVICE)
    w = torch.rand(C, device=DEVICE)

    def both(x):
        return ok.scores.weighted_energy(x, w) + ok.scores.entropy(x, clip=False)

    testing.assert_close(torch.compile(both, fullgraph=True, backend="aot_eager")(logits), both(logits))
