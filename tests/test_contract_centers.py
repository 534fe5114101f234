"""Contract tests of the class-center utilities (LOSS_CONTRACT.md §2.6-2.8): pairwise_distances,
ClassCenters and RunningCenters of ``oodkernels.reference.centers``."""

import copy
import itertools

import pytest
import torch
from _pytorch_ood import pytorch_ood
from _pytorch_ood import requires_oracle

from oodkernels.reference._common import ShapeError
from oodkernels.reference.centers import ClassCenters
from oodkernels.reference.centers import RunningCenters
from oodkernels.reference.centers import class_means
from oodkernels.reference.centers import pairwise_distances

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def naive_sq_dist(x, y):
    """Σ_d (x_nd − y_md)² with a Python loop, in float64."""
    x, y = x.double().tolist(), y.double().tolist()
    return torch.tensor(
        [[sum((a - b) ** 2 for a, b in zip(xn, ym)) for ym in y] for xn in x], dtype=torch.float64
    ).reshape(len(x), len(y))


# ----------------------------------------------------------------------------------------------
# pairwise_distances (§2.6)
# ----------------------------------------------------------------------------------------------


def test_pairwise_distances_explicit_numbers():
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    y = torch.tensor([[3.0, 4.0], [1.0, 0.0], [1.0, 2.0]])
    expected = torch.tensor([[25.0, 1.0, 5.0], [8.0, 4.0, 0.0]])
    assert torch.equal(pairwise_distances(x, y), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pairwise_distances_values_and_dtype(dtype):
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randn(5, 4, dtype=torch.float64)
    out = pairwise_distances(x.to(dtype), y.to(dtype))
    assert out.dtype == dtype and out.shape == (6, 5)
    ref = naive_sq_dist(x.to(dtype), y.to(dtype))
    torch.testing.assert_close(out.double(), ref, rtol=RTOL[dtype], atol=RTOL[dtype])


def test_pairwise_distances_default_y_is_x():
    x = torch.randn(5, 3, dtype=torch.float64)
    out = pairwise_distances(x)
    assert out.shape == (5, 5)
    torch.testing.assert_close(out, naive_sq_dist(x, x), rtol=1e-10, atol=1e-12)
    assert torch.all(out >= 0)


def test_pairwise_distances_cancellation_is_part_of_the_contract():
    x = torch.tensor([[1000.0, 1000.0]])
    y = torch.tensor([[1000.001, 1000.0]])
    exact = naive_sq_dist(x, y).item()
    assert exact == pytest.approx(9.5367e-07, rel=1e-3)  # what Σ(x − y)² would give
    assert pairwise_distances(x, y).item() == 0.0


def test_pairwise_distances_clamp_zeroes_gradient():
    # float32 values whose expansion ‖x‖² + ‖y‖² − 2⟨x, y⟩ rounds to a negative number
    x = torch.tensor([[-7.537308216094971, -914.4954833984375, -1088.583740234375]], requires_grad=True)
    y = torch.tensor([[-7.537574768066406, -914.4953002929688, -1088.583984375]], requires_grad=True)
    with torch.no_grad():
        raw = x.pow(2).sum() + y.pow(2).sum() - 2.0 * torch.mm(x, y.t())
    assert raw.item() < 0  # precondition: the clamp is active
    out = pairwise_distances(x, y)
    assert out.item() == 0.0
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(y.grad, torch.zeros_like(y))


def test_pairwise_distances_gradient_matches_autograd_of_formula():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64)
    (pairwise_distances(x, y) * w).sum().backward()
    x2, y2 = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    ((x2.unsqueeze(1) - y2.unsqueeze(0)).pow(2).sum(-1) * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(y.grad, y2.grad)
    assert torch.autograd.gradcheck(pairwise_distances, (x.detach().requires_grad_(), y.detach().requires_grad_()))


@pytest.mark.parametrize(
    "x, y, exc, word",
    [
        (torch.randn(3), None, ShapeError, "x"),
        (torch.randn(3, 2, 1), None, ShapeError, "x"),
        (torch.randn(3, 2), torch.randn(4, 3), ShapeError, "y"),
        (torch.randn(3, 2), torch.randn(4), ShapeError, "y"),
        (torch.ones(3, 2, dtype=torch.long), None, TypeError, "x"),
        (torch.randn(3, 2), torch.ones(3, 2, dtype=torch.long), TypeError, "y"),
    ],
)
def test_pairwise_distances_bad_input(x, y, exc, word):
    with pytest.raises(exc, match=rf"^{word}:"):
        pairwise_distances(x, y)


# ----------------------------------------------------------------------------------------------
# ClassCenters (§2.7)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixed", [False, True])
def test_class_centers_draw_and_state(fixed):
    torch.manual_seed(123)
    expected = torch.randn(4, 3)
    state_after = torch.get_rng_state()
    torch.manual_seed(123)
    centers = ClassCenters(4, 3, fixed=fixed)
    assert torch.equal(torch.get_rng_state(), state_after)
    assert isinstance(centers.params, torch.nn.Parameter)
    assert centers.params.dtype == torch.float32
    assert torch.equal(centers.params.detach(), expected)
    assert centers.params.requires_grad is (not fixed)
    assert list(centers.state_dict()) == ["_params"]
    assert len(list(centers.parameters())) == 1  # fixed stays a Parameter
    assert centers.num_classes == 4 and centers.n_features == 3
    assert centers.params is centers._params


def test_class_centers_state_dict_round_trip():
    a, b = ClassCenters(3, 2), ClassCenters(3, 2)
    assert not torch.equal(a.params, b.params)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.params, b.params)


@pytest.mark.parametrize("dtype", DTYPES)
def test_class_centers_forward_and_predict(dtype):
    centers = ClassCenters(4, 3)
    x = torch.randn(5, 3, dtype=torch.float64).to(dtype)
    d = centers(x)
    assert d.shape == (5, 4) and d.dtype == dtype
    ref = naive_sq_dist(x, centers.params.detach())
    torch.testing.assert_close(d.double(), ref, rtol=RTOL[dtype], atol=RTOL[dtype])
    p = centers.predict(x)
    assert p.shape == (5, 4) and p.dtype == dtype
    torch.testing.assert_close(p.double(), torch.softmax(-ref, dim=1), rtol=RTOL[dtype], atol=RTOL[dtype])


def test_class_centers_gradient_reaches_params():
    centers = ClassCenters(3, 2).double()
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, p: pairwise_distances(x, p), (x, centers.params))
    centers(x).sum().backward()
    expected = -2.0 * (x.detach().unsqueeze(1) - centers.params.detach().unsqueeze(0)).sum(0)
    torch.testing.assert_close(centers.params.grad, expected)


@pytest.mark.parametrize("shape", [(4, 2), (4,), (4, 3, 1)])
@pytest.mark.parametrize("method", ["forward", "predict"])
def test_class_centers_wrong_width(shape, method):
    centers = ClassCenters(3, 3)
    for exc in (ValueError, AssertionError, ShapeError):
        with pytest.raises(exc, match="x"):
            getattr(centers, method)(torch.randn(*shape))


# ----------------------------------------------------------------------------------------------
# RunningCenters (§2.8)
# ----------------------------------------------------------------------------------------------


def test_running_centers_buffers():
    rc = RunningCenters(3, 2)
    sd = rc.state_dict()
    assert list(sd) == ["running_centers", "num_batches_tracked"]
    assert sd["running_centers"].shape == (3, 2) and sd["num_batches_tracked"].shape == (1,)
    for v in sd.values():
        assert v.dtype == torch.float32 and not v.requires_grad and torch.all(v == 0)
    assert list(rc.parameters()) == []
    assert rc.centers is rc.running_centers
    assert rc.num_classes == 3 and rc.n_embedding == 2


def test_running_centers_worked_example():
    rc = RunningCenters(2, 1)
    rc.update(torch.tensor([[1.0], [1.0]]), torch.tensor([0, 0]))
    assert torch.equal(rc.running_centers, torch.tensor([[1.0], [0.0]]))
    assert torch.equal(rc.num_batches_tracked, torch.tensor([1.0]))
    rc.update(torch.tensor([[2.0], [3.0]]), torch.tensor([0, 1]))
    assert torch.equal(rc.running_centers, torch.tensor([[1.5], [1.5]]))
    assert torch.equal(rc.num_batches_tracked, torch.tensor([2.0]))
    rc.reset()
    assert torch.all(rc.running_centers == 0) and torch.all(rc.num_batches_tracked == 0)


def test_running_centers_running_mean_over_steps():
    torch.manual_seed(3)
    k, d = 4, 3
    rc = RunningCenters(k, d)
    r = torch.zeros(k, d, dtype=torch.float64)
    n = 0
    for step in range(4):
        x = torch.randn(6, d)
        y = torch.tensor([0, 0, 1, 1, 2, 2]) if step % 2 == 0 else torch.tensor([1, 3, 3, 1, 1, 3])
        mu = rc.update(x, y)
        for c in range(k):
            rows = [i for i in range(6) if y[i] == c]
            if rows:
                mean = x[rows].double().mean(0)
                torch.testing.assert_close(mu[c].double(), mean, rtol=1e-6, atol=1e-6)
                r[c] = (mean + n * r[c]) / (n + 1)
            else:
                assert torch.all(torch.isnan(mu[c]))
        n += 1
        torch.testing.assert_close(rc.running_centers.double(), r, rtol=1e-6, atol=1e-6)
        assert rc.num_batches_tracked.item() == n


def test_running_centers_calculate_centers_nan_rows():
    rc = RunningCenters(4, 2)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    mu = rc.calculate_centers(x, torch.tensor([2, 0, 2]))
    assert mu.shape == (4, 2)
    assert torch.equal(mu[0], torch.tensor([3.0, 4.0]))
    assert torch.equal(mu[2], torch.tensor([3.0, 4.0]))
    assert torch.all(torch.isnan(mu[1])) and torch.all(torch.isnan(mu[3]))
    assert torch.all(rc.running_centers == 0)  # calculate_centers does not update


def test_running_centers_detached_and_returned_means_carry_grad():
    rc = RunningCenters(2, 2)
    x = torch.randn(4, 2, requires_grad=True)
    mu = rc.update(x, torch.tensor([0, 1, 0, 1]))
    assert mu.requires_grad
    assert not rc.running_centers.requires_grad and rc.running_centers.grad_fn is None
    mu.sum().backward()  # the graph goes to x, not through the buffers
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.5))
    clone = copy.deepcopy(rc)  # a buffer with a graph could not be deep-copied
    assert torch.equal(clone.running_centers, rc.running_centers)


@pytest.mark.parametrize("dtype", DTYPES)
def test_running_centers_forward_centers_first(dtype):
    rc = RunningCenters(3, 2)
    rc.update(torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 1, 2]))
    x = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 3.0], [4.0, 1.0]], dtype=dtype)
    out = rc(x)
    assert out.shape == (3, 4) and out.dtype == dtype
    expected = naive_sq_dist(rc.running_centers, x)
    torch.testing.assert_close(out.double(), expected, rtol=RTOL[dtype], atol=RTOL[dtype])


@pytest.mark.parametrize(
    "call",
    [
        lambda rc: rc(torch.randn(3, 3)),
        lambda rc: rc.update(torch.randn(3, 3), torch.tensor([0, 1, 0])),
        lambda rc: rc.update(torch.randn(3, 2), torch.tensor([0, 1])),
        lambda rc: rc.calculate_centers(torch.randn(3), torch.tensor([0, 1, 0])),
    ],
)
def test_running_centers_shape_errors(call):
    with pytest.raises(ShapeError):
        call(RunningCenters(2, 2))


def test_running_centers_float_targets_rejected():
    with pytest.raises(TypeError, match="target"):
        RunningCenters(2, 2).update(torch.randn(3, 2), torch.tensor([0.0, 1.0, 0.0]))


def test_class_means_masked_rows_ignored():
    x = torch.tensor([[1.0], [3.0], [100.0], [5.0]])
    y = torch.tensor([0, 0, -1, 1])
    means, counts = class_means(x, y, 3, valid=y >= 0)
    assert torch.equal(counts, torch.tensor([2.0, 1.0, 0.0]))
    assert torch.equal(means[:2], torch.tensor([[2.0], [5.0]]))
    assert torch.isnan(means[2]).all()


# ----------------------------------------------------------------------------------------------
# against pytorch-ood 0.4.0
# ----------------------------------------------------------------------------------------------


@requires_oracle
@pytest.mark.parametrize("fixed", [False, True])
def test_class_centers_draws_equal_the_reference(fixed):
    torch.manual_seed(7)
    ours = ClassCenters(5, 3, fixed=fixed)
    state = torch.get_rng_state()
    torch.manual_seed(7)
    theirs = pytorch_ood.model.ClassCenters(5, 3, fixed=fixed)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(ours.params, theirs.params)
    assert ours.params.requires_grad == theirs.params.requires_grad
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(4, 3)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.predict(x), theirs.predict(x))
    with pytest.raises(AssertionError):
        ours(torch.randn(4, 2))


@requires_oracle
def test_pairwise_distances_match_reference_including_clamp_boundary():
    ref = pytorch_ood.utils.pairwise_distances
    for xv, yv in [([[1000.0, 1000.0]], [[1000.001, 1000.0]]), ([[0.5, -1.0], [2.0, 3.0]], [[1.0, 1.0]])]:
        x1, y1 = torch.tensor(xv, requires_grad=True), torch.tensor(yv, requires_grad=True)
        x2, y2 = torch.tensor(xv, requires_grad=True), torch.tensor(yv, requires_grad=True)
        a, b = pairwise_distances(x1, y1), ref(x2, y2)
        torch.testing.assert_close(a, b)
        a.sum().backward()
        b.sum().backward()
        # at an exact 0 of the expansion the clamp is the identity, so both pass the gradient
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(y1.grad, y2.grad)


@requires_oracle
def test_running_centers_match_reference_over_steps():
    ours, theirs = RunningCenters(3, 2), pytorch_ood.model.RunningCenters(3, 2)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for y in itertools.islice(itertools.cycle([[0, 0, 1], [2, 1, 1], [0, 0, 0]]), 5):
        x = torch.randn(3, 2)
        y = torch.tensor(y)
        mu_o, mu_t = ours.update(x, y), theirs.update(x, y)
        torch.testing.assert_close(mu_o, mu_t, equal_nan=True)
        torch.testing.assert_close(ours.running_centers, theirs.running_centers, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.num_batches_tracked, theirs.num_batches_tracked)
    x = torch.randn(4, 2)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
