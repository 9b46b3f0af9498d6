"""The codebook state of a VQ layer, with a leading codebook axis ``C``.

:class:`Codebook` holds ``C`` independent codebooks of ``K`` codes in ``D`` dimensions and
everything that trains them: the codes, the EMA statistics, the first-batch initialisation
(k-means or random rows), dead-code restarts, and Deferred Quantization's reservoir and
switch (Zhao et al., 2026). A :class:`vqkernels.Quantizer` is one (``C = 1``); heads,
residual stages and groups are ``C > 1``: their statistics and EMA update run as ONE op call
over the codebook axis, never a Python loop over codebooks.

Rows arrive in codebook space as ``[C, N, D]`` (what each codebook sees of the same ``N``
rows), indices as ``[C, N]`` (-1: masked), the row mask as ``[N]``, shared by the codebooks.

Every step that involves other ranks goes through a sync hook of
:mod:`vqkernels.distributed` (:data:`~vqkernels.distributed.LOCAL` in one process): one
algorithm for one rank and many.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from . import distributed as _dist
from .ops import _dispatch, kmeans

# The Codebook is a trusted caller: it validates once, and the ops it calls skip their
# argument and value checks (no host sync per step); the names say which op runs.
from .ops.cluster_stats import cluster_stats_unchecked as cluster_stats
from .ops.ema_update import ema_update_unchecked as ema_update_
from .ops.histogram import histogram_unchecked as histogram
from .ops._metrics import CENTROID_METRICS, normalized
from .ops._validation import check_codebook_size, check_metric

LEARNING = ("ema", "gradient")
INITS = ("kmeans", "random", "uniform")


def _check_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")


class Codebook(nn.Module):
    """``C`` codebooks of ``K`` codes and their training state (EMA, init, restarts, deferral).

    Args:
        codebook_size: codes per codebook ``K``.
        dim: size of a code ``D``.
        num_codebooks: ``C``, independent codebooks (heads, residual stages, groups).
        codebook_axis: ``False`` stores a single codebook (``C = 1``) without the leading
            axis (``embed [K, D]``, ``cluster_size [K]``, ``reservoir [R, D]``), the layout of
            a :class:`~vqkernels.Quantizer`'s checkpoints; the algorithms still run on the
            ``[1, K, D]`` view.
        metric, learning, decay, eps, init, kmeans_iters, dead_code_threshold,
        reset_cluster_size, deferred_steps, reservoir_size, deterministic, backend: as for
            :class:`~vqkernels.Quantizer`.

    State (buffers, in the state dict; ``[C, ...]`` with the codebook axis): ``embed
    [C, K, D]`` (a Parameter with ``learning="gradient"``), ``embed_avg [C, K, D]`` (EMA),
    ``cluster_size [C, K]``, ``initted``, ``quantizing``, ``steps`` (training calls), and with
    ``deferred_steps`` ``reservoir [C, R, D]`` and ``reservoir_seen``. Not in the state dict:
    ``nonfinite_batches``, the training steps skipped by the non-finite policy (see
    :meth:`update_`'s ``finite``), as ``torch.amp.GradScaler`` counts skipped steps. Rows are sampled into
    the reservoir and re-seeded into dead codes by row, the same rows for every codebook.

    Example:
        >>> from vqkernels.distributed import LOCAL
        >>> book = Codebook(512, 64, num_codebooks=4, decay=0.99)
        >>> z = torch.randn(4, 1000, 64)                         # [C, N, D]
        >>> indices = vqkernels.assign(z, book.codes()).indices  # [C, N]
        >>> book.update_(z, indices, None, LOCAL)  # one cluster_stats and one ema_update_ call for all 4
        >>> book.embed.shape, book.cluster_size.shape
        (torch.Size([4, 512, 64]), torch.Size([4, 512]))
    """

    STATE_KEYS = ("embed", "embed_avg", "cluster_size", "initted", "quantizing", "steps", "reservoir", "reservoir_seen")

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        *,
        num_codebooks: int = 1,
        codebook_axis: bool = True,
        metric: str = "l2",
        learning: str = "ema",
        decay: float = 0.8,
        eps: float = 1e-5,
        init: str = "uniform",
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
        reset_cluster_size: Optional[float] = None,
        deferred_steps: int = 0,
        reservoir_size: Optional[int] = None,
        deterministic: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        check_codebook_size("codebook_size", codebook_size)
        check_codebook_size("codebook_dim", dim)
        check_codebook_size("num_codebooks", num_codebooks)
        if not codebook_axis and num_codebooks != 1:
            raise ValueError(f"codebook_axis=False stores a single codebook; got num_codebooks={num_codebooks}")
        check_metric(metric, CENTROID_METRICS)
        for name, value, allowed in (("learning", learning, LEARNING), ("init", init, INITS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name, value in (("decay", decay), ("eps", eps), ("dead_code_threshold", dead_code_threshold)):
            _check_float(name, value)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (Laplace smoothing), got {eps!r}")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold!r}")
        if isinstance(deferred_steps, bool) or not isinstance(deferred_steps, int) or deferred_steps < 0:
            raise ValueError(f"deferred_steps must be an int >= 0, got {deferred_steps!r}")
        if isinstance(kmeans_iters, bool) or not isinstance(kmeans_iters, int) or kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be an int >= 0, got {kmeans_iters!r}")
        C, K, D = num_codebooks, codebook_size, dim
        reservoir_size = 4 * K if reservoir_size is None else reservoir_size
        if deferred_steps and (not isinstance(reservoir_size, int) or reservoir_size < K):
            raise ValueError(f"reservoir_size must be an int >= codebook_size={K} (k-means needs K rows), got {reservoir_size!r}")
        _dispatch.requested_backend(backend)  # an unknown name fails here, not at the first forward

        self.num_codebooks, self.codebook_size, self.dim = C, K, D
        self.codebook_axis = codebook_axis
        self.metric, self.learning, self.init = metric, learning, init
        self.decay, self.eps = float(decay), float(eps)
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = float(dead_code_threshold)
        self.reset_cluster_size = float(dead_code_threshold if reset_cluster_size is None else reset_cluster_size)
        self.deferred_steps = deferred_steps
        self.reservoir_size = reservoir_size
        self.deterministic = deterministic
        self.backend = backend

        lead = (C,) if codebook_axis else ()
        # Every buffer exists from construction on, so strict state_dict loading always works.
        if init == "uniform" and not deferred_steps:
            embed = torch.empty(C * K, D)  # fan-in D for every codebook, as for one [K, D] codebook
            nn.init.kaiming_uniform_(embed)
            embed = normalized(embed, metric).view(lead + (K, D))
            initted = True
        else:
            embed = torch.zeros(lead + (K, D))
            initted = False
        if learning == "gradient":
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
            self.register_buffer("embed_avg", embed.clone())  # cluster_size is 1, so embed_avg = embed
        self.register_buffer("cluster_size", torch.ones(lead + (K,)))
        self.register_buffer("initted", torch.tensor(initted))
        self.register_buffer("quantizing", torch.tensor(deferred_steps == 0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # training calls
        # steps skipped for a non-finite batch: a device counter (reading a flag would sync)
        self.register_buffer("nonfinite_batches", torch.zeros((), dtype=torch.int64), persistent=False)
        if deferred_steps:
            self.register_buffer("reservoir", torch.zeros(lead + (reservoir_size, D)))
            self.register_buffer("reservoir_seen", torch.zeros((), dtype=torch.int64))
        # Python mirrors of the flags, so callers branch on Python values (no host sync, no
        # graph break under torch.compile); refreshed whenever a state_dict is loaded.
        self._initted = initted
        self._quantizing = deferred_steps == 0
        self._deferred_calls = 0
        self._state_broadcast = False  # rank 0's codebook sent to the other ranks (first synced call)
        self._pending = None  # (counts, sums) accumulated by update_(accumulate=True), not yet applied

    # ------------------------------------------------------------------ layout
    def _c(self, t: torch.Tensor) -> torch.Tensor:
        """A stored tensor on the codebook axis (a view: in-place writes reach the storage)."""
        return t if self.codebook_axis else t.unsqueeze(0)

    def stored_codes(self) -> torch.Tensor:
        """The codes in the stored layout (unit rows for cosine; differentiable when learned
        by gradient): ``[C, K, D]``, or ``[K, D]`` without the codebook axis."""
        if self.metric == "cosine" and self.learning == "gradient":
            return normalized(self.embed, self.metric)
        return self.embed  # EMA + cosine keeps the stored codes normalised

    def codes(self) -> torch.Tensor:
        """The codes ``[C, K, D]`` (unit rows for cosine; differentiable when learned by gradient)."""
        return self._c(self.stored_codes())

    @property
    def is_initialised(self) -> bool:
        return self._initted

    @property
    def is_quantizing(self) -> bool:
        """False while Deferred Quantization is still in its continuous phase."""
        return self._quantizing

    @property
    def switch_due(self) -> bool:
        """The continuous phase has had its ``deferred_steps`` training calls."""
        return self._deferred_calls >= self.deferred_steps

    # ------------------------------------------------------------------ state changes
    @torch.no_grad()
    def load_codes_(self, codes: torch.Tensor, cluster_size: torch.Tensor) -> None:
        """Set the codes ``[C, K, D]`` and EMA statistics ``[C, K]`` consistently
        (``embed_avg = codes * size``; either in the stored layout works too)."""
        codes = normalized(codes, self.metric)
        self.embed.data.copy_(codes.reshape(self.embed.shape))
        self.cluster_size.copy_(cluster_size.reshape(self.cluster_size.shape))
        if self.learning == "ema":
            self.embed_avg.copy_((codes * cluster_size.unsqueeze(-1)).reshape(self.embed_avg.shape))
        self.initted.fill_(True)
        self._initted = True

    @torch.no_grad()
    def broadcast_(self, sync: _dist.LocalSync) -> None:
        """Once, on the first synced call: every rank starts from rank 0's codes and statistics
        (one packed broadcast), so ranks that built the module with different random codes agree."""
        if not sync.active or self._state_broadcast:
            return
        sync.broadcast_(self.embed.data, self.cluster_size, *([self.embed_avg] if self.learning == "ema" else []))
        self._state_broadcast = True

    @torch.no_grad()
    def initialise_(self, z: torch.Tensor, keep: Optional[torch.Tensor], sync: _dist.LocalSync) -> None:
        """First training batch ``z [C, N, D]``: k-means, or ``K`` random kept rows (the same
        rows for every codebook); a one-off host sync. With a group hook: over all ranks' rows,
        and every rank raises alike when all ranks together hold too few rows."""
        rows = z if keep is None else z[:, keep]
        K = self.codebook_size
        where = " (all ranks together)" if sync.active else ""
        if self.init == "kmeans":
            n = sync.total(rows.shape[1], rows.device)
            if n < K:
                raise ValueError(
                    f"init='kmeans' needs at least codebook_size={K} rows in the first training batch{where}, got "
                    f"{n}; use a bigger first batch, init='random', or deferred_steps (k-means on a "
                    "reservoir of reservoir_size rows)"
                )
            self.kmeans_init_(rows, None, sync)
            return
        C, n, D = rows.shape
        picked = sync.sample_rows(_dist.wide_rows(rows), K, replacement=True)  # chosen on rank 0 when synced
        if picked.shape[0] == 0:
            raise ValueError(f"init='random' needs at least one unmasked row in the first training batch{where}")
        self.load_codes_(_dist.stacked_rows(picked, C), torch.ones(C, K, device=z.device))

    @torch.no_grad()
    def kmeans_init_(self, rows: torch.Tensor, batch_rows: Optional[float], sync: _dist.LocalSync) -> None:
        """k-means of each codebook on its ``rows [C, n, D]`` (all ranks' with a group hook);
        cluster sizes scaled to ``batch_rows`` rows per step (default: as many as k-means saw)."""
        K = self.codebook_size
        centroids, counts = [], []
        for c in range(self.num_codebooks):  # a one-off: k-means per codebook
            result = kmeans(
                rows[c], K, self.kmeans_iters, metric=self.metric, backend=self.backend, distributed=sync.active, group=sync.group
            )
            centroids.append(result.centroids)
            counts.append(histogram(result.indices.unsqueeze(0), K, _dispatch.requested_backend(self.backend))[0])
        counts = torch.stack(counts).to(self.cluster_size.dtype)
        sync.all_reduce_sum_(counts)  # every rank's rows under the shared centroids
        n = sync.total(rows.shape[1], rows.device)
        scale = (n if batch_rows is None else batch_rows) / n
        self.load_codes_(torch.stack(centroids).to(self.embed.dtype), counts * scale)

    @torch.no_grad()
    def update_(
        self, z: torch.Tensor, indices: torch.Tensor, keep: Optional[torch.Tensor], sync: _dist.LocalSync, *,
        accumulate: bool = False, weight=None, finite: Optional[torch.Tensor] = None,
    ) -> None:
        """One training step: statistics of ``z [C, N, D]`` under ``indices [C, N]`` for all
        codebooks in one op call, summed over ranks by the hook (one collective), then the EMA
        update of all codebooks in one call (or, with gradient learning, the EMA of the usage),
        then dead-code restarts.

        ``accumulate``: only add this step's statistics to a pending sum (gradient
        accumulation, vector-quantize-pytorch's ``accum_ema_update``); the next step that does
        not accumulate (or :meth:`apply_pending_`) applies them with its own, in one EMA step and
        one collective. ``weight``: per-code EMA weight (see :meth:`apply_stats_`).

        ``finite``: the non-finite policy without a host sync. A 0-dim bool tensor on the
        device, False when the batch held a non-finite kept row (or the codes are non-finite):
        then the step leaves the codes, the statistics, any pending sum and the dead codes
        exactly as they were (``torch.where`` on the new values; with a group hook every rank
        skips when any rank's flag is False) and ``nonfinite_batches`` counts it. ``None``: no
        gating (the caller checked, or does not care).

        The Codebook is the trusted caller of the ops: ``indices`` come from ``assign`` (in
        ``[0, K)``, -1 for masked or non-finite rows), so the ops run without re-validating
        their arguments (no value checks, no host sync)."""
        K = self.codebook_size
        if z.dim() != 3 or tuple(indices.shape) != tuple(z.shape[:2]) or z.shape[0] != self.num_codebooks:
            raise ValueError(
                f"update_ needs z [C={self.num_codebooks}, N, D={self.dim}] and indices [C, N]; "
                f"got z {tuple(z.shape)}, indices {tuple(indices.shape)}"
            )
        backend = _dispatch.requested_backend(self.backend)
        if self.learning == "ema":
            counts, sums = cluster_stats(z, indices, K, deterministic=self.deterministic, backend=backend)
        else:
            counts, sums = histogram(indices, K, backend).to(self.cluster_size.dtype), None
        if accumulate and finite is not None:
            # a skipped batch adds nothing to the pending sum (its kept rows included)
            self.nonfinite_batches.add_((~finite).to(torch.int64))
            counts = torch.where(finite, counts, torch.zeros((), dtype=counts.dtype, device=counts.device))
            sums = None if sums is None else torch.where(finite, sums, torch.zeros((), dtype=sums.dtype, device=sums.device))
        if accumulate:
            if self._pending is not None:
                counts = counts + self._pending[0]
                sums = None if sums is None else sums + self._pending[1]
            self._pending = (counts, sums)
        else:
            finite = self.apply_stats_(counts, sums, sync, weight, finite=finite)
            if self.dead_code_threshold > 0:
                self.restart_dead_codes_(z, keep, sync, finite=finite)
        self.steps.add_(1)

    @torch.no_grad()
    def apply_pending_(self, sync: _dist.LocalSync) -> bool:
        """Apply the statistics accumulated by ``update_(..., accumulate=True)`` now, as one EMA
        step (no dead-code restarts: there is no batch to re-seed from). With a group hook every
        rank must call it. Returns False when nothing was pending."""
        if self._pending is None:
            return False
        counts, sums = self._pending
        self._pending = None
        self.apply_stats_(counts, sums, sync)
        return True

    @torch.no_grad()
    def apply_stats_(
        self, counts: torch.Tensor, sums: Optional[torch.Tensor], sync: _dist.LocalSync, weight=None, *,
        finite: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        """The EMA step from this step's ``counts [C, K]`` and ``sums [C, K, D]`` (``None`` with
        gradient learning), plus any pending accumulated statistics, summed over ranks.

        ``weight``: vector-quantize-pytorch's ``ema_update_weight``, a per-code weight (a float,
        ``[K]`` or ``[C, K]``, or a callable ``(sums, counts) -> weight``) that scales the EMA
        step of each code: ``stat <- stat + (1 - decay) * weight * (new - stat)``.

        ``finite``: see :meth:`update_`; returns it, all-reduced with a group hook (the flag
        the dead-code restarts must obey), or ``None``."""
        if self._pending is not None:
            counts = counts + self._pending[0]
            sums = None if sums is None else sums + self._pending[1]
            self._pending = None
        stats = (counts,) if sums is None else (counts, sums)
        if finite is not None and sync.active:
            # every rank skips when any rank's batch was bad: the flag rides in the same packed
            # all-reduce as the statistics (same dtype, one collective)
            bad = (~finite).to(counts.dtype).reshape(1)
            sync.all_reduce_sum_(*stats, bad)
            finite = bad[0] == 0
        else:
            sync.all_reduce_sum_(*stats)  # the statistics (usage) of all ranks' rows, packed
        if weight is not None:
            counts, sums = self._weighted(counts, sums, weight)
        if finite is not None:
            self.nonfinite_batches.add_((~finite).to(torch.int64))
        if self.learning != "ema":
            usage = self.cluster_size.mul(self.decay).add_(counts.view(self.cluster_size.shape), alpha=1.0 - self.decay)
            self.cluster_size.copy_(usage if finite is None else torch.where(finite, usage, self.cluster_size))
            return finite
        counts, sums = counts.view(self.cluster_size.shape), sums.view(self.embed.shape)
        backend = _dispatch.requested_backend(self.backend)
        if finite is None and self.decay != 0.0 and not torch.compiler.is_compiling():
            # the ungated eager step: in place, no copies
            ema_update_(self.cluster_size, self.embed_avg, self.embed, counts, sums, self.decay, self.eps, backend)
            if self.metric == "cosine":
                self.embed.copy_(normalized(self.embed, self.metric))
            return finite
        # Otherwise the op writes into scratch tensors, and the buffers take them by copy_:
        # * a gated step keeps the old values where finite is False (no host sync);
        # * under torch.compile, Inductor (torch 2.13) may compute this step's output (the gather
        #   of the codes, fused into a later kernel) AFTER an op that overwrites the codebook
        #   buffer in place, and return the next step's codes; a plain copy_ (a buffer mutation
        #   inductor orders after every read) is safe;
        # * decay 0 keeps only this batch's statistics: a codebook without kept rows has every
        #   size 0 and its smoothed codes 0/0, so it keeps its old codes.
        size, avg = self.cluster_size.clone(), self.embed_avg.clone()
        codes = self.embed.new_empty(self.embed.shape)
        ema_update_(size, avg, codes, counts, sums, self.decay, self.eps, backend)
        if self.decay == 0.0:
            codes = torch.where(size.sum(-1, keepdim=True).unsqueeze(-1) > 0, codes, self.embed)
        if self.metric == "cosine":
            codes = normalized(codes, self.metric)
        if finite is not None and not torch.compiler.is_compiling():
            # eager: where(out=buffer) writes each buffer in one pass, with no temporary
            for new, buffer in ((size, self.cluster_size), (avg, self.embed_avg), (codes, self.embed)):
                torch.where(finite, new, buffer, out=buffer)
            return finite
        if finite is not None:
            size = torch.where(finite, size, self.cluster_size)
            avg = torch.where(finite, avg, self.embed_avg)
            codes = torch.where(finite, codes, self.embed)
        self.cluster_size.copy_(size)
        self.embed_avg.copy_(avg)
        self.embed.copy_(codes)
        return finite

    def _weighted(self, counts, sums, weight):
        """Statistics that give the weighted EMA step through the plain one:
        ``old + (1 - decay) * (old + w * (new - old) - old) = old + (1 - decay) * w * (new - old)``."""
        C, K = self.num_codebooks, self.codebook_size
        if callable(weight):
            weight = weight(sums, counts)
        weight = torch.as_tensor(weight, dtype=counts.dtype, device=counts.device)
        if weight.shape not in ((), (K,), (C, K)):
            raise ValueError(f"ema_update_weight has shape {tuple(weight.shape)}; expected a scalar, [K={K}] or [C={C}, K={K}]")
        weight = weight.expand(C, K)
        size = self._c(self.cluster_size)
        counts = size + weight * (counts - size)
        if sums is not None:
            avg = self._c(self.embed_avg)
            sums = avg + weight.unsqueeze(-1) * (sums - avg)
        return counts, sums

    @torch.no_grad()
    def restart_dead_codes_(
        self, z: torch.Tensor, keep: Optional[torch.Tensor], sync: _dist.LocalSync, *, finite: Optional[torch.Tensor] = None
    ) -> None:
        """Re-seed the codes whose EMA size is below the threshold from distinct random kept
        rows (of ``z [C, N, D]``; all ranks' with a group hook) and reset their statistics.

        The r-th dead code of a codebook takes the r-th row of one random order of the kept
        rows; with more dead codes than rows, the first ones (by index) are re-seeded now and
        the rest at later steps, so no two share a row. Locally all on device with
        ``torch.where``: no host sync, whether or not anything is dead. ``finite`` False (a 0-dim
        device flag, see :meth:`update_`): nothing is re-seeded."""
        dead = self._c(self.cluster_size) < self.dead_code_threshold  # [C, K]
        want = torch.where(dead, dead.to(torch.int64).cumsum(-1) - 1, torch.full_like(dead, -1, dtype=torch.int64))
        sample, found = sync.random_rows(z, keep, want)
        sample = normalized(sample.to(self.embed.dtype), self.metric)
        replace = found.view(self.cluster_size.shape)
        if finite is not None:
            replace = replace & finite
        sample = sample.view(self.embed.shape)
        self.embed.data.copy_(torch.where(replace.unsqueeze(-1), sample, self.embed.data))
        reset = torch.full_like(self.cluster_size, self.reset_cluster_size)
        self.cluster_size.copy_(torch.where(replace, reset, self.cluster_size))
        if self.learning == "ema":
            self.embed_avg.copy_(torch.where(replace.unsqueeze(-1), sample * self.reset_cluster_size, self.embed_avg))

    @staticmethod
    def batch_is_finite(indices: torch.Tensor, keep: Optional[torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
        """``finite`` for :meth:`update_`, on the device (no host sync): False when a kept row has
        no code (``indices [..., N]``: assign read each row once and gave the non-finite ones -1)
        or one of ``codes`` is non-finite (one sum over them: cheaper than isfinite)."""
        ok = indices >= 0 if keep is None else (indices >= 0) | ~keep
        code_sum = codes.detach().sum(dtype=torch.float64 if codes.dtype == torch.float64 else torch.float32)
        return ok.all() & torch.isfinite(code_sum)

    # ------------------------------------------------------------------ Deferred Quantization
    def gate_observation_(self, finite_rows: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        """The continuous phase's non-finite policy without a host sync: the ``keep [N]`` to
        observe with, given which rows are finite (``finite_rows [N]``). A batch with a
        non-finite kept row adds no row to the reservoir and is counted in ``nonfinite_batches``."""
        finite = (finite_rows if keep is None else finite_rows | ~keep).all()
        self.nonfinite_batches.add_((~finite).to(torch.int64))
        return finite.expand(finite_rows.shape[-1]) if keep is None else keep & finite

    @torch.no_grad()
    def observe_(self, z: torch.Tensor, keep: Optional[torch.Tensor]) -> None:
        """A training call of the continuous phase: ``z [C, N, D]`` into the reservoir."""
        self._reservoir_add(z, keep)
        self._deferred_calls += 1
        self.steps.add_(1)

    def _reservoir_add(self, rows: torch.Tensor, keep: Optional[torch.Tensor]) -> None:
        """Algorithm R over the stream of kept rows, vectorised and without host syncs.

        The kept row with stream position ``p`` goes to slot ``p`` while the reservoir is
        filling, else to a uniform slot ``j in [0, p]`` if ``j < R``. When several rows of one
        batch land in the same slot, the latest wins, exactly as the sequential algorithm.
        A row lands in the same slot for every codebook.
        """
        R, N = self.reservoir_size, rows.shape[1]
        if N == 0:
            return
        device = rows.device
        kept = torch.ones(N, dtype=torch.bool, device=device) if keep is None else keep
        position = self.reservoir_seen + kept.to(torch.int64).cumsum(0) - 1  # stream position of each kept row
        draw = (torch.rand(N, device=device, dtype=torch.float64) * (position + 1).to(torch.float64)).long()
        slot = torch.where(position < R, position, draw)
        slot = torch.where(kept & (slot < R), slot, torch.full_like(slot, R))  # R = "nowhere"
        winner = torch.full((R + 1,), -1, dtype=torch.int64, device=device)
        winner.scatter_reduce_(0, slot, torch.arange(N, device=device), reduce="amax")
        winner = winner[:R]
        taken = (winner >= 0).unsqueeze(-1)
        fresh = torch.where(taken, rows[:, winner.clamp_min(0)].to(self.reservoir.dtype), self._c(self.reservoir))
        self.reservoir.copy_(fresh.view(self.reservoir.shape))
        self.reservoir_seen.add_(kept.sum())

    @torch.no_grad()
    def start_quantization_(self, sync: _dist.LocalSync) -> None:
        """End the continuous phase: k-means-initialise every codebook from the reservoir
        (the union of all ranks' reservoirs with a group hook; every rank must call it)."""
        if self._quantizing:
            return
        if not self.deferred_steps:
            raise RuntimeError("start_quantization() needs deferred_steps > 0 (there is no reservoir)")
        K = self.codebook_size
        seen = int(self.reservoir_seen)
        rows = self._c(self.reservoir)[:, : min(seen, self.reservoir_size)]
        totals = torch.tensor([rows.shape[1], seen], dtype=torch.int64, device=rows.device)
        sync.all_reduce_sum_(totals)  # all ranks' reservoirs together: every rank raises alike
        n_rows, seen = (int(v) for v in totals.tolist())
        if n_rows < K:
            where = " (all ranks together)" if sync.active else ""
            raise RuntimeError(
                f"Deferred Quantization needs at least codebook_size={K} reservoir rows{where} to k-means-initialise "
                f"the codebook, but only {n_rows} rows were seen in {self._deferred_calls} training calls; "
                "train longer before switching (raise deferred_steps)"
            )
        # EMA statistics are per batch: scale the k-means counts to the mean batch size seen.
        self.kmeans_init_(rows, seen / max(1, self._deferred_calls), sync)
        self.quantizing.fill_(True)
        self._quantizing = True
        # The reservoir has done its job: release its memory (loading a checkpoint taken
        # before the switch resizes it back, see _load_from_state_dict).
        self.reservoir = self.reservoir.new_zeros(self.reservoir.shape[:-2] + (0, self.dim))

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "reservoir"
        if self.deferred_steps and key in state_dict and state_dict[key].shape != self.reservoir.shape:
            # the reservoir is released at the switch: take the checkpoint's size (full or empty)
            self.reservoir = self.reservoir.new_zeros(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._initted = bool(self.initted)
        self._quantizing = bool(self.quantizing)
        self._deferred_calls = int(self.steps) if not self._quantizing else self.deferred_steps

    def extra_repr(self) -> str:
        return f"num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, dim={self.dim}"


__all__ = ["Codebook", "LEARNING", "INITS"]
