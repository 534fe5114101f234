"""Global normalisers across the ranks of a process group: the ``process_group=`` option of the criteria.

Under ``DistributedDataParallel`` each rank sees a shard of the batch, and a criterion whose ``'mean'``
divides by a count of its own shard (``N_ID``, ``N_valid``, the two group sizes) is not the loss of the
whole batch: the ranks' counts differ (always, with outlier exposure and segmentation), DDP averages the
gradients with equal weights, and a rank without OOD rows weights the others' OOD terms wrongly.

Given a group of ``W`` ranks, the counts are summed over the group (one all-reduce of a small device
tensor per call: no host read, traceable by ``torch.compile``) and every rank returns

    L_rank = W · Σ_local terms / N_global

for each normalised term (:class:`GlobalCounts`). Then ``(1/W)·Σ_ranks ∇L_rank = ∇(Σ_all terms /
N_global)``: DDP's gradient average is the gradient of the whole-batch loss, and the mean of the ranks'
values is the whole-batch loss. An empty group keeps its convention (an attached 0, or NaN where PyTorch
divides by 0), decided by the global count. ``process_group=None`` is today's per-rank loss (pytorch-ood's
values).

A criterion that is a non-linear function ``ψ`` of its means (EnergyMarginLoss's penalties, the paired
energy margin's hinge) needs the global means themselves: :class:`GlobalMeans` all-reduces the (detached)
sums with the counts, in the same one all-reduce, and gives every rank

    m_rank = (Σ_all x + W·(Σ_local x − sg(Σ_local x))) / N_global          (sg: stop-gradient)

whose value is the whole-batch mean ``m`` on every rank and whose gradient is ``W·∇Σ_local x / N_global``.
Every rank then returns the whole-batch loss ``ψ(m)``, and DDP's average of the gradients
``ψ'(m)·W·∇Σ_local x / N_global`` is ``ψ'(m)·∇m``, the whole-batch gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

PROCESS_GROUP_EXPECTED = (
    "expected None or a torch.distributed.ProcessGroup (torch.distributed.group.WORLD after "
    "init_process_group, or a group from torch.distributed.new_group)"
)


def check_process_group(process_group, name: str = "process_group") -> None:
    """Raise a clear error unless ``process_group`` is None or a process group this rank belongs to."""
    if process_group is None or torch.compiler.is_compiling():
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(f"{name}: this build of torch has no torch.distributed; pass process_group=None")
    if process_group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"{name}: this rank is not a member of the group (new_group returned the non-member "
            "placeholder); pass the group only on its member ranks, or process_group=None"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{name}: {PROCESS_GROUP_EXPECTED}, got {type(process_group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError(f"{name}: torch.distributed is not initialised; call init_process_group first")


def group_size(process_group) -> float:
    """``W``, the number of ranks of ``process_group``."""
    import torch.distributed as dist

    return float(dist.get_world_size(process_group))


def all_reduce_sum(values: Tensor, process_group) -> Tensor:
    """``values`` (1-D) summed over the group, in float64 (exact for any realistic count, and a dtype every
    backend, gloo and NCCL, reduces): a functional collective, so ``torch.compile`` traces it and nothing
    waits on the host."""
    from torch.distributed import _functional_collectives as collectives

    return collectives.all_reduce(values.to(torch.float64), "sum", process_group)


def differentiable_sum_over_group(values: Tensor, process_group) -> Tensor:
    """``values`` summed over the group, with a backward that sums the incoming gradients over the group: for
    quantities such as IILoss's class sums, whose global value feeds every rank's loss (the gradient of each
    rank's sum is then the whole group's ``∂L/∂sum``). Two all-reduces per step, forward and backward."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(values, group=process_group)


class GlobalCounts:
    """One call's normalising counts, summed over ``process_group`` with one all-reduce, and the factor ``W``.

    :param counts: 1-D tensor of this rank's counts (any numeric dtype, on the loss's device)
    :param process_group: None (the counts stay local, no factor) or the group to sum them over
    """

    def __init__(self, counts: Tensor, process_group=None):
        check_process_group(process_group)
        self.scale: Optional[float] = None
        self.counts = counts
        if process_group is not None:
            self.counts = all_reduce_sum(counts, process_group)
            self.scale = group_size(process_group)

    def mean(self, total: Tensor, *which: int, empty_is_nan: bool = False) -> Tensor:
        """``W · total / N`` with ``N`` the sum of the counts ``which``: clamped to at least 1 (an empty group
        gives an attached 0), or unclamped with ``empty_is_nan`` (PyTorch's NaN for an empty mean)."""
        count = self.counts[which[0]]
        for i in which[1:]:
            count = count + self.counts[i]
        count = count.to(total.dtype)
        mean = total / (count if empty_is_nan else count.clamp(min=1))
        return mean if self.scale is None else mean * self.scale

    def sum(self, total: Tensor) -> Tensor:
        """A summed term: ``W · total`` (each rank's sum counts ``W`` times, so DDP's average is the whole
        batch's sum), ``total`` itself without a group."""
        return total if self.scale is None else total * self.scale


class GlobalMeans:
    """Means for a criterion that is non-linear in them: the whole-batch mean on every rank, with the gradient
    of ``W · Σ_local / N_global`` (module docstring). Sums and counts go in one all-reduce.

    :param sums: 0-d differentiable sums ``Σ_local x`` (their dtype is the means')
    :param counts: 0-d counts of this rank
    :param process_group: None (local means ``Σ_local x / N_local``) or the group
    """

    def __init__(self, sums: list, counts: list, process_group=None):
        check_process_group(process_group)
        self.sums = sums
        self.scale: Optional[float] = None
        self.counts = counts
        if process_group is not None:
            packed = torch.stack([t.detach().to(torch.float64) for t in [*sums, *counts]])
            reduced = all_reduce_sum(packed, process_group)
            self.global_sums = reduced[: len(sums)]
            self.counts = reduced[len(sums) :]
            self.scale = group_size(process_group)

    def count(self, which: int) -> Tensor:
        """Count ``which``, summed over the group when there is one."""
        return self.counts[which]

    def mean(self, which: int, count: int, divisor: float = 1.0, empty_is_nan: bool = True) -> Tensor:
        """Sum ``which`` over ``divisor`` times count ``count``: plain division (an empty group gives NaN), or
        with the count clamped to at least 1 (an attached 0) unless ``empty_is_nan``."""
        local = self.sums[which]
        n = self.counts[count].to(local.dtype)
        n = (n if empty_is_nan else n.clamp(min=1)) * divisor
        if self.scale is None:
            return local / n
        total = self.global_sums[which].to(local.dtype)
        return (total + self.scale * (local - local.detach())) / n
