"""``histogram``: how often each code is used (negative indices are masked and ignored).

Backends take ``indices [C, N]`` (``C`` independent codebooks, ``C = 1`` for the plain case)
and return ``counts [C, K]``; the public op adds and removes the codebook axis.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _dispatch
from .._indices import offset_heads  # noqa: F401  (importable from here, as before)
from .._validation import (
    check_codebook_axis,
    check_codebook_size,
    check_finite,
    check_indices_in_range,
    check_same_device,
    check_tensor,
    leading_axis_shape,
)


@_dispatch.custom_op("vqkernels::histogram", mutates_args=())
def _histogram_op(indices: torch.Tensor, K: int, weights: Optional[torch.Tensor], backend: str, check: bool = True) -> torch.Tensor:
    """``indices [C, N]`` (or ``[N]``), ``weights`` alike or None -> ``counts [C, K]`` (or ``[K]``).
    ``check``: the value checks (host syncs); off for trusted callers."""
    squeeze = indices.dim() == 1
    if squeeze:
        indices = indices.unsqueeze(0)
        weights = None if weights is None else weights.unsqueeze(0)
    C = indices.shape[0]
    if indices.numel() == 0:
        counts = torch.zeros(C, K, dtype=torch.int64 if weights is None else torch.float32, device=indices.device)
    else:
        dtype = None if weights is None else weights.dtype
        name = backend
        if check:
            # a backend whose kernel checks the range in its own pass over the indices
            # (``checks_values``) spares the op a second pass
            name = _dispatch.select("histogram", indices.device, dtype, backend or None)
            if not getattr(_dispatch.implementation("histogram", name), "checks_values", False):
                check_indices_in_range("indices", indices, K)
            if weights is not None:
                check_finite("weights", weights.reshape(-1))
        counts = _dispatch.call("histogram", name, indices.device, dtype, indices, K, weights)
    return counts[0] if squeeze else counts


@_histogram_op.register_fake
def _(indices, K, weights, backend, check=True):
    return indices.new_empty(*indices.shape[:-1], K, dtype=torch.int64 if weights is None else torch.float32)


def histogram(
    indices: torch.Tensor,
    K: int,
    weights: Optional[torch.Tensor] = None,
    *,
    codebook_axis: bool = False,
    heads: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Count how many rows chose each code.

    The codebook axis (every op follows this one rule): with ``codebook_axis=True`` the first
    dimension of ``indices`` is ``C`` independent codebooks, ``[C, ...]``, and each codebook
    is counted separately, ``[C, K]``, in one call. Dims after ``C`` are flattened.

    Args:
        indices: int64/int32 ``[...]`` code indices (``[C, ...]`` with ``codebook_axis=True``);
            negative values are masked rows and are ignored.
        K: number of codes per codebook (indices must be ``< K``).
        weights: optional float, shaped like ``indices``, summed instead of counts.
        codebook_axis: the first dimension of ``indices`` is the codebook axis ``C``.
        heads: alias of ``codebook_axis`` (heads are codebooks).
        backend: as for :func:`vqkernels.assign`.

    Returns:
        ``counts [K]`` (``[C, K]`` with the codebook axis): int64, or float32 with ``weights``.

    Example:
        >>> vqkernels.histogram(torch.tensor([0, 2, 2, -1]), K=3)
        tensor([1, 0, 2])
        >>> vqkernels.histogram(torch.tensor([[0, 1], [1, 1]]), K=2, codebook_axis=True)
        tensor([[1, 1],
                [0, 2]])
    """
    check_tensor("indices", indices, integer=True)
    check_codebook_size("K", K)
    if weights is not None:
        check_tensor("weights", weights, floating=True)
        check_same_device(indices=indices, weights=weights)
        if weights.shape != indices.shape:
            raise ValueError(
                f"weights has shape {tuple(weights.shape)} but indices has shape {tuple(indices.shape)}; expected equal shapes"
            )
    requested = _dispatch.requested_backend(backend) if backend is not None else ""
    if not (codebook_axis or heads):
        flat_w = None if weights is None else weights.detach().reshape(-1).contiguous()
        return _histogram_op(indices.reshape(-1).contiguous(), K, flat_w, requested, True)
    check_codebook_axis("indices", indices, "heads" if heads and not codebook_axis else "codebook_axis")
    shape = leading_axis_shape(indices)  # [C, N]: dims after C flattened
    flat_w = None if weights is None else weights.detach().reshape(shape).contiguous()
    return _histogram_op(indices.reshape(shape).contiguous(), K, flat_w, requested, True)



def histogram_unchecked(indices: torch.Tensor, K: int, backend: str) -> torch.Tensor:
    """Counts ``[C, K]`` of ``indices [C, N]`` (< K, or negative) for a trusted caller (the
    :class:`~vqkernels.codebook.Codebook`): no argument or value checks, so no host sync."""
    return _histogram_op(indices.contiguous(), K, None, backend, False)


__all__ = ["histogram", "offset_heads"]
