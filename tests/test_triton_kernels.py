"""Triton-specific tests: the backend functions against the references, at awkward shapes.

Every backend function takes a leading codebook axis C (x ``[C, N, D]``, codebook
``[C, K, D]``, indices ``[C, N]``, ...) and serves it in ONE launch. The single-codebook
tests call it with C = 1; the codebook-axis tests compare C = 3 with a loop over the
references, one codebook at a time, and count the launches.

Without a GPU the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set by
conftest), which is slow: shapes stay small (N, K <= 300, D <= 257), and the interpreter
uses small fixed block sizes (32 rows / 32 codes / 32-wide D chunks, short pieces for the
deterministic statistics) so that these shapes cross every tile, chunk and piece
boundary. With a GPU the same tests run on CUDA (marker ``gpu``), autotuned unless
VQKERNELS_TRITON_AUTOTUNE=0 (which benchmarks/gpu_check.sh sets to save compile time).

The last two tests compile kernels for sm_90 with the real compiler (no GPU needed: Triton
ships ptxas): one at representative constexprs, one at EVERY variant a launcher can choose
(each op's ``compile_cases()``), which must also fit an H200 (shared memory, registers, no
spills). Code the interpreter accepts but the compiler rejects fails here, not on the
first GPU machine.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import HAS_CUDA
from helpers import check_assign

triton = pytest.importorskip("triton")

from vqkernels.ops import _dispatch, _triton_utils  # noqa: E402
from vqkernels.ops.assign import reference as assign_ref  # noqa: E402
from vqkernels.ops.histogram import reference as hist_ref  # noqa: E402
from vqkernels.ops.cluster_stats import reference as stats_ref  # noqa: E402
from vqkernels.ops.ema_update import reference as ema_ref  # noqa: E402

DEVICES = [
    pytest.param(d, marks=[pytest.mark.gpu] if d == "cuda" else [], id=d)
    for d in (["cpu"] + (["cuda"] if HAS_CUDA else []))
    if _dispatch.BACKENDS["triton"].unavailable(d) is None
]
if not DEVICES:
    pytest.skip("the triton backend cannot run here", allow_module_level=True)

from vqkernels.ops.assign import triton as tassign  # noqa: E402
from vqkernels.ops import _triton_histogram as thist  # noqa: E402  (histogram kernels, shared with cluster_stats)
from vqkernels.ops.cluster_stats import triton as tstats  # noqa: E402
from vqkernels.ops.ema_update import triton as tema  # noqa: E402


def _dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def _rtol_key(dtype):
    return "tf32" if _triton_utils.uses_tf32(dtype) else None


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _assign1(x, c, metric):
    """The backend on one codebook (C = 1): checks the [1, N] outputs, returns them as [N]."""
    indices, distances = tassign.assign(x.unsqueeze(0), c.unsqueeze(0), metric)
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32
    assert indices.shape == (1, x.shape[0]) and distances.shape == (1, x.shape[0])
    return indices[0], distances[0]


def _ref_hist(idx, K, weights=None):
    """Reference counts [C, K] by a loop over the codebooks (one reference call per codebook;
    the [1, N] slices suit a reference with or without the codebook axis)."""
    return torch.stack([
        hist_ref.histogram(idx[c : c + 1], K, None if weights is None else weights[c : c + 1]).reshape(K)
        for c in range(idx.shape[0])
    ])


def _ref_stats(x, idx, K, deterministic):
    """Reference (counts [C, K], sums [C, K, D]) by a loop over the codebooks."""
    per = [stats_ref.cluster_stats(x[c : c + 1], idx[c : c + 1], K, deterministic) for c in range(x.shape[0])]
    D = x.shape[-1]
    return torch.stack([p[0].reshape(K) for p in per]), torch.stack([p[1].reshape(K, D) for p in per])


# --------------------------------------------------------------------------- assign

# (N, K, D): N=1 / K=1 / D=1, D=3 (padded to 16), K and N off the 32-multiples, D=64 (one
# even chunk), D=128 (even 32-wide chunks), D=257 (ragged chunks), K spanning many tiles.
ASSIGN_SHAPES = [(1, 1, 1), (1, 7, 3), (37, 45, 3), (33, 65, 16), (40, 300, 64), (50, 40, 128), (45, 70, 257)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ASSIGN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_assign_matches_reference(device, shape, metric):
    N, K, D = shape
    g = _gen(N * 1000 + K + D)
    for dtype in _dtypes(device):
        if dtype != torch.float32 and shape not in ((37, 45, 3), (45, 70, 257), (40, 300, 64)):
            continue  # every dtype at a few shapes, fp32 at all of them
        x = torch.randn(N, D, generator=g).to(dtype).to(device)
        c = torch.randn(K, D, generator=g).to(dtype).to(device)
        indices, distances = _assign1(x, c, metric)  # checks int64 / fp32 and shapes [1, N]
        check_assign(x, c, metric, indices, distances, rtol_key=_rtol_key(dtype))


def _int_data(shape, g, lo=-4, hi=5):
    # Small integers: exact in every dtype, so copies of a code stay exact copies, and
    # near-copies (x + 0.25 * small integers) stay exactly representable.
    return torch.randint(lo, hi, shape, generator=g).to(torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_assign_ties_go_to_lowest_index_across_tiles(device):
    # Copies of a code inside one tile, one interpreter tile (32) later, and 256 / 512
    # later (a different tile for every autotuned BLOCK_K): the earliest copy must win.
    K, D = 600, 16
    g = _gen(1)
    c = _int_data((K, D), g)
    for src, dup in ((5, 5 + 32), (7, 7 + 256), (9, 9 + 512), (11, 12), (40, 70)):
        c[dup] = c[src]
    rows = torch.stack([c[5], c[7], c[9], c[11], c[40]])
    x = torch.cat([rows, rows + _int_data((5, D), g, -1, 2) * 0.25, _int_data((30, D), g)])
    for dtype in _dtypes(device):
        xd, cd = x.to(dtype).to(device), c.to(dtype).to(device)
        for metric in ("l2", "dot", "cosine"):
            indices, distances = _assign1(xd, cd, metric)
            check_assign(xd, cd, metric, indices, distances, rtol_key=_rtol_key(dtype))
            if metric == "l2":
                assert indices[:5].tolist() == [5, 7, 9, 11, 40]


def _tied_codebook(K, D, positions, seed):
    """Codes far from x = 3 e_0 except, at ``positions``, DISTINCT codes 3 e_0 +- e_j that tie
    exactly with one another in every metric (l2 1, dot -9, cosine 1 - 3 / sqrt(10))."""
    g = _gen(seed)
    c = _int_data((K, D), g, -4, 2)  # first coordinate <= 1: worse than the tied codes
    c[:, 1] = torch.where(c[:, 1] >= 0, 2.0, -2.0)  # ... in cosine too (|c_1| >= 2)
    for n, pos in enumerate(positions):
        tied = torch.zeros(D)
        tied[0] = 3.0
        tied[1 + n % (D - 1)] = 1.0 if n % 2 == 0 else -1.0
        c[pos] = tied
    assert len({tuple(c[p].tolist()) for p in positions}) == len(positions)  # distinct codes
    return c


@pytest.mark.parametrize("device", DEVICES)
def test_assign_running_min_keeps_lowest_index_per_column(device):
    # The kernel keeps a running (min, index) per tile column with a strict "<": distinct
    # codes with equal scores in the SAME column of later tiles (6 + 32, + 64, + 128, ...,
    # one column for every BLOCK_K <= 512) must not replace code 6 ("<=" would return the
    # last of them). And the final reduction over columns must pick the lowest INDEX, not
    # the leftmost column: code 20 (column 20 of tile 0) beats code 35 (column 3 of tile 1
    # for BLOCK_K 32) and code 131.
    K, D = 600, 6
    x = torch.zeros(7, D)
    x[:, 0] = 3.0
    x[1:, 2:] = _int_data((6, D - 2), _gen(21), -1, 2) * 4.0  # rows with other nearest codes
    for positions, want in (((6, 38, 70, 134, 262, 518), 6), ((35, 20, 131), 20)):
        c = _tied_codebook(K, D, positions, seed=want)
        for dtype in _dtypes(device):
            xd, cd = x.to(dtype).to(device), c.to(dtype).to(device)
            for metric in ("l2", "dot", "cosine"):
                indices, distances = _assign1(xd, cd, metric)
                assert indices[0].item() == want, (metric, dtype, positions, indices[0].item())
                check_assign(xd, cd, metric, indices, distances, rtol_key=_rtol_key(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_assign_split_codebook_ranges(device, monkeypatch):
    # Few rows: the codebook is split into ranges combined afterwards; ties across range
    # boundaries (ranges are multiples of 256 codes) must still go to the lowest index.
    monkeypatch.setattr(tassign, "_FORCE_SPLIT", 3)
    K, D = 600, 8
    g = _gen(2)
    c = _int_data((K, D), g)
    c[3 + 256] = c[3]  # in ranges 1 and 2
    c[300] = c[3]
    x = torch.cat([c[3:4], _int_data((20, D), g), torch.randn(20, D, generator=g)])
    for metric in ("l2", "cosine", "dot"):
        indices, distances = _assign1(x.to(device), c.to(device), metric)
        check_assign(x, c, metric, indices, distances, rtol_key=_rtol_key(torch.float32))
        if metric == "l2":
            assert indices[0].item() == 3


@pytest.mark.parametrize("device", DEVICES)
def test_assign_cosine_scale_invariance_and_zero_vectors(device):
    g = _gen(3)
    D = 12
    c = _int_data((300, D), g)
    c[2] = 2.0 * c[258]  # same direction: an exact tie in cosine distance; index 2 must win
    c[5] = 0.0  # a zero code: distance 1 (F.normalize's eps), never a crash
    x = torch.cat([c[258:259] * 3.0, torch.zeros(1, D), torch.randn(30, D, generator=g)])
    indices, distances = _assign1(x.to(device), c.to(device), "cosine")
    check_assign(x, c, "cosine", indices, distances, rtol_key=_rtol_key(torch.float32))
    assert indices[0].item() == 2
    assert indices[1].item() == 0  # a zero row ties with every code: the lowest index
    assert distances[1].item() == pytest.approx(1.0)
    # D = 1: every code of the row's sign is at distance exactly 0 (a tie); the lowest wins
    c1 = torch.randn(40, 1, generator=g)
    x1 = torch.randn(25, 1, generator=g)
    for dtype in _dtypes(device):
        xd, cd = x1.to(dtype).to(device), c1.to(dtype).to(device)
        indices, distances = _assign1(xd, cd, "cosine")
        check_assign(xd, cd, "cosine", indices, distances)
        first_pos = int((c1[:, 0] > 0).to(torch.int64).argmax())
        first_neg = int((c1[:, 0] < 0).to(torch.int64).argmax())
        expected = torch.where(x1[:, 0] > 0, first_pos, first_neg)
        assert torch.equal(indices.cpu(), expected)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("device", DEVICES)
def test_assign_nonfinite_rows_do_not_crash(device):
    g = _gen(4)
    x = torch.randn(40, 10, generator=g)
    c = torch.randn(50, 10, generator=g)
    x[3, 2] = float("nan")
    x[17, 0] = float("inf")
    x[30] = float("-inf")
    indices, distances = _assign1(x.to(device), c.to(device), "l2")
    indices, distances = indices.cpu(), distances.cpu()
    assert bool(((indices >= 0) & (indices < 50)).all())
    finite = torch.isfinite(x).all(1)
    check_assign(x[finite], c, "l2", indices[finite], distances[finite])


def test_dot_precision_follows_torch_setting():
    before = torch.get_float32_matmul_precision()
    try:
        for setting, want in (("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert _triton_utils.dot_precision(torch.float32) == want
            assert _triton_utils.dot_precision(torch.float16) == "ieee"
            assert _triton_utils.uses_tf32(torch.float32) == (want != "ieee")
    finally:
        torch.set_float32_matmul_precision(before)


def test_autotune_is_keyed_without_n_and_prunes():
    tuned = tassign._assign_kernel_tuned
    assert "N" not in tuned.keys and {"k_bucket", "D", "metric", "PRECISION"} <= set(tuned.keys)
    x16 = torch.empty(1, 1, dtype=torch.bfloat16)
    x32 = torch.empty(1, 1, dtype=torch.float32)
    small = tassign._prune_configs(tassign._CONFIGS, {"K": 20, "x_ptr": x16, "k_split": 20}, BLOCK_D=16, ONE_CHUNK=True)
    assert small and all(c.kwargs["BLOCK_K"] <= 32 for c in small)
    big = tassign._prune_configs(tassign._CONFIGS, {"K": 65536, "x_ptr": x16, "k_split": 65536}, BLOCK_D=256,
                                 ONE_CHUNK=True)
    assert big and any(c.kwargs["BLOCK_K"] >= 128 for c in big)
    for precision, elem in (("tf32", 4), ("tf32x3", 8)):
        for cfg in tassign._prune_configs(tassign._CONFIGS, {"K": 65536, "x_ptr": x32, "k_split": 65536}, BLOCK_D=128,
                                          ONE_CHUNK=True, PRECISION=precision):
            fits = tassign._smem_estimate(cfg, 128, True, elem) <= _triton_utils.SMEM_BUDGET
            assert fits or cfg is tassign._CONFIGS[-1]
    # a two-part (16-bit cosine) codebook doubles the codebook stages
    two = tassign._prune_configs(tassign._CONFIGS, {"K": 65536, "x_ptr": x16, "k_split": 65536}, BLOCK_D=256,
                                 ONE_CHUNK=True, TWO_PART=True)
    assert all(tassign._smem_estimate(c, 256, True, 2, 2) <= _triton_utils.SMEM_BUDGET for c in two)


def test_split_fills_whole_waves_of_an_h200(monkeypatch):
    # The split is sized for 132 SMs: few row blocks get enough ranges to fill (almost) whole
    # waves, many row blocks stay unsplit, and small K never splits.
    monkeypatch.setattr(_triton_utils, "sm_count", lambda device: 132)
    dev = torch.device("cpu")
    # (1, 17920, 16384): 140 row blocks, just over one wave -- unsplit, the second wave would
    # run 8 programs on 132 SMs (53 % of two waves)
    for C, N, K in ((1, 4096, 16384), (1, 100, 65536), (3, 2048, 16384), (1, 8192, 4096), (1, 17920, 16384)):
        S = tassign._split_count(C, N, K, dev, interp=False, block_n=128, block_k=64)
        programs = C * -(-N // 128) * S
        waves = -(-programs // 132)
        assert S > 1 and programs / (waves * 132) >= 0.75, (C, N, K, S, programs)
        assert S == -(-K // tassign._range_codes(K, S))  # an S the kernel derives from k_split
    assert tassign._split_count(1, 65536, 16384, dev, interp=False) == 1  # 512 row blocks: 3.9 waves
    assert tassign._split_count(1, 64, 512, dev, interp=False) == 1  # K < 1024
    assert tassign._split_count(1, 64, 65536, dev, interp=True) == 1  # the interpreter never splits


# --------------------------------------------------------------------------- histogram


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["small", "sort"])
def test_histogram_matches_reference(device, path, monkeypatch):
    if path == "sort":
        monkeypatch.setattr(thist, "_MAX_SMALL_BINS", 0)  # force the sort kernel (large-K path)
    g = _gen(6)
    cases = [(1, 1), (300, 7), (257, 300)] if path == "small" else [(1, 1), (200, 300)]
    for N, K in cases:
        for idtype in (torch.int64, torch.int32):
            idx = torch.randint(-2, K, (N,), generator=g).to(idtype)
            got = thist.histogram(idx[None].to(device), K, None).cpu()
            assert got.dtype == torch.int64 and got.shape == (1, K)
            assert torch.equal(got, _ref_hist(idx[None], K)), (N, K, idtype)
    masked = torch.full((1, 50), -1, dtype=torch.int64)
    assert int(thist.histogram(masked.to(device), 5, None).sum()) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_histogram_weighted(device):
    g = _gen(7)
    for N, K in ((1, 3), (250, 40)):
        idx = torch.randint(-1, K, (N,), generator=g)
        idx[0] = K - 1
        w = torch.rand(N, generator=g)
        for wdtype in (torch.float32, torch.float16):
            got = thist.histogram(idx[None].to(device), K, w[None].to(wdtype).to(device)).cpu()
            assert got.dtype == torch.float32 and got.shape == (1, K)
            ref = _ref_hist(idx[None], K, w[None].to(wdtype))
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- cluster stats


def _stats_case(N, K, D, seed, collapse=False, dtype=torch.float32):
    g = _gen(seed)
    x = torch.randn(N, D, generator=g).to(dtype)
    idx = torch.randint(-1, K, (N,), generator=g)
    if collapse:  # most rows on one code: several pieces in the deterministic path
        idx[: (3 * N) // 4] = K // 2
    return x, idx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_cluster_stats_matches_reference(device, deterministic):
    cases = [(1, 1, 1, False), (300, 7, 3, False), (300, 5, 33, True), (200, 40, 16, False)]
    if not deterministic:
        cases.append((120, 9, 257, False))
    for N, K, D, collapse in cases:
        for dtype in _dtypes(device):
            if dtype != torch.float32 and D != 33:
                continue
            x, idx = _stats_case(N, K, D, N + K + D, collapse, dtype)
            counts, sums = tstats.cluster_stats(x[None].to(device), idx[None].to(device), K, deterministic)
            rc, rs = _ref_stats(x[None], idx[None], K, deterministic)
            assert counts.dtype == torch.float32 and sums.dtype == torch.float32
            assert counts.shape == (1, K) and sums.shape == (1, K, D)
            assert torch.equal(counts.cpu(), rc), (N, K, D)
            assert torch.allclose(sums.cpu(), rs, rtol=1e-5, atol=1e-4), (N, K, D, (sums.cpu() - rs).abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_cluster_stats_counts_exact_beyond_2_24(device, deterministic, monkeypatch):
    # Counting 2^24 rows per code is too slow here; instead: the atomic kernel adds into
    # int64 counters already at 2^24 + 1 (an fp32 counter would be stuck at 2^24 + 0 / + 2),
    # and both paths convert their int64 counts once, to the dtype asked for.
    big = 2**24 + 1
    x, idx = _stats_case(70, 3, 5, 30)
    idx[:5] = 1
    want = torch.bincount(idx[idx >= 0], minlength=3)
    if not deterministic:
        counts = torch.full((1, 3), big, dtype=torch.int64).to(device)
        sums = torch.zeros(1, 3, 5).to(device)
        tstats._atomic_stats_(x[None].to(device), idx[None].to(device), counts, sums)
        assert counts.dtype == torch.int64
        assert counts.cpu()[0].tolist() == (want + big).tolist()  # exact: 2^24 + 1 + n
        # ... and the op's conversion keeps them: counters pre-seeded through the real path
        real = tstats._atomic_stats_

        def seeded(x_, idx_, counts_, sums_):
            counts_ += big
            real(x_, idx_, counts_, sums_)

        monkeypatch.setattr(tstats, "_atomic_stats_", seeded)
        counts, _ = tstats.cluster_stats(x[None].to(device), idx[None].to(device), 3, False, torch.float64)
        assert counts.cpu()[0].tolist() == (want + big).tolist()
        monkeypatch.setattr(tstats, "_atomic_stats_", real)
    for counts_dtype in (torch.int64, torch.float64, torch.float32):
        counts, _ = tstats.cluster_stats(x[None].to(device), idx[None].to(device), 3, deterministic, counts_dtype)
        assert counts.dtype == counts_dtype and torch.equal(counts.cpu()[0], want.to(counts_dtype))
    assert float(torch.tensor(big, dtype=torch.int64).to(torch.float64)) == big  # fp64 keeps it
    assert float(torch.tensor(big, dtype=torch.int64).to(torch.float32)) != big  # fp32 cannot: documented


@pytest.mark.parametrize("device", DEVICES)
def test_cluster_stats_deterministic_is_bitwise_reproducible(device):
    x, idx = _stats_case(300, 6, 20, 8, collapse=True)
    idx = idx.to(torch.int32)
    first = tstats.cluster_stats(x[None].to(device), idx[None].to(device), 6, True)
    second = tstats.cluster_stats(x[None].to(device), idx[None].to(device), 6, True)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1].view(torch.int32), second[1].view(torch.int32))  # the same bits
    # the long code really went through several pieces and the combine kernel
    assert first[0][0, 3].item() > 2 * tstats._PIECE_ROWS_INTERP or device == "cuda"


# --------------------------------------------------------------------------- EMA


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # fp16 codebook of a code with count 0
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64])
def test_ema_update_matches_reference(device, stats_dtype):
    g = _gen(9)
    for H, K, D, decay in ((1, 1, 1, 0.5), (2, 37, 19, 0.99), (1, 40, 70, 0.0), (1, 5, 4, 1.0), (3, 21, 35, 0.9)):
        for cb_dtype in _dtypes(device):
            cs = torch.rand(H, K, generator=g, dtype=torch.float64).to(stats_dtype) + 0.1
            ea = torch.randn(H, K, D, generator=g, dtype=torch.float64).to(stats_dtype)
            cb = torch.randn(H, K, D, generator=g).to(cb_dtype)
            counts = torch.randint(0, 5, (H, K), generator=g).to(stats_dtype)
            sums = torch.randn(H, K, D, generator=g, dtype=torch.float64).to(stats_dtype)
            mine = [t.clone().to(device) for t in (cs, ea, cb)]
            ref = [t.clone() for t in (cs, ea, cb)]
            tema.ema_update(*mine, counts.to(device), sums.to(device), decay, 1e-5)
            ema_ref.ema_update(*ref, counts, sums, decay, 1e-5)
            for name, a, b in zip(("cluster_size", "embed_avg", "codebook"), mine, ref):
                a = a.cpu()
                assert a.dtype == b.dtype
                tol = {torch.float64: 1e-12, torch.float32: 2e-6}.get(a.dtype, 1e-2)
                assert torch.allclose(a.double(), b.double(), rtol=tol, atol=tol), (name, H, K, D, decay)


# --------------------------------------------------------------------------- the codebook axis
# C independent codebooks in one launch, against a loop over the references one codebook at a
# time. Each codebook gets its own data (and its own ties at its own positions), so a kernel
# that read another codebook's rows, codes, norms or partial minima fails here.


class _Launches:
    """Stand-in for a @triton.jit kernel (or autotuner) that records the grid of every launch."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]

    def __getattr__(self, name):
        return getattr(self.kernel, name)


def _count_launches(monkeypatch, module, *names):
    grids = []
    for name in names:
        monkeypatch.setattr(module, name, _Launches(getattr(module, name), grids))
    return grids


def _check_assign_per_codebook(x, c, metric, indices, distances, dtype):
    C, N = x.shape[0], x.shape[1]
    assert indices.shape == (C, N) and distances.shape == (C, N)
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32
    for i in range(C):
        check_assign(x[i], c[i], metric, indices[i], distances[i], rtol_key=_rtol_key(dtype))


# (N, K, D): N and K off the interpreter's 32-row / 32-code blocks, D not a power of two
# (5: one padded chunk; 70: ragged 32-wide chunks of the D-chunked path).
AXIS_SHAPES = [(37, 45, 5), (20, 70, 70)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("shape", AXIS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_assign_codebook_axis(device, C, shape, metric, monkeypatch):
    N, K, D = shape
    g = _gen(100 * C + K + D)
    for dtype in _dtypes(device):
        # codebook i is shifted by i: a kernel reading codebook 0 for every c picks other codes
        x = (torch.randn(C, N, D, generator=g) + torch.arange(C).view(C, 1, 1)).to(dtype).to(device)
        c = (torch.randn(C, K, D, generator=g) + torch.arange(C).view(C, 1, 1)).to(dtype).to(device)
        grids = _count_launches(monkeypatch, tassign, "_assign_kernel", "_assign_kernel_tuned")
        indices, distances = tassign.assign(x, c, metric)
        assert len(grids) == 1, f"{len(grids)} assign launches for {C} codebooks: expected one"
        _check_assign_per_codebook(x, c, metric, indices, distances, dtype)
        # the same function as C separate calls (bit-identical: per codebook, nothing else changes)
        for i in range(C):
            one_idx, one_dist = _assign1(x[i], c[i], metric)
            assert torch.equal(indices[i], one_idx) and torch.equal(distances[i], one_dist), i


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 3])
def test_assign_codebook_axis_split_and_ties(device, C, monkeypatch):
    # Split codebook ranges (256-code multiples) for every codebook in the same launch; each
    # codebook has copies of one code inside a tile, one tile later and across range
    # boundaries, at positions of its own: the lowest copy of its own codebook must win.
    monkeypatch.setattr(tassign, "_FORCE_SPLIT", 3)
    K, D, N = 600, 8, 21
    g = _gen(11 + C)
    c = _int_data((C, K, D), g)
    src = [3 + 5 * i for i in range(C)]
    for i, s in enumerate(src):
        for dup in (s + 1, s + 32, s + 256, s + 512):
            c[i, dup] = c[i, s]
    x = _int_data((C, N, D), g)
    for i, s in enumerate(src):
        x[i, 0] = c[i, s]
        x[i, 1] = c[i, s] * 2.0  # same direction: a cosine tie among the copies
    for metric in ("l2", "cosine", "dot"):
        grids = _count_launches(monkeypatch, tassign, "_assign_kernel", "_assign_kernel_tuned",
                                "_exact_distance_kernel")
        indices, distances = tassign.assign(x.to(device), c.to(device), metric)
        assert len(grids) == 2, grids  # the range sweep and the exact-distance epilogue, each one launch
        _check_assign_per_codebook(x, c, metric, indices, distances, torch.float32)
        for i, s in enumerate(src):
            if metric == "l2":
                assert indices[i, 0].item() == s, (i, indices[i, :2])
            if metric == "cosine":
                assert indices[i, 1].item() == s, (i, indices[i, :2])


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("device", DEVICES)
def test_assign_codebook_axis_nan_rows_and_codes(device):
    # NaN / Inf rows in one codebook must not disturb the others; a NaN code scores +inf in
    # the kernel (on the GPU too), so it never wins and never hides its tile's true minimum.
    C, N, K, D = 3, 40, 50, 10
    g = _gen(12)
    x = torch.randn(C, N, D, generator=g)
    c = torch.randn(C, K, D, generator=g)
    x[1, 3, 2] = float("nan")
    x[1, 17, 0] = float("inf")
    x[2, 30] = float("-inf")
    c[0, 0] = float("nan")  # first code of the first tile
    c[2, 33, 4] = float("nan")  # inside the second tile
    for metric in ("l2", "cosine", "dot"):
        indices, distances = tassign.assign(x.to(device), c.to(device), metric)
        indices, distances = indices.cpu(), distances.cpu()
        assert bool(((indices >= 0) & (indices < K)).all())
        for i in range(C):
            finite_codes = torch.isfinite(c[i]).all(1)
            assert not bool((~finite_codes)[indices[i]].any()), (i, metric)  # a NaN code never wins
            rows = torch.isfinite(x[i]).all(1)
            keep = finite_codes.nonzero().flatten()
            # judged against the finite codes only: the chosen code is their nearest
            check_assign(x[i][rows], c[i][keep], metric, torch.searchsorted(keep, indices[i][rows]),
                         distances[i][rows], rtol_key=_rtol_key(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("path", ["small", "sort", "weighted"])
def test_histogram_codebook_axis(device, C, path, monkeypatch):
    if path == "sort":
        monkeypatch.setattr(thist, "_MAX_SMALL_BINS", 0)  # force the sort kernel (large-K path)
    g = _gen(13 + C)
    for N, K in ((1, 3), (200, 37), (300, 5)):  # N off the 128-index interpreter blocks
        idx = torch.randint(-2, K, (C, N), generator=g)
        idx[-1, : N // 2] = K - 1  # one codebook's usage collapsed on its last code
        w = torch.rand(C, N, generator=g) if path == "weighted" else None
        grids = _count_launches(monkeypatch, thist, "_hist_small_kernel", "_hist_sort_kernel")
        got = thist.histogram(idx.to(device), K, None if w is None else w.to(device)).cpu()
        assert len(grids) == 1, grids
        assert got.shape == (C, K) and got.dtype == (torch.int64 if w is None else torch.float32)
        ref = _ref_hist(idx, K, w)
        if w is None:
            assert torch.equal(got, ref), (N, K, got, ref)
        else:
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), (N, K, (got - ref).abs().max())
    masked = torch.full((C, 50), -1, dtype=torch.int64)
    assert torch.equal(thist.histogram(masked.to(device), 5, None).cpu(), torch.zeros(C, 5, dtype=torch.int64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_cluster_stats_codebook_axis(device, C, deterministic, monkeypatch):
    # Masked rows (some holding NaN, which must stay out of the sums), one codebook collapsed
    # onto one code (several pieces and the combine step in the deterministic path), an
    # empty code, K and D off the block sizes.
    N, K, D = 150, 7, 19
    g = _gen(14 + C)
    x = torch.randn(C, N, D, generator=g) + torch.arange(C).view(C, 1, 1)
    idx = torch.randint(-1, K, (C, N), generator=g)
    idx[0, : (3 * N) // 4] = 2
    idx[:, 5] = -1
    x[:, 5] = float("nan")
    idx[idx == K - 2] = K - 1  # code K - 2 unused in every codebook
    module_kernels = (("_segment_sum_kernel", "_combine_pieces_kernel") if deterministic else ("_stats_atomic_kernel",))
    grids = _count_launches(monkeypatch, tstats, *module_kernels)
    counts, sums = tstats.cluster_stats(x.to(device), idx.to(device), K, deterministic)
    assert len(grids) == len(module_kernels), grids  # one launch per kernel for all C codebooks
    assert counts.shape == (C, K) and sums.shape == (C, K, D)
    assert counts.dtype == torch.float32 and sums.dtype == torch.float32
    rc, rs = _ref_stats(x, idx, K, deterministic)
    assert torch.equal(counts.cpu(), rc.to(torch.float32))
    assert torch.allclose(sums.cpu(), rs.to(torch.float32), rtol=1e-5, atol=1e-4), (sums.cpu() - rs).abs().max()
    if deterministic:
        again = tstats.cluster_stats(x.to(device), idx.to(device), K, True)
        assert torch.equal(counts, again[0])
        assert torch.equal(sums.view(torch.int32), again[1].view(torch.int32))  # the same bits
        assert counts[0, 2].item() > 2 * tstats._PIECE_ROWS_INTERP or device == "cuda"


@pytest.mark.parametrize("device", DEVICES)
def test_ema_update_codebook_axis(device, monkeypatch):
    # C codebooks in one launch of each kernel, against the reference one codebook at a time.
    C, K, D, decay = 3, 21, 35, 0.9
    g = _gen(15)
    cs = torch.rand(C, K, generator=g) + 0.1
    ea = torch.randn(C, K, D, generator=g)
    cb = torch.randn(C, K, D, generator=g)
    counts = torch.randint(0, 5, (C, K), generator=g).float()
    sums = torch.randn(C, K, D, generator=g)
    mine = [t.clone().to(device) for t in (cs, ea, cb)]
    grids = _count_launches(monkeypatch, tema, "_ema_sizes_kernel", "_ema_codebook_kernel")
    tema.ema_update(*mine, counts.to(device), sums.to(device), decay, 1e-5)
    assert len(grids) == 2, grids
    for i in range(C):
        ref = [t[i : i + 1].clone() for t in (cs, ea, cb)]
        ema_ref.ema_update(*ref, counts[i : i + 1], sums[i : i + 1], decay, 1e-5)
        for name, a, b in zip(("cluster_size", "embed_avg", "codebook"), mine, ref):
            assert torch.allclose(a[i : i + 1].cpu(), b, rtol=2e-6, atol=2e-6), (name, i)


# --------------------------------------------------------------------------- compiler


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "0"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from vqkernels.ops.assign import triton as A
    from vqkernels.ops import _triton_histogram as H
    from vqkernels.ops.cluster_stats import triton as S
    from vqkernels.ops.ema_update import triton as E

    def comp(fn, sig, consts, num_warps=4, num_stages=3):
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items() if v.startswith("*")}
        full = dict(sig, **{k: "constexpr" for k in consts})
        k = triton.compile(ASTSource(fn, full, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages))
        print(fn.__name__, "ok", k.metadata.shared)

    # The assign kernel at both ends of its constexpr space: one resident bf16 chunk with a
    # two-part (cosine) codebook, and D-chunked fp32 tf32x3 with the split epilogue.
    sig = dict(x_ptr="*bf16", c_ptr="*bf16", c2_ptr="*bf16", e_ptr="*bf16", bias_ptr="*fp32", mult_ptr="*fp32",
               idx_ptr="*i64", dist_ptr="*fp32",
               part_score_ptr="*fp32", part_idx_ptr="*i64", N="i32", K="i32", D="i32", k_split="i32", c_stride="i32",
               k_bucket="i32", metric="i32")
    comp(A._assign_kernel, sig, dict(PRECISION="ieee", BLOCK_D=32, ONE_CHUNK=True, EVEN_D=False, TWO_PART=True,
                                     SPLIT=False, EPI_D=32, INTERP=False, BLOCK_N=128, BLOCK_K=64), 4, 3)
    comp(A._assign_kernel, dict(sig, x_ptr="*fp32", c_ptr="*fp32", c2_ptr="*fp32", e_ptr="*fp32"),
         dict(PRECISION="tf32x3", BLOCK_D=16, ONE_CHUNK=False, EVEN_D=False, TWO_PART=False, SPLIT=True, EPI_D=32, INTERP=False,
              BLOCK_N=64, BLOCK_K=64), 4, 2)
    comp(A._code_norms_kernel, dict(c_ptr="*fp16", bias_ptr="*fp32", mult_ptr="*fp32", K="i32", D="i32"),
         dict(BLOCK_K=32, BLOCK_D=64))
    comp(A._exact_distance_kernel, dict(x_ptr="*bf16", c_ptr="*bf16", idx_ptr="*i64", dist_ptr="*fp32", N="i32",
                                        K="i32", D="i32", metric="i32"), dict(BLOCK_N=64, BLOCK_D=16))
    comp(H._hist_small_kernel, dict(idx_ptr="*i64", out_ptr="*i64", N="i32", K="i32", P="i32"),
         dict(BINS=1024, BLOCK=1024))
    comp(H._hist_sort_kernel, dict(idx_ptr="*i32", w_ptr="*fp16", out_ptr="*fp32", N="i32", K="i32"),
         dict(HAS_WEIGHTS=True, BLOCK=1024))
    comp(H._hist_sort_kernel, dict(idx_ptr="*i64", w_ptr="*i64", out_ptr="*i64", N="i32", K="i32"),
         dict(HAS_WEIGHTS=False, BLOCK=1024))
    comp(S._stats_atomic_kernel, dict(x_ptr="*bf16", idx_ptr="*i64", counts_ptr="*i64", sums_ptr="*fp32", N="i32",
                                      K="i32", D="i32"), dict(BLOCK_N=32, BLOCK_D=128), 8)
    comp(S._segment_sum_kernel, dict(x_ptr="*fp16", order_ptr="*i64", piece_code_ptr="*i64", piece_start_ptr="*i64",
                                     row_start_ptr="*i64", lengths_ptr="*i64", n_pieces_ptr="*i64", slot_ptr="*i64",
                                     sums_ptr="*fp32", scratch_ptr="*fp32", G="i32", K1="i32", D="i32"),
         dict(PIECE_ROWS=512, BLOCK_R=32, BLOCK_D=64))
    comp(S._combine_pieces_kernel, dict(codes_ptr="*i64", n_pieces_ptr="*i64", slot_ptr="*i64", sums_ptr="*fp32",
                                        scratch_ptr="*fp32", K1="i32", D="i32"), dict(BLOCK_D=64))
    comp(E._ema_sizes_kernel, dict(cs_ptr="*fp32", counts_ptr="*fp32", n_ptr="*fp64", params_ptr="*fp64", K="i32"),
         dict(BLOCK_K=1024))
    comp(E._ema_codebook_kernel, dict(cs_ptr="*fp32", ea_ptr="*fp32", cb_ptr="*bf16", sums_ptr="*fp32", n_ptr="*fp32",
                                      params_ptr="*fp32", K="i32", D="i32"), dict(BLOCK_K=32, BLOCK_D=64))
    print("ALL OK")
    """
)


def _sm90_compile_env() -> dict:
    """Environment for compiling Triton kernels for sm_90 in a subprocess (real compiler, not
    the interpreter); skips the test where this Triton has no NVIDIA backend or no ptxas."""
    try:
        from triton.backends.nvidia import compiler as _nv  # noqa: F401
    except Exception as exc:  # a Triton build without the NVIDIA backend
        pytest.skip(f"Triton has no NVIDIA backend here: {exc}")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("no ptxas available to Triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def test_kernels_compile_for_sm90():
    """Compile (not run) every kernel for Hopper, with its codebook-axis signature.

    (The interpreter accepts code the compiler rejects: constexpr branches, dtype
    plumbing, dot layouts, int64 offset arithmetic. Running them is benchmarks/gpu_check.sh's job.)"""
    env = _sm90_compile_env()
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_every_dispatchable_variant_fits_sm90(tmp_path):
    """Compile every kernel variant a launcher can choose -- each assign config at the widest
    layout it is offered for, the histogram sort kernel, the atomic statistics kernel, the
    code-norm and exact-distance kernels, ... (each op's ``compile_cases()``) -- for sm_90,
    and require each to fit: <= 227 KiB shared memory, <= 255 registers, no spills. The
    table (shared memory, registers, spills, CTAs per SM) is printed, and shown on failure.

    Cost: about a minute with a warm Triton cache, several on a cold one (Triton caches
    compiled kernels in ~/.triton/cache, so reruns are cheap)."""
    env = _sm90_compile_env()
    report = tmp_path / "sm90.json"
    proc = subprocess.run([sys.executable, "-m", "vqkernels.ops._triton_utils", "--json", str(report)], env=env,
                          capture_output=True, text=True, timeout=1800)
    table = proc.stdout[-20000:]
    print(table)
    assert report.is_file(), proc.stderr[-5000:]
    import json

    rows = json.loads(report.read_text())
    bad = [r for r in rows if r["problems"]]
    assert not bad and proc.returncode == 0, "\n".join(f"{r['case']}: {r['problems']}" for r in bad) + "\n" + table
    # every kernel of every op was compiled, and every assign config is offered somewhere
    want = {"_assign_kernel", "_code_norms_kernel", "_exact_distance_kernel", "_hist_small_kernel",
            "_hist_sort_kernel", "_stats_atomic_kernel", "_segment_sum_kernel", "_combine_pieces_kernel",
            "_ema_sizes_kernel", "_ema_codebook_kernel", "_residual_assign_kernel"}
    assert {r["kernel"] for r in rows} == want
    assert all(r["regs"] is not None for r in rows), "no cuobjdump: registers and spills were not checked"
    for cfg in tassign._CONFIGS:
        tag = f"BLOCK_N={cfg.kwargs['BLOCK_N']},BLOCK_K={cfg.kwargs['BLOCK_K']}; w{cfg.num_warps} s{cfg.num_stages};"
        assert any(tag in r["case"] for r in rows), f"config {tag} is never offered: remove it from the table"
