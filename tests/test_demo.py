"""The main job ``python -m oodkernels.demo``: its data split, its metrics, and short end-to-end runs."""

import itertools
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from oodkernels import demo  # noqa: E402

SIZES = {"id_train": 631, "id_test": 270, "oe_train": 447, "ood_test": 449}


# ------------------------------------------------------------------------------------------------ split


@pytest.fixture(scope="module")
def split():
    return demo.load_split(0)


def test_split_sizes_are_the_documented_ones(split):
    assert split.sizes() == SIZES
    assert split.x_train.shape == (SIZES["id_train"] + SIZES["oe_train"], 64)
    assert split.y_train.shape == (SIZES["id_train"] + SIZES["oe_train"],)
    assert split.x_id_test.shape == (SIZES["id_test"], 64) and split.y_id_test.shape == (SIZES["id_test"],)
    assert split.x_ood_test.shape == (SIZES["ood_test"], 64)
    assert all(t.dtype == torch.float32 for t in (split.x_train, split.x_id_test, split.x_ood_test))
    assert split.y_train.dtype == torch.int64


def test_split_parts_are_disjoint_and_cover_the_digits(split):
    parts = [split.index_id_train, split.index_id_test, split.index_oe_train, split.index_ood_test]
    for a, b in itertools.combinations(parts, 2):
        assert not set(a.tolist()) & set(b.tolist())
    everything = np.concatenate(parts)
    assert len(everything) == len(set(everything.tolist())) == 1797


def test_split_class_ranges(split):
    from sklearn.datasets import load_digits

    digits = load_digits().target
    assert set(digits[split.index_id_train].tolist()) == {0, 1, 2, 3, 4}
    assert set(digits[split.index_id_test].tolist()) == {0, 1, 2, 3, 4}
    assert set(split.digit_oe_train.tolist()) == set(digits[split.index_oe_train].tolist()) == {5, 6, 7, 8, 9}
    assert set(split.digit_ood_test.tolist()) == set(digits[split.index_ood_test].tolist()) == {5, 6, 7, 8, 9}
    n_id = SIZES["id_train"]
    assert torch.equal(split.y_train[:n_id], torch.from_numpy(digits[split.index_id_train]))
    assert (split.y_train[n_id:] == -1).all()  # outlier exposure: targets < 0
    assert torch.equal(split.y_id_test, torch.from_numpy(digits[split.index_id_test]))
    # stratified: every ID digit keeps ~30 % of its images for testing
    for d in range(5):
        n = (digits == d).sum()
        assert (digits[split.index_id_test] == d).sum() == round(0.3 * n)


def test_split_is_standardised_with_training_statistics(split):
    mean = split.x_train.double().mean(0)
    std = split.x_train.double().std(0, unbiased=False)
    assert mean.abs().max() < 1e-5
    assert ((std - 1).abs() < 1e-5).logical_or(std == 0).all()


def test_split_is_reproducible_per_seed(split):
    again = demo.load_split(0)
    other = demo.load_split(1)
    for name in ("index_id_train", "index_id_test", "index_oe_train", "index_ood_test"):
        assert np.array_equal(getattr(split, name), getattr(again, name))
    assert torch.equal(split.x_train, again.x_train)
    assert other.sizes() == SIZES
    assert not np.array_equal(split.index_id_test, other.index_id_test)


# ---------------------------------------------------------------------------------------------- metrics


def _pairwise_auroc(neg, pos):
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_hand_computed():
    assert demo.auroc([0.0, 1.0, 2.0], [3.0, 4.0]) == 1.0  # perfect separation
    assert demo.auroc([3.0, 4.0], [0.0, 1.0, 2.0]) == 0.0  # inverted
    assert demo.auroc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5  # all tied
    # pairs: 0.8 beats all three ID scores (3); 0.4 beats 0.1 and 0.35 and ties 0.4 (2.5) -> 5.5 / 6
    assert demo.auroc([0.1, 0.4, 0.35], [0.8, 0.4]) == pytest.approx(5.5 / 6)
    # one ID score above one OOD score: 3 of 4 pairs
    assert demo.auroc([0.0, 2.0], [1.0, 3.0]) == pytest.approx(0.75)
    assert demo.auroc(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 3.0])) == pytest.approx(0.75)


def test_auroc_matches_pairwise_counting_with_many_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        neg = rng.integers(0, 5, size=rng.integers(1, 15)).astype(float)
        pos = rng.integers(1, 6, size=rng.integers(1, 15)).astype(float)
        assert demo.auroc(neg, pos) == pytest.approx(_pairwise_auroc(neg, pos), abs=1e-12)


def test_average_ranks():
    assert demo.average_ranks(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert demo.average_ranks(np.array([1.0, 1.0, 1.0])).tolist() == [2.0, 2.0, 2.0]


def test_fpr_at_95_tpr_hand_computed():
    pos = np.arange(1.0, 21.0)  # 20 OOD scores 1..20: ceil(0.95 * 20) = 19 -> threshold = 2
    assert demo.fpr_at_tpr([0.5, 5.0, 10.0, 15.0, 25.0], pos) == pytest.approx(0.8)  # 4 of 5 ID scores >= 2
    assert demo.fpr_at_tpr([0.5, 1.5, 1.9, 3.0], pos) == pytest.approx(0.25)
    assert demo.fpr_at_tpr([0.0, 1.0, 2.0], [3.0, 4.0]) == 0.0  # perfect separation
    assert demo.fpr_at_tpr([3.0, 4.0], [0.0, 1.0, 2.0]) == 1.0  # inverted
    # ties: every OOD score is 1, so the threshold is 1 and the ID score at 1 counts as a false positive
    assert demo.fpr_at_tpr([1.0, 0.0], [1.0, 1.0, 1.0, 1.0]) == 0.5
    # 10 OOD scores: ceil(9.5) = 10 -> threshold is the smallest OOD score
    assert demo.fpr_at_tpr([0.05, 0.5, 0.95], np.linspace(0.1, 1.0, 10)) == pytest.approx(2 / 3)


@pytest.mark.parametrize("metric", [demo.auroc, demo.fpr_at_tpr])
def test_metrics_reject_bad_scores(metric):
    with pytest.raises(ValueError, match="NaN or infinite"):
        metric([0.0, float("nan")], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        metric([], [1.0])


# -------------------------------------------------------------------------------------------- end to end


def _metric_lines(text, run):
    return [line for line in text.splitlines() if line.split("|")[-1].split()[:1] == [run]]


def test_demo_runs_one_epoch_on_the_reference(capsys):
    before = os.environ.get("OODKERNELS_BACKEND")
    assert demo.main(["--epochs", "1", "--backend", "reference", "--seed", "3", "--part", "classification"]) == 0
    out = capsys.readouterr().out
    assert os.environ.get("OODKERNELS_BACKEND") == before  # the demo restores the environment
    assert "OODKERNELS_BACKEND=reference" in out  # the backend report
    assert "ID train 631, ID test 270, OE train 447 (label -1), OOD test 449" in out
    for run in ("fused", "reference"):
        (line,) = _metric_lines(out, run)
        epoch, fields = line.split("|")
        loss, accuracy, auroc, fpr95, ms = (float(v) for v in fields.split()[1:])
        assert int(epoch) == 1 and np.isfinite(loss) and 0.5 < accuracy <= 1 and 0.5 < auroc <= 1
        assert 0 <= fpr95 <= 1 and ms > 0
    assert "OK: the fused and the reference run agree" in out


def test_demo_runs_the_interpreted_triton_kernels(capsys):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 from conftest")
    argv = ["--epochs", "1", "--loss", "BackgroundClassLoss", "--device", "cpu", "--quiet", "--backend", "triton"]
    assert demo.main([*argv, "--part", "classification"]) == 0
    out = capsys.readouterr().out
    assert "oodkernels.loss.BackgroundClassLoss -> backend triton;" in out
    assert "model 64 -> 128 -> 6" in out
    assert "OK: the fused and the reference run agree" in out


def test_demo_runs_the_cpp_kernels(capsys):
    from oodkernels import _cpp

    if not _cpp.available():
        pytest.skip(f"the C++ extension is unavailable: {_cpp.status()}")
    argv = ["--epochs", "1", "--loss", "OutlierExposureLoss", "--backend", "cpp", "--device", "cpu"]
    assert demo.main([*argv, "--part", "classification"]) == 0
    out = capsys.readouterr().out
    assert "oodkernels.loss.OutlierExposureLoss -> backend cpp;" in out
    assert "fused [cpp]" in out
    assert "OK: the fused and the reference run agree" in out


def test_demo_fails_loudly_when_the_runs_disagree(capsys, monkeypatch):
    monkeypatch.setitem(demo.TOLERANCES, "loss_rel", -1.0)  # every loss difference now exceeds it
    assert demo.main(["--epochs", "1", "--backend", "reference", "--quiet", "--part", "classification"]) == 1
    captured = capsys.readouterr()
    assert "FAILED: the fused and the reference classification runs disagree" in captured.err
    assert "OK:" not in captured.out


def test_demo_rejects_a_missing_cuda_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert demo.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_python_m_demo_restarts_itself_under_the_interpreter():
    """Without TRITON_INTERPRET in the environment the demo re-runs itself with it (the kernels are defined at
    import time, before demo.main runs)."""
    if torch.cuda.is_available():
        pytest.skip("with a CUDA device the fused kernels are compiled, not interpreted")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OODKERNELS_BACKEND")}
    proc = subprocess.run(
        [sys.executable, "-m", "oodkernels.demo", "--epochs", "1", "--batch-size", "256", "--quiet"]
        + ["--backend", "triton", "--part", "classification"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run in the Triton interpreter on this CPU" in proc.stdout
    assert "oodkernels.loss.EnergyRegularizedLoss -> backend triton;" in proc.stdout
    assert "OK: the fused and the reference run agree" in proc.stdout


# ---------------------------------------------------------------------------------- part 2: segmentation


def _scenes(seed=0, n=6):
    from oodkernels import demo_segmentation as seg

    split = demo.load_split(0)
    return seg, split, seg.make_scenes(n, split.index_id_train, split.index_oe_train, seed=seed)


def test_scene_builder_shapes_labels_and_anomalies():
    seg, split, scenes = _scenes()
    assert scenes.images.shape == (6, 1, seg.SIZE, seg.SIZE) and scenes.images.dtype == torch.float32
    assert scenes.labels.shape == (6, seg.SIZE, seg.SIZE) and scenes.labels.dtype == torch.int64
    assert set(scenes.labels.unique().tolist()) <= {-1, 0, 1, 2, 3, 4, seg.BACKGROUND, seg.IGNORE}
    for labels in scenes.labels:
        assert (labels == -1).sum() > 0  # every scene has an OOD digit's pixels
        assert ((labels >= 0) & (labels < seg.N_CLASSES)).sum() > 0
    # the void frame, and nothing void inside it
    b = seg.BORDER
    assert (scenes.labels[:, :b] == seg.IGNORE).all() and (scenes.labels[:, :, -b:] == seg.IGNORE).all()
    assert not (scenes.labels[:, b:-b, b:-b] == seg.IGNORE).any()
    # the pasted digits come from the rows given: ID digits from ID train, OOD digits from the OE images
    pasted = scenes.sources[scenes.sources >= 0]
    allowed = set(split.index_id_train.tolist()) | set(split.index_oe_train.tolist())
    assert set(pasted.tolist()) <= allowed
    assert (scenes.sources >= 0).sum(axis=1).tolist() == [seg.ID_PER_SCENE + seg.OOD_PER_SCENE] * 6
    # a pixel's label is its digit's where the digit has ink: the anomaly pixels are bright, background dim
    ink = scenes.images[:, 0]
    assert ink[scenes.labels == -1].mean() > 0.5 > ink[scenes.labels == seg.BACKGROUND].mean()


def test_scene_builder_is_seeded():
    _, _, a = _scenes(seed=4)
    _, _, b = _scenes(seed=4)
    _, _, c = _scenes(seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)


def test_scene_builder_rejects_wrong_rows():
    from oodkernels import demo_segmentation as seg

    split = demo.load_split(0)
    with pytest.raises(ValueError, match="id_rows must hold digits 0-4"):
        seg.make_scenes(2, split.index_oe_train, split.index_oe_train, seed=0)
    with pytest.raises(ValueError, match="n_scenes"):
        seg.make_scenes(0, split.index_id_train, split.index_oe_train, seed=0)


def test_average_precision_matches_its_definition():
    from oodkernels import demo_segmentation as seg

    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    assert seg.average_precision([0.0, 1.0], [2.0, 3.0]) == 1.0
    # positives at ranks 1 and 3: (1/1 + 2/3) / 2
    assert seg.average_precision([2.0, 0.5], [3.0, 1.0]) == pytest.approx((1 + 2 / 3) / 2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        neg = rng.integers(0, 6, size=rng.integers(1, 30)).astype(float)  # many ties
        pos = rng.integers(2, 9, size=rng.integers(1, 30)).astype(float)
        y = np.r_[np.zeros(neg.size), np.ones(pos.size)]
        expected = sklearn_metrics.average_precision_score(y, np.r_[neg, pos])
        assert seg.average_precision(neg, pos) == pytest.approx(expected, abs=1e-12)


def test_segmentation_part_runs_and_writes_its_figure(capsys, tmp_path):
    figure = tmp_path / "seg.png"
    argv = ["--part", "segmentation", "--seg-epochs", "1", "--seg-scenes", "32", "--quiet", "--figure", str(figure)]
    assert demo.main([*argv, "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "== part 2: per-pixel OOD segmentation ==" in out
    assert "ignore_index=255" in out
    assert re.search(r"per-pixel AUROC 0\.\d+ +FPR95 [01]\.\d+ +AP 0\.\d+", out)
    assert "criterion forward + backward" in out and "whole step" in out
    assert "OK: the fused and the reference run agree" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 5000
    assert f"figure: {figure}" in out


def test_the_main_job_runs_both_parts_on_the_default_backend(capsys, tmp_path):
    """`make demo`'s command with small sizes: the default backend is auto (C++ on CPU when built)."""
    figure = tmp_path / "seg.png"
    argv = ["--epochs", "1", "--seg-epochs", "1", "--seg-scenes", "32", "--quiet", "--figure", str(figure)]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "== part 1: classification ==" in out and "== part 2: per-pixel OOD segmentation ==" in out
    assert out.count("OK: the fused and the reference run agree") == 2
    assert "OODKERNELS_BACKEND=auto" in out


def test_segmentation_fails_loudly_when_the_criterion_differs(capsys, monkeypatch, tmp_path):
    """The step check is what holds the segmentation part to the reference: any difference beyond its bounds
    (here made negative, so every step exceeds them) fails the run, naming the step."""
    monkeypatch.setitem(demo.STEP_TOLERANCES, "grad_rel", -1.0)
    argv = ["--part", "segmentation", "--seg-epochs", "1", "--seg-scenes", "16", "--quiet"]
    assert demo.main([*argv, "--backend", "reference", "--figure", str(tmp_path / "f.png")]) == 1
    captured = capsys.readouterr()
    assert "FAILED: the fused and the reference segmentation runs disagree" in captured.err
    assert "step 1: fused vs reference criterion on the same logits" in captured.err
    assert "OK:" not in captured.out.split("== part 2")[-1]
