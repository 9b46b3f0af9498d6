"""benchmarks/gpu_bench.py on the CPU: argument parsing, the row plan and the JSON it writes.

The GPU run itself happens only on a lent GPU machine (benchmarks/gpu_check.sh); these
tests make sure that the script's plumbing works before such a machine is spent on it.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_bench.py")
CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_are_the_issue_grid(bench):
    args = bench.parse_args([])
    assert args.n == 1 << 20
    assert args.ks == [1024, 16384, 65536] and args.ds == [8, 32, 256]
    assert args.dtypes == ["bf16", "fp32"] and args.device == "cuda"
    assert set(args.ops) == {"assign", "histogram", "cluster_stats", "ema_update"}
    assert "triton" in args.backends and "cdist" in args.baselines and "flash_kmeans" in args.baselines


@pytest.mark.parametrize(
    "argv",
    [["--dtypes", "fp8"], ["--ks", "0"], ["--ks", "a,b"], ["--backends", "magic"], ["--n", "0"], ["--device", "tpu"]],
)
def test_bad_arguments_exit_with_usage_error(bench, argv, capsys):
    with pytest.raises(SystemExit) as info:
        bench.parse_args(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_plan_covers_every_op_and_provider(bench):
    args = bench.parse_args(["--ks", "16,32", "--ds", "4", "--dtypes", "bf16,fp32", "--backends", "triton,chunked"])
    cases = bench.plan(args)
    assign = [c for c in cases if c.op == "assign"]
    assert len(assign) == 2 * 2 * 1  # dtypes x K x D, every provider on each row
    assert set(bench.contenders(args)) == {"vqkernels[triton]", "vqkernels[chunked]", "torch.cdist+argmin",
                                           "flash_kmeans.assign"}
    assert [(c.dtype, c.K) for c in assign] == [("bf16", 16), ("bf16", 32), ("fp32", 16), ("fp32", 32)]  # small K first
    others = [c for c in cases if c.op != "assign"]
    assert cases.index(assign[0]) == len(others)  # the cheap ops run first
    assert [c.op for c in others] == ["histogram"] * 2 + ["stats"] * 4 + ["ema"] * 2
    assert {c.variant for c in others if c.op == "stats"} == {"atomic", "deterministic"}


def test_dry_run_writes_plan_and_environment(bench, tmp_path):
    rc = bench.main(["--dry-run", "--device", "cpu", "--out", str(tmp_path), "--ks", "16", "--ds", "4"])
    assert rc == 0
    payload = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert payload["schema"] == "vqkernels.bench/1" and payload["dry_run"] is True
    assert payload["machine"]["torch"] == torch.__version__ and "platform" in payload["machine"]
    assert payload["config"]["ks"] == [16]
    assert payload["rows"] and all(r["status"] == "planned" and r["contenders"] for r in payload["rows"])


def test_cpu_run_times_chunked_and_writes_figures(bench, tmp_path, capsys):
    """The successor of gpu_bench's schema-1 rows: the `vqkernels bench` document (one row per
    shape, one result per provider) with gpu_bench's config and ceilings."""
    before = torch.get_float32_matmul_precision()
    argv = [
        "--device", "cpu", "--out", str(tmp_path), "--n", "300", "--ks", "16,40", "--ds", "4", "--dtypes", "fp32",
        "--backends", "chunked", "--baselines", "cdist,flash_kmeans", "--min-reps", "2", "--max-reps", "3",
        "--target-s", "0.01", "--time-budget", "60",
    ]
    rc = bench.main(argv)
    assert torch.get_float32_matmul_precision() == before  # the run restores the global setting
    assert rc == 0
    payload = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert payload["schema"] == "vqkernels.bench/1" and payload["settings"]["kernel_level"] is True
    assert payload["settings"]["float32_matmul_precision"] == "medium" and payload["config"]["n"] == 300
    rows = payload["rows"]
    assert {r["op"] for r in rows} == {"assign", "histogram", "stats", "ema"}
    for row in rows:
        assert row["work"]["bytes"] > 0
        ok = [e for e in row["results"] if e["status"] == "ok"]
        assert ok and {e["contender"] for e in row["results"]} <= set(bench.contenders(bench.parse_args(argv)))
        for e in ok:
            assert e["median_s"] > 0 and e["p20_s"] <= e["median_s"] <= e["p80_s"] and e["repeats"] >= 1
    assign = [r for r in rows if r["op"] == "assign"]
    assert [r["K"] for r in assign] == [16, 40]
    for r in assign:
        assert r["work"]["flops"] == 2 * 300 * r["K"] * 4
        results = {e["contender"]: e for e in r["results"]}
        assert results["vqkernels[chunked]"]["status"] == "ok" and results["vqkernels[chunked]"]["agrees"]
        assert results["torch.cdist+argmin"]["agrees"] and results["torch.cdist+argmin"]["agree"] > 0.99
        fk = results["flash_kmeans.assign"]
        assert fk["status"] in ("ok", "skipped", "error") and (fk["status"] == "ok" or fk["reason"])
    assert payload["ceilings"]["fp32_precision"] == "medium" and payload["elapsed_s"] >= 0
    printed = capsys.readouterr().out
    assert "== assign" in printed and "vqkernels[chunked]" in printed


def test_time_budget_skips_rows_and_says_so(bench, tmp_path):
    rc = bench.main(["--device", "cpu", "--out", str(tmp_path), "--n", "64", "--ks", "8", "--ds", "4",
                     "--dtypes", "fp32", "--backends", "chunked", "--baselines", "cdist", "--time-budget", "0"])
    assert rc == 0
    rows = json.loads((tmp_path / "gpu_bench.json").read_text())["rows"]
    results = [e for r in rows for e in r["results"]]
    assert rows and results and all(e["status"] == "skipped" and "time budget" in e["reason"] for e in results)


def test_cli_entry_point_runs_as_a_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--dry-run", "--device", "cpu", "--out", str(tmp_path), "--ks", "8", "--ds", "4"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "gpu_bench.json").read_text())["dry_run"] is True


def test_gpu_check_script_is_valid_bash():
    if not os.access(CHECK, os.X_OK):
        pytest.fail("benchmarks/gpu_check.sh must be executable")
    proc = subprocess.run(["bash", "-n", CHECK], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
