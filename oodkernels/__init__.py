"""oodkernels: fused, exact, drop-in kernels for out-of-distribution-detection training objectives.

Criteria live in :mod:`oodkernels.loss` and are re-exported here; the functional API is
:mod:`oodkernels.functional`, the paired-batch objectives
:mod:`oodkernels.paired`, the post-hoc scores :mod:`oodkernels.scores`, the plain-PyTorch
ground truth :mod:`oodkernels.reference`. :func:`backend_info` says which backend runs what.
"""

from . import config
from . import functional
from . import loss
from . import model
from . import ops
from . import paired
from . import reference
from . import scores
from . import testing
from . import utils
from ._version import __version__
from .loss import *  # noqa: F403  (the criteria, as in pytorch_ood.loss)
from .loss import __all__ as _criteria
from .ops import backend_info
from .reference import renamed as _renamed

__all__ = [
    "__version__",
    "backend_info",
    "config",
    "functional",
    "loss",
    "model",
    "ops",
    "paired",
    "reference",
    "scores",
    "testing",
    "utils",
    *_criteria,
]


def __getattr__(name):
    return _renamed(__name__, globals(), name)
