"""The center-distance kernel family: squared distances to class centers, with each loss in the epilogue.

Distances. Embeddings ``X (B, D)`` and centers ``M (K, D)`` give, by expansion (LOSS_CONTRACT §2.6)::

    raw_ik = (‖x_i‖² + ‖m_k‖²) − 2·⟨x_i, m_k⟩,        d_ik = max(raw_ik, 0)

A program owns ``BLOCK_B`` rows and loops over center tiles of ``BLOCK_K``; inside, the cross term is
accumulated over ``BLOCK_D`` slices with ``tl.dot`` (``input_precision="ieee"`` for fp32, TF32 only on
request, KERNEL_GUIDE P15). bf16/fp16 operands go to ``tl.dot`` natively on a GPU (fp32 accumulation); under
the interpreter, whose bf16 dot is wrong, and for mixed dtypes they are upcast first (constexpr ``UPCAST``).
fp64 (gradcheck) uses a broadcast product and ``tl.sum`` instead of ``tl.dot``: the same expansion, exact
fp64. Row norms come from the X slices; center norms ``‖m_k‖²`` are computed once per call by the launcher.
The float32 cancellation of the expansion (``x = (1000, 1000)``, ``m = (1000.001, 1000)`` give 0.0, exact
value 9.5e-7) is the reference's behaviour and is kept: same expansion, same clamp, zero gradient where the
raw expansion is negative. No ``(B, K, D)`` tensor exists anywhere.

Row losses (constexpr ``KIND``; ``y`` the label, ID ``0 <= y < K``, OOD ``y < 0``, ``y >= K`` gives NaN)::

    CAC     ID:  ℓ = α·d_y + log(1 + S),      S = Σ_{c≠y} e_c,  e_c = exp(min(d_y − d_c, 50))
    CENTER  ID:  ℓ = clamp(relu(d_y − r), 1e-12, 1e12) + (K − 1)·1e-12      (no target column: K·1e-12)
    MCHAD   ID:  ℓ = w_c·[clamp(relu(d_y − r), 1e-12, 1e12) + (K − 1)·1e-12]/K + w_n·(lse(−d) + d_y)
            OOD: ℓ = w_o·Σ_c relu(m² − d_c²)
    (other rows: ℓ = 0)

The caller turns the row values into the criterion with device-side normalisers (means over ID rows,
MCHAD's OOD sum), so autograd hands the backward a per-row ``γ_i`` that already holds ``grad_output`` and
every normaliser, applied before any batch sum (KERNEL_GUIDE P2). ``d_y`` is the target column's distance,
gathered before the center loop (CAC's exponent clamp needs it while the tiles stream); ``lse(−d)`` is an
online log-sum-exp across the tiles. Saved statistics, per row: ``[raw_y, S or lse(−d), T]`` with
``T = Σ_{c≠y} κ_c·e_c``, ``κ_c = 1[d_y − d_c <= 50]`` (torch.clamp passes the gradient at the bound).

Backward. A recompute kernel rebuilds the distance tiles (the same code, so bitwise the forward's values)
and writes ``G_ik = γ_i·∂ℓ_i/∂d_ik`` masked by the clamp (``raw_ik >= 0``, torch.clamp's rule)::

    CAC     G_ic = −γ·κ_c·e_c/(1 + S)  (c ≠ y),      G_iy = γ·(α + T/(1 + S))
    CENTER  G_iy = γ·1[1e-12 <= d_y − r <= 1e12]
    MCHAD   ID:  G_ic = −γ·w_n·softmax(−d)_c + [c = y]·γ·(w_n + w_c·1[1e-12 <= d_y − r <= 1e12]/K)
            OOD: G_ic = −2·γ·w_o·d_c·1[m² − d_c² > 0]

The ops layer then forms ``dX = 2·(rowsum(G)⊙X − G·M)`` and ``dM = 2·(colsum(G)⊙M − Gᵀ·X)`` with
``torch.addmm`` (cuBLAS/MKL, deterministic); ``dM`` is skipped for fixed centers. With ``FROM_DIST`` the same
kernels read a given (B, K) distance matrix instead (the module path ``crit(distances, targets)``): no
clamp, and ``G`` is the gradient of the distances themselves.

The distance op's backward (the module path's ``distance(z)``) recomputes nothing where the saved distances
are > 0: there the clamp passed. ``_clamp_mask_kernel`` writes ``G`` from the saved distances and flags the
tiles holding an exact 0; only those rerun ``_sq_distances_kernel`` (``WITH_GRAD``), whose raw expansion
(``_raw_tile`` on the forward's tile grid, bitwise the forward's) tells ``raw == 0`` (passes) from ``raw < 0``
(stops). Split in two so that the pass over every element runs light on registers (the recompute branch in
the same kernel held the mask pass's tiles across the D loop and spilled on sm_90).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# the KIND codes and the statistics count live in the triton-free codes module, which the ops import
from .codes import CENTER_N_STATS

CAC_EXPONENT_MAX = 50.0
CENTER_CLAMP_MIN = 1e-12
CENTER_CLAMP_MAX = 1e12


@triton.jit
def _exp(x, USE_FP64: tl.constexpr):
    # fp32 maps onto the hardware ex2; fp64 keeps the exact natural exponential (gradcheck-grade)
    if USE_FP64:
        return tl.exp(x)
    else:
        return tl.exp2(x * 1.4426950408889634)


@triton.jit
def _log1p(s):
    """``log(1 + s)`` accurate for small ``s`` (Goldberg's trick: the rounding of ``1 + s`` cancels)."""
    u = 1.0 + s
    return tl.where(u == 1.0, s, tl.log(u) * (s / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _param(p, BLOCK_B: tl.constexpr, ACC: tl.constexpr):
    """A scalar hyper-parameter (an fp64 argument) as an ACC vector: fp32 runs see the fp32-rounded value (P9)."""
    return (tl.zeros([BLOCK_B], ACC) + p).to(ACC)


@triton.jit
def _row_prologue(
    X,
    M,
    Mn,
    rows,
    row_mask,
    y_safe,  # [BLOCK_B] target column (0 where the row has none)
    has_target,  # [BLOCK_B] rows whose target column exists
    n_dim,
    stride_x_b,
    stride_x_d,
    stride_m_k,
    stride_m_d,
    ACC: tl.constexpr,
    FROM_DIST: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``(‖x_i‖², raw_iy)``: the row norms and the target column's raw distance (gathered center rows).

    With ``FROM_DIST`` ``X`` is the distance matrix: the norm is unused and ``raw_iy = X[i, y_i]``.
    """
    xn = tl.zeros([BLOCK_B], ACC)
    if FROM_DIST:
        raw_y = tl.load(X + rows * stride_x_b + y_safe * stride_x_d, mask=has_target, other=0.0).to(ACC)
    else:
        dot_y = tl.zeros([BLOCK_B], ACC)
        for d0 in range(0, n_dim, BLOCK_D):
            dd = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            dmask = dd < n_dim
            xb = tl.load(
                X + rows[:, None] * stride_x_b + dd[None, :] * stride_x_d,
                mask=row_mask[:, None] & dmask[None, :],
                other=0.0,
            ).to(ACC)
            mb = tl.load(
                M + y_safe[:, None] * stride_m_k + dd[None, :] * stride_m_d,
                mask=has_target[:, None] & dmask[None, :],
                other=0.0,
            ).to(ACC)
            xn += tl.sum(xb * xb, axis=1)
            dot_y += tl.sum(xb * mb, axis=1)
        mn_y = tl.load(Mn + y_safe, mask=has_target, other=0.0).to(ACC)
        raw_y = (xn + mn_y) - 2.0 * dot_y
    return xn, raw_y


@triton.jit
def _raw_tile(
    X,
    M,
    Mn,
    xn,  # [BLOCK_B] ‖x_i‖² (unused with FROM_DIST)
    rows,
    row_mask,
    cols,
    col_mask,
    n_dim,
    stride_x_b,
    stride_x_d,
    stride_m_k,
    stride_m_d,
    ACC: tl.constexpr,
    FROM_DIST: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The ``[BLOCK_B, BLOCK_K]`` tile of raw distances (before the clamp), in ACC.

    Forward and backward call this same function, so the recompute is bitwise the forward's tile.
    """
    if FROM_DIST:
        raw = tl.load(
            X + rows[:, None] * stride_x_b + cols[None, :] * stride_x_d,
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(ACC)
    else:
        cross = tl.zeros([BLOCK_B, BLOCK_K], ACC)
        for d0 in range(0, n_dim, BLOCK_D):
            dd = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            dmask = dd < n_dim
            xb = tl.load(
                X + rows[:, None] * stride_x_b + dd[None, :] * stride_x_d,
                mask=row_mask[:, None] & dmask[None, :],
                other=0.0,
            )
            mb = tl.load(
                M + cols[:, None] * stride_m_k + dd[None, :] * stride_m_d,
                mask=col_mask[:, None] & dmask[None, :],
                other=0.0,
            )
            if USE_DOT:
                if UPCAST:
                    if TF32:
                        cross = tl.dot(xb.to(ACC), tl.trans(mb.to(ACC)), cross, input_precision="tf32")
                    else:
                        cross = tl.dot(xb.to(ACC), tl.trans(mb.to(ACC)), cross, input_precision="ieee")
                else:
                    # bf16/fp16 operands on the tensor cores, fp32 accumulation (products are exact in fp32)
                    cross = tl.dot(xb, tl.trans(mb), cross)
            else:
                # fp64: the same expansion without tl.dot (exact fp64 products and sums)
                cross += tl.sum(xb.to(ACC)[:, None, :] * mb.to(ACC)[None, :, :], axis=2)
        mn = tl.load(Mn + cols, mask=col_mask, other=0.0).to(ACC)
        # the reference's order: (‖x‖² + ‖m‖²) − 2·x·m
        raw = (xn[:, None] + mn[None, :]) - 2.0 * cross
    return raw


@triton.jit
def _classify(Y, rows, row_mask, stride_y, n_centers):
    """``(y, y_safe, is_id, is_ood, has_target)`` of a block of rows; labels of any integer dtype."""
    y = tl.load(Y + rows * stride_y, mask=row_mask, other=0).to(tl.int64)
    is_id = row_mask & (y >= 0)
    is_ood = row_mask & (y < 0)
    has_target = is_id & (y < n_centers)
    y_safe = tl.where(has_target, y, 0)
    return y, y_safe, is_id, is_ood, has_target


@triton.jit
def _center_term(d_y, radius, has_target, n_centers):
    """``(clamp(relu(d_y − r), 1e-12, 1e12) + (K − 1)·1e-12, 1[gradient passes])``; no target: ``K·1e-12``."""
    t = d_y - radius
    pulled = tl.minimum(tl.maximum(t, 1e-12), 1e12)  # relu then clamp: relu(t) < 1e-12 clamps to 1e-12 anyway
    pulled = tl.where(has_target, pulled, 1e-12)
    value = pulled + (n_centers - 1) * 1e-12
    passes = has_target & (t >= 1e-12) & (t <= 1e12)
    return value, passes


@triton.jit
def _center_loss_fwd_kernel(
    X,  # features (B, D), or the distance matrix (B, K) with FROM_DIST
    M,  # centers (K, D) (unused with FROM_DIST)
    Mn,  # (K,) ACC center norms ‖m_k‖² (unused with FROM_DIST)
    Y,  # (B,) labels, any integer dtype
    Margin,  # MCHAD's margin m, one element (unused otherwise)
    Values,  # (B,) ACC row values ℓ_i
    Stats,  # (CENTER_N_STATS, B) ACC
    n_rows,  # B
    n_centers,  # K
    n_dim,  # D
    stride_x_b,
    stride_x_d,
    stride_m_k,
    stride_m_d,
    stride_y,
    p_0: tl.float64,  # CAC α; CENTER / MCHAD radius r
    p_1: tl.float64,  # MCHAD w_c
    p_2: tl.float64,  # MCHAD w_n
    p_3: tl.float64,  # MCHAD w_o
    KIND: tl.constexpr,
    FROM_DIST: tl.constexpr,
    USE_FP64: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    # 1. rows, labels, the target column's distance
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < n_rows
    y, y_safe, is_id, is_ood, has_target = _classify(Y, rows, row_mask, stride_y, n_centers)
    xn, raw_y = _row_prologue(
        X, M, Mn, rows, row_mask, y_safe, has_target, n_dim, stride_x_b, stride_x_d, stride_m_k, stride_m_d,
        ACC, FROM_DIST, BLOCK_B, BLOCK_D,
    )  # fmt: skip
    if FROM_DIST:
        d_y = raw_y
    else:
        d_y = tl.maximum(raw_y, 0.0)
    # a label >= K has no target column: NaN, as the reference's gather gives
    d_y = tl.where(is_id & ~has_target, float("nan"), d_y)
    p0 = _param(p_0, BLOCK_B, ACC)
    s_cac = tl.zeros([BLOCK_B], ACC)
    t_cac = tl.zeros([BLOCK_B], ACC)
    run_max = tl.full([BLOCK_B], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_B], ACC)
    push = tl.zeros([BLOCK_B], ACC)
    m_sq = tl.zeros([BLOCK_B], ACC)
    if KIND == 2:
        m = tl.load(Margin).to(ACC)
        m_sq = tl.zeros([BLOCK_B], ACC) + m * m
    # 2. stream the center tiles (CENTER needs only d_y: no tile at all)
    if KIND != 1:
        for k0 in range(0, n_centers, BLOCK_K):
            cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            col_mask = cols < n_centers
            raw = _raw_tile(
                X, M, Mn, xn, rows, row_mask, cols, col_mask, n_dim, stride_x_b, stride_x_d, stride_m_k,
                stride_m_d, ACC, FROM_DIST, USE_DOT, UPCAST, TF32, BLOCK_B, BLOCK_K, BLOCK_D,
            )  # fmt: skip
            if FROM_DIST:
                d = raw
            else:
                d = tl.maximum(raw, 0.0)
            # columns past K are infinitely far: they add exp(−inf) = 0 and relu(−inf) = 0
            d = tl.where(col_mask[None, :], d, float("inf"))
            if KIND == 0:  # CAC tuplet sum over c ≠ y
                gap = d_y[:, None] - d
                e = _exp(tl.minimum(gap, 50.0), USE_FP64)
                other = (cols[None, :] != y_safe[:, None]) & col_mask[None, :]
                e = tl.where(other, e, 0.0)
                s_cac += tl.sum(e, axis=1)
                t_cac += tl.sum(tl.where(gap <= 50.0, e, 0.0), axis=1)
            if KIND == 2:  # MCHAD: online lse(−d), and the OOD push Σ relu(m² − d²)
                v = -d
                m_new = tl.maximum(run_max, tl.max(v, axis=1))
                shift = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
                run_sum = run_sum * _exp(run_max - shift, USE_FP64) + tl.sum(_exp(v - shift[:, None], USE_FP64), axis=1)
                run_max = m_new
                push += tl.sum(tl.where(col_mask[None, :], tl.maximum(m_sq[:, None] - d * d, 0.0), 0.0), axis=1)
    # 3. row values and statistics
    zero = tl.zeros([BLOCK_B], ACC)
    stat_1 = zero
    if KIND == 0:
        value = tl.where(is_id, p0 * d_y + _log1p(s_cac), 0.0)
        stat_1 = s_cac
    elif KIND == 1:
        center, _ = _center_term(d_y, p0, has_target, n_centers)
        value = tl.where(is_id, center, 0.0)
    else:
        center, _ = _center_term(d_y, p0, has_target, n_centers)
        run_sum = tl.where(row_mask, run_sum, 1.0)
        lse = run_max + tl.log(run_sum)
        stat_1 = lse
        w_c = _param(p_1, BLOCK_B, ACC)
        w_n = _param(p_2, BLOCK_B, ACC)
        w_o = _param(p_3, BLOCK_B, ACC)
        value_id = w_c * (center / n_centers) + w_n * (lse + d_y)
        value = tl.where(is_id, value_id, tl.where(is_ood, w_o * push, 0.0))
    tl.store(Values + rows, value.to(Values.dtype.element_ty), mask=row_mask)
    tl.store(Stats + rows, raw_y.to(Stats.dtype.element_ty), mask=row_mask)
    tl.store(Stats + n_rows + rows, stat_1.to(Stats.dtype.element_ty), mask=row_mask)
    tl.store(Stats + 2 * n_rows + rows, t_cac.to(Stats.dtype.element_ty), mask=row_mask)


@triton.jit
def _center_loss_bwd_kernel(
    Gv,  # (B,) upstream gradient γ of the row values, any stride
    X,
    M,
    Mn,
    Y,
    Margin,
    Stats,  # (CENTER_N_STATS, B) from the forward
    Grad,  # (B, K) out: G = γ·∂ℓ/∂d (ACC), or dL/d(distances) with FROM_DIST (their dtype)
    n_rows,
    n_centers,
    n_dim,
    stride_g,
    stride_x_b,
    stride_x_d,
    stride_m_k,
    stride_m_d,
    stride_y,
    stride_o_b,
    stride_o_k,
    p_0: tl.float64,
    p_1: tl.float64,
    p_2: tl.float64,
    p_3: tl.float64,
    KIND: tl.constexpr,
    FROM_DIST: tl.constexpr,
    USE_FP64: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    # 1. this program's tile: rows × centers; per-row γ and statistics
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < n_rows
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < n_centers
    y, y_safe, is_id, is_ood, has_target = _classify(Y, rows, row_mask, stride_y, n_centers)
    gamma = tl.load(Gv + rows * stride_g, mask=row_mask, other=0.0).to(ACC)
    raw_y = tl.load(Stats + rows, mask=row_mask, other=0.0).to(ACC)
    stat_1 = tl.load(Stats + n_rows + rows, mask=row_mask, other=0.0).to(ACC)
    t_cac = tl.load(Stats + 2 * n_rows + rows, mask=row_mask, other=0.0).to(ACC)
    if FROM_DIST:
        d_y = raw_y
        pass_y = has_target
    else:
        d_y = tl.maximum(raw_y, 0.0)
        pass_y = has_target & (raw_y >= 0.0)  # torch.clamp(min=0) passes the gradient at exactly 0
    d_y = tl.where(is_id & ~has_target, float("nan"), d_y)
    p0 = _param(p_0, BLOCK_B, ACC)
    # 2. recompute the distance tile (the forward's code) unless the loss reads only d_y
    xn = tl.zeros([BLOCK_B], ACC)
    raw = tl.zeros([BLOCK_B, BLOCK_K], ACC)
    if KIND != 1:
        if not FROM_DIST:
            xn, _ = _row_prologue(
                X, M, Mn, rows, row_mask, y_safe, has_target & False, n_dim, stride_x_b, stride_x_d,
                stride_m_k, stride_m_d, ACC, FROM_DIST, BLOCK_B, BLOCK_D,
            )  # fmt: skip
        raw = _raw_tile(
            X, M, Mn, xn, rows, row_mask, cols, col_mask, n_dim, stride_x_b, stride_x_d, stride_m_k, stride_m_d,
            ACC, FROM_DIST, USE_DOT, UPCAST, TF32, BLOCK_B, BLOCK_K, BLOCK_D,
        )  # fmt: skip
    if FROM_DIST:
        d = raw
        pass_tile = row_mask[:, None] & col_mask[None, :]
    else:
        d = tl.maximum(raw, 0.0)
        pass_tile = row_mask[:, None] & col_mask[None, :] & (raw >= 0.0)
    # 3. ∂ℓ/∂d: a term over every column and a term at the target column
    is_y = (cols[None, :] == y_safe[:, None]) & pass_y[:, None]
    zero_tile = tl.zeros([BLOCK_B, BLOCK_K], ACC)
    tile_term = zero_tile
    if KIND == 0:
        one_plus_s = 1.0 + stat_1
        gap = d_y[:, None] - d
        e = _exp(tl.minimum(gap, 50.0), USE_FP64)
        other = (cols[None, :] != y_safe[:, None]) & (gap <= 50.0)
        tile_term = tl.where(other, -e / one_plus_s[:, None], 0.0)
        target_term = p0 + t_cac / one_plus_s
        row_on = has_target | (is_id & ~has_target)  # NaN rows stay NaN
        tile_term = tl.where(row_on[:, None], tile_term, 0.0)
        target_term = tl.where(row_on, target_term, 0.0)
    elif KIND == 1:
        _, passes = _center_term(d_y, p0, has_target, n_centers)
        target_term = tl.where(is_id & passes, 1.0, 0.0).to(ACC)
    else:
        w_c = _param(p_1, BLOCK_B, ACC)
        w_n = _param(p_2, BLOCK_B, ACC)
        w_o = _param(p_3, BLOCK_B, ACC)
        m = tl.load(Margin).to(ACC)
        m_sq = m * m
        _, passes = _center_term(d_y, p0, has_target, n_centers)
        soft = _exp(-d - stat_1[:, None], USE_FP64)
        push_grad = tl.where(m_sq - d * d > 0.0, -2.0 * d, 0.0)
        tile_term = tl.where(
            is_id[:, None], -w_n[:, None] * soft, tl.where(is_ood[:, None], w_o[:, None] * push_grad, 0.0)
        )
        target_term = tl.where(is_id, w_n + w_c * tl.where(passes, 1.0, 0.0) / n_centers, 0.0)
    grad = tl.where(pass_tile, tile_term, 0.0) + tl.where(is_y, target_term[:, None], 0.0)
    grad = gamma[:, None] * grad
    tl.store(
        Grad + rows[:, None] * stride_o_b + cols[None, :] * stride_o_k,
        grad.to(Grad.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _clamp_mask_kernel(
    Gin,  # (B, K) upstream gradient
    Dist,  # (B, K) the forward's clamped distances, any float dtype
    Out,  # (B, K) ACC: grad where the saved distance is > 0, else 0
    ZeroTiles,  # (cdiv(B, BLOCK_B), cdiv(K, BLOCK_K)) int8: 1 where the tile holds an exact 0
    n_rows,
    n_centers,
    stride_gi_b,
    stride_gi_k,
    stride_dd_b,
    stride_dd_k,
    stride_o_b,
    stride_o_k,
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The distance backward's mask pass over one [BLOCK_B, BLOCK_K] tile (BLOCK_B a fraction of the forward's).

    ``d > 0`` means the forward's raw expansion was > 0, so the clamp passed ``grad``; ``d == 0`` is either a
    clamped negative (stops) or an exact 0 (passes: torch.clamp(min=0) passes at the bound), which only the
    raw value tells apart. Those tiles are flagged for :func:`_sq_distances_kernel`'s recompute and written
    0 here. Elementwise; its tiles are a few rows tall because the row stride (K) is rarely a multiple of 16,
    so every element is its own load with its own 64-bit address: 64-row tiles took 146-200 registers (sm_90/80).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < n_rows)[:, None] & (cols < n_centers)[None, :]
    d = tl.load(Dist + rows[:, None] * stride_dd_b + cols[None, :] * stride_dd_k, mask=mask, other=1.0)
    g = tl.load(Gin + rows[:, None] * stride_gi_b + cols[None, :] * stride_gi_k, mask=mask, other=0.0)
    tl.store(
        Out + rows[:, None] * stride_o_b + cols[None, :] * stride_o_k,
        tl.where(d > 0.0, g.to(ACC), 0.0).to(Out.dtype.element_ty),
        mask=mask,
    )
    n_zero = tl.sum(tl.sum((mask & (d == 0.0)).to(tl.int32), axis=1), axis=0)
    tl.store(ZeroTiles + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), (n_zero > 0).to(tl.int8))


@triton.jit
def _sq_distances_kernel(
    X,  # (B, D)
    M,  # (K, D)
    Mn,  # (K,) ACC center norms
    Gin,  # (B, K) upstream gradient (WITH_GRAD only)
    ZeroTiles,  # _clamp_mask_kernel's tile flags (WITH_GRAD only)
    Out,  # (B, K): clamped distances (out dtype), or the clamp-masked gradient G (ACC) with WITH_GRAD
    n_rows,
    n_centers,
    n_dim,
    stride_x_b,
    stride_x_d,
    stride_m_k,
    stride_m_d,
    stride_gi_b,
    stride_gi_k,
    stride_o_b,
    stride_o_k,
    n_mask_rows,  # rows of ZeroTiles (WITH_GRAD only)
    WITH_GRAD: tl.constexpr,
    MASK_SPLIT: tl.constexpr,  # forward tile rows per mask-pass tile row (WITH_GRAD only)
    USE_FP64: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One [BLOCK_B, BLOCK_K] tile of ``max(raw, 0)`` (forward), or, with ``WITH_GRAD``, of ``grad·1[raw >= 0]``
    for a tile :func:`_clamp_mask_kernel` flagged (every other program returns at once).

    The recompute is the forward's own ``_raw_tile`` on the forward's tile grid, so bitwise the forward's raw
    values: ``raw >= 0`` is torch.clamp(min=0)'s gradient rule exactly, with no reference to the saved ``d``.
    """
    ACC: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    if WITH_GRAD:
        # the mask pass flagged its tiles of BLOCK_B // MASK_SPLIT rows: this tile's are MASK_SPLIT consecutive
        parts = tl.program_id(0) * MASK_SPLIT + tl.arange(0, MASK_SPLIT)
        flags = tl.load(ZeroTiles + parts * tl.num_programs(1) + tl.program_id(1), mask=parts < n_mask_rows, other=0)
        if tl.max(flags, axis=0) == 0:
            return
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < n_rows
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < n_centers
    xn, _ = _row_prologue(
        X, M, Mn, rows, row_mask, rows * 0, rows < 0, n_dim, stride_x_b, stride_x_d, stride_m_k, stride_m_d,
        ACC, False, BLOCK_B, BLOCK_D,
    )  # fmt: skip
    raw = _raw_tile(
        X, M, Mn, xn, rows, row_mask, cols, col_mask, n_dim, stride_x_b, stride_x_d, stride_m_k, stride_m_d,
        ACC, False, USE_DOT, UPCAST, TF32, BLOCK_B, BLOCK_K, BLOCK_D,
    )  # fmt: skip
    # [BLOCK_B, BLOCK_K] pointer tensors are formed after the D loop: one held across it costs two registers
    # per element (64-bit addresses)
    mask = row_mask[:, None] & col_mask[None, :]
    if WITH_GRAD:
        g = tl.load(Gin + rows[:, None] * stride_gi_b + cols[None, :] * stride_gi_k, mask=mask, other=0.0)
        result = tl.where(raw >= 0.0, g.to(ACC), 0.0)
    else:
        result = tl.maximum(raw, 0.0)
    tl.store(Out + rows[:, None] * stride_o_b + cols[None, :] * stride_o_k, result.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _assigned_sq_distances_kernel(
    X,  # (B, D)
    M,  # (K, D)
    Index,  # (B,) int64
    Grad,  # (B,) upstream gradient (WITH_GRAD only)
    Out,  # (B,) distances (out dtype), or (B, D) dX with WITH_GRAD
    n_rows,
    n_centers,
    n_dim,
    stride_x_b,
    stride_x_d,
    stride_m_k,
    stride_m_d,
    stride_g,
    stride_o_b,
    stride_o_d,
    WITH_GRAD: tl.constexpr,
    USE_FP64: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``BLOCK_B`` rows of ``s_i = Σ_d (x_id − m_{index_i, d})²`` (forward), or of ``dX_i = 2·g_i·(x_i − m_{index_i})``.

    A negative index is a row without a center: ``s_i = 0`` and ``dX_i = 0``, its features never loaded (a
    non-finite value there stays out). An index >= K reads no center (the load is masked) and gives NaN: a GPU
    kernel cannot raise, and no number is made up for it.
    """
    ACC: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < n_rows
    idx = tl.load(Index + rows, mask=row_mask, other=0)
    assigned = idx >= 0
    valid = assigned & (idx < n_centers)
    if WITH_GRAD:
        scale = 2.0 * tl.load(Grad + rows * stride_g, mask=row_mask, other=0.0).to(ACC)
        scale = tl.where(valid | ~assigned, scale, float("nan"))
    else:
        total = tl.zeros([BLOCK_B], ACC)
    for d0 in range(0, n_dim, BLOCK_D):
        dd = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        tile = row_mask[:, None] & (dd < n_dim)[None, :]
        xb = tl.load(
            X + rows[:, None] * stride_x_b + dd[None, :] * stride_x_d, mask=tile & assigned[:, None], other=0.0
        ).to(ACC)
        mb = tl.load(
            M + idx[:, None] * stride_m_k + dd[None, :] * stride_m_d, mask=tile & valid[:, None], other=0.0
        ).to(ACC)
        diff = xb - mb  # 0 on a row without a center
        if WITH_GRAD:
            out = (scale[:, None] * diff).to(Out.dtype.element_ty)
            tl.store(Out + rows[:, None] * stride_o_b + dd[None, :] * stride_o_d, out, mask=tile)
        else:
            total += tl.sum(diff * diff, axis=1)
    if not WITH_GRAD:
        total = tl.where(valid | ~assigned, total, float("nan"))
        tl.store(Out + rows * stride_o_b, total.to(Out.dtype.element_ty), mask=row_mask)


@triton.jit
def _assigned_center_grads_kernel(
    X,  # (B, D)
    M,  # (K, D)
    Grad,  # (B,)
    Order,  # (B,) int64: the rows grouped by class (a stable sort of the indices)
    Starts,  # (K + 1,) int64: class c's rows are Order[Starts[c]:Starts[c + 1]]
    Out,  # (K, D) dM
    n_dim,
    stride_x_b,
    stride_x_d,
    stride_m_k,
    stride_m_d,
    stride_g,
    stride_o_k,
    stride_o_d,
    USE_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``dM_c = −2·Σ_{i: index_i = c} g_i·(x_i − m_c)`` for one class and ``BLOCK_D`` dimensions: the class's rows
    in order, ``BLOCK_R`` at a time. One program owns each output, so no atomics and the sum is deterministic."""
    ACC: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    c = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < n_dim
    start = tl.load(Starts + c)
    end = tl.load(Starts + c + 1)
    m = tl.load(M + c * stride_m_k + dd * stride_m_d, mask=dmask, other=0.0).to(ACC)
    total = tl.zeros([BLOCK_D], ACC)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < end
        i = tl.load(Order + r, mask=rmask, other=0)
        g = tl.load(Grad + i * stride_g, mask=rmask, other=0.0).to(ACC)
        xb = tl.load(X + i[:, None] * stride_x_b + dd[None, :] * stride_x_d, mask=rmask[:, None] & dmask[None, :],
                     other=0.0).to(ACC)  # fmt: skip
        total += tl.sum(g[:, None] * (xb - m[None, :]), axis=0)
    tl.store(Out + c * stride_o_k + dd * stride_o_d, (-2.0 * total).to(Out.dtype.element_ty), mask=dmask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (LOSS_CONTRACT §2.10)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def dot_flags(x: torch.Tensor, centers: torch.Tensor) -> tuple[bool, bool]:
    """``(USE_DOT, UPCAST)``: fp64 runs without tl.dot; bf16/fp16 go native only on a GPU with both operands
    in the same half dtype (the interpreter's bf16 dot is wrong, triton #11584)."""
    if acc_dtype(x, centers) == torch.float64:
        return False, True
    native = x.dtype == centers.dtype and x.dtype in (torch.bfloat16, torch.float16) and not _interpreting()
    return True, not native


def launch_config(
    n_rows: int,
    n_centers: int,
    n_dim: int,
    dtype: torch.dtype,
    block_override=None,
    from_dist: bool = False,
    upcast: bool = True,
):
    """``(BLOCK_B, BLOCK_K, BLOCK_D, num_warps)``.

    Starting points, not yet measured on a GPU (none was available when this was written; KERNEL_GUIDE
    §2.7): 64 x 64 output tiles with 32-wide D slices keep the two operand tiles and the fp32 accumulator in
    registers at 4 warps (the shape of Triton's matmul tutorial's smaller configs); tl.dot needs every
    dimension >= 16 on a GPU. fp64 (no tl.dot: a [B, K, D] broadcast product in registers) uses 16 x 16 x 16.
    ``from_dist`` (the loss kernels over a given distance matrix) takes 16-row tiles, and an ``upcast``
    (CUDA-core, IEEE fp32) dot 16-wide D slices, both sized by the compile audit's registers (below).
    """
    if block_override is not None:
        b, k, d = block_override
        if not _interpreting():
            b, k, d = max(b, 16), max(k, 16), max(d, 16)
        return int(b), int(k), int(d), 4
    if dtype == torch.float64:
        return 16, 16, 16, 4
    block_k = 64 if n_centers > 32 else (32 if n_centers > 16 else 16)
    if from_dist:
        # the loss over a given (B, K) distance matrix: no dot, but its epilogue keeps several [BLOCK_B, BLOCK_K]
        # fp32 arrays live; compiled for sm_90 (bench/audit.py), 64 x 64 at 4 warps spilled 296 (CAC) and 460
        # (MCHAD) bytes per thread forward, 32 x 64 reached 244 registers; 16 x 64 (8 values per thread per
        # array) needs 104-126 registers forward, 60-72 backward, and spills nothing
        return 16, block_k, 16, 4
    # the upcast dot runs on CUDA cores with both operand slices in registers: 32-wide D slices took 168
    # registers on sm_90 and spilled 8-16 bytes at 255 on sm_80 (bench/audit.py, the 65536 x 1000 center
    # cases); 16-wide ones take 96-128 (sm_90) and 128-186 (sm_80) without a spill. Tensor-core dots (native
    # bf16/fp16) keep 32-wide slices.
    block_d = 16 if upcast or n_dim <= 16 else 32
    return 64, block_k, block_d, 4


#: forward tile rows per tile row of the distance backward's mask pass (:func:`_clamp_mask_kernel`)
MASK_SPLIT = 4


def center_norms(centers: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``‖m_k‖²`` in ACC, once per call (KERNEL_GUIDE §3)."""
    return centers.to(acc).pow(2).sum(1)


def sq_distances(
    x: torch.Tensor, centers: torch.Tensor, out_dtype: torch.dtype, tf32: bool = False, block_override=None
) -> torch.Tensor:
    """Launch the distance kernel: (B, K) clamped squared distances in ``out_dtype``."""
    acc = acc_dtype(x, centers)
    n_rows, n_dim = x.shape
    n_centers = centers.shape[0]
    out = torch.empty((n_rows, n_centers), dtype=out_dtype, device=x.device)
    if n_rows == 0 or n_centers == 0:
        return out
    mn = center_norms(centers, acc)
    use_dot, upcast = dot_flags(x, centers)
    bb, bk, bd, num_warps = launch_config(
        n_rows, n_centers, n_dim, x.dtype if acc != torch.float64 else acc, block_override, upcast=upcast
    )
    grid = (triton.cdiv(n_rows, bb), triton.cdiv(n_centers, bk))
    _sq_distances_kernel[grid](
        X=x, M=centers, Mn=mn, Gin=out, ZeroTiles=out, Out=out, n_rows=n_rows, n_centers=n_centers, n_dim=n_dim,
        stride_x_b=x.stride(0), stride_x_d=x.stride(1), stride_m_k=centers.stride(0), stride_m_d=centers.stride(1),
        stride_gi_b=0, stride_gi_k=0, stride_o_b=out.stride(0), stride_o_k=out.stride(1), n_mask_rows=0,
        WITH_GRAD=False, MASK_SPLIT=1, USE_FP64=acc == torch.float64, USE_DOT=use_dot, UPCAST=upcast, TF32=bool(tf32),
        BLOCK_B=bb, BLOCK_K=bk, BLOCK_D=bd, num_warps=num_warps,
    )  # fmt: skip
    return out


def sq_distances_grad(
    grad: torch.Tensor,
    dist: torch.Tensor,
    x: torch.Tensor,
    centers: torch.Tensor,
    tf32: bool = False,
    block_override=None,
) -> torch.Tensor:
    """The distance backward: ``G = grad·1[raw >= 0]`` (B, K) in ACC, two launches on the forward's tile grid.

    :func:`_clamp_mask_kernel` reads the forward's distances ``dist`` and ``grad`` (the clamp passed where
    ``dist > 0``) and flags the tiles holding an exact 0; :func:`_sq_distances_kernel` recomputes only those
    (bitwise the forward's raw values). Bytes: B·K·(s_dist + s_grad + s_acc) plus one byte per tile, plus the
    recompute's X and M reads for flagged tiles only.
    """
    acc = acc_dtype(x, centers)
    n_rows, n_dim = x.shape
    n_centers = centers.shape[0]
    out = torch.empty((n_rows, n_centers), dtype=acc, device=x.device)
    if n_rows == 0 or n_centers == 0:
        return out
    use_dot, upcast = dot_flags(x, centers)
    bb, bk, bd, num_warps = launch_config(
        n_rows, n_centers, n_dim, x.dtype if acc != torch.float64 else acc, block_override, upcast=upcast
    )
    grid = (triton.cdiv(n_rows, bb), triton.cdiv(n_centers, bk))
    mask_rows = max(bb // MASK_SPLIT, 1)
    zero_tiles = torch.empty((triton.cdiv(n_rows, mask_rows), grid[1]), dtype=torch.int8, device=x.device)
    _clamp_mask_kernel[zero_tiles.shape](
        Gin=grad, Dist=dist, Out=out, ZeroTiles=zero_tiles, n_rows=n_rows, n_centers=n_centers,
        stride_gi_b=grad.stride(0), stride_gi_k=grad.stride(1), stride_dd_b=dist.stride(0),
        stride_dd_k=dist.stride(1), stride_o_b=out.stride(0), stride_o_k=out.stride(1),
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_B=mask_rows, BLOCK_K=bk, num_warps=num_warps,
    )  # fmt: skip
    mn = center_norms(centers, acc)
    _sq_distances_kernel[grid](
        X=x, M=centers, Mn=mn, Gin=grad, ZeroTiles=zero_tiles, Out=out, n_rows=n_rows, n_centers=n_centers,
        n_dim=n_dim, stride_x_b=x.stride(0), stride_x_d=x.stride(1), stride_m_k=centers.stride(0),
        stride_m_d=centers.stride(1), stride_gi_b=grad.stride(0), stride_gi_k=grad.stride(1),
        stride_o_b=out.stride(0), stride_o_k=out.stride(1), n_mask_rows=zero_tiles.shape[0],
        WITH_GRAD=True, MASK_SPLIT=bb // mask_rows, USE_FP64=acc == torch.float64, USE_DOT=use_dot,
        UPCAST=upcast, TF32=bool(tf32),
        BLOCK_B=bb, BLOCK_K=bk, BLOCK_D=bd, num_warps=num_warps,
    )  # fmt: skip
    return out


def _assigned_blocks(n_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(BLOCK_B, BLOCK_D)`` of the assigned-distance kernels: up to 128 contiguous elements of a row per load
    (fp64: 64), 16 rows; both powers of two (the interpreter's small shapes get small tiles)."""
    cap = 64 if dtype == torch.float64 else 128
    return 16, min(cap, max(16, triton.next_power_of_2(max(n_dim, 1))))


def assigned_sq_distances(
    x: torch.Tensor, centers: torch.Tensor, index: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Launch the assigned-distance forward: (B,) ``Σ_d (x_id − m_{index_i, d})²`` in ``out_dtype``."""
    acc = acc_dtype(x, centers)
    n_rows, n_dim = x.shape
    out = torch.empty((n_rows,), dtype=out_dtype, device=x.device)
    if n_rows == 0:
        return out
    index = index.contiguous()  # the kernel reads it as one run
    bb, bd = _assigned_blocks(n_dim, acc)
    _assigned_sq_distances_kernel[(triton.cdiv(n_rows, bb),)](
        X=x, M=centers, Index=index, Grad=out, Out=out, n_rows=n_rows, n_centers=centers.shape[0], n_dim=n_dim,
        stride_x_b=x.stride(0), stride_x_d=x.stride(1), stride_m_k=centers.stride(0), stride_m_d=centers.stride(1),
        stride_g=0, stride_o_b=out.stride(0), stride_o_d=0, WITH_GRAD=False, USE_FP64=acc == torch.float64,
        BLOCK_B=bb, BLOCK_D=bd, num_warps=4,
    )  # fmt: skip
    return out


def assigned_sq_distances_grads(
    grad: torch.Tensor, x: torch.Tensor, centers: torch.Tensor, index: torch.Tensor, need_x: bool, need_m: bool
):
    """``(dX or None, dM or None)`` of the assigned distances, in the inputs' dtypes.

    ``dM`` groups the rows by class with device torch ops (a stable sort of the indices and a searchsorted of
    the class boundaries: no host read), then one program per (class, D slice) sums its rows.
    """
    acc = acc_dtype(x, centers)
    n_rows, n_dim = x.shape
    n_centers = centers.shape[0]
    bb, bd = _assigned_blocks(n_dim, acc)
    index = index.contiguous()  # the kernel reads it as one run
    grad_x = grad_m = None
    if need_x:
        grad_x = torch.empty((n_rows, n_dim), dtype=x.dtype, device=x.device)
        if n_rows > 0 and n_dim > 0:
            _assigned_sq_distances_kernel[(triton.cdiv(n_rows, bb),)](
                X=x, M=centers, Index=index, Grad=grad, Out=grad_x, n_rows=n_rows, n_centers=n_centers,
                n_dim=n_dim, stride_x_b=x.stride(0), stride_x_d=x.stride(1), stride_m_k=centers.stride(0),
                stride_m_d=centers.stride(1), stride_g=grad.stride(0), stride_o_b=grad_x.stride(0),
                stride_o_d=grad_x.stride(1), WITH_GRAD=True, USE_FP64=acc == torch.float64, BLOCK_B=bb,
                BLOCK_D=bd, num_warps=4,
            )  # fmt: skip
    if need_m:
        grad_m = torch.empty((n_centers, n_dim), dtype=centers.dtype, device=x.device)
        if n_centers > 0 and n_dim > 0:
            sorted_index, order = torch.sort(index, stable=True)
            # class c's rows start at the first sorted index >= c; out-of-range indices (NaN rows of the
            # forward) sort before class 0 or after class K - 1 and are left out. No bincount: on CUDA it reads
            # the indices' maximum back to the host to size its output
            classes = torch.arange(n_centers + 1, dtype=torch.int64, device=x.device)
            starts = torch.searchsorted(sorted_index, classes)
            _assigned_center_grads_kernel[(n_centers, triton.cdiv(n_dim, bd))](
                X=x, M=centers, Grad=grad, Order=order, Starts=starts, Out=grad_m, n_dim=n_dim,
                stride_x_b=x.stride(0), stride_x_d=x.stride(1), stride_m_k=centers.stride(0),
                stride_m_d=centers.stride(1), stride_g=grad.stride(0), stride_o_k=grad_m.stride(0),
                stride_o_d=grad_m.stride(1), USE_FP64=acc == torch.float64, BLOCK_R=2 * bb, BLOCK_D=bd,
                num_warps=4,
            )  # fmt: skip
    return grad_x, grad_m


def _geometry(x: torch.Tensor, centers):
    """``(B, K, D, acc, center norms, centers tensor, USE_DOT, UPCAST)``; ``centers is None``: x is (B, K) distances."""
    if centers is None:
        acc = acc_dtype(x)
        return x.shape[0], x.shape[1], 0, acc, x, x, False, True
    acc = acc_dtype(x, centers)
    use_dot, upcast = dot_flags(x, centers)
    return x.shape[0], centers.shape[0], x.shape[1], acc, center_norms(centers, acc), centers, use_dot, upcast


def loss_forward(
    x: torch.Tensor,
    centers,
    targets: torch.Tensor,
    margin,
    kind: int,
    params: tuple,
    tf32: bool = False,
    block_override=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused forward: ``(row values (B,), statistics (CENTER_N_STATS, B))`` in ACC."""
    n_rows, n_centers, n_dim, acc, mn, m, use_dot, upcast = _geometry(x, centers)
    values = torch.empty((n_rows,), dtype=acc, device=x.device)
    stats = torch.empty((CENTER_N_STATS, n_rows), dtype=acc, device=x.device)
    if n_rows == 0:
        return values, stats
    bb, bk, bd, num_warps = launch_config(
        n_rows, n_centers, n_dim, x.dtype if acc != torch.float64 else acc, block_override, centers is None, upcast
    )
    p0, p1, p2, p3 = (float(p) for p in params)
    _center_loss_fwd_kernel[(triton.cdiv(n_rows, bb),)](
        X=x, M=m, Mn=mn, Y=targets, Margin=margin if margin is not None else values, Values=values, Stats=stats,
        n_rows=n_rows, n_centers=n_centers, n_dim=n_dim, stride_x_b=x.stride(0), stride_x_d=x.stride(1),
        stride_m_k=m.stride(0), stride_m_d=m.stride(1), stride_y=targets.stride(0),
        p_0=p0, p_1=p1, p_2=p2, p_3=p3, KIND=kind, FROM_DIST=centers is None, USE_FP64=acc == torch.float64,
        USE_DOT=use_dot, UPCAST=upcast, TF32=bool(tf32), BLOCK_B=bb, BLOCK_K=bk, BLOCK_D=bd, num_warps=num_warps,
    )  # fmt: skip
    return values, stats


def loss_backward(
    grad_values: torch.Tensor,
    x: torch.Tensor,
    centers,
    targets: torch.Tensor,
    margin,
    stats: torch.Tensor,
    kind: int,
    params: tuple,
    tf32: bool = False,
    block_override=None,
) -> torch.Tensor:
    """Launch the recompute kernel: ``G = γ·∂ℓ/∂d`` (B, K) in ACC (``centers=None``: dL/d(distances), their dtype)."""
    n_rows, n_centers, n_dim, acc, mn, m, use_dot, upcast = _geometry(x, centers)
    out_dtype = x.dtype if centers is None else acc
    grad = torch.empty((n_rows, n_centers), dtype=out_dtype, device=x.device)
    if n_rows == 0 or n_centers == 0:
        return grad
    bb, bk, bd, num_warps = launch_config(
        n_rows, n_centers, n_dim, x.dtype if acc != torch.float64 else acc, block_override, centers is None, upcast
    )
    p0, p1, p2, p3 = (float(p) for p in params)
    grid = (triton.cdiv(n_rows, bb), triton.cdiv(n_centers, bk))
    _center_loss_bwd_kernel[grid](
        Gv=grad_values, X=x, M=m, Mn=mn, Y=targets, Margin=margin if margin is not None else stats, Stats=stats,
        Grad=grad, n_rows=n_rows, n_centers=n_centers, n_dim=n_dim,
        stride_g=grad_values.stride(0) if grad_values.dim() else 0, stride_x_b=x.stride(0), stride_x_d=x.stride(1),
        stride_m_k=m.stride(0), stride_m_d=m.stride(1), stride_y=targets.stride(0),
        stride_o_b=grad.stride(0), stride_o_k=grad.stride(1),
        p_0=p0, p_1=p1, p_2=p2, p_3=p3, KIND=kind, FROM_DIST=centers is None, USE_FP64=acc == torch.float64,
        USE_DOT=use_dot, UPCAST=upcast, TF32=bool(tf32), BLOCK_B=bb, BLOCK_K=bk, BLOCK_D=bd, num_warps=num_warps,
    )  # fmt: skip
    return grad
