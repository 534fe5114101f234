"""oodkernels: fused, exact, drop-in kernels for OOD-detection training objectives."""

__version__ = "0.1.0"

from . import config  # noqa: E402
