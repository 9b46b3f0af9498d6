"""Exact ties between DISTINCT codes that sit in different K tiles go to the lowest index,
on every backend.

Duplicated codes (test_ops) can be mapped to their lowest copy; these ties cannot: the
tied codes differ, only their distances to the query are equal. Small tiles put tied codes
in different tiles: chunked through VQKERNELS_CHUNK_ELEMENTS=2048 (16 codes per tile),
Triton through its interpreter block (BLOCK_K=32). Every expected index is computed here,
in fp64, by a left-to-right strict scan (helpers.loop_argmin). The data are chosen so that
every distance is exact in fp32 (small integers, power-of-two multiples), so an exact tie
in fp64 is an exact tie for every backend and any other pick is wrong.
"""
import pytest
import torch

import vqkernels
from conftest import backend_cases, interpreted
from helpers import exact_distances, first_mismatches, gen, loop_argmin

ALL = backend_cases()
SMALL_TILES = "2048"  # chunked: tile_k = 16


def _assert_lowest(x, codebook, metric, backend, min_cross_tile_rows=1):
    """assign() returns the lowest index of the exact minimum for every row, and the data
    really hold ties across 16- and 32-code tiles (else the test would prove nothing)."""
    indices, distances = vqkernels.assign(x, codebook, metric, backend=backend)
    d = exact_distances(x, codebook, metric)
    want = loop_argmin(d)
    tied = d == d.min(1, keepdim=True).values
    first = tied.to(torch.int64).argmax(1)
    last = codebook.shape[0] - 1 - tied.flip(1).to(torch.int64).argmax(1)
    assert int((last // 32 > first // 32).sum()) >= min_cross_tile_rows, "test data hold too few cross-tile ties"
    got = indices.cpu()
    assert torch.equal(got, want), "tie not given to the lowest index: " + first_mismatches(got != want, got, want)
    torch.testing.assert_close(distances.cpu().double(), d.gather(1, want.view(-1, 1)).squeeze(1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("metric,offset", [("l2", 0.0), ("l2", 64.0), ("dot", 0.0)])
def test_integer_grid_ties_across_tiles(backend, device, metric, offset, monkeypatch):
    # Integer coordinates: every l2 distance and dot product is an integer, exact in fp32,
    # so ties among distinct codes are everywhere. offset=64 makes the chunked backend
    # centre the codebook (a non-integer mean), which rounds its scores: the rows must be
    # re-decided exactly.
    monkeypatch.setenv("VQKERNELS_CHUNK_ELEMENTS", SMALL_TILES)
    K, D = 200, 3
    N = 24 if interpreted(backend, device) else 256
    g = gen(K + int(offset) + (metric == "dot"))
    codebook = (torch.randint(-3, 4, (K, D), generator=g).float() + offset).to(device)
    x = (torch.randint(-4, 5, (N, D), generator=g).float() + offset).to(device)
    _assert_lowest(x, codebook, metric, backend, min_cross_tile_rows=N // 4)


@pytest.mark.parametrize("backend,device", ALL)
def test_cosine_ties_between_scalar_multiples(backend, device, monkeypatch):
    # Codes that are power-of-two multiples of one another normalise to the same unit vector
    # exactly (a power-of-two scaling is exact), so their cosine distances to any query are
    # equal. The copies sit in later tiles; the query is a multiple of the base code.
    monkeypatch.setenv("VQKERNELS_CHUNK_ELEMENTS", SMALL_TILES)
    K, D = 160, 5
    g = gen(21)
    sign = torch.randint(0, 2, (K, D), generator=g).float() * 2 - 1
    codebook = torch.randint(1, 6, (K, D), generator=g).float() * sign  # no zero code
    for src, dst, scale in [(3, 40, 2.0), (3, 130, 0.5), (17, 70, 4.0), (50, 150, 0.25), (0, 100, 8.0)]:
        codebook[dst] = codebook[src] * scale
    queries = torch.stack([codebook[s] * f for s, f in ((3, 3.0), (17, 0.75), (50, 5.0), (0, 1.0), (130, 1.0))])
    _assert_lowest(queries.to(device), codebook.to(device), "cosine", backend, min_cross_tile_rows=4)


@pytest.mark.parametrize("backend,device", ALL)
def test_tie_rounded_apart_by_centring(backend, device):
    """K=3000 codes near (20, 20), code 5 = (1, 0) and code 2500 = (0, 1), query at the
    origin: both distances are exactly 1.0 and every other code is far. The chunked backend
    centres such a codebook on its mean, which rounds the two scores apart; before the
    exact re-decision it returned 2500 for several of these codebooks. Default tiles (one
    candidate row: compared with every code) and tiny tiles (the candidate search)."""
    seeds = range(3) if interpreted(backend, device) else range(20)
    for budget in (None, SMALL_TILES):
        with pytest.MonkeyPatch.context() as mp:
            if budget is not None:
                mp.setenv("VQKERNELS_CHUNK_ELEMENTS", budget)
            for seed in seeds:
                codebook = 20 + torch.randn(3000, 2, generator=gen(seed))
                codebook[5] = torch.tensor([1.0, 0.0])
                codebook[2500] = torch.tensor([0.0, 1.0])
                x = torch.zeros(3, 2)
                x[1] = torch.tensor([0.5, 0.5])  # equidistant too: 0.5 to both
                x[2] = torch.tensor([-2.0, -2.0])  # 9 + 4 = 13 to both
                indices, distances = vqkernels.assign(x.to(device), codebook.to(device), backend=backend)
                assert indices.cpu().tolist() == [5, 5, 5], (seed, budget, indices.tolist())
                assert distances.cpu().tolist() == [1.0, 0.5, 13.0], (seed, budget, distances.tolist())


@pytest.mark.parametrize("backend,device", ALL)
def test_ties_across_tiles_per_codebook(backend, device, monkeypatch):
    """The same rule on each codebook of a [C, K, D] codebook axis (one launch for all C)."""
    monkeypatch.setenv("VQKERNELS_CHUNK_ELEMENTS", SMALL_TILES)
    C, K, D = 3, 100, 3
    N = 12 if interpreted(backend, device) else 96
    g = gen(33)
    codebooks = torch.randint(-2, 3, (C, K, D), generator=g).float() + torch.tensor([0.0, 32.0, -8.0]).view(C, 1, 1)
    x = torch.randint(-3, 4, (C, N, D), generator=g).float() + torch.tensor([0.0, 32.0, -8.0]).view(C, 1, 1)
    indices, _ = vqkernels.assign(x.to(device), codebooks.to(device), backend=backend)
    assert indices.shape == (C, N)
    for c in range(C):
        want = loop_argmin(exact_distances(x[c], codebooks[c], "l2"))
        got = indices[c].cpu()
        assert torch.equal(got, want), f"codebook {c}: " + first_mismatches(got != want, got, want)


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("offset", [0.0, 20.0, 1e4])
@pytest.mark.parametrize("budget", [None, SMALL_TILES])
def test_chunked_picks_exactly_the_reference_code(metric, offset, budget, monkeypatch):
    """Near-ties everywhere (groups of codes 1e-4 apart, rows 1e-3 from a group), with and
    without a large common offset: chunked must return the reference's own pick, bit for bit,
    because every row whose runner-up is within the rounding bound is re-decided by the
    reference's formula. A bound that is too small shows up here as a mismatch."""
    if budget is not None:
        monkeypatch.setenv("VQKERNELS_CHUNK_ELEMENTS", budget)
    C, N, K = 2, 200, 300
    for D in (2, 8, 33):
        g = gen(D + int(offset))
        base = torch.randn(C, K // 5, D, generator=g)
        jitter = 1e-4 * torch.randn(C, K, D, generator=g) * (torch.rand(C, K, 1, generator=g) < 0.5)
        codebooks = base.repeat(1, 5, 1) + jitter + offset
        x = base[:, torch.randint(0, K // 5, (N,), generator=g)] + 1e-3 * torch.randn(C, N, D, generator=g) + offset
        want = vqkernels.assign(x, codebooks, metric, backend="reference")
        got = vqkernels.assign(x, codebooks, metric, backend="chunked")
        assert torch.equal(got.indices, want.indices), f"D={D}: " + first_mismatches(got.indices != want.indices, got.indices, want.indices)
        torch.testing.assert_close(got.distances, want.distances, rtol=1e-5, atol=1e-5)
