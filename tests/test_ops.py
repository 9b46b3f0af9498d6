"""Every backend of every op against the definition, on fresh random inputs.

The definition is written out in tests/helpers.py (fp64 closed forms, plain loops), not
taken from the package's reference backend, so the reference cases test values too.

Backends and devices come from conftest.backend_cases(): reference and chunked always,
triton under the interpreter on CPU (small shapes) and on CUDA, cuda where the extension
loads. Shapes sit at tile edges and in awkward places (N=1, K=1, D=1, D=3, D=257).
"""
import pytest
import torch

import vqkernels
from conftest import FAST_BACKEND_CASES, backend_cases, dtypes_for, interpreted
from helpers import (
    check_assign,
    check_assign_centred,
    closed_form_ema,
    exact_distances,
    first_mismatches,
    loop_argmin,
    loop_cluster_stats,
    loop_histogram,
)

ALL = backend_cases()

ASSIGN_SHAPES = [(1, 1, 1), (1, 5, 3), (7, 1, 3), (130, 37, 3), (257, 130, 33), (33, 70, 257), (64, 300, 16)]
METRICS = ["l2", "cosine", "dot"]


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


def _rand(*shape, dtype, device, seed, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype).to(device)


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("N,K,D", ASSIGN_SHAPES)
def test_assign_matches_reference(backend, device, metric, N, K, D):
    for i, dtype in enumerate(dtypes_for(backend, device)):
        x = _rand(N, D, dtype=dtype, device=device, seed=N * 7 + K + D + i)
        codebook = _rand(K, D, dtype=dtype, device=device, seed=K * 13 + D + i)
        indices, distances = vqkernels.assign(x, codebook, metric, backend=backend)
        assert indices.shape == (N,) and distances.shape == (N,)
        assert distances.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        check_assign(x, codebook, metric, indices, distances)


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("metric", METRICS)
def test_assign_exact_ties_go_to_lowest_index(backend, device, metric, monkeypatch):
    # Small chunked tiles so that copies of a code land in different K tiles.
    monkeypatch.setenv("VQKERNELS_CHUNK_ELEMENTS", "2048")
    K, D = 200, 16
    codebook = _rand(K, D, dtype=torch.float32, device=device, seed=1)
    for copy_from, copy_to in ((5, 150), (5, 199), (40, 41), (17, 130)):
        codebook[copy_to] = codebook[copy_from]
    # rows equal to (or right next to) duplicated codes, and rows equidistant by construction
    x = torch.cat([codebook[[5, 40, 17, 150, 41]], codebook[[5, 40, 17]] + 1e-3])
    indices, distances = vqkernels.assign(x, codebook, metric, backend=backend)
    expected = torch.tensor([5, 40, 17, 5, 40, 5, 40, 17])
    assert torch.equal(indices.cpu(), expected), first_mismatches(indices.cpu() != expected, indices.cpu(), expected)
    check_assign(x, codebook, metric, indices, distances)


def _offset_problem(device="cpu"):
    """Codes and rows at a common offset of norm 1e4 (D = 32): true distances 13-53."""
    D = 32
    offset = _rand(D, dtype=torch.float64, device="cpu", seed=3)
    offset = offset / offset.norm() * 1e4
    codebook = (offset + _rand(100, D, dtype=torch.float64, device="cpu", seed=4)).float().to(device)
    x = (offset + _rand(200, D, dtype=torch.float64, device="cpu", seed=5)).float().to(device)
    return x, codebook


@pytest.mark.parametrize("backend,device", ALL)
def test_assign_large_norm_inputs(backend, device):
    # ||x||^2 - 2x.c + ||c||^2 cancels catastrophically at norm ~1e4; the chosen code must
    # still be within the dtype tolerance of the true minimum.
    x, codebook = _offset_problem(device)
    D = x.shape[1]
    random_big = _rand(50, D, dtype=torch.float32, device=device, seed=6, scale=1e4 / D**0.5)
    for xs in (x, random_big):
        indices, distances = vqkernels.assign(xs, codebook, "l2", backend=backend)
        check_assign(xs, codebook, "l2", indices, distances)


# Without a shift, the Triton and CUDA kernels' expanded score ||c||^2 - 2x.c cancelled at
# this offset: their picks were up to 31.6 farther than the nearest (142 of 200 rows on the
# Triton interpreter, allowed 0.0024). They now shift x and the codes by the codebook's
# rounded mean (vqkernels/ops/assign/_centre.py); chunked centres on the mean.
@pytest.mark.parametrize("backend,device", ALL)
def test_assign_large_offset_picks_at_the_codes_scale(backend, device):
    # check_assign's allowance here is about 4000 (from |x|^2 ~ 1e8) while the true distances
    # are 13-53: the cancellation case is judged at the codes' own scale instead.
    x, codebook = _offset_problem(device)
    indices, _ = vqkernels.assign(x, codebook, "l2", backend=backend)
    check_assign_centred(x, codebook, indices)


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("D", [16, 80])
def test_assign_large_offset_per_codebook(backend, device, D):
    """Codebook axis: codebook 0 sits at an offset of norm 1e4 (shifted), codebook 1 at none
    (not shifted), codebook 2 at an offset too small to shift; each judged at its own scale.
    On the Triton interpreter D = 16 keeps the row block resident (ONE_CHUNK) and D = 80 loops
    over D chunks (fp32 "highest" rows over 256 staged bytes)."""
    offsets = [1e4, 0.0, 1.0]
    xs, cbs = [], []
    for c, norm in enumerate(offsets):
        direction = _rand(D, dtype=torch.float64, device="cpu", seed=40 + c)
        offset = direction / direction.norm() * norm
        cbs.append(offset + _rand(70, D, dtype=torch.float64, device="cpu", seed=50 + c))
        xs.append(offset + _rand(40, D, dtype=torch.float64, device="cpu", seed=60 + c))
    x, codebook = torch.stack(xs).float().to(device), torch.stack(cbs).float().to(device)
    indices, distances = vqkernels.assign(x, codebook, "l2", backend=backend)
    for c in range(len(offsets)):
        check_assign_centred(x[c], codebook[c], indices[c])
        check_assign(x[c], codebook[c], "l2", indices[c], distances[c])


def test_l2_shift_rule():
    """_centre (the Triton and CUDA launchers' rule): a codebook dominated by its offset gets
    its mean rounded to bf16, the others exactly 0 (so their shifted copies are the inputs
    bit for bit); 16-bit codebooks need a far larger offset; the copies are x - m rounded
    once to the input dtype."""
    from vqkernels.ops.assign import _centre

    x, cb = _offset_problem()
    plain = _rand(100, 32, dtype=torch.float32, device="cpu", seed=7)
    codebooks = torch.stack([cb, plain, plain + 1.0])  # offset 1e4 / none / too small (|m|^2 ~ spread)
    centre = _centre.l2_centre(codebooks)
    assert torch.equal(centre[0], cb.mean(0).bfloat16().float()) and bool(centre[0].ne(0).all())
    assert bool(centre[1:].eq(0).all())
    # bf16: the same offset of 1e4 next to a spread of ~32 is dominated past 2^15 too; 10 is not
    assert bool(_centre.l2_centre(cb.unsqueeze(0).bfloat16()).ne(0).all())
    assert bool(_centre.l2_centre((plain + 10.0).bfloat16().unsqueeze(0)).eq(0).all())
    xs = _centre.shifted(x.unsqueeze(0).half(), centre[:1])
    assert xs.dtype == torch.float16 and torch.equal(xs[0], (x.half().float() - centre[0]).half())
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # a zero shift changes no bit (-0.0 included)
        t = torch.cat([_rand(3, 50, 32, dtype=torch.float32, device="cpu", seed=8), torch.full((3, 1, 32), -0.0)], 1)
        t = t.to(dtype)
        same = _centre.shifted(t, centre)[1:]
        assert same.dtype == dtype and torch.equal(same.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                                   t[1:].view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_cuda_launcher_passes_the_l2_shift(monkeypatch):
    """The cuda backend's Python side hands the op the shift for every l2 call (zeros where no
    offset dominates: no host sync to decide), None for the other metrics (the C++ op applies
    it; GPU-tested)."""
    from vqkernels import _extension
    from vqkernels.ops.assign import cuda as cuda_assign

    seen = []

    class FakeOps:
        def assign_cuda(self, x, codebook, metric, centre=None):
            seen.append(centre)
            return None

    monkeypatch.setattr(_extension, "ops", lambda: FakeOps())
    x, cb = _offset_problem()
    cuda_assign.assign(x.unsqueeze(0), cb.unsqueeze(0), "l2")
    cuda_assign.assign(x.unsqueeze(0), cb.unsqueeze(0), "cosine")
    cuda_assign.assign(x.unsqueeze(0) - cb.mean(0), (cb - cb.mean(0)).unsqueeze(0), "l2")
    assert seen[0].shape == (1, 32) and bool(seen[0].ne(0).all()) and seen[1] is None
    assert seen[2].shape == (1, 32) and bool(seen[2].eq(0).all())


@pytest.mark.parametrize("backend,device", [c for c in ALL if c.values[0] == "triton"])
def test_triton_l2_shift_does_not_sync(backend, device):
    """Deciding the l2 shift reads nothing back to the host (test_no_sync's counter), for a
    codebook that shifts and one that does not."""
    from test_no_sync import SyncCounter

    x, cb = _offset_problem(device)
    for shift in (0.0, 1.0):
        counter = SyncCounter()
        with counter:
            vqkernels.assign(x - shift * cb.mean(0), cb - shift * cb.mean(0), "l2", backend=backend,
                             check_codebook=False)
        assert not counter.hits, list(counter.hits)[:3]


def test_large_norm_check_rejects_wrong_picks():
    """The centred check is strict enough to matter: code 0 for every row, or the farthest
    code, both fail it (and both pass the uncentred allowance)."""
    x, codebook = _offset_problem()
    d = exact_distances(x, codebook, "l2")
    for name, wrong in (("code 0", torch.zeros(200, dtype=torch.int64)), ("farthest", d.argmax(1))):
        with pytest.raises(AssertionError, match="not nearest at the codes' scale"):
            check_assign_centred(x, codebook, wrong)
        fake_distances = d.gather(1, wrong.view(-1, 1)).squeeze(1).float()
        check_assign(x, codebook, "l2", wrong, fake_distances)  # the uncentred allowance lets it pass
    check_assign_centred(x, codebook, loop_argmin(d))


def test_chunked_centering_makes_offset_inputs_exact():
    """The chunked backend centres on the codebook mean, so a large common offset costs no accuracy."""
    D = 32
    offset = torch.full((D,), 1e4 / D**0.5, dtype=torch.float64)
    codebook = (offset + _rand(100, D, dtype=torch.float64, device="cpu", seed=7)).float()
    x = (offset + _rand(500, D, dtype=torch.float64, device="cpu", seed=8)).float()
    got = vqkernels.assign(x, codebook, backend="chunked").indices
    want = vqkernels.assign(x.double(), codebook.double(), backend="reference").indices
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("metric", METRICS)
def test_assign_nonfinite_rows_get_minus_one(backend, device, metric):
    x = _rand(20, 8, dtype=torch.float32, device=device, seed=9)
    codebook = _rand(16, 8, dtype=torch.float32, device=device, seed=10)
    x[3, 2] = float("nan")
    x[7, 0] = float("inf")
    x[11] = float("-inf")
    indices, distances = vqkernels.assign(x, codebook, metric, backend=backend)
    bad = torch.zeros(20, dtype=torch.bool)
    bad[[3, 7, 11]] = True
    assert (indices.cpu()[bad] == -1).all()
    assert distances.cpu()[bad].isnan().all()
    check_assign(x[~bad.to(device)], codebook, metric, indices[~bad.to(device)], distances[~bad.to(device)])


@pytest.mark.parametrize("backend,device", ALL)
def test_assign_leading_dims_heads_and_empty(backend, device):
    codebook = _rand(12, 5, dtype=torch.float32, device=device, seed=11)
    x = _rand(2, 3, 4, 5, dtype=torch.float32, device=device, seed=12)
    indices, distances = vqkernels.assign(x, codebook, backend=backend)
    flat = vqkernels.assign(x.reshape(-1, 5), codebook, backend=backend)
    assert indices.shape == (2, 3, 4) and torch.equal(indices.reshape(-1), flat.indices)
    # heads: x [H, ..., D] with codebook [H, K, D] equals one call per head
    heads = _rand(3, 12, 5, dtype=torch.float32, device=device, seed=13)
    xh = _rand(3, 2, 7, 5, dtype=torch.float32, device=device, seed=14)
    hi, hd = vqkernels.assign(xh, heads, backend=backend)
    assert hi.shape == (3, 2, 7)
    for h in range(3):
        one = vqkernels.assign(xh[h], heads[h], backend=backend)
        assert torch.equal(hi[h], one.indices) and torch.equal(hd[h], one.distances)
    # empty N
    empty = vqkernels.assign(x[:0], codebook, backend=backend)
    assert empty.indices.shape == (0, 3, 4) and empty.indices.dtype == torch.int64


@pytest.mark.parametrize("backend,device", ALL)
def test_assign_non_contiguous_inputs(backend, device):
    base = _rand(40, 20, dtype=torch.float32, device=device, seed=15)
    codebook = _rand(9, 10, dtype=torch.float32, device=device, seed=16).t()  # [10, 9], transposed view
    x = base[::2, :9]  # strided rows and columns
    indices, distances = vqkernels.assign(x, codebook, backend=backend)
    check_assign(x, codebook, "l2", indices, distances)


# --------------------------------------------------------------------------- histogram


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("N,K", [(1, 1), (1, 7), (300, 1), (1000, 37), (257, 300)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_histogram_matches_reference(backend, device, N, K, index_dtype):
    g = _gen(N + K)
    indices = torch.randint(-1, K, (N,), generator=g).to(index_dtype).to(device)  # -1 = masked
    counts = vqkernels.histogram(indices, K, backend=backend)
    want = torch.tensor(loop_histogram(indices, K), dtype=torch.int64)
    assert counts.dtype == torch.int64 and counts.shape == (K,)
    assert torch.equal(counts.cpu(), want), first_mismatches(counts.cpu() != want, counts.cpu(), want)
    weights = torch.rand(N, generator=g).to(device)
    weighted = vqkernels.histogram(indices, K, weights, backend=backend)
    want_w = torch.tensor(loop_histogram(indices, K, weights), dtype=torch.float64)
    assert weighted.dtype == torch.float32
    torch.testing.assert_close(weighted.cpu().double(), want_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", ALL)
def test_histogram_heads_and_all_masked(backend, device):
    indices = torch.tensor([[0, 1, 1, -1], [2, 2, 2, 0]], device=device)
    counts = vqkernels.histogram(indices, 3, heads=True, backend=backend)
    assert counts.tolist() == [[1, 2, 0], [1, 0, 3]]
    masked = torch.full((50,), -1, dtype=torch.int64, device=device)
    assert vqkernels.histogram(masked, 4, backend=backend).tolist() == [0, 0, 0, 0]
    assert vqkernels.histogram(masked[:0], 4, backend=backend).tolist() == [0, 0, 0, 0]


# --------------------------------------------------------------------------- cluster_stats


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("N,K,D", [(1, 1, 1), (5, 3, 3), (300, 37, 33), (129, 300, 257)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cluster_stats_matches_reference(backend, device, N, K, D, deterministic):
    for i, dtype in enumerate(dtypes_for(backend, device)):
        g = _gen(N * K + D + i)
        x = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype).to(device)
        indices = torch.randint(-1, K, (N,), generator=g).to(device)
        x[indices.cpu() < 0] = float("nan")  # masked rows must not leak into any statistic
        counts, sums = vqkernels.cluster_stats(x, indices, K, deterministic=deterministic, backend=backend)
        want_counts, want_sums = loop_cluster_stats(x, indices, K)
        assert counts.dtype == sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert counts.shape == (K,) and sums.shape == (K, D)
        torch.testing.assert_close(counts.cpu().double(), want_counts, rtol=0, atol=0)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(sums.cpu().double(), want_sums, rtol=tol, atol=tol * max(1, N / K))


@pytest.mark.parametrize("backend,device", FAST_BACKEND_CASES)
def test_cluster_stats_deterministic_is_bitwise_reproducible(backend, device):
    N = 300 if interpreted(backend, device) else 20000
    g = _gen(17)
    x = torch.randn(N, 24, generator=g).to(device)
    indices = torch.randint(-1, 7, (N,), generator=g).to(device)  # few codes: many rows per code
    first = vqkernels.cluster_stats(x, indices, 7, deterministic=True, backend=backend)
    for _ in range(3):
        again = vqkernels.cluster_stats(x, indices, 7, deterministic=True, backend=backend)
        assert torch.equal(first.sums, again.sums) and torch.equal(first.counts, again.counts)


@pytest.mark.parametrize("backend,device", ALL)
def test_cluster_stats_heads(backend, device):
    x = _rand(2, 10, 4, dtype=torch.float32, device=device, seed=18)
    indices = torch.randint(0, 3, (2, 10), generator=_gen(19)).to(device)
    counts, sums = vqkernels.cluster_stats(x, indices, 3, heads=True, backend=backend)
    assert counts.shape == (2, 3) and sums.shape == (2, 3, 4)
    for h in range(2):
        c, s = vqkernels.cluster_stats(x[h], indices[h], 3, backend=backend)
        torch.testing.assert_close(counts[h], c)
        torch.testing.assert_close(sums[h], s)


# --------------------------------------------------------------------------- ema_update_


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("H,K,D", [(None, 1, 1), (None, 37, 33), (None, 300, 3), (3, 20, 8)])
def test_ema_update_matches_reference(backend, device, H, K, D):
    lead = () if H is None else (H,)
    for codebook_dtype in [d for d in dtypes_for(backend, device) if d != torch.float64]:
        g = _gen(K * D)
        cluster_size = torch.rand(*lead, K, generator=g).to(device)
        embed_avg = torch.randn(*lead, K, D, generator=g).to(device)
        codebook = torch.randn(*lead, K, D, generator=g).to(codebook_dtype).to(device)
        counts = torch.randint(0, 5, (*lead, K), generator=g).float().to(device)
        sums = torch.randn(*lead, K, D, generator=g).to(device)
        want = closed_form_ema(cluster_size, embed_avg, counts, sums, 0.9, 1e-5)
        out = vqkernels.ema_update_(cluster_size, embed_avg, codebook, counts, sums, 0.9, 1e-5, backend=backend)
        assert out is codebook
        torch.testing.assert_close(cluster_size.cpu(), want[0].float(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(embed_avg.cpu(), want[1].float(), rtol=1e-6, atol=1e-6)
        low = codebook_dtype in (torch.float16, torch.bfloat16)
        want_codes = want[2].to(codebook_dtype)  # the codebook is stored in its own dtype
        torch.testing.assert_close(codebook.cpu(), want_codes, rtol=1e-2 if low else 1e-5, atol=1e-2 if low else 1e-5)


@pytest.mark.parametrize("backend,device", ALL)
def test_ema_update_decay_extremes(backend, device):
    K, D = 6, 4
    cluster_size, embed_avg, codebook = torch.ones(K), torch.randn(K, D), torch.randn(K, D)
    counts, sums = torch.arange(K).float(), torch.randn(K, D)
    frozen = [t.clone().to(device) for t in (cluster_size, embed_avg, codebook)]
    vqkernels.ema_update_(*frozen, counts.to(device), sums.to(device), decay=1.0, backend=backend)
    torch.testing.assert_close(frozen[0].cpu(), cluster_size)  # decay 1: statistics unchanged
    torch.testing.assert_close(frozen[1].cpu(), embed_avg)
    replaced = [t.clone().to(device) for t in (cluster_size, embed_avg, codebook)]
    vqkernels.ema_update_(*replaced, counts.to(device), sums.to(device), decay=0.0, backend=backend)
    torch.testing.assert_close(replaced[0].cpu(), counts)  # decay 0: this step's statistics
    assert torch.isfinite(replaced[2]).all()  # code 0 has count 0: smoothing keeps it finite
