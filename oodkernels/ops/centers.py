"""The center-distance criteria on the fused kernels (Triton; C++ on CPU), behind the reference's exact API.

Each function has the signature, checks, warnings, errors and dtypes of its reference in
:mod:`oodkernels.reference.centers` / :mod:`oodkernels.reference.distances`: the metadata checks, the ID mask
with its drop-unknown warning and the queued data checks come from the reference; the distances and the
per-row terms run in the kernels (:mod:`oodkernels.ops.center_ops`); the reduction is the reference's
(device-side normalisers, an attached 0 without ID rows); the data checks are read once, at the end. Eager
calls on the C++ backend without a process group run the whole criterion, reduction and data-check values
included, in one C++ autograd step (:func:`~oodkernels.ops.center_ops.run_loss_reduced`); they then read the
step's totals for the same warnings and errors.

==========================  ===================================================================================
``sq_distances``            (B, D), (K, D) -> (B, K) clamped expansion (the hook of every ``distance()``)
``pairwise_sq_distances``   the same, output in the features' dtype, with the public checks
``pairwise_distances``      pytorch-ood's ``pairwise_distances(x, y=x)``, promoted dtype
``assigned_sq_distances``   (B, D), (K, D), (B,) -> (B,) each row's distance to its own center by differences
``*_distance_loss``         CAC / Center / MCHAD from a (B, K) distance matrix (the modules' ``forward``)
``cac_loss`` etc.           one call from features and centers: the (B, K) matrix is never written
==========================  ===================================================================================

DeepSVDD/SAD (K = 1) and IILoss use ``sq_distances`` through their hooks: their distance output is O(B)
(SVDD/SAD) or (B, K) / (K, K) for II; II's intra-class spread ``‖z_i − μ_{y_i}‖²`` (a direct difference to
the batch means) runs ``assigned_sq_distances`` through its own hook, one pass over the features instead of
the reference's gather, difference, square and sum (and their four backward passes).
"""

from __future__ import annotations

import warnings
from typing import Optional
from typing import Union

import torch
from torch import Tensor

from .. import config as ok_config
from ..kernels import codes
from ..reference import centers as _ref_centers
from ..reference import distances as _ref
from ..reference._common import DROP_UNKNOWN_MESSAGE
from ..reference._common import DataChecks
from ..reference._common import id_mask_with_warning
from ..reference._common import label_out_of_range
from ..reference._common import masked_sum
from ..reference._common import result_dtypes
from ..reference._distributed import GlobalCounts
from . import center_ops  # registers the custom ops
from .center_ops import launch_args


def sq_distances(x: Tensor, y: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Fused :func:`oodkernels.reference.centers.sq_distances`: (N, D), (M, D) -> (N, M), no checks."""
    promoted, _ = result_dtypes(x, y)
    out_dtype = promoted if out_dtype is None else out_dtype
    if out_dtype == torch.float64 and x.dtype != torch.float64 and y.dtype != torch.float64:
        x = x.to(torch.float64)  # the reference computes a float64 result in float64
    return center_ops.run_sq_distances(x, y, out_dtype, *launch_args())


def pairwise_sq_distances(features: Tensor, centers: Tensor) -> Tensor:
    _ref.check_features_and_centers(features, centers)
    return sq_distances(features, centers, features.dtype)


def pairwise_distances(x: Tensor, y: Optional[Tensor] = None) -> Tensor:
    _ref_centers.pairwise_distances(x[:0] if isinstance(x, Tensor) and x.dim() == 2 else x, y)  # checks only
    return sq_distances(x, x if y is None else y)


def _margin_tensor(margin, like: Tensor, acc: torch.dtype) -> Tensor:
    if isinstance(margin, Tensor):
        return margin.detach().to(device=like.device, dtype=acc).reshape(-1)[:1]
    return torch.full((1,), float(margin), dtype=acc, device=like.device)


def _values(x, centers, targets, margin, kind, params):
    return center_ops.run_loss_values(x, centers, targets, margin, kind, *params, *launch_args())


# ----------------------------------------------------------------------------------------------
# from a distance matrix (the modules' forward)
# ----------------------------------------------------------------------------------------------


def _check_totals(totals: Tensor, targets: Tensor, *, warn_ood: bool, n_cols: Optional[int], targets_name: str):
    """The data checks of a reduced step (LOSS_CONTRACT §2.11), on the host copy of its totals, in the reference's
    order: the drop-unknown warning from the OOD count, then the label range from the largest label."""
    if not ok_config.data_checks:
        return
    values = totals.tolist()  # a CPU tensor: no device synchronisation
    if warn_ood and values[codes.TOTAL_N_OOD] > 0:
        warnings.warn(DROP_UNKNOWN_MESSAGE, UserWarning, stacklevel=5)
    top = values[codes.TOTAL_MAX_LABEL]
    if n_cols is not None and top >= n_cols:
        raise label_out_of_range(targets_name, top, n_cols)


def _reduced(x, centers, targets, margin, kind, params, *, warn_ood, n_cols, targets_name, process_group):
    """The eager C++ step's loss (:func:`~oodkernels.ops.center_ops.run_loss_reduced`) with its data checks, or
    None where the torch reduction below serves (compiled, traced, CUDA, or a process group's global means)."""
    if process_group is not None or targets.dim() != 1:
        return None
    out, _ = result_dtypes(x)
    reduced = center_ops.run_loss_reduced(x, centers, targets, margin, kind, params, out)
    if reduced is None:
        return None
    loss, totals = reduced
    _check_totals(totals, targets, warn_ood=warn_ood, n_cols=n_cols, targets_name=targets_name)
    return loss


def _cac_from(x, centers, targets, alpha, n_cols, checks_on, targets_name, process_group=None):
    params = (alpha, 0.0, 0.0, 0.0)
    loss = _reduced(x, centers, targets, None, codes.CAC, params, warn_ood=True, n_cols=n_cols,
                    targets_name=targets_name, process_group=process_group)  # fmt: skip
    if loss is not None:
        return loss
    out, _ = result_dtypes(x)
    checks = DataChecks(checks_on, targets)
    is_id = id_mask_with_warning(targets, checks)
    checks.check_labels_below(targets, n_cols, targets_name)
    values = _values(x, centers, targets, None, codes.CAC, params)
    loss = GlobalCounts(is_id.sum().reshape(1), process_group).mean(masked_sum(values, is_id), 0)
    checks.flush()
    return loss.to(out)


def _center_from(x, centers, targets, radius, n_cols, checks_on, process_group=None):
    params = (radius, 0.0, 0.0, 0.0)
    loss = _reduced(x, centers, targets, None, codes.CENTER, params, warn_ood=True, n_cols=None,
                    targets_name="targets", process_group=process_group)  # fmt: skip
    if loss is not None:
        return loss
    out, _ = result_dtypes(x)
    checks = DataChecks(checks_on, targets)
    is_id = id_mask_with_warning(targets, checks)
    values = _values(x, centers, targets, None, codes.CENTER, params)
    counts = GlobalCounts(is_id.sum().reshape(1), process_group)
    loss = counts.mean(masked_sum(values, is_id), 0) / max(n_cols, 1)
    checks.flush()
    return loss.to(out)


def _mchad_from(x, centers, targets, radius, margin, w_c, w_n, w_o, n_cols, checks_on, targets_name,
                process_group=None):  # fmt: skip
    out, acc = result_dtypes(x)
    m = _margin_tensor(margin, x, acc)
    params = (radius, w_c, w_n, w_o)
    loss = _reduced(x, centers, targets, m, codes.MCHAD, params, warn_ood=False, n_cols=n_cols,
                    targets_name=targets_name, process_group=process_group)  # fmt: skip
    if loss is not None:
        return loss
    checks = DataChecks(checks_on, targets)
    checks.check_labels_below(targets, n_cols, targets_name)  # MCHAD never warns
    is_id = targets >= 0
    values = _values(x, centers, targets, m, codes.MCHAD, params)
    # the ID rows' terms are means, the OOD rows' a sum (pytorch-ood's): W·Σ_local with a group
    counts = GlobalCounts(is_id.sum().reshape(1), process_group)
    loss = counts.mean(masked_sum(values, is_id), 0) + counts.sum(masked_sum(values, ~is_id))
    checks.flush()
    return loss.reshape(()).to(out)


def cac_distance_loss(
    distances, targets, alpha=1.0, *, n_classes=None, distances_name="distances", targets_name="targets",
    process_group=None,
):  # fmt: skip
    _ref._check_distance_input(distances, targets, n_classes, distances_name, targets_name)
    if targets.dim() != 1:
        id_mask_with_warning(targets, DataChecks())  # the reference's ValueError
    return _cac_from(distances, None, targets, alpha, distances.shape[1], distances, targets_name, process_group)


def center_distance_loss(
    distances, targets, radius=0.0, *, n_classes=None, distances_name="distances", targets_name="targets",
    process_group=None,
):  # fmt: skip
    _ref._check_distance_input(distances, targets, n_classes, distances_name, targets_name)
    if targets.dim() != 1:
        id_mask_with_warning(targets, DataChecks())
    return _center_from(distances, None, targets, radius, distances.shape[1], distances, process_group)


def mchad_distance_loss(
    distances,
    targets,
    radius=0.0,
    margin: Union[float, Tensor] = 0.0,
    weight_center=1.0,
    weight_nll=1.0,
    weight_oe=1.0,
    *,
    n_classes=None,
    distances_name="distances",
    targets_name="targets",
    process_group=None,
):
    _ref._check_distance_input(distances, targets, n_classes, distances_name, targets_name, one_dim_targets_error=True)
    return _mchad_from(
        distances, None, targets, radius, margin, weight_center, weight_nll, weight_oe, distances.shape[1],
        distances, targets_name, process_group,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# one call from features and centers: no (B, K) matrix, no (B, K, D) tensor
# ----------------------------------------------------------------------------------------------


def _check_one_call(features, centers, targets, centers_name="centers", one_dim_targets_error=False):
    _ref.check_features_and_centers(features, centers, centers_name=centers_name)
    # the distance-matrix checks on the shape the distances would have (an empty (B, K) view, no work)
    shape_only = features.new_empty((features.shape[0], centers.shape[0]))
    _ref._check_distance_input(shape_only, targets, None, "distances", "targets", one_dim_targets_error)
    if targets.dim() != 1:
        id_mask_with_warning(targets, DataChecks())


def center_loss(features, centers, targets, radius=0.0, *, process_group=None):
    _check_one_call(features, centers, targets)
    return _center_from(features, centers, targets, radius, centers.shape[0], features, process_group)


def cac_loss(features, anchors, targets, alpha=1.0, *, process_group=None):
    _check_one_call(features, anchors, targets, centers_name="anchors")
    return _cac_from(features, anchors, targets, alpha, anchors.shape[0], features, "targets", process_group)


def mchad_loss(
    features, centers, targets, radius=0.0, margin=0.0, weight_center=1.0, weight_nll=1.0, weight_oe=1.0, *,
    process_group=None,
):  # fmt: skip
    _check_one_call(features, centers, targets, one_dim_targets_error=True)
    return _mchad_from(
        features, centers, targets, radius, margin, weight_center, weight_nll, weight_oe, centers.shape[0],
        features, "targets", process_group,
    )  # fmt: skip


def assigned_sq_distances(x: Tensor, centers: Tensor, index: Tensor) -> Tensor:
    """Fused :func:`oodkernels.reference.centers.assigned_sq_distances`: (B, D), (K, D), (B,) -> (B,), no
    checks (the caller owns the indices' range)."""
    return center_ops.run_assigned_sq_distances(x, centers, index)


#: dispatched operation name -> fused implementation
FUSED = {
    "sq_distances": sq_distances,
    "assigned_sq_distances": assigned_sq_distances,
    "pairwise_sq_distances": pairwise_sq_distances,
    "pairwise_distances": pairwise_distances,
    "cac_distance_loss": cac_distance_loss,
    "center_distance_loss": center_distance_loss,
    "mchad_distance_loss": mchad_distance_loss,
    "center_loss": center_loss,
    "cac_loss": cac_loss,
    "mchad_loss": mchad_loss,
}
