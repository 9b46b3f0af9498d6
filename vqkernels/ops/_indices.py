"""Index helpers shared by the ops and their backends: masked entries and the codebook axis.

Masked rows carry a negative index. Bins ``[C, K]`` of C codebooks are addressed as one
flat axis of ``C * K`` bins (codebook ``c``'s code ``k`` is bin ``c * K + k``), so one
``bincount`` / ``index_add_`` serves every codebook at once, with no loop over C.
"""
from __future__ import annotations

import torch


def offset_heads(indices: torch.Tensor, K: int) -> torch.Tensor:
    """Map codebook ``c``'s code ``k`` to ``c * K + k`` for ``indices [C, ...]``; masked
    (negative) entries stay negative."""
    C = indices.shape[0]
    offsets = torch.arange(C, device=indices.device, dtype=indices.dtype).view(C, *([1] * (indices.dim() - 1))) * K
    return torch.where(indices >= 0, indices + offsets, indices)


def binned_indices(indices: torch.Tensor, K: int) -> torch.Tensor:
    """int64 indices with every masked (negative) entry moved to an extra bin ``K``, which the
    caller drops at the end: no boolean indexing, so no host sync."""
    return torch.where(indices >= 0, indices, torch.full_like(indices, K)).to(torch.int64)


def flat_bins(indices: torch.Tensor, K: int) -> torch.Tensor:
    """int64 ``[C * N]`` bins of ``indices [C, N]``: ``c * K + k``, masked entries in the extra
    bin ``C * K`` (drop it at the end)."""
    C = indices.shape[0]
    return binned_indices(offset_heads(indices, K).reshape(-1), C * K)


__all__ = ["offset_heads", "binned_indices", "flat_bins"]
