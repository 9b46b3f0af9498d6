"""``vqkernels diagnose``: every layout the package reads, safe loading, clear errors."""
import os
import re

import numpy as np
import pytest
import torch

from vqkernels import cli
from vqkernels import diagnose as dgn
from vqkernels import diagnostics as dg
from vqkernels.quantizer import Quantizer
from vqkernels.residual import GroupedResidualQuantizer, ResidualQuantizer


def run_cli(argv, capsys):
    try:
        code = cli.main(["diagnose", *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows_of(text, first):
    """Lines of a printed table whose first cell starts with ``first``."""
    return [line for line in text.splitlines() if line.startswith(first)]


def trained(module, x, steps=2):
    for _ in range(steps):
        module(x)
    return module.eval()


X = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))


def vqp():
    return pytest.importorskip("vector_quantize_pytorch")


# ---------------------------------------------------------------------------- layouts
def _vqkernels_quantizer():
    torch.manual_seed(0)
    vq = trained(Quantizer(8, 16, init="kmeans"), X)
    return vq.state_dict(), vq.codebook_state.codes().detach(), ["codebook"]


def _vqkernels_heads():
    torch.manual_seed(0)
    vq = trained(Quantizer(8, 16, heads=2, separate_codebook_per_head=True, init="kmeans"), X)
    return vq.state_dict(), vq.codebook_state.codes().detach(), ["head 0", "head 1"]


def _vqkernels_residual():
    torch.manual_seed(0)
    rq = trained(ResidualQuantizer(8, 3, 16, init="kmeans"), X)
    return rq.state_dict(), rq.codebook_state.codes().detach(), ["stage 0", "stage 1", "stage 2"]


def _vqkernels_grouped():
    torch.manual_seed(0)
    g = trained(GroupedResidualQuantizer(8, 2, 2, 16, codebook_dim=3, init="kmeans"), X)
    return g.state_dict(), g.codebook_state.codes().detach(), [f"group {a} stage {b}" for a in range(2) for b in range(2)]


def _vqp_heads():
    m = vqp().VectorQuantize(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True, kmeans_init=True)
    m.train()
    m(X[None])
    return m.state_dict(), m._codebook.embed.detach(), ["head 0", "head 1"]


def _vqp_residual():
    m = vqp().ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, kmeans_init=True)
    m.train()
    m(X[None])
    return m.state_dict(), torch.cat([layer._codebook.embed.detach() for layer in m.layers]), ["stage 0", "stage 1", "stage 2"]


def _vqp_grouped():
    m = vqp().GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=16, kmeans_init=True)
    m.train()
    m(X[None])
    codes = torch.cat([layer._codebook.embed.detach() for rvq in m.rvqs for layer in rvq.layers])
    return m.state_dict(), codes, [f"group {a} stage {b}" for a in range(2) for b in range(2)]


def _taming():
    w = torch.randn(16, 8)
    return {"embedding.weight": w}, w[None], ["codebook"]


def _encodec_codebook():
    g = torch.Generator().manual_seed(1)
    e = torch.randn(16, 8, generator=g)
    sizes = torch.rand(16, generator=g) * 4
    state = {"_codebook.embed": e, "_codebook.embed_avg": e * sizes[:, None], "_codebook.cluster_size": sizes,
             "_codebook.inited": torch.ones(1)}
    return state, e[None], ["codebook"]


LAYOUTS = {
    "vqkernels Quantizer": _vqkernels_quantizer,
    "vqkernels heads": _vqkernels_heads,
    "vqkernels ResidualQuantizer": _vqkernels_residual,
    "vqkernels GroupedResidualQuantizer": _vqkernels_grouped,
    "vqp VectorQuantize(heads=2)": _vqp_heads,
    "vqp ResidualVQ": _vqp_residual,
    "vqp GroupedResidualVQ": _vqp_grouped,
    "taming": _taming,
    "encodec codebook": _encodec_codebook,
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("where", ["root", "nested"])
def test_every_layout_is_found_built_and_tabled(name, where, tmp_path, capsys):
    state, codes, labels = LAYOUTS[name]()
    if where == "nested":  # a Lightning-style checkpoint: the model's state dict under "state_dict", quantizer under a prefix
        state = {"state_dict": {"encoder.weight": torch.randn(4, 4), **{f"model.vq.{k}": v for k, v in state.items()}},
                 "epoch": 3, "hyper_parameters": {"lr": 0.1}}
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    flat = dgn.load_state(str(path))
    found = dgn.find_quantizers(flat)
    prefix = "" if where == "root" else "state_dict.model.vq."
    assert [f.prefix for f in found] == [prefix], found
    module = dgn.build(flat, found[0])
    units = dg.units_of(module)
    assert units.labels == labels
    # the table is computed on the checkpoint's own codes
    assert torch.allclose(units.codes.reshape(-1, codes.shape[-1]), codes.reshape(-1, codes.shape[-1]).float())
    code, out, err = run_cli([str(path)], capsys)
    assert code == 0, err
    health = dg.codebook_health(module, statistics=dgn.has_statistics(flat, prefix))
    for label, row in health.items():
        printed = rows_of(out, label)
        assert printed, out
        assert f"{row['effective_rank_codebook']:.2f}" in printed[-1]
    assert ("EMA used" in out) == (name != "taming"), out
    # with embeddings: the per-unit report of the module built from the checkpoint
    np.save(tmp_path / "emb.npy", torch.randn(64, module.dim, generator=torch.Generator().manual_seed(2)).numpy())
    code, out, err = run_cli([str(path), "--embeddings", str(tmp_path / "emb.npy"), "--no-plot"], capsys)
    assert code == 0, err
    assert "On 64 embeddings" in out and "variance ratio" in out
    if len(labels) > 1:
        assert len(rows_of(out, "ckpt.pt ")) == len(labels) + 1, out


def test_embeddings_give_the_report_per_stage_and_the_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    state, _, _ = _vqkernels_residual()
    torch.save(state, tmp_path / "rq.pt")
    np.save(tmp_path / "emb.npy", X.numpy())
    torch.save({"embeddings": X}, tmp_path / "emb.pt")
    png = tmp_path / "out" / "rq.png"
    code, out, err = run_cli([str(tmp_path / "rq.pt"), "--embeddings", str(tmp_path / "emb.npy"), "--plot", str(png)], capsys)
    assert code == 0, err
    rq = ResidualQuantizer(8, 3, 16)
    rq.load_state_dict(state)
    expected = dg.report(X, rq.eval(), print_table=False)
    for q in range(3):
        row = rows_of(out, f"rq.pt   stage {q}")
        assert row, out
        cells = row[0].split()
        assert cells[3] == f"{expected['units'][f'stage {q}']['utilisation']:.3f}"
        assert cells[8] == f"{expected['units'][f'stage {q}']['variance_ratio']:.3f}"
    assert "variance ratio" in out and "mean dist" not in out.split("On 256")[0]
    assert png.read_bytes()[:4] == b"\x89PNG"
    # the same embeddings as a .pt holding one tensor
    code, out2, err = run_cli([str(tmp_path / "rq.pt"), "--embeddings", str(tmp_path / "emb.pt"), "--no-plot"], capsys)
    assert code == 0, err
    assert rows_of(out2, "rq.pt   stage 2") == rows_of(out, "rq.pt   stage 2")


def test_safetensors_checkpoint(tmp_path, capsys):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state, codes, _ = _vqkernels_residual()
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "rq.safetensors"))
    code, out, err = run_cli([str(tmp_path / "rq.safetensors")], capsys)
    assert code == 0, err
    assert len(rows_of(out, "stage ")) == 3


def test_safetensors_missing_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "safetensors", None)
    monkeypatch.setitem(__import__("sys").modules, "safetensors.torch", None)
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 16)
    code, _, err = run_cli([str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and "pip install safetensors" in err


# ---------------------------------------------------------------------------- safe loading
MARKER = "diagnose_was_unpickled"


class Payload:
    """Unpickling this would run open(MARKER, 'w'): a stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class CustomObject:
    def __init__(self):
        self.embed = torch.randn(4, 2)


@pytest.mark.parametrize("payload", ["reduce", "custom class"])
@pytest.mark.parametrize("which", ["checkpoint", "embeddings"])
def test_pickles_asking_for_objects_are_refused(payload, which, tmp_path, capsys):
    marker = tmp_path / MARKER
    evil = Payload(str(marker)) if payload == "reduce" else CustomObject()
    good, _, _ = _vqkernels_quantizer()
    torch.save(good, tmp_path / "good.pt")
    torch.save({"embed": torch.randn(16, 8), "quantizing": torch.tensor(True), "extra": evil}, tmp_path / "evil.pt")
    argv = [str(tmp_path / "evil.pt")] if which == "checkpoint" else [str(tmp_path / "good.pt"), "--embeddings", str(tmp_path / "evil.pt")]
    code, out, err = run_cli(argv + ["--no-plot"], capsys)
    assert code == 2, out + err
    assert "refused to load" in err and "weights_only" in err and which in err, err
    assert not marker.exists(), "the payload ran"


def test_npy_object_arrays_are_refused(tmp_path, capsys):
    good, _, _ = _vqkernels_quantizer()
    torch.save(good, tmp_path / "good.pt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    code, _, err = run_cli([str(tmp_path / "good.pt"), "--embeddings", str(tmp_path / "obj.npy")], capsys)
    assert code == 2 and "refused or cannot read embeddings" in err and "allow_pickle" in err, err


# ---------------------------------------------------------------------------- clear errors
def test_unreadable_and_unknown_files(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    code, _, err = run_cli([str(tmp_path / "junk.pt")], capsys)
    assert code == 2 and "cannot read checkpoint" in err and "expected a torch.save file" in err, err

    code, _, err = run_cli([str(tmp_path / "missing.pt")], capsys)
    assert code == 2 and "does not exist" in err

    torch.save({"encoder.weight": torch.randn(3, 4), "decoder.bias": torch.randn(4)}, tmp_path / "model.pt")
    code, _, err = run_cli([str(tmp_path / "model.pt")], capsys)
    assert code == 2 and "no quantizer found" in err
    assert "encoder.weight (3, 4)" in err and "layers.<q>._codebook.embed" in err and "codebook_state.embed" in err, err

    torch.save([1, 2, 3], tmp_path / "list.pt")
    code, _, err = run_cli([str(tmp_path / "list.pt")], capsys)
    assert code == 2 and "holds no tensors" in err and "expected a state dict" in err


def test_embeddings_errors(tmp_path, capsys):
    good, _, _ = _vqkernels_quantizer()
    torch.save(good, tmp_path / "q.pt")
    np.save(tmp_path / "wrong.npy", np.zeros((10, 5), dtype=np.float32))
    code, _, err = run_cli([str(tmp_path / "q.pt"), "--embeddings", str(tmp_path / "wrong.npy")], capsys)
    assert code == 2 and "5 features" in err and "dim=8" in err, err
    (tmp_path / "e.csv").write_text("1,2")
    code, _, err = run_cli([str(tmp_path / "q.pt"), "--embeddings", str(tmp_path / "e.csv")], capsys)
    assert code == 2 and "expected one of .npy" in err
    torch.save({"a": torch.zeros(2, 8), "b": torch.zeros(2, 8)}, tmp_path / "two.pt")
    code, _, err = run_cli([str(tmp_path / "q.pt"), "--embeddings", str(tmp_path / "two.pt")], capsys)
    assert code == 2 and "2 tensors" in err


def test_several_quantizers_and_prefix(tmp_path, capsys):
    a, _, _ = _vqkernels_quantizer()
    b, _, _ = _vqkernels_residual()
    state = {**{f"semantic.{k}": v for k, v in a.items()}, **{f"acoustic.{k}": v for k, v in b.items()}}
    torch.save(state, tmp_path / "two.pt")
    np.save(tmp_path / "emb.npy", X.numpy())
    code, out, err = run_cli([str(tmp_path / "two.pt")], capsys)
    assert code == 0, err
    assert "under 'acoustic.'" in out and "under 'semantic.'" in out
    code, _, err = run_cli([str(tmp_path / "two.pt"), "--embeddings", str(tmp_path / "emb.npy")], capsys)
    assert code == 2 and "pass --prefix" in err and "'acoustic.'" in err
    code, out, err = run_cli([str(tmp_path / "two.pt"), "--embeddings", str(tmp_path / "emb.npy"), "--prefix", "acoustic.",
                              "--no-plot"], capsys)
    assert code == 0 and len(rows_of(out, "two.pt   stage ")) == 3, err
    code, _, err = run_cli([str(tmp_path / "two.pt"), "--prefix", "nope."], capsys)
    assert code == 2 and "no quantizer under --prefix 'nope.'" in err


def test_a_layout_the_loaders_cannot_read_is_reported(tmp_path, capsys):
    # a vqkernels residual state whose C is not groups * stages
    b, _, _ = _vqkernels_residual()
    torch.save(b, tmp_path / "rq.pt")
    code, _, err = run_cli([str(tmp_path / "rq.pt"), "--num-quantizers", "2"], capsys)
    assert code == 2 and re.search(r"C=3 codebooks; expected groups \* num_quantizers = 1 \* 2", err), err
    # a stack whose stages' codes differ in size
    state = {f"layers.{q}._codebook.embed": torch.randn(1, 16, 8 // (q + 1)) for q in range(2)}
    torch.save(state, tmp_path / "odd.pt")
    code, _, err = run_cli([str(tmp_path / "odd.pt")], capsys)
    assert code == 2 and "under prefix ''" in err and "loader cannot read it" in err and "(1, 16, 4)" in err, err


def test_dead_threshold_counts_ema_dead_codes(tmp_path, capsys):
    vq = Quantizer(2, 4)
    with torch.no_grad():
        vq.codebook_state.load_codes_(torch.randn(1, 4, 2), torch.tensor([[5.0, 0.5, 2.0, 0.0]]))
    torch.save(vq.state_dict(), tmp_path / "q.pt")
    for threshold, dead in (("1.0", 2), ("3", 3), ("0", 0)):
        code, out, err = run_cli([str(tmp_path / "q.pt"), "--dead-threshold", threshold], capsys)
        assert code == 0, err
        assert rows_of(out, "codebook ")[-1].split()[3] == str(dead), out
    assert os.path.exists(tmp_path / "q.pt")


def test_per_stage_codebook_sizes(tmp_path, capsys):
    torch.manual_seed(0)
    rq = trained(ResidualQuantizer(8, 3, (4, 8, 16), init="kmeans"), X)
    torch.save(rq.state_dict(), tmp_path / "rq.pt")
    code, out, err = run_cli([str(tmp_path / "rq.pt"), "--codebook-sizes", "4,8,16"], capsys)
    assert code == 0, err
    assert [rows_of(out, f"stage {q}")[-1].split()[2] for q in range(3)] == ["4", "8", "16"], out
    code, _, err = run_cli([str(tmp_path / "rq.pt"), "--codebook-sizes", "4,8"], capsys)
    assert code == 2 and "the largest must be the stored width K=16" in err, err
    code, _, err = run_cli([str(tmp_path / "rq.pt"), "--codebook-sizes", "4,x"], capsys)
    assert code == 2 and "--codebook-sizes must be positive integers" in err


def test_dac_layout_is_found():
    # DAC's layout (weight-normed 1x1-conv projections around 8-D codes); reading it is the loaders' job
    state = {"encoder.block.0.weight": torch.randn(4, 4)}
    for q in range(3):
        state.update({f"quantizer.quantizers.{q}.codebook.weight": torch.randn(16, 8),
                      f"quantizer.quantizers.{q}.in_proj.weight_v": torch.randn(8, 32, 1),
                      f"quantizer.quantizers.{q}.in_proj.weight_g": torch.rand(8, 1, 1),
                      f"quantizer.quantizers.{q}.out_proj.weight_v": torch.randn(32, 8, 1)})
    assert dgn.find_quantizers(state) == [dgn.Found("quantizer.", "dac", "dac")]
