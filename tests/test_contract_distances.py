"""Contract tests of the distance-based criteria (LOSS_CONTRACT.md §3.11-3.14, §8): CACLoss,
CenterLoss, IILoss and MCHADLoss of ``oodkernels.reference.distances``.

Expected values come from the naive per-row formulas below (written from the contract, in float64)
or from the pinned numbers of §8.5; never from the code under test.
"""

import copy
import logging
import math
import warnings

import pytest
import torch

from oodkernels import config
from oodkernels.reference._common import DROP_UNKNOWN_MESSAGE
from oodkernels.reference._common import LabelOutOfRangeError
from oodkernels.reference._common import Representation
from oodkernels.reference._common import ShapeError
from oodkernels.reference._common import Task
from oodkernels.reference.distances import II_SINGLE_CLASS_MESSAGE
from oodkernels.reference.distances import CACLoss
from oodkernels.reference.distances import CenterLoss
from oodkernels.reference.distances import CenterRegularizationLoss
from oodkernels.reference.distances import IILoss
from oodkernels.reference.distances import MCHADLoss
from oodkernels.reference.distances import cac_distance_loss
from oodkernels.reference.distances import center_distance_loss
from oodkernels.reference.distances import mchad_distance_loss

B, C, D = 8, 3, 5
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
II_MESSAGE = "IILoss: fewer than two classes present in the batch; the inter-class separation term is set to 0."


def labels(pattern, b=B, c=C):
    if pattern == "mixed":
        return (torch.arange(b) % (c + 1)) - 1
    if pattern == "all_id":
        return torch.arange(b) % c
    if pattern == "all_ood":
        return -1 - torch.arange(b)
    if pattern == "empty":
        return torch.zeros(0, dtype=torch.long)
    raise AssertionError(pattern)


def n_rows(pattern):
    return 0 if pattern == "empty" else B


# ----------------------------------------------------------------------------------------------
# naive formulas (float64, one row at a time)
# ----------------------------------------------------------------------------------------------


def naive_cac(d, y, alpha=1.0):
    rows = [i for i in range(len(y)) if y[i] >= 0]
    if not rows:
        return d.sum() * 0
    anchor = sum(d[i, y[i]] for i in rows) / len(rows)
    tuplet = 0
    for i in rows:
        yi = int(y[i])
        s = sum(torch.exp(torch.clamp(d[i, yi] - d[i, c], max=50.0)) for c in range(d.shape[1]) if c != yi)
        tuplet = tuplet + torch.log(1 + s)
    return alpha * anchor + tuplet / len(rows)


def naive_center(d, y, r=0.0):
    rows = [i for i in range(len(y)) if y[i] >= 0]
    if not rows:
        return d.sum() * 0
    n_cls = d.shape[1]
    total = 0
    for i in rows:
        for c in range(n_cls):
            if c == int(y[i]):
                total = total + torch.clamp(torch.relu(d[i, c] - r), 1e-12, 1e12)
            else:
                total = total + 1e-12
    return total / (len(rows) * n_cls)


def naive_mchad(d, y, r=0.0, m=0.0, wc=1.0, wn=1.0, wo=1.0):
    known = [i for i in range(len(y)) if y[i] >= 0]
    unknown = [i for i in range(len(y)) if y[i] < 0]
    lam = naive_center(d[known], y[known], r) if known else d.sum() * 0
    delta = d.sum() * 0
    if known:
        delta = sum(torch.logsumexp(-d[i], 0) + d[i, y[i]] for i in known) / len(known)
    theta = d.sum() * 0
    for i in unknown:
        for c in range(d.shape[1]):
            theta = theta + torch.relu(m**2 - d[i, c] ** 2)
    return wc * lam + wn * delta + wo * theta


def naive_ii(x, y, alpha=1.0, centers=None):
    """II loss; ``centers=None``: batch means (training), else the given (eval)."""
    rows = [i for i in range(len(y)) if y[i] >= 0]
    if not rows:
        return x.sum() * 0
    present = sorted({int(y[i]) for i in rows})
    if centers is None:
        mu = {c: sum(x[i] for i in rows if y[i] == c) / sum(1 for i in rows if y[i] == c) for c in present}
    else:
        mu = {c: centers[c] for c in present}
    intra = sum(((x[i] - mu[int(y[i])]) ** 2).sum() for i in rows) / len(rows)
    if len(present) < 2:
        return intra
    sep = min(torch.clamp(((mu[a] - mu[b]) ** 2).sum(), max=1e24) for a in present for b in present if a != b)
    return intra - alpha * sep


# ----------------------------------------------------------------------------------------------
# a small registry so that the shared contract points run over every criterion
# ----------------------------------------------------------------------------------------------


def make(name, **kw):
    if name == "cac":
        return CACLoss(C, **kw)
    if name == "center":
        return CenterLoss(C, D, **kw)
    if name == "ii":
        return IILoss(C, D, **kw)
    if name == "mchad":
        return MCHADLoss(C, D, radius=0.5, margin=2.0, **kw)
    raise AssertionError(name)


def naive(name, inp, y):
    if name == "cac":
        return naive_cac(inp, y)
    if name == "center":
        return naive_center(inp, y)
    if name == "ii":
        return naive_ii(inp, y)
    return naive_mchad(inp, y, r=0.5, m=2.0)


def make_input(name, b=B, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    width = D if name == "ii" else C
    x = torch.randn(b, width, generator=g, dtype=torch.float64)
    if name != "ii":
        x = x.abs() * 2  # distances are >= 0
    return x.to(dtype)


NAMES = ["cac", "center", "ii", "mchad"]
DROP_UNKNOWN = ["cac", "center", "ii"]


def no_warnings(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


def recorded(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in rec]


# ----------------------------------------------------------------------------------------------
# values over the label patterns, warnings, all-OOD / empty batches
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood", "empty"])
@pytest.mark.parametrize("name", NAMES)
def test_values_and_warnings_per_label_pattern(name, pattern):
    y = labels(pattern)
    inp = make_input(name, b=n_rows(pattern)).requires_grad_()
    crit = make(name)
    out, msgs = recorded(lambda: crit(inp, y))
    assert out.shape == () and out.dtype == torch.float64
    expected = naive(name, inp.detach(), y)
    torch.testing.assert_close(out.detach(), torch.as_tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    has_ood = bool((y < 0).any())
    if name in DROP_UNKNOWN and has_ood:
        assert msgs == [DROP_UNKNOWN_MESSAGE]
    else:
        assert msgs == []
    out.backward()
    if pattern in ("all_ood", "empty") and name != "mchad":
        assert out.item() == 0 and out.grad_fn is not None
        assert torch.equal(inp.grad, torch.zeros_like(inp))


@pytest.mark.parametrize("name", DROP_UNKNOWN)
def test_ood_rows_do_not_change_value_and_get_zero_gradient(name):
    y = labels("mixed")
    inp = make_input(name).requires_grad_()
    with torch.no_grad():
        poisoned = inp.detach().clone()
        poisoned[y < 0] = float("inf")  # values in OOD rows are never read
    poisoned.requires_grad_()
    with pytest.warns(UserWarning, match="Discarding samples"):
        a = make(name)(inp, y)
    with pytest.warns(UserWarning, match="Discarding samples"):
        b = make(name)(poisoned, y)
    torch.testing.assert_close(a, b)
    b.backward()
    assert torch.equal(poisoned.grad[y < 0], torch.zeros_like(poisoned.grad[y < 0]))
    keep = y >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = make(name)(inp.detach()[keep], y[keep])
    torch.testing.assert_close(a.detach(), c)


@pytest.mark.parametrize("name", NAMES)
def test_no_warning_without_ood_and_none_with_checks_off(name):
    no_warnings(lambda: make(name)(make_input(name), labels("all_id")))
    config.data_checks = False
    no_warnings(lambda: make(name)(make_input(name), labels("mixed")))


def test_mchad_never_warns():
    for pattern in ("mixed", "all_ood", "all_id"):
        no_warnings(lambda p=pattern: make("mchad")(make_input("mchad"), labels(p)))


# ----------------------------------------------------------------------------------------------
# pinned values (§8.5)
# ----------------------------------------------------------------------------------------------


def test_pinned_a1_cac_paper_tuplet():
    d = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    out = CACLoss(3)(d, torch.tensor([0, 1]))
    assert out.item() == pytest.approx(1 + math.log(1 + math.exp(-1) + math.exp(-2)), rel=1e-6)
    assert out.item() == pytest.approx(1.4076060, rel=1e-6)
    assert out.item() != pytest.approx(1.8103093, rel=1e-3)  # pytorch-ood 0.4.0


def test_pinned_a2_last_class():
    assert CACLoss(3)(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([2])).item() == pytest.approx(5.4076060, rel=1e-6)


def test_pinned_a3_exponent_clamp():
    d = torch.tensor([[100.0, 0.0, 0.0]], requires_grad=True)
    out = CACLoss(3)(d, torch.tensor([0]))
    assert out.item() == pytest.approx(100 + math.log(1 + 2 * math.exp(50)), rel=1e-6)
    assert out.item() == pytest.approx(150.6931472, rel=1e-6)
    out.backward()
    torch.testing.assert_close(d.grad, torch.tensor([[1.0, 0.0, 0.0]]))  # 0 above the clamp


def test_pinned_b1_b2_cac_scores():
    d = torch.tensor([[100.0, 100.0, 100.0, 100.0], [0.01, 2.0, 2.0, 2.0]])
    torch.testing.assert_close(CACLoss.score(d), torch.tensor([-75.0, -1.8061177]))
    torch.testing.assert_close(CACLoss.rejection_score(d), torch.tensor([75.0, 0.0029082]), rtol=1e-4, atol=1e-7)
    # b2 from the formula γ_c = d_c (1 − softmin(d)_c)
    e = [math.exp(-v) for v in (0.01, 2.0, 2.0, 2.0)]
    gamma = [v * (1 - ei / sum(e)) for v, ei in zip((0.01, 2.0, 2.0, 2.0), e)]
    assert CACLoss.rejection_score(d)[1].item() == pytest.approx(min(gamma), rel=1e-5)
    assert CACLoss.score(d)[1].item() == pytest.approx(-max(gamma), rel=1e-6)


def test_pinned_k1_center():
    crit = CenterLoss(3, 3, radius=1.0)
    out = crit(torch.tensor([[1.5, 9.0, 9.0]]), torch.tensor([0]))
    assert out.item() == pytest.approx((0.5 + 2e-12) / 3, rel=1e-6)
    out64 = crit(torch.tensor([[1.5, 9.0, 9.0]], dtype=torch.float64), torch.tensor([0]))
    assert out64.item() == pytest.approx((0.5 + 2e-12) / 3, rel=1e-14)


def test_pinned_k2_mchad():
    d = torch.tensor([[0.5, 3, 3], [3, 1.5, 3], [1, 1, 3], [5, 0.5, 0.2]], dtype=torch.float64)
    y = torch.tensor([0, 1, -1, -1])
    out = no_warnings(lambda: MCHADLoss(3, 3, radius=1, margin=2)(d, y))
    assert out.item() == pytest.approx(14.0538281, rel=1e-7)
    lam = (0.5 + 1e-12 + 4e-12) / 6
    delta = (math.log(math.exp(-0.5) + 2 * math.exp(-3)) + 0.5 + math.log(math.exp(-1.5) + 2 * math.exp(-3)) + 1.5) / 2
    theta = 3 + 3 + 0 + 0 + 3.75 + 3.96
    assert lam == pytest.approx(0.0833333, rel=1e-5) and delta == pytest.approx(0.2604948, rel=1e-6)
    assert out.item() == pytest.approx(lam + delta + theta, rel=1e-12)
    assert mchad_distance_loss(d, y, radius=1, margin=2).item() == pytest.approx(lam + delta + theta, rel=1e-12)


def test_pinned_c1_ii_single_class():
    crit = IILoss(2, 1)
    x = torch.tensor([[0.0], [2.0]])
    with pytest.warns(UserWarning) as rec:
        out = crit(x, torch.tensor([0, 0]))
    assert [str(w.message) for w in rec] == [II_MESSAGE]
    assert II_SINGLE_CLASS_MESSAGE == II_MESSAGE
    assert out.item() == 1.0
    assert torch.equal(crit.running_centers.running_centers, torch.tensor([[1.0], [0.0]]))
    assert torch.equal(crit.running_centers.num_batches_tracked, torch.tensor([1.0]))
    # once per instance
    no_warnings(lambda: crit(x, torch.tensor([1, 1])))
    with pytest.warns(UserWarning, match="fewer than two classes"):
        IILoss(2, 1)(x, torch.tensor([0, 0]))
    config.data_checks = False
    no_warnings(lambda: IILoss(2, 1)(x, torch.tensor([0, 0])))


def test_pinned_c2_ii_detached_state():
    crit = IILoss(3, 2)
    x = torch.randn(6, 2, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    crit(x, y).backward()
    assert x.grad is not None
    r = crit.running_centers.running_centers
    assert r.grad_fn is None and not r.requires_grad
    clone = copy.deepcopy(crit)
    assert torch.equal(clone.running_centers.running_centers, r)
    crit.eval()
    x2 = torch.randn(6, 2, requires_grad=True)
    out = crit(x2, y)
    out.backward()
    assert x2.grad is not None
    assert torch.equal(crit.running_centers.running_centers, r)  # eval does not update


def test_pinned_c3_ii_eval_after_worked_example():
    crit = IILoss(2, 1)
    with pytest.warns(UserWarning, match="fewer than two"):
        crit(torch.tensor([[1.0], [1.0]]), torch.tensor([0, 0]))
    crit(torch.tensor([[2.0], [3.0]]), torch.tensor([0, 1]))
    assert torch.equal(crit.running_centers.running_centers, torch.tensor([[1.5], [1.5]]))
    assert torch.equal(crit.running_centers.num_batches_tracked, torch.tensor([2.0]))
    crit.eval()
    out = crit(torch.tensor([[0.0], [4.0]]), torch.tensor([0, 1]))
    assert out.item() == 4.25


# ----------------------------------------------------------------------------------------------
# II: training vs eval over several steps, methods
# ----------------------------------------------------------------------------------------------


def test_ii_multi_step_running_centers_and_values():
    torch.manual_seed(5)
    crit = IILoss(4, 3, alpha=0.7)  # float32 buffers, float64 input
    r = torch.zeros(4, 3, dtype=torch.float64)
    n = 0
    batches = [[0, 1, 1, -1, 2, 0], [3, 3, 1, 1, -2, -1], [-1, -1, -1, -1, -1, -1], [2, 0, 2, 0, 3, 1]]
    for yl in batches:
        x = torch.randn(6, 3, dtype=torch.float64)
        y = torch.tensor(yl)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = crit(x, y)
        torch.testing.assert_close(out, torch.as_tensor(naive_ii(x, y, 0.7), dtype=torch.float64))
        rows = [i for i in range(6) if y[i] >= 0]
        for c in {int(y[i]) for i in rows}:
            mean = x[[i for i in rows if y[i] == c]].mean(0)
            r[c] = (mean + n * r[c]) / (n + 1)
        n += 1 if rows else 0  # an all-OOD batch is not counted
        assert crit.running_centers.running_centers.dtype == torch.float32
        torch.testing.assert_close(crit.running_centers.running_centers, r.float())
        assert crit.running_centers.num_batches_tracked.item() == n
    crit.eval()
    snapshot = crit.running_centers.running_centers.clone()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 1])
    out = crit(x, y)
    assert out.dtype == torch.float64
    rc = crit.running_centers.running_centers.double()
    expected = naive_ii(x, y, 0.7, centers=rc)
    torch.testing.assert_close(out, expected)
    assert torch.equal(crit.running_centers.running_centers, snapshot)
    assert crit.running_centers.num_batches_tracked.item() == n
    dist = crit.distance(x)
    torch.testing.assert_close(dist, ((x.unsqueeze(1) - rc.unsqueeze(0)) ** 2).sum(-1))
    torch.testing.assert_close(crit.predict(x), torch.softmax(-dist, 1))
    assert crit.centers is crit.running_centers


def test_ii_pair_cap_limits_separation():
    crit = IILoss(2, 1)
    x = torch.tensor([[-1e13], [1e13]])
    out = crit(x, torch.tensor([0, 1]))
    assert out.item() == pytest.approx(-1e24, rel=1e-6)  # 4e26 capped at 1e24


def test_ii_gradient_train_and_eval():
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, -1, 2])
    with pytest.warns(UserWarning, match="Discarding"):
        out = IILoss(3, 3, alpha=0.5).double()(x, y)
    out.backward()
    x2 = x.detach().clone().requires_grad_()
    naive_ii(x2, y, 0.5).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    config.data_checks = False
    crit = IILoss(3, 3, alpha=0.5).double()
    assert torch.autograd.gradcheck(lambda t: IILoss(3, 3, alpha=0.5).double()(t, y), (x.detach().requires_grad_(),))
    crit(x.detach(), y)
    crit.eval()
    assert torch.autograd.gradcheck(lambda t: crit(t, y), (x.detach().requires_grad_(),))


# ----------------------------------------------------------------------------------------------
# gradients: autograd of the hand formula, and gradcheck
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cac", "center", "mchad"])
def test_gradient_matches_hand_formula_and_gradcheck(name):
    y = labels("mixed")
    d = make_input(name).requires_grad_()
    config.data_checks = False
    make(name)(d, y).backward()
    d2 = d.detach().clone().requires_grad_()
    naive(name, d2, y).backward()
    torch.testing.assert_close(d.grad, d2.grad, rtol=1e-10, atol=1e-12)
    crit = make(name)
    assert torch.autograd.gradcheck(lambda t: crit(t, y), (d.detach().clone().requires_grad_(),))


def test_mchad_margin_gradient():
    d = make_input("mchad")
    y = labels("mixed")
    margin = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    out = mchad_distance_loss(d, y, radius=0.5, margin=margin)
    out.backward()
    m2 = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    naive_mchad(d, y, r=0.5, m=m2).backward()
    torch.testing.assert_close(margin.grad, m2.grad)


@pytest.mark.parametrize("name", ["cac", "center", "mchad"])
def test_end_to_end_gradient_to_embeddings_and_centers(name):
    crit = make(name).double()
    width = C if name == "cac" else D
    z = torch.randn(B, width, dtype=torch.float64, requires_grad=True)
    y = labels("all_id")
    crit(crit.distance(z), y).backward()
    p = crit.centers.params
    z2 = z.detach().clone().requires_grad_()
    p2 = p.detach().clone().requires_grad_(p.requires_grad)
    dist = ((z2.unsqueeze(1) - p2.unsqueeze(0)) ** 2).sum(-1)
    naive(name, dist, y).backward()
    torch.testing.assert_close(z.grad, z2.grad)
    if name == "cac":
        assert p.grad is None and not p.requires_grad
    else:
        torch.testing.assert_close(p.grad, p2.grad)


# ----------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_dtypes(name, dtype):
    y = labels("mixed")
    inp = make_input(name, dtype=dtype).requires_grad_()
    config.data_checks = False
    out = make(name)(inp, y)
    assert out.dtype == dtype and out.shape == ()
    expected = naive(name, inp.detach().double(), y)
    torch.testing.assert_close(out.double(), torch.as_tensor(expected).double(), rtol=RTOL[dtype], atol=RTOL[dtype])
    out.backward()
    assert inp.grad.dtype == dtype and torch.isfinite(inp.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_distance_methods_keep_input_dtype(dtype):
    for crit, width in ((CACLoss(C), C), (CenterLoss(C, D), D), (MCHADLoss(C, D), D), (IILoss(C, D), D)):
        z = torch.randn(4, width).to(dtype)
        assert crit.distance(z).dtype == dtype
    z = torch.randn(4, D).to(dtype)
    assert IILoss(C, D).predict(z).dtype == dtype
    assert CACLoss.score(torch.rand(4, C).to(dtype)).dtype == dtype
    assert CACLoss.rejection_score(torch.rand(4, C).to(dtype)).dtype == dtype


# ----------------------------------------------------------------------------------------------
# metadata, state, RNG
# ----------------------------------------------------------------------------------------------


def test_info():
    for cls, inputs, supervised in (
        (CACLoss, Representation.DISTANCES, False),
        (CenterLoss, Representation.DISTANCES, False),
        (IILoss, Representation.FEATURES, False),
        (MCHADLoss, Representation.DISTANCES, True),
    ):
        assert cls.info.tasks == frozenset({Task.CLASSIFICATION})
        assert cls.info.inputs == frozenset({inputs})
        assert cls.info.supervised is supervised


@pytest.mark.parametrize(
    "factory, expected",
    [
        (lambda: CACLoss(4, magnitude=2.0), {"_centers._params": ((4, 4), False)}),
        (lambda: CenterLoss(4, 3), {"_centers._params": ((4, 3), True)}),
        (lambda: CenterLoss(4, 3, fixed=True), {"_centers._params": ((4, 3), False)}),
        (
            lambda: IILoss(4, 3),
            {"running_centers.running_centers": ((4, 3), False), "running_centers.num_batches_tracked": ((1,), False)},
        ),
        (
            lambda: MCHADLoss(4, 3, margin=1.5),
            {"center_loss._centers._params": ((4, 3), True), "regu_loss.margin": ((1,), False)},
        ),
    ],
)
def test_state_dict_and_round_trip(factory, expected):
    crit = factory()
    sd = crit.state_dict(keep_vars=True)
    assert list(sd) == list(expected)
    for key, (shape, grad) in expected.items():
        assert tuple(sd[key].shape) == shape and sd[key].dtype == torch.float32 and sd[key].requires_grad is grad
    torch.manual_seed(99)
    other = factory()
    with torch.no_grad():
        for v in other.state_dict(keep_vars=True).values():
            v.add_(1.0)
    other.load_state_dict(crit.state_dict())
    for key in expected:
        assert torch.equal(other.state_dict()[key], crit.state_dict()[key])


def test_cac_construction_draws_then_identity():
    torch.manual_seed(11)
    torch.randn(4, 4)
    state = torch.get_rng_state()
    torch.manual_seed(11)
    crit = CACLoss(4, magnitude=3.0, alpha=0.5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(crit.centers.params, 3.0 * torch.eye(4))
    assert crit.n_classes == 4 and crit.magnitude == 3.0 and crit.alpha == 0.5


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("n_dim", [3, 5])
def test_center_construction_draws(n_dim, fixed, caplog):
    torch.manual_seed(12)
    torch.randn(3, n_dim)
    second = torch.randn(3, n_dim) if n_dim != 3 else None
    state = torch.get_rng_state()
    torch.manual_seed(12)
    with caplog.at_level(logging.WARNING):
        crit = CenterLoss(3, n_dim, magnitude=2.0, fixed=fixed)
    assert torch.equal(torch.get_rng_state(), state)
    p = crit.centers.params.detach()
    logged = [r.getMessage() for r in caplog.records]
    if n_dim == 3:
        assert torch.equal(p, torch.eye(3) * (2.0 if fixed else 1.0))
        assert logged == []
    else:
        assert torch.equal(p, second)
        assert logged == ["Not applying magnitude parameter."]
    assert crit.centers.params.requires_grad is (not fixed)


def test_center_no_log_with_unit_magnitude(caplog):
    with caplog.at_level(logging.WARNING):
        CenterLoss(3, 5)
    assert caplog.records == []


def test_mchad_construction_draws_like_center():
    torch.manual_seed(13)
    a = CenterLoss(3, 5, radius=0.5)
    state = torch.get_rng_state()
    torch.manual_seed(13)
    m = MCHADLoss(3, 5, radius=0.5, margin=1.0, weight_center=2.0, weight_nll=3.0, weight_oe=4.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(m.centers.params, a.centers.params)
    assert m.center_loss.radius == 0.5 and m.regu_loss.margin.item() == 1.0
    assert (m.weight_center, m.weight_nll, m.weight_oe) == (2.0, 3.0, 4.0)
    assert m.nll_loss.reduction == "mean" and m.regu_loss.reduction == "sum"


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, arg", [("cac", "distances"), ("center", "distmat"), ("mchad", "distmat")])
def test_wrong_number_of_columns(name, arg):
    crit = make(name)
    for exc in (ShapeError, ValueError, AssertionError):
        with pytest.raises(exc, match=rf"{arg}.*n_classes={C}"):
            crit(torch.rand(4, C + 1), torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("name", ["cac", "center", "mchad"])
def test_bad_inputs_distance_criteria(name):
    crit = make(name)
    arg = "distances" if name == "cac" else "distmat"
    tname = "y" if name == "mchad" else "target"
    with pytest.raises(ShapeError, match=arg):
        crit(torch.rand(4), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(TypeError, match=arg):
        crit(torch.ones(4, C, dtype=torch.long), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(TypeError, match=tname):
        crit(torch.rand(4, C), torch.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ShapeError, match=tname):
        crit(torch.rand(4, C), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="Expected targets of shape B" if name != "mchad" else tname):
        crit(torch.rand(4, C), torch.zeros(4, 1, dtype=torch.long))


@pytest.mark.parametrize("name", ["cac", "ii", "mchad"])
def test_labels_out_of_range(name):
    y = torch.tensor([0, 1, C, 0])
    inp = make_input(name, b=4)
    with pytest.raises(LabelOutOfRangeError, match="target|y"):
        make(name)(inp, y)
    config.data_checks = False
    assert torch.isnan(make(name)(inp, y))


def test_center_label_out_of_range_has_no_target_column():
    # pytorch-ood: the one-hot mask of the row is empty, so it adds C·1e-12; no error
    d = torch.tensor([[2.0, 3.0, 4.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    out = CenterLoss(3, 3)(d, torch.tensor([0, 3]))
    assert out.item() == pytest.approx((2.0 + 2e-12 + 3e-12) / 6, rel=1e-12)


def test_ii_bad_inputs():
    crit = IILoss(3, 2)
    with pytest.raises(ShapeError, match="x"):
        crit(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(TypeError, match="target"):
        crit(torch.randn(4, 2), torch.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ShapeError, match="target"):
        crit(torch.randn(4, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="Expected targets of shape B"):
        crit(torch.randn(4, 2), torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ShapeError, match="x"):
        crit.distance(torch.randn(4, 3))


def test_score_bad_input():
    with pytest.raises(ShapeError, match="distance"):
        CACLoss.score(torch.rand(4))
    with pytest.raises(TypeError, match="distance"):
        CACLoss.rejection_score(torch.ones(4, 3, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# functional forms, CenterRegularizationLoss reductions, scores
# ----------------------------------------------------------------------------------------------


def test_functionals_match_modules_and_formulas():
    y = labels("mixed")
    d = make_input("cac")
    with pytest.warns(UserWarning, match="Discarding"):
        torch.testing.assert_close(cac_distance_loss(d, y, alpha=0.3), naive_cac(d, y, 0.3))
    with pytest.warns(UserWarning, match="Discarding"):
        torch.testing.assert_close(center_distance_loss(d, y, radius=0.4), naive_center(d, y, 0.4))
    out = no_warnings(lambda: mchad_distance_loss(d, y, 0.4, 1.5, 0.5, 2.0, 0.25))
    torch.testing.assert_close(out, naive_mchad(d, y, 0.4, 1.5, 0.5, 2.0, 0.25))
    crit = CACLoss(C, alpha=0.3)
    with pytest.warns(UserWarning, match="Discarding"):
        torch.testing.assert_close(crit(d, y), naive_cac(d, y, 0.3))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", None, "bogus"])
@pytest.mark.parametrize("pattern", ["mixed", "all_id"])
def test_center_regularization_reductions(reduction, pattern):
    if reduction == "bogus":
        with pytest.raises(ValueError):
            CenterRegularizationLoss(1.0, reduction=reduction)
        return
    y = labels(pattern)
    d = make_input("cac")
    out = CenterRegularizationLoss(1.5, reduction=reduction)(d, y)
    rows = [sum(max(0.0, 1.5**2 - d[i, c].item() ** 2) for c in range(C)) for i in range(B) if y[i] < 0]
    if reduction == "sum":
        assert out.item() == pytest.approx(sum(rows), rel=1e-12)
    elif reduction == "mean":
        assert out.item() == pytest.approx(sum(rows) / len(rows) if rows else 0.0, rel=1e-12)
    else:
        torch.testing.assert_close(out, torch.tensor(rows, dtype=torch.float64).reshape(len(rows)))


def test_scores_leave_grad_mode_alone():
    d = torch.rand(4, 3, requires_grad=True)
    s = CACLoss.rejection_score(d)
    assert s.requires_grad
    with torch.no_grad():
        assert not CACLoss.score(d).requires_grad


# ----------------------------------------------------------------------------------------------
# no host synchronisation: torch.compile(fullgraph=True) with checks off
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        lambda d, y: cac_distance_loss(d, y, alpha=0.5),
        lambda d, y: center_distance_loss(d, y, radius=0.1),
        lambda d, y: mchad_distance_loss(d, y, radius=0.1, margin=2.0),
    ],
    ids=["cac", "center", "mchad"],
)
def test_compile_fullgraph(fn, compile_reset):
    config.data_checks = False
    y = labels("mixed")
    d = make_input("cac", dtype=torch.float32).requires_grad_()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(d, y)
    out.backward()
    d2 = d.detach().clone().requires_grad_()
    ref = fn(d2, y)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(d.grad, d2.grad)


def test_compile_fullgraph_ii_eval(compile_reset):
    config.data_checks = False
    crit = IILoss(C, D)
    crit(torch.randn(B, D), labels("mixed"))
    crit.eval()
    compiled = torch.compile(crit, fullgraph=True, backend="aot_eager")
    x = torch.randn(B, D, requires_grad=True)
    out = compiled(x, labels("mixed"))
    torch.testing.assert_close(out, crit(x, labels("mixed")))
    out.backward()
    assert torch.isfinite(x.grad).all()
