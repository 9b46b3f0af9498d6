"""k-means built from the ``assign`` and ``cluster_stats`` ops (any backend).

One Lloyd loop serves one process and many: every step that needs other ranks' data goes
through a sync hook (:mod:`vqkernels.distributed`): the local hook does nothing, the group
hook all-reduces the statistics and gathers candidate rows. So ``distributed=True`` is the
local algorithm plus the hook, not a second implementation.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from .. import distributed as _dist
from . import _dispatch
from ._metrics import CENTROID_METRICS, normalized, paired_distance
from ._validation import all_finite, check_codebook_size, check_metric, check_tensor, compute_dtype, check_finite
from .assign import assign
from .cluster_stats import cluster_stats_unchecked

INITS = ("kmeans++", "random")


class KMeansResult(NamedTuple):
    centroids: torch.Tensor  #: ``[K, D]`` float32 (fp64 for fp64 x); identical on every rank when distributed
    indices: torch.Tensor  #: ``[N]`` int64, each (local) row's centroid under the returned centroids
    inertia: float  #: sum of the rows' distances to their centroids (metric's distance; all ranks' rows when distributed)
    n_iter: int  #: Lloyd iterations run
    inertia_history: List[float]  #: inertia after the initial assignment and after each iteration


def _generator(device: torch.device, seed: Optional[int]) -> Optional[torch.Generator]:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _prepare(data: torch.Tensor, metric: str, seed: Optional[int]):
    """Rows in the accumulation dtype (unit rows for cosine) and the seeded generator."""
    data = normalized(data.to(compute_dtype(data.dtype)), metric)
    return data, _generator(data.device, seed)


def _given_centroids(init_centroids: torch.Tensor, K: int, D: int, data: torch.Tensor) -> torch.Tensor:
    """Validated copy of the caller's ``[K, D]`` starting centroids, on data's device and dtype."""
    check_tensor("init_centroids", init_centroids, floating=True, dims=(2,))
    if tuple(init_centroids.shape) != (K, D):
        raise ValueError(f"init_centroids has shape {tuple(init_centroids.shape)}; expected ({K}, {D})")
    check_finite("init_centroids", init_centroids)
    return init_centroids.detach().to(device=data.device, dtype=data.dtype).clone()


def _kmeans_plus_plus(x: torch.Tensor, K: int, metric: str, sample_size: int, gen) -> torch.Tensor:
    """k-means++ seeding on a random subsample: each new centre is drawn with probability
    proportional to the current distance to the nearest centre."""
    N = x.shape[0]
    if sample_size < N:
        x = x[torch.randperm(N, device=x.device, generator=gen)[:sample_size]]
    first = torch.randint(x.shape[0], (1,), device=x.device, generator=gen)
    centres = torch.empty(K, x.shape[1], dtype=x.dtype, device=x.device)
    centres[0] = x[first[0]]
    nearest = paired_distance(x, centres[0], metric, normalized_inputs=True)
    for k in range(1, K):
        # clamp: a tiny negative from rounding must not make the weights invalid; +tiny so
        # that a sample made of duplicates (all distances 0) still draws a row.
        weights = nearest.clamp_min(0) + torch.finfo(nearest.dtype).tiny
        pick = torch.multinomial(weights, 1, generator=gen)
        centres[k] = x[pick[0]]
        nearest = torch.minimum(nearest, paired_distance(x, centres[k], metric, normalized_inputs=True))
    return centres


def kmeans(
    x: torch.Tensor,
    K: int,
    iters: int = 25,
    *,
    metric: str = "l2",
    init: str = "kmeans++",
    tol: float = 1e-4,
    seed: Optional[int] = None,
    sample_size: Optional[int] = None,
    init_centroids: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    progress: bool = False,
    backend: Optional[str] = None,
    distributed: bool = False,
    group=None,
) -> KMeansResult:
    """Lloyd's k-means on ``x``, with every assignment and statistic through vqkernels' ops.

    Args:
        x: ``[..., D]`` float rows (leading dims flattened); needs at least ``K`` rows.
        K: number of centroids.
        iters: maximum Lloyd iterations (0 returns the initialisation, assigned).
        metric: ``"l2"`` or ``"cosine"`` (spherical k-means: rows and centroids normalised).
        init: ``"kmeans++"`` (on a subsample of ``sample_size`` rows, default
            ``max(4K, 2048)``; costs K sequential steps) or ``"random"`` (K distinct rows).
        tol: stop when an iteration lowers the inertia by at most ``tol`` times its value.
        seed: seeds a private generator (the global RNG is used when ``None``).
        init_centroids: ``[K, D]`` starting centroids; overrides ``init``.
        deterministic: bitwise-reproducible statistics (see :func:`cluster_stats`).
        progress: show a tqdm progress bar (needs ``tqdm``; rank 0 only when distributed).
        backend: as for :func:`vqkernels.assign`.
        distributed: ``x`` is this rank's shard of a dataset split across the ranks of
            ``group`` (``torch.distributed``, any backend): fit one set of centroids to the
            union. Every rank must call ``kmeans`` with the same arguments (except ``x``,
            whose row count may differ and may be 0). Seeding samples rows from all shards
            (about proportionally to their sizes) and runs on rank 0; each Lloyd iteration
            all-reduces the counts, sums and inertia in one packed buffer; empty clusters
            take the farthest rows of all shards. Every rank returns the same centroids,
            inertia and history; ``indices`` are its own rows'. A no-op without a process
            group of world size > 1.
        group: the process group (default: the world).

    Empty clusters are re-seeded from the rows farthest from their centroid, so the
    inertia never increases from one iteration to the next.

    Returns:
        :class:`KMeansResult` ``(centroids, indices, inertia, n_iter, inertia_history)``.

    Example:
        >>> result = vqkernels.kmeans(torch.randn(10_000, 16), K=64, iters=10, seed=0)
        >>> result.centroids.shape
        torch.Size([64, 16])
        >>> # under torchrun, each rank with its own shard:
        >>> # result = vqkernels.kmeans(my_shard, K=64, iters=10, seed=0, distributed=True)
    """
    check_tensor("x", x, floating=True, min_dim=1)
    check_codebook_size("K", K)
    check_metric(metric, CENTROID_METRICS)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    D = x.shape[-1]
    data = x.detach().reshape(-1, D)
    sync = _dist.sync_for(distributed, group)
    # One collective for the checks every rank must agree on: total rows, and any rank's
    # non-finite rows (raised on every rank, so no rank is left waiting in a collective).
    # (a finite sum proves every row finite: one reduction instead of isfinite's several passes)
    n_bad = 0 if all_finite(data) else int((~torch.isfinite(data).all(1)).sum())
    flags = torch.tensor([data.shape[0], n_bad], dtype=torch.int64, device=data.device)
    sync.all_reduce_sum_(flags)
    N, n_bad = (int(v) for v in flags.tolist())
    if N < K:
        where = "across all ranks" if sync.active else f"(x shape {tuple(x.shape)})"
        raise ValueError(f"kmeans needs at least K={K} rows to place K centroids, got {N} rows {where}")
    if n_bad:
        check_finite("x", data)  # the rank holding them names the rows
        raise ValueError(f"x contains NaN or Inf on another rank ({n_bad} rows in all); expected finite values")
    data, gen = _prepare(data, metric, seed)

    if init_centroids is not None:
        centroids = _given_centroids(init_centroids, K, D, data)
        sync.broadcast_(centroids)  # rank 0's, should the ranks disagree
    elif init == "random":
        centroids = sync.sample_rows(data, K, generator=gen).clone()  # K distinct rows, same on every rank
    else:
        size = max(min(N, sample_size if sample_size is not None else max(4 * K, 2048)), K)
        pool = sync.pool(data, size, generator=gen)  # rank 0 seeds from it
        centroids = torch.empty(K, D, dtype=data.dtype, device=data.device)
        if sync.rank == 0:
            centroids = _kmeans_plus_plus(pool, K, metric, size, gen)
        sync.broadcast_(centroids)
    centroids = normalized(centroids, metric)

    # The data were checked once above, and centroids are means of those rows: the loop runs
    # the ops without their per-call value checks (each was a pass over x and a host sync).
    requested = _dispatch.requested_backend(backend)
    indices, dist = _assign_trusted(data, centroids, metric, requested)
    history: List[float] = []
    bar = _progress_bar(iters) if progress and sync.rank == 0 else None
    n_iter = 0
    for it in range(iters + 1):
        inertia = dist.sum().reshape(1).to(data.dtype)
        if it == iters:  # the last assignment: only its inertia is needed, not its statistics
            sync.all_reduce_sum_(inertia)
            history.append(inertia.item())
        else:
            # Statistics of the current assignment and its inertia, in one packed all-reduce.
            counts, sums = cluster_stats_unchecked(data.unsqueeze(0), indices.unsqueeze(0), K, deterministic, requested)
            counts, sums = counts[0], sums[0]
            sync.all_reduce_sum_(counts, sums, inertia)
            # the iteration's one host read: the inertia (history, tol) and the empty clusters
            value, n_empty = torch.cat([inertia, (counts == 0).sum().reshape(1).to(counts.dtype)]).tolist()
            history.append(value)
        if it > 0:
            if bar is not None:
                bar.update(1)
                bar.set_postfix(inertia=f"{history[-1]:.4g}")
            if history[-2] - history[-1] <= tol * abs(history[-1]):
                break
        if it == iters:
            break
        n_iter = it + 1
        centroids = _update(data, centroids, indices, counts, sums, metric, sync, int(n_empty))
        indices, dist = _assign_trusted(data, centroids, metric, requested)
    if bar is not None:
        bar.close()
    return KMeansResult(centroids, indices, history[-1], n_iter, history)


def _assign_trusted(data, centroids, metric, backend):
    """``assign`` of finite rows to finite centroids: the backend directly, without the public
    op's checks and its non-finite pass over the rows (both settled once before the loop)."""
    if data.shape[0] == 0:
        return assign(data, centroids, metric, backend=backend or None, check_codebook=False)
    indices, dist = _dispatch.call("assign", backend, data.device, data.dtype, data.unsqueeze(0), centroids.unsqueeze(0).contiguous(), metric)
    return indices[0], dist[0]


def _update(data, centroids, indices, counts, sums, metric, sync, n_empty):
    """Means from the (all-reduced) statistics; empty clusters (``n_empty`` of them, the same
    on every rank) take the rows farthest from their new centroid, among all ranks' rows, so
    the inertia never increases."""
    filled = counts > 0
    means = normalized(sums / counts.clamp_min(1).unsqueeze(1), metric)
    new = torch.where(filled.unsqueeze(1), means, centroids)
    if n_empty:
        far = paired_distance(data, new[indices], metric, normalized_inputs=True) if data.shape[0] else data.new_zeros(0)
        top = torch.topk(far, min(n_empty, far.shape[0]))  # distinct rows, farthest first
        # each rank offers its n_empty farthest rows, distance first; the farthest of all win
        offered, _ = sync.all_gather_rows(torch.cat([top.values.unsqueeze(1), data[top.indices]], 1))
        take = min(n_empty, offered.shape[0])
        # stable: on one rank the offer is already in order, and stays so
        order = torch.sort(offered[:, 0], descending=True, stable=True).indices[:take]
        rows = offered[order, 1:].contiguous()
        sync.broadcast_(rows)  # rank 0's choice, should ties be broken differently
        new[(~filled).nonzero().flatten()[:take]] = rows
    return new


def _progress_bar(total):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("kmeans(progress=True) needs tqdm: pip install tqdm (or vqkernels[progress])") from None
    return tqdm(total=total, desc="kmeans", unit="iter")
