"""The metadata checks of every row criterion call, shared by the reference and the fused path.

Everything here reads shapes, dtypes, devices and arguments, never tensor data: the checks are always on
and raise at once with the reference's messages (LOSS_CONTRACT.md §2). :func:`check_row_call` is the whole
prologue of a fused row criterion; the reference's :func:`oodkernels.reference.logits.prepare_rows` runs it
too and then builds its masks and queues its data checks.
"""

from __future__ import annotations

import operator
from typing import Callable
from typing import NamedTuple
from typing import Optional

import torch
from torch import Tensor

from ._common import ShapeError
from ._common import check_floating
from ._common import check_logits_and_targets
from ._common import check_reduction
from ._common import check_same_device
from ._common import check_targets
from ._common import result_dtypes

# reductions understood by torch.nn.functional.cross_entropy (None is not one of them)
TORCH_REDUCTIONS = ("mean", "sum", "none")

#: the kinds of row criterion :func:`prepare_rows` and :func:`reduce_rows` know
KINDS = (
    "cross_entropy",
    "background",
    "outlier_exposure",
    "entropic",
    "energy",
    "confidence_penalty",
    "margin_confidence",
    "logit_norm",
)

# logits ranks accepted per kind (None: any rank >= 2)
RANKS = {
    "cross_entropy": None,
    "background": None,
    "outlier_exposure": (2, 4),
    "entropic": (2, 4),
    "energy": (2, 4),
    "confidence_penalty": (2, 4),
    "margin_confidence": (2, 4),
    "logit_norm": (2,),
}

# kinds that follow torch.nn.functional.cross_entropy's reduction errors
TORCH_REDUCTION_KINDS = ("cross_entropy", "background", "logit_norm")

# kinds whose OOD entries contribute nothing (the loss is over the ID entries only)
ID_ONLY_KINDS = ("cross_entropy", "logit_norm")
#: the kinds whose 'mean' is mean_ID + mean_OOD (separate group means)
GROUP_MEAN_KINDS = ("energy", "confidence_penalty", "margin_confidence")

BACKGROUND_LABEL_NAME = "targets (OOD entries mapped to the background class)"


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def check_torch_reduction(reduction) -> None:
    """PyTorch's own error for a reduction its cross-entropy does not know (``None`` included)."""
    if not (isinstance(reduction, str) and reduction in TORCH_REDUCTIONS):
        raise ValueError(f"{reduction} is not a valid value for reduction")


def check_reduction_of(kind: str, reduction) -> None:
    """The reduction error of criterion ``kind``, raised before any work is done."""
    if kind == "cross_entropy":
        check_torch_reduction("none" if reduction is None else reduction)
    elif kind in TORCH_REDUCTION_KINDS:
        check_torch_reduction(reduction)
    else:
        check_reduction(reduction)


def check_ignore_index(ignore_index) -> Optional[int]:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, (bool, Tensor)):
        raise TypeError(f"ignore_index: expected an int label, got {type(ignore_index).__name__}")
    try:
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index: expected an int label, got {type(ignore_index).__name__}") from None


def broadcastable(shape: tuple, target: tuple) -> bool:
    """Whether a tensor of ``shape`` broadcasts to exactly ``target`` (numpy rules, ``target`` unchanged)."""
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def check_weight(weight, logits: Tensor, targets: Tensor) -> None:
    """A per-entry ``weight``: floating, broadcastable to the targets' shape, on the logits' device."""
    if weight is None:
        return
    check_floating("weight", weight)
    if not broadcastable(tuple(weight.shape), tuple(targets.shape)):
        raise ShapeError(
            f"weight: expected a shape broadcastable to the targets' shape {tuple(targets.shape)} "
            f"(one weight per entry), got {tuple(weight.shape)}"
        )
    check_same_device(logits=logits, weight=weight)


def flat_weight(weight, logits: Tensor, targets: Tensor, acc: torch.dtype) -> Optional[Tensor]:
    """``weight`` checked, broadcast to the targets' shape and flattened to ``(R,)`` in ``acc``."""
    if weight is None:
        return None
    check_weight(weight, logits, targets)
    return torch.broadcast_to(weight, targets.shape).reshape(-1).to(acc)


def checked_cost(cost_matrix, logits: Tensor, acc: torch.dtype) -> Optional[Tensor]:
    """``cost_matrix`` checked against ``C = logits.shape[1]``, detached, in ``acc``."""
    if cost_matrix is None:
        return None
    check_floating("cost_matrix", cost_matrix)
    n_columns = logits.shape[1]
    if tuple(cost_matrix.shape) != (n_columns, n_columns):
        raise ShapeError(
            f"cost_matrix: expected shape ({n_columns}, {n_columns}) (C x C, C = logits.shape[1]), "
            f"got {tuple(cost_matrix.shape)}"
        )
    check_same_device(logits=logits, cost_matrix=cost_matrix)
    return cost_matrix.detach().to(acc)


def label_too_large() -> Callable[[float], None]:
    """The data-check action of §3.1: the reference's message, with the max label printed as a tensor."""

    def action(top: float) -> None:
        if top >= 0:  # encoded below as -1 when no label reaches n_classes
            # the reference formats a 0-d tensor, which prints as its bare number
            raise ValueError(f"Target label to large: {int(top)}")

    return action


class RowCall(NamedTuple):
    """The checked arguments of one row criterion call."""

    out: torch.dtype  # output dtype (the logits')
    acc: torch.dtype  # compute dtype (float64 for float64 logits, else float32)
    cost: Optional[Tensor]  # (C, C) in acc, detached, or None
    ignore_index: Optional[int]


def check_row_call(
    kind: str,
    logits: Tensor,
    targets: Tensor,
    *,
    reduction,
    weight: Optional[Tensor] = None,
    cost_matrix: Optional[Tensor] = None,
    ignore_index=None,
    n_classes: Optional[int] = None,
    targets_name: str = "targets",
) -> RowCall:
    """Every metadata check of a call of row criterion ``kind`` (rank, shapes, dtypes, devices, reduction,
    ``weight``, ``cost_matrix``, ``ignore_index``, ``n_classes``), in the reference's order and words."""
    check_kind(kind)
    if kind == "logit_norm":
        check_floating("logits", logits)
        check_targets(targets_name, targets)
        if targets.dim() != 1:
            raise ValueError(f"Expected targets of shape B, got {tuple(targets.shape)}")
    check_logits_and_targets(logits, targets, ranks=RANKS[kind], targets_name=targets_name)
    check_reduction_of(kind, reduction)
    if kind == "background" and n_classes is None:
        raise ValueError("n_classes: required for kind 'background'")
    ignore_index = check_ignore_index(ignore_index)
    out, acc = result_dtypes(logits)
    check_weight(weight, logits, targets)
    return RowCall(out=out, acc=acc, cost=checked_cost(cost_matrix, logits, acc), ignore_index=ignore_index)
