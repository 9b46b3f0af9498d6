"""``Quantizer``: a vector-quantization layer built on vqkernels' ops.

A drop-in for ``vector_quantize_pytorch.VectorQuantize`` (one codebook, or ``heads`` with
shared or separate codebooks), made of three parts, each with one job:

* the projections in and out of codebook space (``project_in`` / ``project_out``);
* the codebook state, :class:`vqkernels.codebook.Codebook` (``C = 1``, or ``C = heads`` with
  separate codebooks per head; shared heads are rows of their own in ``C = 1``): codes, EMA
  statistics, k-means / random initialisation, dead-code restarts, Deferred Quantization's
  reservoir and switch;
* the gradient estimator, :mod:`vqkernels.estimators` (straight-through or rotation trick).

Everything that touches the codebook goes through the ops (``assign``, ``cluster_stats``,
``ema_update_``, ``kmeans``, ``histogram``), so a training step costs about one assignment:
no ``N x K`` distance matrix, no one-hot.

Deferred Quantization (Zhao et al., 2026, "Early Quantization Shrinks Codebook"): with
``deferred_steps=T`` the layer is the identity for its first ``T`` training calls while it
keeps a reservoir sample of its inputs; at call ``T + 1`` it k-means-initialises the
codebook from that sample (mature embeddings, not the untrained encoder's) and quantizes
from then on.

Under ``torch.distributed`` (``sync_codebook``, on by default when a process group of world
size > 1 is initialised) every rank holds the same codebook: each step's counts and sums
are all-reduced in one packed buffer before the EMA update, and every random choice
(random init, dead-code restart, k-means seeding, the deferred switch over all ranks'
reservoirs) is made once on rank 0 over candidates from all ranks and broadcast. The
codebook's algorithms are written once against a sync hook of :mod:`vqkernels.distributed`.

Checkpoints keep the flat layout of a single module (``embed``, ``cluster_size``, ...,
``project_in.*``), so state dicts saved before the split load unchanged; other libraries'
layouts are converted by :mod:`vqkernels.checkpoints`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoints as _checkpoints
from . import distributed as _dist
from .codebook import INITS, LEARNING, Codebook  # noqa: F401  (INITS, LEARNING: kept importable from here)
from .estimators import ESTIMATORS, commitment_loss, gather_codes, quantize, rotation_backward
from .ops import kmeans  # noqa: F401  (kept importable from here; the Codebook runs k-means)
from .ops._dispatch import register_op
from .ops._metrics import CENTROID_METRICS, normalized
from .ops._validation import (
    check_codebook_size,
    check_finite,
    check_indices_in_range,
    check_same_device,
    check_tensor,
)

METRICS = CENTROID_METRICS
GRADIENTS = tuple(ESTIMATORS)


class LossBreakdown(NamedTuple):
    commitment: torch.Tensor  #: ``mean ||z - sg[q]||^2`` (before the commitment weight)
    codebook: torch.Tensor  #: ``mean ||sg[z] - q||^2`` (gradient learning; zero with EMA)


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  #: the input's shape and dtype
    indices: torch.Tensor  #: int64, the input's leading shape; -1 for masked rows
    loss: torch.Tensor  #: scalar; zero in eval and in the continuous phase


class QuantizerOutputWithBreakdown(NamedTuple):
    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    breakdown: LossBreakdown


@register_op("vqkernels::quantizer_checked_keep", mutates_args=())
def _checked_keep(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """``check_finite`` of the kept rows as an op, for ``torch.compile``: the check reads the
    data (a host sync, a graph break in Python), but inside an op it is traced as a call.
    Returns the keep mask (all True for ``None``), so everything that touches a buffer
    depends on the check and runs after it."""
    check_finite("x", x, ignore_rows=None if keep is None else ~keep)
    if keep is None:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return keep.clone()


@_checked_keep.register_fake
def _(x, keep):
    return x.new_empty(x.shape[0], dtype=torch.bool)


def _masked_mse(a: torch.Tensor, b: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.mse_loss(a, b)`` of ``[C, N, D]`` rows over the kept rows ``keep [N]`` only (no
    boolean indexing, so no host sync)."""
    if a.shape[-2] == 0:  # an empty batch has no error (F.mse_loss would give NaN)
        return a.new_zeros(())
    if keep is None:
        return F.mse_loss(a, b)
    # where, not a multiplication: a masked row may hold NaN, and NaN * 0 is NaN
    diff = torch.where(keep.unsqueeze(-1), a - b, torch.zeros((), dtype=a.dtype, device=a.device))
    err = diff.pow(2).sum(-1)
    return err.sum() / (keep.sum().clamp_min(1) * (a.shape[0] * a.shape[-1])).to(a.dtype)


class Quantizer(nn.Module):
    """Vector-quantization layer: nearest code, commitment loss, EMA or gradient codebook.

    Args:
        dim: feature size of the input ``[..., dim]`` (``[B, dim, ...]`` with ``channel_last=False``).
        codebook_size: number of codes ``K``.
        codebook_dim: size of the codes; when it differs from ``dim``, linear projections map
            the input in and the codes out (as VectorQuantize's ``codebook_dim``).
        metric: ``"l2"`` or ``"cosine"`` (inputs and codes are L2-normalised).
        learning: ``"ema"`` (codebook = EMA of assigned inputs, Laplace-smoothed) or
            ``"gradient"`` (codebook is a Parameter trained by the codebook loss).
        decay, eps: EMA decay of the statistics and Laplace-smoothing constant.
        commitment_weight: beta of the commitment loss ``beta * ||z - sg[q]||^2``.
        codebook_weight: weight of the codebook loss ``||sg[z] - q||^2`` (gradient learning).
        gradient: ``"ste"`` (straight-through) or ``"rotation"`` (rotation trick).
        init: ``"uniform"`` (at construction), ``"random"`` (rows of the first training
            batch) or ``"kmeans"`` (k-means on the first training batch; needs >= K rows).
        kmeans_iters: Lloyd iterations of the k-means initialisation.
        dead_code_threshold: codes whose EMA cluster size falls below this are re-seeded from
            random rows of the current batch and their statistics reset (0 disables).
        reset_cluster_size: cluster size given to a re-seeded code (default: the threshold).
        channel_last: ``False`` for feature maps ``[B, dim, ...]``.
        deferred_steps: Deferred Quantization: identity for this many training calls, then
            k-means initialisation from a reservoir sample of the inputs (0 disables; pass a
            large number and call :meth:`start_quantization` to switch by hand). The switch
            always initialises by k-means (``init`` is not used). Before the switch the layer
            is the identity in eval too, with indices -1.
        reservoir_size: rows kept for the deferred initialisation (default ``4 * K``).
        deterministic: bitwise-reproducible statistics (see :func:`vqkernels.cluster_stats`).
        check_finite: the non-finite policy of training. ``True`` (default): a batch with a
            NaN/Inf unmasked row (or non-finite codes) is skipped, without a host sync: the
            codes, the EMA statistics and the dead codes stay exactly as they were (the update
            is gated on a device-side flag, as ``torch.amp.GradScaler`` skips steps) and the
            buffer ``nonfinite_batches`` counts it; such rows get index -1 and pass through,
            and the loss is non-finite. The first (initialising) batch is checked strictly.
            ``"strict"``: raise a ``ValueError`` naming the rows at once, before any buffer is
            touched (one host sync per training call; under ``torch.compile`` inside an op,
            so no graph break). ``False``: no policy (non-finite rows get -1 and stay out of
            the statistics). Eval never checks.
        sync_codebook: ``None`` (default) or ``True``: when ``torch.distributed`` is initialised
            with world size > 1, keep one codebook across ranks (one all-reduce of the packed
            counts and sums per training step; initialisation, dead-code restarts and the
            deferred switch decided on rank 0 from all ranks' rows and broadcast; the first
            training call broadcasts rank 0's codebook). Every rank must make the same number
            of training calls; a rank may see fewer rows, or none after masking. ``False``:
            each rank keeps its own statistics. A no-op in a single process.
        backend: force an ops backend (see :func:`vqkernels.assign`).
        heads: ``H`` heads (as VectorQuantize's): the input is projected to ``H * codebook_dim``
            (split without a projection when that equals ``dim``) and each head's slice is
            quantized; indices are ``[..., H]`` (no trailing axis for ``H = 1``). All heads
            are quantized in one assignment and updated in one statistics call.
        separate_codebook_per_head: each head has its own codebook (``codebook`` is
            ``[H, K, codebook_dim]``); ``False`` (default): the heads share one codebook, and
            every head's rows update it.
        freeze_codebook: default of ``forward``'s ``freeze_codebook`` (quantize without
            updating the codebook).
        return_zeros_for_masked_padding: masked rows come out as zeros (VectorQuantize's
            default) instead of unchanged (``False``, the default here).

    Returns (forward):
        ``QuantizerOutput(quantized, indices, loss)``; with ``return_loss_breakdown=True`` a
        fourth field ``breakdown = LossBreakdown(commitment, codebook)``.

    Parts: ``project_in`` / ``project_out``; ``codebook_state``, a
    :class:`~vqkernels.codebook.Codebook` with one codebook, or one per head (its tensors ``embed``,
    ``embed_avg``, ``cluster_size``, ``initted``, ``quantizing``, ``steps``, ``reservoir``,
    ``reservoir_seen`` and its settings read as the Quantizer's own attributes, and are saved
    under those flat names); the estimator of ``gradient`` (:mod:`vqkernels.estimators`).

    Example:
        >>> vq = Quantizer(dim=64, codebook_size=512, init="kmeans", dead_code_threshold=2)
        >>> x = torch.randn(8, 1024, 64)
        >>> quantized, indices, loss = vq(x)
        >>> quantized.shape, indices.shape, loss.shape
        (torch.Size([8, 1024, 64]), torch.Size([8, 1024]), torch.Size([]))
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: Optional[int] = None,
        metric: str = "l2",
        learning: str = "ema",
        decay: float = 0.8,
        eps: float = 1e-5,
        commitment_weight: float = 1.0,
        codebook_weight: float = 1.0,
        gradient: str = "ste",
        init: str = "uniform",
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
        reset_cluster_size: Optional[float] = None,
        channel_last: bool = True,
        deferred_steps: int = 0,
        reservoir_size: Optional[int] = None,
        deterministic: bool = False,
        check_finite: bool = True,
        sync_codebook: Optional[bool] = None,
        backend: Optional[str] = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        freeze_codebook: bool = False,
        return_zeros_for_masked_padding: bool = False,
    ):
        super().__init__()
        check_codebook_size("dim", dim)
        check_codebook_size("codebook_size", codebook_size)
        codebook_dim = dim if codebook_dim is None else codebook_dim
        check_codebook_size("codebook_dim", codebook_dim)
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
        for name, value in (("commitment_weight", commitment_weight), ("codebook_weight", codebook_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
        if commitment_weight < 0 or codebook_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got commitment_weight={commitment_weight}, codebook_weight={codebook_weight}")
        if check_finite not in (True, False, "strict"):
            raise ValueError(f"check_finite must be True, False or 'strict', got {check_finite!r}")
        if sync_codebook not in (None, True, False):
            raise ValueError(f"sync_codebook must be None, True or False, got {sync_codebook!r}")
        check_codebook_size("heads", heads)
        for name, value in (("separate_codebook_per_head", separate_codebook_per_head), ("freeze_codebook", freeze_codebook),
                            ("return_zeros_for_masked_padding", return_zeros_for_masked_padding)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")

        self.dim, self.codebook_dim = dim, codebook_dim
        self.gradient = gradient
        self.commitment_weight, self.codebook_weight = float(commitment_weight), float(codebook_weight)
        self.channel_last = channel_last
        self.check_finite = check_finite
        self.sync_codebook = sync_codebook
        self.heads, self.separate_codebook_per_head = heads, separate_codebook_per_head
        self.freeze_codebook = freeze_codebook
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        # separate codebooks: one per head on the codebook axis (C = H); shared: one codebook
        # (C = 1) and every head's rows quantized against it as rows of their own
        self._separate = separate_codebook_per_head and heads > 1

        # as VectorQuantize: the input is projected to heads * codebook_dim unless that is dim
        needs_projection = heads * codebook_dim != dim
        self.project_in = nn.Linear(dim, heads * codebook_dim) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(heads * codebook_dim, dim) if needs_projection else nn.Identity()
        # A single codebook is stored without the codebook axis: the checkpoint layout stays
        # embed [K, D], cluster_size [K] (and embed is the Parameter an optimizer sees).
        self.codebook_state = Codebook(
            codebook_size,
            codebook_dim,
            num_codebooks=heads if self._separate else 1,
            codebook_axis=self._separate,
            metric=metric,
            learning=learning,
            decay=decay,
            eps=eps,
            init=init,
            kmeans_iters=kmeans_iters,
            dead_code_threshold=dead_code_threshold,
            reset_cluster_size=reset_cluster_size,
            deferred_steps=deferred_steps,
            reservoir_size=reservoir_size,
            deterministic=deterministic,
            backend=backend,
        )
        # The state dict keeps the flat keys of the single module this used to be.
        # (torch < 2.5 has the same hook only under its private name)
        register = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        register(_flatten_codebook_keys)

    # ------------------------------------------------------------------ public helpers
    @property
    def codebook(self) -> torch.Tensor:
        """The codes ``[K, codebook_dim]`` (``[heads, K, codebook_dim]`` with
        ``separate_codebook_per_head``; unit rows with ``metric="cosine"``)."""
        return self.codebook_state.stored_codes()

    @codebook.setter
    def codebook(self, codes: torch.Tensor) -> None:
        check_tensor("codes", codes, floating=True)
        if tuple(codes.shape) != tuple(self.embed.shape):
            raise ValueError(f"codes has shape {tuple(codes.shape)}; expected {tuple(self.embed.shape)}")
        check_finite("codes", codes.detach())
        with torch.no_grad():
            self.codebook_state.load_codes_(codes.to(self.embed), self.cluster_size.clone())

    @property
    def is_quantizing(self) -> bool:
        """False while Deferred Quantization is still in its continuous (identity) phase."""
        return self.codebook_state.is_quantizing

    def to_codebook_space(self, x: torch.Tensor) -> torch.Tensor:
        """Map inputs ``[..., dim]`` (channel-last) to the space the codes live in
        ``[..., heads * codebook_dim]`` (the heads side by side, each normalised for cosine)."""
        z = self.project_in(x).to(self.embed.dtype)
        if self.heads == 1:
            return normalized(z, self.metric)
        return normalized(z.unflatten(-1, (self.heads, self.codebook_dim)), self.metric).flatten(-2)

    def _head_rows(self, z: torch.Tensor) -> torch.Tensor:
        """Rows ``[N, heads * codebook_dim]`` in codebook space -> the codebook axis ``[C, N', D]``:
        ``[heads, N, D]`` with separate codebooks, ``[1, N * heads, D]`` (row ``n * heads + h``)
        with a shared one."""
        if self.heads == 1:
            return z.unsqueeze(0)
        heads = z.unflatten(-1, (self.heads, self.codebook_dim))  # [N, H, D]
        if self._separate:
            return heads.transpose(0, 1).contiguous()
        return heads.reshape(1, -1, self.codebook_dim)

    def _head_keep(self, keep: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The row mask ``[N]`` for the rows of :meth:`_head_rows`."""
        if keep is None or self.heads == 1 or self._separate:
            return keep
        return keep.repeat_interleave(self.heads)

    def _from_head_rows(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """Inverse of :meth:`_head_rows` for ``[C, N', ...]``: ``[N, heads, ...]`` (``[N, ...]`` for one head)."""
        if self.heads == 1:
            return t.squeeze(0)  # a view both ways (t[0]'s backward zero-fills [1, N, D] and copies)
        if self._separate:
            return t.transpose(0, 1)
        return t[0].unflatten(0, (n, self.heads))

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., codebook_dim]`` (channel-last, codebook space) for ``indices [...]``;
        with ``heads > 1``, ``indices [..., heads]`` give ``[..., heads * codebook_dim]``. -1 gives zeros."""
        check_tensor("indices", indices, integer=True)
        check_same_device(indices=indices, codebook=self.embed)
        if self.heads > 1 and (indices.dim() == 0 or indices.shape[-1] != self.heads):
            raise ValueError(f"indices has shape {tuple(indices.shape)}; expected [..., heads={self.heads}]")
        check_indices_in_range("indices", indices, self.codebook_size)
        flat = indices.clamp_min(0).long()
        codebook = self.codebook
        if self._separate:  # head h's code k is row h * K + k of the stacked codebooks
            flat = flat + torch.arange(self.heads, device=flat.device) * self.codebook_size
            codebook = codebook.reshape(-1, self.codebook_dim)
        codes = F.embedding(flat, codebook)
        codes = codes * (indices >= 0).unsqueeze(-1).to(codes.dtype)
        return codes if self.heads == 1 else codes.flatten(-2)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """The layer's output for ``indices``: projected out, in the input layout (``[B, dim, ...]``
        when ``channel_last=False``); -1 (masked; in any head) gives zeros."""
        out = self.project_out(self.get_codes_from_indices(indices))
        valid = indices >= 0 if self.heads == 1 else (indices >= 0).all(-1)
        out = out * valid.unsqueeze(-1).to(out.dtype)
        return out if self.channel_last else out.movedim(-1, 1)

    get_output_from_indices = decode

    @torch.no_grad()
    def init_codebook(self, x: torch.Tensor, batch_rows: Optional[int] = None) -> None:
        """k-means-initialise the codebook from inputs ``x [..., dim]`` (channel-last) now.

        ``batch_rows``: rows per training batch, to put the EMA cluster sizes in per-batch
        units (default: the rows of ``x``). Does not end a deferred continuous phase.
        With ``sync_codebook`` under ``torch.distributed``, every rank calls it with its own
        ``x``: k-means runs over all ranks' rows (and ``batch_rows`` means all ranks' rows).
        """
        check_tensor("x", x, floating=True, min_dim=1)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}); expected [..., dim={self.dim}]")
        check_finite("x", x.detach().reshape(-1, self.dim))
        rows = self._head_rows(self.to_codebook_space(x.detach().reshape(-1, self.dim)))
        sync = self._sync()
        n = sync.total(rows.shape[1], rows.device)
        if n < self.codebook_size:
            where = " across all ranks" if sync.active else ""
            raise ValueError(f"init_codebook needs at least codebook_size={self.codebook_size} rows{where}, got {n}")
        # a shared codebook sees every head's rows: heads codebook rows per input row
        per_row = 1 if self._separate else self.heads
        self.codebook_state.kmeans_init_(rows, None if batch_rows is None else float(batch_rows) * per_row, sync)

    @torch.no_grad()
    def start_quantization(self) -> None:
        """End the continuous phase now: k-means-initialise the codebook from the reservoir.

        With ``sync_codebook`` under ``torch.distributed``, every rank must call it (the
        automatic switch at call ``deferred_steps + 1`` does): k-means runs over the union of
        all ranks' reservoirs, statistics all-reduced, and every rank gets the same codebook.
        """
        self.codebook_state.start_quantization_(self._sync())

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        *,
        return_loss_breakdown: bool = False,
        freeze_codebook: Optional[bool] = None,
        accum_ema_update: bool = False,
        ema_update_weight=None,
    ):
        """Quantize ``x``.

        Args:
            x: ``[..., dim]`` (``[B, dim, ...]`` with ``channel_last=False``), any float dtype.
            mask: optional bool, the leading shape (``[B, ...]`` without ``dim``), True = keep.
                Masked rows get index -1 and stay out of the statistics and the loss; they
                come out unchanged, or as zeros with ``return_zeros_for_masked_padding=True``.
            return_loss_breakdown: add ``breakdown = LossBreakdown(commitment, codebook)``.
            freeze_codebook: quantize (and return the commitment loss) without touching the
                codebook: no EMA or usage update, no dead-code restart, no codebook loss
                (default: the constructor's ``freeze_codebook``). A first-batch initialisation
                still runs, since there must be codes to quantize with.
            accum_ema_update: gradient accumulation: add this batch's statistics to a pending
                sum instead of updating the codebook; the next training call without it applies
                them together with its own as one EMA step (as VectorQuantize's
                ``accum_ema_update``), or :meth:`apply_ema_` applies them alone.
            ema_update_weight: VectorQuantize's per-code EMA weight: a float, ``[K]``,
                ``[heads, K]`` (separate codebooks) or a callable ``(sums, counts) -> weight``;
                each code's statistics move by ``(1 - decay) * weight`` of the way to this
                step's.

        Returns:
            ``QuantizerOutput(quantized, indices, loss)``: ``quantized`` like ``x``, ``indices``
            int64 of the leading shape (``[..., heads]`` with ``heads > 1``), ``loss`` a scalar
            (zero in eval).
        """
        check_tensor("x", x, floating=True, min_dim=1 if self.channel_last else 2)
        xl = x if self.channel_last else x.movedim(1, -1)
        if xl.shape[-1] != self.dim:
            where = "last" if self.channel_last else "second (channel_last=False)"
            raise ValueError(f"x has {xl.shape[-1]} features in its {where} dimension (shape {tuple(x.shape)}); expected dim={self.dim}")
        lead = xl.shape[:-1]
        check_same_device(x=x, codebook=self.embed)
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        if freeze and accum_ema_update:
            raise ValueError("freeze_codebook=True and accum_ema_update=True contradict: a frozen codebook accumulates nothing")
        keep = None
        if mask is not None:
            check_tensor("mask", mask)
            check_same_device(x=x, mask=mask)
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = keep), got dtype {mask.dtype}")
            if tuple(mask.shape) != tuple(lead):
                raise ValueError(f"mask has shape {tuple(mask.shape)}; expected the leading shape of x {tuple(lead)}")
            keep = mask.reshape(-1)
        flat = xl.reshape(-1, self.dim)
        strict = self.training and self.check_finite == "strict"
        book = self.codebook_state
        if self.training and self.check_finite and not book.is_initialised and book.is_quantizing:
            strict = True  # the initialising batch: a one-off host sync anyway
        if strict:
            if torch.compiler.is_compiling():
                keep = _checked_keep(flat.detach(), keep)
            else:
                check_finite("x", flat.detach(), ignore_rows=None if keep is None else ~keep)
        gated = self.training and bool(self.check_finite) and not strict  # skip, without a sync
        sync = self._sync() if self.training else _dist.LOCAL
        book.broadcast_(sync)  # once, on the first synced call

        if not book.is_quantizing:
            if self.training and book.switch_due:
                book.start_quantization_(sync)  # call T + 1 of Deferred Quantization
            else:
                return self._continuous_forward(x, flat, keep, lead, return_loss_breakdown, gated)

        n = flat.shape[0]
        z = self._head_rows(self.to_codebook_space(flat))  # [C, N', D]: C = heads (separate) or 1
        head_keep = self._head_keep(keep)
        if self.training and not book.is_initialised:
            book.initialise_(z.detach(), head_keep, sync)
        codes = book.codes()  # [C, K, D]
        q, indices, distances = quantize(
            z, codes.detach(), head_keep, gradient=self.gradient, metric=self.metric, backend=self.backend,
            check_codebook=strict, return_distances=True,
        )
        finite = None
        if gated:  # assign read x once and gave its non-finite kept rows -1: no second pass over x
            finite = book.batch_is_finite(indices, head_keep, codes)

        zero = z.new_zeros(())
        commitment = codebook_loss = zero
        loss = zero
        if self.training:
            if self.metric == "l2" and z.dtype in (torch.float32, torch.float64):
                # assign's exact distances are ||z - q||^2 already: no second pass over z and q
                commitment = commitment_loss(z, q, distances, head_keep)
            else:  # cosine distances are 1 - <z, q>, not the squared error (which they would round)
                commitment = _masked_mse(z, q.detach(), head_keep)
            loss = commitment * self.commitment_weight
            if self.learning == "gradient" and not freeze:
                codebook_loss = _masked_mse(gather_codes(codes, indices.clamp_min(0)), z.detach(), head_keep)
                loss = loss + codebook_loss * self.codebook_weight
            if not freeze:
                book.update_(z.detach(), indices, head_keep, sync, accumulate=accum_ema_update, weight=ema_update_weight, finite=finite)

        out = self.project_out(self._from_head_rows(q, n).reshape(n, self.heads * self.codebook_dim)).to(x.dtype)
        if keep is not None:
            fill = torch.zeros((), dtype=out.dtype, device=out.device) if self.return_zeros_for_masked_padding else flat
            out = torch.where(keep.unsqueeze(-1), out, fill)
        quantized = out.reshape(*lead, self.dim)
        if not self.channel_last:
            quantized = quantized.movedim(-1, 1)
        indices = self._from_head_rows(indices, n).reshape(self._index_shape(lead))
        if return_loss_breakdown:
            return QuantizerOutputWithBreakdown(quantized, indices, loss, LossBreakdown(commitment, codebook_loss))
        return QuantizerOutput(quantized, indices, loss)

    @torch.no_grad()
    def apply_ema_(self) -> bool:
        """Apply the statistics accumulated by ``forward(..., accum_ema_update=True)`` now, as one
        EMA step (no dead-code restart). Under ``torch.distributed`` with ``sync_codebook`` every
        rank must call it (one collective). Returns False when nothing was pending."""
        return self.codebook_state.apply_pending_(self._sync())

    # ------------------------------------------------------------------ internals
    def _sync(self) -> _dist.LocalSync:
        """The sync hook: the world group when ``sync_codebook`` is not off and a process group
        of world size > 1 exists, else the local one. (``torch.compile`` folds it: no graph break.)"""
        return _dist.sync_for(self.sync_codebook is not False)

    def _index_shape(self, lead) -> tuple:
        """Indices are ``[...]`` for one head, ``[..., heads]`` for several (as VectorQuantize's)."""
        return tuple(lead) + ((self.heads,) if self.heads > 1 else ())

    def _continuous_forward(self, x, flat, keep, lead, return_loss_breakdown, gated=False):
        """Deferred Quantization's continuous phase: identity, plus a reservoir sample in training
        (``gated``: a batch with a non-finite kept row adds no row, without a host sync)."""
        if self.training:
            with torch.no_grad():
                if gated:
                    keep = self.codebook_state.gate_observation_(torch.isfinite(flat.detach()).all(-1), keep)
                self.codebook_state.observe_(self._head_rows(self.to_codebook_space(flat.detach())), self._head_keep(keep))
        zero = flat.new_zeros((), dtype=torch.float32)
        indices = torch.full(self._index_shape(lead), -1, dtype=torch.int64, device=x.device)
        if keep is not None and self.return_zeros_for_masked_padding:
            out = torch.where(keep.unsqueeze(-1), flat, torch.zeros((), dtype=flat.dtype, device=flat.device)).reshape(*lead, self.dim)
            x = out if self.channel_last else out.movedim(-1, 1)
        if return_loss_breakdown:
            return QuantizerOutputWithBreakdown(x, indices, zero, LossBreakdown(zero, zero))
        return QuantizerOutput(x, indices, zero)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained_state(cls, state, prefix: str = "", *, strict: bool = True, **kwargs) -> "Quantizer":
        """A ``Quantizer`` built and loaded from a state dict in any layout of
        :data:`vqkernels.checkpoints.LAYOUTS` (vector-quantize-pytorch's ``VectorQuantize``,
        taming-transformers' ``VectorQuantizer2``, encodec/audiocraft's ``EuclideanCodebook``,
        or ours).

        ``dim``, ``codebook_size`` and ``codebook_dim`` come from the shapes; the source
        library's defaults that differ from ours are applied (taming: ``learning="gradient"``,
        ``commitment_weight=0.25``, ``channel_last=False``; encodec: ``decay=0.99``,
        ``dead_code_threshold=2``); ``kwargs`` override everything (e.g. ``metric="cosine"``
        for a cosine-similarity codebook, which the state cannot tell).

        Args:
            state: a state dict; a whole model's is fine with ``prefix``.
            prefix: where the quantizer sits in ``state`` (e.g. ``"quantize."``).

        Example:
            >>> theirs = VectorQuantize(dim=64, codebook_size=512)  # vector_quantize_pytorch
            >>> ours = Quantizer.from_pretrained_state(theirs.state_dict())
        """
        return _checkpoints.build_from_state(cls, state, prefix, strict=strict, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        book = self.codebook_state
        own = set(book._parameters) | set(book._buffers) | set(self._modules)
        _checkpoints.convert_foreign_state_(
            state_dict, prefix, own=own, learning=self.learning, deferred=bool(self.deferred_steps), error_msgs=error_msgs
        )
        theirs = state_dict.get(prefix + "embed")
        if isinstance(theirs, torch.Tensor) and theirs.dim() != self.embed.dim():
            held = lambda t: f"{t.shape[0]} separate codebooks {tuple(t.shape)}" if t.dim() == 3 else f"one codebook {tuple(t.shape)}"
            error_msgs.append(
                f"the state holds {held(theirs)}, this Quantizer {held(self.embed)}: build it with the state's heads and "
                "separate_codebook_per_head (Quantizer.from_pretrained_state reads them from the state)"
            )
        for key in Codebook.STATE_KEYS:  # flat keys -> the codebook state's, loaded by it next
            if prefix + key in state_dict:
                state_dict[prefix + "codebook_state." + key] = state_dict.pop(prefix + key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        parts = [
            f"dim={self.dim}",
            f"codebook_size={self.codebook_size}",
            f"codebook_dim={self.codebook_dim}",
            f"metric={self.metric!r}",
            f"learning={self.learning!r}",
            f"gradient={self.gradient!r}",
            f"init={self.init!r}",
        ]
        if self.heads > 1:
            parts.append(f"heads={self.heads}, separate_codebook_per_head={self.separate_codebook_per_head}")
        if self.learning == "ema":
            parts.append(f"decay={self.decay}")
        if self.dead_code_threshold:
            parts.append(f"dead_code_threshold={self.dead_code_threshold}")
        if self.deferred_steps:
            parts.append(f"deferred_steps={self.deferred_steps}, reservoir_size={self.reservoir_size}")
        return ", ".join(parts)


def _codebook_setting(name: str) -> property:
    """A Quantizer attribute that is the codebook state's setting (read and write)."""

    def get(self):
        return getattr(self.codebook_state, name)

    def set_(self, value):
        setattr(self.codebook_state, name, value)

    return property(get, set_, doc=f"The codebook state's ``{name}``.")


def _codebook_tensor(name: str) -> property:
    """A Quantizer attribute that is one of the codebook state's tensors (``embed``, ...)."""

    def get(self):
        return getattr(self.codebook_state, name)

    return property(get, doc=f"The codebook state's ``{name}`` (a view of the same storage; in the state dict as ``{name}``).")


for _name in ("codebook_size", "metric", "learning", "decay", "eps", "init", "kmeans_iters", "dead_code_threshold",
              "reset_cluster_size", "deferred_steps", "reservoir_size", "deterministic", "backend",
              # the Python mirrors of the state flags, as the single module had them
              "_initted", "_quantizing", "_deferred_calls", "_state_broadcast"):
    setattr(Quantizer, _name, _codebook_setting(_name))
for _name in Codebook.STATE_KEYS + ("nonfinite_batches",):
    setattr(Quantizer, _name, _codebook_tensor(_name))
del _name


def _flatten_codebook_keys(module: Quantizer, destination, prefix: str, local_metadata) -> None:
    """State-dict hook: ``codebook_state.embed`` -> ``embed`` (and so on), first among the
    Quantizer's keys, as the single module saved them. The module's keys are the last ones in
    ``destination`` when the hook runs, so re-inserting them reorders nothing else."""
    inner = prefix + "codebook_state."
    ours = [k for k in destination if k.startswith(prefix)]
    entries = [(k, destination.pop(k)) for k in ours]
    for key, value in entries:
        if key.startswith(inner):
            destination[prefix + key[len(inner) :]] = value
    for key, value in entries:
        if not key.startswith(inner):
            destination[key] = value


__all__ = [
    "Quantizer",
    "QuantizerOutput",
    "QuantizerOutputWithBreakdown",
    "LossBreakdown",
    "rotation_backward",
    "Codebook",
]
