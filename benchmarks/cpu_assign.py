"""CPU assignment benchmark: the C++ ``cpu`` and chunked ``assign`` vs FAISS ``IndexFlatL2`` and cdist.

    python benchmarks/cpu_assign.py [--json benchmarks/results/cpu_assign.json] [--quick] [--threads 2]

A view of ``vqkernels bench`` (same table, targets and JSON schema ``vqkernels.bench/1``, plus
``memory``) on issue #14's shapes: all contenders in one run on the same inputs, threads equal
(torch's and FAISS's OpenMP), FAISS timed with its index build, medians of alternating rounds
(every contender once per round, so a drifting load hits all alike), ``uptime`` before and
after; cdist is skipped where its N x K matrix passes 4 GiB. Then the peak memory of the cpu
``assign`` at N = K = 65536, D = 32 in a fresh subprocess (an N x K fp32 matrix: 17 GB).
"""
from __future__ import annotations

import argparse
import sys

import torch

from vqkernels import bench
from vqkernels.bench.specs import CPU_TARGET_SHAPES

QUICK_SHAPES = [(4096, 1024, 64), (16384, 1024, 8)]
CONTENDERS = ["vqkernels[cpu]", "vqkernels[chunked]", "faiss.IndexFlat", "torch.cdist+argmin"]


def assign_peak_memory(N=65536, K=65536, D=32, contender="vqkernels[cpu]") -> dict:
    """Peak memory of ``assign`` above the inputs, in a fresh interpreter."""
    m = bench.memory_in_subprocess(bench.Case("assign", N, K, D), contender, bench.Options())
    return {"N": N, "K": K, "D": D, "contender": contender, "extra_peak_rss_bytes": m["peak_mem_bytes"],
            "nxk_fp32_bytes": N * K * 4, "method": f"inputs created first; {m['mem_method']}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="torch and FAISS threads (default: torch's)")
    p.set_defaults(device="cpu", alternate=True, memory="off", max_dense_gib=4.0)
    args = p.parse_args(argv)
    small = args.quick or args.smoke
    args.repeats = args.repeats or (3 if small else 7)
    if args.threads:
        torch.set_num_threads(args.threads)  # the FAISS contender runs as many threads as torch
    extra = {}
    if not small:
        m = extra["memory"] = assign_peak_memory()
        print(f"peak extra memory of assign (cpu) at N=K={m['N']}, D={m['D']}: "
              + (f"{m['extra_peak_rss_bytes'] / 2**20:.0f} MiB" if m["extra_peak_rss_bytes"] is not None else m["method"])
              + f" (an N x K fp32 matrix: {m['nxk_fp32_bytes'] / 2**30:.0f} GiB)")
    cases = [bench.Case("assign", N, K, D) for N, K, D in (QUICK_SHAPES if small else CPU_TARGET_SHAPES)]
    return bench.run(args, cases, only=CONTENDERS, extra=extra, name="cpu_assign")


if __name__ == "__main__":
    sys.exit(main())
