"""The integer codes and buffer sizes that the custom ops and both kernel backends agree on.

The ``kind`` / ``which`` arguments of the row and center custom ops (``oodkernels/ops/row_ops.py``,
``ops/center_ops.py``) and the leading size of their ``stats`` outputs, which the fake impls allocate.
This module imports nothing but ``os``, so the ops layer imports where triton does not (setup.py installs triton
on Linux only; on macOS and Windows the C++ backend still serves CPU tensors). The Triton kernels
(:mod:`oodkernels.kernels.rows`, :mod:`oodkernels.kernels.centers`) take the codes as constexpr
``KIND`` / ``WHICH`` and compare them with literals (KERNEL_GUIDE P18); ``csrc/rows.cpp`` and
``csrc/centers.cpp`` repeat them as ``constexpr int64_t`` (``tests/test_project.py`` checks that they agree).
"""

import os

# ----------------------------------------------------------------------------------------------
# row family (kernels/rows.py, csrc/rows.cpp)
# ----------------------------------------------------------------------------------------------

# criterion kinds: ``kind`` of row_loss_fwd / row_loss_energy_fwd
CROSS_ENTROPY = 0
OUTLIER_EXPOSURE = 1
ENERGY = 2
CONFIDENCE_PENALTY = 3
MARGIN_CONFIDENCE = 4
LOGIT_NORM = 5

# score kinds: ``which`` of row_scores
SCORE_ENERGY = 0
SCORE_MAX_SOFTMAX = 1
SCORE_MAX_LOGIT = 2
SCORE_ENTROPY = 3
SCORE_WEIGHTED_ENERGY = 4
SCORE_ENTROPY_EXACT = 5

#: statistics saved per row by the row forward, in ACC: max of v, ln d, argmax, and LogitNorm's row
#: norm ‖x‖ and ρ (unused otherwise)
ROW_N_STATS = 5

# reductions of the reduced row op (row_loss_reduced_fwd ``reduction``): which normaliser the combine applies
REDUCE_NONE = 0  # per-entry w·ℓ, masked, in the output dtype (written by the forward kernel itself)
REDUCE_MEAN_ID = 1  # Σ_ID w·ℓ / max(N_ID, 1)                      (CrossEntropy, LogitNorm)
REDUCE_MEAN_VALID = 2  # Σ_valid w·ℓ / N_valid, NaN when empty       (BackgroundClass, OE, Entropic)
REDUCE_MEAN_GROUPS = 3  # Σ_ID/max(N_ID, 1) + Σ_OOD/max(N_OOD, 1)     (Energy, ConfidencePenalty, MarginConfidence)
REDUCE_SUM = 4  # Σ w·ℓ
REDUCE_GROUP_SUMS = 5  # (Σ_ID w·ℓ, Σ_OOD w·ℓ) in float64, differentiable: a process group's global mean

#: the reduced row op's ``totals`` (float64, on the device): the program-order sums of the partials that the
#: forward kernel writes per program; the counts are what a distributed reduction all-reduces
TOTAL_SUM_ID = 0  # Σ over ID entries of w·ℓ
TOTAL_SUM_OOD = 1  # Σ over OOD entries of w·ℓ (BackgroundClass: their background-class CE)
TOTAL_N_ID = 2  # number of ID entries (valid, label >= 0)
TOTAL_N_OOD = 3  # number of OOD entries (valid, label < 0)
TOTAL_MAX_LABEL = 4  # largest valid label (-1 when there is none); the data checks read it
ROW_N_TOTALS = 5


def interpreted() -> bool:
    """Whether Triton kernels run in its interpreter (``TRITON_INTERPRET=1``): CPU tests, not a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def row_tiles(n_classes: int, element_size: int, block_r: int = 0, block_c: int = 0) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)`` of a row kernel launch; the fake impls size ``stats`` from it too.

    Compiled for a GPU, a tile holds 256 elements per warp-row of 16 bytes: 2048 for 2-byte dtypes, 1024 for
    fp32, 512 for fp64, at 8 warps, so that each thread holds one 128-bit vector of the logits (8 bf16, 4 fp32),
    sized by the audit (``bench/audit.py``, sm_90 and sm_80) to stay under 128 registers without spilling. The
    class block covers the row (one tile: the backward then recomputes the statistics instead of saving them)
    up to the tile size; wider rows stream through the online pass; narrow rows share a program (``BLOCK_R``).
    In the interpreter, where no register file exists and each program instance costs Python time, the
    tile is 4096 elements (2048 for fp64). ``block_r, block_c > 0``: forced blocks (tests).
    """
    if block_r > 0 and block_c > 0:
        return int(block_r), int(block_c), 4
    if interpreted():
        tile = 2048 if element_size == 8 else 4096
    else:
        tile = {8: 512, 4: 1024}.get(element_size, 2048)
    block_c = 1
    while block_c < min(max(n_classes, 1), tile):
        block_c *= 2
    block_r = max(1, min(128, tile // block_c))
    return block_r, block_c, 8


def row_saves_stats(n_classes: int, element_size: int, block_r: int = 0, block_c: int = 0) -> bool:
    """Whether a Triton row forward saves the per-row statistics: only when the row spans several class
    blocks (one tile: the backward recomputes them from the tile it reads anyway)."""
    return row_tiles(n_classes, element_size, block_r, block_c)[1] < n_classes


# ----------------------------------------------------------------------------------------------
# center family (kernels/centers.py, csrc/centers.cpp)
# ----------------------------------------------------------------------------------------------

# criterion kinds: ``kind`` of center_loss_fwd
CAC = 0
CENTER = 1
MCHAD = 2

#: statistics saved per row by the center forward: raw_y, S (CAC) or lse(−d) (MCHAD), T (CAC)
CENTER_N_STATS = 3
