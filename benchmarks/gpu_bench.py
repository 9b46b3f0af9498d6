#!/usr/bin/env python3
"""GPU benchmark of the vqkernels ops: every available backend side by side, one JSON.

``assign`` for each backend (triton, cuda when the extension loads, chunked) next to
``torch.cdist(x, c).argmin(1)`` and flash-kmeans' Triton assignment (when importable), over
N = 2^20 rows, K in {1024, 16384, 65536}, D in {8, 32, 256}, bf16 and fp32; then
``histogram``, ``cluster_stats`` (atomic and deterministic) and ``ema_update_`` at the same N.

This is ``vqkernels bench`` on its own grid (its table, checks, timer, peak memory and JSON,
schema ``vqkernels.bench/1``; fields: docs/bench.md) with what a GPU run adds: the backends'
own calls (``--via-op``: the public ops), repeats that fill ``--target-s`` so short kernels run
back to back, rotating input sets larger than L2, a time budget (the cheap ops first, then
assign), and the matmul / copy ceilings measured on this card (``ceilings`` in the JSON).
``--device cpu`` runs the plumbing on tiny sizes; ``--dry-run`` writes the planned rows only.

    python benchmarks/gpu_bench.py --out benchmarks/results --time-budget 240
    python benchmarks/gpu_bench.py --device cpu --n 512 --ks 16,32 --ds 4 --dtypes fp32 --backends chunked
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time

import torch

from vqkernels import bench
from vqkernels.bench.report import comma_list
from vqkernels.bench.runner import GPU_BANDWIDTH, GPU_PEAK_FLOPS

DTYPES = ("bf16", "fp16", "fp32")
OPS = ("assign", "histogram", "cluster_stats", "ema_update")
ASSIGN_BACKENDS = ("triton", "cuda", "chunked", "reference")
BASELINES = {"cdist": "torch.cdist+argmin", "flash_kmeans": "flash_kmeans.assign"}  # the harness's contender names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--out", default="benchmarks/results", help="output folder for gpu_bench.json")
    add("--device", default="cuda", choices=["cuda", "cpu"])
    add("--n", type=int, default=1 << 20, help="rows N (default 2^20)")
    add("--ks", type=comma_list(what="k"), default=[1024, 16384, 65536], help="codebook sizes K")
    add("--ds", type=comma_list(what="d"), default=[8, 32, 256], help="dimensions D")
    add("--dtypes", type=comma_list(DTYPES, what="dtype"), default=["bf16", "fp32"])
    add("--metric", default="l2", choices=["l2", "cosine", "dot"])
    add("--ops", type=comma_list(OPS, what="op"), default=list(OPS))
    add("--backends", type=comma_list(ASSIGN_BACKENDS, what="backend"), default=["triton", "cuda", "chunked"])
    add("--baselines", type=comma_list(tuple(BASELINES), what="baseline"), default=list(BASELINES))
    add("--fp32-precision", default="medium", choices=["highest", "high", "medium"],
        help="torch.set_float32_matmul_precision for the run (medium: tf32, the rate the fp32 floor uses)")
    add("--time-budget", type=float, default=420.0, help="seconds; rows that would overrun are skipped")
    add("--ops-share", type=float, default=0.3,
        help="fraction of the budget the histogram / cluster_stats / ema rows may use (they run first)")
    add("--target-s", type=float, default=0.3, help="timed seconds per row (sets the repetitions)")
    add("--min-reps", type=int, default=3)
    add("--max-reps", type=int, default=30)
    add("--rotate", type=int, default=0, help="input sets to rotate through (0: enough to exceed 4x L2)")
    add("--via-op", action="store_true", help="time the public ops (validation + dispatch) instead of the backend functions")
    add("--seed", type=int, default=0)
    add("--dry-run", action="store_true", help="write the planned rows and the environment, time nothing")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    return args


def plan(args) -> list:
    """Every row the run will try, in priority order (cheap ops first, then assign by dtype)."""
    n, dt = args.n, args.dtypes[0]
    cases = {"histogram": [bench.Case("histogram", n, K, 1) for K in args.ks],
             "cluster_stats": [bench.Case("stats", n, K, D, dt, variant=v) for v, K, D in
                               itertools.product(("atomic", "deterministic"), args.ks, args.ds)],
             "ema_update": [bench.Case("ema", n, K, D, dt) for K, D in itertools.product(args.ks, args.ds)],
             # small K first within a (dtype, D): cheap autotuning
             "assign": [bench.Case("assign", n, K, D, dtype, args.metric)
                        for dtype, D, K in itertools.product(args.dtypes, args.ds, sorted(args.ks))]}
    return [case for op in cases if op in args.ops for case in cases[op]]


def contenders(args) -> list:
    """The harness's names of the providers asked for (the baselines run on assign rows only)."""
    return [f"vqkernels[{b}]" for b in args.backends] + [BASELINES[b] for b in args.baselines]


def measure_ceilings(device: str, fp32_precision: str) -> dict:
    """Matmul rates (bf16, and fp32 under the run's precision setting) and copy bandwidth."""
    out = {"fp32_precision": fp32_precision, "hbm_bytes_per_s_floor": GPU_BANDWIDTH, "bf16_peak_floor": GPU_PEAK_FLOPS["bf16"]}
    for name, dtype in ((("bf16_mm_flops", torch.bfloat16), ("fp32_mm_flops", torch.float32), ("copy_bytes_per_s", None))
                        if device == "cuda" else ()):
        try:
            if dtype is None:  # a 1 GiB copy: bytes read + written
                a = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_()
                b, work, call = torch.empty_like(a), 2 << 30, lambda: b.copy_(a)
            else:
                a, b = (torch.randn(8192, 8192, device=device, dtype=dtype) for _ in range(2))
                work, call = 2 * 8192**3, lambda: torch.mm(a, b)
            out[name] = work / bench.time_call(call, repeats=10, warmup=3, device=device)["median"]
            del a, b
        except Exception as exc:
            out[name.replace("_bytes_per_s", "") + "_error"] = f"{type(exc).__name__}: {exc}"
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    json_path, cases, only = os.path.join(args.out, "gpu_bench.json"), plan(args), contenders(args)
    cuda = args.device == "cuda" and torch.cuda.is_available()
    if args.dry_run or (args.device == "cuda" and not cuda):
        error = None if cuda or args.device == "cpu" else "--device cuda but torch sees no CUDA device"
        rows = [{**dataclasses.asdict(c), "label": c.label(), "contenders": only, "status": "planned"} for c in cases]
        with open(json_path, "w") as f:
            json.dump({"schema": "vqkernels.bench/1", "dry_run": args.dry_run, "error": error, "config": vars(args),
                       "machine": bench.machine_info(), "rows": rows}, f, indent=1, default=str)
        print(f"gpu_bench: {error or 'dry run'}: {len(rows)} rows planned -> {json_path}", file=sys.stderr)
        return 2 if error else 0
    deadline = time.monotonic() + args.time_budget
    ops_deadline = time.monotonic() + args.ops_share * args.time_budget
    previous_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(args.fp32_precision)
    try:
        ceilings = measure_ceilings(args.device, args.fp32_precision)
        print(f"ceilings: {ceilings}", file=sys.stderr)
        l2 = (getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) if cuda else 0) or 50 << 20
        # cdist holds the N x K matrix, its matmul intermediate and the argmin's
        dense_gib = 0.8 * torch.cuda.mem_get_info()[0] / 3 / 2**30 if cuda else float("inf")
        parser = argparse.ArgumentParser()
        bench.add_arguments(parser)  # what `vqkernels bench` options this run is; per row: tune below
        bench_args = parser.parse_args(
            ["--device", args.device, "--ops", ",".join(args.ops), "--repeats", str(args.min_reps), "--warmup", "1",
             "--memory", "inprocess" if cuda else "off", "--max-dense-gib", str(dense_gib), "--seed", str(args.seed),
             "--json", json_path] + ([] if args.via_op else ["--kernel-level"]))

        def tune(case, opts):
            """Repeats that fill --target-s, input sets that exceed 4x L2, the op's share of the budget."""
            sets = args.rotate or int(min(8, max(2, math.ceil(4 * l2 / max(1, case.work()["bytes"])))))
            return dataclasses.replace(
                opts, rotate=sets, on_device=True, target_s=args.target_s, max_repeats=args.max_reps, max_seconds=None,
                seed=args.seed + case.K + case.D, deadline=deadline if case.op == "assign" else min(deadline, ops_deadline))

        return bench.run(bench_args, cases, only, extra={"config": vars(args), "ceilings": ceilings},
                         name="gpu_bench", tune=tune)
    finally:
        torch.set_float32_matmul_precision(previous_precision)


if __name__ == "__main__":
    sys.exit(main())
