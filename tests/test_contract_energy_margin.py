"""Contract tests of EnergyMarginLoss (LOSS_CONTRACT.md §3.17, §6, §8)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data import TensorDataset

from oodkernels import config
from oodkernels.reference._common import LabelOutOfRangeError
from oodkernels.reference._common import Representation
from oodkernels.reference._common import Task
from oodkernels.reference.energy_margin import EnergyMarginLoss

B, C = 8, 3
MIXED = torch.tensor([-1, 0, 1, 2, -1, 0, 1, 2])
BUFFERS = [
    "full_train_loss",
    "eta",
    "false_alarm_cutoff",
    "in_constraint_weight",
    "lam",
    "lam2",
    "ce_tol",
    "ce_constraint_weight",
    "out_constraint_weight",
    "lr_lam",
    "penalty_mult",
    "constraint_tol",
]
BOTH = "Every batch has to contain both ID and OOD samples"
DTYPE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def make_phi(width=1, seed=2):
    g = torch.Generator().manual_seed(seed)
    phi = torch.nn.Linear(1, width)
    with torch.no_grad():
        phi.weight.copy_(torch.randn(width, 1, generator=g))
        phi.bias.copy_(torch.randn(width, generator=g))
    return phi


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def psi(c, lam, beta):
    return lam * c + beta / 2 * c * c if beta * c + lam >= 0 else -lam * lam / (2 * beta)


def naive_energy_margin(logits, y, phi, p):
    """Hand formula of §3.17 in Python floats; ``p`` maps buffer names to floats."""
    pw = [float(v) for v in phi.weight.detach().double().reshape(-1)]
    pb = [float(v) for v in phi.bias.detach().double()]
    sig_in, sig_out, ce = [], [], []
    for row, t in zip(logits.double().tolist(), y.tolist()):
        s = lse(row)
        if t >= 0:
            sig_in += [sigmoid(w * s + b) for w, b in zip(pw, pb)]
            ce.append(s - row[t])
        else:
            sig_out += [sigmoid(-(w * (s - p["eta"]) + b)) for w, b in zip(pw, pb)]
    c1 = sum(sig_in) / len(sig_in) - p["false_alarm_cutoff"]
    c2 = sum(ce) / len(ce) - p["ce_tol"] * p["full_train_loss"]
    return (
        psi(c2, p["lam2"], p["ce_constraint_weight"])
        + p["out_constraint_weight"] * sum(sig_out) / len(sig_out)
        + psi(c1, p["lam"], p["in_constraint_weight"])
    )


def params_of(loss):
    return {k: float(v) for k, v in loss.state_dict().items()}


def test_info_and_state_dict():
    state = torch.get_rng_state()
    loss = EnergyMarginLoss(0.5, eta=2.0, false_alarm_cutoff=0.1, in_constraint_weight=3.0, ce_tol=1.5)
    assert torch.equal(state, torch.get_rng_state())
    assert loss.info.tasks == {Task.CLASSIFICATION}
    assert loss.info.inputs == {Representation.LOGITS}
    assert loss.info.supervised is True
    sd = loss.state_dict()
    assert list(sd) == BUFFERS
    for v in sd.values():
        assert v.shape == () and v.dtype == torch.float32 and not v.requires_grad
    assert params_of(loss) == {
        "full_train_loss": 0.5,
        "eta": 2.0,
        "false_alarm_cutoff": pytest.approx(0.1),
        "in_constraint_weight": 3.0,
        "lam": 0.0,
        "lam2": 0.0,
        "ce_tol": 1.5,
        "ce_constraint_weight": 1.0,
        "out_constraint_weight": 1.0,
        "lr_lam": 1.0,
        "penalty_mult": 1.5,
        "constraint_tol": 0.0,
    }
    assert list(loss.parameters()) == []
    other = EnergyMarginLoss(9.0)
    other.load_state_dict(sd)
    assert params_of(other) == params_of(loss)


# (lam, lam2): both ALM branches of both constraints
BRANCHES = [(0.0, 0.0), (-5.0, -5.0), (2.0, -30.0), (-30.0, 0.5)]


@pytest.mark.parametrize("lams", BRANCHES)
@pytest.mark.parametrize("width", [1, 2])
def test_values_match_hand_formula(lams, width):
    loss = EnergyMarginLoss(0.4, eta=1.5, in_constraint_weight=2.0, ce_constraint_weight=0.5, out_constraint_weight=0.7)
    loss.lam.fill_(lams[0])
    loss.lam2.fill_(lams[1])
    phi = make_phi(width)
    logits = torch.randn(B, C) * 2
    out = loss(logits, MIXED, phi)
    assert out.shape == () and out.dtype == torch.float32
    expected = naive_energy_margin(logits, MIXED, phi, params_of(loss))
    torch.testing.assert_close(out.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_branches_are_really_different():
    phi = make_phi()
    logits = torch.randn(B, C)
    values = []
    for lam in (0.0, -50.0):
        loss = EnergyMarginLoss(1.0)
        loss.lam.fill_(lam)
        values.append(loss(logits, MIXED, phi))
    p = params_of(EnergyMarginLoss(1.0))
    p["lam"] = -50.0
    # the inactive branch is the constant −λ²/(2β)
    torch.testing.assert_close(values[1].double(), torch.tensor(naive_energy_margin(logits, MIXED, phi, p)).double())
    assert values[1] < values[0] - 1000


def autograd_formula(logits, y, phi, loss):
    p = params_of(loss)
    known = y >= 0
    s_in = torch.logsumexp(logits[known], 1).unsqueeze(1)
    s_out = torch.logsumexp(logits[~known], 1).unsqueeze(1) - p["eta"]
    l_in = torch.sigmoid(phi(s_in)).mean()
    l_out = torch.sigmoid(-phi(s_out)).mean()
    c1 = l_in - p["false_alarm_cutoff"]
    c2 = F.cross_entropy(logits[known], y[known]) - p["ce_tol"] * p["full_train_loss"]

    def penalty(c, lam, beta):
        if beta * float(c.detach()) + lam >= 0:
            return lam * c + beta / 2 * c**2
        return c * 0 - lam**2 / (2 * beta)

    return (
        penalty(c2, p["lam2"], p["ce_constraint_weight"])
        + p["out_constraint_weight"] * l_out
        + penalty(c1, p["lam"], p["in_constraint_weight"])
    )


@pytest.mark.parametrize("lams", BRANCHES)
def test_gradients_match_hand_formula(lams):
    loss = EnergyMarginLoss(0.4, in_constraint_weight=2.0).double()
    loss.lam.fill_(lams[0])
    loss.lam2.fill_(lams[1])
    phi = make_phi(2).double()
    logits = torch.randn(B, C, dtype=torch.float64, requires_grad=True)
    params = [logits, phi.weight, phi.bias]
    grads = torch.autograd.grad(loss(logits, MIXED, phi), params)
    ref = torch.autograd.grad(autograd_formula(logits, MIXED, phi, loss), params)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lams", BRANCHES)
def test_gradcheck(lams):
    loss = EnergyMarginLoss(0.4)
    loss.lam.fill_(lams[0])
    loss.lam2.fill_(lams[1])
    phi = make_phi().double()
    logits = torch.randn(B, C, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: loss(x, MIXED, phi), (logits,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    loss = EnergyMarginLoss(0.4)
    phi = make_phi()
    if dtype == torch.float64:  # φ receives its inputs in its own dtype
        phi = phi.double()
    logits = torch.randn(B, C).to(dtype)
    out = loss(logits, MIXED, phi)
    assert out.dtype == dtype
    expected = naive_energy_margin(logits.double(), MIXED, phi, params_of(loss))
    rtol = DTYPE_RTOL[dtype]
    torch.testing.assert_close(out.double(), torch.tensor(expected, dtype=torch.float64), rtol=rtol, atol=rtol)
    x = logits.clone().requires_grad_()
    loss(x, MIXED, phi).backward()
    assert x.grad.dtype == dtype


@pytest.mark.parametrize(
    "y", [torch.tensor([0, 1, 2, 0]), torch.tensor([-1, -1, -2, -1]), torch.zeros(0, dtype=torch.long)]
)
def test_both_groups_required(y):
    loss = EnergyMarginLoss(1.0)
    phi = make_phi()
    with pytest.raises(ValueError, match=BOTH):
        loss(torch.randn(len(y), C), y, phi)
    config.data_checks = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isnan(loss(torch.randn(len(y), C), y, phi))


def test_shape_errors_and_their_order():
    loss = EnergyMarginLoss(1.0)
    phi = make_phi()
    with pytest.raises(ValueError, match=r"Unsupported input shape: torch.Size\(\[2, 3, 4, 4\]\)"):
        loss(torch.randn(2, C, 4, 4), torch.tensor([[[0, -1, 1, 1]] * 4] * 2), phi)
    # the groups are checked first
    with pytest.raises(ValueError, match=BOTH):
        loss(torch.randn(2, C, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), phi)
    with pytest.raises(ValueError, match=r"Unsupported input shape"):
        loss(torch.randn(2, C, 4), torch.tensor([[0, -1, 1, 1]] * 2), phi)
    with pytest.raises(TypeError, match="targets"):
        loss(torch.randn(B, C), MIXED.float(), phi)
    with pytest.raises(TypeError, match="logits"):
        loss(torch.zeros(B, C, dtype=torch.long), MIXED, phi)
    with pytest.raises(ValueError, match="targets"):
        loss(torch.randn(B, C), MIXED[:-1], phi)


def test_label_out_of_range():
    loss = EnergyMarginLoss(1.0)
    phi = make_phi()
    y = torch.tensor([0, 3, -1])
    with pytest.raises(LabelOutOfRangeError, match="targets"):
        loss(torch.randn(3, C), y, phi)
    config.data_checks = False
    assert torch.isnan(loss(torch.randn(3, C), y, phi))


def test_compile_fullgraph(compile_reset):
    config.data_checks = False
    loss = EnergyMarginLoss(0.4)
    loss.lam.fill_(-0.5)
    phi = make_phi()
    logits = torch.randn(B, C, requires_grad=True)
    eager = loss(logits, MIXED, phi)
    compiled = torch.compile(lambda x, y: loss(x, y, phi), fullgraph=True, backend="aot_eager")
    out = compiled(logits, MIXED)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(torch.autograd.grad(out, logits)[0], torch.autograd.grad(eager, logits)[0])


# ----------------------------------------------------------------------------------------------
# update_hyperparameters
# ----------------------------------------------------------------------------------------------


def naive_update(model, loader, phi, p):
    pw, pb = float(phi.weight.detach().reshape(-1)[0]), float(phi.bias.detach().reshape(-1)[0])
    sig, ce = [], []
    with torch.no_grad():
        for x, y in loader:
            for row, t in zip(model(x).double().tolist(), y.tolist()):
                s = lse(row)
                sig.append(sigmoid(pw * s + pb))
                ce.append(s - row[t])
    c1 = sum(sig) / len(sig) - p["false_alarm_cutoff"]
    c2 = sum(ce) / len(ce) - p["ce_tol"] * p["full_train_loss"]
    q = dict(p)
    beta, beta2 = p["in_constraint_weight"], p["ce_constraint_weight"]
    q["lam"] = p["lam"] + p["lr_lam"] * c1 if c1 * beta + p["lam"] >= 0 else p["lam"] - p["lr_lam"] * p["lam"] / beta
    q["lam2"] = (
        p["lam2"] + p["lr_lam"] * c2 if c2 * beta2 + p["lam2"] >= 0 else p["lam2"] - p["lr_lam"] * p["lam2"] / beta2
    )
    q["in_constraint_weight"] = beta * p["penalty_mult"] if c1 > p["constraint_tol"] else beta
    q["ce_constraint_weight"] = beta2 * p["penalty_mult"] if c2 > p["constraint_tol"] else beta2
    return q


@pytest.mark.parametrize(
    "setup",
    [
        dict(full_train_loss=0.3),  # both constraints violated: λ grow, β multiplied
        dict(full_train_loss=50.0, false_alarm_cutoff=0.99, lam=-3.0, lam2=-2.0, lr_lam=0.5),  # λ shrink branch
        dict(full_train_loss=0.3, constraint_tol=100.0, lam=0.25),  # β unchanged
    ],
)
def test_update_hyperparameters(setup):
    setup = dict(setup)
    lam, lam2 = setup.pop("lam", 0.0), setup.pop("lam2", 0.0)
    loss = EnergyMarginLoss(**setup)
    loss.lam.fill_(lam)
    loss.lam2.fill_(lam2)
    model = torch.nn.Linear(5, C)
    model.train()
    phi = make_phi()
    loader = DataLoader(TensorDataset(torch.randn(10, 5), torch.randint(0, C, (10,))), batch_size=4)
    for _ in range(3):
        expected = naive_update(model, loader, phi, params_of(loss))
        loss.update_hyperparameters(model, loader, phi)
        got = params_of(loss)
        assert not model.training
        for k in BUFFERS:
            assert got[k] == pytest.approx(expected[k], rel=1e-5, abs=1e-6), k
        model.train()
    assert all(v.shape == () and v.dtype == torch.float32 for v in loss.state_dict().values())
    restored = EnergyMarginLoss(1.0)
    restored.load_state_dict(loss.state_dict())
    assert params_of(restored) == params_of(loss)


def test_update_hyperparameters_then_forward_uses_new_multipliers():
    loss = EnergyMarginLoss(0.3)
    model = torch.nn.Linear(5, C)
    phi = make_phi()
    loader = DataLoader(TensorDataset(torch.randn(6, 5), torch.randint(0, C, (6,))), batch_size=3)
    loss.update_hyperparameters(model, loader, phi)
    assert float(loss.lam) != 0.0
    logits = torch.randn(B, C)
    expected = naive_energy_margin(logits, MIXED, phi, params_of(loss))
    torch.testing.assert_close(loss(logits, MIXED, phi).double(), torch.tensor(expected, dtype=torch.float64))
