"""``examples/ddp_train.py`` under torchrun: 2 gloo processes, the run with ``process_group`` is the whole-batch run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_example_trains_the_whole_batch_model_on_two_processes():
    env = {k: v for k, v in os.environ.items() if k not in ("OODKERNELS_BACKEND",)}
    if sys.platform == "linux":  # gloo on the loopback: a sandboxed CI host's name may not resolve
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(ROOT / "examples" / "ddp_train.py"), "--epochs", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "OK: with process_group the DDP run is the whole-batch run" in result.stdout, output
    with_group, without = (
        float(line.rsplit(" ", 1)[1]) for line in result.stdout.splitlines() if "max |param - whole batch|" in line
    )
    # the per-rank normalisers (EnergyRegularizedLoss's group means) move the run away from the whole batch's
    assert without > 100 * with_group, output
