"""The row family's custom operators: ``oodkernels::row_loss_reduced_fwd/bwd``, ``row_loss_fwd/bwd``,
``row_loss_energy_fwd/bwd``, ``row_scores``.

They wrap the Triton launchers of :mod:`oodkernels.kernels.rows` as ``torch.library`` custom ops
(``mutates_args=()``, fake impls, registered autograd), so ``torch.compile(fullgraph=True)`` sees
them as opaque nodes and CUDA-graph capture works (no host synchronisation inside).

The reduced op (what the row criteria run)::

    row_loss_reduced_fwd(Tensor logits, Tensor targets, Tensor? weight, Tensor? cost, int kind, float alpha,
                         float m_in, float m_out, int? ignore_index, int? background, int reduction,
                         bool checks, int block_r, int block_c) -> (Tensor out, Tensor totals, Tensor stats)
    row_loss_reduced_bwd(Tensor grad_out, Tensor logits, Tensor targets, Tensor? weight, Tensor? cost,
                         Tensor totals, Tensor stats, int kind, ..., int? background, int reduction,
                         int block_r, int block_c) -> Tensor grad_logits

    The whole criterion: ``targets`` of any integer dtype (read in place), ``weight`` (not differentiated)
    broadcastable to the targets' shape, ``background`` the BackgroundClassLoss column of OOD entries,
    ``reduction`` a ``codes.REDUCE_*`` code. ``out`` is in the logits' dtype: the reduced loss (), or the
    masked ``w·ℓ`` per entry (R,) for ``REDUCE_NONE``, or the float64 group sums ``(Σ_ID w·ℓ, Σ_OOD w·ℓ)`` (2,)
    for ``REDUCE_GROUP_SUMS`` (a process group's mean divides them by the global counts); ``totals``
    (ROW_N_TOTALS,) float64 on the device (``codes.TOTAL_*``: group sums and counts, largest valid label; (0,)
    for 'none' without ``checks``);
    ``stats`` what the backward reads besides the logits ((ROW_N_STATS, 0) for one-tile Triton rows).

The per-row ops (the batch-coupled criteria, and a ``weight`` that requires grad):

``row_loss_fwd(logits, targets, cost, kind, alpha, m_in, m_out, ignore_index, block_r, block_c)``
    -> ``(values (R,), stats (ROW_N_STATS, R or 0))`` in fp32 (fp64 for fp64 logits). ``values`` is differentiable
    with respect to ``logits``; the caller reduces it with plain torch ops (means with device-side
    normalisers, weights), so autograd hands the backward a per-row ``γ`` that already holds
    ``grad_output``, every normaliser and every weight (KERNEL_GUIDE P2).
``row_loss_bwd(grad_values, logits, targets, cost, stats, ...)`` -> a fresh ``dL/dlogits``. Its
    own backward raises: double backward through the fused kernels is not supported.
``row_scores(logits, which, t, block_r, block_c, class_weight=None)`` -> (R,) scores, forward only.
    ``which``: 0 energy, 1 max softmax, 2 max logit, 3 entropy (clamped p, pytorch-ood's), 4 weighted
    energy (needs ``class_weight`` (C,) in the accumulator dtype; appended argument), 5 exact entropy.

Energy variants (the same template kernels with their energy output switched on; added for the
batch-coupled criteria, EnergyMargin, VOS and the paired energy margin, whose energy terms are
tensor arithmetic with autograd on the per-row energies)::

    row_loss_energy_fwd(Tensor logits, Tensor targets, Tensor? cost, int kind, float alpha, float m_in,
                        float m_out, int? ignore_index, int block_r, int block_c, Tensor? class_weight)
        -> (Tensor values, Tensor energy, Tensor stats)
    row_loss_energy_bwd(Tensor grad_values, Tensor grad_energy, Tensor logits, Tensor targets, Tensor? cost,
                        Tensor stats, Tensor energy, Tensor? class_weight, int kind, float alpha, float m_in,
                        float m_out, int? ignore_index, int block_r, int block_c)
        -> (Tensor grad_logits, Tensor grad_class_weight)

``values`` and ``stats`` are those of ``row_loss_fwd``; ``energy`` (R,) in the accumulator dtype is
``−lse(x)`` of every row in range, or with ``class_weight`` (C,) (accumulator dtype, contiguous) the
weighted energy ``−(m + ln Σ_c relu(w_c)·exp(x_c − m))``, ``m = max_c x_c``. Both ``values`` and
``energy`` are differentiable with respect to ``logits`` and ``class_weight``: backward adds
``−γ_E·p`` (or ``−γ_E·q``, ``q_c = relu(w_c)·exp(x_c + E)``) to the row gradient and returns
``dL/dw_c = −Σ_rows γ_E·1[w_c > 0]·exp(x_c + E)`` ((0,) without ``class_weight``).

``block_r = block_c = 0`` picks the launch heuristic; tests force small blocks (multi-block paths)
with :func:`forced_blocks`.

Each op dispatches at call time: CPU tensors go to the C++ implementations in ``csrc/rows.cpp``
(``oodkernels::cpu_row_loss_fwd`` / ``cpu_row_loss_bwd`` / ``cpu_row_scores`` / ``cpu_row_loss_energy_fwd`` /
``cpu_row_loss_energy_bwd``, same arguments and outputs; there ``block_c`` is the class chunk) when
:func:`oodkernels.ops.select_backend` picks the cpp backend (auto with the extension built, or
``OODKERNELS_BACKEND=cpp``); everything else goes to the Triton launchers (CUDA, or CPU under
``TRITON_INTERPRET=1``). The schemas, fake impls and autograd registrations below are shared by both.
The launcher module imports triton, so it is imported by the first Triton call; the ``kind`` / ``which``
codes and the statistics count come from the triton-free :mod:`oodkernels.kernels.codes`, so this module
(and with it the C++ path) imports where triton is not installed.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from ..kernels import codes
from ._eager import plain_eager_call

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


def _launchers():
    """The Triton launchers (:mod:`oodkernels.kernels.rows`), imported by the first Triton call, never before:
    that module imports triton, which need not be installed where the C++ backend serves every CPU call."""
    from ..kernels import rows

    return rows


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


def _saved_rows(logits: Tensor, n_rows: int, block_r: int, block_c: int) -> int:
    """Rows of the ``stats`` a forward saves: all of them on the C++ backend and for Triton rows that stream
    through several class blocks; none for one-tile Triton rows (their backward recomputes the statistics)."""
    if _on_cpp(logits) or codes.row_saves_stats(logits.shape[1], logits.element_size(), block_r, block_c):
        return n_rows
    return 0


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
    return _launchers().row_loss_forward(
        logits, targets, cost, kind, alpha, m_in, m_out, ignore_index, _override(block_r, block_c)
    )


@row_loss_fwd.register_fake
def _(logits, targets, cost, kind, alpha, m_in, m_out, ignore_index, block_r, block_c):
    n_rows = targets.numel()
    acc = _acc(logits.dtype)
    saved = _saved_rows(logits, n_rows, block_r, block_c)
    return logits.new_empty((n_rows,), dtype=acc), logits.new_empty((codes.ROW_N_STATS, saved), dtype=acc)


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
    return _launchers().row_loss_backward(
        grad_values, logits, targets, cost, stats, kind, alpha, m_in, m_out, ignore_index, _override(block_r, block_c)
    )


@row_loss_bwd.register_fake
def _(grad_values, logits, targets, cost, stats, kind, alpha, m_in, m_out, ignore_index, block_r, block_c):
    return torch.empty_like(logits)


def _fwd_setup_context(ctx, inputs, output):
    logits, targets, cost, kind, alpha, m_in, m_out, ignore_index, block_r, block_c = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    # no zero-filled (N_STATS, R) gradient for the statistics: they never receive one
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, targets, cost, stats)
    ctx.params = (kind, alpha, m_in, m_out, ignore_index, block_r, block_c)


def _fwd_backward(ctx, grad_values, grad_stats):
    logits, targets, cost, stats = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0] and grad_values is not None:
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
def row_scores(
    logits: Tensor, which: int, t: float, block_r: int, block_c: int, class_weight: Optional[Tensor] = None
) -> Tensor:
    if _on_cpp(logits):
        return torch.ops.oodkernels.cpu_row_scores(logits, which, t, block_r, block_c, class_weight)
    return _launchers().row_scores(logits, which, t, _override(block_r, block_c), class_weight)


@row_scores.register_fake
def _(logits, which, t, block_r, block_c, class_weight=None):
    n_rows = logits.shape[0]
    for size in logits.shape[2:]:
        n_rows = n_rows * size
    return logits.new_empty((n_rows,), dtype=_acc(logits.dtype))


# ----------------------------------------------------------------------------------------------
# the energy variants
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("oodkernels::row_loss_energy_fwd", mutates_args=())
def row_loss_energy_fwd(
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
    class_weight: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    if _on_cpp(logits):
        return torch.ops.oodkernels.cpu_row_loss_energy_fwd(
            logits, targets, cost, kind, alpha, m_in, m_out, ignore_index, block_r, block_c, class_weight
        )
    return _launchers().row_loss_energy_forward(
        logits, targets, cost, kind, alpha, m_in, m_out, ignore_index, class_weight, True, _override(block_r, block_c)
    )


@row_loss_energy_fwd.register_fake
def _(logits, targets, cost, kind, alpha, m_in, m_out, ignore_index, block_r, block_c, class_weight):
    n_rows = targets.numel()
    acc = _acc(logits.dtype)
    return (
        logits.new_empty((n_rows,), dtype=acc),
        logits.new_empty((n_rows,), dtype=acc),
        logits.new_empty((codes.ROW_N_STATS, _saved_rows(logits, n_rows, block_r, block_c)), dtype=acc),
    )


@torch.library.custom_op("oodkernels::row_loss_energy_bwd", mutates_args=())
def row_loss_energy_bwd(
    grad_values: Tensor,
    grad_energy: Tensor,
    logits: Tensor,
    targets: Tensor,
    cost: Optional[Tensor],
    stats: Tensor,
    energy: Tensor,
    class_weight: Optional[Tensor],
    kind: int,
    alpha: float,
    m_in: float,
    m_out: float,
    ignore_index: Optional[int],
    block_r: int,
    block_c: int,
) -> tuple[Tensor, Tensor]:
    if _on_cpp(logits):
        return torch.ops.oodkernels.cpu_row_loss_energy_bwd(
            grad_values,
            grad_energy,
            logits,
            targets,
            cost,
            stats,
            energy,
            class_weight,
            kind,
            alpha,
            m_in,
            m_out,
            ignore_index,
            block_r,
            block_c,
        )
    grad, grad_w = _launchers().row_loss_energy_backward(
        grad_values,
        grad_energy,
        logits,
        targets,
        cost,
        stats,
        energy,
        class_weight,
        kind,
        alpha,
        m_in,
        m_out,
        ignore_index,
        _override(block_r, block_c),
    )
    if grad_w is None:
        grad_w = stats.new_empty((0,))
    return grad, grad_w


@row_loss_energy_bwd.register_fake
def _(
    grad_values,
    grad_energy,
    logits,
    targets,
    cost,
    stats,
    energy,
    class_weight,
    kind,
    alpha,
    m_in,
    m_out,
    ignore_index,
    block_r,
    block_c,
):
    n_weights = 0 if class_weight is None else logits.shape[1]
    return torch.empty_like(logits), stats.new_empty((n_weights,))


def _energy_fwd_setup_context(ctx, inputs, output):
    logits, targets, cost, kind, alpha, m_in, m_out, ignore_index, block_r, block_c, class_weight = inputs
    _, energy, stats = output
    ctx.mark_non_differentiable(stats)
    # an unused output's gradient arrives as None (made zero below only when the other one is used)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, targets, cost, stats, energy, class_weight)
    ctx.params = (kind, alpha, m_in, m_out, ignore_index, block_r, block_c)


def _energy_fwd_backward(ctx, grad_values, grad_energy, grad_stats):
    logits, targets, cost, stats, energy, class_weight = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[10]) or (grad_values is None and grad_energy is None):
        return (None,) * 11
    if grad_values is None:
        grad_values = torch.zeros_like(energy)
    if grad_energy is None:
        grad_energy = torch.zeros_like(energy)
    grad_logits, grad_w = torch.ops.oodkernels.row_loss_energy_bwd(
        grad_values, grad_energy, logits, targets, cost, stats, energy, class_weight, *ctx.params
    )
    grad_logits = grad_logits if ctx.needs_input_grad[0] else None
    grad_w = grad_w if class_weight is not None and ctx.needs_input_grad[10] else None
    return grad_logits, None, None, None, None, None, None, None, None, None, grad_w


row_loss_energy_fwd.register_autograd(_energy_fwd_backward, setup_context=_energy_fwd_setup_context)


def _energy_bwd_backward(ctx, grad, grad_w):
    raise RuntimeError(
        "oodkernels::row_loss_energy_bwd: double backward through the fused row kernels is not supported; "
        "use OODKERNELS_BACKEND=reference for higher-order gradients"
    )


row_loss_energy_bwd.register_autograd(_energy_bwd_backward, setup_context=_bwd_setup_context)


# ----------------------------------------------------------------------------------------------
# the reduced op: the whole criterion (row math, masks, weights, normalisers) in the kernels
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("oodkernels::row_loss_reduced_fwd", mutates_args=())
def row_loss_reduced_fwd(
    logits: Tensor,
    targets: Tensor,
    weight: Optional[Tensor],
    cost: Optional[Tensor],
    kind: int,
    alpha: float,
    m_in: float,
    m_out: float,
    ignore_index: Optional[int],
    background: Optional[int],
    reduction: int,
    checks: bool,
    block_r: int,
    block_c: int,
) -> tuple[Tensor, Tensor, Tensor]:
    if _on_cpp(logits):
        return torch.ops.oodkernels.cpu_row_loss_reduced_fwd(
            logits, targets, weight, cost, kind, alpha, m_in, m_out, ignore_index, background, reduction, checks,
            block_r, block_c,
        )  # fmt: skip
    return _launchers().row_loss_reduced_forward(
        logits, targets, weight, cost, kind, alpha, m_in, m_out, ignore_index, background, reduction, checks,
        _override(block_r, block_c),
    )  # fmt: skip


@row_loss_reduced_fwd.register_fake
def _(logits, targets, weight, cost, kind, alpha, m_in, m_out, ignore_index, background, reduction, checks, block_r,
      block_c):  # fmt: skip
    n_rows = targets.numel()
    none = reduction == codes.REDUCE_NONE
    if reduction == codes.REDUCE_GROUP_SUMS:
        out = logits.new_empty((2,), dtype=torch.float64)
    else:
        out = logits.new_empty((n_rows,) if none else ())
    totals = logits.new_empty((codes.ROW_N_TOTALS if checks or not none else 0,), dtype=torch.float64)
    stats = logits.new_empty(
        (codes.ROW_N_STATS, _saved_rows(logits, n_rows, block_r, block_c)), dtype=_acc(logits.dtype)
    )
    return out, totals, stats


@torch.library.custom_op("oodkernels::row_loss_reduced_bwd", mutates_args=())
def row_loss_reduced_bwd(
    grad_out: Tensor,
    logits: Tensor,
    targets: Tensor,
    weight: Optional[Tensor],
    cost: Optional[Tensor],
    totals: Tensor,
    stats: Tensor,
    kind: int,
    alpha: float,
    m_in: float,
    m_out: float,
    ignore_index: Optional[int],
    background: Optional[int],
    reduction: int,
    block_r: int,
    block_c: int,
) -> Tensor:
    if _on_cpp(logits):
        return torch.ops.oodkernels.cpu_row_loss_reduced_bwd(
            grad_out, logits, targets, weight, cost, totals, stats, kind, alpha, m_in, m_out, ignore_index,
            background, reduction, block_r, block_c,
        )  # fmt: skip
    return _launchers().row_loss_reduced_backward(
        grad_out, logits, targets, weight, cost, totals, stats, kind, alpha, m_in, m_out, ignore_index, background,
        reduction, _override(block_r, block_c),
    )  # fmt: skip


@row_loss_reduced_bwd.register_fake
def _(grad_out, logits, targets, weight, cost, totals, stats, kind, alpha, m_in, m_out, ignore_index, background,
      reduction, block_r, block_c):  # fmt: skip
    return torch.empty_like(logits)


def _reduced_setup_context(ctx, inputs, output):
    logits, targets, weight, cost, kind, alpha, m_in, m_out, ignore_index, background, reduction, _, br, bc = inputs
    _, totals, stats = output
    ctx.mark_non_differentiable(totals, stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, targets, weight, cost, totals, stats)
    ctx.params = (kind, alpha, m_in, m_out, ignore_index, background, reduction, br, bc)


def _reduced_backward(ctx, grad_out, grad_totals, grad_stats):
    if ctx.needs_input_grad[2]:
        raise RuntimeError(
            "oodkernels::row_loss_reduced_fwd: no gradient for the per-entry weight; the row criteria run "
            "row_loss_fwd and a torch reduction when the weight requires grad"
        )
    logits, targets, weight, cost, totals, stats = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0] and grad_out is not None:
        kind, alpha, m_in, m_out, ignore_index, background, reduction, br, bc = ctx.params
        grad_logits = torch.ops.oodkernels.row_loss_reduced_bwd(
            grad_out, logits, targets, weight, cost, totals, stats, kind, alpha, m_in, m_out, ignore_index,
            background, reduction, br, bc,
        )  # fmt: skip
    return (grad_logits,) + (None,) * 13


row_loss_reduced_fwd.register_autograd(_reduced_backward, setup_context=_reduced_setup_context)


def _reduced_bwd_backward(ctx, grad):
    raise RuntimeError(
        "oodkernels::row_loss_reduced_bwd: double backward through the fused row kernels is not supported; "
        "use OODKERNELS_BACKEND=reference for higher-order gradients"
    )


row_loss_reduced_bwd.register_autograd(_reduced_bwd_backward, setup_context=_bwd_setup_context)


# ----------------------------------------------------------------------------------------------
# the eager C++ call: the same operators without the custom op's Python layers (csrc/rows.cpp
# cpu_row_loss_reduced_step: the forward and its backward registered as one C++ autograd function)
# ----------------------------------------------------------------------------------------------


def row_loss_reduced(
    logits: Tensor,
    targets: Tensor,
    weight: Optional[Tensor],
    cost: Optional[Tensor],
    kind: int,
    alpha: float,
    m_in: float,
    m_out: float,
    ignore_index: Optional[int],
    background: Optional[int],
    reduction: int,
    checks: bool,
    block_r: int,
    block_c: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``oodkernels::row_loss_reduced_fwd``, called the cheapest way that keeps its semantics.

    Eager calls on the C++ backend run ``oodkernels::cpu_row_loss_reduced_step``, the same C++ operators with
    their backward registered in C++ (one dispatcher call, no Python autograd layer: at 256 x 10 the custom
    op's Python dispatch and generated autograd wrapper cost more than the criterion); it returns no
    ``stats`` (None). Everything else (CUDA, the interpreter, ``torch.compile``, tracing, fake tensors,
    subclasses) goes through the custom op, which opcheck and the compiler see.
    """
    args = (logits, targets, weight, cost, kind, alpha, m_in, m_out, ignore_index, background, reduction, checks,
            block_r, block_c)  # fmt: skip
    if plain_eager_call(logits, targets, weight, cost) and _on_cpp(logits):
        out, totals = torch.ops.oodkernels.cpu_row_loss_reduced_step(*args)
        return out, totals, None
    return torch.ops.oodkernels.row_loss_reduced_fwd(*args)
