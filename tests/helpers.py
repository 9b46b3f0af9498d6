"""Checks shared by the op tests: compare any backend's output with formulations written
here, independently of the package (fp64 closed forms and plain loops), so that a bug in a
reference implementation cannot hide behind the same bug in the check."""
import math

import pytest
import torch

from vqkernels.ops.assign import tolerance


def first_mismatches(mask: torch.Tensor, *tensors, limit: int = 5) -> str:
    """Describe the first few positions where ``mask`` is True, with the values there."""
    where = mask.nonzero().flatten()[:limit].tolist()
    parts = [f"{mask.sum().item()} mismatches; first at {where}"]
    for t in tensors:
        parts.append(str(t.flatten()[where].tolist()))
    return " | ".join(parts)


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (test data never draws from the global RNG)."""
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Standard normal ``[*shape]`` drawn in fp64 from ``gen(seed)``, then cast and moved."""
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64).to(dtype).to(device)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (torch.equal would call -0.0 == 0.0 and fail on NaN == NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
    return torch.equal(a, b)


def assert_states_bitwise_equal(a: dict, b: dict, what: str):
    """Two state dicts hold the same keys and bitwise the same tensors (other values ==)."""
    assert a.keys() == b.keys(), f"{what}: keys differ: {set(a) ^ set(b)}"
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert bitwise_equal(a[k], b[k]), f"{what}: {k} differs: " + first_mismatches(a[k] != b[k], a[k], b[k])
        else:
            assert a[k] == b[k], f"{what}: {k} differs: {a[k]!r} != {b[k]!r}"


def snapshot(module: torch.nn.Module) -> dict:
    """A detached copy of ``module.state_dict()``."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- independent definitions


def exact_distances(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """fp64 distances ``[N, K]`` of rows ``x [N, D]`` to codes ``[K, D]``, closed forms:
    l2 ``sum((x - c)^2)``, cosine ``1 - x.c / (max(|x|, 1e-12) max(|c|, 1e-12))``, dot ``-x.c``."""
    x64, c64 = x.detach().cpu().double(), codebook.detach().cpu().double()
    if metric == "l2":
        return (x64.unsqueeze(1) - c64.unsqueeze(0)).pow(2).sum(-1)
    dots = x64 @ c64.t()
    if metric == "dot":
        return -dots
    assert metric == "cosine", metric
    nx = x64.pow(2).sum(1).sqrt().clamp_min(1e-12)
    nc = c64.pow(2).sum(1).sqrt().clamp_min(1e-12)
    return 1 - dots / (nx.unsqueeze(1) * nc.unsqueeze(0))


def loop_argmin(d: torch.Tensor) -> torch.Tensor:
    """Index of the smallest entry per row of ``d [N, K]``, scanning left to right with a
    strict comparison: a plain loop whose ties go to the lowest index by construction."""
    out = []
    for row in d.tolist():
        best = 0
        for k in range(1, len(row)):
            if row[k] < row[best]:
                best = k
        out.append(best)
    return torch.tensor(out, dtype=torch.int64)


def loop_histogram(indices, K: int, weights=None) -> list:
    """Counts (or weight sums, fp64) per code by a plain loop; negative indices are skipped."""
    counts = [0.0 if weights is not None else 0] * K
    w = None if weights is None else weights.detach().cpu().double().flatten().tolist()
    for n, i in enumerate(indices.detach().cpu().flatten().tolist()):
        if i >= 0:
            counts[i] += 1 if w is None else w[n]
    return counts


def loop_cluster_stats(x, indices, K: int):
    """(counts [K], sums [K, D]) in fp64 by a plain loop over rows; masked rows skipped."""
    x64 = x.detach().cpu().double()
    counts = torch.zeros(K, dtype=torch.float64)
    sums = torch.zeros(K, x64.shape[1], dtype=torch.float64)
    for n, i in enumerate(indices.detach().cpu().flatten().tolist()):
        if i >= 0:
            counts[i] += 1
            sums[i] += x64[n]
    return counts, sums


def closed_form_ema(cluster_size, embed_avg, counts, sums, decay: float, eps: float):
    """The EMA step, in fp64, element by element, per codebook (leading dims are codebooks):
    size' = decay size + (1 - decay) count;  avg' = decay avg + (1 - decay) sum;
    code = avg' / ((size' + eps) / (n + K eps) n), n = sum of size'.
    Returns fp64 (size' [..., K], avg' [..., K, D], code [..., K, D])."""
    if cluster_size.dim() > 1:
        parts = [closed_form_ema(*(t[i] for t in (cluster_size, embed_avg, counts, sums)), decay, eps) for i in range(len(cluster_size))]
        return tuple(torch.stack([p[j] for p in parts]) for j in range(3))
    cpu = [t.detach().cpu().double() for t in (cluster_size, embed_avg, counts, sums)]
    size = [decay * s + (1 - decay) * c for s, c in zip(cpu[0].tolist(), cpu[2].tolist())]
    avg = [[decay * a + (1 - decay) * s for a, s in zip(ra, rs)] for ra, rs in zip(cpu[1].tolist(), cpu[3].tolist())]
    K, n = len(size), math.fsum(size)
    code = [[a / ((s + eps) / (n + K * eps) * n) for a in row] for s, row in zip(size, avg)]
    f64 = torch.float64
    shape = embed_avg.shape
    return torch.tensor(size, dtype=f64), torch.tensor(avg, dtype=f64).view(shape), torch.tensor(code, dtype=f64).view(shape)


# --------------------------------------------------------------------------- assign check


def check_assign(x, codebook, metric, indices, distances, rtol_key=None):
    """A backend's (indices, distances) are correct for (x, codebook):

    * every index is in range and its exact fp64 distance is within the dtype tolerance of
      the true minimum (ties and near-ties may legitimately pick another code);
    * where every near-minimal code is an exact tie, the index is the lowest tied one;
    * the reported distance is the chosen code's distance, to fp32 accuracy.
    """
    x2 = x.reshape(-1, x.shape[-1])
    indices = indices.reshape(-1).cpu()
    distances = distances.reshape(-1).cpu()
    assert indices.dtype == torch.int64
    x64 = x2.detach().cpu().double()
    d = exact_distances(x2, codebook, metric)  # [N, K]
    true_min, _ = d.min(1)
    K = codebook.shape[0]
    assert bool(((indices >= 0) & (indices < K)).all()), f"index out of range: {indices[(indices < 0) | (indices >= K)][:5]}"
    chosen = d.gather(1, indices.view(-1, 1)).squeeze(1)
    tol = tolerance(x2.cpu(), codebook.cpu(), metric, rtol_key)
    bad = chosen > true_min + tol
    assert not bool(bad.any()), "chosen code not nearest: " + first_mismatches(bad, indices, chosen, true_min)
    # lowest index among exact ties (codes whose exact distance equals the minimum)
    exact_tie_lowest = (d == true_min.view(-1, 1)).to(torch.int64).argmax(1)
    near = (d <= (true_min + tol).view(-1, 1)).sum(1)
    exact = (d == true_min.view(-1, 1)).sum(1)
    # every near-minimal code is an exact copy of the minimum: the lowest index must win
    only_exact_ties = near == exact
    wrong = only_exact_ties & (indices != exact_tie_lowest)
    assert not bool(wrong.any()), "nearest (lowest tied) code missed: " + first_mismatches(wrong, indices, exact_tie_lowest)
    recomputed_err = (distances.double() - chosen).abs()
    dist_tol = 1e-5 * (1 + chosen.abs()) if distances.dtype != torch.float64 else 1e-10 * (1 + chosen.abs())
    if metric == "l2":
        dist_tol = dist_tol + 1e-6 * x64.pow(2).sum(1) * (distances.dtype != torch.float64)
    bad_d = recomputed_err > dist_tol
    assert not bool(bad_d.any()), "reported distance is not the exact one: " + first_mismatches(bad_d, distances, chosen)


def check_assign_centred(x, codebook, indices, rtol_key=None):
    """l2 only, for inputs that share a large common offset: the chosen code is within the
    tolerance of the CENTRED problem (x - m, codebook - m; m the codebook mean). l2 distances
    do not change under a common shift, so a correct pick is judged against the spread of
    the codes, not against |x|^2, which the expanded form ||x||^2 - 2x.c + ||c||^2 cancels."""
    x2 = x.reshape(-1, x.shape[-1]).detach().cpu().double()
    c = codebook.detach().cpu().double()
    d = exact_distances(x2, c, "l2")
    true_min = d.min(1).values
    chosen = d.gather(1, indices.reshape(-1, 1).cpu()).squeeze(1)
    m = c.mean(0)
    key = rtol_key if rtol_key is not None else (torch.float64 if x.dtype == torch.float64 else torch.float32)
    tol = tolerance(x2 - m, c - m, "l2", key)
    bad = chosen > true_min + tol
    assert not bool(bad.any()), (
        f"chosen code not nearest at the codes' scale (excess up to {float((chosen - true_min).max()):.3g}, "
        f"allowed {float(tol.max()):.3g}): " + first_mismatches(bad, indices.reshape(-1).cpu(), chosen, true_min)
    )


def run_gloo_ranks(worker, world: int, tmp_path, test_module: str, timeout_s: float = 180) -> list:
    """Start ``world`` Gloo ranks of ``worker(rank, world, init_dir, out_dir)``, wait at most
    ``timeout_s`` (kill them on a hang) and load each rank's ``out_dir/rank{r}.pt``.

    "forkserver": a fresh server process (no threads, no OpenMP state inherited from this
    one, like "spawn") imports torch once; every rank forks from it, so the ranks skip the
    seconds that importing torch and torch._dynamo costs each process. ``test_module`` (the
    worker's module) is preloaded there too.
    """
    import time

    import torch.multiprocessing as mp

    out_dir = tmp_path / f"world{world}"
    out_dir.mkdir()
    mp.set_forkserver_preload(["torch", "torch._dynamo", "vqkernels", test_module])
    ctx = mp.start_processes(
        worker, args=(world, str(tmp_path / f"init{world}"), str(out_dir)), nprocs=world, join=False,
        start_method="forkserver",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks did not finish within {timeout_s} s (a rank is stuck in a collective)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
