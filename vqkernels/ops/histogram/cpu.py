"""``histogram`` on the ``cpu`` backend: the C++ kernel of csrc/cpu/stats_cpu.cpp.

One pass over the indices with per-thread private counts (weights: fp64 sums per chunk,
added in chunk order). The range check rides on that pass (``checks_values``): the kernel
returns the largest index it saw and an index >= K raises the op's usual error, so the
public op does not read the indices a second time to check them.
"""
from ... import _cpu_extension
from .._validation import check_indices_in_range


def histogram(indices, K, weights):
    counts, worst = _cpu_extension.ops().histogram_cpu(indices, K, weights)
    if worst >= K:
        check_indices_in_range("indices", indices, K)  # raises the op's usual error
    return counts


histogram.checks_values = True
