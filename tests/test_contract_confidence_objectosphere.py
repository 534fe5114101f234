"""Contract tests of ConfidenceLoss and ObjectosphereLoss (LOSS_CONTRACT.md §3.8, §3.9, §8)."""

import contextlib
import math
import warnings

import pytest
import torch

from oodkernels import config
from oodkernels.reference._common import DROP_UNKNOWN_MESSAGE
from oodkernels.reference._common import Representation
from oodkernels.reference._common import Task
from oodkernels.reference.confidence import ConfidenceLoss
from oodkernels.reference.confidence import confidence_loss
from oodkernels.reference.objectosphere import ObjectosphereLoss
from oodkernels.reference.objectosphere import objectosphere_loss

B, C, D = 8, 3, 5
LABELS = {
    "mixed": torch.tensor([-1, 0, 1, 2, -1, 0, 1, 2]),
    "all_id": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
    "all_ood": torch.tensor([-1, -2, -1, -3, -1, -1, -2, -1]),
    "empty": torch.zeros(0, dtype=torch.long),
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


@contextlib.contextmanager
def no_warnings():
    """Turn every warning into an error inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def lse(row):
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


# ----------------------------------------------------------------------------------------------
# ConfidenceLoss: hand formula
# ----------------------------------------------------------------------------------------------


def confidence_hand(logits, conf, y, alpha=1.0, eps=1e-24):
    nll, pen = [], []
    for row, c, label in zip(logits.tolist(), conf.reshape(-1).tolist(), y.tolist()):
        if label < 0:
            continue
        p = math.exp(row[label] - lse(row))
        nll.append(-math.log(min(max(c * p + 1 - c, eps), 1.0)))
        pen.append(-math.log(min(max(c, eps), 1.0)))
    if not nll:
        return 0.0
    return sum(nll) / len(nll) + alpha * sum(pen) / len(pen)


def conf_inputs(n=B, dtype=torch.float64):
    logits = torch.randn(n, C, dtype=torch.float64) * 2
    conf = torch.rand(n, 1, dtype=torch.float64) * 0.98 + 0.01
    return logits.to(dtype), conf.to(dtype)


def test_pinned_e1_confidence_shapes():
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([1, 0])
    p1 = 1.0 / (1.0 + math.e)
    expected = (-math.log(0.5 * p1 + 0.5) - math.log(0.9 * 0.5 + 0.1)) / 2 + (-math.log(0.5) - math.log(0.9)) / 2
    assert math.isclose(expected, 0.9256544, rel_tol=1e-6)
    for conf in (torch.tensor([0.5, 0.9]), torch.tensor([[0.5], [0.9]])):
        out = ConfidenceLoss()(logits, conf, y)
        assert out.shape == () and math.isclose(out.item(), expected, rel_tol=1e-6)


def test_pinned_d3_confidence_fp16():
    out = ConfidenceLoss()(
        torch.zeros(2, 2, dtype=torch.float16), torch.tensor([[0.0], [1.0]]).half(), torch.tensor([0, 1])
    )
    # row 0: c = 0 -> nll 0, conf −log(1e-24); row 1: c = 1 -> nll log 2, conf 0
    expected = (math.log(2.0) + (-math.log(1e-24))) / 2
    assert math.isclose(expected, 27.9775947, rel_tol=1e-8)
    assert out.dtype == torch.float16
    assert out.item() == torch.tensor(expected).half().item()


@pytest.mark.parametrize("labels", ["mixed", "all_id", "all_ood", "empty"])
@pytest.mark.parametrize("conf_shape", ["B1", "B"])
def test_confidence_values(labels, conf_shape):
    y = LABELS[labels]
    logits, conf = conf_inputs(len(y))
    if conf_shape == "B":
        conf = conf.reshape(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = confidence_loss(logits, conf, y, alpha=0.3)
    assert out.shape == () and out.dtype == torch.float64
    assert math.isclose(out.item(), confidence_hand(logits, conf, y, alpha=0.3), rel_tol=1e-10, abs_tol=1e-12)


def test_confidence_eps_clamp():
    logits = torch.tensor([[50.0, -50.0]], dtype=torch.float64)
    conf = torch.tensor([[1.0]], dtype=torch.float64)
    out = confidence_loss(logits, conf, torch.tensor([1]), eps=1e-10)
    # p_1 = e^-100 < eps: the clamp holds the nll at −log(eps)
    assert math.isclose(out.item(), -math.log(1e-10), rel_tol=1e-12)


def test_confidence_warning():
    logits, conf = conf_inputs()
    with pytest.warns(UserWarning) as record:
        ConfidenceLoss()(logits, conf, LABELS["mixed"])
    assert [str(w.message) for w in record] == [DROP_UNKNOWN_MESSAGE]
    with no_warnings():
        ConfidenceLoss()(logits, conf, LABELS["all_id"])
    config.data_checks = False
    with no_warnings():
        ConfidenceLoss()(logits, conf, LABELS["mixed"])


@pytest.mark.parametrize("labels", ["all_ood", "empty"])
def test_confidence_all_ood_attached_zero(labels):
    y = LABELS[labels]
    logits, conf = conf_inputs(len(y))
    logits.requires_grad_(True)
    conf.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ConfidenceLoss()(logits, conf, y)
    assert out.dim() == 0 and out.item() == 0
    out.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits)) and torch.equal(conf.grad, torch.zeros_like(conf))


def test_confidence_ood_rows_do_not_change_value():
    logits, conf = conf_inputs()
    y = LABELS["mixed"]
    keep = y >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = confidence_loss(logits, conf, y)
    torch.testing.assert_close(full, confidence_loss(logits[keep], conf[keep], y[keep]), rtol=1e-12, atol=0)


def test_confidence_gradients():
    logits, conf = conf_inputs()
    y = LABELS["mixed"]
    logits.requires_grad_(True)
    conf.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = torch.autograd.grad(confidence_loss(logits, conf, y, alpha=0.7), (logits, conf))
        # independent: autograd through the one-hot form of the paper on the ID rows
        l2 = logits.detach().clone().requires_grad_(True)
        c2 = conf.detach().clone().requires_grad_(True)
        keep = (y >= 0).nonzero().squeeze(1)
        onehot = torch.nn.functional.one_hot(y[keep], C).double()
        adjusted = torch.softmax(l2[keep], 1) * c2[keep] + (1 - c2[keep]) * onehot
        hand = -(adjusted.log() * onehot).sum(1).mean() - 0.7 * c2[keep].log().mean()
        g2 = torch.autograd.grad(hand, (l2, c2))
        assert torch.autograd.gradcheck(lambda a, b: confidence_loss(a, b, y, alpha=0.7), (logits, conf))
    torch.testing.assert_close(g[0], g2[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g[1], g2[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_confidence_dtypes(dtype):
    logits, conf = conf_inputs(dtype=dtype)
    y = LABELS["all_id"]
    logits.requires_grad_(True)
    out = ConfidenceLoss()(logits, conf, y)
    assert out.dtype == dtype
    ref = ConfidenceLoss()(logits.detach().double(), conf.double(), y)
    torch.testing.assert_close(out.double(), ref, rtol=DTYPE_RTOL[dtype], atol=1e-6)
    out.backward()
    assert logits.grad.dtype == dtype


def test_confidence_mixed_dtypes_promote():
    logits, conf = conf_inputs()
    out = ConfidenceLoss()(logits.half(), conf.float(), LABELS["all_id"])
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    "shape",
    [(B, C), (B, 2), (B, 1, 1), (1, 1), (B - 1,), (B - 1, 1)],
)
def test_confidence_bad_confidence_shape(shape):
    logits, _ = conf_inputs()
    with pytest.raises(ValueError, match="confidence"):  # fix e: never broadcast against (B, C)
        ConfidenceLoss()(logits, torch.rand(shape, dtype=torch.float64), LABELS["all_id"])


def test_confidence_bad_inputs():
    logits, conf = conf_inputs()
    y = LABELS["all_id"]
    with pytest.raises(ValueError, match="logits"):
        ConfidenceLoss()(logits.reshape(B, C, 1, 1), conf, y)
    with pytest.raises(TypeError, match="target"):
        ConfidenceLoss()(logits, conf, y.double())
    with pytest.raises(ValueError, match=r"Expected targets of shape B, got \(8, 1\)"):
        ConfidenceLoss()(logits, conf, y.reshape(B, 1))
    with pytest.raises(ValueError, match="target"):
        ConfidenceLoss()(logits, conf, y[:-1])
    with pytest.raises(TypeError, match="confidence"):
        ConfidenceLoss()(logits, (conf > 0.5).long(), y)


def test_confidence_label_out_of_range():
    logits, conf = conf_inputs()
    y = LABELS["all_id"].clone()
    y[2] = C
    with pytest.raises(IndexError, match="target"):
        ConfidenceLoss()(logits, conf, y)
    config.data_checks = False
    assert torch.isnan(ConfidenceLoss()(logits, conf, y))


def test_confidence_info():
    info = ConfidenceLoss.info
    assert info.tasks == {Task.CLASSIFICATION} and info.supervised is False
    assert info.inputs == {Representation.LOGITS, Representation.CONFIDENCE}
    assert ConfidenceLoss().state_dict() == {}


# ----------------------------------------------------------------------------------------------
# ObjectosphereLoss: hand formula
# ----------------------------------------------------------------------------------------------


def objectosphere_hand(logits, features, y, alpha=1.0, xi=1.0):
    rows = []
    for f, z, label in zip(logits.tolist(), features.tolist(), y.tolist()):
        norm = math.sqrt(sum(v * v for v in z))
        if label >= 0:
            rows.append(lse(f) - f[label] + alpha * max(xi - norm, 0.0) ** 2)
        else:
            rows.append(lse(f) - sum(f) / len(f) + alpha * norm**2)
    return rows


def obj_inputs(n=B, dtype=torch.float64):
    logits = torch.randn(n, C, dtype=torch.float64) * 2
    features = torch.randn(n, D, dtype=torch.float64) * 0.6
    return logits.to(dtype), features.to(dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", None])
@pytest.mark.parametrize("labels", ["mixed", "all_id", "all_ood", "empty"])
def test_objectosphere_values(reduction, labels):
    y = LABELS[labels]
    logits, features = obj_inputs(len(y))
    with no_warnings():  # supervised: never warns
        out = ObjectosphereLoss(alpha=0.6, xi=1.3, reduction=reduction)(logits, features, y)
    rows = objectosphere_hand(logits, features, y, alpha=0.6, xi=1.3)
    assert out.dtype == torch.float64
    if reduction == "mean":
        if not rows:
            assert torch.isnan(out)  # empty batch, 'mean': NaN (§3.8)
        else:
            assert math.isclose(out.item(), sum(rows) / len(rows), rel_tol=1e-10)
    elif reduction == "sum":
        assert math.isclose(out.item(), sum(rows), rel_tol=1e-10, abs_tol=1e-12)
    else:
        assert out.shape == (len(y),)
        torch.testing.assert_close(out, torch.tensor(rows, dtype=torch.float64).reshape(-1), rtol=1e-10, atol=1e-12)


def test_objectosphere_invalid_reduction():
    logits, features = obj_inputs()
    with pytest.raises(ValueError):
        ObjectosphereLoss(reduction="mean ")(logits, features, LABELS["mixed"])


def test_objectosphere_functional_matches_module():
    logits, features = obj_inputs()
    y = LABELS["mixed"]
    a = objectosphere_loss(logits, features, y, alpha=0.2, xi=2.0, reduction="none")
    b = ObjectosphereLoss(alpha=0.2, xi=2.0, reduction="none")(logits, features, y)
    assert torch.equal(a, b)


def test_objectosphere_gradient_of_norm_at_zero():
    logits = torch.zeros(2, C, dtype=torch.float64, requires_grad=True)
    features = torch.zeros(2, D, dtype=torch.float64, requires_grad=True)
    out = ObjectosphereLoss(reduction="sum")(logits, features, torch.tensor([0, -1]))
    # ID row: relu(1 − 0)² = 1; OOD row: 0; entropic: log 3 − 0 on both rows
    assert math.isclose(out.item(), 2 * math.log(3) + 1.0, rel_tol=1e-12)
    out.backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_objectosphere_gradients():
    logits, features = obj_inputs()
    y = LABELS["mixed"]
    logits.requires_grad_(True)
    features.requires_grad_(True)
    g = torch.autograd.grad(ObjectosphereLoss(alpha=0.5, xi=1.2)(logits, features, y), (logits, features))
    l2 = logits.detach().clone().requires_grad_(True)
    f2 = features.detach().clone().requires_grad_(True)
    terms = []
    for i in range(B):
        norm = f2[i].pow(2).sum().sqrt()
        if y[i] >= 0:
            terms.append(-torch.log_softmax(l2[i], 0)[y[i]] + 0.5 * (1.2 - norm).clamp(min=0) ** 2)
        else:
            terms.append(-torch.log_softmax(l2[i], 0).mean() + 0.5 * norm**2)
    g2 = torch.autograd.grad(torch.stack(terms).mean(), (l2, f2))
    torch.testing.assert_close(g[0], g2[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g[1], g2[1], rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b: objectosphere_loss(a, b, y, alpha=0.5, xi=1.2, reduction="none"), (logits, features)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_objectosphere_dtypes(dtype):
    logits, features = obj_inputs(dtype=dtype)
    y = LABELS["mixed"]
    features.requires_grad_(True)
    out = ObjectosphereLoss(reduction="none")(logits, features, y)
    assert out.dtype == dtype
    ref = ObjectosphereLoss(reduction="none")(logits.double(), features.detach().double(), y)
    torch.testing.assert_close(out.double(), ref, rtol=DTYPE_RTOL[dtype], atol=1e-6)
    out.sum().backward()
    assert features.grad.dtype == dtype


def test_objectosphere_segmentation_raises_index_error():
    with pytest.raises(IndexError, match="logits"):
        ObjectosphereLoss()(torch.randn(2, C, 4, 4), torch.randn(2, D), torch.zeros(2, 4, 4, dtype=torch.long))


def test_objectosphere_bad_inputs():
    logits, features = obj_inputs()
    y = LABELS["mixed"]
    with pytest.raises(ValueError, match=r"^Unsupported input shape: torch\.Size\(\[8, 3, 4\]\)$"):
        ObjectosphereLoss()(logits.unsqueeze(2).expand(B, C, 4), features, y)
    with pytest.raises(ValueError, match="features"):
        ObjectosphereLoss()(logits, features[:-1], y)
    with pytest.raises(ValueError, match="features"):
        ObjectosphereLoss()(logits, features.reshape(B, D, 1), y)
    with pytest.raises(TypeError, match="target"):
        ObjectosphereLoss()(logits, features, y.float())
    with pytest.raises(ValueError, match="target"):
        ObjectosphereLoss()(logits, features, y[:-1])


def test_objectosphere_label_out_of_range():
    logits, features = obj_inputs()
    y = LABELS["mixed"].clone()
    y[1] = C + 4
    with pytest.raises(IndexError):
        ObjectosphereLoss()(logits, features, y)
    config.data_checks = False
    out = ObjectosphereLoss(reduction="none")(logits, features, y)
    assert torch.isnan(out[1]) and torch.isfinite(out[torch.arange(B) != 1]).all()


def test_objectosphere_score():
    logits = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    p = math.exp(4) / (math.exp(3) + math.exp(4))
    expected = torch.tensor([-p * 5.0, 0.0], dtype=torch.float64)  # −max σ · ‖f‖ with the logit norm
    torch.testing.assert_close(ObjectosphereLoss.score(logits), expected)
    half = ObjectosphereLoss.score(logits.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), expected, rtol=1e-3, atol=1e-3)


def test_objectosphere_info():
    info = ObjectosphereLoss.info
    assert info.tasks == {Task.CLASSIFICATION} and info.supervised is True
    assert info.inputs == {Representation.LOGITS, Representation.FEATURES}
    assert ObjectosphereLoss().state_dict() == {}


# ----------------------------------------------------------------------------------------------
# no host synchronisation
# ----------------------------------------------------------------------------------------------


def test_compile_fullgraph(compile_reset):
    config.data_checks = False
    logits, features = obj_inputs(dtype=torch.float32)
    conf = torch.rand(B, 1)
    y = LABELS["mixed"]
    logits.requires_grad_(True)

    def both(logits, features, conf, y):
        return objectosphere_loss(logits, features, y) + confidence_loss(logits, conf, y)

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    out = compiled(logits, features, conf, y)
    torch.testing.assert_close(out, both(logits, features, conf, y))
    (g,) = torch.autograd.grad(out, logits)
    (g_eager,) = torch.autograd.grad(both(logits, features, conf, y), logits)
    torch.testing.assert_close(g, g_eager)
