"""Codebook-statistics sync over ``torch.distributed`` (any backend: NCCL, Gloo, ...).

The few collectives a VQ layer and k-means need, in one place:

* :func:`world_info` / :func:`is_distributed`: rank and world size (``(0, 1)`` without a
  process group), so callers never test ``dist.is_initialized()`` themselves.
* :func:`all_reduce_sum_`: sums tensors across ranks in place, packed into ONE buffer per
  dtype, so a step's counts and sums cost a single collective.
* :func:`broadcast_`: overwrites tensors with rank 0's values (packed likewise).
* :func:`all_gather_rows`: concatenates row sets of different sizes from every rank
  (gather the sizes, pad to the largest, gather, trim; Gloo's ``all_gather`` needs equal
  shapes).
* :func:`sample_rows`: a random sample of the rows held across ranks, chosen on rank 0
  and identical on every rank (k-means seeding, random init, dead-code restart).

Every rank must call these the same number of times in the same order, whatever its data:
a rank with zero rows still takes part (it contributes nothing), so nothing hangs when
ranks see different batch sizes. Without an initialised process group of world size > 1
each helper is a cheap local no-op with the same result as a world of one.

**Sync hooks.** Algorithms that run on one process or across ranks (k-means, the codebook's
initialisation, dead-code restarts, the Deferred Quantization switch) are written once,
against a hook: :data:`LOCAL` (:class:`LocalSync`) does nothing across ranks, and
:class:`GroupSync` is the same interface over a process group. So the distributed path of an
algorithm is its local path plus a hook that all-reduces statistics or gathers samples;
:func:`sync_for` picks the hook.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch


class WorldInfo(NamedTuple):
    rank: int  #: this process's rank in the group (0 without a process group)
    world_size: int  #: ranks in the group (1 without a process group)


def _dist():
    import torch.distributed as dist

    return dist


def world_info(group=None) -> WorldInfo:
    """``WorldInfo(rank, world_size)`` of ``group`` (default: the world); ``(0, 1)`` when
    ``torch.distributed`` is unavailable or not initialised."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return WorldInfo(0, 1)
    return WorldInfo(dist.get_rank(group), dist.get_world_size(group))


def is_distributed(group=None) -> bool:
    """True when ``torch.distributed`` is initialised and ``group`` has more than one rank."""
    return world_info(group).world_size > 1


def _src(group) -> int:
    """Global rank of the group's rank 0 (``broadcast`` takes a global rank)."""
    if group is None:
        return 0
    return _dist().get_global_rank(group, 0)


def _packed_groups(tensors: Sequence[torch.Tensor]):
    """Tensors grouped by (dtype, device): each group travels as one flat buffer."""
    groups = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups.values()


def _run_packed(tensors: Sequence[torch.Tensor], collective) -> None:
    for group in _packed_groups(tensors):
        if len(group) == 1 and group[0].is_contiguous():
            collective(group[0])
            continue
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


@torch.no_grad()
def all_reduce_sum_(*tensors: torch.Tensor, group=None) -> Tuple[torch.Tensor, ...]:
    """Sum each tensor across ranks, in place; returns them.

    All tensors of one dtype travel in ONE flat buffer (one collective): pass a step's
    ``counts [K]`` and ``sums [K, D]`` together. No-op without a process group.

    Example:
        >>> counts, sums = vqkernels.cluster_stats(z, indices, K)
        >>> all_reduce_sum_(counts, sums)  # every rank now holds the global statistics
    """
    if is_distributed(group):
        dist = _dist()
        _run_packed(tensors, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group))
    return tensors


@torch.no_grad()
def broadcast_(*tensors: torch.Tensor, group=None) -> Tuple[torch.Tensor, ...]:
    """Overwrite each tensor with rank 0's values, in place (packed like :func:`all_reduce_sum_`)."""
    if is_distributed(group):
        dist = _dist()
        src = _src(group)
        _run_packed(tensors, lambda t: dist.broadcast(t, src=src, group=group))
    return tensors


@torch.no_grad()
def all_gather_rows(
    rows: torch.Tensor, group=None, sizes: Optional[Sequence[int]] = None
) -> Tuple[torch.Tensor, List[int]]:
    """Concatenate every rank's ``rows [n_r, ...]`` in rank order: ``([sum n_r, ...], [n_0, n_1, ...])``.

    Ranks may hold different numbers of rows, including zero. ``sizes``, when every rank
    already knows them, saves the collective that gathers them. Identical on every rank.
    """
    rank, world = world_info(group)
    if world == 1:
        return rows, [rows.shape[0]]
    dist = _dist()
    rows = rows.contiguous()
    if sizes is None:
        n = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
        gathered = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(gathered, n, group=group)
        sizes = [int(s) for s in torch.cat(gathered).tolist()]  # one host sync
    sizes = [int(s) for s in sizes]
    if sizes[rank] != rows.shape[0]:
        raise ValueError(f"all_gather_rows: sizes[{rank}] = {sizes[rank]} but this rank holds {rows.shape[0]} rows")
    largest = max(sizes)
    if largest == 0:
        return rows.new_zeros((0,) + tuple(rows.shape[1:])), sizes
    padded = rows.new_zeros((largest,) + tuple(rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]), sizes


def _split_counts(sizes: List[int], m: int, generator) -> torch.Tensor:
    """How many of ``m`` distinct rows each rank gives, about proportional to its size.

    Multinomial draws capped at each rank's size; the shortfall is drawn again among the
    ranks with rows to spare, so the counts sum to exactly ``min(m, sum(sizes))``.
    """
    sizes_t = torch.tensor(sizes, dtype=torch.int64)
    counts = torch.zeros_like(sizes_t)
    left = min(m, int(sizes_t.sum()))
    while left > 0:
        spare = sizes_t - counts
        weights = spare.to(device=_gen_device(generator), dtype=torch.float64)
        draw = torch.multinomial(weights, left, replacement=True, generator=generator).cpu()
        counts = torch.minimum(counts + torch.bincount(draw, minlength=len(sizes)), sizes_t)
        left = min(m, int(sizes_t.sum())) - int(counts.sum())
    return counts


def _gen_device(generator: Optional[torch.Generator]) -> torch.device:
    """Rank 0's plan is drawn on the generator's device (CPU for the global RNG)."""
    return generator.device if generator is not None else torch.device("cpu")


def _randperm(n: int, generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator, device=_gen_device(generator)).cpu()


def _randint(high: int, size: int, generator) -> torch.Tensor:
    return torch.randint(high, (size,), generator=generator, device=_gen_device(generator)).cpu()


def wide_rows(rows: torch.Tensor) -> torch.Tensor:
    """``[C, n, D]`` -> ``[n, C * D]``: row ``i`` as seen by every codebook travels (and is
    sampled) as one row, so ``C`` codebooks cost one collective."""
    C, n, D = rows.shape
    return rows.transpose(0, 1).reshape(n, C * D)


def stacked_rows(wide: torch.Tensor, C: int) -> torch.Tensor:
    """Inverse of :func:`wide_rows`: ``[m, C * D]`` -> ``[C, m, D]``."""
    return wide.view(wide.shape[0], C, -1).transpose(0, 1)


class LocalSync:
    """The sync hook of one process, or of a layer that keeps its own statistics: nothing
    crosses ranks. :class:`GroupSync` has the same methods over a process group, so an
    algorithm written against a hook runs unchanged on one rank or many.

    Row sets passed to the hooks are ``[n, D]`` (this rank's rows; ``n`` may be 0) or, where
    noted, ``[C, n, D]``: the same ``n`` rows as seen by ``C`` codebooks.
    """

    active = False  #: True when the hook talks to other ranks
    rank = 0  #: this process's rank in the hook's group
    group = None  #: the process group (``None``: the world, or no group at all)

    def all_reduce_sum_(self, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Sum across ranks in place (see :func:`all_reduce_sum_`); here the identity."""
        return tensors

    def broadcast_(self, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Overwrite with rank 0's values (see :func:`broadcast_`); here the identity."""
        return tensors

    def all_gather_rows(self, rows: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """Every rank's rows in rank order (see :func:`all_gather_rows`); here ``rows``."""
        return rows, [rows.shape[0]]

    def total(self, n: int, device=None) -> int:
        """``n`` summed over the ranks."""
        return n

    def sample_rows(self, rows: torch.Tensor, m: int, *, replacement: bool = False, generator=None) -> torch.Tensor:
        """``min(m, n)`` distinct rows of ``rows [n, D]`` in random order (``m`` drawn with
        replacement when ``replacement`` and ``n < m``; ``[0, D]`` when ``n = 0``). Draws on
        the generator's device, or the rows' device with the global RNG (no host round trip)."""
        n = rows.shape[0]
        if n == 0:
            return rows[:0]
        device = generator.device if generator is not None else rows.device
        if replacement and n < m:
            pick = torch.randint(n, (m,), device=device, generator=generator)
        else:
            pick = torch.randperm(n, device=device, generator=generator)[:m]
        return rows[pick.to(rows.device)]

    def pool(self, rows: torch.Tensor, m: int, *, generator=None) -> torch.Tensor:
        """Candidate rows for a choice made on rank 0 that needs about ``m`` of them (k-means
        seeding): here all of ``rows`` (the caller subsamples); across ranks a sample of
        ``min(m, N)`` rows of all ranks, so the traffic stays ``O(m D)``."""
        return rows

    def random_rows(
        self, rows: torch.Tensor, keep: Optional[torch.Tensor], want: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows for dead-code restarts: one random order of the kept rows, and for each entry
        ``r`` of ``want [C, K]`` (-1: none wanted) the ``r``-th row of that order.

        Args:
            rows: ``[C, N, D]``, the rows each of ``C`` codebooks sees.
            keep: ``[N]`` bool (shared by the codebooks) or ``None``.
            want: ``[C, K]`` int64 positions in the random order, -1 for none.

        Returns:
            ``(picked [C, K, D], found [C, K] bool)``: ``found`` is False where nothing was
            wanted or fewer rows exist than the position. Here on device, without host syncs
            (one ``rand`` and one ``argsort`` of ``N`` keys).
        """
        C, N, D = rows.shape
        if N == 0:
            return rows.new_zeros(tuple(want.shape) + (D,)), torch.zeros_like(want, dtype=torch.bool)
        keys = torch.rand(N, device=rows.device)
        if keep is not None:
            keys = keys.masked_fill(~keep, 2.0)  # masked rows sort last
            n_rows = keep.sum()
        else:
            n_rows = torch.full((), N, device=rows.device, dtype=torch.int64)
        order = keys.argsort()
        picked = torch.take_along_dim(rows, order[want.clamp(0, N - 1)].unsqueeze(-1), dim=1)
        return picked, (want >= 0) & (want < n_rows)


class GroupSync(LocalSync):
    """The sync hook over a process group (any backend): the collectives of this module.

    Every rank must make the same calls in the same order; a rank with no rows takes part.
    """

    active = True

    def __init__(self, group=None):
        self.group = group
        self.rank = world_info(group).rank

    def all_reduce_sum_(self, *tensors):
        return all_reduce_sum_(*tensors, group=self.group)

    def broadcast_(self, *tensors):
        return broadcast_(*tensors, group=self.group)

    def all_gather_rows(self, rows):
        return all_gather_rows(rows, group=self.group)

    def total(self, n, device=None):
        t = torch.tensor([n], dtype=torch.int64, device=device)
        all_reduce_sum_(t, group=self.group)
        return int(t)

    def sample_rows(self, rows, m, *, replacement=False, generator=None):
        """As :meth:`LocalSync.sample_rows` over the rows of all ranks, identical on every rank.

        Rank 0 decides how many rows each rank contributes (about proportional to its count)
        and their order; the ranks gather only the chosen rows, so the traffic is
        ``O(m * D)`` whatever the shard sizes. Collectives: 3 (sizes, rank 0's plan, rows).
        """
        dist = _dist()
        world = world_info(self.group).world_size
        rank, group = self.rank, self.group
        n_local = rows.shape[0]
        device = rows.device
        n = torch.tensor([n_local], dtype=torch.int64, device=device)
        gathered = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(gathered, n, group=group)
        sizes = [int(s) for s in torch.cat(gathered).tolist()]
        total = sum(sizes)
        if total == 0:  # every rank sees the same total: all return here together
            return rows[:0]
        with_replacement = replacement and total < m
        m_out = m if with_replacement else min(m, total)
        # rank 0's plan, in one int64 buffer: rows per rank, then the order of the gathered rows
        plan = torch.zeros(world + m_out, dtype=torch.int64)
        if rank == 0:
            if with_replacement:
                counts = torch.tensor(sizes, dtype=torch.int64)  # everything, then draw with replacement
                order = _randint(total, m_out, generator)
            else:
                counts = _split_counts(sizes, m_out, generator)
                order = _randperm(m_out, generator)
            plan[:world] = counts
            plan[world:] = order
        plan = plan.to(device)
        dist.broadcast(plan, src=_src(group), group=group)
        plan = plan.cpu()
        counts = plan[:world].tolist()
        mine = _randperm(n_local, generator)[: counts[rank]].to(device)
        candidates, _ = all_gather_rows(rows[mine], group=group, sizes=counts)
        return candidates[plan[world:].to(device)]

    def pool(self, rows, m, *, generator=None):
        return self.sample_rows(rows, m, generator=generator)

    def random_rows(self, rows, keep, want):
        """As :meth:`LocalSync.random_rows` over the kept rows of all ranks: the positions are
        the same on every rank (``want`` comes from all-reduced statistics), so the ranks
        agree on how many rows to draw (one host sync); rank 0 draws them among all ranks'
        kept rows and every rank receives them. A row travels with all ``C`` codebooks' views."""
        C, N, D = rows.shape
        picked = rows.new_zeros(tuple(want.shape) + (D,))
        n_want = int((want >= 0).sum(-1).max()) if want.numel() else 0  # identical on every rank
        if n_want == 0:
            return picked, torch.zeros_like(want, dtype=torch.bool)
        kept = rows if keep is None else rows[:, keep]
        sample = stacked_rows(self.sample_rows(wide_rows(kept), n_want), C)  # [C, m, D], same everywhere
        m = sample.shape[1]
        if m == 0:
            return picked, torch.zeros_like(want, dtype=torch.bool)
        picked = torch.take_along_dim(sample, want.clamp(0, m - 1).unsqueeze(-1), dim=1)
        return picked, (want >= 0) & (want < m)


#: The hook of a single process (shared; it holds no state).
LOCAL = LocalSync()


def sync_for(enabled: bool = True, group=None) -> LocalSync:
    """The hook for ``group``: :class:`GroupSync` when ``enabled`` and the group has more than
    one rank, else :data:`LOCAL`. (Cheap; ``torch.compile`` folds it to a constant.)"""
    if enabled and is_distributed(group):
        return GroupSync(group)
    return LOCAL


@torch.no_grad()
def sample_rows(
    rows: torch.Tensor,
    m: int,
    *,
    replacement: bool = False,
    generator: Optional[torch.Generator] = None,
    group=None,
) -> torch.Tensor:
    """A random sample of the rows held across all ranks, identical on every rank.

    Args:
        rows: ``[n_r, D]`` this rank's rows (``n_r`` may be 0 and differ between ranks).
        m: rows wanted.
        replacement: when the ranks hold fewer than ``m`` rows in total, draw ``m`` with
            replacement instead of returning fewer.
        generator: generator for rank 0's choices (and the local picks); ``None`` uses
            the global RNG.

    Returns:
        ``[min(m, N), D]`` distinct rows in random order (``[m, D]`` with ``replacement``
        when ``N < m``; ``[0, D]`` when no rank holds a row), ``N`` the total row count.
        Across ranks, rank 0 decides how many rows each rank contributes and their order
        (see :meth:`GroupSync.sample_rows`).
    """
    return sync_for(True, group).sample_rows(rows, m, replacement=replacement, generator=generator)


__all__ = [
    "WorldInfo",
    "world_info",
    "is_distributed",
    "all_reduce_sum_",
    "broadcast_",
    "all_gather_rows",
    "sample_rows",
    "LocalSync",
    "GroupSync",
    "LOCAL",
    "sync_for",
    "wide_rows",
    "stacked_rows",
]
