"""Triton ``cluster_stats`` (atomic and deterministic), for C codebooks in one launch.

x ``[C, N, D]`` with indices ``[C, N]`` into codebook c's K codes gives counts ``[C, K]`` and
sums ``[C, K, D]``; every kernel carries the codebook axis in ``program_id(0)``.

cluster_stats, ``deterministic=False``: one program per (codebook, row block, D block)
loads its rows once and scatters them with fp32 atomics into ``sums[c, code]``; the
D-block-0 programs also add 1 to an int64 ``counts[c, code]`` (exact; converted once at
the end, to float32 by default: exact up to 2^24 rows per code; ``counts_dtype=float64``
keeps them exact beyond). Float sums depend on the order of the atomics.

cluster_stats, ``deterministic=True`` (bitwise reproducible, no float atomics). A
*segment* is one (codebook, code) pair, numbered ``g = c * (K + 1) + code`` with masked rows
under code K (their segments are never summed):

1. counts per segment by the Triton histogram (integer atomics: exact);
2. a stable sort of the flat segment keys of all C * N rows (``torch.sort(stable=True)``):
   each segment's rows become one contiguous run, in input order;
3. every (unmasked) segment is cut into pieces of ``_PIECE_ROWS`` rows, so that a code that took
   most of the batch (codebook collapse) is summed by many programs, not one;
4. ``_segment_sum_kernel``: one program per (piece, D block) sums its rows in a fixed
   order; a code with a single piece writes its sums directly (its one write), the
   pieces of a longer code go to a scratch buffer;
5. ``_combine_pieces_kernel``: one program per (long code, D block) adds the code's piece
   sums in piece order and writes them (one write per code).

Segment g's sums go to row ``g - g // (K + 1)`` (= ``c * K + code``) of ``sums [C * K, D]``.

Every order is fixed by the data and the constant block sizes below (never autotuned:
another config would change the rounding), so two runs give the same bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _triton_utils as tu
from .. import _triton_histogram as _hist

# Deterministic path constants: part of the result's bit pattern, keep them fixed.
# (The interpreter uses short pieces so that small test batches exercise the combine step.)
_PIECE_ROWS = 512
_PIECE_ROWS_INTERP = 32
_SEG_BLOCK_R = 32
_SEG_BLOCK_D = 64
_SEG_BLOCK_D_INTERP = 256  # the interpreter pays per program: fewer, wider ones
_SEG_WARPS = 4


# --------------------------------------------------------------------------- atomic stats


@triton.jit(do_not_specialize=["N", "K"])
def _stats_atomic_kernel(x_ptr, idx_ptr, counts_ptr, sums_ptr, N, K, D, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """x ``[C, N, D]``, idx ``[C, N]`` -> counts ``[C, K]``, sums ``[C, K, D]`` (+=); grid (C * row blocks, D blocks)."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    n_blocks = tl.cdiv(N, BLOCK_N)
    cb64 = (pid // n_blocks).to(tl.int64)
    local = (pid % n_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = local < N
    rows = cb64 * N + local  # int64 rows of the flat [C * N] arrays
    code = tl.load(idx_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    valid = rmask & (code >= 0)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m = valid[:, None] & (dd < D)[None, :]
    xv = tl.load(x_ptr + rows[:, None] * D + dd[None, :], mask=m, other=0.0).to(tl.float32)
    out = cb64 * K + code  # this code's row of the flat [C * K] outputs
    tl.atomic_add(sums_ptr + out[:, None] * D + dd[None, :], xv, mask=m, sem="relaxed")
    ones = tl.full([BLOCK_N], 1, tl.int64)  # integer counts: exact at any batch size
    tl.atomic_add(counts_ptr + out, ones, mask=tu.block_and(valid, pid_d == 0), sem="relaxed")


# --------------------------------------------------------------------------- deterministic stats


@triton.jit(do_not_specialize=["G", "K1"])
def _segment_sum_kernel(
    x_ptr, order_ptr, piece_code_ptr, piece_start_ptr, row_start_ptr, lengths_ptr, n_pieces_ptr, slot_ptr,
    sums_ptr, scratch_ptr, G, K1, D,
    PIECE_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (piece, D block). x ``[C * N, D]``; per-segment arrays ``[G]``, G = C * (K + 1)."""
    t = tl.program_id(0)
    pid_d = tl.program_id(1)
    code = tl.load(piece_code_ptr + t)  # a segment g; G: no piece here (the grid is an upper bound)
    valid = code < G
    code_c = tl.where(valid, code, 0)
    j = t - tl.load(piece_start_ptr + code_c)  # which piece of its code
    seg_start = tl.load(row_start_ptr + code_c)
    seg_end = seg_start + tl.load(lengths_ptr + code_c)
    r0 = seg_start + j * PIECE_ROWS
    r1 = tl.minimum(r0 + PIECE_ROWS, seg_end)
    r1 = tl.where(valid, r1, r0)  # empty loop for an unused program
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for r in range(r0, r1, BLOCK_R):
        rows = r + rr
        rmask = rows < r1
        src = tl.load(order_ptr + rows, mask=rmask, other=0)
        xv = tl.load(x_ptr + src[:, None] * D + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(xv.to(tl.float32), axis=0)
    single = tl.load(n_pieces_ptr + code_c) == 1
    out = code_c.to(tl.int64) - code_c // K1  # segment c * (K + 1) + k -> sums row c * K + k
    tl.store(sums_ptr + out * D + dd, acc, mask=tu.block_and(dmask, valid & single))
    slot = tl.load(slot_ptr + code_c) + j
    tl.store(scratch_ptr + slot.to(tl.int64) * D + dd, acc, mask=tu.block_and(dmask, valid & (~single)))


@triton.jit(do_not_specialize=["K1"])
def _combine_pieces_kernel(codes_ptr, n_pieces_ptr, slot_ptr, sums_ptr, scratch_ptr, K1, D, BLOCK_D: tl.constexpr):
    """One program per (candidate long segment, D block); segment g's sums go to row g - g // K1."""
    code = tl.load(codes_ptr + tl.program_id(0)).to(tl.int64)  # a candidate long segment (single-piece ones are skipped)
    pid_d = tl.program_id(1)
    n = tl.load(n_pieces_ptr + code)
    first = tl.load(slot_ptr + code)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    n_loop = tl.where(n > 1, n, 0)  # single-piece codes were written by the segment kernel
    for j in range(0, n_loop):
        acc += tl.load(scratch_ptr + (first + j).to(tl.int64) * D + dd, mask=dmask, other=0.0)
    out = code - code // K1
    tl.store(sums_ptr + out * D + dd, acc, mask=tu.block_and(dmask, n > 1))


def _cluster_stats_deterministic(x: torch.Tensor, indices: torch.Tensor, K: int):
    C, N, D = x.shape
    device = x.device
    piece_rows = _PIECE_ROWS_INTERP if tu.interpreting() else _PIECE_ROWS
    K1 = K + 1
    G = C * K1  # segments: (codebook, code) pairs, masked rows under code K
    keys = torch.where(indices >= 0, indices, torch.full_like(indices, K)).to(torch.int64)  # [C, N]
    lengths_all = _hist.histogram(keys, K1, None)  # int64 [C, K + 1]
    counts = lengths_all[:, :K].contiguous()  # int64; the caller converts
    seg_keys = keys + torch.arange(C, device=device, dtype=torch.int64).view(C, 1) * K1
    order = torch.sort(seg_keys.view(-1), stable=True).indices  # each segment's rows contiguous, in input order
    lengths = lengths_all.view(-1)  # [G]
    row_start = torch.cumsum(lengths, 0) - lengths
    n_pieces = (lengths + (piece_rows - 1)) // piece_rows
    n_pieces[K::K1] = 0  # masked rows: their segments are never summed
    piece_end = torch.cumsum(n_pieces, 0)
    piece_start = piece_end - n_pieces
    multi = torch.where(n_pieces > 1, n_pieces, torch.zeros_like(n_pieces))
    slot = torch.cumsum(multi, 0) - multi  # first scratch row of each multi-piece segment
    # Static upper bounds (no host sync), with R = C * N rows in all: a segment's pieces <= its
    # rows / PIECE_ROWS + 1, and at most C * min(K, N) segments have rows, so pieces <=
    # R / PIECE_ROWS + C * min(K, N); a long segment has < 2 rows / PIECE_ROWS pieces, so
    # scratch rows < 2 R / PIECE_ROWS; at most R / (PIECE_ROWS + 1) segments are long.
    R = C * N
    max_pieces = R // piece_rows + C * min(K, N)
    max_scratch = max(1, 2 * R // piece_rows + 1)
    max_long = max(1, min(C * K, R // (piece_rows + 1)))
    piece_code = torch.searchsorted(piece_end, torch.arange(max_pieces, device=device), right=True)
    # Long segments first (stable: in segment order), so the combine grid covers only them.
    long_codes = torch.sort((n_pieces > 1).to(torch.int8), descending=True, stable=True).indices[:max_long]
    sums = torch.zeros(C, K, D, dtype=torch.float32, device=device)
    scratch = torch.empty(max_scratch, D, dtype=torch.float32, device=device)
    block_d = min(_SEG_BLOCK_D_INTERP if tu.interpreting() else _SEG_BLOCK_D, max(16, tu.next_power_of_2(D)))
    d_blocks = tu.cdiv(D, block_d)
    _segment_sum_kernel[(max_pieces, d_blocks)](
        x, order, piece_code, piece_start, row_start, lengths, n_pieces, slot, sums, scratch, G, K1, D,
        PIECE_ROWS=piece_rows, BLOCK_R=_SEG_BLOCK_R, BLOCK_D=block_d, num_warps=_SEG_WARPS,
    )
    _combine_pieces_kernel[(long_codes.numel(), d_blocks)](
        long_codes, n_pieces, slot, sums, scratch, K1, D, BLOCK_D=block_d, num_warps=_SEG_WARPS
    )
    return counts, sums


def _atomic_stats_(x: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor) -> None:
    """Add the rows of x ``[C, N, D]`` to ``counts`` (int64 ``[C, K]``: exact at any count,
    2^24 rows per code and beyond) and ``sums`` (fp32 ``[C, K, D]``), in place."""
    C, N, D = x.shape
    K = counts.shape[1]
    # 16 elements per thread: each carries a 64-bit address for the atomic.
    block_d = min(128, max(16, tu.next_power_of_2(D)))
    block_n = max(16, 4096 // block_d)
    grid = (C * tu.cdiv(N, block_n), tu.cdiv(D, block_d))
    _stats_atomic_kernel[grid](x, indices, counts, sums, N, K, D, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=8)


def cluster_stats(x: torch.Tensor, indices: torch.Tensor, K: int, deterministic: bool,
                  counts_dtype: torch.dtype = torch.float32):
    """Counts and per-code sums of C codebooks in one launch.

    x ``[C, N, D]``, indices ``[C, N]`` (negative = masked, < K).

    Returns ``(counts [C, K], sums float32 [C, K, D])``. Both paths count in int64 (exact at
    any batch size) and convert once at the end to ``counts_dtype``: float32 (the op's
    contract) is exact up to 2^24 rows per code; pass torch.float64 (exact to 2^53) or
    torch.int64 where a code may collect more.

    Example (under ``TRITON_INTERPRET=1`` on CPU, or with CUDA tensors):
        >>> counts, sums = cluster_stats(torch.ones(1, 3, 2), torch.tensor([[0, 0, -1]]), 2, True)
        >>> counts
        tensor([[2., 0.]])
    """
    C, N, D = x.shape
    x = x.contiguous()
    indices = indices.contiguous()
    with tu.device_guard(x):
        if deterministic:
            counts, sums = _cluster_stats_deterministic(x, indices, K)
        else:
            counts = torch.zeros(C, K, dtype=torch.int64, device=x.device)
            sums = torch.zeros(C, K, D, dtype=torch.float32, device=x.device)
            _atomic_stats_(x, indices, counts, sums)
        return counts.to(counts_dtype), sums


def compile_cases() -> list:
    """Every cluster_stats variant the launcher can choose, for the sm_90 compile check: the
    atomic kernel at every block width (BLOCK_N = 4096 / BLOCK_D) for each input dtype and
    int32 / int64 indices, and the deterministic kernels at their fixed block sizes."""
    cases = []
    for xtype in ("fp32", "fp16", "bf16"):
        for itype in ("i64", "i32"):
            for block_d in (16, 32, 64, 128):
                cases.append(tu.compile_case(
                    "_stats_atomic_kernel", _stats_atomic_kernel,
                    dict(x_ptr="*" + xtype, idx_ptr="*" + itype, counts_ptr="*i64", sums_ptr="*fp32", N="i32", K="i32",
                         D="i32"), dict(BLOCK_N=max(16, 4096 // block_d), BLOCK_D=block_d), num_warps=8))
        for block_d in (16, _SEG_BLOCK_D):
            cases.append(tu.compile_case(
                "_segment_sum_kernel", _segment_sum_kernel,
                dict(x_ptr="*" + xtype, order_ptr="*i64", piece_code_ptr="*i64", piece_start_ptr="*i64",
                     row_start_ptr="*i64", lengths_ptr="*i64", n_pieces_ptr="*i64", slot_ptr="*i64", sums_ptr="*fp32",
                     scratch_ptr="*fp32", G="i32", K1="i32", D="i32"),
                dict(PIECE_ROWS=_PIECE_ROWS, BLOCK_R=_SEG_BLOCK_R, BLOCK_D=block_d), num_warps=_SEG_WARPS))
    for block_d in (16, _SEG_BLOCK_D):
        cases.append(tu.compile_case(
            "_combine_pieces_kernel", _combine_pieces_kernel,
            dict(codes_ptr="*i64", n_pieces_ptr="*i64", slot_ptr="*i64", sums_ptr="*fp32", scratch_ptr="*fp32",
                 K1="i32", D="i32"), dict(BLOCK_D=block_d), num_warps=_SEG_WARPS))
    return cases
