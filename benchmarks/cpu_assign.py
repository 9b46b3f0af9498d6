"""CPU assignment benchmark: chunked ``assign`` vs ``torch.cdist(x, c).argmin(1)`` vs FAISS.

    python benchmarks/cpu_assign.py [--json benchmarks/results/cpu_assign.json] [--quick]

Each row: median seconds over repeats (after one warm-up), rows per second, and the
ratio of chunked's time to FAISS ``IndexFlatL2(D).search(x, 1)``'s, all in one run on the
same inputs. A thin caller of :mod:`vqkernels.bench` (its contenders, agreement check,
timer and machine description); ``vqkernels bench --ops assign`` runs the wider
comparison. Then the peak memory of ``assign`` at N = K = 65536, D = 32, measured as the
peak resident memory of a fresh subprocess above its baseline after the inputs exist
(an N x K fp32 matrix would be 17 GB).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from vqkernels import bench

SHAPES = [(16384, 1024, 64), (16384, 16384, 64), (65536, 8192, 32), (65536, 1024, 8)]
QUICK_SHAPES = [(4096, 1024, 64), (16384, 1024, 8)]
# This script's row keys, and the vqkernels.bench contender each one is.
CONTENDERS = {"vqkernels.chunked": "vqkernels[chunked]", "torch.cdist+argmin": "torch.cdist+argmin",
              "faiss.IndexFlatL2": "faiss.IndexFlat"}


def bench_assign(shapes, repeats: int) -> list:
    """Check, then time, the three contenders on each shape ``(N, K, D)``."""
    # this script always ran cdist at full size; memory is measured separately below
    opts = bench.Options(repeats=repeats, max_dense_bytes=float("inf"), memory="off")
    rows, table = [], bench.Table("cpu")
    for N, K, D in shapes:
        row = bench.run_case(bench.Case("assign", N, K, D), opts, only=list(CONTENDERS.values()))
        table.row(row)
        by_name = {e["contender"]: e for e in row["results"] if e["status"] == "ok"}  # FAISS may be missing
        results = {key: {"median": e["median_s"], "p20": e["p20_s"], "p80": e["p80_s"], "repeats": e["repeats"],
                         "rows_per_s": e["throughput"], "agree": e["agree"]}
                   for key, name in CONTENDERS.items() if (e := by_name.get(name))}
        out = {"N": N, "K": K, "D": D, "results": results}
        if "faiss.IndexFlatL2" in results and "vqkernels.chunked" in results:
            out["chunked_over_faiss"] = results["vqkernels.chunked"]["median"] / results["faiss.IndexFlatL2"]["median"]
        rows.append(out)
    table.close_op()
    return rows


def assign_peak_memory(N=65536, K=65536, D=32) -> dict:
    """Peak memory of chunked ``assign`` above the inputs, in a fresh interpreter."""
    m = bench.memory_in_subprocess(bench.Case("assign", N, K, D), CONTENDERS["vqkernels.chunked"], bench.Options())
    if m["peak_mem_bytes"] is None:
        raise RuntimeError(f"the memory probe failed: {m['mem_method']}")
    return {"N": N, "K": K, "D": D, "extra_peak_rss_bytes": m["peak_mem_bytes"], "nxk_fp32_bytes": N * K * 4,
            "method": f"inputs created first; {m['mem_method']}"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="small shapes, fewer repeats (seconds)")
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    result = {"machine": bench.machine_info(), "assign": bench_assign(QUICK_SHAPES if args.quick else SHAPES, repeats)}
    if not args.quick:
        m = result["memory"] = assign_peak_memory()
        print(f"peak extra memory of assign at N=K={m['N']}, D={m['D']}: {m['extra_peak_rss_bytes'] / 2**20:.0f} MiB "
              f"(an N x K fp32 matrix: {m['nxk_fp32_bytes'] / 2**30:.0f} GiB)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
