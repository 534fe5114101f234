"""``python -m oodkernels.demo``: train a small OOD-aware classifier twice, fused and reference, side by side.

The main job of the package, end to end on a CPU in well under two minutes:

* **Data.** scikit-learn's bundled handwritten digits (``load_digits``: 1797 images of 8 x 8 = 64
  pixels, nothing is downloaded). Digits 0-4 are in-distribution (ID), digits 5-9 are out-of-distribution
  (OOD). Per class, with a seeded permutation (so every split is stratified by digit):

  ===================  =====================================  ========
  part                 taken from                             size
  ===================  =====================================  ========
  ID train             70 % of each digit 0-4                 631
  ID test              the other 30 % (``round(0.3 * n)``)    270
  OE train             half of each digit 5-9 (``n // 2``)    447
  OOD test             the other half of each digit 5-9       449
  ===================  =====================================  ========

  The four parts are disjoint; the sizes do not depend on the seed, only which images land where.
  Outlier-exposure (OE) training samples get the label ``-1`` (targets ``< 0`` mark OOD for every
  criterion). Features are standardised with the mean and standard deviation of the training inputs
  (ID train and OE train together; constant pixels keep a scale of 1).
* **Model.** An MLP ``64 -> 128 -> ReLU -> 5`` (6 outputs for ``BackgroundClassLoss``: 5 digits + the
  background class), trained by SGD with momentum. Each training batch is a shuffled slice of ID train
  and OE train together, so batches mix both (about 41 % OE).
* **Two runs.** Two copies of the same initial model see the same batches in the same order: one is
  trained with the public criterion ``oodkernels.loss.<Name>`` (fused Triton kernels when the backend
  is ``triton``), the other with ``oodkernels.reference.<Name>`` (plain PyTorch), and is scored with the
  reference energy score. Each epoch prints both runs' training loss, ID test accuracy, and the AUROC and
  FPR at 95 % TPR of the energy score (higher = more OOD; ID test = negatives, OOD test = positives) on
  the ID-class logits, and the time per training step of both.
* **Check.** At the end the two runs must agree to within numerical noise (see :data:`TOLERANCES`);
  otherwise, or on any error, the demo exits with status 1 and says why.

Backends (``--backend``, default ``triton``): without a CUDA device the fused kernels run in the Triton
interpreter (``TRITON_INTERPRET=1``). Triton reads that variable when a kernel is *defined*, and
``python -m oodkernels.demo`` imports the package (and so defines the kernels) before this module runs,
so when the variable was not set at start-up the demo runs itself again in a child process with it set.
Interpreted timings are a correctness run, not a performance measurement. ``--backend cpp`` trains the
fused run with the C++ CPU kernels of ``csrc/`` instead (real CPU timings).
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from dataclasses import field
from typing import Callable
from typing import Optional

import numpy as np
import torch
from torch import nn

#: the logit criteria of the row family that ``--loss`` accepts
LOSSES = (
    "CrossEntropyLoss",
    "BackgroundClassLoss",
    "OutlierExposureLoss",
    "EntropicOpenSetLoss",
    "EnergyRegularizedLoss",
    "LogitNorm",
    "ConfidencePenaltyLoss",
    "MarginConfidenceLoss",
)

#: digits that are in-distribution (the classes) and out-of-distribution
ID_DIGITS = (0, 1, 2, 3, 4)
OOD_DIGITS = (5, 6, 7, 8, 9)
N_CLASSES = len(ID_DIGITS)
#: fraction of each ID digit held out for testing; fraction of each OOD digit used for outlier exposure
ID_TEST_FRACTION = 0.3
OE_FRACTION = 0.5
HIDDEN = 128
LEARNING_RATE = 0.05
MOMENTUM = 0.9

#: constructor arguments of each criterion in this demo (the rest keep pytorch-ood's defaults).
#: EnergyRegularizedLoss: the paper's CIFAR margins (m_in=-25, m_out=-7) ask a 5-class MLP for ID energies
#: below -25, i.e. ID logits above ~25; at initialisation every energy is about -log 5 = -1.6, so the squared
#: hinge (0.1 * 23.4^2 = 55) dwarfs the cross-entropy (1.6) and the first steps only inflate the logits. For a
#: model whose logits are a few units, m_in=-8 (a confident ID sample: max logit about 8) and m_out=-3 (an OOD
#: sample: logits near 0 to 1, energy about -log 5 - 1) keep the regulariser on the scale of the cross-entropy.
#: Measured (seed 0, 10 epochs): ID accuracy 1.000, AUROC 0.996, FPR95 0.011 with (-8, -3) against 0.981,
#: 0.995 and 0.011 with the paper's margins.
CRITERION_KWARGS = {
    "BackgroundClassLoss": {"n_classes": N_CLASSES},
    "EnergyRegularizedLoss": {"alpha": 0.1, "margin_in": -8.0, "margin_out": -3.0},
}

#: how closely the fused and the reference run must agree (fp32 training on the same batches: only the
#: order of floating-point operations differs, so the runs drift apart by rounding noise only)
TOLERANCES = {
    "loss_rel": 1e-4,  # |delta loss| <= 1e-4 * max(|loss|, 1e-3), every epoch
    "auroc_abs": 1e-3,  # |delta AUROC| <= 1e-3, every epoch
    "fpr95_samples": 1,  # |delta FPR@95TPR| <= 1 ID test sample (a threshold can move past one near-tie)
    "accuracy_samples": 1,  # |delta accuracy| <= 1 ID test sample (one near-tie argmax may flip)
    "param_abs": 1e-3,  # max |delta parameter| after training
}


# ------------------------------------------------------------------------------------------------ data


@dataclass
class DigitsSplit:
    """The demo's data, standardised, as float32 tensors.

    ``x_train (N_train, 64)`` / ``y_train (N_train,)``: ID train (labels 0-4) followed by OE train (label -1);
    ``x_id_test (N_id_test, 64)`` / ``y_id_test (N_id_test,)``; ``x_ood_test (N_ood_test, 64)``.
    ``index_*`` are the rows of ``load_digits()`` each part holds (int64 numpy arrays), ``digit_*`` their digits.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_id_test: torch.Tensor
    y_id_test: torch.Tensor
    x_ood_test: torch.Tensor
    index_id_train: np.ndarray
    index_id_test: np.ndarray
    index_oe_train: np.ndarray
    index_ood_test: np.ndarray
    digit_oe_train: np.ndarray
    digit_ood_test: np.ndarray

    def sizes(self) -> dict:
        """Number of images in each part."""
        return {
            "id_train": len(self.index_id_train),
            "id_test": len(self.index_id_test),
            "oe_train": len(self.index_oe_train),
            "ood_test": len(self.index_ood_test),
        }


def load_split(seed: int = 0) -> DigitsSplit:
    """Split scikit-learn's digits into ID train/test (digits 0-4), OE train and OOD test (digits 5-9).

    Per digit, a permutation drawn from ``numpy.random.default_rng(seed)`` puts ``round(0.3 * n)`` ID images
    into the test part and ``n // 2`` OOD images into the OE part (so every part is stratified by digit and
    its size does not depend on the seed). Features (B, 64) are standardised with the mean and standard
    deviation of ID train and OE train together.
    """
    from sklearn.datasets import load_digits

    x, digits = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    id_train, id_test, oe_train, ood_test = [], [], [], []
    for digit in (*ID_DIGITS, *OOD_DIGITS):
        rows = rng.permutation(np.flatnonzero(digits == digit))
        if digit in ID_DIGITS:
            n_test = int(round(ID_TEST_FRACTION * len(rows)))
            id_test.append(rows[:n_test])
            id_train.append(rows[n_test:])
        else:
            n_oe = int(OE_FRACTION * len(rows))
            oe_train.append(rows[:n_oe])
            ood_test.append(rows[n_oe:])
    id_train, id_test, oe_train, ood_test = (np.concatenate(p) for p in (id_train, id_test, oe_train, ood_test))

    train_rows = np.concatenate([id_train, oe_train])
    mean = x[train_rows].mean(axis=0)
    std = x[train_rows].std(axis=0)
    std = np.where(std > 0, std, 1.0)

    def features(rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((x[rows] - mean) / std).float()

    y_train = np.concatenate([digits[id_train], np.full(len(oe_train), -1)])
    return DigitsSplit(
        x_train=features(train_rows),
        y_train=torch.from_numpy(y_train).long(),
        x_id_test=features(id_test),
        y_id_test=torch.from_numpy(digits[id_test]).long(),
        x_ood_test=features(ood_test),
        index_id_train=id_train,
        index_id_test=id_test,
        index_oe_train=oe_train,
        index_ood_test=ood_test,
        digit_oe_train=digits[oe_train],
        digit_ood_test=digits[ood_test],
    )


# --------------------------------------------------------------------------------------------- metrics


def _checked_scores(scores_id, scores_ood) -> tuple[np.ndarray, np.ndarray]:
    neg = np.asarray(scores_id, dtype=np.float64).reshape(-1)
    pos = np.asarray(scores_ood, dtype=np.float64).reshape(-1)
    if neg.size == 0 or pos.size == 0:
        raise ValueError("scores: need at least one ID (negative) and one OOD (positive) score")
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise ValueError("scores: got a NaN or infinite OOD score")
    return neg, pos


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values (N,)`` in ascending order, tied values sharing the mean of their ranks."""
    values = np.asarray(values).reshape(-1)
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first position of each tie group
    ends = np.r_[starts[1:], len(values)]  # one past its last position
    group = np.cumsum(np.r_[True, ordered[1:] != ordered[:-1]]) - 1
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[group]
    return ranks


def auroc(scores_id, scores_ood) -> float:
    """Area under the ROC curve of an OOD score (higher = more OOD), by ranks (Mann-Whitney U).

    ``scores_id (N_neg,)`` are the negatives, ``scores_ood (N_pos,)`` the positives. The AUROC is the
    probability that a random OOD sample scores above a random ID sample, a tie counting one half:
    ``(R_pos - N_pos (N_pos + 1) / 2) / (N_pos N_neg)`` with ``R_pos`` the sum of the positives' ranks among
    all scores and tied scores given their average rank. 1 = perfect, 0.5 = chance, 0 = inverted.
    """
    neg, pos = _checked_scores(scores_id, scores_ood)
    ranks = average_ranks(np.concatenate([pos, neg]))
    n_pos, n_neg = pos.size, neg.size
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def fpr_at_tpr(scores_id, scores_ood, tpr: float = 0.95) -> float:
    """False-positive rate at the first threshold whose true-positive rate reaches ``tpr`` (FPR@95TPR).

    ``scores_id (N_neg,)`` are the negatives, ``scores_ood (N_pos,)`` the positives; a sample is flagged OOD
    when its score is ``>= t``. The threshold ``t`` is the ``k``-th largest OOD score with
    ``k = ceil(tpr * N_pos)``, the highest threshold that flags at least that fraction of the OOD samples
    (the first point of the ROC curve with TPR >= ``tpr``); the result is the fraction of ID samples with a
    score ``>= t``. 0 = perfect.
    """
    neg, pos = _checked_scores(scores_id, scores_ood)
    k = max(1, math.ceil(tpr * pos.size - 1e-9))
    threshold = np.sort(pos)[::-1][k - 1]
    return float((neg >= threshold).mean())


# ------------------------------------------------------------------------------------------- training


def make_model(n_outputs: int, hidden: int = HIDDEN) -> nn.Module:
    """The classifier: ``(B, 64) -> (B, n_outputs)`` logits."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, n_outputs))


@dataclass
class Run:
    """One training run: a model, its criterion and optimiser, and the score it is evaluated with.

    ``step_times``: wall time of each whole training step; ``loss_times``: of the criterion's forward and
    backward alone within it (the model's forward and backward excluded).
    """

    name: str
    model: nn.Module
    criterion: nn.Module
    score: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    step_times: list
    history: list
    loss_times: list = field(default_factory=list)
    #: the fused run's step check: the reference criterion on the same logits and targets (see :func:`train_step`)
    reference_criterion: Optional[nn.Module] = None
    #: per step: (relative loss difference, largest gradient difference relative to the largest gradient)
    step_checks: list = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """One SGD step on a batch; returns the loss and records the step's and the criterion's wall times.

    The criterion runs on a detached copy of the logits, and its gradient is then sent through the model:
    the same gradients as ``criterion(model(x), y).backward()``, with the criterion's own forward and backward
    timed apart from the model's. With ``run.reference_criterion`` (the fused run) the reference criterion is
    also evaluated on the same logits, outside the timing, and the differences of the loss and of its gradient
    are recorded in ``run.step_checks``: a check at every step that does not depend on how two training runs
    drift apart.
    """
    _sync(device)
    start = time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    logits = run.model(x)
    _sync(device)
    loss_start = time.perf_counter()
    leaf = logits.detach().requires_grad_(True)
    loss = run.criterion(leaf, y)
    loss.backward()
    _sync(device)
    run.loss_times.append(time.perf_counter() - loss_start)
    logits.backward(leaf.grad)
    run.optimizer.step()
    _sync(device)
    run.step_times.append(time.perf_counter() - start)
    if run.reference_criterion is not None:  # untimed: the fused criterion against the reference, same logits
        twin = logits.detach().requires_grad_(True)
        expected = run.reference_criterion(twin, y)
        expected.backward()
        scale = float(twin.grad.abs().max()) or 1.0
        run.step_checks.append(
            (
                abs(float(loss.detach()) - float(expected.detach())) / max(abs(float(expected.detach())), 1e-6),
                float((leaf.grad - twin.grad).abs().max()) / scale,
            )
        )
    return float(loss.detach())


@torch.no_grad()
def evaluate(run: Run, data: DigitsSplit, device: torch.device) -> dict:
    """ID test accuracy and the AUROC and FPR@95TPR of the energy score of the ID-class logits (B, 5)."""
    run.model.eval()
    logits_id = run.model(data.x_id_test.to(device))[:, :N_CLASSES]
    logits_ood = run.model(data.x_ood_test.to(device))[:, :N_CLASSES]
    run.model.train()
    score_id = run.score(logits_id).float().cpu().numpy()
    score_ood = run.score(logits_ood).float().cpu().numpy()
    correct = int((logits_id.argmax(dim=1).cpu() == data.y_id_test).sum())
    return {
        "accuracy": correct / len(data.y_id_test),
        "correct": correct,
        "auroc": auroc(score_id, score_ood),
        "fpr95": fpr_at_tpr(score_id, score_ood),
    }


class _Progress:
    """A progress bar over ``total`` steps on stderr: tqdm when importable, else a minimal one."""

    def __init__(self, total: int, enabled: bool, desc: str = "training"):
        self.total, self.done, self.enabled, self._bar, self.desc = total, 0, enabled, None, desc
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr)

    def update(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled:
            filled = int(30 * self.done / self.total)
            sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}")
            sys.stderr.flush()

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
            return
        if self.enabled:
            sys.stderr.write("\r" + " " * 60 + "\r")
        print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


def fit(
    runs: list,
    batches: Callable[[int], list],
    evaluate_run: Callable[[Run], dict],
    epochs: int,
    device: torch.device,
    columns: tuple,
    quiet: bool,
    desc: str,
) -> None:
    """Train every run on the same batches in the same order; after each epoch, record and print
    ``evaluate_run(run)`` (plus the mean training loss and ms per step) in each run's history.

    ``batches(epoch)``: the epoch's list of ``(x, y)``; ``columns``: ``(key, header, format)`` of the metrics
    printed after the loss.
    """
    steps_per_epoch = len(batches(0))
    progress = _Progress(epochs * steps_per_epoch, enabled=not quiet, desc=desc)
    header = f"{'epoch':>5} | {'run':<9} {'loss':>10} " + " ".join(f"{h:>7}" for _, h, _ in columns) + " ms/step"
    if not quiet:
        progress.write(header)
    try:
        for epoch in range(1, epochs + 1):
            losses = {run.name: [] for run in runs}
            first = {run.name: len(run.step_times) for run in runs}
            for x, y in batches(epoch):
                for run in runs:
                    losses[run.name].append(train_step(run, x, y, device))
                progress.update()
            for run in runs:
                metrics = evaluate_run(run)
                metrics["loss"] = float(np.mean(losses[run.name]))
                metrics["ms_per_step"] = _ms(run.step_times[first[run.name] :])
                run.history.append(metrics)
                if not quiet:
                    values = " ".join(f"{metrics[k]:>7{fmt}}" for k, _, fmt in columns)
                    progress.write(
                        f"{epoch:>5} | {run.name:<9} {metrics['loss']:>10.6f} {values} {metrics['ms_per_step']:>8.2f}"
                    )
    finally:
        progress.close()


# ---------------------------------------------------------------------------------------------- main

#: the segmentation criteria of ``--seg-loss`` (every pixel an entry; ``ignore_index`` on the void frame)
SEG_LOSSES = (
    "EnergyRegularizedLoss",
    "OutlierExposureLoss",
    "EntropicOpenSetLoss",
    "CrossEntropyLoss",
    "ConfidencePenaltyLoss",
    "MarginConfidenceLoss",
)

#: constructor arguments of the segmentation criteria: the void frame is ignored; the energy margins are set
#: for a small network's logits as in the classification part (see CRITERION_KWARGS)
SEG_CRITERION_KWARGS = {"EnergyRegularizedLoss": {"alpha": 0.1, "margin_in": -8.0, "margin_out": -3.0}}

#: the segmentation part's size: scenes, batch and epochs. Measured on 2 CPU cores (seed 0, EnergyRegularizedLoss):
#: 12 epochs of SGD, about 12 s a run, per-pixel AUROC 0.995, AP 0.79, ID-digit pixel accuracy 0.74 (a network at
#: full resolution without BatchNorm reached an accuracy of 0.11 and an AP of 0.19 in the same time)
SEG_TRAIN_SCENES = 256
SEG_TEST_SCENES = 64
SEG_BATCH = 16
SEG_EPOCHS = 12
SEG_LEARNING_RATE = 0.05

#: the fused criterion against the reference on the same logits, every training step of both parts: the loss
#: (relative) and the gradient (largest difference relative to the largest element); fp32 summation order only
STEP_TOLERANCES = {"loss_rel": 1e-4, "grad_rel": 1e-4}

#: how closely the two segmentation runs must agree. Their only difference is the criterion's floating-point
#: order, but this network's training (BatchNorm, SGD at the edge of stability) amplifies it: measured with
#: seed 0, the two runs' AP differs by 0.02 from epoch 3 on and by up to 0.19 in mid-training, while the
#: final models agree within 0.002 AUROC and 0.006 AP. So the criterion is checked at every step on the same
#: logits (STEP_TOLERANCES), the runs after their first epoch to rounding noise, and the final models to
#: training noise.
SEG_TOLERANCES = {
    "first_epoch": {"loss_rel": 1e-4, "auroc": 1e-3, "ap": 2e-3, "fpr95": 2e-3, "accuracy": 2e-3},
    "final": {"loss_rel": 0.05, "auroc": 0.01, "ap": 0.05, "fpr95": 0.02, "accuracy": 0.05},
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m oodkernels.demo",
        description="The main job: train OOD-aware models with a fused oodkernels criterion and with its "
        "plain-PyTorch reference, side by side, and check that they agree. Part 1: an MLP on scikit-learn's "
        "digits (0-4 ID, 5-9 OOD). Part 2: per-pixel OOD segmentation of scenes composed from the digits.",
    )
    parser.add_argument("--part", choices=("both", "classification", "segmentation"), default="both")
    parser.add_argument("--epochs", type=int, default=10, help="classification epochs (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the initialisation and the batch order")
    parser.add_argument("--loss", choices=LOSSES, default="EnergyRegularizedLoss", help="classification criterion")
    parser.add_argument("--batch-size", type=int, default=128, help="classification samples per batch")
    parser.add_argument("--seg-loss", choices=SEG_LOSSES, default="EnergyRegularizedLoss", help="per-pixel criterion")
    parser.add_argument(
        "--seg-epochs", type=int, default=SEG_EPOCHS, help=f"segmentation epochs (default {SEG_EPOCHS})"
    )
    parser.add_argument("--seg-scenes", type=int, default=SEG_TRAIN_SCENES, help="segmentation training scenes")
    parser.add_argument(
        "--figure",
        default=os.path.join("demo-output", "segmentation.png"),
        help="where the segmentation figure (input, ground truth, score map) is saved",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "triton", "cpp", "reference"),
        default="auto",
        help="OODKERNELS_BACKEND of the fused run (default auto: the C++ kernels on CPU, Triton on CUDA; triton "
        "on a CPU runs the Triton kernels in the Triton interpreter, a correctness run)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    return parser


def _rerun_interpreted(argv: list) -> int:
    """Run the demo again in a child process with ``TRITON_INTERPRET=1`` set from the start."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    sys.stdout.flush()
    return subprocess.run([sys.executable, "-m", "oodkernels.demo", *argv], env=env).returncode


def _disagreements(fused: Run, ref: Run, n_id_test: int) -> list:
    """Every metric on which the two classification runs differ by more than :data:`TOLERANCES`, and every step
    check beyond :data:`STEP_TOLERANCES`."""
    problems = _step_check_problems(fused)
    for epoch, (a, b) in enumerate(zip(fused.history, ref.history), start=1):
        for key in ("loss", "auroc", "fpr95", "accuracy"):
            if not (math.isfinite(a[key]) and math.isfinite(b[key])):
                problems.append(f"epoch {epoch}: {key} is not finite (fused {a[key]}, reference {b[key]})")
        d_loss = abs(a["loss"] - b["loss"])
        if d_loss > TOLERANCES["loss_rel"] * max(abs(b["loss"]), 1e-3):
            problems.append(f"epoch {epoch}: loss {a['loss']:.6g} vs {b['loss']:.6g} (|delta| {d_loss:.2e})")
        if abs(a["auroc"] - b["auroc"]) > TOLERANCES["auroc_abs"]:
            problems.append(f"epoch {epoch}: AUROC {a['auroc']:.6f} vs {b['auroc']:.6f}")
        if abs(a["fpr95"] - b["fpr95"]) > TOLERANCES["fpr95_samples"] / n_id_test + 1e-12:
            problems.append(f"epoch {epoch}: FPR@95TPR {a['fpr95']:.6f} vs {b['fpr95']:.6f}")
        if abs(a["correct"] - b["correct"]) > TOLERANCES["accuracy_samples"]:
            problems.append(f"epoch {epoch}: accuracy {a['accuracy']:.4f} vs {b['accuracy']:.4f}")
    d_param = max_param_diff(fused.model, ref.model)
    if not d_param <= TOLERANCES["param_abs"]:
        problems.append(f"final parameters differ by up to {d_param:.2e}")
    return problems


def _step_check_problems(fused: Run) -> list:
    """The steps where the fused criterion and the reference, on the same logits, differ beyond
    :data:`STEP_TOLERANCES` (loss relative, gradient relative to its largest element)."""
    problems = []
    for step, (d_loss, d_grad) in enumerate(fused.step_checks, start=1):
        if not (d_loss <= STEP_TOLERANCES["loss_rel"] and d_grad <= STEP_TOLERANCES["grad_rel"]):
            problems.append(
                f"step {step}: fused vs reference criterion on the same logits: loss {d_loss:.2e} "
                f"relative, gradient {d_grad:.2e} of its largest element"
            )
    return problems[:10]


def _seg_disagreements(fused: Run, ref: Run) -> list:
    """Where the two segmentation runs disagree: any step check beyond :data:`STEP_TOLERANCES`, the first epoch
    beyond rounding noise, or the final model beyond training noise (:data:`SEG_TOLERANCES`)."""
    problems = _step_check_problems(fused)
    for epoch, (a, b) in enumerate(zip(fused.history, ref.history), start=1):
        for key in ("loss", "auroc", "fpr95", "ap", "accuracy"):
            if not (math.isfinite(a[key]) and math.isfinite(b[key])):
                problems.append(f"epoch {epoch}: {key} is not finite (fused {a[key]}, reference {b[key]})")
    for label, index, tol in (("epoch 1", 0, SEG_TOLERANCES["first_epoch"]), ("final", -1, SEG_TOLERANCES["final"])):
        a, b = fused.history[index], ref.history[index]
        d_loss = abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-3)
        if d_loss > tol["loss_rel"]:
            problems.append(f"{label}: loss {a['loss']:.6g} vs {b['loss']:.6g} ({d_loss:.2e} relative)")
        for key in ("auroc", "ap", "fpr95", "accuracy"):
            if abs(a[key] - b[key]) > tol[key]:
                problems.append(f"{label}: {key} {a[key]:.6f} vs {b[key]:.6f} (bound {tol[key]})")
    return problems


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    """Largest absolute difference between the parameters of two models of the same architecture."""
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def _ms(times: list) -> float:
    return 1e3 * float(np.mean(times)) if times else float("nan")


def _timing_line(fused: Run, ref: Run, fused_backend: str, interpreted: bool) -> str:
    """The criterion's forward + backward alone and the whole step, fused against reference (after the
    first step of each run: Triton compiles and first-call set-up happen there)."""
    loss_f, loss_r = _ms(fused.loss_times[1:]), _ms(ref.loss_times[1:])
    step_f, step_r = _ms(fused.step_times[1:]), _ms(ref.step_times[1:])
    label = f"{fused_backend}, interpreted: a correctness run, not a timing" if interpreted else fused_backend
    return (
        f"time per step: criterion forward + backward  fused [{label}] {loss_f:.3f} ms, reference {loss_r:.3f} ms "
        f"-> {loss_r / loss_f:.2f}x;  whole step  fused {step_f:.2f} ms, reference {step_r:.2f} ms -> "
        f"{step_r / step_f:.2f}x"
    )


def _step_check_line(fused: Run) -> str:
    checks = np.array(fused.step_checks or [(float("nan"), float("nan"))])
    return (
        f"step check: the fused criterion against the reference on the same logits, {len(fused.step_checks)} steps: "
        f"max loss difference {checks[:, 0].max():.1e} relative, max gradient difference {checks[:, 1].max():.1e} "
        f"of its largest element (bounds {STEP_TOLERANCES['loss_rel']:g}, {STEP_TOLERANCES['grad_rel']:g})"
    )


def _make_runs(model: nn.Module, criterion_name: str, kwargs: dict, device: torch.device, make_optimizer) -> list:
    from . import loss as fused_losses
    from . import reference
    from . import scores

    runs = []
    for name, criterion_class, score in (
        ("fused", getattr(fused_losses, criterion_name), scores.energy),
        ("reference", getattr(reference, criterion_name), reference.scores.energy),
    ):
        copy_ = copy.deepcopy(model)
        optimizer = make_optimizer(copy_.parameters())
        runs.append(Run(name, copy_, criterion_class(**kwargs).to(device), score, optimizer, [], []))
    runs[0].reference_criterion = getattr(reference, criterion_name)(**kwargs).to(device)
    return runs


def _classification(args: argparse.Namespace, device: torch.device, info, out) -> int:
    """Part 1: the digits classifier, fused and reference."""
    data = load_split(args.seed)
    sizes = data.sizes()
    n_outputs = N_CLASSES + 1 if args.loss == "BackgroundClassLoss" else N_CLASSES
    kwargs = CRITERION_KWARGS.get(args.loss, {})
    fused_backend = info["operations"][_OPERATION[args.loss]][device.type]
    interpreted = fused_backend == "triton" and device.type == "cpu"
    out(
        f"\n== part 1: classification ==\ncriterion {args.loss}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) "
        f"on {device.type}: fused run: oodkernels.loss.{args.loss} -> backend {fused_backend}; "
        f"reference run: oodkernels.reference.{args.loss} (plain PyTorch)"
    )
    out(
        f"data: digits 0-4 ID, 5-9 OOD; ID train {sizes['id_train']}, ID test {sizes['id_test']}, "
        f"OE train {sizes['oe_train']} (label -1), OOD test {sizes['ood_test']}; "
        f"model 64 -> {HIDDEN} -> {n_outputs}, SGD lr {LEARNING_RATE} momentum {MOMENTUM}, "
        f"batch {args.batch_size}, {args.epochs} epoch(s), seed {args.seed}"
    )
    if args.loss in ("CrossEntropyLoss", "LogitNorm"):
        out(f"note: {args.loss} discards the OE samples (targets < 0); its warning about that is silenced here")

    torch.manual_seed(args.seed)
    sgd = functools.partial(torch.optim.SGD, lr=LEARNING_RATE, momentum=MOMENTUM)
    fused, ref = runs = _make_runs(make_model(n_outputs).to(device), args.loss, kwargs, device, sgd)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    n_train = len(y_train)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    generator = torch.Generator().manual_seed(args.seed)

    def batches(epoch: int) -> list:
        if epoch == 0:  # the count only
            return [None] * steps_per_epoch
        order = torch.randperm(n_train, generator=generator).to(device)
        rows = [order[s * args.batch_size : (s + 1) * args.batch_size] for s in range(steps_per_epoch)]
        return [(x_train[r], y_train[r]) for r in rows]

    columns = (("accuracy", "ID acc", ".4f"), ("auroc", "AUROC", ".4f"), ("fpr95", "FPR95", ".4f"))
    fit(runs, batches, lambda run: evaluate(run, data, device), args.epochs, device, columns, args.quiet, "classifier")

    last_f, last_r = fused.history[-1], ref.history[-1]
    for name, last in (("fused    ", last_f), ("reference", last_r)):
        out(
            f"final: {name} loss {last['loss']:.6f}  ID acc {last['accuracy']:.4f}  AUROC {last['auroc']:.4f}  "
            f"FPR95 {last['fpr95']:.4f}"
        )
    out(_timing_line(fused, ref, fused_backend, interpreted))
    out(_step_check_line(fused))
    d_param = max_param_diff(fused.model, ref.model)
    pairs = list(zip(fused.history, ref.history))
    out(
        f"agreement: max |delta loss| {max(abs(a['loss'] - b['loss']) for a, b in pairs):.2e}, "
        f"max |delta AUROC| {max(abs(a['auroc'] - b['auroc']) for a, b in pairs):.2e}, "
        f"max |delta parameter| {d_param:.2e}"
    )
    problems = _disagreements(fused, ref, sizes["id_test"])
    if problems:
        print(
            "FAILED: the fused and the reference classification runs disagree beyond numerical noise:", file=sys.stderr
        )
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    out(
        "OK: the fused and the reference run agree (|delta loss| <= 1e-4 relative, |delta AUROC| <= 1e-3, "
        "|delta FPR95| and |delta accuracy| <= 1 ID test sample, |delta parameter| <= 1e-3)"
    )
    return 0


def _segmentation(args: argparse.Namespace, device: torch.device, info, out) -> int:
    """Part 2: per-pixel OOD segmentation of composed digit scenes, fused and reference."""
    from . import demo_segmentation as seg

    split = load_split(args.seed)
    train = seg.make_scenes(args.seg_scenes, split.index_id_train, split.index_oe_train, seed=args.seed)
    test = seg.make_scenes(SEG_TEST_SCENES, split.index_id_test, split.index_ood_test, seed=args.seed + 1)
    kwargs = {**SEG_CRITERION_KWARGS.get(args.seg_loss, {}), "ignore_index": seg.IGNORE}
    fused_backend = info["operations"][_OPERATION[args.seg_loss]][device.type]
    interpreted = fused_backend == "triton" and device.type == "cpu"
    n_outputs = seg.N_CLASSES + 1
    out(
        f"\n== part 2: per-pixel OOD segmentation ==\ncriterion {args.seg_loss}"
        f"({', '.join(f'{k}={v}' for k, v in kwargs.items())}) on {device.type}: fused run -> backend "
        f"{fused_backend}; reference run: plain PyTorch"
    )
    out(
        f"data: {args.seg_scenes} training and {SEG_TEST_SCENES} test scenes of {seg.SIZE}x{seg.SIZE} pixels, each "
        f"with {seg.ID_PER_SCENE} ID digits (0-4, classes 0-4, background class {seg.BACKGROUND}) and "
        f"{seg.OOD_PER_SCENE} OOD digit (5-9: outlier exposure labelled -1 in training, unseen anomalies in test), "
        f"a {seg.BORDER}-pixel void frame (label {seg.IGNORE}, ignored); logits ({SEG_BATCH}, {n_outputs}, {seg.SIZE}, "
        f"{seg.SIZE}) per batch from a small FCN; SGD lr {SEG_LEARNING_RATE} momentum {MOMENTUM}, "
        f"{args.seg_epochs} epoch(s)"
    )

    torch.manual_seed(args.seed)
    sgd = functools.partial(torch.optim.SGD, lr=SEG_LEARNING_RATE, momentum=MOMENTUM)
    fused, ref = runs = _make_runs(seg.make_fcn(n_outputs).to(device), args.seg_loss, kwargs, device, sgd)
    images, labels = train.images.to(device), train.labels.to(device)
    test_images, test_labels = test.images.to(device), test.labels.to(device)
    steps_per_epoch = math.ceil(len(labels) / SEG_BATCH)
    generator = torch.Generator().manual_seed(args.seed)

    def batches(epoch: int) -> list:
        if epoch == 0:
            return [None] * steps_per_epoch
        order = torch.randperm(len(labels), generator=generator).to(device)
        rows = [order[s * SEG_BATCH : (s + 1) * SEG_BATCH] for s in range(steps_per_epoch)]
        return [(images[r], labels[r]) for r in rows]

    @torch.no_grad()
    def evaluate_scenes(run: Run) -> dict:
        run.model.eval()
        logits = run.model(test_images)
        run.model.train()
        run.test_scores = run.score(logits[:, : seg.N_CLASSES + 1])
        return seg.pixel_metrics(run.test_scores, test_labels, logits)

    columns = (("accuracy", "px acc", ".4f"), ("auroc", "AUROC", ".4f"), ("fpr95", "FPR95", ".4f"), ("ap", "AP", ".4f"))
    fit(runs, batches, evaluate_scenes, args.seg_epochs, device, columns, args.quiet, "segmentation")

    for name, run in (("fused    ", fused), ("reference", ref)):
        last = run.history[-1]
        out(
            f"final: {name} loss {last['loss']:.6f}  ID-digit pixel acc {last['accuracy']:.4f}  per-pixel AUROC "
            f"{last['auroc']:.4f}  FPR95 {last['fpr95']:.4f}  AP {last['ap']:.4f}  "
            f"({last['n_anomaly']} anomaly / {last['n_normal']} ID pixels)"
        )
    out(_timing_line(fused, ref, fused_backend, interpreted))
    out(_step_check_line(fused))
    figure = seg.save_figure(args.figure, test, fused.test_scores.cpu())
    out(f"figure: {os.path.abspath(figure)} (test scenes: input, ground truth, energy score of the fused run)")
    problems = _seg_disagreements(fused, ref)
    if problems:
        print("FAILED: the fused and the reference segmentation runs disagree beyond numerical noise:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    first_f, first_r, last_f, last_r = fused.history[0], ref.history[0], fused.history[-1], ref.history[-1]
    out(
        "OK: the fused and the reference run agree: the criterion at every step on the same logits, after epoch 1 "
        f"|delta loss| {abs(first_f['loss'] - first_r['loss']):.1e} and |delta AUROC| "
        f"{abs(first_f['auroc'] - first_r['auroc']):.1e}, and the final models within training noise "
        f"(|delta AUROC| {abs(last_f['auroc'] - last_r['auroc']):.1e}, "
        f"|delta AP| {abs(last_f['ap'] - last_r['ap']):.1e}; bounds in SEG_TOLERANCES)"
    )
    return 0


#: the dispatched operation each criterion's forward runs (for the backend report)
_OPERATION = {
    "CrossEntropyLoss": "cross_entropy",
    "BackgroundClassLoss": "background_class_loss",
    "OutlierExposureLoss": "outlier_exposure_loss",
    "EntropicOpenSetLoss": "entropic_open_set_loss",
    "EnergyRegularizedLoss": "energy_regularized_loss",
    "LogitNorm": "logit_norm_loss",
    "ConfidencePenaltyLoss": "confidence_penalty_loss",
    "MarginConfidenceLoss": "margin_confidence_loss",
}


def _train(args: argparse.Namespace, device: torch.device) -> int:
    import oodkernels

    out = functools.partial(print, flush=True)  # live lines when stdout is a pipe
    info = oodkernels.backend_info()
    out(info)
    if info["operations"]["cross_entropy"][device.type] == "triton" and device.type == "cpu":
        out(
            "note: the fused Triton kernels run in the Triton interpreter on this CPU (TRITON_INTERPRET=1): "
            "a correctness run; the fused timings are not a performance measurement"
        )
    status = 0
    if args.part in ("both", "classification"):
        status |= _classification(args, device, info, out)
    if args.part in ("both", "segmentation"):
        status |= _segmentation(args, device, info, out)
    return status


def main(argv: Optional[list] = None) -> int:
    """Run the demo with command-line arguments ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.seg_epochs < 1 or args.seg_scenes < 1:
        print("error: --epochs, --batch-size, --seg-epochs and --seg-scenes must be positive", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("error: the demo needs scikit-learn (pip install 'oodkernels[demo]')", file=sys.stderr)
        return 2

    if args.backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        if "oodkernels.kernels.rows" in sys.modules or "triton" in sys.modules:
            # the Triton kernels are already defined (compiled mode): start again with the interpreter on
            return _rerun_interpreted(argv)
        os.environ["TRITON_INTERPRET"] = "1"

    saved_backend = os.environ.get("OODKERNELS_BACKEND")
    os.environ["OODKERNELS_BACKEND"] = args.backend
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Discarding samples with targets < 0")
            return _train(args, device)
    except Exception as exc:  # any failure: a clear message and a non-zero exit status
        traceback.print_exc()
        print(f"FAILED: the demo stopped with {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if saved_backend is None:
            os.environ.pop("OODKERNELS_BACKEND", None)
        else:
            os.environ["OODKERNELS_BACKEND"] = saved_backend


if __name__ == "__main__":
    raise SystemExit(main())
