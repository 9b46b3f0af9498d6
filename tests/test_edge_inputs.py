"""Inputs that must WORK as documented, on every backend: empty N, K = 1, D = 1, strided /
non-contiguous / expanded views, float64 where supported (and refused with the reason
elsewhere). The inputs that must raise are in test_errors.py. On CPU the Triton backend
runs in its interpreter, so shapes stay tiny.
"""
import copy
import math

import pytest
import torch

import vqkernels
from conftest import backend_cases, dtypes_for
from helpers import assert_states_bitwise_equal, bitwise_equal, check_assign, exact_distances, gen, randn, snapshot
from vqkernels import Quantizer
from vqkernels import diagnostics as dg
from vqkernels.ops.assign import tolerance

ALL = backend_cases()


# Each case gets (backend, device) and asserts what the documentation promises.


def _assign_empty_n(b, dev):
    cb = randn(5, 3, seed=1, device=dev)
    for lead in ((0,), (2, 0), (0, 4)):
        idx, dist = vqkernels.assign(torch.zeros(*lead, 3, device=dev), cb, backend=b)
        assert idx.shape == lead and dist.shape == lead and idx.dtype == torch.int64 and dist.dtype == torch.float32
    heads = vqkernels.assign(torch.zeros(2, 0, 3, device=dev), randn(2, 5, 3, seed=2, device=dev), backend=b)
    assert heads.indices.shape == (2, 0)


def _assign_k1_d1(b, dev):
    x = randn(9, 1, seed=3, device=dev)
    for K in (1, 4):
        cb = randn(K, 1, seed=4 + K, device=dev)
        for metric in ("l2", "cosine", "dot"):
            idx, dist = vqkernels.assign(x, cb, metric, backend=b)
            if K == 1:
                assert idx.tolist() == [0] * 9
            if metric == "cosine" and K > 1:
                # D = 1 cosine: every same-sign code ties exactly; the lowest-index rule for
                # exact ties is test_assign_property's job, here the pick must be nearest
                d = exact_distances(x.double().cpu(), cb.double().cpu(), metric)
                chosen = d.gather(1, idx.cpu().view(-1, 1)).squeeze(1)
                assert bool((chosen <= d.min(1).values + tolerance(x.cpu(), cb.cpu(), metric)).all())
            else:
                check_assign(x, cb, metric, idx, dist)


def _assign_strided_and_expanded(b, dev):
    base = randn(30, 14, seed=5, device=dev)
    cb_t = randn(7, 11, seed=6, device=dev).t()  # [11, 7] transposed view
    views = {
        "row and column steps": base[::3, 1::2],  # [10, 7]
        "transposed": randn(7, 10, seed=7, device=dev).t(),
        "expanded (stride 0)": base[0, :7].expand(6, 7),
        "offset slice": base[5:15, 7:],
    }
    for name, x in views.items():
        assert not x.is_contiguous(), name
        got = vqkernels.assign(x, cb_t, backend=b)
        want = vqkernels.assign(x.contiguous(), cb_t.contiguous(), backend=b)
        assert bitwise_equal(got.indices, want.indices) and bitwise_equal(got.distances, want.distances), name
        check_assign(x, cb_t, "l2", got.indices, got.distances)
    # multi-head codebook as a permuted view
    heads = randn(5, 2, 7, seed=8, device=dev).permute(1, 0, 2)  # [2, 5, 7]
    xh = randn(7, 2, 4, seed=9, device=dev).permute(1, 2, 0)  # [2, 4, 7]
    got = vqkernels.assign(xh, heads, backend=b)
    want = vqkernels.assign(xh.contiguous(), heads.contiguous(), backend=b)
    assert bitwise_equal(got.indices, want.indices)


def _histogram_edges(b, dev):
    assert vqkernels.histogram(torch.zeros(0, dtype=torch.int64, device=dev), 3, backend=b).tolist() == [0, 0, 0]
    empty_w = vqkernels.histogram(torch.zeros(0, dtype=torch.int64, device=dev), 2, torch.zeros(0, device=dev), backend=b)
    assert empty_w.dtype == torch.float32 and empty_w.tolist() == [0.0, 0.0]
    assert vqkernels.histogram(torch.zeros(5, dtype=torch.int64, device=dev), 1, backend=b).tolist() == [5]
    idx = torch.randint(-1, 6, (8, 9), generator=gen(10)).to(dev)
    w = torch.rand(9, 8, generator=gen(11)).to(dev).t()
    for i, ww in ((idx[:, ::2], w[:, ::2]), (idx.t(), w.t()), (idx[1::3], w[1::3])):
        assert not i.is_contiguous()
        assert torch.equal(vqkernels.histogram(i, 6, backend=b), vqkernels.histogram(i.contiguous(), 6, backend=b))
        assert torch.equal(vqkernels.histogram(i, 6, ww, backend=b), vqkernels.histogram(i.contiguous(), 6, ww.contiguous(), backend=b))


def _cluster_stats_edges(b, dev):
    counts, sums = vqkernels.cluster_stats(torch.zeros(0, 4, device=dev), torch.zeros(0, dtype=torch.int64, device=dev), 3, backend=b)
    assert counts.tolist() == [0.0] * 3 and sums.shape == (3, 4) and not sums.any()
    x = randn(12, 1, seed=12, device=dev)
    counts, sums = vqkernels.cluster_stats(x, torch.zeros(12, dtype=torch.int64, device=dev), 1, backend=b)  # K = 1, D = 1
    assert counts.tolist() == [12.0]
    torch.testing.assert_close(sums.cpu(), x.cpu().sum(0, keepdim=True), rtol=1e-6, atol=1e-6)
    base = randn(10, 20, seed=13, device=dev)
    idx = torch.randint(-1, 5, (40,), generator=gen(14)).to(dev)
    for xs, ii in ((base.t(), idx[::2]), (base[::2, ::3].t(), idx[1:15:2]), (base[:, 0].expand(20, 10), idx[:20])):
        assert not xs.is_contiguous()
        for deterministic in (False, True):
            got = vqkernels.cluster_stats(xs, ii, 5, deterministic=deterministic, backend=b)
            want = vqkernels.cluster_stats(xs.contiguous(), ii.contiguous(), 5, deterministic=deterministic, backend=b)
            assert bitwise_equal(got.counts, want.counts) and bitwise_equal(got.sums, want.sums)


def _ema_update_edges(b, dev):
    for K, D in ((1, 1), (5, 3)):
        def fresh():
            return [torch.ones(K, device=dev), randn(K, D, seed=15, device=dev), randn(K, D, seed=16, device=dev)]

        counts = torch.arange(2 * K, dtype=torch.float32, device=dev)[::2]  # strided statistics are fine
        sums = randn(D, K, seed=17, device=dev).t()
        a, c = fresh(), fresh()
        vqkernels.ema_update_(*a, counts, sums, 0.9, backend=b)
        vqkernels.ema_update_(*c, counts.contiguous(), sums.contiguous(), 0.9, backend=b)
        for u, v in zip(a, c):
            assert bitwise_equal(u, v) and torch.isfinite(u).all()


def _kmeans_edges(b, dev):
    x = randn(20, 3, seed=18, device=dev)
    one = vqkernels.kmeans(x, 1, iters=3, seed=0, backend=b)
    assert one.indices.tolist() == [0] * 20
    torch.testing.assert_close(one.centroids.cpu(), x.cpu().mean(0, keepdim=True), rtol=1e-5, atol=1e-5)
    strided = randn(3, 40, seed=19, device=dev).t()[::2]  # [20, 3], not contiguous
    got = vqkernels.kmeans(strided, 4, iters=3, seed=0, deterministic=True, backend=b)
    want = vqkernels.kmeans(strided.contiguous(), 4, iters=3, seed=0, deterministic=True, backend=b)
    assert bitwise_equal(got.centroids, want.centroids) and torch.equal(got.indices, want.indices)
    d1 = vqkernels.kmeans(randn(16, 1, seed=20, device=dev), 3, iters=2, seed=0, backend=b)  # D = 1
    assert d1.centroids.shape == (3, 1)


def _quantizer_empty_batch(b, dev):
    for kw in (dict(), dict(learning="gradient"), dict(dead_code_threshold=1.0), dict(deferred_steps=2, reservoir_size=8)):
        vq = Quantizer(3, 4, backend=b, **kw).to(dev)
        for shape in ((0, 3), (2, 0, 3)):
            x = torch.zeros(*shape, device=dev)
            q, idx, loss = vq(x, mask=torch.ones(shape[:-1], dtype=torch.bool, device=dev))
            assert q.shape == x.shape and idx.shape == shape[:-1] and float(loss) == 0.0, kw
        for name, t in vq.state_dict().items():
            if t.is_floating_point():
                assert torch.isfinite(t).all(), (kw, name)
        vq.eval()
        assert vq(torch.zeros(0, 3, device=dev)).indices.shape == (0,)
        assert vq.decode(torch.zeros(0, dtype=torch.int64, device=dev)).shape == (0, 3)


def _quantizer_k1(b, dev):
    for kw in (dict(init="kmeans"), dict(init="random", dead_code_threshold=0.5), dict(learning="gradient")):
        vq = Quantizer(3, 1, backend=b, **kw).to(dev)
        x = randn(10, 3, seed=21, device=dev)
        vq(x)  # initialises
        before = vq.codebook.detach().clone()
        q, idx, loss = vq(x)
        assert idx.tolist() == [0] * 10 and torch.isfinite(loss), kw
        assert torch.equal(q, before.expand(10, 3)), kw


def _quantizer_d1(b, dev):
    vq = Quantizer(1, 5, init="kmeans", kmeans_iters=2, backend=b).to(dev)
    x = randn(2, 10, 1, seed=22, device=dev)
    for _ in range(2):
        q, idx, loss = vq(x)
    vq.eval()
    q, idx, _ = vq(x)
    z = x.reshape(-1, 1)
    cb = vq.codebook.detach()
    exact = exact_distances(z.double().cpu(), cb.double().cpu(), "l2").gather(1, idx.reshape(-1, 1).cpu()).squeeze(1)
    check_assign(z, cb, "l2", idx.reshape(-1), exact.float())
    assert torch.equal(vq.decode(idx), q)


def _quantizer_strided(b, dev):
    torch.manual_seed(0)
    vq = Quantizer(4, 6, init="random", dead_code_threshold=0.5, backend=b).to(dev)
    twin = copy.deepcopy(vq)
    base = randn(3, 10, 9, seed=23, device=dev)
    x = base[:, ::2, 1:9:2]  # [3, 5, 4], not contiguous
    mask = (torch.rand(5, 3, generator=gen(24)) > 0.3).to(dev).t()  # [3, 5], transposed
    assert not x.is_contiguous() and not mask.is_contiguous()
    torch.manual_seed(1)
    got = vq(x, mask=mask)
    torch.manual_seed(1)
    want = twin(x.contiguous(), mask=mask.contiguous())
    for g, w in zip(got, want):
        assert bitwise_equal(g, w)
    assert_states_bitwise_equal(snapshot(vq), snapshot(twin), "strided vs contiguous")
    vq.eval()
    idx = got.indices.t()  # a strided view of indices
    assert torch.equal(vq.decode(idx), vq.decode(idx.contiguous()))
    # channel-first input stored channels-last, i.e. strided along the channel dimension
    cf = Quantizer(4, 6, channel_last=False, backend=b).to(dev)
    img = randn(2, 4, 3, 5, seed=25, device=dev).to(memory_format=torch.channels_last)
    cf.eval()
    assert torch.equal(cf(img).indices, cf(img.contiguous()).indices)


def _diagnostics_edges(b, dev):
    empty = torch.zeros(0, dtype=torch.int64, device=dev)
    u = dg.usage(empty, 4)
    assert u.total == 0 and u.used_codes == 0 and u.perplexity == 0.0 and u.dead_codes == 4
    assert dg.usage(torch.zeros(7, dtype=torch.int64, device=dev), 1).perplexity == 1.0  # K = 1
    monitor = dg.CodebookMonitor(4)
    monitor.update(empty)
    monitor.update(torch.tensor([[0, 1], [1, -1]], device=dev).t())  # strided indices
    assert monitor.usage().total == 3 and monitor.usage().used_codes == 2
    cb = randn(5, 3, seed=26, device=dev)
    cov = dg.coverage(torch.zeros(0, 3, device=dev), cb, backend=b)
    assert math.isnan(cov.embedding_to_code) and math.isnan(cov.code_to_embedding)
    e = randn(3, 20, seed=27, device=dev).t()  # strided embeddings
    assert dg.coverage(e, cb, backend=b) == dg.coverage(e.contiguous(), cb, backend=b)
    assert dg.coverage(e[:, :1], cb[:, :1], backend=b).embedding_to_code >= 0  # D = 1
    out = dg.report(torch.zeros(0, 3, device=dev), cb, print_table=False, backend=b)  # empty N: NaN, not a crash
    assert out["total"] == 0 and math.isnan(out["embedding_to_code"])
    assert dg.effective_rank(torch.zeros(0, 3)) == 0.0


WORKS = [
    ("assign: empty N (also [2, 0, D], heads)", _assign_empty_n),
    ("assign: K = 1 and D = 1, every metric", _assign_k1_d1),
    ("assign: strided, transposed, expanded (stride 0) x and codebook", _assign_strided_and_expanded),
    ("histogram: empty N, K = 1, strided indices and weights", _histogram_edges),
    ("cluster_stats: empty N, K = 1, D = 1, strided / expanded x and indices", _cluster_stats_edges),
    ("ema_update_: K = 1, D = 1, strided counts and sums", _ema_update_edges),
    ("kmeans: K = 1, D = 1, strided x", _kmeans_edges),
    ("Quantizer: empty batch (ema, gradient, dead codes, deferred; train and eval)", _quantizer_empty_batch),
    ("Quantizer: K = 1 (kmeans / random init, dead codes, gradient)", _quantizer_k1),
    ("Quantizer: D = 1", _quantizer_d1),
    ("Quantizer: strided x and mask, channels-last images, strided decode", _quantizer_strided),
    ("diagnostics: empty N, K = 1, D = 1, strided inputs", _diagnostics_edges),
]


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("case", [pytest.param(fn, id=label) for label, fn in WORKS])
def test_documented_edge_inputs_work(case, backend, device):
    case(backend, device)


@pytest.mark.parametrize("backend,device", ALL)
def test_float64_runs_where_supported_and_is_refused_with_the_reason_elsewhere(backend, device):
    x, cb = randn(6, 3, seed=30, dtype=torch.float64, device=device), randn(4, 3, seed=31, dtype=torch.float64, device=device)
    if torch.float64 in dtypes_for(backend, device):
        idx, dist = vqkernels.assign(x, cb, backend=backend)
        assert dist.dtype == torch.float64
        check_assign(x, cb, "l2", idx, dist)
        return
    with pytest.raises(vqkernels.BackendUnavailableError, match=rf"'{backend}'.*float64.*supports float16, bfloat16, float32"):
        vqkernels.assign(x, cb, backend=backend)
