"""Bad input gets a clear error naming the argument, what was given and what was expected."""
import pytest
import torch

import vqkernels
from conftest import backend_cases

x = torch.randn(10, 4)
cb = torch.randn(6, 4)
idx = torch.randint(0, 6, (10,))

# (call, exception type, words the message must contain)
CASES = [
    (lambda b: vqkernels.assign([[1.0]], cb, backend=b), TypeError, ["x", "torch.Tensor"]),
    (lambda b: vqkernels.assign(x.long(), cb, backend=b), TypeError, ["x", "floating", "int64"]),
    (lambda b: vqkernels.assign(x, cb.long(), backend=b), TypeError, ["codebook", "floating"]),
    (lambda b: vqkernels.assign(x, torch.randn(6, 4, dtype=torch.complex64), backend=b), TypeError, ["codebook"]),
    (lambda b: vqkernels.assign(x, cb.double(), backend=b), TypeError, ["codebook", "float64", "float32"]),
    (lambda b: vqkernels.assign(x, torch.randn(6), backend=b), ValueError, ["codebook", "2 or 3", "(6,)"]),
    (lambda b: vqkernels.assign(x, torch.randn(6, 5), backend=b), ValueError, ["x has 4 features", "[..., 5]"]),
    (lambda b: vqkernels.assign(x, torch.randn(0, 4), backend=b), ValueError, ["K >= 1"]),
    (lambda b: vqkernels.assign(torch.randn(3, 0), torch.randn(2, 0), backend=b), ValueError, ["D >= 1"]),
    (lambda b: vqkernels.assign(x, cb, "euclid", backend=b), ValueError, ["metric", "euclid", "cosine"]),
    (lambda b: vqkernels.assign(x, torch.full((6, 4), float("nan")), backend=b), ValueError, ["codebook", "NaN", "rows [0, 1"]),
    (lambda b: vqkernels.assign(x, torch.randn(2, 6, 4), backend=b), ValueError, ["2 heads", "[H=2"]),
    (lambda b: vqkernels.assign(x, cb, backend="fast"), ValueError, ["backend=", "fast", "chunked"]),
    (lambda b: vqkernels.histogram(idx.float(), 6, backend=b), TypeError, ["indices", "int64"]),
    (lambda b: vqkernels.histogram(idx, 0, backend=b), ValueError, ["K", ">= 1", "0"]),
    (lambda b: vqkernels.histogram(idx, 6.0, backend=b), TypeError, ["K", "int", "float"]),
    (lambda b: vqkernels.histogram(idx, 3, backend=b), ValueError, ["indices", "index 5", "[0, 3)"]),
    (lambda b: vqkernels.histogram(idx, 6, torch.ones(3), backend=b), ValueError, ["weights", "(3,)", "(10,)"]),
    (lambda b: vqkernels.histogram(idx, 6, torch.ones(10, dtype=torch.int64), backend=b), TypeError, ["weights", "floating"]),
    (lambda b: vqkernels.cluster_stats(x, idx[:5], 6, backend=b), ValueError, ["indices", "(5,)", "(10,)"]),
    (lambda b: vqkernels.cluster_stats(x, idx, 4, backend=b), ValueError, ["indices", "[0, 4)"]),
    (lambda b: vqkernels.cluster_stats(x, idx.float(), 6, backend=b), TypeError, ["indices", "int64"]),
    (lambda b: vqkernels.cluster_stats(x.int(), idx, 6, backend=b), TypeError, ["x", "floating"]),
    (lambda b: vqkernels.cluster_stats(torch.where(idx.view(-1, 1) == idx[0], float("inf"), x), idx, 6, backend=b), ValueError, ["x", "NaN or Inf", "rows [0"]),
    (lambda b: vqkernels.ema_update_(torch.ones(5), torch.ones(6, 4), cb.clone(), torch.ones(6), torch.ones(6, 4), 0.9, backend=b), ValueError, ["cluster_size", "(5,)", "(6,)"]),
    (lambda b: vqkernels.ema_update_(torch.ones(6), torch.ones(6, 4), cb.clone(), torch.ones(6), torch.ones(6, 3), 0.9, backend=b), ValueError, ["sums", "(6, 3)", "(6, 4)"]),
    (lambda b: vqkernels.ema_update_(torch.ones(6), torch.ones(6, 4), cb.clone(), torch.ones(6), torch.ones(6, 4), 1.5, backend=b), ValueError, ["decay", "[0, 1]", "1.5"]),
    (lambda b: vqkernels.ema_update_(torch.ones(6), torch.ones(6, 4), cb.clone(), torch.ones(6), torch.ones(6, 4), 0.9, 0.0, backend=b), ValueError, ["eps", "> 0"]),
    (lambda b: vqkernels.ema_update_(torch.ones(6).half(), torch.ones(6, 4), cb.clone(), torch.ones(6), torch.ones(6, 4), 0.9, backend=b), TypeError, ["cluster_size", "float32"]),
    (lambda b: vqkernels.ema_update_(torch.ones(6), torch.ones(6, 4), cb.clone().t().contiguous().t(), torch.ones(6), torch.ones(6, 4), 0.9, backend=b), ValueError, ["codebook", "contiguous"]),
    (lambda b: vqkernels.ema_update_(torch.ones(6), torch.ones(6, 4), cb.clone(), torch.ones(6), torch.full((6, 4), float("nan")), 0.9, backend=b), ValueError, ["sums", "NaN"]),
    (lambda b: vqkernels.kmeans(x, 11, backend=b), ValueError, ["K=11", "10 rows"]),
    (lambda b: vqkernels.kmeans(x, 3, init="best", backend=b), ValueError, ["init", "kmeans++"]),
    (lambda b: vqkernels.kmeans(x, 3, metric="dot", backend=b), ValueError, ["metric", "dot"]),
    (lambda b: vqkernels.kmeans(x, 3, iters=-1, backend=b), ValueError, ["iters", ">= 0"]),
    (lambda b: vqkernels.kmeans(x, 3, init_centroids=torch.randn(2, 4), backend=b), ValueError, ["init_centroids", "(3, 4)"]),
]


@pytest.mark.parametrize("backend,device", [c for c in backend_cases() if c.values[1] == "cpu"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_bad_input_raises_clear_error(case, backend, device):
    call, exc, words = CASES[case]
    with pytest.raises(exc) as info:
        call(backend)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


def test_state_untouched_by_failed_ema_update():
    buffers = [torch.ones(6), torch.ones(6, 4), torch.randn(6, 4)]
    before = [b.clone() for b in buffers]
    with pytest.raises(ValueError):
        vqkernels.ema_update_(*buffers, torch.ones(6), torch.full((6, 4), float("inf")), 0.9)
    for b, a in zip(buffers, before):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a device mismatch")
@pytest.mark.gpu
def test_device_mismatch():
    with pytest.raises(ValueError, match="codebook is on cuda"):
        vqkernels.assign(x, cb.cuda())
