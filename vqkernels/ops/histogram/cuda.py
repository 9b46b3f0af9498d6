"""CUDA C++ ``histogram``: shared-memory privatised counts (csrc/kernels/histogram.cuh).

Backend contract: ``indices [C, N]`` (negative: masked), ``weights [C, N]`` or None ->
``counts [C, K]`` (int64; float32 with weights), all C codebooks in one launch (grid.y).
Each block counts one codebook's rows into a private shared-memory copy of its histogram
and adds the non-zero bins to the result once; K > 12288 falls back to global atomics.
With weights the sums are fp32 atomics (order-dependent last bits).
"""
from ... import _extension


def histogram(indices, K, weights):
    return _extension.ops().histogram_cuda(indices, K, weights)
