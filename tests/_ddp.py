"""The distributed cases of ``tests/test_distributed.py``: their data, models and the spawned ranks' work.

Each case is a small model (a linear layer, a 1x1 convolution for segmentation) with the criterion inside it,
so that ``DistributedDataParallel`` averages the gradients of every parameter (the model's, and the
criterion's own: VOS's logistic regression, the centers). The whole batch is split into uneven shards, one
per rank, with the edge cases the global normalisers exist for: rank 0 holds no OOD rows (classification)
or only ignored pixels (segmentation), and in a world of 3 the last rank holds only OOD rows.

:func:`run_rank` is what every spawned rank runs (gloo, CPU, float64): for each case and backend, the loss
and the DDP-averaged gradients with ``process_group=WORLD``, and the loss with ``process_group=None`` on the
rank's shard. The test process computes the single-process references from the same definitions.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

N_CLASSES = 5
N_FEATURES = 4
N_EMBEDDING = 3
HEIGHT, WIDTH = 3, 4
IGNORE = 255

#: (rows per rank) of a classification batch and (images per rank) of a segmentation one
CLASSIFICATION_SHARDS = {2: (5, 11), 3: (3, 9, 6)}
SEGMENTATION_SHARDS = {2: (1, 2), 3: (1, 1, 2)}


@dataclass(frozen=True)
class Case:
    """One criterion under DDP: ``make(process_group)`` builds the model with the criterion inside."""

    name: str
    make: Callable
    segmentation: bool = False
    #: the highest ID label + 1 (BackgroundClassLoss keeps the last column for the background)
    n_labels: int = N_CLASSES
    #: whether the rank-averaged DDP gradient equals the whole batch's (False: per-rank state, see README)
    whole_batch: bool = True


class Classifier(nn.Module):
    """``criterion(head(x), y)``, or ``criterion(head(x), y, **extra)`` through ``call``."""

    def __init__(self, criterion, head: nn.Module, call=None):
        super().__init__()
        self.head = head
        self.criterion = criterion
        self.call = call

    def forward(self, x, y):
        out = self.head(x)
        if self.call is not None:
            return self.call(self, out, y)
        return self.criterion(out, y)


def _seeded(seed: int):
    torch.manual_seed(seed)


def _linear(out_features: int = N_CLASSES, in_features: int = N_FEATURES) -> nn.Module:
    _seeded(1)
    return nn.Linear(in_features, out_features, dtype=torch.float64)


def _conv() -> nn.Module:
    _seeded(2)
    return nn.Conv2d(N_FEATURES, N_CLASSES, 1, dtype=torch.float64)


def _row(name: str, **kwargs) -> Callable:
    import oodkernels.loss as L

    def make(process_group, module=None):
        module = module or L
        return Classifier(getattr(module, name)(**kwargs, process_group=process_group), _linear())

    return make


def _seg(name: str, **kwargs) -> Callable:
    import oodkernels.loss as L

    def make(process_group, module=None):
        module = module or L
        criterion = getattr(module, name)(**kwargs, ignore_index=IGNORE, process_group=process_group)
        return Classifier(criterion, _conv())

    return make


def _confidence(process_group, module=None):
    import oodkernels.loss as L

    module = module or L

    def call(model, out, y):
        return model.criterion(out[:, :N_CLASSES], torch.sigmoid(out[:, N_CLASSES:]), y)

    return Classifier(module.ConfidenceLoss(process_group=process_group), _linear(N_CLASSES + 1), call)


def _objectosphere(process_group, module=None):
    import oodkernels.loss as L

    module = module or L
    _seeded(3)
    features = nn.Linear(N_FEATURES, N_EMBEDDING, dtype=torch.float64)
    model = Classifier(module.ObjectosphereLoss(process_group=process_group), features, None)
    model.logits = _linear(N_CLASSES, N_EMBEDDING)
    model.call = lambda m, z, y: m.criterion(m.logits(z), z, y)
    return model


def _vos(process_group, module=None):
    import oodkernels.loss as L

    module = module or L
    _seeded(4)
    logistic = nn.Linear(1, 2, dtype=torch.float64)
    energy = nn.Linear(N_CLASSES, 1, dtype=torch.float64)
    nn.init.uniform_(energy.weight)
    return Classifier(module.VOSRegLoss(logistic, energy, process_group=process_group), _linear())


def _energy_margin(process_group, module=None):
    import oodkernels.loss as L

    module = module or L
    model = Classifier(module.EnergyMarginLoss(full_train_loss=1.0, process_group=process_group), _linear())
    _seeded(5)
    model.phi = nn.Linear(1, 1, dtype=torch.float64)
    model.call = lambda m, out, y: m.criterion(out, y, m.phi)
    return model


def _paired(name: str, **kwargs):
    def make(process_group, module=None):
        import oodkernels.paired as P
        import oodkernels.reference.paired as RP

        fn = getattr(RP if module is not None else P, name)

        def call(model, out, y):
            is_in = y >= 0
            return fn(out[is_in], y[is_in], out[~is_in], **kwargs, process_group=process_group)

        return Classifier(None, _linear(), call)

    return make


def _centers(name: str, embedding_dim: int = N_EMBEDDING, **kwargs):
    """A center criterion (float64 centers) on the embeddings of a linear layer: ``criterion(distance(z), y)``,
    or ``criterion(z, y)`` for the one-center ones (DeepSVDD, DeepSAD)."""

    def make(process_group, module=None):
        import oodkernels.loss as L

        module = module or L
        _seeded(6)
        criterion = getattr(module, name)(**kwargs, process_group=process_group).double()
        model = Classifier(criterion, _linear(embedding_dim), None)
        if hasattr(criterion, "distance") and name not in ("DeepSVDDLoss", "DeepSADLoss", "IILoss"):
            model.call = lambda m, z, y: m.criterion(m.criterion.distance(z), y)
        return model

    return make


def _one_call_mchad(process_group, module=None):
    """``functional.mchad_loss(features, centers, targets)``: the one-call form, centers as a parameter."""
    import oodkernels.functional as F
    import oodkernels.reference as R

    fn = R.distances.mchad_loss if module is not None else F.mchad_loss
    model = Classifier(None, _linear(N_EMBEDDING), None)
    _seeded(7)
    model.centers = nn.Parameter(torch.randn(N_CLASSES, N_EMBEDDING, dtype=torch.float64))
    model.call = lambda m, z, y: fn(z, m.centers, y, margin=2.0, process_group=process_group)
    return model


ROW_CRITERIA = (
    ("CrossEntropyLoss", {}),
    ("BackgroundClassLoss", {"n_classes": N_CLASSES - 1}),
    ("OutlierExposureLoss", {}),
    ("EntropicOpenSetLoss", {}),
    ("EnergyRegularizedLoss", {"margin_in": -2.0, "margin_out": -1.0}),
    ("ConfidencePenaltyLoss", {}),
    ("MarginConfidenceLoss", {"margin": 0.2}),
    ("LogitNorm", {}),
)

CASES = {
    **{name: Case(name, _row(name, **kw), n_labels=kw.get("n_classes", N_CLASSES)) for name, kw in ROW_CRITERIA},
    **{
        f"{name}-segmentation": Case(
            f"{name}-segmentation", _seg(name, **kw), segmentation=True, n_labels=kw.get("n_classes", N_CLASSES)
        )
        for name, kw in ROW_CRITERIA
        if name != "LogitNorm"
    },
    "ConfidenceLoss": Case("ConfidenceLoss", _confidence),
    "ObjectosphereLoss": Case("ObjectosphereLoss", _objectosphere),
    "VOSRegLoss": Case("VOSRegLoss", _vos),
    "EnergyMarginLoss": Case("EnergyMarginLoss", _energy_margin),
    "paired.outlier_exposure": Case("paired.outlier_exposure", _paired("outlier_exposure")),
    "paired.energy_margin": Case("paired.energy_margin", _paired("energy_margin", margin=1.0)),
    "CenterLoss": Case("CenterLoss", _centers("CenterLoss", n_classes=N_CLASSES, n_dim=N_EMBEDDING)),
    "CACLoss": Case("CACLoss", _centers("CACLoss", N_CLASSES, n_classes=N_CLASSES)),
    "MCHADLoss": Case("MCHADLoss", _centers("MCHADLoss", n_classes=N_CLASSES, n_dim=N_EMBEDDING, margin=2.0)),
    "DeepSVDDLoss": Case("DeepSVDDLoss", _centers("DeepSVDDLoss", n_dim=N_EMBEDDING)),
    "DeepSADLoss": Case("DeepSADLoss", _centers("DeepSADLoss", n_dim=N_EMBEDDING)),
    "functional.mchad_loss": Case("functional.mchad_loss", _one_call_mchad),
    "IILoss": Case("IILoss", _centers("IILoss", n_classes=N_CLASSES, n_embedding=N_EMBEDDING)),
    # without a group the centers are still parameters: DDP averages their gradients over the per-rank losses
    "CenterLoss-without-group": Case(
        "CenterLoss-without-group",
        _centers("CenterLoss", n_classes=N_CLASSES, n_dim=N_EMBEDDING),
        whole_batch=False,
    ),
}

#: the cases the Triton kernels run (in the interpreter on a CPU: the row criteria only, in the world of 2)
TRITON_CASES = tuple(name for name in CASES if any(name.startswith(r) for r, _ in ROW_CRITERIA))


def shards(case: Case, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The whole batch as ``world`` uneven shards ``(x, y)``, float64 inputs, int64 labels."""
    g = torch.Generator().manual_seed(sum(map(ord, case.name)) + world)
    out = []
    sizes = (SEGMENTATION_SHARDS if case.segmentation else CLASSIFICATION_SHARDS)[world]
    for rank, size in enumerate(sizes):
        if case.segmentation:
            x = torch.randn(size, N_FEATURES, HEIGHT, WIDTH, generator=g, dtype=torch.float64)
            y = torch.randint(-1, case.n_labels, (size, HEIGHT, WIDTH), generator=g)
            y[torch.rand(y.shape, generator=g) < 0.2] = IGNORE
            if rank == 0:
                y.fill_(IGNORE)  # only ignored pixels
        else:
            x = torch.randn(size, N_FEATURES, generator=g, dtype=torch.float64)
            y = torch.randint(0, case.n_labels, (size,), generator=g)
            if rank > 0:
                y[: size // 2] = -1 - torch.randint(0, 3, (size // 2,), generator=g)
            if world == 3 and rank == 2:
                y.fill_(-1)  # only OOD rows
        out.append((x, y))
    return out


def loss_and_grads(model: nn.Module, x, y):
    """The loss value and the gradients of every parameter, by name."""
    model.zero_grad(set_to_none=True)
    loss = model(x, y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def local_value(model: nn.Module, x, y):
    """The loss of one shard without a group, or the error it raises (EnergyMarginLoss without a group)."""
    try:
        return model(x, y).item()
    except ValueError as error:
        return f"ValueError: {error}"


def backends_of(case_name: str, world: int) -> list[str]:
    backends = ["cpp", "reference"]
    if world == 2 and case_name in TRITON_CASES:
        backends.append("triton")
    return backends


def run_rank(rank: int, world: int, init_file: str, out_file: str) -> None:
    """One spawned rank: every case on every backend, saved to ``out_file`` (``.rank<r>`` appended)."""
    os.environ["TRITON_INTERPRET"] = "1"
    if sys.platform == "linux":  # gloo on the loopback: a sandboxed CI host's name may not resolve
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.distributed as dist

    try:  # the interpreter's speed-up the test process installs (conftest.py)
        import _interpreter
    except ImportError:  # pragma: no cover - triton is not installed
        pass
    else:
        _interpreter.install()

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel

    results = {}
    try:
        for name, case in CASES.items():
            x, y = shards(case, world)[rank]
            for backend in backends_of(name, world):
                os.environ["OODKERNELS_BACKEND"] = backend
                model = case.make(None if not case.whole_batch else dist.group.WORLD)
                # VOS's weights_energy has a bias its criterion never uses (pytorch-ood's module)
                ddp = DistributedDataParallel(model, find_unused_parameters=True)
                loss, grads = loss_and_grads(ddp, x, y)
                local_loss = local_value(case.make(None), x, y)
                results[(name, backend)] = {
                    "loss": loss,
                    "grads": grads,
                    "local_loss": local_loss,
                    "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
                }
        # 'sum' is unaffected by the group; and the criterion compiles (the all-reduce traced, no graph break)
        os.environ["OODKERNELS_BACKEND"] = "cpp"
        import oodkernels.loss as L

        case = CASES["EnergyRegularizedLoss"]
        x, y = shards(case, world)[rank]
        logits = _linear()(x)
        results["sum"] = (
            L.EnergyRegularizedLoss(reduction="sum", process_group=dist.group.WORLD)(logits, y).item(),
            L.EnergyRegularizedLoss(reduction="sum")(logits, y).item(),
        )
        if world == 2:
            criterion = torch.compile(L.EnergyRegularizedLoss(process_group=dist.group.WORLD), fullgraph=True)
            compiled = criterion(logits, y)
            eager = L.EnergyRegularizedLoss(process_group=dist.group.WORLD)(logits, y)
            results["compiled"] = (compiled.item(), eager.item())
    finally:
        torch.save(results, f"{out_file}.rank{rank}")
        dist.destroy_process_group()
