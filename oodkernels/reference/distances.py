"""Distance-based criteria: CAC, Center, II and MCHAD (LOSS_CONTRACT.md §3.11-3.14).

These losses work with squared Euclidean distances ``d_ic`` of an embedding ``z_i`` to class centers
``μ_c`` (see :mod:`oodkernels.reference.centers`). CAC, Center and MCHAD take the (B, C) distance
matrix as input (the module's ``distance(z)`` produces it); II takes the embeddings themselves and
estimates the centers from the batches.

OOD rows (``y < 0``) are masked rather than removed, so every call is free of host reads except
the single optional :meth:`DataChecks.flush`. A batch without ID rows gives an exact zero that is
attached to the input (all gradients 0). Outputs take the dtype of the forward input; the float32
centers never change it.
"""

from __future__ import annotations

import logging
import warnings
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
from ._common import gather_target_logit
from ._common import id_mask_with_warning
from ._common import masked_mean
from ._common import masked_sum
from ._common import result_dtypes
from ._common import row_cross_entropy
from ._common import select_id_rows
from ._distributed import GlobalCounts
from ._distributed import check_process_group
from ._distributed import group_size
from .centers import ClassCenters
from .centers import RunningCenters
from .centers import assigned_sq_distances
from .centers import class_means
from .centers import sq_distances
from .logits import CrossEntropyLoss

log = logging.getLogger(__name__)

__all__ = [
    "CACLoss",
    "CenterLoss",
    "CenterRegularizationLoss",
    "IILoss",
    "MCHADLoss",
    "cac_distance_loss",
    "center_distance_loss",
    "mchad_distance_loss",
    "cac_loss",
    "center_loss",
    "mchad_loss",
]

CAC_EXPONENT_MAX = 50.0  # §5: the exponent d_y - d_c of the tuplet term is clamped at 50
CENTER_CLAMP_MIN = 1e-12  # §5: every entry of the masked center term is clamped to [1e-12, 1e12]
CENTER_CLAMP_MAX = 1e12
II_PAIR_CAP = 1e24  # §5: value of non-pairs (diagonal, absent classes) in II's minimum; it caps the separation

II_SINGLE_CLASS_MESSAGE = (
    "IILoss: fewer than two classes present in the batch; the inter-class separation term is set to 0."
)


# ----------------------------------------------------------------------------------------------
# input checks (always on)
# ----------------------------------------------------------------------------------------------


def _check_distance_input(
    distances,
    targets,
    n_classes: Optional[int],
    distances_name: str,
    targets_name: str,
    one_dim_targets_error: bool = False,
) -> None:
    """Metadata checks of a (B, C) distance matrix and its (B,) labels.

    A non-1-D ``targets`` is left to :func:`id_mask_with_warning` (the reference's message) unless
    ``one_dim_targets_error`` is set, for the criteria that never call it.
    """
    check_floating(distances_name, distances)
    if distances.dim() != 2:
        raise ShapeError(
            f"{distances_name}: expected distances of shape (B, C) to the class centers, got {tuple(distances.shape)}"
        )
    if n_classes is not None and distances.shape[1] != n_classes:
        raise ShapeError(
            f"{distances_name}: expected distances to n_classes={n_classes} centers, i.e. shape (B, {n_classes}), "
            f"got {tuple(distances.shape)}"
        )
    check_targets(targets_name, targets)
    if targets.dim() != 1:
        if one_dim_targets_error:
            raise ShapeError(f"{targets_name}: expected labels of shape (B,), got {tuple(targets.shape)}")
        return  # id_mask_with_warning raises the reference's ValueError
    if targets.shape[0] != distances.shape[0]:
        raise ShapeError(
            f"{targets_name}: expected shape ({distances.shape[0]},) to match {distances_name} of shape "
            f"{tuple(distances.shape)}, got {tuple(targets.shape)}"
        )
    check_same_device(**{distances_name: distances, targets_name: targets})


def _check_embeddings(x, n_embedding: int, name: str) -> None:
    check_floating(name, x)
    if x.dim() != 2 or x.shape[1] != n_embedding:
        raise ShapeError(f"{name}: expected embeddings of shape (B, {n_embedding}), got {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------
# CAC (§3.11)
# ----------------------------------------------------------------------------------------------


def _cac(
    distances: Tensor,
    targets: Tensor,
    alpha: float,
    n_classes: Optional[int],
    distances_name: str,
    targets_name: str,
    process_group=None,
) -> Tensor:
    _check_distance_input(distances, targets, n_classes, distances_name, targets_name)
    out, acc = result_dtypes(distances)
    n_cols = distances.shape[1]
    checks = DataChecks(distances, targets)
    is_id = id_mask_with_warning(targets, checks)
    checks.check_labels_below(targets, n_cols, targets_name)

    # OOD rows are replaced by zeros first: they are masked out below, and this keeps non-finite
    # values in them from reaching the gradient.
    d = torch.where(is_id.unsqueeze(1), distances.to(acc), torch.zeros((), dtype=acc, device=distances.device))
    d_true = gather_target_logit(d, targets)  # NaN for labels >= C (checks off)
    counts = GlobalCounts(is_id.sum().reshape(1), process_group)
    anchor = counts.mean(masked_sum(d_true, is_id), 0)

    cols = torch.arange(n_cols, device=distances.device)
    others = cols.unsqueeze(0) != targets.unsqueeze(1)  # fix a: every column except the target
    terms = torch.exp(torch.clamp(d_true.unsqueeze(1) - d, max=CAC_EXPONENT_MAX))
    tuplet_rows = torch.log1p(torch.where(others, terms, torch.zeros_like(terms)).sum(1))
    tuplet = counts.mean(masked_sum(tuplet_rows, is_id), 0)

    loss = alpha * anchor + tuplet
    checks.flush()
    return loss.to(out)


def cac_distance_loss(
    distances: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    *,
    n_classes: Optional[int] = None,
    distances_name: str = "distances",
    targets_name: str = "targets",
    process_group=None,
) -> Tensor:
    """Class Anchor Clustering loss on squared distances to the anchors (with fix a).

    .. math::
        \\mathcal{L} = \\alpha \\, \\mathrm{mean}_{i \\in I} d_{i,y_i}
            + \\mathrm{mean}_{i \\in I} \\log\\Bigl(1 + \\sum_{c \\neq y_i} e^{\\min(d_{i,y_i} - d_{ic}, 50)}\\Bigr)

    The tuplet term sums over every class except the target, as in the CAC paper (fix a; pytorch-ood
    0.4.0 sums over columns ``0..C-2`` whatever the label). The exponent is clamped at 50 (zero
    gradient above). OOD rows (``targets < 0``) do not contribute (with the drop-unknown warning);
    without ID rows the result is an attached 0.

    :param distances: (B, C) squared distances ``d_ic`` of each sample to each anchor
    :param targets: (B,) int64 labels; ``< 0`` marks OOD rows, ``>= C`` is an error (NaN with checks off)
    :param alpha: weight of the anchor term
    :param n_classes: if given, the number of columns ``distances`` must have (the module's check)
    :param distances_name: name of ``distances`` in error messages (likewise ``targets_name``)
    :param process_group: optional ``torch.distributed`` group of ``W`` ranks: every mean over the ID rows
        divides by the group's ``N_ID`` and is multiplied by ``W`` (README, "Distributed training")
    :return: 0-d loss in the dtype of ``distances``
    """
    return _cac(distances, targets, alpha, n_classes, distances_name, targets_name, process_group)


def _cac_gamma(distance: Tensor) -> tuple[Tensor, torch.dtype]:
    check_floating("distance", distance)
    if distance.dim() != 2:
        raise ShapeError(f"distance: expected squared distances of shape (B, C), got {tuple(distance.shape)}")
    out, acc = result_dtypes(distance)
    d = distance.to(acc)
    return d * (1 - torch.softmax(-d, dim=1)), out


class CACLoss(nn.Module):
    """Class Anchor Clustering loss (Miller et al., WACV 2021), LOSS_CONTRACT.md §3.11.

    The anchors are the non-trainable :class:`ClassCenters` ``_centers`` of shape (C, C): the
    construction draws C·C normals (as pytorch-ood does) and then sets them to
    ``magnitude · identity``. ``distance(x)`` gives the (B, C) squared distances of embeddings
    ``x`` (B, C) to the anchors, which ``forward(distances, target)`` turns into the scalar
    :func:`cac_distance_loss` (paper-correct tuplet term, fix a).

    Two scores (fix b), both on squared distances, with ``γ_c = d_c · (1 − softmin(d)_c)``:

    * :meth:`score` = ``−max_c γ_c``, pytorch-ood's score (kept for compatibility). It ranks points
      that are far from *every* anchor as in-distribution-like.
    * :meth:`rejection_score` = ``min_c γ_c``, the rejection score of the CAC paper (higher = more OOD).
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION},
        inputs={Representation.DISTANCES},
        supervised=False,
        paper=Paper(
            title="Class Anchor Clustering: a Loss for Distance-based Open Set Recognition",
            venue="WACV",
            year=2021,
            url="https://arxiv.org/abs/2004.02434",
        ),
    )

    #: the functions ``distance`` and ``forward`` compute; :mod:`oodkernels.loss` swaps in the dispatched ones
    _sq_distances_fn = staticmethod(sq_distances)
    _loss_fn = staticmethod(cac_distance_loss)

    def __init__(self, n_classes: int, magnitude: float = 1.0, alpha: float = 1.0, *, process_group=None):
        """
        :param n_classes: number of classes C (the anchors live in C dimensions)
        :param magnitude: length of the anchors ``magnitude · e_c``
        :param alpha: weight of the anchor term
        :param process_group: optional ``torch.distributed`` group: the means divide by the group's ``N_ID``
            (README, "Distributed training")
        """
        super().__init__()
        check_process_group(process_group)
        self.process_group = process_group
        self.n_classes = n_classes
        self.magnitude = magnitude
        self.alpha = alpha
        self._centers = ClassCenters(n_classes, n_classes, fixed=True)  # draws C·C normals
        with torch.no_grad():
            nn.init.eye_(self._centers.params)
            self._centers.params.mul_(magnitude)

    @property
    def centers(self) -> ClassCenters:
        """The anchors (a :class:`ClassCenters` module, (C, C) parameters)."""
        return self._centers

    def distance(self, x: Tensor) -> Tensor:
        """(B, C) embeddings -> (B, C) squared distances to the anchors, in the dtype of ``x``."""
        self._centers._check_input(x)
        return self._sq_distances_fn(x, self._centers.params, x.dtype)

    def forward(self, distances: Tensor, target: Tensor) -> Tensor:
        """(B, C) squared distances, (B,) labels -> 0-d loss (see :func:`cac_distance_loss`)."""
        return self._loss_fn(
            distances,
            target,
            self.alpha,
            n_classes=self.n_classes,
            distances_name="distances",
            targets_name="target",
            process_group=self.process_group,
        )

    @staticmethod
    def score(distance: Tensor) -> Tensor:
        """pytorch-ood's CAC score ``−max_c d_c (1 − softmin(d)_c)``; (B, C) -> (B,).

        Kept for compatibility (fix b). Note that it is *not* the paper's rejection score: a point
        far from every anchor gets a very negative, i.e. in-distribution-like, value. See
        :meth:`rejection_score`.
        """
        gamma, out = _cac_gamma(distance)
        return (-gamma.amax(dim=1)).to(out)

    @staticmethod
    def rejection_score(distance: Tensor) -> Tensor:
        """Rejection score of the CAC paper ``min_c d_c (1 − softmin(d)_c)``; (B, C) -> (B,), higher = more OOD.

        Takes squared distances, like :meth:`score` (no square roots).
        """
        gamma, out = _cac_gamma(distance)
        return gamma.amin(dim=1).to(out)


# ----------------------------------------------------------------------------------------------
# Center (§3.12)
# ----------------------------------------------------------------------------------------------


def _center_term(d: Tensor, targets: Tensor, is_id: Tensor, radius: float, counts: GlobalCounts) -> Tensor:
    """Mean over the N_ID·C entries of ``clamp(relu(d − r)·[c = y], 1e-12, 1e12)``; ``d`` in compute dtype;
    ``counts`` holds ``N_ID`` (a process group's, or this call's).

    A label ``>= C`` has no target column, so its row contributes ``C·1e-12`` as in pytorch-ood.
    """
    n_cols = d.shape[1]
    cols = torch.arange(n_cols, device=d.device)
    onehot = cols.unsqueeze(0) == targets.unsqueeze(1)
    pulled = torch.where(onehot, torch.relu(d - radius), torch.zeros((), dtype=d.dtype, device=d.device))
    entries = torch.clamp(pulled, min=CENTER_CLAMP_MIN, max=CENTER_CLAMP_MAX)
    return counts.mean(masked_sum(entries.sum(1), is_id), 0) / max(n_cols, 1)


def _center(
    distmat: Tensor,
    targets: Tensor,
    radius: float,
    n_classes: Optional[int],
    distances_name: str,
    targets_name: str,
    process_group=None,
) -> Tensor:
    _check_distance_input(distmat, targets, n_classes, distances_name, targets_name)
    out, acc = result_dtypes(distmat)
    checks = DataChecks(distmat, targets)
    is_id = id_mask_with_warning(targets, checks)
    d = torch.where(is_id.unsqueeze(1), distmat.to(acc), torch.zeros((), dtype=acc, device=distmat.device))
    loss = _center_term(d, targets, is_id, radius, GlobalCounts(is_id.sum().reshape(1), process_group))
    checks.flush()
    return loss.to(out)


def center_distance_loss(
    distances: Tensor,
    targets: Tensor,
    radius: float = 0.0,
    *,
    n_classes: Optional[int] = None,
    distances_name: str = "distances",
    targets_name: str = "targets",
    process_group=None,
) -> Tensor:
    """Generalised center loss on squared distances, averaged over the N_ID·C entries (as pytorch-ood).

    .. math::
        \\mathcal{L} = \\frac{1}{N_{ID} C} \\sum_{i \\in I} \\sum_c
            \\mathrm{clamp}\\bigl(\\mathrm{relu}(d_{ic} - r)\\,[c = y_i],\\ 10^{-12},\\ 10^{12}\\bigr)
          = \\frac{\\sum_{i \\in I} \\mathrm{clamp}(\\mathrm{relu}(d_{i,y_i} - r), 10^{-12}, 10^{12})
            + N_{ID}(C-1) 10^{-12}}{N_{ID} C}

    ``r`` is subtracted from the *squared* distance. The gradient is 0 outside (1e-12, 1e12). OOD rows
    are discarded (with the drop-unknown warning); without ID rows the result is an attached 0.

    :param distances: (B, C) squared distances to the class centers
    :param targets: (B,) int64 labels; ``< 0`` marks OOD rows
    :param radius: radius ``r``
    :param n_classes: if given, the number of columns ``distances`` must have (the module's check)
    :param distances_name: name of ``distances`` in error messages (likewise ``targets_name``)
    :param process_group: optional ``torch.distributed`` group of ``W`` ranks: every mean over the ID rows
        divides by the group's ``N_ID`` and is multiplied by ``W`` (README, "Distributed training")
    :return: 0-d loss in the dtype of ``distances``
    """
    return _center(distances, targets, radius, n_classes, distances_name, targets_name, process_group)


class CenterLoss(nn.Module):
    """Generalised center loss (Wen et al., ECCV 2016), LOSS_CONTRACT.md §3.12.

    Holds the class centers ``_centers`` (:class:`ClassCenters`, (C, D), trainable unless ``fixed``).
    Construction draws C·D normals; then, if C = D, the centers become the identity, scaled by
    ``magnitude`` only when ``fixed``; otherwise C·D further normals are drawn, and a ``magnitude``
    other than 1 is not applied (the logger says so). ``distance(z)`` gives the (B, C) squared
    distances that ``forward(distmat, target)`` turns into :func:`center_distance_loss`.
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION},
        inputs={Representation.DISTANCES},
        supervised=False,
        paper=Paper(
            title="A Discriminative Feature Learning Approach for Deep Face Recognition",
            venue="ECCV",
            year=2016,
            url="https://ydwen.github.io/papers/WenECCV16.pdf",
        ),
    )

    #: the functions ``distance`` and ``forward`` compute; :mod:`oodkernels.loss` swaps in the dispatched ones
    _sq_distances_fn = staticmethod(sq_distances)
    _loss_fn = staticmethod(center_distance_loss)

    def __init__(
        self,
        n_classes: int,
        n_dim: int,
        magnitude: float = 1.0,
        radius: float = 0.0,
        fixed: bool = False,
        *,
        process_group=None,
    ):
        """
        :param n_classes: number of classes C
        :param n_dim: dimension D of the space of the centers
        :param magnitude: scale of the identity initialisation (used only if C = D and ``fixed``)
        :param radius: radius r, subtracted from the squared distance
        :param fixed: whether the centers are frozen
        :param process_group: optional ``torch.distributed`` group: the mean divides by the group's ``N_ID``
            (README, "Distributed training")
        """
        super().__init__()
        check_process_group(process_group)
        self.process_group = process_group
        self.num_classes = n_classes
        self.feat_dim = n_dim
        self.magnitude = magnitude
        self.radius = radius
        self._centers = ClassCenters(n_classes=n_classes, n_features=n_dim, fixed=fixed)
        with torch.no_grad():
            if n_classes == n_dim:
                nn.init.eye_(self._centers.params)
                if fixed:
                    self._centers.params.mul_(magnitude)
            else:
                # a second draw of C·D normals, as pytorch-ood does (the values of the first are discarded)
                nn.init.normal_(self._centers.params)
                if magnitude != 1:
                    log.warning("Not applying magnitude parameter.")

    @property
    def centers(self) -> ClassCenters:
        """The class centers (a :class:`ClassCenters` module)."""
        return self._centers

    def distance(self, z: Tensor) -> Tensor:
        """(B, D) embeddings -> (B, C) squared distances to the centers, in the dtype of ``z``."""
        self._centers._check_input(z)
        return self._sq_distances_fn(z, self._centers.params, z.dtype)

    def forward(self, distmat: Tensor, target: Tensor) -> Tensor:
        """(B, C) squared distances, (B,) labels -> 0-d loss (see :func:`center_distance_loss`)."""
        return self._loss_fn(
            distmat,
            target,
            self.radius,
            n_classes=self.num_classes,
            distances_name="distmat",
            targets_name="target",
            process_group=self.process_group,
        )


# ----------------------------------------------------------------------------------------------
# II (§3.13)
# ----------------------------------------------------------------------------------------------


class IILoss(nn.Module):
    """II loss (Hassen & Chan, SDM 2020), LOSS_CONTRACT.md §3.13.

    With μ the class centers and P the set of classes present among the ID rows:

    .. math::
        \\mathcal{L} = \\frac{1}{N_{ID}} \\sum_{i \\in I} \\lVert z_i - \\mu_{y_i} \\rVert^2
            - \\alpha \\min_{a \\neq b \\in P} \\min\\bigl(\\lVert \\mu_a - \\mu_b \\rVert^2, 10^{24}\\bigr)

    (the pair distance is the clamped expansion of :func:`pairwise_distances`).

    * Training: μ are the batch means of the ID rows (they carry gradients), and the running
      centers ``running_centers`` (:class:`RunningCenters`, detached buffers, fix c) are updated.
    * Eval: μ are the running centers; nothing is updated.
    * With fewer than two classes present the inter-class term is 0 (fix c; pytorch-ood gives
      ``−α·1e24``), and the first such call of an instance warns (a data check).
    * OOD rows are discarded (with the drop-unknown warning); without ID rows the result is an
      attached 0 and the running centers are left alone.
    * With a ``process_group`` of ``W`` ranks, μ are the class means of the whole group's batch (the class
      sums and counts are all-reduced, differentiably), the running centers fold in those global means (the
      same update on every rank), and each rank returns ``W·Σ_local ‖z_i − μ_{y_i}‖² / N_ID,global − α·sep(μ)``:
      the mean of the ranks' values is the whole-batch loss, and DDP's average gradient is the whole batch's.

    ``distance(x)`` (B, C) squared distances to the running centers, ``predict(x)`` their softmin;
    the documented OOD score is ``distance(x).min(dim=1)``.
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION},
        inputs={Representation.FEATURES},
        supervised=False,
        paper=Paper(
            title="Learning a Neural-network-based Representation for Open Set Recognition",
            venue="SDM",
            year=2020,
            url="https://arxiv.org/abs/1802.04365",
        ),
    )

    #: the distance function of ``distance``, ``predict`` and the class-mean pairs, and the rows' distances to
    #: their own class mean; :mod:`oodkernels.loss` swaps in the dispatched ones
    _sq_distances_fn = staticmethod(sq_distances)
    _assigned_sq_distances_fn = staticmethod(assigned_sq_distances)

    def __init__(self, n_classes: int, n_embedding: int, alpha: float = 1.0, *, process_group=None):
        """
        :param n_classes: number of classes C
        :param n_embedding: dimension D of the embeddings
        :param alpha: weight of the inter-class separation
        :param process_group: optional ``torch.distributed`` group: the class means and ``N_ID`` are the
            whole group batch's (README, "Distributed training")
        """
        super().__init__()
        check_process_group(process_group)
        self.process_group = process_group
        self.num_classes = n_classes
        self.running_centers = RunningCenters(n_classes=n_classes, n_embedding=n_embedding)
        self.alpha = alpha
        self._warned_single_class = False

    @property
    def centers(self) -> RunningCenters:
        """The running class centers (a :class:`RunningCenters` module)."""
        return self.running_centers

    def distance(self, x: Tensor) -> Tensor:
        """(B, D) embeddings -> (B, C) squared distances to the running centers, in the dtype of ``x``."""
        _check_embeddings(x, self.running_centers.n_embedding, "x")
        check_same_device(x=x, running_centers=self.running_centers.running_centers)
        return self._sq_distances_fn(x, self.running_centers.running_centers, x.dtype)

    def predict(self, x: Tensor) -> Tensor:
        """(B, D) embeddings -> (B, C) class probabilities ``softmin`` of :meth:`distance`."""
        _check_embeddings(x, self.running_centers.n_embedding, "x")
        check_same_device(x=x, running_centers=self.running_centers.running_centers)
        _, acc = result_dtypes(x)
        dist = self._sq_distances_fn(x, self.running_centers.running_centers, acc)
        return torch.softmax(-dist, dim=1).to(x.dtype)

    def _single_class_action(self, value: float) -> None:
        if value and not self._warned_single_class:
            self._warned_single_class = True
            warnings.warn(II_SINGLE_CLASS_MESSAGE, UserWarning, stacklevel=4)

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        """(B, D) embeddings, (B,) labels -> 0-d loss; updates the running centers in training mode."""
        n_classes = self.num_classes
        _check_embeddings(x, self.running_centers.n_embedding, "x")
        check_targets("target", target)
        if target.dim() == 1 and target.shape[0] != x.shape[0]:
            raise ShapeError(f"target: expected shape ({x.shape[0]},) to match x, got {tuple(target.shape)}")
        check_same_device(x=x, target=target, running_centers=self.running_centers.running_centers)
        out, acc = result_dtypes(x)
        zero = torch.zeros((), dtype=acc, device=x.device)

        checks = DataChecks(x, target)
        is_id = id_mask_with_warning(target, checks)
        checks.check_labels_below(target, n_classes, "target")
        usable = is_id & (target < n_classes)  # labels >= C (checks off) give NaN below, not a wrong class

        # OOD rows are never read (class_means sums them into a dropped class, the spread gives them no center),
        # so their gradient is exactly 0 even where they are not finite
        xs = x.to(acc)
        means, counts = class_means(xs, target, n_classes, valid=usable, dtype=acc, process_group=self.process_group)
        present = counts > 0
        if self.training:
            self.running_centers.update_from_means(means, present, advance=present.any())
            mu = torch.where(present.unsqueeze(1), means, zero)  # absent classes: NaN -> 0 (never read)
        else:
            mu = self.running_centers.running_centers.to(acc)

        index = torch.where(usable, target.long(), -1)
        spread = self._assigned_sq_distances_fn(xs, mu, index)
        spread = torch.where(is_id & ~usable, torch.full_like(spread, float("nan")), spread)
        if self.process_group is None:
            intra = masked_mean(spread, is_id)
        else:  # W·Σ_local / N_ID of the group (its class counts; rows with labels >= C are NaN here anyway)
            intra = masked_sum(spread, is_id) / counts.sum().clamp(min=1) * group_size(self.process_group)

        n_present = present.sum()
        pairs = present.unsqueeze(0) & present.unsqueeze(1) & ~torch.eye(n_classes, dtype=torch.bool, device=x.device)
        cap = torch.full((), II_PAIR_CAP, dtype=acc, device=x.device)
        pair_dist = torch.where(pairs, self._sq_distances_fn(mu, mu, acc), cap)
        separation = pair_dist.min()
        inter = torch.where(n_present >= 2, -separation, zero)

        if not self._warned_single_class:
            checks.add(n_present == 1, self._single_class_action)
        loss = intra + self.alpha * inter
        checks.flush()
        return loss.to(out)


# ----------------------------------------------------------------------------------------------
# MCHAD (§3.14)
# ----------------------------------------------------------------------------------------------


def _mchad(
    distmat: Tensor,
    targets: Tensor,
    radius: float,
    margin: Union[float, Tensor],
    weight_center: float,
    weight_nll: float,
    weight_oe: float,
    n_classes: Optional[int],
    distances_name: str,
    targets_name: str,
    process_group=None,
) -> Tensor:
    _check_distance_input(distmat, targets, n_classes, distances_name, targets_name, one_dim_targets_error=True)
    out, acc = result_dtypes(distmat)
    n_cols = distmat.shape[1]
    checks = DataChecks(distmat, targets)
    checks.check_labels_below(targets, n_cols, targets_name)  # cross-entropy term; MCHAD never warns
    is_id = targets >= 0
    is_ood = ~is_id
    zero = torch.zeros((), dtype=acc, device=distmat.device)
    d = distmat.to(acc)

    d_id = torch.where(is_id.unsqueeze(1), d, zero)
    counts = GlobalCounts(is_id.sum().reshape(1), process_group)
    center = _center_term(d_id, targets, is_id, radius, counts)
    nll_rows, _ = row_cross_entropy(-d_id, targets)  # CE(−d_i, y_i)
    nll = counts.mean(masked_sum(nll_rows, is_id), 0)

    m = margin.to(device=distmat.device, dtype=acc) if isinstance(margin, Tensor) else margin
    d_ood = torch.where(is_ood.unsqueeze(1), d, zero)
    push_rows = torch.relu(m**2 - d_ood.pow(2)).sum(1)
    push = counts.sum(masked_sum(push_rows, is_ood))  # a sum (pytorch-ood's): W·Σ_local with a group

    loss = weight_center * center + weight_nll * nll + weight_oe * push
    checks.flush()
    return loss.reshape(()).to(out)


def mchad_distance_loss(
    distances: Tensor,
    targets: Tensor,
    radius: float = 0.0,
    margin: Union[float, Tensor] = 0.0,
    weight_center: float = 1.0,
    weight_nll: float = 1.0,
    weight_oe: float = 1.0,
    *,
    n_classes: Optional[int] = None,
    distances_name: str = "distances",
    targets_name: str = "targets",
    process_group=None,
) -> Tensor:
    """MCHAD loss on squared distances ``d`` (B, C), as pytorch-ood 0.4.0 implements it.

    .. math::
        \\mathcal{L} = w_c \\Lambda + w_n \\Delta + w_o \\Theta, \\qquad
        \\Lambda = \\text{center term of } I \\text{ (see center\\_distance\\_loss)}, \\quad
        \\Delta = \\mathrm{mean}_{i \\in I} \\mathrm{CE}(-d_i, y_i), \\quad
        \\Theta = \\sum_{i \\in O} \\sum_c \\mathrm{relu}(m^2 - d_{ic}^2)

    Θ squares the already squared distance, ignores the radius and is a sum (kept for
    compatibility). Empty groups give 0 for their terms. Never warns.

    :param distances: (B, C) squared distances to the class centers
    :param targets: (B,) int64 labels; ``< 0`` marks OOD rows (used by Θ only)
    :param radius: radius r of the center term
    :param margin: margin m (a float or a 0-d/(1,) tensor, e.g. the module's parameter)
    :param process_group: optional ``torch.distributed`` group of ``W`` ranks: Λ and Δ divide by the group's
        ``N_ID`` and Θ (a sum) is counted ``W`` times, each times ``W`` (README, "Distributed training")
    :return: 0-d loss in the dtype of ``distances``
    """
    return _mchad(
        distances,
        targets,
        radius,
        margin,
        weight_center,
        weight_nll,
        weight_oe,
        n_classes,
        distances_name,
        targets_name,
        process_group,
    )


class CenterRegularizationLoss(nn.Module):
    """MCHAD's outlier term Θ: ``Σ_c relu(m² − d_ic²)`` for each OOD row ``i``, then reduced.

    ``margin`` is a non-trainable (1,) float32 Parameter. ``reduction``: ``'sum'`` (MCHAD's) and
    ``'mean'`` give 0 without OOD rows; ``'none'``/``None`` return the N_OOD row values (one host
    read of the count).
    """

    def __init__(self, margin: float, reduction: Optional[str] = "sum"):
        super().__init__()
        check_reduction(reduction)
        self.margin = nn.Parameter(torch.tensor([margin], dtype=torch.float32), requires_grad=False)
        self.reduction = reduction

    def forward(self, distmat: Tensor, target: Tensor) -> Tensor:
        _check_distance_input(distmat, target, None, "distmat", "target", one_dim_targets_error=True)
        out, acc = result_dtypes(distmat)
        is_ood = target < 0
        d = torch.where(is_ood.unsqueeze(1), distmat.to(acc), torch.zeros((), dtype=acc, device=distmat.device))
        m = self.margin.to(device=distmat.device, dtype=acc)
        rows = torch.relu(m.pow(2) - d.pow(2)).sum(1)
        if self.reduction == "sum":
            value = masked_sum(rows, is_ood)
        elif self.reduction == "mean":
            value = masked_mean(rows, is_ood)
        else:
            value = apply_reduction(select_id_rows(rows, is_ood), self.reduction)
        return value.to(out)


class MCHADLoss(nn.Module):
    """Multi-Class Hypersphere Anomaly Detection loss (Kirchheim et al., ICPR 2022), LOSS_CONTRACT.md §3.14.

    Submodules as in pytorch-ood: ``center_loss`` (:class:`CenterLoss` (C, D), trainable centers,
    same construction draws), ``nll_loss`` (cross-entropy, no state) and ``regu_loss``
    (:class:`CenterRegularizationLoss`, whose ``margin`` is a non-trainable (1,) Parameter).
    ``distance(z)`` gives the (B, C) squared distances that ``forward(distmat, y)`` turns into
    :func:`mchad_distance_loss` with the radius of ``center_loss`` and the margin of ``regu_loss``.
    The documented OOD score is ``distance(z).min(dim=1)``. Never warns.
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION},
        inputs={Representation.DISTANCES},
        supervised=True,
        paper=Paper(
            title="Multi-Class Hypersphere Anomaly Detection",
            venue="ICPR",
            year=2022,
            url="https://ieeexplore.ieee.org/document/9956337",
        ),
    )

    #: the functions ``distance`` and ``forward`` compute; :mod:`oodkernels.loss` swaps in the dispatched ones
    _sq_distances_fn = staticmethod(sq_distances)
    _loss_fn = staticmethod(mchad_distance_loss)

    def __init__(
        self,
        n_classes: int,
        n_dim: int,
        radius: float = 0,
        margin: float = 0,
        weight_center: float = 1.0,
        weight_nll: float = 1.0,
        weight_oe: float = 1.0,
        *,
        process_group=None,
    ):
        """
        :param n_classes: number of classes C
        :param n_dim: dimension D of the space of the centers
        :param radius: radius r of the hyperspheres (center term only)
        :param margin: margin m of the outlier term
        :param weight_center: weight of the center term Λ
        :param weight_nll: weight of the likelihood term Δ
        :param weight_oe: weight of the outlier term Θ
        :param process_group: optional ``torch.distributed`` group: Λ and Δ divide by the group's ``N_ID``
            (README, "Distributed training")
        """
        super().__init__()
        check_process_group(process_group)
        self.process_group = process_group
        self.center_loss = CenterLoss(n_classes=n_classes, n_dim=n_dim, radius=radius)
        self.nll_loss = CrossEntropyLoss(reduction="mean")
        self.regu_loss = CenterRegularizationLoss(margin=margin, reduction="sum")
        self.weight_center = weight_center
        self.weight_nll = weight_nll
        self.weight_oe = weight_oe

    @property
    def centers(self) -> ClassCenters:
        """The class centers μ (of ``center_loss``)."""
        return self.center_loss.centers

    def distance(self, z: Tensor) -> Tensor:
        """(B, D) embeddings -> (B, C) squared distances to the centers, in the dtype of ``z``."""
        self.centers._check_input(z)
        return self._sq_distances_fn(z, self.centers.params, z.dtype)

    def forward(self, distmat: Tensor, y: Tensor) -> Tensor:
        """(B, C) squared distances, (B,) labels (``< 0`` = OOD) -> 0-d loss."""
        return self._loss_fn(
            distmat,
            y,
            self.center_loss.radius,
            self.regu_loss.margin,
            self.weight_center,
            self.weight_nll,
            self.weight_oe,
            n_classes=self.center_loss.num_classes,
            distances_name="distmat",
            targets_name="y",
            process_group=self.process_group,
        )


# ----------------------------------------------------------------------------------------------
# one-call forms: features and centers in, the loss out (the module path distance() then forward())
# ----------------------------------------------------------------------------------------------


def check_features_and_centers(features, centers, features_name: str = "features", centers_name: str = "centers"):
    """Metadata checks of embeddings (B, D) and centers (K, D); always on."""
    check_floating(features_name, features)
    check_floating(centers_name, centers)
    if features.dim() != 2:
        raise ShapeError(f"{features_name}: expected embeddings of shape (B, D), got {tuple(features.shape)}")
    if centers.dim() != 2 or centers.shape[1] != features.shape[1]:
        raise ShapeError(
            f"{centers_name}: expected centers of shape (K, {features.shape[1]}) to match {features_name} of shape "
            f"{tuple(features.shape)}, got {tuple(centers.shape)}"
        )
    check_same_device(**{features_name: features, centers_name: centers})


def center_loss(
    features: Tensor, centers: Tensor, targets: Tensor, radius: float = 0.0, *, process_group=None
) -> Tensor:
    """:func:`center_distance_loss` of the squared distances of ``features`` (B, D) to ``centers`` (K, D).

    Equal to ``CenterLoss.forward(CenterLoss.distance(features), targets)`` with these centers; the result
    has the dtype of ``features``. Gradients reach ``features`` and (if they require it) ``centers``.
    """
    check_features_and_centers(features, centers)
    distances = sq_distances(features, centers, out_dtype=features.dtype)
    return center_distance_loss(distances, targets, radius, process_group=process_group)


def cac_loss(features: Tensor, anchors: Tensor, targets: Tensor, alpha: float = 1.0, *, process_group=None) -> Tensor:
    """:func:`cac_distance_loss` of the squared distances of ``features`` (B, D) to ``anchors`` (K, D)."""
    check_features_and_centers(features, anchors, centers_name="anchors")
    distances = sq_distances(features, anchors, out_dtype=features.dtype)
    return cac_distance_loss(distances, targets, alpha, process_group=process_group)


def mchad_loss(
    features: Tensor,
    centers: Tensor,
    targets: Tensor,
    radius: float = 0.0,
    margin: Union[float, Tensor] = 0.0,
    weight_center: float = 1.0,
    weight_nll: float = 1.0,
    weight_oe: float = 1.0,
    *,
    process_group=None,
) -> Tensor:
    """:func:`mchad_distance_loss` of the squared distances of ``features`` (B, D) to ``centers`` (K, D)."""
    check_features_and_centers(features, centers)
    distances = sq_distances(features, centers, out_dtype=features.dtype)
    return mchad_distance_loss(
        distances, targets, radius, margin, weight_center, weight_nll, weight_oe, process_group=process_group
    )
