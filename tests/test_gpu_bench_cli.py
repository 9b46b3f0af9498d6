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
    rows = bench.plan_rows(args)
    assign = [r for r in rows if r["op"] == "assign"]
    assert len(assign) == 2 * 2 * 1 * (2 + 2)  # dtypes x K x D x (backends + baselines)
    assert {r["provider"] for r in assign} == {"triton", "chunked", "cdist", "flash_kmeans"}
    assert [r["K"] for r in assign[:4]] == [16] * 4  # small K first within a (dtype, D)
    others = [r for r in rows if r["op"] != "assign"]
    assert rows.index(assign[0]) == len(others)  # the cheap ops run first
    assert {r["variant"] for r in others if r["op"] == "cluster_stats"} == {"atomic", "deterministic"}
    assert all(r["status"] == "planned" for r in rows)


def test_dry_run_writes_plan_and_environment(bench, tmp_path):
    rc = bench.main(["--dry-run", "--device", "cpu", "--out", str(tmp_path), "--ks", "16", "--ds", "4"])
    assert rc == 0
    payload = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert payload["dry_run"] is True
    assert payload["versions"]["torch"] == torch.__version__
    assert "platform" in payload["machine"] and payload["config"]["ks"] == [16]
    assert all(r["status"] == "planned" for r in payload["rows"])
    assert (tmp_path / "gpu_bench.log").exists()


def test_cpu_run_times_chunked_and_writes_figures(bench, tmp_path):
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
    rows = payload["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["op"] for r in ok} == {"assign", "histogram", "cluster_stats", "ema_update"}
    for r in ok:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["reps"] >= 1
        assert r["bytes_min"] > 0 and r["x_floor"] > 0
    chunked = [r for r in ok if r["op"] == "assign" and r["provider"] == "chunked"]
    assert len(chunked) == 2
    for r in chunked:
        assert r["flops"] == 2 * 300 * r["K"] * 4
        assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
        assert r["floor_ms"] > 0
    cdist = [r for r in ok if r["provider"] == "cdist"]
    assert cdist and all(r["agree_with"] == "chunked" and r["agree_frac"] > 0.99 for r in cdist)
    fk = [r for r in rows if r["provider"] == "flash_kmeans"]
    assert fk and all(r["status"] in ("ok", "skipped", "error") and (r["status"] == "ok" or r["note"]) for r in fk)
    assert payload["ceilings"]["fp32_precision"] == "medium" and payload["elapsed_s"] >= 0
    log = (tmp_path / "gpu_bench.log").read_text()
    assert "summary" in log and "chunked" in log


def test_time_budget_skips_rows_and_says_so(bench, tmp_path):
    rc = bench.main(["--device", "cpu", "--out", str(tmp_path), "--n", "64", "--ks", "8", "--ds", "4",
                     "--dtypes", "fp32", "--backends", "chunked", "--baselines", "cdist", "--time-budget", "0"])
    assert rc == 0
    rows = json.loads((tmp_path / "gpu_bench.json").read_text())["rows"]
    assert rows and all(r["status"] == "skipped" and "time budget" in r["note"] for r in rows)


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
