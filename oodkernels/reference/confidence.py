"""Learned confidence (DeVries & Taylor, 2018), LOSS_CONTRACT.md §3.9.

The model predicts class logits ``f_i`` (B, C) and a confidence ``c_i`` in [0, 1]. The prediction is
interpolated toward the label by ``1 − c``, and low confidence is penalised::

    p_i     = softmax(f_i)
    nll_i   = −log clamp(c_i · p_{i, y_i} + 1 − c_i, ε, 1)
    conf_i  = −log clamp(c_i, ε, 1)
    loss    = mean_I(nll) + α · mean_I(conf)

OOD rows (y < 0) are discarded with the drop-unknown warning (§2.2); an all-OOD or empty batch gives
an attached 0. The outlier score of this method is ``1 − confidence``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch import nn

from ._common import DataChecks
from ._common import LossInfo
from ._common import Paper
from ._common import Representation
from ._common import ShapeError
from ._common import Task
from ._common import check_floating
from ._common import check_logits_and_targets
from ._common import check_same_device
from ._common import check_targets
from ._common import id_mask_with_warning
from ._common import masked_sum
from ._common import result_dtypes
from ._distributed import GlobalCounts
from ._distributed import check_process_group

__all__ = ["ConfidenceLoss", "confidence_loss"]


def _confidence_loss(
    logits: Tensor,
    confidence: Tensor,
    targets: Tensor,
    alpha: float,
    eps: float,
    targets_name: str,
    row_fn=None,
    process_group=None,
) -> Tensor:
    """The criterion; ``row_fn`` computes the per-row ``(CE, energy)`` (default: the reference's
    :func:`~oodkernels.reference.logits.ce_and_energy`; the fused path passes its kernel)."""
    from .logits import ce_and_energy

    row_fn = ce_and_energy if row_fn is None else row_fn
    check_floating("logits", logits)
    if logits.dim() != 2:
        raise ShapeError(f"logits: expected shape (B, C), got {tuple(logits.shape)}")
    check_targets(targets_name, targets)
    checks = DataChecks(logits, confidence, targets)
    is_id = id_mask_with_warning(targets, checks)  # raises for targets that are not 1-D
    check_logits_and_targets(logits, targets, ranks=(2,), targets_name=targets_name)
    check_floating("confidence", confidence)
    batch = logits.shape[0]
    # fix e: (B, 1) or (B,), never broadcast against (B, C)
    if tuple(confidence.shape) not in ((batch, 1), (batch,)):
        raise ShapeError(f"confidence: expected shape ({batch}, 1) or ({batch},), got {tuple(confidence.shape)}")
    check_same_device(logits=logits, confidence=confidence)
    checks.check_labels_below(targets, logits.shape[1], name=targets_name)

    out, acc = result_dtypes(logits, confidence)
    c = confidence.reshape(batch).to(acc)
    # p_y = exp(f_y − lse(f)); NaN for labels >= C (checks off), ignored values at OOD rows
    p_target = torch.exp(-row_fn(logits, targets)[0].to(acc))
    nll = -torch.log((c * p_target + (1.0 - c)).clamp(eps, 1.0))
    conf = -torch.log(c.clamp(eps, 1.0))
    counts = GlobalCounts(is_id.sum().reshape(1), process_group)
    loss = counts.mean(masked_sum(nll, is_id), 0) + alpha * counts.mean(masked_sum(conf, is_id), 0)
    checks.flush()
    return loss.to(out)


def confidence_loss(
    logits: Tensor,
    confidence: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    eps: float = 1e-24,
    *,
    process_group=None,
) -> Tensor:
    """Confidence loss ``mean_I(−log clamp(c·p_y + 1 − c, ε, 1)) + α · mean_I(−log clamp(c, ε, 1))``.

    :param logits: class logits (B, C)
    :param confidence: predicted confidence in [0, 1], (B, 1) or (B,) (fix e: never broadcast)
    :param targets: labels (B,); rows with ``y < 0`` are discarded with a warning
    :param alpha: weight α of the confidence penalty
    :param eps: clamp ε, applied in the compute dtype (so 1e-24 survives fp16 inputs)
    :param process_group: optional ``torch.distributed`` group of ``W`` ranks: both means divide by ``N_ID``
        summed over the group and are multiplied by ``W`` (README, "Distributed training")
    :return: 0-d loss in the promoted dtype of ``logits`` and ``confidence``; an attached 0 without ID rows
    """
    return _confidence_loss(logits, confidence, targets, alpha, eps, "targets", process_group=process_group)


class ConfidenceLoss(nn.Module):
    """Learned-confidence loss of *Learning Confidence for Out-of-Distribution Detection in Neural
    Networks*; see :func:`confidence_loss` for the math.

    ``forward(logits (B, C), confidence (B, 1) or (B,), target (B,))`` returns a 0-d loss. The hint
    (label given to half the batch) and the confidence budget of the paper belong to the training
    procedure and are not part of this criterion. Use ``1 − confidence`` as the outlier score.
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION},
        inputs={Representation.LOGITS, Representation.CONFIDENCE},
        supervised=False,
        paper=Paper(
            title="Learning Confidence for Out-of-Distribution Detection in Neural Networks",
            venue="arXiv",
            year=2018,
            url="https://arxiv.org/abs/1802.04865",
        ),
    )

    def __init__(self, alpha: float = 1.0, eps: float = 1e-24, *, process_group=None):
        """
        :param alpha: weight α of the confidence penalty
        :param eps: clamp ε for numerical stability
        :param process_group: optional ``torch.distributed`` group: the means over ID rows divide by the
            group's ``N_ID`` (README, "Distributed training")
        """
        super().__init__()
        self.alpha = alpha
        self.eps = eps
        check_process_group(process_group)
        self.process_group = process_group

    def forward(self, logits: Tensor, confidence: Tensor, target: Tensor) -> Tensor:
        """
        :param logits: class logits (B, C)
        :param confidence: predicted confidence (B, 1) or (B,)
        :param target: labels (B,); rows with ``y < 0`` are discarded with a warning
        :return: 0-d loss
        """
        return _confidence_loss(
            logits, confidence, target, self.alpha, self.eps, "target", self._row_fn, self.process_group
        )

    #: per-row (CE, energy) of the logits; oodkernels.loss swaps in the dispatched (fused) one
    _row_fn = None
