"""The drop-in options users reach for, each against vector-quantize-pytorch's VectorQuantize:
freeze_codebook, zeros for masked rows, EMA statistics accumulated over micro-batches
(accum_ema_update / apply_ema_), and the per-code EMA weight (ema_update_weight)."""
import pytest
import torch

from vqkernels.quantizer import Quantizer

from helpers import first_mismatches, randn


def assert_close(actual, expected, name, atol=1e-5, rtol=1e-5):
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol)
    assert not bool(bad.any()), f"{name}: " + first_mismatches(bad, actual, expected)


def state(vq):
    return {k: v.clone() for k, v in vq.state_dict().items()}


@pytest.fixture
def vqp():
    return pytest.importorskip("vector_quantize_pytorch")


def pair(vqp, *, heads=1, separate=False, codebook_dim=None, **ours_kw):
    torch.manual_seed(0)
    theirs = vqp.VectorQuantize(dim=8, codebook_size=16, heads=heads, separate_codebook_per_head=separate, codebook_dim=codebook_dim,
                                decay=0.8, rotation_trick=False)
    ours = Quantizer.from_pretrained_state(theirs.state_dict(), decay=0.8, **({"heads": heads} if heads > 1 else {}), **ours_kw)
    return theirs, ours


def assert_same_codebook(ours, theirs, what):
    assert_close(ours.codebook, theirs.codebook, f"{what}: codebook")
    shape = ours.cluster_size.shape
    assert_close(ours.cluster_size, theirs._codebook.cluster_size.reshape(shape), f"{what}: cluster_size")
    assert_close(ours.embed_avg, theirs._codebook.embed_avg.reshape(ours.embed_avg.shape), f"{what}: embed_avg")


# ---------------------------------------------------------------- freeze_codebook
@pytest.mark.parametrize("as_default", [False, True], ids=["forward-arg", "constructor"])
def test_freeze_codebook_quantizes_without_updating(vqp, as_default):
    theirs, ours = pair(vqp, dead_code_threshold=1.0, freeze_codebook=as_default)
    before = state(ours)
    for step in range(2):
        x = randn(2, 20, 8, seed=step)
        q1, i1, l1 = theirs(x, freeze_codebook=True)
        q2, i2, l2 = ours(x) if as_default else ours(x, freeze_codebook=True)
        assert torch.equal(i1, i2)
        assert_close(q2, q1, "quantized")
        assert_close(l2, l1, "commitment loss")
    after = state(ours)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed under freeze_codebook"
    assert_same_codebook(ours, theirs, "frozen")
    if as_default:  # the forward argument overrides the constructor's default
        ours(randn(2, 20, 8, seed=5), freeze_codebook=False)
        assert not torch.equal(ours.codebook, before["embed"])


def test_freeze_codebook_with_gradient_learning_gives_the_codebook_no_gradient():
    torch.manual_seed(1)
    vq = Quantizer(6, 8, learning="gradient")
    x = randn(30, 6, seed=1).requires_grad_(True)
    q, _, loss = vq(x, freeze_codebook=True, return_loss_breakdown=True)[:3]
    (q.sum() + loss).backward()
    assert vq.embed.grad is None or not bool(vq.embed.grad.any())
    assert x.grad is not None and bool(x.grad.any())
    before = vq.cluster_size.clone()
    assert torch.equal(vq.cluster_size, before)


def test_freeze_codebook_still_initialises_and_contradicts_accumulation():
    vq = Quantizer(4, 3, init="kmeans")
    vq(randn(20, 4, seed=2), freeze_codebook=True)  # a codebook must exist to quantize with
    assert vq.codebook_state.is_initialised and int(vq.steps) == 0
    with pytest.raises(ValueError, match="freeze_codebook=True and accum_ema_update=True contradict"):
        vq(randn(20, 4, seed=2), freeze_codebook=True, accum_ema_update=True)


# ---------------------------------------------------------------- masked rows: zeros or unchanged
@pytest.mark.parametrize("heads,separate", [(1, False), (2, True)])
def test_return_zeros_for_masked_padding_matches_vector_quantize_default(vqp, heads, separate):
    theirs, ours = pair(vqp, heads=heads, separate=separate, codebook_dim=8 // heads, return_zeros_for_masked_padding=True)
    for step in range(3):
        x = randn(2, 20, 8, seed=10 + step)
        mask = torch.rand(2, 20, generator=torch.Generator().manual_seed(step)) > 0.3
        with torch.no_grad():
            q2, i2, _ = ours.eval()(x, mask=mask)
            q1, i1, _ = theirs.eval()(x, mask=mask)
        assert torch.equal(i1, i2) and bool((i2[~mask] == -1).all())
        assert_close(q2, q1, "quantized (masked rows zero)")
        assert bool((q2[~mask] == 0).all())
        if heads == 1:  # (vqp 1.32 trains masked batches correctly only with one head)
            ours.train(), theirs.train()
            q1, i1, l1 = theirs(x, mask=mask)
            q2, i2, l2 = ours(x, mask=mask)
            assert torch.equal(i1, i2)
            assert_close(q2, q1, "quantized, training")
            assert_close(l2, l1, "loss over kept rows")
            assert_same_codebook(ours, theirs, f"step {step}")


def test_masked_rows_unchanged_by_default_and_zero_in_the_continuous_phase_when_asked():
    x = randn(3, 7, 4, seed=3)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(4)) > 0.4
    q = Quantizer(4, 5)(x, mask=mask).quantized
    assert torch.equal(q[~mask], x[~mask]), "default: masked rows come out unchanged"
    deferred = Quantizer(4, 5, deferred_steps=3, return_zeros_for_masked_padding=True, channel_last=False)
    xc = x.movedim(-1, 1)  # [B, dim, N]
    q = deferred(xc, mask=mask).quantized
    assert bool((q.movedim(1, -1)[~mask] == 0).all()) and torch.equal(q.movedim(1, -1)[mask], x[mask])


# ---------------------------------------------------------------- accumulated EMA statistics
@pytest.mark.parametrize("heads,separate", [(1, False), (2, False), (2, True)])
def test_accum_ema_update_matches_vector_quantize(vqp, heads, separate):
    theirs, ours = pair(vqp, heads=heads, separate=separate, codebook_dim=8 // heads)
    start = ours.codebook.clone()
    micro = [randn(2, 15, 8, seed=20 + i) for i in range(3)]
    for i, x in enumerate(micro):
        last = i == len(micro) - 1
        q1, i1, l1 = theirs(x, accum_ema_update=not last)
        q2, i2, l2 = ours(x, accum_ema_update=not last)
        assert torch.equal(i1, i2), f"micro-batch {i}"
        assert_close(q2, q1, f"quantized, micro-batch {i}")
        if not last:
            assert torch.equal(ours.codebook, start), "accumulating leaves the codebook as it is"
    assert_same_codebook(ours, theirs, "after the applying call")


def test_apply_ema_applies_the_accumulated_statistics_as_one_step():
    torch.manual_seed(3)
    a = Quantizer(5, 6, decay=0.7, deterministic=True)
    b = Quantizer(5, 6, decay=0.7, deterministic=True)
    b.load_state_dict(a.state_dict())
    micro = [randn(11, 5, seed=30 + i) for i in range(3)]
    for x in micro:
        a(x, accum_ema_update=True)
    assert a.apply_ema_() is True and a.apply_ema_() is False, "applied once, then nothing is pending"
    b(torch.cat(micro))  # the same codes all along: one step over all micro-batches' rows
    for name in ("embed", "embed_avg", "cluster_size"):
        assert_close(getattr(a, name), getattr(b, name), name)


# ---------------------------------------------------------------- per-code EMA weight
@pytest.mark.parametrize("kind", ["tensor", "callable"])
@pytest.mark.parametrize("heads,separate", [(1, False), (2, True)])
def test_ema_update_weight_matches_vector_quantize(vqp, kind, heads, separate):
    theirs, ours = pair(vqp, heads=heads, separate=separate, codebook_dim=8 // heads)
    g = torch.Generator().manual_seed(5)
    C = heads if separate else 1
    w = torch.rand(C, 16, generator=g) if C > 1 else torch.rand(16, generator=g)
    weight = w if kind == "tensor" else (lambda sums, counts: (counts > 0).float() * 0.5 + 0.25)
    for step in range(2):
        x = randn(2, 15, 8, seed=40 + step)
        _, i1, _ = theirs(x, ema_update_weight=weight)
        _, i2, _ = ours(x, ema_update_weight=weight)
        assert torch.equal(i1, i2)
        assert_same_codebook(ours, theirs, f"weighted step {step}")


def test_ema_update_weight_zero_freezes_and_bad_shapes_raise():
    vq = Quantizer(4, 6)
    before = state(vq)
    vq(randn(20, 4, seed=6), ema_update_weight=0.0)
    for k in ("embed_avg", "cluster_size"):  # (up to rounding: the EMA blends the old value with itself)
        assert_close(vq.state_dict()[k], before[k], k, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"ema_update_weight has shape \(5,\); expected a scalar, \[K=6\] or \[C=1, K=6\]"):
        vq(randn(20, 4, seed=6), ema_update_weight=torch.ones(5))


def test_options_compile_fullgraph_and_match_eager():
    import copy

    torch.manual_seed(8)
    model = Quantizer(8, 6, codebook_dim=2, heads=4, separate_codebook_per_head=True)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break raises
    w = torch.rand(4, 6, generator=torch.Generator().manual_seed(1))
    calls = [dict(accum_ema_update=True), dict(accum_ema_update=True), dict(), dict(ema_update_weight=w), dict(freeze_codebook=True)]
    for s, kw in enumerate(calls):
        x = randn(20, 8, seed=70 + s)
        want, got = eager(x, **kw), compiled(x, **kw)
        assert torch.equal(got.indices, want.indices), f"call {s} {kw}"
    for k, v in eager.state_dict().items():
        assert_close(model.state_dict()[k].float(), v.float(), k, atol=1e-6, rtol=1e-6)


def test_accumulated_usage_with_gradient_learning_is_applied_once():
    torch.manual_seed(4)
    a = Quantizer(5, 6, learning="gradient", decay=0.6)
    b = Quantizer(5, 6, learning="gradient", decay=0.6)
    b.load_state_dict(a.state_dict())
    micro = [randn(9, 5, seed=80 + i) for i in range(3)]
    size = a.cluster_size.clone()
    for x in micro[:2]:
        a(x, accum_ema_update=True)
        assert torch.equal(a.cluster_size, size), "accumulating leaves the usage EMA as it is"
    a(micro[2])
    b(torch.cat(micro))
    assert_close(a.cluster_size, b.cluster_size, "usage EMA of the three micro-batches in one step")
