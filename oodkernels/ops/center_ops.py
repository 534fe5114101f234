"""The center family's custom operators (``torch.library``, ``mutates_args=()``, fake impls, autograd).

Schemas (the C++ backend implements the same ones for CPU tensors; tensors, ints, floats only):

``center_sq_distances(x, centers, out_dtype, tf32, block_b, block_k, block_d) -> Tensor``
    (B, D), (K, D) -> (B, K) ``max(0, ‖x‖² + ‖m‖² − 2 x·m)`` in ``out_dtype``. Differentiable in both.
``center_sq_distances_grads(grad, dist, x, centers, need_x, need_m, tf32, block_b, block_k, block_d)``
    -> ``(dX, dM)``, the distance op's backward: ``G = grad·1[raw >= 0]``, ``dX = 2·(rowsum(G)⊙X − G·M)``,
    ``dM = 2·(colsum(G)⊙M − Gᵀ·X)`` in the inputs' dtypes ((0,) for an input that needs no gradient). The
    clamp mask is read from the forward's output ``dist`` (saved for backward): ``dist > 0`` passes, and only
    where ``dist`` is exactly 0 (a Triton tile, a C++ chunk of rows holding one) is the raw expansion
    recomputed, bitwise as the forward computed it, to pass ``raw == 0`` and stop ``raw < 0``. No distance
    GEMM runs otherwise: the mask reads ``grad`` and ``dist`` and writes ``G`` (B·K·(s_grad + s_dist + 4)
    bytes) instead of recomputing the norms and the ``2·B·K·D``-FLOP cross term. The two products are
    ``torch.addmm`` GEMMs on the Triton path; the C++ implementation runs them over the nonzeros of ``G``
    when at most one entry in eight is nonzero (CenterLoss's ``G`` has one per row), ``O(nnz·D)`` instead of
    ``O(B·K·D)``, as a row loop for at most 8 centers, and otherwise as ``at::mm`` plus one in-place pass.
``assigned_sq_distances(x, centers, index) -> Tensor``
    (B, D), (K, D), (B,) int64 in [0, K) -> (B,) ``s_i = Σ_d (x_id − m_{index_i, d})²`` by differences (II's
    intra-class spread; no expansion, no clamp), accumulated in fp32 (fp64 when either input is fp64) and
    returned in the promoted dtype. One pass over X; differentiable in ``x`` and ``centers``. A negative index
    is a row without a center (II's OOD rows): ``s_i = 0``, ``dX_i = 0``, its features never read; an index
    >= K raises on the C++ backend and gives NaN in Triton.
``assigned_sq_distances_grads(grad, x, centers, index, need_x, need_m) -> (dX, dM)``
    ``dX_i = 2·g_i·(x_i − m_{index_i})``, ``dM_c = −2·Σ_{i: index_i = c} g_i·(x_i − m_c)`` in the inputs'
    dtypes ((0,) for an input that needs no gradient). ``dM`` sums each class's rows in row order (rows
    grouped by a stable sort of ``index``): deterministic, no atomics.
``center_loss_fwd(x, centers, targets, margin, kind, p0, p1, p2, p3, tf32, block_b, block_k, block_d)``
    -> ``(values (B,), stats (3, B))`` in fp32/fp64. ``kind``: 0 CAC (p0 = α), 1 Center (p0 = r), 2 MCHAD
    (p0 = r, p1..p3 = w_center, w_nll, w_oe, ``margin`` a one-element tensor). ``centers=None`` means ``x`` is
    a (B, K) distance matrix (the module path ``crit(distances, targets)``); otherwise ``x`` are (B, D)
    features and the distances are computed in the kernel. ``values`` is differentiable in ``x`` and
    ``centers``; the caller reduces it with device-side normalisers, so the backward's per-row γ already holds
    ``grad_output`` and every normaliser (KERNEL_GUIDE P2).
``center_loss_bwd(grad_values, x, centers, targets, margin, stats, kind, p0, p1, p2, p3, tf32, blocks)``
    -> ``G = γ·∂ℓ/∂d`` (B, K): fp32/fp64 for features, the distances' dtype for a distance matrix.

The backward formulas turn ``G`` into ``dX = 2·(rowsum(G)⊙X − G·M)`` and ``dM = 2·(colsum(G)⊙M − Gᵀ·X)``
with ``torch.addmm`` in fp32 (fp64), skipping ``dM`` when the centers need no gradient. The two ``*_bwd``
ops raise in their own backward: double backward through the fused kernels is not supported.

Each op dispatches at call time: CPU tensors go to the C++ implementations in ``csrc/centers.cpp``
(``oodkernels::cpu_center_sq_distances`` / ``cpu_center_sq_distances_grads`` / ``cpu_assigned_sq_distances`` /
``cpu_assigned_sq_distances_grads`` / ``cpu_center_loss_fwd`` / ``cpu_center_loss_bwd``, same arguments and
outputs) when :func:`oodkernels.ops.select_backend` picks the cpp
backend for the center family (auto with the extension built, or ``OODKERNELS_BACKEND=cpp``); everything else
goes to the Triton launchers (CUDA, or CPU under ``TRITON_INTERPRET=1``). There the cross term is an ATen GEMM
on chunks of rows (``block_b > 0`` sets the rows per chunk), ``tf32``, ``block_k`` and ``block_d`` are unused.
The launcher module imports triton, so it is imported by the first Triton call; the ``kind`` codes and the
statistics count come from the triton-free :mod:`oodkernels.kernels.codes`, so this module (and with it the C++
path) imports where triton is not installed.

The callers in :mod:`oodkernels.ops.centers` go through :func:`run_sq_distances`, :func:`run_loss_values`,
:func:`run_loss_reduced` and :func:`run_assigned_sq_distances`: eager calls on the C++ backend take the C++
autograd steps (``oodkernels::cpu_center_sq_distances_step`` / ``cpu_center_loss_step`` /
``cpu_center_loss_reduced_step`` / ``cpu_assigned_sq_distances_step``, the same operators with their backward
registered in C++, csrc/centers.cpp; the reduced step also reduces), everything else these custom ops.

``block_* = 0`` picks the launch heuristic; tests force small blocks (multi-tile paths) with
:func:`forced_blocks`. TF32 for fp32 ``tl.dot`` is opt-in through :func:`tf32_dot` (about 1e-3 relative
error, and it worsens the expansion's cancellation ~8000x; KERNEL_GUIDE §3).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from ..kernels import codes
from ._eager import plain_eager_call

_FORCED_BLOCKS: list = [None]
_TF32: list = [False]


@contextlib.contextmanager
def forced_blocks(block_b: int, block_k: int, block_d: int):
    """Within the block, every center op launches with the given tile sizes (tests: multi-tile paths)."""
    _FORCED_BLOCKS[0] = (int(block_b), int(block_k), int(block_d))
    try:
        yield
    finally:
        _FORCED_BLOCKS[0] = None


@contextlib.contextmanager
def tf32_dot(enabled: bool = True):
    """Within the block, fp32 distance products use TF32 tensor cores (opt-in; about 1e-3 relative error)."""
    saved = _TF32[0]
    _TF32[0] = bool(enabled)
    try:
        yield
    finally:
        _TF32[0] = saved


def launch_args() -> tuple[bool, int, int, int]:
    """``(tf32, block_b, block_k, block_d)`` to pass to the ops."""
    forced = _FORCED_BLOCKS[0]
    return (_TF32[0], *((0, 0, 0) if forced is None else forced))


#: the center family's operations share these custom ops, so one of them stands for the family's backend
CENTER_FAMILY_OPERATION = "center_loss"


def _on_cpp(x: Tensor) -> bool:
    """Whether this call runs the C++ operators (one source of truth: the backend selection)."""
    if x.device.type != "cpu":
        return False
    from . import select_backend  # the dispatch module imports this one: resolved at call time

    return select_backend(CENTER_FAMILY_OPERATION, x.device)[0] == "cpp"


def _launchers():
    """The Triton launchers (:mod:`oodkernels.kernels.centers`), imported by the first Triton call, never before:
    that module imports triton, which need not be installed where the C++ backend serves every CPU call."""
    from ..kernels import centers

    return centers


def _override(block_b: int, block_k: int, block_d: int):
    return None if min(block_b, block_k, block_d) <= 0 else (block_b, block_k, block_d)


def _acc(*tensors: Optional[Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _gemm_grads(ctx_needs_x: bool, ctx_needs_m: bool, g: Tensor, x: Tensor, centers: Tensor):
    """``dX = 2·(rowsum(G)⊙X − G·M)``, ``dM = 2·(colsum(G)⊙M − Gᵀ·X)``, in G's dtype, cast to the inputs'."""
    acc = g.dtype
    xa = x.to(acc)
    ma = centers.to(acc)
    grad_x = grad_m = None
    if ctx_needs_x:
        grad_x = torch.addmm(g.sum(1, keepdim=True) * xa, g, ma, beta=2.0, alpha=-2.0).to(x.dtype)
    if ctx_needs_m:
        grad_m = torch.addmm(g.sum(0).unsqueeze(1) * ma, g.t(), xa, beta=2.0, alpha=-2.0).to(centers.dtype)
    return grad_x, grad_m


def _raise_double_backward(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"oodkernels::{op}: double backward through the fused center kernels is not supported; "
            "use OODKERNELS_BACKEND=reference for higher-order gradients"
        )

    return backward


def _no_context(ctx, inputs, output):
    pass


# ----------------------------------------------------------------------------------------------
# distances
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("oodkernels::center_sq_distances", mutates_args=())
def center_sq_distances(
    x: Tensor, centers: Tensor, out_dtype: torch.dtype, tf32: bool, block_b: int, block_k: int, block_d: int
) -> Tensor:
    if _on_cpp(x):
        return torch.ops.oodkernels.cpu_center_sq_distances(x, centers, out_dtype, tf32, block_b, block_k, block_d)
    return _launchers().sq_distances(x, centers, out_dtype, tf32, _override(block_b, block_k, block_d))


@center_sq_distances.register_fake
def _(x, centers, out_dtype, tf32, block_b, block_k, block_d):
    return x.new_empty((x.shape[0], centers.shape[0]), dtype=out_dtype)


@torch.library.custom_op("oodkernels::center_sq_distances_grads", mutates_args=())
def center_sq_distances_grads(
    grad: Tensor,
    dist: Tensor,
    x: Tensor,
    centers: Tensor,
    need_x: bool,
    need_m: bool,
    tf32: bool,
    block_b: int,
    block_k: int,
    block_d: int,
) -> tuple[Tensor, Tensor]:
    if _on_cpp(x):
        return torch.ops.oodkernels.cpu_center_sq_distances_grads(
            grad, dist, x, centers, need_x, need_m, tf32, block_b, block_k, block_d
        )
    g = _launchers().sq_distances_grad(grad, dist, x, centers, tf32, _override(block_b, block_k, block_d))
    grad_x, grad_m = _gemm_grads(need_x, need_m, g, x, centers)
    return (
        x.new_empty((0,)) if grad_x is None else grad_x.contiguous(),
        centers.new_empty((0,)) if grad_m is None else grad_m.contiguous(),
    )


@center_sq_distances_grads.register_fake
def _(grad, dist, x, centers, need_x, need_m, tf32, block_b, block_k, block_d):
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else x.new_empty((0,))
    grad_m = torch.empty_like(centers, memory_format=torch.contiguous_format) if need_m else centers.new_empty((0,))
    return grad_x, grad_m


def _dist_setup_context(ctx, inputs, output):
    x, centers, out_dtype, tf32, block_b, block_k, block_d = inputs
    # the output tells the backward where the clamp was active (it is usually kept alive by the loss anyway)
    ctx.save_for_backward(x, centers, output)
    ctx.params = (tf32, block_b, block_k, block_d)


def _dist_backward(ctx, grad):
    x, centers, dist = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None, None, None, None, None
    need_x, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_m = torch.ops.oodkernels.center_sq_distances_grads(grad, dist, x, centers, need_x, need_m, *ctx.params)
    return (grad_x if need_x else None), (grad_m if need_m else None), None, None, None, None, None


center_sq_distances.register_autograd(_dist_backward, setup_context=_dist_setup_context)
center_sq_distances_grads.register_autograd(
    _raise_double_backward("center_sq_distances_grads"), setup_context=_no_context
)


# ----------------------------------------------------------------------------------------------
# distances to assigned centers (II's intra-class spread)
# ----------------------------------------------------------------------------------------------


def _promoted(x: Tensor, centers: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, centers.dtype)


def _check_assigned(x: Tensor, centers: Tensor, index: Tensor) -> None:
    """The metadata both backends need (the values of ``index`` are the C++ op's to check: no host read here)."""
    if x.dim() != 2 or centers.dim() != 2 or centers.shape[1] != x.shape[1]:
        raise ValueError(
            f"assigned_sq_distances: expected x (B, D) and centers (K, D), got {tuple(x.shape)} and "
            f"{tuple(centers.shape)}"
        )
    if index.dtype != torch.int64 or index.shape != (x.shape[0],):
        raise ValueError(
            f"assigned_sq_distances: index: expected int64 of shape ({x.shape[0]},), got {index.dtype} of shape "
            f"{tuple(index.shape)}"
        )


@torch.library.custom_op("oodkernels::assigned_sq_distances", mutates_args=())
def assigned_sq_distances(x: Tensor, centers: Tensor, index: Tensor) -> Tensor:
    _check_assigned(x, centers, index)
    if _on_cpp(x):
        return torch.ops.oodkernels.cpu_assigned_sq_distances(x, centers, index)
    return _launchers().assigned_sq_distances(x, centers, index, _promoted(x, centers))


@assigned_sq_distances.register_fake
def _(x, centers, index):
    _check_assigned(x, centers, index)
    return x.new_empty((x.shape[0],), dtype=_promoted(x, centers))


@torch.library.custom_op("oodkernels::assigned_sq_distances_grads", mutates_args=())
def assigned_sq_distances_grads(
    grad: Tensor, x: Tensor, centers: Tensor, index: Tensor, need_x: bool, need_m: bool
) -> tuple[Tensor, Tensor]:
    if _on_cpp(x):
        return torch.ops.oodkernels.cpu_assigned_sq_distances_grads(grad, x, centers, index, need_x, need_m)
    grad_x, grad_m = _launchers().assigned_sq_distances_grads(grad, x, centers, index, need_x, need_m)
    return (x.new_empty((0,)) if grad_x is None else grad_x, centers.new_empty((0,)) if grad_m is None else grad_m)


@assigned_sq_distances_grads.register_fake
def _(grad, x, centers, index, need_x, need_m):
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else x.new_empty((0,))
    grad_m = torch.empty_like(centers, memory_format=torch.contiguous_format) if need_m else centers.new_empty((0,))
    return grad_x, grad_m


def _assigned_setup_context(ctx, inputs, output):
    x, centers, index = inputs
    ctx.save_for_backward(x, centers, index)


def _assigned_backward(ctx, grad):
    x, centers, index = ctx.saved_tensors
    need_x, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_m):
        return None, None, None
    grad_x, grad_m = torch.ops.oodkernels.assigned_sq_distances_grads(grad, x, centers, index, need_x, need_m)
    return (grad_x if need_x else None), (grad_m if need_m else None), None


assigned_sq_distances.register_autograd(_assigned_backward, setup_context=_assigned_setup_context)
assigned_sq_distances_grads.register_autograd(
    _raise_double_backward("assigned_sq_distances_grads"), setup_context=_no_context
)


# ----------------------------------------------------------------------------------------------
# fused losses
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("oodkernels::center_loss_fwd", mutates_args=())
def center_loss_fwd(
    x: Tensor,
    centers: Optional[Tensor],
    targets: Tensor,
    margin: Optional[Tensor],
    kind: int,
    p0: float,
    p1: float,
    p2: float,
    p3: float,
    tf32: bool,
    block_b: int,
    block_k: int,
    block_d: int,
) -> tuple[Tensor, Tensor]:
    if _on_cpp(x):
        return torch.ops.oodkernels.cpu_center_loss_fwd(
            x, centers, targets, margin, kind, p0, p1, p2, p3, tf32, block_b, block_k, block_d
        )
    return _launchers().loss_forward(
        x, centers, targets, margin, kind, (p0, p1, p2, p3), tf32, _override(block_b, block_k, block_d)
    )


@center_loss_fwd.register_fake
def _(x, centers, targets, margin, kind, p0, p1, p2, p3, tf32, block_b, block_k, block_d):
    acc = _acc(x, centers)
    return x.new_empty((x.shape[0],), dtype=acc), x.new_empty((codes.CENTER_N_STATS, x.shape[0]), dtype=acc)


@torch.library.custom_op("oodkernels::center_loss_bwd", mutates_args=())
def center_loss_bwd(
    grad_values: Tensor,
    x: Tensor,
    centers: Optional[Tensor],
    targets: Tensor,
    margin: Optional[Tensor],
    stats: Tensor,
    kind: int,
    p0: float,
    p1: float,
    p2: float,
    p3: float,
    tf32: bool,
    block_b: int,
    block_k: int,
    block_d: int,
) -> Tensor:
    if _on_cpp(x):
        return torch.ops.oodkernels.cpu_center_loss_bwd(
            grad_values, x, centers, targets, margin, stats, kind, p0, p1, p2, p3, tf32, block_b, block_k, block_d
        )
    return _launchers().loss_backward(
        grad_values, x, centers, targets, margin, stats, kind, (p0, p1, p2, p3), tf32,
        _override(block_b, block_k, block_d),
    )  # fmt: skip


@center_loss_bwd.register_fake
def _(grad_values, x, centers, targets, margin, stats, kind, p0, p1, p2, p3, tf32, block_b, block_k, block_d):
    if centers is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return x.new_empty((x.shape[0], centers.shape[0]), dtype=_acc(x, centers))


def _loss_setup_context(ctx, inputs, output):
    x, centers, targets, margin, kind, p0, p1, p2, p3, tf32, block_b, block_k, block_d = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    # no zero-filled gradient for the statistics: they never receive one
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, centers, targets, margin, stats)
    ctx.params = (kind, p0, p1, p2, p3, tf32, block_b, block_k, block_d)


def _loss_backward(ctx, grad_values, grad_stats):
    x, centers, targets, margin, stats = ctx.saved_tensors
    nones = (None,) * 11
    need_x = ctx.needs_input_grad[0]
    need_m = centers is not None and ctx.needs_input_grad[1]
    if not (need_x or need_m) or grad_values is None:
        return (None, None, *nones)
    g = torch.ops.oodkernels.center_loss_bwd(grad_values, x, centers, targets, margin, stats, *ctx.params)
    if centers is None:
        return (g, None, *nones)
    grad_x, grad_m = _gemm_grads(need_x, need_m, g, x, centers)
    return (grad_x, grad_m, *nones)


center_loss_fwd.register_autograd(_loss_backward, setup_context=_loss_setup_context)
center_loss_bwd.register_autograd(_raise_double_backward("center_loss_bwd"), setup_context=_no_context)


# ----------------------------------------------------------------------------------------------
# the eager C++ calls: the same operators without the custom ops' Python layers (csrc/centers.cpp, "eager
# steps": each forward with its backward registered as one C++ autograd function)
# ----------------------------------------------------------------------------------------------


def _eager_cpp(x: Tensor, *others: Optional[Tensor]) -> bool:
    """Whether an eager call can take the C++ step: a plain eager call (:func:`~oodkernels.ops._eager.plain_eager_call`)
    with the C++ backend selected for ``x``."""
    return plain_eager_call(x, *others) and _on_cpp(x)


def run_sq_distances(
    x: Tensor, centers: Tensor, out_dtype: torch.dtype, tf32: bool, block_b: int, block_k: int, block_d: int
) -> Tensor:
    """``oodkernels::center_sq_distances``, called the cheapest way that keeps its semantics.

    Eager calls on the C++ backend run ``oodkernels::cpu_center_sq_distances_step``: the same C++ operators with
    their backward registered in C++, without the custom op's Python dispatch and generated autograd wrapper
    (forward and backward of the distance op on a tiny input: 316-344 us through the custom op, 165 us through
    the step). Everything else (CUDA, the interpreter, ``torch.compile``, tracing, fake tensors, subclasses) goes
    through the custom op, which opcheck and the compiler see.
    """
    if _eager_cpp(x, centers):
        return torch.ops.oodkernels.cpu_center_sq_distances_step(x, centers, out_dtype, tf32, block_b, block_k, block_d)
    return torch.ops.oodkernels.center_sq_distances(x, centers, out_dtype, tf32, block_b, block_k, block_d)


def run_loss_values(
    x: Tensor,
    centers: Optional[Tensor],
    targets: Tensor,
    margin: Optional[Tensor],
    kind: int,
    p0: float,
    p1: float,
    p2: float,
    p3: float,
    tf32: bool,
    block_b: int,
    block_k: int,
    block_d: int,
) -> Tensor:
    """The per-row ``values`` of ``oodkernels::center_loss_fwd`` (differentiable in ``x`` and ``centers``), called
    the cheapest way: eager calls on the C++ backend run ``oodkernels::cpu_center_loss_step`` (the statistics stay
    inside its autograd function), everything else the custom op (see :func:`run_sq_distances`)."""
    args = (x, centers, targets, margin, kind, p0, p1, p2, p3, tf32, block_b, block_k, block_d)
    if _eager_cpp(x, centers, targets, margin):
        return torch.ops.oodkernels.cpu_center_loss_step(*args)
    values, _ = torch.ops.oodkernels.center_loss_fwd(*args)
    return values


def run_loss_reduced(
    x: Tensor,
    centers: Optional[Tensor],
    targets: Tensor,
    margin: Optional[Tensor],
    kind: int,
    params: tuple,
    out_dtype: torch.dtype,
) -> Optional[tuple[Tensor, Tensor]]:
    """The whole criterion of ``kind`` in one C++ autograd step, ``oodkernels::cpu_center_loss_reduced_step``:
    the per-row values, their reduction (CAC ``Σ_ID v / N_ID``, Center the same over ``K``, MCHAD
    ``Σ_ID v / N_ID + Σ_OOD v``; fp64 sums, an empty ID set gives an attached 0) and the data checks' values,
    returned as ``(loss () in out_dtype, totals)`` with ``totals`` the fp64 ``codes.TOTAL_*`` (5,). The backward
    hands each row its weight in the loss as γ.

    None where the call is not a plain eager call on the C++ backend: the caller then runs
    :func:`run_loss_values` and the reduction in torch ops, as compiled, traced and CUDA calls do. One criterion
    step on the C++ backend thus costs one dispatcher call instead of a dozen small torch ops and their autograd
    nodes (CenterLoss forward and backward over a given 4096 x 100 distance matrix: see csrc/README.md)."""
    if not _eager_cpp(x, centers, targets, margin):
        return None
    out, totals = torch.ops.oodkernels.cpu_center_loss_reduced_step(
        x, centers, targets, margin, kind, *params, out_dtype, *launch_args()
    )
    return out, totals


def run_assigned_sq_distances(x: Tensor, centers: Tensor, index: Tensor) -> Tensor:
    """``oodkernels::assigned_sq_distances``, called the cheapest way: eager calls on the C++ backend run
    ``oodkernels::cpu_assigned_sq_distances_step`` after the op's own metadata checks, everything else the custom
    op (see :func:`run_sq_distances`)."""
    if _eager_cpp(x, centers, index):
        _check_assigned(x, centers, index)
        return torch.ops.oodkernels.cpu_assigned_sq_distances_step(x, centers, index)
    return torch.ops.oodkernels.assigned_sq_distances(x, centers, index)
