"""Reference ``residual_assign``: the stages one after another with the reference ``assign``,
the residual in fp32 (fp64 for fp64 inputs). :func:`staged` is the loop every stage-by-stage
backend shares."""
import torch

from .. import _metrics
from .._validation import compute_dtype
from ..assign import reference as _assign_reference


def staged(x: torch.Tensor, codebooks: torch.Tensor, metric: str, assign_fn):
    """Run the Q stages with ``assign_fn(x [1, N, D], codebook [1, K, D], metric) -> ([1, N], [1, N])``
    (a backend's ``assign``), fed the stage inputs and codes in the accumulation dtype.

    -> ``indices [N, Q]``, ``quantized [N, D]`` and ``distances [N, Q]`` in that dtype."""
    dtype = compute_dtype(x.dtype)
    codes = codebooks.to(dtype)
    Q, K, _ = codes.shape
    residual = x.to(dtype)
    quantized = torch.zeros_like(residual)
    # Non-finite rows may get any index from a backend; gather a valid one (the op masks them).
    finite = torch.isfinite(residual).all(-1)
    indices, distances = [], []
    for q in range(Q):
        idx, dist = assign_fn(_metrics.normalized(residual, metric).unsqueeze(0), codes[q : q + 1], metric)
        idx = torch.where(finite, idx[0], 0).clamp(0, K - 1)
        picked = codes[q].index_select(0, idx)
        residual = residual - picked
        quantized = quantized + picked
        indices.append(idx)
        distances.append(dist[0])
    return torch.stack(indices, 1), quantized, torch.stack(distances, 1)


def residual_assign(x: torch.Tensor, codebooks: torch.Tensor, metric: str):
    """``x [N, D]``, ``codebooks [Q, K, D]`` -> ``indices [N, Q]``, ``quantized [N, D]``, ``distances [N, Q]``."""
    return staged(x, codebooks, metric, _assign_reference.assign)
