"""Residual and grouped residual quantizers (ResidualVQ / GroupedResidualVQ semantics).

One :class:`~vqkernels.codebook.Codebook` holds every stage of every group on its codebook
axis (``C = G * Q``, codebook ``g * Q + q``; ``C = G`` with ``shared_codebook``). The stages
are assigned in sequence, each on the running residual (one assign call per stage for all
groups); the statistics and EMA update of all stages then run as ONE ``cluster_stats`` and
ONE ``ema_update_`` call (and, under DDP, one collective). Initialisation (``init="kmeans"``
or ``"random"``, and the switch of Deferred Quantization) is stage-wise: stage 1 on the
inputs, its quantization subtracted, stage 2 on those residuals, and so on.

Stages of different sizes (``codebook_size=(5, 128, 256)``) are stored ``max K`` wide with
zero padding that is never assigned (each stage assigns against its own codes). Also here:
the readers of ResidualVQ / GroupedResidualVQ / EnCodec checkpoints, and DAC's factorised
quantizer (:class:`FactorizedResidualQuantizer`, per-stage projections) with its reader.
"""
from __future__ import annotations

import functools
import importlib.util
import random
import sys
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from . import distributed as _dist
from .codebook import Codebook
from .estimators import ESTIMATORS, gather_codes, quantize
from .ops import _dispatch, assign, histogram, kmeans
from .ops.residual_assign import residual_assign
from .ops._metrics import normalized
from .ops._validation import check_codebook_size, check_finite, check_indices_in_range, check_same_device, check_tensor
from .quantizer import _checked_keep, _masked_mse

_CODEBOOK_KWARGS = (
    "metric", "learning", "decay", "eps", "kmeans_iters", "dead_code_threshold", "reset_cluster_size",
    "deterministic", "backend",
)


def _stage_sizes(codebook_size, num_quantizers: int) -> tuple:
    """``codebook_size`` (one int, or one per stage) -> a tuple of Q sizes."""
    if isinstance(codebook_size, (tuple, list)):
        sizes = tuple(codebook_size)
        if len(sizes) != num_quantizers:
            raise ValueError(f"codebook_size gives {len(sizes)} per-stage sizes {sizes!r}; expected num_quantizers={num_quantizers}")
    else:
        sizes = (codebook_size,) * num_quantizers
    for q, k in enumerate(sizes):
        check_codebook_size(f"codebook_size[{q}]" if isinstance(codebook_size, (tuple, list)) else "codebook_size", k)
    return sizes


class _PaddedCodebook(Codebook):
    """The codebook axis of stages with different sizes: every codebook is stored ``max K``
    wide and codebook ``c`` uses its first ``K_c`` codes. The padding is never assigned (the
    stacks assign against each stage's own slice), never re-seeded as dead, and kept at zero
    codes and zero statistics, so it never changes a result. (Laplace smoothing sees the
    stored width: ``eps * max K`` in the denominator instead of ``eps * K_c``.)"""

    def set_valid_(self, valid: torch.Tensor) -> None:
        self.register_buffer("valid", valid.reshape(self.cluster_size.shape), persistent=False)
        with torch.no_grad():
            self._zero_padding_()

    def _zero_padding_(self) -> None:
        v = self.valid
        self.embed.data.copy_(torch.where(v.unsqueeze(-1), self.embed.data, torch.zeros((), dtype=self.embed.dtype)))
        self.cluster_size.copy_(torch.where(v, self.cluster_size, torch.zeros((), dtype=self.cluster_size.dtype)))
        if self.learning == "ema":
            self.embed_avg.copy_(torch.where(v.unsqueeze(-1), self.embed_avg, torch.zeros((), dtype=self.embed_avg.dtype)))

    @torch.no_grad()
    def load_codes_(self, codes, cluster_size) -> None:
        super().load_codes_(codes, cluster_size)
        self._zero_padding_()

    @torch.no_grad()
    def apply_stats_(self, *args, **kwargs):
        finite = super().apply_stats_(*args, **kwargs)
        self._zero_padding_()
        return finite

    @torch.no_grad()
    def restart_dead_codes_(self, z, keep, sync, *, finite=None) -> None:
        # the padding (size 0) reads as dead, but it comes after every real code of its
        # codebook, so the real dead codes take the rows first; whatever it took is undone
        super().restart_dead_codes_(z, keep, sync, finite=finite)
        self._zero_padding_()


# From this codebook size on, k-means seeds with K random rows instead of k-means++ (K
# sequential passes over its sample) and the stage-wise initialisation reports progress.
_KMEANS_PLUS_PLUS_MAX_K = 8192
_PROGRESS_K = 65536


class _InitProgress:
    """Progress of the stage-wise initialisation: a tqdm bar over the G*Q k-means runs when tqdm
    is importable (and k-means' own bar over its iterations), else one stderr line per run."""

    def __init__(self, total: int, enabled: bool):
        self.bar, self.enabled, self.total, self.done = None, enabled, total, 0
        self.tqdm = False
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.tqdm = True
                self.bar = tqdm(total=total, desc="residual k-means init", unit="stage", file=sys.stderr)

    def step(self, what: str) -> None:
        if not self.enabled:
            return
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(1)
        else:
            print(f"vqkernels: residual k-means init {self.done}/{self.total} ({what})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@functools.lru_cache(maxsize=None)
def _has_backend(op: str, name: str) -> bool:
    return importlib.util.find_spec(f"vqkernels.ops.{op}.{name}") is not None


def _residual_assign_probe(device_type: str, dtype: torch.dtype, backend: Optional[str]) -> bool:
    """The backend selected for residual_assign on this device/dtype implements it."""
    return _has_backend("residual_assign", _dispatch.select("residual_assign", torch.device(device_type), dtype, backend))


_residual_assign_runs = None  # the probe, traced once as a constant under torch.compile (see _constant_probe)


def _constant_probe() -> None:
    """Wrap the probe with assume_constant_result (the dispatch probes backends, which
    torch.compile cannot trace). Done when the first module is built, not at import:
    the wrapper imports torch._dynamo, which pulls in triton, too heavy for `import vqkernels`."""
    global _residual_assign_runs
    if _residual_assign_runs is None:
        _residual_assign_runs = torch.compiler.assume_constant_result(_residual_assign_probe)


def _codes_of_stage(codes: torch.Tensor, q: int, sizes) -> torch.Tensor:
    """Stage ``q``'s codes ``[G, sizes[q], D]`` of the padded ``codes [G, Q, K, D]``."""
    return codes[:, q] if sizes[q] == codes.shape[2] else codes[:, q, : sizes[q]].contiguous()


class _StageLoop(torch.autograd.Function):
    """The training stage loop with straight-through gradients and no gradient to the codes
    (``gradient="ste"``, EMA codebooks or a frozen stack) as ONE autograd node.

    Forward (no graph): the general loop's ops, stage ``q`` quantizing ``s_q = normalized(r_q)``
    with ``r_0 = z`` and ``r_{q+1} = r_q - c_q`` (``c_q`` its codes; rows without one pass
    ``s_q`` through). Backward in closed form: each ``r_q`` is ``z`` minus constants, so
    ``dL/dz = sum_q J_q^T (g + w * dL/dloss_q * 2 (s_q - c_q) / (rows * D))`` over the stages
    run, ``g`` the output's gradient (zero on rows without a code at stage 0, which pass ``z``
    through and get ``g`` directly) and ``J_q`` the normalisation's Jacobian (identity for l2
    and dot). The general loop records about ten autograd nodes per stage whose small ops are
    most of a training step's own cost at small ``codebook_dim`` (DAC's 8)."""

    @staticmethod
    def forward(ctx, z, codes, keep, last, sizes, metric, backend, check_codebook, weight):
        G, N, D = z.shape
        Q = codes.shape[1]
        n = last + 1  # the stages run; later ones are dropped (index -1, loss 0, no statistics)
        residual, out = z, torch.zeros_like(z)
        ins, picked, residuals, indices, losses = [], [], [z], [], []
        for q in range(n):
            stage_in = normalized(residual, metric)
            qz, idx = quantize(stage_in, _codes_of_stage(codes, q, sizes), keep, gradient="ste", metric=metric, backend=backend,
                               check_codebook=check_codebook)
            losses.append(torch.stack([_masked_mse(stage_in[g:g + 1], qz[g:g + 1], keep) for g in range(G)]) * weight)
            ins.append(stage_in)
            picked.append(qz)
            indices.append(idx)
            out = out + qz
            residual = residual - qz
            residuals.append(residual)
        dropped = Q - n
        indices = torch.stack(indices + [torch.full((G, N), -1, dtype=torch.int64, device=z.device)] * dropped, 1)
        losses = torch.stack(losses + [z.new_zeros(G)] * dropped, 1)
        # rows without a code at stage 0 (non-finite; masked ones are handled by the caller)
        # pass through unchanged: the stage loop would turn an Inf into NaN (inf - inf)
        passed = indices[:, 0].unsqueeze(-1) < 0
        out = torch.where(passed, z, out)
        stage_inputs = torch.stack(ins + [torch.zeros_like(z)] * dropped, 1)  # [G, Q, N, D]
        if metric == "cosine":  # batched over the stages: s_q, s_q - c_q and |r_q|
            s = stage_inputs[:, :n]
            saved = (s, s - torch.stack(picked, 1), torch.stack(residuals[:n], 1).norm(dim=-1, keepdim=True))
        else:  # s_q - c_q is r_{q+1}
            saved = tuple(residuals[1:])
        ctx.save_for_backward(passed, keep, *saved)
        ctx.metric, ctx.weight, ctx.stages = metric, weight, n
        ctx.mark_non_differentiable(indices, stage_inputs)
        return out, losses, indices, stage_inputs

    @staticmethod
    def backward(ctx, grad_out, grad_losses, _grad_indices, _grad_inputs):
        passed, keep, *saved = ctx.saved_tensors
        G, N, D = grad_out.shape
        n, dtype = ctx.stages, grad_out.dtype
        zero = torch.zeros((), dtype=dtype, device=grad_out.device)
        through = torch.where(passed, zero, grad_out)  # what each stage's straight-through passes on
        scale = None  # [G, n]: the commitment losses' backward, as _masked_mse's: 2 (s - c) / (rows * D)
        if N and grad_losses is not None and ctx.weight != 0.0:
            rows = N if keep is None else keep.sum().clamp_min(1)
            scale = grad_losses[:, :n].to(dtype) * (2.0 * ctx.weight) / (rows * D)
        kept = None if keep is None else keep.view(N, 1)
        if ctx.metric == "cosine":
            s, diff, norm = saved  # [G, n, N, D], [G, n, N, D], [G, n, N, 1]
            grad = through.unsqueeze(1).expand(G, n, N, D)
            if scale is not None:  # where, not a product: a masked row may hold NaN
                diff = diff if kept is None else torch.where(kept, diff, zero)
                grad = grad + diff * scale.view(G, n, 1, 1)
            # F.normalize's backward: (g - s (s . g)) / max(|r|, eps), no radial part where clamped
            radial = (s * grad).sum(-1, keepdim=True) * (norm >= 1e-12).to(dtype)
            grad_z = ((grad - s * radial) / norm.clamp_min(1e-12)).sum(1)
        else:
            grad_z = through * n
            if scale is not None:  # + sum_q scale_q r_{q+1}, in place (no [G, n, N, D] temporary)
                for q, r in enumerate(saved):
                    grad_z.addcmul_(r, scale[:, q].view(G, 1, 1))
                if kept is not None:  # a masked row (zero so far) may hold NaN
                    grad_z = torch.where(kept, grad_z, zero)
        return grad_z + torch.where(passed, grad_out, zero), None, None, None, None, None, None, None, None


class ResidualOutput(NamedTuple):
    quantized: torch.Tensor
    indices: torch.Tensor
    losses: torch.Tensor


class _ResidualStacks(nn.Module):
    """``G`` residual stacks of ``Q`` stages over one Codebook (the shared engine of both modules)."""

    def __init__(self, dim, groups, num_quantizers, codebook_size, *, codebook_dim=None, shared_codebook=False,
                 quantize_dropout=False, quantize_dropout_cutoff_index=0, commitment_weight=1.0, codebook_weight=1.0,
                 gradient="ste", init="uniform", deferred_steps=0, reservoir_size=None, check_finite=True,
                 sync_codebook=None, kmeans_max_rows=None, progress=None, **codebook_kwargs):
        super().__init__()
        _constant_probe()
        for name, value in (("dim", dim), ("groups", groups), ("num_quantizers", num_quantizers)):
            check_codebook_size(name, value)
        sizes = _stage_sizes(codebook_size, num_quantizers)
        if shared_codebook and len(set(sizes)) > 1:
            raise ValueError(f"shared_codebook=True needs one codebook_size for every stage, got {codebook_size!r}")
        if dim % groups:
            raise ValueError(f"dim={dim} is not divisible by groups={groups}")
        unknown = set(codebook_kwargs) - set(_CODEBOOK_KWARGS)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}; per-stage options are {sorted(_CODEBOOK_KWARGS)}")
        if gradient not in ESTIMATORS:
            raise ValueError(f"gradient must be one of {tuple(ESTIMATORS)}, got {gradient!r}")
        if check_finite not in (True, False, "strict"):
            raise ValueError(f"check_finite must be True, False or 'strict', got {check_finite!r}")
        if not 0 <= quantize_dropout_cutoff_index < num_quantizers:
            raise ValueError(f"quantize_dropout_cutoff_index must be in [0, num_quantizers={num_quantizers}), got {quantize_dropout_cutoff_index}")
        G, Q = groups, num_quantizers
        group_dim = dim // G
        codebook_dim = group_dim if codebook_dim is None else codebook_dim
        check_codebook_size("codebook_dim", codebook_dim)
        # codebook_size: the stored width (the largest stage); codebook_sizes: each stage's own K
        self.dim, self.groups, self.num_quantizers, self.codebook_size = dim, G, Q, max(sizes)
        self.codebook_sizes = sizes
        self.group_dim, self.codebook_dim = group_dim, codebook_dim
        self.shared_codebook = shared_codebook
        self.quantize_dropout, self.quantize_dropout_cutoff_index = quantize_dropout, quantize_dropout_cutoff_index
        self.commitment_weight, self.codebook_weight = float(commitment_weight), float(codebook_weight)
        self.gradient, self.check_finite, self.sync_codebook = gradient, check_finite, sync_codebook
        self.metric = codebook_kwargs.get("metric", "l2")
        self.learning = codebook_kwargs.get("learning", "ema")
        self.backend = codebook_kwargs.get("backend")
        self.init = init
        # k-means initialisation sees at most kmeans_max_rows rows (all ranks together), a
        # uniform sample: at K = 262144 a whole first batch or reservoir would cost N*K*D per
        # Lloyd iteration
        K_max = max(sizes)
        self.kmeans_max_rows = max(4 * K_max, 65536) if kmeans_max_rows is None else kmeans_max_rows
        if not isinstance(self.kmeans_max_rows, int) or self.kmeans_max_rows < K_max:
            raise ValueError(f"kmeans_max_rows must be an int >= codebook_size={K_max} (k-means needs K rows), got {kmeans_max_rows!r}")
        # progress of the stage-wise initialisation: None = only for large codebooks
        self.progress = K_max >= _PROGRESS_K if progress is None else bool(progress)
        needs_projection = codebook_dim != group_dim
        # one projection per group (as each ResidualVQ of a GroupedResidualVQ)
        self.project_in = nn.ModuleList(nn.Linear(group_dim, codebook_dim) if needs_projection else nn.Identity() for _ in range(G))
        self.project_out = nn.ModuleList(nn.Linear(codebook_dim, group_dim) if needs_projection else nn.Identity() for _ in range(G))
        C = G if shared_codebook else G * Q
        # The stage-wise initialisation happens here (not in the Codebook): it is told "not initialised".
        padded = len(set(sizes)) > 1
        self.codebook_state = (_PaddedCodebook if padded else Codebook)(
            max(sizes), codebook_dim, num_codebooks=C, init="uniform" if init == "uniform" and not deferred_steps else "random",
            **codebook_kwargs,
        )
        if padded:
            valid = torch.arange(max(sizes)) < torch.tensor(sizes).unsqueeze(-1)  # [Q, K]
            self.codebook_state.set_valid_(valid.repeat(G, 1))
        if init not in ("uniform", "random", "kmeans"):
            raise ValueError(f"init must be one of ('uniform', 'random', 'kmeans'), got {init!r}")
        self.deferred_steps = deferred_steps
        if deferred_steps:
            # ONE reservoir of the stack's inputs (per group), kept by a C = G Codebook's sampler
            self.deferral = Codebook(
                max(sizes), codebook_dim, num_codebooks=G, init="random", deferred_steps=deferred_steps, reservoir_size=reservoir_size,
                metric=self.metric,
            )

    # ------------------------------------------------------------------ layout helpers
    def _stage_codes(self) -> torch.Tensor:
        """``[G, Q, K, D]`` codes (a view; shared codebooks broadcast over Q)."""
        codes = self.codebook_state.codes()
        G, Q, K, D = self.groups, self.num_quantizers, self.codebook_size, self.codebook_dim
        if self.shared_codebook:
            return codes.view(G, 1, K, D).expand(G, Q, K, D)
        return codes.view(G, Q, K, D)

    def _sync(self):
        return _dist.sync_for(self.sync_codebook is not False)

    @property
    def is_quantizing(self) -> bool:
        return not self.deferred_steps or self.deferral.is_quantizing

    # ------------------------------------------------------------------ decode
    def _codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices [G, ..., Q]`` -> codes ``[G, Q, ..., codebook_dim]``; -1 gives zeros."""
        check_tensor("indices", indices, integer=True, min_dim=2)
        check_same_device(indices=indices, codebook=self.codebook_state.embed)
        G, Q, K = self.groups, self.num_quantizers, self.codebook_size
        if indices.shape[0] != G or indices.shape[-1] != Q:
            raise ValueError(f"indices has shape {tuple(indices.shape)}; expected [groups={G}, ..., num_quantizers={Q}]")
        check_indices_in_range("indices", indices, K)
        if len(set(self.codebook_sizes)) > 1:
            sizes = torch.tensor(self.codebook_sizes, device=indices.device)
            if bool((indices >= sizes).any()):
                raise ValueError(f"indices out of range: stage q takes indices in [-1, codebook_sizes[q]) with codebook_sizes={self.codebook_sizes}")
        lead = indices.shape[1:-1]
        flat = indices.reshape(G, -1, Q).permute(0, 2, 1).reshape(G * Q, -1)  # [G*Q, N]
        codes = self._stage_codes().reshape(G * Q, K, self.codebook_dim)
        out = gather_codes(codes, flat.clamp_min(0).long()) * (flat >= 0).unsqueeze(-1).to(codes.dtype)
        return out.view(G, Q, *lead, self.codebook_dim)

    def _decode(self, indices: torch.Tensor) -> torch.Tensor:
        """``[G, ..., Q]`` -> ``[..., dim]``: the stages summed, projected out, groups concatenated."""
        codes = self._codes_from_indices(indices).sum(1)  # [G, ..., D]
        return torch.cat([self.project_out[g](codes[g]) for g in range(self.groups)], dim=-1)

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def _stagewise_init_(self, z: torch.Tensor, keep, batch_rows, sync, use_kmeans: bool) -> None:
        """Stage 1 of each group initialised on ``z [G, N, D]``, its quantization subtracted,
        stage 2 on those residuals, ... (k-means over all ranks' rows, or K random rows)."""
        rows = z if keep is None else z[:, keep]
        G, Q, K = self.groups, self.num_quantizers, self.codebook_size
        n = sync.total(rows.shape[1], rows.device)
        where = " (all ranks together)" if sync.active else ""
        if use_kmeans and n > self.kmeans_max_rows:
            # a uniform sample of all ranks' rows, the same on every rank: rank 0 holds it and
            # the others none, so k-means over "all ranks' rows" sees it once
            m = self.kmeans_max_rows
            flat = rows.transpose(0, 1).reshape(rows.shape[1], -1)  # the same rows for every group
            picked = sync.sample_rows(flat, m)
            picked = picked if sync.rank == 0 else picked[:0]
            rows = picked.reshape(-1, G, rows.shape[-1]).transpose(0, 1)
            batch_rows = n if batch_rows is None else batch_rows  # sizes in units of the real batch
            n = m
        if use_kmeans and n < K:  # K: the largest stage
            raise ValueError(
                f"k-means initialisation of a residual stack needs at least codebook_size={K} rows{where}, got {n}; "
                "use a bigger first batch, init='random', or deferred_steps"
            )
        if n == 0:
            raise ValueError(f"initialisation needs at least one unmasked row{where}")
        stages = 1 if self.shared_codebook else Q
        residual = normalized(rows, self.metric) if self.metric == "cosine" else rows.clone()
        codes = torch.zeros(G, stages, K, self.codebook_dim, dtype=self.codebook_state.embed.dtype, device=z.device)
        counts = torch.zeros(G, stages, K, dtype=self.codebook_state.cluster_size.dtype, device=z.device)
        report = _InitProgress(stages * G, use_kmeans and self.progress and sync.rank == 0)
        for q in range(stages):
            stage_in = normalized(residual, self.metric)
            Kq = self.codebook_sizes[q]
            for g in range(G):
                if use_kmeans:
                    result = kmeans(stage_in[g], Kq, self.codebook_state.kmeans_iters, metric=self.metric, backend=self.backend,
                                    init="kmeans++" if Kq <= _KMEANS_PLUS_PLUS_MAX_K else "random",
                                    progress=report.tqdm, distributed=sync.active, group=sync.group)
                    codes[g, q, :Kq] = result.centroids.to(codes.dtype)
                    report.step(f"group {g} stage {q}: K={Kq}, {n} rows" if G > 1 else f"stage {q}: K={Kq}, {n} rows")
                else:
                    picked = sync.sample_rows(stage_in[g], Kq, replacement=True)
                    codes[g, q, :Kq] = normalized(picked.to(codes.dtype), self.metric)
            q_out, idx = quantize(stage_in, codes[:, q, :Kq], None, gradient="ste", metric=self.metric, backend=self.backend)
            counts[:, q] = histogram(idx, K, codebook_axis=True).to(counts.dtype)
            residual = residual - q_out
        report.close()
        sync.all_reduce_sum_(counts)
        scale = (n if batch_rows is None else batch_rows) / n
        self.codebook_state.load_codes_(codes.reshape(-1, K, self.codebook_dim), counts.reshape(-1, K) * scale)

    @torch.no_grad()
    def start_quantization(self) -> None:
        """End the continuous phase now: stage-wise k-means on the reservoir (every rank calls it under DDP)."""
        if self.is_quantizing:
            return
        sync = self._sync()
        book = self.deferral
        seen = int(book.reservoir_seen)
        rows = book.reservoir[:, : min(seen, book.reservoir_size)]
        calls = max(1, book._deferred_calls)
        totals = torch.tensor([seen], dtype=torch.int64, device=rows.device)
        sync.all_reduce_sum_(totals)
        self._stagewise_init_(rows, None, int(totals) / calls, sync, use_kmeans=True)
        book.quantizing.fill_(True)
        book._quantizing = True
        book.reservoir = book.reservoir.new_zeros(book.reservoir.shape[:-2] + (0, self.codebook_dim))

    # ------------------------------------------------------------------ forward
    def _project_in(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat [N, dim]`` -> ``[G, N, codebook_dim]``, group g from its slice of the features.
        Views and one unbind, no per-group select: a select's backward fills a zero tensor of the
        whole input and copies into it, two passes over ``[N, dim]`` per group."""
        if self.groups == 1:
            return self.project_in[0](flat).unsqueeze(0)
        parts = flat.view(flat.shape[0], self.groups, self.group_dim).unbind(1)
        return torch.stack([proj(part) for proj, part in zip(self.project_in, parts)])

    def _project_out(self, out: torch.Tensor) -> torch.Tensor:
        """``out [G, N, codebook_dim]`` -> ``[N, dim]`` (the groups side by side, as the input)."""
        if self.groups == 1:
            return self.project_out[0](out.squeeze(0))
        return torch.cat([proj(part) for proj, part in zip(self.project_out, out.unbind(0))], -1)

    def _forward(self, flat: torch.Tensor, keep: Optional[torch.Tensor], freeze: bool = False):
        """``flat [N, dim]`` -> (out [N, dim], indices [G, Q, N], losses [G, Q]).
        ``freeze``: training without touching the codebooks (no EMA/usage update, no restarts,
        no codebook loss; a first-batch initialisation still runs)."""
        G, Q = self.groups, self.num_quantizers
        N = flat.shape[0]
        book = self.codebook_state
        sync = self._sync() if self.training else _dist.LOCAL
        book.broadcast_(sync)
        zero_losses = flat.new_zeros((G, Q), dtype=torch.float32)
        if not self.is_quantizing:
            if self.training and self.deferral.switch_due:
                self.start_quantization()
            else:
                if self.training:
                    with torch.no_grad():
                        z = self._project_in(flat.detach())
                        if self.check_finite and not self._strict():
                            # a batch with a non-finite kept row adds no row to the reservoir (no sync)
                            keep = book.gate_observation_(torch.isfinite(z).all(-1).all(0), keep)
                        self.deferral.observe_(normalized(z.to(book.embed.dtype), self.metric), keep)
                return flat, torch.full((G, Q, N), -1, dtype=torch.int64, device=flat.device), zero_losses

        z = self._project_in(flat).to(book.embed.dtype)  # [G, N, D]
        if self._fused_eval_applies(z, keep):
            return self._fused_eval(flat, z)
        if self.training and not book.is_initialised:
            self._stagewise_init_(z.detach(), keep, None, sync, use_kmeans=self.init == "kmeans")
        codes = self._stage_codes()
        strict = self._strict()
        last = Q - 1
        if self.training and self.quantize_dropout:
            last = random.randrange(self.quantize_dropout_cutoff_index, Q)  # stages after it are dropped
        if self.training and self.gradient == "ste" and (self.learning == "ema" or freeze):
            out, losses, indices, zs = _StageLoop.apply(z, codes.detach(), keep, last, self.codebook_sizes, self.metric,
                                                         self.backend, strict, self.commitment_weight)
            return self._finish(flat, keep, out, indices, zs, losses.float(), sync, strict, freeze)
        residual = z
        out = torch.zeros_like(z)
        stage_inputs, stage_indices, losses = [], [], []
        for q in range(Q):
            if q > last:
                stage_inputs.append(torch.zeros_like(z))
                stage_indices.append(torch.full((G, N), -1, dtype=torch.int64, device=z.device))
                losses.append(z.new_zeros(G))
                continue
            stage_in = normalized(residual, self.metric)
            stage_codes = _codes_of_stage(codes, q, self.codebook_sizes)
            qz, idx = quantize(stage_in, stage_codes.detach(), keep, gradient=self.gradient, metric=self.metric,
                               backend=self.backend, check_codebook=strict)
            if self.training:
                loss = torch.stack([_masked_mse(stage_in[g:g + 1], qz[g:g + 1].detach(), keep) for g in range(G)]) * self.commitment_weight
                if self.learning == "gradient" and not freeze:
                    picked = gather_codes(stage_codes, idx.clamp_min(0))
                    loss = loss + torch.stack([_masked_mse(picked[g:g + 1], stage_in[g:g + 1].detach(), keep) for g in range(G)]) * self.codebook_weight
                losses.append(loss)
            else:
                losses.append(z.new_zeros(G))
            stage_inputs.append(stage_in.detach())
            stage_indices.append(idx)
            out = out + qz
            residual = residual - qz.detach()
        indices = torch.stack(stage_indices, 1)  # [G, Q, N]
        # rows without a code at stage 0 (non-finite; masked ones are handled below) pass
        # through unchanged: the stage loop would turn an Inf into NaN (inf - inf)
        out = torch.where(indices[:, 0].unsqueeze(-1) < 0, z, out)
        zs = torch.stack(stage_inputs, 1) if self.training and not freeze else None  # [G, Q, N, D]
        return self._finish(flat, keep, out, indices, zs, torch.stack(losses, 1).float(), sync, strict, freeze)

    def _finish(self, flat, keep, out, indices, zs, losses, sync, strict, freeze):
        """After the stages: the codebook update of all stages (training), the projection out."""
        G, Q, D = self.groups, self.num_quantizers, self.codebook_dim
        N = flat.shape[0]
        book = self.codebook_state
        if self.training and not freeze:
            # a kept row without a code at stage 0 (stage 0 is never dropped) or a non-finite code
            finite = book.batch_is_finite(indices[:, 0], keep, book.embed) if self.check_finite and not strict else None
            if self.shared_codebook:
                # one codebook per group: all its stages' rows together
                book.update_(zs.reshape(G, Q * N, D), indices.reshape(G, Q * N), None if keep is None else keep.repeat(Q), sync,
                             finite=finite)
            else:
                book.update_(zs.reshape(G * Q, N, D), indices.reshape(G * Q, N), keep, sync, finite=finite)
        outg = self._project_out(out).to(flat.dtype)
        if keep is not None:
            outg = torch.where(keep.unsqueeze(-1), outg, flat)
        return outg, indices, losses

    def _fused_eval_applies(self, z: torch.Tensor, keep) -> bool:
        """Eval without gradients or masks, on a backend that implements residual_assign: all
        stages in one call. Otherwise the stage loop, whose assign runs on the same backend (no
        change of backend either way)."""
        if self.training or keep is not None:
            return False
        if torch.is_grad_enabled() and z.requires_grad:
            return False
        return _residual_assign_runs(z.device.type, z.dtype, self.backend)

    def _fused_eval(self, flat: torch.Tensor, z: torch.Tensor):
        """The eval forward as ``residual_assign`` per group (the stage loop's picks; the output is
        the sum of the picked codes, without the loop's straight-through arithmetic)."""
        G, Q = self.groups, self.num_quantizers
        codes = self._stage_codes()
        outs, indices = [], []
        for g in range(G):
            stages = codes[g]
            if len(set(self.codebook_sizes)) > 1:  # each stage's own codes, not the zero padding
                stages = [codes[g, q, :k] for q, k in enumerate(self.codebook_sizes)]
            r = residual_assign(z[g], stages, self.metric, backend=self.backend, check_codebook=False)
            # non-finite rows (-1 at every stage) pass through, as in the stage loop
            quantized = torch.where(r.indices[:, :1] < 0, z[g], r.quantized)
            outs.append(quantized)
            indices.append(r.indices.t())
        out = self._project_out(torch.stack(outs) if G > 1 else outs[0].unsqueeze(0)).to(flat.dtype)
        return out, torch.stack(indices), flat.new_zeros((G, Q), dtype=torch.float32)

    def _prepare(self, x: torch.Tensor, mask):
        check_tensor("x", x, floating=True, min_dim=1)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}); expected [..., dim={self.dim}]")
        check_same_device(x=x, codebook=self.codebook_state.embed)
        lead = x.shape[:-1]
        keep = None
        if mask is not None:
            check_tensor("mask", mask)
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(lead):
                raise ValueError(f"mask must be bool of the leading shape {tuple(lead)}; got {mask.dtype} {tuple(mask.shape)}")
            keep = mask.reshape(-1)
        flat = x.reshape(-1, self.dim)
        if self._strict():
            if torch.compiler.is_compiling():  # the check as an op: no graph break
                keep = _checked_keep(flat.detach(), keep)
            else:
                check_finite("x", flat.detach(), ignore_rows=None if keep is None else ~keep)
        return lead, keep, flat

    def _strict(self) -> bool:
        """The non-finite policy checks strictly (raises, a host sync): ``check_finite="strict"``,
        or the batch that initialises the stages (a one-off sync anyway). Otherwise a training step
        with ``check_finite`` on is gated without a sync (see :meth:`_finite`)."""
        if not (self.training and self.check_finite):
            return False
        return self.check_finite == "strict" or (self.is_quantizing and not self.codebook_state.is_initialised)

    @property
    def nonfinite_batches(self) -> torch.Tensor:
        """Training steps skipped by the non-finite policy (a device counter, as Quantizer's)."""
        return self.codebook_state.nonfinite_batches


class ResidualQuantizer(_ResidualStacks):
    """Residual VQ: ``Q`` stages, each quantizing what the previous stages left.

    Args: ``dim``, ``num_quantizers`` (Q), ``codebook_size`` (K: one int, or one per stage such
    as ``(5, 128, 256)``; stored ``max K`` wide, see ``codebook_sizes``), ``codebook_dim``
    (projections in/out when it differs from ``dim``, as ResidualVQ), ``shared_codebook``,
    ``quantize_dropout`` / ``quantize_dropout_cutoff_index`` (training: a random last stage in
    ``[cutoff, Q)``, later stages index -1 and loss 0), and every :class:`~vqkernels.Quantizer`
    option, applied per stage (``metric``, ``learning``, ``decay``, ``eps``,
    ``commitment_weight``, ``codebook_weight``, ``gradient``, ``init``, ``kmeans_iters``,
    ``dead_code_threshold``, ``reset_cluster_size``, ``deferred_steps``, ``reservoir_size``,
    ``deterministic``, ``check_finite``, ``sync_codebook``, ``backend``), plus
    ``kmeans_max_rows`` (the k-means init's bounded sample, default ``max(4K, 65536)``) and
    ``progress`` (report the stage-wise k-means init; default: from K = 65536 on).

    In eval without gradients or masks the forward is one
    :func:`vqkernels.residual_assign` call per group; otherwise the stage loop.

    ``check_finite`` is the Quantizer's non-finite policy over the whole stack: by default a
    training batch with a NaN/Inf kept row (or a non-finite code of any stage) updates no
    stage, without a host sync, and is counted in ``nonfinite_batches``; ``"strict"`` raises.

    Returns (forward): ``ResidualOutput(quantized [..., dim], indices [..., Q], losses [Q])``.
    """

    def __init__(self, dim: int, num_quantizers: int, codebook_size: int, **kwargs):
        super().__init__(dim, 1, num_quantizers, codebook_size, **kwargs)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, freeze_codebook: bool = False) -> ResidualOutput:
        """``freeze_codebook``: quantize (and return the commitment losses) without updating the
        codebooks, as ResidualVQ's ``freeze_codebook``."""
        lead, keep, flat = self._prepare(x, mask)
        out, indices, losses = self._forward(flat, keep, freeze_codebook)
        Q = self.num_quantizers
        return ResidualOutput(out.reshape(*lead, self.dim), indices[0].transpose(0, 1).reshape(*lead, Q), losses[0])

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices [..., Q]`` -> codes ``[Q, ..., codebook_dim]`` (as ResidualVQ); -1 gives zeros."""
        return self._codes_from_indices(indices.unsqueeze(0))[0]

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices [..., Q]`` -> the quantized output ``[..., dim]``; -1 (dropped) contributes zero."""
        return self._decode(indices.unsqueeze(0))

    get_output_from_indices = decode


class GroupedResidualQuantizer(_ResidualStacks):
    """``groups`` residual stacks over equal slices of the features (as GroupedResidualVQ);
    all groups' stages share each launch through the codebook axis (``C = G * Q``).

    Returns (forward): ``ResidualOutput(quantized [..., dim], indices [G, ..., Q], losses [G, Q])``.
    """

    def __init__(self, dim: int, groups: int, num_quantizers: int, codebook_size: int, **kwargs):
        super().__init__(dim, groups, num_quantizers, codebook_size, **kwargs)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, freeze_codebook: bool = False) -> ResidualOutput:
        lead, keep, flat = self._prepare(x, mask)
        out, indices, losses = self._forward(flat, keep, freeze_codebook)
        G, Q = self.groups, self.num_quantizers
        quantized = out.reshape(*lead, self.dim)
        return ResidualOutput(quantized, indices.transpose(1, 2).reshape(G, *lead, Q), losses)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices [G, ..., Q]`` -> ``[..., dim]``; -1 contributes zero."""
        return self._decode(indices)

    get_output_from_indices = decode

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices [G, ..., Q]`` -> codes ``[G, Q, ..., codebook_dim]``; -1 gives zeros."""
        return self._codes_from_indices(indices)


# --------------------------------------------------------------------------- checkpoints
def _layout_error(state, prefix, expected: str) -> ValueError:
    found = sorted(k for k in state if k.startswith(prefix))
    shown = ", ".join(found[:12]) + (f", ... ({len(found)} keys)" if len(found) > 12 else "")
    return ValueError(f"cannot read a residual quantizer from this state dict: expected {expected}; found keys [{shown}]")


def _read_rvq(state, prefix: str, num_quantizers: Optional[int]):
    """One vector-quantize-pytorch ResidualVQ under ``prefix``: (codes [Q, K, D], sizes [Q, K],
    embed_avg [Q, K, D] or None, projections {name: tensor})."""
    stages = []
    while f"{prefix}layers.{len(stages)}._codebook.embed" in state:
        stages.append(f"{prefix}layers.{len(stages)}._codebook.")
    expected = (f"'{prefix}layers.<q>._codebook.embed' [1, K, D] (ResidualVQ) or [K, D] (EnCodec, under 'vq.') "
                "for q = 0 .. num_quantizers-1")
    if not stages:
        raise _layout_error(state, prefix, expected)
    if num_quantizers is not None and len(stages) != num_quantizers:
        raise _layout_error(state, prefix, f"{num_quantizers} stages ({expected}), the state dict has {len(stages)}")
    per_stage_proj = sorted(k for k in state if k.startswith(f"{prefix}layers.") and ".project_" in k)
    if per_stage_proj:
        raise _layout_error(state, prefix, f"{expected} with projections around the whole stack, not per stage "
                                           f"(per-stage projections {per_stage_proj[:4]} are DAC's layout: read_dac_state)")
    # [1, K, D] (ResidualVQ), or [K, D] (EnCodec's EuclideanCodebook, older vector-quantize-pytorch)
    embeds = [state[s + "embed"] for s in stages]
    embeds = [e.unsqueeze(0) if e.dim() == 2 else e for e in embeds]
    if any(e.dim() != 3 or e.shape[0] != 1 or e.shape[2] != embeds[0].shape[2] for e in embeds):
        raise _layout_error(state, prefix, f"{expected} (or [K, D]), one head, equal D; got {[tuple(e.shape) for e in embeds]}")
    ks = tuple(e.shape[1] for e in embeds)  # per-stage codebook sizes (ResidualVQ(codebook_size=(...)))
    K = max(ks)

    def pad(t):  # [k, ...] -> [K, ...] with zeros (the padding of per-stage sizes)
        return torch.cat([t, t.new_zeros((K - t.shape[0],) + tuple(t.shape[1:]))]) if t.shape[0] < K else t

    codes = torch.stack([pad(e[0]) for e in embeds])
    sizes = torch.stack([pad(state[s + "cluster_size"].reshape(k)) if s + "cluster_size" in state else pad(torch.ones(k))
                         for s, k in zip(stages, ks)])
    avgs = None
    if all(s + "embed_avg" in state for s in stages):
        avgs = torch.stack([pad(state[s + "embed_avg"].reshape(k, -1)) for s, k in zip(stages, ks)])
    proj = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix + "project_")}
    return codes, sizes, avgs, proj, ks


def _build_from_rvqs(module, parts) -> None:
    with torch.no_grad():
        codes = torch.stack([p[0] for p in parts])  # [G, Q, K, D]
        sizes = torch.stack([p[1] for p in parts])
        G, Q, K, D = codes.shape
        book = module.codebook_state
        C = book.num_codebooks
        if module.shared_codebook:
            codes, sizes = codes[:, :1], sizes[:, :1]
        book.load_codes_(codes.reshape(C, K, D).to(book.embed.dtype), sizes.reshape(C, K).to(book.cluster_size.dtype))
        if book.learning == "ema" and all(p[2] is not None for p in parts):
            avgs = torch.stack([p[2] for p in parts])[:, : codes.shape[1]]
            book.embed_avg.copy_(avgs.reshape(C, K, D))
        for g, p in enumerate(parts):
            for name, value in p[3].items():
                kind, param = name.split(".")
                getattr(getattr(module, kind)[g], param).copy_(value)


def _rvq_shapes(state, prefix):
    codes, _, _, proj, ks = _read_rvq(state, prefix, None)
    Q, _, D = codes.shape
    dim = proj["project_in.weight"].shape[1] if "project_in.weight" in proj else D
    return Q, (ks[0] if len(set(ks)) == 1 else ks), D, dim


def _residual_from_pretrained_state(cls, state, prefix: str = "", **kwargs):
    """A ResidualQuantizer from a vector-quantize-pytorch ``ResidualVQ`` state dict (one head per
    stage), or EnCodec's ``ResidualVectorQuantizer`` (``vq.layers.<q>._codebook.embed [K, D]``,
    ``embed_avg``, ``cluster_size``, ``inited``; its EMA decay 0.99 and dead-code threshold 2
    become the defaults); ``num_quantizers`` in kwargs is checked against the stages found;
    kwargs override. DAC's layout: :func:`read_dac_state`."""
    if f"{prefix}layers.0._codebook.embed" not in state and f"{prefix}vq.layers.0._codebook.embed" in state:
        prefix += "vq."  # EnCodec's ResidualVectorQuantizer wraps its ResidualVectorQuantization as .vq
    if f"{prefix}layers.0._codebook.inited" in state:
        from .checkpoints import ENCODEC, SOURCE_DEFAULTS

        kwargs = {**SOURCE_DEFAULTS[ENCODEC], **kwargs}
    Q, K, D, dim = _rvq_shapes(state, prefix)
    part = _read_rvq(state, prefix, kwargs.pop("num_quantizers", None))
    module = cls(dim, Q, K, codebook_dim=D, **kwargs)
    _build_from_rvqs(module, [part])
    return module.eval()


def _grouped_from_pretrained_state(cls, state, prefix: str = "", **kwargs):
    """A GroupedResidualQuantizer from a ``GroupedResidualVQ`` state dict (``rvqs.<g>.``)."""
    G = 0
    while any(k.startswith(f"{prefix}rvqs.{G}.") for k in state):
        G += 1
    want = kwargs.pop("groups", None)
    if G == 0 or (want is not None and want != G):
        raise _layout_error(state, prefix, f"{want if want is not None else 'G >= 1'} groups under '{prefix}rvqs.<g>.', found {G}")
    Q, K, D, group_dim = _rvq_shapes(state, f"{prefix}rvqs.0.")
    nq = kwargs.pop("num_quantizers", Q)
    parts = [_read_rvq(state, f"{prefix}rvqs.{g}.", nq) for g in range(G)]
    module = cls(group_dim * G, G, nq, K, codebook_dim=D, **kwargs)
    _build_from_rvqs(module, parts)
    return module.eval()


class FactorizedResidualQuantizer(nn.Module):
    """DAC's residual quantizer (descript-audio-codec's ``ResidualVectorQuantize``): every stage
    has its own projections ``in_proj [dim -> codebook_dim]`` / ``out_proj [codebook_dim -> dim]``
    and codebook; the residual lives in the input space. Stage ``q``: ``z_e = in_proj_q(r)``,
    the nearest code by cosine (l2-normalised ``z_e`` against l2-normalised codes, ties to the
    lowest index), ``z_q = out_proj_q(codebook_q[idx])`` (the code as stored, not normalised),
    ``r <- r - z_q``. Codebooks are learned by gradient (DAC's codebook and commitment losses,
    both returned per stage); channel-last ``[..., dim]`` input.

    Returns (forward): ``ResidualOutput(quantized [..., dim], indices [..., Q], losses [Q])``
    with ``losses = commitment_weight * commitment + codebook_weight * codebook``.
    Build from a DAC checkpoint with :meth:`from_pretrained_state`.
    """

    def __init__(self, dim: int, num_quantizers: int, codebook_size: int, codebook_dim: int = 8, *,
                 commitment_weight: float = 0.25, codebook_weight: float = 1.0, backend: Optional[str] = None):
        super().__init__()
        for name, value in (("dim", dim), ("num_quantizers", num_quantizers), ("codebook_size", codebook_size),
                            ("codebook_dim", codebook_dim)):
            check_codebook_size(name, value)
        self.dim, self.num_quantizers, self.codebook_size, self.codebook_dim = dim, num_quantizers, codebook_size, codebook_dim
        self.commitment_weight, self.codebook_weight, self.backend = float(commitment_weight), float(codebook_weight), backend
        self.in_proj = nn.ModuleList(nn.Linear(dim, codebook_dim) for _ in range(num_quantizers))
        self.out_proj = nn.ModuleList(nn.Linear(codebook_dim, dim) for _ in range(num_quantizers))
        self.codebook = nn.Parameter(torch.randn(num_quantizers, codebook_size, codebook_dim))  # nn.Embedding's init

    def _nearest(self, z_e: torch.Tensor, q: int) -> torch.Tensor:
        # training checks no codebook (a host sync per stage): the codebook is a parameter, and
        # non-finite codes or rows show in the losses, as in DAC
        return assign(normalized(z_e.detach(), "cosine"), normalized(self.codebook[q].detach(), "cosine"), "cosine",
                      backend=self.backend, check_codebook=not self.training).indices

    def forward(self, x: torch.Tensor) -> ResidualOutput:
        check_tensor("x", x, floating=True, min_dim=1)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}); expected [..., dim={self.dim}]")
        check_same_device(x=x, codebook=self.codebook)
        lead, flat = x.shape[:-1], x.reshape(-1, self.dim)
        residual, out, indices, losses = flat, torch.zeros_like(flat), [], []
        for q in range(self.num_quantizers):
            z_e = self.in_proj[q](residual)
            idx = self._nearest(z_e, q)
            code = self.codebook[q][idx]
            commitment = (z_e - code.detach()).pow(2).mean()
            codebook_loss = (code - z_e.detach()).pow(2).mean()
            losses.append(self.commitment_weight * commitment + self.codebook_weight * codebook_loss)
            z_q = self.out_proj[q](z_e + (code - z_e).detach())  # straight-through, as DAC
            out = out + z_q
            residual = residual - z_q
            indices.append(idx)
        Q = self.num_quantizers
        return ResidualOutput(out.reshape(*lead, self.dim), torch.stack(indices, -1).reshape(*lead, Q), torch.stack(losses))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices [..., Q]`` -> ``[..., dim]``: the stages' projected codes summed."""
        check_tensor("indices", indices, integer=True, min_dim=1)
        if indices.shape[-1] != self.num_quantizers:
            raise ValueError(f"indices has shape {tuple(indices.shape)}; expected [..., num_quantizers={self.num_quantizers}]")
        check_indices_in_range("indices", indices, self.codebook_size)
        if bool((indices < 0).any()):
            raise ValueError("indices must be in [0, codebook_size): this quantizer has no dropped stages (-1)")
        return sum(self.out_proj[q](self.codebook[q][indices[..., q]]) for q in range(self.num_quantizers))

    get_output_from_indices = decode

    @classmethod
    def from_pretrained_state(cls, state, prefix: str = "", **kwargs) -> "FactorizedResidualQuantizer":
        """From a DAC ``ResidualVectorQuantize`` state dict (``quantizers.<q>.in_proj`` / ``out_proj``
        weight-normed 1x1 convolutions, ``weight_g``/``weight_v`` or torch's
        ``parametrizations.weight.original0/1``, + ``bias``; ``quantizers.<q>.codebook.weight
        [K, codebook_dim]``), in eval mode. The weight norm is folded into plain weights."""
        stages = read_dac_state(state, prefix)
        Q = len(stages)
        if "num_quantizers" in kwargs and kwargs.pop("num_quantizers") != Q:
            raise _layout_error(state, prefix, f"the requested number of stages; the state dict has {Q}")
        K, d = stages[0]["codebook"].shape
        dim = stages[0]["in_weight"].shape[1]
        module = cls(dim, Q, K, d, **kwargs)
        with torch.no_grad():
            for q, st in enumerate(stages):
                module.in_proj[q].weight.copy_(st["in_weight"])
                module.in_proj[q].bias.copy_(st["in_bias"])
                module.out_proj[q].weight.copy_(st["out_weight"])
                module.out_proj[q].bias.copy_(st["out_bias"])
                module.codebook[q].copy_(st["codebook"])
        return module.eval()


def _weight_normed(state, key: str, expected: str, prefix: str) -> torch.Tensor:
    """A 1x1 conv's weight ``[out, in, 1]`` as a Linear's ``[out, in]``, weight norm folded in
    (``g * v / ||v||``, the norm over every axis but the first, as ``weight_norm(dim=0)``)."""
    for g_key, v_key in ((key + "_g", key + "_v"),
                         (key.rsplit(".", 1)[0] + ".parametrizations.weight.original0",
                          key.rsplit(".", 1)[0] + ".parametrizations.weight.original1")):
        if g_key in state and v_key in state:
            g, v = state[g_key], state[v_key]
            norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (v.dim() - 1))
            w = v * (g / norm)
            break
    else:
        if key not in state:
            raise _layout_error(state, prefix, expected)
        w = state[key]
    if w.dim() == 3:
        if w.shape[-1] != 1:
            raise _layout_error(state, prefix, f"{expected} (kernel size 1); got {key} of shape {tuple(w.shape)}")
        w = w[..., 0]
    return w


def read_dac_state(state, prefix: str = "") -> list:
    """DAC's ``ResidualVectorQuantize`` layout -> one dict per stage: ``in_weight [d, dim]``,
    ``in_bias``, ``out_weight [dim, d]``, ``out_bias``, ``codebook [K, d]``."""
    expected = (f"'{prefix}quantizers.<q>.in_proj.weight_g/weight_v/bias', '{prefix}quantizers.<q>.out_proj.*' "
                f"(or parametrizations.weight.original0/1, or a plain weight) and '{prefix}quantizers.<q>.codebook.weight' [K, d] "
                "for q = 0 .. num_quantizers-1")
    stages = []
    while f"{prefix}quantizers.{len(stages)}.codebook.weight" in state:
        base = f"{prefix}quantizers.{len(stages)}."
        st = {"codebook": state[base + "codebook.weight"]}
        for side in ("in", "out"):
            st[f"{side}_weight"] = _weight_normed(state, f"{base}{side}_proj.weight", expected, prefix)
            if f"{base}{side}_proj.bias" not in state:
                raise _layout_error(state, prefix, expected)
            st[f"{side}_bias"] = state[f"{base}{side}_proj.bias"]
        stages.append(st)
    if not stages:
        raise _layout_error(state, prefix, expected)
    K, d = stages[0]["codebook"].shape
    dim = stages[0]["in_weight"].shape[1]
    for q, st in enumerate(stages):
        shapes = {k: tuple(v.shape) for k, v in st.items()}
        want = {"codebook": (K, d), "in_weight": (d, dim), "in_bias": (d,), "out_weight": (dim, d), "out_bias": (dim,)}
        if shapes != want:
            raise _layout_error(state, prefix, f"{expected} with equal shapes {want}; stage {q} has {shapes}")
    return stages


ResidualQuantizer.from_pretrained_state = classmethod(_residual_from_pretrained_state)
GroupedResidualQuantizer.from_pretrained_state = classmethod(_grouped_from_pretrained_state)


__all__ = ["ResidualQuantizer", "GroupedResidualQuantizer", "FactorizedResidualQuantizer", "ResidualOutput", "read_dac_state"]
