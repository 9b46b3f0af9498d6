"""``ema_update_`` cases the other EMA tests did not reach, found by
``make mutation MUTATION_GROUPS=ema_update`` (docs/testing.md): statistics in a wider dtype
than the state (fp64 counts and sums, e.g. summed or all-reduced in fp64, on fp32 buffers)
are accepted and applied as the fp64 closed form, rounded once into the buffers."""
import pytest
import torch

import vqkernels
from conftest import backend_cases
from helpers import closed_form_ema


@pytest.mark.parametrize("backend,device", backend_cases())
def test_ema_update_fp64_statistics_on_fp32_buffers(backend, device):
    g = torch.Generator().manual_seed(11)
    C, K, D = 2, 7, 5
    cluster_size = torch.rand(C, K, generator=g) * 3
    embed_avg = torch.randn(C, K, D, generator=g)
    codebook = torch.randn(C, K, D, generator=g)
    counts = torch.randint(0, 6, (C, K), generator=g).double()
    sums = torch.randn(C, K, D, generator=g, dtype=torch.float64) * 4
    want = closed_form_ema(cluster_size, embed_avg, counts, sums, 0.8, 1e-5)
    state = [t.to(device) for t in (cluster_size, embed_avg, codebook)]
    out = vqkernels.ema_update_(*state, counts.to(device), sums.to(device), 0.8, 1e-5, backend=backend)
    assert out is state[2]
    assert all(t.dtype == torch.float32 for t in state), "the buffers keep their dtype"
    for got, exact, name in zip(state, want, ("cluster_size", "embed_avg", "codebook")):
        torch.testing.assert_close(got.cpu(), exact.float(), rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
