"""The functional API: every stateless criterion as a function of tensors.

Each function dispatches to the backend that serves its inputs' device (see
:func:`oodkernels.backend_info`) and has the same semantics, shapes, dtypes, warnings and errors as
the criterion of the same name in :mod:`oodkernels.loss` (LOSS_CONTRACT.md §3). Labels ``y >= 0``
are ID, ``y < 0`` OOD. The docstring of each function states its math.

Every loss whose mean divides by a count takes a keyword-only ``process_group=`` (None: this rank's counts,
pytorch-ood's value; a ``torch.distributed`` group: the counts of the whole group's batch, for
``DistributedDataParallel``; README, "Distributed training").

=================================  ==========================================================
``cross_entropy``                  masked CE: 0 at OOD entries, 'mean' over ID entries
``background_class_loss``          CE with OOD entries mapped to the last (background) column
``outlier_exposure_loss``          CE on ID, α·(lse − mean logit) on OOD, one mean
``entropic_open_set_loss``         CE on ID, lse − mean logit on OOD
``energy_regularized_loss``        CE + α·squared energy hinges, separate group means
``confidence_penalty_loss``        CE on ID + λ·max softmax on OOD (our design notes)
``margin_confidence_loss``         CE on ID + relu(max softmax − margin) on OOD (our design notes)
``logit_norm_loss``                CE of the logits normalised to norm 1/t
``confidence_loss``                DeVries & Taylor's learned-confidence loss
``objectosphere_loss``             entropic term + feature-norm term
``vos_reg_loss``                   CE + α·logistic regression on the weighted energy
``pairwise_distances``             clamped squared distances by expansion
``pairwise_sq_distances``          (B, D) features to (K, D) centers, in the features' dtype
``center_loss``                    Center loss from features and centers, one fused call
``cac_loss``                       CAC loss from features and anchors, one fused call
``mchad_loss``                     MCHAD loss from features and centers, one fused call
``cac_distance_loss``              CAC anchor + tuplet terms from distances
``center_distance_loss``           Center loss from distances
``mchad_distance_loss``            MCHAD's three terms from distances
``ce_and_energy``                  per-entry (CE, energy or weighted energy), both differentiable:
                                   the building block of batch-coupled energy objectives
=================================  ==========================================================
"""

from .ops import assigned_sq_distances  # noqa: F401  (IILoss's intra-class hook in oodkernels.loss)
from .ops import background_class_loss
from .ops import cac_distance_loss
from .ops import cac_loss
from .ops import ce_and_energy
from .ops import center_distance_loss
from .ops import center_loss
from .ops import confidence_loss
from .ops import confidence_penalty_loss
from .ops import cross_entropy
from .ops import energy_regularized_loss
from .ops import entropic_open_set_loss
from .ops import logit_norm_loss
from .ops import margin_confidence_loss
from .ops import mchad_distance_loss
from .ops import mchad_loss
from .ops import objectosphere_loss
from .ops import outlier_exposure_loss
from .ops import pairwise_distances
from .ops import pairwise_sq_distances
from .ops import sq_distances  # noqa: F401  (the distance hook of the center criteria in oodkernels.loss)
from .ops import vos_reg_loss

__all__ = [
    "cross_entropy",
    "background_class_loss",
    "outlier_exposure_loss",
    "entropic_open_set_loss",
    "energy_regularized_loss",
    "confidence_penalty_loss",
    "margin_confidence_loss",
    "logit_norm_loss",
    "confidence_loss",
    "objectosphere_loss",
    "vos_reg_loss",
    "pairwise_distances",
    "cac_distance_loss",
    "center_distance_loss",
    "mchad_distance_loss",
    "pairwise_sq_distances",
    "center_loss",
    "cac_loss",
    "mchad_loss",
    "ce_and_energy",
]
