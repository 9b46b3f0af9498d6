"""Reference ``assign``: the definition of correct. Plain PyTorch, direct differences, with
the formulas of :mod:`vqkernels.ops._metrics`."""
import torch

from .. import _metrics
from .._validation import compute_dtype


def distance_matrix(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact distances ``[..., N, K]`` of ``x [..., N, D]`` to ``codebook [..., K, D]``, in the
    accumulation dtype (fp32; fp64 for fp64 inputs). Small inputs only."""
    dtype = compute_dtype(x.dtype)
    return _metrics.distance_matrix(x.to(dtype), codebook.to(dtype), metric)


def assign(x: torch.Tensor, codebook: torch.Tensor, metric: str):
    """``x [..., N, D]``, ``codebook [..., K, D]`` (leading dims, the codebook axis C, broadcast)
    -> ``indices int64 [..., N]``, ``distances [..., N]``: the first (lowest-index) minimum."""
    K, D = codebook.shape[-2:]
    lead = max(1, x[..., :1, :1].numel(), codebook[..., :1, :1].numel())  # C, after broadcasting
    rows = max(1, (1 << 22) // max(1, lead * K * D))  # bound the [..., rows, K, D] temporary
    indices, distances = [], []
    for start in range(0, x.shape[-2], rows):
        d = distance_matrix(x[..., start : start + rows, :], codebook, metric)
        best, idx = d.min(-1)  # torch.min returns the first minimum: ties go to the lowest index
        indices.append(idx)
        distances.append(best)
    return torch.cat(indices, -1), torch.cat(distances, -1)
