"""Helpers to check a criterion (fused or your own) against a reference implementation.

Used by oodkernels' own test suite and public for people who write custom losses:

* :func:`tolerances` - the ``(atol, rtol)`` per dtype of KERNEL_GUIDE §5;
* :func:`assert_close` - ``torch.testing.assert_close`` that reports the worst entries;
* :func:`make_logits`, :func:`make_targets` - inputs in the layouts and label patterns the contract
  tests use, asserting the dtype they produce;
* :func:`check_against_reference` - values and gradients of ``fn`` vs ``reference`` on the same
  inputs, gradients of a 'mean' compared after scaling by nothing else than the same ``grad_output``;
* :func:`gradcheck_fp64` - ``torch.autograd.gradcheck`` on float64 copies of the inputs.

Only torch is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable
from typing import Optional

import torch
from torch import Tensor

LABEL_PATTERNS = ("mixed", "all_id", "all_ood", "empty")

_TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 2e-2),
}


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` for comparing a result in ``dtype`` with an evaluation of the same inputs in float64."""
    if dtype not in _TOLERANCES:
        raise ValueError(f"dtype: expected one of {sorted(map(str, _TOLERANCES))}, got {dtype}")
    return _TOLERANCES[dtype]


def assert_close(
    actual: Tensor,
    expected: Tensor,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    name: str = "value",
    check_dtype: bool = True,
) -> None:
    """Assert ``|actual - expected| <= atol + rtol·|expected|`` elementwise (NaN equal to NaN).

    Tolerances default to :func:`tolerances` of ``actual``'s dtype. On failure the message lists the
    shapes, the number of mismatches and the five worst entries with their indices.
    """
    if not isinstance(actual, Tensor) or not isinstance(expected, Tensor):
        raise TypeError(f"{name}: expected two tensors, got {type(actual).__name__} and {type(expected).__name__}")
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if check_dtype and actual.dtype != expected.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype} != expected {expected.dtype}")
    d_atol, d_rtol = tolerances(actual.dtype) if actual.is_floating_point() else (0.0, 0.0)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    both_nan = torch.isnan(a) & torch.isnan(e)
    same_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    err = (a - e).abs()
    bad = ~(both_nan | same_inf | (err <= atol + rtol * e.abs()))
    if not bool(bad.any()):
        return
    err = torch.where(bad, torch.nan_to_num(err, nan=float("inf")), torch.zeros_like(err))
    worst = torch.argsort(err.reshape(-1), descending=True)[:5]
    rows = []
    for flat in worst.tolist():
        if not bool(bad.reshape(-1)[flat]):
            break
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        rows.append(f"  at {index}: got {a.reshape(-1)[flat].item():.10g}, expected {e.reshape(-1)[flat].item():.10g}")
    raise AssertionError(
        f"{name}: {int(bad.sum())} of {a.numel()} entries differ beyond atol={atol:g}, rtol={rtol:g}\n"
        + "\n".join(rows)
    )


def make_logits(
    batch: int,
    n_classes: int,
    spatial: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
    device="cpu",
    scale: float = 3.0,
    generator: Optional[torch.Generator] = None,
    layout: str = "contiguous",
) -> Tensor:
    """Random logits of shape ``(batch, n_classes, *spatial)``.

    ``layout``: ``"contiguous"``; ``"channels_last"`` (classes on the fastest axis, as a permuted
    view); ``"transposed"`` (2-D only: a ``(C, B).T`` view); ``"sliced"`` (every other column of a
    wider tensor). The values are the same for every layout given the same generator state.
    """
    shape = (batch, n_classes, *spatial)
    base = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    if layout == "contiguous":
        out = base.to(dtype)
    elif layout == "channels_last":
        perm = (0, *range(2, len(shape)), 1)
        inverse = (0, len(shape) - 1, *range(1, len(shape) - 1))
        out = base.permute(perm).contiguous().to(dtype).permute(inverse)
    elif layout == "transposed":
        if spatial:
            raise ValueError("layout: 'transposed' is only defined for 2-D logits")
        out = base.t().contiguous().to(dtype).t()
    elif layout == "sliced":
        wide = torch.zeros((batch, 2 * n_classes, *spatial), dtype=torch.float64)
        wide[:, ::2] = base
        out = wide.to(dtype)[:, ::2]
    else:
        raise ValueError(f"layout: expected contiguous, channels_last, transposed or sliced, got {layout!r}")
    out = out.to(device)
    if out.dtype != dtype or tuple(out.shape) != shape:  # dtype honesty (KERNEL_GUIDE P17)
        raise AssertionError(f"make_logits produced {out.dtype} {tuple(out.shape)}, wanted {dtype} {shape}")
    return out


def make_targets(
    shape: Sequence[int],
    n_classes: int,
    pattern: str = "mixed",
    device="cpu",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """int64 labels of ``shape`` following a label pattern.

    * ``"mixed"``: ``(index mod (C + 1)) − 1`` over the flattened entries, so both ID labels
      ``0..C−1`` and OOD (−1) occur (LOSS_CONTRACT §8.1);
    * ``"all_id"``: random labels in ``[0, C)``; ``"all_ood"``: random labels in ``[−5, −1]``;
    * ``"empty"``: ``shape`` with its first dimension set to 0.
    """
    shape = tuple(shape)
    if pattern == "mixed":
        count = 1
        for s in shape:
            count *= s
        out = (torch.arange(count) % (n_classes + 1) - 1).reshape(shape)
    elif pattern == "all_id":
        out = torch.randint(0, n_classes, shape, generator=generator)
    elif pattern == "all_ood":
        out = torch.randint(-5, 0, shape, generator=generator)
    elif pattern == "empty":
        out = torch.zeros((0, *shape[1:]), dtype=torch.int64)
    else:
        raise ValueError(f"pattern: expected one of {LABEL_PATTERNS}, got {pattern!r}")
    out = out.to(device=device, dtype=torch.int64)
    if out.dtype != torch.int64:
        raise AssertionError(f"make_targets produced {out.dtype}")
    return out


def _leaves(inputs: Sequence) -> list[Tensor]:
    return [t for t in inputs if isinstance(t, Tensor) and t.is_floating_point()]


def _clone_inputs(inputs: Sequence, requires_grad: bool) -> list:
    out = []
    for t in inputs:
        if isinstance(t, Tensor) and t.is_floating_point():
            t = t.detach().clone().requires_grad_(requires_grad)
        out.append(t)
    return out


def check_against_reference(
    fn: Callable,
    reference: Callable,
    inputs: Sequence,
    grad: bool = True,
    grad_output: Optional[Tensor] = None,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
) -> Tensor:
    """Assert ``fn(*inputs) == reference(*inputs)`` in value, shape and dtype, and in the gradients
    with respect to every floating input; returns ``fn``'s value.

    Both are evaluated on fresh leaf copies of ``inputs``. ``grad_output`` (default: ones, or a fixed
    random tensor for non-scalar outputs) is applied to both, so a per-row ``grad_output`` is tested.
    """
    ours_in = _clone_inputs(inputs, grad)
    ref_in = _clone_inputs(inputs, grad)
    ours = fn(*ours_in)
    expected = reference(*ref_in)
    assert_close(ours, expected, atol=atol, rtol=rtol, name="value")
    if grad and ours.requires_grad:
        if grad_output is None:
            gen = torch.Generator().manual_seed(1234)
            grad_output = torch.randn(ours.shape, generator=gen, dtype=torch.float64).to(ours.dtype).to(ours.device)
        ours.backward(grad_output)
        if expected.requires_grad:
            expected.backward(grad_output)
        for i, (a, e) in enumerate(zip(_leaves(ours_in), _leaves(ref_in))):
            e_grad = e.grad if e.grad is not None else torch.zeros_like(e)
            a_grad = a.grad if a.grad is not None else torch.zeros_like(a)
            assert_close(a_grad, e_grad, atol=atol, rtol=rtol, name=f"gradient of input {i}")
    return ours.detach()


def gradcheck_fp64(fn: Callable, inputs: Sequence, **kwargs) -> bool:
    """``torch.autograd.gradcheck`` of ``fn`` on float64 leaf copies of the floating ``inputs``."""
    cast = []
    for t in inputs:
        if isinstance(t, Tensor) and t.is_floating_point():
            t = t.detach().to(torch.float64).clone().requires_grad_(True)
        cast.append(t)
    return torch.autograd.gradcheck(fn, tuple(cast), **kwargs)
