"""Post-hoc OOD scores of logits (LOSS_CONTRACT.md §4). Higher means more OOD.

Classes are on dim 1: logits (B, C) give (B,) scores, segmentation logits (B, C, H, W) give
(B, H, W), and a per-pixel score equals the score of the flattened pixels.

=====================================  ===================================================
``energy(logits, t=1.0)``              ``−t · lse(f / t)``
``max_softmax(logits, t=1.0)``         ``−max_c σ(f / t)_c``
``max_logit(logits)``                  ``−max_c f_c``
``entropy(logits)``                    ``−Σ_c p_c log p_c`` with ``p = clamp(σ(f), 1e-7, 1)``
``weighted_energy(logits, weights)``   ``−(m + log Σ_c relu(w_c) · exp(f_c − m))``, ``m = max_c f_c``
=====================================  ===================================================

The first four accept any rank >= 2, as pytorch-ood does; ``weighted_energy`` accepts (B, C) and
(B, C, H, W) only. The scores compute in float32 (float64 for float64 input) and return the dtype
of the logits (fix d), or the ``dtype=`` asked for (e.g. float32 for bf16 maps); they leave grad
mode alone and never read device values on the host.
``weighted_energy`` subtracts the row maximum before exponentiating (fix g), so large logits do not
overflow; with every weight <= 0 it is ``+inf``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import ShapeError
from ._common import check_floating
from ._common import result_dtypes
from ._common import weighted_energy_of

__all__ = ["energy", "max_softmax", "max_logit", "entropy", "weighted_energy"]

ENTROPY_CLAMP = 1e-7


def check_score_logits(logits, ranks=None) -> None:
    """The always-on checks of a score's logits (shared with the fused scores)."""
    check_floating("logits", logits)
    if ranks is not None and logits.dim() not in ranks:
        raise ValueError(f"Unsupported input shape: {logits.shape}")
    if logits.dim() < 2:
        raise ShapeError(
            f"logits: expected shape (B, C) or (B, C, H, W) with classes on dim 1, got {tuple(logits.shape)}"
        )


def score_dtype(logits: Tensor, dtype) -> torch.dtype:
    """The output dtype of a score: the logits' dtype, or ``dtype`` (a floating dtype, e.g. float32) on request."""
    if dtype is None:
        return logits.dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected None or a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
    return dtype


def _logits_in_compute_dtype(logits, ranks=None, dtype=None) -> tuple[Tensor, torch.dtype]:
    """Check ``logits`` and return them upcast to the compute dtype, with the output dtype."""
    check_score_logits(logits, ranks)
    out = score_dtype(logits, dtype)
    _, acc = result_dtypes(logits)
    return logits.to(acc), out


def energy(logits: Tensor, t: float = 1.0, *, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Energy score ``−t · lse(f / t)``: (B, C) -> (B,), (B, C, H, W) -> (B, H, W).

    :param logits: logits with classes on dim 1
    :param t: temperature T
    """
    f, out = _logits_in_compute_dtype(logits, dtype=dtype)
    return (-t * torch.logsumexp(f / t, dim=1)).to(out)


def max_softmax(logits: Tensor, t: float = 1.0, *, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Negative maximum softmax probability ``−max_c σ(f / t)_c``: (B, C) -> (B,), (B, C, H, W) -> (B, H, W).

    :param logits: logits with classes on dim 1
    :param t: temperature T
    """
    f, out = _logits_in_compute_dtype(logits, dtype=dtype)
    return (-torch.softmax(f / t, dim=1).max(dim=1).values).to(out)


def max_logit(logits: Tensor, *, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Negative maximum logit ``−max_c f_c``: (B, C) -> (B,), (B, C, H, W) -> (B, H, W)."""
    f, out = _logits_in_compute_dtype(logits, dtype=dtype)
    return (-f.max(dim=1).values).to(out)


def entropy(logits: Tensor, *, clip: bool = True, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Entropy of the softmax ``−Σ_c p_c log p_c`` with ``p = clamp(σ(f), 1e-7, 1)``.

    The clamped ``p`` appears in both factors (as in pytorch-ood; the contract's default). With
    ``clip=False`` the exact entropy ``lse(f) − Σ_c σ(f)_c·f_c`` (no clamp).
    (B, C) -> (B,), (B, C, H, W) -> (B, H, W).
    """
    f, out = _logits_in_compute_dtype(logits, dtype=dtype)
    if not clip:
        return (-(torch.softmax(f, dim=1) * torch.log_softmax(f, dim=1)).sum(dim=1)).to(out)
    p = torch.softmax(f, dim=1).clamp(ENTROPY_CLAMP, 1.0)
    return (-(p * p.log()).sum(dim=1)).to(out)


def check_weighted_energy(logits, weights) -> None:
    """The always-on checks of :func:`weighted_energy` (shared with the fused score)."""
    check_score_logits(logits, (2, 4))
    check_floating("weights", weights)
    n_classes = logits.shape[1]
    if tuple(weights.shape) not in ((n_classes,), (1, n_classes)):
        raise ShapeError(
            f"weights: expected shape ({n_classes},) or (1, {n_classes}) to match logits of shape "
            f"{tuple(logits.shape)}, got {tuple(weights.shape)}"
        )


def weighted_energy(logits: Tensor, weights: Tensor, *, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Weighted energy (VOS) ``−(m + log Σ_c relu(w_c) · exp(f_c − m))`` with ``m = max_c f_c`` (fix g).

    :param logits: (B, C) or (B, C, H, W); any other rank raises ``ValueError("Unsupported input shape: ...")``
    :param weights: class weights of shape (C,) or (1, C), e.g. ``nn.Linear(C, 1).weight``; moved to the
        device of the logits, negative entries act as 0
    :return: (B,) or (B, H, W) in the dtype of the logits; ``+inf`` where every weight is <= 0
    """
    check_weighted_energy(logits, weights)
    f, out = _logits_in_compute_dtype(logits, ranks=(2, 4), dtype=dtype)
    n_classes = f.shape[1]
    w = weights.to(device=f.device, dtype=f.dtype).reshape((1, n_classes) + (1,) * (f.dim() - 2))
    return weighted_energy_of(f, w).to(out)
