#!/usr/bin/env python3
"""GPU benchmark of the vqkernels ops: every available backend side by side, one JSON.

``assign`` for each backend (triton, cuda when the extension loads, chunked) next to
``torch.cdist(x, c).argmin(1)`` and flash-kmeans' Triton assignment (when importable), over
N = 2^20 rows, K in {1024, 16384, 65536}, D in {8, 32, 256}, bf16 and fp32; then
``histogram``, ``cluster_stats`` (atomic and deterministic) and ``ema_update_`` at the same N.

A thin view of :mod:`vqkernels.bench` (contenders, checks, timer, peak memory, machine) that
adds the plan, the matmul / copy ceilings measured on this card and one JSON row per provider
(fields: docs/bench.md): the backends' own calls (``--via-op``: the public ops), CUDA events,
warm-up first, rotating input sets larger than L2, medians, outputs checked against each other
first, and t / floor with floor = ``max(2NKD / peak, bytes / 4.3e12)``. Rows that would not fit
in memory or the time budget are skipped. ``--device cpu`` runs the plumbing on tiny sizes;
``--dry-run`` writes the planned rows only.

    python benchmarks/gpu_bench.py --out benchmarks/results --time-budget 240
    python benchmarks/gpu_bench.py --device cpu --n 512 --ks 16,32 --ds 4 --dtypes fp32 --backends chunked
"""
from __future__ import annotations

import argparse
import datetime as _dt
import io
import itertools
import json
import math
import os
import sys
import time
import traceback

import torch

from vqkernels import bench
from vqkernels.bench.report import comma_list
from vqkernels.bench.runner import GPU_BANDWIDTH, GPU_PEAK_FLOPS

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
OPS = ("assign", "histogram", "cluster_stats", "ema_update")
ASSIGN_BACKENDS = ("triton", "cuda", "chunked", "reference")
BASELINES = ("cdist", "flash_kmeans")
SPEC_OF = {"assign": "assign", "histogram": "histogram", "cluster_stats": "stats", "ema_update": "ema"}
CONTENDER_OF = {"cdist": "torch.cdist+argmin", "flash_kmeans": "flash_kmeans.assign"}  # else vqkernels[backend]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--out", default="benchmarks/results", help="output folder for gpu_bench.json / gpu_bench.log")
    add("--device", default="cuda", choices=["cuda", "cpu"])
    add("--n", type=int, default=1 << 20, help="rows N (default 2^20)")
    add("--ks", type=comma_list(what="k"), default=[1024, 16384, 65536], help="codebook sizes K")
    add("--ds", type=comma_list(what="d"), default=[8, 32, 256], help="dimensions D")
    add("--dtypes", type=comma_list(DTYPES, what="dtype"), default=["bf16", "fp32"])
    add("--metric", default="l2", choices=["l2", "cosine", "dot"])
    add("--ops", type=comma_list(OPS, what="op"), default=list(OPS))
    add("--backends", type=comma_list(ASSIGN_BACKENDS, what="backend"), default=["triton", "cuda", "chunked"])
    add("--baselines", type=comma_list(BASELINES, what="baseline"), default=list(BASELINES))
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


def plan_rows(args):
    """Every row the run will try, in priority order (cheap ops first, then assign by dtype)."""
    rows, stats = [], [b for b in args.backends if b != "reference"]
    plan = {"histogram": [(stats, K, None, "int64", None) for K in args.ks],
            "cluster_stats": [(stats, K, D, args.dtypes[0], v) for v, K, D in
                              itertools.product(("atomic", "deterministic"), args.ks, args.ds)],
            "ema_update": [(stats, K, D, args.dtypes[0], None) for K, D in itertools.product(args.ks, args.ds)],
            # small K first within a (dtype, D): cheap autotuning
            "assign": [(list(args.backends) + list(args.baselines), K, D, dt, args.metric)
                       for dt, D, K in itertools.product(args.dtypes, args.ds, sorted(args.ks))]}
    for op in (op for op in plan if op in args.ops):
        for providers, K, D, dtype, variant in plan[op]:
            rows += [dict(op=op, provider=b, N=args.n, K=K, D=D, dtype=dtype, variant=variant, status="planned",
                          note="") for b in providers]
    return rows


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


def run_shape(group, args, ceilings, l2_bytes, deadline, table):
    """Check and time every provider of one shape through :func:`vqkernels.bench.run_case`; fill the rows."""
    op, N, K, D, dtype, variant = (group[0][k] for k in ("op", "N", "K", "D", "dtype", "variant"))
    case = bench.Case(SPEC_OF[op], N, K, D or 1, dtype if dtype in DTYPES else "fp32",
                      metric=variant if op == "assign" else "l2", variant=variant if op == "cluster_stats" else "")
    work, cuda = case.work(), args.device == "cuda"
    free = torch.cuda.mem_get_info()[0] if cuda else float("inf")
    sets = args.rotate or int(min(8, max(2, math.ceil(4 * (l2_bytes or 50 << 20) / max(1, work["bytes"])))))
    opts = bench.Options(device=args.device, repeats=args.min_reps, warmup=1, memory="inprocess" if cuda else "off",
                         max_dense_bytes=0.8 * free / 3,  # cdist: the N x K matrix, its mm intermediate, argmin
                         seed=args.seed + K + (D or 0), kernel_level=not args.via_op, rotate=sets, on_device=True,
                         target_s=args.target_s, max_repeats=args.max_reps, deadline=deadline)
    names = {CONTENDER_OF.get(r["provider"], f"vqkernels[{r['provider']}]"): r for r in group}
    result = bench.run_case(case, opts, only=list(names))
    table.row(result)
    ok = [e for e in result["results"] if e["status"] == "ok"]
    for e in result["results"]:
        row, t = names[e["contender"]], e.get("median_s")
        if e["status"] != "ok":
            row.update(status=e["status"], note=e["reason"])
            continue
        row.update(status="ok", median_ms=t * 1e3, p20_ms=e["p20_s"] * 1e3, p80_ms=e["p80_s"] * 1e3,
                   min_ms=e["min_s"] * 1e3, reps=e["repeats"], bytes_min=work["bytes"],
                   gbytes_per_s=work["bytes"] / t / 1e9, agrees=e.get("agrees"))
        if e.get("peak_mem_bytes") is not None and cuda:
            row["mem_peak_mib"] = round(e["peak_mem_bytes"] / 2**20, 1)
        if e is not ok[0]:  # the old field names: agreement at this shape, first provider named
            row.update(agree_with=names[ok[0]["contender"]]["provider"], agree_frac=e.get("agree"))
        if not e.get("agrees"):
            row["note"] = f"DISAGREES with the best pick ({e.get('agree', 0):.4f}) {e.get('check_detail', '')}"
        floor = work["bytes"] / GPU_BANDWIDTH
        if op == "assign":
            fp32 = dtype == "fp32"
            peak = ceilings.get("fp32_mm_flops", GPU_PEAK_FLOPS["fp32"]) if fp32 else GPU_PEAK_FLOPS["bf16"]
            floor = max(work["flops"] / peak, floor)
            row.update(flops=work["flops"], tflops=work["flops"] / t / 1e12)
            measured = ceilings.get("fp32_mm_flops" if fp32 else "bf16_mm_flops")
            if measured:
                row["frac_of_measured_mm"] = work["flops"] / t / measured
        row.update(floor_ms=floor * 1e3, x_floor=t / floor)


def write_json(path, payload):
    payload["load_after"] = bench.load_now()
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    json_path, started = os.path.join(args.out, "gpu_bench.json"), time.monotonic()
    log_file = open(os.path.join(args.out, "gpu_bench.log"), "w")

    def log(msg):
        line = f"[gpu_bench {time.monotonic() - started:6.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    machine = bench.machine_info()
    payload = {"schema": 1, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "config": dict(vars(args)), "versions": machine, "machine": machine,
               "extension": machine["extension"], "rows": plan_rows(args)}
    previous_precision = torch.get_float32_matmul_precision()
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            payload["error"] = "--device cuda but torch sees no CUDA device"
        if args.dry_run or "error" in payload:
            payload["dry_run"] = args.dry_run
            write_json(json_path, payload)
            log(payload.get("error") or f"dry run: {len(payload['rows'])} rows planned -> {json_path}")
            return 2 if "error" in payload else 0
        torch.set_float32_matmul_precision(args.fp32_precision)
        deadline = time.monotonic() + args.time_budget
        ops_deadline = time.monotonic() + args.ops_share * args.time_budget
        log(f"machine and versions: {machine}")
        ceilings = payload["ceilings"] = measure_ceilings(args.device, args.fp32_precision)
        log(f"ceilings: {ceilings}")
        table = bench.Table(args.device, stream=io.StringIO())  # the package's table, printed at the end
        shape = lambda r: tuple(r[k] for k in ("op", "K", "D", "dtype", "variant"))  # noqa: E731
        for _, group in itertools.groupby(payload["rows"], key=shape):
            group = list(group)
            end = deadline if group[0]["op"] == "assign" else min(deadline, ops_deadline)
            try:
                if time.monotonic() >= end:
                    raise TimeoutError("time budget")
                run_shape(group, args, ceilings, machine.get("l2_bytes"), end, table)
            except Exception as exc:  # one failing shape must not stop the run
                timeout = isinstance(exc, TimeoutError)
                for row in group:
                    row.update(status="skipped" if timeout else "error", note="time budget" if timeout else
                               f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                if timeout:
                    continue
                log(traceback.format_exc())
            if args.device == "cuda":
                torch.cuda.empty_cache()  # give back a baseline's N x K matrix before the next shape
            for row in group:
                log(f"{row['op']} {row['provider']} {row['dtype']} K={row['K']} D={row['D']} {row.get('variant') or ''}: "
                    f"{row['status']} {row.get('median_ms', float('nan')):.3f} ms {row.get('note', '')}")
            write_json(json_path, payload)  # keep what we have if the run is killed
        payload["elapsed_s"] = round(time.monotonic() - started, 1)
        write_json(json_path, payload)
        table.close_op()
        # gpu_check.sh prints the log from "summary (x floor" on
        log("summary (x floor = median / max(flops / peak, bytes / 4.3e12), in the JSON with TFLOP/s and the fraction "
            "of the measured torch.mm rate; the table's 'of floor' is its inverse)\n" + table.stream.getvalue())
        # 1 when a provider failed, or one of ours disagreed with the best pick (a peer's disagreement is reported)
        return int(any(r["status"] == "error" or (r.get("agrees") is False and r["provider"] in ASSIGN_BACKENDS)
                       for r in payload["rows"]))
    except Exception as exc:
        payload["error"] = f"{type(exc).__name__}: {exc}"
        log(traceback.format_exc())
        write_json(json_path, payload)
        return 2
    finally:
        torch.set_float32_matmul_precision(previous_precision)
        log_file.close()


if __name__ == "__main__":
    sys.exit(main())
