"""The tolerances that decide pass or fail, pinned.

``check_assign`` (tests/helpers.py) and the near-tie tests take the argmin tolerance from
the code under test (``vqkernels.ops.assign.ARGMIN_RTOL`` / ``tolerance``). Loosening them
would loosen every assign check at once, silently; pinned here, it is a visible, deliberate
change to this file.
"""
import pytest
import torch

from vqkernels.ops.assign import ARGMIN_RTOL, chunked, tolerance

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


# --------------------------------------------------------------------------- chunked assign
# The chunked backend's rounding bound decides which rows its exact pass 2 re-decides: a
# smaller bound would let rounded scores pick a farther code. Its tile budget decides its
# memory (O(tile), never N x K). Both pinned, as the tolerances above.

@pytest.mark.parametrize(
    "dtype,precision,want",
    [
        (torch.float32, "highest", (6 * 16 + 16) * 2.0**-24),
        (torch.float32, "high", (6 * 16 + 16) * 2.0**-24 + 8 * 2.0**-11),  # tf32 rounds the inputs
        (torch.float32, "medium", (6 * 16 + 16) * 2.0**-24 + 8 * 2.0**-8),  # bf16 rounds the inputs
        (torch.float64, "highest", (6 * 16 + 16) * 2.0**-53),
        (torch.float16, "highest", (6 * 16 + 16) * 2.0**-11),
        (torch.bfloat16, "highest", (6 * 16 + 16) * 2.0**-8),
    ],
)
def test_chunked_score_error_bound_is_pinned(dtype, precision, want):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        got = chunked.score_error_bound(dtype, 16)
    finally:
        torch.set_float32_matmul_precision(before)
    assert got == pytest.approx(want, rel=1e-12), f"score_error_bound({dtype}, 16) at {precision!r}"


@pytest.mark.parametrize(
    "args,want",
    [
        ((10000, 1000, 8, "cpu"), (1048, 1000)),  # 2**20 scores on CPU
        ((10000, 1000, 8, "cuda"), (10000, 1000)),  # 2**26 on GPU
        ((10000, 1000, 8, "xpu"), (4194, 1000)),  # 2**22 elsewhere
        ((10000, 5000, 8, "cpu", 4), (256, 1024)),  # four codebooks share the budget
        ((30, 5000, 8, "cpu"), (30, 1024)),  # never more rows than N
        ((100000, 50, 2**20, "cpu"), (8, 50)),  # wide rows: the row tile bounds tile_n
        ((100000, 5000, 8, "cpu"), (1024, 1024)),
        ((1, 10, 8, "cpu"), (1, 10)),  # one row: one-row tiles
    ],
)
def test_chunked_tile_sizes_are_pinned(args, want, monkeypatch):
    monkeypatch.delenv("VQKERNELS_CHUNK_ELEMENTS", raising=False)
    got = chunked.tile_sizes(*args)
    assert got == want and all(type(v) is int for v in got), got


def test_chunked_tile_budget_follows_the_environment(monkeypatch):
    monkeypatch.setenv("VQKERNELS_CHUNK_ELEMENTS", "4096")
    assert chunked.tile_sizes(10000, 1000, 8, "cpu") == (256, 16)
    monkeypatch.setenv("VQKERNELS_CHUNK_ELEMENTS", "64")
    assert chunked.tile_sizes(10000, 1000, 8, "cpu") == (64, 16)  # at least 64 rows per tile
    assert chunked.tile_sizes(64, 1000, 8, "cpu") == (64, 16)  # ... also when N is exactly 64
    assert chunked.tile_sizes(100, 50, 2**17, "cpu") == (64, 16)  # 64 rows of 2**17 fill the row tile exactly
    assert chunked.tile_sizes(100, 50, 2**17 + 1, "cpu") == (4, 16)  # past it: the budget's 4 rows
