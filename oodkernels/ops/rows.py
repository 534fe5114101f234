"""The row criteria and scores on the fused kernels (Triton; C++ on CPU), behind the reference's exact API.

Each function here has the signature, checks, warnings, errors, reductions and dtypes of its
reference in :mod:`oodkernels.reference.logits` / :mod:`oodkernels.reference.scores`. A row criterion
runs the metadata checks both paths share (:func:`oodkernels.reference._row_checks.check_row_call`)
and then one custom op, ``oodkernels::row_loss_reduced_fwd``: the kernels classify the entries (any
integer target dtype, read in place), apply the weights and the reduction's device-side normalisers,
and produce the data checks' values (OOD count, largest valid label), read once when the checks are
on (LOSS_CONTRACT §2.11). A weight that requires grad, and LogitNorm's 'none' (its ID rows only), run
the per-row op ``row_loss_fwd`` with the reference's prologue and reduction instead.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import config as ok_config
from ..kernels import codes
from ..reference import _row_checks as _checks
from ..reference import confidence as _ref_confidence
from ..reference import logits as _ref
from ..reference import objectosphere as _ref_objectosphere
from ..reference import paired as _ref_paired
from ..reference import scores as _ref_scores
from ..reference import vos as _ref_vos
from ..reference._common import DROP_UNKNOWN_MESSAGE
from ..reference._common import in_eager_mode
from ..reference._common import label_out_of_range
from ..reference._distributed import GlobalCounts
from ..reference._distributed import check_process_group
from . import row_ops
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


#: (reference kind, reduction) -> the reduced op's reduction code; 'none' is REDUCE_NONE for every kind
_MEAN = {
    "cross_entropy": codes.REDUCE_MEAN_ID,
    "logit_norm": codes.REDUCE_MEAN_ID,
    "background": codes.REDUCE_MEAN_VALID,
    "outlier_exposure": codes.REDUCE_MEAN_VALID,
    "entropic": codes.REDUCE_MEAN_VALID,
    "energy": codes.REDUCE_MEAN_GROUPS,
    "confidence_penalty": codes.REDUCE_MEAN_GROUPS,
    "margin_confidence": codes.REDUCE_MEAN_GROUPS,
}


def _reduction_code(kind: str, reduction) -> int:
    if reduction == "mean":
        return _MEAN[kind]
    return codes.REDUCE_SUM if reduction == "sum" else codes.REDUCE_NONE


def _check_totals(totals: list, kind: str, n_columns: int, *, n_classes, targets_name, warn_ood) -> None:
    """The row criteria's data checks (LOSS_CONTRACT §2.11) on the host copy of the kernel's totals, in the
    reference's order: the drop-unknown warning from the OOD count, then the label range checks from the
    largest valid label."""
    n_ood, top = totals[codes.TOTAL_N_OOD], totals[codes.TOTAL_MAX_LABEL]
    if warn_ood and n_ood > 0:
        warnings.warn(DROP_UNKNOWN_MESSAGE, UserWarning, stacklevel=5)
    name = targets_name
    if kind == "background":
        if top >= n_classes:
            _checks.label_too_large()(top)
        # OOD entries are labelled n_classes from here on
        top = max(top, n_classes if n_ood > 0 else -1)
        name = _checks.BACKGROUND_LABEL_NAME
    if top >= n_columns:
        raise label_out_of_range(name, top, n_columns)


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
    process_group=None,
) -> Tensor:
    """One row criterion on the reduced op: metadata checks, then the kernels do the rest (row math, masks,
    weights, normalisers, and the check values, read once when the data checks are on).

    With a ``process_group`` and ``'mean'``, the op returns the group sums (``REDUCE_GROUP_SUMS``) and the
    reference's :func:`~oodkernels.reference.logits.row_group_mean` divides them by the counts summed over
    the group (one all-reduce of the kernel's (2,) count tensor)."""
    kernel_kind, fixed_alpha = _KERNEL_KIND[kind]
    alpha = float(alpha if fixed_alpha is None else fixed_alpha)
    weight_grad = isinstance(weight, Tensor) and weight.requires_grad and torch.is_grad_enabled()
    if weight_grad or (kind == "logit_norm" and reduction == "none"):
        # dL/dweight needs the row values, LogitNorm's 'none' keeps the ID rows only (a host read): the
        # per-row op and the reference's prologue (its checks included) and reduction
        return _per_row(kind, kernel_kind, alpha, logits, targets, reduction, m_in, m_out, n_classes, weight,
                        cost_matrix, ignore_index, targets_name, warn_ood, process_group)  # fmt: skip
    call = _checks.check_row_call(
        kind,
        logits,
        targets,
        reduction=reduction,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
        n_classes=n_classes,
        targets_name=targets_name,
    )
    check_process_group(process_group)
    checks_on = ok_config.data_checks and in_eager_mode(logits, targets, weight)
    cost = None if call.cost is None else call.cost.contiguous()
    global_mean = process_group is not None and reduction == "mean"
    code = codes.REDUCE_GROUP_SUMS if global_mean else _reduction_code(kind, reduction)
    out, totals, _ = row_ops.row_loss_reduced(
        logits,
        targets,
        None if weight is None else weight.detach(),
        cost,
        kernel_kind,
        alpha,
        float(m_in),
        float(m_out),
        call.ignore_index,
        n_classes if kind == "background" else None,
        code,
        checks_on,
        *block_args(),
    )
    if checks_on:
        _check_totals(
            totals.tolist(),  # the call's one device-to-host read
            kind,
            logits.shape[1],
            n_classes=n_classes,
            targets_name=targets_name,
            warn_ood=(kind == "logit_norm") if warn_ood is None else warn_ood,
        )
    if global_mean:
        counts = GlobalCounts(totals[codes.TOTAL_N_ID : codes.TOTAL_N_OOD + 1], process_group)
        loss = _ref.row_group_mean(kind, out[0], out[1], counts)
        # through fp32 as the reference rounds its fp32 mean (fp64 logits keep fp64)
        return (loss if logits.dtype == torch.float64 else loss.float()).to(logits.dtype)
    return out.reshape(targets.shape) if code == codes.REDUCE_NONE else out


def _per_row(kind, kernel_kind, alpha, logits, targets, reduction, m_in, m_out, n_classes, weight, cost_matrix,
             ignore_index, targets_name, warn_ood, process_group) -> Tensor:  # fmt: skip
    """The per-row op and the reference's prologue and reduction (differentiable in the weight)."""
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
    # background: the remapped labels (OOD -> N); elsewhere the caller's targets, read through their strides
    kernel_targets = setup.targets.reshape(setup.shape) if kind == "background" else targets
    cost = None if setup.cost is None else setup.cost.contiguous()
    values, _ = torch.ops.oodkernels.row_loss_fwd(
        logits,
        kernel_targets,
        cost,
        kernel_kind,
        alpha,
        float(m_in),
        float(m_out),
        setup.ignore_index,
        *block_args(),
    )
    loss = _ref.reduce_rows(kind, values, setup, reduction, process_group)
    setup.checks.flush()
    return loss


def cross_entropy(
    logits,
    targets,
    reduction="mean",
    *,
    weight=None,
    cost_matrix=None,
    ignore_index=None,
    warn_ood=False,
    process_group=None,
):
    return _fused(
        "cross_entropy",
        logits,
        targets,
        reduction,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
        process_group=process_group,
        warn_ood=warn_ood,
    )


def background_class_loss(
    logits,
    targets,
    n_classes,
    reduction="mean",
    *,
    weight=None,
    cost_matrix=None,
    ignore_index=None,
    process_group=None,
):
    if isinstance(logits, Tensor) and logits.dim() == 1 and isinstance(targets, Tensor) and targets.dim() == 0:
        # unbatched input, as torch's cross-entropy accepts it: the same handling as the reference
        return _ref.background_class_loss(
            logits,
            targets,
            n_classes,
            reduction,
            weight=weight,
            cost_matrix=cost_matrix,
            ignore_index=ignore_index,
            process_group=process_group,
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
        process_group=process_group,
    )


def outlier_exposure_loss(
    logits,
    targets,
    alpha=0.5,
    reduction="mean",
    *,
    weight=None,
    cost_matrix=None,
    ignore_index=None,
    process_group=None,
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
        process_group=process_group,
        targets_name="target",
    )


def entropic_open_set_loss(
    logits, targets, reduction="mean", *, weight=None, cost_matrix=None, ignore_index=None, process_group=None
):
    return _fused(
        "entropic",
        logits,
        targets,
        reduction,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
        process_group=process_group,
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
    process_group=None,
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
        process_group=process_group,
    )


def confidence_penalty_loss(
    logits,
    targets,
    lambda_ood=0.1,
    reduction="mean",
    *,
    weight=None,
    cost_matrix=None,
    ignore_index=None,
    process_group=None,
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
        process_group=process_group,
    )


def margin_confidence_loss(
    logits,
    targets,
    margin=0.5,
    reduction="mean",
    *,
    weight=None,
    cost_matrix=None,
    ignore_index=None,
    process_group=None,
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
        process_group=process_group,
    )


def logit_norm_loss(
    logits, target, t=1.0, reduction="mean", *, weight=None, cost_matrix=None, ignore_index=None, process_group=None
):
    return _fused(
        "logit_norm",
        logits,
        target,
        reduction,
        alpha=t,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
        process_group=process_group,
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


def confidence_loss(logits, confidence, targets, alpha=1.0, eps=1e-24, *, process_group=None):
    return _ref_confidence._confidence_loss(
        logits, confidence, targets, alpha, eps, "targets", ce_and_energy, process_group
    )


def objectosphere_loss(logits, features, targets, alpha=1.0, xi=1.0, reduction="mean", *, process_group=None):
    return _ref_objectosphere._objectosphere_loss(
        logits, features, targets, alpha, xi, reduction, "targets", ce_and_energy, process_group
    )


def vos_reg_loss(
    logits, targets, logistic_regression, weights_energy, alpha=0.1, reduction="mean", *, process_group=None
):
    return _ref_vos._vos_reg_loss(
        logits, targets, logistic_regression, weights_energy, alpha, reduction, "targets", ce_and_energy,
        process_group,
    )  # fmt: skip


def paired_outlier_exposure(logits_in, targets_in, logits_out, lambda_oe=0.5, *, process_group=None):
    return _ref_paired._outlier_exposure(logits_in, targets_in, logits_out, lambda_oe, ce_and_energy, process_group)


def paired_energy_margin(logits_in, targets_in, logits_out, lambda_energy=0.1, margin=10.0, *, process_group=None):
    return _ref_paired._energy_margin(
        logits_in, targets_in, logits_out, lambda_energy, margin, ce_and_energy, process_group
    )


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
