"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on two Gloo ranks around a small model that
holds a ResidualQuantizer: the codebooks (buffers, synced by the quantizer's own collective)
end bitwise identical across ranks although the ranks see different rows."""
import os

import pytest
import torch
import torch.nn as nn

from helpers import run_gloo_ranks
from vqkernels import ResidualQuantizer

STEPS = 4


class Tokenizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(10, 8)
        self.vq = ResidualQuantizer(8, 3, (6, 12, 12), codebook_dim=4, dead_code_threshold=0.5, decay=0.7)
        self.decoder = nn.Linear(8, 10)

    def forward(self, x):
        q, idx, losses = self.vq(self.encoder(x))
        return (self.decoder(q) - x).pow(2).mean() + losses.sum(), idx


def _data(rank):
    g = torch.Generator().manual_seed(50 + rank)
    return [torch.randn(16 + 4 * rank, 10, generator=g) + 2 * rank for _ in range(STEPS)]


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same parameters on every rank (FSDP shards them, it does not broadcast)
        model = Tokenizer()
        fully_shard(model.vq)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        indices = []
        for x in _data(rank):
            opt.zero_grad()
            loss, idx = model(x)
            loss.backward()
            opt.step()
            indices.append(idx)
        state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone() for k, v in model.state_dict().items()}
        torch.save({"state": state, "indices": indices}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_gloo_ranks_identical_codebooks(tmp_path):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:  # pragma: no cover - torch without FSDP2
        pytest.skip(f"torch.distributed.fsdp.fully_shard unavailable: {e}")
    r0, r1 = run_gloo_ranks(_worker, 2, tmp_path, "test_residual_fsdp")
    book_keys = [k for k in r0["state"] if "codebook_state" in k]
    assert "vq.codebook_state.embed" in book_keys
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), f"{k} differs between ranks"
    # the codebook moved, and the padding of the 6-code stage stayed zero
    embed = r0["state"]["vq.codebook_state.embed"]
    assert not embed[0, 6:].any() and embed[0, :6].abs().sum(-1).gt(0).all()
    assert r0["state"]["vq.codebook_state.steps"] == STEPS
    # the ranks quantized different rows (so equal codebooks are the sync's doing)
    assert r0["indices"][0].shape[0] != r1["indices"][0].shape[0]

