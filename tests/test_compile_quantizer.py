"""torch.compile(fullgraph=True) of a model using Quantizer: eval and training, no graph
breaks, same results as eager (CPU: chunked backend; GPU: triton/cuda, marker ``gpu``).

Training compiles with ``aot_eager`` (the full dynamo + AOTAutograd pipeline, without
Inductor's C++ build, so several configurations stay cheap) and once with Inductor, which
reorders kernels and is where buffer-mutation ordering bugs show.
"""
import copy

import pytest
import torch
import torch.nn as nn

from vqkernels.quantizer import Quantizer

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + [pytest.param("cuda", marks=pytest.mark.gpu)] * HAS_CUDA


class TinyTokenizer(nn.Module):
    """encoder -> Quantizer -> decoder, the shape of a VQ-VAE bottleneck."""

    def __init__(self, **vq_kwargs):
        super().__init__()
        self.encoder = nn.Linear(12, 8)
        self.vq = Quantizer(8, 32, **vq_kwargs)
        self.decoder = nn.Linear(8, 12)

    def forward(self, x, mask=None):
        quantized, indices, loss = self.vq(self.encoder(x), mask=mask)
        recon = self.decoder(quantized)
        return recon, indices, (recon - x).pow(2).mean() + loss


def _batches(n, device, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4, 10, 12, generator=g)
        mask = torch.rand(4, 10, generator=g) > 0.2 if masked else None
        out.append((x.to(device), None if mask is None else mask.to(device)))
    return out


def _compare_steps(eager, compiled, batches, atol):
    """Run both models over ``batches`` (same RNG per step), comparing outputs, gradients and
    every buffer; returns nothing, raises on the first difference."""
    for step, (x, mask) in enumerate(batches):
        grads = []
        outs = []
        for model in (eager, compiled):
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(step)  # dead-code restarts draw random rows: same draws
            recon, idx, loss = model(xi, mask)
            loss.backward()
            outs.append((recon.detach(), idx, loss.detach()))
            grads.append(xi.grad)
        (r0, i0, l0), (r1, i1, l1) = outs
        assert torch.equal(i0, i1), f"step {step}: indices differ"
        torch.testing.assert_close(r1, r0, atol=atol, rtol=atol, msg=lambda m: f"step {step} recon: {m}")
        torch.testing.assert_close(l1, l0, atol=atol, rtol=atol, msg=lambda m: f"step {step} loss: {m}")
        torch.testing.assert_close(grads[1], grads[0], atol=atol, rtol=atol, msg=lambda m: f"step {step} grad: {m}")
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        torch.testing.assert_close(b, a, atol=atol, rtol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_eval_inductor_fullgraph_matches_eager(device):
    torch.manual_seed(0)
    model = TinyTokenizer(codebook_dim=6).to(device).eval()  # with projections in and out
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for x, mask in _batches(2, device):
            want, got = model(x, mask), compiled(x, mask)
            assert torch.equal(want[1], got[1])
            torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dead_code_threshold=0.5),
        dict(metric="cosine", learning="gradient", gradient="rotation"),
    ],
    ids=["ema-l2-restarts", "gradient-cosine-rotation"],
)
def test_training_fullgraph_no_graph_breaks_matches_eager(kwargs):
    torch.manual_seed(0)
    model = TinyTokenizer(**kwargs)
    eager = copy.deepcopy(model)
    batches = _batches(4, "cpu")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    _compare_steps(eager, compiled, batches, atol=1e-6)
    # the default non-finite policy under compile: the batch is skipped (device-side flag, no
    # graph break) and touches nothing but the step counters
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, mask = batches[0]
    x = x.clone()
    x[1, 3, 0] = float("nan")
    compiled(x, mask.clone().fill_(True))
    for k, v in model.state_dict().items():
        assert k.endswith("steps") or torch.equal(v, before[k]), f"{k} changed by a skipped batch"
    assert int(model.vq.nonfinite_batches) == 1
    # check_finite="strict" stays on under compile (inside an op, so no graph break)
    strict = TinyTokenizer(check_finite="strict", **kwargs)
    strict_compiled = torch.compile(strict, fullgraph=True, backend="aot_eager")
    strict_compiled(*batches[1])
    before = {k: v.clone() for k, v in strict.state_dict().items()}
    with pytest.raises(ValueError, match=r"NaN or Inf \(rows \[13\]\)"):
        strict_compiled(x, mask.clone().fill_(True))
    for k, v in strict.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a rejected batch"
    mask = mask.clone()
    mask[1, 3] = False  # a masked NaN row is fine
    strict_compiled(x, mask)


@pytest.fixture
def unpoisoned_empty(monkeypatch):
    """The real torch.empty / empty_like: conftest's NaN poisoning wraps them in Python, and
    AOTAutograd, which calls torch.empty while tracing the backward, would record the
    poisoning fill into the graph (and reject it as a mutation)."""
    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)
    monkeypatch.setattr(torch, "empty_like", torch._C._VariableFunctions.empty_like)


@pytest.mark.parametrize("device", DEVICES)
def test_training_inductor_matches_eager(device, unpoisoned_empty):
    """Inductor reorders kernels: the output must use the codes of THIS step, not those the
    in-place EMA update writes for the next one (a real ordering hazard in torch 2.13)."""
    torch.manual_seed(0)
    model = TinyTokenizer().to(device)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    _compare_steps(eager, compiled, _batches(3, device, masked=False), atol=1e-5)
