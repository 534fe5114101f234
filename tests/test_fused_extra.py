"""The batch-coupled criteria on the row kernels (Confidence, Objectosphere, VOSReg, VOS-synth, EnergyMargin)
and their building block ``ce_and_energy`` / ``oodkernels::row_loss_energy_fwd``, against the plain-PyTorch
reference.

The bodies shared by the Triton kernels (the interpreter on a CPU) and the C++ ones run on both (param
``backend``; the C++ one skipped when the extension cannot be built, an error under
``OODKERNELS_REQUIRE_CPP=1``), with the cases of each: few small ones with forced small blocks in the
interpreter, every layout and class chunk on C++. Triton-only tests follow; the C++-only ones (C++ against the
Triton kernels, the new scores, half dtypes of ce_and_energy, the paired API, thread determinism) are in
tests/test_cpp_rows_energy.py.
"""

import contextlib

import pytest
import torch
from _backends import BACKENDS
from _backends import kernel_device
from _backends import over_backends
from _backends import spy_calls
from _backends import use_backend
from _energy import LAYOUTS
from _energy import C
from _energy import D
from _energy import compare
from _energy import rand_logits
from _energy import rand_targets
from _energy import vos_modules
from torch import nn

import oodkernels as ok
from oodkernels import testing
from oodkernels.ops import row_ops

pytestmark = pytest.mark.filterwarnings("ignore:Discarding samples")


@pytest.fixture(autouse=True)
def _tensors_on_the_kernel_device(request):
    yield from kernel_device(request)


def _blocks(blocks):
    """Forced (rows, classes) blocks, or the launch heuristic's for ``None``."""
    return contextlib.nullcontext() if blocks is None else row_ops.forced_blocks(*blocks)


# ----------------------------------------------------------------------------------------------
# the building block
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("uniform_ood", [False, True])
@pytest.mark.parametrize(
    "backend,shape,layout,blocks",
    over_backends(
        triton=[
            ((9, C), "contiguous", (4, 4)),
            ((9, C), "transposed", (4, 4)),
            ((2, C, 3, 2), "channels_last", (4, 4)),
        ],
        cpp=[(shape, layout, blocks) for shape, layout in LAYOUTS for blocks in (None, (1, 3))],
    ),
    ids=str,
)
def test_ce_and_energy_equals_reference(monkeypatch, backend, shape, layout, blocks, weighted, uniform_ood):
    logits = rand_logits(shape, layout=layout)
    targets = rand_targets((shape[0], *shape[2:]), "mixed")
    weight = (torch.rand(1, C) - 0.2).requires_grad_() if weighted else None
    go_ce, go_e = torch.randn(2, targets.numel())

    def fn(x):
        ce, energy = ok.functional.ce_and_energy(x, targets, weight, uniform_ood)
        return (ce * go_ce).sum() + (energy * go_e).sum()

    with _blocks(blocks):
        compare(backend, monkeypatch, fn, [logits], params=[weight] if weighted else [])


@pytest.mark.parametrize("backend,shape", over_backends(triton=[((6, C),)], cpp=[((6, C),), ((1, C, 3, 4),)]), ids=str)
def test_row_loss_energy_gradcheck_fp64(monkeypatch, backend, shape):
    """Values and energy of each kind with class weights, and the energy alone (fast mode in the interpreter)."""
    use_backend(monkeypatch, backend)
    fast = backend == "triton"
    kinds, block_b = ((1, 2), 4) if fast else ((0, 1, 2), 0)
    x = rand_logits(shape, dtype=torch.float64).requires_grad_()
    y = rand_targets((shape[0], *shape[2:]), "mixed")
    w = (torch.rand(C, dtype=torch.float64) + 0.1).requires_grad_()
    op = torch.ops.oodkernels.row_loss_energy_fwd
    for kind in kinds:

        def fn(x, w, kind=kind):
            values, energy, _ = op(x, y, None, kind, 0.3, -3.0, -2.0, None, block_b, 2, w)
            return values, energy

        assert torch.autograd.gradcheck(fn, (x, w), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda x: op(x, y, None, 0, 0.0, 0.0, 0.0, None, block_b, 2, None)[1], (x,), fast_mode=fast
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_row_loss_energy_ops(monkeypatch, backend):
    """Both energy ops, with and without class weights (C++: three layouts, the row_scores of WHICH 4 / 5 too)."""
    from torch.library import opcheck

    use_backend(monkeypatch, backend)
    if backend == "triton":
        cases, fwd_blocks, bwd_blocks = [rand_logits((2, C, 3, 2), layout="channels_last")], (4, 4), (4, 4)
    else:
        cases = [rand_logits((2, C, 3, 2), layout="channels_last"), rand_logits((2, C, 8, 4)), rand_logits((9, C))]
        fwd_blocks, bwd_blocks = (0, 3), (0, 0)
    for logits in cases:
        targets = rand_targets((logits.shape[0], *logits.shape[2:]), "mixed")
        w = torch.rand(C) - 0.2
        for weight in (None, w):
            for requires_grad in (False, True):
                x = logits.detach().requires_grad_(requires_grad)
                wt = None if weight is None else weight.detach().requires_grad_(requires_grad)
                args = (x, targets, None, 1, 1.0, 0.0, 0.0, None, *fwd_blocks, wt)
                opcheck(torch.ops.oodkernels.row_loss_energy_fwd.default, args)
            _, energy, stats = torch.ops.oodkernels.row_loss_energy_fwd(
                logits, targets, None, 0, 0.0, 0.0, 0.0, None, *bwd_blocks, weight
            )
            gv, ge = torch.randn(2, targets.numel())
            bwd = (gv, ge, logits, targets, None, stats, energy, weight, 0, 0.0, 0.0, 0.0, None, *bwd_blocks)
            opcheck(torch.ops.oodkernels.row_loss_energy_bwd.default, bwd)
        if backend == "cpp":
            opcheck(torch.ops.oodkernels.row_scores.default, (logits, 4, 1.0, 0, 3, w))
            opcheck(torch.ops.oodkernels.row_scores.default, (logits, 5, 1.0, 0, 0))
    opcheck(
        torch.ops.oodkernels.row_loss_energy_fwd.default,
        (logits[:0], targets[:0], None, 0, 0.0, 0.0, 0.0, None, 0, 0, None),
    )
    if backend == "cpp":
        opcheck(torch.ops.oodkernels.row_scores.default, (logits[:0], 4, 1.0, 0, 0, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_energy_double_backward_raises(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    x = rand_logits((5, C), dtype=torch.float64).requires_grad_()
    _, energy = ok.functional.ce_and_energy(x, rand_targets((5,), "mixed"))
    (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="row_loss_energy_bwd: double backward"):
        grad.sum().backward()


# ----------------------------------------------------------------------------------------------
# criteria
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood", "empty"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_confidence_loss(monkeypatch, backend, pattern):
    logits = rand_logits((10, C))
    targets = rand_targets((10,), pattern)
    confidence = torch.rand(10, 1)
    if pattern == "empty":
        logits, confidence = logits[:0], confidence[:0]
    criterion = ok.loss.ConfidenceLoss(alpha=0.7)
    compare(backend, monkeypatch, criterion, [logits, confidence, targets[: logits.shape[0]]])


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", None])
@pytest.mark.parametrize("backend", BACKENDS)
def test_objectosphere_loss(monkeypatch, backend, reduction, pattern):
    logits = rand_logits((10, C), layout="transposed")
    features = torch.randn(10, D) * 0.5
    targets = rand_targets((10,), pattern)
    criterion = ok.loss.ObjectosphereLoss(alpha=0.5, xi=1.2, reduction=reduction)
    go = torch.randn(10) if reduction in ("none", None) else None
    compare(backend, monkeypatch, criterion, [logits, features, targets], grad_output=go)


@pytest.mark.parametrize("pattern", ["mixed", "all_id", "all_ood", "empty"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "backend,shape,layout,blocks",
    over_backends(
        triton=[((10, C), "contiguous", (4, 4)), ((2, C, 3, 2), "contiguous", (4, 4))],
        cpp=[(shape, layout, None) for shape, layout in LAYOUTS],
    ),
    ids=str,
)
def test_vos_reg_loss(monkeypatch, backend, shape, layout, blocks, reduction, pattern):
    phi, weights = vos_modules()
    criterion = ok.loss.VOSRegLoss(phi, weights, alpha=0.3, reduction=reduction)
    logits = rand_logits(shape, layout=layout)
    targets = rand_targets((shape[0], *shape[2:]), pattern)
    if pattern == "empty":
        logits, targets = logits[:0], targets[:0]
    go = torch.randn(targets.shape) if reduction == "none" else None
    with _blocks(blocks):
        compare(backend, monkeypatch, criterion, [logits, targets], params=list(criterion.parameters()), grad_output=go)


@pytest.mark.parametrize(
    "backend,dtype",
    over_backends(
        triton=[(torch.float64,), (torch.bfloat16,)], cpp=[(torch.float64,), (torch.bfloat16,), (torch.float16,)]
    ),
    ids=str,
)
def test_batch_coupled_dtypes(monkeypatch, backend, dtype):
    logits = rand_logits((2, C, 2, 3), dtype=dtype)
    targets = rand_targets((2, 2, 3), "mixed")
    phi, weights = vos_modules()
    atol, rtol = testing.tolerances(dtype)
    if dtype != torch.float64:
        atol = 0.05  # one half-precision ulp at magnitude ~4-8, rounded once by each side
    value = compare(backend, monkeypatch, ok.loss.VOSRegLoss(phi, weights), [logits, targets], atol=atol, rtol=rtol)
    assert value.dtype == dtype
    flat = rand_logits((8, C), dtype=dtype)
    confidence = torch.rand(8, dtype=dtype)
    inputs = [flat, confidence, rand_targets((8,), "mixed")]
    compare(backend, monkeypatch, ok.loss.ConfidenceLoss(), inputs, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vos_gradcheck_fp64(monkeypatch, backend):
    """Classification rows with forced blocks in the interpreter (fast mode); a segmentation map on C++."""
    use_backend(monkeypatch, backend)
    phi, weights = vos_modules(torch.float64)
    criterion = ok.loss.VOSRegLoss(phi, weights, reduction="none")
    fast = backend == "triton"
    shape = (6, C) if fast else (2, C, 2, 3)
    logits = rand_logits(shape, dtype=torch.float64).requires_grad_()
    targets = rand_targets((shape[0], *shape[2:]), "mixed")
    with _blocks((4, 2) if fast else None):
        assert torch.autograd.gradcheck(lambda x: criterion(x, targets), (logits,), fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_energy_margin_loss(monkeypatch, backend):
    torch.manual_seed(1)
    phi = nn.Linear(1, 2)
    criterion = ok.loss.EnergyMarginLoss(full_train_loss=0.2, eta=0.5)
    criterion.lam.fill_(0.3)
    criterion.lam2.fill_(-2.0)  # the constant branch of the second ALM term
    logits = rand_logits((12, C))
    targets = rand_targets((12,), "mixed")
    fn = lambda x, y: criterion(x, y, phi) * 3  # noqa: E731
    compare(backend, monkeypatch, fn, [logits, targets], params=list(phi.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_criteria_compile_fullgraph(monkeypatch, compile_reset, backend):
    """VOSReg's value and gradients (logits and class weights); on C++ the two new scores too."""
    from oodkernels import config

    use_backend(monkeypatch, backend)
    config.data_checks = False
    phi, weights = vos_modules()
    criterion = ok.loss.VOSRegLoss(phi, weights)
    shape = (2, C, 2, 3) if backend == "triton" else (2, C, 8, 4)
    logits = rand_logits(shape)
    targets = rand_targets((shape[0], *shape[2:]), "mixed")
    eager_x = logits.clone().requires_grad_()
    eager = criterion(eager_x, targets)
    eager.backward()
    eager_w = weights.weight.grad.clone()
    weights.weight.grad = None
    compiled_x = logits.clone().requires_grad_()
    compiled = torch.compile(criterion, fullgraph=True, backend="aot_eager")(compiled_x, targets)
    compiled.backward()
    testing.assert_close(compiled.detach(), eager.detach())
    testing.assert_close(compiled_x.grad, eager_x.grad)
    testing.assert_close(weights.weight.grad, eager_w)
    if backend == "cpp":
        w = torch.rand(C)

        def both(x):
            return ok.scores.weighted_energy(x, w) + ok.scores.entropy(x, clip=False)

        testing.assert_close(torch.compile(both, fullgraph=True, backend="aot_eager")(logits), both(logits))


@pytest.mark.parametrize("backend,shape", over_backends(triton=[((8, C),)], cpp=[((2, C, 3, 4),)]), ids=str)
def test_retain_graph_and_inputs_not_mutated(monkeypatch, backend, shape):
    use_backend(monkeypatch, backend)
    phi, weights = vos_modules()
    logits = rand_logits(shape).requires_grad_()
    targets = rand_targets((shape[0], *shape[2:]), "mixed")
    before, w_before = logits.detach().clone(), weights.weight.detach().clone()
    loss = ok.loss.VOSRegLoss(phi, weights)(logits, targets)
    loss.backward(retain_graph=True)
    first, first_w = logits.grad.clone(), weights.weight.grad.clone()
    logits.grad = None
    weights.weight.grad = None
    loss.backward()
    assert torch.equal(logits.grad, first) and torch.equal(weights.weight.grad, first_w)
    assert torch.equal(logits.detach(), before) and torch.equal(weights.weight.detach(), w_before)


# ----------------------------------------------------------------------------------------------
# Triton only
# ----------------------------------------------------------------------------------------------


def test_energy_margin_missing_group_raises_only_with_checks(monkeypatch):
    from oodkernels import config

    use_backend(monkeypatch, "triton")
    criterion = ok.loss.EnergyMarginLoss(full_train_loss=0.2)
    logits, targets = rand_logits((6, C)), rand_targets((6,), "all_id")
    with pytest.raises(ValueError, match="Every batch has to contain both ID and OOD samples"):
        criterion(logits, targets, nn.Linear(1, 1))
    config.data_checks = False
    assert torch.isnan(criterion(logits, targets, nn.Linear(1, 1)))


def test_vos_synthesis_fused_equals_reference(monkeypatch):
    """Three steps (fill, fill to full, sample) with the same RNG stream: identical queues, close losses."""
    results = {}
    for backend in ("triton", "reference"):
        use_backend(monkeypatch, backend)
        torch.manual_seed(0)
        phi, weights = vos_modules()
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


def test_fused_kernels_are_used(monkeypatch):
    calls = spy_calls(monkeypatch, row_ops._launchers(), "row_loss_energy_forward")
    use_backend(monkeypatch, "triton")
    logits, targets = rand_logits((6, C)), rand_targets((6,), "mixed")
    phi, weights = vos_modules()
    ok.loss.VOSRegLoss(phi, weights)(logits, targets)
    ok.loss.ObjectosphereLoss()(logits, torch.randn(6, D), targets)
    ok.loss.ConfidenceLoss()(logits, torch.rand(6), targets)
    ok.loss.EnergyMarginLoss(0.1)(logits, targets, nn.Linear(1, 2))
    assert len(calls) == 4
    assert ok.backend_info()["operations"]["ce_and_energy"]["cuda"] == "triton"
