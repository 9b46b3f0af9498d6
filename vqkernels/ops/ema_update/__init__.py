"""``ema_update_``: fold one step's :func:`cluster_stats` into the EMA buffers of a VQ layer
and rewrite the codebook, in place, with Laplace smoothing of the cluster sizes:

    cluster_size = decay * cluster_size + (1 - decay) * counts
    embed_avg    = decay * embed_avg    + (1 - decay) * sums
    n            = cluster_size.sum(-1)      (each codebook its own total)
    smoothed     = (cluster_size + eps) / (n + K * eps) * n
    codebook     = embed_avg / smoothed[..., None]

The op name is ``ema_update`` in the folder and the dispatch registry; the public function
and the custom op carry a trailing underscore, PyTorch's mark of an in-place op.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _dispatch
from .._validation import all_finite, check_finite, check_same_device, check_tensor


@_dispatch.custom_op("vqkernels::ema_update_", mutates_args=("cluster_size", "embed_avg", "codebook"))
def _ema_update_op(
    cluster_size: torch.Tensor,
    embed_avg: torch.Tensor,
    codebook: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    decay: float,
    eps: float,
    backend: str,
    check: bool = True,
) -> None:
    if check and not all_finite(counts, sums):  # one host read when all is well; off for trusted callers
        check_finite("counts", counts.reshape(-1, 1))
        check_finite("sums", sums.reshape(-1, sums.shape[-1]))
    args = (cluster_size, embed_avg, codebook, counts, sums, decay, eps)
    _dispatch.call("ema_update", backend, codebook.device, codebook.dtype, *args)


@_ema_update_op.register_fake
def _(cluster_size, embed_avg, codebook, counts, sums, decay, eps, backend, check=True):
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

    The codebook axis (one rule for every op, see :func:`vqkernels.assign`): ``C``
    independent codebooks are a leading axis of every buffer, ``[C, K]`` / ``[C, K, D]``,
    read from the codebook's shape; each codebook is smoothed with its own total ``n``,
    all in one call.

    Args:
        cluster_size: ``[K]`` (or ``[C, K]``) float32/fp64 EMA of counts, updated in place.
        embed_avg: ``[K, D]`` (or ``[C, K, D]``) float32/fp64 EMA of sums, updated in place.
        codebook: ``[K, D]`` (or ``[C, K, D]``) any float dtype, overwritten with
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
    # Backends always see the codebook axis: [C, K] and [C, K, D] (C = 1 for a plain codebook).
    _ema_update_op(
        cluster_size.view(-1, K),
        embed_avg.view(-1, K, D),
        codebook.view(-1, K, D),
        counts.detach().reshape(-1, K).contiguous(),
        sums.detach().reshape(-1, K, D).contiguous(),
        float(decay),
        float(eps),
        requested,
        True,
    )
    return codebook


def ema_update_unchecked(cluster_size, embed_avg, codebook, counts, sums, decay: float, eps: float, backend: str) -> None:
    """The op for a trusted caller (the :class:`~vqkernels.codebook.Codebook`, whose buffers are
    ``[K]`` / ``[K, D]`` or ``[C, K]`` / ``[C, K, D]``, contiguous, and whose statistics come from
    :func:`~vqkernels.ops.cluster_stats.cluster_stats_unchecked`): no argument or value checks,
    so no host sync. ``backend``: a name from :func:`~vqkernels.ops._dispatch.requested_backend`."""
    K, D = codebook.shape[-2], codebook.shape[-1]
    _ema_update_op(
        cluster_size.view(-1, K), embed_avg.view(-1, K, D), codebook.view(-1, K, D),
        counts.reshape(-1, K).contiguous(), sums.reshape(-1, K, D).contiguous(), decay, eps, backend, False,
    )


__all__ = ["ema_update_"]
