"""The C++ ``histogram`` / ``cluster_stats`` kernels of the cpu backend (csrc/cpu/stats_cpu.cpp)
beyond the backend-parametrised suite of test_ops.py: sizes that split the work into several
row chunks and sum parts (the suite's N <= 1000 runs in one), thread-count independence,
the summation order it promises, and the value checks that ride on its passes."""
import sys

import pytest
import torch

import vqkernels
from helpers import loop_histogram
from vqkernels import _cpu_extension
from vqkernels.ops.cluster_stats import cluster_stats_unchecked
from vqkernels.ops.histogram import histogram_unchecked

pytestmark = pytest.mark.skipif(
    _cpu_extension.unavailable_reason() is not None, reason=f"cpu backend: {_cpu_extension.unavailable_reason()}"
)

# more than one 16384-row chunk per thread at 3 threads, codebooks straddling chunk edges
LARGE = [(1, 70001, 5), (3, 40000, 300), (2, 50000, 1)]


@pytest.fixture(params=[1, 3], ids=lambda t: f"threads{t}")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _indices(C, N, K, seed, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    # skewed (hot low codes, as a real codebook's) and about 1 in 10 rows masked
    idx = (torch.rand(C, N, generator=g).pow(2) * K).long().clamp_max(K - 1)
    return torch.where(torch.rand(C, N, generator=g) < 0.1, -1, idx).to(dtype)


@pytest.mark.parametrize("C,N,K", LARGE)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_histogram_large(threads, C, N, K, index_dtype):
    idx = _indices(C, N, K, C + N + K, index_dtype)
    counts = vqkernels.histogram(idx, K, codebook_axis=True, backend="cpu")
    want = torch.stack([torch.bincount(i[i >= 0].long(), minlength=K) for i in idx])
    assert counts.dtype == torch.int64 and torch.equal(counts, want)
    w = torch.rand(C, N, generator=torch.Generator().manual_seed(1))
    weighted = vqkernels.histogram(idx, K, w, codebook_axis=True, backend="cpu")
    for c in range(C):
        got = weighted[c].double()
        torch.testing.assert_close(got, torch.tensor(loop_histogram(idx[c], K, w[c]), dtype=torch.float64), rtol=1e-6, atol=1e-6)


def _in_order_sums(x, idx, K):
    """fp32 sums of each code's rows added one by one in input order: what the kernel promises."""
    C, N, D = x.shape
    sums = torch.zeros(C, K, D)
    for c in range(C):
        for n, k in enumerate(idx[c].tolist()):
            if k >= 0:
                sums[c, k] += x[c, n].float()
    return sums


# [C * K, D] sums of 312 B (every part scans the rows) and 1.28 MB (rows gathered in sorted
# order at 1 thread; scanned at 3, whose budget is 3 MB): both paths, the same bits
@pytest.mark.parametrize("C,N,K,D", [(2, 3000, 3, 13), (1, 3000, 20000, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cluster_stats_sums_rows_in_input_order(threads, C, N, K, D, dtype):
    # few codes: long runs of rows per code, several sum parts; D = 8 + 5 (fp16: vector + tail)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(C, N, D, generator=g).to(dtype)
    idx = _indices(C, N, K, 6)
    x[idx < 0] = float("nan")  # masked rows must not reach any sum
    counts, sums = vqkernels.cluster_stats(x, idx, K, codebook_axis=True, backend="cpu")
    assert counts.dtype == sums.dtype == torch.float32
    want_counts = torch.stack([torch.bincount(i[i >= 0], minlength=K) for i in idx]).float()
    assert torch.equal(counts, want_counts)
    assert torch.equal(sums, _in_order_sums(x, idx, K))  # bitwise: the order is the contract


@pytest.mark.parametrize("C,N,K,D", [(C, N, K, 7) for C, N, K in LARGE] + [(1, 40000, 20000, 16), (2, 30000, 9000, 16)])
def test_cluster_stats_large_is_the_same_for_any_thread_count(C, N, K, D):
    """Small sums are scanned, large ones gathered (the last two: gathered at 1 thread, scanned
    at 2 or 3); every path and thread count gives the same bits."""
    g = torch.Generator().manual_seed(C * N)
    x = torch.randn(C, N, D, generator=g)
    idx = _indices(C, N, K, 7)
    results = []
    before = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(vqkernels.cluster_stats(x, idx, K, codebook_axis=True, backend="cpu"))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert torch.equal(results[0].counts, other.counts) and torch.equal(results[0].sums, other.sums)
    ref = vqkernels.cluster_stats(x.double(), idx, K, codebook_axis=True, backend="chunked")
    assert torch.equal(results[0].counts.double(), ref.counts)
    torch.testing.assert_close(results[0].sums.double(), ref.sums, rtol=1e-4, atol=1e-3)


def test_out_of_range_raises_even_for_trusted_callers():
    """The kernels never count an index >= K; the check is free there, so it raises always."""
    idx = torch.tensor([[0, 9, 1, -1]])
    with pytest.raises(ValueError, match=r"indices holds index 9, expected values in \[0, 4\)"):
        histogram_unchecked(idx, 4, "cpu")
    with pytest.raises(ValueError, match=r"indices holds index 9, expected values in \[0, 4\)"):
        cluster_stats_unchecked(torch.ones(1, 4, 2), idx, 4, False, "cpu")


def test_nonfinite_sums_are_found_in_the_kernel_pass():
    x = torch.randn(40000, 3)
    idx = torch.randint(0, 5, (40000,))
    idx[7] = -1
    x[7] = float("nan")  # masked: ignored
    vqkernels.cluster_stats(x, idx, 5, backend="cpu")
    x[30001, 2] = float("inf")
    with pytest.raises(ValueError, match=r"x contains NaN or Inf \(rows \[30001\]\)"):
        vqkernels.cluster_stats(x, idx, 5, backend="cpu")
    idx[5] = idx[30001]
    x[5, 2] = float("-inf")  # inf + -inf: a NaN sum
    with pytest.raises(ValueError, match=r"x contains NaN or Inf \(rows \[5, 30001\]\)"):
        vqkernels.cluster_stats(x, idx, 5, backend="cpu")
    # the trusted path reports nothing: the caller gates on its own flag
    counts, sums = cluster_stats_unchecked(x[None], idx[None], 5, False, "cpu")
    assert not torch.isfinite(sums).all() and counts.sum() == 39999  # row 7 masked


def test_the_op_does_not_read_the_indices_twice(monkeypatch):
    """With the cpu backend the op leaves the range check and the finite check to the kernel."""
    cs, hist = sys.modules["vqkernels.ops.cluster_stats"], sys.modules["vqkernels.ops.histogram"]  # (the ops shadow the names)

    def fail(*a, **k):
        raise AssertionError("the op ran its own pass")

    monkeypatch.setattr(hist, "check_indices_in_range", fail)
    monkeypatch.setattr(cs, "check_indices_in_range", fail)
    monkeypatch.setattr(cs, "all_finite", fail)
    idx = torch.randint(-1, 6, (500,))
    assert torch.equal(vqkernels.histogram(idx, 6, backend="cpu"), torch.bincount(idx[idx >= 0], minlength=6))
    counts, _ = vqkernels.cluster_stats(torch.randn(500, 4), idx, 6, backend="cpu")
    assert torch.equal(counts.long(), torch.bincount(idx[idx >= 0], minlength=6))
    with pytest.raises(AssertionError, match="own pass"):  # chunked still checks
        vqkernels.histogram(idx, 6, backend="chunked")
