"""oodkernels.paired: the paired-batch losses (fused vs reference vs hand-computed formulas) and the
batch-mixing utilities (seeded, shapes, exact mixing)."""

import math

import pytest
import torch

import oodkernels as ok
from oodkernels import paired
from oodkernels import testing
from oodkernels.ops import row_ops

C = 6
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _use(backend, monkeypatch):
    monkeypatch.setenv("OODKERNELS_BACKEND", backend)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(shape_in=(8, C), shape_out=(5, C), dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    logits_in = (torch.randn(shape_in, generator=g) * 3).to(dtype)
    logits_out = (torch.randn(shape_out, generator=g) * 3).to(dtype)
    targets_in = torch.randint(0, C, (shape_in[0], *shape_in[2:]), generator=g)
    return logits_in.to(DEVICE), targets_in.to(DEVICE), logits_out.to(DEVICE)


def _value_and_grads(backend, monkeypatch, fn, logits_in, targets_in, logits_out):
    _use(backend, monkeypatch)
    a = logits_in.detach().clone().requires_grad_()
    b = logits_out.detach().clone().requires_grad_()
    value = fn(a, targets_in, b)
    value.backward()
    return value.detach(), a.grad, b.grad


def _hand_oe(x_in, y, x_out, lam):
    x_in, x_out = x_in.double(), x_out.double()
    ce = (torch.logsumexp(x_in, 1) - x_in.gather(1, y[:, None]).squeeze(1)).mean()
    return ce + lam * (torch.logsumexp(x_out, 1) - x_out.mean(1)).mean()


def _hand_em(x_in, y, x_out, lam, margin):
    x_in, x_out = x_in.double(), x_out.double()
    ce = (torch.logsumexp(x_in, 1) - x_in.gather(1, y[:, None]).squeeze(1)).mean()
    gap = -torch.logsumexp(x_in, 1).mean() + torch.logsumexp(x_out, 1).mean() + margin
    return ce + lam * torch.relu(gap)


@pytest.mark.parametrize("margin", [10.0, -1.0])  # active and inactive hinge
def test_paired_formulas(monkeypatch, margin):
    x_in, y, x_out = _inputs()
    for backend in ("triton", "reference"):
        _use(backend, monkeypatch)
        oe = paired.outlier_exposure(x_in, y, x_out, 0.4)
        testing.assert_close(oe.double(), _hand_oe(x_in, y, x_out, 0.4), atol=1e-5, rtol=1e-5)
        em = paired.energy_margin(x_in, y, x_out, 0.2, margin)
        testing.assert_close(em.double(), _hand_em(x_in, y, x_out, 0.2, margin), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shape_in,shape_out", [((8, C), (5, C)), ((2, C, 2, 3), (1, C, 3, 2)), ((8, C), (0, C)), ((0, C), (4, C))], ids=str
)
@pytest.mark.parametrize("loss", ["outlier_exposure", "energy_margin"])
def test_paired_fused_equals_reference(monkeypatch, loss, shape_in, shape_out):
    x_in, y, x_out = _inputs(shape_in, shape_out)
    y.view(-1)[::3] = -1  # left out of the ID means
    fn = getattr(paired, loss)
    with row_ops.forced_blocks(4, 4):
        fused = _value_and_grads("triton", monkeypatch, fn, x_in, y, x_out)
    ref = _value_and_grads("reference", monkeypatch, fn, x_in, y, x_out)
    for a, b in zip(fused, ref):
        testing.assert_close(a, b)
    assert torch.isfinite(fused[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_paired_dtypes(monkeypatch, dtype):
    x_in, y, x_out = _inputs(dtype=dtype)
    for loss in (paired.outlier_exposure, paired.energy_margin):
        fused = _value_and_grads("triton", monkeypatch, loss, x_in, y, x_out)
        ref = _value_and_grads("reference", monkeypatch, loss, x_in, y, x_out)
        atol, rtol = testing.tolerances(dtype)
        assert fused[0].dtype == dtype and fused[1].dtype == dtype
        for a, b in zip(fused, ref):
            testing.assert_close(a, b, atol=max(atol, 0.02 if dtype == torch.bfloat16 else 0), rtol=rtol)


def test_paired_gradcheck_fp64(monkeypatch):
    _use("triton", monkeypatch)
    x_in, y, x_out = _inputs((5, C), (3, C), dtype=torch.float64)
    x_in.requires_grad_()
    x_out.requires_grad_()
    with row_ops.forced_blocks(4, 2):
        assert torch.autograd.gradcheck(
            lambda a, b: paired.energy_margin(a, y, b, 0.3, 10.0), (x_in, x_out), fast_mode=True
        )
        assert torch.autograd.gradcheck(lambda a, b: paired.outlier_exposure(a, y, b), (x_in, x_out), fast_mode=True)


def test_paired_compile_fullgraph(monkeypatch, compile_reset):
    _use("triton", monkeypatch)
    x_in, y, x_out = _inputs()
    eager = paired.energy_margin(x_in, y, x_out)
    compiled = torch.compile(paired.energy_margin, fullgraph=True, backend="aot_eager")(x_in, y, x_out)
    testing.assert_close(compiled, eager)


def test_paired_bad_inputs():
    x_in, y, x_out = _inputs()
    with pytest.raises(ValueError, match="logits_out"):
        paired.outlier_exposure(x_in, y, x_out[:, :3])
    with pytest.raises(ValueError, match="targets_in"):
        paired.energy_margin(x_in, y[:3], x_out)
    with pytest.raises(TypeError, match="targets_in"):
        paired.energy_margin(x_in, y.float(), x_out)
    with pytest.raises(TypeError, match="logits_out"):
        paired.energy_margin(x_in, y, x_out.long())


# ----------------------------------------------------------------------------------------------
# mixup / CutMix
# ----------------------------------------------------------------------------------------------


def test_mixup_is_seeded_and_exact():
    x = torch.randn(6, 3, 4)
    y = torch.arange(6)
    a = paired.mixup_data(x, y, alpha=0.4, generator=torch.Generator().manual_seed(7))
    b = paired.mixup_data(x, y, alpha=0.4, generator=torch.Generator().manual_seed(7))
    mixed, y_a, y_b, lam = a
    assert torch.equal(mixed, b[0]) and lam == b[3] and 0.0 < lam < 1.0
    assert torch.equal(y_a, y) and sorted(y_b.tolist()) == y.tolist()
    testing.assert_close(mixed, lam * x + (1 - lam) * x[y_b])  # y_b = y[π] = π here
    assert paired.mixup_data(x, y, alpha=0.0)[3] == 1.0


def test_beta_sampler_moments():
    g = torch.Generator().manual_seed(0)
    for alpha in (0.4, 2.0):
        draws = torch.tensor([paired.sample_beta(alpha, g) for _ in range(2000)], dtype=torch.float64)
        var = 1.0 / (4 * (2 * alpha + 1))  # Beta(α, α): mean 1/2
        assert abs(draws.mean().item() - 0.5) < 4 * math.sqrt(var / 2000)
        assert abs(draws.var().item() - var) < 0.2 * var


def test_mixup_criterion():
    pred = torch.randn(4, C)
    y_a, y_b = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])
    ce = torch.nn.functional.cross_entropy
    expected = 0.3 * ce(pred, y_a) + 0.7 * ce(pred, y_b)
    testing.assert_close(paired.mixup_criterion(ce, pred, y_a, y_b, 0.3), expected)


def test_cutmix_box_and_lambda():
    x = torch.arange(2 * 1 * 8 * 10, dtype=torch.float32).reshape(2, 1, 8, 10)
    y = torch.tensor([0, 1])
    before = x.clone()
    cut = paired.CutMix(alpha=1.0, generator=torch.Generator().manual_seed(3))
    mixed, y_a, y_b, lam = cut(x, y)
    assert torch.equal(x, before)  # not modified
    changed = (mixed != x).any(1)  # (B, H, W): the pasted box (B = 2: π swaps or keeps)
    if not torch.equal(y_b, y):
        kept = 1.0 - changed[0].float().mean().item()
        assert abs(kept - lam) < 1e-6
    again = paired.CutMix(alpha=1.0, generator=torch.Generator().manual_seed(3))(x, y)
    assert torch.equal(again[0], mixed) and again[3] == lam
    with pytest.raises(ValueError, match="x: expected images"):
        cut(torch.randn(2, 3), y)
    with pytest.raises(ValueError, match="y: expected"):
        cut(x, torch.tensor([0]))


def test_paired_is_exported():
    assert ok.paired is paired
    assert "paired" in ok.__all__
