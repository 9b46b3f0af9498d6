"""The eval forward of the residual quantizers runs ``residual_assign`` (one call per group for
all stages; per-stage sizes as a list of each stage's codes) when nothing needs the stage loop
(no gradient or mask), with the same indices and outputs as the stage loop."""
import pytest
import torch

from helpers import randn
from vqkernels import GroupedResidualQuantizer, ResidualQuantizer
from vqkernels.ops import _dispatch


def _count_calls(monkeypatch):
    calls = []
    real = _dispatch.call
    monkeypatch.setattr(_dispatch, "call", lambda op, *a: (calls.append(op), real(op, *a))[1])
    return calls


CASES = [
    ("l2-projections", lambda: ResidualQuantizer(10, 4, 16, codebook_dim=6), 10),
    ("cosine", lambda: ResidualQuantizer(7, 3, 9, metric="cosine"), 7),
    ("shared", lambda: ResidualQuantizer(5, 3, 8, shared_codebook=True), 5),
    ("grouped", lambda: GroupedResidualQuantizer(12, 3, 2, 5, codebook_dim=3), 12),
    ("one-stage-one-code", lambda: ResidualQuantizer(3, 1, 1), 3),
    ("per-stage-sizes", lambda: ResidualQuantizer(6, 3, (5, 16, 9), codebook_dim=4), 6),
    ("grouped-per-stage-sizes", lambda: GroupedResidualQuantizer(6, 2, 2, (1, 7)), 6),
]


@pytest.mark.parametrize("N", [1, 37])
@pytest.mark.parametrize("name,make,dim", CASES, ids=[c[0] for c in CASES])
def test_fused_eval_matches_stage_loop(monkeypatch, name, make, dim, N):
    torch.manual_seed(0)
    rq = make()
    for _ in range(2):  # trained codes, not the initial ones
        rq(randn(64, dim, seed=5))
    rq.eval()
    x = randn(N, dim, seed=N)
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        fused = rq(x)
    G = getattr(rq, "groups", 1)
    assert calls.count("residual_assign") == G and calls.count("assign") == 0, calls
    calls.clear()
    with torch.no_grad():  # an all-True mask takes the stage loop
        loop = rq(x, mask=torch.ones(N, dtype=torch.bool))
    assert calls.count("residual_assign") == 0 and calls.count("assign") == rq.num_quantizers, calls
    assert torch.equal(fused.indices, loop.indices)
    torch.testing.assert_close(fused.quantized, loop.quantized, atol=1e-5, rtol=1e-5)
    assert not fused.losses.any() and fused.losses.shape == loop.losses.shape
    torch.testing.assert_close(rq.decode(fused.indices), fused.quantized, atol=1e-5, rtol=1e-5)


def test_stage_loop_when_gradients_or_masks(monkeypatch):
    rq = ResidualQuantizer(8, 3, 6, codebook_dim=4).eval()
    calls = _count_calls(monkeypatch)
    x = randn(20, 8, seed=1)
    out = rq(x)  # the projection's parameters need gradients: the straight-through stage loop
    assert out.quantized.requires_grad and calls.count("residual_assign") == 0
    calls.clear()
    with torch.no_grad():
        rq(x, mask=torch.rand(20) > 0.5)
    assert calls.count("residual_assign") == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_fused_eval_dtypes_and_non_finite_rows_match_stage_loop(dtype):
    rq = ResidualQuantizer(6, 3, 8).eval()
    x = randn(9, 6, seed=3).to(dtype)
    x[4, 1] = float("nan")
    x[6, 0] = float("inf")
    with torch.no_grad():
        fused, loop = rq(x), rq(x, mask=torch.ones(9, dtype=torch.bool))
    assert fused.quantized.dtype == dtype and torch.equal(fused.indices, loop.indices)
    assert (fused.indices[[4, 6]] == -1).all() and (fused.indices[[0, 1, 2, 3, 5, 7, 8]] >= 0).all()
    # non-finite rows pass through unchanged, as the stage loop does
    torch.testing.assert_close(fused.quantized, loop.quantized, equal_nan=True)
    assert torch.equal(fused.quantized[4].isnan(), x[4].isnan()) and fused.quantized[6, 0] == float("inf")


def test_fused_eval_fp64_module():
    rq = ResidualQuantizer(5, 2, 6).double().eval()
    x = randn(11, 5, seed=4).double()
    with torch.no_grad():
        fused, loop = rq(x), rq(x, mask=torch.ones(11, dtype=torch.bool))
    assert torch.equal(fused.indices, loop.indices)
    torch.testing.assert_close(fused.quantized, loop.quantized, atol=1e-12, rtol=1e-12)


def test_backend_without_residual_assign_takes_the_stage_loop(monkeypatch):
    import vqkernels.residual as residual_mod

    rq = ResidualQuantizer(6, 3, 8, backend="reference").eval()
    x = randn(15, 6, seed=8)
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        fused = rq(x)
    assert calls == ["residual_assign"]  # the requested backend implements it
    calls.clear()
    # a backend (e.g. a GPU one not yet written) without residual_assign: its assign, stage by stage
    monkeypatch.setattr(residual_mod, "_has_backend", lambda op, name: False)
    with torch.no_grad():
        loop = rq(x)
    assert calls == ["assign"] * 3
    assert torch.equal(fused.indices, loop.indices)
