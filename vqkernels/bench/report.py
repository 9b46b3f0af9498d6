"""The one report (table, JSON, plot) and the ``vqkernels bench`` command around the runner."""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .runner import GPU_BANDWIDTH, GPU_PEAK_FLOPS, Options, load_now, machine_info, run_case
from .specs import DECAY, EPS, OPS, SPECS, grid

SCHEMA = "vqkernels.bench/1"
DEFAULT_MAX_DENSE_GIB = {"cpu": 2.0, "cuda": 24.0}


# --------------------------------------------------------------------------- table
def fmt_time(s: Optional[float]) -> str:
    return "-" if s is None else f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def fmt_rate(r: float) -> str:
    scale, unit = next(((s, u) for s, u in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if r >= s), (1, ""))
    return f"{r / scale:.2f}{unit}" if unit else f"{r:.1f}"


def fmt_bytes(b: Optional[int]) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


class Table:
    """Prints the table row by row as results arrive (long runs show progress as they go)."""

    def __init__(self, device: str, stream=None):
        self.device, self.stream, self.op, self.skipped = device, stream or sys.stdout, None, {}
        self.columns = [("shape", 28, "<"), ("contender", 32, "<"), ("median", 10, ">"), ("throughput", 16, ">"),
                        ("peak mem", 10, ">"), ("/best peer", 10, ">")] + (
                        [("of floor", 8, ">")] if device == "cuda" else []) + [("check", 0, "<")]

    def emit(self, line: str = ""):
        print(line, file=self.stream, flush=True)

    def _fmt(self, cells) -> str:
        return "  ".join(f"{cell:{align}{width}}" if width else cell
                         for (_, width, align), cell in zip(self.columns, cells)).rstrip()

    def row(self, row: dict):
        if row["op"] != self.op:
            self.close_op()
            self.op = row["op"]
            mem = {"subprocess": "peak RSS above baseline, fresh subprocess per contender",
                   "inprocess": "torch.cuda.max_memory_allocated" if self.device == "cuda"
                   else "peak RSS above baseline, in process (VmHWM reset)"}.get(row["memory_mode"], "not measured")
            self.emit("")
            self.emit(f"== {SPECS[row['op']].title}")
            self.emit(f"   check: {row['check']}; peak memory: {mem}")
            self.emit(self._fmt([c[0] for c in self.columns]))
        shape = row["label"]
        for e in row["results"]:
            if e.get("status") == "skipped":
                self.skipped.setdefault(e["contender"], e["reason"])
                continue
            if e.get("status") == "error":
                cells = [shape, e["contender"]] + ["-"] * (len(self.columns) - 3) + [f"ERROR {e['reason'][:80]}"]
            else:
                ratio = e.get("vs_best_peer")
                check = "ok" if e.get("agrees") else f"DISAGREES ({e.get('agree', 0):.4f} agree) {e.get('check_detail', '')}"
                cells = [shape, e["contender"], fmt_time(e["median_s"]), f"{fmt_rate(e['throughput'])} {e['throughput_unit']}",
                         fmt_bytes(e.get("peak_mem_bytes")), f"{ratio:.2f}x" if ratio else "-"]
                if self.device == "cuda":
                    cells.append(f"{e['floor_fraction']:.1%}" if e.get("floor_fraction") else "-")
                cells.append(check)
            self.emit(self._fmt(cells))
            shape = ""

    def close_op(self):
        if self.skipped:
            self.emit("   not run: " + "; ".join(f"{k} ({v})" for k, v in self.skipped.items()))
        self.skipped = {}


def targets(rows: List[dict], device: str) -> List[dict]:
    """The issue's CPU targets (each op spec's ``targets``), measured on this run, never asserted."""
    return [t for row in rows for t in SPECS[row["op"]].targets(row)] if device == "cpu" else []


def target_lines(tgts: List[dict]) -> List[str]:
    lines = ["", "== targets (measured on this run, not asserted)"] if tgts else []
    for t in tgts:
        state = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        unit = "x" if t["unit"] == "x" else " " + t["unit"]
        lines.append(f"   {t['target']:<62} {t['value']:8.2f}{unit}   goal {t['goal']}: {state}")
    return lines


# --------------------------------------------------------------------------- plot
def plot(rows: List[dict], path: Path, title: str = "") -> Optional[str]:
    """Throughput against K per contender, one panel per op and shape; None, or why no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"matplotlib is not installed ({type(exc).__name__}); pip install matplotlib"
    panels: Dict[str, List[dict]] = {}
    for row in rows:  # a panel per op and shape: everything in the label but K
        panels.setdefault(f"{row['op']}: " + " ".join(p for p in row["label"].split() if not p.startswith("K=")),
                          []).append(row)
    # vqkernels backends keep one colour in every panel (solid lines); peers take the rest (dashed)
    backend_colour = {"chunked": "C0", "triton": "C2", "cuda": "C3", "reference": "C7", "cpu": "C5"}
    cols = min(3, max(1, len(panels)))
    nrows = math.ceil(max(1, len(panels)) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    for ax, (name, prow) in zip(axes.flat, panels.items()):
        series: Dict[str, list] = {}
        unit = "rows/s"
        for row in sorted(prow, key=lambda r: r["K"]):
            for e in row["results"]:
                if e.get("status") == "ok":
                    series.setdefault(e["contender"], []).append((row["K"], e["throughput"], e.get("agrees", True)))
                    unit = e["throughput_unit"]
        peers = iter(["C1", "C4", "C6", "C8", "C9"] * 3)
        for contender, pts in series.items():
            ks, ys, _ = zip(*pts)
            ours = contender.startswith("vqkernels")
            colour = backend_colour.get(contender.rsplit("[", 1)[-1].rstrip("]"), "k") if ours else next(peers)
            ax.plot(ks, ys, marker="o", label=contender, color=colour, linestyle="-" if ours else "--")
            bad = [(k, y) for k, y, agrees in pts if not agrees]
            if bad:
                ax.scatter(*zip(*bad), marker="x", s=80, color="red", zorder=5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(xlabel="K (codes)", ylabel=unit)
        ax.set_title(name, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title + ("  (red x: disagrees with the best pick)" if title else ""), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------- CLI
def comma_list(allowed=None, aliases=None, what="value"):
    """An argparse type (shared by ``vqkernels bench`` and ``benchmarks/*.py``): comma-separated names
    from ``allowed`` (``aliases`` mapped to them, ``all`` for every one), or positive integers when
    ``allowed`` is None; repeats are dropped, the order kept."""
    def parse(text: str) -> list:
        values = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            if allowed is None and not (part.isdigit() and int(part)):
                raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
            if part == "all" and allowed is not None:
                return list(allowed)
            value = int(part) if allowed is None else (aliases or {}).get(part, part)
            if allowed is not None and value not in allowed:
                raise argparse.ArgumentTypeError(
                    f"unknown {what} {part!r}; expected a comma-separated subset of {','.join(allowed)}")
            if value not in values:
                values.append(value)
        if not values:
            raise argparse.ArgumentTypeError(f"--{what}s is empty")
        return values
    return parse


def parse_ops(text: str) -> tuple:
    """``--ops``: a comma-separated subset of the registered ops (or their aliases, or ``all``)."""
    return tuple(comma_list(tuple(SPECS), {a: spec.name for spec in SPECS.values() for a in spec.aliases}, "op")(text))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``vqkernels bench`` options (``benchmarks/*.py`` add their own on top)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to benchmark (default: cuda when available, else cpu)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small grid that runs in about a minute on a 2-core CPU")
    size.add_argument("--smoke", action="store_true", help="a tiny grid that runs in seconds (CI)")
    parser.add_argument("--ops", type=parse_ops, default=OPS, metavar="LIST",
                        help=f"comma-separated workloads (default: all of {','.join(OPS)})")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every figure here")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH", help="PNG: throughput against K per contender")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per contender (default 5; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls before timing, the checked first call included (default 1; 2 on cuda)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop repeating a contender (after 3 calls) once this much time is spent")
    parser.add_argument("--memory", choices=("auto", "subprocess", "inprocess", "off"), default="auto",
                        help="how peak memory is measured (auto: in process; on CPU the full grid's training-step rows in a "
                             "fresh subprocess per contender)")
    parser.add_argument("--max-dense-gib", type=float, default=None,
                        help="skip contenders whose N x K fp32 matrix exceeds this (default 2 on cpu, 24 on cuda)")
    parser.add_argument("--kernel-level", action="store_true",
                        help="time the backends' calls (dispatch, no validation) instead of the public ops")
    parser.add_argument("--alternate", action="store_true",
                        help="time a row's contenders in turn, one call each per round (--repeats rounds)")
    parser.add_argument("--seed", type=int, default=0)


def options_from_args(args) -> tuple:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    grid_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    repeats, max_seconds = {"smoke": (1, 1.0), "quick": (3, 2.0), "full": (5, 20.0)}[grid_name]
    dense = args.max_dense_gib if args.max_dense_gib is not None else DEFAULT_MAX_DENSE_GIB[device]
    opts = Options(device=device, repeats=args.repeats or repeats,
                   warmup=args.warmup if args.warmup is not None else (2 if device == "cuda" else 1),
                   max_seconds=args.max_seconds if args.max_seconds is not None else max_seconds, memory=args.memory,
                   max_dense_bytes=dense * 2**30, seed=args.seed, memory_on_checked_call=grid_name != "full",
                   subprocess_memory=grid_name == "full", kernel_level=getattr(args, "kernel_level", False),
                   alternate=getattr(args, "alternate", False))
    return grid_name, opts


def document(rows, machine, opts: Options, grid_name: str, ops, elapsed: float, after: dict, tgts) -> dict:
    """The JSON document of a run (schema ``vqkernels.bench/1``; fields in the package docstring)."""
    return {
        "schema": SCHEMA, "machine": machine, "load_average_after": after["load_average"], "uptime_after": after["uptime"],
        "settings": {"grid": grid_name, "ops": list(ops), "device": opts.device, "repeats": opts.repeats,
                     "warmup": opts.warmup, "max_seconds": opts.max_seconds, "memory": opts.memory,
                     "max_dense_bytes": opts.max_dense_bytes, "seed": opts.seed, "decay": DECAY, "eps": EPS,
                     "kernel_level": opts.kernel_level, "alternate": opts.alternate,
                     "float32_matmul_precision": torch.get_float32_matmul_precision()},
        "notes": {
            "time": "median seconds over the timed calls after warm-up (CUDA events on GPU)",
            "peak_mem_bytes": ("GPU: torch.cuda.max_memory_allocated above the allocation before the call. CPU: "
                               "peak RSS above the RSS right before the call; rows with memory_mode 'subprocess' "
                               "measure each contender in a fresh interpreter after inputs and module exist, "
                               "'inprocess' rows reset VmHWM and trim the heap first; see each result's mem_method"),
            "vs_best_peer": "median / median of the fastest non-vqkernels contender that agrees, in the same row",
            "floor": {"peak_flops": GPU_PEAK_FLOPS, "bandwidth_bytes_per_s": GPU_BANDWIDTH,
                      "formula": "max(flops / peak_flops[dtype], bytes / bandwidth); fraction = floor / median"},
        },
        "elapsed_s": elapsed, "rows": rows, "targets": tgts,
    }


def run(args, cases=None, only=None, extra: Optional[dict] = None, name: str = "vqkernels bench", tune=None) -> int:
    """``vqkernels bench``: run the grid (or ``cases``, with the contenders in ``only``), print the
    table and targets, write JSON (with ``extra``'s fields; rewritten after every row, so a killed
    run keeps its rows) and plot. ``tune(case, opts)`` returns a row's own options (gpu_bench's
    time budgets and input rotation).

    Returns 0; 1 when a vqkernels contender disagreed with the best pick or raised (peers'
    failures are only reported); 2 when the device is missing.
    """
    grid_name, opts = options_from_args(args)
    if opts.device == "cuda" and not torch.cuda.is_available():
        print(f"{name}: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    cases = grid(grid_name, opts.device, args.ops) if cases is None else cases
    machine = machine_info()  # imports every installed peer, so their objects exist before the freeze
    started, table, rows = time.perf_counter(), Table(opts.device), []
    gpu = f", {machine.get('gpu')}" if opts.device == "cuda" else ""
    table.emit(f"{name}: {grid_name} grid on {opts.device}{gpu} | {machine['processor']}, {machine['cpu_count']} cpus, "
               f"torch {machine['torch']} ({machine['torch_threads']} threads) | load average {machine['load_average']}")
    table.emit(f"median of {'' if opts.alternate else 'up to '}{opts.repeats} timed calls"
               + (" in alternating rounds" if opts.alternate else "") + f" after {opts.warmup} warm-up (the first is "
               "the checked call)" + (", CUDA events" if opts.device == "cuda" else "")
               + "; /best peer = time / fastest agreeing non-vqkernels contender")

    def save():  # after every row: a run killed by a time limit keeps the rows it finished
        after = load_now()
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            doc = document(rows, machine, opts, grid_name, args.ops, time.perf_counter() - started, after,
                           targets(rows, opts.device))
            args.json.write_text(json.dumps({**doc, **(extra or {})}, indent=1, default=str))
        return after

    # Objects alive now (torch, the peers' modules) are never garbage: freezing them keeps the
    # gc.collect() before each memory measurement in milliseconds instead of a third of a second.
    gc.freeze()
    try:
        for i, case in enumerate(cases, 1):
            print(f"[{i}/{len(cases)}] {case.op} {case.label()}", file=sys.stderr, flush=True)
            try:
                rows.append(run_case(case, tune(case, opts) if tune else opts,
                                     lambda msg: print(msg, file=sys.stderr, flush=True), only))
            except Exception as exc:  # a row that fails as a whole (its inputs, its check) must not stop the run
                rows.append({**asdict(case), "label": case.label(), "memory_mode": "off", "check": case.spec.check_text,
                             "results": [{"contender": "(the row)", "family": "vqkernels", "status": "error",
                                          "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}]})
            if opts.device == "cuda":
                torch.cuda.empty_cache()  # give back a peer's N x K matrix before the next row
            table.row(rows[-1])
            save()
    finally:
        gc.unfreeze()
    table.close_op()
    tgts = targets(rows, opts.device)
    for line in target_lines(tgts):
        table.emit(line)
    if tgts and grid_name != "full":
        table.emit(f"   (the targets are set for the full grid's shapes; {grid_name} rows are small and only indicative)")
    elapsed, after = time.perf_counter() - started, save()
    table.emit(f"\nran {len(cases)} rows in {elapsed:.1f} s; before: {machine['uptime'] or machine['load_average']}; "
               f"after: {after['uptime'] or after['load_average']}")
    if args.plot:
        why = plot(rows, args.plot, title=f"vqkernels bench ({grid_name}, {opts.device}, {machine['processor']})")
        table.emit(f"plot: {args.plot}" if why is None else f"no plot: {why}")
    if args.json:
        table.emit(f"json: {args.json}")
    bad = [f"{r['label']}: {e['contender']} " + ("disagrees" if e.get("status") == "ok" else f"failed: {e['reason']}")
           for r in rows for e in r["results"] if e["family"] == "vqkernels"
           and (e.get("status") == "error" or (e.get("status") == "ok" and not e.get("agrees", False)))]
    if bad:
        print("vqkernels contenders that disagree with the best pick or failed: " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0

