"""Smoke test of the benchmark harness (bench/run.py, bench/cases.py) on a tiny CPU case.

The runner refuses the Triton interpreter, which conftest.py turns on for this process, so the CLI runs in a
subprocess without TRITON_INTERPRET. No timing is asserted: only the CSV's shape and that the derived
columns are finite.
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "bench" / "run.py"
TINY = "^rows/EnergyRegularizedLoss/256x10/fp32$"


def _env_without_interpreter():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _run(args, env, timeout=120):
    return subprocess.run(
        [sys.executable, str(RUN), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_registry_has_the_issue_cases():
    sys.path.insert(0, str(REPO))
    try:
        from bench import cases
    finally:
        sys.path.remove(str(REPO))
    tiny = cases.get("rows/EnergyRegularizedLoss/256x10/fp32")
    assert tiny.family == "rows" and tiny.shape == (256, 10) and tiny.quick
    assert cases.get("rows/BackgroundClassLoss/65536x1000/bf16").hparams == {"n_classes": 999}
    assert cases.get("rows/CrossEntropyLoss/8x19x512x1024/bf16").rows == 8 * 512 * 1024
    assert "rows/LogitNorm/8x19x512x1024/bf16" not in cases.CASES  # classification only
    assert len(cases.select(pattern="^sweep_b/", family="rows")) == 2 * 15
    assert len(cases.select(pattern="^sweep_c/")) == 2 * 6
    scores = {"energy", "max_softmax", "max_logit", "entropy", "weighted_energy"}
    assert {c.criterion for c in cases.select(family="scores")} == scores
    # issue #5: the new scores at segmentation scale, bf16 and fp32
    for name in ("weighted_energy", "entropy_exact"):
        for dtype in ("bf16", "fp32"):
            case = cases.get(f"scores5/{name}/8x19x512x1024/{dtype}")
            assert case.family == "scores" and case.shape == (8, 19, 512, 1024)
    assert cases.get("scores5/entropy_exact/8x19x512x1024/bf16").hparams == {"clip": False}
    # issue #5: one VOS-synthesis step at C = 100, D = 128, sample_number = 1000 (queues full)
    (vos,) = cases.select(family="vos")
    assert vos.shape == (128, 100) and vos.hparams == {"n_dim": 128, "sample_number": 1000}
    assert vos.resolved_hparams()["sample_from"] == 10000 and vos.resolved_hparams()["n_dim"] == 128
    assert vos.bytes_model("full") > 2 * 100 * 1000 * 128 * 4
    # issue #4: the center family, every criterion at (65536, 512) x 1000 fp32/bf16 and (4096, 128) x 100
    centers = cases.select(family="centers")
    assert {c.criterion for c in centers} == set(cases.CENTER_CRITERIA)
    mchad = cases.get("centers/MCHADLoss/65536x1000x512/bf16")
    assert mchad.shape == (65536, 512) and mchad.hparams == {"n_classes": 1000, "n_dim": 512}
    assert cases.get("centers/CACLoss/4096x100x100/fp32").quick
    assert mchad.bytes_model("full") > mchad.bytes_model("fwd") > 65536 * 512 * 2
    # issue #14: the CPU cut of the large shape, and the FLOP model of the FLOP roofline: the distance GEMM
    # forward, the two gradient GEMMs backward (no recompute of the distances)
    cut = cases.get("centers/CenterLoss/4096x1000x512/fp32")
    assert cut.flops_model("fwd") == 2 * 4096 * 1000 * 512 and cut.flops_model("full") == 6 * 4096 * 1000 * 512
    assert cases.get("centers/IILoss/4096x1000x512/fp32").flops_model("full") == 6 * 1000**2 * 512 + 10 * 4096 * 512
    assert tiny.flops_model("full") == 0
    # §1.5 byte model: full step of fp32 (R, C) = 12 B per logit plus per-row terms
    r, c = tiny.rows, tiny.classes
    assert tiny.bytes_model("full") == 12 * r * c + r * (2 * 8 + 2 * 4 * tiny.stats_per_row)


def test_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = _run(["--device", "cpu", "--filter", TINY], env, timeout=60)
    assert proc.returncode == 2
    assert "interpreter" in proc.stderr


def test_cli_smoke_on_cpu(tmp_path):
    proc = _run(
        [
            "--device", "cpu",
            "--filter", TINY,
            "--providers", "reference,oodkernels",
            "--modes", "full",
            "--out", str(tmp_path),
            "--overwrite",
            "--min-run-time", "0.01",
            "--warmup", "1",
            "--threads", "1",
        ],
        _env_without_interpreter(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rows/EnergyRegularizedLoss/256x10/fp32" in proc.stdout

    files = list(tmp_path.glob("cpu-*_*.csv"))
    assert len(files) == 1, files
    with open(files[0], newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    sys.path.insert(0, str(REPO))
    try:
        from bench.run import COLUMNS
    finally:
        sys.path.remove(str(REPO))
    assert header == COLUMNS
    for column in (
        "case",
        "provider",
        "backend",
        "mode",
        "metric",
        "unit",
        "p50",
        "p20",
        "p80",
        "config_json",
        "git_commit",
        "max_abs_err",
        "speedup_vs_reference",
        "speedup_vs_reference_compiled",
    ):
        assert column in header

    times = [r for r in rows if r["metric"] == "time"]
    assert {r["provider"] for r in times} == {"reference", "oodkernels"}
    for r in times:
        assert r["case"] == "rows/EnergyRegularizedLoss/256x10/fp32" and r["mode"] == "full" and r["unit"] == "ms"
        p20, p50, p80 = float(r["p20"]), float(r["p50"]), float(r["p80"])
        assert 0 < p20 <= p50 <= p80
        assert math.isfinite(float(r["speedup_vs_reference"])) and float(r["speedup_vs_reference"]) > 0
        assert r["speedup_vs_reference_compiled"] == ""  # provider not run
        assert math.isfinite(float(r["max_abs_err"])) and float(r["max_abs_err"]) < 1e-3
        config = json.loads(r["config_json"])
        assert config["dtype"] == "fp32" and config["shape"] == [256, 10] and config["reduction"] == "mean"
        assert config["hparams"]["alpha"] == 0.1
    reference = next(r for r in times if r["provider"] == "reference")
    assert float(reference["speedup_vs_reference"]) == pytest.approx(1.0)
    assert {r["metric"] for r in rows if r["case"] != "_device/copy"} >= {"time", "bandwidth", "peak_memory"}
    assert all(r["p50"] == "" for r in rows if r["metric"] == "peak_memory")  # NaN on CPU


def test_vos_step_providers_run_from_full_queues():
    """The VOS-synthesis case's providers start from full queues, so one step already synthesises outliers."""
    import torch

    sys.path.insert(0, str(REPO))
    try:
        from bench import cases
        from bench import run
    finally:
        sys.path.remove(str(REPO))
    case = cases.vos_case(8, 3, 4, 5)
    logits, targets = run.make_inputs(case, torch.device("cpu"))
    assert bool((targets >= 0).all())  # all-ID labels: every row enters the queues and the regulariser
    values = {}
    for provider in ("reference", "oodkernels"):
        fn = run.build_provider(provider, case, None)
        x = logits.detach().requires_grad_(True)
        torch.manual_seed(1)
        loss = fn(x, targets)
        loss.backward()
        assert loss.dim() == 0 and torch.isfinite(loss) and torch.isfinite(x.grad).all()
        values[provider] = float(loss.detach())
        # full queues: the step adds alpha * reg (the energy regulariser over the synthesised outliers) to the CE
        ce = torch.nn.functional.cross_entropy(logits, targets)
        assert abs(float(loss.detach()) - float(ce)) > 1e-4
    # the same seed-0 state and the same draws: the two providers compute the same step
    assert abs(values["reference"] - values["oodkernels"]) < 1e-5
    with pytest.raises(run.Unavailable):
        run.build_provider("reference-compiled", case, None)
