"""Conventions shared by every reference criterion (LOSS_CONTRACT.md §2).

Everything here is plain PyTorch and free of host synchronisation, except :meth:`DataChecks.flush`,
which performs the single, optional, batched read of §2.11.

Labels: ``y >= 0`` is in-distribution (ID), ``y < 0`` is out-of-distribution (OOD). Inside the
criteria OOD rows are masked rather than removed ("masks replace compaction"), so means over a
group use a device-side count clamped to at least 1: an empty group then gives an exact zero that
is still attached to the inputs (its gradient is exactly 0).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Callable
from typing import Optional

import torch
from torch import Tensor

from .. import config
from ._distributed import GlobalCounts

DROP_UNKNOWN_MESSAGE = "Discarding samples with targets < 0 (OOD), which this loss does not use."

REDUCTIONS = ("mean", "sum", "none", None)


class ShapeError(ValueError, AssertionError):
    """A tensor has the wrong shape.

    pytorch-ood signals some shape errors with ``assert``; deriving from both ``ValueError`` and
    ``AssertionError`` keeps ``except AssertionError`` handlers working (LOSS_CONTRACT.md §2.7).
    """


class LabelOutOfRangeError(IndexError, ValueError):
    """A label ``>= C`` has no logit column.

    ``IndexError`` is what pytorch-ood (through ``torch.nn.functional.cross_entropy``) raises;
    ``ValueError`` is what oodkernels promises for bad inputs.
    """


# ----------------------------------------------------------------------------------------------
# metadata (LOSS_CONTRACT.md §2.9 and §6)
# ----------------------------------------------------------------------------------------------


class Task(str, Enum):
    """Granularity at which entries are labelled ID or OOD."""

    CLASSIFICATION = "classification"  # one label per sample, logits (B, C)
    SEGMENTATION = "segmentation"  # one label per pixel, logits (B, C, H, W)


class Representation(str, Enum):
    """What a criterion is applied to."""

    LOGITS = "logits"
    FEATURES = "features"
    DISTANCES = "distances"
    CONFIDENCE = "confidence"


@dataclass(frozen=True)
class Paper:
    """The publication that introduced an objective."""

    title: str
    venue: str
    year: int
    url: Optional[str] = None


@dataclass(frozen=True)
class LossInfo:
    """Metadata of a criterion: the tasks it supports, what it is applied to, and whether it takes
    example outliers (targets < 0) during training (``supervised``)."""

    tasks: frozenset
    inputs: frozenset
    supervised: bool
    paper: Optional[Paper] = None

    def __post_init__(self):
        object.__setattr__(self, "tasks", frozenset(self.tasks))
        object.__setattr__(self, "inputs", frozenset(self.inputs))


# ----------------------------------------------------------------------------------------------
# reductions and dtypes
# ----------------------------------------------------------------------------------------------


def check_reduction(reduction, allowed: Sequence = REDUCTIONS) -> None:
    """Raise the reference's bare ``ValueError`` for an unknown reduction before any work is done."""
    if not any(reduction is a or (isinstance(reduction, str) and reduction == a) for a in allowed):
        raise ValueError


def apply_reduction(tensor: Tensor, reduction: Optional[str], process_group=None) -> Tensor:
    """``'mean'`` -> mean, ``'sum'`` -> sum, ``'none'``/``None`` -> unchanged, else bare ``ValueError``.

    With a ``process_group`` of ``W`` ranks, ``'mean'`` is ``W · Σ / N`` with ``N`` the number of entries
    summed over the group (NaN when the whole group's batch is empty)."""
    if reduction == "mean" and process_group is not None:
        count = torch.full((1,), tensor.numel(), dtype=torch.float64, device=tensor.device)
        return GlobalCounts(count, process_group).mean(tensor.sum(), 0, empty_is_nan=True)
    if reduction == "mean":
        return tensor.mean()
    if reduction == "sum":
        return tensor.sum()
    if reduction is None or reduction == "none":
        return tensor
    raise ValueError


def result_dtypes(*tensors: Optional[Tensor]) -> tuple[torch.dtype, torch.dtype]:
    """``(output dtype, compute dtype)`` of a call (LOSS_CONTRACT.md §2.10, fix d).

    The output dtype is the promoted dtype of the floating inputs given (``None`` entries are skipped;
    pass only forward inputs, never parameters). The compute dtype is float64 for float64 output and
    float32 otherwise, so bf16/fp16 inputs are upcast once and the result is rounded once.
    """
    out = None
    for t in tensors:
        if t is None or not t.is_floating_point():
            continue
        out = t.dtype if out is None else torch.promote_types(out, t.dtype)
    if out is None:
        out = torch.get_default_dtype()
    acc = torch.float64 if out == torch.float64 else torch.float32
    return out, acc


def check_floating(name: str, tensor) -> None:
    """``TypeError`` naming ``name`` unless ``tensor`` is a floating-point tensor."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name}: expected a floating-point tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor (float64, float32, bfloat16 or float16), got {tensor.dtype}"
        )


def check_targets(name: str, targets) -> None:
    """``TypeError`` naming ``name`` unless ``targets`` is an integer tensor (labels, ``< 0`` = OOD)."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"{name}: expected an integer tensor of class labels, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(
            f"{name}: expected an integer tensor of class labels (int64; negative labels mark OOD), got {targets.dtype}"
        )


def check_same_device(**tensors: Optional[Tensor]) -> None:
    """``ValueError`` naming the arguments when the given tensors live on different devices."""
    present = {k: v for k, v in tensors.items() if isinstance(v, Tensor)}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"expected all tensors on one device, got {where}")


def check_logits_and_targets(
    logits,
    targets,
    ranks: Optional[Sequence[int]] = (2, 4),
    logits_name: str = "logits",
    targets_name: str = "targets",
) -> None:
    """Metadata checks shared by the logit criteria; always on.

    * ``logits`` floating point, of a rank in ``ranks`` (else the reference's
      ``ValueError("Unsupported input shape: <shape>")``); ``ranks=None`` accepts any rank >= 2;
    * ``targets`` integer, of shape ``logits.shape[:1] + logits.shape[2:]`` (classes on dim 1);
    * both on one device.
    """
    check_floating(logits_name, logits)
    if ranks is not None and logits.dim() not in ranks:
        raise ValueError(f"Unsupported input shape: {logits.shape}")
    if logits.dim() < 2:
        raise ShapeError(f"{logits_name}: expected at least 2 dimensions (B, C, ...), got shape {tuple(logits.shape)}")
    check_targets(targets_name, targets)
    expected = tuple(logits.shape[:1]) + tuple(logits.shape[2:])
    if tuple(targets.shape) != expected:
        raise ShapeError(
            f"{targets_name}: expected shape {expected} to match {logits_name} of shape {tuple(logits.shape)} "
            f"(classes on dim 1), got {tuple(targets.shape)}"
        )
    check_same_device(**{logits_name: logits, targets_name: targets})


# ----------------------------------------------------------------------------------------------
# rows: segmentation maps as flattened pixels
# ----------------------------------------------------------------------------------------------


def as_rows(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """View ``(B, C, *S)`` logits as ``(B·prod(S), C)`` rows and targets as ``(B·prod(S),)``.

    The reference may copy (``movedim`` + ``reshape``); the fused kernels read in place instead.
    Row order is batch-major then spatial, the order of ``targets.reshape(-1)``.
    """
    n_classes = logits.shape[1]
    rows = logits.movedim(1, -1).reshape(-1, n_classes)
    return rows, targets.reshape(-1)


def gather_target_logit(rows: Tensor, targets: Tensor) -> Tensor:
    """``x_{i, y_i}`` for every row, without reading out of bounds.

    Rows with ``y < 0`` get an arbitrary finite column (callers mask them); rows with ``y >= C`` get
    NaN, which is what the kernels produce when data checks are off (LOSS_CONTRACT.md §2.11).
    """
    n_classes = rows.shape[1]
    if n_classes == 0:
        return rows.new_full(targets.shape, float("nan"))
    index = targets.clamp(0, n_classes - 1).long().unsqueeze(1)
    picked = rows.gather(1, index).squeeze(1)
    return torch.where(targets >= n_classes, torch.full_like(picked, float("nan")), picked)


def row_cross_entropy(rows: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(CE(f_i, y_i), lse(f_i))`` per row of ``rows`` (N, C): ``CE = lse − f_{i, y_i}``.

    Rows with ``y < 0`` get an arbitrary finite CE (callers mask them); ``y >= C`` gives NaN.
    """
    lse = torch.logsumexp(rows, dim=1)
    return lse - gather_target_logit(rows, targets), lse


def row_uniform_cross_entropy(rows: Tensor, lse: Tensor) -> Tensor:
    """``U(f_i) = lse(f_i) − (1/C)·Σ_c f_ic``, the cross-entropy of row ``i`` to the uniform distribution."""
    return lse - rows.mean(dim=1)


def weighted_energy_of(logits: Tensor, weight: Tensor) -> Tensor:
    """Weighted energy ``E_w(f) = −(m + log Σ_c relu(w_c)·exp(f_c − m))``, ``m = max_c f_c``, over dim 1.

    :param logits: (N, C, *S) in the compute dtype
    :param weight: C class weights, broadcastable against ``logits`` along dim 1 (e.g. (1, C) for 2-D)
    :return: (N, *S); ``+inf`` where every weight is <= 0
    """
    # the shift m cancels exactly in value and gradient; detaching it keeps it out of the backward pass
    m = logits.amax(dim=1, keepdim=True).detach()
    scaled_sum = (torch.relu(weight.to(logits.dtype)) * torch.exp(logits - m)).sum(dim=1)
    return -(m.squeeze(1) + torch.log(scaled_sum))


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """``Σ_{mask} values`` with exact zeros (and zero gradients) outside the mask."""
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask``; an empty mask gives an exact, attached 0 (not NaN).

    The count stays on the device and is clamped to at least 1 (no host synchronisation).
    """
    count = mask.sum().clamp(min=1).to(values.dtype)
    return masked_sum(values, mask) / count


def zero_loss(*tensors: Optional[Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
    """A 0-d zero attached to ``tensors`` (LOSS_CONTRACT.md §2.3): backward runs, every gradient is 0."""
    parts = [t.sum() * 0 for t in tensors if t is not None]
    total = parts[0]
    for p in parts[1:]:
        total = total + p.to(total.dtype)
    return total if dtype is None else total.to(dtype)


# ----------------------------------------------------------------------------------------------
# data checks (LOSS_CONTRACT.md §2.11): evaluated on the device, read with one transfer
# ----------------------------------------------------------------------------------------------


def _is_fake(t: Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - torch without fake tensors
        return False
    return bool(is_fake(t))


def in_eager_mode(*tensors: Optional[Tensor]) -> bool:
    """False while compiling, tracing (jit or fx), capturing a CUDA graph, or on fake tensors."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    try:  # symbolic tracing only: torch.export and Dynamo are covered by is_compiling()
        from torch.fx._symbolic_trace import is_fx_symbolic_tracing
    except ImportError:  # pragma: no cover - older torch
        is_fx_symbolic_tracing = None
    if is_fx_symbolic_tracing is not None and is_fx_symbolic_tracing():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    # a plain torch.Tensor is never fake (FakeTensor is a subclass): only subclasses need the lookup
    return not any(isinstance(t, Tensor) and type(t) is not Tensor and _is_fake(t) for t in tensors)


def label_out_of_range(name: str, label: float, n_classes: int) -> LabelOutOfRangeError:
    """The error of a label ``>= n_classes`` read by a data check (the reference's and the kernels' checks)."""
    return LabelOutOfRangeError(
        f"{name}: label {int(label)} is out of range for {n_classes} classes "
        f"(expected labels < {n_classes}; negative labels mark OOD samples)"
    )


class DataChecks:
    """Collects the value-dependent checks of one call and reads them with a single transfer.

    Usage inside a criterion::

        checks = DataChecks(logits, targets)
        checks.warn_if((targets < 0).any(), DROP_UNKNOWN_MESSAGE)
        ...  # compute the loss with masks, no host reads
        checks.flush()  # one device-to-host read, then warnings/errors in registration order

    When ``oodkernels.config.data_checks`` is off, or the call is not eager (see
    :func:`in_eager_mode`), nothing is recorded and ``flush`` does nothing.
    """

    def __init__(self, *tensors: Optional[Tensor]):
        self.active = bool(config.data_checks) and in_eager_mode(*tensors)
        self._values: list[Tensor] = []
        self._actions: list[Callable[[float], None]] = []

    def add(self, value: Tensor, action: Callable[[float], None]) -> None:
        """Queue a 0-d tensor whose host value is handed to ``action`` at :meth:`flush`."""
        if self.active:
            self._values.append(value.detach().reshape(()))
            self._actions.append(action)

    def warn_if(self, condition: Tensor, message: str, category=UserWarning) -> None:
        """Warn with ``message`` if the 0-d boolean ``condition`` is true."""

        def action(v: float) -> None:
            if v:
                warnings.warn(message, category, stacklevel=4)

        self.add(condition, action)

    def raise_if(self, condition: Tensor, error: Callable[[], Exception]) -> None:
        """Raise ``error()`` if the 0-d boolean ``condition`` is true."""

        def action(v: float) -> None:
            if v:
                raise error()

        self.add(condition, action)

    def check_labels_below(self, targets: Tensor, n_classes: int, name: str = "targets") -> None:
        """Queue the out-of-range label check: a label ``>= n_classes`` raises :class:`LabelOutOfRangeError`."""
        if not self.active:
            return
        top = targets.max() if targets.numel() else targets.new_full((), -1)

        def action(v: float) -> None:
            if v >= n_classes:
                raise label_out_of_range(name, v, n_classes)

        self.add(top, action)

    def flush(self) -> None:
        """Read every queued value with one transfer, then run the actions in order."""
        if not self._values:
            return
        values = torch.stack([v.to(torch.float64) for v in self._values]).tolist()
        actions = self._actions
        self._values, self._actions = [], []
        for value, action in zip(values, actions):
            action(value)


def id_mask_with_warning(targets: Tensor, checks: DataChecks) -> Tensor:
    """ID mask of a drop-unknown criterion (LOSS_CONTRACT.md §2.2), with the warning queued on ``checks``.

    Raises ``ValueError("Expected targets of shape B, got <shape>")`` for non-1-D targets.
    """
    if targets.dim() != 1:
        raise ValueError(f"Expected targets of shape B, got {tuple(targets.shape)}")
    is_ood = targets < 0
    checks.warn_if(is_ood.any(), DROP_UNKNOWN_MESSAGE)
    return ~is_ood


def select_id_rows(values: Tensor, is_id: Tensor) -> Tensor:
    """The ID entries of a per-row result, in order: the one allowed host read (LOSS_CONTRACT.md §7.4.1).

    Used only for ``'none'`` outputs whose length is N_ID, exactly as pytorch-ood returns them.
    """
    return values[is_id]
