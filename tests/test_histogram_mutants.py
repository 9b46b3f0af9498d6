"""``histogram`` cases the other histogram tests did not reach, found by
``make mutation MUTATION_GROUPS=histogram`` (docs/testing.md): weighted counts are float32,
as documented, whatever torch's default dtype (scientific code often sets float64)."""
import pytest
import torch

import vqkernels
from conftest import backend_cases


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_histogram_weighted_counts_are_float32_under_a_float64_default_dtype(backend, device, float64_default):
    indices = torch.tensor([[0, 2, 2, -1, 1, 2], [1, 1, -1, 0, 2, 2]])
    weights = torch.tensor([[0.5, 1.0, 2.0, 9.0, 0.25, 4.0], [1.0, 3.0, 9.0, 0.5, 2.0, 0.125]], dtype=torch.float32)
    got = vqkernels.histogram(indices.to(device), 3, weights.to(device), codebook_axis=True, backend=backend)
    assert got.dtype == torch.float32
    want = torch.tensor([[0.5, 0.25, 7.0], [0.5, 4.0, 2.125]], dtype=torch.float32)  # masked (-1) entries count nothing
    assert torch.equal(got.cpu(), want)
