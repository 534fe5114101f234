#!/usr/bin/env python
"""GPU audit without a GPU: every Triton kernel of every benchmark step compiled for Hopper and Ampere, and a
ledger of every launch and byte of the step.

    python bench/audit.py                      # every benchmark case, sm_90 and sm_80, results + README section
    python bench/audit.py --quick --arch 90    # CI: a few shapes per family, every dtype; results not written
    python bench/audit.py --filter '^rows/CrossEntropyLoss/' --arch 90,80

For each case (``bench/cases.py``) the CUDA training step (forward + backward; forward for the scores) of
``bench/run.py``'s ``oodkernels`` provider runs on CPU tensors standing in for CUDA ones
(``oodkernels.ops.cuda_stand_in``: every dispatch decision takes its CUDA branch, native bf16/fp16 ``tl.dot``,
no interpreter upcast). Triton's launches go to the compile-only driver of ``bench/compile_audit.py``, which
records the exact specialisation the JIT would build; each distinct specialisation is compiled for the arch
and its cubin read (registers, spills, local and shared memory, occupancy, global load/store widths,
tensor-core instructions). A specialisation that does not compile for a GPU stops the audit with the kernel
and its constexprs named (exit status 1).

The same step runs inside the traffic ledger (``bench/ledger.py``): every launch (Triton kernels and every
non-view ATen op) with the bytes it reads and writes, against the case's minimum (:func:`minimum_bytes`), and
every device-to-host read, with ``oodkernels.config.data_checks`` off and on.

With liger-kernel installed (``pip install -e ".[bench]"``), Liger's cross-entropy kernel goes through the same
compile audit at the shapes of our CrossEntropyLoss cases (2-D only: Liger takes (rows, classes)), and its rows
stand in the same tables as ``anchor`` rows.

Results: ``<out>/audit-sm90_<date>.csv`` (and sm80), one row per kernel specialisation (``record = kernel``)
and per ledger case (``record = ledger``); the README section between the audit markers is regenerated from
them (``--readme``, default for a full run). The budgets (:data:`BUDGETS`, SPEC §5) are printed; those marked
``asserted`` fail the run when missed. The last printed lines are the summaries, one per arch, the newest
(sm_90) last.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import datetime
import os
import re
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

README = REPO / "README.md"
RESULTS = REPO / "bench" / "results"
START = "<!-- audit-table:start -->"
END = "<!-- audit-table:end -->"

#: rows of the README tables per family and record (the CSV holds them all)
README_ROWS = 12

REGISTER_BUDGET = 128


@dataclasses.dataclass(frozen=True)
class Budget:
    """A GPU proxy of SPEC §5: ``metric`` of every row of ``family`` (budget dtypes only) within ``limit``.

    ``asserted``: the run fails when it is missed; otherwise it is reported. The row family's are asserted
    (issue #13), and the centers' spills (issue #14).
    """

    family: str  # "rows", "scores" (ledger only) or "centers"
    metric: str  # "spill_bytes", "registers", "launches", "bytes_ratio"
    limit: float
    asserted: bool = False

    def describe(self) -> str:
        unit = {
            "spill_bytes": "spilled bytes",
            "registers": "registers",
            "launches": "launches per step",
            "bytes_ratio": "x minimum bytes",
        }[self.metric]
        return f"{self.family}: {unit} <= {self.limit:g}"


BUDGETS = (
    # issue #13 landed the row rebuild: its budgets fail the run
    Budget("rows", "spill_bytes", 0, asserted=True),
    Budget("rows", "registers", REGISTER_BUDGET, asserted=True),
    Budget("rows", "launches", 4, asserted=True),  # 1 forward + 1 backward, plus at most one tiny combine per pass
    Budget("rows", "bytes_ratio", 1.15, asserted=True),
    # the forward-only scores: reported (their fp32 scores are cast to a half output by a torch op)
    Budget("scores", "bytes_ratio", 1.15),
    # issue #14: every center specialisation spill-free on sm_90 and sm_80 (the distance backward split into a
    # light mask pass and a recompute of the flagged tiles only); the center registers are reported per kernel
    Budget("centers", "spill_bytes", 0, asserted=True),
)

#: the dtypes the register and spill budgets apply to (fp64 runs gradcheck-grade paths, not production)
BUDGET_DTYPES = ("fp32", "bf16", "fp16")

KERNEL_COLUMNS = [
    "record",
    "arch",
    "family",
    "kernel",
    "specialisation",
    "dtypes",
    "divisible_by_16",
    "num_warps",
    "num_stages",
    "registers",
    "spill_stores",
    "spill_loads",
    "stack",
    "local",
    "shared",
    "blocks_per_sm",
    "occupancy",
    "ldg",
    "stg",
    "widest_ldg_bits",
    "narrowest_ldg_bits",
    "ldl_stl",
    "mma",
    "cases",
    "first_case",
    "case_list",
]
LEDGER_COLUMNS = [
    "launches_fwd",
    "launches_bwd",
    "launches",
    "triton_launches",
    "bytes_read",
    "bytes_written",
    "bytes_min",
    "bytes_ratio",
    "host_reads_checks_off",
    "host_reads_checks_on",
    "ops",
]
META_COLUMNS = ["torch", "triton", "git_commit", "date"]
COLUMNS = KERNEL_COLUMNS + LEDGER_COLUMNS + META_COLUMNS


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AuditCase:
    """A benchmark case as the audit runs it; ``native_centers``: the center criterion's parameters are cast to
    the features' dtype (both operands bf16/fp16: the native tensor-core path), instead of the benchmark's fp32
    centers with half features (upcast)."""

    case: object
    native_centers: bool = False

    @property
    def name(self) -> str:
        return self.case.name + ("/native" if self.native_centers else "")

    @property
    def family(self) -> str:
        return self.case.family


def quick_cases() -> list:
    """CI's selection: a few shapes per family, every dtype (fp64 included: it must compile too)."""
    from bench import cases as registry

    out = []
    for criterion in registry.ROW_CRITERIA:
        for dtype in registry.DTYPES:
            out.append(registry.row_case("audit", criterion, (4096, 100), dtype))
    for criterion in registry.SEGMENTATION_CRITERIA:
        for fmt in ("contiguous", "channels_last"):
            out.append(registry.row_case("audit", criterion, (2, 19, 128, 256), "bf16", memory_format=fmt))
    out.append(registry.row_case("audit", "EnergyRegularizedLoss", (256, 32768), "bf16"))
    out.append(registry.row_case("audit", "CrossEntropyLoss", (256, 10), "fp32"))
    for score, hparams, suffix in (
        ("energy", {}, ""),
        ("max_softmax", {}, ""),
        ("max_logit", {}, ""),
        ("entropy", {}, ""),
        ("entropy", {"clip": False}, "_exact"),
        ("weighted_energy", {}, ""),
    ):
        for dtype in ("fp32", "bf16"):
            out.append(registry.score_case("audit", score, (4096, 100), dtype, hparams=hparams, suffix=suffix))
        out.append(registry.score_case("audit", score, (2, 19, 128, 256), "bf16", hparams=hparams, suffix=suffix))
    audit = [AuditCase(c) for c in out]
    for criterion in registry.CENTER_CRITERIA:
        for dtype in registry.DTYPES:
            case = registry.center_case("audit", criterion, 4096, 100, 128, dtype)
            audit.append(AuditCase(case))
            if dtype in ("bf16", "fp16"):
                audit.append(AuditCase(case, native_centers=True))
    return audit


def full_cases() -> list:
    """Every registered benchmark case, plus the native half-precision variant of every half center case."""
    from bench import cases as registry

    out = []
    for case in registry.CASES.values():
        out.append(AuditCase(case))
        if case.family == "centers" and case.dtype in ("bf16", "fp16"):
            out.append(AuditCase(case, native_centers=True))
    return out


def minimum_bytes(case, logits, targets, output) -> int:
    """The bytes a training step cannot avoid moving.

    rows (and the VOS step's rows): ``3 × logits + 2 × targets`` (forward reads both, backward reads both and
    writes the gradient); scores: the logits once plus the scores written; centers, features X (B, D), centers
    M (K, D), labels y and the (B, K) fp32 gradient G of the distances: the forward reads X, M and y, the
    backward reads them again to rebuild G, writes G and runs the two GEMMs ``G·M -> dX`` and ``Gᵀ·X -> dM``
    (reading G twice, M and X once more, writing dX and dM): ``3·(X + M) + 2·y + 3·G + dX + dM``.
    """
    from bench.ledger import tensor_bytes

    if case.family == "scores":
        return tensor_bytes(logits) + tensor_bytes(output)
    if case.family == "centers":
        k = int(case.hparams.get("n_classes", 1))
        x = tensor_bytes(logits)
        m = k * logits.shape[1] * logits.element_size()
        g = logits.shape[0] * k * 4
        return 3 * (x + m) + 2 * tensor_bytes(targets) + 3 * g + x + m
    return 3 * tensor_bytes(logits) + 2 * tensor_bytes(targets)


# ----------------------------------------------------------------------------------------------
# running a step
# ----------------------------------------------------------------------------------------------


def _provider(audit_case):
    """``fn(logits, targets)`` (``fn(logits)`` for scores): bench/run.py's oodkernels provider."""
    import torch

    from bench import run

    case = audit_case.case
    fn = run.build_provider("oodkernels", case, None)
    if not audit_case.native_centers:
        return fn
    import oodkernels

    torch.manual_seed(0)
    module = getattr(oodkernels.loss, case.criterion)(**run.criterion_kwargs(case)).to(run.torch_dtype(case.dtype))
    takes_distances = case.criterion in ("CACLoss", "CenterLoss", "MCHADLoss")
    return lambda z, y: module(module.distance(z), y) if takes_distances else module(z, y)


def run_step(audit_case, ledger=None, device="cpu"):
    """One step of the case (on CPU tensors: under the active recorder); returns ``(logits, targets, output)``."""
    import torch

    from bench import run

    case = audit_case.case
    fn = _provider(audit_case)
    logits, targets = run.make_inputs(case, torch.device(device))
    phase = ledger.during if ledger is not None else (lambda _: contextlib.nullcontext())
    ctx = ledger if ledger is not None else contextlib.nullcontext()
    if case.family == "scores":
        with ctx, phase("fwd"):
            out = fn(logits)
        return logits, targets, out
    x = logits.detach().requires_grad_(True)
    with ctx, phase("fwd"):
        out = fn(x, targets)
    seed = torch.ones_like(out)  # autograd's own seed of loss.backward(): outside the criterion's count
    with ctx, phase("bwd"):
        torch.autograd.backward(out, seed)
    return logits, targets, out


def liger_anchor_cases(selected) -> list:
    """The 2-D CrossEntropyLoss cases of the selection, where Liger's cross entropy runs at the same shape."""
    return [
        c
        for c in selected
        if c.case.criterion == "CrossEntropyLoss" and len(c.case.shape) == 2 and c.case.dtype in BUDGET_DTYPES
    ]


def run_liger(audit_case) -> None:
    """Liger's cross-entropy forward + backward at the case's shape and dtype (under the active recorder)."""
    import torch
    from liger_kernel.ops import cross_entropy as liger_ce

    from bench import run

    logits, targets = run.make_inputs(audit_case.case, torch.device("cpu"))
    # Liger asks torch for the GPU's architecture to pick Blackwell paths: this is a Hopper/Ampere audit
    with _patched(liger_ce, "infer_device_arch", lambda: "hopper"):
        x = logits.detach().requires_grad_(True)
        # ignore_index = -1: OOD rows drop out of the mean, as in our CrossEntropyLoss (every OOD label is -1 here)
        out = liger_ce.LigerCrossEntropyFunction.apply(x, targets, None, -1)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()


@contextlib.contextmanager
def _patched(module, name, value):
    saved = getattr(module, name, None)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


# ----------------------------------------------------------------------------------------------
# the audit
# ----------------------------------------------------------------------------------------------


def _family_of_kernel(module: str) -> str:
    if module.startswith("liger_kernel"):
        return "anchor"
    if module.endswith("kernels.centers"):
        return "centers"
    if module.endswith("kernels.rows"):
        return "rows"
    return module


def _histogram(hist: dict) -> str:
    return " ".join(f"{bits}b:{n}" for bits, n in sorted(hist.items(), key=lambda kv: -int(kv[0])))


def _dtypes(details: dict) -> str:
    return " ".join(f"{k}={v.lstrip('*')}" for k, v in details["signature"].items() if str(v).startswith("*"))


def _is_budget_dtype(details: dict) -> bool:
    """fp64 specialisations (gradcheck-grade, ``USE_FP64``) are compiled and reported but carry no budget.

    The row kernels' float64 partials and totals do not make a specialisation fp64: its logits' dtype does.
    """
    if "USE_FP64" in details["constexprs"]:
        return not details["constexprs"]["USE_FP64"]
    if "Out" in details["signature"]:  # the row combine: float64 partials and totals whatever the loss dtype
        return str(details["signature"]["Out"]) != "*fp64"
    return not any(str(v) == "*fp64" for v in details["signature"].values())


def kernel_row(spec, facts: dict, cases: list, env: dict) -> dict:
    details = spec.details()
    consts = ", ".join(f"{k}={v}" for k, v in details["constexprs"].items())
    ldg = {int(k): v for k, v in facts["ldg"].items()}
    return {
        "record": "kernel",
        "arch": f"sm_{facts['arch']}",
        "family": _family_of_kernel(spec.module),
        "kernel": spec.qualname,
        "specialisation": consts,
        "dtypes": _dtypes(details),
        "divisible_by_16": " ".join(details["divisible_by_16"]),
        "num_warps": facts["num_warps"],
        "num_stages": facts["num_stages"],
        "registers": facts["registers"],
        "spill_stores": facts["spill_stores"],
        "spill_loads": facts["spill_loads"],
        "stack": facts["stack"],
        "local": facts["local"],
        "shared": facts["shared"],
        "blocks_per_sm": facts["blocks_per_sm"],
        "occupancy": round(facts["occupancy"], 4),
        "ldg": _histogram(ldg),
        "stg": _histogram({int(k): v for k, v in facts["stg"].items()}),
        "widest_ldg_bits": max(ldg) if ldg else "",
        "narrowest_ldg_bits": min(ldg) if ldg else "",
        "ldl_stl": facts["ldl"] + facts["stl"],
        "mma": " ".join(f"{k}:{v}" for k, v in sorted(facts["mma"].items())),
        "cases": len(cases),
        "first_case": cases[0] if cases else "",
        "case_list": " ".join(cases),
        "budget_dtype": _is_budget_dtype(details),
        **env,
    }


def ledger_row(audit_case, summary: dict, host_reads_on: int, minimum: int, env: dict) -> dict:
    moved = summary["bytes_read"] + summary["bytes_written"]
    return {
        "record": "ledger",
        "arch": "",
        "family": audit_case.family,
        "kernel": "",
        "first_case": audit_case.name,
        "dtypes": audit_case.case.dtype,
        "launches_fwd": summary["launches_fwd"],
        "launches_bwd": summary["launches_bwd"],
        "launches": summary["launches_fwd"] + summary["launches_bwd"],
        "triton_launches": summary["triton_launches"],
        "bytes_read": summary["bytes_read"],
        "bytes_written": summary["bytes_written"],
        "bytes_min": minimum,
        "bytes_ratio": round(moved / minimum, 4) if minimum else "",
        "host_reads_checks_off": summary["host_reads"],
        "host_reads_checks_on": host_reads_on,
        "ops": summary["ops"],
        **env,
    }


def audit(selected: list, archs: list, jobs: int, liger: bool, log=print) -> dict:
    """Run the audit; ``{"kernels": {arch: [rows]}, "ledger": [rows]}``. Raises ``CompileError``."""
    import torch

    import oodkernels
    from bench import run
    from bench.compile_audit import Recorder
    from bench.compile_audit import compile_all
    from bench.ledger import Ledger

    env = {
        "torch": torch.__version__,
        "triton": run.triton_version(),
        "git_commit": run.git_commit(),
        "date": datetime.date.today().isoformat(),
    }
    anchors = liger_anchor_cases(selected) if liger else []
    kernels: dict = {}
    ledger_rows = []
    saved_checks = oodkernels.config.data_checks
    try:
        for index, arch in enumerate(archs):
            start = time.perf_counter()
            spec_cases: dict = collections.defaultdict(list)
            ledgers = []
            with warnings.catch_warnings(), Recorder(arch) as rec, oodkernels.ops.cuda_stand_in():
                warnings.simplefilter("ignore")  # the criteria's OOD warnings (data checks on)
                current = [""]

                def note(launch, ledger=None, spec_cases=spec_cases, current=current):
                    if current[0] not in spec_cases[launch.spec.data]:
                        spec_cases[launch.spec.data].append(current[0])
                    if ledger is not None:
                        ledger.triton_launch(launch)

                for case in selected:
                    current[0] = case.name
                    if index == 0:  # the ledger does not depend on the arch: once
                        oodkernels.config.data_checks = False
                        ledger = Ledger()
                        rec.on_launch = lambda launch, ledger=ledger: note(launch, ledger)
                        logits, targets, out = run_step(case, ledger)
                        minimum = minimum_bytes(case.case, logits, targets, out)
                        oodkernels.config.data_checks = True
                        checks_on = Ledger()
                        rec.on_launch = note
                        try:
                            run_step(case, checks_on)
                        except (ValueError, IndexError):
                            # compile-only launches leave their outputs unwritten: a check that reads a
                            # kernel's check values (the row criteria's totals) may act on garbage after
                            # its one host read, which is what this run counts
                            if checks_on.host_reads() == 0:
                                raise
                        ledgers.append((case, ledger, checks_on.host_reads(), minimum))
                        del logits, targets, out
                    else:
                        rec.on_launch = note
                        oodkernels.config.data_checks = False
                        run_step(case)
                rec.on_launch = note
                for case in anchors:
                    current[0] = "liger/" + case.name
                    run_liger(case)
            specs = list(rec.specializations.values())
            log(
                f"sm_{arch}: {len(selected)} case(s) recorded {rec.launch_count} launch(es) of {len(specs)} "
                f"distinct specialisation(s) in {time.perf_counter() - start:.1f} s; compiling with {jobs} job(s)"
            )
            start = time.perf_counter()
            facts = compile_all(specs, arch, jobs)
            log(f"sm_{arch}: compiled {len(specs)} specialisation(s) in {time.perf_counter() - start:.1f} s")
            by_spec = {s.data: f for s, f in zip(specs, facts)}
            kernels[arch] = [kernel_row(s, f, spec_cases[s.data], env) for s, f in zip(specs, facts)]
            for case, ledger, reads_on, minimum in ledgers:
                ledger.resolve(by_spec)
                ledger_rows.append(ledger_row(case, ledger.summary(), reads_on, minimum, env))
    finally:
        oodkernels.config.data_checks = saved_checks
    return {"kernels": kernels, "ledger": ledger_rows}


# ----------------------------------------------------------------------------------------------
# budgets, summary, results
# ----------------------------------------------------------------------------------------------


def _ours(rows):
    return [r for r in rows if r["family"] in ("rows", "centers")]


def summary_line(arch: int, kernel_rows: list, ledger_rows: list) -> str:
    """``audit: K kernels compiled for sm_90, S spilling, R over 128 registers; ledger: worst L launches, worst
    B.BBx minimum bytes`` over our kernels (not the anchor) and the budgeted families' ledger cases."""
    ours = _ours(kernel_rows)
    spilling = sum(1 for r in ours if int(r["spill_stores"]) > 0)
    over = sum(1 for r in ours if int(r["registers"]) > REGISTER_BUDGET)
    budgeted = [r for r in ledger_rows if r["family"] in ("rows", "scores", "centers")]
    worst_launches = max((int(r["launches"]) for r in budgeted), default=0)
    worst_ratio = max((float(r["bytes_ratio"]) for r in budgeted if r["bytes_ratio"] != ""), default=0.0)
    return (
        f"audit: {len(ours)} kernels compiled for sm_{arch}, {spilling} spilling, {over} over {REGISTER_BUDGET} "
        f"registers; ledger: worst {worst_launches} launches, worst {worst_ratio:.2f}x minimum bytes"
    )


def check_budgets(kernel_rows_by_arch: dict, ledger_rows: list) -> list:
    """``[(budget, missed rows, worst value)]`` for every budget."""
    out = []
    for budget in BUDGETS:
        if budget.metric in ("spill_bytes", "registers"):
            rows = [
                r
                for rows in kernel_rows_by_arch.values()
                for r in rows
                if r["family"] == budget.family and r.get("budget_dtype", True)
            ]
            key = (
                (lambda r: int(r["spill_stores"]) + int(r["spill_loads"]))
                if budget.metric == "spill_bytes"
                else (lambda r: int(r["registers"]))
            )
        else:
            rows = [r for r in ledger_rows if r["family"] == budget.family]
            key = (
                (lambda r: int(r["launches"]))
                if budget.metric == "launches"
                else (lambda r: float(r["bytes_ratio"] or 0))
            )
        missed = [r for r in rows if key(r) > budget.limit]
        worst = max((key(r) for r in rows), default=0)
        out.append((budget, missed, worst, len(rows)))
    return out


def write_csv(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def load_csv(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _kernel_severity(r) -> tuple:
    return (int(r["spill_stores"]) + int(r["spill_loads"]), int(r["registers"]), -float(r["occupancy"] or 0))


def _kernel_line(r) -> str:
    name = ("**Liger** " if r["family"] == "anchor" else "") + r["kernel"]
    return (
        f"| {name} | {_short(r['specialisation'])} | {_short_dtypes(r['dtypes'])} | {r['num_warps']} | "
        f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {float(r['occupancy']):.0%} | {r['ldg']} | "
        f"{r['stg']} | {r['mma'] or '-'} |"
    )


KERNEL_HEADER = [
    "| kernel | specialisation | first operands | warps | regs | spill st/ld (B) | occupancy | LDG | STG | MMA |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


def _kernel_tables(arch: str, kernel_rows: list) -> list:
    blocks = []
    for family, title in (("rows", "row family (losses and scores)"), ("centers", "center family")):
        fam = sorted((r for r in kernel_rows if r["family"] == family), key=_kernel_severity, reverse=True)
        if not fam:
            continue
        more = f"; {len(fam) - README_ROWS} more in the CSV" if len(fam) > README_ROWS else ""
        lines = [f"*{arch}, {title}: {len(fam)} specialisations, worst first (spilled bytes, then registers){more}*"]
        lines += [""] + KERNEL_HEADER + [_kernel_line(r) for r in fam[:README_ROWS]]
        blocks.append("\n".join(lines))
    anchors = [r for r in kernel_rows if r["family"] == "anchor"]
    if anchors:
        lines = [
            f"*{arch}, cross entropy at the same shapes: ours (forward, backward) beside Liger's "
            "(one kernel, the gradient written in the forward)*",
            "",
            *KERNEL_HEADER,
        ]
        cases = []
        for r in anchors:
            for name in r.get("case_list", "").split():
                if name.startswith("liger/") and name[6:] not in cases:
                    cases.append(name[6:])
        for case in cases:
            ours = [r for r in kernel_rows if r["family"] == "rows" and case in r.get("case_list", "").split()]
            theirs = [r for r in anchors if f"liger/{case}" in r.get("case_list", "").split()]
            lines.append(f"| *{case}* | | | | | | | | | |")
            lines += [_kernel_line(r) for r in ours + theirs]
        blocks.append("\n".join(lines))
    return blocks


def _ledger_tables(ledger_rows: list) -> list:
    blocks = []
    for family in ("rows", "scores", "centers", "vos"):
        fam = sorted(
            (r for r in ledger_rows if r["family"] == family),
            key=lambda r: (int(r["launches"]), float(r["bytes_ratio"] or 0)),
            reverse=True,
        )
        if not fam:
            continue
        more = f"; {len(fam) - README_ROWS} more in the CSV" if len(fam) > README_ROWS else ""
        lines = [
            f"*ledger, {family}: {len(fam)} cases, most launches first (data checks off; host reads with checks "
            f"off / on){more}*",
            "",
            "| case | launches fwd + bwd | of them Triton | bytes vs minimum | host reads off / on |",
            "|---|---|---|---|---|",
        ]
        for r in fam[:README_ROWS]:
            lines.append(
                f"| {r['first_case']} | {r['launches_fwd']} + {r['launches_bwd']} | {r['triton_launches']} "
                f"| {float(r['bytes_ratio'] or 0):.2f}x | {r['host_reads_checks_off']} / {r['host_reads_checks_on']} |"
            )
        blocks.append("\n".join(lines))
    return blocks


def markdown(paths: list) -> str:
    """The README section: per arch file its summary line and a table per family, worst cases first (with the
    cross-entropy anchor beside ours when it ran); then the ledger (the same in every file), per family."""
    blocks = []
    ledger_rows = []
    for path in paths:
        rows = load_csv(path)
        kernel_rows = [r for r in rows if r["record"] == "kernel"]
        ledger_rows = ledger_rows or [r for r in rows if r["record"] == "ledger"]
        arch = kernel_rows[0]["arch"] if kernel_rows else "sm_?"
        meta = rows[0] if rows else {}
        capability = int(arch[3:]) if arch[3:].isdigit() else 0
        line = summary_line(capability, kernel_rows, [r for r in rows if r["record"] == "ledger"])
        blocks.append(
            f"**{path.name}** (commit {meta.get('git_commit', '?')}, torch {meta.get('torch', '?')}, "
            f"triton {meta.get('triton', '?')}): `{line}`"
        )
        blocks += _kernel_tables(arch, kernel_rows)
    blocks += _ledger_tables(ledger_rows)
    return "\n\n".join(blocks)


def _short(spec: str) -> str:
    """The specialisation's constexpr flags for the README: the upper-case ones that are not off (the unit
    strides Triton specialised, lower-case, are in the CSV)."""
    parts = [p for p in spec.split(", ") if p[:1].isupper() and not p.endswith("=False") and not p.endswith("=None")]
    return ", ".join(parts)


def _short_dtypes(dtypes: str) -> str:
    """The dtypes of the first two pointer arguments (the logits and the targets in a row forward)."""
    return " ".join(dtypes.split()[:2])


def latest_results(out: Path) -> list:
    """The newest audit CSV per arch in ``out``, sm_90 first."""
    newest = {}
    for path in sorted(out.glob("audit-sm*_*.csv")):
        newest[path.name.split("_")[0]] = path
    return [newest[k] for k in sorted(newest, reverse=True)]


# ----------------------------------------------------------------------------------------------
# the proxy checked on a GPU
# ----------------------------------------------------------------------------------------------

CHECK_COLUMNS = [
    "kernel",
    "specialisation",
    "arch",
    "driver_registers",
    "audit_registers",
    "driver_local_bytes",
    "audit_local_bytes",
    "audit_spill_stores",
    "registers_equal",
    "local_equal",
    "first_case",
]


def check_on_gpu(selected: list, path: Path, jobs: int, log=print) -> int:
    """On a CUDA machine: run the cases for real, take every kernel specialisation the JIT compiled with the
    registers and local memory the CUDA driver reports for it, compile the same specialisations through the
    compile-only driver for this GPU's arch, and write both side by side to ``path``. Exit status 1 when a
    register count differs (the proxy CI holds would then be wrong)."""
    import torch
    from triton import knobs

    import oodkernels
    from bench.compile_audit import ARCHS
    from bench.compile_audit import Specialization
    from bench.compile_audit import compile_all

    if not torch.cuda.is_available():
        log("--check-on-gpu: no CUDA device")
        return 2
    major, minor = torch.cuda.get_device_capability()
    arch = major * 10 + minor
    seen: dict = {}
    current = [""]

    def hook(*, fn, compile, **_):
        seen.setdefault(compile["specialization_data"], (fn, compile["key"], current[0]))

    saved_hook, saved_checks = knobs.runtime.jit_post_compile_hook, oodkernels.config.data_checks
    knobs.runtime.jit_post_compile_hook = hook
    oodkernels.config.data_checks = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for case in selected:
                current[0] = case.name
                run_step(case, device="cuda")
        torch.cuda.synchronize()
    finally:
        knobs.runtime.jit_post_compile_hook, oodkernels.config.data_checks = saved_hook, saved_checks
    device = torch.cuda.current_device()
    specs, driver, cases = [], [], []
    for data, (fn, key, case_name) in seen.items():
        kernel = fn.jit_function.device_caches[device][0][key]
        kernel._init_handles()  # loaded by its first launch already; this reads the driver's attributes
        specs.append(Specialization(fn.jit_function.fn.__module__, fn.name, data))
        driver.append((kernel.n_regs, kernel.n_spills * 4))  # Triton reports local bytes / 4 as n_spills
        cases.append(case_name)
    facts = compile_all(specs, arch, jobs) if arch in ARCHS else [None] * len(specs)
    rows = []
    for spec, (regs, local), f, case_name in zip(specs, driver, facts, cases):
        rows.append(
            {
                "kernel": spec.qualname,
                "specialisation": spec.label(),
                "arch": f"sm_{arch}",
                "driver_registers": regs,
                "audit_registers": f["registers"] if f else "",
                "driver_local_bytes": local,
                "audit_local_bytes": f["local"] if f else "",
                "audit_spill_stores": f["spill_stores"] if f else "",
                "registers_equal": bool(f) and f["registers"] == regs,
                "local_equal": bool(f) and f["local"] == local,
                "first_case": case_name,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=CHECK_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    equal = sum(r["registers_equal"] for r in rows)
    log(
        f"audit check on {torch.cuda.get_device_name()} (sm_{arch}): {len(rows)} specialisations, registers equal "
        f"in {equal}, local memory equal in {sum(r['local_equal'] for r in rows)} -> {path}"
    )
    return 0 if equal == len(rows) else 1


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true", help="CI's selection: a few shapes per family, every dtype")
    p.add_argument("--arch", default="90,80", help="comma-separated compute capabilities (default 90,80)")
    p.add_argument("--filter", default=None, help="regex searched in the case names")
    p.add_argument("--family", default=None, choices=("rows", "scores", "centers", "vos"))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile worker processes")
    p.add_argument("--out", default=None, help="results folder (default bench/results; --quick writes none)")
    p.add_argument(
        "--readme",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="regenerate the README section (default: on for a full run written to bench/results)",
    )
    p.add_argument(
        "--liger",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Liger's cross entropy as the anchor (default: when liger-kernel is installed)",
    )
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument(
        "--check-on-gpu",
        default=None,
        metavar="CSV",
        help="on a CUDA machine: compare the audit's registers with the driver's for the selection",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(
            "bench/audit.py compiles for a GPU: unset TRITON_INTERPRET (e.g. `env -u TRITON_INTERPRET ...`)",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    args = parse_args(argv)
    from bench.compile_audit import CompileError
    from bench.compile_audit import parse_archs

    try:
        archs = parse_archs(args.arch)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    selected = quick_cases() if args.quick else full_cases()
    regex = re.compile(args.filter) if args.filter else None
    selected = [
        c for c in selected if (not regex or regex.search(c.name)) and (not args.family or c.family == args.family)
    ]
    if args.list:
        print("\n".join(c.name for c in selected))
        print(f"{len(selected)} case(s)")
        return 0
    if not selected:
        print("no case matches the selection", file=sys.stderr)
        return 1
    if args.check_on_gpu:
        return check_on_gpu(selected, Path(args.check_on_gpu), args.jobs)
    liger = liger_installed() if args.liger is None else args.liger
    if liger and not liger_installed():
        print("--liger: liger-kernel is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        result = audit(selected, archs, args.jobs, liger)
    except CompileError as exc:
        print(f"audit FAILED: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else (None if args.quick else RESULTS)
    today = datetime.date.today().isoformat()
    written = []
    if out is not None:
        for arch in archs:
            path = out / f"audit-sm{arch}_{today}.csv"
            write_csv(path, result["kernels"][arch] + result["ledger"])
            written.append(path)
            print(f"results -> {path}")
    readme = args.readme if args.readme is not None else (out == RESULTS and not args.filter and not args.family)
    if readme and written:
        from bench import report

        if report.update_readme(README, markdown(latest_results(out)), START, END):
            print(f"updated {README}")
        else:
            print(f"{README}: no {START} ... {END} block; section not written", file=sys.stderr)

    failed = False
    print(f"\nbudgets (SPEC §5 GPU proxies; budget dtypes {', '.join(BUDGET_DTYPES)}):")
    for budget, missed, worst, n in check_budgets(result["kernels"], result["ledger"]):
        state = "ok" if not missed else ("MISSED" if budget.asserted else "missed")
        kind = "asserted" if budget.asserted else "reported"
        print(f"  [{kind}] {budget.describe():<40} {state}: {len(missed)} of {n} over, worst {worst:g}")
        failed |= bool(missed) and budget.asserted
    anchors = {a: [r for r in rows if r["family"] == "anchor"] for a, rows in result["kernels"].items()}
    for arch in archs:
        if anchors.get(arch):
            regs = [int(r["registers"]) for r in anchors[arch]]
            spills = sum(1 for r in anchors[arch] if int(r["spill_stores"]) > 0)
            print(
                f"anchor: Liger cross entropy, {len(regs)} kernels for sm_{arch}, registers {min(regs)}-{max(regs)}, "
                f"{spills} spilling"
            )
    print(f"({time.perf_counter() - start:.0f} s)")
    for arch in sorted(archs):  # the newest arch last: its line is the run's last
        print(summary_line(arch, result["kernels"][arch], result["ledger"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
