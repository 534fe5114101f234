"""Class-center models (LOSS_CONTRACT.md §2.7, §2.8), with pytorch-ood's names.

* :class:`ClassCenters`: K learnable (or fixed) centers; ``forward(x)`` gives (N, K) squared distances.
* :class:`RunningCenters`: running-mean class centers in float32 buffers; ``forward(x)`` gives (K, N).
"""

from .reference.centers import ClassCenters
from .reference.centers import RunningCenters

__all__ = ["ClassCenters", "RunningCenters"]
