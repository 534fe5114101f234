"""Paired-batch training objectives and batch-mixing utilities (SPEC.md §2).

Losses over an ID batch and a separate OOD batch, on the fused row kernels (dispatched like every
operation, see :func:`oodkernels.backend_info`); the math is in :mod:`oodkernels.reference.paired`:

=========================================================================  =====================================
``outlier_exposure(logits_in, targets_in, logits_out, lambda_oe=0.5)``      mean_I CE + λ_oe·mean_O (lse − mean f)
``energy_margin(logits_in, targets_in, logits_out, lambda_energy=0.1,``     mean_I CE + λ·relu(mean_I E − mean_O E
``margin=10.0)``                                                           + margin), E = −lse
=========================================================================  =====================================

Plain-PyTorch utilities, seeded through an optional ``torch.Generator`` (the global generator when
None). They read one random draw on the host (the mixing weight, the box), as the papers' code does:

* :func:`mixup_data` and :func:`mixup_criterion` (Zhang et al., *mixup*, ICLR 2018);
* :class:`CutMix` (Yun et al., *CutMix*, ICCV 2019).
"""

from __future__ import annotations

import math
from typing import Callable
from typing import Optional

import torch
from torch import Tensor

from .ops import paired_energy_margin as energy_margin
from .ops import paired_outlier_exposure as outlier_exposure

__all__ = ["outlier_exposure", "energy_margin", "mixup_data", "mixup_criterion", "CutMix", "sample_beta"]


def _sample_gamma(concentration: float, generator: Optional[torch.Generator]) -> float:
    """One Gamma(k, 1) draw from ``generator`` (Marsaglia & Tsang 2000; k < 1 boosted by U^(1/k))."""
    boost = 1.0
    if concentration < 1.0:
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        boost = u ** (1.0 / concentration)
        concentration += 1.0
    d = concentration - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        # 16 candidates at a time: each is accepted with probability > 0.95
        x = torch.randn(16, generator=generator, dtype=torch.float64)
        u = torch.rand(16, generator=generator, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp(min=1e-300)))
        hits = ok.nonzero()
        if hits.numel():
            return float(d * v[hits[0, 0]]) * boost


def sample_beta(alpha: float, generator: Optional[torch.Generator] = None) -> float:
    """``λ ~ Beta(α, α)`` drawn from ``generator``, as a Python float (``1.0`` when ``α <= 0``, like mixup's code)."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise TypeError(f"alpha: expected a float, got {type(alpha).__name__}")
    if alpha <= 0:
        return 1.0
    a = _sample_gamma(float(alpha), generator)
    b = _sample_gamma(float(alpha), generator)
    return a / (a + b)


def _check_batch(x, y) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError(f"x: expected a tensor with a batch dimension, got {type(x).__name__}")
    if not isinstance(y, Tensor) or y.dim() < 1 or y.shape[0] != x.shape[0]:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y: expected a tensor with the batch size {x.shape[0]} of x on dim 0, got {got}")


def mixup_data(
    x: Tensor, y: Tensor, alpha: float = 1.0, generator: Optional[torch.Generator] = None
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Mix a batch with a permutation of itself: ``x̃ = λ·x + (1 − λ)·x[π]``, ``λ ~ Beta(α, α)``.

    :param x: inputs (B, ...), floating
    :param y: labels (B, ...) (any dtype; returned, not mixed)
    :param alpha: Beta concentration α (``<= 0``: λ = 1, no mixing)
    :param generator: source of λ and π (on the CPU; π is moved to x's device)
    :return: ``(x̃ (B, ...), y_a = y, y_b = y[π], λ)``; a new tensor, the inputs are not modified
    """
    _check_batch(x, y)
    lam = sample_beta(alpha, generator)
    index = torch.randperm(x.shape[0], generator=generator).to(x.device)
    mixed = lam * x + (1.0 - lam) * x[index]
    return mixed, y, y[index], lam


def mixup_criterion(criterion: Callable[..., Tensor], pred: Tensor, y_a: Tensor, y_b: Tensor, lam: float) -> Tensor:
    """``λ·criterion(pred, y_a) + (1 − λ)·criterion(pred, y_b)``, the loss of a mixed batch."""
    return lam * criterion(pred, y_a) + (1.0 - lam) * criterion(pred, y_b)


class CutMix:
    """Paste a random box of a permuted batch into each image (Yun et al., ICCV 2019).

    ``CutMix(alpha=1.0, generator=None)(x (B, C, H, W), y (B, ...))`` returns ``(x̃, y_a, y_b, λ)``:
    λ₀ ~ Beta(α, α); a box of size ``(⌊H·√(1−λ₀)⌋, ⌊W·√(1−λ₀)⌋)`` centred at a uniform pixel and
    clipped to the image is copied from ``x[π]``; ``λ = 1 − box area / (H·W)`` is the exact kept share,
    so the loss is ``mixup_criterion(criterion, pred, y_a, y_b, λ)``. ``x`` is not modified.
    """

    def __init__(self, alpha: float = 1.0, generator: Optional[torch.Generator] = None):
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha < 0:
            raise ValueError(f"alpha: expected a float >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.generator = generator

    def box(self, height: int, width: int, lam: float) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)`` of the pasted box (half-open), drawn from the generator."""
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy = int(torch.randint(height, (), generator=self.generator))
        cx = int(torch.randint(width, (), generator=self.generator))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        return top, bottom, left, right

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected images of shape (B, C, H, W), got {got}")
        _check_batch(x, y)
        lam = sample_beta(self.alpha, self.generator) if self.alpha > 0 else 1.0
        index = torch.randperm(x.shape[0], generator=self.generator).to(x.device)
        height, width = x.shape[2], x.shape[3]
        top, bottom, left, right = self.box(height, width, lam)
        mixed = x.clone()
        mixed[:, :, top:bottom, left:right] = x[index, :, top:bottom, left:right]
        kept = 1.0 - (bottom - top) * (right - left) / float(height * width)
        return mixed, y, y[index], kept
