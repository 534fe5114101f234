"""Without triton (macOS, Windows: setup.py installs it on Linux only) the C++ backend still serves CPU tensors.

The check runs in a subprocess whose ``import triton`` fails (``sys.modules["triton"] = None``, set before torch
or oodkernels is imported), so this test process keeps its own triton and kernels.
"""

import os
import pathlib
import subprocess
import sys

from _backends import requires_cpp

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import importlib.util
import os
import sys

sys.modules["triton"] = None  # a present-but-None entry makes every import of triton raise ImportError
assert importlib.util.find_spec("triton") is None
try:
    import triton  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("import triton succeeded")

import torch

import oodkernels as ok
from oodkernels import ops
from oodkernels import testing

cpu, cuda = torch.device("cpu"), torch.device("cuda")

# registration: cpp for every C++ operation, no triton, and the report says so
assert ops.triton_status() == "not installed", ops.triton_status()
info = ok.backend_info()
assert info["triton"] == "not installed" and info["cpp"] == "available", (info["triton"], info["cpp"])
for name, where in info["operations"].items():
    assert where["cpu"] == ("cpp" if name in ops.CPP_OPERATIONS else "reference"), (name, where)
    assert where["cuda"] == "reference", (name, where)
assert ops.select_backend("outlier_exposure_loss", cuda) == ("reference", "triton is not installed")
for name in ("outlier_exposure_loss", "center_distance_loss", "sq_distances"):
    assert ops.select_backend(name, cpu) == ("cpp", "fused C++ kernel"), name

# spies on the C++ operators: the row and center custom ops must reach them
calls = []
for op in (
    "cpu_row_loss_reduced_step", "cpu_center_sq_distances", "cpu_center_sq_distances_grads",
    "cpu_center_loss_fwd", "cpu_center_loss_bwd", "cpu_assigned_sq_distances", "cpu_assigned_sq_distances_grads",
    "cpu_center_sq_distances_step", "cpu_center_loss_step", "cpu_center_loss_reduced_step",
    "cpu_assigned_sq_distances_step",
):
    original = getattr(torch.ops.oodkernels, op)

    def spy(*args, _original=original, _op=op, **kwargs):
        calls.append(_op)
        return _original(*args, **kwargs)

    setattr(torch.ops.oodkernels, op, spy)

# a row criterion on an NCHW input, forward and backward, against the reference
gen = torch.Generator().manual_seed(0)
logits = torch.randn(2, 5, 3, 4, generator=gen, requires_grad=True)
targets = torch.randint(-1, 5, (2, 3, 4), generator=gen)
loss = ok.OutlierExposureLoss(alpha=0.5)(logits, targets)
(grad,) = torch.autograd.grad(loss, logits)
ref_logits = logits.detach().clone().requires_grad_()
ref_loss = ok.reference.OutlierExposureLoss(alpha=0.5)(ref_logits, targets)
(ref_grad,) = torch.autograd.grad(ref_loss, ref_logits)
testing.assert_close(loss, ref_loss)
testing.assert_close(grad, ref_grad)
assert calls == ["cpu_row_loss_reduced_step"], calls  # forward and backward: one C++ autograd function

# a center criterion, distance() and forward, gradients for the features and the centers
calls.clear()
torch.manual_seed(1)
criterion = ok.CenterLoss(n_classes=4, n_dim=6)
reference = ok.reference.CenterLoss(n_classes=4, n_dim=6)
reference.load_state_dict(criterion.state_dict())
z = torch.randn(8, 6, generator=gen, requires_grad=True)
y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
loss = criterion(criterion.distance(z), y)
grads = torch.autograd.grad(loss, (z, *criterion.parameters()))
ref_z = z.detach().clone().requires_grad_()
ref_loss = reference(reference.distance(ref_z), y)
ref_grads = torch.autograd.grad(ref_loss, (ref_z, *reference.parameters()))
testing.assert_close(loss, ref_loss, atol=1e-5, rtol=5e-4)
for got, expected in zip(grads, ref_grads):
    testing.assert_close(got, expected, atol=1e-5, rtol=5e-4)
# eager: each op and its backward in one C++ autograd function (the backward runs inside it, unseen by the spies);
# the criterion's reduction runs in its step
assert calls == ["cpu_center_sq_distances_step", "cpu_center_loss_reduced_step"], calls

# II: the intra-class spread and the class-mean distances, gradients for the features
calls.clear()
ii, ref_ii = ok.IILoss(n_classes=4, n_embedding=6), ok.reference.IILoss(n_classes=4, n_embedding=6)
z = torch.randn(8, 6, generator=gen, requires_grad=True)
loss = ii(z, y)
(grad,) = torch.autograd.grad(loss, z)
ref_z = z.detach().clone().requires_grad_()
ref_loss = ref_ii(ref_z, y)
(ref_grad,) = torch.autograd.grad(ref_loss, ref_z)
testing.assert_close(loss, ref_loss, atol=1e-5, rtol=5e-4)
testing.assert_close(grad, ref_grad, atol=1e-5, rtol=5e-4)
assert {"cpu_assigned_sq_distances_step", "cpu_center_sq_distances_step"} <= set(calls), calls
assert not {"cpu_assigned_sq_distances", "cpu_center_sq_distances", "cpu_center_loss_fwd"} & set(calls), calls

# the Triton launcher modules were never imported, and triton stayed unimportable
assert "oodkernels.kernels.rows" not in sys.modules and "oodkernels.kernels.centers" not in sys.modules
assert sys.modules["triton"] is None

# forcing the Triton backend is a clear error, even with the interpreter requested
os.environ["OODKERNELS_BACKEND"] = "triton"
os.environ["TRITON_INTERPRET"] = "1"
try:
    ok.OutlierExposureLoss()(logits, targets)
except RuntimeError as exc:
    assert "OODKERNELS_BACKEND=triton but triton is not installed" in str(exc), exc
else:
    raise AssertionError("OODKERNELS_BACKEND=triton ran without triton")
assert ok.backend_info()["operations"]["center_loss"]["cpu"].startswith("error: OODKERNELS_BACKEND=triton")
print("no-triton checks passed")
"""


@requires_cpp
def test_cpp_backend_serves_cpu_tensors_without_triton():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OODKERNELS_BACKEND"] = "auto"
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "no-triton checks passed" in result.stdout
