"""Part 2 of ``python -m oodkernels.demo``: per-pixel OOD segmentation on images composed from real digits.

Data (:func:`make_scenes`, nothing downloaded). Each scene is a ``SIZE x SIZE`` canvas cut into a
``GRID x GRID`` grid of ``CELL x CELL`` cells; a scikit-learn digit (8 x 8, upscaled x ``CELL // 8``) is
pasted into some cells:

- ``ID_PER_SCENE`` in-distribution digits (0-4, the classes), from the classifier's ID train (training
  scenes) or ID test (test scenes) images, so no test digit was ever seen in training;
- ``OOD_PER_SCENE`` out-of-distribution digits (5-9): in training scenes from the outlier-exposure images,
  labelled ``-1`` (OE pasted into the scene, as the segmentation OOD papers do); in test scenes from the
  held-out OOD images (never seen), labelled ``-1`` too: the anomalies the energy score must find.

Per pixel: the digit's label where its (upscaled) intensity exceeds ``INK`` (of 16), the background class
``N_CLASSES`` elsewhere, and ``IGNORE`` (void, ``ignore_index``) on a ``BORDER``-pixel frame around the canvas.
Images are the intensities / 16 plus seeded Gaussian noise, ``(N, 1, SIZE, SIZE)`` float32; labels
``(N, SIZE, SIZE)`` int64. The logits are ``(N, N_CLASSES + 1, SIZE, SIZE)``: 5 digit classes and the
background class, read by the fused kernels in place (NCHW).

Model: a small fully-convolutional network (:func:`make_fcn`): strided and dilated 3 x 3 convolutions with
BatchNorm (a receptive field wider than a digit), a 1 x 1 classifier and a bilinear upsampling of the logits
to the full resolution.

Metrics (:func:`pixel_metrics`): the energy score of every non-void test pixel (higher = more OOD);
anomaly pixels (label ``-1``) are the positives, every ID-digit and background pixel a negative: AUROC,
FPR at 95 % TPR and average precision, plus the pixel accuracy on the ID-digit pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

#: canvas, grid and cell sizes (a digit is upscaled from 8 x 8 to CELL x CELL)
SIZE = 64
CELL = 16
GRID = SIZE // CELL
#: pasted digits per scene: in-distribution (classes) and out-of-distribution (OE in training, anomalies in test)
ID_PER_SCENE = 4
OOD_PER_SCENE = 1
#: ink threshold (of 16): a digit's pixels above it carry its label, the rest of its cell is background
INK = 4.0
#: the 5 digit classes; the background class is N_CLASSES
N_CLASSES = 5
BACKGROUND = N_CLASSES
#: void label of the border frame (passed as ``ignore_index``)
IGNORE = 255
BORDER = 2
NOISE = 0.05


@dataclass
class Scenes:
    """``images (N, 1, SIZE, SIZE)`` float32, ``labels (N, SIZE, SIZE)`` int64 (0-4 digits, 5 background,
    -1 OOD, 255 void); ``sources (N, GRID * GRID)``: the ``load_digits`` row pasted in each cell, -1 if none."""

    images: torch.Tensor
    labels: torch.Tensor
    sources: np.ndarray


def _upscale(digit_8x8: np.ndarray) -> np.ndarray:
    scale = CELL // 8
    return np.kron(digit_8x8.reshape(8, 8), np.ones((scale, scale)))


def make_scenes(n_scenes: int, id_rows: np.ndarray, ood_rows: np.ndarray, seed: int) -> Scenes:
    """Compose ``n_scenes`` scenes from ``load_digits`` rows: ``id_rows`` (digits 0-4) and ``ood_rows`` (5-9).

    Everything random (which cells, which digits, the noise) comes from ``numpy.random.default_rng(seed)``.
    """
    from sklearn.datasets import load_digits

    if n_scenes < 1:
        raise ValueError(f"n_scenes: expected a positive count, got {n_scenes}")
    if len(id_rows) == 0 or len(ood_rows) == 0:
        raise ValueError("id_rows, ood_rows: expected at least one digit of each")
    pixels, digits = load_digits(return_X_y=True)
    if (digits[id_rows] >= N_CLASSES).any() or (digits[ood_rows] < N_CLASSES).any():
        raise ValueError(f"id_rows must hold digits 0-{N_CLASSES - 1} and ood_rows digits {N_CLASSES}-9")
    rng = np.random.default_rng(seed)
    ink = np.zeros((n_scenes, SIZE, SIZE))
    labels = np.full((n_scenes, SIZE, SIZE), BACKGROUND, dtype=np.int64)
    sources = np.full((n_scenes, GRID * GRID), -1, dtype=np.int64)
    for i in range(n_scenes):
        cells = rng.choice(GRID * GRID, size=ID_PER_SCENE + OOD_PER_SCENE, replace=False)
        chosen = [*rng.choice(id_rows, size=ID_PER_SCENE), *rng.choice(ood_rows, size=OOD_PER_SCENE)]
        for cell, row in zip(cells, chosen):
            top, left = (cell // GRID) * CELL, (cell % GRID) * CELL
            digit = _upscale(pixels[row])
            ink[i, top : top + CELL, left : left + CELL] = digit
            label = digits[row] if digits[row] < N_CLASSES else -1
            labels[i, top : top + CELL, left : left + CELL][digit > INK] = label
            sources[i, cell] = row
    labels[:, :BORDER, :] = IGNORE
    labels[:, -BORDER:, :] = IGNORE
    labels[:, :, :BORDER] = IGNORE
    labels[:, :, -BORDER:] = IGNORE
    images = ink / 16.0 + NOISE * rng.standard_normal(ink.shape)
    return Scenes(
        images=torch.from_numpy(images).float().unsqueeze(1),
        labels=torch.from_numpy(labels),
        sources=sources,
    )


def make_fcn(n_outputs: int = N_CLASSES + 1, width: int = 16) -> nn.Module:
    """``(N, 1, H, W) -> (N, n_outputs, H, W)`` logits (H, W divisible by 4).

    A 3 x 3 convolution at full resolution, two stride-2 convolutions down to a quarter (width, 2·width,
    4·width channels), two dilated 3 x 3 convolutions there (dilations 1 and 2: a receptive field of about 40
    input pixels, more than a 16 x 16 digit), each followed by BatchNorm and ReLU, a 1 x 1 classifier and a
    bilinear upsampling back to the input's resolution, so the criterion sees one logit vector per pixel.
    """

    def block(c_in, c_out, stride=1, dilation=1):
        conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation)
        return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]

    layers = [*block(1, width), *block(width, 2 * width, stride=2), *block(2 * width, 4 * width, stride=2)]
    layers += [*block(4 * width, 4 * width), *block(4 * width, 4 * width, dilation=2)]
    layers += [nn.Conv2d(4 * width, n_outputs, 1), nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False)]
    return nn.Sequential(*layers)


def average_precision(scores_id, scores_ood) -> float:
    """Average precision of an OOD score (higher = more OOD): positives ``scores_ood``, negatives ``scores_id``.

    ``Σ_t (R_t − R_{t−1})·P_t`` over the distinct score values ``t`` taken as thresholds from the highest down
    (a sample is flagged when its score is ``>= t``), with ``R_t`` the recall and ``P_t`` the precision there:
    the step-wise area under the precision-recall curve, tied scores entering together.
    """
    neg = np.asarray(scores_id, dtype=np.float64).reshape(-1)
    pos = np.asarray(scores_ood, dtype=np.float64).reshape(-1)
    if neg.size == 0 or pos.size == 0:
        raise ValueError("scores: need at least one ID (negative) and one OOD (positive) score")
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    last_of_group = np.r_[scores[1:] != scores[:-1], True]  # a threshold ends after its last tied sample
    true_pos = np.cumsum(is_pos)[last_of_group]
    flagged = np.arange(1, scores.size + 1)[last_of_group]
    recall = true_pos / pos.size
    precision = true_pos / flagged
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def pixel_metrics(scores: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> dict:
    """Per-pixel metrics of OOD ``scores (N, H, W)`` against ``labels (N, H, W)``: AUROC, FPR@95TPR and AP
    (anomalies = label -1 are the positives, ID-digit and background pixels the negatives, void pixels are left
    out), and the accuracy of ``logits (N, C, H, W)`` on the ID-digit pixels."""
    from .demo import auroc
    from .demo import fpr_at_tpr

    valid = labels != IGNORE
    anomaly = (labels < 0) & valid
    normal = (labels >= 0) & valid
    s = scores.detach().float().cpu()
    positives, negatives = s[anomaly.cpu()].numpy(), s[normal.cpu()].numpy()
    digits = (labels >= 0) & (labels < N_CLASSES)
    predicted = logits.detach().argmax(dim=1)
    correct = int((predicted[digits] == labels[digits]).sum())
    return {
        "auroc": auroc(negatives, positives),
        "fpr95": fpr_at_tpr(negatives, positives),
        "ap": average_precision(negatives, positives),
        "accuracy": correct / max(int(digits.sum()), 1),
        "n_anomaly": int(anomaly.sum()),
        "n_normal": int(normal.sum()),
    }


def save_figure(path, scenes: Scenes, scores: torch.Tensor, n_rows: int = 3) -> str:
    """Input, ground truth and energy-score map of the first ``n_rows`` scenes, as a PNG at ``path``."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colors
    from matplotlib import pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n_rows = min(n_rows, len(scenes.labels))
    # ground truth: the 5 digit classes, background, anomaly (-1) and void, each its own colour
    palette = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#f7f7f7", "#d62728", "#7f7f7f"]
    codes = scenes.labels.clone()
    codes[codes == -1] = N_CLASSES + 1
    codes[codes == IGNORE] = N_CLASSES + 2
    fig, axes = plt.subplots(n_rows, 3, figsize=(9, 3 * n_rows), squeeze=False)
    for i in range(n_rows):
        axes[i, 0].imshow(scenes.images[i, 0].numpy(), cmap="gray")
        axes[i, 1].imshow(codes[i].numpy(), cmap=colors.ListedColormap(palette), vmin=-0.5, vmax=len(palette) - 0.5)
        im = axes[i, 2].imshow(scores[i].detach().float().cpu().numpy(), cmap="inferno")
        fig.colorbar(im, ax=axes[i, 2], fraction=0.046)
    for ax, title in zip(axes[0], ("input", "ground truth (red: anomaly, grey: void)", "energy score (high = OOD)")):
        ax.set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)
