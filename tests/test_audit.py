"""The GPU audit without a GPU (bench/audit.py, bench/compile_audit.py, bench/ledger.py).

The compiles run in subprocesses without TRITON_INTERPRET (conftest.py turns the interpreter on for this
process, and a kernel defined under it cannot be compiled): tests/_audit_probe.py compiles the kernels of
tests/_audit_kernels.py for sm_90 and runs a known sequence under the ledger; the CLI runs one small case.
"""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

pytest.importorskip("triton")

from bench import audit  # noqa: E402
from bench import compile_audit  # noqa: E402

SUMMARY = re.compile(
    r"^audit: (\d+) kernels compiled for sm_(\d+), (\d+) spilling, (\d+) over 128 registers; "
    r"ledger: worst (\d+) launches, worst (\d+\.\d\d)x minimum bytes$"
)


def _python(script: Path, *args, interpret: bool = False):
    """Run ``script`` with this Python, without the Triton interpreter unless ``interpret``."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def probe():
    done = _python(TESTS / "_audit_probe.py", 90)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_driver_compiles_a_known_kernel_and_reads_plausible_facts(probe):
    facts = probe["aligned"]
    assert facts["kernel"] == "scale_copy" and facts["arch"] == 90 and facts["num_warps"] == 4
    assert 8 <= facts["registers"] <= 64
    assert facts["spill_stores"] == facts["spill_loads"] == facts["stack"] == facts["local"] == 0
    # 1024 fp32 over 128 threads, 16-byte aligned: every access is a 128-bit vector
    assert facts["ldg"] == {"128": 2} and facts["stg"] == {"128": 2}
    assert facts["occupancy"] == 1.0 and facts["blocks_per_sm"] == 16
    assert facts["mma"] == {}
    assert facts["reads"] == ["X"] and facts["writes"] == ["Y"]
    assert probe["launch_count"] == 3


def test_the_specialisation_follows_the_arguments_alignment(probe):
    facts = probe["misaligned"]
    assert set(facts["ldg"]) == {"32"} and set(facts["stg"]) == {"32"}  # 4 bytes off: scalar accesses only
    assert "div16=(X, Y, n)" in probe["labels"][0] and "div16=()" in probe["labels"][1]


def test_a_kernel_made_to_spill_is_reported_as_spilling(probe):
    facts = probe["spilling"]
    assert facts["registers"] == 255
    assert facts["spill_stores"] > 0 and facts["spill_loads"] > 0 and facts["ldl"] > 0 and facts["stl"] > 0
    rows = [
        {"family": "rows", "registers": facts["registers"], "spill_stores": facts["spill_stores"]},
        {"family": "rows", "registers": probe["aligned"]["registers"], "spill_stores": 0},
    ]
    line = audit.summary_line(90, rows, [])
    assert SUMMARY.match(line).groups()[:4] == ("2", "90", "1", "1")


def test_a_gpu_only_compile_error_fails_the_audit_with_the_kernels_name(probe):
    assert probe["broken"] is not None
    assert "failed to compile for sm_90" in probe["broken"]
    assert "loop_type_change[] num_warps=4" in probe["broken"]
    assert "Loop-carried variable acc" in probe["broken"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's side of the contrast")
def test_the_broken_kernel_runs_in_the_interpreter():
    """So the test suite alone (interpreted) cannot catch it: only the compile audit does."""
    import torch

    sys.path.insert(0, str(TESTS))
    import _audit_kernels

    x = torch.arange(16, dtype=torch.float32)
    y = torch.zeros(1)
    _audit_kernels.loop_type_change[(1,)](x, y, 16)
    assert y.item() == 120.0


def test_the_ledger_counts_a_known_sequence_exactly(probe):
    summary = probe["ledger"]
    assert summary["ops"] == "fwd:aten::zeros fwd:aten::add fwd:aten::sum fwd:scale_copy"
    assert summary["launches_fwd"] == 4 and summary["launches_bwd"] == 0 and summary["triton_launches"] == 1
    assert summary["bytes_read"] == 4000 + 4000 + 4000  # add, sum, the kernel's load of b
    assert summary["bytes_written"] == 4000 + 4000 + 4 + 4000  # zeros, add, sum, the kernel's store to e
    assert summary["host_reads"] == 2  # item(), tolist()
    kinds = [e[0] for e in probe["ledger_entries"]]
    assert kinds == ["aten", "aten", "aten", "triton", "d2h", "d2h"]


def test_occupancy_follows_the_occupancy_calculator():
    assert compile_audit.occupancy(90, 255, 8, 0) == (1, 0.125)  # 8192 registers per warp: 8 warps fit
    assert compile_audit.occupancy(90, 32, 4, 0) == (16, 1.0)
    assert compile_audit.occupancy(80, 64, 4, 0) == (8, 0.5)
    assert compile_audit.occupancy(80, 32, 4, 100 * 1024) == (1, 4 / 64)  # shared memory bound
    assert compile_audit.occupancy(90, 40, 4, 0) == (12, 0.75)  # 40 registers: 1280 per warp, 51 warps


def test_sass_access_widths_and_ptxas_log():
    assert compile_audit.access_bits("LDG.E.128.CONSTANT") == 128
    assert compile_audit.access_bits("LDG.E.U16") == 16
    assert compile_audit.access_bits("LDG.E.64") == 64
    assert compile_audit.access_bits("STG.E") == 32
    assert compile_audit.access_bits("LDG.E.S8") == 8
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    8 bytes stack frame, 16 bytes spill stores, 24 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers\n"
    )
    assert compile_audit.parse_ptxas_log(log, "k") == {
        "registers": 255,
        "stack": 8,
        "spill_stores": 16,
        "spill_loads": 24,
    }
    assert compile_audit.parse_ptxas_log(log, "other") is None


def test_pointer_access_follows_the_data_flow():
    ttir = (
        "  tt.func public @k(%X: !tt.ptr<f32> {tt.divisibility = 16 : i32} loc(1), %I: !tt.ptr<i64> loc(2), "
        "%O: !tt.ptr<f32> loc(3), %n: i32 loc(4)) {\n"
        "    %0 = tt.splat %I : !tt.ptr<i64> -> tensor<4x!tt.ptr<i64>> loc(5)\n"
        "    %idx = tt.load %0 : tensor<4x!tt.ptr<i64>> loc(6)\n"
        "    %1 = tt.splat %X : !tt.ptr<f32> -> tensor<4x!tt.ptr<f32>> loc(7)\n"
        "    %2 = tt.addptr %1, %idx : tensor<4x!tt.ptr<f32>>, tensor<4xi64> loc(8)\n"
        "    %v = tt.load %2 : tensor<4x!tt.ptr<f32>> loc(9)\n"
        "    %3 = tt.splat %O : !tt.ptr<f32> -> tensor<4x!tt.ptr<f32>> loc(10)\n"
        "    %4 = tt.addptr %3, %idx : tensor<4x!tt.ptr<f32>>, tensor<4xi64> loc(11)\n"
        "    tt.store %4, %v : tensor<4x!tt.ptr<f32>> loc(12)\n"
    )
    # a gather and a scatter through loaded indices: I is read, never written
    assert compile_audit.pointer_access(ttir) == ({"X", "I"}, {"O"})


def test_quick_selection_covers_every_family_and_dtype():
    quick = audit.quick_cases()
    for family in ("rows", "scores", "centers"):
        dtypes = {c.case.dtype for c in quick if c.family == family}
        assert {"fp32", "bf16"} <= dtypes, family
    assert {c.case.dtype for c in quick if c.family == "rows"} == {"fp32", "bf16", "fp16", "fp64"}
    assert {c.case.dtype for c in quick if c.family == "centers"} == {"fp32", "bf16", "fp16", "fp64"}
    assert any(c.native_centers for c in quick)
    assert any(c.case.memory_format == "channels_last" for c in quick)
    assert len({c.name for c in quick}) == len(quick)


def test_minimum_bytes_of_a_row_case():
    import torch

    from bench import cases as registry

    case = registry.row_case("t", "CrossEntropyLoss", (8, 5), "bf16")
    logits = torch.zeros(8, 5, dtype=torch.bfloat16)
    targets = torch.zeros(8, dtype=torch.int64)
    assert audit.minimum_bytes(case, logits, targets, None) == 3 * 8 * 5 * 2 + 2 * 8 * 8


def test_the_cli_audits_a_case_and_ends_with_the_summary(tmp_path):
    args = ["--quick", "--arch", "90", "--filter", "^audit/CrossEntropyLoss/4096x100/fp32$", "--out", tmp_path]
    done = _python(REPO / "bench" / "audit.py", *args, "--no-liger", "--no-readme")
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    match = SUMMARY.match(last)
    assert match, last
    assert match.group(1) == "3" and match.group(2) == "90"  # the row forward, combine and backward kernels
    rows = list(csv.DictReader(open(next(tmp_path.glob("audit-sm90_*.csv")))))
    kernels = [r for r in rows if r["record"] == "kernel"]
    ledger = [r for r in rows if r["record"] == "ledger"]
    assert {r["kernel"] for r in kernels} == {"_row_loss_fwd_kernel", "_row_combine_kernel", "_row_loss_bwd_kernel"}
    assert all(int(r["registers"]) > 0 and r["arch"] == "sm_90" for r in kernels)
    assert len(ledger) == 1 and ledger[0]["first_case"] == "audit/CrossEntropyLoss/4096x100/fp32"
    assert int(ledger[0]["triton_launches"]) == 3
    assert int(ledger[0]["host_reads_checks_off"]) == 0 and int(ledger[0]["host_reads_checks_on"]) == 1
    assert int(match.group(5)) == int(ledger[0]["launches"])


def test_the_cli_rejects_the_interpreter_and_unknown_archs():
    done = _python(REPO / "bench" / "audit.py", "--quick", interpret=True)
    assert done.returncode == 2 and "unset TRITON_INTERPRET" in done.stderr
    with pytest.raises(ValueError, match="--arch"):
        compile_audit.parse_archs("75")
    assert compile_audit.parse_archs("sm_90, 80") == [90, 80]
