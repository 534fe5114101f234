"""The row losses over logits against pytorch-ood 0.4.0 (LOSS_CONTRACT.md §7.1, §8.1).

Grid: criterion x task in ``info.tasks`` x reduction x labels (mixed / all-ID / all-OOD / empty), float32,
B, C = 8, 3, labels ``(arange(B) % (C + 1)) - 1``, segmentation targets (2, 4, 4); plus a few random larger
shapes. Value, shape, dtype, warnings and gradients must agree (rtol 1e-5, atol 1e-6). Cases changed by
fixes a-g (here only fix d, non-float32 input) are pinned in test_contract_logits.py instead.
"""

import warnings

import pytest
import torch
from _pytorch_ood import pytorch_ood
from _pytorch_ood import requires_oracle

from oodkernels.reference import logits as L

pytestmark = [requires_oracle, pytest.mark.oracle]

B, C = 8, 3
SEG = (2, 4, 4)
REDUCTIONS = ["mean", "sum", "none", None]
LABELS = ["mixed", "all_id", "all_ood", "empty"]

# name -> (ours, theirs, constructor kwargs, tasks); Background gets C + 1 columns (n_classes = C)
CRITERIA = {
    "background": ("BackgroundClassLoss", {"n_classes": C}, ("cls", "seg")),
    "cross_entropy": ("CrossEntropyLoss", {}, ("cls", "seg")),
    "oe": ("OutlierExposureLoss", {}, ("cls", "seg")),
    "oe_alpha": ("OutlierExposureLoss", {"alpha": 0.3}, ("cls", "seg")),
    "entropic": ("EntropicOpenSetLoss", {}, ("cls", "seg")),
    "energy": ("EnergyRegularizedLoss", {}, ("cls", "seg")),
    "energy_margins": ("EnergyRegularizedLoss", {"alpha": 0.5, "margin_in": -2.0, "margin_out": -1.0}, ("cls", "seg")),
    "logit_norm": ("LogitNorm", {}, ("cls",)),
    "logit_norm_t": ("LogitNorm", {"t": 0.3}, ("cls",)),
}


def columns(name):
    return C + 1 if name == "background" else C


def make_case(name, task, labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    tshape = (B,) if task == "cls" else SEG
    n = torch.Size(tshape).numel()
    if labels == "mixed":
        y = torch.arange(n) % (C + 1) - 1
    elif labels == "all_id":
        y = torch.arange(n) % C
    elif labels == "all_ood":
        y = -(torch.arange(n) % 2) - 1
    else:
        tshape, n = (0,) + tshape[1:], 0
        y = torch.zeros(0, dtype=torch.long)
    y = y.reshape(tshape)
    shape = tshape[:1] + (columns(name),) + tshape[1:]
    x = 2.0 * torch.randn(shape, generator=g)
    return x, y


def both(name, reduction):
    cls_name, kwargs, _ = CRITERIA[name]
    ours = getattr(L, cls_name)(**kwargs, reduction=reduction)
    theirs = getattr(pytorch_ood.loss, cls_name)(**kwargs, reduction=reduction)
    return ours, theirs


def call(module, x, y):
    """(value or exception, warnings as (category, text)) of one forward + backward."""
    x = x.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            out = module(x, y)
        except Exception as e:  # noqa: BLE001 - the error itself is compared
            return e, None, [(w.category, str(w.message)) for w in record]
    if out.requires_grad and out.numel():
        weights = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
        (out * weights).sum().backward()
    grad = x.grad if x.grad is not None else torch.zeros_like(x)
    return out.detach(), grad, [(w.category, str(w.message)) for w in record]


def compare(ours, theirs, x, y):
    a, grad_a, warn_a = call(ours, x, y)
    b, grad_b, warn_b = call(theirs, x, y)
    if isinstance(b, Exception):
        assert isinstance(a, type(b)), (a, b)
        assert str(a) == str(b)
        return
    assert not isinstance(a, Exception), a
    assert warn_a == warn_b
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-5, atol=1e-6, equal_nan=True)


def grid():
    for name, (_, _, tasks) in CRITERIA.items():
        for task in tasks:
            for reduction in REDUCTIONS:
                for labels in LABELS:
                    yield name, task, reduction, labels


@pytest.mark.parametrize("name,task,reduction,labels", list(grid()))
def test_matches_pytorch_ood(name, task, reduction, labels):
    x, y = make_case(name, task, labels)
    torch.manual_seed(0)
    ours, theirs = both(name, reduction)
    compare(ours, theirs, x, y)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("cross_entropy", (4, 19, 64, 64)),
        ("oe", (4, 19, 64, 64)),
        ("entropic", (4, 19, 64, 64)),
        ("energy_margins", (4, 19, 64, 64)),
        ("background", (3, 11, 32, 16)),
        ("cross_entropy", (4096, 1000)),
        ("oe_alpha", (2048, 100)),
        ("energy", (1024, 10)),
        ("logit_norm", (4096, 1000)),
        ("entropic", (333, 7)),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_random_larger_shapes(name, shape, reduction):
    g = torch.Generator().manual_seed(1)
    x = 3.0 * torch.randn(shape, generator=g)
    tshape = shape[:1] + shape[2:]
    n_id = shape[1] - 1 if name == "background" else shape[1]
    y = torch.randint(-3, n_id, tshape, generator=g)
    ours, theirs = both(name, reduction)
    if name == "background":
        ours.num_classes = theirs.num_classes = n_id
    compare(ours, theirs, x, y)


def test_cross_entropy_functional_and_bcl():
    x = torch.randn(4, C, 6)
    y = torch.arange(24).reshape(4, 6) % (C + 2) - 2
    for reduction in REDUCTIONS:
        a = L.cross_entropy(x, y, reduction)
        b = pytorch_ood.loss.crossentropy.cross_entropy(x, y, reduction)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    compare(L.CrossEntropyLoss("none"), pytorch_ood.loss.CrossEntropyLoss("none"), x, y)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logit_norm_functional(reduction):
    x, y = make_case("logit_norm", "cls", "mixed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = L.logit_norm_loss(x, y, 0.5, reduction)
        b = pytorch_ood.loss.logitnorm.logit_norm_loss(x, y, 0.5, reduction)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["background", "cross_entropy", "oe", "entropic", "energy", "logit_norm"])
def test_label_out_of_range_errors(name):
    x, y = make_case(name, "cls", "all_id")
    y = y.clone()
    y[3] = columns(name) + 2
    ours, theirs = both(name, "mean")
    a, _, _ = call(ours, x, y)
    b, _, _ = call(theirs, x, y)
    assert isinstance(b, Exception)
    assert isinstance(a, type(b))  # IndexError for the cross-entropy terms, ValueError for Background
    if name == "background":
        assert str(a) == str(b)


def test_background_ood_with_n_columns():
    x = torch.randn(B, C)
    y = torch.arange(B) % (C + 1) - 1
    a, _, _ = call(L.BackgroundClassLoss(C), x, y)
    b, _, _ = call(pytorch_ood.loss.BackgroundClassLoss(C), x, y)
    assert isinstance(b, IndexError) and isinstance(a, IndexError)


@pytest.mark.parametrize("name", list(CRITERIA))
def test_construction_state_and_metadata(name):
    cls_name, kwargs, _ = CRITERIA[name]
    torch.manual_seed(123)
    ours = getattr(L, cls_name)(**kwargs)
    state_ours = torch.get_rng_state()
    torch.manual_seed(123)
    theirs = getattr(pytorch_ood.loss, cls_name)(**kwargs)
    assert torch.equal(state_ours, torch.get_rng_state())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert {t.value for t in ours.info.tasks} == {t.value for t in theirs.info.tasks}
    assert {r.value for r in ours.info.inputs} == {r.value for r in theirs.info.inputs}
    assert ours.info.supervised == theirs.info.supervised
    assert vars(ours).keys() >= {k for k in vars(theirs) if not k.startswith("_")}
