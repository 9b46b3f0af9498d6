"""The codebook axis C on every op and every backend, against independent fp64 definitions.

One rule: ``assign(x [C, N, D], codebook [C, K, D]) -> [C, N]`` (or a shared ``[K, D]``
codebook), ``histogram(indices [C, N], K, codebook_axis=True) -> [C, K]``,
``cluster_stats(x [C, N, D], indices [C, N], K, codebook_axis=True) -> [C, K], [C, K, D]``,
``ema_update_`` on ``[C, K]`` / ``[C, K, D]`` buffers. Each codebook's result must equal
the single-codebook definition (helpers: fp64 closed forms and plain loops), all C go
through ONE backend call, and bad shapes raise errors that say what was expected.
Outputs a backend allocates are poisoned by conftest (torch.empty is NaN / -7 filled).
"""
import pytest
import torch

import vqkernels
from conftest import backend_cases, dtypes_for, interpreted
from helpers import check_assign, closed_form_ema, first_mismatches, gen, loop_cluster_stats, loop_histogram, randn
from vqkernels.ops import _dispatch

ALL = backend_cases()
METRICS = ["l2", "cosine", "dot"]
# (C, N, K, D): C=1, N=1, K=1, D not a power of two, N and K across tile and block edges
AXIS_SHAPES = [(1, 1, 1, 1), (1, 7, 5, 3), (3, 1, 7, 5), (4, 37, 1, 3), (2, 33, 70, 33), (5, 65, 40, 6)]
SMALL = [(1, 1, 1, 1), (1, 7, 5, 3), (3, 1, 7, 5), (4, 37, 1, 3), (2, 33, 40, 5)]


def _shapes(backend, device):
    return SMALL if interpreted(backend, device) else AXIS_SHAPES


def _count_backend_calls(monkeypatch):
    calls = []
    real = _dispatch.call

    def spy(op, *args):
        calls.append(op)
        return real(op, *args)

    monkeypatch.setattr(_dispatch, "call", spy)
    return calls


# --------------------------------------------------------------------------- assign


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("metric", METRICS)
def test_assign_per_codebook(backend, device, metric, monkeypatch):
    calls = _count_backend_calls(monkeypatch)
    for C, N, K, D in _shapes(backend, device):
        for i, dtype in enumerate(dtypes_for(backend, device)):
            x = randn(C, N, D, seed=C * 100 + N + i, device=device, dtype=dtype)
            codebooks = randn(C, K, D, seed=C * 7 + K * 3 + D + i, device=device, dtype=dtype)
            calls.clear()
            indices, distances = vqkernels.assign(x, codebooks, metric, backend=backend)
            assert calls == ["assign"], f"one backend call for all {C} codebooks, got {calls}"
            assert indices.shape == distances.shape == (C, N)
            assert distances.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            for c in range(C):
                check_assign(x[c], codebooks[c], metric, indices[c], distances[c])


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("metric", METRICS)
def test_assign_shared_codebook_with_codebook_axis_in_x(backend, device, metric):
    for C, N, K, D in _shapes(backend, device):
        x = randn(C, N, D, seed=N + D, device=device)
        codebook = randn(K, D, seed=K + D, device=device)
        indices, distances = vqkernels.assign(x, codebook, metric, backend=backend)
        assert indices.shape == (C, N)
        check_assign(x, codebook, metric, indices, distances)


@pytest.mark.parametrize("backend,device", ALL)
def test_assign_codebook_axis_flattens_dims_after_c(backend, device):
    C, K, D = 3, 9, 5
    x = randn(C, 2, 4, D, seed=1, device=device)
    codebooks = randn(C, K, D, seed=2, device=device)
    indices, distances = vqkernels.assign(x, codebooks, backend=backend)
    assert indices.shape == distances.shape == (C, 2, 4)
    for c in range(C):
        check_assign(x[c], codebooks[c], "l2", indices[c], distances[c])


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("metric", METRICS)
def test_assign_nan_rows_get_minus_one_per_codebook(backend, device, metric):
    C, N, K, D = 3, 10, 6, 5
    x = randn(C, N, D, seed=3, device=device)
    codebooks = randn(C, K, D, seed=4, device=device)
    bad = torch.zeros(C, N, dtype=torch.bool)
    bad[0, 2] = bad[2, 9] = bad[1, 0] = True
    x[0, 2, 1] = float("nan")
    x[2, 9, 4] = float("inf")
    x[1, 0] = float("-inf")
    indices, distances = vqkernels.assign(x, codebooks, metric, backend=backend)
    assert indices.cpu()[bad].tolist() == [-1, -1, -1]
    assert distances.cpu()[bad].isnan().all()
    for c in range(C):
        keep = ~bad[c].to(device)
        check_assign(x[c][keep], codebooks[c], metric, indices[c][keep], distances[c][keep])


def test_assign_codebook_axis_errors():
    x = torch.randn(3, 10, 4)
    with pytest.raises(ValueError, match=r"C=2 codebooks .* x must be \[H=2, \.\.\., 4\].*got shape \(3, 10, 4\)"):
        vqkernels.assign(x, torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match=r"x must be \[H=3, \.\.\., 4\].*got shape \(4,\)"):
        vqkernels.assign(torch.randn(4), torch.randn(3, 6, 4))
    with pytest.raises(ValueError, match=r"x has 5 features .* expected x of shape \[\.\.\., 4\]"):
        vqkernels.assign(torch.randn(3, 10, 5), torch.randn(3, 6, 4))
    with pytest.raises(ValueError, match=r"codebook must have 2 or 3 dimensions, got shape \(1, 3, 6, 4\)"):
        vqkernels.assign(x, torch.randn(1, 3, 6, 4))


# --------------------------------------------------------------------------- histogram


@pytest.mark.parametrize("backend,device", ALL)
def test_histogram_codebook_axis(backend, device, monkeypatch):
    calls = _count_backend_calls(monkeypatch)
    for C, N, K, _ in _shapes(backend, device):
        g = gen(C * N + K)
        indices = torch.randint(-1, K, (C, N), generator=g).to(device)  # -1 = masked
        weights = torch.rand(C, N, generator=g).to(device)
        calls.clear()
        counts = vqkernels.histogram(indices, K, codebook_axis=True, backend=backend)
        weighted = vqkernels.histogram(indices, K, weights, codebook_axis=True, backend=backend)
        assert calls == ["histogram", "histogram"], calls
        assert counts.shape == weighted.shape == (C, K)
        assert counts.dtype == torch.int64 and weighted.dtype == torch.float32
        for c in range(C):
            assert counts[c].cpu().tolist() == loop_histogram(indices[c], K), c
            want = torch.tensor(loop_histogram(indices[c], K, weights[c]), dtype=torch.float64)
            torch.testing.assert_close(weighted[c].cpu().double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", ALL)
def test_histogram_heads_alias_and_dims_after_c(backend, device):
    indices = torch.randint(-1, 5, (3, 2, 7), generator=gen(5)).to(device)
    by_axis = vqkernels.histogram(indices, 5, codebook_axis=True, backend=backend)
    by_heads = vqkernels.histogram(indices, 5, heads=True, backend=backend)
    assert by_axis.shape == (3, 5) and torch.equal(by_axis, by_heads)
    for c in range(3):
        assert by_axis[c].cpu().tolist() == loop_histogram(indices[c], 5)
    empty = vqkernels.histogram(indices[:, :0], 5, codebook_axis=True, backend=backend)
    assert empty.shape == (3, 5) and empty.cpu().tolist() == [[0] * 5] * 3


def test_histogram_codebook_axis_errors():
    with pytest.raises(ValueError, match=r"codebook_axis=True needs indices of shape \[C, \.\.\.\]"):
        vqkernels.histogram(torch.tensor(1), 4, codebook_axis=True)
    with pytest.raises(ValueError, match=r"weights has shape \(2, 3\) but indices has shape \(2, 4\)"):
        vqkernels.histogram(torch.zeros(2, 4, dtype=torch.int64), 4, torch.ones(2, 3), codebook_axis=True)
    with pytest.raises(ValueError, match=r"holds index 4, expected values in \[0, 4\)"):
        vqkernels.histogram(torch.tensor([[0, 1], [4, 2]]), 4, codebook_axis=True)


# --------------------------------------------------------------------------- cluster_stats


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("deterministic", [False, True])
def test_cluster_stats_codebook_axis(backend, device, deterministic, monkeypatch):
    calls = _count_backend_calls(monkeypatch)
    for C, N, K, D in _shapes(backend, device):
        for i, dtype in enumerate(dtypes_for(backend, device)):
            g = gen(C * N * K + D + i)
            x = torch.randn(C, N, D, generator=g, dtype=torch.float64).to(dtype).to(device)
            indices = torch.randint(-1, K, (C, N), generator=g).to(device)
            x[indices.cpu() < 0] = float("nan")  # masked rows must not leak into any statistic
            calls.clear()
            counts, sums = vqkernels.cluster_stats(x, indices, K, deterministic=deterministic, codebook_axis=True, backend=backend)
            assert calls == ["cluster_stats"], calls
            assert counts.shape == (C, K) and sums.shape == (C, K, D)
            assert counts.dtype == sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            for c in range(C):
                want_counts, want_sums = loop_cluster_stats(x[c].double(), indices[c], K)
                assert counts[c].cpu().double().tolist() == want_counts.tolist(), c
                torch.testing.assert_close(sums[c].cpu().double(), want_sums, rtol=tol, atol=tol * max(1, N / K))


@pytest.mark.parametrize("backend,device", ALL)
def test_cluster_stats_heads_alias_and_dims_after_c(backend, device):
    x = randn(2, 3, 4, 5, seed=6, device=device)
    indices = torch.randint(-1, 3, (2, 3, 4), generator=gen(7)).to(device)
    a = vqkernels.cluster_stats(x, indices, 3, codebook_axis=True, backend=backend)
    b = vqkernels.cluster_stats(x, indices, 3, heads=True, backend=backend)
    assert a.counts.shape == (2, 3) and a.sums.shape == (2, 3, 5)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.sums, b.sums)
    for c in range(2):
        want_counts, want_sums = loop_cluster_stats(x[c].reshape(-1, 5), indices[c], 3)
        assert a.counts[c].cpu().double().tolist() == want_counts.tolist()
        torch.testing.assert_close(a.sums[c].cpu().double(), want_sums, rtol=1e-5, atol=1e-5)


def test_cluster_stats_codebook_axis_errors():
    with pytest.raises(ValueError, match=r"expected indices of shape \(2, 5\) \(x without its last dimension\)"):
        vqkernels.cluster_stats(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.int64), 4, codebook_axis=True)
    with pytest.raises(ValueError, match=r"expected indices of shape \(2, 5\)"):
        vqkernels.cluster_stats(torch.randn(2, 5, 3), torch.zeros(3, 5, dtype=torch.int64), 4, codebook_axis=True)
    with pytest.raises(ValueError, match=r"codebook_axis=True needs x of shape \[C, \.\.\., D\]"):
        vqkernels.cluster_stats(torch.randn(3), torch.zeros((), dtype=torch.int64), 4, codebook_axis=True)
    with pytest.raises(ValueError, match=r"heads=True needs x of shape \[H, \.\.\., D\]"):
        vqkernels.cluster_stats(torch.randn(3), torch.zeros((), dtype=torch.int64), 4, heads=True)


# --------------------------------------------------------------------------- ema_update_


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("C,K,D", [(1, 1, 1), (3, 7, 5), (2, 40, 33)])
def test_ema_update_codebook_axis(backend, device, C, K, D, monkeypatch):
    calls = _count_backend_calls(monkeypatch)
    g = gen(C * K * D)
    cluster_size = (torch.rand(C, K, generator=g) + 0.5).to(device)
    embed_avg = torch.randn(C, K, D, generator=g).to(device)
    codebook = torch.full((C, K, D), float("nan"), device=device)  # poisoned: every code is rewritten
    counts = torch.randint(0, 5, (C, K), generator=g).float().to(device)
    sums = torch.randn(C, K, D, generator=g).to(device) * counts.unsqueeze(-1)
    want = closed_form_ema(cluster_size, embed_avg, counts, sums, 0.8, 1e-5)
    vqkernels.ema_update_(cluster_size, embed_avg, codebook, counts, sums, 0.8, backend=backend)
    assert calls == ["ema_update"], calls
    for got, expect in zip((cluster_size, embed_avg, codebook), want):
        torch.testing.assert_close(got.cpu().double(), expect, rtol=1e-5, atol=1e-5)


def test_ema_update_codebook_axis_errors():
    with pytest.raises(ValueError, match=r"counts has shape \(3, 4\); expected \(2, 4\)"):
        vqkernels.ema_update_(torch.ones(2, 4), torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), torch.ones(3, 4), torch.zeros(2, 4, 3), 0.9)


# --------------------------------------------------------------------------- custom ops


def test_opcheck_with_codebook_axis():
    """The custom ops take the backend shapes [C, N(, D)] directly; fake impls agree."""
    ops = torch.ops.vqkernels
    x, codebooks = randn(3, 20, 6, seed=8), randn(3, 9, 6, seed=9)
    indices = torch.randint(-1, 9, (3, 20), generator=gen(10))
    for metric in METRICS:
        torch.library.opcheck(ops.assign.default, (x, codebooks, metric, "", True))
    torch.library.opcheck(ops.histogram.default, (indices, 9, None, ""))
    torch.library.opcheck(ops.histogram.default, (indices, 9, torch.rand(3, 20), ""))
    for deterministic in (False, True):
        torch.library.opcheck(ops.cluster_stats.default, (x, indices, 9, deterministic, ""))
    i2, d2 = ops.assign.default(x, codebooks, "l2", "", True)
    assert i2.shape == d2.shape == (3, 20)
    assert ops.histogram.default(indices, 9, None, "").shape == (3, 9)


def test_compile_fullgraph_with_codebook_axis():
    x, codebooks = randn(2, 16, 4, seed=11), randn(2, 8, 4, seed=12)

    def step(x, codebooks):
        indices, distances = vqkernels.assign(x, codebooks)
        counts = vqkernels.histogram(indices, 8, codebook_axis=True)
        stats = vqkernels.cluster_stats(x, indices, 8, codebook_axis=True)
        return indices, distances, counts, stats.sums

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for want, got in zip(step(x, codebooks), compiled(x, codebooks)):
        assert torch.equal(want, got), first_mismatches(want != got, want, got)
