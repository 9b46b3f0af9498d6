"""Triton ``ema_update``: a small kernel per codebook lerps ``cluster_size`` and sums it into
``n``; then one fused pass over K x D lerps ``embed_avg``, smooths the sizes and writes the
codebook (formula in :mod:`vqkernels.ops.ema_update`).

Both kernels serve all C codebooks in one launch: the sizes kernel has one program per
codebook, the codebook kernel folds the codebook axis into ``program_id(0)`` (codebook-major
over K blocks, so no grid axis meets the 65535 limit of axes 1 and 2). Row offsets are
int64 (``(c * K + k) * D``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _triton_utils as tu


@triton.jit
def _ema_sizes_kernel(cs_ptr, counts_ptr, n_ptr, params_ptr, K, BLOCK_K: tl.constexpr):
    """cluster_size[h] = decay * cluster_size[h] + (1 - decay) * counts[h]; n[h] = its sum."""
    h = tl.program_id(0).to(tl.int64)
    decay = tl.load(params_ptr)
    weight = tl.load(params_ptr + 1)
    kk = tl.arange(0, BLOCK_K)
    total = tl.zeros([BLOCK_K], params_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + kk
        m = ks < K
        cs = tl.load(cs_ptr + h * K + ks, mask=m, other=0.0).to(params_ptr.dtype.element_ty)
        cnt = tl.load(counts_ptr + h * K + ks, mask=m, other=0.0).to(params_ptr.dtype.element_ty)
        cs = decay * cs + weight * cnt
        tl.store(cs_ptr + h * K + ks, cs.to(cs_ptr.dtype.element_ty), mask=m)
        total += tl.where(m, cs, 0.0)
    tl.store(n_ptr + h, tl.sum(total, axis=0))


@triton.jit
def _ema_codebook_kernel(
    cs_ptr, ea_ptr, cb_ptr, sums_ptr, n_ptr, params_ptr, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr
):
    """embed_avg = lerp; codebook = embed_avg / ((cs + eps) / (n + K eps) * n), one pass over C x K x D."""
    pid = tl.program_id(0)
    k_blocks = tl.cdiv(K, BLOCK_K)
    h = (pid // k_blocks).to(tl.int64)
    pid_k = pid % k_blocks
    decay = tl.load(params_ptr)
    weight = tl.load(params_ptr + 1)
    eps = tl.load(params_ptr + 2)
    n = tl.load(n_ptr + h)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    cs = tl.load(cs_ptr + h * K + ks, mask=kmask, other=1.0).to(params_ptr.dtype.element_ty)
    # IEEE-rounded divisions: a plain fp32 ``/`` compiles to the approximate div.full.f32
    # (2 ulp), and the codebook must match the reference's rounding.
    smoothed = tu.div_rn(cs + eps, n + K * eps) * n
    base = (h * K + ks.to(tl.int64)) * D  # [BLOCK_K] int64 row offsets
    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        m = kmask[:, None] & ((d0 + dd) < D)[None, :]
        off = base[:, None] + (d0 + dd)[None, :]
        ea = tl.load(ea_ptr + off, mask=m, other=0.0).to(params_ptr.dtype.element_ty)
        s = tl.load(sums_ptr + off, mask=m, other=0.0).to(params_ptr.dtype.element_ty)
        ea = decay * ea + weight * s
        tl.store(ea_ptr + off, ea.to(ea_ptr.dtype.element_ty), mask=m)
        cb = tu.div_rn(ea, smoothed[:, None])
        tl.store(cb_ptr + off, cb.to(cb_ptr.dtype.element_ty), mask=m)


def ema_update(cluster_size, embed_avg, codebook, counts, sums, decay, eps):
    """In-place EMA update of C codebooks in one launch.

    cluster_size ``[C, K]``, embed_avg / codebook ``[C, K, D]`` (contiguous, updated in
    place), counts ``[C, K]``, sums ``[C, K, D]``. Computes in fp32 (fp64 when any statistic
    is fp64), following the formula of :mod:`vqkernels.ops.ema_update`.
    """
    H, K, D = embed_avg.shape
    interp = tu.interpreting()
    f64 = any(t.dtype == torch.float64 for t in (cluster_size, embed_avg, counts, sums))
    dtype = torch.float64 if f64 else torch.float32
    device = codebook.device
    counts = counts.contiguous()
    sums = sums.contiguous()
    with tu.device_guard(codebook):
        # decay, 1 - decay and eps as a tensor of the compute dtype: Python floats would
        # reach the kernel as fp32 scalars, too coarse for fp64 statistics.
        params = torch.tensor([decay, 1.0 - decay, eps], dtype=dtype, device=device)
        n = torch.empty(H, dtype=dtype, device=device)
        _ema_sizes_kernel[(H,)](cluster_size, counts, n, params, K, BLOCK_K=128 if interp else 1024, num_warps=4)
        block_k = 16 if interp else 32
        block_d = min(32 if interp else 64, max(16, tu.next_power_of_2(D)))
        _ema_codebook_kernel[(H * tu.cdiv(K, block_k),)](
            cluster_size, embed_avg, codebook, sums, n, params, K, D, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4
        )


def compile_cases() -> list:
    """Every ema_update variant the launcher can choose, for the sm_90 compile check: fp32 and
    fp64 statistics, fp32 / fp16 / bf16 codebooks, the narrowest and widest D blocks."""
    cases = []
    for stype in ("fp32", "fp64"):
        cases.append(tu.compile_case("_ema_sizes_kernel", _ema_sizes_kernel,
                                     dict(cs_ptr="*" + stype, counts_ptr="*fp32", n_ptr="*" + stype,
                                          params_ptr="*" + stype, K="i32"), dict(BLOCK_K=1024)))
        for ctype in ("fp32", "fp16", "bf16"):
            for block_d in (16, 64):
                cases.append(tu.compile_case("_ema_codebook_kernel", _ema_codebook_kernel,
                                             dict(cs_ptr="*" + stype, ea_ptr="*" + stype, cb_ptr="*" + ctype,
                                                  sums_ptr="*" + stype, n_ptr="*" + stype, params_ptr="*" + stype,
                                                  K="i32", D="i32"), dict(BLOCK_K=32, BLOCK_D=block_d)))
    return cases
