"""Paired-batch objectives (SPEC.md §2): an ID batch and a separate OOD batch, each with its own mean.

With ``I`` the ID entries of the in-batch (``targets_in >= 0``; negative labels there are left out),
``O`` every entry of the out-batch, ``CE(f, y) = lse(f) − f_y``, ``U(f) = lse(f) − (1/C)·Σ_c f_c`` and the
energy ``E(f) = −lse(f)``::

    outlier_exposure = mean_I CE(f_i, y_i) + λ_oe · mean_O U(f_o)                     (Hendrycks et al. 2019)
    energy_margin    = mean_I CE(f_i, y_i) + λ · relu(mean_I E(f_i) − mean_O E(f_o) + margin)

These are the papers' forms with **separate** means, unlike OutlierExposureLoss's single mean over a
mixed batch (LOSS_CONTRACT §3.3). An empty group's mean is an attached 0 (device-side counts clamped to
1, no host read). Logits are (B, C) or (B, C, *S) (segmentation: every pixel is an entry); the two
batches need the same C but not the same size. The result is 0-d in the promoted dtype of the two
logits tensors, computed in float32 (float64 for float64).

The per-row terms come from :func:`~oodkernels.reference.logits.ce_and_energy`; the fused forms in
:mod:`oodkernels.ops` swap in the kernel for that function and keep everything else.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import ShapeError
from ._common import check_floating
from ._common import check_logits_and_targets
from ._common import check_same_device
from ._common import masked_sum
from ._common import result_dtypes
from ._distributed import GlobalCounts
from ._distributed import GlobalMeans
from .logits import ce_and_energy

__all__ = ["outlier_exposure", "energy_margin"]


def check_paired(logits_in: Tensor, targets_in: Tensor, logits_out: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """The always-on checks of a paired call; ``(output dtype, compute dtype)``."""
    check_logits_and_targets(logits_in, targets_in, ranks=None, logits_name="logits_in", targets_name="targets_in")
    check_floating("logits_out", logits_out)
    if logits_out.dim() < 2 or logits_out.shape[1] != logits_in.shape[1]:
        raise ShapeError(
            f"logits_out: expected shape (B_out, {logits_in.shape[1]}, ...) with the classes of logits_in "
            f"{tuple(logits_in.shape)} on dim 1, got {tuple(logits_out.shape)}"
        )
    if logits_out.dim() > 4 or logits_in.dim() > 4:
        raise ShapeError(
            f"logits_in, logits_out: expected (B, C) or (B, C, H, W), got {tuple(logits_in.shape)} and "
            f"{tuple(logits_out.shape)}"
        )
    check_same_device(logits_in=logits_in, targets_in=targets_in, logits_out=logits_out)
    return result_dtypes(logits_in, logits_out)


def _out_labels(logits_out: Tensor) -> Tensor:
    """``−1`` for every entry of the out-batch, as a stride-0 view (no allocation of its size)."""
    shape = (logits_out.shape[0], *logits_out.shape[2:])
    return torch.full((1,) * len(shape), -1, dtype=torch.long, device=logits_out.device).expand(shape)


def _paired_terms(logits_in, targets_in, logits_out, uniform_out: bool, row_fn):
    """The per-entry terms of a paired call, in the compute dtype, and the two counts ``(N_ID, B_out)``."""
    out, acc = check_paired(logits_in, targets_in, logits_out)
    row_fn = ce_and_energy if row_fn is None else row_fn
    is_id = targets_in.reshape(-1) >= 0
    ce_in, energy_in = row_fn(logits_in, targets_in)
    values_out, energy_out = row_fn(logits_out, _out_labels(logits_out), None, uniform_out)
    every_out = torch.ones(values_out.shape, dtype=torch.bool, device=values_out.device)
    counts = [is_id.sum(), every_out.sum()]
    return (
        out,
        masked_sum(ce_in.to(acc), is_id),
        is_id,
        energy_in.to(acc),
        values_out.to(acc),
        energy_out.to(acc),
        counts,
    )


def _outlier_exposure(logits_in, targets_in, logits_out, lambda_oe, row_fn=None, process_group=None) -> Tensor:
    out, sum_ce, _, _, uniform_out, _, counts = _paired_terms(logits_in, targets_in, logits_out, True, row_fn)
    # linear in its means: W·Σ_local/N_global with a process group
    counts = GlobalCounts(torch.stack(counts), process_group)
    return (counts.mean(sum_ce, 0) + lambda_oe * counts.mean(uniform_out.sum(), 1)).to(out)


def _energy_margin(logits_in, targets_in, logits_out, lambda_energy, margin, row_fn=None, process_group=None):
    out, sum_ce, is_id, energy_in, _, energy_out, counts = _paired_terms(
        logits_in, targets_in, logits_out, False, row_fn
    )
    # the hinge of a difference of means: with a process group, the whole batch's means (GlobalMeans)
    means = GlobalMeans([sum_ce, masked_sum(energy_in, is_id), energy_out.sum()], counts, process_group)
    ce = means.mean(0, 0, empty_is_nan=False)
    gap = means.mean(1, 0, empty_is_nan=False) - means.mean(2, 1, empty_is_nan=False) + margin
    return (ce + lambda_energy * torch.relu(gap)).to(out)


def outlier_exposure(
    logits_in: Tensor, targets_in: Tensor, logits_out: Tensor, lambda_oe: float = 0.5, *, process_group=None
) -> Tensor:
    """``mean_I CE(f_i, y_i) + λ_oe · mean_O (lse(f_o) − mean_c f_oc)`` with separate means (module docstring).

    :param logits_in: ID logits (B, C) or (B, C, H, W)
    :param targets_in: their labels (B,) or (B, H, W); negative labels are left out of the CE mean
    :param logits_out: OOD logits (B_out, C) or (B_out, C, H', W'); every entry counts
    :param lambda_oe: weight λ_oe of the OOD term
    :param process_group: optional ``torch.distributed`` group of ``W`` ranks: each mean divides by the group's
        count and is multiplied by ``W`` (README, "Distributed training")
    :return: 0-d loss
    """
    return _outlier_exposure(logits_in, targets_in, logits_out, lambda_oe, process_group=process_group)


def energy_margin(
    logits_in: Tensor,
    targets_in: Tensor,
    logits_out: Tensor,
    lambda_energy: float = 0.1,
    margin: float = 10.0,
    *,
    process_group=None,
) -> Tensor:
    """``mean_I CE(f_i, y_i) + λ · relu(mean_I E(f_i) − mean_O E(f_o) + margin)``, ``E = −lse`` (module docstring).

    :param logits_in: ID logits (B, C) or (B, C, H, W)
    :param targets_in: their labels; negative labels are left out of both ID means
    :param logits_out: OOD logits (B_out, C, ...)
    :param lambda_energy: weight λ of the margin term
    :param margin: the required gap between the mean OOD and mean ID energies
    :param process_group: optional ``torch.distributed`` group: the means are the whole group batch's, so every
        rank returns the whole-batch loss, with the gradient of its own entries times ``W`` (README,
        "Distributed training")
    :return: 0-d loss
    """
    return _energy_margin(logits_in, targets_in, logits_out, lambda_energy, margin, process_group=process_group)
