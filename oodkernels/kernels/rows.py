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

Layouts and grid (KERNEL_GUIDE §2.1). The launcher collapses each tensor's spatial axes to one entry
stride where their strides allow, and then the batch axis too, so an entry ``r = n·inner + p`` is at
``n·stride_outer + p·stride_entry`` (``COLLAPSED``; grid ``(cdiv(inner, BLOCK_R), outer)``, no integer
division). ``(B, C)`` and dense channels-last become one run of rows with the classes contiguous; dense
NCHW becomes ``outer = N`` runs of pixels, contiguous along the entries. A tile is ``[BLOCK_R entries ×
BLOCK_C classes]`` in every layout: Triton's coalescing follows whichever axis has unit stride (a
constexpr after specialisation), so the same template yields 128-bit loads along classes for rows and
along pixels for NCHW. Views whose axes cannot merge (crops) take the general path: one division per
entry (``COLLAPSED = False``). Every offset is int64.

Reductions (KERNEL_GUIDE §2.4; the reduced ops ``row_loss_reduced_fwd/bwd``). With ``WRITE_PARTIALS`` each
program writes one row of ``[Σ_ID w·ℓ, Σ_OOD w·ℓ, N_ID, N_OOD, max valid label]`` (float64) and
:func:`_row_combine_kernel`, one program, sums them in program order (bitwise reproducible) into the
``totals`` and the reduced loss. The backward forms ``γ = grad_output · w · ν(group)`` itself from the
totals (``ν`` the reduction's normaliser), so a training step is two launches forward and one backward,
and no torch op touches a per-row vector. ``'none'`` writes ``w·ℓ`` (masked) in the output dtype directly.

Single tile. When ``BLOCK_C >= C`` a row is one tile: the backward recomputes ``m``, ``ln d``, ``j*``,
``‖x‖`` and ``ρ`` from the tile it loads for the gradient, so nothing per row is saved between the passes
(``stats`` is ``(ROW_N_STATS, 0)``). Wider rows stream class blocks and keep the statistics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# the KIND / WHICH / reduction codes and the buffer sizes live in the triton-free codes module, which the ops import
from .codes import CROSS_ENTROPY
from .codes import LOGIT_NORM
from .codes import REDUCE_GROUP_SUMS
from .codes import REDUCE_NONE
from .codes import ROW_N_STATS
from .codes import ROW_N_TOTALS
from .codes import SCORE_WEIGHTED_ENERGY
from .codes import row_tiles

LOGIT_NORM_EPS = 1e-7
ENTROPY_CLAMP = 1e-7
#: columns of the per-program partials (ROW_N_TOTALS used, padded to a power of two)
PARTIAL_COLUMNS = 8
#: partials the combine kernel sums per step (a fixed block: the summation tree never changes); 128 x 8 fp64
#: is 8 per thread at 4 warps
COMBINE_BLOCK = 128


@triton.jit
def _exp(x, USE_FP64: tl.constexpr):
    # fp32 maps onto the hardware ex2; fp64 keeps the exact natural exponential (gradcheck-grade)
    if USE_FP64:
        return tl.exp(x)
    else:
        return tl.exp2(x * 1.4426950408889634)


@triton.jit
def _param(p, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    """A scalar hyper-parameter (an fp64 argument, so fp64 runs see it unrounded) as an ACC vector.

    The scalar is rounded to ACC once, then broadcast: no fp64 vector arithmetic (its register pairs made
    ptxas spill 8 bytes on sm_80)."""
    # [1] in fp64 first: p may arrive as a Python float (the interpreter), which must not round through fp32
    return tl.zeros([BLOCK_R], ACC) + (tl.zeros([1], tl.float64) + p).to(ACC)


@triton.jit
def _entry_offsets(rows, inner, width, stride_outer, stride_h, stride_w):
    """int64 offset of entry ``rows`` (a block of entry indices) in a ``[outer, inner]`` view (general path)."""
    outer = rows // inner
    i = rows - outer * inner
    h = i // width
    w = i - h * width
    return outer * stride_outer + h * stride_h + w * stride_w


@triton.jit
def _program_entries(n_rows, inner, BLOCK_R: tl.constexpr, COLLAPSED: tl.constexpr):
    """``(n, p, rows, row_mask, program)`` of this program: batch index, entry index within the run, entry index
    in the targets' order, in range, and the program's place in entry order (its partials row)."""
    if COLLAPSED:
        n = tl.program_id(1).to(tl.int64)
        p = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = p < inner
        rows = n * inner + p
        program = n * tl.num_programs(0) + tl.program_id(0)
    else:
        n = tl.program_id(0).to(tl.int64) * 0
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        p = rows
        row_mask = rows < n_rows
        program = tl.program_id(0).to(tl.int64)
    return n, p, rows, row_mask, program


@triton.jit
def _offsets(n, p, rows, inner, width, stride_outer, stride_h, stride_w, COLLAPSED: tl.constexpr):
    """Offsets of the program's entries in one tensor: ``n·stride_outer + p·stride_w`` when collapsed (then
    ``stride_w`` is the entry stride), else the general division path."""
    if COLLAPSED:
        return n * stride_outer + p * stride_w
    else:
        return _entry_offsets(rows, inner, width, stride_outer, stride_h, stride_w)


@triton.jit
def _absorb(
    m,
    d,
    d_w,
    v_y,
    sum_v,
    expect,
    x_y,
    j_star,
    has_nan,
    x,  # [BLOCK_R, BLOCK_C] one class block in ACC, -inf at masked lanes
    v,  # x·mult
    cols,
    mask,
    y,
    w_relu,  # [BLOCK_C] relu of the class weights (HAS_WEIGHT only)
    c0,
    USE_FP64: tl.constexpr,
    WITH_EXPECTATION: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    """Merge one class block into the online statistics of ``v`` (online softmax, Milakov & Gimelshein 2018).

    With ``HAS_WEIGHT`` it also keeps ``d_w = Σ_c relu(w_c)·exp(v_c − m)`` beside ``d``, rescaled with the
    same running max, so the weighted energy ``−(m + ln d_w)`` is max-subtracted (fix g) and costs no read.
    """
    block_max = tl.max(v, axis=1)
    block_arg = tl.argmax(v, axis=1)
    # strictly greater: the first maximum wins across blocks, as inside a block
    j_star = tl.where(block_max > m, c0 + block_arg, j_star)
    m_new = tl.maximum(m, block_max)
    # an all -inf prefix keeps m = -inf; shift by 0 there so that no inf - inf appears
    shift = tl.where(m_new == float("-inf"), 0.0, m_new).to(m.dtype)
    rescale = _exp(m - shift, USE_FP64)
    p = _exp(v - shift[:, None], USE_FP64)
    d = d * rescale + tl.sum(p, axis=1)
    if HAS_WEIGHT:
        d_w = d_w * rescale + tl.sum(p * w_relu[None, :], axis=1)
    if WITH_EXPECTATION:
        # select before multiplying: p = 0 at -inf lanes, and 0·(-inf) would be NaN
        expect = expect * rescale + tl.sum(p * tl.where(p > 0, x, 0.0), axis=1)
        x_y += tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), axis=1)
    v_y += tl.sum(tl.where(cols[None, :] == y[:, None], v, 0.0), axis=1)
    sum_v += tl.sum(tl.where(mask, v, 0.0), axis=1)
    has_nan = has_nan | tl.max((v != v).to(tl.int32), axis=1)
    return m_new, d, d_w, v_y, sum_v, expect, x_y, j_star, has_nan


@triton.jit
def _row_statistics(
    X,
    x_base,  # [BLOCK_R] int64 offsets of each row's class 0
    stride_x_class,
    row_mask,
    y,  # [BLOCK_R] target columns (-1 where the row has none)
    mult_param,  # scalar: LogitNorm's t, or the temperature T of a tempered score (v = x/T)
    n_classes,
    W,  # (C,) class weights w, read as relu(w) (unused unless HAS_WEIGHT)
    ACC: tl.constexpr,
    USE_FP64: tl.constexpr,
    LOGIT_NORM: tl.constexpr,  # v = x/s, s = t·(‖x‖ + ε), t = mult_param
    TEMPERED: tl.constexpr,  # v = x/T, T = mult_param
    WITH_EXPECTATION: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SINGLE_TILE: tl.constexpr,  # BLOCK_C >= C: the row is one tile, returned for the caller to reuse
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The row statistics of one read: ``(m, d, d_w, v_y, Σv, e, x_y, j*, ‖x‖, mult, x)``.

    ``x`` is the loaded tile (``SINGLE_TILE``; else a dummy), ``e = Σ_c exp(v_c − m)·x_c`` (with the
    expectation), ``‖x‖`` only for LogitNorm (a second read of wide rows: its softmax needs the norm first).
    Rows past the end get neutral values, so no log(0) or inf − inf is evaluated for them.
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
    norm = tl.zeros([BLOCK_R], ACC)
    mult = tl.full([BLOCK_R], 1.0, ACC)
    w_relu = tl.zeros([BLOCK_C], ACC)
    if SINGLE_TILE:
        cols = tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < n_classes)[None, :]
        x = tl.load(
            X + x_base[:, None] + cols[None, :].to(tl.int64) * stride_x_class, mask=mask, other=float("-inf")
        ).to(ACC)
        if LOGIT_NORM:
            norm = tl.sqrt(tl.sum(tl.where(mask, x * x, 0.0), axis=1))
            mult = 1.0 / (_param(mult_param, BLOCK_R, ACC) * (norm + 1e-7))
        if TEMPERED:
            mult = mult / _param(mult_param, BLOCK_R, ACC)
        if HAS_WEIGHT:
            w_relu = tl.maximum(tl.load(W + cols, mask=cols < n_classes, other=0.0).to(ACC), 0.0)
        m, d, d_w, v_y, sum_v, expect, x_y, j_star, has_nan = _absorb(
            m, d, d_w, v_y, sum_v, expect, x_y, j_star, has_nan, x, x * mult[:, None], cols, mask, y, w_relu, 0,
            USE_FP64, WITH_EXPECTATION, HAS_WEIGHT,
        )  # fmt: skip
    else:
        x = tl.zeros([1, 1], ACC)
        if LOGIT_NORM:
            sq = tl.zeros([BLOCK_R], ACC)
            for c0 in range(0, n_classes, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                mask = row_mask[:, None] & (cols < n_classes)[None, :]
                xs = tl.load(
                    X + x_base[:, None] + cols[None, :].to(tl.int64) * stride_x_class, mask=mask, other=0.0
                ).to(ACC)
                sq += tl.sum(xs * xs, axis=1)
            norm = tl.sqrt(sq)
            mult = 1.0 / (_param(mult_param, BLOCK_R, ACC) * (norm + 1e-7))
        if TEMPERED:
            mult = mult / _param(mult_param, BLOCK_R, ACC)
        for c0 in range(0, n_classes, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = row_mask[:, None] & (cols < n_classes)[None, :]
            xb = tl.load(
                X + x_base[:, None] + cols[None, :].to(tl.int64) * stride_x_class, mask=mask, other=float("-inf")
            ).to(ACC)
            if HAS_WEIGHT:
                w_relu = tl.maximum(tl.load(W + cols, mask=cols < n_classes, other=0.0).to(ACC), 0.0)
            m, d, d_w, v_y, sum_v, expect, x_y, j_star, has_nan = _absorb(
                m, d, d_w, v_y, sum_v, expect, x_y, j_star, has_nan, xb, xb * mult[:, None], cols, mask, y, w_relu,
                c0, USE_FP64, WITH_EXPECTATION, HAS_WEIGHT,
            )  # fmt: skip
    m = tl.where(has_nan > 0, float("nan"), m)
    m = tl.where(row_mask, m, 0.0)
    d = tl.where(row_mask, d, 1.0)
    d_w = tl.where(row_mask, d_w, 1.0)
    return m, d, d_w, v_y, sum_v, expect, x_y, j_star, norm, mult, x


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
    Y, y_offsets, row_mask, n_classes, ignore_index, n_background, HAS_IGNORE: tl.constexpr, BACKGROUND: tl.constexpr
):
    """Load the targets (any integer dtype, in place) of a block of rows.

    :return: ``(y, in_id, in_ood, is_id, is_ood, invalid, label)``: the target column (-1 where the row has
        none), the groups the row is counted in (ID: label >= 0, OOD: label < 0, both valid), the groups it is
        scored as (with ``BACKGROUND`` an OOD row is a cross-entropy row at column ``n_background``,
        BackgroundClassLoss), label >= C, and the raw label (-1 where not valid, for the range check).
    """
    label = tl.load(Y + y_offsets, mask=row_mask, other=0).to(tl.int64)
    valid = row_mask
    if HAS_IGNORE:
        valid = valid & (label != ignore_index)
    in_id = valid & (label >= 0)
    in_ood = valid & (label < 0)
    y = label
    is_id = in_id
    is_ood = in_ood
    if BACKGROUND:
        y = tl.where(in_ood, n_background, label)
        is_id = valid
        is_ood = in_ood & (label >= 0)  # empty: every OOD row is scored as a background-class row
    invalid = is_id & (y >= n_classes)
    # a row without a target column must never match one in the passes
    y = tl.where(is_id & ~invalid, y, -1)
    return y, in_id, in_ood, is_id, is_ood, invalid, tl.where(valid, label, -1)


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
    EW,  # entry weights, broadcast to the targets' shape through strides (unused unless HAS_ENTRY_WEIGHT)
    Cost,  # (C, C) contiguous cost matrix (unused unless HAS_COST)
    Loss,  # (R,) row values: ACC (WRITE_ROWS), or w·ℓ masked in the output dtype (reduction 'none')
    Stats,  # (ROW_N_STATS, R) statistics, ACC (SAVE_STATS only)
    W,  # (C,) class weights of the energy output (unused unless HAS_WEIGHT)
    Energy,  # (R,) energy output, ACC (unused unless RETURN_ENERGY)
    Partials,  # (programs, PARTIAL_COLUMNS) float64 (WRITE_PARTIALS only)
    n_rows,  # R
    n_classes,  # C
    inner,  # entries per run (collapsed) or prod(S) (general)
    width,  # last spatial size W (general path only)
    n_background,  # BackgroundClassLoss's background column N, else -1
    stride_x_outer,
    stride_x_class,
    stride_x_h,
    stride_x_w,  # the entry stride when COLLAPSED
    stride_y_outer,
    stride_y_h,
    stride_y_w,
    stride_ew_outer,
    stride_ew_h,
    stride_ew_w,
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
    COLLAPSED: tl.constexpr = False,
    SINGLE_TILE: tl.constexpr = False,  # BLOCK_C >= C (then backward recomputes the statistics)
    SAVE_STATS: tl.constexpr = True,
    WRITE_ROWS: tl.constexpr = True,
    MASKED_ROWS: tl.constexpr = False,  # the rows written are 'none' values: w·ℓ, 0 where not contributing
    ID_ONLY: tl.constexpr = False,  # only ID rows contribute (CrossEntropy, LogitNorm)
    WRITE_PARTIALS: tl.constexpr = False,
    HAS_ENTRY_WEIGHT: tl.constexpr = False,
    HAS_WEIGHT: tl.constexpr = False,  # the energy output is the weighted energy −(m + ln Σ relu(w)·e^(x−m))
    RETURN_ENERGY: tl.constexpr = False,  # store E = −lse (or the weighted energy) of every row in range
    BACKGROUND: tl.constexpr = False,  # OOD rows are cross-entropy rows at column n_background
):
    ACC: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    # 1. entries of this program, targets, row classification
    n, p, rows, row_mask, program = _program_entries(n_rows, inner, BLOCK_R, COLLAPSED)
    y_off = _offsets(n, p, rows, inner, width, stride_y_outer, stride_y_h, stride_y_w, COLLAPSED)
    y, in_id, in_ood, is_id, is_ood, invalid, label = _classify_rows(
        Y, y_off, row_mask, n_classes, ignore_index, n_background, HAS_IGNORE, BACKGROUND
    )
    x_base = _offsets(n, p, rows, inner, width, stride_x_outer, stride_x_h, stride_x_w, COLLAPSED)
    alpha = _param(p_alpha, BLOCK_R, ACC)
    # 2. one read of the row (LogitNorm: two for wide rows, its scale needs the norm first)
    m, d, d_w, v_y, sum_v, expect, x_y, j_star, norm, mult, _ = _row_statistics(
        X, x_base, stride_x_class, row_mask, y, p_alpha, n_classes, W, ACC, USE_FP64, KIND == 5, False,
        KIND == 5, HAS_WEIGHT, SINGLE_TILE, BLOCK_R, BLOCK_C,
    )  # fmt: skip
    log_d = tl.log(d)
    if RETURN_ENERGY:
        # a second per-row output: batch-coupled energy terms are torch arithmetic on it, and their
        # gradient comes back to the backward kernel as one more per-row coefficient
        if HAS_WEIGHT:
            tl.store(Energy + rows, -(m + tl.log(d_w)), mask=row_mask)
        else:
            tl.store(Energy + rows, -(m + log_d), mask=row_mask)
    # 3. row value
    omega = _cost_weight(Cost, y, j_star, n_classes, is_id, ACC, HAS_COST)
    loss, _, _, _, _ = _epilogue(
        KIND, m, log_d, v_y, sum_v, n_classes, is_id, is_ood, omega, alpha,
        _param(p_m_in, BLOCK_R, ACC), _param(p_m_out, BLOCK_R, ACC),
    )  # fmt: skip
    loss = tl.where(invalid, float("nan"), loss)
    if SAVE_STATS:
        tl.store(Stats + rows, m, mask=row_mask)
        tl.store(Stats + n_rows + rows, log_d, mask=row_mask)
        tl.store(Stats + 2 * n_rows + rows, j_star.to(ACC), mask=row_mask)
        tl.store(Stats + 3 * n_rows + rows, norm, mask=row_mask)
        # LogitNorm's Σ_j q_j x_j − x_y, saved so that backward reads the row once
        tl.store(Stats + 4 * n_rows + rows, expect / d - x_y, mask=row_mask)
    # 4. the reduction's share of this program: w·ℓ of the contributing rows, by group
    contributes = in_id if ID_ONLY else (in_id | in_ood)
    weighted = loss
    if HAS_ENTRY_WEIGHT:
        ew_off = _offsets(n, p, rows, inner, width, stride_ew_outer, stride_ew_h, stride_ew_w, COLLAPSED)
        weighted = loss * tl.load(EW + ew_off, mask=contributes, other=0.0).to(ACC)
    weighted = tl.where(contributes, weighted, 0.0)
    if WRITE_ROWS:
        if MASKED_ROWS:
            tl.store(Loss + rows, weighted.to(Loss.dtype.element_ty), mask=row_mask)
        else:
            tl.store(Loss + rows, loss, mask=row_mask)
    if WRITE_PARTIALS:
        part = Partials + program * 8
        tl.store(part + 0, tl.sum(tl.where(in_id, weighted, 0.0), axis=0).to(tl.float64))
        tl.store(part + 1, tl.sum(tl.where(in_ood, weighted, 0.0), axis=0).to(tl.float64))
        tl.store(part + 2, tl.sum(in_id.to(tl.int32), axis=0).to(tl.float64))
        tl.store(part + 3, tl.sum(in_ood.to(tl.int32), axis=0).to(tl.float64))
        tl.store(part + 4, tl.max(label, axis=0).to(tl.float64))


@triton.jit
def _row_combine_kernel(
    Partials,  # (n_parts, PARTIAL_COLUMNS) float64
    Out,  # () the reduced loss, output dtype; (2,) float64 group sums for REDUCE_GROUP_SUMS
    Totals,  # (ROW_N_TOTALS,) float64
    n_parts,
    REDUCTION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Sum the per-program partials in program order (a fixed tree per block, blocks in sequence: the same bits
    on every run) into the totals, and apply the reduction's normalisers (codes.REDUCE_*)."""
    cols = tl.arange(0, 8)
    total = tl.zeros([8], tl.float64)
    top = tl.full([8], -1.0, tl.float64)
    for b0 in range(0, n_parts, BLOCK):
        parts = b0 + tl.arange(0, BLOCK)
        mask = (parts < n_parts)[:, None] & (cols < 5)[None, :]
        t = tl.load(Partials + parts[:, None].to(tl.int64) * 8 + cols[None, :], mask=mask, other=0.0)
        total += tl.sum(t, axis=0)
        top = tl.maximum(top, tl.max(tl.where(mask, t, -1.0), axis=0))
    total = tl.where(cols == 4, top, total)
    tl.store(Totals + cols, total, mask=cols < 5)
    sum_id = tl.sum(tl.where(cols == 0, total, 0.0), axis=0)
    sum_ood = tl.sum(tl.where(cols == 1, total, 0.0), axis=0)
    n_id = tl.sum(tl.where(cols == 2, total, 0.0), axis=0)
    n_ood = tl.sum(tl.where(cols == 3, total, 0.0), axis=0)
    if REDUCTION == 1:  # MEAN_ID
        loss = sum_id / tl.maximum(n_id, 1.0)
    elif REDUCTION == 2:  # MEAN_VALID: PyTorch's convention, an empty batch gives NaN (not as 0/0: the
        # interpreter would warn where a GPU does not)
        count = n_id + n_ood
        loss = tl.where(count > 0, (sum_id + sum_ood) / tl.maximum(count, 1.0), float("nan"))
    elif REDUCTION == 3:  # MEAN_GROUPS
        loss = sum_id / tl.maximum(n_id, 1.0) + sum_ood / tl.maximum(n_ood, 1.0)
    elif REDUCTION == 5:  # GROUP_SUMS: the two sums, for a process group's normalisers
        loss = sum_id
        tl.store(Out + 1, sum_ood)
    else:  # SUM (and NONE, whose totals only feed the data checks)
        loss = sum_id + sum_ood
    if Out.dtype.element_ty == tl.float64:
        tl.store(Out, loss)
    elif Out.dtype.element_ty == tl.bfloat16:
        # through fp32 as the reference rounds its fp32 result, to nearest even by hand: the interpreter's
        # fp32 -> bf16 conversion truncates, a GPU's rounds (one scalar: the integer ops cost nothing)
        loss32 = loss.to(tl.float32)
        bits = loss32.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(Out, tl.where(loss32 != loss32, loss32.to(tl.bfloat16), rounded))
    else:
        # through fp32, as the reference's fp32 result is rounded (and fp64 -> fp16 is a double rounding)
        tl.store(Out, loss.to(tl.float32).to(Out.dtype.element_ty))


@triton.jit
def _row_gamma(
    G, stride_g, Totals, EW, ew_off, rows, row_mask, in_id, in_ood,
    ACC: tl.constexpr, GAMMA: tl.constexpr, REDUCTION: tl.constexpr, ID_ONLY: tl.constexpr,
    HAS_ENTRY_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """γ, the upstream gradient of each row value: per row from ``G`` (``GAMMA`` 0), or for the reduced op
    ``grad_output[r]·w`` (``'none'``, 1) or ``grad_output·w·ν(group)`` with the reduction's normaliser ν read
    from the totals (2; for REDUCE_GROUP_SUMS ``G`` holds the gradients of the two group sums, γ = w·G[group]).
    Rows that do not contribute get exactly 0."""
    if GAMMA == 0:
        return tl.load(G + rows * stride_g, mask=row_mask, other=0.0).to(ACC)
    contributes = in_id if ID_ONLY else (in_id | in_ood)
    if GAMMA == 1:
        gamma = tl.load(G + rows * stride_g, mask=contributes, other=0.0).to(ACC)
    else:
        g = tl.load(G).to(ACC)
        n_id = tl.load(Totals + 2).to(ACC)
        n_ood = tl.load(Totals + 3).to(ACC)
        nu_id = 1.0
        nu_ood = 1.0
        if REDUCTION == 1:  # MEAN_ID
            nu_id = 1.0 / tl.maximum(n_id, 1.0)
        if REDUCTION == 2:  # MEAN_VALID (no row contributes when the count is 0)
            nu_id = 1.0 / tl.maximum(n_id + n_ood, 1.0)
            nu_ood = nu_id
        if REDUCTION == 3:  # MEAN_GROUPS
            nu_id = 1.0 / tl.maximum(n_id, 1.0)
            nu_ood = 1.0 / tl.maximum(n_ood, 1.0)
        g_id = g * nu_id
        g_ood = g * nu_ood
        if REDUCTION == 5:  # GROUP_SUMS: G = (dL/dΣ_ID, dL/dΣ_OOD)
            g_id = g
            g_ood = tl.load(G + 1).to(ACC)
        gamma = tl.where(in_id, g_id, tl.where(in_ood, g_ood, 0.0))
        gamma = tl.where(contributes, gamma, 0.0)
    if HAS_ENTRY_WEIGHT:
        gamma = gamma * tl.load(EW + ew_off, mask=contributes, other=0.0).to(ACC)
    return tl.where(contributes, gamma, 0.0)


@triton.jit
def _row_loss_bwd_kernel(
    G,  # upstream gradient: (R,) per row, any stride (GAMMA 0, 1), or the () grad_output (GAMMA 2)
    X,
    Y,
    EW,  # entry weights (HAS_ENTRY_WEIGHT)
    Cost,
    Stats,  # (ROW_N_STATS, R) from the forward (unless SINGLE_TILE)
    Totals,  # (ROW_N_TOTALS,) float64 from the combine (GAMMA 2)
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
    n_background,
    stride_g,
    stride_x_outer,
    stride_x_class,
    stride_x_h,
    stride_x_w,
    stride_y_outer,
    stride_y_h,
    stride_y_w,
    stride_ew_outer,
    stride_ew_h,
    stride_ew_w,
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
    COLLAPSED: tl.constexpr = False,
    SINGLE_TILE: tl.constexpr = False,
    GAMMA: tl.constexpr = 0,
    REDUCTION: tl.constexpr = 0,
    ID_ONLY: tl.constexpr = False,
    HAS_ENTRY_WEIGHT: tl.constexpr = False,
    BACKGROUND: tl.constexpr = False,
    HAS_ENERGY_GRAD: tl.constexpr = False,
    HAS_WEIGHT: tl.constexpr = False,
):
    ACC: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    n, p, rows, row_mask, program = _program_entries(n_rows, inner, BLOCK_R, COLLAPSED)
    y_off = _offsets(n, p, rows, inner, width, stride_y_outer, stride_y_h, stride_y_w, COLLAPSED)
    y, in_id, in_ood, is_id, is_ood, invalid, _ = _classify_rows(
        Y, y_off, row_mask, n_classes, ignore_index, n_background, HAS_IGNORE, BACKGROUND
    )
    x_base = _offsets(n, p, rows, inner, width, stride_x_outer, stride_x_h, stride_x_w, COLLAPSED)
    d_base = _offsets(n, p, rows, inner, width, stride_d_outer, stride_d_h, stride_d_w, COLLAPSED)
    ew_off = _offsets(n, p, rows, inner, width, stride_ew_outer, stride_ew_h, stride_ew_w, COLLAPSED)
    alpha = _param(p_alpha, BLOCK_R, ACC)
    # 1. the row statistics: recomputed from the one tile the gradient needs anyway, or saved by the forward
    if SINGLE_TILE:
        m, d, _, _, _, expect, x_y, j_star, norm, mult, x_tile = _row_statistics(
            X, x_base, stride_x_class, row_mask, y, p_alpha, n_classes, W, ACC, USE_FP64, KIND == 5, False,
            KIND == 5, False, True, BLOCK_R, BLOCK_C,
        )  # fmt: skip
        log_d = tl.log(d)
        rho = expect / d - x_y
    else:
        m = tl.load(Stats + rows, mask=row_mask, other=0.0)
        log_d = tl.load(Stats + n_rows + rows, mask=row_mask, other=0.0)
        j_star = tl.load(Stats + 2 * n_rows + rows, mask=row_mask, other=0.0).to(tl.int32)
        norm = tl.load(Stats + 3 * n_rows + rows, mask=row_mask, other=1.0)
        rho = tl.load(Stats + 4 * n_rows + rows, mask=row_mask, other=0.0)
        mult = tl.full([BLOCK_R], 1.0, ACC)
        if KIND == 5:  # the forward's operations in its order: bitwise the same s
            mult = 1.0 / (alpha * (norm + 1e-7))
    gamma = _row_gamma(
        G, stride_g, Totals, EW, ew_off, rows, row_mask, in_id, in_ood, ACC, GAMMA, REDUCTION, ID_ONLY,
        HAS_ENTRY_WEIGHT, BLOCK_R,
    )  # fmt: skip
    omega = _cost_weight(Cost, y, j_star, n_classes, is_id, ACC, HAS_COST)
    zero = tl.zeros([BLOCK_R], ACC)
    # v_y and Σv only enter the row value, not the coefficients
    _, a, b, c, h = _epilogue(
        KIND, m, log_d, zero, zero, n_classes, is_id, is_ood, omega, alpha,
        _param(p_m_in, BLOCK_R, ACC), _param(p_m_out, BLOCK_R, ACC),
    )  # fmt: skip
    delta = zero
    if KIND == 5:  # LOGIT_NORM: the softmax is over z = x/s, plus the derivative of s itself
        scale = alpha * (norm + 1e-7)
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
    # 2. the gradient: from the tile already in registers, or streaming the row once more
    if SINGLE_TILE:
        cols = tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < n_classes)[None, :]
        _grad_block(
            x_tile, cols, mask, Grad, d_base, stride_d_class, GW, program, W, y, j_star, mult, m, log_d, a, b, c, h,
            delta, g_e, energy, n_classes, KIND, USE_FP64, HAS_WEIGHT,
        )  # fmt: skip
    else:
        for c0 in range(0, n_classes, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = row_mask[:, None] & (cols < n_classes)[None, :]
            x = tl.load(X + x_base[:, None] + cols[None, :].to(tl.int64) * stride_x_class, mask=mask, other=0.0)
            _grad_block(
                x.to(ACC), cols, mask, Grad, d_base, stride_d_class, GW, program, W, y, j_star, mult, m, log_d, a, b,
                c, h, delta, g_e, energy, n_classes, KIND, USE_FP64, HAS_WEIGHT,
            )  # fmt: skip


@triton.jit
def _grad_block(
    x, cols, mask, Grad, d_base, stride_d_class, GW, program, W, y, j_star, mult, m, log_d, a, b, c, h, delta, g_e,
    energy, n_classes, KIND: tl.constexpr, USE_FP64: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):  # fmt: skip
    """Store ``dℓ/dx = a·p + b·e_y + c + h·e_j* + δ·x`` (γ folded into the coefficients) for one class block."""
    p = _exp(x * mult[:, None] - m[:, None] - log_d[:, None], USE_FP64)
    g = a[:, None] * p + c[:, None]
    if KIND == 5:  # only LogitNorm has the δ·x term (elsewhere 0·x would turn -inf logits into NaN)
        g += delta[:, None] * x
    g += tl.where(cols[None, :] == y[:, None], b[:, None], 0.0)
    g += tl.where(cols[None, :] == j_star[:, None], h[:, None], 0.0)
    if HAS_WEIGHT:
        # e^(x − m)/d_w, from the saved E = −(m + ln d_w); −inf logits give 0
        r = _exp(x + energy[:, None], USE_FP64)
        w = tl.load(W + cols, mask=cols < n_classes, other=0.0).to(x.dtype)
        dq = tl.where(mask, -g_e[:, None] * r, 0.0)
        g += dq * tl.maximum(w, 0.0)[None, :]
        # dE/dw_c = −1[w_c > 0]·e^(x_c − m)/d_w: per-program partial column sums, summed in order on the host side
        tl.store(GW + program * n_classes + cols, tl.sum(dq, axis=0) * (w > 0).to(x.dtype), mask=cols < n_classes)
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
    COLLAPSED: tl.constexpr = False,
    SINGLE_TILE: tl.constexpr = False,
):
    ACC: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    n, p, rows, row_mask, _ = _program_entries(n_rows, inner, BLOCK_R, COLLAPSED)
    x_base = _offsets(n, p, rows, inner, width, stride_x_outer, stride_x_h, stride_x_w, COLLAPSED)
    t = _param(p_t, BLOCK_R, ACC)
    no_target = tl.full([BLOCK_R], -1, tl.int64)
    m, d, d_w, _, _, expect, _, _, _, mult, x_tile = _row_statistics(
        X, x_base, stride_x_class, row_mask, no_target, p_t, n_classes, W, ACC, USE_FP64, False, True, WHICH == 5,
        WHICH == 4, SINGLE_TILE, BLOCK_R, BLOCK_C,
    )  # fmt: skip
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
    else:  # entropy of the clamped softmax, as pytorch-ood defines it: needs lse first (the tile, or a second read)
        score = tl.zeros([BLOCK_R], ACC)
        if SINGLE_TILE:
            cols = tl.arange(0, BLOCK_C)
            mask = row_mask[:, None] & (cols < n_classes)[None, :]
            q = _exp(x_tile * mult[:, None] - m[:, None] - log_d[:, None], USE_FP64)
            q = tl.minimum(tl.maximum(q, 1e-7), 1.0)
            score -= tl.sum(tl.where(mask, q * tl.log(q), 0.0), axis=1)
        else:
            for c0 in range(0, n_classes, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                mask = row_mask[:, None] & (cols < n_classes)[None, :]
                ptrs = X + x_base[:, None] + cols[None, :].to(tl.int64) * stride_x_class
                x = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
                q = _exp(x * mult[:, None] - m[:, None] - log_d[:, None], USE_FP64)
                q = tl.minimum(tl.maximum(q, 1e-7), 1.0)
                score -= tl.sum(tl.where(mask, q * tl.log(q), 0.0), axis=1)
        score = tl.where(m != m, float("nan"), score)
    tl.store(Out + rows, score, mask=row_mask)


# ----------------------------------------------------------------------------------------------
# launch wrappers
# ----------------------------------------------------------------------------------------------


def row_view(t: torch.Tensor, has_classes: bool) -> tuple[int, int, int, tuple[int, int, int, int]]:
    """``(R, inner, width, (stride_outer, stride_class, stride_h, stride_w))`` of logits (N, C, *S)
    (``has_classes``) or targets (N, *S), for at most two spatial dimensions (the general path's view)."""
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


#: the largest grid dimension 1 (the batch axis of a collapsed launch)
_MAX_GRID_Y = 65535


def _entry_axis(t: torch.Tensor, has_classes: bool):
    """``(N, inner, stride_outer, stride_entry)`` with the spatial axes of ``t`` merged into one, or None when
    their strides do not allow it (a crop)."""
    first = 2 if has_classes else 1
    shape, strides = tuple(t.shape[first:]), tuple(t.stride()[first:])
    n, s_n = (t.shape[0], t.stride(0)) if t.dim() else (1, 0)
    if len(shape) == 0:
        return n, 1, s_n, 0
    if len(shape) == 1:
        return n, shape[0], s_n, strides[0]
    (h, w), (s_h, s_w) = shape, strides
    if w == 1:
        return n, h, s_n, s_h
    if h == 1 or s_h == w * s_w:
        return n, h * w, s_n, s_w
    return None


class RowLayout:
    """How a launch addresses its entries: collapsed (``runs`` runs of ``inner`` entries, each tensor at
    ``n·stride_outer + p·stride_entry``) or general (division per entry, :func:`row_view`).

    ``strides(i)`` gives the kernel's ``(stride_outer, stride_h, stride_w)`` for the i-th tensor (the collapsed
    entry stride in the ``stride_w`` slot) and ``grid(block_r)`` the launch grid.
    """

    def __init__(self, tensors: list[tuple[torch.Tensor, bool]]):
        first, has_classes = tensors[0]
        self.n_rows, self.general_inner, self.width, _ = row_view(first, has_classes)
        axes = [_entry_axis(t, c) for t, c in tensors]
        self._general = [row_view(t, c)[3] for t, c in tensors]
        self.collapsed = all(a is not None for a in axes)
        if not self.collapsed:
            return
        n, inner = axes[0][0], axes[0][1]

        def merges(axis) -> bool:
            _, _, s_n, s_p = axis
            return n == 1 or inner == 1 or s_n == inner * s_p

        if all(merges(a) for a in axes):
            # one run of all R entries: the entry stride is the batch stride when there is no spatial axis
            self.runs, self.inner = 1, n * inner
            self._strides = [(0, 0, a[2] if inner == 1 else a[3]) for a in axes]
        elif n <= _MAX_GRID_Y:
            self.runs, self.inner = n, inner
            self._strides = [(a[2], 0, a[3]) for a in axes]
        else:
            self.collapsed = False

    @property
    def inner_arg(self) -> int:
        return self.inner if self.collapsed else self.general_inner

    def strides(self, i: int) -> tuple[int, int, int]:
        if self.collapsed:
            return self._strides[i]
        s_outer, _, s_h, s_w = self._general[i]
        return s_outer, s_h, s_w

    def grid(self, block_r: int) -> tuple[int, ...]:
        if self.collapsed:
            return (triton.cdiv(self.inner, block_r), self.runs)
        return (triton.cdiv(self.n_rows, block_r),)


def launch_config(n_classes: int, dtype: torch.dtype, block_override=None) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)`` (:func:`oodkernels.kernels.codes.row_tiles`)."""
    block_r, block_c = block_override if block_override is not None else (0, 0)
    return row_tiles(n_classes, torch.empty((), dtype=dtype).element_size(), block_r, block_c)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _hyper(alpha, m_in, m_out, ignore_index) -> dict:
    return dict(
        p_alpha=float(alpha),
        p_m_in=float(m_in),
        p_m_out=float(m_out),
        ignore_index=0 if ignore_index is None else int(ignore_index),
    )


def _entry_weight(weight: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor | None:
    """The per-entry weight as a view of the targets' shape (broadcast dimensions get stride 0, no copy)."""
    return None if weight is None else torch.broadcast_to(weight, targets.shape)


def _forward(
    logits, targets, entry_weight, cost, kind, alpha, m_in, m_out, ignore_index, block_override, *, background,
    rows_out, masked_rows, partials, save_stats, id_only=False, class_weight=None, energy=None,
):  # fmt: skip
    """Launch the forward kernel; ``rows_out`` (R,) receives per-row values, ``partials`` the program sums."""
    n_classes = logits.shape[1]
    block_r, block_c, num_warps = launch_config(n_classes, logits.dtype, block_override)
    tensors = [(logits, True), (targets, False)] + ([(entry_weight, False)] if entry_weight is not None else [])
    layout = RowLayout(tensors)
    sx, sy = layout.strides(0), layout.strides(1)
    sew = layout.strides(2) if entry_weight is not None else (0, 0, 0)
    stats = torch.empty(
        (ROW_N_STATS, layout.n_rows if save_stats else 0), dtype=_acc(logits.dtype), device=logits.device
    )
    grid = layout.grid(block_r)
    n_programs = grid[0] * (grid[1] if len(grid) > 1 else 1)
    part = None
    if partials:
        part = torch.empty((n_programs, PARTIAL_COLUMNS), dtype=torch.float64, device=logits.device)
    if layout.n_rows == 0:
        return stats, part
    # unused pointer arguments get the statistics buffer: one dtype, so no extra specialisation
    dummy = stats
    _row_loss_fwd_kernel[grid](
        X=logits, Y=targets, EW=entry_weight if entry_weight is not None else dummy,
        Cost=cost if cost is not None else dummy, Loss=rows_out if rows_out is not None else dummy, Stats=dummy,
        W=class_weight if class_weight is not None else dummy, Energy=energy if energy is not None else dummy,
        Partials=part if part is not None else dummy,
        n_rows=layout.n_rows, n_classes=n_classes, inner=layout.inner_arg, width=layout.width,
        n_background=-1 if background is None else int(background),
        stride_x_outer=sx[0], stride_x_class=logits.stride(1), stride_x_h=sx[1], stride_x_w=sx[2],
        stride_y_outer=sy[0], stride_y_h=sy[1], stride_y_w=sy[2],
        stride_ew_outer=sew[0], stride_ew_h=sew[1], stride_ew_w=sew[2],
        **_hyper(alpha, m_in, m_out, ignore_index),
        KIND=kind, HAS_COST=cost is not None, HAS_IGNORE=ignore_index is not None,
        USE_FP64=logits.dtype == torch.float64, BLOCK_R=block_r, BLOCK_C=block_c,
        COLLAPSED=layout.collapsed, SINGLE_TILE=block_c >= n_classes, SAVE_STATS=save_stats,
        WRITE_ROWS=rows_out is not None, MASKED_ROWS=masked_rows, ID_ONLY=id_only, WRITE_PARTIALS=partials,
        HAS_ENTRY_WEIGHT=entry_weight is not None, HAS_WEIGHT=class_weight is not None,
        RETURN_ENERGY=energy is not None, BACKGROUND=background is not None, num_warps=num_warps,
    )  # fmt: skip
    return stats, part


def row_loss_reduced_forward(
    logits, targets, weight, cost, kind, alpha, m_in, m_out, ignore_index, background, reduction, checks,
    block_override=None,
):  # fmt: skip
    """The reduced forward: ``(out, totals, stats)``.

    ``out`` is the loss in the logits' dtype: () for a mean or sum, (R,) of ``w·ℓ`` (0 where an entry does not
    contribute) for ``REDUCE_NONE``, (2,) float64 group sums for ``REDUCE_GROUP_SUMS``; ``totals``
    (ROW_N_TOTALS,) float64 (codes.TOTAL_*; (0,) for 'none' without
    ``checks``); ``stats`` (ROW_N_STATS, R) when the rows stream, else (ROW_N_STATS, 0). Two launches: the
    forward (per-program partials) and the combine.
    """
    n_classes = logits.shape[1]
    id_only = kind in (CROSS_ENTROPY, LOGIT_NORM) and background is None
    none = reduction == REDUCE_NONE
    n_rows = targets.numel()
    if reduction == REDUCE_GROUP_SUMS:
        out = torch.empty((2,), dtype=torch.float64, device=logits.device)
    else:
        out = torch.empty((n_rows,) if none else (), dtype=logits.dtype, device=logits.device)
    block_r, block_c, _ = launch_config(n_classes, logits.dtype, block_override)
    stats, partials = _forward(
        logits, targets, _entry_weight(weight, targets), cost, kind, alpha, m_in, m_out, ignore_index,
        block_override, background=background, rows_out=out if none else None, masked_rows=True, partials=True,
        save_stats=block_c < n_classes, id_only=id_only,
    )  # fmt: skip
    totals = torch.empty((ROW_N_TOTALS if (checks or not none) else 0,), dtype=torch.float64, device=logits.device)
    if totals.numel():
        _row_combine_kernel[(1,)](
            Partials=partials, Out=totals if none else out, Totals=totals, n_parts=partials.shape[0],
            REDUCTION=reduction, BLOCK=COMBINE_BLOCK, num_warps=4,
        )  # fmt: skip
    return out, totals, stats


def row_loss_reduced_backward(
    grad_out, logits, targets, weight, cost, totals, stats, kind, alpha, m_in, m_out, ignore_index, background,
    reduction, block_override=None,
):  # fmt: skip
    """The reduced backward: a fresh ``dL/dlogits`` with the logits' shape, dtype and (dense) memory format.

    ``grad_out`` is the gradient of ``out``: () for a mean or sum (γ = grad_out·w·ν is formed in the kernel
    from the totals), (R,) any stride for 'none'. One launch.
    """
    id_only = kind in (CROSS_ENTROPY, LOGIT_NORM) and background is None
    none = reduction == REDUCE_NONE
    grad, _ = _backward(
        grad_out.reshape(-1) if none else grad_out, logits, targets, _entry_weight(weight, targets), cost, stats,
        totals, kind, alpha, m_in, m_out, ignore_index, block_override, background=background,
        gamma=1 if none else 2, reduction=reduction, id_only=id_only,
    )  # fmt: skip
    return grad


def _backward(
    grad_rows, logits, targets, entry_weight, cost, stats, totals, kind, alpha, m_in, m_out, ignore_index,
    block_override, *, background=None, gamma=0, reduction=0, id_only=False, grad_energy=None, energy=None,
    class_weight=None,
):  # fmt: skip
    """Launch the backward kernel: ``(grad, per-program dL/dw partials or None)``."""
    # preserve_format keeps the logits' strides when they are dense (NCHW, channels-last,
    # transposed) and falls back to contiguous for gapped views (sliced, expanded)
    grad = torch.empty_like(logits)
    n_classes = logits.shape[1]
    block_r, block_c, num_warps = launch_config(n_classes, logits.dtype, block_override)
    tensors = [(logits, True), (targets, False), (grad, True)]
    if entry_weight is not None:
        tensors.append((entry_weight, False))
    layout = RowLayout(tensors)
    if layout.n_rows == 0 or n_classes == 0:
        return grad.zero_(), None
    sx, sy, sd = layout.strides(0), layout.strides(1), layout.strides(2)
    sew = layout.strides(3) if entry_weight is not None else (0, 0, 0)
    grid = layout.grid(block_r)
    n_programs = grid[0] * (grid[1] if len(grid) > 1 else 1)
    has_weight = class_weight is not None and grad_energy is not None
    acc = _acc(logits.dtype)
    partial = torch.empty((n_programs if has_weight else 0, n_classes), dtype=acc, device=logits.device)
    if kind == LOGIT_NORM and logits.element_size() == 2:
        # LogitNorm's one-tile backward keeps the most values live (‖x‖, ρ, δ·x): with 8 bf16/fp16 per thread
        # it needed 142 registers (audit, sm_90); twice the warps halve that
        num_warps *= 2
    dummy = stats
    _row_loss_bwd_kernel[grid](
        G=grad_rows, X=logits, Y=targets, EW=entry_weight if entry_weight is not None else dummy,
        Cost=cost if cost is not None else dummy, Stats=stats, Totals=totals if totals is not None else dummy,
        Grad=grad, GE=grad_energy if grad_energy is not None else dummy, Energy=energy if energy is not None else dummy,
        W=class_weight if class_weight is not None else dummy, GW=partial if has_weight else dummy,
        stride_ge=grad_energy.stride(0) if grad_energy is not None and grad_energy.dim() else 0,
        n_rows=layout.n_rows, n_classes=n_classes, inner=layout.inner_arg, width=layout.width,
        n_background=-1 if background is None else int(background),
        stride_g=grad_rows.stride(0) if grad_rows.dim() else 0,
        stride_x_outer=sx[0], stride_x_class=logits.stride(1), stride_x_h=sx[1], stride_x_w=sx[2],
        stride_y_outer=sy[0], stride_y_h=sy[1], stride_y_w=sy[2],
        stride_ew_outer=sew[0], stride_ew_h=sew[1], stride_ew_w=sew[2],
        stride_d_outer=sd[0], stride_d_class=grad.stride(1), stride_d_h=sd[1], stride_d_w=sd[2],
        **_hyper(alpha, m_in, m_out, ignore_index),
        KIND=kind, HAS_COST=cost is not None, HAS_IGNORE=ignore_index is not None,
        USE_FP64=logits.dtype == torch.float64, BLOCK_R=block_r, BLOCK_C=block_c,
        COLLAPSED=layout.collapsed, SINGLE_TILE=block_c >= n_classes, GAMMA=gamma, REDUCTION=reduction,
        ID_ONLY=id_only, HAS_ENTRY_WEIGHT=entry_weight is not None, BACKGROUND=background is not None,
        HAS_ENERGY_GRAD=grad_energy is not None, HAS_WEIGHT=has_weight, num_warps=num_warps,
    )  # fmt: skip
    return grad, (partial if has_weight else None)


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
    """Launch the per-row forward: ``(row values (R,), statistics (ROW_N_STATS, R or 0))`` in ACC dtype."""
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
    """Launch the forward with the energy output: ``(row values (R,), energy (R,), statistics)``.

    ``energy`` is ``−lse`` of every row in range, or the weighted energy ``−(m + ln Σ_c relu(w_c)·e^(x_c − m))``
    with ``class_weight`` (C,) contiguous in ACC dtype (``w`` as given; the relu is applied in the kernel).
    ``statistics`` is (ROW_N_STATS, R) when the rows stream, else (ROW_N_STATS, 0) (the backward recomputes).
    """
    acc = _acc(logits.dtype)
    n_rows = targets.numel()
    n_classes = logits.shape[1]
    loss = torch.empty((n_rows,), dtype=acc, device=logits.device)
    energy = torch.empty((n_rows if return_energy else 0,), dtype=acc, device=logits.device)
    block_r, block_c, _ = launch_config(n_classes, logits.dtype, block_override)
    stats, _ = _forward(
        logits, targets, None, cost, kind, alpha, m_in, m_out, ignore_index, block_override, background=None,
        rows_out=loss, masked_rows=False, partials=False, save_stats=block_c < n_classes, class_weight=class_weight,
        energy=energy if return_energy else None,
    )  # fmt: skip
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
    """Launch the per-row backward: a fresh gradient with the logits' shape, dtype and (dense) memory format."""
    grad, _ = _backward(grad_rows, logits, targets, None, cost, stats, None, kind, alpha, m_in, m_out, ignore_index,
                        block_override)  # fmt: skip
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
    grad, partial = _backward(
        grad_rows, logits, targets, None, cost, stats, None, kind, alpha, m_in, m_out, ignore_index, block_override,
        grad_energy=grad_energy, energy=energy, class_weight=class_weight,
    )  # fmt: skip
    if class_weight is None:
        return grad, None
    if partial is None:
        return grad, torch.zeros((logits.shape[1],), dtype=stats.dtype, device=logits.device)
    return grad, partial.sum(0)


def row_scores(
    logits: torch.Tensor, which: int, t: float, block_override=None, class_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Launch the scores kernel: (R,) scores in ACC dtype, entries in the order of ``logits`` without dim 1.

    ``class_weight`` (C,) contiguous, ACC dtype: the weights of ``SCORE_WEIGHTED_ENERGY`` (required there).
    """
    if which == SCORE_WEIGHTED_ENERGY and class_weight is None:
        raise ValueError("class_weight: required for the weighted energy score")
    acc = _acc(logits.dtype)
    layout = RowLayout([(logits, True)])
    out = torch.empty((layout.n_rows,), dtype=acc, device=logits.device)
    if layout.n_rows == 0:
        return out
    n_classes = logits.shape[1]
    block_r, block_c, num_warps = launch_config(n_classes, logits.dtype, block_override)
    sx = layout.strides(0)
    _row_scores_kernel[layout.grid(block_r)](
        X=logits, Out=out, n_rows=layout.n_rows, n_classes=n_classes, inner=layout.inner_arg, width=layout.width,
        stride_x_outer=sx[0], stride_x_class=logits.stride(1), stride_x_h=sx[1], stride_x_w=sx[2], p_t=float(t),
        W=class_weight if class_weight is not None else out, WHICH=which, USE_FP64=acc == torch.float64,
        BLOCK_R=block_r, BLOCK_C=block_c, COLLAPSED=layout.collapsed, SINGLE_TILE=block_c >= n_classes,
        num_warps=num_warps,
    )  # fmt: skip
    return out
