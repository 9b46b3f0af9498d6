"""CUDA C++ ``assign`` (the extension's kernels, csrc/kernels/assign.cuh).

Backend contract: ``x [C, N, D]``, ``codebook [C, K, D]`` (contiguous, same dtype) ->
``(indices int64 [C, N], distances float32 [C, N])``. The C codebooks run in one launch
per kernel (grid.z of the main kernels; the per-code and per-row kernels run over all
C * K codes / C * N rows).

fp16/bf16 with D > 8 run on tensor cores (mma.sync m16n8k16, fp32 accumulation); fp32,
and fp16/bf16 with D <= 8, run a register-tiled SIMT kernel in IEEE fp32 (so fp32 inputs
are exact whatever torch.get_float32_matmul_precision() says). Both keep a running
(min, argmin) per row in registers, never an N x K matrix, merge partial minima with ties
to the lowest index, and recompute the winner's distance exactly in fp32.
``VQKERNELS_CUDA_ASSIGN_KERNEL=mma|simt`` forces one kernel (tests, benchmarks).

For l2 the op scores copies of x and the codes shifted by each codebook's centre (the
rule: :mod:`._centre`, shared with the Triton launcher; exactly 0 where no offset dominates),
so ``||c||^2 - 2 x.c`` does not cancel; the exact distance still reads the originals.
"""
from ... import _extension
from . import _centre


def assign(x, codebook, metric):
    centre = _centre.l2_centre(codebook) if metric == "l2" else None
    return _extension.ops().assign_cuda(x, codebook, metric, centre)
