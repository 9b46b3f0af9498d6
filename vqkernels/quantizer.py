"""``Quantizer``: a vector-quantization layer built on vqkernels' ops.

A drop-in for ``vector_quantize_pytorch.VectorQuantize`` in the common single-codebook
case. Everything that touches the codebook goes through the ops: nearest codes through
:func:`vqkernels.assign`, per-code statistics through :func:`vqkernels.cluster_stats`,
the EMA update through :func:`vqkernels.ema_update_`, initialisation through
:func:`vqkernels.kmeans`, usage counts through :func:`vqkernels.histogram`. The module
itself only reshapes, gathers the chosen codes and combines the losses, so a training
step costs about one assignment: no ``N x K`` distance matrix, no one-hot.

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
collectives live in :mod:`vqkernels.distributed`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoints as _checkpoints
from . import distributed as _dist
from .ops import _dispatch, assign, cluster_stats, ema_update_, histogram, kmeans
from .ops._validation import (
    check_codebook_size,
    check_finite,
    check_indices_in_range,
    check_metric,
    check_same_device,
    check_tensor,
)

METRICS = ("l2", "cosine")
LEARNING = ("ema", "gradient")
GRADIENTS = ("ste", "rotation")
INITS = ("kmeans", "random", "uniform")


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


def rotation_backward(z: torch.Tensor, q: torch.Tensor, grad_q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Gradient w.r.t. ``z`` of the rotation trick (Fifty et al., 2024), rows ``[N, D]``.

    The forward output is ``q = lambda * R z`` with ``lambda = |q| / |z|`` and ``R`` the
    rotation taking ``z/|z|`` to ``q/|q|`` (``R = I - 2 r r^T + 2 q^ z^T``, ``r`` the unit
    bisector), both held constant, so ``dL/dz = lambda * R^T dL/dq``.
    """
    zn = z.norm(dim=-1, keepdim=True)
    qn = q.norm(dim=-1, keepdim=True)
    z_hat = z / zn.clamp_min(eps)
    q_hat = q / qn.clamp_min(eps)
    r = z_hat + q_hat
    r = r / r.norm(dim=-1, keepdim=True).clamp_min(eps)
    g = grad_q
    rotated = g - 2 * r * (r * g).sum(-1, keepdim=True) + 2 * z_hat * (q_hat * g).sum(-1, keepdim=True)
    return rotated * (qn / zn.clamp_min(eps))


class _QuantizeFunction(torch.autograd.Function):
    """Nearest code for every row (the ``assign`` op) with a chosen gradient estimator.

    Rows whose index is -1 (masked, or non-finite input) pass through unchanged. No
    gradient flows to the codebook through this function (as in VectorQuantize): a
    gradient-learned codebook learns from the codebook loss instead.
    """

    @staticmethod
    def forward(ctx, z, codebook, keep, metric, estimator, backend, check_codebook):
        indices, _ = assign(z, codebook, metric, backend=backend, check_codebook=check_codebook)
        if keep is not None:
            indices = indices.masked_fill(~keep, -1)
        valid = (indices >= 0).unsqueeze(-1)
        q = torch.where(valid, F.embedding(indices.clamp_min(0), codebook), z)
        ctx.mark_non_differentiable(indices)
        ctx.estimator = estimator
        if estimator == "rotation":
            ctx.save_for_backward(z, q)
        return q, indices

    @staticmethod
    def backward(ctx, grad_q, _grad_indices):
        if ctx.estimator == "rotation":
            z, q = ctx.saved_tensors
            grad_z = rotation_backward(z, q, grad_q)
        else:
            grad_z = grad_q  # straight-through: dL/dz = dL/dq
        return grad_z, None, None, None, None, None, None


@torch.library.custom_op("vqkernels::quantizer_checked_keep", mutates_args=())
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
    """``F.mse_loss(a, b)`` over the kept rows only (no boolean indexing, so no host sync)."""
    if a.shape[0] == 0:  # an empty batch has no error (F.mse_loss would give NaN)
        return a.new_zeros(())
    if keep is None:
        return F.mse_loss(a, b)
    # where, not a multiplication: a masked row may hold NaN, and NaN * 0 is NaN
    diff = torch.where(keep.unsqueeze(-1), a - b, torch.zeros((), dtype=a.dtype, device=a.device))
    err = diff.pow(2).sum(-1)
    return err.sum() / (keep.sum().clamp_min(1) * a.shape[-1]).to(a.dtype)


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
        check_finite: in training, raise a ``ValueError`` naming the rows when an unmasked input
            row holds NaN/Inf, before any buffer is touched, so one bad batch never poisons the
            EMA statistics (costs one host sync per training call; eval never checks). Under
            ``torch.compile`` the check runs inside an op, so it causes no graph break.
        sync_codebook: ``None`` (default) or ``True``: when ``torch.distributed`` is initialised
            with world size > 1, keep one codebook across ranks (one all-reduce of the packed
            counts and sums per training step; initialisation, dead-code restarts and the
            deferred switch decided on rank 0 from all ranks' rows and broadcast; the first
            training call broadcasts rank 0's codebook). Every rank must make the same number
            of training calls; a rank may see fewer rows, or none after masking. ``False``:
            each rank keeps its own statistics. A no-op in a single process.
        backend: force an ops backend (see :func:`vqkernels.assign`).

    Returns (forward):
        ``QuantizerOutput(quantized, indices, loss)``; with ``return_loss_breakdown=True`` a
        fourth field ``breakdown = LossBreakdown(commitment, codebook)``.

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
    ):
        super().__init__()
        check_codebook_size("dim", dim)
        check_codebook_size("codebook_size", codebook_size)
        codebook_dim = dim if codebook_dim is None else codebook_dim
        check_codebook_size("codebook_dim", codebook_dim)
        check_metric(metric, METRICS)
        for name, value, allowed in (("learning", learning, LEARNING), ("gradient", gradient, GRADIENTS), ("init", init, INITS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name, value in (("decay", decay), ("eps", eps), ("commitment_weight", commitment_weight),
                            ("codebook_weight", codebook_weight), ("dead_code_threshold", dead_code_threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (Laplace smoothing), got {eps!r}")
        if commitment_weight < 0 or codebook_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got commitment_weight={commitment_weight}, codebook_weight={codebook_weight}")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold!r}")
        if isinstance(deferred_steps, bool) or not isinstance(deferred_steps, int) or deferred_steps < 0:
            raise ValueError(f"deferred_steps must be an int >= 0, got {deferred_steps!r}")
        if isinstance(kmeans_iters, bool) or not isinstance(kmeans_iters, int) or kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be an int >= 0, got {kmeans_iters!r}")
        K = codebook_size
        reservoir_size = 4 * K if reservoir_size is None else reservoir_size
        if deferred_steps and (not isinstance(reservoir_size, int) or reservoir_size < K):
            raise ValueError(f"reservoir_size must be an int >= codebook_size={K} (k-means needs K rows), got {reservoir_size!r}")

        self.dim, self.codebook_size, self.codebook_dim = dim, K, codebook_dim
        self.metric, self.learning, self.gradient, self.init = metric, learning, gradient, init
        self.decay, self.eps = float(decay), float(eps)
        self.commitment_weight, self.codebook_weight = float(commitment_weight), float(codebook_weight)
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = float(dead_code_threshold)
        self.reset_cluster_size = float(dead_code_threshold if reset_cluster_size is None else reset_cluster_size)
        self.channel_last = channel_last
        self.deferred_steps = deferred_steps
        self.reservoir_size = reservoir_size
        self.deterministic = deterministic
        self.check_finite = check_finite
        if sync_codebook not in (None, True, False):
            raise ValueError(f"sync_codebook must be None, True or False, got {sync_codebook!r}")
        self.sync_codebook = sync_codebook
        _dispatch.requested_backend(backend)  # an unknown name fails here, not at the first forward
        self.backend = backend

        needs_projection = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if needs_projection else nn.Identity()

        # Every buffer exists from construction on, so strict state_dict loading always works.
        if init == "uniform" and not deferred_steps:
            embed = torch.empty(K, codebook_dim)
            nn.init.kaiming_uniform_(embed)
            if metric == "cosine":
                embed = F.normalize(embed, dim=-1)
            initted = True
        else:
            embed = torch.zeros(K, codebook_dim)
            initted = False
        if learning == "gradient":
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
            self.register_buffer("embed_avg", embed.clone())  # cluster_size is 1, so embed_avg = embed
        self.register_buffer("cluster_size", torch.ones(K))
        self.register_buffer("initted", torch.tensor(initted))
        self.register_buffer("quantizing", torch.tensor(deferred_steps == 0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # training forward calls
        if deferred_steps:
            self.register_buffer("reservoir", torch.zeros(reservoir_size, codebook_dim))
            self.register_buffer("reservoir_seen", torch.zeros((), dtype=torch.int64))
        # Python mirrors of the flags, so the forward branches on Python values (no host sync,
        # no graph break under torch.compile); refreshed whenever a state_dict is loaded.
        self._initted = initted
        self._quantizing = deferred_steps == 0
        self._deferred_calls = 0
        self._state_broadcast = False  # rank 0's codebook sent to the other ranks (first synced call)

    # ------------------------------------------------------------------ public helpers
    @property
    def codebook(self) -> torch.Tensor:
        """The codes ``[K, codebook_dim]`` (unit rows with ``metric="cosine"``)."""
        return self._effective_codebook()

    @codebook.setter
    def codebook(self, codes: torch.Tensor) -> None:
        check_tensor("codes", codes, floating=True, dims=(2,))
        if tuple(codes.shape) != tuple(self.embed.shape):
            raise ValueError(f"codes has shape {tuple(codes.shape)}; expected {tuple(self.embed.shape)}")
        check_finite("codes", codes.detach())
        with torch.no_grad():
            self._load_codes(codes.to(self.embed), self.cluster_size.clone())

    @property
    def is_quantizing(self) -> bool:
        """False while Deferred Quantization is still in its continuous (identity) phase."""
        return self._quantizing

    def to_codebook_space(self, x: torch.Tensor) -> torch.Tensor:
        """Map inputs ``[..., dim]`` (channel-last) to the space the codes live in ``[..., codebook_dim]``."""
        z = self.project_in(x).to(self.embed.dtype)
        return F.normalize(z, dim=-1) if self.metric == "cosine" else z

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., codebook_dim]`` (channel-last, codebook space) for ``indices [...]``; -1 gives zeros."""
        check_tensor("indices", indices, integer=True)
        check_same_device(indices=indices, codebook=self.embed)
        check_indices_in_range("indices", indices, self.codebook_size)
        codebook = self._effective_codebook()
        codes = F.embedding(indices.clamp_min(0).long(), codebook)
        return codes * (indices >= 0).unsqueeze(-1).to(codes.dtype)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """The layer's output for ``indices``: projected out, in the input layout (``[B, dim, ...]``
        when ``channel_last=False``); -1 (masked) gives zeros."""
        out = self.project_out(self.get_codes_from_indices(indices))
        out = out * (indices >= 0).unsqueeze(-1).to(out.dtype)
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
        rows = self.to_codebook_space(x.detach().reshape(-1, self.dim))
        n = self._total_rows(rows.shape[0], rows.device)
        if n < self.codebook_size:
            where = " across all ranks" if self._sync_active() else ""
            raise ValueError(f"init_codebook needs at least codebook_size={self.codebook_size} rows{where}, got {n}")
        self._kmeans_init(rows, None if batch_rows is None else float(batch_rows))

    @torch.no_grad()
    def start_quantization(self) -> None:
        """End the continuous phase now: k-means-initialise the codebook from the reservoir.

        With ``sync_codebook`` under ``torch.distributed``, every rank must call it (the
        automatic switch at call ``deferred_steps + 1`` does): k-means runs over the union of
        all ranks' reservoirs, statistics all-reduced, and every rank gets the same codebook.
        """
        if self._quantizing:
            return
        if not self.deferred_steps:
            raise RuntimeError("start_quantization() needs deferred_steps > 0 (there is no reservoir)")
        seen = int(self.reservoir_seen)
        rows = self.reservoir[: min(seen, self.reservoir_size)]
        K = self.codebook_size
        n_rows = rows.shape[0]
        sync = self._sync_active()
        if sync:  # all ranks' reservoirs together (one collective; every rank raises alike)
            totals = torch.tensor([n_rows, seen], dtype=torch.int64, device=rows.device)
            _dist.all_reduce_sum_(totals)
            n_rows, seen = (int(v) for v in totals.tolist())
        if n_rows < K:
            where = " (all ranks together)" if sync else ""
            raise RuntimeError(
                f"Deferred Quantization needs at least codebook_size={K} reservoir rows{where} to k-means-initialise "
                f"the codebook, but only {n_rows} rows were seen in {self._deferred_calls} training calls; "
                "train longer before switching (raise deferred_steps)"
            )
        # EMA statistics are per batch: scale the k-means counts to the mean batch size seen.
        batch_rows = seen / max(1, self._deferred_calls)
        self._kmeans_init(rows, batch_rows)
        self.quantizing.fill_(True)
        self._quantizing = True
        # The reservoir has done its job: release its memory (loading a checkpoint taken
        # before the switch resizes it back, see _load_from_state_dict).
        self.reservoir = self.reservoir.new_zeros(0, self.codebook_dim)

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, *, return_loss_breakdown: bool = False
    ):
        """Quantize ``x``.

        Args:
            x: ``[..., dim]`` (``[B, dim, ...]`` with ``channel_last=False``), any float dtype.
            mask: optional bool, the leading shape (``[B, ...]`` without ``dim``), True = keep.
                Masked rows get index -1, stay out of the statistics and the loss, and come
                out unchanged.
            return_loss_breakdown: add ``breakdown = LossBreakdown(commitment, codebook)``.

        Returns:
            ``QuantizerOutput(quantized, indices, loss)``: ``quantized`` like ``x``, ``indices``
            int64 of the leading shape, ``loss`` a scalar (zero in eval).
        """
        check_tensor("x", x, floating=True, min_dim=1 if self.channel_last else 2)
        xl = x if self.channel_last else x.movedim(1, -1)
        if xl.shape[-1] != self.dim:
            where = "last" if self.channel_last else "second (channel_last=False)"
            raise ValueError(f"x has {xl.shape[-1]} features in its {where} dimension (shape {tuple(x.shape)}); expected dim={self.dim}")
        lead = xl.shape[:-1]
        check_same_device(x=x, codebook=self.embed)
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
        if self.training and self.check_finite:
            if torch.compiler.is_compiling():
                keep = _checked_keep(flat.detach(), keep)
            else:
                check_finite("x", flat.detach(), ignore_rows=None if keep is None else ~keep)
        sync = self.training and self._sync_active()
        if sync and not self._state_broadcast:
            self._broadcast_state()

        if not self._quantizing:
            if self.training and self._deferred_calls >= self.deferred_steps:
                self.start_quantization()  # call T + 1 of Deferred Quantization
            else:
                return self._continuous_forward(x, flat, keep, lead, return_loss_breakdown)

        z = self.to_codebook_space(flat)
        if self.training and not self._initted:
            self._initialise(z.detach(), keep)
        codebook = self._effective_codebook()
        q, indices = _QuantizeFunction.apply(
            z, codebook.detach(), keep, self.metric, self.gradient, self.backend, self.training
        )

        zero = z.new_zeros(())
        commitment = codebook_loss = zero
        loss = zero
        if self.training:
            commitment = _masked_mse(z, q.detach(), keep)
            loss = commitment * self.commitment_weight
            if self.learning == "gradient":
                q_codebook = F.embedding(indices.clamp_min(0), codebook)
                codebook_loss = _masked_mse(q_codebook, z.detach(), keep)
                loss = loss + codebook_loss * self.codebook_weight
            self._update_codebook(z.detach(), indices, keep, sync)

        out = self.project_out(q).to(x.dtype)
        if keep is not None:
            out = torch.where(keep.unsqueeze(-1), out, flat)
        quantized = out.reshape(*lead, self.dim)
        if not self.channel_last:
            quantized = quantized.movedim(-1, 1)
        indices = indices.reshape(lead)
        if return_loss_breakdown:
            return QuantizerOutputWithBreakdown(quantized, indices, loss, LossBreakdown(commitment, codebook_loss))
        return QuantizerOutput(quantized, indices, loss)

    # ------------------------------------------------------------------ internals
    def _sync_active(self) -> bool:
        """Codebook sync is on: not switched off, and a process group of world size > 1 exists.
        (``torch.compile`` folds this to a constant: no graph break.)"""
        return self.sync_codebook is not False and _dist.is_distributed()

    def _total_rows(self, n: int, device) -> int:
        """``n`` summed over the ranks when synced (one collective), else ``n``."""
        if not self._sync_active():
            return n
        total = torch.tensor([n], dtype=torch.int64, device=device)
        _dist.all_reduce_sum_(total)
        return int(total)

    @torch.no_grad()
    def _broadcast_state(self) -> None:
        """Every rank starts from rank 0's codebook and statistics (one packed broadcast), so
        ranks that built the module with different random codes still agree."""
        tensors = [self.embed.data, self.cluster_size] + ([self.embed_avg] if self.learning == "ema" else [])
        _dist.broadcast_(*tensors)
        self._state_broadcast = True

    def _effective_codebook(self) -> torch.Tensor:
        if self.metric == "cosine" and self.learning == "gradient":
            return F.normalize(self.embed, dim=-1)
        return self.embed  # EMA + cosine keeps the stored codes normalised

    def _continuous_forward(self, x, flat, keep, lead, return_loss_breakdown):
        """Deferred Quantization's continuous phase: identity, plus a reservoir sample in training."""
        if self.training:
            with torch.no_grad():
                self._reservoir_add(self.to_codebook_space(flat.detach()), keep)
            self._deferred_calls += 1
            self.steps.add_(1)
        zero = flat.new_zeros((), dtype=torch.float32)
        indices = torch.full(tuple(lead), -1, dtype=torch.int64, device=x.device)
        if return_loss_breakdown:
            return QuantizerOutputWithBreakdown(x, indices, zero, LossBreakdown(zero, zero))
        return QuantizerOutput(x, indices, zero)

    def _reservoir_add(self, rows: torch.Tensor, keep: Optional[torch.Tensor]) -> None:
        """Algorithm R over the stream of kept rows, vectorised and without host syncs.

        The kept row with stream position ``p`` goes to slot ``p`` while the reservoir is
        filling, else to a uniform slot ``j in [0, p]`` if ``j < R``. When several rows of one
        batch land in the same slot, the latest wins, exactly as the sequential algorithm.
        """
        R, N = self.reservoir_size, rows.shape[0]
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
        self.reservoir.copy_(torch.where(taken, rows[winner.clamp_min(0)].to(self.reservoir.dtype), self.reservoir))
        self.reservoir_seen.add_(kept.sum())

    @torch.no_grad()
    def _initialise(self, z: torch.Tensor, keep: Optional[torch.Tensor]) -> None:
        """First training batch: k-means or random rows (a one-off host sync is fine here).

        Synced: k-means over all ranks' rows, or K random rows of all ranks chosen on rank 0;
        every rank raises alike when all ranks together hold too few rows."""
        rows = z if keep is None else z[keep]
        K = self.codebook_size
        sync = self._sync_active()
        where = " (all ranks together)" if sync else ""
        if self.init == "kmeans":
            n = self._total_rows(rows.shape[0], rows.device)
            if n < K:
                raise ValueError(
                    f"init='kmeans' needs at least codebook_size={K} rows in the first training batch{where}, got "
                    f"{n}; use a bigger first batch, init='random', or deferred_steps (k-means on a "
                    "reservoir of reservoir_size rows)"
                )
            self._kmeans_init(rows, None)
        elif sync:  # "random", chosen on rank 0 among all ranks' rows
            codes = _dist.sample_rows(rows, K, replacement=True)
            if codes.shape[0] == 0:
                raise ValueError(f"init='random' needs at least one unmasked row in the first training batch{where}")
            self._load_codes(codes, torch.ones(K, device=z.device))
        else:  # "random"
            if rows.shape[0] == 0:
                raise ValueError("init='random' needs at least one unmasked row in the first training batch")
            n = rows.shape[0]
            pick = torch.randperm(n, device=z.device)[:K] if n >= K else torch.randint(n, (K,), device=z.device)
            self._load_codes(rows[pick], torch.ones(K, device=z.device))

    def _kmeans_init(self, rows: torch.Tensor, batch_rows: Optional[float]) -> None:
        """k-means on ``rows`` (all ranks' when synced); cluster sizes scaled to ``batch_rows``
        rows per step (default: as many as k-means saw)."""
        sync = self._sync_active()
        result = kmeans(rows, self.codebook_size, self.kmeans_iters, metric=self.metric, backend=self.backend, distributed=sync)
        counts = histogram(result.indices, self.codebook_size).to(self.cluster_size.dtype)
        n = rows.shape[0]
        if sync:  # global counts: every rank's rows under the shared centroids (one packed collective)
            total = torch.tensor([n], dtype=counts.dtype, device=counts.device)
            _dist.all_reduce_sum_(counts, total)
            n = float(total)
        scale = (n if batch_rows is None else batch_rows) / n
        self._load_codes(result.centroids.to(self.embed.dtype), counts * scale)

    def _load_codes(self, codes: torch.Tensor, cluster_size: torch.Tensor) -> None:
        """Set the codebook and EMA statistics consistently (embed_avg = codes * size)."""
        if self.metric == "cosine":
            codes = F.normalize(codes, dim=-1)
        self.embed.data.copy_(codes)
        self.cluster_size.copy_(cluster_size)
        if self.learning == "ema":
            self.embed_avg.copy_(codes * cluster_size.unsqueeze(-1))
        self.initted.fill_(True)
        self._initted = True

    @torch.no_grad()
    def _update_codebook(self, z: torch.Tensor, indices: torch.Tensor, keep: Optional[torch.Tensor], sync: bool = False) -> None:
        K = self.codebook_size
        if self.learning == "ema":
            counts, sums = cluster_stats(z, indices, K, deterministic=self.deterministic, backend=self.backend)
            if sync:  # the statistics of all ranks' rows: one all-reduce, counts and sums packed
                _dist.all_reduce_sum_(counts, sums)
            if torch.compiler.is_compiling():
                # Inductor (torch 2.13) may compute this step's output (the gather of the codes,
                # fused into a later kernel) AFTER an op that overwrites the codebook buffer in
                # place, and return the next step's codes. So the op writes fresh codes into a
                # scratch tensor, and a plain copy_ (a buffer mutation inductor orders after
                # every read) stores them.
                codes = self.embed.new_empty(self.embed.shape)
                ema_update_(self.cluster_size, self.embed_avg, codes, counts, sums, self.decay, self.eps, backend=self.backend)
                self.embed.copy_(codes)
            else:
                previous = self.embed.clone() if self.decay == 0.0 else None
                ema_update_(self.cluster_size, self.embed_avg, self.embed, counts, sums, self.decay, self.eps, backend=self.backend)
                if previous is not None:
                    # decay 0 keeps only this batch's statistics: a batch without kept rows
                    # leaves every size 0 and the smoothed codes 0/0, so keep the old codes
                    self.embed.copy_(torch.where(self.cluster_size.sum() > 0, self.embed, previous))
            if self.metric == "cosine":
                self.embed.copy_(F.normalize(self.embed, dim=-1))
        else:
            counts = histogram(indices, K, backend=self.backend).to(self.cluster_size.dtype)
            if sync:  # usage of all ranks, so every rank sees the same dead codes
                _dist.all_reduce_sum_(counts)
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        if self.dead_code_threshold > 0:
            if sync:
                self._restart_dead_codes_synced(z, keep)
            else:
                self._restart_dead_codes(z, keep)
        self.steps.add_(1)

    def _restart_dead_codes(self, z: torch.Tensor, keep: Optional[torch.Tensor]) -> None:
        """Re-seed codes whose EMA size is below the threshold from distinct random rows of the
        batch, and reset their statistics. All on device with ``torch.where``: no host sync,
        whether or not anything is dead. With more dead codes than rows, the first ones (by
        index) are re-seeded now and the rest at later steps, so no two share a row."""
        N = z.shape[0]
        if N == 0:
            return
        dead = self.cluster_size < self.dead_code_threshold
        keys = torch.rand(N, device=z.device)
        if keep is not None:
            keys = keys.masked_fill(~keep, 2.0)  # masked rows sort last
            n_rows = keep.sum()
        else:
            n_rows = torch.full((), N, device=z.device, dtype=torch.int64)
        order = keys.argsort()
        rank = dead.to(torch.int64).cumsum(0) - 1  # rank of each dead code among the dead
        replace = dead & (rank < n_rows)
        sample = z[order[rank.clamp(0, N - 1)]].to(self.embed.dtype)
        if self.metric == "cosine":
            sample = F.normalize(sample, dim=-1)
        self.embed.data.copy_(torch.where(replace.unsqueeze(-1), sample, self.embed.data))
        reset = torch.full_like(self.cluster_size, self.reset_cluster_size)
        self.cluster_size.copy_(torch.where(replace, reset, self.cluster_size))
        if self.learning == "ema":
            self.embed_avg.copy_(torch.where(replace.unsqueeze(-1), sample * self.reset_cluster_size, self.embed_avg))

    def _restart_dead_codes_synced(self, z: torch.Tensor, keep: Optional[torch.Tensor]) -> None:
        """:meth:`_restart_dead_codes` across ranks: the dead codes are the same on every rank
        (the sizes are all-reduced), so the ranks agree on whether and how many to re-seed
        (one host sync); rank 0 draws distinct rows among all ranks' kept rows and every rank
        receives them. A rank with no kept rows takes part and offers nothing."""
        dead = self.cluster_size < self.dead_code_threshold
        n_dead = int(dead.sum())  # identical on every rank
        if n_dead == 0:
            return
        rows = z if keep is None else z[keep]
        sample = _dist.sample_rows(rows, n_dead)  # min(n_dead, all kept rows), same on every rank
        m = sample.shape[0]
        if m == 0:
            return
        codes = dead.nonzero().flatten()[:m]  # the first dead codes now, the rest at later steps
        sample = sample.to(self.embed.dtype)
        if self.metric == "cosine":
            sample = F.normalize(sample, dim=-1)
        self.embed.data[codes] = sample
        self.cluster_size[codes] = self.reset_cluster_size
        if self.learning == "ema":
            self.embed_avg[codes] = sample * self.reset_cluster_size

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
        config = _checkpoints.infer_config(state, prefix)
        config.update(kwargs)
        module = cls(**config)
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(own, strict=strict)
        return module

    def _convert_foreign_state(self, state_dict, prefix, error_msgs) -> None:
        """Rewrite another library's quantizer state under ``prefix`` into ours, in place."""
        if prefix + "embed" in state_dict and prefix + "quantizing" in state_dict:
            return  # ours
        if _checkpoints.detect_layout(state_dict, prefix) in (None, _checkpoints.VQKERNELS):
            # (torch passes strict=True here whatever the caller asked, so judge by the keys:)
            # foreign keys and no codebook is a layout we do not know; no keys at all is
            # torch's "missing keys", which load_state_dict(strict=False) accepts.
            own = set(self._parameters) | set(self._buffers) | set(self._modules)
            foreign = [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :].split(".", 1)[0] not in own]
            if foreign and prefix + "embed" not in state_dict:
                error_msgs.append(str(_checkpoints.unknown_layout_error(state_dict, prefix, "No quantizer state in a known layout")))
            return
        try:
            converted = _checkpoints.convert_state_dict(
                state_dict, prefix, learning=self.learning, deferred=bool(self.deferred_steps)
            )
        except _checkpoints.UnknownLayoutError as e:
            error_msgs.append(str(e))
            return
        for key in converted.consumed:
            state_dict.pop(key)
        for key, value in converted.entries.items():
            state_dict[prefix + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self._convert_foreign_state(state_dict, prefix, error_msgs)
        key = prefix + "reservoir"
        if self.deferred_steps and key in state_dict and state_dict[key].shape != self.reservoir.shape:
            # the reservoir is released at the switch: take the checkpoint's size (full or empty)
            self.reservoir = self.reservoir.new_zeros(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._initted = bool(self.initted)
        self._quantizing = bool(self.quantizing)
        self._deferred_calls = int(self.steps) if not self._quantizing else self.deferred_steps

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
        if self.learning == "ema":
            parts.append(f"decay={self.decay}")
        if self.dead_code_threshold:
            parts.append(f"dead_code_threshold={self.dead_code_threshold}")
        if self.deferred_steps:
            parts.append(f"deferred_steps={self.deferred_steps}, reservoir_size={self.reservoir_size}")
        return ", ".join(parts)


__all__ = ["Quantizer", "QuantizerOutput", "QuantizerOutputWithBreakdown", "LossBreakdown", "rotation_backward"]
