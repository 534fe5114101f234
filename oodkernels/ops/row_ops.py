"""The row family's custom operators: ``oodkernels::row_loss_fwd``, ``row_loss_bwd``, ``row_scores``.

They wrap the Triton launchers of :mod:`oodkernels.kernels.rows` as ``torch.library`` custom ops
(``mutates_args=()``, fake impls, registered autograd), so ``torch.compile(fullgraph=True)`` sees
them as opaque nodes and CUDA-graph capture works (no host synchronisation inside).

``row_loss_fwd(logits, targets, cost, kind, alpha, m_in, m_out, ignore_index, block_r, block_c)``
    -> ``(values (R,), stats (4, R))`` in fp32 (fp64 for fp64 logits). ``values`` is differentiable
    with respect to ``logits``; the caller reduces it with plain torch ops (means with device-side
    normalisers, weights), so autograd hands the backward a per-row ``γ`` that already holds
    ``grad_output``, every normaliser and every weight (KERNEL_GUIDE P2).
``row_loss_bwd(grad_values, logits, targets, cost, stats, ...)`` -> a fresh ``dL/dlogits``. Its
    own backward raises: double backward through the fused kernels is not supported.
``row_scores(logits, which, t, block_r, block_c)`` -> (R,) scores, forward only.

``block_r = block_c = 0`` picks the launch heuristic; tests force small blocks (multi-block paths)
with :func:`forced_blocks`.

Each op dispatches at call time: CPU tensors go to the C++ implementations in ``csrc/rows.cpp``
(``oodkernels::cpu_row_loss_fwd`` / ``cpu_row_loss_bwd`` / ``cpu_row_scores``, same arguments and
outputs; there ``block_c`` is the class chunk) when :func:`oodkernels.ops.select_backend` picks the
cpp backend (auto with the extension built, or ``OODKERNELS_BACKEND=cpp``); everything else goes to
the Triton launchers (CUDA, or CPU under ``TRITON_INTERPRET=1``). The schemas, fake impls and
autograd registrations below are shared by both.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from ..kernels import rows as _kernels

_FORCED_BLOCKS: list = [None]


@contextlib.contextmanager
def forced_blocks(block_r: int, block_c: int):
    """Within the block, every fused row op launches with ``BLOCK_R = block_r``, ``BLOCK_C = block_c``.

    For tests: a ``block_c`` below C exercises the multi-block online softmax.
    """
    _FORCED_BLOCKS[0] = (int(block_r), int(block_c))
    try:
        yield
    finally:
        _FORCED_BLOCKS[0] = None


def block_args() -> tuple[int, int]:
    """``(block_r, block_c)`` to pass to the ops: the forced blocks, or ``(0, 0)`` for the heuristic."""
    forced = _FORCED_BLOCKS[0]
    return (0, 0) if forced is None else forced


def _override(block_r: int, block_c: int):
    return None if block_r <= 0 or block_c <= 0 else (block_r, block_c)


def _on_cpp(logits: Tensor) -> bool:
    """Whether this call runs the C++ operators (one source of truth: the backend selection)."""
    if logits.device.type != "cpu":
        return False
    from . import row_ops_backend  # the dispatch module imports this one: resolved at call time

    return row_ops_backend(logits.device) == "cpp"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("oodkernels::row_loss_fwd", mutates_args=())
def row_loss_fwd(
    logits: Tensor,
    targets: Tensor,
    cost: Optional[Tensor],
    kind: int,
    alpha: float,
    m_in: float,
    m_out: float,
    ignore_index: Optional[int],
    block_r: int,
    block_c: int,
) -> tuple[Tensor, Tensor]:
    if _on_cpp(logits):
        return torch.ops.oodkernels.cpu_row_loss_fwd(
            logits, targets, cost, kind, alpha, m_in, m_out, ignore_index, block_r, block_c
        )
    return _kernels.row_loss_forward(
        logits, targets, cost, kind, alpha, m_in, m_out, ignore_index, _override(block_r, block_c)
    )


@row_loss_fwd.register_fake
def _(logits, targets, cost, kind, alpha, m_in, m_out, ignore_index, block_r, block_c):
    n_rows = targets.numel()
    acc = _acc(logits.dtype)
    return logits.new_empty((n_rows,), dtype=acc), logits.new_empty((_kernels.N_STATS, n_rows), dtype=acc)


@torch.library.custom_op("oodkernels::row_loss_bwd", mutates_args=())
def row_loss_bwd(
    grad_values: Tensor,
    logits: Tensor,
    targets: Tensor,
    cost: Optional[Tensor],
    stats: Tensor,
    kind: int,
    alpha: float,
    m_in: float,
    m_out: float,
    ignore_index: Optional[int],
    block_r: int,
    block_c: int,
) -> Tensor:
    if _on_cpp(logits):
        return torch.ops.oodkernels.cpu_row_loss_bwd(
            grad_values, logits, targets, cost, stats, kind, alpha, m_in, m_out, ignore_index, block_r, block_c
        )
    return _kernels.row_loss_backward(
        grad_values, logits, targets, cost, stats, kind, alpha, m_in, m_out, ignore_index, _override(block_r, block_c)
    )


@row_loss_bwd.register_fake
def _(grad_values, logits, targets, cost, stats, kind, alpha, m_in, m_out, ignore_index, block_r, block_c):
    return torch.empty_like(logits)


def _fwd_setup_context(ctx, inputs, output):
    logits, targets, cost, kind, alpha, m_in, m_out, ignore_index, block_r, block_c = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(logits, targets, cost, stats)
    ctx.params = (kind, alpha, m_in, m_out, ignore_index, block_r, block_c)


def _fwd_backward(ctx, grad_values, grad_stats):
    logits, targets, cost, stats = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = torch.ops.oodkernels.row_loss_bwd(grad_values, logits, targets, cost, stats, *ctx.params)
    return grad_logits, None, None, None, None, None, None, None, None, None


row_loss_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _bwd_setup_context(ctx, inputs, output):
    pass


def _bwd_backward(ctx, grad):
    raise RuntimeError(
        "oodkernels::row_loss_bwd: double backward through the fused row kernels is not supported; "
        "use OODKERNELS_BACKEND=reference for higher-order gradients"
    )


row_loss_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


@torch.library.custom_op("oodkernels::row_scores", mutates_args=())
def row_scores(logits: Tensor, which: int, t: float, block_r: int, block_c: int) -> Tensor:
    if _on_cpp(logits):
        return torch.ops.oodkernels.cpu_row_scores(logits, which, t, block_r, block_c)
    return _kernels.row_scores(logits, which, t, _override(block_r, block_c))


@row_scores.register_fake
def _(logits, which, t, block_r, block_c):
    n_rows = logits.shape[0]
    for size in logits.shape[2:]:
        n_rows = n_rows * size
    return logits.new_empty((n_rows,), dtype=_acc(logits.dtype))
