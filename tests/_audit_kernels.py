"""Kernels with known compile facts for tests/test_audit.py (imported only without the Triton interpreter,
by tests/_audit_probe.py and the audit's compile workers)."""

import triton
import triton.language as tl


@triton.jit
def scale_copy(X, Y, n, BLOCK: tl.constexpr):
    """``Y = 2·X`` over ``n`` elements: one load and one store per element."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=mask) * 2.0, mask=mask)


@triton.jit
def many_live_arrays(X, Y, BLOCK: tl.constexpr):
    """Six transforms of a ``BLOCK``-long vector kept alive across two reductions: at one warp and BLOCK =
    2048 that is 64 values per thread per array, far past 255 registers, so ptxas must spill."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    a = tl.exp(x)
    b = tl.log(x)
    c = tl.sin(x)
    d = tl.cos(x)
    e = tl.sqrt(x)
    f = x * x
    s = tl.sum(a + b + c, axis=0)
    t = tl.max(d + e + f, axis=0)
    tl.store(Y + offs, a * s + b * t + c * s + d * t + e * s + f * t)


@triton.jit
def loop_type_change(X, Y, n):
    """Broken for a GPU only: ``acc`` enters the loop as int32 and leaves it fp32. The interpreter runs it as
    Python would; Triton's compiler rejects the loop-carried type change."""
    acc = 0
    for i in range(0, n):
        acc += tl.load(X + i)
    tl.store(Y, acc)
