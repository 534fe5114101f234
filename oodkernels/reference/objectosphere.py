"""Objectosphere loss (Dhamija et al., *Reducing Network Agnostophobia*), LOSS_CONTRACT.md §3.8.

For logits ``f_i`` (B, C), deep features ``z_i`` (B, D) and labels ``y_i`` (y < 0 = OOD)::

    E_i = lse(f_i) − f_{i, y_i}                  if y_i >= 0   (cross-entropy)
    E_i = lse(f_i) − (1/C) Σ_c f_{i, c}          if y_i <  0   (cross-entropy to the uniform distribution)
    R_i = relu(ξ − ‖z_i‖)²                        if y_i >= 0
    R_i = ‖z_i‖²                                  if y_i <  0
    ℓ_i = E_i + α · R_i

then ``apply_reduction`` over all B rows (an empty batch gives NaN for ``'mean'``). ``E`` is the
Entropic Open-Set loss of §3.4. The gradient of ``‖z‖`` at ``z = 0`` is taken as 0.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch import nn

from ._common import DataChecks
from ._common import LossInfo
from ._common import Paper
from ._common import Representation
from ._common import ShapeError
from ._common import Task
from ._common import apply_reduction
from ._common import check_floating
from ._common import check_logits_and_targets
from ._common import check_reduction
from ._common import check_same_device
from ._common import result_dtypes
from ._distributed import check_process_group

__all__ = ["ObjectosphereLoss", "objectosphere_loss", "objectosphere_score"]


def _objectosphere_loss(
    logits: Tensor,
    features: Tensor,
    targets: Tensor,
    alpha: float,
    xi: float,
    reduction: Optional[str],
    targets_name: str,
    row_fn=None,
    process_group=None,
) -> Tensor:
    from .logits import ce_and_energy

    row_fn = ce_and_energy if row_fn is None else row_fn
    check_reduction(reduction)
    check_floating("logits", logits)
    if logits.dim() == 4:
        # pytorch-ood fails with IndexError when it indexes the (B, D) features with (B, H, W) masks
        raise IndexError(
            f"logits: segmentation input is not supported by the objectosphere loss; expected (B, C), "
            f"got {tuple(logits.shape)}"
        )
    check_logits_and_targets(logits, targets, ranks=(2,), targets_name=targets_name)
    check_floating("features", features)
    if features.dim() != 2 or features.shape[0] != logits.shape[0]:
        raise ShapeError(
            f"features: expected shape ({logits.shape[0]}, D) to match logits of shape {tuple(logits.shape)}, "
            f"got {tuple(features.shape)}"
        )
    check_same_device(logits=logits, features=features)
    checks = DataChecks(logits, features, targets)
    checks.check_labels_below(targets, logits.shape[1], name=targets_name)

    out, acc = result_dtypes(logits, features)
    z = features.to(acc)
    is_id = targets >= 0

    # the entropic term: CE on ID rows, U on OOD rows
    entropic = row_fn(logits, targets, None, True)[0].to(acc)
    # vector_norm has gradient 0 at z = 0, so relu(ξ − ‖z‖)² has no NaN there
    norm = torch.linalg.vector_norm(z, ord=2, dim=1)
    magnitude = torch.where(is_id, (xi - norm).relu().pow(2), norm.pow(2))
    loss = apply_reduction(entropic + alpha * magnitude, reduction, process_group)
    checks.flush()
    return loss.to(out)


def objectosphere_loss(
    logits: Tensor,
    features: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    xi: float = 1.0,
    reduction: Optional[str] = "mean",
    *,
    process_group=None,
) -> Tensor:
    """Objectosphere loss ``ℓ_i = E_i + α · R_i`` (module docstring), reduced over all B rows.

    :param logits: class logits (B, C); 4-D (segmentation) input raises ``IndexError``
    :param features: deep features (B, D)
    :param targets: labels (B,); ``y < 0`` marks OOD rows
    :param alpha: weight α of the feature-magnitude term
    :param xi: minimum feature magnitude ξ of ID rows
    :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None`` (= ``'none'``)
    :param process_group: optional ``torch.distributed`` group of ``W`` ranks: ``'mean'`` divides by the
        group's number of rows and multiplies by ``W`` (README, "Distributed training")
    :return: 0-d loss, or (B,) for ``'none'``/``None``, in the promoted dtype of logits and features
    """
    return _objectosphere_loss(logits, features, targets, alpha, xi, reduction, "targets", process_group=process_group)


def objectosphere_score(logits: Tensor) -> Tensor:
    """Outlier score ``−max_c σ(f)_c · ‖f‖₂`` (B, C, ...) -> (B, ...); higher means more OOD.

    It uses the norm of the **logits** (kept from pytorch-ood; the paper uses the feature norm).
    """
    check_floating("logits", logits)
    if logits.dim() < 2:
        raise ShapeError(f"logits: expected shape (B, C, ...), got {tuple(logits.shape)}")
    out, acc = result_dtypes(logits)
    f = logits.to(acc)
    top = torch.softmax(f, dim=1).max(dim=1).values
    return (-top * torch.linalg.vector_norm(f, ord=2, dim=1)).to(out)


class ObjectosphereLoss(nn.Module):
    """Objectosphere loss: the Entropic Open-Set loss plus a feature-magnitude term that pushes the
    norm of ID features above ξ and the norm of OOD features toward 0; see :func:`objectosphere_loss`.

    ``forward(logits (B, C), features (B, D), target (B,))``.
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION},
        inputs={Representation.LOGITS, Representation.FEATURES},
        supervised=True,
        paper=Paper(
            title="Reducing Network Agnostophobia",
            venue="NeurIPS",
            year=2018,
            url="https://proceedings.neurips.cc/paper/2018/file/48db71587df6c7c442e5b76cc723169a-Paper.pdf",
        ),
    )

    def __init__(self, alpha: float = 1.0, xi: float = 1.0, reduction: Optional[str] = "mean", *, process_group=None):
        """
        :param alpha: weight α of the feature-magnitude term
        :param xi: minimum feature magnitude ξ
        :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None``
        :param process_group: optional ``torch.distributed`` group: ``'mean'`` divides by the group's number
            of rows (README, "Distributed training")
        """
        super().__init__()
        check_process_group(process_group)
        self.process_group = process_group
        self.alpha = alpha
        self.xi = xi
        self.reduction = reduction

    def forward(self, logits: Tensor, features: Tensor, target: Tensor) -> Tensor:
        """
        :param logits: class logits (B, C)
        :param features: deep features (B, D)
        :param target: labels (B,); ``y < 0`` marks OOD rows
        :return: 0-d loss, or (B,) for ``'none'``/``None``
        """
        return _objectosphere_loss(
            logits, features, target, self.alpha, self.xi, self.reduction, "target", self._row_fn, self.process_group
        )

    #: per-row (entropic term, energy) of the logits; oodkernels.loss swaps in the dispatched (fused) one
    _row_fn = None

    @staticmethod
    def score(logits: Tensor) -> Tensor:
        """Outlier score ``−max_c σ(f)_c · ‖f‖₂`` of logits (B, C) -> (B,); see :func:`objectosphere_score`."""
        return objectosphere_score(logits)
