"""``vqkernels bench``: the CI smoke run (tiny grid) and the suite's agreement check.

Speed is never asserted here; these tests check that the suite runs, checks and reports.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqkernels import bench, cli


def test_bench_smoke_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = cli.main(["bench", "--device", "cpu", "--smoke", "--json", str(out_json), "--plot", str(out_png)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    doc = json.loads(out_json.read_text())
    assert doc["schema"] == "vqkernels.bench/1"
    for key in ("torch", "processor", "cpu_count", "vqkernels", "load_average"):
        assert key in doc["machine"]
    assert {row["op"] for row in doc["rows"]} == set(bench.OPS)
    for row in doc["rows"]:
        ran = [e for e in row["results"] if e["status"] == "ok"]
        ours = [e for e in ran if e["family"] == "vqkernels"]
        assert ours, f"no vqkernels contender ran on {row['label']}: {row['results']}"
        for e in ran:
            assert e["median_s"] > 0 and e["throughput"] > 0 and e["repeats"] >= 1
            assert "agrees" in e and "peak_mem_bytes" in e and e["mem_method"]
        for e in ours:
            assert e["agrees"], f"{e['contender']} disagrees on {row['label']}: {e['check_detail']}"
        for e in row["results"]:
            if e["family"] == "vqkernels":
                assert e["status"] != "error", f"{e['contender']} failed on {row['label']}: {e['reason']}"
        if any(e["family"] == "peer" and e.get("agrees") for e in ran):
            assert all(e["vs_best_peer"] > 0 for e in ran)
        for e in row["results"]:
            assert e["status"] in ("ok", "skipped", "error")
            if e["status"] != "ok":
                assert e["reason"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "== assign" in printed and "== Quantizer training step" in printed


def test_bench_ops_subset(tmp_path):
    out_json = tmp_path / "b.json"
    rc = cli.main(["bench", "--device", "cpu", "--smoke", "--ops", "histogram,ema_update", "--json", str(out_json)])
    assert rc == 0
    doc = json.loads(out_json.read_text())
    assert [row["op"] for row in doc["rows"]] == ["histogram", "ema"]


def test_bench_rejects_unknown_op():
    with pytest.raises(argparse.ArgumentTypeError, match="unknown op 'assgn'"):
        bench.parse_ops("assign,assgn")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_cuda_without_gpu_says_so(capsys):
    assert cli.main(["bench", "--device", "cuda", "--smoke"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_agreement_marks_a_wrong_pick_and_allows_ties():
    g = torch.Generator().manual_seed(0)
    x, codebook = torch.randn(200, 8, generator=g), torch.randn(50, 8, generator=g)
    codebook[7] = codebook[3]  # an exact tie: either index is a correct pick
    best = torch.cdist(x.double(), codebook.double()).argmin(1)
    tied = torch.where(best == 3, torch.full_like(best, 7), best)
    wrong = best.clone()
    wrong[5] = (best[5] + 1) % 50
    checks = bench.assignment_agreement(x, codebook, {"a": best, "tie": tied, "wrong": wrong})
    assert checks["a"].ok and checks["tie"].ok
    assert not checks["wrong"].ok and checks["wrong"].agree == pytest.approx(199 / 200)
    assert "[5]" in checks["wrong"].detail


def test_kmeans_check_uses_inertia():
    case = bench.Case("kmeans", 256, 8, 4, iters=2)
    inputs = bench.make_inputs(case, "cpu")
    good = inputs["init"]
    checks = bench.check_outputs(case, inputs, {"same": good, "also": good.clone(), "far": good * 10})
    assert checks["same"].ok and checks["also"].ok and not checks["far"].ok


def test_per_code_checks_name_the_first_disagreeing_codes():
    case = bench.Case("histogram", 512, 16, 1)
    inputs = bench.make_inputs(case, "cpu")
    good = torch.bincount(inputs["indices"], minlength=case.K)
    wrong = good.clone()
    wrong[11] += 1
    checks = bench.check_outputs(case, inputs, {"good": good, "wrong": wrong})
    assert checks["good"].ok and checks["good"].agree == 1.0 and checks["good"].detail == ""
    assert not checks["wrong"].ok and checks["wrong"].agree == pytest.approx(15 / 16)
    assert checks["wrong"].detail == "first disagreeing codes [11]"


def test_one_spec_adds_an_op_benchmark(tmp_path):
    """Registering one OpSpec is all an op's benchmark needs: grid, --ops, checks, table, JSON."""
    case = bench.Case("rowsum", 64, 1, 4)

    def check(case, inputs, outputs):
        truth = inputs["x"].double().sum(1)
        return {name: bench.Check(float((out.double() - truth).abs().le(1e-4).double().mean()),
                                  bool((out.double() - truth).abs().le(1e-4).all())) for name, out in outputs.items()}

    def peer(offset):
        return lambda case, inp, device, opts: bench.Prepared(lambda: inp["x"].sum(1) + offset)

    bench.register(bench.OpSpec(
        "rowsum", "row sums (test op)", "within 1e-4 of fp64", ("N", "D"),
        {g: [case] for g in ("smoke", "cpu-quick", "cpu-full", "cuda-quick", "cuda-full")},
        lambda case, g: {"x": torch.randn(case.N, case.D, generator=g)},
        [bench.Contender("torch.sum", "peer", peer(0.0)), bench.Contender("off-by-one", "peer", peer(1.0))],
        check, lambda case, e: (case.N * case.D, e * case.N * case.D), lambda case: case.N * case.D))
    try:
        out_json = tmp_path / "rowsum.json"
        assert cli.main(["bench", "--device", "cpu", "--smoke", "--ops", "rowsum", "--json", str(out_json)]) == 0
        (row,) = json.loads(out_json.read_text())["rows"]
        results = {e["contender"]: e for e in row["results"]}
        assert row["op"] == "rowsum" and row["label"] == "N=64 D=4"
        assert results["torch.sum"]["agrees"] and results["torch.sum"]["vs_best_peer"] == 1.0
        assert not results["off-by-one"]["agrees"] and results["off-by-one"]["agree"] == 0.0
    finally:
        bench.SPECS.pop("rowsum")


def test_a_failing_row_is_recorded_and_the_json_is_written_after_every_row(tmp_path):
    """A row that fails as a whole (here: its inputs) is an error row and the run goes on; the JSON
    is rewritten after every row, so a run killed by a time limit keeps the rows it finished."""
    out_json, seen = tmp_path / "rows.json", []

    def inputs(case, g):
        if case.N == 32:
            raise RuntimeError("no inputs for this row")
        return {"x": torch.randn(case.N, case.D, generator=g)}

    def build(case, inp, device, opts):
        seen.append(len(json.loads(out_json.read_text())["rows"]) if out_json.exists() else 0)  # rows written so far
        return bench.Prepared(lambda: inp["x"].sum(1))

    cases = [bench.Case("rowsum2", N, 1, 4) for N in (16, 32, 64)]
    bench.register(bench.OpSpec(
        "rowsum2", "row sums (test op)", "none", ("N", "D"),
        {g: cases for g in ("smoke", "cpu-quick", "cpu-full", "cuda-quick", "cuda-full")}, inputs,
        [bench.Contender("torch.sum", "peer", build)], lambda case, inp, outputs: {n: bench.Check(1.0, True) for n in outputs},
        lambda case, e: (0, 0), lambda case: 0))
    try:
        rc = cli.main(["bench", "--device", "cpu", "--smoke", "--ops", "rowsum2", "--json", str(out_json)])
        rows = json.loads(out_json.read_text())["rows"]
    finally:
        bench.SPECS.pop("rowsum2")
    assert rc == 1  # a failed row is a failure of the run
    assert [r["label"] for r in rows] == ["N=16 D=4", "N=32 D=4", "N=64 D=4"]
    (failed,) = rows[1]["results"]
    assert failed["status"] == "error" and "no inputs for this row" in failed["reason"]
    assert rows[0]["results"][0]["status"] == rows[2]["results"][0]["status"] == "ok"
    assert seen == [0, 2]


def test_pytest_benchmark_suite_runs_on_the_smoke_grid(tmp_path):
    """benchmarks/test_bench_suite.py (outside testpaths) collects and passes on the smoke grid."""
    pytest.importorskip("pytest_benchmark")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, VQKERNELS_BENCH_GRID="smoke", VQKERNELS_BENCH_DEVICE="cpu")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                           str(root / "benchmarks" / "test_bench_suite.py")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def test_residual_check_follows_each_contenders_own_residual():
    """Residual rows: a pick is judged against the nearest code to the residual the contender's own
    earlier picks leave, so a legal tie at stage 1 may change later stages; a wrong pick is caught."""
    case = bench.Case("residual_encode", 64, 16, 8, Q=3)
    inputs = bench.make_inputs(case, "cpu")
    z, codes, picks = inputs["x"].double(), inputs["codes"].double(), []
    for cq in codes:  # the greedy encoding, in fp64
        picks.append(torch.cdist(z, cq).argmin(1))
        z = z - cq[picks[-1]]
    good = torch.stack(picks, 1)
    wrong = good.clone()
    wrong[3, 2] = (good[3, 2] + 1) % case.K
    checks = bench.check_outputs(case, inputs, {"good": good, "wrong": wrong})
    assert checks["good"].ok and checks["good"].agree == 1.0
    assert not checks["wrong"].ok and checks["wrong"].agree == pytest.approx(63 / 64) and "[3]" in checks["wrong"].detail


def test_alternating_repeats_time_every_contender_each_round():
    opts = bench.Options(repeats=3, memory="off", alternate=True)
    row = bench.run_case(bench.Case("assign", 128, 32, 8), opts, only=["vqkernels[chunked]", "torch.cdist+argmin"])
    ran = {e["contender"]: e for e in row["results"]}
    assert set(ran) == {"vqkernels[chunked]", "torch.cdist+argmin"}
    for e in ran.values():
        assert e["status"] == "ok" and e["repeats"] == 3 and e["agrees"] and e["p20_s"] <= e["median_s"] <= e["p80_s"]
    assert bench.machine_info()["uptime"] and "load average" in bench.load_now()["uptime"]


def test_cpu_assign_is_a_view_of_the_harness(tmp_path, monkeypatch, capsys):
    """benchmarks/cpu_assign.py: its contenders on the given shapes, alternating rounds, the targets
    table, and uptime before and after in the JSON."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cpu_assign", Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_assign.py")
    cpu_assign = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_assign)
    monkeypatch.setattr(cpu_assign, "QUICK_SHAPES", [(256, 64, 8)])
    out_json = tmp_path / "cpu_assign.json"
    assert cpu_assign.main(["--quick", "--json", str(out_json)]) == 0
    doc = json.loads(out_json.read_text())
    (row,) = doc["rows"]
    assert row["label"] == "l2 N=256 K=64 D=8 fp32" and doc["settings"]["alternate"] and doc["settings"]["repeats"] == 3
    ran = {e["contender"]: e for e in row["results"] if e["status"] == "ok"}
    assert {"vqkernels[chunked]", "torch.cdist+argmin"} <= set(ran) <= set(cpu_assign.CONTENDERS)
    assert all(e["agrees"] and e["repeats"] == 3 for e in ran.values())
    assert doc["machine"]["uptime"] and doc["uptime_after"]
    assert "== targets" in capsys.readouterr().out or "faiss.IndexFlat" not in ran


def test_a_backend_without_the_op_is_skipped_with_the_reason(monkeypatch):
    from vqkernels.errors import BackendUnavailableError
    from vqkernels.ops.assign import chunked

    def missing(*args):
        raise BackendUnavailableError("the 'chunked' backend has no implementation of assign")

    monkeypatch.setattr(chunked, "assign", missing)
    row = bench.run_case(bench.Case("assign", 64, 16, 4), bench.Options(repeats=1, memory="off"),
                         only=["vqkernels[chunked]", "torch.cdist+argmin"])
    ran = {e["contender"]: e for e in row["results"]}
    assert ran["vqkernels[chunked]"]["status"] == "skipped" and "no implementation" in ran["vqkernels[chunked]"]["reason"]
    assert ran["torch.cdist+argmin"]["status"] == "ok" and ran["torch.cdist+argmin"]["agrees"]
