"""Plain-PyTorch reference implementations: readable ground truth and the fallback backend.

One file per family, each criterion's math in its docstring (LOSS_CONTRACT.md §3):

* ``logits``: CrossEntropyLoss, BackgroundClassLoss, OutlierExposureLoss, EntropicOpenSetLoss,
  EnergyRegularizedLoss, ConfidencePenaltyLoss, MarginConfidenceLoss, LogitNorm;
* ``confidence``: ConfidenceLoss; ``objectosphere``: ObjectosphereLoss;
* ``vos``: VOSRegLoss, VirtualOutlierSynthesizingRegLoss; ``energy_margin``: EnergyMarginLoss;
* ``centers``: pairwise distances, ClassCenters, RunningCenters;
* ``distances``: CACLoss, CenterLoss, IILoss, MCHADLoss; ``svdd``: DeepSVDDLoss, DeepSADLoss;
* ``scores``: the post-hoc scores; ``utils``: label predicates and batch utilities.
"""

import warnings

from . import scores
from .centers import ClassCenters
from .centers import RunningCenters
from .centers import pairwise_distances
from .confidence import ConfidenceLoss
from .confidence import confidence_loss
from .distances import CACLoss
from .distances import CenterLoss
from .distances import IILoss
from .distances import MCHADLoss
from .distances import cac_distance_loss
from .distances import center_distance_loss
from .distances import mchad_distance_loss
from .energy_margin import EnergyMarginLoss
from .logits import BackgroundClassLoss
from .logits import ConfidencePenaltyLoss
from .logits import CrossEntropyLoss
from .logits import EnergyRegularizedLoss
from .logits import EntropicOpenSetLoss
from .logits import LogitNorm
from .logits import MarginConfidenceLoss
from .logits import OutlierExposureLoss
from .logits import background_class_loss
from .logits import confidence_penalty_loss
from .logits import cross_entropy
from .logits import energy_regularized_loss
from .logits import entropic_open_set_loss
from .logits import logit_norm_loss
from .logits import margin_confidence_loss
from .logits import outlier_exposure_loss
from .objectosphere import ObjectosphereLoss
from .objectosphere import objectosphere_loss
from .svdd import DeepSADLoss
from .svdd import DeepSVDDLoss
from .vos import VirtualOutlierSynthesizingRegLoss
from .vos import VOSRegLoss
from .vos import vos_reg_loss

CRITERIA = (
    "BackgroundClassLoss",
    "CrossEntropyLoss",
    "OutlierExposureLoss",
    "EntropicOpenSetLoss",
    "EnergyRegularizedLoss",
    "VOSRegLoss",
    "VirtualOutlierSynthesizingRegLoss",
    "ObjectosphereLoss",
    "ConfidenceLoss",
    "LogitNorm",
    "CACLoss",
    "CenterLoss",
    "IILoss",
    "MCHADLoss",
    "DeepSVDDLoss",
    "DeepSADLoss",
    "EnergyMarginLoss",
    "ConfidencePenaltyLoss",
    "MarginConfidenceLoss",
)

__all__ = [
    *CRITERIA,
    "logit_norm_loss",
    "cross_entropy",
    "background_class_loss",
    "outlier_exposure_loss",
    "entropic_open_set_loss",
    "energy_regularized_loss",
    "confidence_penalty_loss",
    "margin_confidence_loss",
    "confidence_loss",
    "objectosphere_loss",
    "vos_reg_loss",
    "cac_distance_loss",
    "center_distance_loss",
    "mchad_distance_loss",
    "pairwise_distances",
    "ClassCenters",
    "RunningCenters",
    "scores",
]

RENAMED = {"SSDeepSVDDLoss": "DeepSADLoss"}


def renamed(module_name: str, namespace: dict, name: str):
    """Resolve a renamed criterion with pytorch-ood's DeprecationWarning, or raise AttributeError."""
    if name in RENAMED:
        warnings.warn(
            f"{name} was renamed to {RENAMED[name]} and will be removed in a future release",
            DeprecationWarning,
            stacklevel=3,
        )
        return namespace[RENAMED[name]]
    raise AttributeError(f"module {module_name!r} has no attribute {name!r}")


def __getattr__(name):
    return renamed(__name__, globals(), name)
