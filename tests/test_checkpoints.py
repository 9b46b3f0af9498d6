"""Checkpoints from other libraries: vector-quantize-pytorch (real objects), taming-transformers
and encodec/audiocraft (state dicts as their layouts define them), unknown layouts."""
import pytest
import torch
import torch.nn as nn

from vqkernels import checkpoints
from vqkernels.quantizer import Quantizer



@pytest.fixture
def vqp():
    """vector_quantize_pytorch for the tests that build its objects; only those skip without it
    (the taming, encodec and unknown-layout tests need nothing but state dicts)."""
    return pytest.importorskip("vector_quantize_pytorch")


def _trained_vqp(vqp, steps=3, seed=0, **kwargs):
    """A VectorQuantize after a few training steps, so the EMA statistics are not their initial values."""
    torch.manual_seed(seed)
    theirs = vqp.VectorQuantize(dim=8, codebook_size=32, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        theirs(torch.randn(2, 40, 8, generator=g) * 2)
    return theirs.eval()


def _same_eval_outputs(theirs, ours, x):
    ours.eval()
    with torch.no_grad():
        q1, i1, _ = theirs(x)
        q2, i2, _ = ours(x)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(q2, q1, atol=1e-5, rtol=1e-5)


def _older_shapes(state):
    """vector-quantize-pytorch before the heads dimension: embed [K, D], cluster_size [K],
    initted a float tensor [1]."""
    old = {}
    for k, v in state.items():
        if k in ("_codebook.embed", "_codebook.embed_avg", "_codebook.cluster_size"):
            v = v[0]
        elif k == "_codebook.initted":
            v = torch.tensor([float(v)])
        old[k] = v.clone()
    return old


# ---------------------------------------------------------------- vector-quantize-pytorch
@pytest.mark.parametrize(
    "their_kwargs,our_kwargs",
    [
        (dict(), dict()),
        (dict(codebook_dim=4), dict(codebook_dim=4)),
        (dict(use_cosine_sim=True), dict(metric="cosine")),
    ],
    ids=["plain", "projections", "cosine"],
)
@pytest.mark.parametrize("shapes", ["newer", "older"])
def test_vector_quantize_pytorch_checkpoint_gives_the_same_outputs(their_kwargs, our_kwargs, shapes, vqp):
    theirs = _trained_vqp(vqp, **their_kwargs)
    state = theirs.state_dict()
    if shapes == "older":
        state = _older_shapes(state)
    assert checkpoints.detect_layout(state) == checkpoints.VECTOR_QUANTIZE_PYTORCH
    ours = Quantizer(8, 32, **our_kwargs)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(3, 50, 8)
    _same_eval_outputs(theirs, ours, x)
    built = Quantizer.from_pretrained_state(state, **({"metric": "cosine"} if "metric" in our_kwargs else {}))
    assert (built.dim, built.codebook_size, built.codebook_dim) == (8, 32, our_kwargs.get("codebook_dim", 8))
    _same_eval_outputs(theirs, built, x)
    torch.testing.assert_close(ours.cluster_size, theirs._codebook.cluster_size.reshape(-1))
    assert ours.is_quantizing and bool(ours.initted) and int(ours.steps) == 0


def test_vector_quantize_pytorch_training_continues_identically(vqp):
    """The EMA statistics come along: one more training step moves both codebooks alike."""
    theirs = _trained_vqp(vqp, rotation_trick=False)
    ours = Quantizer.from_pretrained_state(theirs.state_dict())
    theirs.train()
    x = torch.randn(2, 50, 8)
    q1, i1, l1 = theirs(x)
    q2, i2, l2 = ours(x)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.codebook, theirs.codebook, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.embed_avg, theirs._codebook.embed_avg[0], atol=1e-5, rtol=1e-5)


def test_whole_model_checkpoint_with_prefix_and_other_targets(vqp):
    """A model that swapped VectorQuantize for Quantizer loads the old model's checkpoint."""
    theirs = _trained_vqp(vqp)

    class Old(nn.Module):
        def __init__(self, vq):
            super().__init__()
            self.encoder, self.quantizer = nn.Linear(8, 8), vq

    class New(nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.encoder, self.quantizer = nn.Linear(8, 8), Quantizer(8, 32, **kw)

    state = Old(theirs).state_dict()
    new = New()
    new.load_state_dict(state, strict=True)
    _same_eval_outputs(theirs, new.quantizer, torch.randn(2, 30, 8))
    # a gradient-learned target drops the EMA sums; a deferred one is past its switch
    grad = New(learning="gradient")
    grad.load_state_dict(state, strict=True)
    torch.testing.assert_close(grad.quantizer.embed.data, theirs.codebook)
    deferred = New(deferred_steps=10)
    deferred.load_state_dict(state, strict=True)
    assert deferred.quantizer.is_quantizing and deferred.quantizer.reservoir.numel() == 0
    built = Quantizer.from_pretrained_state(state, prefix="quantizer.")
    _same_eval_outputs(theirs, built, torch.randn(2, 30, 8))


def test_vector_quantize_pytorch_kmeans_init_not_yet_run(vqp):
    theirs = vqp.VectorQuantize(dim=8, codebook_size=16, kmeans_init=True)
    ours = Quantizer(8, 16, init="kmeans")
    ours.load_state_dict(theirs.state_dict())
    assert not bool(ours.initted) and not ours._initted
    ours(torch.randn(64, 8))  # the first training batch initialises, as theirs would
    assert bool(ours.initted) and float(ours.codebook.abs().sum()) > 0


def test_vector_quantize_pytorch_separate_heads_into_one_codebook_is_refused(vqp):
    theirs = vqp.VectorQuantize(dim=8, codebook_size=16, heads=2, codebook_dim=4, separate_codebook_per_head=True)
    with pytest.raises(RuntimeError, match=r"2 separate codebooks \(2, 16, 4\), this Quantizer one codebook .*separate_codebook_per_head"):
        Quantizer(8, 16, codebook_dim=4).load_state_dict(theirs.state_dict())
    with pytest.raises(RuntimeError, match="one codebook \\(16, 4\\), this Quantizer 2 separate codebooks"):
        Quantizer(8, 16, codebook_dim=4, heads=2, separate_codebook_per_head=True).load_state_dict(
            vqp.VectorQuantize(dim=8, codebook_size=16, heads=2, codebook_dim=4).state_dict()
        )
    # (loading them into the right Quantizer: tests/test_heads.py)


# ---------------------------------------------------------------- taming-transformers
def test_taming_vector_quantizer2_layout():
    """VectorQuantizer2: codes in embedding.weight, inputs [B, C, H, W], nearest code by L2,
    legacy loss beta * ||z - sg[q]||^2 + ||sg[z] - q||^2 with beta = 0.25."""
    torch.manual_seed(0)
    K, C = 24, 6
    weight = torch.empty(K, C).uniform_(-1 / K, 1 / K) * 40
    state = {"quantize.embedding.weight": weight, "encoder.weight": torch.randn(3, 3)}
    assert checkpoints.detect_layout(state, "quantize.") == checkpoints.TAMING
    ours = Quantizer.from_pretrained_state(state, prefix="quantize.")
    assert ours.learning == "gradient" and not ours.channel_last and ours.commitment_weight == 0.25
    z = torch.randn(2, C, 5, 7)
    flat = z.permute(0, 2, 3, 1).reshape(-1, C)
    d = (flat.pow(2).sum(1, keepdim=True) + weight.pow(2).sum(1) - 2 * flat @ weight.t())
    idx = d.argmin(1)
    z_q = weight[idx].view(2, 5, 7, C).permute(0, 3, 1, 2)
    q, indices, loss = ours(z)
    assert torch.equal(indices.reshape(-1), idx)
    torch.testing.assert_close(q, z_q)
    torch.testing.assert_close(loss, 1.25 * (z_q - z).pow(2).mean())
    ema = Quantizer(C, K, channel_last=False)  # an EMA target starts its statistics at one per code
    ema.load_state_dict({"embedding.weight": weight})
    torch.testing.assert_close(ema.embed_avg, weight)
    with pytest.raises(RuntimeError, match="remapping"):
        Quantizer(C, K).load_state_dict({"embedding.weight": weight, "used": torch.arange(K)})


# ---------------------------------------------------------------- encodec / audiocraft
def _encodec_state(K=16, D=6, seed=0, prefix=""):
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(K, D, generator=g)
    cluster_size = torch.rand(K, generator=g) * 5
    return {
        prefix + "inited": torch.Tensor([True]),
        prefix + "cluster_size": cluster_size,
        prefix + "embed": embed,
        prefix + "embed_avg": embed * (cluster_size + 0.3).unsqueeze(1),
    }


def test_encodec_euclidean_codebook_layout_and_ema_step():
    state = _encodec_state()
    assert checkpoints.detect_layout(state) == checkpoints.ENCODEC
    ours = Quantizer.from_pretrained_state(state, dead_code_threshold=0.0)
    assert ours.decay == 0.99
    x = torch.randn(40, 6)
    _, idx, _ = ours(x)  # training: nearest code, then EuclideanCodebook's EMA step
    embed, cs, ea = state["embed"], state["cluster_size"], state["embed_avg"]
    assert torch.equal(idx, torch.cdist(x, embed).argmin(1))
    onehot = torch.nn.functional.one_hot(idx, 16).float()
    cs = cs * 0.99 + onehot.sum(0) * 0.01
    ea = ea * 0.99 + (onehot.t() @ x) * 0.01
    n = cs.sum()
    smoothed = (cs + 1e-5) / (n + 16 * 1e-5) * n
    torch.testing.assert_close(ours.cluster_size, cs)
    torch.testing.assert_close(ours.codebook, ea / smoothed.unsqueeze(1))


def test_encodec_vector_quantization_with_projections():
    state = _encodec_state(prefix="_codebook.")
    state.update({"project_in.weight": torch.randn(6, 10), "project_in.bias": torch.randn(6)})
    state.update({"project_out.weight": torch.randn(10, 6), "project_out.bias": torch.randn(10)})
    ours = Quantizer.from_pretrained_state(state)
    assert (ours.dim, ours.codebook_dim) == (10, 6)
    ours.eval()
    x = torch.randn(7, 10)
    _, idx, _ = ours(x)
    z = x @ state["project_in.weight"].t() + state["project_in.bias"]
    assert torch.equal(idx, torch.cdist(z, state["_codebook.embed"]).argmin(1))


# ---------------------------------------------------------------- unknown layouts
def test_unknown_layout_lists_the_keys_and_the_layouts_understood():
    state = {"codes": torch.randn(8, 4), "usage": torch.ones(8)}
    with pytest.raises(checkpoints.UnknownLayoutError) as info:
        Quantizer.from_pretrained_state(state)
    message = str(info.value)
    for needle in ("codes (8, 4)", "usage (8,)", "vector-quantize-pytorch", "taming-transformers", "encodec", "vqkernels"):
        assert needle in message, (needle, message)
    with pytest.raises(RuntimeError, match="Layouts understood"):
        Quantizer(4, 8).load_state_dict(state)
    # a whole model's checkpoint loaded without the prefix: the message names where codebooks are
    with pytest.raises(RuntimeError, match="'model.quantize.'"):
        Quantizer(4, 8).load_state_dict({"model.quantize.embedding.weight": torch.randn(8, 4)})
    Quantizer(4, 8).load_state_dict({}, strict=False)  # not strict: missing keys, no error
