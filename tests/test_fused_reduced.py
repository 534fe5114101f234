"""The reduced row op (``oodkernels::row_loss_reduced_fwd/bwd``): layouts, target dtypes, the combine, the
one-read data checks and the statistics the backward recomputes.

Triton runs in the interpreter on a CPU (tiny shapes); the C++ cases run the same bodies where they apply.
"""

import warnings

import pytest
import torch
from _backends import requires_cpp
from _backends import use_backend
from _rows import C
from _rows import compare
from _rows import criteria
from _rows import rand_logits
from _rows import rand_targets

import oodkernels as ok
from oodkernels.kernels import codes
from oodkernels.ops import row_ops
from oodkernels.reference._common import LabelOutOfRangeError

pytestmark = pytest.mark.filterwarnings("ignore:Discarding samples")


def _layout_of(logits, targets):
    from oodkernels.kernels.rows import RowLayout

    return RowLayout([(logits, True), (targets, False)])


@pytest.mark.parametrize(
    "shape,layout,collapsed,runs",
    [
        ((12, C), "contiguous", True, 1),  # (B, C): one run of rows, classes contiguous
        ((12, C), "transposed", True, 1),  # (C, B).T: one run, entries contiguous
        ((2, C, 3, 4), "contiguous", True, 2),  # NCHW: a run of pixels per image
        ((2, C, 3, 4), "channels_last", True, 1),  # NHWC: one run, classes contiguous
        ((1, C, 3, 4), "contiguous", True, 1),  # one image: one run
        ((2, C, 3, 4), "sliced", True, 2),  # every other class of a wider map: dense pixels, a run per image
        ((2, C, 3, 4), "cropped", False, None),  # a crop whose h/w cannot merge: the general path
    ],
)
def test_layouts_pick_their_path(shape, layout, collapsed, runs):
    logits = _cropped(shape) if layout == "cropped" else rand_logits(shape, layout=layout)
    targets = rand_targets(shape, "mixed")
    plan = _layout_of(logits, targets)
    assert plan.collapsed == collapsed
    if collapsed:
        assert plan.runs == runs and plan.runs * plan.inner == targets.numel()


def _cropped(shape):
    """Logits of ``shape`` as the left columns of a wider map: rows of W entries, H·W not one run."""
    wide = rand_logits((*shape[:-1], shape[-1] + 2))
    return wide[..., : shape[-1]]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "cropped"])
@pytest.mark.parametrize("name", ["CrossEntropyLoss", "EnergyRegularizedLoss", "BackgroundClassLoss"])
@pytest.mark.parametrize("backend", ["triton", pytest.param("cpp", marks=requires_cpp)])
def test_segmentation_layouts_equal_reference(monkeypatch, backend, name, layout):
    logits = _cropped((2, C, 3, 4)) if layout == "cropped" else rand_logits((2, C, 3, 4), layout=layout)
    targets = rand_targets(logits.shape, "mixed", name=name)
    compare(backend, monkeypatch, criteria()[name](), [logits, targets])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("backend", ["triton", pytest.param("cpp", marks=requires_cpp)])
def test_targets_of_every_integer_dtype_are_read_as_they_are(monkeypatch, backend, dtype):
    logits = rand_logits((2, C, 2, 3))
    targets = rand_targets(logits.shape, "all_id").to(dtype)
    with_ignore = targets.clone()
    with_ignore[0, 0, 0] = 5  # ignore_index 5 (uint8 has no negative labels)
    for criterion, t in (
        (ok.loss.CrossEntropyLoss(), targets),
        (ok.loss.CrossEntropyLoss(ignore_index=5), with_ignore),
    ):
        compare(backend, monkeypatch, criterion, [logits, t])


def test_no_int64_copy_of_narrow_targets(monkeypatch):
    """The fused path hands the caller's uint8 targets to the op as they are."""
    use_backend(monkeypatch, "triton")
    seen = []
    original = row_ops._launchers().row_loss_reduced_forward

    def spy(logits, targets, *args, **kwargs):
        seen.append(targets)
        return original(logits, targets, *args, **kwargs)

    monkeypatch.setattr(row_ops._launchers(), "row_loss_reduced_forward", spy)
    logits = rand_logits((2, C, 2, 3))
    targets = rand_targets(logits.shape, "all_id").to(torch.uint8)
    ok.loss.EnergyRegularizedLoss()(logits, targets)
    assert len(seen) == 1 and seen[0].dtype == torch.uint8 and seen[0].data_ptr() == targets.data_ptr()


def test_the_combine_is_bitwise_reproducible_and_block_independent_within_rounding(monkeypatch):
    use_backend(monkeypatch, "triton")
    torch.manual_seed(3)
    logits = rand_logits((40, C))
    targets = rand_targets(logits.shape, "mixed")
    criterion = ok.loss.EnergyRegularizedLoss(margin_in=-3.0, margin_out=-2.5)
    first = criterion(logits, targets)
    again = criterion(logits, targets)
    assert torch.equal(first.view(torch.int32), again.view(torch.int32))
    for blocks in ((1, 4), (4, 8), (16, 4)):
        with row_ops.forced_blocks(*blocks):
            other = criterion(logits, targets)
        torch.testing.assert_close(other, first, rtol=1e-6, atol=1e-6)
    reference_value = ok.reference.logits.energy_regularized_loss(logits, targets, 0.1, -3.0, -2.5)
    torch.testing.assert_close(first, reference_value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cpp", marks=requires_cpp)])
def test_totals_hold_the_counts_and_group_sums(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    logits = rand_logits((9, C))
    targets = torch.tensor([0, -1, 3, 2, -4, 6, 9, 1, -1])  # label 9 is ignored
    out, totals, _ = torch.ops.oodkernels.row_loss_reduced_fwd(
        logits, targets, None, None, codes.ENERGY, 0.1, -3.0, -2.5, 9, None, codes.REDUCE_SUM, True, 0, 0
    )
    assert totals.dtype == torch.float64 and totals.shape == (codes.ROW_N_TOTALS,)
    assert totals[codes.TOTAL_N_ID] == 5 and totals[codes.TOTAL_N_OOD] == 3
    assert totals[codes.TOTAL_MAX_LABEL] == 6
    per_row = ok.reference.logits.energy_regularized_loss(
        logits, targets, 0.1, -3.0, -2.5, reduction="none", ignore_index=9
    )
    valid = targets != 9
    torch.testing.assert_close(totals[codes.TOTAL_SUM_ID].float(), per_row[valid & (targets >= 0)].sum())
    torch.testing.assert_close(totals[codes.TOTAL_SUM_OOD].float(), per_row[targets < 0].sum())
    torch.testing.assert_close(out, per_row.sum())


@pytest.mark.parametrize("backend", ["triton", pytest.param("cpp", marks=requires_cpp)])
def test_data_checks_read_the_kernel_totals_once(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    monkeypatch.setattr(ok.config, "data_checks", True)
    reads = []
    original = torch.Tensor.tolist

    def counting_tolist(self):
        reads.append(self.shape)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    logits = rand_logits((6, C))
    with pytest.warns(UserWarning, match="Discarding samples"):
        ok.loss.LogitNorm()(logits, torch.tensor([0, -1, 2, 3, 4, 5]))
    assert reads == [(codes.ROW_N_TOTALS,)]
    reads.clear()
    with pytest.raises(LabelOutOfRangeError, match=f"label {C + 2} is out of range"):
        ok.loss.OutlierExposureLoss()(logits, torch.tensor([0, -1, C + 2, 3, 4, 5]))
    assert reads == [(codes.ROW_N_TOTALS,)]
    with pytest.raises(ValueError, match="Target label to large"):
        ok.loss.BackgroundClassLoss(n_classes=C - 1)(logits, torch.tensor([0, -1, C - 1, 3, 4, 5]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok.loss.LogitNorm()(logits, torch.tensor([0, 1, 2, 3, 4, 5]))  # no OOD entry: no warning


def test_one_tile_rows_save_no_statistics(monkeypatch):
    use_backend(monkeypatch, "triton")
    logits = rand_logits((6, C), dtype=torch.float32)
    targets = rand_targets(logits.shape, "mixed")
    _, _, stats = torch.ops.oodkernels.row_loss_reduced_fwd(
        logits, targets, None, None, codes.CROSS_ENTROPY, 0.0, 0.0, 0.0, None, None, codes.REDUCE_MEAN_ID, False, 0, 0
    )
    assert stats.shape == (codes.ROW_N_STATS, 0)
    with row_ops.forced_blocks(2, 4):  # C = 7 in two class blocks: the rows stream and keep their statistics
        _, _, stats = torch.ops.oodkernels.row_loss_reduced_fwd(
            logits, targets, None, None, codes.CROSS_ENTROPY, 0.0, 0.0, 0.0, None, None, codes.REDUCE_MEAN_ID, False,
            *row_ops.block_args(),
        )  # fmt: skip
    assert stats.shape == (codes.ROW_N_STATS, 6)


def test_weight_that_requires_grad_takes_the_per_row_op(monkeypatch):
    use_backend(monkeypatch, "triton")
    logits = rand_logits((6, C))
    targets = rand_targets(logits.shape, "mixed")
    weight = torch.rand(6, requires_grad=True)
    compare(
        "triton", monkeypatch, lambda x, w: ok.functional.outlier_exposure_loss(x, targets, weight=w), [logits, weight]
    )


def test_the_reduced_op_refuses_a_weight_gradient(monkeypatch):
    use_backend(monkeypatch, "triton")
    logits = rand_logits((4, C))
    weight = torch.rand(4, requires_grad=True)
    out, _, _ = torch.ops.oodkernels.row_loss_reduced_fwd(
        logits, torch.tensor([0, 1, 2, 3]), weight, None, 0, 0.0, 0.0, 0.0, None, None, 4, False, 0, 0
    )
    with pytest.raises(RuntimeError, match="no gradient for the per-entry weight"):
        out.backward()


def test_opcheck_reduced_ops(monkeypatch):
    use_backend(monkeypatch, "triton")
    logits = rand_logits((5, C), dtype=torch.float64).requires_grad_(True)
    targets = torch.tensor([0, -1, 3, 6, 2], dtype=torch.int32)
    weight = torch.rand(5, dtype=torch.float64)
    for reduction in (codes.REDUCE_MEAN_GROUPS, codes.REDUCE_NONE):
        args = (logits, targets, weight, None, codes.ENERGY, 0.1, -3.0, -2.5, None, None, reduction, False, 0, 0)
        torch.library.opcheck(torch.ops.oodkernels.row_loss_reduced_fwd.default, args)
