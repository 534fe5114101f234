"""Import pytorch-ood 0.4.0 as a test oracle, if it is installed.

pytorch-ood imports torchvision at package import although none of its losses or scores use it,
and there is no CPU build of torchvision on our machines. When torchvision is missing, a
meta-path finder serves an inert stand-in for ``torchvision`` and its submodules so that the
package imports; any attempt to *use* torchvision through it returns inert objects, which the
loss and score code never does.

Install the oracle with ``pip install --no-deps pytorch-ood==0.4.0``.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import pytest


class _InertModule(types.ModuleType):
    __path__ = []  # a package, so that any submodule can be imported

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: self})


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _InertModule(spec.name)

    def exec_module(self, module):
        pass


def load():
    """The ``pytorch_ood`` package, or ``None`` when it is not installed or not version 0.4.0."""
    if importlib.util.find_spec("pytorch_ood") is None:
        return None
    if importlib.util.find_spec("torchvision") is None and not any(
        isinstance(f, _TorchvisionStandIn) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _TorchvisionStandIn())
    import pytorch_ood
    import pytorch_ood.detector  # noqa: F401
    import pytorch_ood.loss  # noqa: F401
    import pytorch_ood.model  # noqa: F401
    import pytorch_ood.utils  # noqa: F401

    if getattr(pytorch_ood, "__version__", None) != "0.4.0":
        return None
    return pytorch_ood


pytorch_ood = load()

requires_oracle = pytest.mark.skipif(pytorch_ood is None, reason="pytorch-ood 0.4.0 is not installed")
