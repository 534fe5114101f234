"""Contract tests of the post-hoc scores (LOSS_CONTRACT.md §4, fix g, §8.2, §8.4)."""

import math

import pytest
import torch

from oodkernels import config
from oodkernels.reference import scores

B, C = 8, 3
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
WEIGHTS = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# hand formulas on one row of Python floats
# ----------------------------------------------------------------------------------------------


def h_energy(row, t=1.0):
    return -t * math.log(sum(math.exp(v / t) for v in row))


def h_max_softmax(row, t=1.0):
    exps = [math.exp(v / t) for v in row]
    return -max(exps) / sum(exps)


def h_max_logit(row):
    return -max(row)


def h_entropy(row):
    exps = [math.exp(v) for v in row]
    ps = [min(max(e / sum(exps), 1e-7), 1.0) for e in exps]
    return -sum(p * math.log(p) for p in ps)


def h_weighted_energy(row):
    w = WEIGHTS.tolist()
    return -math.log(sum(max(wc, 0.0) * math.exp(v) for wc, v in zip(w, row)))


CASES = {
    "energy": (lambda f: scores.energy(f), h_energy),
    "energy_t": (lambda f: scores.energy(f, t=2.5), lambda r: h_energy(r, 2.5)),
    "max_softmax": (lambda f: scores.max_softmax(f), h_max_softmax),
    "max_softmax_t": (lambda f: scores.max_softmax(f, t=0.5), lambda r: h_max_softmax(r, 0.5)),
    "max_logit": (scores.max_logit, h_max_logit),
    "entropy": (scores.entropy, h_entropy),
    "weighted_energy": (lambda f: scores.weighted_energy(f, WEIGHTS), h_weighted_energy),
}


def hand_rows(hand, logits):
    return torch.tensor([hand(r) for r in logits.tolist()], dtype=torch.float64)


@pytest.mark.parametrize("name", list(CASES))
def test_values_2d(name):
    fn, hand = CASES[name]
    logits = torch.randn(B, C, dtype=torch.float64) * 3
    logits[0] = torch.tensor([20.0, -20.0, 0.0], dtype=torch.float64)  # entropy clamp active
    out = fn(logits)
    assert out.shape == (B,) and out.dtype == torch.float64
    torch.testing.assert_close(out, hand_rows(hand, logits), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_4d_equals_flattened_pixels(name):
    fn, hand = CASES[name]
    logits = torch.randn(2, C, 4, 5, dtype=torch.float64) * 2
    out = fn(logits)
    assert out.shape == (2, 4, 5)
    flat = logits.movedim(1, -1).reshape(-1, C)
    torch.testing.assert_close(out.reshape(-1), fn(flat), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.reshape(-1), hand_rows(hand, flat), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["energy", "max_softmax", "max_logit", "entropy"])
def test_3d_classes_on_dim_1(name):
    fn, hand = CASES[name]
    logits = torch.randn(2, C, 6, dtype=torch.float64)
    out = fn(logits)
    assert out.shape == (2, 6)
    torch.testing.assert_close(out.reshape(-1), hand_rows(hand, logits.movedim(1, -1).reshape(-1, C)))


def test_pinned_g1_weighted_energy_no_overflow():
    logits = torch.tensor([[1000.0, 0.0], [1000.0, 1000.0]])
    out = scores.weighted_energy(logits, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([-1000.0, -1000.6931472]), rtol=1e-7, atol=1e-4)
    assert torch.isfinite(out).all()


def test_weighted_energy_weight_shapes_and_all_nonpositive():
    logits = torch.randn(B, C, dtype=torch.float64)
    a = scores.weighted_energy(logits, WEIGHTS)
    b = scores.weighted_energy(logits, WEIGHTS.reshape(1, C))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    inf = scores.weighted_energy(logits, torch.tensor([0.0, -1.0, -0.5]))
    assert torch.equal(inf, torch.full((B,), math.inf, dtype=torch.float64))


def test_weighted_energy_bad_inputs():
    with pytest.raises(ValueError, match=r"^Unsupported input shape: torch\.Size\(\[2, 3, 4\]\)$"):
        scores.weighted_energy(torch.randn(2, C, 4), WEIGHTS)
    with pytest.raises(ValueError, match=r"^Unsupported input shape: torch\.Size\(\[3\]\)$"):
        scores.weighted_energy(torch.randn(C), WEIGHTS)
    for bad in (torch.ones(C + 1), torch.ones(C, 1), torch.ones(2, C)):
        with pytest.raises(ValueError, match="weights"):
            scores.weighted_energy(torch.randn(B, C), bad)
    with pytest.raises(TypeError, match="weights"):
        scores.weighted_energy(torch.randn(B, C), torch.ones(C, dtype=torch.long))


@pytest.mark.parametrize("name", ["energy", "max_softmax", "max_logit", "entropy"])
def test_bad_inputs(name):
    fn = CASES[name][0]
    with pytest.raises(ValueError, match="logits"):
        fn(torch.randn(C))
    with pytest.raises(TypeError, match="logits"):
        fn(torch.ones(B, C, dtype=torch.long))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(name, dtype):
    fn = CASES[name][0]
    logits = (torch.randn(B, C) * 3).to(dtype).requires_grad_(True)
    out = fn(logits)
    assert out.dtype == dtype
    ref = fn(logits.detach().double())
    torch.testing.assert_close(out.double(), ref, rtol=DTYPE_RTOL[dtype], atol=1e-6)
    out.sum().backward()
    assert logits.grad.dtype == dtype


def test_weighted_energy_weight_dtype_does_not_change_output():
    logits = torch.randn(B, C).bfloat16()
    assert scores.weighted_energy(logits, WEIGHTS).dtype == torch.bfloat16
    assert scores.weighted_energy(logits.float(), WEIGHTS.half()).dtype == torch.float32


@pytest.mark.parametrize("name", list(CASES))
def test_gradients(name):
    fn, _ = CASES[name]
    logits = (torch.randn(5, C, dtype=torch.float64) * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (logits,))


def test_gradients_vs_hand_formula():
    logits = (torch.randn(B, C, dtype=torch.float64) * 2).requires_grad_(True)
    w = WEIGHTS.clamp(min=0)
    # independent: autograd of the textbook forms
    hand = (
        -torch.log(torch.exp(logits).sum(1))
        - (torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)).max(1).values
        - torch.log((w * torch.exp(logits)).sum(1))
    ).sum()
    (g_hand,) = torch.autograd.grad(hand, logits)
    ours = (scores.energy(logits) + scores.max_softmax(logits) + scores.weighted_energy(logits, WEIGHTS)).sum()
    (g,) = torch.autograd.grad(ours, logits)
    torch.testing.assert_close(g, g_hand, rtol=1e-10, atol=1e-12)


def test_weights_gradient():
    logits = torch.randn(B, C, dtype=torch.float64)
    w = torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: scores.weighted_energy(logits, v), (w,))


@pytest.mark.parametrize("name", list(CASES))
def test_grad_mode_left_alone(name):
    fn = CASES[name][0]
    logits = torch.randn(B, C, requires_grad=True)
    assert fn(logits).requires_grad
    with torch.no_grad():
        assert not fn(logits).requires_grad
    assert torch.is_grad_enabled()


def test_compile_fullgraph(compile_reset):
    config.data_checks = False
    logits = torch.randn(2, C, 4, 4)

    def all_scores(f):
        return (
            scores.energy(f, t=2.0)
            + scores.max_softmax(f)
            + scores.max_logit(f)
            + scores.entropy(f)
            + scores.weighted_energy(f, WEIGHTS.float())
        )

    compiled = torch.compile(all_scores, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits), all_scores(logits))
