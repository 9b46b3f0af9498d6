"""Index arithmetic past 2**31 elements: the chunked backend on CPU (at a size that fits in
RAM) and every fast backend on a CUDA device.

x holds 2**31 + 65536 fp16 elements (4 GiB): any 32-bit offset would wrap before the last
rows. Only rows near the end (and a few at the start) are checked against the reference.
"""
import os

import pytest
import torch

import vqkernels
from conftest import backend_cases

pytestmark = pytest.mark.slow
ALL = backend_cases()


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


# The same past 2**31 elements for every fast backend on a CUDA device (the cases carry
# the marker gpu: benchmarks/gpu_check.sh runs them).
GPU_FAST = [c for c in ALL if c.values[1] == "cuda" and c.values[0] != "reference"]


@pytest.mark.skipif(not GPU_FAST, reason="needs a CUDA device")
@pytest.mark.parametrize("backend,device", GPU_FAST or [pytest.param("none", "cuda", id="no-cuda")])
def test_index_arithmetic_past_2_31_elements_on_the_gpu(backend, device):
    if torch.cuda.mem_get_info()[0] < 24 * 2**30:
        pytest.skip("needs about 24 GiB of free GPU memory")
    D, K = 2**16, 3
    N = 2**31 // D + 1  # N * D = 2**31 + D elements: a 32-bit element offset wraps before the last rows
    x = torch.zeros(N, D, dtype=torch.float16, device=device)
    codebook = torch.stack([torch.zeros(D), torch.ones(D), -torch.ones(D)]).to(torch.float16).to(device)
    x[-4:-2] = 1.0
    x[-2:] = -1.0
    x[0] = -1.0
    indices, distances = vqkernels.assign(x, codebook, backend=backend)
    assert indices[-4:].tolist() == [1, 1, 2, 2] and indices[:2].tolist() == [2, 0]
    assert distances[-4:].tolist() == [0.0] * 4
    assert vqkernels.histogram(indices, K, backend=backend).tolist() == [N - 5, 2, 3]
    counts, sums = vqkernels.cluster_stats(x, indices, K, backend=backend)
    assert counts.tolist() == [N - 5, 2, 3]
    assert sums[1].tolist() == [2.0] * D and sums[2].tolist() == [-3.0] * D
    del x, distances, sums
    # histogram over more than 2**31 indices (int32 to halve the memory)
    many = torch.zeros(2**31 + 16, dtype=torch.int32, device=device)
    many[-3:] = 2
    many[-5:-3] = -1  # masked
    assert vqkernels.histogram(many, K, backend=backend).tolist() == [2**31 + 11, 0, 3]
