"""CUDA C++ ``histogram``: shared-memory privatised counts (csrc/kernels/histogram.cuh).

Each block counts into a private shared-memory copy of the histogram and adds its non-zero
bins to the result once; K > 12288 falls back to global atomics. Negative indices are
masked and ignored. With weights the sums are fp32 atomics (order-dependent last bits).
"""
from ... import _extension


def histogram(indices, K, weights):
    return _extension.ops().histogram_cuda(indices, K, weights)
