"""Label predicates and batch utilities of LOSS_CONTRACT.md §2.1-2.4 (public as ``oodkernels.utils``).

Labels ``y >= 0`` are in-distribution (ID), ``y < 0`` out-of-distribution (OOD); any negative value
counts (unknown class ``k`` is often encoded as ``-(k + 1)``).
"""

from __future__ import annotations

import warnings

from torch import Tensor

from ._common import DROP_UNKNOWN_MESSAGE
from ._common import apply_reduction
from .centers import pairwise_distances

__all__ = [
    "is_known",
    "is_unknown",
    "contains_known",
    "contains_unknown",
    "contains_known_and_unknown",
    "drop_unknown",
    "apply_reduction",
    "pairwise_distances",
]


def is_known(labels: Tensor) -> Tensor:
    """Elementwise ``labels >= 0`` (ID)."""
    return labels >= 0


def is_unknown(labels: Tensor) -> Tensor:
    """Elementwise ``labels < 0`` (OOD)."""
    return labels < 0


def contains_known(labels: Tensor) -> Tensor:
    """0-d boolean tensor: any ID label. Does not read the host."""
    return is_known(labels).any()


def contains_unknown(labels: Tensor) -> Tensor:
    """0-d boolean tensor: any OOD label. Does not read the host."""
    return is_unknown(labels).any()


def contains_known_and_unknown(labels: Tensor) -> Tensor:
    """0-d boolean tensor: both ID and OOD labels present. Does not read the host."""
    return contains_known(labels) & contains_unknown(labels)


def drop_unknown(target: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Remove the OOD rows of a batch, as pytorch-ood does (LOSS_CONTRACT.md §2.2).

    :param target: (B,) labels
    :param tensors: tensors with first dimension B
    :return: ``(target, *tensors)`` unchanged (no copy, no warning) when every label is ``>= 0``;
        otherwise the rows with ``target >= 0``, after a ``UserWarning``
        "Discarding samples with targets < 0 (OOD), which this loss does not use."
    :raises ValueError: ``"Expected targets of shape B, got <shape>"`` for non-1-D targets

    The result's length depends on the data, so this utility reads the device once. The criteria
    themselves never call it: they mask OOD rows instead, with identical values.
    """
    if target.dim() != 1:
        raise ValueError(f"Expected targets of shape B, got {tuple(target.shape)}")
    known = is_known(target)
    if bool(known.all()):
        return (target, *tensors)
    warnings.warn(DROP_UNKNOWN_MESSAGE, UserWarning, stacklevel=2)
    return (target[known], *(t[known] for t in tensors))
