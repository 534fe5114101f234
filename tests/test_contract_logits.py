"""Contract tests of the row losses over logits (LOSS_CONTRACT.md §2.5, §3.1-3.5, §3.10, §8; SPEC.md §2).

Expected values come from a naive per-entry evaluation written here (explicit Python loops over the
entries, ``log Σ exp`` taken literally in float64), or from numbers worked out by hand; never from the
code under test.
"""

import itertools
import math
import warnings

import pytest
import torch

from oodkernels import config
from oodkernels.reference import logits as L
from oodkernels.reference._common import DROP_UNKNOWN_MESSAGE
from oodkernels.reference._common import LabelOutOfRangeError
from oodkernels.reference._common import LossInfo
from oodkernels.reference._common import Representation
from oodkernels.reference._common import Task

NAMES = ["cross_entropy", "background", "oe", "entropic", "energy", "conf_penalty", "margin_conf", "logit_norm"]
SEG_NAMES = [n for n in NAMES if n != "logit_norm"]
REDUCTIONS = ["mean", "sum", "none", None]
LABELS = ["mixed", "all_id", "all_ood", "empty"]
C = 4  # logit columns; Background then has n_classes = 3, labels stay in [-2, 2]

# non-default parameters that make every branch of the hinges active on N(0, 1.5²) logits
PARAMS = {
    "oe": {"alpha": 0.3},
    "energy": {"alpha": 0.5, "margin_in": -2.0, "margin_out": -1.0},
    "conf_penalty": {"lambda_ood": 0.7},
    "margin_conf": {"margin": 0.45},
    "logit_norm": {"t": 0.5},
}


# ----------------------------------------------------------------------------------------------
# the code under test, behind one calling convention
# ----------------------------------------------------------------------------------------------


def run(name, logits, targets, reduction="mean", api="functional", **params):
    if api == "functional":
        if name == "cross_entropy":
            return L.cross_entropy(logits, targets, reduction=reduction)
        if name == "background":
            return L.background_class_loss(logits, targets, C - 1, reduction=reduction)
        if name == "oe":
            return L.outlier_exposure_loss(logits, targets, reduction=reduction, **params)
        if name == "entropic":
            return L.entropic_open_set_loss(logits, targets, reduction=reduction)
        if name == "energy":
            return L.energy_regularized_loss(logits, targets, reduction=reduction, **params)
        if name == "conf_penalty":
            return L.confidence_penalty_loss(logits, targets, reduction=reduction, **params)
        if name == "margin_conf":
            return L.margin_confidence_loss(logits, targets, reduction=reduction, **params)
        if name == "logit_norm":
            return L.logit_norm_loss(logits, targets, reduction=reduction, **params)
    return make_module(name, C, reduction, **params)(logits, targets)


def make_module(name, n_columns=C, reduction="mean", **params):
    if name == "cross_entropy":
        return L.CrossEntropyLoss(reduction=reduction)
    if name == "background":
        return L.BackgroundClassLoss(n_columns - 1, reduction=reduction)
    if name == "oe":
        return L.OutlierExposureLoss(reduction=reduction, **params)
    if name == "entropic":
        return L.EntropicOpenSetLoss(reduction=reduction)
    if name == "energy":
        return L.EnergyRegularizedLoss(reduction=reduction, **params)
    if name == "conf_penalty":
        return L.ConfidencePenaltyLoss(reduction=reduction, **params)
    if name == "margin_conf":
        return L.MarginConfidenceLoss(reduction=reduction, **params)
    if name == "logit_norm":
        return L.LogitNorm(reduction=reduction, **params)
    raise KeyError(name)


# ----------------------------------------------------------------------------------------------
# the naive evaluation: one Python iteration per entry
# ----------------------------------------------------------------------------------------------


def _lse(row):
    return torch.log(torch.sum(torch.exp(row)))


def _entries(logits, targets):
    """(row, label) of every entry, batch-major then spatial, by explicit indexing."""
    out = []
    for idx in itertools.product(*[range(s) for s in targets.shape]):
        row = logits[(idx[0], slice(None)) + tuple(idx[1:])]
        out.append((row, int(targets[idx])))
    return out


def naive(name, logits, targets, reduction="mean", **params):
    """float64 value of criterion ``name``, per LOSS_CONTRACT.md, from an explicit loop over the entries."""
    logits = logits.double()
    zero = logits.new_zeros(())
    id_terms, ood_terms, per_entry = [], [], []
    for row, y in _entries(logits, targets):
        n_cols = row.shape[0]
        if name == "logit_norm":
            row = row / (params.get("t", 1.0) * (torch.sqrt(torch.sum(row * row)) + 1e-7))
        ce = _lse(row) - row[y] if y >= 0 else None
        if name in ("cross_entropy", "logit_norm"):
            a, b = ce, None
        elif name == "background":
            a = ce
            b = _lse(row) - row[n_cols - 1]
        elif name in ("oe", "entropic"):
            alpha = 1.0 if name == "entropic" else params.get("alpha", 0.5)
            a, b = ce, alpha * (_lse(row) - torch.sum(row) / n_cols)
        elif name == "energy":
            alpha = params.get("alpha", 0.1)
            m_in, m_out = params.get("margin_in", -25.0), params.get("margin_out", -7.0)
            energy = -_lse(row)
            a = None if ce is None else (ce, alpha * torch.clamp(energy - m_in, min=0) ** 2)
            b = alpha * torch.clamp(m_out - energy, min=0) ** 2
        elif name in ("conf_penalty", "margin_conf"):
            pi = torch.max(torch.exp(row)) / torch.sum(torch.exp(row))
            a = ce
            if name == "conf_penalty":
                b = params.get("lambda_ood", 0.1) * pi
            else:
                b = torch.clamp(pi - params.get("margin", 0.5), min=0)
        if y >= 0:
            id_terms.append(a)
            per_entry.append(sum(a) if isinstance(a, tuple) else a)
        else:
            ood_terms.append(b)
            per_entry.append(zero if b is None else b)

    def total(xs):
        return sum(xs, zero)

    def mean(xs):
        return total(xs) / len(xs) if xs else zero

    n_all = len(per_entry)
    if name == "logit_norm":
        if reduction == "mean":
            return mean(id_terms)
        if reduction == "sum":
            return total(id_terms)
        return torch.stack(id_terms) if id_terms else logits.new_zeros((0,))
    if reduction in ("none", None):
        return torch.stack(per_entry).reshape(targets.shape) if per_entry else logits.new_zeros(targets.shape)
    if reduction == "sum":
        return total(per_entry)
    if name == "cross_entropy":
        return mean(id_terms)
    if name in ("background", "oe", "entropic"):
        return total(per_entry) / n_all if n_all else logits.new_tensor(float("nan"))
    if name == "energy":
        return mean([t[0] for t in id_terms]) + mean([t[1] for t in id_terms]) + mean(ood_terms)
    return mean(id_terms) + mean(ood_terms)


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------


def make_labels(kind, shape):
    n = math.prod(shape)
    i = torch.arange(n)
    if kind == "mixed":
        y = i % 5 - 2  # -2, -1, 0, 1, 2
    elif kind == "all_id":
        y = i % 3
    elif kind == "all_ood":
        y = -(i % 3) - 1
    else:
        raise KeyError(kind)
    return y.reshape(shape)


def make_case(task, labels="mixed", dtype=torch.float64, batch=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if task == "cls":
        b = 7 if batch is None else batch
        shape, tshape = (b, C), (b,)
    else:
        b = 2 if batch is None else batch
        shape, tshape = (b, C, 3, 3), (b, 3, 3)
    if labels == "empty":
        shape, tshape = (0,) + shape[1:], (0,) + tshape[1:]
        y = torch.zeros(tshape, dtype=torch.long)
    else:
        y = make_labels(labels, tshape)
    x = (1.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    return x, y


def no_warnings(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


def all_cases():
    for name in NAMES:
        for task in ("cls", "seg") if name != "logit_norm" else ("cls",):
            for reduction in REDUCTIONS:
                if reduction is None and name in ("background", "logit_norm"):
                    continue
                for labels in LABELS:
                    yield name, task, reduction, labels


# ----------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,task,reduction,labels", list(all_cases()))
@pytest.mark.parametrize("api", ["functional", "module"])
def test_values_match_naive(name, task, reduction, labels, api):
    x, y = make_case(task, labels)
    if name == "background" and labels == "mixed":
        y = y.clamp(max=2)  # labels < n_classes = 3
    params = PARAMS.get(name, {})
    expected = naive(name, x, y, reduction, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = run(name, x, y, reduction, api, **params)
    assert got.dtype == torch.float64
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, equal_nan=True)
    if labels == "empty" and reduction == "mean":
        # finite where the contract says so, NaN where PyTorch's mean over nothing is kept
        assert torch.isnan(got).item() == (name in ("background", "oe", "entropic"))


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("cross_entropy", "background", "entropic")])
def test_default_parameters_match_naive(name):
    x, y = make_case("cls")
    for reduction in ("mean", "sum", "none"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = make_module(name, reduction=reduction)(x, y)
        torch.testing.assert_close(got, naive(name, x, y, reduction), rtol=1e-10, atol=1e-12)


def test_pinned_d1_entropic_float64():
    x = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([0, -1])
    by_hand = ((math.log(math.exp(2) + 2) - 2) + math.log(math.e + 1 + math.exp(-1))) / 2
    assert abs(by_hand - 0.8235753653) < 1e-10
    for got in (L.entropic_open_set_loss(x, y), L.EntropicOpenSetLoss()(x, y)):
        assert got.dtype == torch.float64
        assert abs(got.item() - 0.8235753653) < 1e-10


@pytest.mark.parametrize("dtype,expected", [(torch.bfloat16, 0.82421875), (torch.float16, 0.82373047)])
def test_pinned_d2_entropic_half(dtype, expected):
    x = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, -1.0]], dtype=dtype)
    y = torch.tensor([0, -1])
    for got in (L.entropic_open_set_loss(x, y), L.EntropicOpenSetLoss()(x, y)):
        assert got.dtype == dtype
        assert got.item() == torch.tensor(expected, dtype=dtype).item()


def test_pinned_k3_energy_regularized():
    x = torch.zeros(2, 2)
    y = torch.tensor([0, -1])
    # E = -log 2; ID: log 2 + 0.1·(25 - log 2)²; OOD: relu(-7 + log 2)² = 0
    by_hand = math.log(2) + 0.1 * (25 - math.log(2)) ** 2
    assert abs(by_hand - 59.7754566) < 1e-6
    mean = L.EnergyRegularizedLoss()(x, y)
    none = L.EnergyRegularizedLoss(reduction="none")(x, y)
    assert abs(mean.item() - 59.7754566) < 1e-4
    torch.testing.assert_close(none, torch.tensor([59.7754566, 0.0]), rtol=1e-6, atol=0)
    assert none[1].item() == 0.0
    # 'mean' is the sum of separate group means, not the mean of 'none'
    assert abs(none.mean().item() - mean.item()) > 20


def test_pinned_k4_outlier_exposure_single_mean():
    x = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, -1.0]])
    y = torch.tensor([0, -1])
    got = L.OutlierExposureLoss(alpha=0.5)(x, y)
    assert abs(got.item() - 0.4716739) < 1e-6
    assert abs(got.item() - 0.9433477) > 0.4  # not the paper's two separate means


@pytest.mark.parametrize("task", ["cls", "seg"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_outlier_exposure_alpha_one_equals_entropic(task, reduction):
    x, y = make_case(task)
    a = L.OutlierExposureLoss(alpha=1.0, reduction=reduction)(x, y)
    b = L.EntropicOpenSetLoss(reduction=reduction)(x, y)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_outlier_exposure_without_ood_is_batch_mean_of_ce():
    x, y = make_case("cls", "all_id")
    expected = sum(math.log(sum(math.exp(v) for v in row.tolist())) - row[t].item() for row, t in zip(x, y)) / 7
    assert abs(L.outlier_exposure_loss(x, y).item() - expected) < 1e-12


# design-note criteria, with numbers worked out by hand -------------------------------------------

_X = [[2.0, 0.0, 0.0], [1.0, 0.0, -1.0], [0.0, 3.0, 0.0]]
_CE0 = math.log(math.exp(2) + 2) - 2  # row 0, y = 0: 0.2395447
_CE2 = math.log(math.exp(3) + 2) - 3  # row 2, y = 1: 0.0948717
_PI1 = math.e / (math.e + 1 + math.exp(-1))  # row 1 max softmax: 0.6652410
_PI2 = math.exp(3) / (math.exp(3) + 2)  # row 2 max softmax: 0.9094757


def test_confidence_penalty_hand_values():
    x = torch.tensor(_X, dtype=torch.float64)
    y = torch.tensor([0, -1, -3])
    assert abs(_CE0 - 0.2395447) < 1e-7 and abs(_PI1 - 0.6652410) < 1e-7
    lam = 0.1
    mean = _CE0 + lam * (_PI1 + _PI2) / 2
    assert abs(L.confidence_penalty_loss(x, y).item() - mean) < 1e-12
    assert abs(L.ConfidencePenaltyLoss()(x, y).item() - mean) < 1e-12
    total = _CE0 + lam * (_PI1 + _PI2)
    assert abs(L.confidence_penalty_loss(x, y, reduction="sum").item() - total) < 1e-12
    none = L.ConfidencePenaltyLoss(lambda_ood=0.25, reduction="none")(x, y)
    torch.testing.assert_close(none, torch.tensor([_CE0, 0.25 * _PI1, 0.25 * _PI2], dtype=torch.float64))
    # all ID: plain mean CE; all OOD: λ·mean π; empty: 0
    y_id = torch.tensor([0, 2, 1])
    ce1 = math.log(math.e + 1 + math.exp(-1)) + 1  # row 1, y = 2
    assert abs(L.confidence_penalty_loss(x, y_id).item() - (_CE0 + ce1 + _CE2) / 3) < 1e-12
    y_ood = torch.tensor([-1, -1, -2])
    pi0 = math.exp(2) / (math.exp(2) + 2)
    assert abs(L.confidence_penalty_loss(x, y_ood, 2.0).item() - 2.0 * (pi0 + _PI1 + _PI2) / 3) < 1e-12
    empty = L.confidence_penalty_loss(x[:0], y[:0])
    assert empty.shape == () and empty.item() == 0.0


def test_margin_confidence_hand_values():
    x = torch.tensor(_X, dtype=torch.float64)
    y = torch.tensor([0, -1, -3])
    # margin 0.5: both OOD rows above the margin; margin 0.7: only row 2 is penalised
    mean = _CE0 + ((_PI1 - 0.5) + (_PI2 - 0.5)) / 2
    assert abs(L.margin_confidence_loss(x, y).item() - mean) < 1e-12
    assert abs(L.MarginConfidenceLoss()(x, y).item() - mean) < 1e-12
    assert abs(L.margin_confidence_loss(x, y, 0.7).item() - (_CE0 + (_PI2 - 0.7) / 2)) < 1e-12
    total = _CE0 + (_PI2 - 0.7)
    assert abs(L.MarginConfidenceLoss(margin=0.7, reduction="sum")(x, y).item() - total) < 1e-12
    none = L.margin_confidence_loss(x, y, 0.7, reduction=None)
    torch.testing.assert_close(none, torch.tensor([_CE0, 0.0, _PI2 - 0.7], dtype=torch.float64))
    # below the margin the OOD row has no gradient; above it, d relu(π - m)/df = π·(e_argmax - softmax)
    xg = x.clone().requires_grad_(True)
    L.margin_confidence_loss(xg, y, 0.7, reduction="sum").backward()
    assert torch.equal(xg.grad[1], torch.zeros(3, dtype=torch.float64))
    p = torch.tensor([1.0, math.exp(3), 1.0], dtype=torch.float64) / (math.exp(3) + 2)
    torch.testing.assert_close(xg.grad[2], _PI2 * (torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64) - p))
    # all OOD: mean relu(π - m); no OOD: mean CE
    y_ood = torch.tensor([-1, -2, -1])
    pi0 = math.exp(2) / (math.exp(2) + 2)
    expected = ((pi0 - 0.7) + 0.0 + (_PI2 - 0.7)) / 3
    assert abs(L.margin_confidence_loss(x, y_ood, 0.7).item() - expected) < 1e-12


@pytest.mark.parametrize("name", ["cross_entropy", "energy", "conf_penalty", "margin_conf"])
def test_empty_batch_mean_is_attached_zero(name):
    x, y = make_case("cls", "empty")
    x.requires_grad_(True)
    out = run(name, x, y)
    assert out.shape == () and out.item() == 0.0
    out.backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("name", ["background", "oe", "entropic"])
def test_empty_batch_mean_is_nan(name):
    x, y = make_case("seg", "empty")
    assert torch.isnan(run(name, x, y))
    assert run(name, x, y, "sum").item() == 0.0
    assert run(name, x, y, "none").shape == (0, 3, 3)


# ----------------------------------------------------------------------------------------------
# segmentation == flattened pixels (§8.2)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SEG_NAMES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_segmentation_equals_flattened(name, reduction):
    x, y = make_case("seg")
    if name == "background":
        y = y.clamp(max=2)
    params = PARAMS.get(name, {})
    flat_x = x.permute(0, 2, 3, 1).reshape(-1, C)
    flat_y = y.reshape(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = run(name, x, y, reduction, **params)
        flat = run(name, flat_x, flat_y, reduction, **params)
    if reduction == "none":
        assert seg.shape == y.shape
        flat = flat.reshape(y.shape)
    torch.testing.assert_close(seg, flat, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_accepts_bcl(reduction):
    x = torch.randn(3, C, 5, dtype=torch.float64)
    y = (torch.arange(15) % 5 - 1).reshape(3, 5)
    got = L.cross_entropy(x, y, reduction)
    flat = L.cross_entropy(x.transpose(1, 2).reshape(-1, C), y.reshape(-1), reduction)
    torch.testing.assert_close(got, flat.reshape(got.shape))
    torch.testing.assert_close(got, naive("cross_entropy", x, y, reduction), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,task", [(n, t) for n in NAMES for t in ("cls", "seg") if (n, t) != ("logit_norm", "seg")]
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradients_match_naive(name, task, reduction):
    x, y = make_case(task, seed=3)
    if name == "background":
        y = y.clamp(max=2)
    params = PARAMS.get(name, {})
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = run(name, x1, y, reduction, **params)
    expected = naive(name, x2, y, reduction, **params)
    weights = torch.linspace(0.5, 1.5, got.numel(), dtype=torch.float64).reshape(got.shape)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(name, reduction):
    x, y = make_case("cls", batch=5, seed=5)
    if name == "background":
        y = y.clamp(max=2)
    params = PARAMS.get(name, {})
    x.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.autograd.gradcheck(lambda v: run(name, v, y, reduction, **params), (x,))


@pytest.mark.parametrize("name", SEG_NAMES)
def test_gradcheck_segmentation(name):
    x, y = make_case("seg", batch=1, seed=6)
    if name == "background":
        y = y.clamp(max=2)
    params = PARAMS.get(name, {})
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: run(name, v, y, "sum", **params), (x,))


# ----------------------------------------------------------------------------------------------
# warnings and all-OOD batches (§8.3)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_cross_entropy_module_warns_with_ood(task):
    x, y = make_case(task)
    with pytest.warns(UserWarning) as record:
        got = L.CrossEntropyLoss()(x, y)
    assert [str(w.message) for w in record] == [DROP_UNKNOWN_MESSAGE]
    assert all(w.category is UserWarning for w in record)
    torch.testing.assert_close(got, naive("cross_entropy", x, y), rtol=1e-10, atol=0)
    # the logits of OOD entries do not change the value
    ood = (y < 0).unsqueeze(1).expand_as(x)
    shifted = torch.where(ood, x + 100.0, x)
    with pytest.warns(UserWarning):
        assert L.CrossEntropyLoss()(shifted, y).item() == got.item()


@pytest.mark.parametrize("api", ["functional", "module"])
def test_logit_norm_warns_with_ood(api):
    x, y = make_case("cls")
    with pytest.warns(UserWarning) as record:
        got = run("logit_norm", x, y, "mean", api)
    assert [str(w.message) for w in record] == [DROP_UNKNOWN_MESSAGE]
    keep = [i for i in range(len(y)) if y[i] >= 0]
    torch.testing.assert_close(got, run("logit_norm", x[keep], y[keep], "mean", api))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("api", ["functional", "module"])
def test_no_warning_without_ood(name, api):
    x, y = make_case("cls", "all_id")
    no_warnings(lambda: run(name, x, y, "mean", api))


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("logit_norm",)])
def test_supervised_and_functional_ce_never_warn(name):
    x, y = make_case("seg")
    if name == "background":
        y = y.clamp(max=2)
    api = "functional" if name == "cross_entropy" else "module"
    for reduction in ("mean", "sum", "none"):
        no_warnings(lambda r=reduction: run(name, x, y, r, api))


@pytest.mark.parametrize("name", NAMES)
def test_no_warning_or_error_when_checks_off(name):
    config.data_checks = False
    x, y = make_case("cls")
    no_warnings(lambda: run(name, x, y, "mean", "module"))
    # labels without a logit column: NaN instead of an error
    y_bad = y.clone()
    y_bad[2] = 7  # y[2] was 0 (ID)
    out = no_warnings(lambda: run(name, x, y_bad, "mean", "module"))
    assert torch.isnan(out)


@pytest.mark.parametrize("name", ["cross_entropy", "logit_norm"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("api", ["functional", "module"])
def test_unsupervised_all_ood_is_zero_with_zero_gradients(name, reduction, api):
    x, y = make_case("cls", "all_ood")
    x.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run(name, x, y, reduction, api)
    assert out.shape == () and out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_cross_entropy_none_zero_fills_ood():
    x, y = make_case("seg")
    x.requires_grad_(True)
    out = L.cross_entropy(x, y, "none")
    assert torch.equal(out[y < 0], torch.zeros(int((y < 0).sum()), dtype=x.dtype))
    assert bool((out[y >= 0] > 0).all())
    out.sum().backward()
    ood_pixels = (y < 0).unsqueeze(1).expand_as(x)
    assert bool((x.grad[ood_pixels] == 0).all())


def test_logit_norm_none_has_length_n_id():
    x, y = make_case("cls")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = L.logit_norm_loss(x, y, reduction="none")
        empty = L.logit_norm_loss(x, -y.abs() - 1, reduction="none")
    assert out.shape == (int((y >= 0).sum()),)
    assert empty.shape == (0,)


# ----------------------------------------------------------------------------------------------
# dtypes (§2.10, §8.4)
# ----------------------------------------------------------------------------------------------

_DTYPE_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dtypes(name, dtype, reduction):
    x, y = make_case("cls" if name == "logit_norm" else "seg")
    if name == "background":
        y = y.clamp(max=2)
    params = PARAMS.get(name, {})
    xd = x.to(dtype).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = run(name, xd, y, reduction, "module", **params)
    assert got.dtype == dtype
    got.float().sum().backward()
    assert xd.grad.dtype == dtype
    # against a float64 evaluation of the same (rounded) inputs
    expected = naive(name, xd.detach().double(), y, reduction, **params)
    if dtype == torch.float64:
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(got.double(), expected, rtol=_DTYPE_RTOL[dtype], atol=1e-3 * _DTYPE_RTOL[dtype])


def test_half_input_is_computed_in_float32():
    # fp16 logits whose exp overflows fp16 (e^12 > 65504) still give the float32 value, rounded once
    x = torch.tensor([[12.0, 0.0], [11.0, 0.0]], dtype=torch.float16)
    y = torch.tensor([1, -1])
    expected = naive("energy", x.double(), y)
    got = L.energy_regularized_loss(x, y)
    assert torch.isfinite(got) and got.dtype == torch.float16
    assert abs(got.item() - expected.item()) / expected.item() < 1e-3


# ----------------------------------------------------------------------------------------------
# data checks: labels without a logit column (§2.11)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("api", ["functional", "module"])
def test_label_out_of_range_raises_with_checks_on(name, api):
    x, y = make_case("cls")
    y = y.clone()
    y[2] = C  # no column C
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "background":
            with pytest.raises(ValueError, match=f"^Target label to large: {C}$"):
                run(name, x, y, "mean", api)
        else:
            with pytest.raises(LabelOutOfRangeError) as info:
                run(name, x, y, "mean", api)
            assert isinstance(info.value, IndexError)
            assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["cross_entropy", "oe", "energy", "conf_penalty", "logit_norm"])
def test_label_out_of_range_is_nan_with_checks_off(name):
    config.data_checks = False
    x, y = make_case("cls")
    y = y.clone()
    y[2] = C + 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run(name, x, y, "none")
    bad = 2 if name != "logit_norm" else int((y[:2] >= 0).sum())
    assert torch.isnan(out[bad])
    assert bool(torch.isfinite(torch.cat([out[:bad], out[bad + 1 :]])).all())


def test_background_label_checks():
    x = torch.randn(4, 4, dtype=torch.float64)
    # the max label is reported, typo kept; the caller's targets are not modified
    y = torch.tensor([3, -1, 255, 0])
    with pytest.raises(ValueError, match="^Target label to large: 255$"):
        L.BackgroundClassLoss(3)(x, y)
    y = torch.tensor([0, -1, 2, -5])
    before = y.clone()
    L.BackgroundClassLoss(3)(x, y)
    assert torch.equal(y, before)
    # OOD with only N columns: IndexError (as a data check)
    with pytest.raises(IndexError):
        L.BackgroundClassLoss(4)(x, y)
    L.BackgroundClassLoss(4)(x, y.clamp(min=0))  # fine without OOD
    config.data_checks = False
    out = no_warnings(lambda: L.background_class_loss(x, y, 4, "none"))
    assert bool(torch.isnan(out[[1, 3]]).all()) and bool(torch.isfinite(out[[0, 2]]).all())
    # checks off, label N with N + 1 columns: the background column, no error
    out = no_warnings(lambda: L.background_class_loss(x, torch.tensor([3, 0, 0, 0]), 3, "none"))
    assert abs(out[0].item() - (math.log(sum(math.exp(v) for v in x[0].tolist())) - x[0, 3].item())) < 1e-12


def test_background_unbatched():
    x = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    expected = math.log(sum(math.exp(v) for v in x.tolist())) - 0.5
    assert abs(L.background_class_loss(x, torch.tensor(-1), 2).item() - expected) < 1e-12
    assert L.background_class_loss(x, torch.tensor(-1), 2, "none").shape == ()


# ----------------------------------------------------------------------------------------------
# reductions and bad inputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_invalid_reduction(name):
    x, y = make_case("cls", "all_id")
    with pytest.raises(ValueError):
        run(name, x, y, "average", "module")
    with pytest.raises(ValueError):
        run(name, x, y, "average", "functional")


@pytest.mark.parametrize("name", ["background", "logit_norm", "cross_entropy"])
def test_torch_reduction_messages(name):
    x, y = make_case("cls", "all_id")
    with pytest.raises(ValueError, match="^average is not a valid value for reduction$"):
        run(name, x, y, "average")
    if name != "cross_entropy":
        with pytest.raises(ValueError, match="^None is not a valid value for reduction$"):
            run(name, x, y, None, "module")


@pytest.mark.parametrize("name", ["oe", "entropic", "energy", "conf_penalty", "margin_conf"])
def test_other_reductions_raise_bare_value_error(name):
    x, y = make_case("cls", "all_id")
    with pytest.raises(ValueError) as info:
        run(name, x, y, "average")
    assert str(info.value) == ""


@pytest.mark.parametrize("name", ["oe", "entropic", "energy", "conf_penalty", "margin_conf"])
@pytest.mark.parametrize("shape", [(4, C, 5), (4, C, 2, 2, 2), (C,)])
def test_unsupported_rank(name, shape):
    x = torch.randn(shape)
    y = torch.zeros(shape[:1] + shape[2:], dtype=torch.long)
    with pytest.raises(ValueError, match=r"^Unsupported input shape: torch\.Size\(\[.*\]\)$"):
        run(name, x, y, "mean", "module")


def test_logit_norm_shape_errors():
    with pytest.raises(ValueError, match=r"^Expected targets of shape B, got \(2, 3, 3\)$"):
        L.LogitNorm()(torch.randn(2, C, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="Unsupported input shape"):
        L.logit_norm_loss(torch.randn(2, C, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        L.logit_norm_loss(torch.randn(3, C), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_name_the_argument(name):
    target_name = "target" if name in ("oe", "entropic", "logit_norm") else "targets"
    x, y = make_case("cls", "all_id")
    with pytest.raises(TypeError, match="logits"):
        run(name, x.long(), y)
    with pytest.raises(TypeError, match="logits"):
        run(name, [[0.0] * C], y)
    with pytest.raises(TypeError, match=target_name):
        run(name, x, y.double())
    with pytest.raises(ValueError, match=target_name) as info:
        run(name, x, y[:-1])
    assert "expected" in str(info.value).lower()
    if name != "logit_norm":
        xs, ys = make_case("seg", "all_id")
        with pytest.raises(ValueError, match=target_name):
            run(name, xs, ys[:, :2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mix_is_rejected():
    x, y = make_case("cls", "all_id")
    with pytest.raises(ValueError, match="device"):
        L.cross_entropy(x.cuda(), y)


def test_device_mix_is_rejected_meta():
    x, y = make_case("cls", "all_id")
    with pytest.raises(ValueError, match="logits on meta"):
        L.energy_regularized_loss(x.to("meta"), y)


# ----------------------------------------------------------------------------------------------
# metadata, state and construction (§6)
# ----------------------------------------------------------------------------------------------

_INFO = {
    "cross_entropy": ({Task.CLASSIFICATION, Task.SEGMENTATION}, False),
    "background": ({Task.CLASSIFICATION, Task.SEGMENTATION}, True),
    "oe": ({Task.CLASSIFICATION, Task.SEGMENTATION}, True),
    "entropic": ({Task.CLASSIFICATION, Task.SEGMENTATION}, True),
    "energy": ({Task.CLASSIFICATION, Task.SEGMENTATION}, True),
    "conf_penalty": ({Task.CLASSIFICATION, Task.SEGMENTATION}, True),
    "margin_conf": ({Task.CLASSIFICATION, Task.SEGMENTATION}, True),
    "logit_norm": ({Task.CLASSIFICATION}, False),
}


@pytest.mark.parametrize("name", NAMES)
def test_metadata_state_and_rng(name):
    state = torch.get_rng_state()
    module = make_module(name)
    assert torch.equal(torch.get_rng_state(), state)  # no draws at construction
    assert isinstance(module.info, LossInfo)
    tasks, supervised = _INFO[name]
    assert module.info.tasks == tasks
    assert module.info.inputs == {Representation.LOGITS}
    assert module.info.supervised is supervised
    assert dict(module.state_dict()) == {}
    assert list(module.parameters()) == [] and list(module.buffers()) == []
    clone = make_module(name)
    clone.load_state_dict(module.state_dict())


def test_constructor_signatures_and_attributes():
    m = L.EnergyRegularizedLoss(0.2, -20.0, -5.0, "sum")
    assert (m.alpha, m.m_in, m.m_out, m.reduction) == (0.2, -20.0, -5.0, "sum")
    m = L.BackgroundClassLoss(5, "none")
    assert (m.num_classes, m.reduction) == (5, "none")
    m = L.OutlierExposureLoss(0.3, "sum")
    assert (m.alpha, m.reduction) == (0.3, "sum")
    m = L.LogitNorm(0.04, "none")
    assert (m.t, m.reduction) == (0.04, "none")
    m = L.ConfidencePenaltyLoss(0.2, "sum")
    assert (m.lambda_ood, m.reduction) == (0.2, "sum")
    m = L.MarginConfidenceLoss(0.6, "none")
    assert (m.margin, m.reduction) == (0.6, "none")
    assert L.CrossEntropyLoss().reduction == "mean" and L.EntropicOpenSetLoss().reduction == "mean"


# ----------------------------------------------------------------------------------------------
# no host synchronisation (§2.11): fullgraph compilation of the main path
# ----------------------------------------------------------------------------------------------


COMPILE_CASES = [(n, "cls", "mean") for n in NAMES] + [(n, "seg", "none") for n in SEG_NAMES]
COMPILE_CASES.append(("logit_norm", "cls", "sum"))


@pytest.mark.parametrize("name,task,reduction", COMPILE_CASES)
def test_compiles_fullgraph_without_sync(name, task, reduction, compile_reset):
    config.data_checks = False
    x, y = make_case(task, seed=9)
    x = x.float()
    params = PARAMS.get(name, {})
    module = make_module(name, reduction=reduction, **params)

    def step(v, t):
        return module(v, t)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    got = compiled(x1, y)
    expected = step(x2, y)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
