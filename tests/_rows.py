"""Shared pieces of the row-criterion tests (tests/test_fused_rows.py and tests/test_cpp_rows.py).

``criteria`` builds every row criterion; ``run`` evaluates a function of logits and targets on one backend
and returns its value and input gradients; ``compare`` checks a kernel backend against the reference.
"""

import torch
from _backends import current_device
from _backends import fresh_leaf
from _backends import use_backend
from _backends import value_and_grads

import oodkernels as ok
from oodkernels import testing

C = 7


def criteria(n_classes=C):
    return {
        "CrossEntropyLoss": lambda: ok.loss.CrossEntropyLoss(),
        "BackgroundClassLoss": lambda: ok.loss.BackgroundClassLoss(n_classes=n_classes - 1),
        "OutlierExposureLoss": lambda: ok.loss.OutlierExposureLoss(alpha=0.3),
        "EntropicOpenSetLoss": lambda: ok.loss.EntropicOpenSetLoss(),
        # margins inside the range of random logits' energies, so both hinges are active on some rows
        "EnergyRegularizedLoss": lambda: ok.loss.EnergyRegularizedLoss(alpha=0.1, margin_in=-3.0, margin_out=-2.5),
        "ConfidencePenaltyLoss": lambda: ok.loss.ConfidencePenaltyLoss(lambda_ood=0.3),
        "MarginConfidenceLoss": lambda: ok.loss.MarginConfidenceLoss(margin=0.4),
        "LogitNorm": lambda: ok.loss.LogitNorm(t=0.7),
    }


#: the criteria that take (N, C, *spatial) logits; LogitNorm is classification only
SEGMENTATION = set(criteria()) - {"LogitNorm"}
#: reduction=None raises for these (tested in the contract suite)
NONE_RAISES = {"BackgroundClassLoss", "LogitNorm"}


def run(backend, monkeypatch, fn, inputs, grad_output=None):
    """Value and input gradients of ``fn(*inputs)`` on ``backend``, on fresh leaf copies that keep the inputs'
    strides (every float input requires grad)."""
    use_backend(monkeypatch, backend)
    leaves = [fresh_leaf(t, requires_grad=t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in inputs]
    return value_and_grads(fn, leaves, grad_output)


def compare(backend, monkeypatch, fn, inputs, atol=None, rtol=None, grad_output=None):
    """``fn`` on ``backend`` against the reference: the value and every input gradient."""
    value, grads = run(backend, monkeypatch, fn, inputs, grad_output)
    ref_value, ref_grads = run("reference", monkeypatch, fn, inputs, grad_output)
    testing.assert_close(value, ref_value, atol=atol, rtol=rtol, name="value")
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        g = torch.zeros_like(inputs[i]) if g is None else g
        r = torch.zeros_like(inputs[i]) if r is None else r
        testing.assert_close(g, r, atol=atol, rtol=rtol, name=f"gradient {i}")
    return value


def rand_logits(shape, dtype=torch.float32, layout="contiguous", scale=3.0):
    return testing.make_logits(
        shape[0], shape[1], shape[2:], dtype=dtype, layout=layout, scale=scale, device=current_device()
    )


def rand_targets(logit_shape, pattern, n_classes=C, name=None):
    """Labels for ``logit_shape``; BackgroundClassLoss(n_classes=C-1) takes ID labels below C-1 only."""
    shape = (logit_shape[0], *logit_shape[2:])
    if name == "BackgroundClassLoss":
        n_classes = n_classes - 1
    return testing.make_targets(shape, n_classes, pattern, device=current_device())
