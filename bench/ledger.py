"""The traffic ledger: every device launch of a step, with the bytes it reads and writes.

:class:`Ledger` is a ``TorchDispatchMode`` (every ATen op that reaches the dispatcher) that also takes the
Triton launches of a :class:`bench.compile_audit.Recorder` (``ledger.triton_launch``), in call order. A step
runs on CPU tensors that stand in for CUDA ones (``oodkernels.ops.cuda_stand_in``), so the ATen ops are the
CUDA step's; the Triton launches record instead of running.

Counting rules (deterministic, so tests may assert them):

- **Launches.** Every ATen op is one launch, except views (``func.is_view``: ``view``, ``expand``,
  ``permute``, ``detach``, ...) and the ops that allocate or only touch the host (:data:`NO_LAUNCH`:
  ``empty*``, ``new_empty*``, ``scalar_tensor``, ``lift_fresh``, ``_unsafe_view``, ...). This is the usual
  one-kernel-per-op approximation: a few ATen ops launch more than one kernel on CUDA (multi-pass
  reductions), which the ledger does not see. Every Triton launch is one launch. Custom ops of the
  ``oodkernels`` namespace are opened: their own ATen ops and Triton launches are what gets counted.
- **Bytes of a tensor** are its distinct elements times the element size (a stride-0 axis counts once).
- **ATen op**: reads the bytes of its distinct tensor inputs (a tensor that the op only overwrites, such
  as the destination of ``copy_``/``fill_``/``zero_``, is not read), writes the bytes of its outputs.
- **Triton launch**: reads every tensor argument whose pointer the compiled kernel loads from, writes every
  one it stores to (``compile_audit.pointer_access`` over the kernel's TTIR), each counted whole: an upper
  bound where a kernel touches part of a buffer.
- **Device-to-host reads**: ``Tensor.item``/``bool``/``int``/``float`` (``aten._local_scalar_dense``),
  ``Tensor.tolist``, ``Tensor.cpu`` and ``Tensor.numpy``. On the stand-in CPU tensors these cost nothing, but
  on CUDA each one is a synchronisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: ATen ops that launch no kernel: allocation, host-side scalars, aliasing the viewer does not flag
NO_LAUNCH = frozenset(
    {
        "aten::empty",
        "aten::empty_strided",
        "aten::empty_like",
        "aten::new_empty",
        "aten::new_empty_strided",
        "aten::scalar_tensor",
        "aten::lift_fresh",
        "aten::_unsafe_view",
        "aten::alias",
        "aten::set_",
        "aten::resize_",
        "aten::sym_size",
        "aten::sym_stride",
        "aten::sym_numel",
        "aten::sym_storage_offset",
        "aten::is_same_size",
    }
)

#: ATen ops that overwrite their first argument without reading it
WRITE_ONLY_FIRST = frozenset(
    {"aten::copy_", "aten::fill_", "aten::zero_", "aten::normal_", "aten::uniform_", "aten::random_"}
)

#: the host reads the ledger counts besides aten._local_scalar_dense
HOST_READ_METHODS = ("tolist", "cpu", "numpy")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t`` (a stride-0, broadcast axis counts once)."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def tensor_identity(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _distinct_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen.setdefault(tensor_identity(t), tensor_bytes(t))
    return sum(seen.values())


@dataclasses.dataclass
class Entry:
    """One recorded event: an ATen op, a Triton launch or a host read."""

    phase: str  # "fwd" or "bwd" (set by the caller around each part of the step)
    kind: str  # "aten", "triton" or "d2h"
    name: str
    launch: bool
    reads: int = 0
    writes: int = 0
    spec: Optional[object] = None  # Triton: the launch's compile_audit.Specialization
    tensors: Optional[dict] = None  # Triton: parameter -> (bytes, identity) of each tensor argument


class Ledger(TorchDispatchMode):
    """Records the launches, bytes and host reads of everything run inside it (see the module docstring)."""

    def __init__(self, open_namespaces=("oodkernels",)):
        super().__init__()
        self.entries: list[Entry] = []
        self.phase = "fwd"
        self.open_namespaces = tuple(open_namespaces)
        self._patched: list = []
        self._depth = 0  # re-entered while opening a custom op: patch the host-read methods only once

    # -- recording ---------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if func.namespace in self.open_namespaces:
            import torch._library.custom_ops as custom_ops

            opdef = custom_ops.OPDEFS.get(name)
            if opdef is not None:
                with self:  # the op's own body, so its ATen ops and Triton launches are recorded
                    return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if name == "aten::_local_scalar_dense":
            self.entries.append(Entry(self.phase, "d2h", "item", launch=False))
            return out
        if func.is_view or name in NO_LAUNCH:
            return out
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if name in WRITE_ONLY_FIRST and inputs:
            inputs = inputs[1:]
        outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not outputs and not func._schema.is_mutable:  # metadata only (promote_types, result_type, ...)
            return out
        self.entries.append(
            Entry(
                self.phase,
                "aten",
                str(func.overloadpacket).replace("aten.", "aten::"),
                launch=True,
                reads=_distinct_bytes(inputs),
                writes=_distinct_bytes(outputs),
            )
        )
        return out

    def triton_launch(self, launch) -> None:
        """A Triton launch (a ``compile_audit.Launch``); its bytes are set by :meth:`resolve`."""
        tensors = {
            name: (tensor_bytes(value), tensor_identity(value))
            for name, value in launch.args.items()
            if isinstance(value, torch.Tensor)
        }
        self.entries.append(
            Entry(self.phase, "triton", launch.spec.qualname, launch=True, spec=launch.spec, tensors=tensors)
        )

    def resolve(self, facts_by_spec: dict) -> None:
        """Set the bytes of every Triton launch from its compiled kernel's pointer accesses.

        ``facts_by_spec``: ``Specialization.data`` -> the facts of ``compile_audit.kernel_facts``.
        """
        for e in self.entries:
            if e.kind != "triton":
                continue
            facts = facts_by_spec[e.spec.data]
            for params, field in ((facts["reads"], "reads"), (facts["writes"], "writes")):
                distinct = dict(e.tensors[p][::-1] for p in params if p in e.tensors)
                setattr(e, field, sum(distinct.values()))

    @contextlib.contextmanager
    def during(self, phase: str):
        saved = self.phase
        self.phase = phase
        try:
            yield self
        finally:
            self.phase = saved

    # -- host reads that do not dispatch -----------------------------------------------------------

    def __enter__(self):
        self._depth += 1
        if self._depth > 1:
            return super().__enter__()
        ledger = self
        for method in HOST_READ_METHODS:
            original = getattr(torch.Tensor, method)

            def patched(t, *a, __original=original, __name=method, **k):
                ledger.entries.append(Entry(ledger.phase, "d2h", __name, launch=False))
                return __original(t, *a, **k)

            self._patched.append((method, original))
            setattr(torch.Tensor, method, patched)
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        try:
            return super().__exit__(*exc)
        finally:
            while self._depth == 0 and self._patched:
                method, original = self._patched.pop()
                setattr(torch.Tensor, method, original)

    # -- totals ------------------------------------------------------------------------------------

    def launches(self, phase: Optional[str] = None) -> list[Entry]:
        return [e for e in self.entries if e.launch and (phase is None or e.phase == phase)]

    def host_reads(self) -> int:
        return sum(1 for e in self.entries if e.kind == "d2h")

    def bytes_moved(self) -> int:
        return sum(e.reads + e.writes for e in self.entries if e.launch)

    def summary(self) -> dict:
        return {
            "launches_fwd": len(self.launches("fwd")),
            "launches_bwd": len(self.launches("bwd")),
            "triton_launches": sum(1 for e in self.entries if e.kind == "triton"),
            "bytes_read": sum(e.reads for e in self.entries if e.launch),
            "bytes_written": sum(e.writes for e in self.entries if e.launch),
            "host_reads": self.host_reads(),
            "ops": " ".join(f"{e.phase}:{e.name}" for e in self.entries if e.launch),
        }
