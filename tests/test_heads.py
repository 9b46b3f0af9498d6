"""Quantizer(heads=H): against a per-head loop of single-head Quantizers (separate codebooks),
one Quantizer over the heads' rows (shared codebook), and vector-quantize-pytorch's
VectorQuantize(heads=H) objects; one assignment and one statistics call for all heads."""
import copy

import pytest
import torch

from vqkernels.ops import _dispatch
from vqkernels.quantizer import Quantizer

from helpers import first_mismatches, randn, run_gloo_ranks


def assert_close(actual, expected, name, atol=1e-5, rtol=1e-5):
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol)
    assert not bool(bad.any()), f"{name}: " + first_mismatches(bad, actual, expected)


def _single_like(ours: Quantizer, h: int, **kwargs) -> Quantizer:
    """A one-head Quantizer holding head ``h``'s codebook and statistics (separate codebooks)."""
    one = Quantizer(ours.codebook_dim, ours.codebook_size, **kwargs)
    with torch.no_grad():
        one.embed.copy_(ours.embed[h])
        one.cluster_size.copy_(ours.cluster_size[h])
        if ours.learning == "ema":
            one.embed_avg.copy_(ours.embed_avg[h])
    return one


def _masks(B, N, seed):
    return torch.rand(B, N, generator=torch.Generator().manual_seed(seed)) > 0.3


# ---------------------------------------------------------------- separate codebooks
@pytest.mark.parametrize("H", [1, 2, 8])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_separate_codebooks_match_a_loop_of_single_head_quantizers(H, masked, metric):
    D, K, B, N = 5, 7, 3, 11  # D not a power of two
    kw = dict(decay=0.9, metric=metric, deterministic=True, commitment_weight=0.5)
    torch.manual_seed(0)
    ours = Quantizer(H * D, K, codebook_dim=D, heads=H, separate_codebook_per_head=True, **kw)
    assert isinstance(ours.project_in, torch.nn.Identity), "dim == heads * codebook_dim splits without a projection"
    assert ours.codebook.shape == ((H, K, D) if H > 1 else (K, D))
    singles = [_single_like(ours, h, **kw) for h in range(H)] if H > 1 else [copy.deepcopy(ours)]
    for step in range(4):
        x = randn(B, N, H * D, seed=10 + step)
        mask = _masks(B, N, 20 + step) if masked else None
        q, idx, loss = ours(x, mask=mask)
        assert idx.shape == ((B, N, H) if H > 1 else (B, N)) and idx.dtype == torch.int64
        outs = [s(x[..., h * D : (h + 1) * D], mask=mask) for h, s in enumerate(singles)]
        want_idx = torch.stack([o.indices for o in outs], -1) if H > 1 else outs[0].indices
        assert torch.equal(idx, want_idx), f"step {step}: " + first_mismatches(idx != want_idx, idx, want_idx)
        assert_close(q, torch.cat([o.quantized for o in outs], -1), f"quantized, step {step}")
        assert_close(loss, torch.stack([o.loss for o in outs]).mean(), f"loss, step {step}")
        if masked:
            assert bool((idx[~mask] == -1).all()) and torch.equal(q[~mask], x[~mask])
    for h, s in enumerate(singles):
        mine = (lambda t: t[h]) if H > 1 else (lambda t: t)
        for name in ("embed", "embed_avg", "cluster_size"):
            assert_close(mine(getattr(ours, name)), getattr(s, name), f"head {h} {name}")


# ---------------------------------------------------------------- shared codebook
@pytest.mark.parametrize("H", [2, 8])
@pytest.mark.parametrize("masked", [False, True])
def test_shared_codebook_is_one_quantizer_over_the_heads_rows(H, masked):
    D, K, B, N = 3, 6, 2, 9
    kw = dict(decay=0.8, deterministic=True, dead_code_threshold=0.0)
    torch.manual_seed(1)
    ours = Quantizer(H * D, K, codebook_dim=D, heads=H, **kw)
    assert ours.codebook.shape == (K, D)
    one = copy.deepcopy(Quantizer(D, K, **kw))
    with torch.no_grad():
        one.embed.copy_(ours.embed), one.embed_avg.copy_(ours.embed_avg), one.cluster_size.copy_(ours.cluster_size)
    for step in range(3):
        x = randn(B, N, H * D, seed=30 + step)
        mask = _masks(B, N, 40 + step) if masked else None
        q, idx, loss = ours(x, mask=mask)
        # every head's slice is a row of its own for the shared codebook
        rows = x.reshape(B, N, H, D)
        ref = one(rows, mask=None if mask is None else mask.unsqueeze(-1).expand(B, N, H))
        assert torch.equal(idx, ref.indices), f"step {step}: " + first_mismatches(idx != ref.indices, idx, ref.indices)
        assert_close(q, ref.quantized.reshape(B, N, H * D), f"quantized, step {step}")
        assert_close(loss, ref.loss, f"loss, step {step}")
    for name in ("embed", "embed_avg", "cluster_size"):
        assert_close(getattr(ours, name), getattr(one, name), name)


@pytest.mark.parametrize("separate", [False, True])
def test_ties_go_to_the_lowest_index_in_every_head(separate):
    H, K, D = 3, 5, 2
    vq = Quantizer(H * D, K, codebook_dim=D, heads=H, separate_codebook_per_head=separate).eval()
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])  # codes 0 = 2, 1 = 3
    vq.codebook = codes.expand(H, K, D).clone() if separate else codes
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.5, 0.5]])  # head 2 is equidistant from codes 0..3
    idx = vq(x).indices
    assert idx.tolist() == [[0, 1, 0]]


# ---------------------------------------------------------------- one launch for all heads
@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("learning", ["ema", "gradient"])
def test_one_assign_and_one_statistics_call_for_all_heads(monkeypatch, separate, learning):
    calls = []
    real = _dispatch.call
    monkeypatch.setattr(_dispatch, "call", lambda op, *a: (calls.append(op), real(op, *a))[1])
    vq = Quantizer(16, 32, codebook_dim=2, heads=8, separate_codebook_per_head=separate, learning=learning)
    vq(randn(4, 10, 16, seed=0))
    assert calls.count("assign") == 1, calls
    if learning == "ema":
        assert calls.count("cluster_stats") == 1 and calls.count("ema_update") == 1, calls
    else:
        assert calls.count("histogram") == 1, calls
    calls.clear()
    vq.eval()(randn(4, 10, 16, seed=1))
    assert calls == ["assign"]


# ---------------------------------------------------------------- projections, decode, errors
@pytest.mark.parametrize("separate", [False, True])
def test_projection_to_heads_times_codebook_dim_and_decode(separate):
    torch.manual_seed(2)
    vq = Quantizer(10, 12, codebook_dim=4, heads=3, separate_codebook_per_head=separate).eval()
    assert vq.project_in.weight.shape == (12, 10) and vq.project_out.weight.shape == (10, 12)
    x = randn(2, 7, 10, seed=3)
    mask = _masks(2, 7, 4)
    q, idx, _ = vq(x, mask=mask)
    assert idx.shape == (2, 7, 3)
    decoded = vq.decode(idx)
    assert_close(decoded[mask], q[mask], "decode of kept rows")
    assert bool((decoded[~mask] == 0).all()), "a masked row decodes to zeros"
    codes = vq.get_codes_from_indices(idx)
    assert codes.shape == (2, 7, 12)
    z = vq.to_codebook_space(x)
    per_head = vq.codebook if separate else vq.codebook.expand(3, 12, 4)
    want = torch.stack([per_head[h][idx[..., h].clamp_min(0)] for h in range(3)], -2).flatten(-2)
    assert_close(codes[mask], want[mask], "codes of the kept rows")
    assert z.shape == (2, 7, 12)


def test_bad_heads_arguments_and_indices_raise_clear_errors():
    with pytest.raises(ValueError, match="heads"):
        Quantizer(8, 4, heads=0)
    with pytest.raises(TypeError, match="separate_codebook_per_head must be a bool"):
        Quantizer(8, 4, heads=2, separate_codebook_per_head="yes")
    vq = Quantizer(8, 4, codebook_dim=4, heads=2, separate_codebook_per_head=True)
    with pytest.raises(ValueError, match=r"indices has shape \(5,\); expected \[\.\.\., heads=2\]"):
        vq.decode(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices holds index 4, expected values in \[0, 4\)"):
        vq.decode(torch.full((5, 2), 4))
    with pytest.raises(ValueError, match=r"codes has shape \(4, 4\); expected \(2, 4, 4\)"):
        vq.codebook = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="expected dim=8"):
        vq(torch.randn(3, 6))


# ---------------------------------------------------------------- training features per head
def test_dead_codes_restart_from_their_own_heads_rows():
    H, K, D, N = 2, 6, 2, 5
    vq = Quantizer(H * D, K, codebook_dim=D, heads=H, separate_codebook_per_head=True, dead_code_threshold=0.5, decay=0.1)
    with torch.no_grad():
        vq.codebook = torch.stack([torch.eye(K, D) * 100 + 1000 * h for h in range(H)])
        vq.cluster_size.fill_(1.0)
    x = randn(N, H * D, seed=5)
    vq(x)
    for h in range(H):
        rows = x[:, h * D : (h + 1) * D]
        revived = vq.codebook[h][(vq.cluster_size[h] == 0.5)]
        assert revived.shape[0] > 0
        for code in revived:
            assert bool((rows == code).all(-1).any()), f"head {h}: a restarted code is not a row of head {h}"


@pytest.mark.parametrize("separate", [False, True])
def test_deferred_quantization_keeps_a_reservoir_per_codebook_and_switches(separate):
    H, K, D = 2, 4, 3
    vq = Quantizer(H * D, K, codebook_dim=D, heads=H, separate_codebook_per_head=separate, deferred_steps=2, reservoir_size=16)
    assert vq.reservoir.shape == ((H, 16, D) if separate else (16, D))
    x = randn(12, H * D, seed=6)
    for _ in range(2):
        q, idx, loss = vq(x)
        assert torch.equal(q, x) and idx.shape == (12, H) and bool((idx == -1).all())
    heads_rows = [x[:, h * D : (h + 1) * D] for h in range(H)]
    for h in range(H):
        rows = vq.reservoir[h] if separate else vq.reservoir
        pool = heads_rows[h] if separate else torch.cat(heads_rows)
        assert bool((rows.unsqueeze(1) == pool).all(-1).any(-1).all()), f"reservoir {h}: a row not from its head's rows"
        if separate and h == 1:
            assert not bool((rows.unsqueeze(1) == heads_rows[0]).all(-1).any()), "head 1's reservoir holds head 0's rows"
    q, idx, _ = vq(x)
    assert vq.is_quantizing and bool((idx >= 0).all())


@pytest.mark.parametrize("separate", [False, True])
def test_kmeans_init_per_codebook(separate):
    H, K, D = 2, 3, 2
    vq = Quantizer(H * D, K, codebook_dim=D, heads=H, separate_codebook_per_head=separate, init="kmeans", kmeans_iters=5)
    x = torch.cat([randn(30, D, seed=7), randn(30, D, seed=8) + 50], -1)  # head 1 lives far away
    vq(x)
    if separate:
        assert float(vq.codebook[1].mean()) > 40 and float(vq.codebook[0].mean()) < 10
    else:  # one codebook over both heads' rows: both clusters hold codes
        assert float(vq.codebook.max()) > 40 and float(vq.codebook.min()) < 10


@pytest.mark.parametrize("separate", [False, True])
def test_state_dict_round_trip_resumes_identically(separate):
    kw = dict(codebook_dim=3, heads=2, separate_codebook_per_head=separate, dead_code_threshold=0.3, deferred_steps=1,
              reservoir_size=8)
    torch.manual_seed(3)
    a = Quantizer(6, 4, **kw)
    for s in range(3):
        a(randn(10, 6, seed=s))
    b = Quantizer(6, 4, **kw)
    b.load_state_dict(a.state_dict())
    for s in range(3, 5):
        torch.manual_seed(s)
        qa = a(randn(10, 6, seed=s))
        torch.manual_seed(s)
        qb = b(randn(10, 6, seed=s))
        assert torch.equal(qa.indices, qb.indices) and torch.equal(qa.quantized, qb.quantized)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_gradient_learning_and_rotation_trick_with_heads():
    torch.manual_seed(4)
    vq = Quantizer(6, 5, codebook_dim=3, heads=2, separate_codebook_per_head=True, learning="gradient", gradient="rotation")
    x = randn(20, 6, seed=9).requires_grad_(True)
    q, idx, loss = vq(x)
    (q.sum() + loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    used = torch.zeros(2, 5, dtype=torch.bool)
    for h in range(2):
        used[h, idx[:, h].unique()] = True
    grad_rows = vq.embed.grad.abs().sum(-1) > 0
    assert torch.equal(grad_rows, used), "the codebook loss reaches exactly each head's used codes"


def test_training_step_compiles_fullgraph_with_heads():
    torch.manual_seed(5)
    model = Quantizer(8, 6, codebook_dim=2, heads=4, separate_codebook_per_head=True, dead_code_threshold=0.5)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for s in range(3):
        x, mask = randn(3, 5, 8, seed=s), _masks(3, 5, s)
        torch.manual_seed(s)
        want = eager(x, mask=mask)
        torch.manual_seed(s)
        got = compiled(x, mask=mask)
        assert torch.equal(got.indices, want.indices)
        assert_close(got.quantized, want.quantized, "quantized", atol=1e-6, rtol=1e-6)
    for k, v in eager.state_dict().items():
        assert_close(model.state_dict()[k].float(), v.float(), k, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- vector-quantize-pytorch
@pytest.fixture
def vqp():
    return pytest.importorskip("vector_quantize_pytorch")


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("codebook_dim", [4, 3], ids=["split", "projected"])
def test_training_matches_vector_quantize_heads(vqp, separate, codebook_dim):
    """(Not with masks: VectorQuantize 1.32 with heads > 1 and a mask breaks its own commitment
    loss (it compares the heads' codes with the unsplit input) or raises; masks with heads are
    checked against the per-head loop above.)"""
    torch.manual_seed(6)
    H, K = 2, 16
    theirs = vqp.VectorQuantize(dim=8, codebook_size=K, heads=H, codebook_dim=codebook_dim, separate_codebook_per_head=separate,
                                decay=0.8, rotation_trick=False)
    ours = Quantizer.from_pretrained_state(theirs.state_dict(), decay=0.8, heads=H)
    assert ours.heads == H and ours.separate_codebook_per_head == separate
    for step in range(3):
        x = randn(2, 25, 8, seed=50 + step)
        q1, i1, l1 = theirs(x)
        q2, i2, l2 = ours(x)
        assert torch.equal(i1, i2), f"step {step}: " + first_mismatches(i1 != i2, i1, i2)
        assert_close(q2, q1, f"quantized, step {step}")
        assert_close(l2, l1, f"loss, step {step}")
        assert_close(ours.codebook, theirs.codebook, f"codebook after step {step}")


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("H", [2, 8])
def test_from_pretrained_state_matches_trained_vector_quantize_in_eval(vqp, separate, H):
    torch.manual_seed(7)
    theirs = vqp.VectorQuantize(dim=24, codebook_size=32, heads=H, codebook_dim=5, separate_codebook_per_head=separate,
                                decay=0.5, threshold_ema_dead_code=1, kmeans_init=True)
    for s in range(3):
        theirs(randn(4, 40, 24, seed=s))  # kmeans init + EMA steps + dead-code restarts: non-trivial state
    theirs.eval()
    ours = Quantizer.from_pretrained_state(theirs.state_dict()).eval()
    x = randn(3, 17, 24, seed=9)
    with torch.no_grad():
        q1, i1, _ = theirs(x)
        q2, i2, _ = ours(x)
        assert torch.equal(i1, i2), first_mismatches(i1 != i2, i1, i2)
        assert_close(q2, q1, "quantized")
        assert_close(ours.decode(i2), q2, "decode")
        if separate:  # (1.32's get_output_from_indices does not join shared heads' codes)
            assert_close(ours.decode(i2), theirs.get_output_from_indices(i1), "their decode")
    assert_close(ours.codebook, theirs.codebook, "codebook", atol=0, rtol=0)


def test_from_pretrained_state_shared_heads_without_projection_needs_heads(vqp):
    theirs = vqp.VectorQuantize(dim=8, codebook_size=16, heads=2, codebook_dim=4).eval()
    x = randn(5, 8, seed=1)
    ours = Quantizer.from_pretrained_state(theirs.state_dict(), heads=2).eval()
    assert ours.dim == 8 and ours.codebook_dim == 4
    assert torch.equal(ours(x).indices, theirs(x)[1])


# ---------------------------------------------------------------- two Gloo ranks
def _ddp_data(rank, steps=5):
    g = torch.Generator().manual_seed(70 + rank)
    return [(torch.randn(14 + 5 * rank, 8, generator=g) + 3.0 * rank, torch.rand(14 + 5 * rank, generator=g) > 0.2)
            for _ in range(steps)]


def _ddp_configs():
    return {
        "separate-ema": dict(heads=4, codebook_dim=2, separate_codebook_per_head=True, decay=0.8, deterministic=True),
        "shared-ema": dict(heads=4, codebook_dim=2, decay=0.8, deterministic=True),
        "separate-restarts": dict(heads=2, codebook_dim=4, separate_codebook_per_head=True, init="kmeans", dead_code_threshold=0.8),
        "shared-deferred": dict(heads=2, codebook_dim=4, deferred_steps=2, reservoir_size=24, dead_code_threshold=0.8),
    }


def _ddp_worker(rank, world, init_file, out_dir):
    import os
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name, kw in _ddp_configs().items():
            torch.manual_seed(100 + rank)  # different codes per rank: the first call broadcasts rank 0's
            vq = Quantizer(8, 6, **kw)
            data = _ddp_data(rank)
            for x, mask in data[:2]:
                vq(x, mask=mask)
            for x, mask in data[2:4]:  # gradient accumulation: statistics applied once, one collective
                vq(x, mask=mask, accum_ema_update=True)
            vq(*data[4][:1], mask=data[4][1])
            results[name] = {k: v.clone() for k, v in vq.state_dict().items() if k != "reservoir_seen"}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_keep_identical_head_codebooks(tmp_path):
    r0, r1 = run_gloo_ranks(_ddp_worker, 2, tmp_path, "test_heads")
    for name in r0:
        for k, v in r0[name].items():
            assert torch.equal(v, r1[name][k]), f"{name}: {k} differs between ranks"
    # EMA without random choices: the same as one process fed both ranks' rows
    for name in ("separate-ema", "shared-ema"):
        torch.manual_seed(100)
        ref = Quantizer(8, 6, **_ddp_configs()[name])
        both = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(_ddp_data(0), _ddp_data(1))]
        for x, mask in both[:2]:
            ref(x, mask=mask)
        for x, mask in both[2:4]:
            ref(x, mask=mask, accum_ema_update=True)
        ref(both[4][0], mask=both[4][1])
        for k in ("embed", "embed_avg", "cluster_size"):
            assert_close(r0[name][k], getattr(ref, k), f"{name} {k} vs one process")


def test_unreadable_head_layouts_raise_clear_errors(vqp):
    from vqkernels.errors import UnknownLayoutError

    state = vqp.VectorQuantize(dim=8, codebook_size=16, heads=2, codebook_dim=3).state_dict()  # project_in [6, 8]
    state["project_in.weight"] = torch.zeros(7, 8)
    with pytest.raises(UnknownLayoutError, match=r"project_in.weight projects to 7 features, not a multiple of the codebook's 3.*Keys found"):
        Quantizer.from_pretrained_state(state)
    state = vqp.VectorQuantize(dim=8, codebook_size=16, heads=2, codebook_dim=4, separate_codebook_per_head=True).state_dict()
    state["_codebook.cluster_size"] = torch.ones(2, 15)
    with pytest.raises(UnknownLayoutError, match=r"_codebook.cluster_size has shape \(2, 15\); expected \(2, 16\) entries"):
        Quantizer.from_pretrained_state(state)
    state["_codebook.embed"] = torch.zeros(2, 2, 16, 4)
    with pytest.raises(UnknownLayoutError, match=r"expected \[K, D\], \[1, K, D\] or \[heads, K, D\]"):
        Quantizer.from_pretrained_state(state)


@pytest.mark.parametrize("separate", [False, True])
def test_channel_first_heads_match_vector_quantize(vqp, separate):
    torch.manual_seed(9)
    theirs = vqp.VectorQuantize(dim=6, codebook_size=8, heads=3, codebook_dim=2, separate_codebook_per_head=separate,
                                channel_last=False).eval()
    ours = Quantizer.from_pretrained_state(theirs.state_dict(), heads=3, channel_last=False).eval()
    x = randn(2, 6, 13, seed=4)  # [B, dim, N]
    with torch.no_grad():
        q1, i1, _ = theirs(x)
        q2, i2, _ = ours(x)
    assert i2.shape == (2, 13, 3) and torch.equal(i1, i2)
    assert_close(q2, q1, "quantized [B, dim, N]")
    assert_close(ours.decode(i2), q2, "decode, channel-first")


@pytest.mark.parametrize("separate", [False, True])
def test_init_codebook_by_hand_runs_kmeans_per_codebook(separate):
    H, K, D = 2, 3, 2
    vq = Quantizer(H * D, K, codebook_dim=D, heads=H, separate_codebook_per_head=separate, init="kmeans", kmeans_iters=5)
    x = torch.cat([randn(30, D, seed=11), randn(30, D, seed=12) - 40], -1)
    vq.init_codebook(x, batch_rows=10)
    assert vq.codebook_state.is_initialised
    if separate:
        assert float(vq.codebook[1].mean()) < -30 and float(vq.codebook[0].mean()) > -10
        assert_close(vq.cluster_size.sum(-1), torch.full((H,), 10.0), "cluster sizes in units of batch_rows rows")
    else:  # the shared codebook sees each of the 10 rows' 2 heads
        assert_close(vq.cluster_size.sum(), torch.tensor(20.0), "cluster sizes in units of batch_rows * heads rows")
