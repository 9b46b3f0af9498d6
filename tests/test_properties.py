"""Property-based tests: random shapes, dtypes, metrics, masks and duplicate codes; every
backend against the definition (the ops, ema_update_, strided layouts, a Quantizer training
step). Example counts are bounded (derandomized, no deadline) so CI stays fast."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import vqkernels
from conftest import FAST_BACKEND_CASES, backend_cases, dtypes_for, interpreted
from helpers import check_assign, closed_form_ema, exact_distances, loop_cluster_stats, loop_histogram

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)


def _examples(backend, device):
    return 8 if interpreted(backend, device) else 40


def common_case(dtype, metric, K: int, kept_rows: int) -> bool:
    """The case most users run: fp32, l2, a real choice of code (K >= 2), several kept rows."""
    return dtype == torch.float32 and metric == "l2" and K >= 2 and kept_rows >= 2


def assert_covers_common_case(seen: list, examples: int):
    """At least a quarter of the examples were the common case (``seen``: one bool per example)."""
    want = max(1, examples // 4)
    assert sum(seen) >= want, f"only {sum(seen)} of {len(seen)} examples were fp32 / l2 / K >= 2 / several kept rows; want >= {want}"


@st.composite
def problems(draw, dtypes, metrics=("l2", "cosine", "dot")):
    """(x [N, D], codebook [K, D], keep [N], seed, metric). Half the draws are the common
    case outright (fp32 where the backend takes it, l2, K >= 2, N >= 8, at most 30% masked);
    the rest range over every dtype, metric and edge size."""
    common = draw(st.booleans())
    N = draw(st.integers(8, 48) if common else st.integers(1, 48))
    K = draw(st.integers(2, 40) if common else st.integers(1, 40))
    D = draw(st.sampled_from([1, 2, 3, 7, 16, 31, 33]))
    dtype = torch.float32 if common and torch.float32 in dtypes else draw(st.sampled_from(dtypes))
    metric = "l2" if common and "l2" in metrics else draw(st.sampled_from(metrics))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(K, D, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    n_dup = draw(st.integers(0, K // 2))
    if n_dup:  # duplicate codes: exact ties that must resolve to the lowest index
        src = torch.randint(0, K, (n_dup,), generator=g)
        dst = torch.randint(0, K, (n_dup,), generator=g)
        codebook[dst] = codebook[src]
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    if draw(st.booleans()):  # rows sitting exactly on codes
        x[: min(N, K)] = codebook[torch.randint(0, K, (min(N, K),), generator=g)]
    mask_fraction = draw(st.sampled_from([0.0, 0.3] if common else [0.0, 0.3, 1.0]))
    keep = torch.rand(N, generator=g) >= mask_fraction
    return x.to(dtype), codebook.to(dtype), keep, seed, metric


@pytest.mark.parametrize("backend,device", FAST_BACKEND_CASES)
def test_assign_property(backend, device):
    seen = []

    @settings(max_examples=_examples(backend, device), **SETTINGS)
    @given(problem=problems(dtypes_for(backend, device)))
    def run(problem):
        x, codebook, _, _, metric = problem
        seen.append(common_case(x.dtype, metric, codebook.shape[0], x.shape[0]))
        indices, distances = vqkernels.assign(x.to(device), codebook.to(device), metric, backend=backend)
        check_assign(x, codebook, metric, indices, distances)

    run()
    assert_covers_common_case(seen, _examples(backend, device))


@pytest.mark.parametrize("backend,device", FAST_BACKEND_CASES)
def test_histogram_and_stats_property(backend, device):
    @settings(max_examples=_examples(backend, device), **SETTINGS)
    @given(problem=problems(dtypes_for(backend, device)), deterministic=st.booleans())
    def run(problem, deterministic):
        x, codebook, keep, seed, _ = problem
        K = codebook.shape[0]
        g = torch.Generator().manual_seed(seed + 1)
        indices = torch.where(keep, torch.randint(0, K, keep.shape, generator=g), torch.full(keep.shape, -1))
        counts = vqkernels.histogram(indices.to(device), K, backend=backend)
        assert counts.cpu().tolist() == loop_histogram(indices, K)
        c, s = vqkernels.cluster_stats(x.to(device), indices.to(device), K, deterministic=deterministic, backend=backend)
        want_c, want_s = loop_cluster_stats(x, indices, K)
        assert torch.equal(c.cpu().double(), want_c)
        scale = 1 + x.abs().max().item() * max(1, x.shape[0])
        tol = 1e-12 if x.dtype == torch.float64 else 2e-6
        torch.testing.assert_close(s.cpu().double(), want_s, rtol=tol, atol=tol * scale)

    run()


# --------------------------------------------------------------------------- layouts, EMA, Quantizer
ALL_CASES = backend_cases()


def _strided_copy(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout."""
    if t.dim() == 1:
        layout = "padded-rows" if layout == "transposed" else layout
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "padded-columns" and t.dim() == 2:
        big = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        big[:, ::2] = t
        return big[:, ::2]
    big = torch.zeros(2 * t.shape[0], *t.shape[1:], dtype=t.dtype, device=t.device)
    big[1::2] = t
    return big[1::2]


@pytest.mark.parametrize("backend,device", ALL_CASES)
def test_strided_inputs_match_contiguous_property(backend, device):
    """Non-contiguous views are handled (not rejected) and give bitwise the contiguous result."""

    @settings(max_examples=4 if interpreted(backend, device) else 20, **SETTINGS)
    @given(
        problem=problems(dtypes_for(backend, device)),
        layout=st.sampled_from(["transposed", "padded-columns", "padded-rows"]),
    )
    def run(problem, layout):
        x, codebook, keep, seed, metric = problem
        x, codebook = x.to(device), codebook.to(device)
        K = codebook.shape[0]
        xs, cs = _strided_copy(x, layout), _strided_copy(codebook, layout)
        assert torch.equal(xs, x) and (not xs.is_contiguous() or x.shape[0] <= 1 or x.shape[1] == 1 or layout == "padded-rows")
        got, want = vqkernels.assign(xs, cs, metric, backend=backend), vqkernels.assign(x, codebook, metric, backend=backend)
        assert torch.equal(got.indices, want.indices) and torch.equal(got.distances, want.distances)
        g = torch.Generator().manual_seed(seed + 2)
        indices = torch.where(keep, torch.randint(0, K, keep.shape, generator=g), torch.full(keep.shape, -1)).to(device)
        si = _strided_copy(indices, "padded-rows")
        assert torch.equal(vqkernels.histogram(si, K, backend=backend), vqkernels.histogram(indices, K, backend=backend))
        a = vqkernels.cluster_stats(xs, si, K, deterministic=True, backend=backend)
        b = vqkernels.cluster_stats(x, indices, K, deterministic=True, backend=backend)
        assert torch.equal(a.counts, b.counts) and torch.equal(a.sums, b.sums)

    run()


@pytest.mark.parametrize("backend,device", ALL_CASES)
def test_ema_update_property(backend, device):
    """ema_update_ against the fp64 closed form (tests/helpers.py, not the reference) for random sizes, heads, decays (0 and 1 included) and eps."""
    codebook_dtypes = [d for d in dtypes_for(backend, device) if d != torch.float64]

    @settings(max_examples=4 if interpreted(backend, device) else 25, **SETTINGS)
    @given(
        K=st.integers(1, 40),
        D=st.sampled_from([1, 3, 8, 33]),
        H=st.sampled_from([None, 2]),
        decay=st.sampled_from([0.0, 0.3, 0.99, 1.0]),
        eps=st.sampled_from([1e-5, 1e-2]),
        dtype=st.sampled_from(codebook_dtypes),
        seed=st.integers(0, 2**31 - 1),
    )
    def run(K, D, H, decay, eps, dtype, seed):
        lead = () if H is None else (H,)
        g = torch.Generator().manual_seed(seed)
        cluster_size = torch.rand(*lead, K, generator=g) * 3
        embed_avg = torch.randn(*lead, K, D, generator=g)
        codebook = torch.randn(*lead, K, D, generator=g).to(dtype)
        counts = torch.randint(0, 6, (*lead, K), generator=g).float()
        sums = torch.randn(*lead, K, D, generator=g) * counts.unsqueeze(-1)
        want = closed_form_ema(cluster_size, embed_avg, counts, sums, decay, eps)
        got = [t.to(device) for t in (cluster_size, embed_avg, codebook)]
        vqkernels.ema_update_(*got, counts.to(device), sums.to(device), decay, eps, backend=backend)
        torch.testing.assert_close(got[0].cpu(), want[0].float(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1].cpu(), want[1].float(), rtol=1e-6, atol=1e-6)
        low = dtype in (torch.float16, torch.bfloat16)
        want_codes = want[2].to(dtype)  # the codebook is stored in its own dtype
        torch.testing.assert_close(got[2].cpu(), want_codes, rtol=1e-2 if low else 1e-5, atol=1e-2 if low else 1e-5)

    run()


@st.composite
def quantizer_steps(draw):
    # Half the draws are the common case outright: fp32, l2, K >= 2, several rows, at most
    # 30% masked; the rest range over every dtype, metric, layout and edge size.
    common = draw(st.booleans())
    lead = draw(st.sampled_from([(9,), (3, 5), (2, 1, 7)] if common else [(1,), (9,), (3, 5), (2, 1, 7), (0,), (4, 0)]))
    metric = "l2" if common else draw(st.sampled_from(["l2", "cosine"]))
    # D = 1 with cosine is excluded here: every same-sign code ties exactly, which
    # test_assign_property already covers for the op itself
    D = draw(st.sampled_from([1, 2, 5, 8] if metric == "l2" else [2, 5, 8]))
    K = draw(st.integers(2, 12) if common else st.integers(1, 12))
    dtype = torch.float32 if common else draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    mask = draw(st.sampled_from([None, 0.3] if common else [None, 0.3, 1.0]))  # none, some or every row masked
    n_dup = draw(st.integers(0, K // 2))
    decay = draw(st.sampled_from([0.0, 0.5, 0.99]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "padded-rows"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return lead, D, K, metric, dtype, mask, n_dup, decay, layout, seed


@pytest.mark.parametrize("backend,device", ALL_CASES)
def test_quantizer_training_step_property(backend, device):
    """One EMA training step of the Quantizer equals the ops' definition: nearest codes (within
    tolerance, lowest duplicate), masked rows -1 and passed through, kept rows replaced by their
    code, the commitment loss, the EMA statistics of the fp64 closed form; and a non-contiguous
    input gives bitwise the contiguous result."""

    examples = 4 if interpreted(backend, device) else 15
    seen = []

    @settings(max_examples=examples, **SETTINGS)
    @given(step=quantizer_steps())
    def run(step):
        lead, D, K, metric, dtype, mask_fraction, n_dup, decay, layout, seed = step
        g = torch.Generator().manual_seed(seed)
        codes = torch.randn(K, D, generator=g)
        if n_dup:
            codes[torch.randint(0, K, (n_dup,), generator=g)] = codes[torch.randint(0, K, (n_dup,), generator=g)]
        vq = vqkernels.Quantizer(D, K, metric=metric, decay=decay, commitment_weight=0.25, backend=backend).to(device)
        vq.codebook = codes.to(device)
        twin = copy.deepcopy(vq)
        x = torch.randn(*lead, D, generator=g).to(dtype).to(device)
        mask = None if mask_fraction is None else (torch.rand(lead, generator=g) >= mask_fraction).to(device)
        cb0, cs0, ea0 = (t.detach().clone().cpu() for t in (vq.codebook, vq.cluster_size, vq.embed_avg))

        q, idx, loss = vq(x, mask=mask)

        flat_x, flat_idx, flat_q = x.reshape(-1, D).cpu(), idx.reshape(-1).cpu(), q.reshape(-1, D).cpu()
        keep = torch.ones(flat_idx.shape, dtype=torch.bool) if mask is None else mask.reshape(-1).cpu()
        # decay 0 with no kept row: the Quantizer keeps its old codes (tested in test_nonfinite.py)
        assume(decay > 0 or bool(keep.any()))
        seen.append(common_case(dtype, metric, K, int(keep.sum())))
        z = flat_x.float()
        z = F.normalize(z, dim=-1) if metric == "cosine" else z
        assert bool((flat_idx[~keep] == -1).all()) and bool((flat_idx[keep] >= 0).all())
        exact = exact_distances(z[keep], cb0, metric)
        chosen = exact.gather(1, flat_idx[keep].view(-1, 1)).squeeze(1).float()
        check_assign(z[keep], cb0, metric, flat_idx[keep], chosen)
        assert torch.equal(flat_q[~keep], flat_x[~keep]), "masked rows come out unchanged"
        assert torch.equal(flat_q[keep], cb0[flat_idx[keep]].to(dtype)), "kept rows become their code"
        want_loss = 0.25 * (z[keep] - cb0[flat_idx[keep]]).pow(2).sum() / max(1, int(keep.sum()) * D)
        torch.testing.assert_close(loss.detach().cpu().float(), want_loss, rtol=1e-5, atol=1e-6)
        counts, sums = loop_cluster_stats(z, flat_idx, K)
        want = [t.float() for t in closed_form_ema(cs0, ea0, counts, sums, decay, vq.eps)]
        if metric == "cosine":
            want[2] = F.normalize(want[2], dim=-1)
        for name, w in zip(("cluster_size", "embed_avg", "codebook"), want):
            torch.testing.assert_close(getattr(vq, name if name != "codebook" else "embed").cpu(), w, rtol=1e-5, atol=1e-5)

        if layout != "contiguous":
            xs = _strided_copy(x.reshape(-1, D), layout).view(x.shape) if x.numel() else x
            ms = None if mask is None else _strided_copy(mask.reshape(-1), "padded-rows").view(mask.shape)
            qs, ids, ls = twin(xs, mask=ms)
            assert torch.equal(qs, q) and torch.equal(ids, idx)
            # the loss is a mean, which torch reduces in memory order: equal up to rounding only
            torch.testing.assert_close(ls, loss, rtol=1e-6, atol=1e-7)
            for k, v in vq.state_dict().items():
                assert torch.equal(v, twin.state_dict()[k]), k

    run()
    assert_covers_common_case(seen, examples)
