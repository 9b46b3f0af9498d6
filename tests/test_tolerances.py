"""The tolerances that decide pass or fail, pinned.

``check_assign`` (tests/helpers.py) and the near-tie tests take the argmin tolerance from
the code under test (``vqkernels.ops.assign.ARGMIN_RTOL`` / ``tolerance``). Loosening them
would loosen every assign check at once, silently; pinned here, it is a visible, deliberate
change to this file.
"""
import pytest
import torch

from vqkernels.ops.assign import ARGMIN_RTOL, tolerance

PINNED_RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, "tf32": 4e-3}


def test_argmin_rtol_values_are_pinned():
    assert ARGMIN_RTOL == PINNED_RTOL


# x = (3, 4): |x|^2 = 25; the largest code (0, 2): max|c|^2 = 4; so the l2 / dot scale is 29
X = [[3.0, 4.0]]
CODES = [[1.0, 0.0], [0.0, 2.0]]


@pytest.mark.parametrize(
    "dtype,key,metric,want",
    [
        (torch.float32, None, "l2", 2e-5 * 29),
        (torch.float32, None, "dot", 2e-5 * 29),
        (torch.float32, None, "cosine", 4 * 2e-5),  # cosine distances live in [0, 2]: no norm scale
        (torch.float16, None, "l2", 2e-5 * 29),  # fp16 / bf16 accumulate in fp32
        (torch.bfloat16, None, "l2", 2e-5 * 29),
        (torch.float64, None, "l2", 1e-12 * 29),
        (torch.float64, None, "cosine", 4 * 1e-12),
        (torch.float32, "tf32", "l2", 4e-3 * 29),
    ],
)
def test_tolerance_formula_is_pinned(dtype, key, metric, want):
    x, codes = torch.tensor(X, dtype=dtype), torch.tensor(CODES, dtype=dtype)
    got = tolerance(x, codes, metric, key)
    assert got.shape == (1,) and got.dtype == torch.float64
    assert abs(float(got[0]) - want) <= 1e-9 * want, f"tolerance({dtype}, {key}, {metric}) = {float(got[0])}, pinned {want}"


def test_tolerance_is_per_row_and_uses_the_largest_code():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    codes = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
    got = tolerance(x, codes, "l2")
    torch.testing.assert_close(got, 2e-5 * torch.tensor([4.0, 29.0, 104.0], dtype=torch.float64), rtol=1e-12, atol=0)
