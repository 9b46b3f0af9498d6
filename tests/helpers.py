"""Checks shared by the op tests: compare any backend's output with the fp64 definition."""
import torch

from vqkernels.ops.assign import reference as assign_reference
from vqkernels.ops.assign import tolerance


def first_mismatches(mask: torch.Tensor, *tensors, limit: int = 5) -> str:
    """Describe the first few positions where ``mask`` is True, with the values there."""
    where = mask.nonzero().flatten()[:limit].tolist()
    parts = [f"{mask.sum().item()} mismatches; first at {where}"]
    for t in tensors:
        parts.append(str(t.flatten()[where].tolist()))
    return " | ".join(parts)


def check_assign(x, codebook, metric, indices, distances, rtol_key=None):
    """A backend's (indices, distances) are correct for (x, codebook):

    * every index is in range and its exact fp64 distance is within the dtype tolerance of
      the true minimum (ties and near-ties may legitimately pick another code);
    * where the minimum is unique by more than the tolerance, the index is the reference's;
      with exact ties it is the lowest tied index;
    * the reported distance is the chosen code's distance, to fp32 accuracy.
    """
    x2 = x.reshape(-1, x.shape[-1])
    indices = indices.reshape(-1).cpu()
    distances = distances.reshape(-1).cpu()
    assert indices.dtype == torch.int64
    x64, c64 = x2.detach().cpu().double(), codebook.detach().cpu().double()
    d = assign_reference.distance_matrix(x64, c64, metric)  # [N, K] exact
    true_min, _ = d.min(1)
    K = codebook.shape[0]
    assert bool(((indices >= 0) & (indices < K)).all()), f"index out of range: {indices[(indices < 0) | (indices >= K)][:5]}"
    chosen = d.gather(1, indices.view(-1, 1)).squeeze(1)
    tol = tolerance(x2.cpu(), codebook.cpu(), metric, rtol_key)
    bad = chosen > true_min + tol
    assert not bool(bad.any()), "chosen code not nearest: " + first_mismatches(bad, indices, chosen, true_min)
    # lowest index among exact ties (codes whose exact distance equals the minimum)
    exact_tie_lowest = (d == true_min.view(-1, 1)).to(torch.int64).argmax(1)
    near = (d <= (true_min + tol).view(-1, 1)).sum(1)
    exact = (d == true_min.view(-1, 1)).sum(1)
    # every near-minimal code is an exact copy of the minimum: the lowest index must win
    only_exact_ties = near == exact
    wrong = only_exact_ties & (indices != exact_tie_lowest)
    assert not bool(wrong.any()), "nearest (lowest tied) code missed: " + first_mismatches(wrong, indices, exact_tie_lowest)
    recomputed_err = (distances.double() - chosen).abs()
    dist_tol = 1e-5 * (1 + chosen.abs()) if distances.dtype != torch.float64 else 1e-10 * (1 + chosen.abs())
    if metric == "l2":
        dist_tol = dist_tol + 1e-6 * x64.pow(2).sum(1) * (distances.dtype != torch.float64)
    bad_d = recomputed_err > dist_tol
    assert not bool(bad_d.any()), "reported distance is not the exact one: " + first_mismatches(bad_d, distances, chosen)
