"""Chunked ``assign`` paths that the other assign tests did not reach, found by
``make mutation MUTATION_GROUPS=assign`` (docs/testing.md): exact ties whose scores are
positive, a single ambiguous row, fp64 inputs through the tiled pass 2, half-precision
cosine through both exact paths, and partial tiles without warnings. Every expected index
is the lowest index of the exact minimum (helpers.loop_argmin on fp64 distances)."""
import warnings

import pytest
import torch

import vqkernels
from helpers import exact_distances, first_mismatches, gen, loop_argmin

SMALL_TILES = "2048"  # chunked: tile_k = 16, several K tiles and row batches in pass 2


def _ring_ties(seed, K=64, dtype=torch.float32):
    """Codes on a circle of radius 4 around (20, 20) (a dominating offset: the backend
    centres them, which rounds scores), except codes a < b at (23, 20) and (20, 23), both
    exactly 3 from the query (20, 20). The tied scores ||c'||^2 - 2 x'.c' are about +9:
    positive, unlike the usual near-code ties."""
    g = gen(seed)
    angle = 2 * torch.pi * torch.rand(K, generator=g, dtype=torch.float64)
    codebook = (20 + 4 * torch.stack([angle.cos(), angle.sin()], 1)).to(dtype)
    a, b = sorted(torch.randperm(K, generator=g)[:2].tolist())
    codebook[a] = torch.tensor([23.0, 20.0], dtype=dtype)
    codebook[b] = torch.tensor([20.0, 23.0], dtype=dtype)
    return torch.tensor([[20.0, 20.0]], dtype=dtype), codebook, a


@pytest.mark.parametrize("budget", [None, SMALL_TILES])
def test_positive_score_ties_go_to_the_lowest_index_one_row_per_call(budget, monkeypatch):
    """One query per call: the single ambiguous row must still be re-decided, and a tie
    between positive scores is as ambiguous as one between negative scores."""
    if budget is not None:
        monkeypatch.setenv("VQKERNELS_CHUNK_ELEMENTS", budget)
    wrong = []
    for seed in range(30):
        x, codebook, a = _ring_ties(seed)
        d = exact_distances(x, codebook, "l2")
        assert int(loop_argmin(d)) == a and float(d[0, a]) == 9.0 and int((d == 9.0).sum()) == 2
        got = vqkernels.assign(x, codebook, backend="chunked")
        if int(got.indices) != a or float(got.distances) != 9.0:
            wrong.append((seed, a, int(got.indices), float(got.distances)))
        # the same query first, then rows ON the tied codes: each row's own best must not
        # hide another row's runner-up (the tie of row 0 stays ambiguous)
        b = int((d[0] == 9.0).nonzero()[-1])
        rows = torch.cat([x, codebook[[a, b]]])
        got = vqkernels.assign(rows, codebook, backend="chunked")
        if got.indices.tolist() != [a, a, b]:
            wrong.append((seed, [a, a, b], got.indices.tolist()))
    assert not wrong, wrong


def test_fp64_ties_rounded_apart_through_the_tiled_pass_2(monkeypatch):
    """fp64 inputs keep fp64 scores and thresholds all the way through pass 2 (the rounding
    bound is ~1e-13 there: a threshold rounded to fp32 would miss both tied codes). The
    centred-tie case of test_assign_ties, K = 300, with a budget that forces pass 2."""
    monkeypatch.setenv("VQKERNELS_CHUNK_ELEMENTS", "512")
    wrong = []
    for seed in range(20):
        codebook = 20 + torch.randn(300, 2, generator=gen(seed), dtype=torch.float64)
        codebook[5] = torch.tensor([1.0, 0.0])
        codebook[250] = torch.tensor([0.0, 1.0])
        x = torch.tensor([[0.0, 0.0], [0.5, 0.5], [-2.0, -2.0]], dtype=torch.float64)
        got = vqkernels.assign(x, codebook, backend="chunked")
        if got.indices.tolist() != [5, 5, 5] or got.distances.tolist() != [1.0, 0.5, 13.0]:
            wrong.append((seed, got.indices.tolist(), got.distances.tolist()))
    assert not wrong, wrong


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("budget", [None, "64"])
def test_half_precision_cosine_ties_through_both_exact_paths(dtype, budget, monkeypatch):
    """Codes that are power-of-two multiples of each other have bitwise equal unit vectors:
    exact cosine ties. Half inputs are normalised in the fp32 compute dtype on both exact
    paths (few rows: every code; tiny budget: the tiled pass 2), as the reference does."""
    if budget is not None:
        monkeypatch.setenv("VQKERNELS_CHUNK_ELEMENTS", budget)
    g = gen(21)
    D, K = 8, 48
    base = torch.randn(K // 2, D, generator=g).to(dtype)
    codebook = torch.cat([base * 4, base])  # code k and k + K/2 point the same way
    perm = torch.randperm(K, generator=g)
    codebook = codebook[perm]
    x = (base[:10] * 0.75 + 0.01 * torch.randn(10, D, generator=g).to(dtype)).to(dtype)
    d = exact_distances(x, codebook, "cosine")
    want = loop_argmin(d)
    got = vqkernels.assign(x, codebook, "cosine", backend="chunked")
    ref = vqkernels.assign(x, codebook, "cosine", backend="reference")
    assert torch.equal(got.indices, want), first_mismatches(got.indices != want, got.indices, want)
    assert torch.equal(ref.indices, want)
    torch.testing.assert_close(got.distances, ref.distances, rtol=0, atol=1e-6)


def test_partial_tiles_raise_no_warnings(monkeypatch):
    """N and K that do not divide into tiles: the last, partial tiles write into a slice of
    the reused score buffer of exactly their size (a mis-sized ``out=`` warns that PyTorch
    resizes it, a deprecated behaviour that later releases turn into an error)."""
    monkeypatch.setenv("VQKERNELS_CHUNK_ELEMENTS", "2048")
    g = gen(22)
    x = torch.randn(2, 300, 3, generator=g)
    codebook = torch.randn(2, 37, 3, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vqkernels.assign(x, codebook, backend="chunked")
    for c in range(2):
        want = loop_argmin(exact_distances(x[c], codebook[c], "l2"))
        assert torch.equal(got.indices[c], want)
