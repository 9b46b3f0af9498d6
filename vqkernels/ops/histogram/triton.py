"""Triton ``histogram``: per-program private counts, then one atomic per (program, code).

Two kernels, both privatised so that the global atomics see far fewer updates than there
are indices:

* small K (``next_pow2(K) <= 2048``), no weights: each program walks a grid-stride range
  of blocks, accumulating ``tl.histogram`` counts in registers, and adds its private
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

from .. import _triton_utils as tu

# Largest K (rounded up to a power of two) for the tl.histogram kernel; above it the
# private histogram would not fit in registers, and the sort kernel takes over.
_MAX_SMALL_BINS = 2048


@triton.jit(do_not_specialize=["N", "K"])
def _hist_small_kernel(idx_ptr, out_ptr, N, K, BINS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lane = tl.arange(0, BLOCK)
    counts = tl.zeros([BINS], tl.int32)
    n_masked = tl.zeros([BLOCK], tl.int32)
    for start in range(pid * BLOCK, N, nprog * BLOCK):
        offs = start + lane
        v = tl.load(idx_ptr + offs, mask=offs < N, other=-1)
        keep = v >= 0
        counts += tl.histogram(tl.where(keep, v, 0).to(tl.int32), BINS)
        n_masked += (~keep).to(tl.int32)
    bins = tl.arange(0, BINS)
    counts -= tl.where(bins == 0, tl.sum(n_masked, axis=0), 0)
    tl.atomic_add(out_ptr + bins, counts.to(tl.int64), mask=(bins < K) & (counts != 0))


@triton.jit
def _run_sum(k1, v1, k2, v2):
    # Segmented sum over sorted keys: a run restarts where the key changes.
    return k2, tl.where(k1 == k2, v1 + v2, v2)


@triton.jit(do_not_specialize=["N", "K"])
def _hist_sort_kernel(idx_ptr, w_ptr, out_ptr, N, K, HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    base = pid.to(tl.int64) * BLOCK
    offs = base + lane
    v = tl.load(idx_ptr + offs, mask=offs < N, other=-1).to(tl.int64)
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
    if HAS_WEIGHTS:
        tl.atomic_add(out_ptr + key, run_total, mask=last)
    else:
        tl.atomic_add(out_ptr + key, run_total.to(tl.int64), mask=last)


def histogram(indices: torch.Tensor, K: int, weights=None):
    """Codebook usage. indices ``[N]`` int64/int32 (negative = masked, < K), weights ``[N]`` or None.

    Returns ``counts [K]``: int64, or float32 with weights.
    """
    N = indices.shape[0]
    interp = tu.interpreting()
    indices = indices.contiguous()
    with tu.device_guard(indices):
        if weights is None and tu.next_power_of_2(K) <= _MAX_SMALL_BINS:
            out = torch.zeros(K, dtype=torch.int64, device=indices.device)
            block = 128 if interp else 1024
            grid = (tu.num_programs(indices.device, tu.cdiv(N, block)),)
            # >= 32 bins: the GPU lowering gives every lane of a warp at least one bin anyway.
            _hist_small_kernel[grid](indices, out, N, K, BINS=max(32, tu.next_power_of_2(K)), BLOCK=block,
                                     num_warps=4)
            return out
        dtype = torch.int64 if weights is None else torch.float32
        out = torch.zeros(K, dtype=dtype, device=indices.device)
        # The interpreter runs tl.sort and the scans element by element in Python: keep its
        # blocks no larger than the input.
        block = max(16, min(128, tu.next_power_of_2(N))) if interp else 1024
        w = weights.contiguous() if weights is not None else out  # placeholder pointer without weights
        _hist_sort_kernel[(tu.cdiv(N, block),)](indices, w, out, N, K, HAS_WEIGHTS=weights is not None,
                                                BLOCK=block, num_warps=4)
        return out
