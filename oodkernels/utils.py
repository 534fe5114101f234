"""Label predicates, batch utilities and distances (LOSS_CONTRACT.md §2.1-2.6), with pytorch-ood's names."""

from .reference.utils import apply_reduction
from .reference.utils import contains_known
from .reference.utils import contains_known_and_unknown
from .reference.utils import contains_unknown
from .reference.utils import drop_unknown
from .reference.utils import is_known
from .reference.utils import is_unknown
from .reference.utils import pairwise_distances

__all__ = [
    "is_known",
    "is_unknown",
    "contains_known",
    "contains_unknown",
    "contains_known_and_unknown",
    "drop_unknown",
    "apply_reduction",
    "pairwise_distances",
]
