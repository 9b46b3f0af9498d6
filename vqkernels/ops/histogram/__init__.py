"""``histogram``: how often each code is used (negative indices are masked and ignored)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _dispatch
from .._validation import check_codebook_size, check_indices_in_range, check_same_device, check_tensor, check_finite


@torch.library.custom_op("vqkernels::histogram", mutates_args=())
def _histogram_op(indices: torch.Tensor, K: int, weights: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    check_indices_in_range("indices", indices, K)
    if weights is not None:
        check_finite("weights", weights)
    dtype = torch.int64 if weights is None else torch.float32
    if indices.numel() == 0:
        return torch.zeros(K, dtype=dtype, device=indices.device)
    dtype = None if weights is None else weights.dtype
    return _dispatch.call("histogram", backend, indices.device, dtype, indices, K, weights)


@_histogram_op.register_fake
def _(indices, K, weights, backend):
    return indices.new_empty(K, dtype=torch.int64 if weights is None else torch.float32)


def histogram(
    indices: torch.Tensor,
    K: int,
    weights: Optional[torch.Tensor] = None,
    *,
    heads: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Count how many rows chose each code.

    Args:
        indices: int64/int32 ``[...]`` code indices; negative values are masked rows and
            are ignored. With ``heads=True`` the first dimension is the head: ``[H, ...]``.
        K: number of codes (indices must be ``< K``).
        weights: optional float ``[...]`` (same shape as ``indices``) summed instead of counts.
        heads: count each head's indices separately.
        backend: as for :func:`vqkernels.assign`.

    Returns:
        ``counts [K]`` (``[H, K]`` with heads): int64, or float32 with ``weights``.

    Example:
        >>> vqkernels.histogram(torch.tensor([0, 2, 2, -1]), K=3)
        tensor([1, 0, 2])
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
        weights = weights.detach().reshape(-1).contiguous()
    requested = _dispatch.requested_backend(backend) if backend is not None else ""
    if not heads:
        return _histogram_op(indices.reshape(-1).contiguous(), K, weights, requested)
    if indices.dim() < 1:
        raise ValueError("heads=True needs indices of shape [H, ...], got a scalar")
    H = indices.shape[0]
    flat = offset_heads(indices.reshape(H, -1), K).reshape(-1)
    return _histogram_op(flat, H * K, weights, requested).view(H, K)


def offset_heads(indices: torch.Tensor, K: int) -> torch.Tensor:
    """Map head h's code k to h*K + k (masked entries stay negative), so H codebooks share one op call."""
    H = indices.shape[0]
    offsets = torch.arange(H, device=indices.device, dtype=indices.dtype).view(H, *([1] * (indices.dim() - 1))) * K
    return torch.where(indices >= 0, indices + offsets, indices)


__all__ = ["histogram", "offset_heads"]
