"""Deep SVDD and Deep SAD: one center in feature space (LOSS_CONTRACT.md §3.15-3.16).

Both criteria keep a single center ``μ`` (a fixed ``ClassCenters(1, D)``) and work with the squared
distance of each feature vector to it, formed by the clamped expansion of §2.6::

    d_i = max(0, ‖x_i‖² + ‖μ‖² − 2⟨x_i, μ⟩)                     x: (B, D) -> d: (B,)

Deep SVDD (unsupervised) pulls ID rows into the hypersphere of radius r::

    ℓ_i = relu(d_i − r²)              OOD rows (y < 0) are discarded, with the drop-unknown warning

Deep SAD (supervised) also pushes labelled outliers away::

    ℓ_i = d_i                if y_i >= 0
    ℓ_i = η / (d_i + ε)      if y_i <  0

Without a ``center`` argument, ``μ`` is the random N(0, 1) draw of ``ClassCenters`` (kept from
pytorch-ood); a given ``center`` (D,) is stored as a (1, D) *view* of the caller's tensor, so the two
share storage.
"""

from __future__ import annotations

from typing import Optional
from typing import Union

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
from ._common import check_reduction
from ._common import check_same_device
from ._common import check_targets
from ._common import id_mask_with_warning
from ._common import masked_sum
from ._common import result_dtypes
from ._common import select_id_rows
from ._distributed import GlobalCounts
from ._distributed import check_process_group
from .centers import ClassCenters
from .centers import sq_distances

__all__ = ["DeepSVDDLoss", "DeepSADLoss"]


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------


def _init_center(module: nn.Module, n_dim: int, center: Optional[Tensor]) -> None:
    """Create ``module._center`` and, if given, make it a (1, D) view of ``center`` (no copy)."""
    # the N(0, 1) draw of D values happens even when a center is given (RNG stream of pytorch-ood)
    module._center = ClassCenters(1, n_dim, fixed=True)
    if center is not None:
        check_floating("center", center)
        if tuple(center.shape) != (n_dim,):
            raise ShapeError(f"center: expected shape ({n_dim},) to match n_dim={n_dim}, got {tuple(center.shape)}")
        # ``.data`` swaps the storage in place: the Parameter object (and requires_grad=False) stays
        module._center.params.data = center.detach().unsqueeze(0)


def _center_row(center: Union[ClassCenters, Tensor]) -> Tensor:
    """The center as a (1, D) tensor, from a ``ClassCenters`` with one center or a (D,)/(1, D) tensor."""
    if isinstance(center, ClassCenters):
        row = center.params
    elif isinstance(center, Tensor):
        check_floating("center", center)
        row = center.reshape(1, -1) if center.dim() == 1 else center
    else:
        raise TypeError(f"center: expected ClassCenters or a floating-point tensor, got {type(center).__name__}")
    if row.dim() != 2 or row.shape[0] != 1:
        raise ShapeError(f"center: expected a single center of shape (D,) or (1, D), got {tuple(row.shape)}")
    return row


def _check_features(x, n_dim: int, name: str = "x") -> None:
    check_floating(name, x)
    if x.dim() != 2 or x.shape[1] != n_dim:
        raise ShapeError(f"{name}: expected features of shape (B, {n_dim}), got {tuple(x.shape)}")


def _check_labels(y, batch: int, name: str = "y") -> None:
    check_targets(name, y)
    if y.dim() != 1:
        # the drop-unknown message of LOSS_CONTRACT.md §2.2
        raise ValueError(f"Expected targets of shape B, got {tuple(y.shape)}")
    if y.shape[0] != batch:
        raise ShapeError(f"{name}: expected shape ({batch},) to match the features, got {tuple(y.shape)}")


def _sq_distance_to_center(x: Tensor, center_row: Tensor, acc: torch.dtype, fn=sq_distances) -> Tensor:
    """``d_i = max(0, ‖x_i‖² + ‖μ‖² − 2⟨x_i, μ⟩)`` in ``acc``, shape (B,); the center's dtype plays no role.

    ``fn(x, centers, out_dtype)`` computes the distances (the reference's :func:`sq_distances`, or the fused
    kernel, which reads ``x`` as it is and upcasts on load).
    """
    if fn is sq_distances:
        x = x.to(acc)
    return fn(x, center_row.to(acc), acc).squeeze(1)


def _radius_sq(radius, acc: torch.dtype, device) -> Tensor:
    return torch.as_tensor(radius, device=device).to(acc).pow(2)


# ----------------------------------------------------------------------------------------------
# Deep SVDD
# ----------------------------------------------------------------------------------------------


class _OneCenterLoss(nn.Module):
    """Base of the one-center criteria: the center μ (``_center``, a fixed ``ClassCenters(1, D)``) and
    the squared distance ``d_i = ‖x_i − μ‖²`` (expansion, clamped at 0) of features (B, D)."""

    #: the distance function ``(x, centers, out_dtype) -> (B, K)``; :mod:`oodkernels.loss` swaps in the
    #: dispatched one
    _sq_distances_fn = staticmethod(sq_distances)

    def __init__(self, n_dim: int, center: Optional[Tensor]):
        super().__init__()
        _init_center(self, n_dim, center)

    @property
    def center(self) -> ClassCenters:
        """The center μ, a ``ClassCenters`` with one center; ``center(x)`` gives (B, 1) squared distances."""
        return self._center

    def _sq_distance(self, x: Tensor) -> tuple[Tensor, torch.dtype, torch.dtype]:
        """``(d (B,) in the compute dtype, output dtype, compute dtype)`` after the input checks."""
        _check_features(x, self._center.n_features)
        check_same_device(x=x, center=self._center.params)
        out, acc = result_dtypes(x)
        return _sq_distance_to_center(x, self._center.params, acc, self._sq_distances_fn), out, acc


class DeepSVDDLoss(_OneCenterLoss):
    """Deep Support Vector Data Description (one-class and soft-boundary with a fixed radius).

    .. math:: \\ell_i = \\max\\{0, \\lVert x_i - \\mu \\rVert_2^2 - r^2\\}

    The squared distance is formed by expansion and clamped at 0 (LOSS_CONTRACT.md §2.6).

    * ``x``: features (B, D); ``y``: optional labels (B,), rows with ``y < 0`` are discarded with the
      drop-unknown warning (§2.2). Without ``y`` every row is ID.
    * ``'mean'``/``'sum'`` reduce over the ID rows (an empty selection gives an attached 0);
      ``'none'``/``None`` return one value per ID row, i.e. N_ID values (B without ``y``).
    * ``distance(x)`` returns ``‖x − μ‖² − r²`` (B,), which is negative inside the sphere; it is the
      outlier score.

    State: ``_center._params`` (1, D), not trainable; ``radius``, a persistent 0-d float32 buffer
    (update it in place, e.g. ``loss.radius.fill_(q)``, for the soft-boundary objective).
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION},
        inputs={Representation.FEATURES},
        supervised=False,
        paper=Paper(
            title="Deep One-Class Classification",
            venue="ICML",
            year=2018,
            url="http://proceedings.mlr.press/v80/ruff18a/ruff18a.pdf",
        ),
    )

    def __init__(
        self,
        n_dim: int,
        reduction: Optional[str] = "mean",
        radius: float = 0.0,
        center: Optional[Tensor] = None,
        *,
        process_group=None,
    ):
        """
        :param n_dim: dimensionality D of the feature space
        :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None``
        :param radius: radius r of the hypersphere
        :param center: center μ of shape (D,); a random N(0, 1) vector if not given
        :param process_group: optional ``torch.distributed`` group of ``W`` ranks: ``'mean'`` divides by the
            group's ``N_ID`` and is multiplied by ``W`` (README, "Distributed training")
        """
        super().__init__(n_dim, center)
        check_process_group(process_group)
        self.process_group = process_group
        self.register_buffer("radius", torch.tensor(float(radius), dtype=torch.float32))
        self.reduction = reduction

    def distance(self, x: Tensor) -> Tensor:
        """``‖x_i − μ‖² − r²`` for features (B, D) -> (B,), in the dtype of ``x``; may be negative."""
        d, out, acc = self._sq_distance(x)
        return (d - _radius_sq(self.radius, acc, x.device)).to(out)

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """
        :param x: features (B, D)
        :param y: optional labels (B,); rows with ``y < 0`` are discarded (with a warning)
        :return: the reduced loss, or N_ID per-row values for ``'none'``/``None``
        """
        check_reduction(self.reduction)
        _check_features(x, self._center.n_features)
        if y is not None:
            _check_labels(y, x.shape[0])
        check_same_device(x=x, y=y, center=self._center.params)
        out, acc = result_dtypes(x)

        checks = DataChecks(x, y)
        if y is None:
            is_id = torch.ones(x.shape[:1], dtype=torch.bool, device=x.device)
        else:
            is_id = id_mask_with_warning(y, checks)
        rows = (
            _sq_distance_to_center(x, self._center.params, acc, self._sq_distances_fn)
            - _radius_sq(self.radius, acc, x.device)
        ).relu()

        if self.reduction == "mean":
            # no ID row gives an attached 0 (Z(x))
            loss = GlobalCounts(is_id.sum().reshape(1), self.process_group).mean(masked_sum(rows, is_id), 0)
        elif self.reduction == "sum":
            loss = masked_sum(rows, is_id)
        elif y is None:
            loss = rows
        else:
            loss = select_id_rows(rows, is_id)  # the one allowed read: N_ID (LOSS_CONTRACT.md §7.4.1)
        checks.flush()
        return loss.to(out)

    @staticmethod
    def svdd_loss(
        x: Tensor,
        center: Union[ClassCenters, Tensor],
        radius: Union[float, Tensor] = 0.0,
        y: Optional[Tensor] = None,
    ) -> Tensor:
        """Per-row loss ``relu(‖x_i − μ‖² − r²)`` (B,), exactly 0 at OOD rows; never warns.

        :param x: features (B, D)
        :param center: a ``ClassCenters`` with one center, or a tensor (D,) or (1, D)
        :param radius: r, a float or 0-d tensor
        :param y: optional labels (B,); rows with ``y < 0`` get 0
        """
        row = _center_row(center)
        _check_features(x, row.shape[1])
        if y is not None:
            _check_labels(y, x.shape[0])
        check_same_device(x=x, y=y, center=row)
        out, acc = result_dtypes(x)
        values = (_sq_distance_to_center(x, row, acc) - _radius_sq(radius, acc, x.device)).relu()
        if y is not None:
            values = torch.where(y >= 0, values, torch.zeros((), dtype=acc, device=x.device))
        return values.to(out)


# ----------------------------------------------------------------------------------------------
# Deep SAD
# ----------------------------------------------------------------------------------------------


class DeepSADLoss(_OneCenterLoss):
    """Deep Semi-supervised Anomaly Detection: Deep SVDD with labelled outliers pushed away.

    .. math::
        \\ell_i = d_i \\ \\text{if } y_i \\ge 0, \\qquad
        \\ell_i = \\frac{\\eta}{d_i + \\epsilon} \\ \\text{if } y_i < 0,
        \\qquad d_i = \\lVert x_i - \\mu \\rVert_2^2

    * ``x``: features (B, D); ``y``: labels (B,), ``y < 0`` marks a labelled outlier.
    * The reduction runs over **all** B rows (an empty batch gives NaN for ``'mean'``);
      ``'none'``/``None`` return (B,).
    * ``distance(x)`` returns ``d`` (B,), the outlier score.

    State: ``_center._params`` (1, D), not trainable.
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION},
        inputs={Representation.FEATURES},
        supervised=True,
        paper=Paper(
            title="Deep Semi-Supervised Anomaly Detection",
            venue="ICLR",
            year=2020,
            url="https://arxiv.org/abs/1906.02694",
        ),
    )

    def __init__(
        self,
        n_dim: int,
        eta: float = 1.0,
        eps: float = 1e-6,
        reduction: Optional[str] = "mean",
        center: Optional[Tensor] = None,
        *,
        process_group=None,
    ):
        """
        :param n_dim: dimensionality D of the feature space
        :param eta: weight η of the labelled outliers
        :param eps: ε added to an outlier's squared distance before inverting it
        :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None``
        :param center: center μ of shape (D,); a random N(0, 1) vector if not given
        :param process_group: optional ``torch.distributed`` group of ``W`` ranks: ``'mean'`` divides by the
            group's number of rows and is multiplied by ``W`` (README, "Distributed training")
        """
        super().__init__(n_dim, center)
        check_process_group(process_group)
        self.process_group = process_group
        self.eta = eta
        self.eps = eps
        self.reduction = reduction

    def distance(self, x: Tensor) -> Tensor:
        """``‖x_i − μ‖²`` for features (B, D) -> (B,), in the dtype of ``x``."""
        d, out, _ = self._sq_distance(x)
        return d.to(out)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """
        :param x: features (B, D)
        :param y: labels (B,); ``y < 0`` marks labelled outliers
        :return: the reduced loss, or (B,) per-row values for ``'none'``/``None``
        """
        check_reduction(self.reduction)
        _check_features(x, self._center.n_features)
        check_targets("y", y)
        if tuple(y.shape) != (x.shape[0],):
            raise ShapeError(
                f"y: expected shape ({x.shape[0]},) to match x of shape {tuple(x.shape)}, got {tuple(y.shape)}"
            )
        check_same_device(x=x, y=y, center=self._center.params)
        out, acc = result_dtypes(x)

        d = _sq_distance_to_center(x, self._center.params, acc, self._sq_distances_fn)
        is_ood = y < 0
        one = torch.ones((), dtype=acc, device=x.device)
        # the inverse is only formed where it is used, so an ID row at the center (with eps = 0)
        # cannot put 0 * inf into the gradient
        inverse = self.eta / torch.where(is_ood, d + self.eps, one)
        rows = torch.where(is_ood, inverse, d)
        return apply_reduction(rows, self.reduction, self.process_group).to(out)
