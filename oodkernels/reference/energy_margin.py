"""Energy-margin loss (Bai et al., *Feed Two Birds with One Scone*, ICML 2023), LOSS_CONTRACT.md §3.17.

With ``S_i = lse(f_i)``, φ = ``logistic_regression`` (passed on every call, acting row-wise; the
means run over all of φ's outputs), β = ``in_constraint_weight``, β₂ = ``ce_constraint_weight``::

    L_in  = mean_I σ(φ(S_i))                 L_out = mean_O σ(−φ(S_i − η))
    c1    = L_in − false_alarm_cutoff         c2    = mean_I CE(f_i, y_i) − ce_tol · full_train_loss
    ψ(c; λ, β) = λ·c + (β/2)·c²   if β·c + λ >= 0,   else −λ²/(2β)
    loss  = ψ(c2; λ₂, β₂) + out_constraint_weight · L_out + ψ(c1; λ, β)

The ψ branch is chosen on the device (``torch.where``). :meth:`EnergyMarginLoss.update_hyperparameters`
moves the multipliers λ, λ₂ and the penalty weights β, β₂ (augmented Lagrangian method).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import nn

from ._common import DataChecks
from ._common import LossInfo
from ._common import Paper
from ._common import Representation
from ._common import Task
from ._common import check_floating
from ._common import check_logits_and_targets
from ._common import check_targets
from ._common import result_dtypes
from ._distributed import GlobalMeans
from ._distributed import all_reduce_sum
from ._distributed import check_process_group
from .logits import ce_and_energy

__all__ = ["EnergyMarginLoss"]

BOTH_GROUPS_MESSAGE = "Every batch has to contain both ID and OOD samples"

_BUFFERS = (
    "full_train_loss",
    "eta",
    "false_alarm_cutoff",
    "in_constraint_weight",
    "lam",
    "lam2",
    "ce_tol",
    "ce_constraint_weight",
    "out_constraint_weight",
    "lr_lam",
    "penalty_mult",
    "constraint_tol",
)


def _call_phi(logistic_regression, x: Tensor) -> Tensor:
    """φ on (N, 1) inputs, given in φ's parameter dtype; result (N, K) in the dtype of ``x``."""
    dtype = x.dtype
    if isinstance(logistic_regression, nn.Module):
        for p in logistic_regression.parameters():
            if p.is_floating_point():
                dtype = p.dtype
                break
    out = logistic_regression(x.to(dtype))
    out = out.unsqueeze(1) if out.dim() == 1 else out.flatten(1)
    return out.to(x.dtype)


def alm_penalty(c: Tensor, lam: Tensor, beta: Tensor) -> Tensor:
    """``ψ(c; λ, β) = λ·c + (β/2)·c²`` if ``β·c + λ >= 0`` else ``−λ²/(2β)``, branch chosen on the device.

    A NaN violation ``c`` (a missing group with the data checks off, or non-finite logits) selects the
    quadratic branch, so the NaN reaches the loss instead of being replaced by the constant.
    """
    active = ~(beta * c + lam < 0)
    return torch.where(active, lam * c + beta / 2 * c.pow(2), -lam.pow(2) * 0.5 / beta)


class EnergyMarginLoss(nn.Module):
    """Energy-margin loss with the augmented Lagrangian method (LOSS_CONTRACT.md §3.17).

    forward(logits (B, C), targets (B,), logistic_regression) -> 0-d loss (formula in the module
    docstring). φ is *not* registered: pass the same module on every call and give its parameters
    to the optimizer. Every batch must contain ID (``y >= 0``) and OOD (``y < 0``) rows: with
    ``oodkernels.config.data_checks`` on this raises ``ValueError``, with it off a missing group
    gives NaN (no host read).

    State: 12 persistent 0-d float32 buffers named after the ten arguments, plus ``lam`` (λ) and
    ``lam2`` (λ₂), both starting at 0. Move the criterion with ``.to(device)``.
    """

    info = LossInfo(
        tasks={Task.CLASSIFICATION},
        inputs={Representation.LOGITS},
        supervised=True,
        paper=Paper(
            title="Feed Two Birds with One Scone: Exploiting Wild Data for Both Out-of-Distribution "
            "Generalization and Detection",
            venue="ICML",
            year=2023,
            url="https://arxiv.org/abs/2306.09158",
        ),
    )

    def __init__(
        self,
        full_train_loss: float,
        eta: float = 1.0,
        false_alarm_cutoff: float = 0.05,
        in_constraint_weight: float = 1.0,
        ce_tol: float = 2.0,
        ce_constraint_weight: float = 1.0,
        out_constraint_weight: float = 1.0,
        lr_lam: float = 1.0,
        penalty_mult: float = 1.5,
        constraint_tol: float = 0.0,
        *,
        process_group=None,
    ):
        super().__init__()
        values = {
            "full_train_loss": full_train_loss,
            "eta": eta,
            "false_alarm_cutoff": false_alarm_cutoff,
            "in_constraint_weight": in_constraint_weight,
            "lam": 0.0,
            "lam2": 0.0,
            "ce_tol": ce_tol,
            "ce_constraint_weight": ce_constraint_weight,
            "out_constraint_weight": out_constraint_weight,
            "lr_lam": lr_lam,
            "penalty_mult": penalty_mult,
            "constraint_tol": constraint_tol,
        }
        for name in _BUFFERS:
            self.register_buffer(name, torch.tensor(values[name], dtype=torch.float32))
        check_process_group(process_group)
        self.process_group = process_group

    #: per-row (CE, −lse) of the logits; oodkernels.loss swaps in the dispatched (fused) one
    _row_fn = None

    def _buffer(self, name: str, dtype: torch.dtype) -> Tensor:
        return getattr(self, name).to(dtype)

    def forward(
        self,
        logits: Tensor,
        targets: Tensor,
        logistic_regression: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """:param logits: (B, C); :param targets: (B,), ``< 0`` = OOD; :param logistic_regression: φ (N, 1) -> (N, K)"""
        check_floating("logits", logits)
        check_targets("targets", targets)
        checks = DataChecks(logits, targets)
        is_id = targets >= 0
        if self.process_group is None:
            # the reference checks the groups before the shape (with a group: the whole batch's, below)
            checks.raise_if(~(is_id.any() & (~is_id).any()), lambda: ValueError(BOTH_GROUPS_MESSAGE))
        if logits.dim() != 2:
            checks.flush()
            raise ValueError(f"Unsupported input shape: {logits.shape}")
        check_logits_and_targets(logits, targets, ranks=(2,))
        n_classes = logits.shape[1]
        checks.check_labels_below(targets, n_classes)

        out, acc = result_dtypes(logits)
        eta = self._buffer("eta", acc)
        zero = torch.zeros((), dtype=acc, device=logits.device)

        ce_rows, neg_lse = (ce_and_energy if self._row_fn is None else self._row_fn)(logits, targets)
        ce_rows, energy = ce_rows.to(acc), -neg_lse.to(acc)  # energy here: S = lse
        phi = _call_phi(logistic_regression, torch.where(is_id, energy, energy - eta).unsqueeze(1))
        width = phi.shape[1]
        id_rows = is_id.unsqueeze(1)
        sum_in = torch.where(id_rows, torch.sigmoid(phi), zero).sum()
        sum_out = torch.where(id_rows, zero, torch.sigmoid(-phi)).sum()
        sum_ce = torch.where(is_id, ce_rows, zero).sum()
        # ψ is not linear in the means: with a process group they are the whole batch's (GlobalMeans)
        means = GlobalMeans([sum_in, sum_out, sum_ce], [is_id.sum(), (~is_id).sum()], self.process_group)
        if self.process_group is not None:
            checks.raise_if(~((means.count(0) > 0) & (means.count(1) > 0)), lambda: ValueError(BOTH_GROUPS_MESSAGE))
        # plain count division: a missing group gives 0/0 = NaN when the data checks are off
        loss_in = means.mean(0, 0, width)
        loss_out = means.mean(1, 1, width)
        loss_ce = means.mean(2, 0)

        c1 = loss_in - self._buffer("false_alarm_cutoff", acc)
        c2 = loss_ce - self._buffer("ce_tol", acc) * self._buffer("full_train_loss", acc)
        in_loss = alm_penalty(c1, self._buffer("lam", acc), self._buffer("in_constraint_weight", acc))
        ce_loss = alm_penalty(c2, self._buffer("lam2", acc), self._buffer("ce_constraint_weight", acc))
        result = (ce_loss + self._buffer("out_constraint_weight", acc) * loss_out + in_loss).to(out)
        checks.flush()
        return result

    @torch.no_grad()
    def update_hyperparameters(
        self,
        model: Callable[[Tensor], Tensor],
        train_loader_in,
        logistic_regression: Callable[[Tensor], Tensor],
    ) -> None:
        """Update λ, λ₂, β, β₂ in place from the constraint violations on ``train_loader_in`` (§3.17).

        ``model`` is put into eval mode and **left there** (call ``model.train()`` afterwards). Each
        ``(input, label)`` batch is moved to the device of ``lam``; with all samples of the loader::

            c1 = mean σ(φ(lse(f))) − false_alarm_cutoff      c2 = mean CE(f, y) − ce_tol · full_train_loss
            λ  ← λ + lr_lam·c1   if c1·β + λ >= 0   else λ − lr_lam·λ/β
            λ₂ ← λ₂ + lr_lam·c2  if c2·β₂ + λ₂ >= 0 else λ₂ − lr_lam·λ₂/β₂
            β  ← β·penalty_mult  if c1 > constraint_tol
            β₂ ← β₂·penalty_mult if c2 > constraint_tol

        in this order (the λ updates use the old β). The sums stay on the device in float64. With the
        criterion's ``process_group``, the sums and counts are the group's (one all-reduce), so every rank
        makes the same update from the whole loader (each rank iterating its own shard).
        """
        model.eval()
        device = self.lam.device
        sig_sum = torch.zeros((), dtype=torch.float64, device=device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=device)
        sig_count = 0
        ce_count = 0
        for batch in train_loader_in:
            data, target = batch[0].to(device), batch[1].to(device)
            logits = model(data)
            _, acc = result_dtypes(logits)
            rows = logits.to(acc)
            phi = _call_phi(logistic_regression, torch.logsumexp(rows, dim=1).unsqueeze(1))
            sig_sum += torch.sigmoid(phi).to(torch.float64).sum()
            sig_count += phi.numel()
            ce_sum += F.cross_entropy(rows, target, reduction="sum").to(torch.float64)
            ce_count += target.numel()

        if self.process_group is not None:
            counts = torch.tensor([sig_count, ce_count], dtype=torch.float64, device=device)
            reduced = all_reduce_sum(torch.cat([torch.stack([sig_sum, ce_sum]), counts]), self.process_group)
            sig_sum, ce_sum, sig_count, ce_count = reduced.unbind()
        c1 = (sig_sum / sig_count).to(self.lam.dtype) - self.false_alarm_cutoff
        c2 = (ce_sum / ce_count).to(self.lam2.dtype) - self.ce_tol * self.full_train_loss
        beta, beta2 = self.in_constraint_weight, self.ce_constraint_weight
        lam, lam2, rate = self.lam, self.lam2, self.lr_lam
        lam.copy_(torch.where(c1 * beta + lam >= 0, lam + rate * c1, lam - rate * lam / beta))
        lam2.copy_(torch.where(c2 * beta2 + lam2 >= 0, lam2 + rate * c2, lam2 - rate * lam2 / beta2))
        self.in_constraint_weight.copy_(torch.where(c1 > self.constraint_tol, beta * self.penalty_mult, beta))
        self.ce_constraint_weight.copy_(torch.where(c2 > self.constraint_tol, beta2 * self.penalty_mult, beta2))
