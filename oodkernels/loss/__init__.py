"""The criteria, with pytorch-ood 0.4.0's class names, constructor arguments, forward signatures
and state_dict keys (LOSS_CONTRACT.md §3, §6), plus ConfidencePenaltyLoss and MarginConfidenceLoss
from our design notes.

Each criterion is its reference class (``oodkernels.reference``: constructor, state, RNG draws and
checks defined once) with the function(s) its forward computes swapped for the dispatched ones of
:mod:`oodkernels.functional`, so it runs the fused kernels where a backend serves the device (Triton
on CUDA tensors, and on CPU under ``TRITON_INTERPRET=1`` with ``OODKERNELS_BACKEND=triton``):

- the eight row criteria: their whole per-row loss (``_loss_fn``);
- ConfidenceLoss, ObjectosphereLoss, VOSRegLoss, VirtualOutlierSynthesizingRegLoss and EnergyMarginLoss:
  their per-row cross-entropy and (weighted) energy through ``ce_and_energy`` (one fused read of the
  logits); queues, sampling and the batch-coupled terms are device torch ops;
- CACLoss, CenterLoss and MCHADLoss: ``distance(z)`` (fused distance kernel) and ``forward(distances, y)``
  (fused loss epilogue); IILoss, DeepSVDDLoss and DeepSADLoss: their distances (II's intra-class spread
  too), with the O(B) rest in torch.

:func:`oodkernels.backend_info` reports what runs where.

Every criterion whose mean divides by a count takes a keyword-only ``process_group=`` in its constructor:
under ``DistributedDataParallel`` its normalisers are then the whole group batch's (README, "Distributed
training"; :mod:`oodkernels.reference._distributed`).

``SSDeepSVDDLoss`` resolves to :class:`DeepSADLoss` with a DeprecationWarning, as in pytorch-ood.
"""

from .. import functional as _functional
from ..reference import CRITERIA
from ..reference import ConfidenceLoss
from ..reference import EnergyMarginLoss
from ..reference import ObjectosphereLoss
from ..reference import VirtualOutlierSynthesizingRegLoss
from ..reference import VOSRegLoss
from ..reference import distances as _reference_distance_criteria
from ..reference import logits as _reference_row_criteria
from ..reference import renamed
from ..reference import svdd as _reference_svdd_criteria

logit_norm_loss = _functional.logit_norm_loss


def _fused_row_criterion(reference_class, loss_fn):
    """The reference criterion with its forward computing the dispatched ``loss_fn``."""
    return type(
        reference_class.__name__,
        (reference_class,),
        {"__doc__": reference_class.__doc__, "__module__": __name__, "_loss_fn": staticmethod(loss_fn)},
    )


CrossEntropyLoss = _fused_row_criterion(_reference_row_criteria.CrossEntropyLoss, _functional.cross_entropy)
BackgroundClassLoss = _fused_row_criterion(
    _reference_row_criteria.BackgroundClassLoss, _functional.background_class_loss
)
OutlierExposureLoss = _fused_row_criterion(
    _reference_row_criteria.OutlierExposureLoss, _functional.outlier_exposure_loss
)
EntropicOpenSetLoss = _fused_row_criterion(
    _reference_row_criteria.EntropicOpenSetLoss, _functional.entropic_open_set_loss
)
EnergyRegularizedLoss = _fused_row_criterion(
    _reference_row_criteria.EnergyRegularizedLoss, _functional.energy_regularized_loss
)
ConfidencePenaltyLoss = _fused_row_criterion(
    _reference_row_criteria.ConfidencePenaltyLoss, _functional.confidence_penalty_loss
)
MarginConfidenceLoss = _fused_row_criterion(
    _reference_row_criteria.MarginConfidenceLoss, _functional.margin_confidence_loss
)
LogitNorm = _fused_row_criterion(_reference_row_criteria.LogitNorm, _functional.logit_norm_loss)


def _fused_center_criterion(reference_class, loss_fn=None):
    """The reference criterion with its distances (and, given ``loss_fn``, its forward) dispatched."""
    hooks = {"_sq_distances_fn": staticmethod(_functional.sq_distances)}
    if loss_fn is not None:
        hooks["_loss_fn"] = staticmethod(loss_fn)
    if hasattr(reference_class, "_assigned_sq_distances_fn"):
        hooks["_assigned_sq_distances_fn"] = staticmethod(_functional.assigned_sq_distances)
    return type(
        reference_class.__name__,
        (reference_class,),
        {"__doc__": reference_class.__doc__, "__module__": __name__, **hooks},
    )


# distance(z) runs the fused distance kernel and forward(distances, y) the fused loss epilogue; II and the
# one-center criteria compute their distances with the fused kernels (II's intra-class spread too) and the
# O(B) or O(K·D) rest in torch
CACLoss = _fused_center_criterion(_reference_distance_criteria.CACLoss, _functional.cac_distance_loss)
CenterLoss = _fused_center_criterion(_reference_distance_criteria.CenterLoss, _functional.center_distance_loss)
MCHADLoss = _fused_center_criterion(_reference_distance_criteria.MCHADLoss, _functional.mchad_distance_loss)
IILoss = _fused_center_criterion(_reference_distance_criteria.IILoss)
DeepSVDDLoss = _fused_center_criterion(_reference_svdd_criteria.DeepSVDDLoss)
DeepSADLoss = _fused_center_criterion(_reference_svdd_criteria.DeepSADLoss)


def _fused_rows_criterion(reference_class):
    """The reference criterion with its per-row ``(CE, energy)`` computed by the dispatched ``ce_and_energy``;
    its checks, state, RNG use and batch-coupled terms (device torch ops) stay the reference's."""
    return type(
        reference_class.__name__,
        (reference_class,),
        {
            "__doc__": reference_class.__doc__,
            "__module__": __name__,
            "_row_fn": staticmethod(_functional.ce_and_energy),
        },
    )


ConfidenceLoss = _fused_rows_criterion(ConfidenceLoss)
ObjectosphereLoss = _fused_rows_criterion(ObjectosphereLoss)
VOSRegLoss = _fused_rows_criterion(VOSRegLoss)
VirtualOutlierSynthesizingRegLoss = _fused_rows_criterion(VirtualOutlierSynthesizingRegLoss)
EnergyMarginLoss = _fused_rows_criterion(EnergyMarginLoss)

__all__ = [*CRITERIA, "logit_norm_loss"]


def __getattr__(name):
    return renamed(__name__, globals(), name)
