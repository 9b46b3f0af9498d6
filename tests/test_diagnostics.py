"""Diagnostics: usage, stream monitor, shrinkage, coverage, collapse, report, plot."""
import math
import sys

import pytest
import torch

from vqkernels import diagnostics as dg
from vqkernels.quantizer import Quantizer


def test_usage_known_values():
    u = dg.usage(torch.tensor([0, 0, 1, 1, -1]), codebook_size=4)
    assert u.total == 4 and u.used_codes == 2 and u.dead_codes == 2
    assert u.utilisation == 0.5
    assert math.isclose(u.entropy, math.log(2), rel_tol=1e-12)
    assert math.isclose(u.perplexity, 2.0, rel_tol=1e-12)
    assert math.isclose(u.normalised_perplexity, 0.5, rel_tol=1e-12)
    uniform = dg.usage_from_counts(torch.full((8,), 5))
    assert math.isclose(uniform.perplexity, 8.0, rel_tol=1e-12) and uniform.utilisation == 1.0
    empty = dg.usage_from_counts(torch.zeros(8, dtype=torch.int64))
    assert empty.used_codes == 0 and empty.perplexity == 0.0


def test_entropy_and_perplexity_one_formula():
    h = dg.entropy(torch.tensor([1, 1, 0, 2]))  # p = (1/4, 1/4, 0, 1/2)
    assert h.dtype == torch.float64 and math.isclose(float(h), 1.5 * math.log(2), rel_tol=1e-12)
    rows = torch.tensor([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.3, 0.1, 0.0, 0.0]])
    ppl = dg.perplexity(rows)  # one value per row of [C, K]: uniform, empty, one code, weights summing to < 1
    two = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert ppl.shape == (4,) and torch.allclose(ppl, torch.tensor([4.0, 1.0, 1.0, two], dtype=torch.float64))
    assert torch.allclose(dg.entropy(rows.t(), dim=0), dg.entropy(rows))
    # the same formula behind usage and the effective rank
    assert math.isclose(dg.usage_from_counts(torch.tensor([1, 1, 0, 2])).entropy, float(h), rel_tol=1e-15)


def test_monitor_measures_the_stream_not_the_batch():
    K = 64
    monitor = dg.CodebookMonitor(K)
    for b in range(8):  # each batch uses only its own 8 codes, uniformly
        monitor.update(torch.arange(8).repeat(4) + 8 * b)
    u = monitor.usage()
    assert u.used_codes == 64 and math.isclose(u.perplexity, 64.0, rel_tol=1e-9)
    assert math.isclose(monitor.mean_batch_perplexity(), 8.0, rel_tol=1e-9)
    s = monitor.summary()
    assert s["batches"] == 8 and s["utilisation"] == 1.0
    monitor.reset()
    assert monitor.usage().total == 0 and monitor.batches == 0


def test_monitor_attaches_to_a_quantizer():
    torch.manual_seed(0)
    vq = Quantizer(4, 16)
    monitor = dg.CodebookMonitor(16)
    handle = monitor.attach(vq)
    counts = torch.zeros(16, dtype=torch.int64)
    for _ in range(3):
        _, idx, _ = vq(torch.randn(50, 4))
        counts += torch.bincount(idx, minlength=16)
    vq.eval()
    vq(torch.randn(50, 4))  # eval calls are not recorded (training_only=True)
    handle.remove()
    assert torch.equal(monitor.counts, counts) and monitor.batches == 3


def test_variance_ratio_and_total_variance():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(1000, 5, generator=g)
    assert math.isclose(dg.total_variance(e), float(e.var(0, unbiased=False).sum()), rel_tol=1e-6)
    assert math.isclose(dg.variance_ratio(0.5 * e[:100] + 3.0, e[:100]), 0.25, rel_tol=1e-6)


def test_coverage_both_directions():
    e = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    c = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    cov = dg.coverage(e, c)
    assert math.isclose(cov.embedding_to_code, 1.0, rel_tol=1e-6)  # distances 0 and 2
    assert math.isclose(cov.code_to_embedding, 4.0, rel_tol=1e-6)  # distances 0 and 8
    cos = dg.coverage(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), metric="cosine")
    assert math.isclose(cos.embedding_to_code, 0.5, abs_tol=1e-6) and math.isclose(cos.code_to_embedding, 0.0, abs_tol=1e-6)


def test_effective_rank():
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(20000, 6, generator=g)
    assert 5.8 < dg.effective_rank(iso) <= 6.0
    line = torch.randn(500, 1, generator=g) * torch.tensor([[1.0, 2.0, -1.0, 0.5]]) + 7.0
    assert math.isclose(dg.effective_rank(line), 1.0, abs_tol=1e-4)


def test_class_coverage():
    indices = torch.tensor([0, 0, 1, 1, 1, 2, -1])
    labels = torch.tensor([5, 5, 5, 7, 7, 7, 9])  # class 9 only has a masked row
    cc = dg.class_coverage(indices, labels, codebook_size=4)
    assert cc["classes"] == 3 and cc["classes_covered"] == 2
    per = {p["label"]: p for p in cc["per_class"]}
    assert per[5]["codes_used"] == 2 and per[5]["codes_owned"] == 1
    assert per[7]["codes_used"] == 2 and per[7]["codes_owned"] == 2
    assert per[9]["rows"] == 0 and per[9]["codes_owned"] == 0


def test_report_dict_and_table(capsys):
    torch.manual_seed(0)
    vq = Quantizer(4, 16, codebook_dim=3, init="kmeans")
    x = torch.randn(200, 4)
    vq(x)
    labels = torch.arange(200) % 4
    r = dg.report(x, vq, labels=labels, extra={"recon_mse": 0.5}, title="vq")
    printed = capsys.readouterr().out
    for key in ("utilisation", "perplexity", "normalised_perplexity", "dead_codes", "entropy", "variance_ratio",
                "embedding_to_code", "code_to_embedding", "effective_rank_embeddings", "effective_rank_codebook",
                "classes_covered", "per_class", "recon_mse"):
        assert key in r, key
    assert "utilisation" in printed and "variance ratio" in printed and "vq" in printed
    # with a Quantizer, the embeddings are taken into its codebook space
    z = vq.to_codebook_space(x).detach()
    assert math.isclose(r["variance_ratio"], dg.variance_ratio(vq.codebook.detach(), z), rel_tol=1e-6)
    assert r["effective_rank_codebook"] <= 3.0 + 1e-6
    table = dg.format_table({"a": r, "b": r})
    assert table.splitlines()[0].split()[-2:] == ["a", "b"]


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    g = torch.Generator().manual_seed(0)
    e = torch.randn(300, 5, generator=g)
    path = dg.plot(e, e[:20], str(tmp_path / "diag.png"), labels=torch.arange(300) % 3)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"vqkernels\[plot\]"):
        dg.plot(torch.randn(10, 2), torch.randn(3, 2), str(tmp_path / "x.png"))


# ---------------------------------------------------------------------------- per stage / per head
from vqkernels.residual import GroupedResidualQuantizer, ResidualQuantizer  # noqa: E402


def rows_of_table(text, first):
    return [line for line in text.splitlines() if line.startswith(first)]


def _trained(module, x, steps=3):
    for _ in range(steps):
        module(x)
    return module.eval()


def test_residual_report_per_stage_matches_a_stage_by_stage_computation():
    torch.manual_seed(0)
    x = torch.randn(300, 6)
    rq = _trained(ResidualQuantizer(6, 3, 8, init="kmeans"), x)
    _, idx, _ = rq(x)  # [N, Q]
    r = dg.report(x, rq, print_table=False)
    assert list(r["units"]) == ["stage 0", "stage 1", "stage 2"]
    codes = rq.codebook_state.codes().detach()
    residual = x.clone()
    for q in range(3):  # what stage q quantizes: the residual the earlier stages left
        unit = r["units"][f"stage {q}"]
        expected = dg.usage(idx[:, q], 8)
        assert (unit["used_codes"], unit["dead_codes"]) == (expected.used_codes, expected.dead_codes)
        assert math.isclose(unit["perplexity"], expected.perplexity, rel_tol=1e-9)
        assert math.isclose(unit["variance_ratio"], dg.variance_ratio(codes[q], residual), rel_tol=1e-5)
        residual = residual - codes[q][idx[:, q]]
    # overall: codes used over all Q * K codes; entropy the mean of the stages'
    assert r["used_codes"] == sum(r["units"][f"stage {q}"]["used_codes"] for q in range(3))
    assert r["codebook_size"] == 24 and math.isclose(r["utilisation"], r["used_codes"] / 24)
    mean_h = sum(r["units"][f"stage {q}"]["entropy"] for q in range(3)) / 3
    assert math.isclose(r["entropy"], mean_h, rel_tol=1e-12) and math.isclose(r["perplexity"], math.exp(mean_h), rel_tol=1e-12)
    pooled = sum(dg.total_variance(codes[q]) for q in range(3)) / sum(
        dg.total_variance(dg.unit_inputs(rq, x)[0][q]) for q in range(3))
    assert math.isclose(r["variance_ratio"], pooled, rel_tol=1e-9)


def test_grouped_report_labels_and_index_layout(capsys):
    torch.manual_seed(1)
    x = torch.randn(200, 8)
    grq = _trained(GroupedResidualQuantizer(8, 2, 2, 8, codebook_dim=3, init="kmeans"), x)
    _, idx, _ = grq(x)  # [G, N, Q]
    r = dg.report(x, grq, indices=idx, labels=torch.arange(200) % 3, title="grq")
    out = capsys.readouterr().out
    assert list(r["units"]) == ["group 0 stage 0", "group 0 stage 1", "group 1 stage 0", "group 1 stage 1"]
    for g in range(2):
        for q in range(2):
            assert r["units"][f"group {g} stage {q}"]["used_codes"] == dg.usage(idx[g, :, q], 8).used_codes
    assert "group 1 stage 1" in out and "overall" in out and "classes" in out
    assert rows_of_table(out, "grq")[0].split()[:4] == ["grq", "group", "0", "stage"]
    untitled = dg.format_unit_table({"": r}).splitlines()
    assert untitled[0].split()[:2] == ["unit", "util"] and untitled[2].startswith("group 0 stage 0")
    # without indices: the nearest codes stage by stage are the module's own
    inputs, nearest = dg.unit_inputs(grq, x)
    assert torch.equal(nearest, idx.permute(0, 2, 1).reshape(4, -1))
    with pytest.raises(ValueError, match=r"expected \[groups=2, \.\.\., num_quantizers=2\]"):
        dg.report(x, grq, indices=idx[0], print_table=False)


@pytest.mark.parametrize("separate", [True, False])
def test_heads_report_per_head(separate):
    torch.manual_seed(2)
    x = torch.randn(256, 8)
    vq = _trained(Quantizer(8, 16, heads=2, separate_codebook_per_head=separate, init="kmeans"), x)
    _, idx, _ = vq(x)  # [N, H]
    r = dg.report(x, vq, indices=idx, print_table=False)
    assert list(r["units"]) == ["head 0", "head 1"]
    for h in range(2):
        assert r["units"][f"head {h}"]["used_codes"] == dg.usage(idx[:, h], 16).used_codes
    if separate:  # two codebooks: used codes add up
        assert r["codebook_size"] == 32 and r["used_codes"] == sum(r["units"][f"head {h}"]["used_codes"] for h in range(2))
    else:  # one codebook both heads use: a code is used when either head uses it
        assert r["codebook_size"] == 16 and r["used_codes"] == dg.usage(idx, 16).used_codes


def test_monitor_per_stage_and_overall():
    torch.manual_seed(3)
    x = torch.randn(128, 4)
    rq = ResidualQuantizer(4, 2, 8, init="kmeans")
    monitor = dg.CodebookMonitor(rq)
    handle = monitor.attach(rq)
    counts = torch.zeros(2, 8, dtype=torch.int64)
    for _ in range(3):
        _, idx, _ = rq(x)
        counts += torch.stack([torch.bincount(idx[:, q], minlength=8) for q in range(2)])
    handle.remove()
    assert monitor.counts.shape == (2, 8) and torch.equal(monitor.counts, counts)
    per = monitor.unit_usage()
    assert [per[f"stage {q}"].used_codes for q in range(2)] == [int((counts[q] > 0).sum()) for q in range(2)]
    assert monitor.usage().used_codes == int((counts > 0).sum()) and monitor.usage().codebook_size == 16
    s = monitor.summary()
    assert set(s["units"]) == {"stage 0", "stage 1"} and s["batches"] == 3
    rq.eval()
    r = dg.report(x, rq, monitor=monitor, print_table=False)
    assert r["units"]["stage 1"]["total"] == 3 * 128 and "mean_batch_perplexity" in r["units"]["stage 0"]
    with pytest.raises(ValueError, match="expected one made for this module"):
        dg.report(x, rq, monitor=dg.CodebookMonitor(8), print_table=False)


def test_codebook_health_from_state():
    vq = Quantizer(2, 4)
    with torch.no_grad():
        vq.codebook_state.load_codes_(torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 3.0]]]),
                                      torch.tensor([[5.0, 0.5, 2.0, 0.0]]))
    h = dg.codebook_health(vq, dead_threshold=1.0)["codebook"]
    assert h["duplicate_codes"] == 1 and h["ema_used_codes"] == 2 and h["ema_dead_codes"] == 2
    assert math.isclose(h["ema_perplexity"], float(dg.perplexity(torch.tensor([5.0, 0.5, 2.0, 0.0]))))
    assert "ema_used_codes" not in dg.codebook_health(vq, statistics=False)["codebook"]
    shared = dg.codebook_health(ResidualQuantizer(4, 3, 8, shared_codebook=True))
    assert list(shared) == ["codebook (stages share it)"]
    assert "EMA dead" in dg.format_health_table(dg.codebook_health(ResidualQuantizer(4, 2, 8)))
    with pytest.raises(ValueError, match="dead_threshold"):
        dg.codebook_health(vq, dead_threshold=-1)


def test_plot_draws_one_usage_panel_per_stage(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    torch.manual_seed(4)
    x = torch.randn(200, 4)
    rq = _trained(ResidualQuantizer(4, 3, 8, init="kmeans"), x)
    titles = []
    real = dg._draw
    monkeypatch.setattr(dg, "_draw", lambda *a: (titles.append(a[6]), real(*a)))
    path = dg.plot(x, rq, str(tmp_path / "rq.png"), title="rq")
    assert titles == ["rq, stage 0", "rq, stage 1", "rq, stage 2"]
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_per_stage_codebook_sizes_count_only_each_stages_codes():
    torch.manual_seed(5)
    x = torch.randn(300, 6)
    rq = _trained(ResidualQuantizer(6, 3, (4, 8, 16), init="kmeans"), x)
    _, idx, _ = rq(x)
    r = dg.report(x, rq, indices=idx, print_table=False)
    assert [r["units"][f"stage {q}"]["codebook_size"] for q in range(3)] == [4, 8, 16]
    assert r["codebook_size"] == 28 and r["dead_codes"] == 28 - r["used_codes"]
    # the padding of the narrower stages (zero codes) is neither a code nor dead
    assert r["units"]["stage 0"]["dead_codes"] == dg.usage(idx[:, 0], 4).dead_codes
    h = math.exp(sum(math.log(r["units"][f"stage {q}"]["normalised_perplexity"]) for q in range(3)) / 3)
    assert math.isclose(r["normalised_perplexity"], h, rel_tol=1e-9)
    monitor = dg.CodebookMonitor(rq)
    monitor.update(idx)
    assert monitor.usage().codebook_size == 28 and monitor.unit_usage()["stage 1"].codebook_size == 8
    health = dg.codebook_health(rq)
    assert [health[f"stage {q}"]["codebook_size"] for q in range(3)] == [4, 8, 16]
    assert health["stage 0"]["duplicate_codes"] == 0


@pytest.mark.parametrize("make", [
    lambda: ResidualQuantizer(6, 3, 8, metric="cosine", init="kmeans"),
    lambda: GroupedResidualQuantizer(6, 2, 2, 8, codebook_dim=4, init="kmeans"),
    lambda: Quantizer(6, 8, heads=3, separate_codebook_per_head=True, metric="cosine", init="kmeans"),
    lambda: Quantizer(6, 8, heads=2, codebook_dim=4, init="kmeans"),
], ids=["residual cosine", "grouped projected", "heads cosine", "shared heads projected"])
def test_unit_inputs_reproduce_the_modules_own_codes(make):
    """What each unit quantizes, recomputed from the module's inputs, picks the module's own codes."""
    torch.manual_seed(6)
    x = torch.randn(200, 6)
    module = _trained(make(), x)
    _, idx, _ = module(x)
    units = dg.units_of(module)
    inputs, nearest = dg.unit_inputs(module, x)
    assert torch.equal(nearest, dg.unit_indices(units, idx))
    if module.metric == "cosine":
        assert torch.allclose(inputs.norm(dim=-1), torch.ones(()), atol=1e-5)
