"""tests/test_contract_row_options.py, re-run on the fused Triton kernels (see tests/_fused_rerun.py)."""

from _fused_rerun import fused_backend  # noqa: F401  (autouse)
from _fused_rerun import rerun

globals().update(rerun("test_contract_row_options.py"))
