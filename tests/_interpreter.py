"""A faster Triton interpreter for the test suite: nested ``@triton.jit`` calls skip a redundant re-patch.

In Triton's interpreter every call of one jit function from another (``_exp``, ``_epilogue``, ...) re-patches
``triton.language`` for the callee (``_patch_lang``: an ``inspect.getmembers`` scan of the language modules),
although the launch that is running has already patched those very modules; measured on this suite's row
kernels, that scan was 60 % of the interpreter's time. :func:`install` wraps the nested call so that it
patches only when one of the callee's language modules is not patched yet, which is exactly when the patch
does something (re-patching a patched module is a no-op: its builtins are already replaced). Semantics are
unchanged; where Triton's internals differ from what this expects, nothing is installed.
"""

import triton.language as tl

try:
    from triton.runtime import interpreter as _interp
except ImportError:  # pragma: no cover - no interpreter in this triton
    _interp = None


def _language_modules(fn):
    return [v for v in fn.__globals__.values() if v is tl or v is tl.core]


def _patched(lang) -> bool:
    load = getattr(lang, "load", None)
    return load is not None and not tl.core.is_builtin(load)


def install() -> bool:
    """Install the wrapper once; returns whether it is active."""
    cls = getattr(_interp, "InterpretedFunction", None)
    if cls is None or not hasattr(_interp, "_patch_lang") or not hasattr(cls, "rewrite"):
        return False
    if getattr(cls.__call__, "_skips_repatch", False):
        return True
    original = cls.__call__

    def __call__(self, *args, **kwargs):
        langs = _language_modules(self.fn)
        if not langs or not all(_patched(lang) for lang in langs):
            return original(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise _interp.InterpreterError(repr(e)) from e

    __call__._skips_repatch = True
    cls.__call__ = __call__
    return True
