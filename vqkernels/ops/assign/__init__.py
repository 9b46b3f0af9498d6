"""``assign``: nearest code per row (distance + argmin), the hot op of every VQ layer.

Definition (``reference.py``): for each row ``x[n]`` return the index of the code with the
smallest distance, ties to the LOWEST index, and that code's distance recomputed exactly
in fp32 (fp64 for fp64 inputs):

* ``l2``:     ``||x - c||^2`` (by direct difference, never the expanded form)
* ``cosine``: ``1 - <x/|x|, c/|c|>``
* ``dot``:    ``-<x, c>`` (so that smaller is nearer for every metric)

Rows of ``x`` holding NaN/Inf get index ``-1`` and a NaN distance on every backend; a
non-finite codebook is an error. Fast backends may choose with a cheaper expanded-form
score; what they must guarantee is that the returned code's exact distance is within
:func:`tolerance` of the true minimum.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import _dispatch
from .._validation import (
    check_finite,
    check_metric,
    check_same_device,
    check_same_dtype,
    check_tensor,
    compute_dtype,
)

METRICS = ("l2", "cosine", "dot")

# Relative tolerance of the chosen code's exact distance against the true minimum, keyed
# by the dtype the scores are accumulated in; scaled by |x|^2 + max|c|^2 (see tolerance()).
# fp16/bf16 inputs are exact in fp32, so they get fp32's tolerance when accumulated in fp32.
ARGMIN_RTOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,  # ieee fp32 dots
    "tf32": 4e-3,  # fp32 inputs rounded to tf32 (10-bit mantissa) by a "medium"/"high" matmul
}


class AssignResult(NamedTuple):
    indices: torch.Tensor  #: int64 ``[...]``, -1 for non-finite rows
    distances: torch.Tensor  #: float32 (fp64 for fp64 inputs) ``[...]``, the winner's exact distance


def tolerance(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", rtol_key=None) -> torch.Tensor:
    """Per-row bound ``[N]`` on how far a correct backend's pick may be from the true minimum."""
    key = rtol_key if rtol_key is not None else compute_dtype(x.dtype)
    rtol = ARGMIN_RTOL[key]
    xf = x.to(torch.float64)
    cf = codebook.to(torch.float64)
    if metric == "cosine":
        return torch.full(xf.shape[:1], 4.0 * rtol, dtype=torch.float64, device=x.device)
    scale = xf.pow(2).sum(-1) + cf.pow(2).sum(-1).max()
    return rtol * scale


@torch.library.custom_op("vqkernels::assign", mutates_args=())
def _assign_op(
    x: torch.Tensor, codebook: torch.Tensor, metric: str, backend: str, check_codebook: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if check_codebook:
        check_finite("codebook", codebook)
    N = x.shape[0]
    if N == 0:
        return x.new_empty(0, dtype=torch.int64), x.new_empty(0, dtype=compute_dtype(x.dtype))
    indices, distances = _dispatch.call("assign", backend, x.device, x.dtype, x, codebook, metric)
    # Non-finite policy, in one place for every backend: such rows get -1 and NaN.
    finite = torch.isfinite(x).all(1)
    indices = torch.where(finite, indices, torch.full_like(indices, -1))
    distances = torch.where(finite, distances, torch.full_like(distances, float("nan")))
    return indices, distances


@_assign_op.register_fake
def _(x, codebook, metric, backend, check_codebook):
    N = x.shape[0]
    return x.new_empty(N, dtype=torch.int64), x.new_empty(N, dtype=compute_dtype(x.dtype))


def assign(
    x: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    *,
    backend: Optional[str] = None,
    check_codebook: bool = True,
) -> AssignResult:
    """Nearest code for every row of ``x``.

    Args:
        x: ``[..., D]`` vectors (fp16 / bf16 / fp32; fp64 on reference and chunked). With a
            multi-head codebook ``[H, K, D]``, ``x`` is ``[H, ..., D]``.
        codebook: ``[K, D]`` or ``[H, K, D]``, same dtype and device as ``x``.
        metric: ``"l2"``, ``"cosine"`` or ``"dot"``.
        backend: force a backend (``"reference"``, ``"chunked"``, ``"triton"``, ``"cuda"``);
            default: ``VQKERNELS_BACKEND`` or the fastest available for the device.
        check_codebook: raise if the codebook holds NaN/Inf (one host sync per call).

    Returns:
        ``AssignResult(indices int64 [...], distances [...])``: ties go to the lowest index;
        ``distances`` is the winner's exact distance in fp32 (fp64 for fp64 inputs).

    Example:
        >>> x, codebook = torch.randn(1000, 64), torch.randn(512, 64)
        >>> indices, distances = vqkernels.assign(x, codebook)
        >>> indices.shape, distances.dtype
        (torch.Size([1000]), torch.float32)
    """
    check_tensor("x", x, floating=True, min_dim=1)
    check_tensor("codebook", codebook, floating=True, dims=(2, 3))
    check_same_device(x=x, codebook=codebook)
    check_same_dtype(x=x, codebook=codebook)
    check_metric(metric, METRICS)
    requested = _dispatch.requested_backend(backend) if backend is not None else ""
    D = codebook.shape[-1]
    if codebook.shape[-2] < 1:
        raise ValueError(f"codebook must hold at least one code (K >= 1), got shape {tuple(codebook.shape)}")
    if D < 1:
        raise ValueError(f"codebook must have D >= 1 features, got shape {tuple(codebook.shape)}")
    if x.shape[-1] != D:
        raise ValueError(
            f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but codebook has {D} "
            f"(shape {tuple(codebook.shape)}); expected x of shape [..., {D}]"
        )
    x = x.detach()
    codebook = codebook.detach().contiguous()
    if codebook.dim() == 2:
        indices, distances = _assign_op(x.reshape(-1, D).contiguous(), codebook, metric, requested, check_codebook)
        return AssignResult(indices.view(x.shape[:-1]), distances.view(x.shape[:-1]))
    H = codebook.shape[0]
    if x.dim() < 2 or x.shape[0] != H:
        raise ValueError(
            f"codebook has {H} heads (shape {tuple(codebook.shape)}), so x must be [H={H}, ..., {D}], "
            f"got shape {tuple(x.shape)}"
        )
    flat = x.reshape(H, -1, D)
    per_head = [_assign_op(flat[h].contiguous(), codebook[h], metric, requested, check_codebook) for h in range(H)]
    indices = torch.stack([p[0] for p in per_head]).view(x.shape[:-1])
    distances = torch.stack([p[1] for p in per_head]).view(x.shape[:-1])
    return AssignResult(indices, distances)


__all__ = ["assign", "AssignResult", "METRICS", "ARGMIN_RTOL", "tolerance"]
