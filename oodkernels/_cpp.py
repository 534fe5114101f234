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

Both builds use :func:`compile_flags`: ``-O3`` and the vector ISA of the building machine's CPU as
torch reports it: AVX-512 (``CPU_CAPABILITY_AVX512``, ``at::vec::Vectorized<float>`` 16 lanes wide) or
AVX2 (``CPU_CAPABILITY_AVX2``, 8 lanes), with SLEEF's vector ``exp``/``log`` from libtorch_cpu (without
either it is a scalar loop). An extension built that way runs only on machines with that ISA: the JIT
build always matches the machine it runs on; an ahead-of-time build targets the machine that built it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import warnings

_SOURCES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

_state: dict = {"tried": False, "loaded": False, "reason": "not requested yet"}

#: the JIT module name; bump the suffix when the flags change so that stale caches are not reused
JIT_NAME = "oodkernels_cpu_v3"


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
    # -fopenmp: at::parallel_for is inline and runs serially unless the extension itself is built with OpenMP
    flags = ["-O3", "-fopenmp"]
    if capability == "AVX512":
        # the width torch's own kernels use on this CPU; half the instructions of AVX2 in the exp-bound loops
        # (measured 10-20% faster kernels on an AVX-512 EPYC), SLEEF's 16-lane functions from libtorch_cpu
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
        flags += ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    elif capability == "AVX2":
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


def link_flags() -> list[str]:
    """Linker flags of the extension: OpenMP, for at::parallel_for."""
    return ["-fopenmp"]


def required() -> bool:
    """``OODKERNELS_REQUIRE_CPP=1``: an extension that cannot be built or loaded is an error (CI)."""
    return os.environ.get("OODKERNELS_REQUIRE_CPP", "0") == "1"


def sources() -> list[str]:
    """The C++ sources of the extension (empty when the package was installed without ``csrc/``)."""
    return sorted(glob.glob(os.path.join(_SOURCES_DIR, "*.cpp")))


def _aot_library() -> str | None:
    """The path of the ahead-of-time build ``oodkernels._C`` (setup.py with OODKERNELS_BUILD_EXT=1), if any."""
    try:
        spec = importlib.util.find_spec("oodkernels._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def _cached(cpp_extension) -> bool:
    """Whether a JIT build of this name is already in the cache (then loading it says nothing)."""
    try:
        directory = cpp_extension._get_build_directory(JIT_NAME, verbose=False)
    except Exception:
        return False
    return os.path.exists(os.path.join(directory, f"{JIT_NAME}.so"))


def _load() -> None:
    _state["tried"] = True
    aot = _aot_library()
    if aot is not None:
        import torch

        # a shared library of operators (no Python module init): loaded as such, not imported
        torch.ops.load_library(aot)
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
            extra_ldflags=link_flags(),
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
