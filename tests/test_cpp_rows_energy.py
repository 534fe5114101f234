"""C++-only tests of the row family's energy variants and new scores on the CPU backend (csrc/rows.cpp).

``oodkernels::row_loss_energy_fwd`` / ``row_loss_energy_bwd`` and ``row_scores`` WHICH 4 (weighted energy) /
5 (exact entropy): the raw ops against the Triton interpreter (every output, both traversals, forced class
chunks); ce_and_energy in half dtypes; the paired API and the two scores against the plain-PyTorch reference
over layouts and dtypes; determinism of dL/dw across thread counts; that the C++ ops are the ones used. The
bodies shared with the Triton kernels (every criterion against the reference, gradcheck, opcheck, compile,
retain_graph, double backward) run on both backends in tests/test_fused_extra.py.

Skipped when the extension cannot be built, unless ``OODKERNELS_REQUIRE_CPP=1`` (CI).
"""

import pytest
import torch
from _backends import requires_cpp
from _backends import spy_calls
from _backends import use_backend
from _energy import LAYOUTS
from _energy import C
from _energy import compare
from _energy import rand_logits as _logits
from _energy import rand_targets as _targets
from _energy import vos_modules as _vos_modules

import oodkernels as ok
from oodkernels import testing
from oodkernels.ops import row_ops

pytestmark = [pytest.mark.filterwarnings("ignore:Discarding samples"), requires_cpp]


@pytest.fixture
def cpp(monkeypatch):
    use_backend(monkeypatch, "cpp")


def _compare(monkeypatch, fn, inputs, params=(), grad_output=None, atol=None, rtol=None):
    return compare("cpp", monkeypatch, fn, inputs, params, grad_output, atol, rtol)


# ----------------------------------------------------------------------------------------------
# the raw ops against the Triton interpreter
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(
    "shape,layout", [((6, C), "contiguous"), ((1, C, 16, 16), "contiguous"), ((1, C, 2, 3), "sliced")], ids=str
)
@pytest.mark.parametrize("kind", range(6))
def test_cpp_energy_ops_equal_triton_interpreter(monkeypatch, kind, shape, layout, weighted):
    """values, energy, stats, dL/dlogits and dL/dw of C++ == the Triton kernels (fp64, class chunks of 2)."""
    if len(shape) == 4 and kind == 5:
        pytest.skip("LogitNorm is classification only")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    logits = _logits(shape, dtype=torch.float64, layout=layout)
    targets = _targets((shape[0], *shape[2:]), "mixed")
    cost = torch.rand(C, C, dtype=torch.float64) + 0.5
    weight = torch.rand(C, dtype=torch.float64) - 0.3 if weighted else None  # some negative: relu's zero branch
    params = (kind, 0.3, -3.0, -2.5, None, 4, 2)
    gen = torch.Generator().manual_seed(7)
    go, ge = torch.randn(2, targets.numel(), dtype=torch.float64, generator=gen)
    out = {}
    for backend in ("cpp", "triton"):
        monkeypatch.setenv("OODKERNELS_BACKEND", backend)
        values, energy, stats = torch.ops.oodkernels.row_loss_energy_fwd(logits, targets, cost, *params, weight)
        grad, grad_w = torch.ops.oodkernels.row_loss_energy_bwd(
            go, ge, logits, targets, cost, stats, energy, weight, *params
        )
        out[backend] = (values, energy, stats, grad, grad_w)
    for got, want, what in zip(out["cpp"], out["triton"], ("values", "energy", "stats", "grad", "grad_w")):
        assert got.shape == want.shape and got.dtype == want.dtype, what
        testing.assert_close(got, want, atol=1e-10, rtol=1e-8, name=what)
    assert out["cpp"][4].shape == ((C,) if weighted else (0,))


@pytest.mark.parametrize("shape", [(6, C), (1, C, 8, 4)], ids=str)
@pytest.mark.parametrize("which", [4, 5])
def test_cpp_new_scores_equal_triton_interpreter(monkeypatch, which, shape):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    logits = _logits(shape, dtype=torch.float64)
    weight = torch.rand(C, dtype=torch.float64) - 0.3 if which == 4 else None
    t = 1.0 if which == 4 else 1.3  # exact entropy: v = x/t in the softmax, raw x in the expectation
    out = {}
    for backend in ("cpp", "triton"):
        monkeypatch.setenv("OODKERNELS_BACKEND", backend)
        out[backend] = torch.ops.oodkernels.row_scores(logits, which, t, 4, 2, weight)
    testing.assert_close(out["cpp"], out["triton"], atol=1e-10, rtol=1e-8)


# ----------------------------------------------------------------------------------------------
# the criteria against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(9, C), (2, C, 16, 16)], ids=str)
def test_cpp_ce_and_energy_dtypes(monkeypatch, shape, dtype):
    logits = _logits(shape, dtype=dtype)
    targets = _targets((shape[0], *shape[2:]), "mixed")
    weight = (torch.rand(C, dtype=torch.float64 if dtype == torch.float64 else torch.float32) - 0.2).requires_grad_()
    go_ce, go_e = torch.randn(2, targets.numel())

    def fn(x):
        ce, energy = ok.functional.ce_and_energy(x, targets, weight)
        return (ce * go_ce).sum() + (energy * go_e).sum()

    atol, rtol = testing.tolerances(dtype)
    if dtype in (torch.bfloat16, torch.float16):
        atol = 0.05  # the gradient is stored in the half dtype: one ulp at magnitude ~4-8, rounded by each side
    _compare(monkeypatch, fn, [logits], params=[weight], atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", [(6, C), (2, C, 3, 4)], ids=str)
def test_cpp_paired_api(monkeypatch, shape):
    logits_in = _logits(shape)
    logits_out = _logits((shape[0] + 1, *shape[1:]), layout="contiguous") * 0.5
    targets_in = torch.randint(0, C, (shape[0], *shape[2:]))
    _compare(
        monkeypatch,
        lambda a, b: ok.paired.outlier_exposure(a, targets_in, b, lambda_oe=0.4),
        [logits_in, logits_out],
    )
    # margin 10: the hinge is active, its gradient reaches both batches
    _compare(
        monkeypatch,
        lambda a, b: ok.paired.energy_margin(a, targets_in, b, lambda_energy=0.3, margin=10.0),
        [logits_in, logits_out],
    )


# ----------------------------------------------------------------------------------------------
# the new scores against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("score", ["weighted_energy", "exact_entropy"])
def test_cpp_new_scores_equal_reference(monkeypatch, score, shape, layout, dtype):
    logits = _logits(shape, dtype=dtype, layout=layout)
    w = torch.rand(C) - 0.2
    if score == "weighted_energy":

        def fn(x):
            return ok.scores.weighted_energy(x, w)
    else:

        def fn(x):
            return ok.scores.entropy(x, clip=False)

    monkeypatch.setenv("OODKERNELS_BACKEND", "cpp")
    with row_ops.forced_blocks(1, 3):
        value = fn(logits)
    value_default_chunks = fn(logits)
    monkeypatch.setenv("OODKERNELS_BACKEND", "reference")
    expected = fn(logits)
    assert value.dtype == expected.dtype and value.shape == expected.shape
    atol, rtol = testing.tolerances(dtype)
    if dtype == torch.bfloat16:
        atol = max(atol, float(torch.finfo(dtype).eps) * float(expected.abs().max()))
    if score == "exact_entropy" and dtype != torch.float64:
        # one read: H = lse − E_p[x] cancels two numbers of size max|x| (the Triton kernel's formula too),
        # so a confident row is a few ulps of max|x| off in fp32, where −Σ p·log p is not
        atol = max(atol, 4 * float(torch.finfo(dtype).eps) * float(logits.float().abs().max()))
    testing.assert_close(value, expected, atol=atol, rtol=rtol)
    testing.assert_close(value_default_chunks, expected, atol=atol, rtol=rtol)


def test_cpp_weighted_energy_all_weights_nonpositive_is_inf(cpp):
    """Every relu(w) = 0: ln 0 = -inf, the score +inf (the Triton kernels' and the reference's value)."""
    logits = _logits((4, C))
    w = -torch.rand(C)
    assert torch.isposinf(torch.ops.oodkernels.row_scores(logits, 4, 1.0, 0, 0, w)).all()


# ----------------------------------------------------------------------------------------------
# gradcheck, opcheck, compile, determinism, autograd edge cases
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, C), (3, C, 20, 20)], ids=str)
def test_cpp_class_weight_gradient_is_deterministic_across_threads(cpp, shape):
    """dL/dw is summed from fixed blocks in block order: the same bits with 1 and 2 threads."""
    logits = _logits(shape)
    targets = _targets((shape[0], *shape[2:]), "mixed")
    w = torch.rand(C) - 0.2
    _, energy, stats = torch.ops.oodkernels.row_loss_energy_fwd(logits, targets, None, 0, 0.0, 0.0, 0.0, None, 0, 0, w)
    gv, ge = torch.randn(2, targets.numel())
    args = (gv, ge, logits, targets, None, stats, energy, w, 0, 0.0, 0.0, 0.0, None, 0, 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.oodkernels.row_loss_energy_bwd(*args)
        torch.set_num_threads(2)
        two = torch.ops.oodkernels.row_loss_energy_bwd(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert one[1].abs().sum() > 0


def test_cpp_energy_ops_are_used(monkeypatch):
    """Under auto, CPU tensors of every criterion on the energy ops run the C++ implementations."""
    calls = spy_calls(monkeypatch, row_ops._launchers(), "row_loss_energy_forward")
    monkeypatch.setenv("OODKERNELS_BACKEND", "auto")
    logits, targets = _logits((6, C)), _targets((6,), "mixed")
    phi, weights = _vos_modules()
    ok.loss.VOSRegLoss(phi, weights)(logits, targets)
    ok.loss.ConfidenceLoss()(logits, torch.rand(6), targets)
    ok.paired.energy_margin(logits, targets.clamp_min(0), logits)
    assert not calls  # the Triton launcher never ran
    operations = ok.backend_info()["operations"]
    for name in ("ce_and_energy", "vos_reg_loss", "confidence_loss", "weighted_energy_score", "paired_energy_margin"):
        assert operations[name]["cpu"] == "cpp", name
