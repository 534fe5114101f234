"""Row losses over logits (LOSS_CONTRACT.md §2.5, §3.1-3.5, §3.10, and the design-note criteria of SPEC.md §2).

Every criterion here reads logits ``f`` with the classes on dim 1 and integer targets ``y`` with one label
per *entry*: a sample for ``(B, C)`` logits and ``(B,)`` targets, a pixel for ``(B, C, H, W)`` logits and
``(B, H, W)`` targets. Segmentation maps are flattened to ``(B·H·W, C)`` rows with :func:`as_rows`, so a
4-D result always equals the result on the flattened pixels; ``'none'`` outputs are reshaped back to the
targets' shape.

Notation (per entry ``i``, ``C`` classes)::

    lse(f)   = m + log Σ_c exp(f_c − m),  m = max_c f_c          (torch.logsumexp)
    CE(f, y) = lse(f) − f_y                                      (cross-entropy)
    U(f)     = lse(f) − (1/C) Σ_c f_c                            (cross-entropy to the uniform distribution)
    π(f)     = max_c softmax(f)_c = exp(max_c f_c − lse(f))      (max softmax probability)
    E(f)     = −lse(f)                                           (energy)

``y >= 0`` is ID (set I), ``y < 0`` is OOD (set O). OOD entries are masked, never removed, so group means
use a device-side count clamped to at least 1 and an empty group gives an exact, attached zero.

Dtypes (fix d): float64/float32/bfloat16/float16 logits; the math runs in float64 for float64 input and in
float32 otherwise, and the result is rounded once to the input dtype.

Data checks (§2.11, only with ``oodkernels.config.data_checks`` on, in eager mode, one read per call):
labels ``>= C`` in a cross-entropy term raise :class:`LabelOutOfRangeError` (with the checks off, such an
entry's value is NaN), plus the per-criterion warnings and errors documented below.
"""

from __future__ import annotations

from typing import Callable
from typing import Optional

import torch
from torch import Tensor
from torch import nn

from ._common import DROP_UNKNOWN_MESSAGE
from ._common import DataChecks
from ._common import LossInfo
from ._common import Paper
from ._common import Representation
from ._common import Task
from ._common import apply_reduction
from ._common import as_rows
from ._common import check_floating
from ._common import check_logits_and_targets
from ._common import check_reduction
from ._common import check_targets
from ._common import id_mask_with_warning
from ._common import masked_mean
from ._common import masked_sum
from ._common import result_dtypes
from ._common import row_cross_entropy
from ._common import row_uniform_cross_entropy
from ._common import select_id_rows

__all__ = [
    "cross_entropy",
    "CrossEntropyLoss",
    "background_class_loss",
    "BackgroundClassLoss",
    "outlier_exposure_loss",
    "OutlierExposureLoss",
    "entropic_open_set_loss",
    "EntropicOpenSetLoss",
    "energy_regularized_loss",
    "EnergyRegularizedLoss",
    "confidence_penalty_loss",
    "ConfidencePenaltyLoss",
    "margin_confidence_loss",
    "MarginConfidenceLoss",
    "logit_norm_loss",
    "LogitNorm",
]

_AGNOSTOPHOBIA = Paper(
    title="Reducing Network Agnostophobia",
    venue="NeurIPS",
    year=2018,
    url="https://proceedings.neurips.cc/paper/2018/file/48db71587df6c7c442e5b76cc723169a-Paper.pdf",
)

# reductions understood by torch.nn.functional.cross_entropy (None is not one of them)
_TORCH_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------
# private building blocks
# ----------------------------------------------------------------------------------------------


def _check_torch_reduction(reduction) -> None:
    """PyTorch's own error for a reduction its cross-entropy does not know (``None`` included)."""
    if not (isinstance(reduction, str) and reduction in _TORCH_REDUCTIONS):
        raise ValueError(f"{reduction} is not a valid value for reduction")


def _rows(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
    """Flattened rows upcast to the compute dtype, flat targets, and the output dtype."""
    out, acc = result_dtypes(logits)
    rows, flat = as_rows(logits, targets)
    return rows.to(acc), flat, out


def _per_entry(values: Tensor, targets: Tensor, out: torch.dtype) -> Tensor:
    """A per-row result in the targets' shape and the output dtype."""
    return values.reshape(targets.shape).to(out)


def _split_reduction(id_values: Tensor, ood_values: Tensor, is_id: Tensor, targets: Tensor, reduction, out):
    """Reductions of the criteria whose 'mean' is a sum of separate group means (§3.5 convention).

    ``'mean'`` = mean_I(id_values) + mean_O(ood_values) (an empty group gives an attached 0),
    ``'sum'`` = Σ_I id_values + Σ_O ood_values, ``'none'``/``None`` = the per-entry mix in the targets' shape.
    """
    is_ood = ~is_id
    if reduction == "mean":
        return (masked_mean(id_values, is_id) + masked_mean(ood_values, is_ood)).to(out)
    per_entry = torch.where(is_id, id_values, ood_values)
    if reduction == "sum":
        return per_entry.sum().to(out)
    return _per_entry(per_entry, targets, out)


# ----------------------------------------------------------------------------------------------
# cross-entropy over the ID entries (§2.5, §3.2)
# ----------------------------------------------------------------------------------------------


def _masked_cross_entropy(logits: Tensor, targets: Tensor, reduction, checks: DataChecks) -> Tensor:
    rows, flat, out = _rows(logits, targets)
    checks.check_labels_below(flat, rows.shape[1])
    ce, _ = row_cross_entropy(rows, flat)
    is_id = flat >= 0
    if reduction == "mean":
        return masked_mean(ce, is_id).to(out)
    if reduction == "sum":
        return masked_sum(ce, is_id).to(out)
    zero = torch.zeros((), dtype=ce.dtype, device=ce.device)
    return _per_entry(torch.where(is_id, ce, zero), targets, out)


def cross_entropy(logits: Tensor, targets: Tensor, reduction: Optional[str] = "mean") -> Tensor:
    """Cross-entropy over the ID entries; OOD entries (``y < 0``) contribute nothing (LOSS_CONTRACT.md §2.5).

    Per entry ``ℓ_i = CE(f_i, y_i) = lse(f_i) − f_{i, y_i}`` for ``y_i >= 0`` and ``ℓ_i = 0`` for ``y_i < 0``.

    * ``'mean'``: ``Σ_I ℓ_i / N_ID``; an attached zero when ``N_ID = 0`` (empty batch included);
    * ``'sum'``: ``Σ_I ℓ_i``;
    * ``'none'`` / ``None``: ``ℓ`` in the targets' shape, exact zeros at OOD entries;
    * anything else: PyTorch's ``ValueError("<reduction> is not a valid value for reduction")``.

    Never warns. With data checks on, a label ``>= C`` raises :class:`LabelOutOfRangeError`.

    :param logits: ``(B, C, *S)`` with the classes on dim 1, e.g. ``(B, C)``, ``(B, C, H, W)``, ``(B, C, L)``
    :param targets: ``(B, *S)`` integer labels
    :return: 0-d for ``'mean'``/``'sum'``, else ``(B, *S)``; in the dtype of ``logits``
    """
    check_logits_and_targets(logits, targets, ranks=None)
    reduction = "none" if reduction is None else reduction
    _check_torch_reduction(reduction)
    checks = DataChecks(logits, targets)
    loss = _masked_cross_entropy(logits, targets, reduction, checks)
    checks.flush()
    return loss


class CrossEntropyLoss(nn.Module):
    """Cross-entropy that ignores OOD entries (LOSS_CONTRACT.md §3.2), as :func:`cross_entropy`.

    ``'mean'`` averages over the ID entries (samples or pixels) only; it is an attached 0 when there are
    none, including the empty batch. ``'sum'`` of an all-OOD batch is 0 and ``'none'`` zero-fills OOD entries.

    With data checks on, any target ``< 0`` emits the ``UserWarning``
    "Discarding samples with targets < 0 (OOD), which this loss does not use." (segmentation included), and
    a label ``>= C`` raises :class:`LabelOutOfRangeError`.

    Shapes: ``(B, C)``/``(B,)``, ``(B, C, H, W)``/``(B, H, W)`` and ``(B, C, L)``/``(B, L)``.
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION, Task.SEGMENTATION},
        inputs={Representation.LOGITS},
        supervised=False,
    )

    def __init__(self, reduction: Optional[str] = "mean"):
        """
        :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None`` (same as ``'none'``)
        """
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """
        :param logits: ``(B, C, *S)``
        :param targets: ``(B, *S)``; entries ``< 0`` are ignored (with a warning)
        :return: the loss, see :func:`cross_entropy`
        """
        check_logits_and_targets(logits, targets, ranks=None)
        reduction = "none" if self.reduction is None else self.reduction
        _check_torch_reduction(reduction)
        checks = DataChecks(logits, targets)
        checks.warn_if((targets < 0).any(), DROP_UNKNOWN_MESSAGE)
        loss = _masked_cross_entropy(logits, targets, reduction, checks)
        checks.flush()
        return loss


# ----------------------------------------------------------------------------------------------
# background class (§3.1)
# ----------------------------------------------------------------------------------------------


def _label_too_large() -> Callable[[float], None]:
    """The data-check action of §3.1: the reference's message, with the max label printed as a tensor."""

    def action(top: float) -> None:
        if top >= 0:  # encoded below as -1 when no label reaches n_classes
            # the reference formats a 0-d tensor, which prints as its bare number
            raise ValueError(f"Target label to large: {int(top)}")

    return action


def background_class_loss(logits: Tensor, targets: Tensor, n_classes: int, reduction: str = "mean") -> Tensor:
    """Cross-entropy with OOD entries mapped to an extra background class (LOSS_CONTRACT.md §3.1).

    With ``N = n_classes`` and the background class in the last column ``N``::

        ỹ_i = y_i if y_i >= 0 else N,        ℓ_i = CE(f_i, ỹ_i) = lse(f_i) − f_{i, ỹ_i}

    The caller's ``targets`` are not modified. Reductions follow ``torch.nn.functional.cross_entropy``:

    * ``'mean'``: mean of ``ℓ`` over **all** entries (ID and OOD); NaN for an empty batch;
    * ``'sum'``: ``Σ_i ℓ_i``;
    * ``'none'``: ``ℓ`` in the targets' shape;
    * ``None`` or anything else: ``ValueError("<reduction> is not a valid value for reduction")``.

    Data checks (§2.11): a label ``>= N`` raises ``ValueError("Target label to large: <max label>")`` (the
    reference's message, typo kept, e.g. ``tensor(255)``), and OOD entries with only ``N`` logit columns
    raise :class:`LabelOutOfRangeError` (an ``IndexError``). With the checks off, an entry whose (remapped)
    label has no logit column gives NaN.

    :param logits: ``(B, N + 1)`` or ``(B, N + 1, *S)`` (classes on dim 1), or an unbatched ``(N + 1,)``
    :param targets: ``(B,)`` or ``(B, *S)`` (``()`` for unbatched logits)
    :param n_classes: number of ID classes ``N``
    :return: 0-d for ``'mean'``/``'sum'``, else the targets' shape; in the dtype of ``logits``
    """
    if isinstance(logits, Tensor) and logits.dim() == 1 and isinstance(targets, Tensor) and targets.dim() == 0:
        # unbatched input, as torch's cross-entropy accepts it
        loss = background_class_loss(logits.unsqueeze(0), targets.unsqueeze(0), n_classes, reduction)
        return loss.reshape(()) if reduction == "none" else loss
    check_logits_and_targets(logits, targets, ranks=None)
    _check_torch_reduction(reduction)
    checks = DataChecks(logits, targets)
    if checks.active and targets.numel():
        # the max label when one is too large, else -1 (no action)
        top = targets.max()
        checks.add(torch.where(top >= n_classes, top, torch.full_like(top, -1)), _label_too_large())

    rows, flat, out = _rows(logits, targets)
    remapped = torch.where(flat < 0, torch.full_like(flat, n_classes), flat)
    checks.check_labels_below(remapped, rows.shape[1], name="targets (OOD entries mapped to the background class)")
    ce, _ = row_cross_entropy(rows, remapped)
    if reduction == "none":
        loss = _per_entry(ce, targets, out)
    else:
        loss = apply_reduction(ce, reduction).to(out)
    checks.flush()
    return loss


class BackgroundClassLoss(nn.Module):
    """Background-class cross-entropy (LOSS_CONTRACT.md §3.1), as :func:`background_class_loss`.

    The network has ``N + 1`` outputs; OOD entries (``y < 0``) are trained towards the last one.
    ``reduction=None`` raises ``ValueError("None is not a valid value for reduction")``.
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION, Task.SEGMENTATION},
        inputs={Representation.LOGITS},
        supervised=True,
        paper=_AGNOSTOPHOBIA,
    )

    def __init__(self, n_classes: int, reduction: str = "mean"):
        """
        :param n_classes: number of ID classes ``N`` (the background class is not counted)
        :param reduction: ``'mean'``, ``'sum'`` or ``'none'``
        """
        super().__init__()
        self.num_classes = n_classes
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """
        :param logits: ``(B, N + 1)`` or ``(B, N + 1, H, W)``
        :param targets: ``(B,)`` or ``(B, H, W)``; labels ``< 0`` go to the background class ``N``
        :return: the loss, see :func:`background_class_loss`
        """
        return background_class_loss(logits, targets, self.num_classes, self.reduction)


# ----------------------------------------------------------------------------------------------
# outlier exposure and entropic open-set (§3.3, §3.4)
# ----------------------------------------------------------------------------------------------


def _ce_or_uniform(logits: Tensor, targets: Tensor, alpha: float, reduction) -> Tensor:
    """``CE(f_i, y_i)`` if ID, ``alpha·U(f_i)`` if OOD, then apply_reduction over all entries."""
    check_logits_and_targets(logits, targets, ranks=(2, 4), targets_name="target")
    check_reduction(reduction)
    checks = DataChecks(logits, targets)
    rows, flat, out = _rows(logits, targets)
    checks.check_labels_below(flat, rows.shape[1], name="target")
    ce, lse = row_cross_entropy(rows, flat)
    uniform = row_uniform_cross_entropy(rows, lse)
    per_entry = torch.where(flat >= 0, ce, alpha * uniform)
    if reduction is None or reduction == "none":
        loss = _per_entry(per_entry, targets, out)
    else:
        loss = apply_reduction(per_entry, reduction).to(out)
    checks.flush()
    return loss


def outlier_exposure_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.5, reduction: Optional[str] = "mean"
) -> Tensor:
    """Outlier Exposure loss as pytorch-ood implements it (LOSS_CONTRACT.md §3.3).

    Per entry::

        ℓ_i = CE(f_i, y_i)                          if y_i >= 0
        ℓ_i = α·U(f_i) = α·(lse(f_i) − mean_c f_ic)   if y_i < 0

    * ``'mean'``: **one** mean over all entries, ``(Σ_I CE + α·Σ_O U) / (N_ID + N_OOD)`` (the paper uses two
      separate means; the reference's convention is kept). NaN for an empty batch;
    * ``'sum'``: ``Σ_i ℓ_i``; ``'none'``/``None``: ``ℓ`` in the targets' shape;
    * anything else: bare ``ValueError``.

    With ``alpha = 1`` this equals :func:`entropic_open_set_loss` in every reduction.

    :param logits: ``(B, C)`` or ``(B, C, H, W)``; other ranks raise ``ValueError("Unsupported input shape: ...")``
    :param targets: ``(B,)`` or ``(B, H, W)``; labels ``< 0`` are OOD
    :return: 0-d for ``'mean'``/``'sum'``, else the targets' shape; in the dtype of ``logits``
    """
    return _ce_or_uniform(logits, targets, alpha, reduction)


class OutlierExposureLoss(nn.Module):
    """Outlier Exposure (Hendrycks et al., ICLR 2019), see :func:`outlier_exposure_loss` (§3.3)."""

    info = LossInfo(
        tasks={Task.CLASSIFICATION, Task.SEGMENTATION},
        inputs={Representation.LOGITS},
        supervised=True,
        paper=Paper(
            title="Deep Anomaly Detection with Outlier Exposure",
            venue="ICLR",
            year=2019,
            url="https://arxiv.org/abs/1812.04606",
        ),
    )

    def __init__(self, alpha: float = 0.5, reduction: Optional[str] = "mean"):
        """
        :param alpha: weight ``α`` of the OOD term
        :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None``
        """
        super().__init__()
        self.alpha = alpha
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """
        :param logits: ``(B, C)`` or ``(B, C, H, W)``
        :param target: ``(B,)`` or ``(B, H, W)``; labels ``< 0`` are OOD
        :return: the loss, see :func:`outlier_exposure_loss`
        """
        return _ce_or_uniform(logits, target, self.alpha, self.reduction)


def entropic_open_set_loss(logits: Tensor, targets: Tensor, reduction: Optional[str] = "mean") -> Tensor:
    """Entropic open-set loss (LOSS_CONTRACT.md §3.4).

    Per entry::

        ℓ_i = CE(f_i, y_i)                                         if y_i >= 0
        ℓ_i = U(f_i) = −(1/C) Σ_c log softmax(f_i)_c                if y_i < 0

    ``'mean'`` over all entries (NaN for an empty batch), ``'sum'``, ``'none'``/``None`` per entry in the
    targets' shape; anything else raises a bare ``ValueError``.

    Pinned (float64): logits ``[[2, 0, 0], [1, 0, −1]]``, ``y = [0, −1]`` give 0.8235753653.

    :param logits: ``(B, C)`` or ``(B, C, H, W)``; other ranks raise ``ValueError("Unsupported input shape: ...")``
    :param targets: ``(B,)`` or ``(B, H, W)``
    :return: 0-d for ``'mean'``/``'sum'``, else the targets' shape; in the dtype of ``logits``
    """
    return _ce_or_uniform(logits, targets, 1.0, reduction)


class EntropicOpenSetLoss(nn.Module):
    """Entropic open-set loss (Dhamija et al., NeurIPS 2018), see :func:`entropic_open_set_loss` (§3.4)."""

    info = LossInfo(
        tasks={Task.CLASSIFICATION, Task.SEGMENTATION},
        inputs={Representation.LOGITS},
        supervised=True,
        paper=_AGNOSTOPHOBIA,
    )

    def __init__(self, reduction: Optional[str] = "mean"):
        """
        :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None``
        """
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """
        :param logits: ``(B, C)`` or ``(B, C, H, W)``
        :param target: ``(B,)`` or ``(B, H, W)``; labels ``< 0`` are OOD
        :return: the loss, see :func:`entropic_open_set_loss`
        """
        return _ce_or_uniform(logits, target, 1.0, self.reduction)


# ----------------------------------------------------------------------------------------------
# separate-group-mean criteria: energy regularisation (§3.5) and the design-note criteria
# ----------------------------------------------------------------------------------------------


def _group_terms(logits: Tensor, targets: Tensor, reduction, name: str = "targets"):
    """Shared prologue: checks, rows, per-row CE and lse, and the ID mask."""
    check_logits_and_targets(logits, targets, ranks=(2, 4), targets_name=name)
    check_reduction(reduction)
    checks = DataChecks(logits, targets)
    rows, flat, out = _rows(logits, targets)
    checks.check_labels_below(flat, rows.shape[1], name=name)
    ce, lse = row_cross_entropy(rows, flat)
    return checks, rows, flat, out, ce, lse, flat >= 0


def energy_regularized_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.1,
    margin_in: float = -25.0,
    margin_out: float = -7.0,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy plus the energy-margin regulariser of Liu et al. 2020 (LOSS_CONTRACT.md §3.5).

    With ``E_i = −lse(f_i)``::

        nll_i = CE(f_i, y_i) if y_i >= 0 else 0
        h_i   = relu(E_i − margin_in)²  if y_i >= 0
        h_i   = relu(margin_out − E_i)² if y_i < 0

    * ``'mean'``: ``mean_I(nll) + α·(mean_I(h) + mean_O(h))`` with **separate** group means (an empty group
      contributes an attached 0; all-OOD gives ``α·mean_O(h)``, the empty batch 0). This is not the mean of
      ``'none'``;
    * ``'none'``/``None``: ``nll_i + α·h_i`` in the targets' shape; ``'sum'``: their sum;
    * anything else: bare ``ValueError``.

    Pinned: defaults, logits ``zeros(2, 2)``, ``y = [0, −1]``: 'mean' 59.7754566, 'none' ``[59.7754566, 0]``.

    :param logits: ``(B, C)`` or ``(B, C, H, W)``; other ranks raise ``ValueError("Unsupported input shape: ...")``
    :param targets: ``(B,)`` or ``(B, H, W)``
    :return: 0-d for ``'mean'``/``'sum'``, else the targets' shape; in the dtype of ``logits``
    """
    checks, _, _, out, ce, lse, is_id = _group_terms(logits, targets, reduction)
    energy = -lse
    hinge = torch.where(is_id, (energy - margin_in).relu().pow(2), (margin_out - energy).relu().pow(2))
    if reduction == "mean":
        loss = (masked_mean(ce, is_id) + alpha * (masked_mean(hinge, is_id) + masked_mean(hinge, ~is_id))).to(out)
    else:
        zero = torch.zeros((), dtype=ce.dtype, device=ce.device)
        per_entry = torch.where(is_id, ce, zero) + alpha * hinge
        loss = per_entry.sum().to(out) if reduction == "sum" else _per_entry(per_entry, targets, out)
    checks.flush()
    return loss


class EnergyRegularizedLoss(nn.Module):
    """Energy-regularised cross-entropy (Liu et al., NeurIPS 2020), see :func:`energy_regularized_loss`.

    The defaults are the paper's CIFAR values.
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION, Task.SEGMENTATION},
        inputs={Representation.LOGITS},
        supervised=True,
        paper=Paper(
            title="Energy-based Out-of-distribution Detection",
            venue="NeurIPS",
            year=2020,
            url="https://proceedings.neurips.cc/paper/2020/file/f5496252609c43eb8a3d147ab9b9c006-Paper.pdf",
        ),
    )

    def __init__(
        self,
        alpha: float = 0.1,
        margin_in: float = -25.0,
        margin_out: float = -7.0,
        reduction: str = "mean",
    ):
        """
        :param alpha: weight ``α`` of the regulariser
        :param margin_in: energy margin ``m_in`` of ID entries
        :param margin_out: energy margin ``m_out`` of OOD entries
        :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None``
        """
        super().__init__()
        self.m_in = margin_in
        self.m_out = margin_out
        self.alpha = alpha
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """
        :param logits: ``(B, C)`` or ``(B, C, H, W)``
        :param targets: ``(B,)`` or ``(B, H, W)``; labels ``< 0`` are OOD
        :return: the loss, see :func:`energy_regularized_loss`
        """
        return energy_regularized_loss(logits, targets, self.alpha, self.m_in, self.m_out, self.reduction)


def _max_softmax(rows: Tensor, lse: Tensor) -> Tensor:
    """``π_i = max_c softmax(f_i)_c = exp(max_c f_ic − lse(f_i))``."""
    return torch.exp(rows.amax(dim=1) - lse)


def confidence_penalty_loss(
    logits: Tensor, targets: Tensor, lambda_ood: float = 0.1, reduction: Optional[str] = "mean"
) -> Tensor:
    """Cross-entropy on ID entries plus a penalty on the confidence of OOD entries (design notes, SPEC §2).

    With ``π_i = max_c softmax(f_i)_c`` (the maximum softmax probability, in ``[1/C, 1]``)::

        ℓ_i = CE(f_i, y_i)    if y_i >= 0
        ℓ_i = λ·π_i           if y_i < 0            (λ = lambda_ood)

    Reductions, with the conventions of :func:`energy_regularized_loss`:

    * ``'mean'``: ``mean_I CE + λ·mean_O π`` (separate group means; an empty group contributes an exact,
      attached 0, so an all-OOD batch gives ``λ·mean_O π`` and the empty batch 0);
    * ``'sum'``: ``Σ_I CE + λ·Σ_O π``;
    * ``'none'``/``None``: ``ℓ`` in the targets' shape;
    * anything else: bare ``ValueError``.

    The gradient of ``π`` is ``π·(e_k − softmax(f))`` with ``k`` the argmax (shared equally among ties).
    With data checks on, a label ``>= C`` raises :class:`LabelOutOfRangeError`; nothing warns.

    :param logits: ``(B, C)`` or ``(B, C, H, W)``; other ranks raise ``ValueError("Unsupported input shape: ...")``
    :param targets: ``(B,)`` or ``(B, H, W)`` integer labels; ``< 0`` marks OOD
    :param lambda_ood: weight ``λ`` of the OOD confidence term
    :return: 0-d for ``'mean'``/``'sum'``, else the targets' shape; in the dtype of ``logits``
    """
    checks, rows, _, out, ce, lse, is_id = _group_terms(logits, targets, reduction)
    penalty = lambda_ood * _max_softmax(rows, lse)
    loss = _split_reduction(ce, penalty, is_id, targets, reduction, out)
    checks.flush()
    return loss


class ConfidencePenaltyLoss(nn.Module):
    """Cross-entropy over ID plus ``lambda_ood`` times the max softmax probability of OOD entries.

    See :func:`confidence_penalty_loss` for the math, shapes and reductions. Classification ``(B, C)`` and
    segmentation ``(B, C, H, W)``; supervised (uses example outliers, ``targets < 0``).
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION, Task.SEGMENTATION},
        inputs={Representation.LOGITS},
        supervised=True,
    )

    def __init__(self, lambda_ood: float = 0.1, reduction: Optional[str] = "mean"):
        """
        :param lambda_ood: weight ``λ`` of the OOD confidence penalty
        :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None``
        """
        super().__init__()
        self.lambda_ood = lambda_ood
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """
        :param logits: ``(B, C)`` or ``(B, C, H, W)``
        :param targets: ``(B,)`` or ``(B, H, W)``; labels ``< 0`` are OOD
        :return: the loss, see :func:`confidence_penalty_loss`
        """
        return confidence_penalty_loss(logits, targets, self.lambda_ood, self.reduction)


def margin_confidence_loss(
    logits: Tensor, targets: Tensor, margin: float = 0.5, reduction: Optional[str] = "mean"
) -> Tensor:
    """Cross-entropy on ID entries plus a hinge on the confidence of OOD entries (design notes, SPEC §2).

    With ``π_i = max_c softmax(f_i)_c`` and ``m = margin``::

        ℓ_i = CE(f_i, y_i)      if y_i >= 0
        ℓ_i = relu(π_i − m)     if y_i < 0

    OOD entries are only penalised while their confidence exceeds the margin (zero gradient below it).
    Reductions as :func:`confidence_penalty_loss`:

    * ``'mean'``: ``mean_I CE + mean_O relu(π − m)`` (separate group means, an empty group gives an attached 0);
    * ``'sum'``: ``Σ_I CE + Σ_O relu(π − m)``;
    * ``'none'``/``None``: ``ℓ`` in the targets' shape;
    * anything else: bare ``ValueError``.

    :param logits: ``(B, C)`` or ``(B, C, H, W)``; other ranks raise ``ValueError("Unsupported input shape: ...")``
    :param targets: ``(B,)`` or ``(B, H, W)`` integer labels; ``< 0`` marks OOD
    :param margin: confidence ``m`` below which OOD entries cost nothing
    :return: 0-d for ``'mean'``/``'sum'``, else the targets' shape; in the dtype of ``logits``
    """
    checks, rows, _, out, ce, lse, is_id = _group_terms(logits, targets, reduction)
    hinge = (_max_softmax(rows, lse) - margin).relu()
    loss = _split_reduction(ce, hinge, is_id, targets, reduction, out)
    checks.flush()
    return loss


class MarginConfidenceLoss(nn.Module):
    """Cross-entropy over ID plus ``relu(max softmax − margin)`` over OOD entries.

    See :func:`margin_confidence_loss` for the math, shapes and reductions. Classification ``(B, C)`` and
    segmentation ``(B, C, H, W)``; supervised (uses example outliers, ``targets < 0``).
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION, Task.SEGMENTATION},
        inputs={Representation.LOGITS},
        supervised=True,
    )

    def __init__(self, margin: float = 0.5, reduction: Optional[str] = "mean"):
        """
        :param margin: confidence margin ``m``
        :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None``
        """
        super().__init__()
        self.margin = margin
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """
        :param logits: ``(B, C)`` or ``(B, C, H, W)``
        :param targets: ``(B,)`` or ``(B, H, W)``; labels ``< 0`` are OOD
        :return: the loss, see :func:`margin_confidence_loss`
        """
        return margin_confidence_loss(logits, targets, self.margin, self.reduction)


# ----------------------------------------------------------------------------------------------
# LogitNorm (§3.10)
# ----------------------------------------------------------------------------------------------


def logit_norm_loss(logits: Tensor, target: Tensor, t: float = 1.0, reduction: str = "mean") -> Tensor:
    """Cross-entropy of L2-normalised, temperature-scaled logits (Wei et al., ICML 2022; LOSS_CONTRACT.md §3.10).

    OOD rows (``y < 0``) are discarded, with the ``UserWarning`` "Discarding samples with targets < 0 (OOD),
    which this loss does not use." (a data check). For every ID row::

        ℓ_i = CE(f_i / (t·(‖f_i‖₂ + 1e-7)), y_i)

    Reductions follow PyTorch over the ID rows:

    * ``'mean'``: ``mean_I ℓ``; an attached 0 when ``N_ID = 0``;
    * ``'sum'``: ``Σ_I ℓ`` (0 when ``N_ID = 0``);
    * ``'none'``: the ``N_ID`` values of the ID rows, in order (length ``N_ID``: this reads ``N_ID`` from the
      device once, the one allowed host read);
    * ``None`` or anything else: ``ValueError("<reduction> is not a valid value for reduction")``.

    :param logits: ``(B, C)`` only
    :param target: ``(B,)``; other shapes raise ``ValueError("Expected targets of shape B, got <shape>")``
    :param t: temperature ``t``
    :return: 0-d for ``'mean'``/``'sum'``, ``(N_ID,)`` for ``'none'``; in the dtype of ``logits``
    """
    check_floating("logits", logits)
    check_targets("target", target)
    if target.dim() != 1:
        raise ValueError(f"Expected targets of shape B, got {tuple(target.shape)}")
    check_logits_and_targets(logits, target, ranks=(2,), targets_name="target")
    _check_torch_reduction(reduction)
    checks = DataChecks(logits, target)
    is_id = id_mask_with_warning(target, checks)
    checks.check_labels_below(target, logits.shape[1], name="target")
    out, acc = result_dtypes(logits)
    rows = logits.to(acc)
    norm = torch.linalg.vector_norm(rows, ord=2, dim=1, keepdim=True) + 1e-7
    ce, _ = row_cross_entropy(rows / (t * norm), target)
    if reduction == "mean":
        loss = masked_mean(ce, is_id).to(out)
    elif reduction == "sum":
        loss = masked_sum(ce, is_id).to(out)
    else:
        loss = None
    checks.flush()
    if loss is None:
        loss = select_id_rows(ce, is_id).to(out)
    return loss


class LogitNorm(nn.Module):
    """LogitNorm (Wei et al., ICML 2022), see :func:`logit_norm_loss` (LOSS_CONTRACT.md §3.10).

    Classification only; OOD rows are discarded with a warning. ``reduction=None`` raises ``ValueError``.
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION},
        inputs={Representation.LOGITS},
        supervised=False,
        paper=Paper(
            title="Mitigating Neural Network Overconfidence with Logit Normalization",
            venue="ICML",
            year=2022,
            url="https://arxiv.org/abs/2205.09310",
        ),
    )

    def __init__(self, t=1.0, reduction="mean"):
        """
        :param t: temperature ``t``
        :param reduction: ``'mean'``, ``'sum'`` or ``'none'``
        """
        super().__init__()
        self.t = t
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """
        :param logits: ``(B, C)``
        :param target: ``(B,)``; labels ``< 0`` are discarded (with a warning)
        :return: the loss, see :func:`logit_norm_loss`
        """
        return logit_norm_loss(logits, target, self.t, self.reduction)
