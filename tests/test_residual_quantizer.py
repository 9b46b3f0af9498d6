"""ResidualQuantizer / GroupedResidualQuantizer against stage-by-stage references."""
import pytest
import torch

from helpers import closed_form_ema, exact_distances, loop_argmin, loop_cluster_stats, randn, run_gloo_ranks
from vqkernels import GroupedResidualQuantizer, ResidualQuantizer
from vqkernels.ops import _dispatch, kmeans


def _reference_stages(x, codes):
    """Stage-by-stage residual assignment in fp64 (ties to the lowest index): indices [N, Q], sum of codes."""
    res = x.double()
    idx = []
    for c in codes:
        i = loop_argmin(exact_distances(res, c, "l2"))
        idx.append(i)
        res = res - c.double()[i]
    return torch.stack(idx, -1), x.double() - res


@pytest.mark.parametrize("N,D,Q,K", [(1, 5, 1, 1), (33, 12, 3, 7), (17, 3, 4, 2)])
def test_eval_matches_stagewise_reference(N, D, Q, K):
    rq = ResidualQuantizer(D, Q, K).eval()
    x = randn(N, D, seed=N + D)
    out, indices, losses = rq(x)
    ref_idx, ref_out = _reference_stages(x, rq.codebook_state.embed)
    assert torch.equal(indices, ref_idx)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert losses.shape == (Q,) and not losses.any()
    torch.testing.assert_close(rq.decode(indices), out, atol=1e-6, rtol=1e-6)


def test_ties_lowest_index_every_stage():
    rq = ResidualQuantizer(4, 3, 4).eval()
    with torch.no_grad():
        codes = randn(3, 4, 4, seed=1)
        codes[:, 2] = codes[:, 1]  # codes 1 and 2 identical at every stage
        codes[:, 3] = codes[:, 1]
        rq.codebook_state.load_codes_(codes, torch.ones(3, 4))
    x = torch.zeros(5, 4)
    x[:] = codes[0, 1] + codes[1, 1] + codes[2, 1]
    _, indices, _ = rq(x)
    assert (indices != 2).all() and (indices != 3).all()
    ref_idx, _ = _reference_stages(x, codes)
    assert torch.equal(indices, ref_idx)


def test_training_step_is_per_stage_ema_in_one_launch(monkeypatch):
    Q, K, D, N, decay, eps = 3, 5, 6, 40, 0.7, 1e-5
    rq = ResidualQuantizer(D, Q, K, decay=decay, eps=eps)
    size0, avg0 = rq.codebook_state.cluster_size.clone(), rq.codebook_state.embed_avg.clone()
    codes0 = rq.codebook_state.embed.clone()
    x = randn(N, D, seed=3)
    calls = []
    real = _dispatch.call
    monkeypatch.setattr(_dispatch, "call", lambda op, *a: (calls.append(op), real(op, *a))[1])
    _, indices, losses = rq(x)
    assert calls.count("cluster_stats") == 1 and calls.count("ema_update") == 1, calls
    assert calls.count("assign") == Q
    ref_idx, _ = _reference_stages(x, codes0)
    assert torch.equal(indices, ref_idx)
    res = x.double()
    for q in range(Q):
        counts, sums = loop_cluster_stats(res, ref_idx[:, q], K)
        size, avg, code = closed_form_ema(size0[q], avg0[q], counts, sums, decay, eps)
        torch.testing.assert_close(rq.codebook_state.cluster_size[q].double(), size, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rq.codebook_state.embed[q].double(), code, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(losses[q].double(), (res - codes0[q].double()[ref_idx[:, q]]).pow(2).mean(), atol=1e-5, rtol=1e-5)
        res = res - codes0[q].double()[ref_idx[:, q]]


def test_quantize_dropout_and_decode_ignores_dropped():
    torch.manual_seed(0)
    rq = ResidualQuantizer(6, 4, 8, quantize_dropout=True, quantize_dropout_cutoff_index=1)
    x = randn(10, 6, seed=4)
    seen_dropped, kept_counts = False, set()
    for _ in range(30):
        codes = rq.codebook_state.embed.clone()
        out, indices, losses = rq(x)
        dropped = (indices[0] == -1)
        assert not dropped[0]
        # dropped stages are a suffix, with zero loss, and decode(indices) is the output
        last = int((~dropped).sum()) - 1
        assert (indices[:, last + 1:] == -1).all() and (indices[:, : last + 1] >= 0).all()
        assert not losses[last + 1:].any()
        seen_dropped |= bool(dropped.any())
        kept_counts.add(last + 1)
        ref = sum(codes[q][indices[:, q]] for q in range(last + 1))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert seen_dropped and kept_counts == {2, 3, 4}  # the cutoff index 1 keeps at least 2 stages
    rq.eval()
    _, indices, _ = rq(x)
    partial = indices.clone()
    partial[:, 2:] = -1
    expect = sum(rq.codebook_state.embed[q][indices[:, q]] for q in range(2))
    torch.testing.assert_close(rq.decode(partial), expect)


@pytest.mark.parametrize("codebook_dim", [None, 3])
def test_mask_rows_unchanged_and_minus_one(codebook_dim):
    rq = ResidualQuantizer(5, 2, 4, codebook_dim=codebook_dim)
    x = randn(2, 6, 5, seed=5)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 2:] = False
    x[1, 3] = float("nan")  # a masked row may hold NaN
    size0 = rq.codebook_state.cluster_size.clone()
    out, indices, losses = rq(x, mask)
    assert (indices[~mask] == -1).all() and (indices[mask] >= 0).all()
    assert torch.equal(out[~mask].nan_to_num(), x[~mask].nan_to_num())
    assert torch.isfinite(rq.codebook_state.embed).all() and torch.isfinite(losses).all()
    assert not torch.equal(size0, rq.codebook_state.cluster_size)


def test_shared_codebook_single_codebook():
    rq = ResidualQuantizer(6, 3, 8, shared_codebook=True).eval()
    assert rq.codebook_state.embed.shape == (1, 8, 6)
    x = randn(20, 6, seed=6)
    _, indices, _ = rq(x)
    ref_idx, _ = _reference_stages(x, rq.codebook_state.embed.expand(3, 8, 6))
    assert torch.equal(indices, ref_idx)
    rq.train()
    rq(x)  # all stages' rows update the one codebook


def test_grouped_equals_independent_stacks():
    G, Q, K, D = 3, 2, 5, 12
    gq = GroupedResidualQuantizer(D, G, Q, K).eval()
    x = randn(4, 7, D, seed=7)
    out, indices, losses = gq(x)
    assert indices.shape == (G, 4, 7, Q) and losses.shape == (G, Q)
    codes = gq.codebook_state.embed.view(G, Q, K, D // G)
    for g in range(G):
        xs = x[..., g * 4:(g + 1) * 4].reshape(-1, 4)
        ref_idx, ref_out = _reference_stages(xs, codes[g])
        assert torch.equal(indices[g].reshape(-1, Q), ref_idx)
        torch.testing.assert_close(out[..., g * 4:(g + 1) * 4].reshape(-1, 4).double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gq.decode(indices), out, atol=1e-6, rtol=1e-6)


def test_kmeans_init_and_deferred_switch_are_stagewise():
    Q, K, D = 2, 4, 3
    x = randn(64, D, seed=8)
    for kw in (dict(init="kmeans"), dict(deferred_steps=1, reservoir_size=64)):
        rq = ResidualQuantizer(D, Q, K, **kw)
        torch.manual_seed(1)
        if kw.get("deferred_steps"):
            _, idx, _ = rq(x)
            assert (idx == -1).all() and not rq.is_quantizing
            torch.manual_seed(1)
        rq(x)
        torch.manual_seed(1)
        res = x.clone()
        # stage q's initial codes = k-means on the residuals after stages < q (same random stream)
        stage_codes = []
        for q in range(Q):
            c = kmeans(res, K, 10).centroids
            stage_codes.append(c)
            i = loop_argmin(exact_distances(res, c, "l2"))
            res = res - c[i]
        # one EMA step after init moves codes; compare the initial ones via a fresh eval copy
        rq2 = ResidualQuantizer(D, Q, K, **kw)
        torch.manual_seed(1)
        if kw.get("deferred_steps"):
            rq2(x)
            torch.manual_seed(1)
            rq2.start_quantization()
        else:
            rq2._stagewise_init_(x.unsqueeze(0), None, None, rq2._sync(), use_kmeans=True)
        for q in range(Q):
            torch.testing.assert_close(rq2.codebook_state.embed[q], stage_codes[q], atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    rq = ResidualQuantizer(6, 3, 8).eval()
    with pytest.raises(ValueError, match="dim=6"):
        rq(torch.randn(4, 5))
    with pytest.raises(ValueError, match="range|8"):
        rq.decode(torch.full((2, 3), 8))
    with pytest.raises(ValueError, match="num_quantizers=3"):
        rq.decode(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="2 per-stage sizes.*num_quantizers=3"):
        ResidualQuantizer(6, 3, (5, 8))
    with pytest.raises(ValueError, match="shared_codebook=True needs one codebook_size"):
        ResidualQuantizer(6, 3, (5, 8, 8), shared_codebook=True)
    with pytest.raises(ValueError, match="divisible"):
        GroupedResidualQuantizer(7, 2, 3, 8)
    with pytest.raises(ValueError, match="at least codebook_size"):
        ResidualQuantizer(6, 2, 8, init="kmeans")(torch.randn(3, 6))


def test_parity_with_residual_vq_in_eval():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    Q, K, D = 3, 16, 8
    ref = vqp.ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K).eval()
    rq = ResidualQuantizer(D, Q, K).eval()
    codes = torch.stack([layer._codebook.embed[0] for layer in ref.layers])
    rq.codebook_state.load_codes_(codes, torch.ones(Q, K))
    x = torch.randn(2, 30, D)
    q_ref, i_ref, _ = ref(x)
    q, i, _ = rq(x)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("codebook_dim", [None, 4])
def test_from_pretrained_state_matches_residual_vq(codebook_dim):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    ref = vqp.ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, codebook_dim=codebook_dim)
    ref.train()
    for _ in range(2):
        ref(torch.randn(64, 8))  # trained statistics and codes, not the initial ones
    ref.eval()
    rq = ResidualQuantizer.from_pretrained_state(ref.state_dict())
    x = torch.randn(3, 20, 8)
    q_ref, i_ref, _ = ref(x)
    q, i, _ = rq(x)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="4 stages.*found keys"):
        ResidualQuantizer.from_pretrained_state(ref.state_dict(), num_quantizers=4)
    with pytest.raises(ValueError, match="layers.<q>._codebook.embed"):
        ResidualQuantizer.from_pretrained_state({"foo": torch.zeros(1)})


def test_from_pretrained_state_matches_grouped_residual_vq():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    ref = vqp.GroupedResidualVQ(dim=12, groups=2, num_quantizers=2, codebook_size=8, codebook_dim=4)
    ref.train()
    ref(torch.randn(64, 12))
    ref.eval()
    gq = GroupedResidualQuantizer.from_pretrained_state(ref.state_dict())
    x = torch.randn(2, 9, 12)
    q_ref, i_ref, _ = ref(x)
    q, i, _ = gq(x)
    assert i.shape == i_ref.shape and torch.equal(i, i_ref)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="3 groups"):
        GroupedResidualQuantizer.from_pretrained_state(ref.state_dict(), groups=3)


def test_resume_mid_continuous_phase_is_bitwise():
    from helpers import assert_states_bitwise_equal
    torch.manual_seed(0)
    a = ResidualQuantizer(6, 2, 4, deferred_steps=3, reservoir_size=16)
    xs = [randn(8, 6, seed=20 + i) for i in range(6)]
    a(xs[0]); a(xs[1])
    b = ResidualQuantizer(6, 2, 4, deferred_steps=3, reservoir_size=16)
    b.load_state_dict(a.state_dict())
    rng = torch.get_rng_state()
    outs_a = [a(x) for x in xs[2:]]
    torch.set_rng_state(rng)
    outs_b = [b(x) for x in xs[2:]]
    assert a.is_quantizing and b.is_quantizing
    for oa, ob in zip(outs_a, outs_b):
        assert torch.equal(oa.indices, ob.indices) and torch.equal(oa.quantized, ob.quantized)
    assert_states_bitwise_equal(a.state_dict(), b.state_dict(), "resumed residual quantizer")


# --------------------------------------------------------------------------- DDP (two Gloo ranks)
def _ddp_worker(rank, world, init_file, out_dir):
    import os
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # ranks build different random codes: the first call broadcasts rank 0's
        results = {}
        for name, kw in (("deferred", dict(deferred_steps=2, reservoir_size=32)), ("kmeans", dict(init="kmeans")),
                         ("kmeans_sampled", dict(init="kmeans", kmeans_max_rows=8)),
                         ("sizes", dict(init="kmeans")),
                         ("grouped", dict(init="random"))):
            if name == "grouped":
                m = GroupedResidualQuantizer(6, 2, 2, 4, dead_code_threshold=0.5, **kw)
            elif name == "sizes":  # per-stage sizes: padded stages on the codebook axis
                m = ResidualQuantizer(6, 2, (3, 4), dead_code_threshold=0.5, **kw)
            else:
                m = ResidualQuantizer(6, 2, 4, dead_code_threshold=0.5, **kw)
            g = torch.Generator().manual_seed(7 + rank)
            for _ in range(5):
                m(torch.randn(12 + 3 * rank, 6, generator=g) + 5 * rank)
            results[name] = {k: v.clone() for k, v in m.state_dict().items() if "reservoir" not in k}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_ranks_bitwise_identical_codebooks(tmp_path):
    r0, r1 = run_gloo_ranks(_ddp_worker, 2, tmp_path, "test_residual_quantizer")
    for name in r0:
        for k, v in r0[name].items():
            if "project" in k:
                continue  # the projections are the model's parameters (DDP's job), not the codebook's
            assert torch.equal(v, r1[name][k]), f"{name}: {k} differs between ranks"
        assert bool(r0[name]["codebook_state.initted"])


def _plain_step(rq, x, mask, codes, indices):
    """The training forward in plain fp64 autograd, given the picks: per group, stage q takes
    s_q = normalize(r_q) (cosine) or r_q, its code c_q (kept rows) by straight-through
    ``s + (c - s).detach()``, loss ``w * mean over kept rows of |s - c|^2 / D``, r_{q+1} = r_q - c_q;
    the projections around, masked rows out as they came in."""
    G, Q, d = rq.groups, rq.num_quantizers, rq.group_dim
    flat = x.reshape(-1, rq.dim)
    keep = torch.ones(flat.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1)
    outs, losses = [], []
    for g in range(G):
        lin_in, lin_out = rq.project_in[g], rq.project_out[g]
        z = flat[:, g * d:(g + 1) * d]
        if isinstance(lin_in, torch.nn.Linear):
            z = torch.nn.functional.linear(z, lin_in.weight.double(), lin_in.bias.double())
        residual, out, stage_losses = z, torch.zeros_like(z), []
        for q in range(Q):
            idx = indices[g, q]
            if (idx < 0).all():  # a dropped stage
                stage_losses.append(z.new_zeros(()))
                continue
            s = torch.nn.functional.normalize(residual, dim=-1) if rq.metric == "cosine" else residual
            c = torch.where(keep.unsqueeze(-1), codes[g, q].double()[idx.clamp_min(0)], s.detach())
            diff = torch.where(keep.unsqueeze(-1), s - c, torch.zeros((), dtype=s.dtype))
            stage_losses.append(rq.commitment_weight * diff.pow(2).sum() / (keep.sum() * s.shape[-1]))
            out = out + s + (c - s).detach()
            residual = residual - c
        if isinstance(lin_out, torch.nn.Linear):
            out = torch.nn.functional.linear(out, lin_out.weight.double(), lin_out.bias.double())
        outs.append(out)
        losses.append(torch.stack(stage_losses))
    out = torch.where(keep.unsqueeze(-1), torch.cat(outs, -1), flat)
    return out.reshape(x.shape), torch.stack(losses)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("kind", ["plain", "projection-mask", "grouped-mask", "dropout", "sizes-shared-weight"])
def test_training_gradients_match_plain_autograd(metric, kind):
    """The training step's one-node stage loop (closed-form backward) against the loop written
    in plain fp64 autograd: outputs, losses, and the gradients of x and of the projections."""
    torch.manual_seed(0)
    kw = dict(metric=metric, init="random", decay=0.5)
    mask = None
    if kind == "plain":
        rq = ResidualQuantizer(6, 3, 8, **kw)
    elif kind == "projection-mask":
        rq = ResidualQuantizer(10, 4, 8, codebook_dim=3, **kw)
        mask = torch.rand(3, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    elif kind == "grouped-mask":
        rq = GroupedResidualQuantizer(12, 2, 3, 8, codebook_dim=4, **kw)
        mask = torch.rand(3, 9, generator=torch.Generator().manual_seed(2)) > 0.3
    elif kind == "dropout":
        rq = ResidualQuantizer(6, 4, 8, quantize_dropout=True, quantize_dropout_cutoff_index=1, **kw)
    else:
        rq = ResidualQuantizer(6, 3, (4, 8, 6), commitment_weight=0.3, **kw)
    x0 = randn(3, 9, rq.dim, seed=8)
    rq(x0)  # initialises (random rows)
    for step in range(2):
        codes = rq._stage_codes().detach().clone()
        x = randn(3, 9, rq.dim, seed=9 + step).requires_grad_()
        weights = randn(3, 9, rq.dim, seed=20 + step)
        loss_weights = randn(*((rq.groups, rq.num_quantizers) if rq.groups > 1 else (rq.num_quantizers,)), seed=30 + step)
        out, indices, losses = rq(x, mask)
        ((out * weights).sum() + (losses * loss_weights).sum()).backward()
        got = [x.grad] + [p.grad for p in rq.parameters()]
        x.grad = None
        rq.zero_grad(set_to_none=True)
        idx = indices.unsqueeze(0) if rq.groups == 1 else indices
        idx = idx.reshape(rq.groups, -1, rq.num_quantizers).transpose(1, 2)  # [G, Q, N]
        x64 = x.detach().double().requires_grad_()
        ref_out, ref_losses = _plain_step(rq, x64, mask, codes, idx)
        ref_losses = ref_losses if rq.groups > 1 else ref_losses[0]
        torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(losses.double(), ref_losses, atol=1e-5, rtol=1e-5)
        params = list(rq.parameters())
        want = torch.autograd.grad((ref_out * weights.double()).sum() + (ref_losses * loss_weights.double()).sum(),
                                   [x64] + params, allow_unused=True)
        assert len(params) == (0 if kind in ("plain", "dropout", "sizes-shared-weight") else 4 * rq.groups)
        for name, a, b in zip(["x"] + [n for n, _ in rq.named_parameters()], got, want):
            torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{kind}/{metric}: grad of {name}: {m}")
