"""The optional ahead-of-time C++ build; every other piece of packaging metadata is in pyproject.toml.

Nothing is compiled at install time unless ``OODKERNELS_BUILD_EXT=1`` is set (then install with
``--no-build-isolation`` so the build sees the installed torch). Otherwise the C++ CPU extension in
``csrc/`` is built on first use and cached (see ``oodkernels/_cpp.py``).
"""

import importlib.util
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extensions():
    """The ahead-of-time C++ build, only on request."""
    if os.environ.get("OODKERNELS_BUILD_EXT", "0") != "1":
        return [], {}
    import glob

    from torch.utils.cpp_extension import BuildExtension
    from torch.utils.cpp_extension import CppExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        raise RuntimeError("OODKERNELS_BUILD_EXT=1 but csrc/ holds no C++ sources yet")
    # the JIT build's flags (oodkernels/_cpp.py), loaded by path: importing the package needs torch and more
    spec = importlib.util.spec_from_file_location("_oodkernels_cpp", os.path.join(HERE, "oodkernels", "_cpp.py"))
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    ext = CppExtension(
        "oodkernels._C", sources, extra_compile_args=flags.compile_flags(), extra_link_args=flags.link_flags()
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
