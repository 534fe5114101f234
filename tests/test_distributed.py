"""``process_group=``: under DistributedDataParallel the criteria normalise by the whole batch's counts.

Spawned worlds of 2 and 3 ranks on the gloo backend (``tests/_ddp.py`` runs the ranks, once per world for
the whole session, shared by the pytest workers through a file lock). For every criterion that takes a
``process_group`` (the eight row criteria, classification and segmentation, the batch-coupled ones and the
paired API), on the C++ backend and the reference (the Triton kernels too, in the interpreter, in the world
of 2), with uneven shards, a rank without OOD rows, a rank with only ignored pixels and a rank with only OOD
rows:

* the DDP-averaged gradient of every parameter equals the single-process gradient on the whole batch;
* the mean of the ranks' losses equals the whole-batch loss;
* ``process_group=None`` keeps each rank's own loss (pytorch-ood's value on its shard).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from _ddp import CASES
from _ddp import backends_of
from _ddp import local_value
from _ddp import loss_and_grads
from _ddp import run_rank
from _ddp import shards

import oodkernels.functional as F
import oodkernels.loss as L
import oodkernels.reference as R

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLDS = (2, 3)
#: a world runs in about 10 s on 2 cores; a deadlock (a collective one rank skipped) must not hang CI
WORLD_TIMEOUT_S = 240


def _spawn(world: int, target) -> None:
    import torch.multiprocessing as mp

    init_file = f"{target}.init"
    context = mp.start_processes(
        run_rank, args=(world, init_file, str(target)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + WORLD_TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"the world of {world} ranks did not finish in {WORLD_TIMEOUT_S} s")


@pytest.fixture(scope="session")
def world_results(request, tmp_path_factory):
    """``world -> [rank results]``: each world is spawned once per session, whichever pytest worker asks first."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if hasattr(request.config, "workerinput") else base
    cache = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            target = root / f"ddp-world{world}"
            with FileLock(f"{target}.lock"):
                if not all((root / f"ddp-world{world}.rank{r}").exists() for r in range(world)):
                    _spawn(world, target)
            cache[world] = [torch.load(f"{target}.rank{r}", weights_only=False) for r in range(world)]
        return cache[world]

    return get


def _close(actual, expected, what: str) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=1e-9,
        atol=1e-12,
        equal_nan=True,  # an all-ignored shard's own 'mean' is NaN (PyTorch's), as the reference's
        msg=lambda m: f"{what}: {m}",
    )


PARAMS = [
    pytest.param(world, name, backend, id=f"W{world}-{name}-{backend}")
    for world in WORLDS
    for name in CASES
    for backend in backends_of(name, world)
]


@pytest.mark.parametrize("world,name,backend", PARAMS)
def test_ddp_gradient_and_mean_loss_are_the_whole_batch_ones(world_results, world, name, backend):
    ranks = world_results(world)
    case = CASES[name]
    parts = shards(case, world)
    if case.whole_batch:
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        whole = case.make(None, module=R)
        expected_loss, expected = loss_and_grads(whole, x, y)
        losses = [ranks[r][(name, backend)]["loss"] for r in range(world)]
        _close(sum(losses) / world, expected_loss, f"{name}: mean of the ranks' losses vs the whole-batch loss")
        # the criterion's state after the step (IILoss's running centers) is the whole batch's on every rank
        for r in range(world):
            for n, buffer in whole.named_buffers():
                _close(ranks[r][(name, backend)]["buffers"][n], buffer, f"{name}: rank {r}'s buffer {n}")
    else:
        # per-rank losses; DDP averages the parameters' gradients (the centers' included) over the ranks
        local = [loss_and_grads(case.make(None, module=R), *parts[r]) for r in range(world)]
        expected = {n: sum(g[n] for _, g in local) / world for n in local[0][1]}
        for r in range(world):
            _close(ranks[r][(name, backend)]["loss"], local[r][0], f"{name}: rank {r}'s own loss")
    for r in range(world):
        grads = ranks[r][(name, backend)]["grads"]
        assert {n.removeprefix("module.") for n in grads} == set(expected), f"{name}: parameters with a gradient"
        for n, g in grads.items():
            _close(g, expected[n.removeprefix("module.")], f"{name}: rank {r}'s DDP gradient of {n}")


@pytest.mark.parametrize("world,name,backend", PARAMS)
def test_without_a_group_each_rank_keeps_its_own_loss(world_results, world, name, backend):
    ranks = world_results(world)
    case = CASES[name]
    for r, (x, y) in enumerate(shards(case, world)):
        expected = local_value(case.make(None, module=R), x, y)
        actual = ranks[r][(name, backend)]["local_loss"]
        if isinstance(expected, str) or isinstance(actual, str):
            assert actual == expected, f"{name}: rank {r} without a group"
        else:
            _close(actual, expected, f"{name}: rank {r}'s loss without a group")


@pytest.mark.parametrize("world", WORLDS)
def test_sum_is_unaffected_by_the_group(world_results, world):
    for r, rank in enumerate(world_results(world)):
        with_group, without = rank["sum"]
        assert with_group == without, f"rank {r}: 'sum' with the group {with_group} != {without} without"


def test_the_group_normaliser_compiles_without_a_graph_break(world_results):
    for r, rank in enumerate(world_results(2)):
        compiled, eager = rank["compiled"]
        _close(compiled, eager, f"rank {r}: torch.compile(fullgraph=True) vs eager")


@pytest.mark.parametrize("bad", [3, "WORLD", object()], ids=["int", "str", "object"])
def test_a_wrong_group_type_raises_a_clear_error(bad):
    logits, targets = torch.randn(4, 3), torch.tensor([0, 1, -1, 2])
    with pytest.raises(TypeError, match="process_group: expected None or a torch.distributed.ProcessGroup"):
        L.EnergyRegularizedLoss(process_group=bad)
    with pytest.raises(TypeError, match="process_group: expected None or a torch.distributed.ProcessGroup"):
        F.cross_entropy(logits, targets, process_group=bad)
    with pytest.raises(TypeError, match="process_group: expected None or a torch.distributed.ProcessGroup"):
        R.outlier_exposure_loss(logits, targets, process_group=bad)
