"""Reference ``assign``: the definition of correct. Plain PyTorch, direct differences."""
import torch
import torch.nn.functional as F

from .._validation import compute_dtype


def distance_matrix(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact distances ``[N, K]`` in the accumulation dtype (small inputs only)."""
    dtype = compute_dtype(x.dtype)
    xs, cs = x.to(dtype), codebook.to(dtype)
    if metric == "l2":
        return (xs[:, None, :] - cs[None, :, :]).pow(2).sum(-1)
    if metric == "cosine":
        return 1 - (F.normalize(xs, dim=-1)[:, None, :] * F.normalize(cs, dim=-1)[None, :, :]).sum(-1)
    return -(xs[:, None, :] * cs[None, :, :]).sum(-1)


def assign(x: torch.Tensor, codebook: torch.Tensor, metric: str):
    K, D = codebook.shape
    rows = max(1, (1 << 22) // max(1, K * D))  # bound the [rows, K, D] temporary, not the result
    indices, distances = [], []
    for start in range(0, x.shape[0], rows):
        d = distance_matrix(x[start : start + rows], codebook, metric)
        best, idx = d.min(1)  # torch.min returns the first minimum: ties go to the lowest index
        indices.append(idx)
        distances.append(best)
    return torch.cat(indices), torch.cat(distances)
