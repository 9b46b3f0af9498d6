"""Per-stage codebook sizes in a residual stack (``codebook_size=(5, 128, 256)``): the codebook
axis stores every stage ``max K`` wide; the padding never wins, never updates, is never dead."""
import pytest
import torch

from helpers import exact_distances, loop_argmin, randn
from vqkernels import GroupedResidualQuantizer, ResidualQuantizer

SIZES = (5, 16, 32)


def _reference(x, codes, sizes):
    """fp64 stage loop over each stage's own codes ``codes[q, :K_q]`` (ties to the lowest index)."""
    res, idx = x.double(), []
    for c, k in zip(codes, sizes):
        i = loop_argmin(exact_distances(res, c[:k], "l2"))
        idx.append(i)
        res = res - c[:k].double()[i]
    return torch.stack(idx, -1), x.double() - res


def test_layout_and_eval_matches_per_stage_reference():
    rq = ResidualQuantizer(6, 3, SIZES).eval()
    book = rq.codebook_state
    assert rq.codebook_sizes == SIZES and rq.codebook_size == 32 and book.embed.shape == (3, 32, 6)
    for q, k in enumerate(SIZES):  # the padding holds zero codes and zero statistics
        assert not book.embed[q, k:].any() and not book.cluster_size[q, k:].any() and not book.embed_avg[q, k:].any()
    # inputs near the origin: a zero code (the padding) would be the nearest if it could win
    x = randn(200, 6, seed=1) * 1e-3
    out, indices, _ = rq(x)
    ref_idx, ref_out = _reference(x, book.embed, SIZES)
    assert torch.equal(indices, ref_idx)
    assert (indices < torch.tensor(SIZES)).all()
    torch.testing.assert_close(out.double(), ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rq.decode(indices), out)


def test_training_matches_residual_vq_with_per_stage_sizes():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    ref = vqp.ResidualVQ(dim=6, num_quantizers=3, codebook_size=SIZES, decay=0.8)
    rq = ResidualQuantizer.from_pretrained_state(ref.state_dict(), decay=0.8)
    assert rq.codebook_sizes == SIZES
    ref.train(), rq.train()
    for step in range(3):
        x = randn(64, 6, seed=10 + step)
        q_ref, i_ref, l_ref = ref(x.unsqueeze(0))
        q, i, losses = rq(x)
        assert torch.equal(i, i_ref[0]), step
        torch.testing.assert_close(q, q_ref[0], atol=5e-5, rtol=1e-4)
        torch.testing.assert_close(losses, l_ref.reshape(-1), atol=1e-5, rtol=1e-5)
        for s, k in enumerate(SIZES):
            cb = ref.layers[s]._codebook
            # Laplace smoothing sees the stored width: eps * (32 - k) more in a sum of 64 rows
            torch.testing.assert_close(rq.codebook_state.embed[s, :k], cb.embed[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rq.codebook_state.cluster_size[s, :k], cb.cluster_size[0], atol=1e-5, rtol=1e-5)
            assert not rq.codebook_state.embed[s, k:].any() and not rq.codebook_state.cluster_size[s, k:].any()
    ref.eval(), rq.eval()
    x = randn(50, 6, seed=99)
    assert torch.equal(rq(x).indices, ref(x.unsqueeze(0))[1][0])


def test_dead_code_restarts_skip_the_padding():
    rq = ResidualQuantizer(4, 2, (3, 8), dead_code_threshold=0.5, decay=0.0)
    x = randn(16, 4, seed=2) + 5.0  # far from the codes: one code per stage takes every row
    rq(x)
    book = rq.codebook_state
    assert not book.embed[0, 3:].any() and not book.cluster_size[0, 3:].any() and not book.embed_avg[0, 3:].any()
    # every real code is used or re-seeded from the batch's residuals; the padding stays zero
    assert (book.cluster_size[0, :3] >= 0.5).all() and (book.cluster_size[1] >= 0.5).all()
    assert (book.cluster_size == 0.5).sum() >= 2  # restarts happened (size reset to the threshold)


@pytest.mark.parametrize("init", ["kmeans", "random"])
def test_stagewise_init_per_stage_size(init):
    rq = ResidualQuantizer(5, 3, (2, 7, 4), init=init, kmeans_iters=2)
    rq(randn(40, 5, seed=3))
    book = rq.codebook_state
    for q, k in enumerate((2, 7, 4)):
        assert book.embed[q, :k].abs().sum(-1).gt(0).all() and not book.embed[q, k:].any()
        assert not book.cluster_size[q, k:].any()


def test_grouped_per_stage_sizes_and_decode_range():
    grq = GroupedResidualQuantizer(8, 2, 2, (3, 6)).eval()
    assert grq.codebook_state.embed.shape == (4, 6, 4)
    out, indices, _ = grq(randn(10, 8, seed=4))
    assert indices.shape == (2, 10, 2) and (indices[..., 0] < 3).all()
    torch.testing.assert_close(grq.decode(indices), out)
    bad = indices.clone()
    bad[0, 0, 0] = 4  # valid for the stored width (6), not for stage 0 (3 codes)
    with pytest.raises(ValueError, match=r"codebook_sizes=\(3, 6\)"):
        grq.decode(bad)


def test_diagnostics_count_each_stage_over_its_own_codes():
    from vqkernels import diagnostics as dg

    rq = ResidualQuantizer(6, 3, SIZES, decay=0.5)
    for step in range(3):
        rq(randn(300, 6, seed=20 + step))
    rq.eval()
    monitor = dg.CodebookMonitor(rq)
    monitor.update(rq(randn(400, 6, seed=30)).indices)
    usage = monitor.unit_usage()
    assert [usage[f"stage {q}"].codebook_size for q in range(3)] == list(SIZES)
    assert all(usage[f"stage {q}"].used_codes + usage[f"stage {q}"].dead_codes == k for q, k in enumerate(SIZES))
    assert monitor.usage().codebook_size == sum(SIZES)
    health = dg.codebook_health(rq)
    assert [health[f"stage {q}"]["codebook_size"] for q in range(3)] == list(SIZES)


@pytest.mark.parametrize("learning", ["ema", "gradient"])
def test_freeze_codebook_quantizes_without_updating(learning):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(1)
    ref = vqp.ResidualVQ(dim=6, num_quantizers=3, codebook_size=SIZES)
    rq = ResidualQuantizer.from_pretrained_state(ref.state_dict(), learning=learning).train()
    ref.train()
    before = {k: v.clone() for k, v in rq.state_dict().items()}
    x = randn(40, 6, seed=7)
    out = rq(x, freeze_codebook=True)
    q_ref, i_ref, l_ref = ref(x.unsqueeze(0), freeze_codebook=True)
    assert torch.equal(out.indices, i_ref[0])
    torch.testing.assert_close(out.quantized, q_ref[0], atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(out.losses, l_ref.reshape(-1), atol=1e-5, rtol=1e-5)  # commitment only
    for k, v in rq.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed under freeze_codebook"
    unfrozen = rq(x)  # the same step unfrozen: same output, and the codebooks move
    assert torch.equal(unfrozen.indices, out.indices)
    assert not torch.equal(rq.codebook_state.cluster_size, before["codebook_state.cluster_size"])
