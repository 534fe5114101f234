"""Registry of named benchmark cases (KERNEL_GUIDE.md §9, SPEC.md §5).

A :class:`Case` says *what* to measure: the family, the criterion or score, the logits' shape, dtype and
memory format, the reduction, the hyper-parameters and the label pattern. ``bench/run.py`` decides *how*
(providers, modes, timer). Cases are data: sweeps are generated here, never hard-coded in the runner.

Names are ``<group>/<criterion>/<shape>/<dtype>[/cl]``, e.g. ``rows/EnergyRegularizedLoss/65536x1000/bf16``,
``sweep_b/EnergyRegularizedLoss/16384x100/fp32``, ``scores/energy/8x19x512x1024/bf16``. ``/cl`` marks
channels-last segmentation logits.

Groups
    ``rows``      issue #3: the row criteria at (65536, 1000) fp32 and bf16, (4096, 100), (256, 10) fp32 and
                  segmentation (8, 19, 512, 1024) bf16 (LogitNorm is classification-only: no 4-D case).
    ``cpu``       the CPU targets of SPEC §5: (8192, 1000) fp32 and (2, 19, 128, 256) fp32.
    ``sweep_b``   EnergyRegularizedLoss, B in {256, 1k, 4k, 16k, 64k} x C in {10, 100, 1000}, fp32 and bf16.
    ``sweep_c``   EnergyRegularizedLoss, C in {2, 10, 100, 1000, 8192, 32768} at B = 4096, fp32 and bf16.
    ``sweep_seg`` EnergyRegularizedLoss on the segmentation shapes of KERNEL_GUIDE §9, NCHW and channels-last.
    ``scores``    energy, max_softmax, max_logit, entropy at (8, 19, 512, 1024) bf16 and (65536, 1000) fp32/bf16,
                  plus the CPU shapes.
    ``scores5``   issue #5: weighted_energy and the exact entropy (``entropy_exact``, ``clip=False``) at
                  (8, 19, 512, 1024) bf16 and fp32, plus (2, 19, 128, 256) fp32 (quick).
    ``vos``       issue #5: one training step of VirtualOutlierSynthesizingRegLoss with full queues (C = 100,
                  D = 128, sample_number = 1000, sample_from = 10000), so every step synthesises outliers:
                  queue update, class means, pooled covariance, Cholesky, sampling and the energy terms.

``quick`` marks a CPU-friendly subset (small shapes) that ``run.py --quick`` runs in a few minutes on two
cores.

Unfused reference traffic (what fusion saves)
---------------------------------------------
Counted from ``oodkernels/reference`` and ATen's eager kernels, in passes over the ``R x C`` logits (R = read,
W = write of an R x C buffer); O(R) per-row ops are not counted. ``torch.logsumexp`` is ``amax`` (1R), ``x - m``
(1R 1W), ``exp_`` (1R 1W), ``sum`` (1R): **4R 2W**; its backward ``g * exp(x - lse)`` is 3R 3W; the target
gather's backward is a zero-fill plus scatter (1W); summing two R x C gradient branches is 2R 1W. Against this,
the fused kernels move 1R forward and 2R 1W backward (KERNEL_GUIDE §1.5). Add for every criterion:
bf16/fp16 logits: the upcast ``.to(float32)`` is 1R 1W forward and its backward cast 1R 1W;
4-D logits: ``movedim(1, -1).reshape`` copies, 1R 1W forward and 1R 1W backward.
See :data:`REFERENCE_PASSES` for each criterion; the numbers are reading counts, not measurements.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Iterable
from typing import Optional

#: (rows R, classes C) and the two large issue-#3 dtypes
ROW_CRITERIA = (
    "EnergyRegularizedLoss",
    "OutlierExposureLoss",
    "EntropicOpenSetLoss",
    "CrossEntropyLoss",
    "BackgroundClassLoss",
    "LogitNorm",
    "ConfidencePenaltyLoss",
    "MarginConfidenceLoss",
)

#: criteria that accept (N, C, H, W) logits; LogitNorm is classification only (LOSS_CONTRACT §3.10)
SEGMENTATION_CRITERIA = tuple(c for c in ROW_CRITERIA if c != "LogitNorm")

SCORES = ("energy", "max_softmax", "max_logit", "entropy")

#: the dispatched operation (oodkernels.ops) behind each criterion / score, for oodkernels.backend_info()
OP_NAMES = {
    "CACLoss": "cac_distance_loss",
    "CenterLoss": "center_distance_loss",
    "MCHADLoss": "mchad_distance_loss",
    "IILoss": "sq_distances",
    "DeepSVDDLoss": "sq_distances",
    "EnergyRegularizedLoss": "energy_regularized_loss",
    "OutlierExposureLoss": "outlier_exposure_loss",
    "EntropicOpenSetLoss": "entropic_open_set_loss",
    "CrossEntropyLoss": "cross_entropy",
    "BackgroundClassLoss": "background_class_loss",
    "LogitNorm": "logit_norm_loss",
    "ConfidencePenaltyLoss": "confidence_penalty_loss",
    "MarginConfidenceLoss": "margin_confidence_loss",
    "energy": "energy_score",
    "max_softmax": "max_softmax_score",
    "max_logit": "max_logit_score",
    "entropy": "entropy_score",
    "weighted_energy": "weighted_energy_score",
    "VirtualOutlierSynthesizingRegLoss": "ce_and_energy",
}

#: fp32 statistics per row that a fused forward saves for backward (KERNEL_GUIDE §2.5, ``k`` in §1.5)
STATS_PER_ROW = {
    "CrossEntropyLoss": 1,  # lse
    "BackgroundClassLoss": 1,  # lse
    "OutlierExposureLoss": 1,  # lse (the row mean is recomputed as c = -alpha/C)
    "EntropicOpenSetLoss": 1,  # lse
    "EnergyRegularizedLoss": 1,  # lse
    "ConfidencePenaltyLoss": 2,  # lse, argmax j*
    "MarginConfidenceLoss": 2,  # lse, argmax j*
    "LogitNorm": 3,  # n, lse_z, rho
}

#: unfused reference passes over the logits, fp32 (B, C), forward / backward (module docstring explains units)
REFERENCE_PASSES = {
    "CrossEntropyLoss": "fwd 4R 2W (logsumexp); bwd ~5R 5W (lse bwd 3R3W, gather bwd 1W, branch add 2R1W)",
    "BackgroundClassLoss": "fwd 4R 2W (logsumexp); bwd ~5R 5W (as CrossEntropyLoss)",
    "OutlierExposureLoss": "fwd 5R 2W (logsumexp, row mean 1R); bwd ~9R 7W (lse 3R3W, gather 1W, mean bwd 1W, 2 adds)",
    "EntropicOpenSetLoss": "fwd 5R 2W (as OutlierExposureLoss, alpha=1); bwd ~9R 7W",
    "EnergyRegularizedLoss": "fwd 4R 2W (logsumexp, shared by CE and energy); bwd ~5R 5W (lse grads merged per row)",
    "ConfidencePenaltyLoss": "fwd 5R 2W (logsumexp + amax 1R); bwd ~8R 7W (amax bwd: eq-mask 1R1W, scatter 1W, adds)",
    "MarginConfidenceLoss": "fwd 5R 2W (as ConfidencePenaltyLoss); bwd ~8R 7W",
    "LogitNorm": "fwd 7R 3W (norm 1R, x/s 1R1W, logsumexp 4R2W on z, gather); bwd ~12R 10W (CE bwd on z, div/norm bwd)",
}

SCORE_PASSES = {
    "energy": "5R 3W: x/t 1R1W, then logsumexp 4R2W on the scaled copy",
    "max_softmax": "~5R 3W: x/t 1R1W, softmax (amax, exp-sum, normalise: 3R 1W), max 1R",
    "max_logit": "1R: max over classes",
    "entropy": "~8R 4W: softmax 3R1W, clamp 1R1W, log 1R1W, mul 2R1W, sum 1R",
    "weighted_energy": "~6R 3W: amax 1R, x - m 1R1W, exp 1R1W, relu(w)*e 1R1W, sum 1R",
}

#: issue #5 scores at segmentation scale: the weighted energy (weights = ones(C)) and the exact entropy
ISSUE5_SCORES = (("weighted_energy", {}), ("entropy", {"clip": False}))

DTYPES = ("fp32", "bf16", "fp16", "fp64")
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case. ``shape`` is the logits' shape with the classes on dim 1."""

    name: str
    family: str  # "rows", "scores", "centers" or "vos"
    criterion: str  # class name in oodkernels.loss, or score name in oodkernels.scores
    shape: tuple
    dtype: str = "fp32"  # one of DTYPES
    reduction: Optional[str] = "mean"  # None for scores
    hparams: dict = dataclasses.field(default_factory=dict)  # constructor / score keyword arguments
    labels: str = "mixed"  # label pattern, see make_targets in run.py
    ood_fraction: float = 0.25  # share of OOD entries (target -1) for "mixed"
    memory_format: str = "contiguous"  # or "channels_last" (4-D only)
    quick: bool = False  # in the CPU-friendly --quick subset
    group: str = ""  # rows / cpu / sweep_b / sweep_c / sweep_seg / scores
    x_name: str = "rows"  # the swept variable, for plots
    x_value: float = 0.0
    note: str = ""  # unfused reference passes over the logits

    @property
    def rows(self) -> int:
        """R: entries with one label each (samples or pixels)."""
        n = self.shape[0]
        for d in self.shape[2:]:
            n *= d
        return n

    @property
    def classes(self) -> int:
        return self.shape[1]

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def stats_per_row(self) -> int:
        return STATS_PER_ROW.get(self.criterion, 1)

    def bytes_model(self, mode: str, target_itemsize: int = 8, weight_itemsize: int = 0) -> int:
        """Bytes a fused implementation must move (KERNEL_GUIDE §1.5).

        rows:   fwd / no-grad ``R·C·s + R·(s_t + s_w + 4k)`` (+4R for 'none');
                bwd ``2·R·C·s + R·(s_t + s_w + 4k + s_go)``; full = fwd + bwd.
        scores: ``R·C·s + 4R``.
        """
        r, c, s = self.rows, self.classes, self.itemsize
        if self.family == "centers":
            # features (B, D) and centers (K, D) read once forward (plus labels and 3 fp32 stats per row);
            # backward re-reads both for the recompute, writes and re-reads G (B, K) fp32, and runs two GEMMs
            # that read X, M, G and write dX, dM
            k = int(self.hparams.get("n_classes", 1))
            operands = (r * c + k * c) * s
            fwd = operands + r * (target_itemsize + 12)
            bwd = 2 * operands + 3 * r * k * 4 + r * (target_itemsize + 12) + operands
            return {"fwd": fwd, "no-grad": fwd, "bwd": bwd, "full": fwd + bwd}[mode]
        if self.family == "scores":
            return r * c * s + 4 * r
        if self.family == "vos":
            # the queues (C, S, D) fp32 are read for the class means and again for the pooled covariance; the
            # sampled outliers (C, T, D) are written and read once by the log-density (T = sample_from)
            queues = c * int(self.hparams["sample_number"]) * int(self.hparams["n_dim"]) * 4
            draws = c * int(self.hparams.get("sample_from", 10000)) * int(self.hparams["n_dim"]) * 4
            return 2 * queues + 2 * draws + 3 * r * c * s
        k = self.stats_per_row
        per_row_fwd = target_itemsize + weight_itemsize + 4 * k + (4 if self.reduction in ("none", None) else 0)
        s_go = s if self.reduction in ("none", None) else 0
        fwd = r * c * s + r * per_row_fwd
        bwd = 2 * r * c * s + r * (target_itemsize + weight_itemsize + 4 * k + s_go)
        if mode in ("fwd", "no-grad"):
            return fwd
        if mode == "bwd":
            return bwd
        if mode == "full":
            return fwd + bwd
        raise ValueError(f"mode: expected fwd, bwd, full or no-grad, got {mode!r}")

    def flops_model(self, mode: str) -> int:
        """Floating-point operations of a step's matrix products (the center family; 0 elsewhere, where the
        elementwise work is far below the bytes' time on any GPU).

        CAC / Center / MCHAD through ``crit(crit.distance(z), y)``: the distance GEMM ``2·B·K·D`` forward; the
        backward's two GEMMs ``dX = 2·(rowsum(G)⊙X − G·M)`` and ``dM = 2·(colsum(G)⊙M − Gᵀ·X)``, ``4·B·K·D``
        (the clamp mask comes from the saved distances, no recompute). IILoss: the class-mean pair distances
        ``2·K²·D`` forward and twice that backward, plus ``O(B·D)``; DeepSVDD: ``O(B·D)``.
        """
        if self.family != "centers":
            return 0
        b, d = self.rows, self.classes
        k = int(self.hparams.get("n_classes", 1))
        if self.criterion in ("CACLoss", "CenterLoss", "MCHADLoss"):
            fwd, bwd = 2 * b * k * d, 4 * b * k * d
        elif self.criterion == "IILoss":
            fwd, bwd = 2 * k * k * d + 4 * b * d, 4 * k * k * d + 6 * b * d
        else:
            fwd, bwd = 3 * b * d, 4 * b * d
        return {"fwd": fwd, "no-grad": fwd, "bwd": bwd, "full": fwd + bwd}[mode]

    def resolved_hparams(self) -> dict:
        """The hyper-parameters with the constructor's (or score's) defaults filled in."""
        import oodkernels

        target = (
            getattr(oodkernels.loss, self.criterion)
            if self.family in ("rows", "centers", "vos")
            else getattr(oodkernels.scores, self.criterion)
        )
        try:
            sig = inspect.signature(target)
        except (TypeError, ValueError):
            return dict(self.hparams)
        out = {}
        for name, p in sig.parameters.items():
            # tensors and the modules a VOS criterion is built from are inputs, not hyper-parameters
            if name in ("self", "reduction", "logits", "targets", "target", "input"):
                continue
            if name in ("logistic_regression", "weights_energy", "fc"):
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if name in self.hparams:
                out[name] = self.hparams[name]
            elif p.default is not p.empty:
                out[name] = p.default
        for name, value in self.hparams.items():  # case parameters outside the signature (VOS: n_dim)
            out.setdefault(name, value)
        return out

    def config(self) -> dict:
        """What goes into the result rows' ``config_json``."""
        return {
            "family": self.family,
            "criterion": self.criterion,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "memory_format": self.memory_format,
            "reduction": self.reduction,
            "hparams": self.resolved_hparams(),
            "labels": self.labels,
            "ood_fraction": self.ood_fraction if self.labels == "mixed" else None,
        }


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------

CASES: dict[str, Case] = {}

FAMILIES = ("rows", "scores", "centers", "vos")


def register(case: Case, replace: bool = False) -> Case:
    """Add ``case`` to the registry (an error if the name is taken, unless ``replace``)."""
    if case.dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {case.dtype!r}")
    if case.family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {case.family!r}")
    if case.name in CASES and not replace:
        raise ValueError(f"case {case.name!r} is already registered")
    CASES[case.name] = case
    return case


def get(name: str) -> Case:
    return CASES[name]


def select(
    quick: bool = False,
    family: Optional[str] = None,
    pattern: Optional[str] = None,
    cases: Optional[Iterable[Case]] = None,
) -> list[Case]:
    """Registered cases in registration order, filtered by ``quick``, ``family`` and a regex on the name."""
    regex = re.compile(pattern) if pattern else None
    out = []
    for case in CASES.values() if cases is None else cases:
        if quick and not case.quick:
            continue
        if family and case.family != family:
            continue
        if regex and not regex.search(case.name):
            continue
        out.append(case)
    return out


def _shape_name(shape) -> str:
    return "x".join(str(d) for d in shape)


def row_case(
    group,
    criterion,
    shape,
    dtype,
    quick=False,
    memory_format="contiguous",
    x_name="rows",
    x_value=None,
    hparams=None,
    reduction="mean",
) -> Case:
    """A row-family case with the default hyper-parameters (BackgroundClassLoss gets n_classes = C - 1)."""
    hp = dict(hparams or {})
    if criterion == "BackgroundClassLoss":
        hp.setdefault("n_classes", shape[1] - 1)
    name = f"{group}/{criterion}/{_shape_name(shape)}/{dtype}" + ("/cl" if memory_format == "channels_last" else "")
    rows = shape[0]
    for d in shape[2:]:
        rows *= d
    return Case(
        name=name,
        family="rows",
        criterion=criterion,
        shape=tuple(shape),
        dtype=dtype,
        reduction=reduction,
        hparams=hp,
        memory_format=memory_format,
        quick=quick,
        group=group,
        x_name=x_name,
        x_value=float(rows if x_value is None else x_value),
        note=REFERENCE_PASSES.get(criterion, ""),
    )


def score_case(group, score, shape, dtype, quick=False, hparams=None, suffix="") -> Case:
    rows = shape[0]
    for d in shape[2:]:
        rows *= d
    return Case(
        name=f"{group}/{score}{suffix}/{_shape_name(shape)}/{dtype}",
        hparams=dict(hparams or {}),
        family="scores",
        criterion=score,
        shape=tuple(shape),
        dtype=dtype,
        reduction=None,
        labels="none",
        quick=quick,
        group=group,
        x_name="rows",
        x_value=float(rows),
        note=SCORE_PASSES.get(score, ""),
    )


#: the center criteria: constructor arguments for (B, K, D); CAC's anchors live in K dimensions (D = K)
CENTER_CRITERIA = ("CACLoss", "CenterLoss", "MCHADLoss", "IILoss", "DeepSVDDLoss")

#: unfused reference passes (pytorch-ood / reference eager), in units of the (B, K) distance matrix
CENTER_PASSES = (
    "distance(): norms 1R of X, mm B·K·D, two broadcasts and a clamp: ~4 B×K passes written and read; loss: "
    "gather, exp/log or masks over B×K, 3-6 more passes; backward mirrors each (~2x), plus the mm gradients"
)


def center_case(group, criterion, batch, n_centers, n_dim, dtype, quick=False) -> Case:
    """A center-family case: features (B, D), K centers; ``shape`` is the features' shape (B, D)."""
    if criterion == "CACLoss":
        n_dim = n_centers
        hparams = {"n_classes": n_centers}
    elif criterion == "IILoss":
        hparams = {"n_classes": n_centers, "n_embedding": n_dim}
    elif criterion == "DeepSVDDLoss":
        n_centers = 1
        hparams = {"n_dim": n_dim}
    else:
        hparams = {"n_classes": n_centers, "n_dim": n_dim}
    return Case(
        name=f"{group}/{criterion}/{batch}x{n_centers}x{n_dim}/{dtype}",
        family="centers",
        criterion=criterion,
        shape=(batch, n_dim),
        dtype=dtype,
        reduction="mean" if criterion == "DeepSVDDLoss" else None,
        hparams=hparams,
        quick=quick,
        group=group,
        x_name="rows",
        x_value=float(batch),
        note=CENTER_PASSES,
    )


def vos_case(batch, n_classes, n_dim, sample_number, dtype="fp32", quick=False) -> Case:
    """One VOS-synthesis training step: logits (B, C), features (B, D), queues already full."""
    return Case(
        name=f"vos/VirtualOutlierSynthesizingRegLoss/{batch}xC{n_classes}xD{n_dim}xS{sample_number}/{dtype}",
        family="vos",
        criterion="VirtualOutlierSynthesizingRegLoss",
        shape=(batch, n_classes),
        dtype=dtype,
        hparams={"n_dim": n_dim, "sample_number": sample_number},
        labels="all-id",
        quick=quick,
        group="vos",
        x_name="rows",
        x_value=float(batch),
        note="reference: vectorised queue update, one Cholesky per step; pytorch-ood: per-sample and per-class loops",
    )


def _build() -> None:
    # issue #3: the row criteria at the large and small shapes
    issue3 = [
        ((65536, 1000), "fp32"),
        ((65536, 1000), "bf16"),
        ((4096, 100), "fp32"),
        ((256, 10), "fp32"),
        ((1024, 1000), "fp32"),  # issue #13's CPU target shapes: (256, 10), (4096, 100), (1024, 1000)
        ((8, 19, 512, 1024), "bf16"),
    ]
    quick_shapes = {(4096, 100), (256, 10), (1024, 1000)}
    for shape, dtype in issue3:
        for crit in ROW_CRITERIA:
            if len(shape) > 2 and crit not in SEGMENTATION_CRITERIA:
                continue
            register(row_case("rows", crit, shape, dtype, quick=tuple(shape) in quick_shapes))

    # SPEC §5 CPU targets, scaled for a 2-core machine
    for shape in ((8192, 1000), (2, 19, 128, 256)):
        for crit in ROW_CRITERIA:
            if len(shape) > 2 and crit not in SEGMENTATION_CRITERIA:
                continue
            register(row_case("cpu", crit, shape, "fp32", quick=True))

    # KERNEL_GUIDE §9 sweeps, EnergyRegularizedLoss, fp32 and bf16
    for dtype in ("fp32", "bf16"):
        for c in (10, 100, 1000):
            for b in (256, 1024, 4096, 16384, 65536):
                register(row_case("sweep_b", "EnergyRegularizedLoss", (b, c), dtype, x_name="B", x_value=b))
        for c in (2, 10, 100, 1000, 8192, 32768):
            register(row_case("sweep_c", "EnergyRegularizedLoss", (4096, c), dtype, x_name="C", x_value=c))
    for shape in ((8, 19, 512, 1024), (16, 150, 512, 512), (16, 21, 512, 512)):
        for fmt in ("contiguous", "channels_last"):
            register(
                row_case(
                    "sweep_seg", "EnergyRegularizedLoss", shape, "bf16", memory_format=fmt, x_name="C", x_value=shape[1]
                )
            )

    # post-hoc scores
    for score in SCORES:
        for shape, dtype, quick in (
            ((8, 19, 512, 1024), "bf16", False),
            ((65536, 1000), "fp32", False),
            ((65536, 1000), "bf16", False),
            ((8192, 1000), "fp32", True),
            ((2, 19, 128, 256), "fp32", True),
        ):
            register(score_case("scores", score, shape, dtype, quick=quick))
    # issue #5: the new fused scores at segmentation scale (plus a CPU-sized quick case)
    for score, hparams in ISSUE5_SCORES:
        suffix = "_exact" if hparams.get("clip") is False else ""
        for shape, dtype, quick in (
            ((8, 19, 512, 1024), "bf16", False),
            ((8, 19, 512, 1024), "fp32", False),
            ((2, 19, 128, 256), "fp32", True),
        ):
            register(score_case("scores5", score, shape, dtype, quick=quick, hparams=hparams, suffix=suffix))

    # issue #4: the center family, (65536, 512) x 1000 centers fp32 and bf16, (4096, 128) x 100; issue #14: the
    # large shape cut to a 2-core CPU, (65536 / 16, 512) x 1000
    for criterion in CENTER_CRITERIA:
        for batch, n_centers, n_dim, dtype, quick in (
            (65536, 1000, 512, "fp32", False),
            (65536, 1000, 512, "bf16", False),
            (4096, 100, 128, "fp32", True),
            (4096, 1000, 512, "fp32", False),
        ):
            register(center_case("centers", criterion, batch, n_centers, n_dim, dtype, quick=quick))

    # issue #5: VOS synthesis at C = 100, D = 128, sample_number = 1000 (a CIFAR-100 batch of 128)
    register(vos_case(128, 100, 128, 1000))


_build()
