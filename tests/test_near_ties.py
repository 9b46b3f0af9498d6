"""Near-tie numerics per backend and dtype: within the assign tolerance any of two nearly
tied codes is correct; a few tolerances apart the nearer one is required."""
import math

import pytest
import torch

import vqkernels
from conftest import backend_cases, dtypes_for
from helpers import check_assign, exact_distances
from vqkernels.ops.assign import ARGMIN_RTOL, tolerance

ALL = backend_cases()


# Rows whose two nearest codes differ by a known multiple of the dtype tolerance
# (vqkernels.ops.assign.tolerance: ARGMIN_RTOL[dtype] * (|x|^2 + max|c|^2); 4 * rtol for cosine).
# Within the tolerance any pick is correct; a few tolerances apart, the nearer one is required.
# The nearer code always has the HIGHER index, so a "lowest index wins" shortcut fails.
GAPS = (0.25, 0.6, 3.0, 6.0)  # in units of the tolerance: two near-ties, two clear cases


def _tie_problem(metric, dtype, scale):
    R = len(GAPS)
    rtol = ARGMIN_RTOL[torch.float64 if dtype == torch.float64 else torch.float32]
    f64 = torch.float64
    if metric == "l2":
        # row n: x = (0, 16 n, 64, 64); codes x + r e0 (nearer) and x - (r + delta) e0 (farther);
        # the gap is 2 r delta + delta^2, and the rows sit 16 apart, far beyond both codes
        S, r = 64.0, 1.0
        x = torch.tensor([[0.0, S / 4 * n, S, S] for n in range(R)], dtype=f64)
        scale2 = x.pow(2).sum(1) + (x.pow(2).sum(1).max() + r * r)
        far, near = [], []
        for n, gap in enumerate(GAPS):
            delta = -r + math.sqrt(r * r + gap * rtol * float(scale2[n]))
            far.append(x[n] + torch.tensor([-(r + delta), 0, 0, 0], dtype=f64))
            near.append(x[n] + torch.tensor([r, 0, 0, 0], dtype=f64))
        filler = torch.tensor([[0.0, -S, -S, -S]], dtype=f64)
    elif metric == "cosine":
        # row n in the plane (e_2n, e_2n+1): x = e_2n, codes e_2n + alpha e_2n+1 (nearer) and
        # e_2n - (alpha + delta) e_2n+1 (farther); the gap is about alpha * delta
        D, alpha = 2 * R, 2.0**-5
        x = torch.zeros(R, D, dtype=f64)
        far, near = [], []
        for n, gap in enumerate(GAPS):
            x[n, 2 * n] = 1.0
            target = 1 / math.sqrt(1 + alpha**2) - gap * 4 * rtol  # cos of the farther code
            beta = math.sqrt(1 / target**2 - 1)
            c = torch.zeros(D, dtype=f64)
            c[2 * n] = 1.0
            near.append(c.clone().index_fill_(0, torch.tensor([2 * n + 1]), alpha))
            far.append(c.clone().index_fill_(0, torch.tensor([2 * n + 1]), -beta))
        filler = -torch.ones(1, D, dtype=f64)
    else:  # dot: x = e_n; codes t e_n + Y e_last (farther) and (t + delta) e_n + Y e_last (nearer)
        D, t, Y = R + 1, 1.0, 64.0
        x = torch.zeros(R, D, dtype=f64)
        far, near = [], []
        for n, gap in enumerate(GAPS):
            x[n, n] = 1.0
            delta = gap * rtol * (1 + (t + 1) ** 2 + Y**2)
            c = torch.zeros(D, dtype=f64)
            c[-1] = Y
            far.append(c.clone().index_fill_(0, torch.tensor([n]), t))
            near.append(c.clone().index_fill_(0, torch.tensor([n]), t + delta))
        filler = torch.zeros(1, D, dtype=f64)
    codebook = torch.cat([filler, torch.stack([v for pair in zip(far, near) for v in pair])])
    pairs = torch.tensor([[1 + 2 * n, 2 + 2 * n] for n in range(R)])  # (farther, nearer) per row
    # powers of two scale every coordinate exactly, so the classes below hold at any scale
    return (x * scale).to(dtype), (codebook * scale).to(dtype), pairs


def _classify(x, codebook, metric, pairs):
    """Check the construction after the cast: per row, the exact gap in units of the tolerance."""
    d = exact_distances(x.double(), codebook.double(), metric)
    tol = tolerance(x, codebook, metric)
    far, near = d.gather(1, pairs[:, :1]).squeeze(1), d.gather(1, pairs[:, 1:]).squeeze(1)
    others = d.scatter(1, pairs, float("inf")).min(1).values
    assert bool((others > far + 2 * tol).all()), "a third code competes: the construction is broken"
    return ((far - near) / tol).tolist()


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_near_ties_pick_within_tolerance_and_clear_cases_pick_the_nearer(backend, device, metric):
    scales = [1.0, 2.0**8]
    for dtype in dtypes_for(backend, device):
        for scale in scales + ([2.0**20] if dtype in (torch.float32, torch.float64) else []):  # large norms
            x, cb, pairs = _tie_problem(metric, dtype, scale)
            gaps = _classify(x, cb, metric, pairs)
            for want, got in zip(GAPS, gaps):  # the cast kept every row in its class
                assert (got < 1.0) if want < 1 else (got > 2.0), f"{dtype}, scale {scale}: gaps {gaps}"
            idx, dist = vqkernels.assign(x.to(device), cb.to(device), metric, backend=backend)
            idx = idx.cpu()
            where = f"{backend}, {dtype}, scale {scale}, gaps {[round(g, 2) for g in gaps]}"
            for n, want in enumerate(GAPS):
                if want < 1:
                    assert idx[n] in pairs[n].tolist(), f"{where}: row {n} picked {int(idx[n])}"
                else:
                    assert idx[n] == pairs[n, 1], f"{where}: row {n} picked {int(idx[n])}, not the nearer {int(pairs[n, 1])}"
            check_assign(x, cb, metric, idx, dist)
