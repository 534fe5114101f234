"""Oracle tests: DeepSVDD, DeepSAD, Confidence, Objectosphere and the post-hoc scores against
pytorch-ood 0.4.0 (LOSS_CONTRACT.md §8.1), in float32 with rtol 1e-5 / atol 1e-6.

Cases changed by a fix are left out here (they have pinned tests in the contract files): the (B,)
confidence shape (fix e), non-float32 inputs (fix d) and overflowing weighted-energy logits (fix g).
"""

import warnings

import pytest
import torch
from _pytorch_ood import pytorch_ood
from _pytorch_ood import requires_oracle

from oodkernels.reference import scores
from oodkernels.reference.confidence import ConfidenceLoss
from oodkernels.reference.objectosphere import ObjectosphereLoss
from oodkernels.reference.svdd import DeepSADLoss
from oodkernels.reference.svdd import DeepSVDDLoss

pytestmark = [requires_oracle, pytest.mark.oracle]

B, C, D = 8, 3, 5
RTOL, ATOL = 1e-5, 1e-6
REDUCTIONS = ["mean", "sum", "none", None]
LABEL_PATTERNS = ["mixed", "all_id", "all_ood", "empty"]


def make_labels(pattern, n=B, n_classes=C):
    if pattern == "mixed":
        return (torch.arange(n) % (n_classes + 1)) - 1
    if pattern == "all_id":
        return torch.arange(n) % n_classes
    if pattern == "all_ood":
        return -1 - (torch.arange(n) % 2)
    return torch.zeros(0, dtype=torch.long)


def batch_size(pattern, n=B):
    return 0 if pattern == "empty" else n


def call(fn, *args):
    """Run ``fn`` and return (result, [(category, text) of each warning])."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = fn(*args)
    return out, [(w.category, str(w.message)) for w in record]


def leaves(n):
    return [t.detach().clone().requires_grad_(True) for t in n]


def compare(ours_fn, ref_fn, inputs, grad_inputs=None):
    """Compare value, shape, dtype, warnings and gradients w.r.t. ``inputs`` of two calls."""
    ours_in, ref_in = leaves(inputs), leaves(inputs)
    ours, ours_w = call(ours_fn, *ours_in)
    ref, ref_w = call(ref_fn, *ref_in)
    assert ours.shape == ref.shape
    assert ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=ATOL, equal_nan=True)
    assert ours_w == ref_w
    if not ref.requires_grad:
        # the reference returns a detached zero in some empty cases; ours is attached (§2.3)
        if ours.requires_grad:
            grads = torch.autograd.grad(ours.sum(), ours_in, allow_unused=True)
            assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in grads)
        return
    weights = torch.randn(ours.shape) if ours.dim() else torch.ones(())
    g_ours = torch.autograd.grad((ours * weights).sum(), ours_in, allow_unused=True)
    g_ref = torch.autograd.grad((ref * weights).sum(), ref_in, allow_unused=True)
    for a, b in zip(g_ours, g_ref):
        a = torch.zeros_like(ours_in[0]) if a is None and b is None else a
        if b is None:
            assert torch.equal(a, torch.zeros_like(a))
        else:
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def seeded_pair(ours_cls, ref_cls, seed, *args, **kwargs):
    """Construct both modules from one seed; check parameters and generator state agree."""
    torch.manual_seed(seed)
    ref = ref_cls(*args, **kwargs)
    ref_state = torch.get_rng_state()
    torch.manual_seed(seed)
    ours = ours_cls(*args, **kwargs)
    assert torch.equal(torch.get_rng_state(), ref_state)
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    assert list(ours_sd) == list(ref_sd)
    for key in ref_sd:
        assert ours_sd[key].shape == ref_sd[key].shape and ours_sd[key].dtype == ref_sd[key].dtype
        assert torch.equal(ours_sd[key], ref_sd[key])
    ref_p, ours_p = dict(ref.named_parameters()), dict(ours.named_parameters())
    assert {k: v.requires_grad for k, v in ours_p.items()} == {k: v.requires_grad for k, v in ref_p.items()}
    return ours, ref


# ----------------------------------------------------------------------------------------------
# DeepSVDD
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("labels", LABEL_PATTERNS + ["no_labels"])
@pytest.mark.parametrize("given_center", [False, True])
def test_deep_svdd(reduction, labels, given_center):
    center = torch.randn(D) if given_center else None
    ours, ref = seeded_pair(
        DeepSVDDLoss, pytorch_ood.loss.DeepSVDDLoss, 7, D, reduction=reduction, radius=0.8, center=center
    )
    n = batch_size(labels) if labels != "no_labels" else B
    x = torch.randn(n, D) * 1.5
    if labels == "no_labels":
        compare(ours, ref, [x])
    else:
        y = make_labels(labels, n)
        compare(lambda t: ours(t, y), lambda t: ref(t, y), [x])


def test_deep_svdd_distance_center_and_static():
    ours, ref = seeded_pair(DeepSVDDLoss, pytorch_ood.loss.DeepSVDDLoss, 3, D, radius=1.2)
    x = torch.randn(B, D) * 2
    compare(ours.distance, ref.distance, [x])
    compare(ours.center, ref.center, [x])
    y = make_labels("mixed")
    compare(
        lambda t: DeepSVDDLoss.svdd_loss(t, ours.center, ours.radius, y),
        lambda t: pytorch_ood.loss.DeepSVDDLoss.svdd_loss(t, ref.center, ref.radius, y),
        [x],
    )
    compare(
        lambda t: DeepSVDDLoss.svdd_loss(t, ours.center),
        lambda t: pytorch_ood.loss.DeepSVDDLoss.svdd_loss(t, ref.center),
        [x],
    )


def test_deep_svdd_state_dict_round_trip():
    ours, ref = seeded_pair(DeepSVDDLoss, pytorch_ood.loss.DeepSVDDLoss, 11, D, radius=0.3)
    torch.manual_seed(99)
    other_ref = pytorch_ood.loss.DeepSVDDLoss(D, radius=2.0)
    ours.load_state_dict(other_ref.state_dict())
    assert torch.equal(ours.center.params, other_ref.center.params) and torch.equal(ours.radius, other_ref.radius)
    ref.load_state_dict(DeepSVDDLoss(D, radius=4.0).state_dict())
    assert ref.radius.item() == 4.0


# ----------------------------------------------------------------------------------------------
# DeepSAD
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("labels", LABEL_PATTERNS)
@pytest.mark.parametrize("given_center", [False, True])
def test_deep_sad(reduction, labels, given_center):
    if labels == "empty" and reduction == "mean":
        pytest.skip("NaN for an empty batch (not finite)")
    center = torch.randn(D) if given_center else None
    ours, ref = seeded_pair(
        DeepSADLoss, pytorch_ood.loss.DeepSADLoss, 5, D, eta=0.7, eps=1e-3, reduction=reduction, center=center
    )
    n = batch_size(labels)
    y = make_labels(labels, n)
    compare(lambda t: ours(t, y), lambda t: ref(t, y), [torch.randn(n, D)])


def test_deep_sad_distance_and_state():
    ours, ref = seeded_pair(DeepSADLoss, pytorch_ood.loss.DeepSADLoss, 13, D)
    compare(ours.distance, ref.distance, [torch.randn(B, D)])
    compare(ours.center, ref.center, [torch.randn(B, D)])
    ours.load_state_dict(pytorch_ood.loss.DeepSADLoss(D).state_dict())


# ----------------------------------------------------------------------------------------------
# ConfidenceLoss ((B, 1) confidence only: (B,) is fix e)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", LABEL_PATTERNS)
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_confidence(labels, alpha):
    n = batch_size(labels)
    y = make_labels(labels, n)
    logits = torch.randn(n, C) * 2
    conf = torch.rand(n, 1) * 0.98 + 0.01
    compare(
        lambda a, b: ConfidenceLoss(alpha=alpha)(a, b, y),
        lambda a, b: pytorch_ood.loss.ConfidenceLoss(alpha=alpha)(a, b, y),
        [logits, conf],
    )


def test_confidence_clamped_regions():
    y = torch.tensor([0, 1, 2, 1])
    logits = torch.tensor([[30.0, -30.0, 0.0], [30.0, -30.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    conf = torch.tensor([[1.0], [1.0], [0.0], [1e-30]])
    compare(
        lambda a, b: ConfidenceLoss(eps=1e-12)(a, b, y),
        lambda a, b: pytorch_ood.loss.ConfidenceLoss(eps=1e-12)(a, b, y),
        [logits, conf],
    )


# ----------------------------------------------------------------------------------------------
# ObjectosphereLoss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("labels", LABEL_PATTERNS)
def test_objectosphere(reduction, labels):
    if labels == "empty" and reduction == "mean":
        pytest.skip("NaN for an empty batch (not finite)")
    n = batch_size(labels)
    y = make_labels(labels, n)
    logits = torch.randn(n, C) * 2
    features = torch.randn(n, D) * 0.5
    compare(
        lambda a, b: ObjectosphereLoss(alpha=0.7, xi=1.5, reduction=reduction)(a, b, y),
        lambda a, b: pytorch_ood.loss.ObjectosphereLoss(alpha=0.7, xi=1.5, reduction=reduction)(a, b, y),
        [logits, features],
    )


def test_objectosphere_score():
    compare(ObjectosphereLoss.score, pytorch_ood.loss.ObjectosphereLoss.score, [torch.randn(B, C) * 3])


def test_objectosphere_4d_raises_index_error_in_both():
    args = (torch.randn(2, C, 4, 4), torch.randn(2, D), make_labels("mixed", 32).reshape(2, 4, 4))
    with pytest.raises(IndexError):
        pytorch_ood.loss.ObjectosphereLoss()(*args)
    with pytest.raises(IndexError):
        ObjectosphereLoss()(*args)


# ----------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------

DETECTOR = {
    "energy": lambda f, **kw: pytorch_ood.detector.EnergyBased.score(f, **kw),
    "max_softmax": lambda f, **kw: pytorch_ood.detector.MaxSoftmax.score(f, **kw),
    "max_logit": lambda f, **kw: pytorch_ood.detector.MaxLogit.score(f, **kw),
    "entropy": lambda f, **kw: pytorch_ood.detector.Entropy.score(f, **kw),
    "weighted_energy": lambda f, **kw: pytorch_ood.detector.WeightedEBO.score(f, **kw),
}
SCORE_KWARGS = {
    "energy": [{}, {"t": 2.0}],
    "max_softmax": [{}, {"t": 0.5}],
    "max_logit": [{}],
    "entropy": [{}],
    "weighted_energy": [{"weights": torch.tensor([0.5, -1.0, 2.0])}, {"weights": torch.tensor([[1.0, 0.2, 0.0]])}],
}
SCORE_CASES = [(name, i) for name, options in SCORE_KWARGS.items() for i in range(len(options))]


@pytest.mark.parametrize("name,option", SCORE_CASES)
@pytest.mark.parametrize("shape", [(B, C), (2, C, 4, 4), (2, C, 6)])
def test_scores(name, option, shape):
    kwargs = SCORE_KWARGS[name][option]
    ours = getattr(scores, name)
    if name == "weighted_energy" and len(shape) == 3:
        logits = torch.randn(shape)
        with pytest.raises(ValueError) as ref_error:
            DETECTOR[name](logits, **kwargs)
        with pytest.raises(ValueError) as our_error:
            ours(logits, **kwargs)
        assert str(our_error.value) == str(ref_error.value)
        return
    compare(lambda f: ours(f, **kwargs), lambda f: DETECTOR[name](f, **kwargs), [torch.randn(shape) * 3])


@pytest.mark.parametrize("name", list(SCORE_KWARGS))
def test_scores_large(name):
    kwargs = SCORE_KWARGS[name][0]
    if name == "weighted_energy":
        kwargs = {"weights": torch.rand(19)}
    ours = getattr(scores, name)
    compare(lambda f: ours(f, **kwargs), lambda f: DETECTOR[name](f, **kwargs), [torch.randn(4, 19, 64, 64) * 3])


# ----------------------------------------------------------------------------------------------
# random larger shapes for the losses
# ----------------------------------------------------------------------------------------------


def test_large_shapes():
    gen = torch.Generator().manual_seed(2024)
    n, c, d = 2048, 100, 128
    y = torch.randint(-1, c, (n,), generator=gen)
    logits = torch.randn(n, c, generator=gen) * 3
    features = torch.randn(n, d, generator=gen) * 0.2
    conf = torch.rand(n, 1, generator=gen)
    compare(
        lambda a, b: ObjectosphereLoss()(a, b, y),
        lambda a, b: pytorch_ood.loss.ObjectosphereLoss()(a, b, y),
        [logits, features],
    )
    compare(
        lambda a, b: ConfidenceLoss()(a, b, y), lambda a, b: pytorch_ood.loss.ConfidenceLoss()(a, b, y), [logits, conf]
    )
    svdd, svdd_ref = seeded_pair(DeepSVDDLoss, pytorch_ood.loss.DeepSVDDLoss, 1, d, radius=0.5)
    compare(lambda t: svdd(t, y), lambda t: svdd_ref(t, y), [features * 5])
    sad, sad_ref = seeded_pair(DeepSADLoss, pytorch_ood.loss.DeepSADLoss, 2, d)
    compare(lambda t: sad(t, y), lambda t: sad_ref(t, y), [features * 5])
