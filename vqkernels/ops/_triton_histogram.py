"""Triton histogram kernels and their launcher, shared by two ops' Triton backends:
``histogram`` (its whole kernel) and ``cluster_stats`` (code counts and run lengths). It lives
here, not in ``ops/histogram/triton.py``, because no op imports another op's backend.

Per-program private counts, then one atomic per (program, code).

``C`` independent index rows ``[C, N]`` are counted into ``[C, K]`` by one launch: the
codebook axis is folded into ``program_id(0)`` (codebook-major) and each program reads
and writes from int64 bases ``c * N`` and ``c * K``.

Two kernels, both privatised so that the global atomics see far fewer updates than there
are indices:

* small K (``next_pow2(K) <= 2048``), no weights: each program walks a grid-stride range
  of one codebook's blocks (``P`` programs per codebook), accumulating ``tl.histogram`` counts in registers, and adds its private
  histogram to the output once at the end (only the non-zero bins). Masked indices are
  counted in bin 0 and subtracted again, so no extra bin is needed (``tl.histogram``'s
  ``mask=`` argument is newer than some supported Triton versions).
* large K, or weights: each program sorts its block of indices (``tl.sort``; with weights
  the lane number is packed into the low bits of the key so that the weights can follow
  the sort), sums each run of equal codes with a segmented scan, and issues one atomic
  per distinct code in the block, from the run's last element.

Counts are exact (int64). Weighted sums are fp32 and, like any atomic reduction, their
rounding depends on the order in which programs finish.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _triton_utils as tu

# Largest K (rounded up to a power of two) for the tl.histogram kernel; above it the
# private histogram would not fit in registers, and the sort kernel takes over.
_MAX_SMALL_BINS = 2048


@triton.jit(do_not_specialize=["N", "K", "P"])
def _hist_small_kernel(idx_ptr, out_ptr, N, K, P, BINS: tl.constexpr, BLOCK: tl.constexpr):
    """idx ``[C, N]`` -> out ``[C, K]`` (+=); ``P`` programs per codebook, grid ``C * P``."""
    pid = tl.program_id(0)
    cb64 = (pid // P).to(tl.int64)
    p = pid % P
    idx_row = idx_ptr + cb64 * N  # int64 base; offsets within a row are < N: int32
    lane = tl.arange(0, BLOCK)
    counts = tl.zeros([BINS], tl.int32)
    n_masked = tl.zeros([BLOCK], tl.int32)
    for start in range(p * BLOCK, N, P * BLOCK):
        offs = start + lane
        v = tl.load(idx_row + offs, mask=offs < N, other=-1)
        keep = v >= 0
        counts += tl.histogram(tl.where(keep, v, 0).to(tl.int32), BINS)
        n_masked += (~keep).to(tl.int32)
    bins = tl.arange(0, BINS)
    counts -= tl.where(bins == 0, tl.sum(n_masked, axis=0), 0)
    tl.atomic_add(out_ptr + cb64 * K + bins, counts.to(tl.int64), mask=(bins < K) & (counts != 0))


@triton.jit
def _run_sum(k1, v1, k2, v2):
    # Segmented sum over sorted keys: a run restarts where the key changes.
    return k2, tl.where(k1 == k2, v1 + v2, v2)


@triton.jit(do_not_specialize=["N", "K"])
def _hist_sort_kernel(idx_ptr, w_ptr, out_ptr, N, K, HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr):
    """idx / w ``[C, N]`` -> out ``[C, K]`` (+=); one program per (codebook, block of BLOCK indices)."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK)
    cb64 = (pid // n_blocks).to(tl.int64)
    lane = tl.arange(0, BLOCK)
    start = (pid % n_blocks).to(tl.int64) * BLOCK
    base = cb64 * N + start  # int64: this block's first element in the [C * N] arrays
    offs = base + lane
    v = tl.load(idx_ptr + offs, mask=(start + lane) < N, other=-1).to(tl.int64)
    v = tl.where(v >= 0, v, K)  # masked and out-of-range lanes sort last, under key K
    if HAS_WEIGHTS:
        packed = tl.sort(v * BLOCK + lane)
        key = packed // BLOCK
        src = (packed % BLOCK).to(tl.int32)
        val = tl.load(w_ptr + base + src, mask=key < K, other=0.0).to(tl.float32)
    else:
        key = tl.sort(v)
        val = tl.full([BLOCK], 1, tl.int32)
    ones = tl.full([BLOCK], 1, tl.int32)
    _, run_total = tl.associative_scan((key, val), 0, _run_sum)  # run sum up to and including each lane
    _, run_left = tl.associative_scan((key, ones), 0, _run_sum, reverse=True)  # lanes left in the run
    last = (run_left == 1) & (key < K)
    out = out_ptr + cb64 * K + key
    if HAS_WEIGHTS:
        tl.atomic_add(out, run_total, mask=last)
    else:
        tl.atomic_add(out, run_total.to(tl.int64), mask=last)


def histogram(indices: torch.Tensor, K: int, weights=None):
    """Codebook usage of C codebooks in one launch.

    indices ``[C, N]`` int64/int32 (negative = masked, < K), weights ``[C, N]`` or None.

    Returns ``counts [C, K]``: int64, or float32 with weights.

    Example (under ``TRITON_INTERPRET=1`` on CPU, or with CUDA tensors):
        >>> histogram(torch.tensor([[0, 2, 2, -1]]), 3)
        tensor([[1, 0, 2]])
    """
    C, N = indices.shape
    interp = tu.interpreting()
    indices = indices.contiguous()
    device = indices.device
    with tu.device_guard(indices):
        if weights is None and tu.next_power_of_2(K) <= _MAX_SMALL_BINS:
            out = torch.zeros(C, K, dtype=torch.int64, device=device)
            block = 128 if interp else 1024
            # Programs per codebook: together about a persistent grid, at least one each.
            per_codebook = max(1, tu.num_programs(device, C * tu.cdiv(N, block)) // C)
            per_codebook = min(per_codebook, tu.cdiv(N, block))
            # >= 32 bins: the GPU lowering gives every lane of a warp at least one bin anyway.
            _hist_small_kernel[(C * per_codebook,)](indices, out, N, K, per_codebook,
                                                    BINS=max(32, tu.next_power_of_2(K)), BLOCK=block, num_warps=4)
            return out
        dtype = torch.int64 if weights is None else torch.float32
        out = torch.zeros(C, K, dtype=dtype, device=device)
        # The interpreter runs tl.sort and the scans element by element in Python: keep its
        # blocks no larger than the input.
        block = max(16, min(128, tu.next_power_of_2(N))) if interp else 1024
        w = weights.contiguous() if weights is not None else out  # placeholder pointer without weights
        _hist_sort_kernel[(C * tu.cdiv(N, block),)](indices, w, out, N, K, HAS_WEIGHTS=weights is not None,
                                                    BLOCK=block, num_warps=4)
        return out


def compile_cases() -> list:
    """Every histogram variant the launcher can choose, for the sm_90 compile check: the
    private-bins kernel at its smallest and largest bin count, the sort kernel with int32 /
    int64 indices, with and without fp32 / fp16 / bf16 weights."""
    cases = []
    for itype in ("i64", "i32"):
        for bins in (32, _MAX_SMALL_BINS):
            cases.append(tu.compile_case("_hist_small_kernel", _hist_small_kernel,
                                         dict(idx_ptr="*" + itype, out_ptr="*i64", N="i32", K="i32", P="i32"),
                                         dict(BINS=bins, BLOCK=1024)))
        cases.append(tu.compile_case("_hist_sort_kernel", _hist_sort_kernel,
                                     dict(idx_ptr="*" + itype, w_ptr="*i64", out_ptr="*i64", N="i32", K="i32"),
                                     dict(HAS_WEIGHTS=False, BLOCK=1024)))
        for wtype in ("fp32", "fp16", "bf16"):
            cases.append(tu.compile_case("_hist_sort_kernel", _hist_sort_kernel,
                                         dict(idx_ptr="*" + itype, w_ptr="*" + wtype, out_ptr="*fp32", N="i32",
                                              K="i32"),
                                         dict(HAS_WEIGHTS=True, BLOCK=1024)))
    return cases
