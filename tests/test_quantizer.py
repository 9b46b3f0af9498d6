"""Quantizer: against a plain reference loop, gradient estimators, restarts, masks, state, deferral."""
import pytest
import torch
import torch.nn.functional as F

import vqkernels.codebook as codebook_module
from vqkernels.ops import assign, cluster_stats, ema_update_, kmeans
from vqkernels.quantizer import LossBreakdown, Quantizer, QuantizerOutput, rotation_backward

from helpers import first_mismatches, snapshot, assert_states_bitwise_equal


def batches(n_batches, rows=64, dim=8, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=g) + shift for _ in range(n_batches)]


def assert_close(actual, expected, name, atol=1e-6, rtol=1e-6):
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol)
    assert not bool(bad.any()), f"{name}: " + first_mismatches(bad, actual, expected)


# ---------------------------------------------------------------- reference loop
def reference_loop(x_batches, codebook, masks, metric, decay, eps, beta, backend):
    """The EMA VQ layer written out with the ops, step by step."""
    K = codebook.shape[0]
    codebook = codebook.clone()
    cluster_size = torch.ones(K)
    embed_avg = codebook.clone()
    outs = []
    for x, keep in zip(x_batches, masks):
        z = F.normalize(x, dim=-1) if metric == "cosine" else x
        indices = assign(z, codebook, metric, backend=backend).indices
        if keep is not None:
            indices = torch.where(keep, indices, torch.full_like(indices, -1))
        valid = indices >= 0
        q = torch.where(valid[:, None], codebook[indices.clamp_min(0)], z)
        err = (z - q).pow(2).sum(-1)[valid]
        loss = beta * err.sum() / (valid.sum() * z.shape[1])
        out = torch.where(valid[:, None], q, x)
        counts, sums = cluster_stats(z, indices, K, backend=backend)
        ema_update_(cluster_size, embed_avg, codebook, counts, sums, decay, eps, backend=backend)
        if metric == "cosine":
            codebook = F.normalize(codebook, dim=-1)
        outs.append((indices, out, loss))
    return outs, codebook, cluster_size, embed_avg


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("backend,tol", [("reference", 1e-6), (None, 1e-5)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference_loop(metric, backend, tol, masked):
    torch.manual_seed(0)
    vq = Quantizer(8, 16, metric=metric, decay=0.9, eps=1e-5, commitment_weight=0.25, init="uniform", backend=backend)
    start = vq.codebook.detach().clone()
    xs = batches(5, seed=1)
    g = torch.Generator().manual_seed(2)
    masks = [torch.rand(64, generator=g) > 0.3 if masked else None for _ in xs]
    expected, cb, cs, ea = reference_loop(xs, start, masks, metric, 0.9, 1e-5, 0.25, "reference")
    for step, (x, keep, (e_idx, e_out, e_loss)) in enumerate(zip(xs, masks, expected)):
        out = vq(x, mask=keep)
        assert torch.equal(out.indices, e_idx), f"step {step}: " + first_mismatches(out.indices != e_idx, out.indices, e_idx)
        assert_close(out.quantized, e_out, f"quantized, step {step}", atol=tol, rtol=tol)
        assert_close(out.loss, e_loss, f"loss, step {step}", atol=tol, rtol=tol)
    assert_close(vq.cluster_size, cs, "cluster_size", atol=tol, rtol=tol)
    assert_close(vq.embed_avg, ea, "embed_avg", atol=tol, rtol=tol)
    assert_close(vq.codebook, cb, "codebook", atol=tol, rtol=tol)


def test_matches_vector_quantize_pytorch_ema_step():
    """Drop-in: same codebook -> same indices, output, loss and EMA codebook as VectorQuantize."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    theirs = vqp.VectorQuantize(dim=8, codebook_size=32, decay=0.8, commitment_weight=1.0, rotation_trick=False)
    ours = Quantizer(8, 32, decay=0.8, commitment_weight=1.0)
    ours.codebook = theirs.codebook.detach().clone()
    ours.cluster_size.fill_(1.0)
    ours.embed_avg.copy_(theirs.codebook.detach())
    x = torch.randn(2, 50, 8)
    for _ in range(3):
        q1, i1, l1 = theirs(x)
        q2, i2, l2 = ours(x)
        assert torch.equal(i1, i2)
        assert_close(q2, q1, "quantized", atol=1e-5)
        assert_close(l2, l1, "loss", atol=1e-5)
        assert_close(ours.codebook, theirs.codebook, "codebook after EMA", atol=1e-5)


# ---------------------------------------------------------------- outputs and shapes
def test_empty_batch():
    vq = Quantizer(4, 8)
    q, idx, loss = vq(torch.randn(0, 4))
    assert q.shape == (0, 4) and idx.shape == (0,) and float(loss) == 0.0


def test_output_contract():
    vq = Quantizer(8, 16)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    out = vq(x)
    assert isinstance(out, QuantizerOutput)
    quantized, indices, loss = out
    assert quantized.shape == x.shape and quantized.dtype == x.dtype
    assert indices.shape == (2, 3, 5) and indices.dtype == torch.int64
    assert loss.shape == ()
    out4 = vq(x, return_loss_breakdown=True)
    assert isinstance(out4.breakdown, LossBreakdown)
    assert_close(out4.loss, out4.breakdown.commitment * vq.commitment_weight, "loss = beta * commitment")
    vq.eval()
    assert float(vq(x).loss) == 0.0


def test_bfloat16_input_keeps_dtype():
    vq = Quantizer(8, 16)
    x = torch.randn(4, 10, 8).to(torch.bfloat16)
    q, idx, _ = vq(x)
    assert q.dtype == torch.bfloat16 and idx.dtype == torch.int64


def test_channel_first_matches_channel_last():
    torch.manual_seed(0)
    a = Quantizer(8, 16, channel_last=False)
    b = Quantizer(8, 16)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 4, 5)
    qa, ia, la = a(x)
    qb, ib, lb = b(x.movedim(1, -1))
    assert qa.shape == x.shape and ia.shape == (2, 4, 5)
    assert torch.equal(ia, ib)
    assert_close(qa.movedim(1, -1), qb, "quantized")
    assert_close(la, lb, "loss")
    a.eval()
    qe, ie, _ = a(x)
    assert_close(a.decode(ie), qe, "decode in the input layout")


def test_codebook_dim_projections_and_decode():
    torch.manual_seed(0)
    vq = Quantizer(12, 16, codebook_dim=4)
    x = torch.randn(3, 7, 12, requires_grad=True)
    q, idx, loss = vq(x)
    assert q.shape == x.shape and vq.codebook.shape == (16, 4)
    (q.sum() + loss).backward()
    assert vq.project_in.weight.grad is not None and vq.project_out.weight.grad is not None
    vq.eval()
    q, idx, _ = vq(x)
    assert_close(vq.decode(idx), q, "decode(indices) == quantized")
    codes = vq.get_codes_from_indices(idx)
    assert codes.shape == (3, 7, 4)
    assert_close(codes, vq.codebook[idx], "get_codes_from_indices")


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="metric"):
        Quantizer(8, 16, metric="dot")
    with pytest.raises(ValueError, match="learning"):
        Quantizer(8, 16, learning="adam")
    with pytest.raises(ValueError, match="reservoir_size"):
        Quantizer(8, 16, deferred_steps=2, reservoir_size=8)
    vq = Quantizer(8, 16)
    with pytest.raises(ValueError, match="dim=8"):
        vq(torch.randn(4, 7))
    with pytest.raises(ValueError, match="mask"):
        vq(torch.randn(4, 8), mask=torch.ones(5, dtype=torch.bool))


# ---------------------------------------------------------------- gradients
def test_straight_through_gradient_is_the_output_gradient():
    torch.manual_seed(0)
    vq = Quantizer(8, 16)
    x = torch.randn(40, 8, requires_grad=True)
    q, _, _ = vq(x)
    g = torch.randn_like(q)
    q.backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_commitment_loss_from_assign_distances_is_the_masked_squared_error(dtype, C, masked):
    """The l2 commitment loss is read off assign's exact distances (no pass over z and q); its
    value and gradient are those of the squared error it replaces (_masked_mse), masked rows
    (NaN ones too) out of both, and a kept non-finite row makes it NaN."""
    from vqkernels.estimators import commitment_loss, quantize
    from vqkernels.quantizer import _masked_mse

    g = torch.Generator().manual_seed(C)
    N, D, K = 50, 6, 9
    x = torch.randn(C, N, D, generator=g, dtype=dtype) * 3 + 10  # offset: the distances must be exact
    codes = torch.randn(C, K, D, generator=g, dtype=dtype) * 3 + 10
    keep = torch.rand(N, generator=g) > 0.3 if masked else None
    if masked:
        x[:, ~keep] = float("nan")  # masked rows may hold anything
    z1, z2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    q1, _, dist = quantize(z1, codes, keep, return_distances=True)
    q2, _ = quantize(z2, codes, keep)
    fast, slow = commitment_loss(z1, q1, dist, keep), _masked_mse(z2, q2.detach(), keep)
    assert fast.dtype == dtype and fast.shape == ()
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert_close(fast, slow, "loss", atol=0, rtol=tol)
    w = torch.randn((), generator=g, dtype=dtype)
    (fast * w + q1.sum()).backward()
    (slow * w + q2.sum()).backward()
    assert torch.isfinite(z1.grad).all()
    assert_close(z1.grad, z2.grad, "gradient", atol=tol, rtol=tol)
    if masked:
        assert torch.equal(z1.grad[:, ~keep], torch.ones_like(z1.grad[:, ~keep])), "masked rows: only dq/dz"
    bad = x.clone()
    bad[0, int(torch.nonzero(keep)[0]) if masked else 0, 1] = float("nan")
    q3, _, d3 = quantize(bad, codes, keep, return_distances=True)
    assert torch.isnan(commitment_loss(bad, q3, d3, keep)), "a kept non-finite row shows in the loss"
    empty = torch.zeros(C, 0, D, dtype=dtype)
    assert torch.equal(commitment_loss(empty, empty, torch.zeros(C, 0, dtype=dtype), None), torch.zeros((), dtype=dtype))


def test_quantizer_commitment_loss_matches_mse_of_its_output():
    """Through the module (l2: from the distances; cosine: the squared error itself)."""
    for metric in ("l2", "cosine"):
        torch.manual_seed(0)
        vq = Quantizer(8, 16, metric=metric, commitment_weight=0.5)
        x = torch.randn(2, 30, 8) + 3
        ref = vq.to_codebook_space(x)
        out = vq(x, return_loss_breakdown=True)
        assert_close(out.breakdown.commitment, F.mse_loss(ref, out.quantized), f"{metric} commitment", rtol=1e-6)
        assert_close(out.loss, out.breakdown.commitment * 0.5, f"{metric} loss")


@pytest.mark.parametrize("N", [5, 40])  # K = 12: the where path (K > N) and the one-gather path (K <= N)
@pytest.mark.parametrize("C", [1, 3])
def test_quantize_takes_the_codes_and_passes_unassigned_rows_through(N, C):
    from vqkernels.estimators import quantize

    g = torch.Generator().manual_seed(N + C)
    K, D = 12, 4
    z = torch.randn(C, N, D, generator=g)
    codes = torch.randn(C, K, D, generator=g)
    keep = torch.arange(N) % 3 != 1
    z[:, 1, 2] = float("nan")  # masked (row 1) and kept (row 0) non-finite rows
    z[-1, 0, 0] = float("inf")
    q, idx = quantize(z, codes, keep)
    assert bool((idx[:, ~keep] == -1).all()) and int(idx[-1, 0]) == -1
    want = torch.where((idx >= 0).unsqueeze(-1), codes.gather(1, idx.clamp_min(0).unsqueeze(-1).expand(C, N, D)), z)
    assert torch.equal(q.isnan(), want.isnan()) and torch.equal(q.nan_to_num(0.0), want.nan_to_num(0.0))


def test_gather_codes_without_a_gradient_is_the_embedding_lookup():
    from vqkernels.estimators import gather_codes

    g = torch.Generator().manual_seed(0)
    for C in (1, 3):
        codes = torch.randn(C, 7, 5, generator=g)
        idx = torch.randint(0, 7, (C, 40), generator=g)
        offset = torch.arange(C).unsqueeze(1) * 7
        want = F.embedding(idx + offset, codes.reshape(-1, 5))
        assert torch.equal(gather_codes(codes, idx), want)
        learned = codes.clone().requires_grad_(True)
        got = gather_codes(learned, idx)
        assert got.requires_grad and torch.equal(got, want)


def _rotation_grad_direct(e, q, g):
    """lambda * R^T g with R built as a matrix per row: R = I - 2 r r^T + 2 q^ e^T."""
    e64, q64, g64 = e.double(), q.double(), g.double()
    e_hat = e64 / e64.norm(dim=1, keepdim=True)
    q_hat = q64 / q64.norm(dim=1, keepdim=True)
    r = F.normalize(e_hat + q_hat, dim=1)
    eye = torch.eye(e.shape[1], dtype=torch.float64).expand(e.shape[0], -1, -1)
    R = eye - 2 * r[:, :, None] * r[:, None, :] + 2 * q_hat[:, :, None] * e_hat[:, None, :]
    # R maps e^ to q^, so lambda * R e = q
    assert torch.allclose((R @ e64[:, :, None]).squeeze(-1) * (q64.norm(dim=1) / e64.norm(dim=1))[:, None], q64, atol=1e-9)
    lam = (q64.norm(dim=1) / e64.norm(dim=1))[:, None]
    return lam * (R.transpose(1, 2) @ g64[:, :, None]).squeeze(-1)


def test_rotation_trick_gradient_matches_direct_formula():
    torch.manual_seed(0)
    vq = Quantizer(8, 16, gradient="rotation", commitment_weight=0.0)
    vq.eval()  # codebook frozen: only the estimator is under test
    x = torch.randn(30, 8, requires_grad=True)
    q, idx, _ = vq(x)
    assert_close(q, vq.codebook[idx], "forward value is the code")
    g = torch.randn_like(q)
    q.backward(g)
    expected = _rotation_grad_direct(x.detach(), q.detach(), g)
    assert_close(x.grad.double(), expected, "rotation gradient", atol=1e-5, rtol=1e-4)


def test_rotation_trick_matches_vector_quantize_pytorch():
    vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    torch.manual_seed(1)
    e = torch.randn(20, 6, requires_grad=True)
    q = torch.randn(20, 6)
    g = torch.randn(20, 6)
    vqp.rotate_to(e, q).backward(g)
    assert_close(rotation_backward(e.detach(), q, g), e.grad, "rotation_backward vs rotate_to", atol=1e-5)


def test_gradient_learning_moves_the_codebook_towards_its_inputs():
    torch.manual_seed(0)
    vq = Quantizer(4, 8, learning="gradient", commitment_weight=0.25)
    assert isinstance(vq.embed, torch.nn.Parameter)
    x = torch.randn(256, 4) + 3.0
    before = vq.codebook.detach().clone()
    opt = torch.optim.SGD([vq.embed], lr=0.5)
    q, idx, loss = vq(x)
    loss.backward()
    # d/dc of mean ||c_idx - z||^2 over N*D elements: 2/(N*D) * sum over the code's rows (c - z)
    expected = torch.zeros_like(before)
    expected.index_add_(0, idx, 2 * (before[idx] - x) / x.numel())
    assert_close(vq.embed.grad, expected, "codebook gradient", atol=1e-6)
    opt.step()
    used = torch.unique(idx)
    assert not torch.allclose(vq.codebook[used], before[used])
    mean_dist = lambda cb: (cb[used] - 3.0).norm(dim=1).mean()  # noqa: E731
    assert mean_dist(vq.codebook.detach()) < mean_dist(before)


# ---------------------------------------------------------------- initialisation
@pytest.fixture
def kmeans_calls(monkeypatch):
    """The rows the Quantizer hands to k-means, one entry per call (k-means still runs)."""
    calls = []

    def spy(x, K, iters, **kw):
        calls.append(x.clone())
        return kmeans(x, K, iters, **kw)

    monkeypatch.setattr(codebook_module, "kmeans", spy)  # the codebook state runs k-means
    return calls


def test_kmeans_init_on_first_batch(kmeans_calls):
    calls = kmeans_calls
    torch.manual_seed(0)
    vq = Quantizer(4, 8, init="kmeans", decay=1.0)  # decay 1: the EMA keeps the k-means codebook
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(5))
    vq(x)
    assert len(calls) == 1 and torch.equal(calls[0], x)
    assert bool(vq.initted)
    torch.manual_seed(0)
    ref = Quantizer(4, 8, init="kmeans", decay=1.0)
    ref(x)
    assert_close(vq.codebook, ref.codebook, "k-means init is reproducible")
    vq(x)
    assert len(calls) == 2, "k-means runs once per module"
    with pytest.raises(ValueError, match="at least codebook_size"):
        Quantizer(4, 8, init="kmeans")(torch.randn(5, 4))


def test_random_init_takes_rows_of_the_batch():
    torch.manual_seed(0)
    vq = Quantizer(4, 8, init="random", decay=1.0)
    x = torch.randn(50, 4)
    vq(x)
    d = (vq.codebook[:, None] - x[None]).norm(dim=-1).min(1).values
    assert float(d.max()) < 1e-5


# ---------------------------------------------------------------- dead codes, masks, eval
def test_dead_code_restart_revives_codes():
    def used_after(threshold):
        torch.manual_seed(0)
        vq = Quantizer(4, 32, init="uniform", dead_code_threshold=threshold)
        for x in batches(20, rows=128, dim=4, shift=5.0):  # data far from the uniform codes
            _, idx, _ = vq(x)
        return vq, torch.unique(idx).numel()

    vq0, used0 = used_after(0.0)
    vq1, used1 = used_after(1.0)
    assert used0 <= 2
    assert used1 >= 20, (used0, used1)
    # revived codes sit among the data
    assert float(vq1.codebook.mean()) > 3.0


def test_dead_code_restart_reseeds_from_distinct_kept_rows_and_resets_stats():
    torch.manual_seed(0)
    vq = Quantizer(2, 6, init="uniform", dead_code_threshold=0.5, reset_cluster_size=0.75)
    x = torch.tensor([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [40.0, 40.0]])
    keep = torch.tensor([True, False, True, True])
    vq.cluster_size.fill_(0.0)  # everything dead
    vq(x, mask=keep)
    kept_rows = x[keep]
    d = (vq.codebook[:, None] - kept_rows[None]).norm(dim=-1)
    revived = d.min(1).values < 1e-6
    assert int(revived.sum()) == 3  # 6 dead codes, 3 kept rows: 3 re-seeded now, the rest later
    assert torch.unique(d[revived].argmin(1)).numel() == 3, "distinct rows"
    assert_close(vq.cluster_size[revived], torch.full((3,), 0.75), "reset cluster size")
    assert_close(vq.embed_avg[revived], vq.codebook[revived] * 0.75, "reset embed_avg")


def test_mask_semantics():
    torch.manual_seed(0)
    vq = Quantizer(8, 16, decay=0.5)
    ref = Quantizer(8, 16, decay=0.5)
    ref.load_state_dict(vq.state_dict())
    x = torch.randn(4, 10, 8, requires_grad=True)
    keep = torch.rand(4, 10) > 0.4
    q, idx, loss = vq(x, mask=keep)
    assert bool((idx[~keep] == -1).all()) and bool((idx[keep] >= 0).all())
    assert torch.equal(q[~keep], x[~keep].detach())
    q_ref, idx_ref, loss_ref = ref(x[keep].detach())
    assert torch.equal(idx[keep], idx_ref)
    assert_close(loss, loss_ref, "loss over kept rows only")
    for name in ("cluster_size", "embed_avg", "embed"):
        assert_close(getattr(vq, name), getattr(ref, name), f"{name}: masked rows excluded from statistics")
    q.sum().backward()
    assert torch.equal(x.grad[~keep], torch.ones_like(x.grad[~keep]))


def test_eval_freezes_the_codebook():
    torch.manual_seed(0)
    vq = Quantizer(8, 16, init="kmeans", dead_code_threshold=1.0)
    vq(torch.randn(64, 8))
    vq.eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    for _ in range(3):
        _, _, loss = vq(torch.randn(64, 8) + 4)
        assert float(loss) == 0.0
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- state
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(init="kmeans", dead_code_threshold=1.0),
        dict(learning="gradient", gradient="rotation", init="random"),
        dict(deferred_steps=4, reservoir_size=64),  # saved mid-continuous phase, resumes through the switch
    ],
    ids=["ema-kmeans-dead", "gradient-rotation", "deferred"],
)
def test_state_dict_round_trip_resumes_identically(kwargs):
    torch.manual_seed(0)
    xs = batches(8, rows=40, dim=4, seed=3)
    a = Quantizer(4, 16, **kwargs)
    for x in xs[:3]:
        a(x)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    b = Quantizer(4, 16, **kwargs)
    b.load_state_dict(state, strict=True)
    assert "steps" in state and "quantizing" in state
    outs = []
    for m in (a, b):
        torch.manual_seed(123)
        outs.append([m(x) for x in xs[3:]])
    for (qa, ia, la), (qb, ib, lb) in zip(*outs):
        assert torch.equal(ia, ib) and torch.equal(qa, qb) and torch.equal(la, lb)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_fresh_module_loads_strictly():
    # A module trained past the deferred switch loads strictly into a fresh one, which then
    # holds bitwise the same state and quantizes the same way.
    torch.manual_seed(0)
    a = Quantizer(4, 16, init="kmeans", deferred_steps=2)
    for x in batches(3, rows=64, dim=4, seed=7):
        a(x)
    assert a.is_quantizing
    b = Quantizer(4, 16, init="kmeans", deferred_steps=2)
    b.load_state_dict(a.state_dict(), strict=True)
    assert_states_bitwise_equal(snapshot(a), snapshot(b), "fresh module after load_state_dict")
    a.eval(), b.eval()
    x = batches(1, rows=64, dim=4, seed=8)[0]
    assert torch.equal(a(x).indices, b(x).indices)


# ---------------------------------------------------------------- Deferred Quantization
def test_deferred_switch_at_the_right_step_from_the_reservoir(kmeans_calls):
    calls = kmeans_calls
    torch.manual_seed(0)
    T = 3
    vq = Quantizer(4, 8, deferred_steps=T, reservoir_size=200)
    xs = batches(5, rows=40, dim=4, seed=4)
    for step, x in enumerate(xs[:T]):
        q, idx, loss = vq(x)
        assert q is x and bool((idx == -1).all()) and float(loss) == 0.0, f"call {step + 1} must be the identity"
        assert not vq.is_quantizing and int(vq.steps) == step + 1
    assert not calls
    vq.eval()
    q, idx, _ = vq(xs[0])  # eval during the continuous phase: still the identity, no switch
    assert q is xs[0] and not vq.is_quantizing
    vq.train()
    q, idx, loss = vq(xs[T])  # call T + 1
    assert vq.is_quantizing and bool(vq.quantizing) and bool((idx >= 0).all()) and float(loss) > 0
    assert len(calls) == 1
    assert torch.equal(calls[0], torch.cat(xs[:T])), "k-means sees the reservoir of the continuous phase"
    assert int(vq.steps) == T + 1
    vq(xs[T + 1])
    assert len(calls) == 1


def test_start_quantization_by_hand():
    torch.manual_seed(0)
    vq = Quantizer(4, 8, deferred_steps=1000)
    for x in batches(2, rows=40, dim=4):
        vq(x)
    vq.start_quantization()
    assert vq.is_quantizing and vq.reservoir.numel() == 0
    _, idx, _ = vq(torch.randn(10, 4))
    assert bool((idx >= 0).all())
    with pytest.raises(RuntimeError, match="at least codebook_size"):
        early = Quantizer(4, 8, deferred_steps=5)
        early(torch.randn(3, 4))
        early.start_quantization()


def test_reservoir_is_a_uniform_sample_of_kept_rows():
    torch.manual_seed(0)
    R = 100
    vq = Quantizer(1, 4, deferred_steps=100, reservoir_size=R)
    stream = torch.arange(2000, dtype=torch.float32)
    keep = (stream % 2 == 0).view(20, 100)  # only even rows are kept
    for b in range(20):
        vq(stream.view(20, 100, 1)[b], mask=keep[b])
    assert int(vq.reservoir_seen) == 1000
    values = vq.reservoir.flatten()
    assert torch.unique(values).numel() == R, "distinct rows"
    assert bool((values % 2 == 0).all()), "masked rows never enter the reservoir"
    assert abs(float(values.mean()) - 999.0) < 250, "late rows are as likely as early ones"


# ---------------------------------------------------------------- the codebook state, C > 1
from vqkernels.codebook import Codebook  # noqa: E402
from vqkernels.distributed import LOCAL  # noqa: E402


def _rows_per_codebook(C, N, D, seed):
    """``[C, N, D]``: codebook c sees its own rows, far from the other codebooks' (offset 20 c)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C, N, D, generator=g) + 20.0 * torch.arange(C).view(C, 1, 1)


def _single(book, c, **kwargs):
    """Codebook ``c`` of ``book`` as a stand-alone single codebook (same state)."""
    one = Codebook(book.codebook_size, book.dim, codebook_axis=False, **kwargs)
    with torch.no_grad():
        one.embed.copy_(book.embed[c])
        one.cluster_size.copy_(book.cluster_size[c])
        if hasattr(book, "embed_avg"):
            one.embed_avg.copy_(book.embed_avg[c])
    return one


def _count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kw):
        calls.append(name)
        return real(*args, **kw)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("kwargs", [dict(), dict(metric="cosine"), dict(learning="gradient"), dict(decay=0.0)],
                         ids=["ema-l2", "ema-cosine", "gradient", "decay0"])
def test_codebook_updates_C_codebooks_in_one_call_like_C_separate_updates(monkeypatch, kwargs):
    import vqkernels.codebook as codebook_module

    C, K, D, N = 3, 8, 4, 50
    kwargs = {"decay": 0.9, "deterministic": True, **kwargs}
    torch.manual_seed(0)
    book = Codebook(K, D, num_codebooks=C, **kwargs)
    singles = [_single(book, c, **kwargs) for c in range(C)]
    z = F.normalize(_rows_per_codebook(C, N, D, seed=1), dim=-1) if kwargs.get("metric") == "cosine" else _rows_per_codebook(C, N, D, 1)
    keep = torch.rand(N, generator=torch.Generator().manual_seed(2)) > 0.3
    indices = assign(z, book.codes(), book.metric).indices.masked_fill(~keep, -1)
    if kwargs.get("decay") == 0.0:
        indices[1] = -1  # codebook 1 sees no kept row: decay 0 must keep its codes
    calls = [_count_calls(monkeypatch, codebook_module, op) for op in ("cluster_stats", "ema_update_", "histogram")]
    book.update_(z, indices, keep, LOCAL)
    n_calls = [len(c) for c in calls]
    if book.learning == "ema":
        assert n_calls == [1, 1, 0], "one statistics call and one EMA call for all C codebooks"
    else:
        assert n_calls == [0, 0, 1], "one usage histogram for all C codebooks"
    for c, one in enumerate(singles):
        one.update_(z[c : c + 1], indices[c : c + 1], keep, LOCAL)
        for name in ("embed", "cluster_size") + (("embed_avg",) if book.learning == "ema" else ()):
            got, want = getattr(book, name)[c], getattr(one, name)
            assert torch.equal(got, want), f"codebook {c} {name}: " + first_mismatches(got != want, got, want)
    assert int(book.steps) == 1
    if kwargs.get("decay") == 0.0:
        assert torch.isfinite(book.embed).all() and torch.equal(book.embed[1], singles[1].embed)


def test_codebook_restarts_dead_codes_per_codebook_from_its_own_rows():
    C, K, D, N = 3, 6, 2, 4
    book = Codebook(K, D, num_codebooks=C, dead_code_threshold=0.5, reset_cluster_size=0.75)
    before = book.embed.clone()
    with torch.no_grad():
        book.cluster_size.fill_(10.0)
        book.cluster_size[0].fill_(0.0)  # codebook 0: every code dead (6 codes, 3 kept rows)
        book.cluster_size[2, 4] = 0.0  # codebook 2: one dead code
    z = _rows_per_codebook(C, N, D, seed=3)
    keep = torch.tensor([True, False, True, True])
    torch.manual_seed(0)
    book.restart_dead_codes_(z, keep, LOCAL)
    kept = z[:, keep]
    d0 = (book.embed[0][:, None] - kept[0][None]).norm(dim=-1)
    revived = d0.min(1).values < 1e-6
    assert revived.tolist() == [True] * 3 + [False] * 3, "the first dead codes (by index) take the 3 kept rows now"
    assert torch.unique(d0[revived].argmin(1)).numel() == 3, "distinct rows"
    assert torch.equal(book.cluster_size[0], torch.tensor([0.75] * 3 + [0.0] * 3))
    assert torch.equal(book.embed_avg[0][revived], book.embed[0][revived] * 0.75)
    assert torch.equal(book.embed[1], before[1]) and torch.equal(book.cluster_size[1], torch.full((K,), 10.0))
    changed = (book.embed[2] != before[2]).any(1)
    assert changed.tolist() == [False] * 4 + [True, False]
    assert float((book.embed[2, 4][None] - kept[2]).norm(dim=-1).min()) < 1e-6, "codebook 2 re-seeded from its own rows"
    # one random order of the rows for all codebooks: codebook 2's first dead code takes the
    # row codebook 0's first dead code took
    row0 = int((book.embed[0, 0][None] - kept[0]).norm(dim=-1).argmin())
    row2 = int((book.embed[2, 4][None] - kept[2]).norm(dim=-1).argmin())
    assert row0 == row2


def test_codebook_kmeans_and_random_init_per_codebook():
    C, K, D, N = 2, 4, 3, 60
    z = _rows_per_codebook(C, N, D, seed=4)
    torch.manual_seed(0)
    book = Codebook(K, D, num_codebooks=C, init="kmeans", kmeans_iters=5)
    assert not book.is_initialised
    book.initialise_(z, None, LOCAL)
    assert book.is_initialised and bool(book.initted)
    torch.manual_seed(0)
    for c in range(C):  # the same k-means, codebook after codebook
        want = kmeans(z[c], K, 5)
        assert torch.equal(book.embed[c], want.centroids), f"codebook {c}: k-means of its own rows"
        assert torch.equal(book.cluster_size[c], torch.bincount(want.indices, minlength=K).float())
        assert torch.equal(book.embed_avg[c], want.centroids * book.cluster_size[c].unsqueeze(-1))

    keep = torch.arange(N) % 3 != 0
    rnd = Codebook(K, D, num_codebooks=C, init="random")
    rnd.initialise_(z, keep, LOCAL)
    kept = z[:, keep]
    rows = [(rnd.embed[c][:, None] - kept[c][None]).norm(dim=-1).min(1) for c in range(C)]
    for c in range(C):
        assert float(rows[c].values.max()) < 1e-6, f"codebook {c}: codes are its own kept rows"
    assert torch.equal(rows[0].indices, rows[1].indices), "the same rows for every codebook"
    with pytest.raises(ValueError, match="at least codebook_size"):
        Codebook(K, D, num_codebooks=C, init="kmeans").initialise_(z[:, :3], None, LOCAL)


def test_codebook_reservoir_and_switch_per_codebook():
    C, K, D = 2, 4, 3
    torch.manual_seed(0)
    book = Codebook(K, D, num_codebooks=C, deferred_steps=2, reservoir_size=16, kmeans_iters=3)
    assert tuple(book.reservoir.shape) == (C, 16, D) and not book.is_quantizing
    zs = [_rows_per_codebook(C, 12, D, seed=s) for s in (5, 6)]
    for z in zs:
        book.observe_(z, None)
    assert book.switch_due and int(book.reservoir_seen) == 24 and int(book.steps) == 2
    stream = torch.cat(zs, dim=1)  # 24 rows seen, 16 kept, in the same slots for every codebook
    slots = [[int((book.reservoir[c, j][None] - stream[c]).norm(dim=-1).argmin()) for j in range(16)] for c in range(C)]
    assert slots[0] == slots[1]
    assert all(float((book.reservoir[c, j] - stream[c, slots[c][j]]).abs().max()) == 0 for c in range(C) for j in range(16))
    book.start_quantization_(LOCAL)
    assert book.is_quantizing and tuple(book.reservoir.shape) == (C, 0, D)
    for c in range(C):  # codebook c's codes sit among its own rows (offset 20 c)
        assert float((book.embed[c] - 20.0 * c).abs().mean()) < 5.0


def test_checkpoint_keys_are_those_of_the_single_module():
    """The codebook state is a submodule, yet the state dict keeps the flat keys (and shapes)
    of the module before the split: checkpoints saved by the old code load strictly."""
    cases = {
        (): ["embed", "embed_avg", "cluster_size", "initted", "quantizing", "steps"],
        (("learning", "gradient"),): ["embed", "cluster_size", "initted", "quantizing", "steps"],
        (("deferred_steps", 2), ("codebook_dim", 3)): ["embed", "embed_avg", "cluster_size", "initted", "quantizing", "steps",
                                                      "reservoir", "reservoir_seen", "project_in.weight", "project_in.bias",
                                                      "project_out.weight", "project_out.bias"],
    }
    for kwargs, keys in cases.items():
        vq = Quantizer(4, 8, **dict(kwargs))
        state = vq.state_dict()
        assert list(state) == keys, kwargs
        assert tuple(state["embed"].shape) == (8, vq.codebook_dim) and tuple(state["cluster_size"].shape) == (8,)
        old_style = {k: v.clone() for k, v in state.items()}  # what the single module saved
        fresh = Quantizer(4, 8, **dict(kwargs))
        fresh.load_state_dict(old_style, strict=True)
        assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
    nested = torch.nn.Sequential(torch.nn.Linear(4, 4), Quantizer(4, 8))
    assert [k for k in nested.state_dict() if k.startswith("1.")] == ["1." + k for k in cases[()]]
