"""``cluster_stats``: per-code counts and sums of the rows assigned to each code (masked
rows, index < 0, are ignored). These are what the EMA update (:mod:`..ema_update`) and
k-means consume.

Backends take ``x [C, N, D]`` and ``indices [C, N]`` (``C`` independent codebooks, ``C = 1``
for the plain case) and return ``counts [C, K]``, ``sums [C, K, D]``; the public op adds and
removes the codebook axis.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import _dispatch
from .._validation import (
    all_finite,
    check_codebook_axis,
    check_codebook_size,
    check_finite,
    check_indices_in_range,
    check_same_device,
    check_tensor,
    compute_dtype,
    leading_axis_shape,
)


class ClusterStats(NamedTuple):
    counts: torch.Tensor  #: float32 ``[K]`` or ``[C, K]`` (fp64 for fp64 x): rows per code
    sums: torch.Tensor  #: float32 ``[K, D]`` or ``[C, K, D]`` (fp64 for fp64 x): sum of the rows per code


@_dispatch.custom_op("vqkernels::cluster_stats", mutates_args=())
def _cluster_stats_op(
    x: torch.Tensor, indices: torch.Tensor, K: int, deterministic: bool, backend: str, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [C, N, D]`` (or ``[N, D]``), ``indices [C, N]`` (or ``[N]``) -> ``[C, K]``, ``[C, K, D]``
    (or ``[K]``, ``[K, D]``). ``check``: the value checks (host syncs); off for trusted callers."""
    D = x.shape[-1]
    squeeze = x.dim() == 2
    if squeeze:
        x, indices = x.unsqueeze(0), indices.unsqueeze(0)
    C, N = indices.shape
    dtype = compute_dtype(x.dtype)
    if C * N == 0:
        counts, sums = x.new_zeros(C, K, dtype=dtype), x.new_zeros(C, K, D, dtype=dtype)
    else:
        # A backend whose kernel does the value checks in its own passes (``checks_values``:
        # it raises for an index >= K and, asked ``with_finite``, says whether the sums are
        # finite) spares the op a second pass over the indices and one over the sums.
        name, fused = backend, False
        if check:
            name = _dispatch.select("cluster_stats", x.device, x.dtype, backend or None)
            fused = getattr(_dispatch.implementation("cluster_stats", name), "checks_values", False)
            if not fused:
                check_indices_in_range("indices", indices, K)
        if fused:
            counts, sums, finite = _dispatch.call("cluster_stats", name, x.device, x.dtype, x, indices, K, deterministic, True)
        else:
            counts, sums = _dispatch.call("cluster_stats", name, x.device, x.dtype, x, indices, K, deterministic)
            finite = not check or all_finite(sums)
        # A NaN/Inf in a row with an index reaches its code's sum: checking the [C, K, D] sums
        # reads far less than x [C, N, D]; the exact pass over x runs only to name the rows.
        if not finite:
            check_finite("x", x.reshape(-1, D), ignore_rows=indices.reshape(-1) < 0)
    return (counts[0], sums[0]) if squeeze else (counts, sums)


@_cluster_stats_op.register_fake
def _(x, indices, K, deterministic, backend, check=True):
    dtype = compute_dtype(x.dtype)
    lead = tuple(x.shape[:-2])
    return x.new_empty(*lead, K, dtype=dtype), x.new_empty(*lead, K, x.shape[-1], dtype=dtype)


def cluster_stats(
    x: torch.Tensor,
    indices: torch.Tensor,
    K: int,
    *,
    deterministic: bool = False,
    codebook_axis: bool = False,
    heads: bool = False,
    backend: Optional[str] = None,
) -> ClusterStats:
    """Counts and per-code sums of the rows of ``x`` grouped by ``indices``.

    The codebook axis (every op follows this one rule): with ``codebook_axis=True`` the first
    dimension is ``C`` independent codebooks, ``x [C, ..., D]`` with ``indices [C, ...]``, and
    the statistics are ``[C, K]``, ``[C, K, D]``, computed in one call. Dims after ``C`` are
    flattened.

    Args:
        x: ``[..., D]`` float rows (``[C, ..., D]`` with ``codebook_axis=True``).
        indices: ``[...]`` int64/int32 codes, same leading shape as ``x``; negative = masked.
        K: number of codes per codebook.
        deterministic: sum in a fixed order (stable sort + segment reduction) so results are
            bitwise reproducible; otherwise an ``index_add_``/atomic scatter. (The ``cpu``
            backend always sums each code's rows in input order: reproducible either way.)
        codebook_axis: the first dimension of ``x`` and ``indices`` is the codebook axis ``C``.
        heads: alias of ``codebook_axis`` (heads are codebooks).
        backend: as for :func:`vqkernels.assign`.

    Returns:
        ``ClusterStats(counts [K], sums [K, D])`` (``[C, K]``, ``[C, K, D]`` with the codebook
        axis), float32 (fp64 for fp64 ``x``).

    Example:
        >>> counts, sums = vqkernels.cluster_stats(torch.randn(100, 8), torch.randint(0, 4, (100,)), K=4)
        >>> counts, sums = vqkernels.cluster_stats(
        ...     torch.randn(2, 100, 8), torch.randint(0, 4, (2, 100)), K=4, codebook_axis=True)
        >>> sums.shape
        torch.Size([2, 4, 8])
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
    if not (codebook_axis or heads):
        counts, sums = _cluster_stats_op(
            x.reshape(-1, D).contiguous(), indices.reshape(-1).contiguous(), K, deterministic, requested, True
        )
        return ClusterStats(counts, sums)
    check_codebook_axis("x", x, "heads" if heads and not codebook_axis else "codebook_axis", extra_dims=1)
    C, N, _ = leading_axis_shape(x, extra_dims=1)
    counts, sums = _cluster_stats_op(
        x.reshape(C, N, D).contiguous(), indices.reshape(C, N).contiguous(), K, deterministic, requested, True
    )
    return ClusterStats(counts, sums)


def cluster_stats_unchecked(x: torch.Tensor, indices: torch.Tensor, K: int, deterministic: bool, backend: str) -> ClusterStats:
    """The op for a trusted caller (the :class:`~vqkernels.codebook.Codebook`, which validated
    its inputs once): ``x [C, N, D]`` and ``indices [C, N]`` (< K, or negative; rows of x with a
    non-negative index finite) straight to the backend, with no argument or value checks, so no
    host sync. ``backend``: a name from :func:`~vqkernels.ops._dispatch.requested_backend`."""
    return ClusterStats(*_cluster_stats_op(x.detach().contiguous(), indices.contiguous(), K, deterministic, backend, False))


__all__ = ["cluster_stats", "ClusterStats"]
