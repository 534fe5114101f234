"""The public API skeleton (SPEC §2): namespaces, the backend switch and backend_info."""

import inspect
import subprocess
import sys
import warnings

import pytest
import torch

import oodkernels as ok
from oodkernels import ops
from oodkernels import reference
from oodkernels import testing


@pytest.mark.parametrize("name", reference.CRITERIA)
def test_every_criterion_is_exported_at_top_level_and_in_loss(name):
    assert getattr(ok, name) is getattr(ok.loss, name)
    assert issubclass(getattr(ok.loss, name), torch.nn.Module)
    assert name in ok.__all__ and name in ok.loss.__all__
    info = getattr(ok.loss, name).info
    assert info.tasks and info.inputs and isinstance(info.supervised, bool)


def test_the_seventeen_pytorch_ood_criteria_and_ours_are_all_there():
    ours = {"ConfidencePenaltyLoss", "MarginConfidenceLoss"}
    assert len(set(reference.CRITERIA) - ours) == 17
    assert ours <= set(reference.CRITERIA)
    assert callable(ok.loss.logit_norm_loss)


@pytest.mark.parametrize("namespace", [ok, ok.loss, ok.reference])
def test_renamed_deep_sad_alias_warns(namespace):
    with pytest.warns(DeprecationWarning, match="SSDeepSVDDLoss was renamed to DeepSADLoss"):
        cls = namespace.SSDeepSVDDLoss
    assert cls is namespace.DeepSADLoss  # the fused subclass in ok / ok.loss, the reference class in ok.reference
    with pytest.raises(AttributeError, match="NoSuchLoss"):
        namespace.NoSuchLoss  # noqa: B018


def test_model_and_utils_namespaces():
    assert ok.model.ClassCenters is reference.ClassCenters
    assert ok.model.RunningCenters is reference.RunningCenters
    for name in ok.utils.__all__:
        assert callable(getattr(ok.utils, name))
    y = torch.tensor([0, -1, 2])
    assert ok.utils.is_known(y).tolist() == [True, False, True]
    assert ok.utils.contains_unknown(y).dim() == 0 and bool(ok.utils.contains_unknown(y))
    assert bool(ok.utils.contains_known_and_unknown(y))
    assert not bool(ok.utils.contains_known_and_unknown(y.clamp(min=0)))


def test_drop_unknown_utility():
    y = torch.tensor([0, -1, 2])
    x = torch.arange(6.0).reshape(3, 2)
    with pytest.warns(
        UserWarning, match=r"^Discarding samples with targets < 0 \(OOD\), which this loss does not use\.$"
    ):
        y2, x2 = ok.utils.drop_unknown(y, x)
    assert y2.tolist() == [0, 2] and x2.tolist() == [[0.0, 1.0], [4.0, 5.0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y3, x3 = ok.utils.drop_unknown(y.clamp(min=0), x)
    assert x3 is x  # no copy when nothing is dropped
    with pytest.raises(ValueError, match=r"Expected targets of shape B, got \(3, 1\)"):
        ok.utils.drop_unknown(y.reshape(3, 1))


@pytest.mark.parametrize("name", ok.functional.__all__)
def test_functional_keeps_the_reference_signature(name):
    public = getattr(ok.functional, name)
    assert inspect.signature(public) == inspect.signature(ops.REFERENCE[name])
    assert public.__doc__ == ops.REFERENCE[name].__doc__


def test_functional_and_scores_compute_the_reference_values():
    logits = torch.randn(6, 4, dtype=torch.float64)
    targets = torch.tensor([0, 1, -1, 3, -2, 2])
    for fn, ref in [
        (ok.functional.outlier_exposure_loss, reference.outlier_exposure_loss),
        (ok.functional.energy_regularized_loss, reference.energy_regularized_loss),
        (ok.functional.cross_entropy, reference.cross_entropy),
    ]:
        # on CPU in auto these run the C++ kernels when the extension is built: equal up to rounding
        testing.assert_close(fn(logits, targets), ref(logits, targets))
    seg = torch.randn(2, 4, 3, 5)
    testing.assert_close(ok.scores.energy(seg, t=2.0), reference.scores.energy(seg, t=2.0))
    assert ok.scores.max_logit(seg).shape == (2, 3, 5)


# ----------------------------------------------------------------------------------------------
# backend selection
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def stand_in_kernels(monkeypatch):
    """Register recording stand-ins for cross_entropy in both fused backends (restored afterwards)."""
    calls = []

    def make(backend):
        def kernel(logits, targets, reduction="mean"):
            calls.append(backend)
            return reference.cross_entropy(logits, targets, reduction)

        return kernel

    monkeypatch.setattr(ops, "_KERNELS", {"triton": {}, "cpp": {}})
    ops.register_kernel("triton", "cross_entropy", make("triton"))
    ops.register_kernel("cpp", "cross_entropy", make("cpp"))
    return calls


def _call_cross_entropy():
    return ok.functional.cross_entropy(torch.randn(3, 2), torch.tensor([0, 1, 1]))


def test_forced_triton_serves_cpu_tensors_under_the_interpreter(monkeypatch, stand_in_kernels):
    monkeypatch.setenv("OODKERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _call_cross_entropy()
    assert stand_in_kernels == ["triton"]
    assert ops.select_backend("cross_entropy", torch.device("cpu"))[0] == "triton"
    # an operation without a Triton kernel runs the reference, and says why
    assert ops.select_backend("entropy_score", torch.device("cpu")) == (
        "reference",
        "no Triton kernel for this operation yet",
    )


def test_forced_triton_on_cpu_without_the_interpreter_is_an_error(monkeypatch, stand_in_kernels):
    monkeypatch.setenv("OODKERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="OODKERNELS_BACKEND=triton.*CUDA device or TRITON_INTERPRET=1"):
        _call_cross_entropy()
    assert stand_in_kernels == []


def test_reference_backend_ignores_registered_kernels(monkeypatch, stand_in_kernels):
    monkeypatch.setenv("OODKERNELS_BACKEND", "reference")
    _call_cross_entropy()
    assert stand_in_kernels == []
    assert ops.select_backend("cross_entropy", torch.device("cuda")) == ("reference", "OODKERNELS_BACKEND=reference")


def test_auto_uses_cpp_only_when_the_extension_is_available(monkeypatch, stand_in_kernels):
    monkeypatch.setenv("OODKERNELS_BACKEND", "auto")
    monkeypatch.setattr(ops._cpp, "available", lambda: False)
    _call_cross_entropy()
    assert stand_in_kernels == []
    backend, reason = ops.select_backend("cross_entropy", torch.device("cpu"))
    assert backend == "reference" and reason.startswith("C++ extension unavailable")
    monkeypatch.setattr(ops._cpp, "available", lambda: True)
    _call_cross_entropy()
    assert stand_in_kernels == ["cpp"]
    # CUDA tensors in auto go to Triton
    assert ops.select_backend("cross_entropy", torch.device("cuda"))[0] == "triton"


def test_forced_cpp_without_the_extension_is_an_error(monkeypatch, stand_in_kernels):
    monkeypatch.setenv("OODKERNELS_BACKEND", "cpp")
    monkeypatch.setattr(ops._cpp, "available", lambda: False)
    with pytest.raises(RuntimeError, match="OODKERNELS_BACKEND=cpp but the C\\+\\+ extension is unavailable"):
        _call_cross_entropy()
    with pytest.raises(RuntimeError, match="the C\\+\\+ backend is CPU-only"):
        ops.select_backend("cross_entropy", torch.device("cuda"))


def test_unknown_backend_names_the_variable(monkeypatch):
    monkeypatch.setenv("OODKERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="OODKERNELS_BACKEND: expected one of auto, triton, cpp, reference"):
        _call_cross_entropy()


def test_register_kernel_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend"):
        ops.register_kernel("cuda", "cross_entropy", lambda *a: None)
    with pytest.raises(ValueError, match="name"):
        ops.register_kernel("triton", "no_such_op", lambda *a: None)


def test_backend_info_reports_every_operation_honestly():
    info = ok.backend_info()
    assert info["version"] == ok.__version__
    assert set(info["operations"]) == set(ops.REFERENCE)
    # auto: CPU tensors run the C++ kernels where csrc/ implements the operation and the extension is
    # built, else the reference; CUDA tensors the Triton kernels where they exist (row and center families)
    from oodkernels import _cpp
    from oodkernels.ops import centers
    from oodkernels.ops import rows

    cpu_fused = "cpp" if _cpp.available() else "reference"
    for name, where in info["operations"].items():
        assert where["cpu"] == (cpu_fused if name in ops.CPP_OPERATIONS else "reference"), name
        assert where["cuda"] == ("triton" if name in rows.FUSED or name in centers.FUSED else "reference"), name
    assert "run the operations above" in info["criteria"]
    text = str(info)
    for name in ops.REFERENCE:
        assert name in text


def test_python_m_oodkernels_prints_the_report():
    result = subprocess.run([sys.executable, "-m", "oodkernels"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    from oodkernels import _cpp

    # the CPU column names the backend that really runs: the C++ kernels when the extension loads
    line = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["energy_regularized_loss"])
    assert line.split()[1] == ("cpp" if _cpp.available() else "reference"), line
