"""VOSRegLoss, VirtualOutlierSynthesizingRegLoss and EnergyMarginLoss against pytorch-ood 0.4.0 (§8.1, §8.6)."""

import copy
import warnings

import pytest
import torch
from _pytorch_ood import pytorch_ood
from _pytorch_ood import requires_oracle
from torch.utils.data import DataLoader
from torch.utils.data import TensorDataset

from oodkernels import config
from oodkernels.reference.energy_margin import EnergyMarginLoss
from oodkernels.reference.vos import VirtualOutlierSynthesizingRegLoss
from oodkernels.reference.vos import VOSRegLoss

pytestmark = [requires_oracle, pytest.mark.oracle]

B, C, D = 8, 3, 5
RTOL, ATOL = 1e-5, 1e-6
REDUCTIONS = ["mean", "sum", "none", None]


def labels(pattern, shape):
    n = 1
    for s in shape:
        n *= s
    if pattern == "mixed":
        y = (torch.arange(n) % (C + 1)) - 1
    elif pattern == "all_id":
        y = torch.arange(n) % C
    else:
        y = -1 - (torch.arange(n) % 2)
    return y.reshape(shape)


def run(fn, inputs, params):
    """Value, grads w.r.t. ``inputs`` and ``params`` (None for unused), warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    grads = torch.autograd.grad(out.sum(), inputs + params, allow_unused=True) if out.requires_grad else None
    return out, grads, [(w.category, str(w.message)) for w in caught]


def assert_same(mine, ref, none_is_zero=False, compare_warnings=True):
    out, grads, warns = mine
    rout, rgrads, rwarns = ref
    assert out.shape == rout.shape
    assert out.dtype == rout.dtype
    torch.testing.assert_close(out, rout, rtol=RTOL, atol=ATOL, equal_nan=True)
    if compare_warnings:
        assert warns == rwarns
    else:  # data checks off: no data-dependent warning
        assert warns == []
    if rgrads is None:
        assert grads is None or all(g is None or not g.any() for g in grads)
        return
    for g, r in zip(grads, rgrads):
        if none_is_zero:
            continue_if_both_zero = (g is None or not g.any()) and (r is None or not r.any())
            if continue_if_both_zero:
                continue
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL)


def vos_modules(n_classes, seed=0):
    torch.manual_seed(seed)
    phi = torch.nn.Linear(1, 2)
    we = torch.nn.Linear(n_classes, 1)
    torch.nn.init.uniform_(we.weight)
    return phi, we


# ----------------------------------------------------------------------------------------------
# VOSRegLoss grid
# ----------------------------------------------------------------------------------------------


def vosreg_case(logits, y, reduction, alpha=0.1):
    n_classes = logits.shape[1]
    phi, we = vos_modules(n_classes)
    mine = VOSRegLoss(copy.deepcopy(phi), copy.deepcopy(we), alpha=alpha, reduction=reduction)
    ref = pytorch_ood.loss.VOSRegLoss(copy.deepcopy(phi), copy.deepcopy(we), alpha=alpha, reduction=reduction)
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    a = run(lambda: mine(x1, y), [x1], list(mine.parameters()))
    b = run(lambda: ref(x2, y), [x2], list(ref.parameters()))
    assert_same(a, b)


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood", "empty"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("task", ["cls", "seg"])
def test_vosreg_grid(task, reduction, pattern):
    torch.manual_seed(1)
    if task == "cls":
        shape = (0,) if pattern == "empty" else (B,)
        logits = torch.randn(shape[0], C) * 2
    else:
        shape = (0, 4, 4) if pattern == "empty" else (2, 4, 4)
        logits = torch.randn(shape[0], C, 4, 4) * 2
    y = labels("mixed" if pattern == "empty" else pattern, shape)
    vosreg_case(logits, y, reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vosreg_larger_random(reduction):
    torch.manual_seed(2)
    vosreg_case(torch.randn(512, 100) * 3, torch.randint(-2, 100, (512,)), reduction, alpha=0.3)
    vosreg_case(torch.randn(2, 19, 16, 16) * 3, torch.randint(-1, 19, (2, 16, 16)), reduction)


# ----------------------------------------------------------------------------------------------
# VirtualOutlierSynthesizingRegLoss over several steps
# ----------------------------------------------------------------------------------------------


def synth_pair(n_classes, dim, reduction, size, sample_from, select):
    phi, we = vos_modules(n_classes, seed=3)
    fc = torch.nn.Linear(dim, n_classes)
    kwargs = dict(alpha=0.5, reduction=reduction, sample_number=size, select=select, sample_from=sample_from)
    mine = VirtualOutlierSynthesizingRegLoss(copy.deepcopy(phi), copy.deepcopy(we), copy.deepcopy(fc), **kwargs)
    ref = pytorch_ood.loss.VirtualOutlierSynthesizingRegLoss(
        copy.deepcopy(phi), copy.deepcopy(we), copy.deepcopy(fc), **kwargs
    )
    return mine, ref


def synth_steps(mine, ref, batches, checks, n_classes, dim):
    config.data_checks = checks
    for step, y in enumerate(batches):
        logits = torch.randn(len(y), n_classes) * 2
        feats = torch.randn(len(y), dim) + step % 3
        x1, f1 = logits.clone().requires_grad_(), feats.clone().requires_grad_()
        x2, f2 = logits.clone().requires_grad_(), feats.clone().requires_grad_()
        state = torch.get_rng_state()
        b = run(lambda x=x2, f=f2, t=y: ref(x, f, t), [x2, f2], list(ref.parameters()))
        ref_state = torch.get_rng_state()
        torch.set_rng_state(state)
        a = run(lambda x=x1, f=f1, t=y: mine(x, f, t), [x1, f1], list(mine.parameters()))
        if checks:  # the same draws at the same calls
            assert torch.equal(torch.get_rng_state(), ref_state), step
        torch.set_rng_state(ref_state)
        assert_same(a, b, none_is_zero=True, compare_warnings=checks)
        assert torch.equal(mine.data_dict, ref.data_dict), step
        assert dict(mine.number_dict) == ref.number_dict, step


def synth_batches():
    return [
        labels("mixed", (B,)),
        torch.tensor([0, 0, 0, 0, 0, 1, -1]),  # class 0 overflows
        labels("all_ood", (B,)),
        labels("all_id", (B,)),  # fills the queues: reg still 0
        labels("mixed", (B,)),  # first synthesising call
        labels("all_ood", (B,)),
        torch.tensor([2] * 6 + [0, -1]),  # FIFO, more rows than the queue holds
        labels("all_id", (B,)),
    ]


@pytest.mark.parametrize("checks", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_synth_steps_match_reference(reduction, checks):
    mine, ref = synth_pair(C, D, reduction, size=4, sample_from=20, select=2)
    synth_steps(mine, ref, synth_batches(), checks, C, D)
    assert mine._known_full == checks


def test_synth_larger_random():
    n_classes, dim = 10, 16
    mine, ref = synth_pair(n_classes, dim, "mean", size=8, sample_from=200, select=3)
    torch.manual_seed(5)
    batches = [torch.randint(-1, n_classes, (64,)) for _ in range(6)]
    synth_steps(mine, ref, batches, True, n_classes, dim)


def test_synth_state_dict_round_trip_with_reference():
    mine, ref = synth_pair(C, D, "mean", size=4, sample_from=20, select=1)
    assert list(mine.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        mv = mine.state_dict()[k]
        assert mv.shape == v.shape and mv.dtype == v.dtype
    fresh = pytorch_ood.loss.VirtualOutlierSynthesizingRegLoss(
        torch.nn.Linear(1, 2), torch.nn.Linear(C, 1), torch.nn.Linear(D, C), sample_number=4, sample_from=20
    )
    fresh.load_state_dict(mine.state_dict())
    mine.load_state_dict(ref.state_dict())


# ----------------------------------------------------------------------------------------------
# EnergyMarginLoss
# ----------------------------------------------------------------------------------------------

BRANCHES = [(0.0, 0.0), (-5.0, -5.0), (2.0, -30.0), (-30.0, 0.5)]


def em_case(logits, y, lams, width, **kwargs):
    torch.manual_seed(4)
    phi = torch.nn.Linear(1, width)
    ref = pytorch_ood.loss.EnergyMarginLoss(**kwargs)
    ref.lam.fill_(lams[0])
    ref.lam2.fill_(lams[1])
    mine = EnergyMarginLoss(1.0)
    mine.load_state_dict(ref.state_dict())
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    a = run(lambda: mine(x1, y, phi), [x1], list(phi.parameters()))
    b = run(lambda: ref(x2, y, phi), [x2], list(phi.parameters()))
    assert_same(a, b)


@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("lams", BRANCHES)
def test_energy_margin_values_and_gradients(lams, width):
    torch.manual_seed(6)
    em_case(torch.randn(B, C) * 2, labels("mixed", (B,)), lams, width, full_train_loss=0.4, eta=1.5)


def test_energy_margin_larger_random():
    torch.manual_seed(7)
    y = torch.randint(-1, 100, (1024,))
    em_case(torch.randn(1024, 100) * 3, y, (0.3, 0.2), 1, full_train_loss=2.0, in_constraint_weight=2.0)


@pytest.mark.parametrize(
    "kwargs,lams",
    [
        (dict(full_train_loss=0.3), (0.0, 0.0)),
        (dict(full_train_loss=50.0, false_alarm_cutoff=0.99, lr_lam=0.5), (-3.0, -2.0)),
        (dict(full_train_loss=0.3, constraint_tol=100.0), (0.25, 0.0)),
    ],
)
def test_energy_margin_update_hyperparameters(kwargs, lams):
    torch.manual_seed(8)
    ref = pytorch_ood.loss.EnergyMarginLoss(**kwargs)
    ref.lam.fill_(lams[0])
    ref.lam2.fill_(lams[1])
    mine = EnergyMarginLoss(1.0)
    mine.load_state_dict(ref.state_dict())
    model = torch.nn.Linear(5, C)
    phi = torch.nn.Linear(1, 1)
    loader = DataLoader(TensorDataset(torch.randn(10, 5), torch.randint(0, C, (10,))), batch_size=4)
    y = labels("mixed", (B,))
    for _ in range(3):
        model.train()
        ref.update_hyperparameters(model, loader, phi)
        assert not model.training
        model.train()
        mine.update_hyperparameters(model, loader, phi)
        assert not model.training
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(mine.state_dict()[k], v, rtol=RTOL, atol=ATOL)
        logits = torch.randn(B, C)
        torch.testing.assert_close(mine(logits, y, phi), ref(logits, y, phi), rtol=RTOL, atol=ATOL)
    # state_dict round trip both ways
    back = pytorch_ood.loss.EnergyMarginLoss(1.0)
    back.load_state_dict(mine.state_dict())
    again = EnergyMarginLoss(2.0)
    again.load_state_dict(ref.state_dict())
    for k, v in back.state_dict().items():
        assert torch.equal(v, mine.state_dict()[k])
        assert torch.equal(again.state_dict()[k], ref.state_dict()[k])
        assert v.dtype == again.state_dict()[k].dtype and v.shape == again.state_dict()[k].shape


@pytest.mark.parametrize("y", [labels("all_id", (B,)), labels("all_ood", (B,))])
def test_energy_margin_both_groups_error_matches(y):
    phi = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="Every batch has to contain both ID and OOD samples"):
        pytorch_ood.loss.EnergyMarginLoss(1.0)(torch.randn(B, C), y, phi)
    with pytest.raises(ValueError, match="Every batch has to contain both ID and OOD samples"):
        EnergyMarginLoss(1.0)(torch.randn(B, C), y, phi)
