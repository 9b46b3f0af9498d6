"""Reliability (issue 8): input that must work, the non-finite policy, determinism,
resumption in a fresh process, near-tie numerics per backend and dtype, the CLI's bad
arguments.

The table of inputs that must *raise* is in test_errors.py; here are the inputs that must
*work* as documented (empty N, K = 1, D = 1, strided / non-contiguous / expanded views) and
the policies. Backend-parametrised tests run over conftest.backend_cases(); on CPU the
Triton backend runs in its interpreter, so its shapes stay tiny.
"""
import copy
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import vqkernels
from conftest import HAS_CUDA, backend_cases, dtypes_for, interpreted
from helpers import check_assign, first_mismatches
from vqkernels import Quantizer
from vqkernels import diagnostics as dg
from vqkernels.ops.assign import ARGMIN_RTOL, tolerance
from vqkernels.ops.assign import reference as assign_reference

ALL = backend_cases()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, device="cpu", dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype).to(device)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (torch.equal would call -0.0 == 0.0 and fail on NaN == NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
    return torch.equal(a, b)


def assert_states_bitwise_equal(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), f"{what}: keys differ: {set(a) ^ set(b)}"
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert bitwise_equal(a[k], b[k]), f"{what}: {k} differs: " + first_mismatches(a[k] != b[k], a[k], b[k])
        else:
            assert a[k] == b[k], f"{what}: {k} differs: {a[k]!r} != {b[k]!r}"


def snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# =========================================================================== must work
# Each case gets (backend, device) and asserts what the documentation promises.


def _assign_empty_n(b, dev):
    cb = _randn(5, 3, seed=1, device=dev)
    for lead in ((0,), (2, 0), (0, 4)):
        idx, dist = vqkernels.assign(torch.zeros(*lead, 3, device=dev), cb, backend=b)
        assert idx.shape == lead and dist.shape == lead and idx.dtype == torch.int64 and dist.dtype == torch.float32
    heads = vqkernels.assign(torch.zeros(2, 0, 3, device=dev), _randn(2, 5, 3, seed=2, device=dev), backend=b)
    assert heads.indices.shape == (2, 0)


def _assign_k1_d1(b, dev):
    x = _randn(9, 1, seed=3, device=dev)
    for K in (1, 4):
        cb = _randn(K, 1, seed=4 + K, device=dev)
        for metric in ("l2", "cosine", "dot"):
            idx, dist = vqkernels.assign(x, cb, metric, backend=b)
            if K == 1:
                assert idx.tolist() == [0] * 9
            if metric == "cosine" and K > 1:
                # D = 1 cosine: every same-sign code ties exactly; the lowest-index rule for
                # exact ties is test_assign_property's job, here the pick must be nearest
                d = assign_reference.distance_matrix(x.double().cpu(), cb.double().cpu(), metric)
                chosen = d.gather(1, idx.cpu().view(-1, 1)).squeeze(1)
                assert bool((chosen <= d.min(1).values + tolerance(x.cpu(), cb.cpu(), metric)).all())
            else:
                check_assign(x, cb, metric, idx, dist)


def _assign_strided_and_expanded(b, dev):
    base = _randn(30, 14, seed=5, device=dev)
    cb_t = _randn(7, 11, seed=6, device=dev).t()  # [11, 7] transposed view
    views = {
        "row and column steps": base[::3, 1::2],  # [10, 7]
        "transposed": _randn(7, 10, seed=7, device=dev).t(),
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
    heads = _randn(5, 2, 7, seed=8, device=dev).permute(1, 0, 2)  # [2, 5, 7]
    xh = _randn(7, 2, 4, seed=9, device=dev).permute(1, 2, 0)  # [2, 4, 7]
    got = vqkernels.assign(xh, heads, backend=b)
    want = vqkernels.assign(xh.contiguous(), heads.contiguous(), backend=b)
    assert bitwise_equal(got.indices, want.indices)


def _histogram_edges(b, dev):
    assert vqkernels.histogram(torch.zeros(0, dtype=torch.int64, device=dev), 3, backend=b).tolist() == [0, 0, 0]
    empty_w = vqkernels.histogram(torch.zeros(0, dtype=torch.int64, device=dev), 2, torch.zeros(0, device=dev), backend=b)
    assert empty_w.dtype == torch.float32 and empty_w.tolist() == [0.0, 0.0]
    assert vqkernels.histogram(torch.zeros(5, dtype=torch.int64, device=dev), 1, backend=b).tolist() == [5]
    idx = torch.randint(-1, 6, (8, 9), generator=_gen(10)).to(dev)
    w = torch.rand(9, 8, generator=_gen(11)).to(dev).t()
    for i, ww in ((idx[:, ::2], w[:, ::2]), (idx.t(), w.t()), (idx[1::3], w[1::3])):
        assert not i.is_contiguous()
        assert torch.equal(vqkernels.histogram(i, 6, backend=b), vqkernels.histogram(i.contiguous(), 6, backend=b))
        assert torch.equal(vqkernels.histogram(i, 6, ww, backend=b), vqkernels.histogram(i.contiguous(), 6, ww.contiguous(), backend=b))


def _cluster_stats_edges(b, dev):
    counts, sums = vqkernels.cluster_stats(torch.zeros(0, 4, device=dev), torch.zeros(0, dtype=torch.int64, device=dev), 3, backend=b)
    assert counts.tolist() == [0.0] * 3 and sums.shape == (3, 4) and not sums.any()
    x = _randn(12, 1, seed=12, device=dev)
    counts, sums = vqkernels.cluster_stats(x, torch.zeros(12, dtype=torch.int64, device=dev), 1, backend=b)  # K = 1, D = 1
    assert counts.tolist() == [12.0]
    torch.testing.assert_close(sums.cpu(), x.cpu().sum(0, keepdim=True), rtol=1e-6, atol=1e-6)
    base = _randn(10, 20, seed=13, device=dev)
    idx = torch.randint(-1, 5, (40,), generator=_gen(14)).to(dev)
    for xs, ii in ((base.t(), idx[::2]), (base[::2, ::3].t(), idx[1:15:2]), (base[:, 0].expand(20, 10), idx[:20])):
        assert not xs.is_contiguous()
        for deterministic in (False, True):
            got = vqkernels.cluster_stats(xs, ii, 5, deterministic=deterministic, backend=b)
            want = vqkernels.cluster_stats(xs.contiguous(), ii.contiguous(), 5, deterministic=deterministic, backend=b)
            assert bitwise_equal(got.counts, want.counts) and bitwise_equal(got.sums, want.sums)


def _ema_update_edges(b, dev):
    for K, D in ((1, 1), (5, 3)):
        def fresh():
            return [torch.ones(K, device=dev), _randn(K, D, seed=15, device=dev), _randn(K, D, seed=16, device=dev)]

        counts = torch.arange(2 * K, dtype=torch.float32, device=dev)[::2]  # strided statistics are fine
        sums = _randn(D, K, seed=17, device=dev).t()
        a, c = fresh(), fresh()
        vqkernels.ema_update_(*a, counts, sums, 0.9, backend=b)
        vqkernels.ema_update_(*c, counts.contiguous(), sums.contiguous(), 0.9, backend=b)
        for u, v in zip(a, c):
            assert bitwise_equal(u, v) and torch.isfinite(u).all()


def _kmeans_edges(b, dev):
    x = _randn(20, 3, seed=18, device=dev)
    one = vqkernels.kmeans(x, 1, iters=3, seed=0, backend=b)
    assert one.indices.tolist() == [0] * 20
    torch.testing.assert_close(one.centroids.cpu(), x.cpu().mean(0, keepdim=True), rtol=1e-5, atol=1e-5)
    strided = _randn(3, 40, seed=19, device=dev).t()[::2]  # [20, 3], not contiguous
    got = vqkernels.kmeans(strided, 4, iters=3, seed=0, deterministic=True, backend=b)
    want = vqkernels.kmeans(strided.contiguous(), 4, iters=3, seed=0, deterministic=True, backend=b)
    assert bitwise_equal(got.centroids, want.centroids) and torch.equal(got.indices, want.indices)
    d1 = vqkernels.kmeans(_randn(16, 1, seed=20, device=dev), 3, iters=2, seed=0, backend=b)  # D = 1
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
        x = _randn(10, 3, seed=21, device=dev)
        vq(x)  # initialises
        before = vq.codebook.detach().clone()
        q, idx, loss = vq(x)
        assert idx.tolist() == [0] * 10 and torch.isfinite(loss), kw
        assert torch.equal(q, before.expand(10, 3)), kw


def _quantizer_d1(b, dev):
    vq = Quantizer(1, 5, init="kmeans", kmeans_iters=2, backend=b).to(dev)
    x = _randn(2, 10, 1, seed=22, device=dev)
    for _ in range(2):
        q, idx, loss = vq(x)
    vq.eval()
    q, idx, _ = vq(x)
    z = x.reshape(-1, 1)
    cb = vq.codebook.detach()
    exact = assign_reference.distance_matrix(z.double().cpu(), cb.double().cpu(), "l2").gather(1, idx.reshape(-1, 1).cpu()).squeeze(1)
    check_assign(z, cb, "l2", idx.reshape(-1), exact.float())
    assert torch.equal(vq.decode(idx), q)


def _quantizer_strided(b, dev):
    torch.manual_seed(0)
    vq = Quantizer(4, 6, init="random", dead_code_threshold=0.5, backend=b).to(dev)
    twin = copy.deepcopy(vq)
    base = _randn(3, 10, 9, seed=23, device=dev)
    x = base[:, ::2, 1:9:2]  # [3, 5, 4], not contiguous
    mask = (torch.rand(5, 3, generator=_gen(24)) > 0.3).to(dev).t()  # [3, 5], transposed
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
    img = _randn(2, 4, 3, 5, seed=25, device=dev).to(memory_format=torch.channels_last)
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
    cb = _randn(5, 3, seed=26, device=dev)
    cov = dg.coverage(torch.zeros(0, 3, device=dev), cb, backend=b)
    assert math.isnan(cov.embedding_to_code) and math.isnan(cov.code_to_embedding)
    e = _randn(3, 20, seed=27, device=dev).t()  # strided embeddings
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
    x, cb = _randn(6, 3, seed=30, dtype=torch.float64, device=device), _randn(4, 3, seed=31, dtype=torch.float64, device=device)
    if torch.float64 in dtypes_for(backend, device):
        idx, dist = vqkernels.assign(x, cb, backend=backend)
        assert dist.dtype == torch.float64
        check_assign(x, cb, "l2", idx, dist)
        return
    with pytest.raises(vqkernels.BackendUnavailableError, match=rf"'{backend}'.*float64.*supports float16, bfloat16, float32"):
        vqkernels.assign(x, cb, backend=backend)


# =========================================================================== non-finite policy
QUANTIZER_CONFIGS = {
    "ema": dict(init="kmeans", kmeans_iters=2),
    "ema-dead-codes": dict(init="random", dead_code_threshold=5.0),
    "gradient": dict(learning="gradient", gradient="rotation"),
    "deferred-continuous": dict(deferred_steps=5, reservoir_size=32),
    "not-yet-initialised": dict(init="kmeans"),  # the bad batch is the first: k-means must not see it
}


@pytest.mark.parametrize("config", list(QUANTIZER_CONFIGS))
def test_training_rejects_a_nonfinite_batch_before_touching_state(config):
    torch.manual_seed(0)
    vq = Quantizer(4, 8, **QUANTIZER_CONFIGS[config])
    good = _randn(24, 4, seed=32)
    if config != "not-yet-initialised":
        vq(good)
    before, rng = snapshot(vq), torch.get_rng_state()
    bad = good.clone()
    bad[5, 1] = float("nan")
    bad[9] = float("inf")
    with pytest.raises(ValueError, match=r"x contains NaN or Inf \(rows \[5, 9\]\)"):
        vq(bad)
    assert_states_bitwise_equal(before, snapshot(vq), f"{config}: state after a rejected batch")
    assert torch.equal(rng, torch.get_rng_state()), "a rejected batch must not consume random numbers"
    # masked non-finite rows are allowed: they are not used, and come out unchanged
    keep = torch.isfinite(bad).all(1)
    q, idx, loss = vq(bad, mask=keep)
    assert bool((idx[~keep] == -1).all()) and bitwise_equal(q[~keep], bad[~keep])
    for name, t in vq.state_dict().items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{config}: {name} poisoned by a masked NaN row"
    vq(good)  # and training carries on


@pytest.mark.parametrize("config", ["ema", "gradient"])
def test_masked_nonfinite_rows_stay_out_of_the_loss(config):
    torch.manual_seed(0)
    vq = Quantizer(4, 8, **QUANTIZER_CONFIGS[config])
    x = _randn(24, 4, seed=32)
    vq(x)
    x[5, 1] = float("nan")
    keep = torch.ones(24, dtype=torch.bool)
    keep[5] = False
    _, _, loss = vq(x, mask=keep, return_loss_breakdown=False)
    assert torch.isfinite(loss), f"loss {float(loss)} from a masked NaN row"


@pytest.mark.parametrize("batch", ["empty", "fully-masked"])
def test_a_batch_without_kept_rows_never_poisons_the_codebook_even_with_decay_0(batch):
    torch.manual_seed(0)
    vq = Quantizer(4, 6, decay=0.0)
    vq(_randn(12, 4, seed=37))
    if batch == "empty":
        vq(torch.zeros(0, 4))
    else:
        vq(_randn(12, 4, seed=38), mask=torch.zeros(12, dtype=torch.bool))
    assert torch.isfinite(vq.codebook).all(), f"codebook after an {batch} batch: {vq.codebook}"


@pytest.mark.parametrize("backend,device", ALL)
def test_nonfinite_rows_in_eval_and_unchecked_training_get_minus_one(backend, device):
    torch.manual_seed(0)
    vq = Quantizer(4, 6, backend=backend).to(device)
    x = _randn(10, 4, seed=33, device=device)
    x[2, 0] = float("nan")
    x[7, 3] = float("-inf")
    vq.eval()  # eval never raises: non-finite rows follow assign's policy and pass through
    before = snapshot(vq)
    q, idx, loss = vq(x)
    assert idx[[2, 7]].tolist() == [-1, -1] and bool((idx[[0, 1, 3, 4, 5, 6, 8, 9]] >= 0).all())
    assert bitwise_equal(q[[2, 7]], x[[2, 7]]) and float(loss) == 0.0
    assert_states_bitwise_equal(before, snapshot(vq), "eval")
    unchecked = Quantizer(4, 6, check_finite=False, backend=backend).to(device)
    q, idx, _ = unchecked(x)
    assert idx[[2, 7]].tolist() == [-1, -1]
    for name, t in unchecked.state_dict().items():  # -1 rows stay out of the EMA statistics
        if t.is_floating_point():
            assert torch.isfinite(t).all(), name


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("learning", ["ema", "gradient"])
def test_a_codebook_that_became_nonfinite_is_reported_with_its_codes(backend, device, learning):
    torch.manual_seed(0)
    vq = Quantizer(4, 8, learning=learning, backend=backend).to(device)
    x = _randn(16, 4, seed=34, device=device)
    vq(x)
    with torch.no_grad():  # e.g. an fp16 overflow or a diverged optimiser step
        vq.embed[2, 1] = float("nan")
        vq.embed[5] = float("inf")
    before = snapshot(vq)
    with pytest.raises(ValueError, match=r"codebook contains NaN or Inf \(rows \[2, 5\]\)"):
        vq(x)
    assert_states_bitwise_equal(before, snapshot(vq), "state after the codebook check failed")
    with pytest.raises(ValueError, match=r"codebook contains NaN or Inf \(rows \[2, 5\]\)"):
        dg.coverage(x, vq.codebook.detach(), backend=backend)
    with pytest.raises(ValueError, match=r"codebook contains NaN or Inf \(rows \[2, 5\]\)"):
        vqkernels.assign(x, vq.codebook.detach(), backend=backend)


# =========================================================================== determinism
@pytest.fixture
def deterministic_algorithms(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it under deterministic algorithms
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


TRAINING_CONFIGS = {
    "ema-kmeans-dead-codes": dict(init="kmeans", kmeans_iters=2, dead_code_threshold=1.0),
    "deferred": dict(deferred_steps=2, reservoir_size=48, dead_code_threshold=1.0),
    "gradient-rotation": dict(learning="gradient", gradient="rotation", init="random"),
}


def _training_run(backend, device, config, steps=5):
    """A small tokenizer step loop: encoder -> Quantizer -> decoder, masks, Adam."""
    torch.manual_seed(0)
    small = interpreted(backend, device)
    rows, K = (24, 6) if small else (64, 12)
    encoder, decoder = torch.nn.Linear(6, 4).to(device), torch.nn.Linear(4, 6).to(device)
    vq = Quantizer(4, K, deterministic=True, decay=0.8, backend=backend, **TRAINING_CONFIGS[config]).to(device)
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters(), *vq.parameters()], lr=1e-2)
    record = []
    for step in range(steps):
        g = _gen(100 + step)
        x = torch.randn(rows, 6, generator=g).to(device)
        mask = (torch.rand(rows, generator=g) > 0.2).to(device)
        z = encoder(x)
        q, idx, loss = vq(z, mask=mask)
        total = F.mse_loss(decoder(q), x) + loss
        opt.zero_grad()
        total.backward()
        opt.step()
        record += [idx.clone(), loss.detach().clone(), q.detach().clone()]
    state = {f"vq.{k}": v for k, v in snapshot(vq).items()}
    state.update({f"encoder.{k}": v.clone() for k, v in encoder.state_dict().items()})
    return record, state


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("config", list(TRAINING_CONFIGS))
def test_training_run_is_bitwise_reproducible(backend, device, config, deterministic_algorithms):
    if interpreted(backend, device) and config != "ema-kmeans-dead-codes":
        pytest.skip("the Triton interpreter is slow; one configuration covers its kernels")
    first, state1 = _training_run(backend, device, config)
    second, state2 = _training_run(backend, device, config)
    for i, (a, b) in enumerate(zip(first, second)):
        assert bitwise_equal(a, b), f"step {i // 3}, output {i % 3} differs between runs"
    assert_states_bitwise_equal(state1, state2, "final state")


@pytest.mark.parametrize("backend,device", [c for c in ALL if c.values[0] in ("reference", "chunked")])
def test_deterministic_statistics_do_not_depend_on_the_thread_count(backend, device):
    """deterministic=True sums each code's rows in input order, whatever the parallelism."""
    x = _randn(5000, 16, seed=35, device=device)
    idx = torch.randint(-1, 5, (5000,), generator=_gen(36)).to(device)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(vqkernels.cluster_stats(x, idx, 5, deterministic=True, backend=backend))
            cs, ea, cb = torch.ones(5, device=device), torch.zeros(5, 16, device=device), torch.zeros(5, 16, device=device)
            vqkernels.ema_update_(cs, ea, cb, *results[-1], 0.9, backend=backend)
            results.append((cs, ea, cb))
    finally:
        torch.set_num_threads(threads)
    half = len(results) // 2
    for a, b in zip(results[:half], results[half:]):
        for u, v in zip(a, b):
            assert bitwise_equal(u, v)


# =========================================================================== resumption
RESUME_SCRIPT = textwrap.dedent(
    '''
    """Train, checkpoint, resume: `python resume.py MODE CHECKPOINT OUT`.

    MODE "first": the uninterrupted run of every configuration, then, from scratch again,
    the run up to its checkpoint (written atomically). MODE "resume": a fresh process that
    waits for the checkpoint, loads it and trains on to the end.
    """
    import os
    import sys
    import time

    import torch
    import torch.nn.functional as F

    from vqkernels import Quantizer

    # (not under torch.use_deterministic_algorithms: on CPU it changes nothing here, and it
    # imports torch._inductor, seconds per interpreter)
    MODE, CKPT, OUT = sys.argv[1:4]
    STEPS = 7
    CONFIGS = {  # name: (Quantizer options, step after which the checkpoint is taken)
        "ema": (dict(init="kmeans", kmeans_iters=3, dead_code_threshold=1.0), 3),
        "deferred-mid-continuous": (dict(deferred_steps=4, reservoir_size=40, dead_code_threshold=1.0), 2),
        "deferred-after-switch": (dict(deferred_steps=2, reservoir_size=40, dead_code_threshold=1.0), 4),
        "gradient": (dict(learning="gradient", gradient="rotation", init="random"), 3),
    }


    def build(options):
        torch.manual_seed(7)
        encoder, decoder = torch.nn.Linear(6, 4), torch.nn.Linear(4, 6)
        vq = Quantizer(4, 10, decay=0.8, deterministic=True, **options)
        opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters(), *vq.parameters()], lr=1e-2)
        return encoder, decoder, vq, opt


    def train(parts, start, stop):
        encoder, decoder, vq, opt = parts
        outs = []
        for i in range(start, stop):
            g = torch.Generator().manual_seed(1000 + i)  # the data does not use the global RNG
            x = torch.randn(48, 6, generator=g)
            mask = torch.rand(48, generator=g) > 0.2
            z = encoder(x)
            q, idx, loss = vq(z, mask=mask)
            total = F.mse_loss(decoder(q), x) + loss
            opt.zero_grad()
            total.backward()
            opt.step()
            outs += [idx, loss.detach(), q.detach()]
        return outs


    def state(parts):
        encoder, decoder, vq, opt = parts
        return {"encoder": encoder.state_dict(), "decoder": decoder.state_dict(), "vq": vq.state_dict(),
                "opt": opt.state_dict(), "rng": torch.get_rng_state()}


    results = {}
    if MODE == "first":
        checkpoints = {}
        for name, (options, save_at) in CONFIGS.items():
            parts = build(options)
            results[name] = {"outs": train(parts, 0, STEPS), "final": state(parts)}
            parts = build(options)
            results[name]["first"] = train(parts, 0, save_at)
            checkpoints[name] = state(parts)
        torch.save(checkpoints, CKPT + ".part")
        os.replace(CKPT + ".part", CKPT)
    else:
        deadline = time.time() + 300
        while not os.path.exists(CKPT):
            if time.time() > deadline:
                sys.exit("no checkpoint after 300 s")
            time.sleep(0.05)
        checkpoints = torch.load(CKPT, weights_only=True)
        for name, (options, save_at) in CONFIGS.items():
            parts = build(options)
            ckpt = checkpoints[name]
            for module, key in zip(parts[:3], ("encoder", "decoder", "vq")):
                module.load_state_dict(ckpt[key], strict=True)
            parts[3].load_state_dict(ckpt["opt"])
            torch.set_rng_state(ckpt["rng"])  # reservoir, random init and dead-code restarts draw from it
            results[name] = {"outs": train(parts, save_at, STEPS), "final": state(parts)}
    torch.save(results, OUT)
    '''
)


def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path):
    """Checkpoint (state_dicts + the global RNG state) -> a new interpreter -> train on: bitwise the
    uninterrupted run, for EMA + k-means init + dead codes, gradient learning, and Deferred
    Quantization saved mid-continuous-phase (reservoir filling) and after the switch."""
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    ckpt = tmp_path / "checkpoint.pt"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def start(mode):
        return subprocess.Popen(
            [sys.executable, str(script), mode, str(ckpt), str(tmp_path / f"{mode}.pt")],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    # Both interpreters start at once (importing torch is most of the time); "resume" waits
    # for the checkpoint, so nothing but the checkpoint carries state from one to the other.
    procs = {mode: start(mode) for mode in ("first", "resume")}
    for mode, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, f"{mode} run failed:\n{out}"
    first = torch.load(tmp_path / "first.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resume.pt", weights_only=True)
    for name in first:
        full = first[name]["outs"]
        joined = first[name]["first"] + resumed[name]["outs"]
        assert len(joined) == len(full)
        for i, (a, b) in enumerate(zip(joined, full)):
            assert bitwise_equal(a, b), f"{name}: step {i // 3}, output {i % 3} differs from the uninterrupted run"
        want, got = first[name]["final"], resumed[name]["final"]
        for part in ("encoder", "decoder", "vq"):
            assert_states_bitwise_equal(got[part], want[part], f"{name}: final {part}")
        assert bitwise_equal(got["rng"], want["rng"]), f"{name}: the global RNG stream diverged"
    checkpoints = torch.load(ckpt, weights_only=True)
    mid = checkpoints["deferred-mid-continuous"]["vq"]
    assert not bool(mid["quantizing"]) and int(mid["reservoir_seen"]) > 0, "saved before the switch, reservoir filling"
    assert bool(checkpoints["deferred-after-switch"]["vq"]["quantizing"])


# =========================================================================== near-tie numerics
# Rows whose two nearest codes differ by a known multiple of the dtype tolerance
# (vqkernels.ops.assign.tolerance: ARGMIN_RTOL[dtype] * (|x|^2 + max|c|^2); 4 * rtol for cosine).
# Within the tolerance any pick is correct; a few tolerances apart, the nearer one is required.
# The nearer code always has the HIGHER index, so a "lowest index wins" shortcut fails.
GAPS = (0.25, 0.6, 3.0, 6.0)  # in units of the tolerance: two near-ties, two clear cases


def _tie_problem(metric, dtype, scale):
    R = len(GAPS)
    rtol = ARGMIN_RTOL[torch.float64 if dtype == torch.float64 else torch.float32]
    f64 = torch.float64
    if metric == "l2":
        # row n: x = (0, 16 n, 64, 64); codes x + r e0 (nearer) and x - (r + delta) e0 (farther);
        # the gap is 2 r delta + delta^2, and the rows sit 16 apart, far beyond both codes
        S, r = 64.0, 1.0
        x = torch.tensor([[0.0, S / 4 * n, S, S] for n in range(R)], dtype=f64)
        scale2 = x.pow(2).sum(1) + (x.pow(2).sum(1).max() + r * r)
        far, near = [], []
        for n, gap in enumerate(GAPS):
            delta = -r + math.sqrt(r * r + gap * rtol * float(scale2[n]))
            far.append(x[n] + torch.tensor([-(r + delta), 0, 0, 0], dtype=f64))
            near.append(x[n] + torch.tensor([r, 0, 0, 0], dtype=f64))
        filler = torch.tensor([[0.0, -S, -S, -S]], dtype=f64)
    elif metric == "cosine":
        # row n in the plane (e_2n, e_2n+1): x = e_2n, codes e_2n + alpha e_2n+1 (nearer) and
        # e_2n - (alpha + delta) e_2n+1 (farther); the gap is about alpha * delta
        D, alpha = 2 * R, 2.0**-5
        x = torch.zeros(R, D, dtype=f64)
        far, near = [], []
        for n, gap in enumerate(GAPS):
            x[n, 2 * n] = 1.0
            target = 1 / math.sqrt(1 + alpha**2) - gap * 4 * rtol  # cos of the farther code
            beta = math.sqrt(1 / target**2 - 1)
            c = torch.zeros(D, dtype=f64)
            c[2 * n] = 1.0
            near.append(c.clone().index_fill_(0, torch.tensor([2 * n + 1]), alpha))
            far.append(c.clone().index_fill_(0, torch.tensor([2 * n + 1]), -beta))
        filler = -torch.ones(1, D, dtype=f64)
    else:  # dot: x = e_n; codes t e_n + Y e_last (farther) and (t + delta) e_n + Y e_last (nearer)
        D, t, Y = R + 1, 1.0, 64.0
        x = torch.zeros(R, D, dtype=f64)
        far, near = [], []
        for n, gap in enumerate(GAPS):
            x[n, n] = 1.0
            delta = gap * rtol * (1 + (t + 1) ** 2 + Y**2)
            c = torch.zeros(D, dtype=f64)
            c[-1] = Y
            far.append(c.clone().index_fill_(0, torch.tensor([n]), t))
            near.append(c.clone().index_fill_(0, torch.tensor([n]), t + delta))
        filler = torch.zeros(1, D, dtype=f64)
    codebook = torch.cat([filler, torch.stack([v for pair in zip(far, near) for v in pair])])
    pairs = torch.tensor([[1 + 2 * n, 2 + 2 * n] for n in range(R)])  # (farther, nearer) per row
    # powers of two scale every coordinate exactly, so the classes below hold at any scale
    return (x * scale).to(dtype), (codebook * scale).to(dtype), pairs


def _classify(x, codebook, metric, pairs):
    """Check the construction after the cast: per row, the exact gap in units of the tolerance."""
    d = assign_reference.distance_matrix(x.double(), codebook.double(), metric)
    tol = tolerance(x, codebook, metric)
    far, near = d.gather(1, pairs[:, :1]).squeeze(1), d.gather(1, pairs[:, 1:]).squeeze(1)
    others = d.scatter(1, pairs, float("inf")).min(1).values
    assert bool((others > far + 2 * tol).all()), "a third code competes: the construction is broken"
    return ((far - near) / tol).tolist()


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_near_ties_pick_within_tolerance_and_clear_cases_pick_the_nearer(backend, device, metric):
    scales = [1.0, 2.0**8]
    for dtype in dtypes_for(backend, device):
        for scale in scales + ([2.0**20] if dtype in (torch.float32, torch.float64) else []):  # large norms
            x, cb, pairs = _tie_problem(metric, dtype, scale)
            gaps = _classify(x, cb, metric, pairs)
            for want, got in zip(GAPS, gaps):  # the cast kept every row in its class
                assert (got < 1.0) if want < 1 else (got > 2.0), f"{dtype}, scale {scale}: gaps {gaps}"
            idx, dist = vqkernels.assign(x.to(device), cb.to(device), metric, backend=backend)
            idx = idx.cpu()
            where = f"{backend}, {dtype}, scale {scale}, gaps {[round(g, 2) for g in gaps]}"
            for n, want in enumerate(GAPS):
                if want < 1:
                    assert idx[n] in pairs[n].tolist(), f"{where}: row {n} picked {int(idx[n])}"
                else:
                    assert idx[n] == pairs[n, 1], f"{where}: row {n} picked {int(idx[n])}, not the nearer {int(pairs[n, 1])}"
            check_assign(x, cb, metric, idx, dist)


# =========================================================================== CLI bad arguments
CLI_CASES = [
    # (argv, words that stderr must contain); every case exits with status 2, before any work
    ([], ["required", "command"]),
    (["frobnicate"], ["invalid choice", "frobnicate"]),
    (["info", "--verbose"], ["unrecognized arguments", "--verbose"]),
    (["demo", "--steps", "ten"], ["--steps", "invalid int value", "ten"]),
    (["demo", "--steps", "1", "--no-plot", "--no-progress"], ["--steps must be >= 2, got 1"]),
    (["demo", "--codebook-size", "1", "--no-plot", "--no-progress"], ["--codebook-size must be >= 2, got 1"]),
    (["demo", "--quick", "--codebook-size", "100000", "--no-plot", "--no-progress"], ["--codebook-size 100000", "too large"]),
    (["demo", "--device", "tpu"], ["--device", "invalid choice", "tpu"]),
    (["bench", "--ops", "matmul"], ["--ops", "unknown op 'matmul'"]),
    (["bench", "--ops", ","], ["--ops", "empty"]),
    (["bench", "--quick", "--smoke"], ["--smoke", "not allowed with argument --quick"]),
    (["bench", "--memory", "lots"], ["--memory", "invalid choice", "lots"]),
    (["bench", "--repeats", "many"], ["--repeats", "invalid int value", "many"]),
]
if not HAS_CUDA:
    CLI_CASES += [
        (["demo", "--device", "cuda", "--no-plot"], ["--device cuda", "no CUDA device"]),
        (["bench", "--device", "cuda", "--smoke"], ["--device cuda", "no CUDA device"]),
    ]


@pytest.mark.parametrize("argv,words", CLI_CASES, ids=[" ".join(a) or "(none)" for a, _ in CLI_CASES])
def test_cli_bad_arguments_exit_2_naming_the_argument(argv, words, capsys):
    from vqkernels import cli

    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    for word in words:
        assert word in err, f"{word!r} missing from: {err}"


def test_cli_info_reports_a_bad_backend_variable_instead_of_crashing(monkeypatch, capsys):
    from vqkernels import cli

    monkeypatch.setenv("VQKERNELS_BACKEND", "fastest")
    code = cli.main(["info"])
    captured = capsys.readouterr()
    assert code == 2
    assert "backends" in captured.out, "the rest of the report is still printed"
    assert "VQKERNELS_BACKEND='fastest'" in captured.out + captured.err and "expected one of" in captured.out + captured.err


# =========================================================================== sizes on the GPU
# tests/test_sizes.py checks the chunked backend past 2**31 elements on the CPU; here every
# fast backend on a CUDA device (marker gpu: run by benchmarks/gpu_check.sh).
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
