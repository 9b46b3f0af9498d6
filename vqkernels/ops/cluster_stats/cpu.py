"""``cluster_stats`` on the ``cpu`` backend: the C++ kernel of csrc/cpu/stats_cpu.cpp.

Each code's rows summed in input order by one thread (small sums: every thread scans the
rows for its codes; large: the rows gathered by a stable counting sort): bitwise the same
for any thread count, so ``deterministic`` costs nothing here.
The op's value checks ride on the kernel's passes (``checks_values``): an index >= K raises
the op's usual error from the one pass over the indices, and with ``with_finite`` the
kernel also says whether every sum is finite, so the public op reads neither the indices
nor the sums a second time.
"""
from ... import _cpu_extension
from .._validation import check_indices_in_range


def cluster_stats(x, indices, K, deterministic, with_finite=False):
    """The backend contract's ``(counts, sums)``; ``(counts, sums, finite)`` with ``with_finite``."""
    counts, sums, worst, finite = _cpu_extension.ops().cluster_stats_cpu(x, indices, K)
    if worst >= K:
        check_indices_in_range("indices", indices, K)  # raises the op's usual error
    return (counts, sums, finite) if with_finite else (counts, sums)


cluster_stats.checks_values = True
