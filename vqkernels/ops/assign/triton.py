"""Triton ``assign``: fused distance + argmin, one pass over the codebook per row block.

``C`` independent codebooks are served by one launch: the codebook axis is folded into
``program_id(0)`` (codebook-major, so the programs resident together read one codebook),
and every per-codebook array (rows, codes, per-code terms, outputs, partial minima) is
addressed from an int64 base ``c * N * D``, ``c * K * D``, ``c * K``, ``c * N``.

Each program owns ``BLOCK_N`` rows of one codebook's ``x`` and streams that codebook
through ``tl.dot`` in ``BLOCK_K``-code tiles with fp32 accumulation. The score of a tile is

    score[n, k] = bias[k] + mult[k] * <x[n], c[k]>

with per-code terms computed once per call in fp32:

* ``l2``:     bias = ||c||^2 (:func:`_code_norms_kernel`, over all C * K codes), mult = -2
  (||x||^2 is the same for every code of a row, so it is left out). The launcher scores
  copies ``x - m``, ``c - m`` shifted by each codebook's centre ``m`` (:mod:`._centre`: the
  rounded mean where a common offset dominates, else exactly 0; distances unchanged, no
  cancellation in ``||c||^2 - 2 x.c``) and takes the split epilogue, whose exact distance
  reads the original x and codes.
* ``cosine``: the codebook is normalised once per call (``F.normalize``); the score is
  ``-<x, c/||c||>`` with raw x (``1 - cos`` ranks codes the same way for any ||x|| > 0), so
  codes that normalise to the same vector tie exactly. For 16-bit inputs the unit codes
  are kept as hi + lo parts of the input dtype and each tile takes two dots: a single
  rounded copy would put errors of 1e-3 into ``1 - cos``.
* ``dot``:    bias = 0, mult = -1

Per-column running ``(min, index)`` registers ``[BLOCK_N, BLOCK_K]`` stay on chip across
tiles: column j keeps the best score among codes ``k_start + j + t * BLOCK_K`` and an equal
score in a later tile never replaces the earlier one (strict ``<``). After the sweep one
reduction per row takes the minimum over the columns and, among the columns holding it,
the lowest index, so ties go to the lowest index (no per-tile ``min``/``argmin`` and its
cross-lane shuffles: a score costs one FMA, one compare and two selects). A NaN score (a row
of x holding NaN/Inf, or a NaN code) compares False, never enters the running minima and
can never hide the minimum of the other codes. Only the int64
index and the fp32 distance are written -- never an N x K matrix. The winner's distance is
then recomputed exactly in fp32 by direct difference (:func:`_exact_distance`).

Layout of the work:

* padded rows of at most 512 staged bytes (D <= 256 in 16-bit, D <= 128 in fp32/tf32,
  D <= 64 in fp32/tf32x3, D <= 32 in fp32/ieee; ``BLOCK_D`` = D padded to a power of two
  >= 16, as ``tl.dot`` needs; the codebook is zero-padded to ``BLOCK_D`` columns once per
  call so its tiles load unmasked): the row block is loaded once and stays on chip while
  the codebook tiles stream past.
* larger ``D``: each tile's dot is accumulated over 128-staged-byte chunks of D.
* few rows (row blocks, over all codebooks, that would leave most of a wave of SMs idle;
  :func:`_split_count` sizes S so the programs fill whole waves): each codebook is split into
  ``S`` ranges, one program per (codebook, range, row block); partial minima ``[C, S, N]``
  are combined by a small torch argmin over S (first minimum: the lowest range, hence the
  lowest index, wins ties) and the exact distance by a second kernel. Programs are ordered
  codebook-major then range-major, so the programs resident together read the same
  codebook range and its tiles are served from L2.

Launch configs are autotuned per (K bucket, D, dtype, metric, precision, split) -- never
on N or C, which change every batch or model -- over a short list pruned by ``BLOCK_K <= next_pow2(K)``
and a shared-memory estimate; ``VQKERNELS_TRITON_AUTOTUNE=0`` skips the timing and takes
the first config that fits. fp32 inputs use ``tl.dot(input_precision=...)`` from
``torch.get_float32_matmul_precision()`` ("highest" ieee, "high" tf32x3, "medium" tf32).

Offsets: block bases are int64 (``(c * N + row0) * D``, ``(c * K + k_start) * D``,
``code * D``; codebook tiles advance by pointer steps) and only in-tile offsets are int32,
so C*N*D and C*K*D may exceed 2^31.

Under ``TRITON_INTERPRET=1`` (CPU tests) one small fixed config is used, tiles are
multiplied by a broadcast product and sum instead of ``tl.dot`` (numpy's matmul rounds
equal columns differently by position, which would break exact ties) and bf16 inputs are
upcast to fp32 (the interpreter has no bf16 matmul); the GPU code path has neither.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import _triton_utils as tu
from . import _centre

_METRIC_ID = {"l2": 0, "cosine": 1, "dot": 2}  # norms use F.normalize's eps: max(||v||, 1e-12)

# Largest padded row kept on chip as a single chunk (bytes: D <= 256 for 16-bit inputs,
# D <= 128 for fp32); above it D is looped in chunks of _CHUNK_BYTES (128 B rows, the
# width of one swizzled shared-memory line).
_MAX_SINGLE_CHUNK_BYTES = 512
_CHUNK_BYTES = 128

# Fixed config for the interpreter: small, and with a low single-chunk limit so that the
# D-chunked path is exercised by small test shapes.
_INTERP = {"BLOCK_N": 32, "BLOCK_K": 32, "MAX_SINGLE_BYTES": 256, "CHUNK_BYTES": 128}

# Tests set this to force the split-codebook path (None: decide from N and the SM count).
_FORCE_SPLIT: Optional[int] = None


# --------------------------------------------------------------------------- kernels


@triton.jit
def _code_norms_kernel(c_ptr, bias_ptr, mult_ptr, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """l2 score terms: bias[k] = ||c_k||^2 (one fp32 pass over the codebook), mult[k] = -2."""
    pid = tl.program_id(0)
    ks = pid.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    dd = tl.arange(0, BLOCK_D)
    ss = tl.zeros([BLOCK_K], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        m = kmask[:, None] & ((d0 + dd) < D)[None, :]
        c = tl.load(c_ptr + ks[:, None] * D + (d0 + dd)[None, :], mask=m, other=0.0).to(tl.float32)
        ss += tl.sum(c * c, axis=1)
    tl.store(bias_ptr + ks, ss, mask=kmask)
    mult = tl.full([BLOCK_K], -2.0, tl.float32)
    tl.store(mult_ptr + ks, mult, mask=kmask)


@triton.jit
def _exact_distance(x_blk, c_ptr, c_stride, r, rmask, code, D, metric, BLOCK_D: tl.constexpr):
    """Exact fp32 distance of rows ``x_blk[r]`` to codes ``code`` [BLOCK_N], by direct difference.

    ``metric`` is a runtime value (0 l2, 1 cosine, 2 dot): the four row sums cost nothing
    next to the codebook sweep, and one compiled kernel then serves every metric.
    """
    dd = tl.arange(0, BLOCK_D)
    c_rows = c_ptr + code.to(tl.int64)[:, None] * c_stride
    s_diff = tl.zeros(r.shape, tl.float32)
    s_xc = tl.zeros(r.shape, tl.float32)
    s_xx = tl.zeros(r.shape, tl.float32)
    s_cc = tl.zeros(r.shape, tl.float32)
    for d0 in range(0, D, BLOCK_D):
        m = rmask[:, None] & ((d0 + dd) < D)[None, :]
        xv = tl.load(x_blk + r[:, None] * D + (d0 + dd)[None, :], mask=m, other=0.0).to(tl.float32)
        cv = tl.load(c_rows + (d0 + dd)[None, :], mask=m, other=0.0).to(tl.float32)
        diff = xv - cv
        s_diff += tl.sum(diff * diff, axis=1)
        s_xc += tl.sum(xv * cv, axis=1)
        s_xx += tl.sum(xv * xv, axis=1)
        s_cc += tl.sum(cv * cv, axis=1)
    nx = tl.maximum(tl.sqrt_rn(s_xx), 1e-12)
    nc = tl.maximum(tl.sqrt_rn(s_cc), 1e-12)
    # IEEE-rounded division and roots (a plain ``/`` compiles to the approximate div.full.f32):
    # the exact distance must match the fp32 reference to the last rounding.
    cos_dist = 1.0 - tl.div_rn(s_xc, nx * nc)
    return tl.where(metric == 0, s_diff, tl.where(metric == 1, cos_dist, -s_xc))


@triton.jit
def _tile_dot(a, b, acc, PRECISION: tl.constexpr, INTERP: tl.constexpr):
    """acc + a @ b^T for a [BLOCK_N, BLOCK_D] and b [BLOCK_K, BLOCK_D] (fp32 accumulation).

    In the interpreter tl.dot is numpy's matmul, whose BLAS rounds equal columns
    differently by position; the broadcast product summed along D is computed the same
    way for every (row, code), so equal codes keep bit-identical scores there as on the GPU.
    """
    if INTERP:
        prod = a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :]
        return acc + tl.sum(prod, axis=2)
    else:
        return tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)


# N, K and the range arguments change with every batch or codebook: specialising on their
# value (== 1, divisible by 16) would compile new variants for no gain.
@triton.jit(do_not_specialize=["N", "K", "k_split", "k_bucket", "metric"])
def _assign_kernel(
    x_ptr,  # [C, N, D] rows
    c_ptr, c2_ptr,  # [C, K, c_stride] score operand(s): the codebook, or its normalised hi / lo parts
    e_ptr,  # [C, K, D] the codebook itself, for the exact distance
    bias_ptr, mult_ptr,  # [C, K] fp32 per-code score terms
    idx_ptr, dist_ptr,  # outputs [C, N] int64 / fp32 (unsplit)
    part_score_ptr, part_idx_ptr,  # [C, S, N] fp32 / int64 partial minima (split)
    N, K, D, k_split, c_stride, k_bucket, metric,
    PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr, EVEN_D: tl.constexpr,
    TWO_PART: tl.constexpr, SPLIT: tl.constexpr, EPI_D: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    n_split = tl.cdiv(K, k_split)
    # Codebook-major, then range-major: programs that run together share one codebook
    # range (L2 reuse). The codebook axis rides on axis 0, which has no 65535 limit.
    per_codebook = n_split * n_blocks
    cb = pid // per_codebook
    pid_sn = pid % per_codebook
    pid_s = pid_sn // n_blocks
    pid_n = pid_sn % n_blocks
    k_start = pid_s * k_split
    k_end = tl.minimum(k_start + k_split, K)
    cb64 = cb.to(tl.int64)

    row0 = pid_n.to(tl.int64) * BLOCK_N
    r = tl.arange(0, BLOCK_N)
    rmask = (row0 + r) < N
    dd = tl.arange(0, BLOCK_D)
    kk = tl.arange(0, BLOCK_K)
    x_blk = x_ptr + (cb64 * N + row0) * D  # int64 base; in-tile offsets below are int32
    code0 = cb64 * K  # this codebook's first code in the [C * K] per-code arrays
    x_off = r[:, None] * D + dd[None, :]  # [BLOCK_N, BLOCK_D]

    if ONE_CHUNK:
        # The codebook was zero-padded to BLOCK_D columns by the launcher: a constexpr
        # stride and no mask along D, so codebook tiles load as wide vectors and pipeline.
        c_off = kk[:, None] * BLOCK_D + dd[None, :]  # [BLOCK_K, BLOCK_D], row-major like the codebook
        c_step = BLOCK_K * BLOCK_D
        # The row block stays on chip for the whole codebook sweep.
        if EVEN_D:
            xt = tl.load(x_blk + x_off, mask=rmask[:, None], other=0.0)
        else:
            xt = tl.load(x_blk + x_off, mask=rmask[:, None] & (dd < D)[None, :], other=0.0)
    else:
        c_off = kk[:, None] * c_stride + dd[None, :]
        c_step = BLOCK_K * c_stride

    # Per-column running minima: column j of the tile holds the best score seen in codes
    # k_start + j, k_start + j + BLOCK_K, ... and the index that gave it. Updating them is two
    # selects per score and no cross-lane traffic; the row's minimum is reduced once, after
    # the sweep, instead of a min + argmin (shuffles) per tile.
    run = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
    run_idx = tl.zeros([BLOCK_N, BLOCK_K], tl.int32) + (k_start + kk)[None, :]
    c_blk = c_ptr + (code0 + k_start) * c_stride  # then advanced by pointer steps: no int32 k0*D
    c2_blk = c2_ptr + (code0 + k_start) * c_stride
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + kk
        kmask = cols < k_end
        if ONE_CHUNK:
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            ct = tl.load(c_blk + c_off, mask=kmask[:, None], other=0.0)
            acc = _tile_dot(xt, ct, acc, PRECISION, INTERP)
            if TWO_PART:
                ct2 = tl.load(c2_blk + c_off, mask=kmask[:, None], other=0.0)
                acc = _tile_dot(xt, ct2, acc, PRECISION, INTERP)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                if EVEN_D:
                    cmask = kmask[:, None]
                    xc = tl.load(x_blk + d0 + x_off, mask=rmask[:, None], other=0.0)
                else:
                    dmask = (d0 + dd) < D
                    cmask = kmask[:, None] & dmask[None, :]
                    xc = tl.load(x_blk + d0 + x_off, mask=rmask[:, None] & dmask[None, :], other=0.0)
                ct = tl.load(c_blk + d0 + c_off, mask=cmask, other=0.0)
                acc = _tile_dot(xc, ct, acc, PRECISION, INTERP)
                if TWO_PART:
                    ct2 = tl.load(c2_blk + d0 + c_off, mask=cmask, other=0.0)
                    acc = _tile_dot(xc, ct2, acc, PRECISION, INTERP)
        # Codes outside the range score +inf (bias inf, mult 0), so they never win.
        bias = tl.load(bias_ptr + code0 + cols, mask=kmask, other=float("inf"))
        mult = tl.load(mult_ptr + code0 + cols, mask=kmask, other=0.0)
        score = bias[None, :] + mult[None, :] * acc
        # Strict "<": an equal score in a later tile keeps the column's earlier code. A NaN
        # score (a non-finite row of x, or a NaN code) compares False, so it never enters
        # the running minima (they start at +inf) and never hides another code; a row whose
        # scores are all NaN keeps index k_start, which the public op overwrites.
        better = score < run
        run = tl.where(better, score, run)
        run_idx = tl.where(better, k0 + kk[None, :], run_idx)
        c_blk += c_step
        c2_blk += c_step

    # One reduction per row: the minimum over the columns, then the lowest index among the
    # columns that hold it (columns may hold codes of different tiles, so the leftmost
    # column is not necessarily the lowest index). A row whose scores were all +inf (NaN
    # or Inf in x) keeps every column's initial index and gets k_start.
    best = tl.min(run, axis=1)
    best_idx = tl.min(tl.where(run == best[:, None], run_idx, 2147483647), axis=1)

    rows = row0 + r
    if SPLIT:
        part = (cb64 * n_split + pid_s) * N + rows
        tl.store(part_score_ptr + part, best, mask=rmask)
        tl.store(part_idx_ptr + part, best_idx.to(tl.int64), mask=rmask)
    else:
        # Narrow D chunks here: a [BLOCK_N, BLOCK_D] fp32 pair would not fit in registers.
        dist = _exact_distance(x_blk, e_ptr + code0 * D, D, r, rmask, best_idx, D, metric, EPI_D)
        tl.store(idx_ptr + cb64 * N + rows, best_idx.to(tl.int64), mask=rmask)
        tl.store(dist_ptr + cb64 * N + rows, dist, mask=rmask)


@triton.jit(do_not_specialize=["N", "K", "metric"])
def _exact_distance_kernel(x_ptr, c_ptr, idx_ptr, dist_ptr, N, K, D, metric, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """Exact distance of each row to its (already chosen) code: the split path's epilogue.

    x ``[C, N, D]``, codebook ``[C, K, D]``, idx / dist ``[C, N]``; the codebook axis is
    folded into ``program_id(0)`` as in the assign kernel."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    cb64 = (pid // n_blocks).to(tl.int64)
    row0 = (pid % n_blocks).to(tl.int64) * BLOCK_N
    r = tl.arange(0, BLOCK_N)
    rmask = (row0 + r) < N
    out = cb64 * N + row0 + r
    code = tl.load(idx_ptr + out, mask=rmask, other=0)
    dist = _exact_distance(x_ptr + (cb64 * N + row0) * D, c_ptr + cb64 * K * D, D, r, rmask, code, D, metric,
                           BLOCK_D)
    tl.store(dist_ptr + out, dist, mask=rmask)


# --------------------------------------------------------------------------- autotuning

# (BLOCK_N, BLOCK_K, num_warps, num_stages, layouts it is offered for). The per-column
# running (min, index) epilogue keeps three [BLOCK_N, BLOCK_K] fp32/int32 arrays live
# (scores, minima, indices) next to the resident row block, so register pressure, not
# shared memory, bounds the tiles: every (config, layout) pair below compiled for sm_90
# without spills (``python -m vqkernels.ops._triton_utils`` prints the table; the test
# ``test_every_dispatchable_variant_fits_sm90`` fails if a pair stops fitting). Layouts
# (see _layout): "narrow" resident rows of <= 32 columns; "wide" resident 16-bit rows
# (one operand part), "wide2" two parts (16-bit cosine); "chunked" D loops; fp32 layouts
# carry their matmul precision (tf32 / tf32x3 / ieee) because each lowers differently.
_CONFIG_TABLE = [
    # 254 regs, 96 KiB at D=256 bf16: the largest tile that keeps the running minima on chip
    (128, 64, 8, 3, ("narrow", "wide", "wide_tf32x3")),
    # half the running state: fits where 128 x 64 spills (two parts, tf32, D chunks)
    (128, 32, 8, 3, ("wide", "wide2", "wide_tf32", "wide_tf32x3", "chunked", "chunked2", "chunked_tf32",
                     "chunked_tf32x3")),
    (128, 64, 8, 2, ("wide", "wide_tf32x3")),
    (64, 128, 8, 2, ("wide",)),
    # 4 warps at ~155-240 regs and <= 48 KiB (16-bit): two or three CTAs per SM, so one
    # CTA's reduction overlaps another's matmul, and small grids fill whole waves
    (64, 32, 4, 3, ("narrow", "wide", "wide2", "wide_tf32", "wide_tf32x3", "chunked", "chunked_tf32",
                    "chunked_tf32x3")),
    # narrow rows are bound by the per-score epilogue: wide tiles, 8 warps
    (256, 32, 8, 3, ("narrow",)),
    (64, 128, 8, 3, ("narrow",)),
    # fp32 "highest" (ieee) D chunks run the dot on the FMA units from registers: only
    # 32 x 32 stays out of local memory (64 x 32 spills 48 B in the split variant)
    (32, 32, 4, 2, ("chunked_ieee", "chunked2", "fallback")),  # fits every shape; used when nothing else does
]
# The table's order is also the heuristic: with autotuning off, the first config offered
# for the layout that fits is used.
_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st) for bn, bk, w, st, _ in _CONFIG_TABLE
]
_CONFIG_CLASS = {id(c): row[4] for c, row in zip(_CONFIGS, _CONFIG_TABLE)}
# VQKERNELS_TRITON_AUTOTUNE=0: no timing at all, the first config of the table that fits
# (for short jobs and test suites, where timing every new shape costs more than it saves).
_AUTOTUNE_ENV = "VQKERNELS_TRITON_AUTOTUNE"


def _layout(block_d: int, one_chunk: bool, dtype_size: int, precision: str, parts: int) -> str:
    """The layout tag a config must be offered for (see _CONFIG_TABLE)."""
    if one_chunk and block_d <= 32:
        return "narrow"
    base = "wide" if one_chunk else "chunked"
    if dtype_size == 4:
        return f"{base}_{precision}"
    return base + ("2" if parts == 2 else "")


def _operand_bytes(dtype_size: int, precision: str) -> int:
    """Bytes per operand element as the kernel stages it: tf32x3 keeps a high and a low
    tf32 part of each fp32 operand (twice the shared memory); an "ieee" fp32 dot runs on
    the FMA units from registers, where wide D chunks spill (counted as 4x to keep it narrow)."""
    if dtype_size == 4 and precision == "tf32x3":
        return 8
    if dtype_size == 4 and precision == "ieee":
        return 16
    return dtype_size


def _smem_estimate(cfg, block_d: int, one_chunk: bool, elem: int, parts: int = 1) -> int:
    bn, bk = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    stages = max(1, cfg.num_stages)
    if one_chunk:  # resident row block + pipelined codebook tiles (one per operand part)
        return (bn * block_d + stages * parts * bk * block_d) * elem
    return stages * (bn + parts * bk) * block_d * elem


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    K = min(int(args["K"]), int(args.get("k_split", args["K"])))
    block_d = int(args["BLOCK_D"])
    one_chunk = bool(args["ONE_CHUNK"])
    elem = _operand_bytes(args["x_ptr"].element_size(), str(args.get("PRECISION", "ieee")))
    parts = 2 if args.get("TWO_PART", False) else 1
    k_cap = max(32, tu.next_power_of_2(K))
    layout = _layout(block_d, one_chunk, args["x_ptr"].element_size(), str(args.get("PRECISION", "ieee")), parts)
    kept = [
        c
        for c in configs
        if layout in _CONFIG_CLASS.get(id(c), (layout,))
        and c.kwargs["BLOCK_K"] <= k_cap
        and tu.smem_bytes_ok(_smem_estimate(c, block_d, one_chunk, elem, parts))
    ]
    if not kept:
        kept = [c for c in configs if "fallback" in _CONFIG_CLASS.get(id(c), ())] or [configs[-1]]
    return kept


# Tuned per K bucket, not per K: ``k_bucket`` is next_pow2(K) capped at _K_BUCKET_CAP (by
# then every config streams >= 16 tiles and ranks the same), and it is a plain int argument
# the kernel ignores, so a new bucket re-times already compiled kernels instead of
# compiling new ones. Dtypes are added to the key by Triton. Never N.
_K_BUCKET_CAP = 4096
_assign_kernel_tuned = triton.autotune(
    configs=_CONFIGS,
    key=["k_bucket", "D", "metric", "PRECISION", "SPLIT"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_assign_kernel)


# --------------------------------------------------------------------------- launcher


def _block_d(D: int, elem: int, interp: bool) -> tuple[int, bool]:
    """(BLOCK_D, ONE_CHUNK): D padded to a power of two >= 16, or the chunk width."""
    max_single = _INTERP["MAX_SINGLE_BYTES"] if interp else _MAX_SINGLE_CHUNK_BYTES
    chunk = _INTERP["CHUNK_BYTES"] if interp else _CHUNK_BYTES
    padded = max(16, tu.next_power_of_2(D))
    if padded * elem <= max_single:
        return padded, True
    return max(16, chunk // elem), False


def _split_count(C: int, N: int, K: int, device: torch.device, interp: bool, block_n: int = 128,
                 block_k: int = 64) -> int:
    """Codebook ranges S: the split that makes (row blocks x S) programs finish soonest.

    With one resident program per SM (the 8-warp configs hold ~250 registers), the sweep
    takes ``waves x per-program time``, waves = ceil(C * row_blocks * S / SMs) and a
    program's time ~ its codebook tiles (k_split / BLOCK_K) plus a fixed cost of about four
    tiles (loading its row block, the epilogue). Minimising that product picks S so the
    programs fill whole waves of the 132 SMs of an H200 without cutting the ranges so short
    that the fixed cost dominates; it stays 1 when there are many row blocks (the last
    wave's idle SMs are then a small fraction) or K < 1024 (ranges are >= 256 codes).
    """
    if _FORCE_SPLIT is not None:
        return max(1, min(_FORCE_SPLIT, tu.cdiv(K, 32)))
    if interp or K < 1024:
        return 1
    sms = tu.sm_count(device)
    row_blocks = C * tu.cdiv(N, block_n)
    best, best_cost = 1, None
    for s in range(1, K // 256 + 1):
        k_split = _range_codes(K, s)
        s_eff = tu.cdiv(K, k_split)
        cost = tu.cdiv(row_blocks * s_eff, sms) * (tu.cdiv(k_split, block_k) + 4)
        if best_cost is None or cost < best_cost:
            best, best_cost = s_eff, cost
    return best


def _range_codes(K: int, S: int) -> int:
    """Codes per range for S ranges: whole multiples of 256, so every BLOCK_K tiles them exactly."""
    return tu.cdiv(tu.cdiv(K, S), 256) * 256 if S > 1 else K


def assign(x: torch.Tensor, codebook: torch.Tensor, metric: str):
    """Nearest code per row, for C independent codebooks in one launch.

    x ``[C, N, D]``, codebook ``[C, K, D]`` (same dtype; C, N, K >= 1): the rows ``x[c]``
    are assigned to the codes ``codebook[c]``.

    Returns ``(indices int64 [C, N], distances float32 [C, N])``: ties go to the lowest
    index, distances are the winner's exact fp32 distance.

    Example (under ``TRITON_INTERPRET=1`` on CPU, or with CUDA tensors):
        >>> x, codebook = torch.randn(2, 100, 16), torch.randn(2, 64, 16)
        >>> indices, distances = assign(x, codebook, "l2")  # [2, 100] each
    """
    C, N, D = x.shape
    K = codebook.shape[1]
    device = x.device
    interp = tu.interpreting()
    x = x.contiguous()
    codebook = codebook.contiguous()
    # l2: score copies shifted by each codebook's centre (0 where no offset dominates: then
    # exactly the inputs), rounded to the input dtype as the GPU sees them, with no host sync;
    # the exact distances below read the originals, x_exact / c_exact.
    centre = _centre.l2_centre(codebook) if metric == "l2" else None
    x_exact, c_exact = x, codebook
    if centre is not None:
        x, codebook = _centre.shifted(x, centre), _centre.shifted(codebook, centre)
    if interp and x.dtype == torch.bfloat16:
        # The interpreter's tl.dot mishandles bf16 (numpy has no bf16). bf16 -> fp32 is
        # exact and the GPU path accumulates bf16 products in fp32 too, so this computes
        # the same function.
        x, codebook, x_exact, c_exact = x.float(), codebook.float(), x_exact.float(), c_exact.float()
    metric_id = _METRIC_ID[metric]
    precision = tu.dot_precision(x.dtype)
    block_d, one_chunk = _block_d(D, _operand_bytes(x.element_size(), precision), interp)
    even_d = D % block_d == 0
    epi_d = 16  # narrow epilogue chunks: its [BLOCK_N, EPI_D] fp32 tiles must not push the kernel into spills

    with tu.device_guard(x):
        # Score operand(s) and per-code terms [C, K], once per call, in fp32.
        two_part = False
        if metric == "l2":
            operands = [codebook]
            bias = torch.empty(C, K, dtype=torch.float32, device=device)
            mult = torch.empty(C, K, dtype=torch.float32, device=device)
            # The C codebooks are one contiguous [C * K, D] block of codes: one flat pass.
            _code_norms_kernel[(tu.cdiv(C * K, 32),)](
                codebook, bias, mult, C * K, D, BLOCK_K=32, BLOCK_D=min(64, max(16, tu.next_power_of_2(D)))
            )
        else:
            bias = torch.zeros(C, K, dtype=torch.float32, device=device)
            mult = torch.full((C, K), -1.0, dtype=torch.float32, device=device)
            if metric == "dot":
                operands = [codebook]
            else:
                # F.normalize's definition (eps 1e-12), per code of every codebook; 16-bit
                # inputs get the normalised codes as hi + lo parts of their own dtype (about
                # 16 / 22 significant bits: a rounded copy would put 1e-3 errors into
                # 1 - cos) and two dots per tile.
                unit = F.normalize(codebook.float(), dim=-1)
                if x.dtype == torch.float32:
                    operands = [unit]
                else:
                    hi = unit.to(x.dtype)
                    operands = [hi, (unit - hi.float()).to(x.dtype)]
                    two_part = True
        if one_chunk and not even_d:
            # Zero-pad the operands to BLOCK_D columns (C x K x BLOCK_D, small next to the
            # C x N x K work): their tiles then load without a D mask, as wide vectors, and pipeline.
            padded_ops = []
            for op in operands:
                padded = torch.zeros(C, K, block_d, dtype=op.dtype, device=device)
                padded[:, :, :D] = op
                padded_ops.append(padded)
            operands = padded_ops
        c_op, c2_op = operands[0], operands[-1]  # c2 is read only when TWO_PART
        c_stride = c_op.shape[-1]

        # The split is sized for the config the heuristic would pick (the autotuner's choice
        # has the same BLOCK_N in the common layouts).
        meta = dict(
            PRECISION=precision, BLOCK_D=block_d, ONE_CHUNK=one_chunk, EVEN_D=even_d, TWO_PART=two_part,
            SPLIT=False, EPI_D=epi_d, INTERP=interp,
        )
        first = _prune_configs(_CONFIGS, {"K": K, "k_split": K, "x_ptr": x}, **meta)[0]
        S = _split_count(C, N, K, device, interp, first.kwargs["BLOCK_N"], first.kwargs["BLOCK_K"])
        k_split = _range_codes(K, S)
        S = tu.cdiv(K, k_split)  # the kernel derives the same S from K and k_split
        # A shifted (l2) launch takes the split epilogue even with one range: the fused one
        # would compute the exact distance from the shifted x.
        split = S > 1 or centre is not None

        indices = torch.empty(C, N, dtype=torch.int64, device=device)
        distances = torch.empty(C, N, dtype=torch.float32, device=device)
        if split:
            part_score = torch.empty(C, S, N, dtype=torch.float32, device=device)
            part_idx = torch.empty(C, S, N, dtype=torch.int64, device=device)
        else:
            part_score, part_idx = distances, indices  # unused (SPLIT is a constexpr)

        k_bucket = min(tu.next_power_of_2(min(K, k_split)), _K_BUCKET_CAP)
        args = (x, c_op, c2_op, c_exact, bias, mult, indices, distances, part_score, part_idx, N, K, D, k_split,
                c_stride, k_bucket, metric_id)
        meta["SPLIT"] = split
        if interp:
            bn = _INTERP["BLOCK_N"]
            grid = (C * S * tu.cdiv(N, bn),)
            _assign_kernel[grid](*args, **meta, BLOCK_N=bn, BLOCK_K=_INTERP["BLOCK_K"])
        elif os.environ.get(_AUTOTUNE_ENV, "1") == "0":
            # No timing: the first config of the table that fits this shape.
            named = dict(zip(_assign_kernel.arg_names, args))
            cfg = _prune_configs(_CONFIGS, named, **meta)[0]
            bn = cfg.kwargs["BLOCK_N"]
            _assign_kernel[(C * S * tu.cdiv(N, bn),)](
                *args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
            )
        else:
            grid = lambda m: (C * S * triton.cdiv(N, m["BLOCK_N"]),)  # noqa: E731
            _assign_kernel_tuned[grid](*args, **meta)

        if split:
            # First minimum over each codebook's ranges: the lowest range (so the lowest
            # index) wins ties.
            which = part_score.argmin(1, keepdim=True)
            indices = part_idx.gather(1, which).squeeze(1)
            eb_n = 32 if interp else 64
            _exact_distance_kernel[(C * tu.cdiv(N, eb_n),)](
                x_exact, c_exact, indices, distances, N, K, D, metric_id, BLOCK_N=eb_n, BLOCK_D=epi_d
            )
    return indices, distances


# --------------------------------------------------------------------------- compile check

_TL_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _assign_signature(dtype: torch.dtype) -> dict:
    t = "*" + _TL_TYPE[dtype]
    return dict(x_ptr=t, c_ptr=t, c2_ptr=t, e_ptr=t, bias_ptr="*fp32", mult_ptr="*fp32", idx_ptr="*i64",
                dist_ptr="*fp32", part_score_ptr="*fp32", part_idx_ptr="*i64", N="i32", K="i32", D="i32",
                k_split="i32", c_stride="i32", k_bucket="i32", metric="i32")


def compile_cases() -> list:
    """Every assign variant the launcher can choose on a GPU, each config at its worst case.

    For every input family (bf16 / fp16, fp32 under each matmul precision), one- and
    two-part score operands and every D layout the launcher produces (a resident chunk of
    each padded width, or D chunks), the configs that survive pruning for a large K (a
    superset of those for any smaller K) are compiled at the WIDEST layout they survive
    (the most shared memory and registers they can be asked for), with and without the
    split epilogue. fp16 compiles the same code as bf16 and is checked at its widest layout
    only. The helper kernels are compiled for every dtype and block width they take."""
    big = 1 << 20
    families = [(torch.bfloat16, "ieee"), (torch.float32, "tf32"), (torch.float32, "tf32x3"), (torch.float32, "ieee")]
    worst = {}  # (dtype, precision, two_part, one_chunk, config index) -> widest BLOCK_D
    for dtype, precision in families:
        elem = _operand_bytes(dtype.itemsize, precision)
        layouts = sorted({_block_d(1 << i, elem, False) for i in range(12)})  # D = 1 .. 2048
        for two_part in (False, True) if dtype != torch.float32 else (False,):
            for block_d, one_chunk in layouts:
                named = {"K": big, "k_split": big, "x_ptr": torch.empty(0, dtype=dtype)}
                for cfg in _prune_configs(_CONFIGS, named, BLOCK_D=block_d, ONE_CHUNK=one_chunk, PRECISION=precision,
                                          TWO_PART=two_part):
                    key = (dtype, precision, two_part, one_chunk, _CONFIGS.index(cfg))
                    worst[key] = max(worst.get(key, 0), block_d)
    cases = []
    for (dtype, precision, two_part, one_chunk, ci), block_d in sorted(worst.items(), key=str):
        cfg = _CONFIGS[ci]
        for split in (False, True):
            consts = dict(PRECISION=precision, BLOCK_D=block_d, ONE_CHUNK=one_chunk, EVEN_D=False, TWO_PART=two_part,
                          SPLIT=split, EPI_D=16, INTERP=False, **cfg.kwargs)
            cases.append(tu.compile_case("_assign_kernel", _assign_kernel, _assign_signature(dtype), consts,
                                         cfg.num_warps, cfg.num_stages))
    # fp16 at the widest resident layout, with every config that fits there
    widest = _MAX_SINGLE_CHUNK_BYTES // 2
    named = {"K": big, "k_split": big, "x_ptr": torch.empty(0, dtype=torch.float16)}
    for cfg in _prune_configs(_CONFIGS, named, BLOCK_D=widest, ONE_CHUNK=True, PRECISION="ieee", TWO_PART=True):
        consts = dict(PRECISION="ieee", BLOCK_D=widest, ONE_CHUNK=True, EVEN_D=True, TWO_PART=True, SPLIT=False,
                      EPI_D=16, INTERP=False, **cfg.kwargs)
        cases.append(tu.compile_case("_assign_kernel", _assign_kernel, _assign_signature(torch.float16), consts,
                                     cfg.num_warps, cfg.num_stages))
    for dtype, t in _TL_TYPE.items():
        for block_d in (16, 32, 64):  # min(64, max(16, next_pow2(D)))
            cases.append(tu.compile_case("_code_norms_kernel", _code_norms_kernel,
                                         dict(c_ptr="*" + t, bias_ptr="*fp32", mult_ptr="*fp32", K="i32", D="i32"),
                                         dict(BLOCK_K=32, BLOCK_D=block_d)))
        cases.append(tu.compile_case("_exact_distance_kernel", _exact_distance_kernel,
                                     dict(x_ptr="*" + t, c_ptr="*" + t, idx_ptr="*i64", dist_ptr="*fp32", N="i32",
                                          K="i32", D="i32", metric="i32"), dict(BLOCK_N=64, BLOCK_D=16)))
    return cases
