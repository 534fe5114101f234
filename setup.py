"""Packaging for oodkernels.

Nothing is compiled at install time unless ``OODKERNELS_BUILD_EXT=1`` is set (then install with
``--no-build-isolation`` so the build sees the installed torch). Otherwise the C++ CPU extension in
``csrc/`` is built on first use and cached (see ``oodkernels/_cpp.py``).
"""

import importlib.util
import os

from setuptools import find_packages
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def version():
    for line in read("oodkernels/_version.py").splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("oodkernels/_version.py: no __version__")


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

setup(
    name="oodkernels",
    version=version(),
    description="Fused, exact, drop-in kernels for out-of-distribution detection training objectives",
    long_description=read("README.md"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["oodkernels", "oodkernels.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "triton; platform_system == 'Linux'",
        "ninja",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist", "hypothesis", "scipy", "ruff"],
        "demo": ["scikit-learn", "tqdm", "matplotlib"],
        # bench/audit.py's anchor: Liger's cross-entropy kernel compiled beside ours (torch and triton are ours)
        "bench": ["liger-kernel"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
