"""torch.compile(fullgraph=True) of a residual training step (forward + backward + EMA), and
FSDP2 (``fully_shard``) on two Gloo ranks around a model holding a ResidualQuantizer."""
import copy

import pytest
import torch
import torch.nn as nn

from test_compile_quantizer import _batches, _compare_steps, unpoisoned_empty  # noqa: F401 (fixture)
from vqkernels import GroupedResidualQuantizer, ResidualQuantizer


class TinyResidualTokenizer(nn.Module):
    """encoder -> residual quantizer -> decoder."""

    def __init__(self, grouped=False, **rq_kwargs):
        super().__init__()
        self.encoder = nn.Linear(12, 8)
        self.vq = GroupedResidualQuantizer(8, 2, 3, 16, **rq_kwargs) if grouped else ResidualQuantizer(8, 3, 16, **rq_kwargs)
        self.decoder = nn.Linear(8, 12)

    def forward(self, x, mask=None):
        quantized, indices, losses = self.vq(self.encoder(x), mask=mask)
        recon = self.decoder(quantized)
        return recon, indices, (recon - x).pow(2).mean() + losses.sum()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(codebook_dim=6, dead_code_threshold=0.5),
        dict(codebook_size=(4, 16, 9), dead_code_threshold=0.5),
        dict(grouped=True, metric="cosine", learning="gradient", gradient="rotation"),
    ],
    ids=["ema-l2-projections-restarts", "per-stage-sizes", "grouped-gradient-cosine-rotation"],
)
def test_residual_training_fullgraph_matches_eager(kwargs):
    torch.manual_seed(0)
    kwargs = dict(kwargs)
    if "codebook_size" in kwargs:  # per-stage sizes replace the 16 of the tokenizer
        model = TinyResidualTokenizer()
        model.vq = ResidualQuantizer(8, 3, kwargs.pop("codebook_size"), **kwargs)
    else:
        model = TinyResidualTokenizer(**kwargs)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    _compare_steps(eager, compiled, _batches(4, "cpu"), atol=1e-6)


def test_residual_training_inductor_matches_eager(unpoisoned_empty):  # noqa: F811
    torch.manual_seed(0)
    model = TinyResidualTokenizer()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    _compare_steps(eager, compiled, _batches(3, "cpu", masked=False), atol=1e-5)


@pytest.mark.parametrize("grouped", [False, True])
def test_eval_fullgraph_runs_residual_assign(monkeypatch, grouped):
    from vqkernels.ops import _dispatch

    torch.manual_seed(0)
    rq = (GroupedResidualQuantizer(8, 2, 3, 16, codebook_dim=3) if grouped else ResidualQuantizer(8, 3, (16, 5, 9))).eval()
    compiled = torch.compile(rq, fullgraph=True, backend="aot_eager")
    x = torch.randn(30, 8)
    calls = []
    real = _dispatch.call
    monkeypatch.setattr(_dispatch, "call", lambda op, *a: (calls.append(op), real(op, *a))[1])
    with torch.no_grad():
        got, want = compiled(x), rq(x)
    assert calls.count("residual_assign") == 2 * rq.groups and "assign" not in calls, calls
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.quantized, want.quantized)
