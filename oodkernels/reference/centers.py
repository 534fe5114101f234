"""Class centers and squared distances (LOSS_CONTRACT.md §2.6-2.8).

Squared Euclidean distances are always formed by expansion and clamped at zero::

    P_nm = max(0, ‖x_n‖² + ‖y_m‖² − 2⟨x_n, y_m⟩)          x: (N, D), y: (M, D) -> P: (N, M)

never as ``Σ(x − y)²``. The float32 cancellation of the expansion is part of the contract:
``x = (1000, 1000)``, ``y = (1000.001, 1000)`` give ``0.0`` (exact value 9.5e-7). The gradient is
zero only where the raw expansion is negative; at exactly 0 ``torch.clamp`` passes it through.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch import nn

from ._common import ShapeError
from ._common import check_floating
from ._common import check_same_device
from ._common import check_targets
from ._common import result_dtypes
from ._distributed import differentiable_sum_over_group


def sq_distances(x: Tensor, y: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Clamped expansion ``max(0, ‖x‖² + ‖y‖² − 2 x yᵀ)``; (N, D), (M, D) -> (N, M).

    Computed in float64 for float64 output and in float32 otherwise; returned in ``out_dtype``
    (default: the promoted dtype of ``x`` and ``y``).
    """
    promoted, acc = result_dtypes(x, y)
    out_dtype = promoted if out_dtype is None else out_dtype
    acc = torch.float64 if out_dtype == torch.float64 else acc
    xa, ya = x.to(acc), y.to(acc)
    x_norm = xa.pow(2).sum(1).view(-1, 1)
    y_norm = ya.pow(2).sum(1).view(1, -1)
    dist = x_norm + y_norm - 2.0 * torch.mm(xa, ya.t())
    return dist.clamp(min=0.0).to(out_dtype)


def assigned_sq_distances(x: Tensor, centers: Tensor, index: Tensor) -> Tensor:
    """Squared distance of each row to its own center, summed over the differences (not the expansion).

    ``s_i = Σ_d (x_id − m_{index_i, d})²``; (B, D) features, (K, D) centers, (B,) int64 indices in [0, K), or
    negative for a row without a center: its ``s_i`` is 0 and no gradient reaches it (its features are never
    read, so a non-finite value there stays out of the result and the gradients) -> (B,) in the promoted dtype of
    ``x`` and ``centers``. II's intra-class spread (``‖z_i − μ_{y_i}‖²``, LOSS_CONTRACT §3.13), where no clamp
    and no cancellation of the expansion belong; its OOD rows have no center. No checks: the caller owns the
    indices' range.
    """
    assigned = index >= 0
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    rows = torch.where(assigned.unsqueeze(1), x, zero)  # an unassigned row is never read, not multiplied by 0
    spread = (rows - centers.index_select(0, index.clamp(min=0))).pow(2).sum(1)
    return torch.where(assigned, spread, torch.zeros((), dtype=spread.dtype, device=spread.device))


def pairwise_distances(x: Tensor, y: Optional[Tensor] = None) -> Tensor:
    """Pairwise squared Euclidean distances by expansion, clamped at 0.

    :param x: (N, D)
    :param y: (M, D); defaults to ``x``
    :return: (N, M) with ``P_nm = max(0, ‖x_n‖² + ‖y_m‖² − 2⟨x_n, y_m⟩)``, in the promoted dtype
    """
    check_floating("x", x)
    if x.dim() != 2:
        raise ShapeError(f"x: expected shape (N, D), got {tuple(x.shape)}")
    if y is None:
        return sq_distances(x, x)
    check_floating("y", y)
    if y.dim() != 2 or y.shape[1] != x.shape[1]:
        raise ShapeError(
            f"y: expected shape (M, {x.shape[1]}) to match x of shape {tuple(x.shape)}, got {tuple(y.shape)}"
        )
    check_same_device(x=x, y=y)
    return sq_distances(x, y)


def pairwise_sq_distances(features: Tensor, centers: Tensor) -> Tensor:
    """Squared distances of embeddings to centers by expansion, clamped at 0, in the dtype of ``features``.

    :param features: (B, D)
    :param centers: (K, D)
    :return: (B, K) ``max(0, ‖x_i‖² + ‖m_k‖² − 2⟨x_i, m_k⟩)``, as ``ClassCenters.forward`` computes it (the
        centers never change the output dtype)
    """
    check_floating("features", features)
    check_floating("centers", centers)
    if features.dim() != 2:
        raise ShapeError(f"features: expected embeddings of shape (B, D), got {tuple(features.shape)}")
    if centers.dim() != 2 or centers.shape[1] != features.shape[1]:
        raise ShapeError(
            f"centers: expected centers of shape (K, {features.shape[1]}) to match features of shape "
            f"{tuple(features.shape)}, got {tuple(centers.shape)}"
        )
    check_same_device(features=features, centers=centers)
    return sq_distances(features, centers, out_dtype=features.dtype)


def class_means(
    x: Tensor,
    targets: Tensor,
    n_classes: int,
    valid: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = None,
    process_group=None,
) -> tuple[Tensor, Tensor]:
    """Per-class means of the rows of ``x`` on the device, without a Python loop over classes.

    :param x: (N, D) embeddings
    :param targets: (N,) labels in ``[0, n_classes)`` where ``valid`` (other rows are ignored)
    :param valid: (N,) boolean mask of the rows to use; default all. The other rows are never read (they are
        summed into a spare class that is dropped), so non-finite values there reach neither the means nor the
        gradients, and their gradient is exactly 0
    :param dtype: dtype of the sums (default ``x.dtype``)
    :param process_group: optional ``torch.distributed`` group: the class sums and counts are summed over it
        (one all-reduce, differentiable: its backward sums the gradients of the sums over the group too), so
        every rank gets the means of the whole group's batch
    :return: ``(means (K, D), counts (K,))``; rows of absent classes are NaN, counts in ``dtype``.
        The NaN rows are selected, not computed as 0/0, so they send no NaN into the gradient.
    """
    dtype = x.dtype if dtype is None else dtype
    xs = x.to(dtype)
    index = targets.long().clamp(0, max(n_classes - 1, 0))
    if valid is not None:
        index = torch.where(valid, index, n_classes)  # the spare class, sliced off below
    ones = torch.ones(targets.shape, dtype=dtype, device=x.device)
    sums = torch.zeros((n_classes + 1, x.shape[1]), dtype=dtype, device=x.device).index_add(0, index, xs)[:n_classes]
    counts = torch.zeros((n_classes + 1,), dtype=dtype, device=x.device).index_add(0, index, ones)[:n_classes]
    if process_group is not None:
        packed = differentiable_sum_over_group(torch.cat([sums.flatten(), counts]), process_group)
        sums, counts = packed[: sums.numel()].reshape(sums.shape), packed[sums.numel() :]
    present = (counts > 0).unsqueeze(1)
    means = torch.where(present, sums / counts.clamp(min=1).unsqueeze(1), torch.full_like(sums, float("nan")))
    return means, counts


class ClassCenters(nn.Module):
    """``K`` class centers ``μ_k`` in ``D`` dimensions (class proxies, prototypes or anchors).

    ``_params`` is a (K, D) float32 Parameter drawn as K·D standard normals from the global CPU
    generator at construction (the draw happens even when the owner overwrites the values).
    ``fixed=True`` turns off ``requires_grad``; it stays a Parameter and in the state_dict.

    ``forward(x)``: (N, D) -> (N, K) squared distances ``max(0, ‖x_n‖² + ‖μ_k‖² − 2⟨x_n, μ_k⟩)``,
    in the dtype of ``x`` (parameters never change the output dtype).
    """

    def __init__(self, n_classes: int, n_features: int, fixed: bool = False):
        super().__init__()
        self._params = nn.Parameter(torch.randn(size=(n_classes, n_features)))
        if fixed:
            self._params.requires_grad = False

    @property
    def num_classes(self) -> int:
        """Number of centers ``K``."""
        return self.params.shape[0]

    @property
    def n_features(self) -> int:
        """Dimensionality ``D`` of the space in which the centers live."""
        return self.params.shape[1]

    @property
    def params(self) -> nn.Parameter:
        """The centers, (K, D)."""
        return self._params

    def _check_input(self, x: Tensor) -> None:
        check_floating("x", x)
        if x.dim() != 2 or x.shape[1] != self.n_features:
            raise ShapeError(f"x: expected shape (N, {self.n_features}), got {tuple(x.shape)}")
        check_same_device(x=x, centers=self.params)

    def forward(self, x: Tensor) -> Tensor:
        """(N, D) -> (N, K) squared distances to each center."""
        self._check_input(x)
        return sq_distances(x, self.params, out_dtype=x.dtype)

    def predict(self, x: Tensor) -> Tensor:
        """(N, D) -> (N, K) class membership probabilities ``softmin(distances)``."""
        self._check_input(x)
        _, acc = result_dtypes(x)
        return torch.softmax(-sq_distances(x, self.params, out_dtype=acc), dim=1).to(x.dtype)


class RunningCenters(nn.Module):
    """Class centers estimated from batches by a running mean (LOSS_CONTRACT.md §2.8).

    Persistent float32 buffers ``running_centers`` R (K, D) and ``num_batches_tracked`` n (1,),
    both zero-initialised. ``update`` moves every class present in the batch::

        R_c <- (μ_c + n·R_c) / (n + 1)        then  n <- n + 1

    where μ_c is the batch mean of class c. ``n`` counts every call, so classes absent from early
    batches are biased toward zero (kept for compatibility). R is stored detached (fix c).
    ``forward(x)`` returns (K, N) distances, centers first.
    """

    def __init__(self, n_classes: int, n_embedding: int):
        super().__init__()
        self.num_classes = n_classes
        self.n_embedding = n_embedding
        self.register_buffer("running_centers", torch.zeros((n_classes, n_embedding), dtype=torch.float32))
        self.register_buffer("num_batches_tracked", torch.zeros((1,), dtype=torch.float32))

    @property
    def centers(self) -> Tensor:
        """Current estimates R, (K, D)."""
        return self.running_centers

    def reset(self) -> None:
        """Zero the running estimates and the batch count."""
        self.running_centers.zero_()
        self.num_batches_tracked.zero_()

    def _check(self, x: Tensor, target: Tensor) -> None:
        check_floating("x", x)
        if x.dim() != 2 or x.shape[1] != self.n_embedding:
            raise ShapeError(f"x: expected shape (N, {self.n_embedding}), got {tuple(x.shape)}")
        check_targets("target", target)
        if target.shape != x.shape[:1]:
            raise ShapeError(f"target: expected shape ({x.shape[0]},) to match x, got {tuple(target.shape)}")
        check_same_device(x=x, target=target, running_centers=self.running_centers)

    def calculate_centers(self, embeddings: Tensor, target: Tensor) -> Tensor:
        """(N, D), (N,) -> (K, D) batch class means in the dtype of ``embeddings``; absent classes are NaN."""
        self._check(embeddings, target)
        _, acc = result_dtypes(embeddings)
        means, _ = class_means(embeddings, target, self.num_classes, dtype=acc)
        return means.to(embeddings.dtype)

    def update_from_means(self, means: Tensor, present: Tensor, advance: Optional[Tensor] = None) -> None:
        """Fold batch means (K, D) of the ``present`` classes (K,) into the running estimates, in place.

        The batch count grows by ``advance`` (default 1; a 0-d device tensor keeps a data-dependent
        step on the device, e.g. IILoss does not count a batch without ID rows).
        """
        n = self.num_batches_tracked
        blended = (means.detach().to(torch.float32) + self.running_centers * n) / (n + 1)
        self.running_centers.copy_(torch.where(present.unsqueeze(1), blended, self.running_centers))
        self.num_batches_tracked.add_(1 if advance is None else advance.to(n.dtype))

    def update(self, x: Tensor, target: Tensor) -> Tensor:
        """Update the running centers with a batch of ID embeddings; returns the batch means (K, D).

        The returned means carry gradients; the buffers never do.
        """
        self._check(x, target)
        _, acc = result_dtypes(x)
        means, counts = class_means(x, target, self.num_classes, dtype=acc)
        self.update_from_means(means, counts > 0)
        return means.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """(N, D) -> (K, N) squared distances, centers first."""
        check_floating("x", x)
        if x.dim() != 2 or x.shape[1] != self.n_embedding:
            raise ShapeError(f"x: expected shape (N, {self.n_embedding}), got {tuple(x.shape)}")
        check_same_device(x=x, running_centers=self.running_centers)
        return sq_distances(self.running_centers, x, out_dtype=x.dtype)
