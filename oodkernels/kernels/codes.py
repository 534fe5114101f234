"""The integer codes and buffer sizes that the custom ops and both kernel backends agree on.

The ``kind`` / ``which`` arguments of the row and center custom ops (``oodkernels/ops/row_ops.py``,
``ops/center_ops.py``) and the leading size of their ``stats`` outputs, which the fake impls allocate.
This module imports nothing, so the ops layer imports where triton does not (setup.py installs triton
on Linux only; on macOS and Windows the C++ backend still serves CPU tensors). The Triton kernels
(:mod:`oodkernels.kernels.rows`, :mod:`oodkernels.kernels.centers`) take the codes as constexpr
``KIND`` / ``WHICH`` and compare them with literals (KERNEL_GUIDE P18); ``csrc/rows.cpp`` and
``csrc/centers.cpp`` repeat them as ``constexpr int64_t`` (``tests/test_project.py`` checks that they agree).
"""

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

# ----------------------------------------------------------------------------------------------
# center family (kernels/centers.py, csrc/centers.cpp)
# ----------------------------------------------------------------------------------------------

# criterion kinds: ``kind`` of center_loss_fwd
CAC = 0
CENTER = 1
MCHAD = 2

#: statistics saved per row by the center forward: raw_y, S (CAC) or lse(−d) (MCHAD), T (CAC)
CENTER_N_STATS = 3
