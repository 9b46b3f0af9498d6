"""Per-code statistics and the EMA codebook update.

``cluster_stats`` sums the rows assigned to each code (masked rows, index < 0, are
ignored); ``ema_update_`` folds those statistics into the EMA buffers of a VQ layer and
rewrites the codebook, with Laplace smoothing of the cluster sizes:

    cluster_size = decay * cluster_size + (1 - decay) * counts
    embed_avg    = decay * embed_avg    + (1 - decay) * sums
    n            = cluster_size.sum()
    smoothed     = (cluster_size + eps) / (n + K * eps) * n
    codebook     = embed_avg / smoothed[:, None]
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import _dispatch
from .._validation import (
    check_codebook_size,
    check_finite,
    check_indices_in_range,
    check_same_device,
    check_tensor,
    compute_dtype,
)
from ..histogram import offset_heads


class ClusterStats(NamedTuple):
    counts: torch.Tensor  #: float32 ``[K]`` (fp64 for fp64 x): rows per code
    sums: torch.Tensor  #: float32 ``[K, D]`` (fp64 for fp64 x): sum of the rows per code


@torch.library.custom_op("vqkernels::cluster_stats", mutates_args=())
def _cluster_stats_op(
    x: torch.Tensor, indices: torch.Tensor, K: int, deterministic: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    check_indices_in_range("indices", indices, K)
    check_finite("x", x, ignore_rows=indices < 0)
    dtype = compute_dtype(x.dtype)
    if x.shape[0] == 0:
        return x.new_zeros(K, dtype=dtype), x.new_zeros(K, x.shape[1], dtype=dtype)
    name = _dispatch.select("cluster_stats", x.device, x.dtype, backend or None)
    return _dispatch.implementation("cluster_stats", name)(x, indices, K, deterministic)


@_cluster_stats_op.register_fake
def _(x, indices, K, deterministic, backend):
    dtype = compute_dtype(x.dtype)
    return x.new_empty(K, dtype=dtype), x.new_empty(K, x.shape[1], dtype=dtype)


def cluster_stats(
    x: torch.Tensor,
    indices: torch.Tensor,
    K: int,
    *,
    deterministic: bool = False,
    heads: bool = False,
    backend: Optional[str] = None,
) -> ClusterStats:
    """Counts and per-code sums of the rows of ``x`` grouped by ``indices``.

    Args:
        x: ``[..., D]`` float rows (``[H, ..., D]`` with ``heads=True``).
        indices: ``[...]`` int64/int32 codes, same leading shape as ``x``; negative = masked.
        K: number of codes.
        deterministic: sum in a fixed order (stable sort + segment reduction) so results are
            bitwise reproducible; otherwise an ``index_add_``/atomic scatter.
        heads: treat the first dimension as H independent codebooks.
        backend: as for :func:`vqkernels.assign`.

    Returns:
        ``ClusterStats(counts [K], sums [K, D])`` (``[H, K]``, ``[H, K, D]`` with heads), float32
        (fp64 for fp64 ``x``).

    Example:
        >>> counts, sums = vqkernels.cluster_stats(torch.randn(100, 8), torch.randint(0, 4, (100,)), K=4)
    """
    check_tensor("x", x, floating=True, min_dim=1)
    check_tensor("indices", indices, integer=True)
    check_codebook_size("K", K)
    check_same_device(x=x, indices=indices)
    if x.shape[:-1] != indices.shape:
        raise ValueError(
            f"indices has shape {tuple(indices.shape)} but x has shape {tuple(x.shape)}; "
            f"expected indices of shape {tuple(x.shape[:-1])} (x without its last dimension)"
        )
    requested = _dispatch.requested_backend(backend) if backend is not None else ""
    D = x.shape[-1]
    x = x.detach()
    if not heads:
        counts, sums = _cluster_stats_op(
            x.reshape(-1, D).contiguous(), indices.reshape(-1).contiguous(), K, deterministic, requested
        )
        return ClusterStats(counts, sums)
    if x.dim() < 2:
        raise ValueError(f"heads=True needs x of shape [H, ..., D], got {tuple(x.shape)}")
    H = x.shape[0]
    flat_idx = offset_heads(indices.reshape(H, -1), K).reshape(-1)
    counts, sums = _cluster_stats_op(x.reshape(-1, D).contiguous(), flat_idx, H * K, deterministic, requested)
    return ClusterStats(counts.view(H, K), sums.view(H, K, D))


@torch.library.custom_op("vqkernels::ema_update_", mutates_args=("cluster_size", "embed_avg", "codebook"))
def _ema_update_op(
    cluster_size: torch.Tensor,
    embed_avg: torch.Tensor,
    codebook: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    decay: float,
    eps: float,
    backend: str,
) -> None:
    check_finite("counts", counts.reshape(-1, 1))
    check_finite("sums", sums.reshape(-1, sums.shape[-1]))
    name = _dispatch.select("ema_update", codebook.device, codebook.dtype, backend or None)
    _dispatch.implementation("ema_update", name)(cluster_size, embed_avg, codebook, counts, sums, decay, eps)


@_ema_update_op.register_fake
def _(cluster_size, embed_avg, codebook, counts, sums, decay, eps, backend):
    return None


def ema_update_(
    cluster_size: torch.Tensor,
    embed_avg: torch.Tensor,
    codebook: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    decay: float,
    eps: float = 1e-5,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """EMA update of a VQ layer's statistics and codebook, in place.

    Args:
        cluster_size: ``[K]`` (or ``[H, K]``) float32/fp64 EMA of counts, updated in place.
        embed_avg: ``[K, D]`` (or ``[H, K, D]``) float32/fp64 EMA of sums, updated in place.
        codebook: ``[K, D]`` (or ``[H, K, D]``) any float dtype, overwritten with
            ``embed_avg / smoothed_cluster_size``.
        counts, sums: this step's :func:`cluster_stats`, shaped like ``cluster_size`` / ``embed_avg``.
        decay: in ``[0, 1]``; 0 replaces the statistics, 1 freezes them.
        eps: Laplace smoothing (> 0): keeps unused codes from dividing by zero.
        backend: as for :func:`vqkernels.assign`.

    Returns:
        ``codebook`` (the same tensor, updated).

    Example:
        >>> K, D = 4, 8
        >>> cs, ea, cb = torch.ones(K), torch.randn(K, D), torch.randn(K, D)
        >>> counts, sums = vqkernels.cluster_stats(torch.randn(32, D), torch.randint(0, K, (32,)), K)
        >>> _ = vqkernels.ema_update_(cs, ea, cb, counts, sums, decay=0.99)
    """
    stats_dtypes = (torch.float32, torch.float64)
    for name, t in (("cluster_size", cluster_size), ("embed_avg", embed_avg), ("counts", counts), ("sums", sums)):
        check_tensor(name, t, floating=True)
        if t.dtype not in stats_dtypes:
            raise TypeError(f"{name} must be float32 or float64 (EMA statistics need the precision), got {t.dtype}")
    check_tensor("codebook", codebook, floating=True, dims=(2, 3))
    check_same_device(codebook=codebook, cluster_size=cluster_size, embed_avg=embed_avg, counts=counts, sums=sums)
    expected_sizes = tuple(codebook.shape[:-1])
    for name, t, want in (
        ("cluster_size", cluster_size, expected_sizes),
        ("counts", counts, expected_sizes),
        ("embed_avg", embed_avg, tuple(codebook.shape)),
        ("sums", sums, tuple(codebook.shape)),
    ):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {want} to match codebook {tuple(codebook.shape)}")
    for name, t in (("cluster_size", cluster_size), ("embed_avg", embed_avg), ("codebook", codebook)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous: it is updated in place")
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"decay must be a float in [0, 1], got {decay!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not float(eps) > 0.0:
        raise ValueError(f"eps must be a float > 0 (Laplace smoothing), got {eps!r}")
    requested = _dispatch.requested_backend(backend) if backend is not None else ""
    K, D = codebook.shape[-2], codebook.shape[-1]
    # Backends always see the head dimension: [H, K] and [H, K, D].
    _ema_update_op(
        cluster_size.view(-1, K),
        embed_avg.view(-1, K, D),
        codebook.view(-1, K, D),
        counts.detach().reshape(-1, K).contiguous(),
        sums.detach().reshape(-1, K, D).contiguous(),
        float(decay),
        float(eps),
        requested,
    )
    return codebook


__all__ = ["cluster_stats", "ClusterStats", "ema_update_"]
