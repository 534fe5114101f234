"""Contract tests of VOSRegLoss and VirtualOutlierSynthesizingRegLoss (LOSS_CONTRACT.md §3.6-3.7, §6, §8)."""

import copy
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from oodkernels import config
from oodkernels.reference._common import DROP_UNKNOWN_MESSAGE
from oodkernels.reference._common import LabelOutOfRangeError
from oodkernels.reference._common import Representation
from oodkernels.reference._common import ShapeError
from oodkernels.reference._common import Task
from oodkernels.reference.vos import VirtualOutlierSynthesizingRegLoss
from oodkernels.reference.vos import VOSRegLoss
from oodkernels.reference.vos import vos_reg_loss

B, C, D = 8, 3, 5
LABELS = {
    "mixed": torch.tensor([-1, 0, 1, 2, -1, 0, 1, 2]),
    "all_id": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
    "all_ood": torch.tensor([-1, -2, -1, -3, -1, -1, -2, -1]),
    "empty": torch.zeros(0, dtype=torch.long),
}
REDUCTIONS = ["mean", "sum", "none", None]
DTYPE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def make_modules(n_classes=C, seed=1):
    g = torch.Generator().manual_seed(seed)
    phi = torch.nn.Linear(1, 2)
    we = torch.nn.Linear(n_classes, 1)
    with torch.no_grad():
        phi.weight.copy_(torch.randn(2, 1, generator=g))
        phi.bias.copy_(torch.randn(2, generator=g))
        we.weight.copy_(torch.rand(1, n_classes, generator=g) + 0.1)
        we.bias.copy_(torch.randn(1, generator=g))
    return phi, we


# ----------------------------------------------------------------------------------------------
# hand formula: naive per-entry loops in Python floats (float64)
# ----------------------------------------------------------------------------------------------


def lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def naive_reg(entries, labels, phi_w, phi_b, w):
    """Pooled two-class CE of φ(E_w) over all entries (label 1 for y >= 0, else 0); 0 without entries."""
    terms = []
    for row, y in zip(entries, labels):
        m = max(row)
        energy = -(m + math.log(sum(max(wc, 0.0) * math.exp(v - m) for wc, v in zip(w, row))))
        z = [phi_w[k] * energy + phi_b[k] for k in range(2)]
        terms.append(lse(z) - z[1 if y >= 0 else 0])
    return sum(terms) / len(terms) if terms else 0.0


def naive_vos_reg(entries, labels, phi_w, phi_b, w, alpha, reduction):
    """entries: list of logit rows; labels: list of ints. Returns a float or a list (for 'none')."""
    reg = naive_reg(entries, labels, phi_w, phi_b, w)
    ce = [lse(row) - row[y] if y >= 0 else 0.0 for row, y in zip(entries, labels)]
    n_id = sum(1 for y in labels if y >= 0)
    if reduction == "mean":
        return (sum(ce) / n_id if n_id else 0.0) + alpha * reg
    if reduction == "sum":
        return sum(ce) + alpha * reg
    return [c + alpha * reg for c in ce]


def naive_for(logits, targets, phi, we, alpha, reduction):
    """Flatten channels-last with explicit loops, then apply :func:`naive_vos_reg`."""
    x = logits.double().tolist()
    t = targets.tolist()
    if logits.dim() == 4:
        entries, labels = [], []
        for b in range(logits.shape[0]):
            for h in range(logits.shape[2]):
                for w_ in range(logits.shape[3]):
                    entries.append([x[b][c][h][w_] for c in range(logits.shape[1])])
                    labels.append(t[b][h][w_])
    else:
        entries, labels = x, t
    phi_w = [float(v) for v in phi.weight.detach().double().reshape(-1)]
    phi_b = [float(v) for v in phi.bias.detach().double()]
    w = [float(v) for v in we.weight.detach().double().reshape(-1)]
    return naive_vos_reg(entries, labels, phi_w, phi_b, w, alpha, reduction)


def autograd_formula(logits, targets, phi, we, alpha, reduction):
    """Differentiable hand formula without max-subtraction, for gradient checks (small logits)."""
    rows = logits.movedim(1, -1).reshape(-1, logits.shape[1]) if logits.dim() == 4 else logits
    y = targets.reshape(-1)
    energy = -torch.log((F.relu(we.weight) * rows.exp()).sum(1))
    z = phi(energy.unsqueeze(1))
    reg = F.cross_entropy(z, (y >= 0).long()) if len(y) else logits.sum() * 0
    ce = torch.stack(
        [F.cross_entropy(rows[i : i + 1], y[i : i + 1]) if y[i] >= 0 else rows[i].sum() * 0 for i in range(len(y))]
    )
    n_id = int((y >= 0).sum())
    if reduction == "mean":
        return (ce.sum() / max(n_id, 1)) + alpha * reg
    if reduction == "sum":
        return ce.sum() + alpha * reg
    return ce.reshape(targets.shape) + alpha * reg


def assert_close_value(result, expected, rtol=1e-5, atol=1e-6):
    if isinstance(expected, list):
        torch.testing.assert_close(
            result.double().reshape(-1), torch.tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol
        )
    else:
        torch.testing.assert_close(result.double(), torch.tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# VOSRegLoss
# ----------------------------------------------------------------------------------------------


def test_vosreg_info_and_state():
    phi, we = make_modules()
    loss = VOSRegLoss(phi, we)
    assert loss.info.tasks == {Task.CLASSIFICATION, Task.SEGMENTATION}
    assert loss.info.inputs == {Representation.LOGITS}
    assert loss.info.supervised is True
    sd = loss.state_dict()
    assert list(sd) == [
        "logistic_regression.weight",
        "logistic_regression.bias",
        "weights_energy.weight",
        "weights_energy.bias",
    ]
    assert [tuple(v.shape) for v in sd.values()] == [(2, 1), (2,), (1, C), (1,)]
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert all(p.requires_grad for p in loss.parameters())
    assert loss.alpha == 0.1 and loss.reduction == "mean"
    other = VOSRegLoss(torch.nn.Linear(1, 2), torch.nn.Linear(C, 1))
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k])


def test_vosreg_construction_draws_nothing():
    phi, we = make_modules()
    state = torch.get_rng_state()
    VOSRegLoss(phi, we)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("reduction", ["none", "mean", "sum", None])
def test_vosreg_pinned_k5(reduction):
    phi, we = torch.nn.Linear(1, 2), torch.nn.Linear(3, 1)
    with torch.no_grad():
        phi.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        phi.bias.zero_()
        we.weight.fill_(1.0)
    logits = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 1, 0]])
    y = torch.tensor([0, -1, 1])
    out = VOSRegLoss(phi, we, reduction=reduction)(logits, y)
    expected = {
        "none": [0.6311268, 0.0796821, 0.6311268],
        None: [0.6311268, 0.0796821, 0.6311268],
        "mean": 0.6311268,
        "sum": 1.1825714,
    }[reduction]
    assert_close_value(out, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("labels", list(LABELS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vosreg_values_classification(labels, reduction):
    phi, we = make_modules()
    y = LABELS[labels]
    logits = torch.randn(len(y), C) * 3
    out = VOSRegLoss(phi, we, alpha=0.7, reduction=reduction)(logits, y)
    expected = naive_for(logits, y, phi, we, 0.7, reduction)
    if reduction in ("none", None):
        assert out.shape == y.shape
    else:
        assert out.shape == ()
    assert out.dtype == torch.float32
    assert_close_value(out, expected)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vosreg_values_segmentation(reduction):
    phi, we = make_modules()
    y = torch.tensor([[[-1, 0, 1, 2], [0, 0, -2, 1], [2, 2, 2, -1], [0, 1, 1, 0]], [[1, -1, -1, 0]] * 4])
    logits = torch.randn(2, C, 4, 4) * 2
    out = VOSRegLoss(phi, we, alpha=0.3, reduction=reduction)(logits, y)
    assert out.shape == (() if reduction in ("mean", "sum") else (2, 4, 4))
    assert_close_value(out, naive_for(logits, y, phi, we, 0.3, reduction))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vosreg_segmentation_equals_flattened_pixels(reduction):
    phi, we = make_modules()
    y = torch.randint(-1, C, (2, 4, 4))
    y[0, 0, 0], y[1, 0, 0] = -1, 0
    logits = torch.randn(2, C, 4, 4)
    loss = VOSRegLoss(phi, we, reduction=reduction)
    seg = loss(logits, y)
    flat = loss(logits.permute(0, 2, 3, 1).reshape(-1, C), y.reshape(-1))
    torch.testing.assert_close(seg.reshape(-1), flat.reshape(-1), rtol=1e-6, atol=1e-7)


def test_vosreg_functional_matches_module():
    phi, we = make_modules()
    y = LABELS["mixed"]
    logits = torch.randn(B, C)
    for reduction in REDUCTIONS:
        a = vos_reg_loss(logits, y, phi, we, alpha=0.2, reduction=reduction)
        b = VOSRegLoss(phi, we, alpha=0.2, reduction=reduction)(logits, y)
        assert torch.equal(a, b)


def test_vosreg_no_ood_uses_id_energies_only_and_all_ood_sum_equals_mean():
    phi, we = make_modules()
    logits = torch.randn(B, C)
    y = LABELS["all_ood"]
    mean = VOSRegLoss(phi, we, reduction="mean")(logits, y)
    total = VOSRegLoss(phi, we, reduction="sum")(logits, y)
    assert torch.equal(mean, total)
    assert mean > 0


def test_vosreg_all_relu_weights_zero_is_nan():
    phi, we = make_modules()
    with torch.no_grad():
        we.weight.fill_(-1.0)
    out = VOSRegLoss(phi, we)(torch.randn(B, C), LABELS["mixed"])
    assert torch.isnan(out)


def test_vosreg_max_subtraction_keeps_large_logits_finite():
    phi, we = make_modules()
    logits = torch.tensor([[1000.0, 0.0, 0.0], [1000.0, 1000.0, 0.0]])
    y = torch.tensor([0, -1])
    out = VOSRegLoss(phi, we, reduction="none")(logits, y)
    assert torch.isfinite(out).all()
    assert_close_value(out, naive_for(logits, y, phi, we, 0.1, "none"))


def test_vosreg_never_warns():
    phi, we = make_modules()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for y in LABELS.values():
            VOSRegLoss(phi, we)(torch.randn(len(y), C), y)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("labels", ["mixed", "all_id", "all_ood"])
def test_vosreg_gradients_match_hand_formula(reduction, labels):
    phi, we = make_modules()
    phi2, we2 = copy.deepcopy(phi), copy.deepcopy(we)
    y = LABELS[labels]
    logits = torch.randn(B, C, dtype=torch.float64, requires_grad=True)
    out = VOSRegLoss(phi.double(), we.double(), reduction=reduction)(logits, y)
    params = [logits, phi.weight, phi.bias, we.weight]
    grads = torch.autograd.grad(out.sum(), params)
    ref = autograd_formula(logits, y, phi2.double(), we2.double(), 0.1, reduction)
    ref_grads = torch.autograd.grad(ref.sum(), [logits, phi2.weight, phi2.bias, we2.weight])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_vosreg_gradcheck():
    phi, we = make_modules()
    phi, we = phi.double(), we.double()
    y = LABELS["mixed"]
    logits = torch.randn(B, C, dtype=torch.float64, requires_grad=True)
    seg = torch.randn(2, C, 2, 2, dtype=torch.float64, requires_grad=True)
    ys = torch.tensor([[[0, -1], [1, 2]], [[-1, -1], [2, 0]]])
    for reduction in REDUCTIONS:
        loss = VOSRegLoss(phi, we, reduction=reduction)
        assert torch.autograd.gradcheck(
            lambda x, w, pw, r=reduction: vos_reg_loss(x, y, _lin(pw), _we(w), 0.1, r),
            (
                logits,
                we.weight.detach().clone().requires_grad_(),
                phi.weight.detach().clone().requires_grad_(),
            ),
        )
        assert torch.autograd.gradcheck(lambda x, f=loss: f(x, ys), (seg,))


def _lin(weight):
    class Phi(torch.nn.Module):
        def forward(self, x):
            return x @ weight.t()

    return Phi()


def _we(weight):
    m = torch.nn.Module()
    m.weight = weight
    return m


def test_vosreg_all_ood_and_empty_gradients():
    phi, we = make_modules()
    logits = torch.randn(0, C, requires_grad=True)
    out = VOSRegLoss(phi, we)(logits, LABELS["empty"])
    assert out.shape == () and out == 0
    out.backward()
    assert torch.equal(logits.grad, torch.zeros(0, C))
    none = VOSRegLoss(phi, we, reduction="none")(torch.randn(0, C), LABELS["empty"])
    assert none.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vosreg_dtypes(dtype, reduction):
    phi, we = make_modules()
    y = LABELS["mixed"]
    logits64 = torch.randn(B, C, dtype=torch.float64)
    logits = logits64.to(dtype)
    out = VOSRegLoss(phi, we, reduction=reduction)(logits, y)
    assert out.dtype == dtype
    expected = naive_for(logits.double(), y, phi, we, 0.1, reduction)
    rtol = DTYPE_RTOL[dtype]
    assert_close_value(out, expected, rtol=rtol, atol=rtol)
    if dtype != torch.float64:
        x = logits.clone().requires_grad_()
        VOSRegLoss(phi, we, reduction=reduction)(x, y).sum().backward()
        assert x.grad.dtype == dtype
        assert phi.weight.grad.dtype == torch.float32


def test_vosreg_parameters_never_change_output_dtype():
    phi, we = make_modules()
    phi, we = phi.double(), we.double()
    out = VOSRegLoss(phi, we)(torch.randn(B, C, dtype=torch.bfloat16), LABELS["mixed"])
    assert out.dtype == torch.bfloat16


def test_vosreg_bad_inputs():
    phi, we = make_modules()
    loss = VOSRegLoss(phi, we)
    with pytest.raises(ValueError, match=r"Unsupported input shape: torch.Size\(\[2, 3, 4\]\)"):
        loss(torch.randn(2, C, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="y"):
        loss(torch.randn(B, C), torch.zeros(B))
    with pytest.raises(ShapeError, match="y"):
        loss(torch.randn(B, C), torch.zeros(B + 1, dtype=torch.long))
    with pytest.raises(TypeError, match="logits"):
        loss(torch.zeros(B, C, dtype=torch.long), torch.zeros(B, dtype=torch.long))
    with pytest.raises(ShapeError, match="weights_energy"):
        VOSRegLoss(phi, torch.nn.Linear(C + 1, 1))(torch.randn(B, C), LABELS["mixed"])
    with pytest.raises(ShapeError, match="logistic_regression"):
        VOSRegLoss(torch.nn.Linear(1, 1), we)(torch.randn(B, C), LABELS["mixed"])
    with pytest.raises(ValueError):
        VOSRegLoss(phi, we, reduction="avg")(torch.randn(B, C), LABELS["mixed"])


def test_vosreg_label_out_of_range():
    phi, we = make_modules()
    y = torch.tensor([0, 1, 3, -1])
    with pytest.raises(LabelOutOfRangeError, match="y"):
        VOSRegLoss(phi, we)(torch.randn(4, C), y)
    config.data_checks = False
    out = VOSRegLoss(phi, we, reduction="none")(torch.randn(4, C), y)
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3]]).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_vosreg_compile_fullgraph(compile_reset, reduction):
    config.data_checks = False
    phi, we = make_modules()
    loss = VOSRegLoss(phi, we, reduction=reduction)
    logits = torch.randn(B, C, requires_grad=True)
    y = LABELS["mixed"]
    eager = loss(logits, y)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    out = compiled(logits, y)
    torch.testing.assert_close(out, eager)
    (g,) = torch.autograd.grad(out.sum(), logits)
    (ge,) = torch.autograd.grad(eager.sum(), logits)
    torch.testing.assert_close(g, ge)


# ----------------------------------------------------------------------------------------------
# VirtualOutlierSynthesizingRegLoss: small sizes C=3, D=4, S=4, T=20
# ----------------------------------------------------------------------------------------------

S, T, DV = 4, 20, 4


def make_synth(reduction="mean", select=1, alpha=0.1, seed=1):
    phi, we = make_modules(seed=seed)
    fc = torch.nn.Linear(DV, C)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 7)
        fc.weight.copy_(torch.randn(C, DV, generator=g))
        fc.bias.copy_(torch.randn(C, generator=g))
    return VirtualOutlierSynthesizingRegLoss(
        phi, we, fc, alpha=alpha, reduction=reduction, sample_number=S, select=select, sample_from=T
    )


def naive_queue_step(queues, counts, features, labels, size):
    """The queue semantics of §3.7 step 5, one row at a time (lists of lists of floats)."""
    full = all(n == size for n in counts)
    for row, y in zip(features, labels):
        if y < 0:
            continue
        if full:
            queues[y] = queues[y][1:] + [row]
        elif counts[y] < size:
            queues[y][counts[y]] = row
            counts[y] += 1
    return full


def test_synth_info_and_state_dict():
    loss = make_synth()
    assert loss.info.tasks == {Task.CLASSIFICATION}
    assert loss.info.inputs == {Representation.LOGITS, Representation.FEATURES}
    assert loss.info.supervised is False
    assert isinstance(loss, VOSRegLoss)
    sd = loss.state_dict()
    assert list(sd) == [
        "logistic_regression.weight",
        "logistic_regression.bias",
        "weights_energy.weight",
        "weights_energy.bias",
        "fc.weight",
        "fc.bias",
    ]
    assert loss.data_dict.shape == (C, S, DV) and loss.eye_matrix.shape == (DV, DV)
    assert torch.equal(loss.eye_matrix, torch.eye(DV))
    assert dict(loss.number_dict) == {0: 0, 1: 0, 2: 0}
    with pytest.raises(AttributeError):
        loss.number_dict = {}
    with pytest.raises(TypeError):
        loss.number_dict[0] = 3


def test_synth_queue_contents_through_fill_overflow_and_fifo():
    loss = make_synth()
    queues = [[[0.0] * DV for _ in range(S)] for _ in range(C)]
    counts = [0] * C
    batches = [
        torch.tensor([0, 0, -1, 1]),  # partial fill
        torch.tensor([0, 0, 0, 2, 1, -1, 0]),  # class 0 overflows inside the batch
        torch.tensor([1, 1, 1, 2, 2, 2, 2, 0]),  # fills the rest (reg still 0)
        torch.tensor([0, 1, 2, 0, -1]),  # FIFO
        torch.tensor([2] * 6 + [1]),  # FIFO with more rows of a class than the queue holds
        torch.tensor([-1, -1]),  # all OOD: untouched
    ]
    torch.manual_seed(3)
    for y in batches:
        x = torch.randn(len(y), DV)
        naive_queue_step(queues, counts, x.tolist(), y.tolist(), S)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss(torch.randn(len(y), C), x, y)
        assert dict(loss.number_dict) == dict(enumerate(counts))
        assert torch.equal(loss.data_dict, torch.tensor(queues))
        assert loss.fill_counts.dtype == torch.long


def test_synth_all_ood_batch_leaves_queues_empty_and_returns_attached_zero():
    loss = make_synth()
    logits = torch.randn(4, C, requires_grad=True)
    feats = torch.randn(4, DV, requires_grad=True)
    with pytest.warns(UserWarning, match=re.escape(DROP_UNKNOWN_MESSAGE)):
        out = loss(logits, feats, torch.tensor([-1, -2, -1, -1]))
    assert out.shape == () and out == 0
    out.backward()
    assert torch.equal(logits.grad, torch.zeros(4, C))
    assert torch.equal(feats.grad, torch.zeros(4, DV))
    assert torch.equal(loss.data_dict, torch.zeros(C, S, DV))
    assert dict(loss.number_dict) == {0: 0, 1: 0, 2: 0}
    loss.reduction = "none"
    with pytest.warns(UserWarning, match=re.escape(DROP_UNKNOWN_MESSAGE)):
        none = loss(logits, feats, torch.tensor([-1, -2, -1, -1]))
    assert none.shape == (0,)


def _ce_rows(logits, y):
    return [lse(row) - row[t] for row, t in zip(logits.double().tolist(), y.tolist()) if t >= 0]


@pytest.mark.parametrize("checks", [True, False])
def test_synth_reg_is_zero_until_after_the_filling_call(checks):
    config.data_checks = checks
    loss = make_synth(reduction="sum")
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])  # S=4 rows per class: fills on the first call
    logits, feats = torch.randn(12, C), torch.randn(12, DV)
    state = torch.get_rng_state()
    out = loss(logits, feats, y)
    if checks:  # the reference does not draw while filling, and neither does the product with checks on
        assert torch.equal(state, torch.get_rng_state())
    assert_close_value(out, sum(_ce_rows(logits, y)))
    assert dict(loss.number_dict) == {0: 4, 1: 4, 2: 4}
    state = torch.get_rng_state()
    out2 = loss(logits, feats, y)
    assert not torch.equal(state, torch.get_rng_state())
    assert abs(float(out2.detach()) - sum(_ce_rows(logits, y))) > 1e-4


def hand_synth_value(loss_before, logits, y, reduction, alpha):
    """Independent evaluation after the queues are full, with torch.distributions (same RNG order)."""
    queues = loss_before.data_dict.clone()
    x = queues - queues.mean(1, keepdim=True)
    x = x.reshape(-1, DV)
    cov = x.t() @ x / x.shape[0] + 1e-4 * torch.eye(DV)
    outliers = []
    for k in range(C):
        dist = torch.distributions.MultivariateNormal(queues[k].mean(0), covariance_matrix=cov)
        samples = dist.rsample((T,))
        order = torch.argsort(dist.log_prob(samples))
        outliers.append(samples[order[: loss_before.select]])
    virtual = torch.cat(outliers)
    phi, we, fc = loss_before.logistic_regression, loss_before.weights_energy, loss_before.fc
    pw = [float(v) for v in phi.weight.detach().reshape(-1)]
    pb = [float(v) for v in phi.bias.detach()]
    w = [float(v) for v in we.weight.detach().reshape(-1)]
    id_rows = [row for row, t in zip(logits.double().tolist(), y.tolist()) if t >= 0]
    v_rows = fc(virtual).detach().double().tolist()
    reg = naive_reg(id_rows + v_rows, [0] * len(id_rows) + [-1] * len(v_rows), pw, pb, w)
    ce = _ce_rows(logits, y)
    if reduction == "mean":
        return sum(ce) / len(ce) + alpha * reg
    if reduction == "sum":
        return sum(ce) + alpha * reg
    return [c + alpha * reg for c in ce]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("select", [1, 3])
def test_synth_values_after_full_match_hand_evaluation(reduction, select):
    loss = make_synth(reduction=reduction, select=select, alpha=0.5)
    fill_y = torch.arange(12) % C
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(torch.randn(12, C), torch.randn(12, DV) * 2 + 1, fill_y)
    y = torch.tensor([0, -1, 2, 2, 1, -1, 0])
    logits, feats = torch.randn(7, C), torch.randn(7, DV)
    before = copy.deepcopy(loss)
    naive_queue_step_check = [[list(r) for r in q] for q in before.data_dict.tolist()]
    naive_queue_step(naive_queue_step_check, [S] * C, feats.tolist(), y.tolist(), S)
    state = torch.get_rng_state()
    with pytest.warns(UserWarning, match=re.escape(DROP_UNKNOWN_MESSAGE)):
        out = loss(logits, feats, y)
    assert torch.equal(loss.data_dict, torch.tensor(naive_queue_step_check))
    before.data_dict.copy_(loss.data_dict)  # sampling uses the updated queues
    torch.set_rng_state(state)
    expected = hand_synth_value(before, logits, y, reduction, 0.5)
    if reduction in ("none", None):
        assert out.shape == (5,)
    else:
        assert out.shape == ()
    assert_close_value(out, expected, rtol=1e-5, atol=1e-5)


def test_synth_checks_off_same_values_different_rng_use():
    a, b = make_synth(), make_synth()
    data = [(torch.randn(6, C), torch.randn(6, DV), torch.tensor([0, 1, 2, 0, 1, 2])) for _ in range(4)]
    states_equal = []
    for logits, feats, y in data:
        state = torch.get_rng_state()
        config.data_checks = True
        va = a(logits, feats, y)
        sa = torch.get_rng_state()
        torch.set_rng_state(state)
        config.data_checks = False
        vb = b(logits, feats, y)
        states_equal.append(torch.equal(sa, torch.get_rng_state()))
        torch.set_rng_state(sa)
        torch.testing.assert_close(va, vb, rtol=0, atol=0)
        assert torch.equal(a.data_dict, b.data_dict)
    # fill phase: the product draws with checks off; full afterwards: both draw the same
    assert states_equal == [False, False, True, True]


def test_synth_warnings():
    loss = make_synth()
    with pytest.warns(UserWarning, match=re.escape(DROP_UNKNOWN_MESSAGE)):
        loss(torch.randn(4, C), torch.randn(4, DV), torch.tensor([0, -1, 1, 2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(torch.randn(4, C), torch.randn(4, DV), torch.tensor([0, 0, 1, 2]))
        config.data_checks = False
        loss(torch.randn(4, C), torch.randn(4, DV), torch.tensor([0, -1, 1, 2]))


def test_synth_gradients_reach_every_parameter_once_full():
    loss = make_synth(select=2)
    loss(torch.randn(12, C), torch.randn(12, DV), torch.arange(12) % C)
    logits = torch.randn(5, C, requires_grad=True)
    feats = torch.randn(5, DV, requires_grad=True)
    out = loss(logits, feats, torch.tensor([0, 1, 2, 1, 0]))
    out.backward()
    for name, p in loss.named_parameters():
        if name == "weights_energy.bias":
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_synth_dtypes(dtype):
    loss = make_synth()
    ref = make_synth()
    y = torch.arange(12) % C
    logits, feats = torch.randn(12, C), torch.randn(12, DV)
    state = torch.get_rng_state()
    out = loss(logits.to(dtype), feats.to(dtype), y)
    torch.set_rng_state(state)
    expected = ref(logits.to(dtype).double(), feats.to(dtype).double(), y)
    assert out.dtype == dtype
    rtol = DTYPE_RTOL[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=rtol)
    assert loss.data_dict.dtype == torch.float32


def test_synth_bad_inputs():
    loss = make_synth()
    with pytest.raises(NotImplementedError, match="Segmentation not implemented yet"):
        loss(torch.randn(2, C, 2, 2), torch.randn(2, DV), torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(ShapeError, match="features"):
        loss(torch.randn(4, C), torch.randn(4, DV + 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ShapeError, match="features"):
        loss(torch.randn(4, C), torch.randn(3, DV), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ShapeError, match="logits"):
        loss(torch.randn(4, C + 1), torch.randn(4, DV), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="y"):
        loss(torch.randn(4, C), torch.randn(4, DV), torch.zeros(4))
    with pytest.raises(TypeError, match="features"):
        loss(torch.randn(4, C), torch.zeros(4, DV, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    loss.reduction = "avg"
    with pytest.raises(ValueError):
        loss(torch.randn(4, C), torch.randn(4, DV), torch.zeros(4, dtype=torch.long))


def test_synth_label_out_of_range_leaves_queues_alone():
    loss = make_synth()
    with pytest.raises(LabelOutOfRangeError):
        loss(torch.randn(3, C), torch.randn(3, DV), torch.tensor([0, 3, 1]))
    assert torch.equal(loss.data_dict, torch.zeros(C, S, DV))
    config.data_checks = False
    out = make_synth(reduction="none")(torch.randn(3, C), torch.randn(3, DV), torch.tensor([0, 3, 1]))
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
