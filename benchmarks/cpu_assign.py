"""CPU assignment benchmark: the C++ ``cpu`` and chunked ``assign`` vs FAISS ``IndexFlatL2`` and cdist.

    python benchmarks/cpu_assign.py [--json benchmarks/results/cpu_assign.json] [--quick] [--threads 2]

A thin view over :mod:`vqkernels.bench` (contenders, agreement check, timer, machine): the
issue #14 shapes, all contenders in one run on the same inputs, threads equal (torch and
FAISS's OpenMP), FAISS timed with its index build, medians of alternating repeats (each
round times every contender once, so a drifting load hits all alike), ``uptime`` before
and after. Then the targets table (measured, never asserted) and the peak memory of
``assign`` at N = K = 65536, D = 32 in a fresh subprocess (an N x K fp32 matrix: 17 GB).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vqkernels import bench

# (N, K, D); the issue #14 targets: the cpu backend at most 1.0x FAISS's time at the first four
SHAPES = [(65536, 32768, 4), (65536, 1024, 8), (65536, 8192, 32), (16384, 16384, 64), (16384, 1024, 64)]
TARGETS = set(SHAPES[:4])
QUICK_SHAPES = [(4096, 1024, 64), (16384, 1024, 8)]
# This script's row keys, and the vqkernels.bench contender each one is.
CONTENDERS = {"vqkernels.cpu": "vqkernels[cpu]", "vqkernels.chunked": "vqkernels[chunked]",
              "torch.cdist+argmin": "torch.cdist+argmin", "faiss.IndexFlatL2": "faiss.IndexFlat"}


def bench_assign(shapes, repeats: int) -> tuple:
    """Check, then time (alternating), the contenders on each shape ``(N, K, D)``; rows and targets."""
    # cdist is skipped (with the reason) where its N x K matrix passes 4 GiB
    opts = bench.Options(repeats=repeats, max_dense_bytes=4 * 2**30, memory="off", alternate=True)
    rows, targets, table = [], [], bench.Table("cpu")
    for N, K, D in shapes:
        row = bench.run_case(bench.Case("assign", N, K, D), opts, only=list(CONTENDERS.values()))
        table.row(row)
        by_name = {e["contender"]: e for e in row["results"] if e["status"] == "ok"}  # FAISS may be missing
        results = {key: {"median": e["median_s"], "p20": e["p20_s"], "p80": e["p80_s"], "repeats": e["repeats"],
                         "rows_per_s": e["throughput"], "agree": e["agree"]}
                   for key, name in CONTENDERS.items() if (e := by_name.get(name))}
        out = {"N": N, "K": K, "D": D, "results": results,
               "skipped": {e["contender"]: e["reason"] for e in row["results"] if e["status"] != "ok"}}
        for ours in ("chunked", "cpu"):
            if "faiss.IndexFlatL2" in results and f"vqkernels.{ours}" in results:
                ratio = out[f"{ours}_over_faiss"] = (results[f"vqkernels.{ours}"]["median"]
                                                     / results["faiss.IndexFlatL2"]["median"])
                target = ours == "cpu" and (N, K, D) in TARGETS
                targets.append({"target": f"assign {ours} / faiss.IndexFlatL2, N={N} K={K} D={D}", "value": ratio,
                                "unit": "x time", "goal": "<= 1.0x FAISS" if target else "(reported only)",
                                "met": ratio <= 1.0 if target else None})
        rows.append(out)
    table.close_op()
    for line in bench.report.target_lines(targets):
        table.emit(line)
    return rows, targets


def assign_peak_memory(N=65536, K=65536, D=32, contender="vqkernels[cpu]") -> dict:
    """Peak memory of ``assign`` above the inputs, in a fresh interpreter."""
    m = bench.memory_in_subprocess(bench.Case("assign", N, K, D), contender, bench.Options())
    if m["peak_mem_bytes"] is None:
        raise RuntimeError(f"the memory probe failed: {m['mem_method']}")
    return {"N": N, "K": K, "D": D, "contender": contender, "extra_peak_rss_bytes": m["peak_mem_bytes"],
            "nxk_fp32_bytes": N * K * 4, "method": f"inputs created first; {m['mem_method']}"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="small shapes, fewer repeats (seconds)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch and FAISS threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # FAISS follows torch's count (the faiss contender sets it)
    machine = bench.machine_info()
    rows, targets = bench_assign(QUICK_SHAPES if args.quick else SHAPES, args.repeats or (3 if args.quick else 7))
    result = {"machine": machine, "assign": rows, "targets": targets}
    if not args.quick:
        m = result["memory"] = assign_peak_memory()
        print(f"peak extra memory of assign (cpu) at N=K={m['N']}, D={m['D']}: "
              f"{m['extra_peak_rss_bytes'] / 2**20:.0f} MiB (an N x K fp32 matrix: {m['nxk_fp32_bytes'] / 2**30:.0f} GiB)")
    result["load_after"] = bench.load_now()
    print(f"load before: {machine['uptime']}\nload after:  {result['load_after']['uptime']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
