"""The row-kernel template: every criterion whose per-entry term is a function of one row of logits.

Layout. Logits ``(N, C, *S)`` are read in place as ``[outer = N, C, inner = prod(S)]``: entry ``r``
(0 <= r < R = N·prod(S), in the order of ``targets.reshape(-1)``) is at ``outer = r // inner``,
``i = r % inner``, ``h = i // W``, ``w = i % W`` (W = last spatial size), with one explicit stride
per axis (``stride_*_outer``, ``stride_*_class``, ``stride_*_h``, ``stride_*_w``), so (B, C),
(N, C, L), NCHW, channels-last, transposed and sliced views are all read without a copy. Every
offset is int64.

Forward (one read of the logits). Per entry, an online pass over class blocks keeps, in the
accumulator dtype ``ACC`` (fp32, or fp64 for fp64 logits), of ``v = x·mult``::

    m = max_c v_c,  d = Σ_c exp(v_c − m),  v_y,  Σ_c v_c,  j* = argmax_c x_c (first on ties),
    e = Σ_c exp(v_c − m)·x_c,  x_y        (LogitNorm only: ρ = e/d − x_y)

``mult`` is 1 for the losses, 1/T for tempered scores and 1/s for LogitNorm. From them
``lse = m + ln d``, ``CE = (m − v_y) + ln d`` (no cancellation of two large numbers), ``π = 1/d``
(the maximum softmax probability) and ``U = lse − Σv/C``. The forward writes the row's loss value
and the statistics ``[m, ln d, j*, ‖x‖, ρ]`` that backward needs; nothing of logits size. (LogitNorm
reads the row twice in forward: its softmax is over ``x/s`` and ``s`` needs the norm first.)

Row values (``ω = cost[y, j*]`` with a cost matrix, else 1; ID: ``0 <= y < C``; OOD: ``y < 0``;
ignored: ``y == ignore_index``, value 0; a label ``y >= C`` gives NaN):

==================  ==========================================  ======================================
KIND                ID row                                      OOD row
==================  ==========================================  ======================================
CROSS_ENTROPY       ω·CE                                        0 (does not contribute)
OUTLIER_EXPOSURE    ω·CE                                        α·U                 (entropic: α = 1)
ENERGY              ω·CE + α·relu(−lse − m_in)²                 α·relu(m_out + lse)²
CONFIDENCE_PENALTY  ω·CE                                        λ·π
MARGIN_CONFIDENCE   ω·CE                                        relu(π − margin)
LOGIT_NORM          ω·CE(x/s), s = t·(‖x‖ + 1e-7)               0 (does not contribute)
==================  ==========================================  ======================================

Backward (one read of the logits, one write of a fresh gradient). With γ the upstream gradient of
the row value (per row, any stride, so every normaliser and ``grad_output`` is applied before any
batch sum) and ``p = softmax(v)`` recomputed from ``m`` and ``ln d``::

    dℓ/dx = γ·(a·p + b·e_y + c/C + h·e_j*) + δ·x

==================  ===============================  ==================================================
row kind            a, b, c, h                       derivation
==================  ===============================  ==================================================
ID (every KIND)     a = ω, b = −ω                    dCE/dx = p − e_y
ID, ENERGY          a += −2α·h_in                    h_in = relu(−lse − m_in), dlse/dx = p
OOD, OE             a = α, c = −α                    dU/dx = p − 1/C
OOD, ENERGY         a = 2α·h_out                     h_out = relu(m_out + lse)
OOD, CONFIDENCE     a = −λπ, h = λπ                  dπ/dx = π·(e_j* − p)
OOD, MARGIN         a = −κπ, h = κπ                  κ = 1[π > margin], strict like relu's backward
ID, LOGIT_NORM      a = ω/s, b = −ω/s, δ = −ωτρ/(ns²) n = ‖x‖, ρ = Σ q_j x_j − x_y, δ = 0 at n = 0
==================  ===============================  ==================================================

One-hot terms are added in ACC before the single rounding store (KERNEL_GUIDE P4).

Energy output (``RETURN_ENERGY``; ops ``row_loss_energy_fwd/bwd``). A second per-row output
``E = −lse``, or with a class-weight vector w (``HAS_WEIGHT``) the weighted energy
``E_w = −(m + ln d_w)``, ``d_w = Σ_c relu(w_c)·exp(x_c − m)`` kept beside ``d`` in the same online
pass (max-subtracted, fix g). Batch-coupled terms (EnergyMargin, VOS's logistic head, the paired
energy margin) are torch arithmetic on E; their per-row gradient ``γ_E`` arrives in the backward
kernel as ``a −= γ_E`` (plain) or ``g −= γ_E·relu(w)·exp(x + E)`` (weighted), and
``dL/dw_c = −Σ_r γ_E·1[w_c > 0]·exp(x_rc + E_r)`` is written as per-program partial column sums.

Scores (forward only, same online pass): energy −T·lse(x/T), max softmax −1/d, max logit −max x,
entropy −Σ p log p with p clamped to [1e-7, 1] (pytorch-ood's definition; a second pass once lse is
known), weighted energy E_w (WHICH 4), exact entropy lse − E_p[x] (WHICH 5, one pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# the KIND / WHICH codes and the statistics count live in the triton-free codes module, which the ops import
from .codes import ROW_N_STATS
from .codes import SCORE_WEIGHTED_ENERGY

LOGIT_NORM_EPS = 1e-7
ENTROPY_CLAMP = 1e-7


@triton.jit
def _exp(x, USE_FP64: tl.constexpr):
    # fp32 maps onto the hardware ex2; fp64 keeps the exact natural exponential (gradcheck-grade)
    if USE_FP64:
        return tl.exp(x)
    else:
        return tl.exp2(x * 1.4426950408889634)


@triton.jit
def _param(p, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    """A scalar hyper-parameter (an fp64 argument, so fp64 runs see it unrounded) as an ACC vector."""
    return (tl.zeros([BLOCK_R], ACC) + p).to(ACC)


@triton.jit
def _entry_offsets(rows, inner, width, stride_outer, stride_h, stride_w):
    """int64 offset of entry ``rows`` (a block of entry indices) in a ``[outer, inner]`` view."""
    outer = rows // inner
    i = rows - outer * inner
    h = i // width
    w = i - h * width
    return outer * stride_outer + h * stride_h + w * stride_w


@triton.jit
def _online_pass(
    X,  # logits
    x_base,  # [BLOCK_R] int64 offsets of each row's class 0
    stride_x_class,
    row_mask,  # [BLOCK_R] rows in range
    y,  # [BLOCK_R] targets (never equal to a column where the row has no target)
    mult,  # [BLOCK_R] v = x * mult
    n_classes,
    W,  # (C,) class weights w, read as relu(w) (unused unless HAS_WEIGHT)
    ACC: tl.constexpr,
    USE_FP64: tl.constexpr,
    WITH_EXPECTATION: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Streaming statistics of ``v = x·mult`` over class blocks (online softmax, Milakov & Gimelshein 2018).

    With ``HAS_WEIGHT`` it also keeps ``d_w = Σ_c relu(w_c)·exp(v_c − m)`` beside ``d``, rescaled with the
    same running max, so the weighted energy ``−(m + ln d_w)`` is max-subtracted (fix g) and costs no read.
    """
    m = tl.full([BLOCK_R], float("-inf"), ACC)
    d = tl.zeros([BLOCK_R], ACC)
    d_w = tl.zeros([BLOCK_R], ACC)
    v_y = tl.zeros([BLOCK_R], ACC)
    sum_v = tl.zeros([BLOCK_R], ACC)
    expect = tl.zeros([BLOCK_R], ACC)
    x_y = tl.zeros([BLOCK_R], ACC)
    j_star = tl.zeros([BLOCK_R], tl.int32)
    has_nan = tl.zeros([BLOCK_R], tl.int32)
    for c0 in range(0, n_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < n_classes)[None, :]
        ptrs = X + x_base[:, None] + cols[None, :].to(tl.int64) * stride_x_class
        x = tl.load(ptrs, mask=mask, other=float("-inf")).to(ACC)
        v = x * mult[:, None]
        block_max = tl.max(v, axis=1)
        block_arg = tl.argmax(v, axis=1)
        # strictly greater: the first maximum wins across blocks, as inside a block
        j_star = tl.where(block_max > m, c0 + block_arg, j_star)
        m_new = tl.maximum(m, block_max)
        # an all -inf prefix keeps m = -inf; shift by 0 there so that no inf - inf appears
        shift = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
        rescale = _exp(m - shift, USE_FP64)
        p = _exp(v - shift[:, None], USE_FP64)
        d = d * rescale + tl.sum(p, axis=1)
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=cols < n_classes, other=0.0).to(ACC)
            d_w = d_w * rescale + tl.sum(p * tl.maximum(w, 0.0)[None, :], axis=1)
        if WITH_EXPECTATION:
            # select before multiplying: p = 0 at -inf lanes, and 0·(-inf) would be NaN
            expect = expect * rescale + tl.sum(p * tl.where(p > 0, x, 0.0), axis=1)
            x_y += tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), axis=1)
        v_y += tl.sum(tl.where(cols[None, :] == y[:, None], v, 0.0), axis=1)
        sum_v += tl.sum(tl.where(mask, v, 0.0), axis=1)
        has_nan = has_nan | tl.max((v != v).to(tl.int32), axis=1)
        m = m_new
    nan = float("nan")
    m = tl.where(has_nan > 0, nan, m)
    # rows past the end: neutral values, so that no log(0) or inf − inf is ever evaluated for them
    m = tl.where(row_mask, m, 0.0)
    d = tl.where(row_mask, d, 1.0)
    d_w = tl.where(row_mask, d_w, 1.0)
    # with the expectation: e / d = E_softmax(v)[x], and x_y in raw units
    return m, d, v_y, sum_v, j_star, expect, x_y, d_w


@triton.jit
def _row_norm(
    X, x_base, stride_x_class, row_mask, n_classes, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    """``‖x‖₂`` of each row (LogitNorm's extra pass: the softmax is over ``x/s`` and ``s`` needs the norm)."""
    sq = tl.zeros([BLOCK_R], ACC)
    for c0 in range(0, n_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < n_classes)[None, :]
        x = tl.load(X + x_base[:, None] + cols[None, :].to(tl.int64) * stride_x_class, mask=mask, other=0.0).to(ACC)
        sq += tl.sum(x * x, axis=1)
    return tl.sqrt(sq)


@triton.jit
def _epilogue(
    KIND: tl.constexpr,
    m,
    log_d,
    v_y,
    sum_v,
    n_classes,
    is_id,
    is_ood,
    omega,
    alpha,  # OE α, energy α, confidence-penalty λ, margin
    m_in,
    m_out,
):
    """Row value and backward coefficients ``(ℓ, a, b, c, h)`` of one criterion (table in the module doc)."""
    lse = m + log_d
    ce = (m - v_y) + log_d
    pi = tl.exp(-log_d)
    zero = tl.zeros_like(lse)
    loss_id = omega * ce
    a_id = omega
    loss_ood = zero
    a_ood = zero
    c_ood = zero
    h_ood = zero
    if KIND == 1:  # OUTLIER_EXPOSURE
        loss_ood = alpha * (lse - sum_v / n_classes)
        a_ood = alpha + zero
        c_ood = -alpha + zero
    if KIND == 2:  # ENERGY
        h_in = tl.maximum(-lse - m_in, 0.0)
        loss_id = loss_id + alpha * h_in * h_in
        a_id = a_id - 2.0 * alpha * h_in
        h_out = tl.maximum(m_out + lse, 0.0)
        loss_ood = alpha * h_out * h_out
        a_ood = 2.0 * alpha * h_out
    if KIND == 3:  # CONFIDENCE_PENALTY
        loss_ood = alpha * pi
        a_ood = -alpha * pi
        h_ood = alpha * pi
    if KIND == 4:  # MARGIN_CONFIDENCE
        loss_ood = tl.maximum(pi - alpha, 0.0)
        kappa = pi > alpha
        a_ood = tl.where(kappa, -pi, 0.0)
        h_ood = tl.where(kappa, pi, 0.0)
    loss = tl.where(is_id, loss_id, tl.where(is_ood, loss_ood, 0.0))
    a = tl.where(is_id, a_id, tl.where(is_ood, a_ood, 0.0))
    b = tl.where(is_id, -omega, 0.0)
    c = tl.where(is_ood, c_ood, 0.0)
    h = tl.where(is_ood, h_ood, 0.0)
    return loss, a, b, c, h


@triton.jit
def _classify_rows(
    Y,
    rows,
    row_mask,
    inner,
    width,
    stride_y_outer,
    stride_y_h,
    stride_y_w,
    n_classes,
    ignore_index,
    HAS_IGNORE: tl.constexpr,
):
    """Load the targets of a block of rows; return ``(y, is_id, is_ood, invalid)``."""
    y = tl.load(Y + _entry_offsets(rows, inner, width, stride_y_outer, stride_y_h, stride_y_w), mask=row_mask, other=0)
    y = y.to(tl.int64)
    valid = row_mask
    if HAS_IGNORE:
        valid = valid & (y != ignore_index)
    is_id = valid & (y >= 0)
    is_ood = valid & (y < 0)
    invalid = is_id & (y >= n_classes)
    # a row without a target column must never match one in the passes
    y = tl.where(is_id & ~invalid, y, -1)
    return y, is_id, is_ood, invalid


@triton.jit
def _cost_weight(Cost, y, j_star, n_classes, is_id, ACC: tl.constexpr, HAS_COST: tl.constexpr):
    """``ω = cost[y, j*]`` for ID rows with a target column (else 1); not differentiated."""
    if HAS_COST:
        has_target = is_id & (y >= 0)
        omega = tl.load(Cost + tl.where(has_target, y, 0) * n_classes + j_star.to(tl.int64), mask=has_target, other=1.0)
        return omega.to(ACC)
    else:
        return tl.full(y.shape, 1.0, ACC)


@triton.jit
def _row_loss_fwd_kernel(
    X,  # logits [outer, C, inner] through strides
    Y,  # targets [outer, inner] through strides, any integer dtype
    Cost,  # (C, C) contiguous cost matrix (unused unless HAS_COST)
    Loss,  # (R,) row values, ACC
    Stats,  # (ROW_N_STATS, R) statistics, ACC
    W,  # (C,) class weights of the energy output (unused unless HAS_WEIGHT)
    Energy,  # (R,) energy output, ACC (unused unless RETURN_ENERGY)
    n_rows,  # R
    n_classes,  # C
    inner,  # prod(S)
    width,  # last spatial size W (1 for (B, C))
    stride_x_outer,
    stride_x_class,
    stride_x_h,
    stride_x_w,
    stride_y_outer,
    stride_y_h,
    stride_y_w,
    p_alpha: tl.float64,  # α / λ / margin / LogitNorm t
    p_m_in: tl.float64,
    p_m_out: tl.float64,
    ignore_index,
    KIND: tl.constexpr,
    HAS_COST: tl.constexpr,
    HAS_IGNORE: tl.constexpr,
    USE_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_WEIGHT: tl.constexpr = False,  # the energy output is the weighted energy −(m + ln Σ relu(w)·e^(x−m))
    RETURN_ENERGY: tl.constexpr = False,  # store E = −lse (or the weighted energy) of every row in range
):
    ACC: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    # 1. rows of this program, targets, row classification
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    y, is_id, is_ood, invalid = _classify_rows(
        Y, rows, row_mask, inner, width, stride_y_outer, stride_y_h, stride_y_w, n_classes, ignore_index, HAS_IGNORE
    )
    x_base = _entry_offsets(rows, inner, width, stride_x_outer, stride_x_h, stride_x_w)
    alpha = _param(p_alpha, BLOCK_R, ACC)
    # 2. online pass (LogitNorm first needs the row norm for its scale s = t·(‖x‖ + ε))
    norm = tl.zeros([BLOCK_R], ACC)
    mult = tl.full([BLOCK_R], 1.0, ACC)
    if KIND == 5:  # LOGIT_NORM
        norm = _row_norm(X, x_base, stride_x_class, row_mask, n_classes, ACC, BLOCK_R, BLOCK_C)
        mult = 1.0 / (alpha * (norm + 1e-7))
    m, d, v_y, sum_v, j_star, expect, x_y, d_w = _online_pass(
        X,
        x_base,
        stride_x_class,
        row_mask,
        y,
        mult,
        n_classes,
        W,
        ACC,
        USE_FP64,
        KIND == 5,
        HAS_WEIGHT,
        BLOCK_R,
        BLOCK_C,
    )
    log_d = tl.log(d)
    if RETURN_ENERGY:
        # a second per-row output: batch-coupled energy terms are torch arithmetic on it, and their
        # gradient comes back to the backward kernel as one more per-row coefficient
        if HAS_WEIGHT:
            tl.store(Energy + rows, -(m + tl.log(d_w)), mask=row_mask)
        else:
            tl.store(Energy + rows, -(m + log_d), mask=row_mask)
    rho = expect / d - x_y  # LogitNorm's Σ_j q_j x_j − x_y, saved so that backward reads the row once
    # 3. row value
    omega = _cost_weight(Cost, y, j_star, n_classes, is_id, ACC, HAS_COST)
    loss, a, b, c, h = _epilogue(
        KIND,
        m,
        log_d,
        v_y,
        sum_v,
        n_classes,
        is_id,
        is_ood,
        omega,
        alpha,
        _param(p_m_in, BLOCK_R, ACC),
        _param(p_m_out, BLOCK_R, ACC),
    )
    loss = tl.where(invalid, float("nan"), loss)
    tl.store(Loss + rows, loss, mask=row_mask)
    tl.store(Stats + rows, m, mask=row_mask)
    tl.store(Stats + n_rows + rows, log_d, mask=row_mask)
    tl.store(Stats + 2 * n_rows + rows, j_star.to(ACC), mask=row_mask)
    tl.store(Stats + 3 * n_rows + rows, norm, mask=row_mask)
    tl.store(Stats + 4 * n_rows + rows, rho, mask=row_mask)


@triton.jit
def _row_loss_bwd_kernel(
    G,  # (R,) upstream gradient of the row values, any stride (0 for a broadcast scalar)
    X,
    Y,
    Cost,
    Stats,  # (ROW_N_STATS, R) from the forward
    Grad,  # fresh gradient, same shape as X, its own strides
    GE,  # (R,) upstream gradient of the energy output, any stride (unused unless HAS_ENERGY_GRAD)
    Energy,  # (R,) the forward's energy output (read only with HAS_WEIGHT)
    W,  # (C,) class weights (unused unless HAS_WEIGHT)
    GW,  # (programs, C) partial sums of dL/dw, ACC (written only with HAS_WEIGHT)
    stride_ge,
    n_rows,
    n_classes,
    inner,
    width,
    stride_g,
    stride_x_outer,
    stride_x_class,
    stride_x_h,
    stride_x_w,
    stride_y_outer,
    stride_y_h,
    stride_y_w,
    stride_d_outer,
    stride_d_class,
    stride_d_h,
    stride_d_w,
    p_alpha: tl.float64,
    p_m_in: tl.float64,
    p_m_out: tl.float64,
    ignore_index,
    KIND: tl.constexpr,
    HAS_COST: tl.constexpr,
    HAS_IGNORE: tl.constexpr,
    USE_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_ENERGY_GRAD: tl.constexpr = False,
    HAS_WEIGHT: tl.constexpr = False,
):
    ACC: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    y, is_id, is_ood, invalid = _classify_rows(
        Y, rows, row_mask, inner, width, stride_y_outer, stride_y_h, stride_y_w, n_classes, ignore_index, HAS_IGNORE
    )
    x_base = _entry_offsets(rows, inner, width, stride_x_outer, stride_x_h, stride_x_w)
    d_base = _entry_offsets(rows, inner, width, stride_d_outer, stride_d_h, stride_d_w)
    alpha = _param(p_alpha, BLOCK_R, ACC)
    # 1. saved statistics and the row's coefficients
    m = tl.load(Stats + rows, mask=row_mask, other=0.0)
    log_d = tl.load(Stats + n_rows + rows, mask=row_mask, other=0.0)
    j_star = tl.load(Stats + 2 * n_rows + rows, mask=row_mask, other=0.0).to(tl.int32)
    norm = tl.load(Stats + 3 * n_rows + rows, mask=row_mask, other=1.0)
    gamma = tl.load(G + rows * stride_g, mask=row_mask, other=0.0).to(ACC)
    omega = _cost_weight(Cost, y, j_star, n_classes, is_id, ACC, HAS_COST)
    zero = tl.zeros([BLOCK_R], ACC)
    # v_y and Σv only enter the row value, not the coefficients
    _, a, b, c, h = _epilogue(
        KIND,
        m,
        log_d,
        zero,
        zero,
        n_classes,
        is_id,
        is_ood,
        omega,
        alpha,
        _param(p_m_in, BLOCK_R, ACC),
        _param(p_m_out, BLOCK_R, ACC),
    )
    mult = tl.full([BLOCK_R], 1.0, ACC)
    delta = zero
    if KIND == 5:  # LOGIT_NORM: the softmax is over z = x/s, plus the derivative of s itself
        scale = alpha * (norm + 1e-7)  # the forward's operations in its order: bitwise the same s
        mult = 1.0 / scale
        rho = tl.load(Stats + 4 * n_rows + rows, mask=row_mask, other=0.0)
        delta = tl.where(is_id & (norm > 0), -omega * alpha * rho / (norm * scale * scale), 0.0)
        a = a * mult
        b = b * mult
    a = gamma * a
    b = gamma * b
    c = gamma * c / n_classes
    h = gamma * h
    delta = gamma * delta
    # the energy output E: dE/dx = −p (E = −lse) or −q with the weighted softmax q_c = relu(w_c)·e^(x_c + E)
    g_e = zero
    energy = zero
    if HAS_ENERGY_GRAD:
        g_e = tl.load(GE + rows * stride_ge, mask=row_mask, other=0.0).to(ACC)
        if HAS_WEIGHT:
            energy = tl.load(Energy + rows, mask=row_mask, other=0.0)
        else:
            a = a - g_e
    # 2. stream the row once more and write the gradient
    for c0 in range(0, n_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < n_classes)[None, :]
        x = tl.load(X + x_base[:, None] + cols[None, :].to(tl.int64) * stride_x_class, mask=mask, other=0.0).to(ACC)
        p = _exp(x * mult[:, None] - m[:, None] - log_d[:, None], USE_FP64)
        g = a[:, None] * p + c[:, None]
        if KIND == 5:  # only LogitNorm has the δ·x term (elsewhere 0·x would turn -inf logits into NaN)
            g += delta[:, None] * x
        g += tl.where(cols[None, :] == y[:, None], b[:, None], 0.0)
        g += tl.where(cols[None, :] == j_star[:, None], h[:, None], 0.0)
        if HAS_WEIGHT:
            # e^(x − m)/d_w, from the saved E = −(m + ln d_w); −inf logits give 0
            r = _exp(x + energy[:, None], USE_FP64)
            w = tl.load(W + cols, mask=cols < n_classes, other=0.0).to(ACC)
            dq = tl.where(mask, -g_e[:, None] * r, 0.0)
            g += dq * tl.maximum(w, 0.0)[None, :]
            # dE/dw_c = −1[w_c > 0]·e^(x_c − m)/d_w: per-program partial column sums, summed in order on the host side
            tl.store(GW + pid * n_classes + cols, tl.sum(dq, axis=0) * (w > 0).to(ACC), mask=cols < n_classes)
        ptrs = Grad + d_base[:, None] + cols[None, :].to(tl.int64) * stride_d_class
        tl.store(ptrs, g.to(Grad.dtype.element_ty), mask=mask)


@triton.jit
def _row_scores_kernel(
    X,
    Out,  # (R,) scores, ACC
    n_rows,
    n_classes,
    inner,
    width,
    stride_x_outer,
    stride_x_class,
    stride_x_h,
    stride_x_w,
    p_t: tl.float64,  # temperature
    W,  # (C,) class weights (WHICH == 4 only)
    WHICH: tl.constexpr,
    USE_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    x_base = _entry_offsets(rows, inner, width, stride_x_outer, stride_x_h, stride_x_w)
    t = _param(p_t, BLOCK_R, ACC)
    mult = tl.full([BLOCK_R], 1.0, ACC) / t
    no_target = tl.full([BLOCK_R], -1, tl.int64)
    m, d, v_y, sum_v, j_star, expect, x_y, d_w = _online_pass(
        X,
        x_base,
        stride_x_class,
        row_mask,
        no_target,
        mult,
        n_classes,
        W,
        ACC,
        USE_FP64,
        WHICH == 5,
        WHICH == 4,
        BLOCK_R,
        BLOCK_C,
    )
    log_d = tl.log(d)
    if WHICH == 4:  # weighted energy, max-subtracted (fix g): +inf where every weight is <= 0
        score = -(m + tl.log(d_w))
    elif WHICH == 5:  # exact entropy H = lse − E_p[x], one read (no clamp)
        score = log_d - (expect / d - m)
    elif WHICH == 0:  # energy
        score = -t * (m + log_d)
    elif WHICH == 1:  # max softmax
        score = -tl.exp(-log_d)
    elif WHICH == 2:  # max logit
        score = -m
    else:  # entropy of the clamped softmax, as pytorch-ood defines it: needs lse first
        score = tl.zeros([BLOCK_R], ACC)
        for c0 in range(0, n_classes, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = row_mask[:, None] & (cols < n_classes)[None, :]
            ptrs = X + x_base[:, None] + cols[None, :].to(tl.int64) * stride_x_class
            x = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
            p = _exp(x * mult[:, None] - m[:, None] - log_d[:, None], USE_FP64)
            p = tl.minimum(tl.maximum(p, 1e-7), 1.0)
            score -= tl.sum(tl.where(mask, p * tl.log(p), 0.0), axis=1)
        score = tl.where(m != m, float("nan"), score)
    tl.store(Out + rows, score, mask=row_mask)


# ----------------------------------------------------------------------------------------------
# launch wrappers
# ----------------------------------------------------------------------------------------------


def row_view(t: torch.Tensor, has_classes: bool) -> tuple[int, int, int, tuple[int, int, int, int]]:
    """``(R, inner, width, (stride_outer, stride_class, stride_h, stride_w))`` of logits (N, C, *S)
    (``has_classes``) or targets (N, *S), for at most two spatial dimensions."""
    spatial = tuple(t.shape[2:] if has_classes else t.shape[1:])
    strides = tuple(t.stride())
    s_outer = strides[0] if t.dim() else 0
    s_class = strides[1] if has_classes else 0
    sp_strides = strides[2:] if has_classes else strides[1:]
    if len(spatial) > 2:
        raise ValueError(f"expected at most two spatial dimensions, got shape {tuple(t.shape)}")
    if len(spatial) == 0:
        inner, width, s_h, s_w = 1, 1, 0, 0
    elif len(spatial) == 1:
        inner, width, s_h, s_w = spatial[0], spatial[0], 0, sp_strides[0]
    else:
        inner, width, s_h, s_w = spatial[0] * spatial[1], spatial[1], sp_strides[0], sp_strides[1]
    n = t.shape[0] if t.dim() else 1
    return n * inner, inner, max(width, 1), (s_outer, s_class, s_h, s_w)


def launch_config(n_classes: int, dtype: torch.dtype, block_override=None) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)``.

    Starting points, to be replaced by measurements on a GPU (none was available when this was
    written; KERNEL_GUIDE §2.7): the class block covers the row up to 4096 columns (longer rows
    stream through the online pass); a program takes as many rows as fill a 4096-element tile, so
    small C does not idle lanes; 4 warps up to 2048 tile elements, else 8.
    """
    if block_override is not None:
        block_r, block_c = block_override
        return int(block_r), int(block_c), 4
    block_c = min(triton.next_power_of_2(max(n_classes, 1)), 4096)
    tile = 4096 if dtype != torch.float64 else 2048
    block_r = max(1, min(128, tile // block_c))
    num_warps = 4 if block_r * block_c <= 2048 else 8
    return block_r, block_c, num_warps


def row_loss_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    cost: torch.Tensor | None,
    kind: int,
    alpha: float,
    m_in: float,
    m_out: float,
    ignore_index: int | None,
    block_override=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward: ``(row values (R,), statistics (ROW_N_STATS, R))`` in ACC dtype."""
    loss, _, stats = row_loss_energy_forward(
        logits, targets, cost, kind, alpha, m_in, m_out, ignore_index, None, False, block_override
    )
    return loss, stats


def row_loss_energy_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    cost: torch.Tensor | None,
    kind: int,
    alpha: float,
    m_in: float,
    m_out: float,
    ignore_index: int | None,
    class_weight: torch.Tensor | None,
    return_energy: bool = True,
    block_override=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward with the energy output: ``(row values (R,), energy (R,), statistics (ROW_N_STATS, R))``.

    ``energy`` is ``−lse`` of every row in range, or the weighted energy ``−(m + ln Σ_c relu(w_c)·e^(x_c − m))``
    with ``class_weight`` (C,) contiguous in ACC dtype (``w`` as given; the relu is applied in the kernel).
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n_rows, inner, width, (sx_o, sx_c, sx_h, sx_w) = row_view(logits, True)
    _, _, _, (sy_o, _, sy_h, sy_w) = row_view(targets, False)
    n_classes = logits.shape[1]
    loss = torch.empty((n_rows,), dtype=acc, device=logits.device)
    stats = torch.empty((ROW_N_STATS, n_rows), dtype=acc, device=logits.device)
    energy = torch.empty((n_rows if return_energy else 0,), dtype=acc, device=logits.device)
    if n_rows == 0:
        return loss, energy, stats
    block_r, block_c, num_warps = launch_config(n_classes, logits.dtype, block_override)
    grid = (triton.cdiv(n_rows, block_r),)
    _row_loss_fwd_kernel[grid](
        X=logits,
        Y=targets,
        Cost=cost if cost is not None else loss,
        Loss=loss,
        Stats=stats,
        W=class_weight if class_weight is not None else loss,
        Energy=energy if return_energy else loss,
        n_rows=n_rows,
        n_classes=n_classes,
        inner=inner,
        width=width,
        stride_x_outer=sx_o,
        stride_x_class=sx_c,
        stride_x_h=sx_h,
        stride_x_w=sx_w,
        stride_y_outer=sy_o,
        stride_y_h=sy_h,
        stride_y_w=sy_w,
        p_alpha=float(alpha),
        p_m_in=float(m_in),
        p_m_out=float(m_out),
        ignore_index=0 if ignore_index is None else int(ignore_index),
        KIND=kind,
        HAS_COST=cost is not None,
        HAS_IGNORE=ignore_index is not None,
        USE_FP64=acc == torch.float64,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        HAS_WEIGHT=class_weight is not None,
        RETURN_ENERGY=bool(return_energy),
        num_warps=num_warps,
    )
    return loss, energy, stats


def row_loss_backward(
    grad_rows: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    cost: torch.Tensor | None,
    stats: torch.Tensor,
    kind: int,
    alpha: float,
    m_in: float,
    m_out: float,
    ignore_index: int | None,
    block_override=None,
) -> torch.Tensor:
    """Launch the backward: a fresh gradient with the logits' shape, dtype and (dense) memory format."""
    grad, _ = row_loss_energy_backward(
        grad_rows,
        None,
        logits,
        targets,
        cost,
        stats,
        None,
        None,
        kind,
        alpha,
        m_in,
        m_out,
        ignore_index,
        block_override,
    )
    return grad


def row_loss_energy_backward(
    grad_rows: torch.Tensor,
    grad_energy: torch.Tensor | None,
    logits: torch.Tensor,
    targets: torch.Tensor,
    cost: torch.Tensor | None,
    stats: torch.Tensor,
    energy: torch.Tensor | None,
    class_weight: torch.Tensor | None,
    kind: int,
    alpha: float,
    m_in: float,
    m_out: float,
    ignore_index: int | None,
    block_override=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the backward with an upstream gradient of the energy output too.

    :return: ``(dL/dlogits, dL/dclass_weight)``; the second is None without ``class_weight`` (and zeros
        without ``grad_energy``). ``dL/dw`` is summed from per-program partials in program order
        (deterministic, no atomics).
    """
    # preserve_format keeps the logits' strides when they are dense (NCHW, channels-last,
    # transposed) and falls back to contiguous for gapped views (sliced, expanded)
    grad = torch.empty_like(logits)
    n_rows, inner, width, (sx_o, sx_c, sx_h, sx_w) = row_view(logits, True)
    _, _, _, (sy_o, _, sy_h, sy_w) = row_view(targets, False)
    _, _, _, (sd_o, sd_c, sd_h, sd_w) = row_view(grad, True)
    n_classes = logits.shape[1]
    has_weight = class_weight is not None and grad_energy is not None
    grad_w = None if class_weight is None else torch.zeros((n_classes,), dtype=stats.dtype, device=logits.device)
    if n_rows == 0 or n_classes == 0:
        return grad.zero_(), grad_w
    block_r, block_c, num_warps = launch_config(n_classes, logits.dtype, block_override)
    grid = (triton.cdiv(n_rows, block_r),)
    partial = torch.empty((grid[0] if has_weight else 0, n_classes), dtype=stats.dtype, device=logits.device)
    _row_loss_bwd_kernel[grid](
        G=grad_rows,
        X=logits,
        Y=targets,
        Cost=cost if cost is not None else stats,
        Stats=stats,
        Grad=grad,
        GE=grad_energy if grad_energy is not None else stats,
        Energy=energy if energy is not None else stats,
        W=class_weight if class_weight is not None else stats,
        GW=partial if has_weight else stats,
        stride_ge=grad_energy.stride(0) if grad_energy is not None and grad_energy.dim() else 0,
        n_rows=n_rows,
        n_classes=n_classes,
        inner=inner,
        width=width,
        stride_g=grad_rows.stride(0) if grad_rows.dim() else 0,
        stride_x_outer=sx_o,
        stride_x_class=sx_c,
        stride_x_h=sx_h,
        stride_x_w=sx_w,
        stride_y_outer=sy_o,
        stride_y_h=sy_h,
        stride_y_w=sy_w,
        stride_d_outer=sd_o,
        stride_d_class=sd_c,
        stride_d_h=sd_h,
        stride_d_w=sd_w,
        p_alpha=float(alpha),
        p_m_in=float(m_in),
        p_m_out=float(m_out),
        ignore_index=0 if ignore_index is None else int(ignore_index),
        KIND=kind,
        HAS_COST=cost is not None,
        HAS_IGNORE=ignore_index is not None,
        USE_FP64=stats.dtype == torch.float64,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        HAS_ENERGY_GRAD=grad_energy is not None,
        HAS_WEIGHT=has_weight,
        num_warps=num_warps,
    )
    if has_weight:
        grad_w = partial.sum(0)
    return grad, grad_w


def row_scores(
    logits: torch.Tensor, which: int, t: float, block_override=None, class_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Launch the scores kernel: (R,) scores in ACC dtype, entries in the order of ``logits`` without dim 1.

    ``class_weight`` (C,) contiguous, ACC dtype: the weights of ``SCORE_WEIGHTED_ENERGY`` (required there).
    """
    if which == SCORE_WEIGHTED_ENERGY and class_weight is None:
        raise ValueError("class_weight: required for the weighted energy score")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n_rows, inner, width, (sx_o, sx_c, sx_h, sx_w) = row_view(logits, True)
    out = torch.empty((n_rows,), dtype=acc, device=logits.device)
    if n_rows == 0:
        return out
    block_r, block_c, num_warps = launch_config(logits.shape[1], logits.dtype, block_override)
    _row_scores_kernel[(triton.cdiv(n_rows, block_r),)](
        X=logits,
        Out=out,
        n_rows=n_rows,
        n_classes=logits.shape[1],
        inner=inner,
        width=width,
        stride_x_outer=sx_o,
        stride_x_class=sx_c,
        stride_x_h=sx_h,
        stride_x_w=sx_w,
        p_t=float(t),
        W=class_weight if class_weight is not None else out,
        WHICH=which,
        USE_FP64=acc == torch.float64,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out
