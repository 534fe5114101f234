"""Locating, building and loading the C++ CPU extension in ``csrc/``.

The extension registers its operators with ``TORCH_LIBRARY`` under the ``oodkernels`` namespace, so
loading it is all that is needed (``is_python_module=False``). Order of attempts:

1. an ahead-of-time build, ``oodkernels._C`` (``OODKERNELS_BUILD_EXT=1 pip install --no-build-isolation .``);
2. a JIT build of ``csrc/*.cpp`` with ``torch.utils.cpp_extension.load`` and ninja, cached in
   ``TORCH_EXTENSIONS_DIR`` across processes, announced with one line while it builds.

A failed build warns once, naming the cause, and the CPU tensors fall back to the reference
backend; ``oodkernels.backend_info()`` reports which happened. Nothing is attempted until a CPU
operator first asks for the extension.
"""

from __future__ import annotations

import glob
import importlib
import os
import sys
import warnings

_SOURCES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

_state: dict = {"tried": False, "loaded": False, "reason": "not requested yet"}


def sources() -> list[str]:
    """The C++ sources of the extension (empty when the package was installed without ``csrc/``)."""
    return sorted(glob.glob(os.path.join(_SOURCES_DIR, "*.cpp")))


def _load() -> None:
    _state["tried"] = True
    try:
        importlib.import_module("oodkernels._C")
    except ImportError:
        pass
    else:
        _state.update(loaded=True, reason="ahead-of-time build oodkernels._C")
        return
    srcs = sources()
    if not srcs:
        _state.update(reason="csrc/ holds no C++ sources in this version; CPU tensors use the reference")
        return
    try:
        from torch.utils import cpp_extension

        print("oodkernels: building the C++ CPU extension (first use only, cached) ...", file=sys.stderr)
        cpp_extension.load(
            name="oodkernels_cpu",
            sources=srcs,
            extra_cflags=["-O3"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # any build failure falls back, with one warning naming the cause
        cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        _state.update(reason=f"JIT build failed ({cause}); CPU tensors use the reference")
        warnings.warn(f"oodkernels: the C++ CPU extension could not be built: {cause}", RuntimeWarning, stacklevel=3)
        return
    _state.update(loaded=True, reason="JIT build of csrc/ (cached)")


def available() -> bool:
    """Whether the C++ extension is loaded, building or loading it on first call."""
    if not _state["tried"]:
        _load()
    return bool(_state["loaded"])


def status() -> str:
    """A one-line account of the extension, without triggering a build."""
    if not _state["tried"]:
        n = len(sources())
        return "no C++ sources in csrc/" if n == 0 else f"{n} source file(s) in csrc/, not built yet"
    return _state["reason"]
