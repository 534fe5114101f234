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

Options of every criterion here (keyword-only; ``None``, the default, is the plain criterion):

* ``weight``: a floating tensor broadcastable to the targets' shape (per-sample or per-pixel weights, e.g.
  region weighting). Entry ``i``'s term ``ℓ_i`` becomes ``w_i·ℓ_i`` before the reduction; the reduction and
  its normalisers (counts) are unchanged, so ``weight = 1`` gives exactly the plain value. ``weight`` does
  not change the output dtype and is differentiable (``∂/∂w_i = ℓ_i`` times the reduction's factor).
* ``cost_matrix``: a ``(C, C)`` floating tensor. The cross-entropy term of each ID entry (and only that
  term) is scaled by ``ω_i = cost[y_i, argmax_c f_ic]`` (first index on ties); ``ω`` is not differentiated.
* ``ignore_index``: an int; entries with ``y == ignore_index`` contribute neither loss nor gradient, are left
  out of every count and normaliser and of every data check (``'none'`` gives 0 there). It takes precedence
  over the OOD convention: ``ignore_index=-1`` makes ``-1`` entries ignored rather than OOD.

Structure: each functional form is ``setup = prepare_rows(kind, ...)`` (checks, masks, weights),
``values = <per-row math>`` and ``reduce_rows(kind, values, setup, reduction)``, then
``setup.checks.flush()``. The fused kernels reuse :func:`prepare_rows` and :func:`reduce_rows` and replace
only the per-row math.

Dtypes (fix d): float64/float32/bfloat16/float16 logits; the math runs in float64 for float64 input and in
float32 otherwise, and the result is rounded once to the input dtype.

Data checks (§2.11, only with ``oodkernels.config.data_checks`` on, in eager mode, one read per call):
labels ``>= C`` in a cross-entropy term raise :class:`LabelOutOfRangeError` (with the checks off, such an
entry's value is NaN), plus the per-criterion warnings and errors documented below.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch import nn

from ._common import DROP_UNKNOWN_MESSAGE
from ._common import DataChecks
from ._common import LossInfo
from ._common import Paper
from ._common import Representation
from ._common import ShapeError
from ._common import Task
from ._common import as_rows
from ._common import check_floating
from ._common import masked_sum
from ._common import result_dtypes
from ._common import row_cross_entropy
from ._common import row_uniform_cross_entropy
from ._common import select_id_rows
from ._common import weighted_energy_of
from ._distributed import GlobalCounts
from ._distributed import check_process_group
from ._row_checks import BACKGROUND_LABEL_NAME
from ._row_checks import GROUP_MEAN_KINDS
from ._row_checks import ID_ONLY_KINDS
from ._row_checks import KINDS  # noqa: F401  (re-exported: the kinds prepare_rows and reduce_rows know)
from ._row_checks import check_ignore_index
from ._row_checks import check_kind
from ._row_checks import check_reduction_of
from ._row_checks import check_row_call
from ._row_checks import flat_weight
from ._row_checks import label_too_large

__all__ = [
    "ce_and_energy",
    "RowSetup",
    "prepare_rows",
    "reduce_rows",
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


# ----------------------------------------------------------------------------------------------
# the shared prologue and epilogue of every row criterion (reused by the fused kernels)
# ----------------------------------------------------------------------------------------------


class RowSetup:
    """Everything a row criterion needs besides the per-row math, from :func:`prepare_rows`.

    ``R`` is the number of entries, ``targets.numel()``; row ``r`` is entry ``r`` of ``targets.reshape(-1)``
    (batch-major, then spatial), which is the row order of :func:`as_rows`.

    :ivar out: output dtype (the dtype of ``logits``; ``weight`` and ``cost_matrix`` never change it)
    :ivar acc: compute dtype (float64 for float64 logits, else float32)
    :ivar targets: ``(R,)`` int64 labels after any remapping (background: OOD entries -> ``n_classes``);
        ignored entries keep their label (``ignore_index``)
    :ivar valid: ``(R,)`` bool, False at ignored entries
    :ivar all_valid: True when no entry can be ignored (``ignore_index`` is None): ``valid`` is all True
    :ivar is_id: ``(R,)`` bool, ``valid & targets >= 0`` (after the remap: every valid background entry)
    :ivar is_ood: ``(R,)`` bool, ``valid & targets < 0``
    :ivar weight: ``(R,)`` per-entry weights in ``acc`` (differentiable), or None
    :ivar cost: ``(C, C)`` confusion costs in ``acc``, detached, or None
    :ivar shape: the targets' original shape (of ``'none'`` outputs)
    :ivar checks: the queued data checks; the caller flushes them once, after :func:`reduce_rows`
    :ivar ignore_index: the ignored label, or None

    The masks are computed on first use and kept: a fused criterion whose reduction needs none of them
    (outlier exposure's ``'mean'`` without ``ignore_index``) never builds them.
    """

    def __init__(
        self,
        *,
        out: torch.dtype,
        acc: torch.dtype,
        targets: Tensor,
        weight: Optional[Tensor],
        cost: Optional[Tensor],
        shape: torch.Size,
        checks: DataChecks,
        ignore_index: Optional[int] = None,
        valid: Optional[Tensor] = None,
    ):
        self.out = out
        self.acc = acc
        self.targets = targets
        self.weight = weight
        self.cost = cost
        self.shape = shape
        self.checks = checks
        self.ignore_index = ignore_index
        self.all_valid = ignore_index is None
        self._valid = valid
        self._is_id: Optional[Tensor] = None
        self._is_ood: Optional[Tensor] = None

    @property
    def valid(self) -> Tensor:
        if self._valid is None:
            if self.all_valid:
                self._valid = torch.ones(self.targets.shape, dtype=torch.bool, device=self.targets.device)
            else:
                self._valid = self.targets != self.ignore_index
        return self._valid

    @property
    def is_id(self) -> Tensor:
        if self._is_id is None:
            self._is_id = self.targets >= 0 if self.all_valid else self.valid & (self.targets >= 0)
        return self._is_id

    @property
    def is_ood(self) -> Tensor:
        if self._is_ood is None:
            self._is_ood = self.targets < 0 if self.all_valid else self.valid & (self.targets < 0)
        return self._is_ood


def prepare_rows(
    kind: str,
    logits: Tensor,
    targets: Tensor,
    *,
    reduction,
    weight: Optional[Tensor] = None,
    cost_matrix: Optional[Tensor] = None,
    ignore_index: Optional[int] = None,
    n_classes: Optional[int] = None,
    targets_name: str = "targets",
    warn_ood: Optional[bool] = None,
) -> RowSetup:
    """Checks, masks and per-entry weights of one call of row criterion ``kind`` (the shared prologue).

    Runs the always-on metadata checks (rank, shapes, dtypes, devices, reduction, ``weight``, ``cost_matrix``,
    ``ignore_index``), raising at once, and queues the data checks (warnings, label errors) on
    ``RowSetup.checks`` without reading them: the caller flushes once, after :func:`reduce_rows`.
    ``logits`` are only inspected, never flattened or copied.

    :param kind: one of :data:`KINDS`
    :param logits: ``(B, C, *S)``, classes on dim 1
    :param targets: ``(B, *S)`` integer labels (``< 0`` OOD)
    :param reduction: the criterion's reduction, validated with the criterion's own error
    :param weight: optional, broadcastable to the targets' shape
    :param cost_matrix: optional ``(C, C)``
    :param ignore_index: optional ignored label
    :param n_classes: the ``N`` of ``kind='background'`` (OOD entries are remapped to ``N``); unused otherwise
    :param targets_name: the targets' argument name in error messages
    :param warn_ood: queue the drop-unknown ``UserWarning`` when a (non-ignored) OOD entry is present;
        None: only for ``'logit_norm'``
    :return: a :class:`RowSetup`
    """
    call = check_row_call(
        kind,
        logits,
        targets,
        reduction=reduction,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
        n_classes=n_classes,
        targets_name=targets_name,
    )
    out, acc, cost, ignore_index = call
    weights = flat_weight(weight, logits, targets, acc)
    n_columns = logits.shape[1]

    checks = DataChecks(logits, targets, weight)
    flat = targets.reshape(-1).long()
    # without ignore_index every entry is valid: no mask is built (nor applied) for that
    valid = None if ignore_index is None else flat != ignore_index
    if warn_ood is None:
        warn_ood = kind == "logit_norm"
    if warn_ood:
        checks.warn_if((flat < 0).any() if valid is None else (valid & (flat < 0)).any(), DROP_UNKNOWN_MESSAGE)

    def unless_ignored(labels: Tensor) -> Tensor:
        """``labels`` with the ignored entries at -1 (below every label check)."""
        return labels if valid is None else torch.where(valid, labels, torch.full_like(labels, -1))

    label_name = targets_name
    if kind == "background":
        if checks.active and flat.numel():
            # the max (non-ignored) label when one is too large, else -1 (no action)
            top = unless_ignored(flat).max()
            checks.add(torch.where(top >= n_classes, top, torch.full_like(top, -1)), label_too_large())
        is_ood = flat < 0 if valid is None else valid & (flat < 0)
        flat = torch.where(is_ood, torch.full_like(flat, n_classes), flat)
        label_name = BACKGROUND_LABEL_NAME
    if checks.active:
        checks.check_labels_below(unless_ignored(flat), n_columns, name=label_name)
    return RowSetup(
        out=out,
        acc=acc,
        targets=flat,
        valid=valid,
        weight=weights,
        cost=cost,
        shape=targets.shape,
        checks=checks,
        ignore_index=ignore_index,
    )


def reduce_rows(kind: str, values: Tensor, setup: RowSetup, reduction, process_group=None) -> Tensor:
    """The reduction of row criterion ``kind`` (the shared epilogue), in ``setup.out``.

    ``values`` are the ``(R,)`` per-entry terms ``ℓ_i`` in ``setup.acc``, **exactly 0** at every entry that
    does not contribute (ignored entries always; OOD entries for ``'cross_entropy'`` and ``'logit_norm'``);
    they are masked again here, so a non-finite value there cannot leak. Invalid labels (``>= C``) carry NaN.
    With ``setup.weight`` each term becomes ``w_i·ℓ_i``; the normalisers never change:

    * ``'cross_entropy'``: ``'mean'`` over the ID entries (an attached 0 when there are none), ``'sum'``,
      ``'none'``/``None`` in the targets' shape;
    * ``'background'``: ``torch.nn.functional.cross_entropy`` semantics over the valid entries: ``'mean'``
      (NaN when there are none), ``'sum'``, ``'none'``; ``None`` raises;
    * ``'outlier_exposure'``/``'entropic'``: one ``'mean'`` over the valid entries (NaN when there are none),
      ``'sum'``, ``'none'``/``None``;
    * ``'energy'``/``'confidence_penalty'``/``'margin_confidence'``: ``'mean'`` = ``mean_I + mean_O``
      (separate group means, an empty group gives an attached 0), ``'sum'``, ``'none'``/``None``;
    * ``'logit_norm'``: ``'mean'`` over ID (attached 0 when none), ``'sum'``, ``'none'`` = the ``N_ID`` ID
      entries in order (one host read, :func:`select_id_rows`); ``None`` raises.

    Ignored entries are 0 in every ``'none'`` output (left out of LogitNorm's).

    With a ``process_group`` of ``W`` ranks, ``'mean'`` divides by the counts summed over the group and
    multiplies by ``W`` (:func:`row_group_mean`); ``'sum'`` and ``'none'`` are unaffected.
    """
    check_kind(kind)
    check_reduction_of(kind, reduction)
    id_only = kind in ID_ONLY_KINDS
    # the mask of the contributing entries; with every entry valid, the valid mask would select everything
    masked = id_only or not setup.all_valid
    if masked:
        mask = setup.is_id if id_only else setup.valid
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        values = torch.where(mask, values, zero)
    if setup.weight is not None:
        weight = setup.weight.to(values.dtype)
        values = values * (torch.where(mask, weight, zero) if masked else weight)
    if reduction == "sum":
        return values.sum().to(setup.out)
    if reduction == "mean" and process_group is not None:
        counts = torch.stack([torch.count_nonzero(setup.is_id), torch.count_nonzero(setup.is_ood)])
        sum_id, sum_ood = masked_sum(values, setup.is_id), masked_sum(values, setup.is_ood)
        return row_group_mean(kind, sum_id, sum_ood, GlobalCounts(counts, process_group)).to(setup.out)
    if reduction == "mean":
        if id_only:
            # values are exactly 0 outside is_id (masked above): the masked mean is their sum over the ID count
            return (values.sum() / _group_count(setup.is_id, values.dtype)).to(setup.out)
        if kind in GROUP_MEAN_KINDS:
            return _id_mean_plus_ood_mean(values, setup).to(setup.out)
        # PyTorch's convention: divide by the (unclamped) count, so an empty batch gives NaN
        count = float(values.numel()) if setup.all_valid else setup.valid.sum().to(values.dtype)
        return (values.sum() / count).to(setup.out)
    if kind == "logit_norm":
        return select_id_rows(values, setup.is_id).to(setup.out)
    return values.reshape(setup.shape).to(setup.out)


def row_group_mean(kind: str, sum_id: Tensor, sum_ood: Tensor, counts: GlobalCounts) -> Tensor:
    """The ``'mean'`` of row criterion ``kind`` from its group sums ``Σ_I w·ℓ``, ``Σ_O w·ℓ`` and the counts
    ``(N_ID, N_OOD)`` (:class:`GlobalCounts`, summed over a process group or local): ``Σ_I/N_ID`` (ID-only
    kinds), ``Σ_I/N_ID + Σ_O/N_OOD`` (the group-mean kinds; an empty group adds 0) or
    ``(Σ_I + Σ_O)/(N_ID + N_OOD)`` (NaN when both are 0), each times the group's ``W``.
    The fused kernels' ``process_group`` path reduces their group sums with this too."""
    if kind in ID_ONLY_KINDS:
        return counts.mean(sum_id, 0)
    if kind in GROUP_MEAN_KINDS:
        return counts.mean(sum_id, 0) + counts.mean(sum_ood, 1)
    return counts.mean(sum_id + sum_ood, 0, 1, empty_is_nan=True)


def _group_count(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The number of True entries of ``mask``, at least 1 (an empty group's sum of zeros stays 0), as ``dtype``."""
    return torch.count_nonzero(mask).clamp(min=1).to(dtype)


def _id_mean_plus_ood_mean(values: Tensor, setup: RowSetup) -> Tensor:
    """``mean_I + mean_O`` (an empty group adds an attached 0) as one weighted sum ``Σ_i w_i·ℓ_i`` with
    ``w_i = 1/N_I`` at ID entries and ``1/N_O`` at OOD ones: one pass over ``values``, and one backward op.

    ``values`` must already be exactly 0 at the entries of neither group (ignored ones).
    """
    dtype = values.dtype
    n_ood = torch.count_nonzero(setup.is_ood)
    inv_ood = n_ood.clamp(min=1).to(dtype).reciprocal()
    if setup.all_valid:  # every entry is ID or OOD: N_I = R - N_O
        inv_id = (values.numel() - n_ood).clamp(min=1).to(dtype).reciprocal()
        weight = torch.where(setup.is_ood, inv_ood, inv_id)
    else:
        inv_id = _group_count(setup.is_id, dtype).reciprocal()
        zero = torch.zeros((), dtype=dtype, device=values.device)
        weight = torch.where(setup.is_id, inv_id, torch.where(setup.is_ood, inv_ood, zero))
    return (values * weight).sum()


# ----------------------------------------------------------------------------------------------
# per-row building blocks of the reference
# ----------------------------------------------------------------------------------------------


def _acc_rows(logits: Tensor, setup: RowSetup) -> Tensor:
    """``(R, C)`` rows in the compute dtype (the reference may copy; the kernels read in place)."""
    rows, _ = as_rows(logits, setup.targets)
    return rows.to(setup.acc)


def _with_cost(ce: Tensor, rows: Tensor, setup: RowSetup) -> Tensor:
    """``ω_i·CE_i`` with ``ω_i = cost[y_i, argmax_c f_ic]`` (first index on ties, not differentiated)."""
    if setup.cost is None:
        return ce
    n_columns = setup.cost.shape[0]
    label = setup.targets.clamp(0, max(n_columns - 1, 0))
    omega = setup.cost[label, rows.detach().argmax(dim=1)]
    return ce * omega


def _id_or_ood(id_values: Tensor, ood_values: Optional[Tensor], setup: RowSetup) -> Tensor:
    """Per-row values: ``id_values`` at ID entries, ``ood_values`` at OOD entries, exact zeros elsewhere."""
    zero = torch.zeros((), dtype=id_values.dtype, device=id_values.device)
    other = zero if ood_values is None else torch.where(setup.is_ood, ood_values, zero)
    return torch.where(setup.is_id, id_values, other)


# ----------------------------------------------------------------------------------------------
# cross-entropy over the ID entries (§2.5, §3.2)
# ----------------------------------------------------------------------------------------------


def _cross_entropy(
    logits, targets, reduction, weight, cost_matrix, ignore_index, warn_ood: bool, process_group=None
) -> Tensor:
    setup = prepare_rows(
        "cross_entropy",
        logits,
        targets,
        reduction=reduction,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
        warn_ood=warn_ood,
    )
    rows = _acc_rows(logits, setup)
    ce, _ = row_cross_entropy(rows, setup.targets)
    values = _id_or_ood(_with_cost(ce, rows, setup), None, setup)
    loss = reduce_rows("cross_entropy", values, setup, reduction, process_group)
    setup.checks.flush()
    return loss


def cross_entropy(
    logits: Tensor,
    targets: Tensor,
    reduction: Optional[str] = "mean",
    *,
    weight: Optional[Tensor] = None,
    cost_matrix: Optional[Tensor] = None,
    ignore_index: Optional[int] = None,
    warn_ood: bool = False,
    process_group=None,
) -> Tensor:
    """Cross-entropy over the ID entries; OOD entries (``y < 0``) contribute nothing (LOSS_CONTRACT.md §2.5).

    Per entry ``ℓ_i = w_i·ω_i·CE(f_i, y_i) = w_i·ω_i·(lse(f_i) − f_{i, y_i})`` for ``y_i >= 0`` and ``ℓ_i = 0``
    for ``y_i < 0`` and for ignored entries (``w_i = 1`` without ``weight``, ``ω_i = 1`` without ``cost_matrix``).

    * ``'mean'``: ``Σ_I ℓ_i / N_ID``; an attached zero when ``N_ID = 0`` (empty batch included);
    * ``'sum'``: ``Σ_I ℓ_i``;
    * ``'none'`` / ``None``: ``ℓ`` in the targets' shape, exact zeros at OOD and ignored entries;
    * anything else: PyTorch's ``ValueError("<reduction> is not a valid value for reduction")``.

    Options: ``weight`` (broadcastable to the targets' shape) multiplies each term, the normaliser ``N_ID``
    is unchanged; ``cost_matrix`` ``(C, C)`` gives ``ω_i = cost[y_i, argmax_c f_ic]`` (not differentiated);
    entries with ``y == ignore_index`` are left out of the terms and of ``N_ID``.

    Never warns unless ``warn_ood=True`` (what :class:`CrossEntropyLoss` does): then pytorch-ood's drop-unknown
    ``UserWarning`` is emitted when a (non-ignored) OOD entry is present. With data checks on, a (non-ignored)
    label ``>= C`` raises :class:`LabelOutOfRangeError`.

    :param logits: ``(B, C, *S)`` with the classes on dim 1, e.g. ``(B, C)``, ``(B, C, H, W)``, ``(B, C, L)``
    :param targets: ``(B, *S)`` integer labels
    :param weight: optional floating weights broadcastable to ``(B, *S)``
    :param cost_matrix: optional floating ``(C, C)``
    :param ignore_index: optional int label to ignore
    :param process_group: optional ``torch.distributed`` group of ``W`` ranks: ``'mean'`` divides by the counts
        summed over the group and multiplies by ``W`` (README, "Distributed training"); ``'sum'`` and ``'none'``
        are unaffected
    :param warn_ood: emit the drop-unknown warning when OOD entries are present (as :class:`CrossEntropyLoss`)
    :return: 0-d for ``'mean'``/``'sum'``, else ``(B, *S)``; in the dtype of ``logits``
    """
    return _cross_entropy(
        logits, targets, reduction, weight, cost_matrix, ignore_index, warn_ood=warn_ood, process_group=process_group
    )


class CrossEntropyLoss(nn.Module):
    """Cross-entropy that ignores OOD entries (LOSS_CONTRACT.md §3.2), as :func:`cross_entropy`.

    ``'mean'`` averages over the ID entries (samples or pixels) only; it is an attached 0 when there are
    none, including the empty batch. ``'sum'`` of an all-OOD batch is 0 and ``'none'`` zero-fills OOD entries.

    With data checks on, any (non-ignored) target ``< 0`` emits the ``UserWarning``
    "Discarding samples with targets < 0 (OOD), which this loss does not use." (segmentation included), and
    a label ``>= C`` raises :class:`LabelOutOfRangeError`.

    Options: ``cost_matrix`` ``(C, C)`` (stored as the non-persistent buffer ``cost_matrix``) scales each ID
    term by ``cost[y_i, argmax_c f_ic]``; ``ignore_index`` drops the entries with that label; ``forward``'s
    ``weight`` (broadcastable to the targets' shape) multiplies each term. See :func:`cross_entropy`.

    Shapes: ``(B, C)``/``(B,)``, ``(B, C, H, W)``/``(B, H, W)`` and ``(B, C, L)``/``(B, L)``.
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION, Task.SEGMENTATION},
        inputs={Representation.LOGITS},
        supervised=False,
    )

    #: the function ``forward`` computes; :mod:`oodkernels.loss` swaps in the dispatched one
    _loss_fn = staticmethod(cross_entropy)

    def __init__(
        self,
        reduction: Optional[str] = "mean",
        *,
        cost_matrix: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        process_group=None,
    ):
        """
        :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None`` (same as ``'none'``)
        :param cost_matrix: optional ``(C, C)`` confusion costs of the ID terms
        :param ignore_index: optional label whose entries are left out
        :param process_group: optional ``torch.distributed`` group: ``'mean'`` normalises by the counts of the
            whole group's batch (README, "Distributed training")
        """
        super().__init__()
        self.reduction = reduction
        _init_options(self, cost_matrix, ignore_index, process_group)

    def forward(self, logits: Tensor, targets: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """
        :param logits: ``(B, C, *S)``
        :param targets: ``(B, *S)``; entries ``< 0`` are ignored (with a warning)
        :param weight: optional weights broadcastable to ``(B, *S)``
        :return: the loss, see :func:`cross_entropy`
        """
        return self._loss_fn(
            logits,
            targets,
            self.reduction,
            weight=weight,
            cost_matrix=self.cost_matrix,
            ignore_index=self.ignore_index,
            process_group=self.process_group,
            warn_ood=True,
        )


def _init_options(
    module: nn.Module, cost_matrix: Optional[Tensor], ignore_index: Optional[int], process_group=None
) -> None:
    """Store the options of a row criterion: ``cost_matrix`` as a non-persistent buffer (kept out of the
    state_dict, so the keys stay pytorch-ood's, but moved by ``.to(device)``), ``ignore_index`` and
    ``process_group`` as attributes (checked here, so a wrong group fails at construction)."""
    if cost_matrix is not None:
        check_floating("cost_matrix", cost_matrix)
        if cost_matrix.dim() != 2 or cost_matrix.shape[0] != cost_matrix.shape[1]:
            raise ShapeError(f"cost_matrix: expected a square (C, C) matrix, got shape {tuple(cost_matrix.shape)}")
    module.register_buffer("cost_matrix", cost_matrix, persistent=False)
    module.ignore_index = check_ignore_index(ignore_index)
    check_process_group(process_group)
    module.process_group = process_group


# ----------------------------------------------------------------------------------------------
# background class (§3.1)
# ----------------------------------------------------------------------------------------------


def background_class_loss(
    logits: Tensor,
    targets: Tensor,
    n_classes: int,
    reduction: str = "mean",
    *,
    weight: Optional[Tensor] = None,
    cost_matrix: Optional[Tensor] = None,
    ignore_index: Optional[int] = None,
    process_group=None,
) -> Tensor:
    """Cross-entropy with OOD entries mapped to an extra background class (LOSS_CONTRACT.md §3.1).

    With ``N = n_classes`` and the background class in the last column ``N``::

        ỹ_i = y_i if y_i >= 0 else N,        ℓ_i = w_i·ω_i·CE(f_i, ỹ_i) = w_i·ω_i·(lse(f_i) − f_{i, ỹ_i})

    (``w_i = 1`` without ``weight``, ``ω_i = 1`` without ``cost_matrix``). The caller's ``targets`` are not
    modified. Reductions follow ``torch.nn.functional.cross_entropy`` over the non-ignored entries:

    * ``'mean'``: mean of ``ℓ`` over **all** entries (ID and OOD); NaN for an empty batch;
    * ``'sum'``: ``Σ_i ℓ_i``;
    * ``'none'``: ``ℓ`` in the targets' shape (0 at ignored entries);
    * ``None`` or anything else: ``ValueError("<reduction> is not a valid value for reduction")``.

    Options: ``weight`` (broadcastable to the targets' shape) multiplies each term, the normaliser (the number
    of non-ignored entries) is unchanged; ``cost_matrix`` ``(N + 1, N + 1)`` gives
    ``ω_i = cost[ỹ_i, argmax_c f_ic]`` for every entry, OOD ones included (not differentiated); entries with
    ``y == ignore_index`` are left out (checked before the remap: ``ignore_index=-1`` keeps ``-1`` entries out
    of the background class).

    Data checks (§2.11): a (non-ignored) label ``>= N`` raises ``ValueError("Target label to large: <max
    label>")`` (the reference's message, typo kept, e.g. ``tensor(255)``), and OOD entries with only ``N`` logit
    columns raise :class:`LabelOutOfRangeError` (an ``IndexError``). With the checks off, an entry whose
    (remapped) label has no logit column gives NaN.

    :param logits: ``(B, N + 1)`` or ``(B, N + 1, *S)`` (classes on dim 1), or an unbatched ``(N + 1,)``
    :param targets: ``(B,)`` or ``(B, *S)`` (``()`` for unbatched logits)
    :param n_classes: number of ID classes ``N``
    :param weight: optional floating weights broadcastable to the targets' shape
    :param cost_matrix: optional floating ``(N + 1, N + 1)``
    :param ignore_index: optional int label to ignore
    :param process_group: optional ``torch.distributed`` group of ``W`` ranks: ``'mean'`` divides by the counts
        summed over the group and multiplies by ``W`` (README, "Distributed training"); ``'sum'`` and ``'none'``
        are unaffected
    :return: 0-d for ``'mean'``/``'sum'``, else the targets' shape; in the dtype of ``logits``
    """
    if isinstance(logits, Tensor) and logits.dim() == 1 and isinstance(targets, Tensor) and targets.dim() == 0:
        # unbatched input, as torch's cross-entropy accepts it
        if isinstance(weight, Tensor) and weight.dim() == 0:
            weight = weight.unsqueeze(0)
        loss = background_class_loss(
            logits.unsqueeze(0),
            targets.unsqueeze(0),
            n_classes,
            reduction,
            weight=weight,
            cost_matrix=cost_matrix,
            ignore_index=ignore_index,
        )
        return loss.reshape(()) if reduction == "none" else loss
    setup = prepare_rows(
        "background",
        logits,
        targets,
        reduction=reduction,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
        n_classes=n_classes,
    )
    rows = _acc_rows(logits, setup)
    ce, _ = row_cross_entropy(rows, setup.targets)
    values = _id_or_ood(_with_cost(ce, rows, setup), None, setup)
    loss = reduce_rows("background", values, setup, reduction, process_group)
    setup.checks.flush()
    return loss


class BackgroundClassLoss(nn.Module):
    """Background-class cross-entropy (LOSS_CONTRACT.md §3.1), as :func:`background_class_loss`.

    The network has ``N + 1`` outputs; OOD entries (``y < 0``) are trained towards the last one.
    ``reduction=None`` raises ``ValueError("None is not a valid value for reduction")``.

    Options: ``cost_matrix`` ``(N + 1, N + 1)`` (non-persistent buffer ``cost_matrix``) scales every term by
    ``cost[ỹ_i, argmax_c f_ic]``; ``ignore_index`` drops the entries with that label; ``forward``'s ``weight``
    (broadcastable to the targets' shape) multiplies each term. See :func:`background_class_loss`.
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION, Task.SEGMENTATION},
        inputs={Representation.LOGITS},
        supervised=True,
        paper=_AGNOSTOPHOBIA,
    )

    #: the function ``forward`` computes; :mod:`oodkernels.loss` swaps in the dispatched one
    _loss_fn = staticmethod(background_class_loss)

    def __init__(
        self,
        n_classes: int,
        reduction: str = "mean",
        *,
        cost_matrix: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        process_group=None,
    ):
        """
        :param n_classes: number of ID classes ``N`` (the background class is not counted)
        :param reduction: ``'mean'``, ``'sum'`` or ``'none'``
        :param cost_matrix: optional ``(N + 1, N + 1)`` confusion costs
        :param ignore_index: optional label whose entries are left out
        :param process_group: optional ``torch.distributed`` group: ``'mean'`` normalises by the counts of the
            whole group's batch (README, "Distributed training")
        """
        super().__init__()
        self.num_classes = n_classes
        self.reduction = reduction
        _init_options(self, cost_matrix, ignore_index, process_group)

    def forward(self, logits: Tensor, targets: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """
        :param logits: ``(B, N + 1)`` or ``(B, N + 1, H, W)``
        :param targets: ``(B,)`` or ``(B, H, W)``; labels ``< 0`` go to the background class ``N``
        :param weight: optional weights broadcastable to the targets' shape
        :return: the loss, see :func:`background_class_loss`
        """
        return self._loss_fn(
            logits,
            targets,
            self.num_classes,
            self.reduction,
            weight=weight,
            cost_matrix=self.cost_matrix,
            ignore_index=self.ignore_index,
            process_group=self.process_group,
        )


# ----------------------------------------------------------------------------------------------
# outlier exposure and entropic open-set (§3.3, §3.4)
# ----------------------------------------------------------------------------------------------


def _ce_or_uniform(
    kind: str, logits, targets, alpha: float, reduction, weight, cost_matrix, ignore_index, process_group=None
) -> Tensor:
    """``ω_i·CE(f_i, y_i)`` if ID, ``alpha·U(f_i)`` if OOD, reduced over all non-ignored entries."""
    setup = prepare_rows(
        kind,
        logits,
        targets,
        reduction=reduction,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
        targets_name="target",
    )
    rows = _acc_rows(logits, setup)
    ce, lse = row_cross_entropy(rows, setup.targets)
    uniform = row_uniform_cross_entropy(rows, lse)
    values = _id_or_ood(_with_cost(ce, rows, setup), alpha * uniform, setup)
    loss = reduce_rows(kind, values, setup, reduction, process_group)
    setup.checks.flush()
    return loss


def outlier_exposure_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.5,
    reduction: Optional[str] = "mean",
    *,
    weight: Optional[Tensor] = None,
    cost_matrix: Optional[Tensor] = None,
    ignore_index: Optional[int] = None,
    process_group=None,
) -> Tensor:
    """Outlier Exposure loss as pytorch-ood implements it (LOSS_CONTRACT.md §3.3).

    Per entry (``w_i = 1`` without ``weight``, ``ω_i = 1`` without ``cost_matrix``)::

        ℓ_i = w_i·ω_i·CE(f_i, y_i)                          if y_i >= 0
        ℓ_i = w_i·α·U(f_i) = w_i·α·(lse(f_i) − mean_c f_ic)   if y_i < 0

    * ``'mean'``: **one** mean over all entries, ``(Σ_I ℓ_i + Σ_O ℓ_i) / (N_ID + N_OOD)`` (the paper uses two
      separate means; the reference's convention is kept). NaN for an empty batch;
    * ``'sum'``: ``Σ_i ℓ_i``; ``'none'``/``None``: ``ℓ`` in the targets' shape;
    * anything else: bare ``ValueError``.

    Options: ``weight`` (broadcastable to the targets' shape) multiplies each term, ``N_ID + N_OOD`` is
    unchanged; ``cost_matrix`` ``(C, C)`` scales the ID cross-entropy only, by ``ω_i = cost[y_i, argmax_c f_ic]``
    (not differentiated); entries with ``y == ignore_index`` are left out of the terms and the counts
    (0 in ``'none'``).

    With ``alpha = 1`` this equals :func:`entropic_open_set_loss` in every reduction.

    :param logits: ``(B, C)`` or ``(B, C, H, W)``; other ranks raise ``ValueError("Unsupported input shape: ...")``
    :param targets: ``(B,)`` or ``(B, H, W)``; labels ``< 0`` are OOD
    :param weight: optional floating weights broadcastable to the targets' shape
    :param cost_matrix: optional floating ``(C, C)``
    :param ignore_index: optional int label to ignore
    :param process_group: optional ``torch.distributed`` group of ``W`` ranks: ``'mean'`` divides by the counts
        summed over the group and multiplies by ``W`` (README, "Distributed training"); ``'sum'`` and ``'none'``
        are unaffected
    :return: 0-d for ``'mean'``/``'sum'``, else the targets' shape; in the dtype of ``logits``
    """
    return _ce_or_uniform(
        "outlier_exposure", logits, targets, alpha, reduction, weight, cost_matrix, ignore_index, process_group
    )


class OutlierExposureLoss(nn.Module):
    """Outlier Exposure (Hendrycks et al., ICLR 2019), see :func:`outlier_exposure_loss` (§3.3).

    Options: ``cost_matrix`` ``(C, C)`` (non-persistent buffer ``cost_matrix``) scales the ID cross-entropy by
    ``cost[y_i, argmax_c f_ic]``; ``ignore_index`` drops the entries with that label; ``forward``'s ``weight``
    (broadcastable to the targets' shape) multiplies each term.
    """

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

    #: the function ``forward`` computes; :mod:`oodkernels.loss` swaps in the dispatched one
    _loss_fn = staticmethod(outlier_exposure_loss)

    def __init__(
        self,
        alpha: float = 0.5,
        reduction: Optional[str] = "mean",
        *,
        cost_matrix: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        process_group=None,
    ):
        """
        :param alpha: weight ``α`` of the OOD term
        :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None``
        :param cost_matrix: optional ``(C, C)`` confusion costs of the ID terms
        :param ignore_index: optional label whose entries are left out
        :param process_group: optional ``torch.distributed`` group: ``'mean'`` normalises by the counts of the
            whole group's batch (README, "Distributed training")
        """
        super().__init__()
        self.alpha = alpha
        self.reduction = reduction
        _init_options(self, cost_matrix, ignore_index, process_group)

    def forward(self, logits: Tensor, target: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """
        :param logits: ``(B, C)`` or ``(B, C, H, W)``
        :param target: ``(B,)`` or ``(B, H, W)``; labels ``< 0`` are OOD
        :param weight: optional weights broadcastable to the targets' shape
        :return: the loss, see :func:`outlier_exposure_loss`
        """
        return self._loss_fn(
            logits,
            target,
            self.alpha,
            self.reduction,
            weight=weight,
            cost_matrix=self.cost_matrix,
            ignore_index=self.ignore_index,
            process_group=self.process_group,
        )


def entropic_open_set_loss(
    logits: Tensor,
    targets: Tensor,
    reduction: Optional[str] = "mean",
    *,
    weight: Optional[Tensor] = None,
    cost_matrix: Optional[Tensor] = None,
    ignore_index: Optional[int] = None,
    process_group=None,
) -> Tensor:
    """Entropic open-set loss (LOSS_CONTRACT.md §3.4).

    Per entry (``w_i = 1`` without ``weight``, ``ω_i = 1`` without ``cost_matrix``)::

        ℓ_i = w_i·ω_i·CE(f_i, y_i)                                   if y_i >= 0
        ℓ_i = w_i·U(f_i) = −w_i·(1/C) Σ_c log softmax(f_i)_c          if y_i < 0

    ``'mean'`` over all non-ignored entries (NaN for an empty batch), ``'sum'``, ``'none'``/``None`` per entry in
    the targets' shape; anything else raises a bare ``ValueError``.

    Options: ``weight`` (broadcastable to the targets' shape) multiplies each term, the count is unchanged;
    ``cost_matrix`` ``(C, C)`` scales the ID cross-entropy only, by ``ω_i = cost[y_i, argmax_c f_ic]`` (not
    differentiated); entries with ``y == ignore_index`` are left out of the terms and the count.

    Pinned (float64): logits ``[[2, 0, 0], [1, 0, −1]]``, ``y = [0, −1]`` give 0.8235753653.

    :param logits: ``(B, C)`` or ``(B, C, H, W)``; other ranks raise ``ValueError("Unsupported input shape: ...")``
    :param targets: ``(B,)`` or ``(B, H, W)``
    :param weight: optional floating weights broadcastable to the targets' shape
    :param cost_matrix: optional floating ``(C, C)``
    :param ignore_index: optional int label to ignore
    :param process_group: optional ``torch.distributed`` group of ``W`` ranks: ``'mean'`` divides by the counts
        summed over the group and multiplies by ``W`` (README, "Distributed training"); ``'sum'`` and ``'none'``
        are unaffected
    :return: 0-d for ``'mean'``/``'sum'``, else the targets' shape; in the dtype of ``logits``
    """
    return _ce_or_uniform("entropic", logits, targets, 1.0, reduction, weight, cost_matrix, ignore_index, process_group)


class EntropicOpenSetLoss(nn.Module):
    """Entropic open-set loss (Dhamija et al., NeurIPS 2018), see :func:`entropic_open_set_loss` (§3.4).

    Options: ``cost_matrix`` ``(C, C)`` (non-persistent buffer ``cost_matrix``) scales the ID cross-entropy by
    ``cost[y_i, argmax_c f_ic]``; ``ignore_index`` drops the entries with that label; ``forward``'s ``weight``
    (broadcastable to the targets' shape) multiplies each term.
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION, Task.SEGMENTATION},
        inputs={Representation.LOGITS},
        supervised=True,
        paper=_AGNOSTOPHOBIA,
    )

    #: the function ``forward`` computes; :mod:`oodkernels.loss` swaps in the dispatched one
    _loss_fn = staticmethod(entropic_open_set_loss)

    def __init__(
        self,
        reduction: Optional[str] = "mean",
        *,
        cost_matrix: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        process_group=None,
    ):
        """
        :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None``
        :param cost_matrix: optional ``(C, C)`` confusion costs of the ID terms
        :param ignore_index: optional label whose entries are left out
        :param process_group: optional ``torch.distributed`` group: ``'mean'`` normalises by the counts of the
            whole group's batch (README, "Distributed training")
        """
        super().__init__()
        self.reduction = reduction
        _init_options(self, cost_matrix, ignore_index, process_group)

    def forward(self, logits: Tensor, target: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """
        :param logits: ``(B, C)`` or ``(B, C, H, W)``
        :param target: ``(B,)`` or ``(B, H, W)``; labels ``< 0`` are OOD
        :param weight: optional weights broadcastable to the targets' shape
        :return: the loss, see :func:`entropic_open_set_loss`
        """
        return self._loss_fn(
            logits,
            target,
            self.reduction,
            weight=weight,
            cost_matrix=self.cost_matrix,
            ignore_index=self.ignore_index,
            process_group=self.process_group,
        )


# ----------------------------------------------------------------------------------------------
# separate-group-mean criteria: energy regularisation (§3.5) and the design-note criteria
# ----------------------------------------------------------------------------------------------


def _group_setup(kind: str, logits, targets, reduction, weight, cost_matrix, ignore_index):
    """Shared prologue: the setup, the rows in the compute dtype, the (cost-scaled) CE and lse per row."""
    setup = prepare_rows(
        kind,
        logits,
        targets,
        reduction=reduction,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
    )
    rows = _acc_rows(logits, setup)
    ce, lse = row_cross_entropy(rows, setup.targets)
    return setup, rows, _with_cost(ce, rows, setup), lse


def _finish(kind: str, values: Tensor, setup: RowSetup, reduction, process_group=None) -> Tensor:
    loss = reduce_rows(kind, values, setup, reduction, process_group)
    setup.checks.flush()
    return loss


def energy_regularized_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.1,
    margin_in: float = -25.0,
    margin_out: float = -7.0,
    reduction: str = "mean",
    *,
    weight: Optional[Tensor] = None,
    cost_matrix: Optional[Tensor] = None,
    ignore_index: Optional[int] = None,
    process_group=None,
) -> Tensor:
    """Cross-entropy plus the energy-margin regulariser of Liu et al. 2020 (LOSS_CONTRACT.md §3.5).

    With ``E_i = −lse(f_i)`` (``w_i = 1`` without ``weight``, ``ω_i = 1`` without ``cost_matrix``)::

        ℓ_i = w_i·(ω_i·CE(f_i, y_i) + α·relu(E_i − margin_in)²)   if y_i >= 0
        ℓ_i = w_i·α·relu(margin_out − E_i)²                        if y_i < 0

    * ``'mean'``: ``mean_I(ℓ) + mean_O(ℓ)``, i.e. ``mean_I(nll) + α·(mean_I(h) + mean_O(h))`` with **separate**
      group means (an empty group contributes an attached 0; all-OOD gives ``α·mean_O(h)``, the empty batch 0).
      This is not the mean of ``'none'``;
    * ``'none'``/``None``: ``ℓ`` in the targets' shape; ``'sum'``: its sum;
    * anything else: bare ``ValueError``.

    Options: ``weight`` (broadcastable to the targets' shape) multiplies each entry's whole term, the group
    counts are unchanged; ``cost_matrix`` ``(C, C)`` scales the ID cross-entropy only (not the energy hinge),
    by ``ω_i = cost[y_i, argmax_c f_ic]`` (not differentiated); entries with ``y == ignore_index`` are left out
    of the terms and the counts (0 in ``'none'``).

    Pinned: defaults, logits ``zeros(2, 2)``, ``y = [0, −1]``: 'mean' 59.7754566, 'none' ``[59.7754566, 0]``.

    :param logits: ``(B, C)`` or ``(B, C, H, W)``; other ranks raise ``ValueError("Unsupported input shape: ...")``
    :param targets: ``(B,)`` or ``(B, H, W)``
    :param weight: optional floating weights broadcastable to the targets' shape
    :param cost_matrix: optional floating ``(C, C)``
    :param ignore_index: optional int label to ignore
    :param process_group: optional ``torch.distributed`` group of ``W`` ranks: ``'mean'`` divides by the counts
        summed over the group and multiplies by ``W`` (README, "Distributed training"); ``'sum'`` and ``'none'``
        are unaffected
    :return: 0-d for ``'mean'``/``'sum'``, else the targets' shape; in the dtype of ``logits``
    """
    setup, _, ce, lse = _group_setup("energy", logits, targets, reduction, weight, cost_matrix, ignore_index)
    energy = -lse
    id_values = ce + alpha * (energy - margin_in).relu().pow(2)
    ood_values = alpha * (margin_out - energy).relu().pow(2)
    return _finish("energy", _id_or_ood(id_values, ood_values, setup), setup, reduction, process_group)


class EnergyRegularizedLoss(nn.Module):
    """Energy-regularised cross-entropy (Liu et al., NeurIPS 2020), see :func:`energy_regularized_loss`.

    The defaults are the paper's CIFAR values.

    Options: ``cost_matrix`` ``(C, C)`` (non-persistent buffer ``cost_matrix``) scales the ID cross-entropy by
    ``cost[y_i, argmax_c f_ic]``; ``ignore_index`` drops the entries with that label; ``forward``'s ``weight``
    (broadcastable to the targets' shape) multiplies each term.
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

    #: the function ``forward`` computes; :mod:`oodkernels.loss` swaps in the dispatched one
    _loss_fn = staticmethod(energy_regularized_loss)

    def __init__(
        self,
        alpha: float = 0.1,
        margin_in: float = -25.0,
        margin_out: float = -7.0,
        reduction: str = "mean",
        *,
        cost_matrix: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        process_group=None,
    ):
        """
        :param alpha: weight ``α`` of the regulariser
        :param margin_in: energy margin ``m_in`` of ID entries
        :param margin_out: energy margin ``m_out`` of OOD entries
        :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None``
        :param cost_matrix: optional ``(C, C)`` confusion costs of the ID cross-entropy
        :param ignore_index: optional label whose entries are left out
        :param process_group: optional ``torch.distributed`` group: ``'mean'`` normalises by the counts of the
            whole group's batch (README, "Distributed training")
        """
        super().__init__()
        self.m_in = margin_in
        self.m_out = margin_out
        self.alpha = alpha
        self.reduction = reduction
        _init_options(self, cost_matrix, ignore_index, process_group)

    def forward(self, logits: Tensor, targets: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """
        :param logits: ``(B, C)`` or ``(B, C, H, W)``
        :param targets: ``(B,)`` or ``(B, H, W)``; labels ``< 0`` are OOD
        :param weight: optional weights broadcastable to the targets' shape
        :return: the loss, see :func:`energy_regularized_loss`
        """
        return self._loss_fn(
            logits,
            targets,
            self.alpha,
            self.m_in,
            self.m_out,
            self.reduction,
            weight=weight,
            cost_matrix=self.cost_matrix,
            ignore_index=self.ignore_index,
            process_group=self.process_group,
        )


def _max_softmax(rows: Tensor, lse: Tensor) -> Tensor:
    """``π_i = max_c softmax(f_i)_c = exp(max_c f_ic − lse(f_i))``."""
    return torch.exp(rows.amax(dim=1) - lse)


def confidence_penalty_loss(
    logits: Tensor,
    targets: Tensor,
    lambda_ood: float = 0.1,
    reduction: Optional[str] = "mean",
    *,
    weight: Optional[Tensor] = None,
    cost_matrix: Optional[Tensor] = None,
    ignore_index: Optional[int] = None,
    process_group=None,
) -> Tensor:
    """Cross-entropy on ID entries plus a penalty on the confidence of OOD entries (design notes, SPEC §2).

    With ``π_i = max_c softmax(f_i)_c`` (the maximum softmax probability, in ``[1/C, 1]``), ``w_i = 1`` without
    ``weight`` and ``ω_i = 1`` without ``cost_matrix``::

        ℓ_i = w_i·ω_i·CE(f_i, y_i)    if y_i >= 0
        ℓ_i = w_i·λ·π_i               if y_i < 0            (λ = lambda_ood)

    Reductions, with the conventions of :func:`energy_regularized_loss`:

    * ``'mean'``: ``mean_I ℓ + mean_O ℓ`` (separate group means; an empty group contributes an exact,
      attached 0, so an all-OOD batch gives ``λ·mean_O π`` and the empty batch 0);
    * ``'sum'``: ``Σ_I ℓ + Σ_O ℓ``;
    * ``'none'``/``None``: ``ℓ`` in the targets' shape;
    * anything else: bare ``ValueError``.

    Options: ``weight`` (broadcastable to the targets' shape) multiplies each term, the group counts are
    unchanged; ``cost_matrix`` ``(C, C)`` scales the ID cross-entropy only, by ``ω_i = cost[y_i, argmax_c f_ic]``
    (not differentiated); entries with ``y == ignore_index`` are left out of the terms and the counts.

    The gradient of ``π`` is ``π·(e_k − softmax(f))`` with ``k`` the argmax (shared equally among ties).
    With data checks on, a label ``>= C`` raises :class:`LabelOutOfRangeError`; nothing warns.

    :param logits: ``(B, C)`` or ``(B, C, H, W)``; other ranks raise ``ValueError("Unsupported input shape: ...")``
    :param targets: ``(B,)`` or ``(B, H, W)`` integer labels; ``< 0`` marks OOD
    :param lambda_ood: weight ``λ`` of the OOD confidence term
    :param weight: optional floating weights broadcastable to the targets' shape
    :param cost_matrix: optional floating ``(C, C)``
    :param ignore_index: optional int label to ignore
    :param process_group: optional ``torch.distributed`` group of ``W`` ranks: ``'mean'`` divides by the counts
        summed over the group and multiplies by ``W`` (README, "Distributed training"); ``'sum'`` and ``'none'``
        are unaffected
    :return: 0-d for ``'mean'``/``'sum'``, else the targets' shape; in the dtype of ``logits``
    """
    setup, rows, ce, lse = _group_setup(
        "confidence_penalty", logits, targets, reduction, weight, cost_matrix, ignore_index
    )
    penalty = lambda_ood * _max_softmax(rows, lse)
    return _finish("confidence_penalty", _id_or_ood(ce, penalty, setup), setup, reduction, process_group)


class ConfidencePenaltyLoss(nn.Module):
    """Cross-entropy over ID plus ``lambda_ood`` times the max softmax probability of OOD entries.

    See :func:`confidence_penalty_loss` for the math, shapes and reductions. Classification ``(B, C)`` and
    segmentation ``(B, C, H, W)``; supervised (uses example outliers, ``targets < 0``).

    Options: ``cost_matrix`` ``(C, C)`` (non-persistent buffer ``cost_matrix``) scales the ID cross-entropy by
    ``cost[y_i, argmax_c f_ic]``; ``ignore_index`` drops the entries with that label; ``forward``'s ``weight``
    (broadcastable to the targets' shape) multiplies each term.
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION, Task.SEGMENTATION},
        inputs={Representation.LOGITS},
        supervised=True,
    )

    #: the function ``forward`` computes; :mod:`oodkernels.loss` swaps in the dispatched one
    _loss_fn = staticmethod(confidence_penalty_loss)

    def __init__(
        self,
        lambda_ood: float = 0.1,
        reduction: Optional[str] = "mean",
        *,
        cost_matrix: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        process_group=None,
    ):
        """
        :param lambda_ood: weight ``λ`` of the OOD confidence penalty
        :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None``
        :param cost_matrix: optional ``(C, C)`` confusion costs of the ID cross-entropy
        :param ignore_index: optional label whose entries are left out
        :param process_group: optional ``torch.distributed`` group: ``'mean'`` normalises by the counts of the
            whole group's batch (README, "Distributed training")
        """
        super().__init__()
        self.lambda_ood = lambda_ood
        self.reduction = reduction
        _init_options(self, cost_matrix, ignore_index, process_group)

    def forward(self, logits: Tensor, targets: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """
        :param logits: ``(B, C)`` or ``(B, C, H, W)``
        :param targets: ``(B,)`` or ``(B, H, W)``; labels ``< 0`` are OOD
        :param weight: optional weights broadcastable to the targets' shape
        :return: the loss, see :func:`confidence_penalty_loss`
        """
        return self._loss_fn(
            logits,
            targets,
            self.lambda_ood,
            self.reduction,
            weight=weight,
            cost_matrix=self.cost_matrix,
            ignore_index=self.ignore_index,
            process_group=self.process_group,
        )


def margin_confidence_loss(
    logits: Tensor,
    targets: Tensor,
    margin: float = 0.5,
    reduction: Optional[str] = "mean",
    *,
    weight: Optional[Tensor] = None,
    cost_matrix: Optional[Tensor] = None,
    ignore_index: Optional[int] = None,
    process_group=None,
) -> Tensor:
    """Cross-entropy on ID entries plus a hinge on the confidence of OOD entries (design notes, SPEC §2).

    With ``π_i = max_c softmax(f_i)_c``, ``m = margin``, ``w_i = 1`` without ``weight`` and ``ω_i = 1`` without
    ``cost_matrix``::

        ℓ_i = w_i·ω_i·CE(f_i, y_i)      if y_i >= 0
        ℓ_i = w_i·relu(π_i − m)         if y_i < 0

    OOD entries are only penalised while their confidence exceeds the margin (zero gradient below it).
    Reductions as :func:`confidence_penalty_loss`:

    * ``'mean'``: ``mean_I ℓ + mean_O ℓ`` (separate group means, an empty group gives an attached 0);
    * ``'sum'``: ``Σ_I ℓ + Σ_O ℓ``;
    * ``'none'``/``None``: ``ℓ`` in the targets' shape;
    * anything else: bare ``ValueError``.

    Options: ``weight`` (broadcastable to the targets' shape) multiplies each term, the group counts are
    unchanged; ``cost_matrix`` ``(C, C)`` scales the ID cross-entropy only, by ``ω_i = cost[y_i, argmax_c f_ic]``
    (not differentiated); entries with ``y == ignore_index`` are left out of the terms and the counts.

    :param logits: ``(B, C)`` or ``(B, C, H, W)``; other ranks raise ``ValueError("Unsupported input shape: ...")``
    :param targets: ``(B,)`` or ``(B, H, W)`` integer labels; ``< 0`` marks OOD
    :param margin: confidence ``m`` below which OOD entries cost nothing
    :param weight: optional floating weights broadcastable to the targets' shape
    :param cost_matrix: optional floating ``(C, C)``
    :param ignore_index: optional int label to ignore
    :param process_group: optional ``torch.distributed`` group of ``W`` ranks: ``'mean'`` divides by the counts
        summed over the group and multiplies by ``W`` (README, "Distributed training"); ``'sum'`` and ``'none'``
        are unaffected
    :return: 0-d for ``'mean'``/``'sum'``, else the targets' shape; in the dtype of ``logits``
    """
    setup, rows, ce, lse = _group_setup(
        "margin_confidence", logits, targets, reduction, weight, cost_matrix, ignore_index
    )
    hinge = (_max_softmax(rows, lse) - margin).relu()
    return _finish("margin_confidence", _id_or_ood(ce, hinge, setup), setup, reduction, process_group)


class MarginConfidenceLoss(nn.Module):
    """Cross-entropy over ID plus ``relu(max softmax − margin)`` over OOD entries.

    See :func:`margin_confidence_loss` for the math, shapes and reductions. Classification ``(B, C)`` and
    segmentation ``(B, C, H, W)``; supervised (uses example outliers, ``targets < 0``).

    Options: ``cost_matrix`` ``(C, C)`` (non-persistent buffer ``cost_matrix``) scales the ID cross-entropy by
    ``cost[y_i, argmax_c f_ic]``; ``ignore_index`` drops the entries with that label; ``forward``'s ``weight``
    (broadcastable to the targets' shape) multiplies each term.
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION, Task.SEGMENTATION},
        inputs={Representation.LOGITS},
        supervised=True,
    )

    #: the function ``forward`` computes; :mod:`oodkernels.loss` swaps in the dispatched one
    _loss_fn = staticmethod(margin_confidence_loss)

    def __init__(
        self,
        margin: float = 0.5,
        reduction: Optional[str] = "mean",
        *,
        cost_matrix: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        process_group=None,
    ):
        """
        :param margin: confidence margin ``m``
        :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None``
        :param cost_matrix: optional ``(C, C)`` confusion costs of the ID cross-entropy
        :param ignore_index: optional label whose entries are left out
        :param process_group: optional ``torch.distributed`` group: ``'mean'`` normalises by the counts of the
            whole group's batch (README, "Distributed training")
        """
        super().__init__()
        self.margin = margin
        self.reduction = reduction
        _init_options(self, cost_matrix, ignore_index, process_group)

    def forward(self, logits: Tensor, targets: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """
        :param logits: ``(B, C)`` or ``(B, C, H, W)``
        :param targets: ``(B,)`` or ``(B, H, W)``; labels ``< 0`` are OOD
        :param weight: optional weights broadcastable to the targets' shape
        :return: the loss, see :func:`margin_confidence_loss`
        """
        return self._loss_fn(
            logits,
            targets,
            self.margin,
            self.reduction,
            weight=weight,
            cost_matrix=self.cost_matrix,
            ignore_index=self.ignore_index,
            process_group=self.process_group,
        )


# ----------------------------------------------------------------------------------------------
# LogitNorm (§3.10)
# ----------------------------------------------------------------------------------------------


def logit_norm_loss(
    logits: Tensor,
    target: Tensor,
    t: float = 1.0,
    reduction: str = "mean",
    *,
    weight: Optional[Tensor] = None,
    cost_matrix: Optional[Tensor] = None,
    ignore_index: Optional[int] = None,
    process_group=None,
) -> Tensor:
    """Cross-entropy of L2-normalised, temperature-scaled logits (Wei et al., ICML 2022; LOSS_CONTRACT.md §3.10).

    OOD rows (``y < 0``, not ignored) are discarded, with the ``UserWarning`` "Discarding samples with targets
    < 0 (OOD), which this loss does not use." (a data check). For every ID row (``w_i = 1`` without ``weight``,
    ``ω_i = 1`` without ``cost_matrix``)::

        ℓ_i = w_i·ω_i·CE(f_i / (t·(‖f_i‖₂ + 1e-7)), y_i)

    Reductions follow PyTorch over the ID rows:

    * ``'mean'``: ``Σ_I ℓ / N_ID``; an attached 0 when ``N_ID = 0``;
    * ``'sum'``: ``Σ_I ℓ`` (0 when ``N_ID = 0``);
    * ``'none'``: the ``N_ID`` values of the ID rows, in order (length ``N_ID``: this reads ``N_ID`` from the
      device once, the one allowed host read);
    * ``None`` or anything else: ``ValueError("<reduction> is not a valid value for reduction")``.

    Options: ``weight`` ``(B,)`` (or broadcastable to it) multiplies each term, ``N_ID`` is unchanged;
    ``cost_matrix`` ``(C, C)`` gives ``ω_i = cost[y_i, argmax_c f_ic]`` over the raw logits (not differentiated);
    rows with ``y == ignore_index`` are left out of the terms, of ``N_ID`` and of the ``'none'`` output.

    :param logits: ``(B, C)`` only
    :param target: ``(B,)``; other shapes raise ``ValueError("Expected targets of shape B, got <shape>")``
    :param t: temperature ``t``
    :param weight: optional floating weights broadcastable to ``(B,)``
    :param cost_matrix: optional floating ``(C, C)``
    :param ignore_index: optional int label to ignore
    :param process_group: optional ``torch.distributed`` group of ``W`` ranks: ``'mean'`` divides by the counts
        summed over the group and multiplies by ``W`` (README, "Distributed training"); ``'sum'`` and ``'none'``
        are unaffected
    :return: 0-d for ``'mean'``/``'sum'``, ``(N_ID,)`` for ``'none'``; in the dtype of ``logits``
    """
    setup = prepare_rows(
        "logit_norm",
        logits,
        target,
        reduction=reduction,
        weight=weight,
        cost_matrix=cost_matrix,
        ignore_index=ignore_index,
        targets_name="target",
    )
    rows = logits.to(setup.acc)
    norm = torch.linalg.vector_norm(rows, ord=2, dim=1, keepdim=True) + 1e-7
    ce, _ = row_cross_entropy(rows / (t * norm), setup.targets)
    values = _id_or_ood(_with_cost(ce, rows, setup), None, setup)
    return _finish("logit_norm", values, setup, reduction, process_group)


class LogitNorm(nn.Module):
    """LogitNorm (Wei et al., ICML 2022), see :func:`logit_norm_loss` (LOSS_CONTRACT.md §3.10).

    Classification only; OOD rows are discarded with a warning. ``reduction=None`` raises ``ValueError``.

    Options: ``cost_matrix`` ``(C, C)`` (non-persistent buffer ``cost_matrix``) scales each term by
    ``cost[y_i, argmax_c f_ic]``; ``ignore_index`` drops the rows with that label; ``forward``'s ``weight``
    ``(B,)`` multiplies each term.
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

    #: the function ``forward`` computes; :mod:`oodkernels.loss` swaps in the dispatched one
    _loss_fn = staticmethod(logit_norm_loss)

    def __init__(self, t=1.0, reduction="mean", *, cost_matrix=None, ignore_index=None, process_group=None):
        """
        :param t: temperature ``t``
        :param reduction: ``'mean'``, ``'sum'`` or ``'none'``
        :param cost_matrix: optional ``(C, C)`` confusion costs
        :param ignore_index: optional label whose rows are left out
        :param process_group: optional ``torch.distributed`` group: ``'mean'`` normalises by the counts of the
            whole group's batch (README, "Distributed training")
        """
        super().__init__()
        self.t = t
        self.reduction = reduction
        _init_options(self, cost_matrix, ignore_index, process_group)

    def forward(self, logits: Tensor, target: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """
        :param logits: ``(B, C)``
        :param target: ``(B,)``; labels ``< 0`` are discarded (with a warning)
        :param weight: optional weights ``(B,)``
        :return: the loss, see :func:`logit_norm_loss`
        """
        return self._loss_fn(
            logits,
            target,
            self.t,
            self.reduction,
            weight=weight,
            cost_matrix=self.cost_matrix,
            ignore_index=self.ignore_index,
            process_group=self.process_group,
        )


# ----------------------------------------------------------------------------------------------
# a per-row building block of the batch-coupled criteria (VOS, EnergyMargin, Objectosphere, Confidence)
# ----------------------------------------------------------------------------------------------


def ce_and_energy(
    logits: Tensor, targets: Tensor, class_weight: Optional[Tensor] = None, uniform_ood: bool = False
) -> tuple[Tensor, Tensor]:
    """Per-entry cross-entropy and energy, ``(R,)`` each in the compute dtype (float64 or float32)::

        ce_i     = lse(f_i) − f_{i, y_i}           ID entries (NaN for y >= C)
        ce_i     = 0, or U(f_i) with uniform_ood   OOD entries
        energy_i = −lse(f_i), or with class_weight w the weighted energy −(m + log Σ_c relu(w_c)·e^(f_ic − m))

    Entries are in the order of ``targets.reshape(-1)`` (4-D maps: every pixel, batch-major). Both outputs
    are differentiable (w.r.t. ``logits`` and ``class_weight``); criteria coupling rows through batch
    means (EnergyMargin, VOS's logistic head, the paired energy margin) do that arithmetic on them.
    Metadata is not checked here: the calling criterion checks its inputs.

    :param logits: (B, C) or (B, C, *S)
    :param targets: (B,) or (B, *S) integer labels, ``< 0`` = OOD
    :param class_weight: C weights, shape (C,), (1, C) or (1, 1) (broadcast), e.g. ``nn.Linear(C, 1).weight``
    :param uniform_ood: OOD entries get the uniform cross-entropy U instead of 0 (the entropic term)
    """
    _, acc = result_dtypes(logits)
    rows, labels = as_rows(logits.to(acc), targets)
    ce, lse = row_cross_entropy(rows, labels)
    is_id = labels >= 0
    other = row_uniform_cross_entropy(rows, lse) if uniform_ood else torch.zeros((), dtype=acc, device=rows.device)
    ce = torch.where(is_id, ce, other)
    if class_weight is None:
        return ce, -lse
    return ce, weighted_energy_of(rows, class_weight.reshape(1, -1))
