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
    """One training run: a model, its criterion and optimiser, and the score it is evaluated with."""

    name: str
    model: nn.Module
    criterion: nn.Module
    score: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    step_times: list
    history: list


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """One SGD step on a batch ``x (B, 64)``, ``y (B,)``; returns the loss and records the step's wall time."""
    _sync(device)
    start = time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    loss = run.criterion(run.model(x), y)
    loss.backward()
    run.optimizer.step()
    _sync(device)
    run.step_times.append(time.perf_counter() - start)
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

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self._bar = total, 0, enabled, None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc="training", unit="step", leave=False, file=sys.stderr)

    def update(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled:
            filled = int(30 * self.done / self.total)
            sys.stderr.write(f"\rtraining [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}")
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


# ---------------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m oodkernels.demo",
        description="Train a small OOD-aware MLP on scikit-learn's digits (0-4 ID, 5-9 OOD) with a fused "
        "oodkernels criterion and with its plain-PyTorch reference, side by side, and check that they agree.",
    )
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the batch order")
    parser.add_argument("--loss", choices=LOSSES, default="EnergyRegularizedLoss", help="the criterion to train with")
    parser.add_argument(
        "--backend",
        choices=("auto", "triton", "cpp", "reference"),
        default="triton",
        help="OODKERNELS_BACKEND of the fused run (default triton: the Triton kernels, interpreted without CUDA; "
        "cpp: the C++ CPU kernels)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per batch, ID and OE mixed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    return parser


def _rerun_interpreted(argv: list) -> int:
    """Run the demo again in a child process with ``TRITON_INTERPRET=1`` set from the start."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    sys.stdout.flush()
    return subprocess.run([sys.executable, "-m", "oodkernels.demo", *argv], env=env).returncode


def _disagreements(fused: Run, ref: Run, n_id_test: int) -> list:
    """Every metric on which the two runs differ by more than :data:`TOLERANCES`, as readable lines."""
    problems = []
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


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    """Largest absolute difference between the parameters of two models of the same architecture."""
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def _ms(times: list) -> float:
    return 1e3 * float(np.mean(times)) if times else float("nan")


def _train(args: argparse.Namespace, device: torch.device) -> int:
    import oodkernels

    from . import loss as fused_losses
    from . import reference
    from . import scores

    out = functools.partial(print, flush=True)  # live lines when stdout is a pipe
    data = load_split(args.seed)
    sizes = data.sizes()
    n_outputs = N_CLASSES + 1 if args.loss == "BackgroundClassLoss" else N_CLASSES
    kwargs = CRITERION_KWARGS.get(args.loss, {})
    info = oodkernels.backend_info()
    out(info)
    fused_backend = info["operations"][_OPERATION[args.loss]][device.type]
    out(
        f"criterion {args.loss}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) on {device.type}: "
        f"fused run: oodkernels.loss.{args.loss} -> backend {fused_backend}; "
        f"reference run: oodkernels.reference.{args.loss} (plain PyTorch)"
    )
    if fused_backend == "triton" and device.type == "cpu":
        out(
            "note: the fused Triton kernels run in the Triton interpreter on this CPU (TRITON_INTERPRET=1): "
            "the fused timings are a correctness run, not a performance measurement"
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
    model = make_model(n_outputs).to(device)
    runs = []
    for name, criterion_class, score in (
        ("fused", getattr(fused_losses, args.loss), scores.energy),
        ("reference", getattr(reference, args.loss), reference.scores.energy),
    ):
        copy_ = copy.deepcopy(model)
        optimizer = torch.optim.SGD(copy_.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
        runs.append(Run(name, copy_, criterion_class(**kwargs).to(device), score, optimizer, [], []))
    fused, ref = runs

    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    n_train = len(y_train)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    generator = torch.Generator().manual_seed(args.seed)
    progress = _Progress(args.epochs * steps_per_epoch, enabled=not args.quiet)
    header = f"{'epoch':>5} | {'run':<9} {'loss':>10} {'ID acc':>7} {'AUROC':>7} {'FPR95':>7} {'ms/step':>8}"
    if not args.quiet:
        progress.write(header)
    try:
        for epoch in range(1, args.epochs + 1):
            order = torch.randperm(n_train, generator=generator).to(device)
            losses = {run.name: [] for run in runs}
            first = {run.name: len(run.step_times) for run in runs}
            for step in range(steps_per_epoch):
                rows = order[step * args.batch_size : (step + 1) * args.batch_size]
                x, y = x_train[rows], y_train[rows]
                for run in runs:
                    losses[run.name].append(train_step(run, x, y, device))
                progress.update()
            for run in runs:
                metrics = evaluate(run, data, device)
                metrics["loss"] = float(np.mean(losses[run.name]))
                metrics["ms_per_step"] = _ms(run.step_times[first[run.name] :])
                run.history.append(metrics)
                if not args.quiet:
                    progress.write(
                        f"{epoch:>5} | {run.name:<9} {metrics['loss']:>10.6f} {metrics['accuracy']:>7.4f} "
                        f"{metrics['auroc']:>7.4f} {metrics['fpr95']:>7.4f} {metrics['ms_per_step']:>8.2f}"
                    )
    finally:
        progress.close()

    # time per step without each run's first step (Triton compilation / first-call set-up)
    t_fused, t_ref = _ms(fused.step_times[1:]), _ms(ref.step_times[1:])
    last_f, last_r = fused.history[-1], ref.history[-1]
    out(
        f"final: fused     loss {last_f['loss']:.6f}  ID acc {last_f['accuracy']:.4f}  "
        f"AUROC {last_f['auroc']:.4f}  FPR95 {last_f['fpr95']:.4f}"
    )
    out(
        f"final: reference loss {last_r['loss']:.6f}  ID acc {last_r['accuracy']:.4f}  "
        f"AUROC {last_r['auroc']:.4f}  FPR95 {last_r['fpr95']:.4f}"
    )
    interpreted = " (interpreted)" if fused_backend == "triton" and device.type == "cpu" else ""
    out(
        f"time per step (after the first): fused [{fused_backend}{interpreted}] {t_fused:.2f} ms, "
        f"reference {t_ref:.2f} ms, ratio reference/fused {t_ref / t_fused:.2f}x"
    )
    d_param = max_param_diff(fused.model, ref.model)
    pairs = list(zip(fused.history, ref.history))
    out(
        f"agreement: max |delta loss| {max(abs(a['loss'] - b['loss']) for a, b in pairs):.2e}, "
        f"max |delta AUROC| {max(abs(a['auroc'] - b['auroc']) for a, b in pairs):.2e}, "
        f"max |delta parameter| {d_param:.2e}"
    )
    problems = _disagreements(fused, ref, sizes["id_test"])
    if problems:
        print("FAILED: the fused and the reference run disagree beyond numerical noise:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    out(
        "OK: the fused and the reference run agree (|delta loss| <= 1e-4 relative, |delta AUROC| <= 1e-3, "
        "|delta FPR95| and |delta accuracy| <= 1 ID test sample, |delta parameter| <= 1e-3)"
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


def main(argv: Optional[list] = None) -> int:
    """Run the demo with command-line arguments ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        print("error: --epochs and --batch-size must be positive", file=sys.stderr)
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
