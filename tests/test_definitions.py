"""The reference and chunked backends against formulations written in tests/helpers.py
(fp64 closed forms and plain loops), not against each other: comparing
``backend="reference"`` with the reference's own function would test the wrapper only.

Shapes put the chunked backend's tiles at their edges (a tiny tile budget gives several N
and K tiles); inputs include exact ties between distinct codes, duplicate codes, masked
rows holding NaN, weights, and each dtype. These are also the tests `make mutation` runs.
"""
import pytest
import torch

import vqkernels
from helpers import (
    check_assign,
    closed_form_ema,
    exact_distances,
    first_mismatches,
    loop_argmin,
    loop_cluster_stats,
    loop_histogram,
)

PORTABLE = ["reference", "chunked"]
METRICS = ["l2", "cosine", "dot"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.fixture(params=["one-tile", "small-tiles"])
def tiles(request, monkeypatch):
    """The chunked backend with its default tile budget, and with a budget so small that
    K splits into 16-code tiles and N into several row tiles."""
    if request.param == "small-tiles":
        monkeypatch.setenv("VQKERNELS_CHUNK_ELEMENTS", "64")
    return request.param


# --------------------------------------------------------------------------- assign


@pytest.mark.parametrize("backend", PORTABLE)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("N,K,D", [(1, 1, 1), (70, 37, 5), (130, 50, 16)])
def test_assign_is_the_nearest_code_of_the_closed_form(backend, metric, N, K, D, tiles):
    for i, dtype in enumerate(DTYPES):
        x = _randn(N, D, seed=N + K + i).to(dtype)
        codebook = _randn(K, D, seed=K * 3 + D + i, scale=1.5).to(dtype)
        indices, distances = vqkernels.assign(x, codebook, metric, backend=backend)
        assert indices.shape == distances.shape == (N,)
        assert distances.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        d = exact_distances(x, codebook, metric)
        if dtype == torch.float64:  # random fp64 data: no near-ties, the index is the loop's
            want = loop_argmin(d)
            assert torch.equal(indices, want), first_mismatches(indices != want, indices, want)
            chosen = d.gather(1, want.view(-1, 1)).squeeze(1)
            torch.testing.assert_close(distances, chosen, rtol=1e-12, atol=1e-12)
        check_assign(x, codebook, metric, indices, distances)


@pytest.mark.parametrize("backend", PORTABLE)
@pytest.mark.parametrize("metric", METRICS)
def test_assign_exact_ties_between_distinct_codes_go_to_the_lowest_index(backend, metric, tiles):
    # Codes are signed unit vectors (distinct, equal norms) spread over several K tiles;
    # the rows are equidistant from many of them by symmetry, with no duplicate to fall
    # back on: the strict "first minimum wins" rule alone must pick the lowest index.
    D = 6
    eye = torch.eye(D, dtype=torch.float64)
    codebook = torch.cat([-eye, eye, 2 * eye, -2 * eye])  # K = 24: two 16-code tiles
    x = torch.stack([
        torch.zeros(D, dtype=torch.float64) + 0.25,  # l2 / dot / cosine: ties among the +e_d
        torch.tensor([0.0, 0, 0, 0, 0, 1], dtype=torch.float64),  # nearest: e_5 (index 11) vs 2e_5
        torch.tensor([-1.0, -1, -1, -1, -1, -1], dtype=torch.float64),  # ties among the -e_d / -2e_d
        torch.tensor([0.0, 3, 0, 3, 0, 0], dtype=torch.float64),  # 2e_1 and 2e_3 tie (l2, dot)
    ])
    for dtype in (torch.float64, torch.float32):
        indices, distances = vqkernels.assign(x.to(dtype), codebook.to(dtype), metric, backend=backend)
        want = loop_argmin(exact_distances(x, codebook, metric))
        assert torch.equal(indices, want), first_mismatches(indices != want, indices, want)
        check_assign(x.to(dtype), codebook.to(dtype), metric, indices, distances)


@pytest.mark.parametrize("backend", PORTABLE)
def test_assign_duplicate_codes_in_different_tiles(backend, tiles):
    codebook = _randn(40, 3, seed=5)
    codebook[33] = codebook[2]
    codebook[20] = codebook[19]
    codebook[39] = codebook[0]
    x = torch.cat([codebook[[33, 20, 39, 2, 19, 0]], codebook[[33, 20, 39]] + 1e-4])
    indices, _ = vqkernels.assign(x.float(), codebook.float(), backend=backend)
    assert indices.tolist() == [2, 19, 0, 2, 19, 0, 2, 19, 0]


@pytest.mark.parametrize("backend", PORTABLE)
def test_assign_distances_are_exact_at_a_large_offset(backend):
    """The reported distance is recomputed by direct difference: at a common offset of 1e4
    the expanded form would be off by more than the distances themselves."""
    offset = torch.full((8,), 1e4 / 8**0.5, dtype=torch.float64)
    codebook = (offset + _randn(30, 8, seed=6)).float()
    x = (offset + _randn(40, 8, seed=7)).float()
    indices, distances = vqkernels.assign(x, codebook, backend=backend)
    d = exact_distances(x, codebook, "l2")
    want = loop_argmin(d)
    assert torch.equal(indices, want), first_mismatches(indices != want, indices, want)
    torch.testing.assert_close(distances.double(), d.gather(1, want.view(-1, 1)).squeeze(1), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("backend", PORTABLE)
def test_assign_over_several_row_chunks(backend):
    """K * D large enough that the reference bounds its [rows, K, D] temporary with several
    row chunks (and the chunked backend uses several row tiles): every row still answered."""
    N, K, D = 300, 512, 64
    x, codebook = _randn(N, D, seed=21).float(), _randn(K, D, seed=22).float()
    indices, distances = vqkernels.assign(x, codebook, backend=backend)
    assert indices.shape == distances.shape == (N,)
    d = exact_distances(x, codebook, "l2")
    want = loop_argmin(d)
    assert torch.equal(indices, want), first_mismatches(indices != want, indices, want)
    torch.testing.assert_close(distances.double(), d.gather(1, want.view(-1, 1)).squeeze(1), rtol=1e-5, atol=1e-4)


def _near_tie_problem(seed, n_rows=24, D=16, K=64):
    """Rows whose two nearest codes sit in different 16-code K tiles, inside the chunked
    backend's score rounding bound (pass 1 marks the rows ambiguous, pass 2 decides them):

    * even rows: an exact tie, x +- 0.5 e_i (exact in fp32 for x in [1, 1.5)): the
      direct-difference distances are both exactly 0.25 while the rounded scores differ by
      a few ulps, so only the exact comparison gets the lowest index;
    * odd rows: exact distances 1 and 1 + delta, |delta| in [1e-4, 3e-4], far above the fp32
      distance rounding, so the fp64 truth is the reference's pick.

    The nearer (or lower) code alternates between the lower and the higher index.
    Returns x [n_rows, D], codebook [K, D] (fp32)."""
    g = torch.Generator().manual_seed(seed)
    x = (1 + 0.5 * torch.rand(n_rows, D, generator=g)).double()  # fp32 values in [1, 1.5)
    codebook = torch.randn(K, D, generator=g, dtype=torch.float64) * 3 + 20  # far from every row
    for n in range(n_rows):
        a, b = (n, n + K // 2) if n % 4 < 2 else (n + K // 2, n)
        if n % 2 == 0:
            step = torch.zeros(D, dtype=torch.float64)
            step[n % D] = 0.5
            codebook[a], codebook[b] = x[n] + step, x[n] - step
            continue
        u = torch.randn(D, generator=g, dtype=torch.float64)
        u /= u.norm()
        w = torch.randn(D, generator=g, dtype=torch.float64)
        w -= (w @ u) * u
        w /= w.norm()
        delta = (1 + 2 * torch.rand(1, generator=g, dtype=torch.float64).item()) * 1e-4
        delta = delta if n % 4 == 1 else -delta
        v = (u * 0.6 + w * 0.8) * (1 + delta) ** 0.5  # |v|^2 = 1 + delta, another direction
        codebook[a], codebook[b] = x[n] + u, x[n] + v
    x32, c32 = x.float(), codebook.float()
    ties = exact_distances(x32[::2], c32, "l2")
    assert bool((ties.min(1).values == 0.25).all()) and bool(((ties == 0.25).sum(1) == 2).all()), "ties not exact"
    return x32, c32


@pytest.mark.parametrize("path", ["few-rows", "pass-2"])
@pytest.mark.parametrize("heads", [1, 2])
def test_chunked_near_ties_are_decided_by_the_exact_distance(path, heads, monkeypatch):
    """Pass 2 of the chunked backend (and its shortcut for a few ambiguous rows) picks the
    code with the smallest exact distance. A tiny tile budget sends the rows through the
    tiled pass 2 (several K tiles, row batches and candidate batches); with two codebooks
    the second has fewer ambiguous rows, so the packed table holds padding."""
    if path == "pass-2":
        monkeypatch.setenv("VQKERNELS_CHUNK_ELEMENTS", "64")
    problems = [_near_tie_problem(seed=h, n_rows=24 - 10 * h) for h in range(heads)]
    if heads == 1:
        x, codebook = problems[0]
        got = [vqkernels.assign(x, codebook, backend="chunked")]
    else:
        # pad the second codebook's rows with copies of its last code: unambiguous rows
        n = max(p[0].shape[0] for p in problems)
        xs = torch.stack([torch.cat([p[0], p[1][-1:].expand(n - p[0].shape[0], -1)]) for p in problems])
        both = vqkernels.assign(xs, torch.stack([p[1] for p in problems]), backend="chunked")
        got = [type(both)(both.indices[h, : p[0].shape[0]], both.distances[h, : p[0].shape[0]]) for h, p in enumerate(problems)]
    for (x, codebook), (indices, distances) in zip(problems, got):
        d = exact_distances(x, codebook, "l2")
        want = loop_argmin(d)
        assert torch.equal(indices, want), first_mismatches(indices != want, indices, want)
        torch.testing.assert_close(distances.double(), d.gather(1, want.view(-1, 1)).squeeze(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_pass_2_takes_half_precision_inputs(dtype, monkeypatch):
    """Exact ties x +- 0.5 e_i (exact in fp16 / bf16 for x in [1, 1.5)) through the tiled pass 2."""
    monkeypatch.setenv("VQKERNELS_CHUNK_ELEMENTS", "64")
    g = torch.Generator().manual_seed(4)
    D, K, n_rows = 8, 48, 12
    x = (1 + 0.5 * torch.rand(n_rows, D, generator=g)).to(dtype)
    codebook = (torch.randn(K, D, generator=g) * 3 + 20).to(dtype)
    for n in range(n_rows):
        step = torch.zeros(D, dtype=dtype)
        step[n % D] = 0.5
        a, b = (n, n + K // 2) if n % 2 else (n + K // 2, n)
        codebook[a], codebook[b] = x[n] + step, x[n] - step
    d = exact_distances(x, codebook, "l2")
    assert bool(((d == 0.25).sum(1) == 2).all()), "ties not exact"
    indices, _ = vqkernels.assign(x, codebook, backend="chunked")
    want = loop_argmin(d)
    assert torch.equal(indices, want), first_mismatches(indices != want, indices, want)


def test_chunked_keeps_grid_data_exact():
    """Small-integer data (a grid) has exact expanded-form scores only when it is not
    shifted: the chunked backend centres only where a common offset dominates, so exact
    ties on a grid still go to the lowest index."""
    grid = torch.tensor([[a, b] for a in range(-3, 4) for b in range(-3, 4)], dtype=torch.float32)
    codebook = grid[torch.randperm(len(grid), generator=torch.Generator().manual_seed(8))] * 3 + 1
    x = torch.cartesian_prod(torch.arange(-9.0, 12.0, 1.5), torch.arange(-9.0, 12.0, 1.5))
    indices, distances = vqkernels.assign(x, codebook, backend="chunked")
    want = loop_argmin(exact_distances(x, codebook, "l2"))
    assert torch.equal(indices, want), first_mismatches(indices != want, indices, want)


# --------------------------------------------------------------------------- histogram


@pytest.mark.parametrize("backend", PORTABLE)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("N,K", [(1, 1), (40, 1), (200, 7), (33, 60)])
def test_histogram_is_the_loop_count(backend, index_dtype, N, K):
    g = torch.Generator().manual_seed(N * K)
    indices = torch.randint(-3, K, (N,), generator=g)  # negative = masked (any negative value)
    indices[0] = K - 1  # the last code is counted too
    got = vqkernels.histogram(indices.to(index_dtype), K, backend=backend)
    assert got.dtype == torch.int64 and got.tolist() == loop_histogram(indices, K)
    weights = torch.rand(N, generator=g) * 4 - 1  # negative weights are summed as given
    got_w = vqkernels.histogram(indices.to(index_dtype), K, weights, backend=backend)
    want_w = torch.tensor(loop_histogram(indices, K, weights), dtype=torch.float64)
    assert got_w.dtype == torch.float32 and got_w.shape == (K,)
    torch.testing.assert_close(got_w.double(), want_w, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", PORTABLE)
@pytest.mark.parametrize("weight_dtype", DTYPES)
def test_histogram_takes_weights_of_every_float_dtype(backend, weight_dtype):
    g = torch.Generator().manual_seed(3)
    indices = torch.randint(-1, 9, (60,), generator=g)
    weights = (torch.rand(60, generator=g, dtype=torch.float64) * 2).to(weight_dtype)
    got = vqkernels.histogram(indices, 9, weights, backend=backend)
    assert got.dtype == torch.float32  # documented: float32 sums whatever the weights' dtype
    want = torch.tensor(loop_histogram(indices, 9, weights), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


@pytest.fixture
def float64_default_dtype():
    """torch.set_default_dtype(torch.float64), as some scientific code runs: the documented
    output dtypes must not follow it."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("backend", PORTABLE)
def test_output_dtypes_ignore_the_default_dtype(backend, float64_default_dtype):
    x, codebook = _randn(20, 3, seed=1).float(), _randn(6, 3, seed=2).float()
    indices, distances = vqkernels.assign(x, codebook, backend=backend)
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32
    assert vqkernels.histogram(indices, 6, backend=backend).dtype == torch.int64
    assert vqkernels.histogram(indices, 6, torch.ones(20, dtype=torch.float32), backend=backend).dtype == torch.float32
    for deterministic in (False, True):
        counts, sums = vqkernels.cluster_stats(x, indices, 6, deterministic=deterministic, backend=backend)
        assert counts.dtype == sums.dtype == torch.float32
        want_counts, want_sums = loop_cluster_stats(x, indices, 6)
        assert torch.equal(counts.double(), want_counts)
        torch.testing.assert_close(sums.double(), want_sums, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- cluster_stats


@pytest.mark.parametrize("backend", PORTABLE)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("N,K,D", [(1, 1, 1), (50, 6, 3), (90, 40, 9)])
def test_cluster_stats_are_the_loop_sums(backend, deterministic, N, K, D):
    for dtype in DTYPES:
        g = torch.Generator().manual_seed(N + K + D)
        x = _randn(N, D, seed=N * D, scale=3.0).to(dtype)
        indices = torch.randint(-2, K, (N,), generator=g)
        indices[0] = K - 1
        x[indices < 0] = float("nan")  # masked rows must not leak into any statistic
        counts, sums = vqkernels.cluster_stats(x, indices, K, deterministic=deterministic, backend=backend)
        want_counts, want_sums = loop_cluster_stats(x, indices, K)
        out = torch.float64 if dtype == torch.float64 else torch.float32
        assert counts.dtype == sums.dtype == out and counts.shape == (K,) and sums.shape == (K, D)
        assert torch.equal(counts.double(), want_counts)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(sums.double(), want_sums, rtol=tol, atol=tol * 3 * N)


@pytest.mark.parametrize("backend", ["chunked"])
def test_deterministic_cluster_sums_add_rows_in_input_order(backend):
    """deterministic=True promises each code's rows summed in input order: bitwise the fp32
    running sum of a loop. Values of mixed magnitude make any other order round differently."""
    N, K = 3000, 3
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(N, 2, generator=g) * torch.tensor([1.0, 1e4])).float()
    x[::7] *= 1e4  # rounding depends on the order of the additions
    indices = torch.randint(-1, K, (N,), generator=g)
    _, sums = vqkernels.cluster_stats(x, indices, K, deterministic=True, backend=backend)
    want = torch.zeros(K, 2, dtype=torch.float32)
    for n in range(N):
        if indices[n] >= 0:
            want[indices[n]] += x[n]  # fp32, one row at a time, in input order
    assert torch.equal(sums, want), first_mismatches(sums != want, sums, want)


# --------------------------------------------------------------------------- ema_update_


@pytest.mark.parametrize("backend", PORTABLE)
@pytest.mark.parametrize("decay", [0.0, 0.25, 0.9, 1.0])
@pytest.mark.parametrize("eps", [1e-5, 0.5])
@pytest.mark.parametrize("H", [None, 3])
def test_ema_update_is_the_closed_form(backend, decay, eps, H):
    K, D = 7, 4
    lead = () if H is None else (H,)
    g = torch.Generator().manual_seed(K + D + (H or 0))
    cluster_size = torch.rand(*lead, K, generator=g) * 3 + 0.5
    embed_avg = torch.randn(*lead, K, D, generator=g)
    counts = torch.randint(0, 5, (*lead, K), generator=g).float()
    sums = torch.randn(*lead, K, D, generator=g) * 2
    codebook = torch.randn(*lead, K, D, generator=g)
    got = [t.clone() for t in (cluster_size, embed_avg, codebook)]
    out = vqkernels.ema_update_(*got, counts, sums, decay, eps, backend=backend)
    assert out is got[2]
    want = closed_form_ema(cluster_size, embed_avg, counts, sums, decay, eps)
    for name, a, w in zip(("cluster_size", "embed_avg", "codebook"), got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
