"""``cluster_stats``: per-code counts and sums of the rows assigned to each code (masked
rows, index < 0, are ignored). These are what the EMA update (:mod:`..ema_update`) and
k-means consume.
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
    return _dispatch.call("cluster_stats", backend, x.device, x.dtype, x, indices, K, deterministic)


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


__all__ = ["cluster_stats", "ClusterStats"]
