"""CACLoss, CenterLoss, IILoss and MCHADLoss against pytorch-ood 0.4.0 (LOSS_CONTRACT.md §8.1, §8.6, §8.7).

Cases changed by the deliberate fixes are left out here (they are pinned in test_contract_distances.py):
CAC with an ID label < C−1 (fix a) and II with fewer than two classes present (fix c).
"""

import logging
import warnings

import pytest
import torch
from _pytorch_ood import pytorch_ood
from _pytorch_ood import requires_oracle

from oodkernels.reference.distances import CACLoss
from oodkernels.reference.distances import CenterLoss
from oodkernels.reference.distances import IILoss
from oodkernels.reference.distances import MCHADLoss

pytestmark = [requires_oracle, pytest.mark.oracle]

B, C, D = 8, 3, 5
RTOL, ATOL = 1e-5, 1e-6
PATTERNS = ["mixed", "all_id", "all_ood", "empty"]


def labels(pattern, b=B, c=C, last_only=False):
    if pattern == "mixed":
        y = (torch.arange(b) % (c + 1)) - 1
    elif pattern == "all_id":
        y = torch.arange(b) % c
    elif pattern == "all_ood":
        y = -1 - torch.arange(b)
    else:
        y = torch.zeros(0, dtype=torch.long)
    if last_only:  # fix a leaves the CAC value unchanged exactly when every ID label is C − 1
        y = torch.where(y >= 0, torch.full_like(y, c - 1), y)
    return y


def pair(name, c=C, d=D, **kw):
    """(ours, theirs), built from the same seed, with the same construction draws."""
    ref = pytorch_ood.loss
    cls = {"cac": (CACLoss, ref.CACLoss), "center": (CenterLoss, ref.CenterLoss), "ii": (IILoss, ref.IILoss)}
    cls["mchad"] = (MCHADLoss, ref.MCHADLoss)
    args = (c,) if name == "cac" else (c, d)
    torch.manual_seed(42)
    ours = cls[name][0](*args, **kw)
    state = torch.get_rng_state()
    torch.manual_seed(42)
    theirs = cls[name][1](*args, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    return ours, theirs


def run(crit, *inputs):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = crit(*inputs)
    return out, [(w.category, str(w.message)) for w in rec]


def compare(ours, theirs, inp, y):
    a_in = inp.detach().clone().requires_grad_()
    b_in = inp.detach().clone().requires_grad_()
    a, wa = run(ours, a_in, y)
    b, wb = run(theirs, b_in, y)
    assert wa == wb
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    a.backward()
    b.backward()
    torch.testing.assert_close(a_in.grad, b_in.grad, rtol=RTOL, atol=ATOL)
    return a, b


def distances(b, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, generator=g) * 4


# ----------------------------------------------------------------------------------------------
# reference matrix (§8.1)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name", ["cac", "center", "mchad"])
def test_distance_criteria_grid(name, pattern):
    kw = {"cac": {"magnitude": 2.0, "alpha": 0.5}, "center": {"radius": 0.5}, "mchad": {"radius": 0.5, "margin": 2.0}}
    ours, theirs = pair(name, **kw[name])
    y = labels(pattern, last_only=name == "cac")
    compare(ours, theirs, distances(len(y), C), y)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("training", [True, False])
def test_ii_grid(pattern, training):
    ours, theirs = pair("ii", alpha=0.5)
    warm_x, warm_y = torch.randn(12, D), torch.arange(12) % C
    ours(warm_x, warm_y)
    theirs(warm_x, warm_y)
    ours.train(training)
    theirs.train(training)
    y = labels(pattern)
    x = torch.randn(len(y), D)
    compare(ours, theirs, x, y)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs.state_dict()[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["cac", "center", "mchad"])
def test_end_to_end_gradients_through_centers(name):
    ours, theirs = pair(name, **({"radius": 0.3} if name == "center" else {}))
    if name == "mchad":
        ours.regu_loss.margin.data.fill_(3.0)
        theirs.regu_loss.margin.data.fill_(3.0)
        ours.regu_loss.margin.requires_grad_(True)
        theirs.regu_loss.margin.requires_grad_(True)
    width = C if name == "cac" else D
    z = torch.randn(B, width)
    y = labels("mixed", last_only=name == "cac")
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    a, wa = run(lambda: ours(ours.distance(za), y))
    b, wb = run(lambda: theirs(theirs.distance(zb), y))
    assert wa == wb
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    a.backward()
    b.backward()
    torch.testing.assert_close(za.grad, zb.grad, rtol=RTOL, atol=ATOL)
    for (ka, pa), (kb, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert ka == kb and pa.requires_grad == pb.requires_grad
        if pb.grad is None:
            assert pa.grad is None
        else:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name, b, c, d", [("center", 257, 37, 19), ("mchad", 300, 50, 16), ("cac", 200, 40, 40)])
def test_random_larger_shapes(name, b, c, d):
    ours, theirs = pair(name, c=c, d=d)
    g = torch.Generator().manual_seed(3)
    y = torch.randint(-3, c, (b,), generator=g)
    if name == "cac":
        y = torch.where(y >= 0, torch.full_like(y, c - 1), y)
    compare(ours, theirs, distances(b, c, seed=4), y)


def test_ii_random_larger_shape():
    ours, theirs = pair("ii", c=20, d=32)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        y = torch.randint(-2, 20, (300,), generator=g)
        compare(ours, theirs, torch.randn(300, 32, generator=g), y)
    torch.testing.assert_close(ours.centers.centers, theirs.centers.centers, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# stateful II over several steps (§8.6)
# ----------------------------------------------------------------------------------------------


def test_ii_running_centers_match_at_each_step():
    ours, theirs = pair("ii", c=4, d=3)
    g = torch.Generator().manual_seed(8)
    batches = [
        [0, 1, 1, -1, 2, 0],
        [3, 3, 1, 1, -2, -1],
        [-1, -1, -1, -1, -1, -1],
        [2, 0, 2, 0, 3, 1],
        [0, 1, 2, 3, 3, 3],
    ]
    for yl in batches:
        y = torch.tensor(yl)
        compare(ours, theirs, torch.randn(6, 3, generator=g), y)
        torch.testing.assert_close(ours.centers.centers, theirs.centers.centers, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.centers.num_batches_tracked, theirs.centers.num_batches_tracked)
        assert ours.centers.centers.grad_fn is None and not ours.centers.centers.requires_grad
    x = torch.randn(5, 3, generator=g)
    torch.testing.assert_close(ours.distance(x), theirs.distance(x), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ours.predict(x), theirs.predict(x), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ours.centers(x), theirs.centers(x), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# construction, state and scores (§8.7)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kw",
    [
        ("cac", {"magnitude": 3.0}),
        ("center", {}),
        ("center", {"fixed": True, "magnitude": 2.0}),
        ("center_cd", {"magnitude": 2.0}),
        ("center_cd", {"fixed": True}),
        ("ii", {}),
        ("mchad", {"margin": 1.5}),
        ("mchad_cd", {"radius": 1.0}),
    ],
)
def test_construction_and_state_dict(name, kw, caplog):
    base = name.replace("_cd", "")
    d = C if name in ("center", "mchad") else D  # C = D: identity; C != D: second draw
    with caplog.at_level(logging.WARNING):
        ours, theirs = pair(base, d=d, **kw)
    messages = [r.getMessage() for r in caplog.records]
    logs_magnitude = name == "center_cd" and kw.get("magnitude", 1.0) != 1
    assert messages == ["Not applying magnitude parameter."] * (2 if logs_magnitude else 0)  # ours, then theirs
    sa, sb = ours.state_dict(keep_vars=True), theirs.state_dict(keep_vars=True)
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].shape == sb[key].shape and sa[key].dtype == sb[key].dtype
        assert sa[key].requires_grad == sb[key].requires_grad
        assert torch.equal(sa[key], sb[key])
    # checkpoints load both ways
    torch.manual_seed(1)
    ours2, theirs2 = pair(base, d=d, **kw)
    with torch.no_grad():
        for v in list(ours2.state_dict(keep_vars=True).values()) + list(theirs2.state_dict(keep_vars=True).values()):
            v.add_(1.0)
    ours2.load_state_dict(theirs.state_dict())
    theirs2.load_state_dict(ours.state_dict())
    for key in sa:
        assert torch.equal(ours2.state_dict()[key], sb[key]) and torch.equal(theirs2.state_dict()[key], sa[key])


def test_cac_score_is_the_reference_score():
    d = torch.rand(16, 5) * 10
    d[0] = 100.0
    torch.testing.assert_close(CACLoss.score(d), pytorch_ood.loss.CACLoss.score(d), rtol=RTOL, atol=ATOL)


def test_cac_reference_differs_where_fix_a_applies():
    ours, theirs = pair("cac")
    d = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    y = torch.tensor([0, 1])
    assert theirs(d, y).item() == pytest.approx(1.8103093, rel=1e-6)
    assert ours(d, y).item() == pytest.approx(1.4076060, rel=1e-6)


def test_ii_reference_single_class_value_differs():
    ours, theirs = pair("ii", c=2, d=1)
    x, y = torch.tensor([[0.0], [2.0]]), torch.tensor([0, 0])
    with pytest.warns(UserWarning, match="fewer than two classes"):
        assert ours(x, y).item() == 1.0
    assert theirs(x, y).item() < -1e23
    torch.testing.assert_close(ours.centers.centers, theirs.centers.centers)
