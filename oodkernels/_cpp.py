"""Locating, building and loading the C++ CPU extension in ``csrc/``.

The extension registers its operators with ``TORCH_LIBRARY`` under the ``oodkernels`` namespace, so
loading it is all that is needed (``is_python_module=False``). Order of attempts:

1. an ahead-of-time build, ``oodkernels._C`` (``OODKERNELS_BUILD_EXT=1 pip install --no-build-isolation .``);
2. a JIT build of ``csrc/*.cpp`` with ``torch.utils.cpp_extension.load`` and ninja, cached in
   ``TORCH_EXTENSIONS_DIR`` across processes, announced with one line while it builds.

A failed build warns once, naming the cause, and the CPU tensors fall back to the reference
backend; ``oodkernels.backend_info()`` reports which happened. ``OODKERNELS_REQUIRE_CPP=1`` (CI)
turns that fallback into a ``RuntimeError``. Nothing is attempted until a CPU operator first asks
for the extension.

Both builds use :func:`compile_flags`: ``-O3`` and, when the building machine's CPU has AVX2 (as
torch reports it), ``-mavx2 -mfma`` with ATen's ``CPU_CAPABILITY_AVX2`` so that
``at::vec::Vectorized<float>`` is 8 lanes wide with SLEEF's vector ``exp`` (without them it is a
scalar loop). An extension built that way runs only on AVX2 machines: the JIT build always matches
the machine it runs on; an ahead-of-time build targets the machine that built it.
"""

from __future__ import annotations

import glob
import importlib
import os
import sys
import warnings

_SOURCES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

_state: dict = {"tried": False, "loaded": False, "reason": "not requested yet"}

#: the JIT module name; bump the suffix when the flags change so that stale caches are not reused
JIT_NAME = "oodkernels_cpu_v1"


def _cpu_capability() -> str:
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # very old torch: assume nothing
        return "DEFAULT"


def compile_flags(capability: str | None = None) -> list[str]:
    """C++ flags of the extension (JIT and ahead of time alike) for a CPU of ``capability``
    (``torch.backends.cpu.get_cpu_capability()``: DEFAULT, AVX2, AVX512, ...)."""
    capability = _cpu_capability() if capability is None else capability
    flags = ["-O3"]
    if capability in ("AVX2", "AVX512"):
        # AVX2 even on AVX512 machines: same vector width as torch's own AVX2 kernels, no frequency
        # penalty, and SLEEF's 8-lane exp is exported by libtorch_cpu for it
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


def required() -> bool:
    """``OODKERNELS_REQUIRE_CPP=1``: an extension that cannot be built or loaded is an error (CI)."""
    return os.environ.get("OODKERNELS_REQUIRE_CPP", "0") == "1"


def sources() -> list[str]:
    """The C++ sources of the extension (empty when the package was installed without ``csrc/``)."""
    return sorted(glob.glob(os.path.join(_SOURCES_DIR, "*.cpp")))


def _cached(cpp_extension) -> bool:
    """Whether a JIT build of this name is already in the cache (then loading it says nothing)."""
    try:
        directory = cpp_extension._get_build_directory(JIT_NAME, verbose=False)
    except Exception:
        return False
    return os.path.exists(os.path.join(directory, f"{JIT_NAME}.so"))


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

        if not _cached(cpp_extension):
            print("oodkernels: building the C++ CPU extension (first use only, cached) ...", file=sys.stderr)
        cpp_extension.load(
            name=JIT_NAME,
            sources=srcs,
            extra_cflags=compile_flags(),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # any build failure falls back, with one warning naming the cause
        cause = f"{type(exc).__name__}: {_first_error(str(exc))}"
        _state.update(reason=f"JIT build failed ({cause}); CPU tensors use the reference")
        if required():
            message = f"OODKERNELS_REQUIRE_CPP=1 but the C++ CPU extension could not be built: {cause}"
            raise RuntimeError(message) from exc
        warnings.warn(f"oodkernels: the C++ CPU extension could not be built: {cause}", RuntimeWarning, stacklevel=3)
        return
    _state.update(loaded=True, reason="JIT build of csrc/ (cached)")


def _first_error(text: str) -> str:
    """The compiler's first ``error:`` line of a build log (else its last line): the cause, in one line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in lines:
        if "error:" in line or "error " in line.lower()[:20]:
            return line
    return lines[-1] if lines else "unknown cause"


def available() -> bool:
    """Whether the C++ extension is loaded, building or loading it on first call."""
    if not _state["tried"]:
        _load()
    if required() and not _state["loaded"]:
        raise RuntimeError(f"OODKERNELS_REQUIRE_CPP=1 but the C++ CPU extension is unavailable: {_state['reason']}")
    return bool(_state["loaded"])


def status() -> str:
    """A one-line account of the extension, without triggering a build."""
    if not _state["tried"]:
        n = len(sources())
        return "no C++ sources in csrc/" if n == 0 else f"{n} source file(s) in csrc/, not built yet"
    return _state["reason"]
