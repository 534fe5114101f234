"""The batch-coupled criteria on the fused row kernels (Confidence, Objectosphere, VOSReg, VOS-synth,
EnergyMargin) and their building block ``ce_and_energy`` / ``oodkernels::row_loss_energy_fwd``, against
the plain-PyTorch reference (Triton interpreter on a CPU)."""

import pytest
import torch
from torch import nn

import oodkernels as ok
from oodkernels import testing
from oodkernels.ops import row_ops

pytestmark = pytest.mark.filterwarnings("ignore:Discarding samples")

C = 7
D = 5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _tensors_on_the_kernel_device():
    if DEVICE == "cpu":
        yield
        return
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


def _use(backend, monkeypatch):
    monkeypatch.setenv("OODKERNELS_BACKEND", backend)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _run(backend, monkeypatch, fn, inputs, params=(), grad_output=None):
    _use(backend, monkeypatch)
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    for p in params:
        p.grad = None
    value = fn(*leaves)
    go = torch.ones_like(value) if grad_output is None else grad_output.to(value.dtype)
    value.backward(go)
    grads = [t.grad for t in leaves if t.requires_grad] + [p.grad for p in params]
    return value.detach(), grads


def _compare(monkeypatch, fn, inputs, params=(), grad_output=None, atol=None, rtol=None):
    value, grads = _run("triton", monkeypatch, fn, inputs, params, grad_output)
    ref_value, ref_grads = _run("reference", monkeypatch, fn, inputs, params, grad_output)
    assert value.dtype == ref_value.dtype and value.shape == ref_value.shape
    testing.assert_close(value, ref_value, atol=atol, rtol=rtol, name="value")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None:
            assert g is None or not g.any()
            continue
        testing.assert_close(g, r, atol=atol, rtol=rtol, name=f"gradient {i}")
    return value


def _logits(shape, dtype=torch.float32, layout="contiguous"):
    return testing.make_logits(shape[0], shape[1], shape[2:], dtype=dtype, layout=layout, device=DEVICE)


def _targets(shape, pattern):
    return testing.make_targets(shape, C, pattern, device=DEVICE)


def _vos_modules(dtype=torch.float32):
    torch.manual_seed(3)
    phi = nn.Linear(1, 2).to(dtype)
    weights = nn.Linear(C, 1).to(dtype)
    nn.init.uniform_(weights.weight, -0.3, 1.0)  # some negative weights: relu's zero branch
    return phi, weights


# ----------------------------------------------------------------------------------------------
# the building block
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("uniform_ood", [False, True])
@pytest.mark.parametrize(
    "shape,layout", [((9, C), "contiguous"), ((9, C), "transposed"), ((2, C, 3, 2), "channels_last")], ids=str
)
def test_ce_and_energy_equals_reference(monkeypatch, shape, layout, weighted, uniform_ood):
    logits = _logits(shape, layout=layout)
    targets = _targets((shape[0], *shape[2:]), "mixed")
    weight = (torch.rand(1, C) - 0.2).requires_grad_() if weighted else None
    go_ce, go_e = torch.randn(2, targets.numel())

    def fn(x):
        ce, energy = ok.functional.ce_and_energy(x, targets, weight, uniform_ood)
        return (ce * go_ce).sum() + (energy * go_e).sum()

    with row_ops.forced_blocks(4, 4):
        _compare(monkeypatch, fn, [logits], params=[weight] if weighted else [])


def test_row_loss_energy_gradcheck_fp64(monkeypatch):
    _use("triton", monkeypatch)
    x = _logits((6, C), dtype=torch.float64).requires_grad_()
    y = _targets((6,), "mixed")
    w = (torch.rand(C, dtype=torch.float64) + 0.1).requires_grad_()
    for kind in (1, 2):

        def fn(x, w, kind=kind):
            values, energy, _ = torch.ops.oodkernels.row_loss_energy_fwd(
                x, y, None, kind, 0.3, -3.0, -2.0, None, 4, 2, w
            )
            return values, energy

        assert torch.autograd.gradcheck(fn, (x, w), fast_mode=True)
    energy_op = torch.ops.oodkernels.row_loss_energy_fwd
    assert torch.autograd.gradcheck(
        lambda x: energy_op(x, y, None, 0, 0.0, 0.0, 0.0, None, 4, 2, None)[1], (x,), fast_mode=True
    )


def test_opcheck_row_loss_energy_ops(monkeypatch):
    from torch.library import opcheck

    _use("triton", monkeypatch)

    logits = _logits((2, C, 3, 2), layout="channels_last")
    targets = _targets((2, 3, 2), "mixed")
    w = torch.rand(C) - 0.2
    for weight in (None, w):
        for requires_grad in (False, True):
            x = logits.detach().requires_grad_(requires_grad)
            wt = None if weight is None else weight.detach().requires_grad_(requires_grad)
            opcheck(
                torch.ops.oodkernels.row_loss_energy_fwd.default, (x, targets, None, 1, 1.0, 0.0, 0.0, None, 4, 4, wt)
            )
        _, energy, stats = torch.ops.oodkernels.row_loss_energy_fwd(
            logits, targets, None, 0, 0.0, 0.0, 0.0, None, 4, 4, weight
        )
        gv, ge = torch.randn(2, targets.numel())
        bwd = (gv, ge, logits, targets, None, stats, energy, weight, 0, 0.0, 0.0, 0.0, None, 4, 4)
        opcheck(torch.ops.oodkernels.row_loss_energy_bwd.default, bwd)
    opcheck(
        torch.ops.oodkernels.row_loss_energy_fwd.default,
        (logits[:0], targets[:0], None, 0, 0.0, 0.0, 0.0, None, 0, 0, None),
    )


def test_energy_double_backward_raises(monkeypatch):
    _use("triton", monkeypatch)
    x = _logits((5, C), dtype=torch.float64).requires_grad_()
    _, energy = ok.functional.ce_and_energy(x, _targets((5,), "mixed"))
    (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="row_loss_energy_bwd: double backward"):
        grad.sum().backward()


# ----------------------------------------------------------------------------------------------
# criteria
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood", "empty"])
def test_confidence_loss(monkeypatch, pattern):
    logits = _logits((10, C))
    targets = _targets((10,), pattern)
    confidence = torch.rand(10, 1)
    if pattern == "empty":
        logits, confidence = logits[:0], confidence[:0]
    _compare(monkeypatch, ok.loss.ConfidenceLoss(alpha=0.7), [logits, confidence, targets[: logits.shape[0]]])


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", None])
def test_objectosphere_loss(monkeypatch, reduction, pattern):
    logits = _logits((10, C), layout="transposed")
    features = torch.randn(10, D) * 0.5
    targets = _targets((10,), pattern)
    criterion = ok.loss.ObjectosphereLoss(alpha=0.5, xi=1.2, reduction=reduction)
    go = torch.randn(10) if reduction in ("none", None) else None
    _compare(monkeypatch, criterion, [logits, features, targets], grad_output=go)


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood", "empty"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,layout", [((10, C), "contiguous"), ((2, C, 3, 2), "contiguous")], ids=str)
def test_vos_reg_loss(monkeypatch, shape, layout, reduction, pattern):
    phi, weights = _vos_modules()
    criterion = ok.loss.VOSRegLoss(phi, weights, alpha=0.3, reduction=reduction)
    logits = _logits(shape, layout=layout)
    targets = _targets((shape[0], *shape[2:]), pattern)
    if pattern == "empty":
        logits = logits[:0]
    go = torch.randn(targets.shape) if reduction == "none" else None
    with row_ops.forced_blocks(4, 4):
        _compare(monkeypatch, criterion, [logits, targets], params=list(criterion.parameters()), grad_output=go)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_batch_coupled_dtypes(monkeypatch, dtype):
    logits = _logits((2, C, 2, 3), dtype=dtype)
    targets = _targets((2, 2, 3), "mixed")
    phi, weights = _vos_modules()
    atol, rtol = testing.tolerances(dtype)
    if dtype == torch.bfloat16:
        atol = 0.05  # one bf16 ulp at magnitude ~4-8, rounded once by each side
    value = _compare(monkeypatch, ok.loss.VOSRegLoss(phi, weights), [logits, targets], atol=atol, rtol=rtol)
    assert value.dtype == dtype
    flat = _logits((8, C), dtype=dtype)
    _compare(
        monkeypatch,
        ok.loss.ConfidenceLoss(),
        [flat, torch.rand(8, dtype=dtype), _targets((8,), "mixed")],
        atol=atol,
        rtol=rtol,
    )


def test_vos_gradcheck_fp64(monkeypatch):
    _use("triton", monkeypatch)
    phi, weights = _vos_modules(torch.float64)
    criterion = ok.loss.VOSRegLoss(phi, weights, reduction="none")
    logits = _logits((6, C), dtype=torch.float64).requires_grad_()
    targets = _targets((6,), "mixed")
    with row_ops.forced_blocks(4, 2):
        assert torch.autograd.gradcheck(lambda x: criterion(x, targets), (logits,), fast_mode=True)


def test_energy_margin_loss(monkeypatch):
    torch.manual_seed(1)
    phi = nn.Linear(1, 2)
    criterion = ok.loss.EnergyMarginLoss(full_train_loss=0.2, eta=0.5)
    criterion.lam.fill_(0.3)
    criterion.lam2.fill_(-2.0)  # the constant branch of the second ALM term
    logits = _logits((12, C))
    targets = _targets((12,), "mixed")
    _compare(monkeypatch, lambda x, y: criterion(x, y, phi) * 3, [logits, targets], params=list(phi.parameters()))


def test_energy_margin_missing_group_raises_only_with_checks(monkeypatch):
    from oodkernels import config

    _use("triton", monkeypatch)
    criterion = ok.loss.EnergyMarginLoss(full_train_loss=0.2)
    logits, targets = _logits((6, C)), _targets((6,), "all_id")
    with pytest.raises(ValueError, match="Every batch has to contain both ID and OOD samples"):
        criterion(logits, targets, nn.Linear(1, 1))
    config.data_checks = False
    assert torch.isnan(criterion(logits, targets, nn.Linear(1, 1)))


def test_vos_synthesis_fused_equals_reference(monkeypatch):
    """Three steps (fill, fill to full, sample) with the same RNG stream: identical queues, close losses."""
    results = {}
    for backend in ("triton", "reference"):
        _use(backend, monkeypatch)
        torch.manual_seed(0)
        phi, weights = _vos_modules()
        fc = nn.Linear(D, C)
        criterion = ok.loss.VirtualOutlierSynthesizingRegLoss(
            phi, weights, fc, sample_number=2, sample_from=20, select=2
        )
        gen = torch.Generator().manual_seed(4)
        losses, grads = [], []
        for _ in range(3):
            logits = torch.randn(12, C, generator=gen).requires_grad_()
            features = torch.randn(12, D, generator=gen)
            targets = torch.arange(12) % (C + 1) - 1
            criterion.zero_grad()
            loss = criterion(logits, features, targets)
            loss.backward()
            losses.append(loss.detach())
            grads.append([logits.grad] + [p.grad.clone() for p in criterion.parameters() if p.grad is not None])
        results[backend] = (losses, grads, criterion.data_dict.clone(), criterion.fill_counts.clone())
    fused, ref = results["triton"], results["reference"]
    assert torch.equal(fused[2], ref[2]) and torch.equal(fused[3], ref[3])
    assert ref[0][-1] != ref[0][0]  # the regulariser is active on the last step
    for a, b in zip(fused[0], ref[0]):
        testing.assert_close(a, b)
    for ga, gb in zip(fused[1], ref[1]):
        assert len(ga) == len(gb)
        for a, b in zip(ga, gb):
            testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_criteria_compile_fullgraph(monkeypatch, compile_reset):
    from oodkernels import config

    _use("triton", monkeypatch)
    config.data_checks = False
    phi, weights = _vos_modules()
    criterion = ok.loss.VOSRegLoss(phi, weights)
    logits = _logits((2, C, 2, 3))
    targets = _targets((2, 2, 3), "mixed")
    eager_x = logits.clone().requires_grad_()
    eager = criterion(eager_x, targets)
    eager.backward()
    compiled_x = logits.clone().requires_grad_()
    compiled = torch.compile(criterion, fullgraph=True, backend="aot_eager")(compiled_x, targets)
    compiled.backward()
    testing.assert_close(compiled.detach(), eager.detach())
    testing.assert_close(compiled_x.grad, eager_x.grad)


def test_fused_kernels_are_used(monkeypatch):
    calls = []
    original = row_ops._kernels.row_loss_energy_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(row_ops._kernels, "row_loss_energy_forward", spy)
    _use("triton", monkeypatch)
    logits, targets = _logits((6, C)), _targets((6,), "mixed")
    phi, weights = _vos_modules()
    ok.loss.VOSRegLoss(phi, weights)(logits, targets)
    ok.loss.ObjectosphereLoss()(logits, torch.randn(6, D), targets)
    ok.loss.ConfidenceLoss()(logits, torch.rand(6), targets)
    ok.loss.EnergyMarginLoss(0.1)(logits, targets, nn.Linear(1, 2))
    assert len(calls) == 4
    assert ok.backend_info()["operations"]["ce_and_energy"]["cuda"] == "triton"


def test_inputs_not_mutated(monkeypatch):
    _use("triton", monkeypatch)
    phi, weights = _vos_modules()
    logits = _logits((8, C)).requires_grad_()
    targets = _targets((8,), "mixed")
    before, w_before = logits.detach().clone(), weights.weight.detach().clone()
    loss = ok.loss.VOSRegLoss(phi, weights)(logits, targets)
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    logits.grad = None
    loss.backward()
    assert torch.equal(first, logits.grad)
    assert torch.equal(logits.detach(), before) and torch.equal(weights.weight.detach(), w_before)
