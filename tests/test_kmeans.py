"""kmeans on top of the ops: monotone inertia, recovered centres, reseeding, seeds."""
import pytest
import torch

import vqkernels
from conftest import backend_cases


def _mixture(n_per, centres, scale, seed):
    g = torch.Generator().manual_seed(seed)
    points = [c + scale * torch.randn(n_per, centres.shape[1], generator=g) for c in centres]
    return torch.cat(points)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_inertia_never_increases(backend, device, init):
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(6, 5, generator=g) * 3
    x = _mixture(40, centres, 1.0, seed=2).to(device)
    result = vqkernels.kmeans(x, 12, iters=15, init=init, seed=0, tol=0, backend=backend)
    history = torch.tensor(result.inertia_history, dtype=torch.float64)
    assert (history[1:] <= history[:-1] * (1 + 1e-6)).all(), history
    assert result.centroids.shape == (12, 5) and result.indices.shape == (240,)
    # the reported assignment and inertia belong to the returned centroids
    check = vqkernels.assign(x.float(), result.centroids.float(), backend=backend)
    assert torch.equal(check.indices, result.indices)
    assert abs(float(check.distances.sum()) - result.inertia) <= 1e-4 * result.inertia


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_recovers_well_separated_centres(init):
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(8, 16, generator=g)
    centres = centres / centres.norm(dim=1, keepdim=True) * 20  # far apart relative to the noise
    x = _mixture(200, centres, 0.5, seed=4)
    result = vqkernels.kmeans(x, 8, iters=50, init=init, seed=5)
    nearest = torch.cdist(centres, result.centroids).min(1).values
    if init == "random":  # random init may merge two blobs; k-means++ must not
        assert (nearest < 1.0).sum() >= 6
    else:
        assert (nearest < 0.2).all(), nearest


def test_empty_clusters_are_reseeded_from_far_points():
    x = _mixture(50, torch.tensor([[0.0, 0.0], [10.0, 0.0]]), 0.3, seed=6)
    start = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1e3, 1e3]])  # the third centroid wins no row
    result = vqkernels.kmeans(x, 3, iters=5, init_centroids=start)
    assert (vqkernels.histogram(result.indices, 3) > 0).all()
    assert result.centroids.abs().max() < 20
    assert result.inertia_history[-1] < result.inertia_history[0]


def test_seed_makes_runs_reproducible_and_cosine_normalises():
    x = torch.randn(500, 6)
    a = vqkernels.kmeans(x, 10, iters=5, seed=7)
    b = vqkernels.kmeans(x, 10, iters=5, seed=7)
    assert torch.equal(a.centroids, b.centroids)
    c = vqkernels.kmeans(x, 10, iters=5, seed=7, metric="cosine")
    torch.testing.assert_close(c.centroids.norm(dim=1), torch.ones(10))


def test_iters_zero_and_progress_bar():
    x = torch.randn(100, 3)
    result = vqkernels.kmeans(x, 4, iters=0, seed=0)
    assert result.n_iter == 0 and len(result.inertia_history) == 1
    try:
        import tqdm  # noqa: F401  (optional: vqkernels[progress])
    except ImportError:
        with pytest.raises(ImportError, match="needs tqdm"):
            vqkernels.kmeans(x, 4, iters=3, seed=0, progress=True, tol=0)
        return
    result = vqkernels.kmeans(x, 4, iters=3, seed=0, progress=True, tol=0)
    assert result.n_iter == 3 and len(result.inertia_history) == 4
