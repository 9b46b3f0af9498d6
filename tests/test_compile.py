"""torch.library registration: opcheck of every op, and torch.compile(fullgraph=True)."""
import torch

import vqkernels


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g)
    codebook = torch.randn(16, 8, generator=g)
    indices = torch.randint(-1, 16, (50,), generator=g)
    return x, codebook, indices


def test_opcheck_every_op():
    x, codebook, indices = _inputs()
    ops = torch.ops.vqkernels
    for metric in ("l2", "cosine", "dot"):
        torch.library.opcheck(ops.assign.default, (x, codebook, metric, "", True))
    torch.library.opcheck(ops.histogram.default, (indices, 16, None, ""))
    torch.library.opcheck(ops.histogram.default, (indices, 16, torch.rand(50), ""))
    for deterministic in (False, True):
        torch.library.opcheck(ops.cluster_stats.default, (x, indices, 16, deterministic, ""))
    args = (torch.rand(1, 16) + 1, torch.randn(1, 16, 8), torch.randn(1, 16, 8), torch.rand(1, 16), torch.randn(1, 16, 8), 0.9, 1e-5, "")
    torch.library.opcheck(ops.ema_update_.default, args)


def _vq_step(x, codebook, cluster_size, embed_avg):
    indices, distances = vqkernels.assign(x, codebook)
    usage = vqkernels.histogram(indices, codebook.shape[0])
    counts, sums = vqkernels.cluster_stats(x, indices, codebook.shape[0])
    vqkernels.ema_update_(cluster_size, embed_avg, codebook, counts, sums, 0.9)
    return indices, distances.mean(), usage


def test_compile_fullgraph_matches_eager():
    x, codebook, _ = _inputs()
    eager_buffers = [codebook.clone(), torch.ones(16), codebook.clone()]
    compiled_buffers = [t.clone() for t in eager_buffers]
    compiled = torch.compile(_vq_step, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        want = _vq_step(x, *eager_buffers)
        got = compiled(x, *compiled_buffers)
        assert torch.equal(want[0], got[0]) and torch.equal(want[2], got[2])
        torch.testing.assert_close(want[1], got[1])
    for a, b in zip(eager_buffers, compiled_buffers):
        torch.testing.assert_close(a, b)


def test_compile_inductor_assign_and_stats():
    x, codebook, _ = _inputs()

    def f(x, codebook):
        indices, distances = vqkernels.assign(x * 2, codebook)
        counts, sums = vqkernels.cluster_stats(x, indices, codebook.shape[0], deterministic=True)
        return indices, distances + 1, sums / counts.clamp_min(1).unsqueeze(1)

    compiled = torch.compile(f, fullgraph=True)
    for want, got in zip(f(x, codebook), compiled(x, codebook)):
        torch.testing.assert_close(want, got)
