"""When an eager call may take a C++ autograd step instead of its custom op (``ops/row_ops.py``,
``ops/center_ops.py``): the steps run the same C++ operators with their backward registered in C++, and only the
custom ops are what ``torch.compile``, tracing, opcheck and fake tensors may see."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _plain(t: Optional[Tensor]) -> bool:
    # a Parameter (trainable centers) is a plain tensor to the dispatcher: it overrides no torch function
    return t is None or (type(t) in (Tensor, torch.nn.Parameter) and not t.is_meta)


def plain_eager_call(*tensors: Optional[Tensor]) -> bool:
    """Not compiling or tracing, and every tensor None, a ``torch.Tensor`` or an ``nn.Parameter`` (no subclass, no
    meta tensor)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return all(_plain(t) for t in tensors)
