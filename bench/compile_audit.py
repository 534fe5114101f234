"""Compile Triton kernels for a GPU on a machine without one, and read the facts a GPU engineer checks first.

The compile-only driver
-----------------------
:class:`CompileOnlyDriver` is a ``triton.backends.driver.DriverBase`` whose target is
``GPUTarget("cuda", arch, 32)``. Inside :class:`Recorder` it is Triton's active driver, every
``kernel[grid](...)`` launch becomes a ``warmup=True`` call (nothing runs), and Triton's
``knobs.runtime.jit_cache_hook`` records the specialisation the JIT would compile for those arguments:
the same constexprs, ``num_warps``/``num_stages``, dtypes, and the divisibility-by-16 and alignment
attributes of every integer and pointer argument (Triton reads them from the argument values and
``data_ptr()``, so CPU tensors of the same shapes, strides and alignment specialise exactly as the
CUDA tensors would). Each distinct specialisation is then compiled, as the JIT's own ``preload`` path
compiles a serialised specialisation, in a pool of worker processes (:func:`compile_all`), each with the
same driver for the same arch. The device id the driver reports is the arch, so Triton's per-device
kernel caches never mix targets.

What is read from each compiled kernel (:func:`kernel_facts`)
-------------------------------------------------------------
- ``ptxas -v`` (the log of Triton's own ptxas call, or the same command run again on its PTX when the
  kernel came from Triton's cache): registers per thread, stack frame, spill stores and spill loads.
- ``cuobjdump --dump-resource-usage`` of the cubin: registers (checked against ptxas) and local memory.
- the SASS (``cuobjdump -sass``): global load and store instructions by width (``LDG.E.128`` ... ``LDG.E.U8``),
  local-memory traffic (``LDL``/``STL``), asynchronous copies (``LDGSTS``) and tensor-core instructions
  (``HMMA`` on sm_80, ``HGMMA`` warpgroup MMA on sm_90).
- the Triton IR (TTIR): which pointer arguments the kernel loads from and stores to (:func:`pointer_access`),
  for the traffic ledger (``bench/ledger.py``).
- the theoretical occupancy those registers, ``num_warps`` and the shared memory allow on the arch
  (:func:`occupancy`, the CUDA occupancy calculator's rules).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Optional

# ----------------------------------------------------------------------------------------------
# architectures
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-SM limits of a CUDA architecture (CUDA C++ Programming Guide, compute capabilities table)."""

    capability: int  # 80, 90
    name: str
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 0  # bytes usable by blocks, per SM
    smem_per_block: int = 0  # the most one block may use (opt-in maximum)
    smem_reserved_per_block: int = 1024  # the runtime's share of every block since sm_80
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256


ARCHS = {
    90: Arch(90, "sm_90 (Hopper: H100, H200)", smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
    80: Arch(80, "sm_80 (Ampere: A100)", smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
}


def parse_archs(text: str) -> list[int]:
    """``"90,80"`` -> ``[90, 80]``, each a known arch."""
    archs = []
    for part in str(text).split(","):
        part = part.strip().lower().removeprefix("sm_")
        if not part:
            continue
        if not part.isdigit() or int(part) not in ARCHS:
            raise ValueError(f"--arch: expected a comma-separated list of {sorted(ARCHS)}, got {text!r}")
        archs.append(int(part))
    if not archs:
        raise ValueError(f"--arch: expected at least one of {sorted(ARCHS)}, got {text!r}")
    return archs


def occupancy(arch: int, registers: int, num_warps: int, shared: int) -> tuple[int, float]:
    """``(resident blocks per SM, occupancy)``: the fraction of the SM's warp slots that those blocks fill.

    Registers are allocated per warp, ``ceil(regs · 32 / 256) · 256`` each; shared memory per block is the
    kernel's dynamic shared memory plus the 1 KiB the runtime reserves; blocks are further capped by the warp
    slots and the 32-block limit.
    """
    a = ARCHS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // a.reg_alloc_unit) * a.reg_alloc_unit
    blocks_by_regs = (a.regs_per_sm // regs_per_warp) // num_warps
    blocks_by_warps = a.max_warps_per_sm // num_warps
    smem = shared + a.smem_reserved_per_block
    blocks_by_smem = a.smem_per_sm // smem
    blocks = max(0, min(blocks_by_regs, blocks_by_warps, blocks_by_smem, a.max_blocks_per_sm))
    return blocks, blocks * num_warps / a.max_warps_per_sm


# ----------------------------------------------------------------------------------------------
# the driver and the recorder
# ----------------------------------------------------------------------------------------------


def _driver_base():
    from triton.backends.driver import DriverBase

    return DriverBase


class CompileOnlyDriver(_driver_base()):
    """A Triton driver that compiles for ``GPUTarget("cuda", arch, 32)`` and can launch nothing."""

    def __init__(self, arch: int):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch: expected one of {sorted(ARCHS)}, got {arch!r}")
        self.arch = arch

    @classmethod
    def is_active(cls):
        return False  # never picked by Triton's own driver discovery

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("the compile-only driver cannot run kernels")

    def get_current_device(self):
        return self.arch  # Triton keys its per-device kernel caches by this: one cache per target

    def get_current_stream(self, device=None):
        return 0


@dataclasses.dataclass(frozen=True)
class Specialization:
    """One kernel specialisation, as the JIT would compile it."""

    module: str  # the kernel's module, importable by a worker process
    qualname: str
    data: str  # Triton's serialised specialisation (``JITFunction.preload`` input)

    @property
    def name(self) -> str:
        return self.qualname

    def details(self) -> dict:
        """``{"constexprs": {name: value}, "signature": {name: type}, "divisible_by_16": [name], "num_warps",
        "num_stages"}`` (``divisible_by_16``: the pointers 16-byte aligned and the integers divisible by 16,
        as Triton specialised them)."""
        data = json.loads(self.data)
        names = list(data["signature"].keys())
        constexprs = {}
        for key, value in zip(data["constant_keys"], data["constant_vals"]):
            name = names[key[0]] if key and key[0] < len(names) else str(key)
            if isinstance(value, dict):
                value = value.get("constexpr", value)
            constexprs[name] = value
        signature = {k: v for k, v in data["signature"].items() if v != "constexpr"}
        divisible = [
            names[key[0]]
            for key, attrs in zip(data.get("attrs_keys", []), data.get("attrs_vals", []))
            if key and key[0] < len(names) and any(a[0] == "tt.divisibility" for a in attrs)
        ]
        options = data["options"]
        return {
            "constexprs": constexprs,
            "signature": signature,
            "divisible_by_16": divisible,
            "num_warps": options.get("num_warps"),
            "num_stages": options.get("num_stages"),
        }

    def label(self) -> str:
        """``kernel[CONST=value, ...] num_warps=N div16=(X, Y, n)``: the constexprs and attributes that name
        the specialisation."""
        d = self.details()
        consts = ", ".join(f"{k}={v}" for k, v in d["constexprs"].items())
        return f"{self.qualname}[{consts}] num_warps={d['num_warps']} div16=({', '.join(d['divisible_by_16'])})"


@dataclasses.dataclass
class Launch:
    """One ``kernel[grid](...)`` call: which specialisation, the grid and every argument by name."""

    spec: Specialization
    grid: tuple
    args: dict  # parameter name -> value (tensors kept as given)


class Recorder:
    """While entered: the compile-only driver is active, launches record instead of running.

    ``specializations``: every distinct specialisation met, in order; ``launch_count``: launches seen. Each
    launch goes to ``on_launch`` (the traffic ledger listens there); the recorder keeps no tensor.
    """

    def __init__(self, arch: int):
        self.arch = arch
        self.specializations: dict[str, Specialization] = {}
        self.launch_count = 0
        self._last: list[Optional[Specialization]] = [None]
        self._saved = None
        #: called with every Launch as it is recorded (the traffic ledger listens here)
        self.on_launch = None

    def _hook(self, *, fn, compile, **_):
        spec = Specialization(fn.module, fn.name, compile["specialization_data"])
        self.specializations.setdefault(spec.data, spec)
        self._last[0] = spec
        return True  # skip the compile: compile_all does it, once per specialisation, in a worker pool

    def __enter__(self):
        import triton
        from triton import knobs
        from triton.runtime.jit import JITFunction

        recorder = self
        original_run = JITFunction.run

        def run(jit_fn, *args, grid, warmup, **kwargs):
            recorder._last[0] = None
            original_run(jit_fn, *args, grid=grid, warmup=True, **kwargs)
            spec = recorder._last[0]
            if spec is None:  # already compiled in this process (a kernel cache hit): find it by its key
                raise RuntimeError(
                    f"{jit_fn.fn.__qualname__}: a kernel compiled outside the recorder was launched inside it"
                )
            params = {k: v for k, v in kwargs.items() if k in jit_fn.signature.parameters}  # not num_warps etc.
            bound = jit_fn.signature.bind(*args, **params)
            bound.apply_defaults()
            launched_grid = grid(bound.arguments) if callable(grid) else tuple(grid)
            launch = Launch(spec, tuple(launched_grid), dict(bound.arguments))
            recorder.launch_count += 1
            if recorder.on_launch is not None:
                recorder.on_launch(launch)
            return None

        # the private field, not ``.active``: on a machine without a GPU, reading ``.active`` raises (no driver)
        self._saved = (triton.runtime.driver._active, knobs.runtime.jit_cache_hook, original_run)
        triton.runtime.driver.set_active(CompileOnlyDriver(self.arch))
        knobs.runtime.jit_cache_hook = self._hook
        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        import triton
        from triton import knobs
        from triton.runtime.jit import JITFunction

        active, hook, original_run = self._saved
        JITFunction.run = original_run
        knobs.runtime.jit_cache_hook = hook
        triton.runtime.driver._active = active
        return False


# ----------------------------------------------------------------------------------------------
# compiling and reading the cubin
# ----------------------------------------------------------------------------------------------


class CompileError(RuntimeError):
    """A specialisation that does not compile for a GPU target: names the kernel and its constexprs."""


def _triton_bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


_PTXAS_PROPERTIES = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", re.MULTILINE
)
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str, name: str) -> Optional[dict]:
    """``{"registers", "stack", "spill_stores", "spill_loads"}`` of entry ``name`` in a ``ptxas -v`` log."""
    start = log.find(f"Compiling entry function '{name}'")
    if start < 0:
        return None
    section = log[start:]
    nxt = section.find("Compiling entry function", 10)
    if nxt > 0:
        section = section[:nxt]
    props = _PTXAS_PROPERTIES.search(section)
    regs = _PTXAS_REGISTERS.search(section)
    if not props or not regs:
        return None
    return {
        "registers": int(regs.group(1)),
        "stack": int(props.group(1)),
        "spill_stores": int(props.group(2)),
        "spill_loads": int(props.group(3)),
    }


def ptxas_again(ptx: str, arch: int, enable_fp_fusion: bool) -> str:
    """Run Triton's ptxas command (``make_cubin``'s flags) on ``ptx`` again and return its ``-v`` log."""
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", *([] if enable_fp_fusion else ["--fmad=false"]), "-v"]
        cmd += ["--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return out.stderr + out.stdout


_RESOURCES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cubin_resources(cubin_path: str) -> dict:
    """``{function: {"registers", "stack", "static_shared", "local"}}`` from ``cuobjdump --dump-resource-usage``."""
    out = subprocess.run(
        [_triton_bin("cuobjdump"), "--dump-resource-usage", cubin_path], capture_output=True, text=True, check=True
    ).stdout
    return {
        m.group(1): {
            "registers": int(m.group(2)),
            "stack": int(m.group(3)),
            "static_shared": int(m.group(4)),
            "local": int(m.group(5)),
        }
        for m in _RESOURCES.finditer(out)
    }


_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def sass_opcodes(cubin_path: str) -> Counter:
    """Every SASS opcode (with its modifiers) of the cubin, counted (static instruction counts)."""
    out = subprocess.run(
        [_triton_bin("cuobjdump"), "-sass", cubin_path], capture_output=True, text=True, check=True
    ).stdout
    return Counter(_SASS_OPCODE.findall(out))


def access_bits(opcode: str) -> int:
    """Width in bits of a global or local memory access (``LDG.E.128`` -> 128, ``LDG.E.U16`` -> 16, ``LDG.E`` -> 32)."""
    parts = opcode.split(".")
    for token, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if token in parts:
            return bits
    return 32


def memory_instructions(opcodes: Counter) -> dict:
    """``{"ldg": {bits: n}, "stg": {bits: n}, "ldl": n, "stl": n, "ldgsts": n, "mma": {"HMMA": n, "HGMMA": n}}``."""
    out = {"ldg": Counter(), "stg": Counter(), "ldl": 0, "stl": 0, "ldgsts": 0, "mma": Counter()}
    for op, n in opcodes.items():
        head = op.split(".")[0]
        if head == "LDG":
            out["ldg"][access_bits(op)] += n
        elif head == "STG":
            out["stg"][access_bits(op)] += n
        elif head == "LDL":
            out["ldl"] += n
        elif head == "STL":
            out["stl"] += n
        elif head == "LDGSTS":
            out["ldgsts"] += n
        elif head in ("HMMA", "HGMMA", "IMMA", "DMMA", "UTCHMMA", "UTCQMMA"):
            out["mma"][head] += n
    return out


# TTIR: an SSA definition ``%a = op ...`` or ``%a:3 = op ...``; uses are ``%name`` or ``%name#i``
_TTIR_DEF = re.compile(r"^\s*(%[\w$.-]+)(?::\d+)?\s*=\s*([\w.]+)(.*)$")
_TTIR_VALUE = re.compile(r"%[\w$.-]+")
_TTIR_ITER_ARG = re.compile(r"(%[\w$.-]+)\s*=\s*(%[\w$.-]+)")
_TTIR_FUNC_ARG = re.compile(r"(%[\w$.-]+)\s*:\s*!tt\.ptr")


def pointer_access(ttir: str) -> tuple[set, set]:
    """``(read, written)``: the pointer arguments the kernel loads from and stores to, by parameter name.

    A data-flow pass over the TTIR: a value derived (``tt.splat``, ``tt.addptr``, broadcasts, selects, loop
    arguments, ...) from pointer argument ``%P`` carries ``P``; the pointer operand of ``tt.load`` marks its
    roots read, that of ``tt.store`` written, atomics both. Loaded values carry nothing, so a gather through
    loaded indices does not blame the index tensor as written. Constexpr-disabled branches are gone by then.
    """
    roots: dict[str, set] = {}
    start = ttir.find("tt.func")
    header = ttir[start : ttir.find("\n", start)]  # the signature line: every argument with its type
    for arg in _TTIR_FUNC_ARG.findall(header):
        roots[arg] = {arg[1:]}
    read: set = set()
    written: set = set()

    def roots_of(text: str) -> set:
        out = set()
        for value in _TTIR_VALUE.findall(text):
            out |= roots.get(value.split("#")[0], set())
        return out

    for line in ttir.splitlines():
        code = line.split(" loc(")[0]
        stripped = code.strip()
        if stripped.startswith(("tt.store", "tt.atomic")) or " tt.atomic" in code:
            operands = stripped.split(" ", 1)[1] if " " in stripped else ""
            if "=" in stripped and stripped.startswith("%"):
                operands = stripped.split("=", 1)[1].strip().split(" ", 1)[1]
            first = operands.split(",")[0].split(":")[0]
            target = roots_of(first)
            written |= target
            if "atomic" in stripped:
                read |= target
        m = _TTIR_DEF.match(code)
        if m:
            name, op, rest = m.group(1), m.group(2), m.group(3)
            if op == "tt.load":
                read |= roots_of(rest.split(",")[0].split(":")[0])
                continue
            if "atomic" in op:
                continue
            if op == "scf.for" or op == "scf.while":
                for inner, init in _TTIR_ITER_ARG.findall(rest):
                    roots.setdefault(inner, set()).update(roots.get(init, set()))
            derived = roots_of(rest.split(" : ")[0])
            if derived:
                roots.setdefault(name, set()).update(derived)
    return read, written


def kernel_facts(kernel, arch: int, ptxas_log: str = "") -> dict:
    """Everything the audit reports of one compiled kernel (a ``triton.compiler.CompiledKernel``)."""
    md = kernel.metadata
    name = md.name
    props = parse_ptxas_log(ptxas_log, name) if ptxas_log else None
    if props is None:  # the kernel came from Triton's cache: ptxas did not run, so run its command again
        props = parse_ptxas_log(ptxas_again(kernel.asm["ptx"], arch, md.enable_fp_fusion), name)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        resources = cubin_resources(path).get(name)
        ops = sass_opcodes(path)
    if resources is None or props is None:
        raise CompileError(f"{name}: could not read the resource usage of its cubin")
    if resources["registers"] != props["registers"]:
        raise CompileError(
            f"{name}: ptxas reports {props['registers']} registers but the cubin {resources['registers']}: "
            "the audit's ptxas command no longer matches Triton's"
        )
    if md.shared > ARCHS[arch].smem_per_block:  # the JIT would fail at launch: out of resources
        raise CompileError(
            f"{name}: needs {md.shared} bytes of shared memory; sm_{arch} allows {ARCHS[arch].smem_per_block} per block"
        )
    mem = memory_instructions(ops)
    blocks, occ = occupancy(arch, props["registers"], md.num_warps, md.shared)
    read, written = pointer_access(kernel.asm["ttir"])
    return {
        "kernel": name,
        "arch": arch,
        "num_warps": md.num_warps,
        "num_stages": md.num_stages,
        "registers": props["registers"],
        "spill_stores": props["spill_stores"],
        "spill_loads": props["spill_loads"],
        "stack": props["stack"],
        "local": resources["local"],
        "shared": md.shared,
        "blocks_per_sm": blocks,
        "occupancy": occ,
        "ldg": dict(mem["ldg"]),
        "stg": dict(mem["stg"]),
        "ldl": mem["ldl"],
        "stl": mem["stl"],
        "ldgsts": mem["ldgsts"],
        "mma": dict(mem["mma"]),
        "reads": sorted(read),
        "writes": sorted(written),
    }


# ----------------------------------------------------------------------------------------------
# the worker pool
# ----------------------------------------------------------------------------------------------


def _worker_init(arch: int, path: list) -> None:
    sys.path[:] = path
    import triton

    triton.runtime.driver.set_active(CompileOnlyDriver(arch))


def _compile_in_worker(module: str, qualname: str, data: str, arch: int) -> dict:
    from triton import knobs

    try:
        fn = getattr(importlib.import_module(module), qualname)
        knobs.nvidia.dump_ptxas_log = True  # Triton prints its own ptxas -v log: read it instead of a second run
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = fn.preload(data)
        return {"ok": True, "facts": kernel_facts(kernel, arch, log.getvalue())}
    except Exception as exc:  # reported with the kernel's name and constexprs by the caller
        text = str(exc).strip().splitlines()
        return {"ok": False, "error": f"{type(exc).__name__}: {' '.join(text[-3:]) if text else ''}"}


def compile_all(specs: list, arch: int, jobs: int) -> list:
    """Compile every specialisation for ``arch`` in ``jobs`` worker processes; facts in the order given.

    A specialisation that fails to compile raises :class:`CompileError` naming it and its constexprs.
    """
    if not specs:
        return []
    env_path = list(sys.path)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=max(1, jobs), mp_context=ctx, initializer=_worker_init, initargs=(arch, env_path)
    ) as pool:
        futures = [pool.submit(_compile_in_worker, s.module, s.qualname, s.data, arch) for s in specs]
        results = [f.result() for f in futures]
    failures = [(s, r["error"]) for s, r in zip(specs, results) if not r["ok"]]
    if failures:
        lines = [f"  {s.label()}: {err}" for s, err in failures]
        raise CompileError(f"{len(failures)} specialisation(s) failed to compile for sm_{arch}:\n" + "\n".join(lines))
    return [r["facts"] for r in results]
