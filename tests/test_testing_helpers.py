"""The public checking helpers must catch what they promise to catch."""

import pytest
import torch

from oodkernels import testing


def test_tolerances_follow_the_kernel_guide():
    assert testing.tolerances(torch.float64) == (1e-10, 1e-8)
    assert testing.tolerances(torch.float32) == (1e-6, 1e-5)
    assert testing.tolerances(torch.float16) == (1e-3, 1e-3)
    assert testing.tolerances(torch.bfloat16) == (1e-2, 2e-2)
    with pytest.raises(ValueError, match="dtype"):
        testing.tolerances(torch.int64)


def test_assert_close_reports_the_worst_entry():
    expected = torch.zeros(4, 3)
    actual = expected.clone()
    actual[2, 1] = 0.5
    actual[0, 0] = 1e-7  # within atol
    with pytest.raises(AssertionError, match=r"1 of 12 entries.*\n  at \(2, 1\): got 0.5"):
        testing.assert_close(actual, expected)
    testing.assert_close(torch.tensor([float("nan"), float("inf")]), torch.tensor([float("nan"), float("inf")]))
    with pytest.raises(AssertionError, match="dtype"):
        testing.assert_close(expected.double(), expected)
    with pytest.raises(AssertionError, match="shape"):
        testing.assert_close(expected[:2], expected)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_make_logits_layouts_hold_the_same_values(layout, dtype):
    a = testing.make_logits(2, 5, (3, 4), dtype=dtype, generator=torch.Generator().manual_seed(3))
    b = testing.make_logits(2, 5, (3, 4), dtype=dtype, generator=torch.Generator().manual_seed(3), layout=layout)
    assert b.dtype == dtype and b.shape == (2, 5, 3, 4)
    assert torch.equal(a, b)
    if layout != "contiguous":
        assert not b.is_contiguous()


def test_make_targets_patterns():
    mixed = testing.make_targets((8,), 3)
    assert mixed.tolist() == [-1, 0, 1, 2, -1, 0, 1, 2]
    assert mixed.dtype == torch.int64
    assert (testing.make_targets((2, 4, 4), 3, "all_id") >= 0).all()
    assert (testing.make_targets((6,), 3, "all_ood") < 0).all()
    assert testing.make_targets((2, 4, 4), 3, "empty").shape == (0, 4, 4)
    with pytest.raises(ValueError, match="pattern"):
        testing.make_targets((2,), 3, "some")


def test_check_against_reference_catches_a_wrong_gradient():
    def reference(x):
        return (x * x).sum(1)

    def wrong_backward(x):
        # same value, gradient 2x replaced by x
        return (x * x.detach()).sum(1)

    x = torch.randn(4, 3)
    testing.check_against_reference(reference, reference, [x])
    with pytest.raises(AssertionError, match="gradient of input 0"):
        testing.check_against_reference(wrong_backward, reference, [x])
    with pytest.raises(AssertionError, match="value"):
        testing.check_against_reference(lambda x: reference(x) + 1e-3, reference, [x])


def test_gradcheck_fp64_runs_in_float64():
    seen = []

    def fn(x):
        seen.append(x.dtype)
        return x.sin().sum()

    assert testing.gradcheck_fp64(fn, [torch.randn(3, dtype=torch.float32)])
    assert set(seen) == {torch.float64}
