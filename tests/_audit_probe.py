"""Run by tests/test_audit.py in a subprocess without the Triton interpreter: compiles the kernels of
tests/_audit_kernels.py for a GPU through bench/compile_audit.py and runs a known sequence under the traffic
ledger; prints one JSON object with what it read."""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]


def main(arch: int) -> dict:
    import _audit_kernels as k
    import torch

    from bench.compile_audit import CompileError
    from bench.compile_audit import Recorder
    from bench.compile_audit import compile_all
    from bench.ledger import Ledger

    out = {}
    x = torch.zeros(4096 + 1)
    y = torch.empty(4096)
    with Recorder(arch) as rec:
        k.scale_copy[(4,)](x[:4096], y, 4096, BLOCK=1024, num_warps=4)  # 16-byte aligned, n divisible by 16
        k.scale_copy[(4,)](x[1:], y[1:], 4095, BLOCK=1024, num_warps=4)  # 4 bytes off, n odd: no vector access
        k.many_live_arrays[(1,)](torch.ones(2048), torch.empty(2048), BLOCK=2048, num_warps=1)
    specs = list(rec.specializations.values())
    facts = compile_all(specs, arch, jobs=2)
    out["aligned"], out["misaligned"], out["spilling"] = facts
    out["labels"] = [s.label() for s in specs]
    out["launch_count"] = rec.launch_count

    with Recorder(arch) as rec:
        k.loop_type_change[(1,)](x, y, 16)
    try:
        compile_all(list(rec.specializations.values()), arch, jobs=1)
        out["broken"] = None
    except CompileError as exc:
        out["broken"] = str(exc)

    # a known sequence under the ledger: 3 ATen launches, 1 Triton launch, views and allocations, 2 host reads
    ledger = Ledger()
    with Recorder(arch) as rec:
        rec.on_launch = ledger.triton_launch
        with ledger:
            a = torch.zeros(1000)  # writes 4000
            b = a + 1  # reads 4000, writes 4000
            c = b.view(10, 100).t()  # views: nothing
            d = c.sum()  # reads 4000, writes 4
            e = torch.empty(1000)  # allocation: nothing
            k.scale_copy[(1,)](b, e, 1000, BLOCK=1024)  # reads b (4000), writes e (4000)
            d.item()
            b[:2].tolist()
        specs = list(rec.specializations.values())
    ledger.resolve({s.data: f for s, f in zip(specs, compile_all(specs, arch, jobs=1))})
    out["ledger"] = ledger.summary()
    out["ledger_entries"] = [[e.kind, e.name, e.launch, e.reads, e.writes] for e in ledger.entries]
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
