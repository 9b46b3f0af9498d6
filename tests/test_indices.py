"""vqkernels/ops/_indices.py, the index helpers shared by the histogram and cluster_stats
backends, against element-by-element loops: codebook offsets, the extra bin for masked
entries, the flat ``C * K`` bins. Every input dtype the ops accept (int32 / int64) and
masked values other than -1 (any negative index is masked)."""
import pytest
import torch

from vqkernels.ops._indices import binned_indices, flat_bins, offset_heads


def _indices(C, N, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-3, K, (C, N), generator=g).to(dtype)  # -3 .. -1 are masked
    idx[0, 0] = -1
    idx[-1, -1] = K - 1
    return idx


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(1, 5), (3, 7), (4, 2, 3)], ids=str)
def test_offset_heads_is_c_times_k_plus_k_and_keeps_masked_entries(dtype, shape):
    K = 5
    idx = _indices(shape[0], int(torch.tensor(shape[1:]).prod()), K, dtype).view(shape)
    out = offset_heads(idx, K)
    assert out.dtype == dtype and out.shape == idx.shape
    for pos in torch.cartesian_prod(*[torch.arange(s) for s in shape]).view(-1, len(shape)).tolist():
        v = int(idx[tuple(pos)])
        want = pos[0] * K + v if v >= 0 else v
        assert int(out[tuple(pos)]) == want, (pos, v)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_binned_indices_moves_every_negative_entry_to_bin_k(dtype):
    K = 6
    idx = _indices(2, 9, K, dtype).view(-1)
    out = binned_indices(idx, K)
    assert out.dtype == torch.int64
    assert out.tolist() == [v if v >= 0 else K for v in idx.tolist()]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("C, N, K", [(1, 6, 4), (3, 8, 5), (2, 1, 1)])
def test_flat_bins_are_the_c_times_k_plus_k_bins_with_masked_in_the_last(dtype, C, N, K):
    idx = _indices(C, N, K, dtype, seed=C * 100 + N)
    out = flat_bins(idx, K)
    assert out.dtype == torch.int64 and out.shape == (C * N,)
    want = [c * K + v if v >= 0 else C * K for c in range(C) for v in idx[c].tolist()]
    assert out.tolist() == want
    # one bincount over C * K + 1 bins is every codebook's histogram plus the masked count
    counts = torch.bincount(out, minlength=C * K + 1)
    assert counts.shape == (C * K + 1,)
    for c in range(C):
        assert counts[c * K : (c + 1) * K].tolist() == [int((idx[c] == k).sum()) for k in range(K)]
    assert int(counts[C * K]) == int((idx < 0).sum())
