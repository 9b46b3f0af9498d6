#!/usr/bin/env python3
"""GPU benchmark of the vqkernels ops: every available backend side by side, one JSON.

Times ``assign`` for each backend (triton, cuda when the extension loads, chunked) next
to ``torch.cdist(x, c).argmin(1)`` and flash-kmeans' Triton assignment (when importable),
over N = 2^20 rows, K in {1024, 16384, 65536}, D in {8, 32, 256}, bf16 and fp32; then
``histogram``, ``cluster_stats`` (atomic and deterministic) and ``ema_update_`` at the same N.

Method: CUDA events around every call, warm-up first (autotuning and compilation stay out
of the numbers), rotating input sets (several copies, together larger than L2), medians
with 20th/80th percentiles. For each row: median ms, achieved TFLOP/s (2NKD / t for
assign), the floor ``max(2NKD / peak, bytes / 4.3e12)`` with peak = 790e12 (bf16) or the
tf32 rate (fp32), the ratio t / floor, and the fraction of the bf16 / tf32 matmul rate
measured on this card at the start (a large ``torch.mm``). Rows that would not fit in
memory or in the time budget are skipped and say so.

``--device cpu`` runs the same code on tiny sizes with wall-clock timing (the CPU test of
the argument parsing and JSON writing); ``--dry-run`` writes the planned rows only.

    python benchmarks/gpu_bench.py --out benchmarks/results --time-budget 240
    python benchmarks/gpu_bench.py --device cpu --n 512 --ks 16,32 --ds 4 --dtypes fp32 --backends chunked
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
import traceback

HBM_BYTES_PER_S = 4.3e12  # H200 copy bandwidth seen on this workplace's machines (floor formula)
PEAK_BF16 = 790e12  # bf16 dense matmul rate seen on an H200 here (floor formula)
PEAK_TF32_FALLBACK = 395e12  # used for fp32 rows only when the tf32 rate could not be measured
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
OPS = ("assign", "histogram", "cluster_stats", "ema_update")
ASSIGN_BACKENDS = ("triton", "cuda", "chunked", "reference")
BASELINES = ("cdist", "flash_kmeans")


# --------------------------------------------------------------------------- arguments


def _int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choice_list(allowed):
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(allowed)}")
        return values

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="output folder for gpu_bench.json / gpu_bench.log")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--n", type=int, default=1 << 20, help="rows N (default 2^20)")
    p.add_argument("--ks", type=_int_list, default=[1024, 16384, 65536], help="codebook sizes K")
    p.add_argument("--ds", type=_int_list, default=[8, 32, 256], help="dimensions D")
    p.add_argument("--dtypes", type=_choice_list(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--metric", default="l2", choices=["l2", "cosine", "dot"])
    p.add_argument("--ops", type=_choice_list(OPS), default=list(OPS))
    p.add_argument("--backends", type=_choice_list(ASSIGN_BACKENDS), default=["triton", "cuda", "chunked"])
    p.add_argument("--baselines", type=_choice_list(BASELINES), default=list(BASELINES))
    p.add_argument("--fp32-precision", default="medium", choices=["highest", "high", "medium"],
                   help="torch.set_float32_matmul_precision for the run (medium: tf32, the rate the fp32 floor uses)")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds; rows that would overrun are skipped")
    p.add_argument("--ops-share", type=float, default=0.3,
                   help="fraction of the budget the histogram / cluster_stats / ema rows may use (they run first)")
    p.add_argument("--target-s", type=float, default=0.3, help="timed seconds per row (sets the repetitions)")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=30)
    p.add_argument("--rotate", type=int, default=0, help="input sets to rotate through (0: enough to exceed 4x L2)")
    p.add_argument("--via-op", action="store_true", help="time the public ops (validation + dispatch) instead of the backend functions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="write the planned rows and the environment, time nothing")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    return args


# --------------------------------------------------------------------------- planning


def plan_rows(args):
    """Every row the run will try, in priority order (cheap ops first, then assign by dtype)."""
    rows = []
    N = args.n
    first_dtype = args.dtypes[0]
    stat_backends = [b for b in args.backends if b != "reference"]
    if "histogram" in args.ops:
        for K in args.ks:
            for b in stat_backends:
                rows.append(dict(op="histogram", provider=b, N=N, K=K, D=None, dtype="int64", variant=None))
    if "cluster_stats" in args.ops:
        for variant in ("atomic", "deterministic"):
            for K in args.ks:
                for D in args.ds:
                    for b in stat_backends:
                        rows.append(dict(op="cluster_stats", provider=b, N=N, K=K, D=D, dtype=first_dtype, variant=variant))
    if "ema_update" in args.ops:
        for K in args.ks:
            for D in args.ds:
                for b in stat_backends:
                    rows.append(dict(op="ema_update", provider=b, N=N, K=K, D=D, dtype=first_dtype, variant=None))
    if "assign" in args.ops:
        providers = list(args.backends) + list(args.baselines)
        for dtype in args.dtypes:
            for D in args.ds:
                for K in sorted(args.ks):  # small K first: autotuning happens on the cheap calls
                    for prov in providers:
                        rows.append(dict(op="assign", provider=prov, N=N, K=K, D=D, dtype=dtype, variant=args.metric))
    for r in rows:
        r.update(status="planned", note="")
    return rows


# --------------------------------------------------------------------------- environment


def _versions():
    """Versions and machine, from the package's one home for them (never raises)."""
    try:
        from vqkernels.benchmarking import machine_info

        return machine_info()
    except Exception as exc:  # a broken torch or package still gets a JSON that says so
        return {"python": sys.version.split()[0], "error": f"{type(exc).__name__}: {exc}"}


def _machine(torch, device):
    m = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        m.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            l2_bytes=getattr(props, "L2_cache_size", None),
        )
    return m


def _extension_status():
    try:
        from vqkernels import _extension

        return _extension.status()
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- timing


class Timer:
    """Per-call timing: CUDA events on a GPU, perf_counter (after a sync) on the CPU."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def time_calls(self, fn, inputs, reps):
        """Milliseconds of ``reps`` calls, rotating through ``inputs``."""
        times = []
        if self.cuda:
            events = [(self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            self.sync()
            for i, (start, end) in enumerate(events):
                start.record()
                fn(*inputs[i % len(inputs)])
                end.record()
            self.sync()
            times = [s.elapsed_time(e) for s, e in events]
        else:
            for i in range(reps):
                t0 = time.perf_counter()
                fn(*inputs[i % len(inputs)])
                times.append((time.perf_counter() - t0) * 1e3)
        return times


def _percentile(values, q):
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    pos = q * (len(values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def measure(timer, fn, inputs, args, deadline):
    """Warm up (compile, autotune), then time enough calls for ~target_s; returns stats dict."""
    fn(*inputs[0])  # first call: compilation / autotuning, untimed
    timer.sync()
    probe = timer.time_calls(fn, inputs[1 % len(inputs):] + inputs[:1], 1)[0]
    left = max(0.0, deadline - time.monotonic())
    reps = int(min(args.max_reps, max(args.min_reps, args.target_s * 1e3 / max(probe, 1e-3))))
    reps = max(1, min(reps, int(left * 1e3 / max(probe, 1e-3) / 2)))
    times = timer.time_calls(fn, inputs, reps)
    return dict(
        median_ms=statistics.median(times),
        p20_ms=_percentile(times, 0.2),
        p80_ms=_percentile(times, 0.8),
        min_ms=min(times),
        reps=len(times),
    )


# --------------------------------------------------------------------------- ceilings


def measure_ceilings(torch, device, timer, fp32_precision):
    """Matmul rates (bf16, and fp32 under the run's precision setting) and copy bandwidth."""
    out = {"fp32_precision": fp32_precision, "hbm_bytes_per_s_floor": HBM_BYTES_PER_S, "bf16_peak_floor": PEAK_BF16}
    if device.type != "cuda":
        return out
    n = 8192
    for name, dtype in (("bf16_mm_flops", torch.bfloat16), ("fp32_mm_flops", torch.float32)):
        try:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            for _ in range(3):
                torch.mm(a, b)
            times = timer.time_calls(lambda a, b: torch.mm(a, b), [(a, b)], 10)
            out[name] = 2 * n**3 / (statistics.median(times) * 1e-3)
            del a, b
        except Exception as exc:
            out[name + "_error"] = f"{type(exc).__name__}: {exc}"
    try:
        src = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_()
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        times = timer.time_calls(lambda d, s: d.copy_(s), [(dst, src)], 10)
        out["copy_bytes_per_s"] = 2 * src.numel() / (statistics.median(times) * 1e-3)
        del src, dst
    except Exception as exc:
        out["copy_error"] = f"{type(exc).__name__}: {exc}"
    torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------- providers


def _assign_fn(torch, provider, metric, via_op):
    """(fn(x, c) -> indices, refusal reason or None) for one assign provider."""
    import vqkernels
    from vqkernels.ops import _dispatch

    if provider in ASSIGN_BACKENDS:
        if via_op:
            return (lambda x, c: vqkernels.assign(x, c, metric, backend=provider, check_codebook=False).indices), None
        impl = _dispatch.implementation("assign", provider)
        return (lambda x, c: impl(x, c, metric)[0]), None
    if provider == "cdist":
        if metric != "l2":
            return None, "cdist baseline is l2 only"
        return (lambda x, c: torch.cdist(x, c).argmin(1)), None
    if provider == "flash_kmeans":
        if metric != "l2":
            return None, "flash-kmeans baseline is wired for l2 only"
        try:
            from flash_kmeans.assign_euclid_triton import euclid_assign_triton
        except Exception as exc:
            return None, f"flash-kmeans not importable ({type(exc).__name__}: {exc})"

        def fk(x, c, x_sq):  # x_sq is precomputed per input set (their k-means does it once per run)
            return euclid_assign_triton(x.unsqueeze(0), c.unsqueeze(0), x_sq)

        return fk, None
    return None, f"unknown provider {provider}"


def _refusal(provider, device_type, torch_dtype):
    from vqkernels.ops import _dispatch

    if provider in _dispatch.BACKENDS:
        return _dispatch.BACKENDS[provider].refusal(device_type, torch_dtype)
    return None


def _sets_for(bytes_per_set, args, l2_bytes):
    if args.rotate:
        return args.rotate
    l2 = l2_bytes or (50 << 20)
    return int(min(8, max(2, math.ceil(4 * l2 / max(1, bytes_per_set)))))


def run_row(row, ctx):
    torch, device, args, timer = ctx["torch"], ctx["device"], ctx["args"], ctx["timer"]
    op, prov, N, K, D = row["op"], row["provider"], row["N"], row["K"], row["D"]
    gen = torch.Generator(device=device).manual_seed(args.seed + K + (D or 0))
    dt = getattr(torch, DTYPES.get(row["dtype"], "float32")) if row["dtype"] in DTYPES else None
    reason = _refusal(prov, device.type, dt if op in ("assign", "cluster_stats", "ema_update") else None)
    if reason is not None:
        return dict(status="skipped", note=f"{prov} unavailable: {reason}")
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 64 << 30
    import vqkernels
    from vqkernels.ops import _dispatch

    if op == "assign":
        es = torch.finfo(dt).bits // 8
        flops = 2.0 * N * K * D
        bytes_min = (N + K) * D * es + 12 * N
        if prov == "cdist":
            need = 3 * N * K * es  # distance matrix, its mm intermediate, argmin workspace
            if need > 0.8 * free:
                return dict(status="skipped", note=f"cdist needs the N x K matrix: ~{need / 2**30:.0f} GiB > free memory")
        if prov == "reference" and N * K * D > 1 << 34:
            return dict(status="skipped", note="reference backend is for small inputs")
        fn, reason = _assign_fn(torch, prov, args.metric, args.via_op)
        if fn is None:
            return dict(status="skipped", note=reason)
        peak = PEAK_BF16 if dt != torch.float32 else ctx["ceilings"].get("fp32_mm_flops", PEAK_TF32_FALLBACK)
        est_call = flops / (0.25 * peak) + 1e-4 if device.type == "cuda" else flops / 5e10
        slow_factor = {"chunked": 3, "cdist": 4, "reference": 50}.get(prov, 1)
        first_of_kind = (prov, row["dtype"], D) not in ctx["warm"]  # compile + autotune still to come
        compile_s = 25 if first_of_kind and prov in ("triton", "flash_kmeans") and device.type == "cuda" else 0
        est = compile_s + est_call * slow_factor * (3 + args.min_reps)
        if est > ctx["deadline"] - time.monotonic():
            return dict(status="skipped", note=f"time budget (needs ~{est:.0f} s)")
        sets = _sets_for((N + K) * D * es, args, ctx["machine"].get("l2_bytes"))
        inputs = []
        for _ in range(sets):
            x = torch.randn(N, D, device=device, generator=gen, dtype=torch.float32).to(dt)
            c = torch.randn(K, D, device=device, generator=gen, dtype=torch.float32).to(dt)
            inputs.append((x, c, (x.float() ** 2).sum(-1).unsqueeze(0)) if prov == "flash_kmeans" else (x, c))
        extra = {}
    else:
        if prov == "reference":
            return dict(status="skipped", note="reference backend is for small inputs")
        impl = _dispatch.implementation(op, prov)
        sets = 2
        flops = None
        inputs = []
        if op == "histogram":
            bytes_min = 8 * N + 8 * K
            for _ in range(max(sets, _sets_for(8 * N, args, ctx["machine"].get("l2_bytes")))):
                inputs.append((torch.randint(0, K, (N,), device=device, generator=gen),))
            fn = (lambda i: vqkernels.histogram(i, K, backend=prov)) if args.via_op else (lambda i: impl(i, K, None))
        elif op == "cluster_stats":
            es = torch.finfo(dt).bits // 8
            bytes_min = N * D * es + 8 * N + 4 * K * (D + 1)
            det = row["variant"] == "deterministic"
            for _ in range(max(sets, _sets_for(N * D * es, args, ctx["machine"].get("l2_bytes")))):
                x = torch.randn(N, D, device=device, generator=gen, dtype=torch.float32).to(dt)
                inputs.append((x, torch.randint(0, K, (N,), device=device, generator=gen)))
            if args.via_op:
                fn = lambda x, i: vqkernels.cluster_stats(x, i, K, deterministic=det, backend=prov)  # noqa: E731
            else:
                fn = lambda x, i: impl(x, i, K, det)  # noqa: E731
        else:  # ema_update, one head
            es = torch.finfo(dt).bits // 8
            bytes_min = 4 * K * 4 + K * D * (4 * 4 + es)  # cs/counts in+out; embed_avg, sums, codebook
            for _ in range(sets):
                cs = torch.rand(1, K, device=device, generator=gen) + 0.5
                ea = torch.randn(1, K, D, device=device, generator=gen)
                cb = torch.empty(1, K, D, device=device, dtype=dt)
                counts = torch.randint(0, 5, (1, K), device=device, generator=gen).float()
                sums = torch.randn(1, K, D, device=device, generator=gen)
                inputs.append((cs, ea, cb, counts, sums))
            if args.via_op:
                fn = lambda cs, ea, cb, n, s: vqkernels.ema_update_(cs, ea, cb, n, s, 0.99, backend=prov)  # noqa: E731
            else:
                fn = lambda cs, ea, cb, n, s: impl(cs, ea, cb, n, s, 0.99, 1e-5)  # noqa: E731
        if ctx["deadline"] - time.monotonic() < 5:
            return dict(status="skipped", note="time budget")
        extra = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    stats = measure(timer, fn, inputs, args, ctx["deadline"])
    ctx["warm"].add((prov, row["dtype"], D))
    result = dict(status="ok", **stats, bytes_min=bytes_min, **extra)
    if device.type == "cuda":
        result["mem_peak_mib"] = round((torch.cuda.max_memory_allocated(device) - base_mem) / 2**20, 1)
    t = stats["median_ms"] * 1e-3
    result["gbytes_per_s"] = bytes_min / t / 1e9
    if flops is not None:
        peak = PEAK_BF16 if dt != torch.float32 else ctx["ceilings"].get("fp32_mm_flops", PEAK_TF32_FALLBACK)
        floor = max(flops / peak, bytes_min / HBM_BYTES_PER_S)
        result.update(flops=flops, tflops=flops / t / 1e12, floor_ms=floor * 1e3, x_floor=t / floor)
        measured = ctx["ceilings"].get("bf16_mm_flops" if dt != torch.float32 else "fp32_mm_flops")
        if measured:
            result["frac_of_measured_mm"] = flops / t / measured
        if prov == "triton" and not args.via_op:
            try:
                from vqkernels.ops.assign import triton as tassign

                cfg = getattr(tassign._assign_kernel_tuned, "best_config", None)
                result["triton_config"] = str(cfg) if cfg is not None else "fixed (interpreter)"
            except Exception:
                pass
        # agreement of the indices with the first provider timed at this shape (a sanity check;
        # near-ties may legitimately differ)
        key = (row["dtype"], K, D)
        got = fn(*inputs[0]).reshape(-1)[:65536].long()
        ref = ctx["first_indices"].setdefault(key, (prov, got))
        if ref[0] != prov:
            result["agree_with"] = ref[0]
            result["agree_frac"] = float((ref[1] == got).float().mean())
    else:
        result["floor_ms"] = bytes_min / HBM_BYTES_PER_S * 1e3
        result["x_floor"] = t / (bytes_min / HBM_BYTES_PER_S)
    del inputs
    return result


# --------------------------------------------------------------------------- main


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def summary_table(rows):
    lines = [
        f"{'op':13s} {'provider':12s} {'dtype':6s} {'K':>6s} {'D':>4s} {'median ms':>10s} {'TFLOP/s':>8s} "
        f"{'GB/s':>7s} {'x floor':>8s} {'frac mm':>7s}  status"
    ]
    for r in rows:
        op = r["op"] + ("/" + r["variant"][:3] if r["op"] == "cluster_stats" and r.get("variant") else "")
        lines.append(
            f"{op:13s} {r['provider']:12s} {r['dtype']:6s} {r['K']:>6d} {str(r['D'] or '-'):>4s} "
            f"{_fmt(r.get('median_ms'), '10.3f')} {_fmt(r.get('tflops'), '8.1f')} {_fmt(r.get('gbytes_per_s'), '7.0f')} "
            f"{_fmt(r.get('x_floor'), '8.2f')} {_fmt(r.get('frac_of_measured_mm'), '7.2f')}  "
            f"{r['status']}{(': ' + r['note']) if r.get('note') else ''}"
        )
    return "\n".join(lines)


def write_json(path, payload):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "gpu_bench.json")
    log_path = os.path.join(args.out, "gpu_bench.log")
    started = time.monotonic()
    log_file = open(log_path, "w")

    def log(msg):
        line = f"[gpu_bench {time.monotonic() - started:6.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    payload = {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: v for k, v in vars(args).items()},
        "versions": _versions(),
        "rows": plan_rows(args),
    }
    try:
        import torch

        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            payload["error"] = "--device cuda but torch sees no CUDA device"
            log(payload["error"])
            write_json(json_path, payload)
            return 2
        payload["machine"] = _machine(torch, device)
        payload["extension"] = _extension_status()
        if args.dry_run:
            payload["dry_run"] = True
            write_json(json_path, payload)
            log(f"dry run: {len(payload['rows'])} rows planned -> {json_path}")
            return 0
        previous_precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(args.fp32_precision)
        try:
            timer = Timer(torch, device)
            deadline = time.monotonic() + args.time_budget
            log(f"machine: {payload['machine']}")
            log(f"versions: {payload['versions']}; extension: {payload['extension']}")
            payload["ceilings"] = measure_ceilings(torch, device, timer, args.fp32_precision)
            log(f"ceilings: {payload['ceilings']}")
            ctx = dict(torch=torch, device=device, args=args, timer=timer, deadline=deadline,
                       ceilings=payload["ceilings"], machine=payload["machine"], first_indices={}, warm=set())
            ops_deadline = time.monotonic() + args.ops_share * args.time_budget
            for i, row in enumerate(payload["rows"]):
                now = time.monotonic()
                if now >= deadline or (row["op"] != "assign" and now >= ops_deadline):
                    row.update(status="skipped", note="time budget")
                    continue
                try:
                    row.update(run_row(row, ctx))
                except Exception as exc:  # one failing provider must not stop the run
                    msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    row.update(status="error", note=msg)
                    log(traceback.format_exc())
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # give back a baseline's N x K matrix before the next row
                log(f"{i + 1}/{len(payload['rows'])} {row['op']} {row['provider']} {row['dtype']} K={row['K']} "
                    f"D={row['D']} {row.get('variant') or ''}: {row['status']} "
                    f"{_fmt(row.get('median_ms'), '.3f')} ms {row.get('note', '')}")
                write_json(json_path, payload)  # keep what we have if the run is killed
        finally:
            torch.set_float32_matmul_precision(previous_precision)
        payload["elapsed_s"] = round(time.monotonic() - started, 1)
        write_json(json_path, payload)
        table = summary_table(payload["rows"])
        log("summary (x floor = median / max(2NKD/peak, bytes/4.3e12); frac mm = achieved / measured torch.mm rate)\n" + table)
        n_err = sum(r["status"] == "error" for r in payload["rows"])
        return 1 if n_err else 0
    except Exception as exc:
        payload["error"] = f"{type(exc).__name__}: {exc}"
        log(traceback.format_exc())
        write_json(json_path, payload)
        return 2
    finally:
        log_file.close()


if __name__ == "__main__":
    sys.exit(main())
