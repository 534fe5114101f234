"""Virtual outlier synthesis (Du et al., *VOS*, ICLR 2022), LOSS_CONTRACT.md §3.6 and §3.7.

**Weighted energy.** With ``w = relu(weights_energy.weight)`` of shape (1, C) and ``m = max_c v_c``::

    E_w(v) = −(m + log Σ_c w_c · exp(v_c − m))

(every ``w_c = 0`` gives ``E_w = +inf`` and a NaN loss; initialise ``w`` uniformly, e.g. with
``torch.nn.init.uniform_``).

**Regulariser.** ``φ = logistic_regression`` maps the energies (N, 1) to two logits (N, 2); the
regulariser is the two-class softmax cross-entropy averaged over *all* N entries::

    reg = (1/N) Σ_j [lse(φ(E_j)) − φ(E_j)_{t_j}]        t_j = 1 for ID entries, 0 for outliers

(an empty set gives ``reg = 0``). pytorch-ood feeds φ the weighted energy ``E_w = −(weighted lse)``,
which is the opposite sign to the paper's code; this is kept (§7.3.18).

**VOSRegLoss** (§3.6) takes its outliers from the batch (``y < 0``); the loss is
``apply_reduction(CE) + apply_reduction(α·reg)`` with the masked cross-entropy CE of §2.5, so
``'sum'`` adds ``α·reg`` unscaled and ``'none'`` adds ``α·reg`` to every entry (§7.3.16-17).

**VirtualOutlierSynthesizingRegLoss** (§3.7) ignores ``y < 0`` and synthesises outliers instead:
per-class queues of detached ID features are filled, and once every queue is full a Gaussian with
class means ``μ_k`` and one shared covariance ``Σ = XᵀX/(C·S) + 1e-4·I`` is fitted; of ``sample_from``
draws per class the ``select`` with the lowest log-density are the virtual outliers, which enter
the regulariser through ``fc``.
"""

from __future__ import annotations

import math
import types
from typing import Optional

import torch
from torch import Tensor
from torch import nn

from ._common import DataChecks
from ._common import LossInfo
from ._common import Paper
from ._common import Representation
from ._common import ShapeError
from ._common import Task
from ._common import check_floating
from ._common import check_logits_and_targets
from ._common import check_reduction
from ._common import check_same_device
from ._common import id_mask_with_warning
from ._common import masked_sum
from ._common import result_dtypes
from ._common import row_cross_entropy
from ._common import select_id_rows
from ._distributed import GlobalCounts
from ._distributed import check_process_group

__all__ = ["VOSRegLoss", "VirtualOutlierSynthesizingRegLoss", "vos_reg_loss"]

_VOS_PAPER = Paper(
    title="VOS: Learning What You Don't Know by Virtual Outlier Synthesis",
    venue="ICLR",
    year=2022,
    url="https://arxiv.org/pdf/2202.01197.pdf",
)

# jitter added to the shared covariance before its Cholesky factorisation (LOSS_CONTRACT.md §5)
COVARIANCE_JITTER = 1e-4


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------


def _param_dtype(module, default: torch.dtype) -> torch.dtype:
    """dtype of the first floating parameter of ``module`` (user modules get inputs in their own dtype)."""
    params = module.parameters() if isinstance(module, nn.Module) else ()
    for p in params:
        if p.is_floating_point():
            return p.dtype
    return default


def _energy_weight(weights_energy: nn.Module, n_classes: int) -> Tensor:
    """``weights_energy.weight`` after checking that it broadcasts against (N, C) rows."""
    weight = getattr(weights_energy, "weight", None)
    if not isinstance(weight, Tensor):
        raise TypeError("weights_energy: expected a module with a `weight` tensor, e.g. torch.nn.Linear(C, 1)")
    if weight.dim() != 2 or weight.shape[0] != 1 or weight.shape[1] not in (1, n_classes):
        raise ShapeError(
            f"weights_energy: expected a weight of shape (1, {n_classes}) (torch.nn.Linear({n_classes}, 1)), "
            f"got {tuple(weight.shape)}"
        )
    return weight


def _two_class_ce(logistic_regression, energies: Tensor, labels: Tensor) -> Tensor:
    """Per-entry ``CE(φ(E_j), t_j)``; φ maps (N, 1) energies to (N, K >= 2) logits; (N,) in ``energies.dtype``."""
    acc = energies.dtype
    out = logistic_regression(energies.unsqueeze(1).to(_param_dtype(logistic_regression, acc)))
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != energies.shape[0] or out.shape[1] < 2:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ShapeError(f"logistic_regression: expected it to map (N, 1) energies to (N, 2) logits, got {got}")
    out = out.to(acc)
    return row_cross_entropy(out, labels)[0]


# ----------------------------------------------------------------------------------------------
# VOSRegLoss
# ----------------------------------------------------------------------------------------------


def _vos_reg_loss(
    logits,
    targets,
    logistic_regression,
    weights_energy,
    alpha,
    reduction,
    targets_name,
    row_fn=None,
    process_group=None,
):
    from .logits import ce_and_energy

    row_fn = ce_and_energy if row_fn is None else row_fn
    check_reduction(reduction)
    check_logits_and_targets(logits, targets, ranks=(2, 4), targets_name=targets_name)
    n_classes = logits.shape[1]
    weight = _energy_weight(weights_energy, n_classes)
    check_same_device(logits=logits, **{"weights_energy.weight": weight})
    out, acc = result_dtypes(logits)
    checks = DataChecks(logits, targets)
    checks.check_labels_below(targets, n_classes, name=targets_name)

    labels = targets.reshape(-1)  # 4-D: every pixel is an entry, in the order of the flattened targets
    is_id = labels >= 0

    ce, energies = row_fn(logits, targets, weight)
    ce, energies = ce.to(acc), energies.to(acc)
    reg_ce = _two_class_ce(logistic_regression, energies, is_id.long())
    every = torch.ones_like(is_id)
    counts = GlobalCounts(torch.stack([every.sum(), is_id.sum()]), process_group)
    # pooled mean over all N entries (every reduction); the empty batch gives an attached 0
    reg = counts.mean(masked_sum(reg_ce, every), 0)

    if reduction == "mean":
        loss = counts.mean(masked_sum(ce, is_id), 1)
    elif reduction == "sum":
        loss = ce.sum()
    else:
        loss = ce.reshape(targets.shape)
    result = (loss + alpha * reg).to(out)
    checks.flush()
    return result


def vos_reg_loss(
    logits: Tensor,
    targets: Tensor,
    logistic_regression: nn.Module,
    weights_energy: nn.Module,
    alpha: float = 0.1,
    reduction: Optional[str] = "mean",
    *,
    process_group=None,
) -> Tensor:
    """VOS energy regulariser on real outliers (LOSS_CONTRACT.md §3.6)::

        CE_i  = lse(f_i) − f_{i, y_i} if y_i >= 0 else 0
        reg   = mean over all N entries of CE(φ(E_w(f_j)), [y_j >= 0])
        'mean': Σ_I CE / N_ID + α·reg      (an empty ID group contributes 0)
        'sum' : Σ_I CE + α·reg
        'none': CE_i + α·reg for every entry (shape of ``targets``)

    :param logits: (B, C) or (B, C, H, W); 4-D maps are read channels-last, one entry per pixel
    :param targets: (B,) or (B, H, W) int64 labels, ``< 0`` = OOD
    :param logistic_regression: φ, (N, 1) -> (N, 2), e.g. ``torch.nn.Linear(1, 2)``
    :param weights_energy: module whose ``weight`` (1, C) weighs the classes in the energy, e.g.
        ``torch.nn.Linear(C, 1)``; its bias is unused
    :param alpha: weight α of the regulariser
    :param reduction: ``'mean'``, ``'sum'``, ``'none'`` or ``None``
    :param process_group: optional ``torch.distributed`` group of ``W`` ranks: the regulariser's mean (every
        reduction) and the ``'mean'`` over ID entries divide by the group's counts and are multiplied by ``W``
        (README, "Distributed training")
    :return: 0-d, or the shape of ``targets`` for ``'none'``/``None``; dtype of ``logits``
    """
    return _vos_reg_loss(
        logits,
        targets,
        logistic_regression,
        weights_energy,
        alpha,
        reduction,
        "targets",
        process_group=process_group,
    )


class VOSRegLoss(nn.Module):
    """VOS energy regulariser with real outliers (``y < 0``), LOSS_CONTRACT.md §3.6; see :func:`vos_reg_loss`.

    ``logistic_regression`` (φ, expected ``Linear(1, 2)``) and ``weights_energy`` (``Linear(C, 1)``,
    only its weight is used) are registered submodules: give ``criterion.parameters()`` to the
    optimizer and move the criterion with ``.to(device)``. If every ``relu(w_c)`` is 0 the loss is
    NaN, so initialise the weight uniformly (``torch.nn.init.uniform_``).
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION, Task.SEGMENTATION},
        inputs={Representation.LOGITS},
        supervised=True,
        paper=_VOS_PAPER,
    )

    def __init__(
        self,
        logistic_regression: nn.Linear,
        weights_energy: nn.Linear,
        alpha: float = 0.1,
        reduction: str = "mean",
        *,
        process_group=None,
    ):
        """``process_group``: optional ``torch.distributed`` group; the means divide by the group's counts
        (:func:`vos_reg_loss`, README "Distributed training")."""
        super().__init__()
        self.logistic_regression = logistic_regression
        self.weights_energy = weights_energy
        self.alpha = alpha
        self.reduction = reduction
        check_process_group(process_group)
        self.process_group = process_group

    def forward(self, logits: Tensor, y: Tensor) -> Tensor:
        """:param logits: (B, C) or (B, C, H, W); :param y: (B,) or (B, H, W), ``< 0`` = OOD."""
        return _vos_reg_loss(
            logits,
            y,
            self.logistic_regression,
            self.weights_energy,
            self.alpha,
            self.reduction,
            "y",
            self._row_fn,
            self.process_group,
        )

    #: per-row (CE, weighted energy); oodkernels.loss swaps in the dispatched (fused) one
    _row_fn = None

    def _rows(self, logits, targets, weight):
        from .logits import ce_and_energy

        return (ce_and_energy if self._row_fn is None else self._row_fn)(logits, targets, weight)


# ----------------------------------------------------------------------------------------------
# VirtualOutlierSynthesizingRegLoss: queues and sampling, all on the device
# ----------------------------------------------------------------------------------------------


def update_queues(queues: Tensor, counts: Tensor, features: Tensor, targets: Tensor, valid: Tensor, was_full: Tensor):
    """Push the valid rows of a batch into the per-class queues, in place, without host reads.

    :param queues: (C, S, D) queues ``Q_k``
    :param counts: (C,) int64 fill counts ``n_k``
    :param features: (B, D) features (detached and cast to the queue dtype here)
    :param targets: (B,) labels; rows with ``valid`` false are ignored
    :param valid: (B,) bool, ID rows with a label below C
    :param was_full: 0-d bool, every ``n_k == S`` before this batch

    Every valid row gets its rank ``r_i`` among the batch rows of its class (cumsum over a one-hot)
    and a destination slot ``base_k + r_i``:

    * fill phase: ``base_k = n_k``; rows whose slot is ``>= S`` are discarded, even if the queue
      filled earlier in the same batch, and ``n_k ← min(S, n_k + m_k)``;
    * FIFO phase: ``Q_k ← last S rows of [Q_k; batch rows of class k]``, i.e. the old entries move
      ``m_k`` slots forward (a gather) and ``base_k = S − m_k``; rows with a negative slot are the
      ones pushed out again by later rows of the same batch.
    """
    n_classes, size, dim = queues.shape
    device = queues.device
    cls = targets.clamp(0, max(n_classes - 1, 0))
    onehot = ((cls.unsqueeze(1) == torch.arange(n_classes, device=device)) & valid.unsqueeze(1)).long()
    rank = (onehot.cumsum(0) - 1).gather(1, cls.unsqueeze(1)).squeeze(1)
    per_class = onehot.sum(0)  # m_k
    zero = torch.zeros_like(per_class)
    base = torch.where(was_full, size - per_class, counts)
    shift = torch.where(was_full, per_class, zero)

    dest = base.gather(0, cls) + rank
    write = valid & (dest >= 0) & (dest < size)
    dump = n_classes * size  # one scratch row that receives every discarded row
    flat = torch.where(write, cls * size + dest, torch.full_like(dest, dump))

    slots = torch.arange(size, device=device)
    source = (slots.unsqueeze(0) + shift.unsqueeze(1)).clamp(max=size - 1)  # slots past the end are overwritten
    moved = queues.gather(1, source.unsqueeze(2).expand(n_classes, size, dim))
    padded = torch.cat([moved.reshape(dump, dim), queues.new_zeros(1, dim)])
    padded = padded.index_copy(0, flat, features.detach().to(queues.dtype))
    queues.copy_(padded[:dump].view(n_classes, size, dim))
    counts.copy_(torch.where(was_full, counts, (counts + per_class).clamp(max=size)))


def draw_class_normals(queues: Tensor, sample_from: int) -> Tensor:
    """``(C, T, D)`` standard normals, drawn exactly as pytorch-ood draws them.

    pytorch-ood samples each class from its own ``MultivariateNormal``, one ``normal_`` call of shape
    (T, D) per class in class order on the queues' device generator. One (C·T·D) call would give
    different numbers (the CPU generator fills the tail of a tensor differently and CUDA advances
    its Philox offset per call), so the draws stay per class: C launches, no host read.
    """
    n_classes, _, dim = queues.shape
    draws = [
        torch.empty((sample_from, dim), dtype=queues.dtype, device=queues.device).normal_() for _ in range(n_classes)
    ]
    return torch.stack(draws) if draws else queues.new_empty((0, sample_from, dim))


def sample_virtual_outliers(queues: Tensor, eye: Tensor, sample_from: int, select: int) -> Tensor:
    """Virtual outliers from class-conditional Gaussians with a shared covariance (§3.7 step 6).

    ``μ_k = mean(Q_k)``, ``Σ = XᵀX/(C·S) + 1e-4·I`` with X the stacked ``Q_k − μ_k``, ``L = chol(Σ)``
    (factorised once); per class ``x = μ_k + L·ε`` for T draws ε, and the ``select`` draws with the
    lowest log-density ``−½(D·log 2π + ‖L⁻¹(x − μ_k)‖²) − Σ log diag L`` are kept, in order of
    increasing density.

    :return: (C·select, D), class-major
    """
    n_classes, size, dim = queues.shape
    means = queues.mean(1)
    centred = (queues - means.unsqueeze(1)).reshape(n_classes * size, dim)
    cov = torch.mm(centred.t(), centred) / (n_classes * size)
    cov = cov + COVARIANCE_JITTER * eye.to(cov.dtype)
    chol = torch.linalg.cholesky_ex(cov).L  # cholesky_ex: no host read of the error flag

    eps = draw_class_normals(queues, sample_from)
    loc = means.unsqueeze(1)
    # same operations as MultivariateNormal.rsample / log_prob, so the samples and the selection agree
    samples = loc + torch.matmul(chol, eps.unsqueeze(-1)).squeeze(-1)
    diff = samples - loc
    mahalanobis = torch.linalg.solve_triangular(chol, diff.transpose(1, 2), upper=False).pow(2).sum(1)
    half_log_det = chol.diagonal().log().sum()
    log_density = -0.5 * (dim * math.log(2 * math.pi) + mahalanobis) - half_log_det
    index = torch.topk(-log_density, select, dim=1).indices
    picked = samples.gather(1, index.unsqueeze(2).expand(n_classes, select, dim))
    return picked.reshape(n_classes * select, dim)


class VirtualOutlierSynthesizingRegLoss(VOSRegLoss):
    """VOS with synthesised outliers, LOSS_CONTRACT.md §3.7.

    forward(logits (B, C), features (B, D), y (B,)) -> loss. Rows with ``y < 0`` are discarded with
    the drop-unknown warning. With ``m = N_ID`` the ID rows::

        'mean': Σ_I CE / N_ID + α·reg          'sum': Σ_I CE + α·reg
        'none': CE_i + α·reg for i ∈ I (length N_ID)

    where ``reg`` is the pooled two-class CE of :func:`vos_reg_loss` over ``E_w(f_i)`` of the ID rows
    (label 1) and ``E_w(fc(v))`` of the virtual outliers ``v`` (label 0), and ``reg = 0`` unless every
    queue was full **before** this call (so the call that fills them still has ``reg = 0``). A batch
    without ID rows returns an attached zero, shape (0,) for ``'none'``, and leaves the queues alone.

    **State** (non-persistent, not in the state_dict, moved by ``.to()``): ``data_dict`` (C, S, D)
    queues, ``eye_matrix`` (D, D), and ``fill_counts`` (C,) int64, read as the dict ``number_dict``.
    Queue updates are vectorised on the device (see :func:`update_queues`).

    **RNG and host reads.** Whether the queues were full decides whether outliers are drawn
    (C·T·D standard normals from the queues' device generator). While ``oodkernels.config.data_checks``
    is on in eager mode, it is read with the call's single data-check transfer (together with "has
    ID rows"), so draws happen exactly when pytorch-ood draws; once seen full, the queues stay full
    and nothing more is read for it. Otherwise (checks off, or compiling) outliers are drawn on
    every call with ID rows unknown and ``reg`` is masked to 0 on the device: the values are the
    same, but the global RNG is advanced during the fill phase (and on batches without ID rows),
    where pytorch-ood does not draw. Memory of a sampling step is O(C·T·D).
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION},
        inputs={Representation.LOGITS, Representation.FEATURES},
        supervised=False,
        paper=_VOS_PAPER,
    )

    def __init__(
        self,
        logistic_regression: nn.Linear,
        weights_energy: nn.Linear,
        fc: nn.Linear,
        alpha: float = 0.1,
        reduction: str = "mean",
        sample_number: int = 1000,
        select: int = 1,
        sample_from: int = 10000,
        *,
        process_group=None,
    ) -> None:
        """``process_group``: optional ``torch.distributed`` group; the ID mean and the regulariser's mean
        divide by the group's counts. The class queues stay per rank (README, "Distributed training")."""
        super().__init__(
            logistic_regression, weights_energy, alpha=alpha, reduction=reduction, process_group=process_group
        )
        self.num_classes = fc.out_features
        self.num_input_last_layer = fc.in_features
        self.fc = fc
        self.sample_number = sample_number
        self.select = select
        self.sample_from = sample_from
        self.register_buffer(
            "data_dict", torch.zeros(self.num_classes, self.sample_number, self.num_input_last_layer), persistent=False
        )
        self.register_buffer("eye_matrix", torch.eye(self.num_input_last_layer), persistent=False)
        self.register_buffer("fill_counts", torch.zeros(self.num_classes, dtype=torch.long), persistent=False)
        # host-side knowledge that every queue is full (they never empty again)
        self._known_full = False

    @property
    def number_dict(self):
        """Read-only ``{class: fill count}`` (as pytorch-ood's dict); reading it synchronises with the device."""
        return types.MappingProxyType({k: int(v) for k, v in enumerate(self.fill_counts.tolist())})

    def _check_inputs(self, logits, features, y) -> None:
        check_reduction(self.reduction)
        check_logits_and_targets(logits, y, ranks=(2,), targets_name="y")
        if logits.shape[1] != self.num_classes:
            raise ShapeError(
                f"logits: expected {self.num_classes} classes (fc.out_features), got shape {tuple(logits.shape)}"
            )
        check_floating("features", features)
        if features.dim() != 2 or features.shape != (logits.shape[0], self.num_input_last_layer):
            raise ShapeError(
                f"features: expected shape ({logits.shape[0]}, {self.num_input_last_layer}) "
                f"(batch of logits, fc.in_features), got {tuple(features.shape)}"
            )
        check_same_device(logits=logits, features=features, y=y, data_dict=self.data_dict)

    def forward(self, logits: Tensor, features: Tensor, y: Tensor) -> Tensor:
        """:param logits: (B, C); :param features: (B, D); :param y: (B,), ``< 0`` rows are discarded."""
        if isinstance(y, Tensor) and y.dim() != 1:
            raise NotImplementedError("Segmentation not implemented yet")
        self._check_inputs(logits, features, y)
        reduction = self.reduction
        n_classes = self.num_classes
        out, acc = result_dtypes(logits, features)
        weight = _energy_weight(self.weights_energy, n_classes)

        checks = DataChecks(logits, features, y)
        is_id = id_mask_with_warning(y, checks)
        checks.check_labels_below(y, n_classes, name="y")
        any_id = is_id.any()
        was_full = (self.fill_counts == self.sample_number).all()
        known_full = self._known_full
        if checks.active:
            # read with the warnings, before any state changes (a bad label then leaves the queues alone)
            host = {}
            if not known_full:
                checks.add(was_full, lambda v: host.__setitem__("was_full", bool(v)))
            checks.add(any_id, lambda v: host.__setitem__("any_id", bool(v)))
            checks.flush()
            known_full = known_full or host["was_full"]
            draw = known_full and host["any_id"]
        else:
            draw = True  # unknown on the host: draw and mask on the device
        self._known_full = known_full

        valid = is_id & (y < n_classes)
        update_queues(self.data_dict, self.fill_counts, features, y, valid, was_full)

        zero = torch.zeros((), dtype=acc, device=logits.device)
        # the weighted energies only enter the regulariser: without a draw they are not computed
        ce, batch_energies = self._rows(logits, y, weight if draw else None)
        ce = torch.where(is_id, ce.to(acc), zero)
        if draw:
            virtual = sample_virtual_outliers(self.data_dict, self.eye_matrix, self.sample_from, self.select)
            virtual_logits = self.fc(virtual.to(_param_dtype(self.fc, virtual.dtype)))
            no_label = torch.full((virtual_logits.shape[0],), -1, dtype=y.dtype, device=y.device)
            virtual_energies = self._rows(virtual_logits, no_label, weight)[1]
            energies = torch.cat([batch_energies.to(acc), virtual_energies.to(acc)])
            labels = torch.cat([torch.ones_like(y), torch.zeros(virtual.shape[0], dtype=y.dtype, device=y.device)])
            used = torch.cat([is_id, torch.ones(virtual.shape[0], dtype=torch.bool, device=y.device)])
            reg_sum = masked_sum(_two_class_ce(self.logistic_regression, energies, labels), used)
            # a rank whose regulariser is off (queues not full, no ID row) adds nothing to the group's count
            n_used = torch.where(was_full & any_id, used.sum(), torch.zeros_like(used.sum()))
        else:
            reg_sum, n_used = zero, torch.zeros((), dtype=torch.long, device=logits.device)
        counts = GlobalCounts(torch.stack([n_used, is_id.sum()]), self.process_group)
        reg = torch.where(was_full & any_id, counts.mean(reg_sum, 0), zero) if draw else zero
        # a batch without ID rows returns features.sum() · 0, so the features get exact zero gradients
        attach = torch.where(any_id, zero, features.to(acc).sum() * 0)

        if reduction == "mean":
            result = counts.mean(masked_sum(ce, is_id), 1) + self.alpha * reg + attach
        elif reduction == "sum":
            result = masked_sum(ce, is_id) + self.alpha * reg + attach
        else:
            result = select_id_rows(ce + self.alpha * reg + attach, is_id)
        return result.to(out)
