"""``cluster_stats`` cases the other tests did not reach, found by
``make mutation MUTATION_GROUPS=cluster_stats`` (docs/testing.md): with ``deterministic=True``
the chunked backend (and the cpu backend, always) adds each code's rows in input order, so
the fp32 sums are bitwise those of a plain in-order loop, on data where the order changes
the rounding (an unstable sort of the rows gives other bits)."""
import pytest
import torch

import vqkernels
from conftest import backend_cases

IN_ORDER = [c for c in backend_cases() if c.values[0] in ("chunked", "cpu")]


@pytest.mark.parametrize("backend,device", IN_ORDER)
def test_cluster_stats_deterministic_sums_each_codes_rows_in_input_order(backend, device):
    g = torch.Generator().manual_seed(3)
    N, K, D = 400, 3, 4
    magnitude = 10.0 ** torch.randint(-3, 8, (N, D), generator=g)  # order-sensitive fp32 sums
    x = (torch.randn(N, D, generator=g) * magnitude).float()
    indices = torch.randint(0, K, (N,), generator=g)
    indices[::17] = -1  # masked rows add nothing
    want = torch.zeros(K, D)
    for n in range(N):
        if indices[n] >= 0:
            want[indices[n]] += x[n]
    assert not torch.equal(want, x[indices >= 0].double().new_zeros(K, D).index_add_(
        0, indices[indices >= 0], x[indices >= 0].double()).float()), "the data must be order-sensitive"
    got = vqkernels.cluster_stats(x.to(device), indices.to(device), K, deterministic=True, backend=backend)
    assert torch.equal(got.sums.cpu(), want)
    assert torch.equal(got.counts.cpu(), torch.bincount(indices[indices >= 0], minlength=K).float())
