"""Index arithmetic past 2**31 elements (chunked backend on CPU, at a size that fits in RAM).

x holds 2**31 + 65536 fp16 elements (4 GiB): any 32-bit offset would wrap before the last
rows. Only rows near the end (and a few at the start) are checked against the reference.
"""
import os

import pytest
import torch

import vqkernels

pytestmark = pytest.mark.slow


def _free_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.skipif(_free_memory_bytes() < 12 * 2**30, reason="needs about 12 GiB of free memory")
def test_assign_histogram_and_stats_past_2_31_elements():
    D, K = 2**16, 3  # wide rows keep N (and the work per element) small
    N = 2**31 // D + 1  # N * D = 2**31 + D elements
    x = torch.zeros(N, D, dtype=torch.float16)
    codebook = torch.tensor([[0.0] * D, [1.0] * D, [-1.0] * D], dtype=torch.float16)
    # a distinctive tail: the last rows sit on codes 1 and 2, beyond element 2**31
    x[-4:-2] = 1.0
    x[-2:] = -1.0
    x[0] = -1.0
    indices, distances = vqkernels.assign(x, codebook, backend="chunked")
    assert indices[-4:].tolist() == [1, 1, 2, 2]
    assert indices[:2].tolist() == [2, 0]
    assert distances[-4:].tolist() == [0.0] * 4
    counts = vqkernels.histogram(indices, K, backend="chunked")
    assert counts.tolist() == [N - 5, 2, 3]
    del distances
    cluster_counts, sums = vqkernels.cluster_stats(x, indices, K, backend="chunked")
    assert cluster_counts.tolist() == [N - 5, 2, 3]
    assert sums[1].tolist() == [2.0] * D and sums[2].tolist() == [-3.0] * D
