"""The criteria, with pytorch-ood 0.4.0's class names, constructor arguments, forward signatures
and state_dict keys (LOSS_CONTRACT.md §3, §6), plus ConfidencePenaltyLoss and MarginConfidenceLoss
from our design notes.

In this version no fused kernel is registered yet, so every criterion is the plain-PyTorch
reference class (``oodkernels.reference``); :func:`oodkernels.backend_info` reports it. The fused
row, center and C++ backends replace the forward passes here, behind the same classes.

``SSDeepSVDDLoss`` resolves to :class:`DeepSADLoss` with a DeprecationWarning, as in pytorch-ood.
"""

from .. import functional as _functional
from ..reference import CRITERIA
from ..reference import BackgroundClassLoss
from ..reference import CACLoss
from ..reference import CenterLoss
from ..reference import ConfidenceLoss
from ..reference import ConfidencePenaltyLoss
from ..reference import CrossEntropyLoss
from ..reference import DeepSADLoss
from ..reference import DeepSVDDLoss
from ..reference import EnergyMarginLoss
from ..reference import EnergyRegularizedLoss
from ..reference import EntropicOpenSetLoss
from ..reference import IILoss
from ..reference import LogitNorm
from ..reference import MarginConfidenceLoss
from ..reference import MCHADLoss
from ..reference import ObjectosphereLoss
from ..reference import OutlierExposureLoss
from ..reference import VirtualOutlierSynthesizingRegLoss
from ..reference import VOSRegLoss
from ..reference import renamed

logit_norm_loss = _functional.logit_norm_loss

__all__ = [*CRITERIA, "logit_norm_loss"]


def __getattr__(name):
    return renamed(__name__, globals(), name)
