"""Triton ``residual_assign``: all Q stages for a row tile in ONE launch, the residual on chip.

Each program owns ``BLOCK_N`` rows. It loads them once (fp32, D padded to ``BLOCK_D``, a
power of two >= 16) and keeps two register tiles for the whole call: the running residual
``r`` and the sum of the picked codes. For every stage it streams that stage's codebook in
``BLOCK_K``-code tiles and scores them with the conventions of :mod:`..assign.triton`
(smaller is nearer; ``||r||^2`` left out of l2):

* ``l2``:     ``||c||^2 - 2 <r, c>``
* ``cosine``: ``-<r, c> / ||c||`` with the raw residual (``1 - cos`` ranks codes the same
  way for any ``||r|| > 0``, so the stage input need not be normalised to be ranked)
* ``dot``:    ``-<r, c>``

with ``tl.dot(input_precision="ieee")`` (the residual is fp32 whatever the input dtype, and
integer-valued data keeps exact scores, so exact ties stay ties). Each tile's minimum and,
among the codes holding it, the LOWEST index are merged into a running (min, index) with a
strict ``<``, so ties go to the lowest index at every stage. The winner's distance is then
recomputed exactly in fp32 by direct difference with IEEE-rounded roots and division
(the assign kernel's epilogue), ``r -= c_winner`` and ``sum += c_winner``; nothing but the
int64 indices, fp32 distances and the final ``quantized`` row tile is written, never an
``N x K`` matrix. A NaN row scores NaN, which never compares below the running minimum:
its index stays 0 and the op masks it to -1.

Rows up to ``MAX_RESIDENT_D`` features stay on chip; wider rows would spill registers, so
there the stages run one after another with the Triton ``assign`` kernel (Q launches, the
same picks rule) -- still this backend, and documented here rather than a silent switch.
fp32 inputs are scored in IEEE fp32 whatever ``torch.get_float32_matmul_precision()`` says
(the residual is fp32 for every input dtype).

Under ``TRITON_INTERPRET=1`` (CPU tests) tiles are 16 x 16 and ``tl.dot`` is replaced by a
broadcast product summed along D (:func:`..assign.triton._tile_dot`), so equal codes keep
bit-identical scores there as on the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _triton_utils as tu
from ..assign import triton as _assign_triton
from ..assign.triton import _tile_dot
from .reference import staged

MAX_RESIDENT_D = 256
_METRIC_CODE = {"l2": 0, "cosine": 1, "dot": 2}
_TL_TYPE = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


@triton.jit(do_not_specialize=["N", "K", "Q"])
def _residual_assign_kernel(
    x_ptr,  # [N, D] rows (input dtype)
    c_ptr,  # [Q, K, D] codebooks (input dtype)
    idx_ptr, dist_ptr,  # [N, Q] int64 / fp32
    out_ptr,  # [N, D] quantized (input dtype)
    N, K, D, Q,
    METRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERP: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    m2 = rmask[:, None] & dmask[None, :]
    r = tl.load(x_ptr + rows64[:, None] * D + dd[None, :], mask=m2, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    kk0 = tl.arange(0, BLOCK_K)
    stage_ptr = c_ptr
    for q in range(0, Q):
        best = tl.full([BLOCK_N], float("inf"), tl.float32)
        best_i = tl.zeros([BLOCK_N], tl.int32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + kk0
            kmask = kk < K
            c = tl.load(stage_ptr + kk.to(tl.int64)[:, None] * D + dd[None, :],
                        mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            dots = _tile_dot(r, c, tl.zeros([BLOCK_N, BLOCK_K], tl.float32), "ieee", INTERP)
            if METRIC == 0:
                score = tl.sum(c * c, axis=1)[None, :] - 2.0 * dots
            elif METRIC == 1:
                norm = tl.maximum(tl.sqrt_rn(tl.sum(c * c, axis=1)), 1e-12)
                score = -tl.div_rn(dots, tl.broadcast_to(norm[None, :], [BLOCK_N, BLOCK_K]))
            else:
                score = -dots
            score = tl.where(kmask[None, :], score, float("inf"))
            tile_min = tl.min(score, axis=1)
            tile_arg = tl.min(tl.where(score == tile_min[:, None], kk[None, :], K), axis=1)
            better = tile_min < best  # strict: an equal score in a later tile keeps the lower index
            best_i = tl.where(better, tile_arg, best_i)
            best = tl.where(better, tile_min, best)
        w = tl.load(stage_ptr + best_i.to(tl.int64)[:, None] * D + dd[None, :], mask=m2, other=0.0).to(tl.float32)
        # the winner's exact fp32 distance to the stage input (direct difference, as assign's epilogue)
        diff = r - w
        s_diff = tl.sum(diff * diff, axis=1)
        s_xc = tl.sum(r * w, axis=1)
        if METRIC == 0:
            dist = s_diff
        elif METRIC == 1:
            nx = tl.maximum(tl.sqrt_rn(tl.sum(r * r, axis=1)), 1e-12)
            nc = tl.maximum(tl.sqrt_rn(tl.sum(w * w, axis=1)), 1e-12)
            dist = 1.0 - tl.div_rn(s_xc, nx * nc)
        else:
            dist = -s_xc
        tl.store(idx_ptr + rows64 * Q + q, best_i.to(tl.int64), mask=rmask)
        tl.store(dist_ptr + rows64 * Q + q, dist, mask=rmask)
        r = r - w
        acc = acc + w
        stage_ptr += K.to(tl.int64) * D
    tl.store(out_ptr + rows64[:, None] * D + dd[None, :], acc.to(out_ptr.dtype.element_ty), mask=m2)


def _config(block_d: int, interp: bool) -> tuple:
    """(BLOCK_N, BLOCK_K, num_warps) for a padded width: the two resident [BLOCK_N, BLOCK_D]
    fp32 tiles plus one code tile stay well inside 255 registers per thread."""
    if interp:
        return 16, 16, 4
    # Picked by compiling for sm_90 (compile_cases) with Triton 3.6 (the GPU image's) and 3.9:
    # larger row or code tiles spill registers in the fp32 FMA dot once the two resident tiles
    # are live. At BLOCK_D = 64, (16, 16, 4) spilled 32 B for cosine under 3.6 (not 3.9); 32 rows
    # per program fit both (at most 255 / 214 registers) and read each code tile half as often.
    if block_d <= 64:
        return 32, 16, 4
    if block_d <= 128:
        return 16, 16, 4
    return 16, 32, 8


def _block_d(D: int) -> int:
    return max(16, tu.next_power_of_2(D))


def residual_assign(x: torch.Tensor, codebooks: torch.Tensor, metric: str):
    """``x [N, D]``, ``codebooks [Q, K, D]`` -> ``indices [N, Q]``, ``quantized [N, D]`` (x's dtype), ``distances [N, Q]``."""
    N, D = x.shape
    Q, K, _ = codebooks.shape
    if D > MAX_RESIDENT_D:
        return staged(x, codebooks, metric, _assign_triton.assign)
    interp = tu.interpreting()
    if interp and x.dtype == torch.bfloat16:  # the interpreter has no bf16 arithmetic
        x, codebooks = x.float(), codebooks.float()
    indices = torch.empty(N, Q, dtype=torch.int64, device=x.device)
    distances = torch.empty(N, Q, dtype=torch.float32, device=x.device)
    quantized = torch.empty(N, D, dtype=x.dtype, device=x.device)
    block_d = _block_d(D)
    block_n, block_k, warps = _config(block_d, interp)
    with tu.device_guard(x):
        _residual_assign_kernel[(tu.cdiv(N, block_n),)](
            x, codebooks, indices, distances, quantized, N, K, D, Q,
            METRIC=_METRIC_CODE[metric], BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, INTERP=interp,
            num_warps=warps,
        )
    return indices, quantized, distances


def compile_cases() -> list:
    """Every variant the launcher can choose on a GPU: each metric, each input dtype, each
    config at the widest ``BLOCK_D`` it serves (the most registers it can be asked for)."""
    cases = []
    for dtype, ptr in _TL_TYPE.items():
        sig = {"x_ptr": ptr, "c_ptr": ptr, "idx_ptr": "*i64", "dist_ptr": "*fp32", "out_ptr": ptr,
               "N": "i32", "K": "i32", "D": "i32", "Q": "i32"}
        widths = (64, 128, MAX_RESIDENT_D) if dtype != torch.float16 else (MAX_RESIDENT_D,)
        for block_d in widths:
            block_n, block_k, warps = _config(block_d, False)
            for metric in _METRIC_CODE.values():
                consts = dict(METRIC=metric, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, INTERP=False)
                cases.append(tu.compile_case("_residual_assign_kernel", _residual_assign_kernel, sig, consts, warps, 2))
    return cases
