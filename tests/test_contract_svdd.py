"""Contract tests of DeepSVDDLoss and DeepSADLoss (LOSS_CONTRACT.md §3.15-3.16, §6, §8)."""

import contextlib
import copy
import math
import warnings

import pytest
import torch

from oodkernels import config
from oodkernels.reference._common import DROP_UNKNOWN_MESSAGE
from oodkernels.reference._common import Representation
from oodkernels.reference._common import Task
from oodkernels.reference.centers import ClassCenters
from oodkernels.reference.svdd import DeepSADLoss
from oodkernels.reference.svdd import DeepSVDDLoss

B, D = 8, 5
LABELS = {
    "mixed": torch.tensor([-1, 0, 1, 2, -1, 0, 1, 2]),
    "all_id": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
    "all_ood": torch.tensor([-1, -2, -1, -3, -1, -1, -2, -1]),
}
DTYPE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


# ----------------------------------------------------------------------------------------------
# hand formulas: naive per-row loops in Python floats (float64)
# ----------------------------------------------------------------------------------------------


def sq_dist(row, center):
    return sum((float(a) - float(b)) ** 2 for a, b in zip(row, center))


def svdd_rows(x, center, radius):
    return [max(0.0, sq_dist(r, center) - radius**2) for r in x.tolist()]


def sad_rows(x, y, center, eta, eps):
    out = []
    for r, label in zip(x.tolist(), y.tolist()):
        d = sq_dist(r, center)
        out.append(d if label >= 0 else eta / (d + eps))
    return out


def reduce(values, reduction):
    if reduction == "mean":
        return sum(values) / len(values) if values else float("nan")
    if reduction == "sum":
        return sum(values)
    return values


@contextlib.contextmanager
def no_warnings():
    """Turn every warning into an error inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ----------------------------------------------------------------------------------------------
# pinned values (§8.5 k6, k7)
# ----------------------------------------------------------------------------------------------


def test_pinned_k6_deep_svdd():
    loss = DeepSVDDLoss(2, reduction="none", radius=1.0, center=torch.zeros(2))
    x = torch.tensor([[0.5, 0.0], [2.0, 0.0], [0.0, 1.0], [math.sqrt(41.0), 0.0]])
    torch.testing.assert_close(loss(x), torch.tensor([0.0, 3.0, 0.0, 40.0]), rtol=1e-6, atol=1e-5)


def test_pinned_k7_deep_sad():
    loss = DeepSADLoss(2, reduction="none", center=torch.zeros(2))
    x = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    out = loss(x, torch.tensor([0, -1]))
    torch.testing.assert_close(out, torch.tensor([4.0, 1.0 / (4.0 + 1e-6)], dtype=torch.float64), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------
# DeepSVDD: values over reductions and label patterns
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", None])
@pytest.mark.parametrize("labels", ["mixed", "all_id", "all_ood", "empty", "no_labels"])
def test_svdd_values(reduction, labels):
    center = torch.randn(D, dtype=torch.float64)
    x = torch.randn(B, D, dtype=torch.float64) + 0.3
    radius = 0.75  # exact in the float32 radius buffer
    loss = DeepSVDDLoss(D, reduction=reduction, radius=radius, center=center)
    if labels == "no_labels":
        y = None
        keep = list(range(B))
    elif labels == "empty":
        x, y, keep = x[:0], torch.zeros(0, dtype=torch.long), []
    else:
        y = LABELS[labels]
        keep = [i for i, v in enumerate(y.tolist()) if v >= 0]
    rows = svdd_rows(x, center.tolist(), radius)
    kept = [rows[i] for i in keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = loss(x, y)
    if reduction in ("mean", "sum"):
        assert out.dim() == 0
        expected = reduce(kept, reduction) if kept else 0.0  # Z(x) for an empty selection
        assert math.isclose(out.item(), expected, rel_tol=1e-10, abs_tol=1e-12)
    else:
        assert out.shape == (len(keep),)  # N_ID entries (§7.3.25)
        torch.testing.assert_close(out, torch.tensor(kept, dtype=torch.float64).reshape(-1), rtol=1e-10, atol=1e-12)


def test_svdd_invalid_reduction():
    loss = DeepSVDDLoss(D, reduction="avg")
    with pytest.raises(ValueError):
        loss(torch.randn(B, D))


def test_svdd_distance_and_center():
    center = torch.tensor([1.0, 0.0])
    loss = DeepSVDDLoss(2, radius=2.0, center=center)
    x = torch.tensor([[1.0, 0.0], [1.0, 3.0]])
    torch.testing.assert_close(loss.distance(x), torch.tensor([-4.0, 5.0]))  # may be negative (§7.3.26)
    assert isinstance(loss.center, ClassCenters)
    torch.testing.assert_close(loss.center(x), torch.tensor([[0.0], [9.0]]))


def test_svdd_static_loss():
    center = ClassCenters(1, D, fixed=True)
    x = torch.randn(B, D, dtype=torch.float64)
    y = LABELS["mixed"]
    expected = [v if lab >= 0 else 0.0 for v, lab in zip(svdd_rows(x, center.params[0].tolist(), 0.5), y.tolist())]
    with no_warnings():
        out = DeepSVDDLoss.svdd_loss(x, center, radius=0.5, y=y)
    assert out.shape == (B,) and out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    no_labels = DeepSVDDLoss.svdd_loss(x, center.params[0], radius=torch.tensor(0.5))
    torch.testing.assert_close(no_labels, torch.tensor(svdd_rows(x, center.params[0].tolist(), 0.5)).double())


# ----------------------------------------------------------------------------------------------
# DeepSVDD: warnings, all-OOD, gradients
# ----------------------------------------------------------------------------------------------


def test_svdd_warns_when_ood_present():
    loss = DeepSVDDLoss(D)
    with pytest.warns(UserWarning) as record:
        loss(torch.randn(B, D), LABELS["mixed"])
    assert [str(w.message) for w in record] == [DROP_UNKNOWN_MESSAGE]


@pytest.mark.parametrize("labels", ["all_id", None])
def test_svdd_no_warning_without_ood(labels):
    loss = DeepSVDDLoss(D)
    y = None if labels is None else LABELS[labels]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(torch.randn(B, D), y)


def test_svdd_no_warning_with_checks_off():
    config.data_checks = False
    loss = DeepSVDDLoss(D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = loss(torch.randn(B, D), LABELS["mixed"])
    assert torch.isfinite(out)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_svdd_all_ood_is_attached_zero(reduction):
    loss = DeepSVDDLoss(D, reduction=reduction)
    x = torch.randn(B, D, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = loss(x, LABELS["all_ood"])
    assert out.dim() == 0 and out.item() == 0
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_svdd_gradient_vs_hand_formula():
    center = torch.randn(D, dtype=torch.float64)
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    y = LABELS["mixed"]
    loss = DeepSVDDLoss(D, radius=1.5, center=center)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (g,) = torch.autograd.grad(loss(x, y), x)
    # independent: Σ_I relu(Σ_d (x − μ)² − r²) / N_ID through autograd of the direct difference form
    x2 = x.detach().clone().requires_grad_(True)
    keep = y >= 0
    hand = ((x2 - center) ** 2).sum(1).sub(1.5**2).clamp(min=0)
    hand = (hand * keep).sum() / keep.sum()
    (g2,) = torch.autograd.grad(hand, x2)
    torch.testing.assert_close(g, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_svdd_gradcheck(reduction):
    loss = DeepSVDDLoss(3, reduction=reduction, radius=0.5, center=torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    x = (torch.randn(5, 3, dtype=torch.float64) * 2).requires_grad_(True)
    y = torch.tensor([0, -1, 1, 0, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.autograd.gradcheck(lambda t: loss(t, y), (x,))


# ----------------------------------------------------------------------------------------------
# DeepSVDD: dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_svdd_dtypes(dtype, reduction):
    loss = DeepSVDDLoss(D, reduction=reduction, radius=0.5)
    x = torch.randn(B, D).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = loss(x, LABELS["mixed"])
        ref = loss(x.double(), LABELS["mixed"])
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=DTYPE_RTOL[dtype], atol=1e-6)
    assert loss.distance(x).dtype == dtype
    assert loss._center.params.dtype == torch.float32  # parameters never follow the input


def test_svdd_bf16_gradient_dtype():
    x = torch.randn(B, D).bfloat16().requires_grad_(True)
    DeepSVDDLoss(D)(x).backward()
    assert x.grad.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# DeepSVDD: state, RNG, center storage
# ----------------------------------------------------------------------------------------------


def test_svdd_state_dict():
    loss = DeepSVDDLoss(D, radius=2.0)
    sd = loss.state_dict()
    assert list(sd) == ["radius", "_center._params"]
    assert sd["_center._params"].shape == (1, D) and sd["_center._params"].dtype == torch.float32
    assert sd["radius"].shape == () and sd["radius"].dtype == torch.float32 and sd["radius"].item() == 2.0
    assert not loss._center.params.requires_grad
    assert "radius" in dict(loss.named_buffers())
    other = DeepSVDDLoss(D)
    other.load_state_dict(sd)
    assert torch.equal(other._center.params, loss._center.params) and other.radius.item() == 2.0
    clone = copy.deepcopy(loss)
    assert torch.equal(clone._center.params, loss._center.params)


@pytest.mark.parametrize("cls", [DeepSVDDLoss, DeepSADLoss])
@pytest.mark.parametrize("given", [False, True])
def test_seeded_construction_draws_d_normals(cls, given):
    center = torch.arange(D, dtype=torch.float32)
    torch.manual_seed(123)
    expected = torch.randn(1, D)
    state_after = torch.get_rng_state()
    torch.manual_seed(123)
    loss = cls(D, center=center if given else None)
    assert torch.equal(torch.get_rng_state(), state_after)  # the draw happens even with a center (§7.3.3)
    assert torch.equal(loss._center.params, center.reshape(1, D) if given else expected)


@pytest.mark.parametrize("cls", [DeepSVDDLoss, DeepSADLoss])
def test_given_center_shares_storage(cls):
    center = torch.zeros(D)
    loss = cls(D, center=center)
    assert loss._center.params.data_ptr() == center.data_ptr()
    assert loss._center.params.shape == (1, D)
    assert isinstance(loss._center.params, torch.nn.Parameter) and not loss._center.params.requires_grad
    center.fill_(1.0)  # the caller's tensor and the loss see the same memory (§7.3.24)
    torch.testing.assert_close(loss.distance(torch.ones(1, D)), torch.zeros(1))


@pytest.mark.parametrize("cls", [DeepSVDDLoss, DeepSADLoss])
def test_given_center_wrong_shape(cls):
    with pytest.raises(ValueError, match="center"):
        cls(D, center=torch.zeros(1, D))
    with pytest.raises(AssertionError):  # pytorch-ood asserts; ShapeError is both
        cls(D, center=torch.zeros(D + 1))


# ----------------------------------------------------------------------------------------------
# DeepSVDD / DeepSAD: bad inputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DeepSVDDLoss, DeepSADLoss])
def test_bad_features(cls):
    loss = cls(D)
    y = torch.zeros(B, dtype=torch.long)
    with pytest.raises(ValueError, match="x"):
        loss(torch.randn(B), y)
    with pytest.raises(ValueError, match=r"x: expected features of shape \(B, 5\)"):
        loss(torch.randn(B, D + 1), y)
    with pytest.raises(TypeError, match="x"):
        loss(torch.ones(B, D, dtype=torch.long), y)


def test_svdd_bad_labels():
    loss = DeepSVDDLoss(D)
    with pytest.raises(TypeError, match="y"):
        loss(torch.randn(B, D), torch.zeros(B))
    with pytest.raises(ValueError, match=r"Expected targets of shape B, got \(8, 1\)"):
        loss(torch.randn(B, D), torch.zeros(B, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="y"):
        loss(torch.randn(B, D), torch.zeros(B - 1, dtype=torch.long))


def test_sad_bad_labels():
    loss = DeepSADLoss(D)
    with pytest.raises(TypeError, match="y"):
        loss(torch.randn(B, D), torch.zeros(B))
    with pytest.raises(ValueError, match="y"):
        loss(torch.randn(B, D), torch.zeros(B, 1, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# DeepSAD
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", None])
@pytest.mark.parametrize("labels", ["mixed", "all_id", "all_ood", "empty"])
def test_sad_values(reduction, labels):
    center = torch.randn(D, dtype=torch.float64)
    x = torch.randn(B, D, dtype=torch.float64)
    y = LABELS.get(labels, torch.zeros(0, dtype=torch.long))
    if labels == "empty":
        x = x[:0]
    loss = DeepSADLoss(D, eta=0.7, eps=1e-3, reduction=reduction, center=center)
    with no_warnings():  # DeepSAD never warns
        out = loss(x, y)
    rows = sad_rows(x, y, center.tolist(), 0.7, 1e-3)
    if reduction in ("mean", "sum"):
        expected = reduce(rows, reduction)
        if math.isnan(expected):
            assert torch.isnan(out)  # empty batch, 'mean': NaN (§3.16)
        else:
            assert math.isclose(out.item(), expected, rel_tol=1e-10, abs_tol=1e-12)
    else:
        assert out.shape == (x.shape[0],)
        torch.testing.assert_close(out, torch.tensor(rows, dtype=torch.float64).reshape(-1), rtol=1e-10, atol=1e-12)


def test_sad_invalid_reduction():
    with pytest.raises(ValueError):
        DeepSADLoss(D, reduction="batchmean")(torch.randn(B, D), LABELS["mixed"])


def test_sad_distance():
    loss = DeepSADLoss(2, center=torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(loss.distance(torch.tensor([[3.0, 1.0], [0.0, 0.0]])), torch.tensor([9.0, 1.0]))


def test_sad_outlier_at_center_is_finite():
    loss = DeepSADLoss(2, center=torch.zeros(2), reduction="none")
    x = torch.zeros(2, 2, requires_grad=True)
    out = loss(x, torch.tensor([0, -1]))
    torch.testing.assert_close(out, torch.tensor([0.0, 1e6]))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_sad_gradient_vs_hand_formula():
    center = torch.randn(D, dtype=torch.float64)
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    y = LABELS["mixed"]
    (g,) = torch.autograd.grad(DeepSADLoss(D, eta=2.0, center=center)(x, y), x)
    x2 = x.detach().clone().requires_grad_(True)
    d = ((x2 - center) ** 2).sum(1)
    hand = sum(d[i] if y[i] >= 0 else 2.0 / (d[i] + 1e-6) for i in range(B)) / B
    (g2,) = torch.autograd.grad(hand, x2)
    torch.testing.assert_close(g, g2, rtol=1e-9, atol=1e-12)


def test_sad_gradcheck():
    loss = DeepSADLoss(3, eta=0.5, reduction="sum", center=torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, -1, 1, -2, 2])
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (x,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_sad_dtypes(dtype):
    loss = DeepSADLoss(D, reduction="none")
    x = torch.randn(B, D).to(dtype)
    out = loss(x, LABELS["mixed"])
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), loss(x.double(), LABELS["mixed"]), rtol=DTYPE_RTOL[dtype], atol=1e-6)


def test_sad_state_dict():
    loss = DeepSADLoss(D)
    sd = loss.state_dict()
    assert list(sd) == ["_center._params"]
    assert sd["_center._params"].shape == (1, D) and sd["_center._params"].dtype == torch.float32
    other = DeepSADLoss(D)
    other.load_state_dict(sd)
    assert torch.equal(other._center.params, loss._center.params)


def test_info():
    assert DeepSVDDLoss.info.tasks == {Task.CLASSIFICATION} and DeepSADLoss.info.tasks == {Task.CLASSIFICATION}
    assert DeepSVDDLoss.info.inputs == {Representation.FEATURES} == DeepSADLoss.info.inputs
    assert DeepSVDDLoss.info.supervised is False and DeepSADLoss.info.supervised is True


# ----------------------------------------------------------------------------------------------
# no host synchronisation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_compile_fullgraph(compile_reset, reduction):
    config.data_checks = False
    svdd = DeepSVDDLoss(D, reduction=reduction, radius=0.3)
    sad = DeepSADLoss(D, reduction=reduction)
    x = torch.randn(B, D, requires_grad=True)
    y = LABELS["mixed"]

    def both(x, y):
        return svdd(x, y) + sad(x, y)

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    out = compiled(x, y)
    torch.testing.assert_close(out, both(x, y))
    (g,) = torch.autograd.grad(out, x)
    (g_eager,) = torch.autograd.grad(both(x, y), x)
    torch.testing.assert_close(g, g_eager)
