"""The row criteria and scores on the fused kernels (Triton; C++ on CPU), behind the reference's exact API.

Each function here has the signature, checks, warnings, errors, reductions and dtypes of its
reference in :mod:`oodkernels.reference.logits` / :mod:`oodkernels.reference.scores`: the shared
prologue :func:`prepare_rows` (metadata checks, masks, queued data checks) and epilogue
:func:`reduce_rows` (weights, device-side normalisers) come from the reference; only the per-row
math runs in the kernel (``oodkernels::row_loss_fwd``), read in place from the logits' strides.
The data checks are read once, after the reduction (LOSS_CONTRACT §2.11).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import codes
from ..reference import confidence as _ref_confidence
from ..reference import logits as _ref
from ..reference import objectosphere as _ref_objectosphere
from ..reference import paired as _ref_paired
from ..reference import scores as _ref_scores
from ..reference import vos as _ref_vos
from . import row_ops  # noqa: F401  (registers the custom ops)
from .row_ops import block_args

#: reference kind -> (kernel kind, fixed α) ; entropic is outlier exposure with α = 1
_KERNEL_KIND = {
    "cross_entropy": (codes.CROSS_ENTROPY, None),
    "background": (codes.CROSS_ENTROPY, None),
    "outlier_exposure": (codes.OUTLIER_EXPOSURE, None),
    "entropic": (codes.OUTLIER_EXPOSURE, 1.0),
    "energy": (codes.ENERGY, None),
    "confidence_penalty": (codes.CONFIDENCE_PENALTY, None),
    "margin_confidence": (codes.MARGIN_CONFIDENCE, None),
    "logit_norm": (codes.LOGIT_NORM, None),
}


def _fused(
    kind: str,
    logits: Tensor,
    targets: Tensor,
    reduction,
    *,
    alpha: float = 0.0,
    m_in: float = 0.0,
    m_out: float = 0.0,
    n_classes: Optional[int] = None,
    weight=None,
    cost_matrix=None,
    ignore_index=None,
    targets_name: str = "targets",
    warn_ood: Optional[bool] = None,
) -> Tensor:
    setup = _ref.prepare_rows(
        kind,
        logits,
        targets,
        reduction=reduction,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
        n_classes=n_classes,
        targets_name=targets_name,
        warn_ood=warn_ood,
    )
    kernel_kind, fixed_alpha = _KERNEL_KIND[kind]
    # background: the remapped labels (OOD -> N); elsewhere the caller's targets, read through their strides
    kernel_targets = setup.targets.reshape(setup.shape) if kind == "background" else targets
    cost = None if setup.cost is None else setup.cost.contiguous()
    values, _ = torch.ops.oodkernels.row_loss_fwd(
        logits,
        kernel_targets,
        cost,
        kernel_kind,
        float(alpha if fixed_alpha is None else fixed_alpha),
        float(m_in),
        float(m_out),
        setup.ignore_index,
        *block_args(),
    )
    loss = _ref.reduce_rows(kind, values, setup, reduction)
    setup.checks.flush()
    return loss


def cross_entropy(
    logits, targets, reduction="mean", *, weight=None, cost_matrix=None, ignore_index=None, warn_ood=False
):
    return _fused(
        "cross_entropy",
        logits,
        targets,
        reduction,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
        warn_ood=warn_ood,
    )


def background_class_loss(
    logits, targets, n_classes, reduction="mean", *, weight=None, cost_matrix=None, ignore_index=None
):
    if isinstance(logits, Tensor) and logits.dim() == 1 and isinstance(targets, Tensor) and targets.dim() == 0:
        # unbatched input, as torch's cross-entropy accepts it: the same handling as the reference
        return _ref.background_class_loss(
            logits, targets, n_classes, reduction, weight=weight, cost_matrix=cost_matrix, ignore_index=ignore_index
        )
    return _fused(
        "background",
        logits,
        targets,
        reduction,
        n_classes=n_classes,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
    )


def outlier_exposure_loss(
    logits, targets, alpha=0.5, reduction="mean", *, weight=None, cost_matrix=None, ignore_index=None
):
    return _fused(
        "outlier_exposure",
        logits,
        targets,
        reduction,
        alpha=alpha,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
        targets_name="target",
    )


def entropic_open_set_loss(logits, targets, reduction="mean", *, weight=None, cost_matrix=None, ignore_index=None):
    return _fused(
        "entropic",
        logits,
        targets,
        reduction,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
        targets_name="target",
    )


def energy_regularized_loss(
    logits,
    targets,
    alpha=0.1,
    margin_in=-25.0,
    margin_out=-7.0,
    reduction="mean",
    *,
    weight=None,
    cost_matrix=None,
    ignore_index=None,
):
    return _fused(
        "energy",
        logits,
        targets,
        reduction,
        alpha=alpha,
        m_in=margin_in,
        m_out=margin_out,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
    )


def confidence_penalty_loss(
    logits, targets, lambda_ood=0.1, reduction="mean", *, weight=None, cost_matrix=None, ignore_index=None
):
    return _fused(
        "confidence_penalty",
        logits,
        targets,
        reduction,
        alpha=lambda_ood,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
    )


def margin_confidence_loss(
    logits, targets, margin=0.5, reduction="mean", *, weight=None, cost_matrix=None, ignore_index=None
):
    return _fused(
        "margin_confidence",
        logits,
        targets,
        reduction,
        alpha=margin,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
    )


def logit_norm_loss(logits, target, t=1.0, reduction="mean", *, weight=None, cost_matrix=None, ignore_index=None):
    return _fused(
        "logit_norm",
        logits,
        target,
        reduction,
        alpha=t,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
        targets_name="target",
    )


# ----------------------------------------------------------------------------------------------
# scores: forward-only kernels; a call that needs a gradient runs the (differentiable) reference
# ----------------------------------------------------------------------------------------------


def _score(which: int, reference, logits: Tensor, temperature: float = 1.0, *, dtype=None, **reference_kwargs):
    _ref_scores.check_score_logits(logits)
    out = _ref_scores.score_dtype(logits, dtype)
    if (torch.is_grad_enabled() and logits.requires_grad) or logits.dim() > 4:
        return reference(logits, dtype=dtype, **reference_kwargs)
    scores = torch.ops.oodkernels.row_scores(logits, which, float(temperature), *block_args())
    return scores.reshape((logits.shape[0], *logits.shape[2:])).to(out)


def energy_score(logits, t=1.0, *, dtype=None):
    return _score(codes.SCORE_ENERGY, _ref_scores.energy, logits, t, dtype=dtype, t=t)


def max_softmax_score(logits, t=1.0, *, dtype=None):
    return _score(codes.SCORE_MAX_SOFTMAX, _ref_scores.max_softmax, logits, t, dtype=dtype, t=t)


def max_logit_score(logits, *, dtype=None):
    return _score(codes.SCORE_MAX_LOGIT, _ref_scores.max_logit, logits, dtype=dtype)


def entropy_score(logits, *, clip=True, dtype=None):
    which = codes.SCORE_ENTROPY if clip else codes.SCORE_ENTROPY_EXACT
    return _score(which, _ref_scores.entropy, logits, dtype=dtype, clip=clip)


def weighted_energy_score(logits, weights, *, dtype=None):
    _ref_scores.check_weighted_energy(logits, weights)
    out = _ref_scores.score_dtype(logits, dtype)
    if torch.is_grad_enabled() and (logits.requires_grad or weights.requires_grad):
        return _ref_scores.weighted_energy(logits, weights, dtype=dtype)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    w = weights.detach().reshape(-1).to(device=logits.device, dtype=acc).contiguous()
    scores = torch.ops.oodkernels.row_scores(logits, codes.SCORE_WEIGHTED_ENERGY, 1.0, *block_args(), w)
    return scores.reshape((logits.shape[0], *logits.shape[2:])).to(out)


# ----------------------------------------------------------------------------------------------
# batch-coupled criteria: the kernels give per-row (CE, energy); the coupling is torch arithmetic
# ----------------------------------------------------------------------------------------------


def ce_and_energy(logits, targets, class_weight=None, uniform_ood=False):
    """Fused :func:`oodkernels.reference.logits.ce_and_energy`: one read of the logits forward, one backward."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    weight = None
    if class_weight is not None:
        weight = class_weight.reshape(-1).to(device=logits.device, dtype=acc).expand(logits.shape[1]).contiguous()
    values, energy, _ = torch.ops.oodkernels.row_loss_energy_fwd(
        logits,
        targets,
        None,
        codes.OUTLIER_EXPOSURE if uniform_ood else codes.CROSS_ENTROPY,
        1.0,
        0.0,
        0.0,
        None,
        *block_args(),
        weight,
    )
    return values, energy


def confidence_loss(logits, confidence, targets, alpha=1.0, eps=1e-24):
    return _ref_confidence._confidence_loss(logits, confidence, targets, alpha, eps, "targets", ce_and_energy)


def objectosphere_loss(logits, features, targets, alpha=1.0, xi=1.0, reduction="mean"):
    return _ref_objectosphere._objectosphere_loss(
        logits, features, targets, alpha, xi, reduction, "targets", ce_and_energy
    )


def vos_reg_loss(logits, targets, logistic_regression, weights_energy, alpha=0.1, reduction="mean"):
    return _ref_vos._vos_reg_loss(
        logits, targets, logistic_regression, weights_energy, alpha, reduction, "targets", ce_and_energy
    )


def paired_outlier_exposure(logits_in, targets_in, logits_out, lambda_oe=0.5):
    return _ref_paired._outlier_exposure(logits_in, targets_in, logits_out, lambda_oe, ce_and_energy)


def paired_energy_margin(logits_in, targets_in, logits_out, lambda_energy=0.1, margin=10.0):
    return _ref_paired._energy_margin(logits_in, targets_in, logits_out, lambda_energy, margin, ce_and_energy)


#: dispatched operation name -> fused implementation
FUSED = {
    "cross_entropy": cross_entropy,
    "background_class_loss": background_class_loss,
    "outlier_exposure_loss": outlier_exposure_loss,
    "entropic_open_set_loss": entropic_open_set_loss,
    "energy_regularized_loss": energy_regularized_loss,
    "confidence_penalty_loss": confidence_penalty_loss,
    "margin_confidence_loss": margin_confidence_loss,
    "logit_norm_loss": logit_norm_loss,
    "energy_score": energy_score,
    "max_softmax_score": max_softmax_score,
    "max_logit_score": max_logit_score,
    "entropy_score": entropy_score,
    "weighted_energy_score": weighted_energy_score,
    "ce_and_energy": ce_and_energy,
    "confidence_loss": confidence_loss,
    "objectosphere_loss": objectosphere_loss,
    "vos_reg_loss": vos_reg_loss,
    "paired_outlier_exposure": paired_outlier_exposure,
    "paired_energy_margin": paired_energy_margin,
}
