"""Contract tests of the options of the row criteria (SPEC.md §2: ``weight=``, ``cost_matrix=``, ``ignore_index=``)
and of the shared prologue/epilogue ``prepare_rows`` / ``reduce_rows`` the fused kernels reuse.

Expected values come from a naive float64 evaluation written here (one Python iteration per entry, ``argmax``
by a Python ``list.index(max(...))``, ``log Σ exp`` taken literally) or from numbers worked out by hand; never
from the code under test.
"""

import inspect
import itertools
import math
import warnings

import pytest
import torch

from oodkernels import config
from oodkernels.reference import logits as L
from oodkernels.reference._common import DROP_UNKNOWN_MESSAGE
from oodkernels.reference._common import DataChecks
from oodkernels.reference._common import LabelOutOfRangeError

NAMES = ["cross_entropy", "background", "oe", "entropic", "energy", "conf_penalty", "margin_conf", "logit_norm"]
SEG_NAMES = [n for n in NAMES if n != "logit_norm"]
LABELS = ["mixed", "all_id", "all_ood", "empty"]
OPTIONS = ["weight", "cost", "ignore", "all"]
C = 4  # logit columns; BackgroundClassLoss has n_classes = 3, labels stay in [-2, 2]
VOID = 255

# non-default parameters that make every branch of the hinges active on N(0, 1.5²) logits
PARAMS = {
    "oe": {"alpha": 0.3},
    "energy": {"alpha": 0.5, "margin_in": -2.0, "margin_out": -1.0},
    "conf_penalty": {"lambda_ood": 0.7},
    "margin_conf": {"margin": 0.45},
    "logit_norm": {"t": 0.5},
}

KIND = {
    "cross_entropy": "cross_entropy",
    "background": "background",
    "oe": "outlier_exposure",
    "entropic": "entropic",
    "energy": "energy",
    "conf_penalty": "confidence_penalty",
    "margin_conf": "margin_confidence",
    "logit_norm": "logit_norm",
}


def reductions_of(name):
    return ["mean", "sum", "none"] if name in ("background", "logit_norm") else ["mean", "sum", "none", None]


# ----------------------------------------------------------------------------------------------
# the code under test, behind one calling convention
# ----------------------------------------------------------------------------------------------


def make_module(name, reduction="mean", cost_matrix=None, ignore_index=None, **params):
    opts = {"cost_matrix": cost_matrix, "ignore_index": ignore_index}
    if name == "cross_entropy":
        return L.CrossEntropyLoss(reduction, **opts)
    if name == "background":
        return L.BackgroundClassLoss(C - 1, reduction, **opts)
    if name == "oe":
        return L.OutlierExposureLoss(reduction=reduction, **params, **opts)
    if name == "entropic":
        return L.EntropicOpenSetLoss(reduction, **opts)
    if name == "energy":
        return L.EnergyRegularizedLoss(reduction=reduction, **params, **opts)
    if name == "conf_penalty":
        return L.ConfidencePenaltyLoss(reduction=reduction, **params, **opts)
    if name == "margin_conf":
        return L.MarginConfidenceLoss(reduction=reduction, **params, **opts)
    if name == "logit_norm":
        return L.LogitNorm(reduction=reduction, **params, **opts)
    raise KeyError(name)


def run(name, x, y, reduction="mean", api="functional", weight=None, cost=None, ignore_index=None, **params):
    if api == "module":
        module = make_module(name, reduction, cost, ignore_index, **params)
        return module(x, y) if weight is None else module(x, y, weight)
    opts = {"weight": weight, "cost_matrix": cost, "ignore_index": ignore_index}
    if name == "cross_entropy":
        return L.cross_entropy(x, y, reduction, **opts)
    if name == "background":
        return L.background_class_loss(x, y, C - 1, reduction, **opts)
    if name == "oe":
        return L.outlier_exposure_loss(x, y, reduction=reduction, **params, **opts)
    if name == "entropic":
        return L.entropic_open_set_loss(x, y, reduction, **opts)
    if name == "energy":
        return L.energy_regularized_loss(x, y, reduction=reduction, **params, **opts)
    if name == "conf_penalty":
        return L.confidence_penalty_loss(x, y, reduction=reduction, **params, **opts)
    if name == "margin_conf":
        return L.margin_confidence_loss(x, y, reduction=reduction, **params, **opts)
    if name == "logit_norm":
        return L.logit_norm_loss(x, y, reduction=reduction, **params, **opts)
    raise KeyError(name)


def quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def no_warnings(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


# ----------------------------------------------------------------------------------------------
# the naive evaluation: one Python iteration per entry, float64
# ----------------------------------------------------------------------------------------------


def _lse(row):
    return torch.log(torch.sum(torch.exp(row)))


def naive(name, logits, targets, reduction="mean", weight=None, cost=None, ignore_index=None, **params):
    """float64 value of criterion ``name`` with the options, from an explicit loop over the entries.

    Each kept entry has a term ``w_i·ℓ_i`` (``ℓ_i`` with its ID cross-entropy scaled by ``cost[ỹ_i, j*]``) and a
    group (ID or OOD); ignored entries have no term, no group and a 0 in ``'none'``.
    """
    logits = logits.double()
    zero = logits.new_zeros(())
    w_all = None if weight is None else torch.broadcast_to(weight.double(), targets.shape)
    groups = {"id": [], "ood": []}
    per_entry = []
    for idx in itertools.product(*[range(s) for s in targets.shape]):
        raw = logits[(idx[0], slice(None)) + tuple(idx[1:])]
        y = int(targets[idx])
        if ignore_index is not None and y == ignore_index:
            per_entry.append(zero)
            continue
        n_cols = raw.shape[0]
        values = raw.tolist()
        j_star = values.index(max(values))  # first index on ties
        row = raw
        if name == "logit_norm":
            row = raw / (params.get("t", 1.0) * (torch.sqrt(torch.sum(raw * raw)) + 1e-7))
        if name == "background" and y < 0:
            y = n_cols - 1
        omega = 1.0 if cost is None else float(cost[y, j_star]) if y >= 0 else None
        if y >= 0:
            term = omega * (_lse(row) - row[y])
            if name == "energy":
                alpha, m_in = params.get("alpha", 0.1), params.get("margin_in", -25.0)
                term = term + alpha * torch.clamp(-_lse(row) - m_in, min=0) ** 2
            group = "id"
        else:
            group = "ood"
            if name in ("cross_entropy", "logit_norm"):
                term = None
            elif name in ("oe", "entropic"):
                alpha = 1.0 if name == "entropic" else params.get("alpha", 0.5)
                term = alpha * (_lse(row) - torch.sum(row) / n_cols)
            elif name == "energy":
                alpha, m_out = params.get("alpha", 0.1), params.get("margin_out", -7.0)
                term = alpha * torch.clamp(m_out + _lse(row), min=0) ** 2
            else:
                pi = torch.max(torch.exp(row)) / torch.sum(torch.exp(row))
                if name == "conf_penalty":
                    term = params.get("lambda_ood", 0.1) * pi
                else:
                    term = torch.clamp(pi - params.get("margin", 0.5), min=0)
        if term is None:
            per_entry.append(zero)
            continue
        if w_all is not None:
            term = w_all[idx] * term
        groups[group].append(term)
        per_entry.append(term)

    def total(xs):
        return sum(xs, zero)

    def mean(xs):
        return total(xs) / len(xs) if xs else zero

    every = groups["id"] + groups["ood"]
    if name == "logit_norm" and reduction == "none":
        return torch.stack(groups["id"]) if groups["id"] else logits.new_zeros((0,))
    if reduction in ("none", None):
        return torch.stack(per_entry).reshape(targets.shape) if per_entry else logits.new_zeros(targets.shape)
    if reduction == "sum":
        return total(every)
    if name in ("cross_entropy", "logit_norm"):
        return mean(groups["id"])
    if name in ("background", "oe", "entropic"):
        return total(every) / len(every) if every else logits.new_tensor(float("nan"))
    return mean(groups["id"]) + mean(groups["ood"])


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


def make_case(task="cls", labels="mixed", option="all", dtype=torch.float64, seed=0):
    """Logits, targets and the option values ``(weight, cost, ignore_index)`` that ``option`` turns on."""
    g = torch.Generator().manual_seed(seed)
    if task == "cls":
        shape, tshape = (9, C), (9,)
    else:
        shape, tshape = (2, C, 3, 3), (2, 3, 3)
    if labels == "empty":
        shape, tshape = (0,) + shape[1:], (0,) + tshape[1:]
        y = torch.zeros(tshape, dtype=torch.long)
    else:
        y = make_labels(labels, tshape)
    x = (1.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    weight = cost = ignore_index = None
    if option in ("weight", "all"):
        weight = 0.25 + 2 * torch.rand(tshape, generator=g, dtype=torch.float64)
    if option in ("cost", "all"):
        # rows and columns both vary, so both y and the argmax change the factor
        cost = 0.5 + torch.arange(C * C, dtype=torch.float64).reshape(C, C) / 7
    if option in ("ignore", "all"):
        ignore_index = VOID
        flat = y.reshape(-1).clone()
        flat[3::4] = VOID
        y = flat.reshape(tshape)
    return x, y, weight, cost, ignore_index


def value_cases():
    for name in NAMES:
        for reduction in reductions_of(name):
            for labels in LABELS:
                for option in OPTIONS:
                    yield name, "cls", reduction, labels, option
                if name != "logit_norm":
                    yield name, "seg", reduction, labels, "all"


# ----------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,task,reduction,labels,option", list(value_cases()))
def test_values_match_naive(name, task, reduction, labels, option):
    x, y, w, cost, ii = make_case(task, labels, option)
    params = PARAMS.get(name, {})
    expected = naive(name, x, y, reduction, w, cost, ii, **params)
    for api in ("functional", "module"):
        got = quiet(lambda a=api: run(name, x, y, reduction, a, w, cost, ii, **params))
        assert got.dtype == torch.float64
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, equal_nan=True)
    if labels == "empty" and reduction == "mean":
        assert torch.isnan(got).item() == (name in ("background", "oe", "entropic"))


def test_cross_entropy_hand_values():
    # all-zero logits: every CE is log 2
    x = torch.zeros(3, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, VOID])
    w = torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64)
    ln2 = math.log(2)
    assert abs(L.cross_entropy(x, y, weight=w, ignore_index=VOID).item() - 2.5 * ln2) < 1e-14
    assert abs(L.cross_entropy(x, y, "sum", weight=w, ignore_index=VOID).item() - 5 * ln2) < 1e-14
    none = L.cross_entropy(x, y, "none", weight=w, ignore_index=VOID)
    assert torch.allclose(none, torch.tensor([2 * ln2, 3 * ln2, 0.0], dtype=torch.float64), rtol=0, atol=1e-14)
    # cost: argmax is column 0 in both rows, so ω = cost[0, 0] = 1 and cost[1, 0] = 3
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    cost = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    ce0, ce1 = math.log(1 + math.exp(-1)), math.log(math.e + 1)
    got = L.cross_entropy(x, y, "none", cost_matrix=cost)
    assert torch.allclose(got, torch.tensor([ce0, 3 * ce1], dtype=torch.float64), rtol=1e-14, atol=0)
    # ties: the first index wins, ω = cost[1, 0]
    x = torch.zeros(1, 2, dtype=torch.float64)
    assert abs(L.cross_entropy(x, torch.tensor([1]), cost_matrix=cost).item() - 3 * ln2) < 1e-14


def test_background_hand_values():
    # N = 1 ID class, 2 columns; zero logits: CE log 2 for every entry, OOD -> column 1
    x = torch.zeros(4, 2, dtype=torch.float64)
    y = torch.tensor([0, -1, VOID, -3])
    w = torch.tensor([1.0, 2.0, 7.0, 4.0], dtype=torch.float64)
    cost = torch.tensor([[1.0, 10.0], [5.0, 100.0]], dtype=torch.float64)
    ln2 = math.log(2)
    # ω = cost[ỹ, 0] (ties: first index): 1 for the ID entry, 5 for the OOD ones; the void entry drops out
    got = L.background_class_loss(x, y, 1, "none", weight=w, cost_matrix=cost, ignore_index=VOID)
    assert torch.allclose(got, ln2 * torch.tensor([1.0, 10.0, 0.0, 20.0], dtype=torch.float64), atol=1e-14)
    got = L.background_class_loss(x, y, 1, weight=w, cost_matrix=cost, ignore_index=VOID)
    assert abs(got.item() - 31 * ln2 / 3) < 1e-13
    # unbatched, with a 0-d weight
    got = L.background_class_loss(torch.zeros(2, dtype=torch.float64), torch.tensor(-1), 1, weight=torch.tensor(3.0))
    assert abs(got.item() - 3 * ln2) < 1e-14
    got = L.background_class_loss(torch.zeros(2), torch.tensor(-1), 1, "none", weight=torch.tensor(3.0))
    assert got.shape == ()


def test_energy_cost_scales_only_the_cross_entropy():
    # zero logits (C = 2): CE = log 2, E = −log 2; margins put every hinge at 1
    x = torch.zeros(2, 2, dtype=torch.float64)
    y = torch.tensor([1, -1])
    ln2 = math.log(2)
    cost = torch.tensor([[0.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
    params = {"alpha": 0.5, "margin_in": -ln2 - 1, "margin_out": 1 - ln2}
    got = L.energy_regularized_loss(x, y, **params, reduction="none", cost_matrix=cost)
    expected = torch.tensor([4 * ln2 + 0.5, 0.5], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    w = torch.tensor([2.0, 3.0], dtype=torch.float64)
    got = L.energy_regularized_loss(x, y, **params, weight=w, cost_matrix=cost)
    assert abs(got.item() - (2 * (4 * ln2 + 0.5) + 3 * 0.5)) < 1e-12


def test_confidence_terms_hand_values():
    # OOD rows: π = 1/2 for zero logits; weights scale the OOD penalty, cost does not
    x = torch.zeros(3, 2, dtype=torch.float64)
    y = torch.tensor([0, -1, -1])
    w = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    cost = torch.full((2, 2), 9.0, dtype=torch.float64)
    ln2 = math.log(2)
    got = L.confidence_penalty_loss(x, y, 0.5, weight=w, cost_matrix=cost)
    assert abs(got.item() - (9 * ln2 + (0.5 * 0.5 * 2 + 0.5 * 0.5 * 6) / 2)) < 1e-13
    got = L.margin_confidence_loss(x, y, 0.25, "sum", weight=w, cost_matrix=cost)
    assert abs(got.item() - (9 * ln2 + 0.25 * 2 + 0.25 * 6)) < 1e-13


def test_logit_norm_hand_values():
    # rows [3, 4] (norm 5) and [0, 0]; t = 1: the first row's normalised logits are [0.6, 0.8]
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, -1, VOID])
    w = torch.tensor([2.0, 3.0, 100.0, 100.0], dtype=torch.float64)
    cost = torch.tensor([[1.0, 7.0], [11.0, 13.0]], dtype=torch.float64)
    z0, z1 = 3 / (5 + 1e-7), 4 / (5 + 1e-7)  # the 1e-7 of ‖f‖₂ + 1e-7
    ce0 = math.log(math.exp(z0) + math.exp(z1)) - z0
    # argmax over the raw logits: row 0 -> 1 (ω = cost[0, 1] = 7), row 1 tie -> 0 (ω = cost[1, 0] = 11)
    expected = [2 * 7 * ce0, 3 * 11 * math.log(2)]
    got = quiet(lambda: L.logit_norm_loss(x, y, reduction="none", weight=w, cost_matrix=cost, ignore_index=VOID))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    got = quiet(lambda: L.logit_norm_loss(x, y, weight=w, cost_matrix=cost, ignore_index=VOID))
    assert abs(got.item() - sum(expected) / 2) < 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_neutral_options_reproduce_the_plain_value_exactly(name):
    params = PARAMS.get(name, {})
    for labels in LABELS:
        x, y, _, _, _ = make_case("cls", labels, option="none")
        for reduction in reductions_of(name):
            plain = quiet(lambda r=reduction, a=x, b=y: run(name, a, b, r, **params))
            variants = [
                {"weight": torch.ones(y.shape, dtype=torch.float64)},
                {"weight": torch.ones((), dtype=torch.float32)},
                {"cost": torch.ones(C, C, dtype=torch.float64)},
                {"ignore_index": 1000},
                {"ignore_index": -1000},
            ]
            for opts in variants:
                for api in ("functional", "module"):
                    got = quiet(lambda r=reduction, o=opts, a=api, u=x, v=y: run(name, u, v, r, a, **o, **params))
                    assert got.dtype == plain.dtype and got.shape == plain.shape
                    assert torch.equal(got, plain) or (torch.isnan(got).all() and torch.isnan(plain).all())


# ----------------------------------------------------------------------------------------------
# segmentation: per-pixel weights and void pixels
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SEG_NAMES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_segmentation_equals_flattened_pixels(name, reduction):
    x, y, w, cost, _ = make_case("seg", "mixed", "all")
    y = y.clone()
    y[0, 0, :] = VOID  # a void stripe
    params = PARAMS.get(name, {})
    flat_x = x.movedim(1, -1).reshape(-1, C)
    for weight in (w, w[:, :1, :1] + 0.5):  # per-pixel and per-sample weights
        got = quiet(lambda wt=weight: run(name, x, y, reduction, "module", wt, cost, VOID, **params))
        flat_w = torch.broadcast_to(weight, y.shape).reshape(-1)
        flat = run(name, flat_x, y.reshape(-1), reduction, "functional", flat_w, cost, VOID, **params)
        if reduction == "none":
            assert got.shape == y.shape
            assert torch.equal(got[0, 0, :], torch.zeros(3, dtype=got.dtype))  # void pixels are 0
            flat = flat.reshape(y.shape)
        torch.testing.assert_close(got, flat, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, naive(name, x, y, reduction, weight, cost, VOID, **params))


def test_ignored_pixels_with_out_of_range_label_raise_nothing():
    x, y, _, _, _ = make_case("seg", "all_id", "none")
    y = y.clone()
    y[1, 2, :] = VOID
    for name in ("cross_entropy", "background", "energy"):
        got = no_warnings(lambda n=name: run(n, x, y, "none", "module", ignore_index=VOID))
        assert bool(torch.isfinite(got).all())
        assert torch.equal(got[1, 2], torch.zeros(3, dtype=got.dtype))
    # without ignore_index the void label is an error (background: the reference's message)
    with pytest.raises(ValueError, match="^Target label to large: 255$"):
        run("background", x, y, "mean", "module")
    with pytest.raises(LabelOutOfRangeError):
        run("cross_entropy", x, y, "mean", "module")


# ----------------------------------------------------------------------------------------------
# ignore_index: counts, warnings, all-ignored batches
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["functional", "module"])
def test_ignore_minus_one_is_ignored_not_ood(api):
    x = torch.randn(6, C, dtype=torch.float64)
    y = torch.tensor([0, -1, 2, -1, 1, 3])
    keep = [0, 2, 4, 5]
    for name in NAMES:
        params = PARAMS.get(name, {})
        yy = y.clamp(max=2) if name == "background" else y  # labels < n_classes = 3
        for reduction in ("mean", "sum"):
            got = no_warnings(lambda n=name, r=reduction, t=yy, p=params: run(n, x, t, r, api, ignore_index=-1, **p))
            expected = no_warnings(lambda n=name, r=reduction, t=yy, p=params: run(n, x[keep], t[keep], r, api, **p))
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # other negative labels are still OOD: the unsupervised criteria still warn about them
    y2 = torch.tensor([0, -1, 2, -2, 1, 3])
    for name in ("logit_norm",) + (("cross_entropy",) if api == "module" else ()):
        with pytest.warns(UserWarning) as record:
            run(name, x, y2, "mean", api, ignore_index=-1)
        assert [str(r.message) for r in record] == [DROP_UNKNOWN_MESSAGE]


@pytest.mark.parametrize("name", NAMES)
def test_all_ignored_batch(name):
    x = torch.randn(4, C, dtype=torch.float64, requires_grad=True)
    y = torch.full((4,), VOID)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    params = PARAMS.get(name, {})
    for reduction in reductions_of(name):
        out = no_warnings(lambda r=reduction: run(name, x, y, r, "module", w, None, VOID, **params))
        if reduction in ("none", None):
            assert out.shape == ((0,) if name == "logit_norm" else (4,))
            assert torch.equal(out, torch.zeros_like(out))
            continue
        if reduction == "mean" and name in ("background", "oe", "entropic"):
            assert torch.isnan(out)  # PyTorch's mean over no entries
            continue
        assert out.shape == () and out.item() == 0.0
        gx, gw = torch.autograd.grad(out, (x, w))
        assert torch.equal(gx, torch.zeros_like(x)) and torch.equal(gw, torch.zeros_like(w))


@pytest.mark.parametrize("name", NAMES)
def test_ignored_entries_get_no_gradient_and_nan_weight_there_is_harmless(name):
    x, y, w, cost, _ = make_case("cls", "mixed", "all")
    x.requires_grad_(True)
    w = w.clone()
    void = y == VOID
    w[void] = float("nan")  # e.g. an undefined weight on void pixels
    w.requires_grad_(True)
    out = quiet(lambda: run(name, x, y, "sum", "module", w, cost, VOID, **PARAMS.get(name, {})))
    assert torch.isfinite(out)
    gx, gw = torch.autograd.grad(out, (x, w))
    assert torch.equal(gx[void], torch.zeros_like(gx[void]))
    assert torch.equal(gw[void], torch.zeros_like(gw[void]))
    assert bool(torch.isfinite(gx).all()) and bool(torch.isfinite(gw).all())


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,task", [(n, "cls") for n in NAMES] + [(n, "seg") for n in SEG_NAMES])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradients_wrt_logits_and_weight_match_naive(name, task, reduction):
    x, y, w, cost, ii = make_case(task, "mixed", "all", seed=3)
    params = PARAMS.get(name, {})
    x1, w1 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    x2, w2 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    got = quiet(lambda: run(name, x1, y, reduction, "module", w1, cost, ii, **params))
    expected = naive(name, x2, y, reduction, w2, cost, ii, **params)
    g = torch.linspace(0.5, 1.5, got.numel(), dtype=torch.float64).reshape(got.shape)
    got_grads = torch.autograd.grad((got * g).sum(), (x1, w1))
    expected_grads = torch.autograd.grad((expected * g).sum(), (x2, w2))
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_weight_gradient_is_the_per_entry_term(name):
    x, y, w, cost, ii = make_case("cls", "mixed", "all", seed=5)
    params = PARAMS.get(name, {})
    w = w.clone().requires_grad_(True)
    out = quiet(lambda: run(name, x, y, "sum", "functional", w, cost, ii, **params))
    (gw,) = torch.autograd.grad(out, w)
    # with 'sum', ∂/∂w_i = ℓ_i: the unweighted per-entry terms (0 at ignored and dropped entries)
    plain = naive(name, x, y, "none", None, cost, ii, **params)
    if name == "logit_norm":
        expected = torch.zeros_like(w)
        expected[(y >= 0) & (y != VOID)] = plain
    else:
        expected = plain
    torch.testing.assert_close(gw, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_cost_matrix_is_not_differentiated(name):
    x, y, w, cost, ii = make_case("cls", "mixed", "all", seed=6)
    cost = cost.clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    params = PARAMS.get(name, {})
    out = quiet(lambda: run(name, x, y, "mean", "functional", w, cost, ii, **params))
    out.backward()
    assert cost.grad is None
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    # ω is a constant: the logits gradient is that of the naive loss with ω as plain numbers
    x2 = x.detach().clone().requires_grad_(True)
    expected = naive(name, x2, y, "mean", w, cost.detach(), ii, **params)
    (g2,) = torch.autograd.grad(expected, x2)
    torch.testing.assert_close(x.grad, g2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_logits_and_weight(name):
    x, y, w, cost, ii = make_case("cls", "mixed", "all", seed=7)
    x = x[:6].clone().requires_grad_(True)
    y, w = y[:6], w[:6].clone().requires_grad_(True)
    params = PARAMS.get(name, {})
    config.data_checks = False  # gradcheck calls many times; the checks are exercised elsewhere
    reduction = "sum" if name == "logit_norm" else "mean"
    assert torch.autograd.gradcheck(
        lambda a, b: run(name, a, y, reduction, "functional", b, cost, ii, **params), (x, w)
    )


# ----------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)])
def test_weight_and_cost_never_change_the_output_dtype(name, dtype, weight_dtype):
    x, y, w, cost, ii = make_case("cls", "mixed", "all", dtype=dtype)
    params = PARAMS.get(name, {})
    w, cost = w.to(weight_dtype), cost.to(weight_dtype)
    w.requires_grad_(True)
    out = quiet(lambda: run(name, x, y, "mean", "module", w, cost, ii, **params))
    assert out.dtype == dtype
    expected = naive(name, x.double(), y, "mean", w.detach().double(), cost.double(), ii, **params)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    out.backward()
    assert w.grad.dtype == weight_dtype


# ----------------------------------------------------------------------------------------------
# bad inputs name the argument
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("api", ["functional", "module"])
def test_bad_options_name_the_argument(name, api):
    x, y, _, _, _ = make_case("cls", "all_id", "none")
    with pytest.raises(ValueError, match="^weight: .*broadcastable"):
        run(name, x, y, "mean", api, weight=torch.ones(y.numel() + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="^weight: "):
        run(name, x, y, "mean", api, weight=torch.ones(2, y.numel(), dtype=torch.float64))
    with pytest.raises(TypeError, match="^weight: "):
        run(name, x, y, "mean", api, weight=torch.ones(y.shape, dtype=torch.long))
    with pytest.raises(TypeError, match="^weight: "):
        run(name, x, y, "mean", api, weight=[1.0] * y.numel())
    with pytest.raises(ValueError, match=r"^cost_matrix: expected shape \(4, 4\)"):
        run(name, x, y, "mean", "functional", cost=torch.ones(C, C + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="^cost_matrix: "):
        run(name, x, y, "mean", api, cost=torch.ones(C + 1, C + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="^cost_matrix: "):
        run(name, x, y, "mean", api, cost=torch.ones(C, C, dtype=torch.long))
    for bad in (1.5, True, "255", torch.tensor(3)):
        with pytest.raises(TypeError, match="^ignore_index: "):
            run(name, x, y, "mean", api, ignore_index=bad)


def test_module_constructor_rejects_a_non_square_cost_matrix():
    with pytest.raises(ValueError, match="^cost_matrix: "):
        L.CrossEntropyLoss(cost_matrix=torch.ones(3, 4))
    with pytest.raises(ValueError, match="^cost_matrix: "):
        L.LogitNorm(cost_matrix=torch.ones(3))


def test_weight_on_another_device_is_rejected():
    x, y, _, _, _ = make_case("cls", "all_id", "none")
    with pytest.raises(ValueError, match="weight on meta"):
        L.cross_entropy(x, y, weight=torch.ones(y.shape, device="meta"))
    with pytest.raises(ValueError, match="cost_matrix on meta"):
        L.cross_entropy(x, y, cost_matrix=torch.ones(C, C, device="meta"))


# ----------------------------------------------------------------------------------------------
# modules: signatures, buffers, state_dict
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_module_options_signature_and_buffer(name):
    cls = type(make_module(name))
    params = inspect.signature(cls.__init__).parameters
    names = list(params)
    assert names[-3:] == ["cost_matrix", "ignore_index", "process_group"]
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY and params[n].default is None for n in names[-3:])
    forward = inspect.signature(cls.forward).parameters
    assert list(forward)[-1] == "weight" and forward["weight"].default is None
    cost = torch.rand(C, C)
    module = make_module(name, cost_matrix=cost, ignore_index=VOID)
    assert module.ignore_index == VOID
    assert module.process_group is None
    assert dict(module.state_dict()) == {}  # non-persistent: pytorch-ood's keys are kept
    assert [n for n, _ in module.named_buffers()] == ["cost_matrix"]
    assert module.cost_matrix is cost
    module.double()
    assert module.cost_matrix.dtype == torch.float64
    module.to("meta")
    assert module.cost_matrix.device.type == "meta"
    plain = make_module(name)
    assert plain.cost_matrix is None and plain.ignore_index is None
    assert list(plain.buffers()) == []
    plain.load_state_dict(module.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_functional_options_are_keyword_only(name):
    fn = {
        "cross_entropy": L.cross_entropy,
        "background": L.background_class_loss,
        "oe": L.outlier_exposure_loss,
        "entropic": L.entropic_open_set_loss,
        "energy": L.energy_regularized_loss,
        "conf_penalty": L.confidence_penalty_loss,
        "margin_conf": L.margin_confidence_loss,
        "logit_norm": L.logit_norm_loss,
    }[name]
    params = inspect.signature(fn).parameters
    options = ["weight", "cost_matrix", "ignore_index"] + (["warn_ood"] if name == "cross_entropy" else [])
    options.append("process_group")
    assert list(params)[-len(options) :] == options
    if name == "cross_entropy":
        assert params["warn_ood"].kind is inspect.Parameter.KEYWORD_ONLY and params["warn_ood"].default is False
    for n in ("weight", "cost_matrix", "ignore_index", "process_group"):
        assert params[n].kind is inspect.Parameter.KEYWORD_ONLY and params[n].default is None
    for n in ("weight", "cost_matrix", "ignore_index", "process_group"):
        assert f":param {n}:" in fn.__doc__


# ----------------------------------------------------------------------------------------------
# prepare_rows / reduce_rows (the parts the fused kernels reuse)
# ----------------------------------------------------------------------------------------------


def test_prepare_rows_fields():
    x = torch.randn(2, C, 1, 3, dtype=torch.float16)
    y = torch.tensor([[[0, -1, VOID]], [[2, -3, 1]]], dtype=torch.int32)
    w = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64)
    cost = torch.rand(C, C, dtype=torch.float64, requires_grad=True)
    setup = L.prepare_rows(
        "background", x, y, reduction="mean", weight=w, cost_matrix=cost, ignore_index=VOID, n_classes=3
    )
    assert (setup.out, setup.acc) == (torch.float16, torch.float32)
    assert setup.targets.dtype == torch.int64
    assert setup.targets.tolist() == [0, 3, VOID, 2, 3, 1]  # OOD -> N, void kept
    assert setup.valid.tolist() == [True, True, False, True, True, True]
    assert setup.is_id.tolist() == [True, True, False, True, True, True]
    assert setup.is_ood.tolist() == [False] * 6
    assert setup.weight.dtype == torch.float32 and setup.weight.tolist() == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    assert setup.cost.dtype == torch.float32 and not setup.cost.requires_grad
    assert setup.shape == y.shape and setup.ignore_index == VOID
    setup = L.prepare_rows("energy", x, y, reduction="none", ignore_index=-1)
    assert setup.targets.tolist() == [0, -1, VOID, 2, -3, 1]
    assert setup.valid.tolist() == [True, False, True, True, True, True]
    assert setup.is_id.tolist() == [True, False, True, True, False, True]
    assert setup.is_ood.tolist() == [False, False, False, False, True, False]
    assert setup.weight is None and setup.cost is None
    # background with ignore_index=-1: ignored entries keep their label, only OOD ones go to N
    setup = L.prepare_rows("background", x, y, reduction="sum", ignore_index=-1, n_classes=3)
    assert setup.targets.tolist() == [0, -1, VOID, 2, 3, 1]
    assert setup.is_id.tolist() == [True, False, True, True, True, True]


def test_prepare_rows_queues_checks_without_flushing():
    x = torch.randn(3, C)
    y = torch.tensor([0, -1, 7])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup = L.prepare_rows("logit_norm", x, y, reduction="mean", targets_name="target")
    assert isinstance(setup.checks, DataChecks)
    with pytest.warns(UserWarning, match="Discarding samples"), pytest.raises(LabelOutOfRangeError, match="target"):
        setup.checks.flush()
    # the label of an ignored entry is never checked
    setup = L.prepare_rows("cross_entropy", x, y, reduction="mean", ignore_index=7, warn_ood=True)
    with pytest.warns(UserWarning, match="Discarding samples"):
        setup.checks.flush()


def test_prepare_rows_errors():
    x, y = torch.randn(3, C), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="kind"):
        L.prepare_rows("nope", x, y, reduction="mean")
    with pytest.raises(ValueError, match="n_classes"):
        L.prepare_rows("background", x, y, reduction="mean")
    with pytest.raises(ValueError, match="^None is not a valid value for reduction$"):
        L.prepare_rows("background", x, y, reduction=None, n_classes=3)
    L.prepare_rows("cross_entropy", x, y, reduction=None)  # None means 'none' here
    with pytest.raises(ValueError, match="^$"):
        L.prepare_rows("energy", x, y, reduction="average")


def _setup(kind, y, weight=None, ignore_index=None):
    x = torch.zeros(len(y), C, dtype=torch.float64)
    n = 3 if kind == "background" else None
    targets = torch.tensor(y, dtype=torch.long)
    return L.prepare_rows(kind, x, targets, reduction="sum", weight=weight, ignore_index=ignore_index, n_classes=n)


@pytest.mark.parametrize("kind", L.KINDS)
def test_reduce_rows_conventions(kind):
    y = [0, -1, 2, VOID, -2, 1]
    v = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], dtype=torch.float64)
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    setup = _setup(kind, y, weight=w, ignore_index=VOID)
    # the (non-zero) value at the ignored entry, and at OOD entries of the ID-only kinds, is masked here
    terms = {
        "id_only": ([1.0, 4.0, 16.0], []),  # 32·0.5 = 16
        "all": ([1.0, 4.0, 16.0], [2.0, 16.0]),
    }
    id_t, ood_t = terms["id_only" if kind in ("cross_entropy", "logit_norm") else "all"]
    if kind == "background":
        id_t, ood_t = id_t + ood_t, []
    every = id_t + ood_t
    assert L.reduce_rows(kind, v, setup, "sum").item() == sum(every)
    mean = L.reduce_rows(kind, v, setup, "mean").item()
    if kind in ("cross_entropy", "logit_norm"):
        assert mean == sum(id_t) / 3
    elif kind in ("background", "outlier_exposure", "entropic"):
        assert mean == sum(every) / 5
    else:
        assert mean == sum(id_t) / 3 + sum(ood_t) / 2
    none = L.reduce_rows(kind, v, setup, "none")
    if kind == "logit_norm":
        assert none.tolist() == [1.0, 4.0, 16.0]
    elif kind == "cross_entropy":
        assert none.tolist() == [1.0, 0.0, 4.0, 0.0, 0.0, 16.0]
    else:
        assert none.tolist() == [1.0, 2.0, 4.0, 0.0, 16.0, 16.0]


def test_reduce_rows_empty_groups():
    empty = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    for kind in L.KINDS:
        setup = _setup(kind, [])
        mean = L.reduce_rows(kind, empty, setup, "mean")
        if kind in ("background", "outlier_exposure", "entropic"):
            assert torch.isnan(mean)
        else:
            assert mean.item() == 0.0 and mean.requires_grad  # attached
    with pytest.raises(ValueError, match="^None is not a valid value for reduction$"):
        L.reduce_rows("logit_norm", empty, _setup("logit_norm", []), None)


# ----------------------------------------------------------------------------------------------
# no host synchronisation: fullgraph compilation with every option
# ----------------------------------------------------------------------------------------------


COMPILE_CASES = [(n, "cls", "mean") for n in NAMES] + [(n, "seg", "none") for n in ("background", "energy")]


@pytest.mark.parametrize("name,task,reduction", COMPILE_CASES)
def test_compiles_fullgraph_with_options(name, task, reduction, compile_reset):
    config.data_checks = False
    x, y, w, cost, ii = make_case(task, "mixed", "all", dtype=torch.float32, seed=9)
    w = w.float()
    module = make_module(name, reduction, cost.float(), ii, **PARAMS.get(name, {}))

    def step(v, t, weight):
        return module(v, t, weight)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, w1 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    x2, w2 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    got = compiled(x1, y, w1)
    expected = step(x2, y, w2)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
