"""Backend dispatch for every public operation.

Each operation has a plain-PyTorch reference implementation (``oodkernels.reference``) and may
have fused implementations registered by the kernel layers (``kernels/`` for Triton, ``_cpp`` for
the csrc extension) through :func:`register_kernel`. At call time the backend is chosen from the
device of the first tensor argument and ``OODKERNELS_BACKEND``:

=============  ===================================================================================
``auto``       CUDA tensors -> triton (the reference if triton is not installed); CPU tensors -> cpp
               if the extension is available, else the reference. Neither needs the other.
``triton``     Triton for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1`` (how CI runs
               the real kernels on a CPU). A CPU tensor without the interpreter is an error, and so is
               any tensor when triton is not installed.
``cpp``        the C++ extension for CPU tensors (an error if it cannot be built).
``reference``  the plain-PyTorch reference everywhere.
=============  ===================================================================================

An operation with no fused implementation for the chosen backend runs the reference, and
:func:`backend_info` says so. A fused kernel that fails is never silently replaced: its error
surfaces.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Callable

import torch

from .. import _cpp
from .. import config
from .._version import __version__
from ..reference import centers as _ref_centers
from ..reference import confidence as _ref_confidence
from ..reference import distances as _ref_distances
from ..reference import logits as _ref_logits
from ..reference import objectosphere as _ref_objectosphere
from ..reference import paired as _ref_paired
from ..reference import scores as _ref_scores
from ..reference import vos as _ref_vos

#: fused implementations by backend, filled by the kernel layers as they land
_KERNELS: dict[str, dict[str, Callable]] = {"triton": {}, "cpp": {}}

#: what runs the nn.Module criteria of oodkernels.loss
CRITERIA_BACKEND = (
    "the row criteria (CrossEntropy, BackgroundClass, OutlierExposure, EntropicOpenSet, EnergyRegularized, "
    "LogitNorm, ConfidencePenalty, MarginConfidence, Confidence, Objectosphere, VOSReg) and the center criteria "
    "(CAC, Center, MCHAD, II, DeepSVDD, DeepSAD: distance() and forward) run the operations above; "
    "VirtualOutlierSynthesizingReg and EnergyMargin run ce_and_energy for their rows (queues, sampling and the "
    "batch-coupled terms are device torch ops)"
)

#: every dispatched operation and its reference implementation
REFERENCE: dict[str, Callable] = {
    "cross_entropy": _ref_logits.cross_entropy,
    "background_class_loss": _ref_logits.background_class_loss,
    "outlier_exposure_loss": _ref_logits.outlier_exposure_loss,
    "entropic_open_set_loss": _ref_logits.entropic_open_set_loss,
    "energy_regularized_loss": _ref_logits.energy_regularized_loss,
    "confidence_penalty_loss": _ref_logits.confidence_penalty_loss,
    "margin_confidence_loss": _ref_logits.margin_confidence_loss,
    "logit_norm_loss": _ref_logits.logit_norm_loss,
    "confidence_loss": _ref_confidence.confidence_loss,
    "objectosphere_loss": _ref_objectosphere.objectosphere_loss,
    "vos_reg_loss": _ref_vos.vos_reg_loss,
    "pairwise_distances": _ref_centers.pairwise_distances,
    "sq_distances": _ref_centers.sq_distances,
    "assigned_sq_distances": _ref_centers.assigned_sq_distances,
    "pairwise_sq_distances": _ref_centers.pairwise_sq_distances,
    "center_loss": _ref_distances.center_loss,
    "cac_loss": _ref_distances.cac_loss,
    "mchad_loss": _ref_distances.mchad_loss,
    "cac_distance_loss": _ref_distances.cac_distance_loss,
    "center_distance_loss": _ref_distances.center_distance_loss,
    "mchad_distance_loss": _ref_distances.mchad_distance_loss,
    "energy_score": _ref_scores.energy,
    "max_softmax_score": _ref_scores.max_softmax,
    "max_logit_score": _ref_scores.max_logit,
    "entropy_score": _ref_scores.entropy,
    "weighted_energy_score": _ref_scores.weighted_energy,
    "ce_and_energy": _ref_logits.ce_and_energy,
    "paired_outlier_exposure": _ref_paired.outlier_exposure,
    "paired_energy_margin": _ref_paired.energy_margin,
}


#: the operations whose custom ops have C++ implementations in csrc/ (the rest run the reference on CPU)
CPP_OPERATIONS = (
    "cross_entropy",
    "background_class_loss",
    "outlier_exposure_loss",
    "entropic_open_set_loss",
    "energy_regularized_loss",
    "confidence_penalty_loss",
    "margin_confidence_loss",
    "logit_norm_loss",
    "energy_score",
    "max_softmax_score",
    "max_logit_score",
    "entropy_score",
    "weighted_energy_score",
    "ce_and_energy",
    "confidence_loss",
    "objectosphere_loss",
    "vos_reg_loss",
    "paired_outlier_exposure",
    "paired_energy_margin",
    "pairwise_distances",
    "sq_distances",
    "assigned_sq_distances",
    "pairwise_sq_distances",
    "center_loss",
    "cac_loss",
    "mchad_loss",
    "cac_distance_loss",
    "center_distance_loss",
    "mchad_distance_loss",
)


def _triton_installed() -> bool:
    """Whether triton can be found, without importing it."""
    return importlib.util.find_spec("triton") is not None


def _register_fused_families() -> bool:
    """Register the fused row and center families for cpp, and for triton when it is installed; returns
    whether the Triton backend was registered.

    The same fused functions serve both kernel backends: their custom ops send CPU tensors to the csrc
    operators when :func:`select_backend` picks cpp (ops/row_ops.py, ops/center_ops.py) and import the
    Triton launchers only on the Triton path, so the cpp registrations do not depend on triton.
    """
    from . import centers
    from . import rows

    fused = {**rows.FUSED, **centers.FUSED}
    for name in CPP_OPERATIONS:
        register_kernel("cpp", name, fused[name])
    if not _triton_installed():
        return False
    for name, fn in fused.items():
        register_kernel("triton", name, fn)
    return True


def register_kernel(backend: str, name: str, fn: Callable) -> None:
    """Register a fused implementation of operation ``name`` for ``backend`` ('triton' or 'cpp')."""
    if backend not in _KERNELS:
        raise ValueError(f"backend: expected 'triton' or 'cpp', got {backend!r}")
    if name not in REFERENCE:
        raise ValueError(f"name: {name!r} is not a dispatched operation")
    _KERNELS[backend][name] = fn


def triton_interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), which also serves CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: set inside :func:`cuda_stand_in`
_CUDA_STAND_IN = [False]


@contextlib.contextmanager
def cuda_stand_in():
    """Within the block, CPU tensors are dispatched exactly as CUDA tensors would be.

    ``auto`` and ``triton`` pick the Triton launchers for them, compiled (not interpreted), so every
    device-dependent decision takes its CUDA branch (native bf16/fp16 ``tl.dot``, no interpreter upcasts).
    For ``bench/audit.py`` only: its compile-only Triton driver turns each launch into a compile for a GPU
    target, so a benchmark case's training step on CPU tensors yields the cubins, ATen ops and launches of
    the CUDA step. Outside such a driver a launch on CPU tensors fails.
    """
    saved = _CUDA_STAND_IN[0]
    _CUDA_STAND_IN[0] = True
    try:
        yield
    finally:
        _CUDA_STAND_IN[0] = saved


def triton_status() -> str:
    """One line on the Triton installation as found when oodkernels was imported (triton itself is not imported)."""
    if not _TRITON_REGISTERED:
        return "not installed"
    try:
        from importlib.metadata import version

        ver = version("triton")
    except Exception:
        ver = "unknown version"
    mode = "interpreter (TRITON_INTERPRET=1)" if triton_interpreting() else "compiled"
    return f"installed ({ver}), {mode}, {len(_KERNELS['triton'])} fused operation(s)"


def select_backend(name: str, device: torch.device) -> tuple[str, str]:
    """``(backend, reason)`` that runs operation ``name`` for tensors on ``device``."""
    requested = config.requested_backend()
    if requested == "reference":
        return "reference", "OODKERNELS_BACKEND=reference"
    cuda = device.type == "cuda" or (_CUDA_STAND_IN[0] and device.type == "cpu")
    if requested == "triton" or (requested == "auto" and cuda):
        if not _TRITON_REGISTERED:
            if requested == "triton":
                raise RuntimeError(
                    f"OODKERNELS_BACKEND=triton but triton is not installed ({name} on a {device.type} tensor; "
                    "setup.py installs it on Linux only); use OODKERNELS_BACKEND=auto, cpp or reference"
                )
            return "reference", "triton is not installed"
        if not cuda and not triton_interpreting():
            if requested == "triton":
                raise RuntimeError(
                    f"OODKERNELS_BACKEND=triton: {name} got a {device.type} tensor; Triton needs a CUDA device "
                    "or TRITON_INTERPRET=1"
                )
        elif name in _KERNELS["triton"]:
            return "triton", "fused Triton kernel"
        return "reference", "no Triton kernel for this operation yet"
    if requested == "cpp" or (requested == "auto" and not cuda):
        if device.type != "cpu":
            if requested == "cpp":
                raise RuntimeError(
                    f"OODKERNELS_BACKEND=cpp: {name} got a {device.type} tensor; the C++ backend is CPU-only"
                )
            return "reference", f"no fused backend for {device.type} tensors"
        if name not in _KERNELS["cpp"]:
            return "reference", "no C++ kernel for this operation yet"
        if _cpp.available():
            return "cpp", "fused C++ kernel"
        if requested == "cpp":
            raise RuntimeError(f"OODKERNELS_BACKEND=cpp but the C++ extension is unavailable: {_cpp.status()}")
        return "reference", f"C++ extension unavailable: {_cpp.status()}"
    return "reference", f"no fused backend for {device.type} tensors"


#: the row family's operations share their custom ops, so one of them stands for the family
ROW_FAMILY_OPERATION = "cross_entropy"


def row_ops_backend(device: torch.device) -> str:
    """Which implementation the row family's custom ops run for tensors on ``device``: 'cpp' (the csrc
    operators) where :func:`select_backend` picks the C++ backend, else 'triton' (the launchers)."""
    backend, _ = select_backend(ROW_FAMILY_OPERATION, device)
    return "cpp" if backend == "cpp" else "triton"


def implementation(name: str, device: torch.device) -> Callable:
    """The function that runs operation ``name`` for tensors on ``device``."""
    backend, _ = select_backend(name, device)
    return REFERENCE[name] if backend == "reference" else _KERNELS[backend][name]


def _first_device(args, kwargs) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def _dispatched(name: str) -> Callable:
    reference_fn = REFERENCE[name]

    @functools.wraps(reference_fn)
    def call(*args, **kwargs):
        return implementation(name, _first_device(args, kwargs))(*args, **kwargs)

    return call


#: whether triton was found at import, so that the Triton backend is registered
_TRITON_REGISTERED = _register_fused_families()

cross_entropy = _dispatched("cross_entropy")
background_class_loss = _dispatched("background_class_loss")
outlier_exposure_loss = _dispatched("outlier_exposure_loss")
entropic_open_set_loss = _dispatched("entropic_open_set_loss")
energy_regularized_loss = _dispatched("energy_regularized_loss")
confidence_penalty_loss = _dispatched("confidence_penalty_loss")
margin_confidence_loss = _dispatched("margin_confidence_loss")
logit_norm_loss = _dispatched("logit_norm_loss")
confidence_loss = _dispatched("confidence_loss")
objectosphere_loss = _dispatched("objectosphere_loss")
vos_reg_loss = _dispatched("vos_reg_loss")
pairwise_distances = _dispatched("pairwise_distances")
sq_distances = _dispatched("sq_distances")
assigned_sq_distances = _dispatched("assigned_sq_distances")
pairwise_sq_distances = _dispatched("pairwise_sq_distances")
center_loss = _dispatched("center_loss")
cac_loss = _dispatched("cac_loss")
mchad_loss = _dispatched("mchad_loss")
cac_distance_loss = _dispatched("cac_distance_loss")
center_distance_loss = _dispatched("center_distance_loss")
mchad_distance_loss = _dispatched("mchad_distance_loss")
energy_score = _dispatched("energy_score")
max_softmax_score = _dispatched("max_softmax_score")
max_logit_score = _dispatched("max_logit_score")
entropy_score = _dispatched("entropy_score")
weighted_energy_score = _dispatched("weighted_energy_score")
ce_and_energy = _dispatched("ce_and_energy")
paired_outlier_exposure = _dispatched("paired_outlier_exposure")
paired_energy_margin = _dispatched("paired_energy_margin")


class BackendInfo(dict):
    """What runs where; a dict that prints as a readable report."""

    def __str__(self) -> str:
        lines = [
            f"oodkernels {self['version']}  (OODKERNELS_BACKEND={self['requested']})",
            f"  torch   {self['torch']}, CUDA device: {self['cuda_device'] or 'none'}",
            f"  triton  {self['triton']}",
            f"  cpp     {self['cpp']}",
            "  operation                    cpu tensors    cuda tensors",
        ]
        for name, where in self["operations"].items():
            lines.append(f"  {name:<28} {where['cpu']:<14} {where['cuda']}")
        lines.append(f"  criteria (oodkernels.loss): {self['criteria']}")
        return "\n".join(lines)


def backend_info() -> BackendInfo:
    """Report, honestly, which backend runs each operation on CPU and on CUDA tensors, and why.

    Nothing is built or launched, except that the C++ extension is located (and built if it has
    sources and has not been tried) so that the answer for CPU tensors is the true one.
    """
    cuda_device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    operations = {}
    for name in REFERENCE:
        where = {}
        for device in ("cpu", "cuda"):
            try:
                backend, reason = select_backend(name, torch.device(device))
                where[device] = backend
            except RuntimeError as exc:
                where[device] = f"error: {exc}"
        operations[name] = where
    return BackendInfo(
        version=__version__,
        requested=config.requested_backend(),
        torch=torch.__version__,
        cuda_device=cuda_device,
        triton=triton_status(),
        cpp=_cpp.status() if not _cpp.sources() else ("available" if _cpp.available() else _cpp.status()),
        operations=operations,
        criteria=CRITERIA_BACKEND,
    )
