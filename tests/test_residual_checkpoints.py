"""Residual quantizers read from EnCodec's and DAC's checkpoint layouts: the same indices and
outputs in eval as the real EnCodec quantizer (when the ``encodec`` package is installed) and
as an fp64 re-implementation of DAC's ``ResidualVectorQuantize`` forward."""
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from helpers import randn
from vqkernels import ResidualQuantizer
from vqkernels import FactorizedResidualQuantizer


# --------------------------------------------------------------------------- EnCodec
@pytest.fixture
def encodec_vq():
    """encodec's quantization modules. Its package ``__init__`` imports the audio model (and
    torchaudio); the quantizer needs neither, so without torchaudio the package is stood in for
    by an empty module over the same folder and only ``encodec.quantization`` is imported."""
    spec = importlib.util.find_spec("encodec")
    if spec is None:
        pytest.skip("the encodec package is not installed (pip install encodec)")
    saved = {k: v for k, v in sys.modules.items() if k == "encodec" or k.startswith("encodec.")}
    try:
        try:
            import encodec.quantization.vq as vq
        except ImportError:
            for k in [k for k in sys.modules if k == "encodec" or k.startswith("encodec.")]:
                del sys.modules[k]
            pkg = types.ModuleType("encodec")
            pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules["encodec"] = pkg
            import encodec.quantization.vq as vq
        yield vq
    finally:
        for k in [k for k in sys.modules if k == "encodec" or k.startswith("encodec.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_encodec_residual_vector_quantizer_eval_parity(encodec_vq):
    torch.manual_seed(0)
    D, Q, K = 12, 4, 32
    rvq = encodec_vq.ResidualVectorQuantizer(dimension=D, n_q=Q, bins=K, kmeans_iters=5)
    rvq.train()
    for step in range(3):  # k-means init on the first batch, then EMA steps and dead-code expiry
        rvq(randn(2, D, 40, seed=step), sample_rate=24000)
    rvq.eval()
    rq = ResidualQuantizer.from_pretrained_state(rvq.state_dict())
    assert (rq.num_quantizers, rq.codebook_size, rq.dim) == (Q, K, D)
    assert rq.codebook_state.decay == 0.99 and rq.codebook_state.dead_code_threshold == 2.0  # EnCodec's defaults
    x = randn(3, D, 25, seed=9)  # EnCodec is channel-first [B, D, T]
    with torch.no_grad():
        want_codes = rvq.vq.encode(x)  # [Q, B, T]
        want_out = rvq.vq(x)[0]  # [B, D, T]
        got = rq(x.transpose(1, 2))
    assert torch.equal(got.indices, want_codes.permute(1, 2, 0))
    torch.testing.assert_close(got.quantized.transpose(1, 2), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rq.decode(got.indices).transpose(1, 2), rvq.vq.decode(want_codes), atol=1e-5, rtol=1e-5)
    for q in range(Q):  # statistics carried over
        cb = rvq.vq.layers[q]._codebook
        assert torch.equal(rq.codebook_state.cluster_size[q], cb.cluster_size)
        assert torch.equal(rq.codebook_state.embed_avg[q], cb.embed_avg)


def _encodec_layout_state(Q, K, D, prefix="vq."):
    """EnCodec's documented residual layout: ``vq.layers.<q>._codebook.{inited, cluster_size, embed, embed_avg}``."""
    state = {}
    for q in range(Q):
        embed = randn(K, D, seed=q)
        size = torch.rand(K) + 0.5
        state[f"{prefix}layers.{q}._codebook.inited"] = torch.tensor([1.0])
        state[f"{prefix}layers.{q}._codebook.cluster_size"] = size
        state[f"{prefix}layers.{q}._codebook.embed"] = embed
        state[f"{prefix}layers.{q}._codebook.embed_avg"] = embed * size[:, None]
    return state


def test_encodec_documented_layout_matches_stage_loop():
    Q, K, D = 3, 16, 5
    state = _encodec_layout_state(Q, K, D, prefix="quantizer.vq.")
    rq = ResidualQuantizer.from_pretrained_state(state, prefix="quantizer.")
    x = randn(30, D, seed=4).double()
    res, want = x.clone(), []
    for q in range(Q):  # EnCodec's quantize: argmax of -(|x|^2 - 2 x.e + |e|^2)
        e = state[f"quantizer.vq.layers.{q}._codebook.embed"].double()
        idx = (-(res.pow(2).sum(1, keepdim=True) - 2 * res @ e.t() + e.pow(2).sum(1))).max(-1).indices
        want.append(idx)
        res = res - e[idx]
    out = rq(x.float())
    assert torch.equal(out.indices, torch.stack(want, -1))
    torch.testing.assert_close(out.quantized.double(), x - res, atol=1e-5, rtol=1e-5)


def test_encodec_per_stage_projections_are_refused():
    state = _encodec_layout_state(2, 4, 3)
    state["vq.layers.0.project_in.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"not per stage.*vq.layers.0.project_in.weight"):
        ResidualQuantizer.from_pretrained_state(state)


# --------------------------------------------------------------------------- DAC
def _dac_state(Q, K, d, dim, parametrizations=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for q in range(Q):
        base = f"quantizers.{q}."
        for side, (o, i) in (("in", (d, dim)), ("out", (dim, d))):
            v = torch.randn(o, i, 1, generator=g)
            gain = torch.rand(o, 1, 1, generator=g) + 0.5
            if parametrizations:  # torch.nn.utils.parametrizations.weight_norm
                state[base + f"{side}_proj.parametrizations.weight.original0"] = gain
                state[base + f"{side}_proj.parametrizations.weight.original1"] = v
            else:  # torch.nn.utils.weight_norm (DAC's WNConv1d)
                state[base + f"{side}_proj.weight_g"] = gain
                state[base + f"{side}_proj.weight_v"] = v
            state[base + f"{side}_proj.bias"] = torch.randn(o, generator=g)
        state[base + "codebook.weight"] = torch.randn(K, d, generator=g)
    return state


def _dac_forward_fp64(state, z, Q):
    """DAC's ResidualVectorQuantize.forward in eval (all stages), fp64, channel-first ``z [B, dim, T]``."""
    z = z.double()
    out, residual, codes = torch.zeros_like(z), z, []

    def conv(prefix, x):
        if prefix + ".weight_g" in state:
            gain, v = state[prefix + ".weight_g"], state[prefix + ".weight_v"]
        else:
            gain, v = state[prefix + ".parametrizations.weight.original0"], state[prefix + ".parametrizations.weight.original1"]
        w = gain.double() * v.double() / v.double().norm(dim=(1, 2), keepdim=True)
        return F.conv1d(x, w, state[prefix + ".bias"].double())

    for q in range(Q):
        z_e = conv(f"quantizers.{q}.in_proj", residual)
        B = z_e.shape[0]
        enc = F.normalize(z_e.transpose(1, 2).reshape(-1, z_e.shape[1]))
        book = state[f"quantizers.{q}.codebook.weight"].double()
        cb = F.normalize(book)
        dist = enc.pow(2).sum(1, keepdim=True) - 2 * enc @ cb.t() + cb.pow(2).sum(1, keepdim=True).t()
        idx = (-dist).max(1)[1].reshape(B, -1)
        z_q = conv(f"quantizers.{q}.out_proj", F.embedding(idx, book).transpose(1, 2))
        out, residual = out + z_q, residual - z_q
        codes.append(idx)
    return out, torch.stack(codes, 1)  # [B, dim, T], [B, Q, T]


@pytest.mark.parametrize("parametrizations", [False, True], ids=["weight_g_v", "parametrizations"])
def test_dac_layout_matches_fp64_forward(parametrizations):
    Q, K, d, dim = 9, 64, 8, 24  # DAC: 9 stages of 8-D l2-normalised codes (K = 1024 in the real model)
    state = _dac_state(Q, K, d, dim, parametrizations)
    rq = FactorizedResidualQuantizer.from_pretrained_state(state)
    assert (rq.num_quantizers, rq.codebook_size, rq.codebook_dim, rq.dim) == (Q, K, d, dim)
    z = randn(2, dim, 30, seed=1)
    want_out, want_codes = _dac_forward_fp64(state, z, Q)
    with torch.no_grad():
        got = rq(z.transpose(1, 2))
    assert torch.equal(got.indices, want_codes.transpose(1, 2))
    torch.testing.assert_close(got.quantized.transpose(1, 2).double(), want_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rq.decode(got.indices), got.quantized, atol=1e-5, rtol=1e-5)


def test_dac_training_step_runs_and_learns_codebooks():
    rq = FactorizedResidualQuantizer(6, 3, 8, 4)
    before = rq.codebook.detach().clone()
    out, indices, losses = rq(randn(16, 6, seed=2))
    (out.pow(2).mean() + losses.sum()).backward()
    assert losses.shape == (3,) and rq.codebook.grad is not None and rq.in_proj[0].weight.grad is not None
    torch.optim.SGD(rq.parameters(), lr=0.1).step()
    assert not torch.equal(rq.codebook, before)


def test_unreadable_layouts_list_keys_found_and_expected():
    state = _dac_state(2, 4, 2, 3)
    del state["quantizers.1.out_proj.bias"]
    with pytest.raises(ValueError, match=r"expected .*quantizers.<q>.out_proj.*found keys \[.*quantizers.0.codebook.weight"):
        FactorizedResidualQuantizer.from_pretrained_state(state)
    with pytest.raises(ValueError, match=r"the state dict has 2"):
        FactorizedResidualQuantizer.from_pretrained_state(_dac_state(2, 4, 2, 3), num_quantizers=3)
    with pytest.raises(ValueError, match=r"expected .*quantizers.<q>.*found keys \[layers.0"):
        FactorizedResidualQuantizer.from_pretrained_state({"layers.0._codebook.embed": torch.zeros(1, 2, 2)})
    with pytest.raises(ValueError, match=r"expected .*layers.<q>._codebook.embed.*EnCodec.*found keys \[quantizers.0"):
        ResidualQuantizer.from_pretrained_state(_dac_state(1, 4, 2, 3))
    bad = _dac_state(2, 4, 2, 3)
    bad["quantizers.1.codebook.weight"] = torch.zeros(5, 2)
    with pytest.raises(ValueError, match="stage 1 has"):
        FactorizedResidualQuantizer.from_pretrained_state(bad)
