"""CPU assignment benchmark: chunked ``assign`` vs ``torch.cdist(x, c).argmin(1)`` vs FAISS.

    python benchmarks/cpu_assign.py [--json benchmarks/results/cpu_assign.json] [--quick]

Each row: median seconds over repeats (after one warm-up), rows per second, and the
ratio of chunked's time to FAISS ``IndexFlatL2(D).search(x, 1)``'s, all in one run on the
same inputs. The contenders and the agreement check are ``vqkernels bench``'s
(vqkernels/bench.py); ``vqkernels bench --ops assign`` runs the wider comparison. Then the peak memory of ``assign`` at N = K = 65536, D = 32, measured as the
peak resident memory of a fresh subprocess above its baseline after the inputs exist
(an N x K fp32 matrix would be 17 GB).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from vqkernels import bench
from vqkernels.benchmarking import machine_info, time_call

SHAPES = [(16384, 1024, 64), (16384, 16384, 64), (65536, 8192, 32), (65536, 1024, 8)]
QUICK_SHAPES = [(4096, 1024, 64), (16384, 1024, 8)]


# This script's row keys, and the vqkernels.bench contender each one is.
CONTENDERS = {
    "vqkernels.chunked": "vqkernels[chunked]",
    "torch.cdist+argmin": "torch.cdist+argmin",
    "faiss.IndexFlatL2": "faiss.IndexFlat",
}


def bench_assign(shapes, repeats: int) -> list:
    """Time the contenders of ``vqkernels bench`` (vqkernels/bench.py) on each shape, and check them."""
    by_name = {c.name: c for c in bench.contenders("assign")}
    opts = bench.Options(max_dense_bytes=float("inf"))  # this script always ran cdist at full size
    rows = []
    for N, K, D in shapes:
        case = bench.Case("assign", N, K, D)
        inputs = bench.make_inputs(case, "cpu", seed=0)
        x, c = inputs["x"], inputs["codebook"]
        row = {"N": N, "K": K, "D": D, "results": {}}
        picks = {}
        for key, name in CONTENDERS.items():
            try:
                prepared = by_name[name].prepare(case, inputs, "cpu", opts)
            except bench.Skip:  # e.g. FAISS not installed
                continue
            picks[key] = prepared.fn()
            t = time_call(prepared.fn, repeats=repeats, warmup=1)
            row["results"][key] = {**t, "rows_per_s": N / t["median"]}
        # agreement: each pick's exact distance against the best pick of any contender (ties allowed)
        for key, check in bench.assignment_agreement(x, c, picks).items():
            row["results"][key]["agree"] = check.agree
        if "faiss.IndexFlatL2" in row["results"]:
            row["chunked_over_faiss"] = row["results"]["vqkernels.chunked"]["median"] / row["results"]["faiss.IndexFlatL2"]["median"]
        rows.append(row)
        print(_format_row(row), flush=True)
    return rows


def _agreement(x, c, indices, reference) -> float:
    """Fraction of rows whose pick is as near as the reference pick (ties and fp rounding allowed)."""
    checks = bench.assignment_agreement(x, c, {"pick": indices, "reference": reference.indices})
    return checks["pick"].agree


def _format_row(row) -> str:
    parts = [f"N={row['N']:>6} K={row['K']:>6} D={row['D']:>3}"]
    for name, r in row["results"].items():
        parts.append(f"{name} {r['median'] * 1e3:9.1f} ms (agree {r['agree']:.4f})")
    if "chunked_over_faiss" in row:
        parts.append(f"chunked/faiss {row['chunked_over_faiss']:.2f}x")
    return " | ".join(parts)


_MEMORY_PROBE = """
import sys, torch, vqkernels
from vqkernels.benchmarking import measure_peak_rss
N, K, D = map(int, sys.argv[1:4])
x, c = torch.randn(N, D), torch.randn(K, D)
vqkernels.assign(x[:64], c)  # load code paths before the baseline
_, extra, method = measure_peak_rss(lambda: vqkernels.assign(x, c, backend="chunked"))
print(method)
print(extra)
"""


def assign_peak_memory(N=65536, K=65536, D=32) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(N), str(K), str(D)],
                         capture_output=True, text=True, check=True).stdout.strip()
    method, extra = out.splitlines()[-2:]
    return {"N": N, "K": K, "D": D, "extra_peak_rss_bytes": int(extra), "nxk_fp32_bytes": N * K * 4,
            "method": f"fresh subprocess, inputs created first; {method}"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="small shapes, fewer repeats (seconds)")
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = args.repeats or (3 if args.quick else 5)
    result = {"machine": machine_info(), "assign": bench_assign(shapes, repeats)}
    if not args.quick:
        result["memory"] = assign_peak_memory()
        m = result["memory"]
        print(f"peak extra memory of assign at N=K={m['N']}, D={m['D']}: {m['extra_peak_rss_bytes'] / 2**20:.0f} MiB "
              f"(an N x K fp32 matrix: {m['nxk_fp32_bytes'] / 2**30:.0f} GiB)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
