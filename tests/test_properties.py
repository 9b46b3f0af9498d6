"""Property-based tests: random shapes, dtypes, metrics, masks and duplicate codes; every
fast backend against the reference. Example counts are bounded so CI stays fast."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vqkernels
from conftest import FAST_BACKEND_CASES, dtypes_for, interpreted
from helpers import check_assign
from vqkernels.ops.histogram import reference as histogram_reference
from vqkernels.ops.stats import reference as stats_reference

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)


def _examples(backend, device):
    return 8 if interpreted(backend, device) else 40


@st.composite
def problems(draw, dtypes):
    N = draw(st.integers(1, 48))
    K = draw(st.integers(1, 40))
    D = draw(st.sampled_from([1, 2, 3, 7, 16, 31, 33]))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(K, D, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    n_dup = draw(st.integers(0, K // 2))
    if n_dup:  # duplicate codes: exact ties that must resolve to the lowest index
        src = torch.randint(0, K, (n_dup,), generator=g)
        dst = torch.randint(0, K, (n_dup,), generator=g)
        codebook[dst] = codebook[src]
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    if draw(st.booleans()):  # rows sitting exactly on codes
        x[: min(N, K)] = codebook[torch.randint(0, K, (min(N, K),), generator=g)]
    mask_fraction = draw(st.sampled_from([0.0, 0.3, 1.0]))
    keep = torch.rand(N, generator=g) >= mask_fraction
    return x.to(dtype), codebook.to(dtype), keep, seed


@pytest.mark.parametrize("backend,device", FAST_BACKEND_CASES)
def test_assign_property(backend, device):
    @settings(max_examples=_examples(backend, device), **SETTINGS)
    @given(problem=problems(dtypes_for(backend, device)), metric=st.sampled_from(["l2", "cosine", "dot"]))
    def run(problem, metric):
        x, codebook, _, _ = problem
        indices, distances = vqkernels.assign(x.to(device), codebook.to(device), metric, backend=backend)
        check_assign(x, codebook, metric, indices, distances)

    run()


@pytest.mark.parametrize("backend,device", FAST_BACKEND_CASES)
def test_histogram_and_stats_property(backend, device):
    @settings(max_examples=_examples(backend, device), **SETTINGS)
    @given(problem=problems(dtypes_for(backend, device)), deterministic=st.booleans())
    def run(problem, deterministic):
        x, codebook, keep, seed = problem
        K = codebook.shape[0]
        g = torch.Generator().manual_seed(seed + 1)
        indices = torch.where(keep, torch.randint(0, K, keep.shape, generator=g), torch.full(keep.shape, -1))
        counts = vqkernels.histogram(indices.to(device), K, backend=backend)
        assert torch.equal(counts.cpu(), histogram_reference.histogram(indices, K, None))
        c, s = vqkernels.cluster_stats(x.to(device), indices.to(device), K, deterministic=deterministic, backend=backend)
        want_c, want_s = stats_reference.cluster_stats(x, indices, K, deterministic)
        assert torch.equal(c.cpu(), want_c)
        scale = 1 + x.abs().max().item() * max(1, x.shape[0])
        tol = 1e-12 if x.dtype == torch.float64 else 2e-6
        torch.testing.assert_close(s.cpu(), want_s, rtol=tol, atol=tol * scale)

    run()
