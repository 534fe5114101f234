"""Global switches of oodkernels.

This module is a leaf: it imports nothing from the package, so every layer may read it.

``data_checks`` (bool, default ``True``)
    Controls the value-dependent checks of LOSS_CONTRACT.md §2.11: the pytorch-ood warnings about
    OOD samples being discarded, the errors for labels that have no logit column, EnergyMarginLoss's
    both-groups check, IILoss's fewer-than-two-classes warning and the VOS queues' ``was_full`` read.

    * On, in eager mode: each call evaluates its checks on the device and reads all of them with
      **one** device-to-host transfer (free on CPU tensors), then warns or raises as pytorch-ood does.
    * Off, or while compiling, tracing or capturing a CUDA graph: no check runs and nothing is
      transferred. Values for valid inputs are identical either way; a label without a matching
      logit column then gives NaN instead of an error.

    The trade-off: the default keeps pytorch-ood's warnings and errors at the cost of one small
    synchronisation per call; turning the flag off removes every synchronisation and those
    diagnostics with it. Shape, dtype and device checks are always on.

``backend`` is read from the environment variable ``OODKERNELS_BACKEND``
    (``auto``, ``triton``, ``cpp`` or ``reference``) when the package is imported; see
    :func:`oodkernels.backend_info`.
"""

import os

data_checks: bool = True

BACKENDS = ("auto", "triton", "cpp", "reference")


#: the last ``OODKERNELS_BACKEND`` string seen and its validated value (every call reads the variable; the
#: parsing is what the cache saves, on the eager path of every criterion call)
_parsed: list = [None, "auto"]


def requested_backend() -> str:
    """The backend named by ``OODKERNELS_BACKEND`` (default ``auto``), validated."""
    raw = os.environ.get("OODKERNELS_BACKEND")
    if raw is not None and raw == _parsed[0]:
        return _parsed[1]
    value = (raw or "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"OODKERNELS_BACKEND: expected one of {', '.join(BACKENDS)}, got {value!r}")
    _parsed[0], _parsed[1] = raw, value
    return value
