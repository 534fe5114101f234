"""Re-run a reference test module of the row criteria on the fused Triton path.

The row-criterion test modules bind ``L = oodkernels.reference.logits`` and call every criterion as
``L.<Name>``. :func:`rerun` loads such a module afresh, binds ``L`` to a namespace in which the
criteria and functional forms are the public, dispatched ones (``oodkernels.loss`` /
``oodkernels.functional``) and everything else (prepare_rows, constants, private helpers the tests
use) is the reference's, and hands back its tests and fixtures for a test file to export. With
``OODKERNELS_BACKEND=triton`` set by an autouse fixture, every criterion call runs the kernels.
"""

import importlib.util
import pathlib
import types

import pytest
import torch
from _pytest.fixtures import FixtureFunctionDefinition

import oodkernels as ok
from oodkernels.reference import logits as reference_logits

CRITERIA = (
    "CrossEntropyLoss",
    "BackgroundClassLoss",
    "OutlierExposureLoss",
    "EntropicOpenSetLoss",
    "EnergyRegularizedLoss",
    "ConfidencePenaltyLoss",
    "MarginConfidenceLoss",
    "LogitNorm",
)
FUNCTIONS = (
    "cross_entropy",
    "background_class_loss",
    "outlier_exposure_loss",
    "entropic_open_set_loss",
    "energy_regularized_loss",
    "confidence_penalty_loss",
    "margin_confidence_loss",
    "logit_norm_loss",
)


def fused_namespace() -> types.ModuleType:
    namespace = types.ModuleType("fused_row_criteria")
    namespace.__dict__.update(vars(reference_logits))
    for name in CRITERIA:
        setattr(namespace, name, getattr(ok.loss, name))
    for name in FUNCTIONS:
        setattr(namespace, name, getattr(ok.functional, name))
    return namespace


def rerun(test_file: str) -> dict:
    path = pathlib.Path(__file__).with_name(test_file)
    spec = importlib.util.spec_from_file_location(f"fused_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.L = fused_namespace()
    exported = {}
    for key, value in vars(module).items():
        if key.startswith("test_") or isinstance(value, FixtureFunctionDefinition):
            exported[key] = value
    marks = getattr(module, "pytestmark", [])
    marks = list(marks) if isinstance(marks, (list, tuple)) else [marks]
    # these suites build CPU tensors: they exercise the kernels through the interpreter; on a GPU machine
    # the kernels are compiled for CUDA and tests/test_fused_rows.py runs them natively
    marks.append(pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-interpreter re-run; see test_fused_rows"))
    exported["pytestmark"] = marks
    return exported


@pytest.fixture(autouse=True)
def fused_backend(monkeypatch):
    monkeypatch.setenv("OODKERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
