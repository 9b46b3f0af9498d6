"""The one runner: machine description, timer, peak memory, and a row run (check, then time).

Speed is measured here, never asserted in tests.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from ..errors import BackendUnavailableError
from .specs import Case, Skip, SPECS, make_inputs

# GPU roofline: the floor of a row is max(flops / peak rate, bytes / bandwidth). 790 TFLOP/s
# is H100/H200-class dense bf16 as reachable in practice; fp32 inputs are held to the TF32
# rate (half of it), the floor a tf32 matmul could reach; 4.3e12 B/s is H200 copy bandwidth.
GPU_PEAK_FLOPS = {"bf16": 790e12, "fp16": 790e12, "fp32": 395e12, "fp64": 67e12}
GPU_BANDWIDTH = 4.3e12
PEERS = ("triton", "faiss", "vector_quantize_pytorch", "flash_kmeans", "fast_pytorch_kmeans", "numpy")
# Distribution names of modules whose import name differs, for the version lookup.
_DISTRIBUTIONS = {"faiss": ("faiss-cpu", "faiss-gpu", "faiss"), "vector_quantize_pytorch": ("vector-quantize-pytorch",),
                  "flash_kmeans": ("flash-kmeans",), "fast_pytorch_kmeans": ("fast-pytorch-kmeans",)}


# --------------------------------------------------------------------------- the machine
def _version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        mod = __import__(name)
    except Exception:
        return None
    found = [dist.version for d in _DISTRIBUTIONS.get(name, (name,)) for dist in metadata.distributions(name=d)]
    return getattr(mod, "__version__", None) or (found[0] if found else "installed")


def machine_info() -> dict:
    """Machine, versions, threads, the extension's state and the load, recorded next to every figure."""
    import vqkernels
    from vqkernels import _extension

    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            processor = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"python": platform.python_version(), "platform": platform.platform(), "hostname": socket.gethostname(),
            "processor": processor, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "vqkernels": vqkernels.__version__}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), l2_bytes=getattr(p, "L2_cache_size", None))
    info.update({name: _version(name) for name in PEERS})
    info["extension"] = _extension.status()
    return {**info, **load_now()}


def load_now() -> dict:
    """1, 5 and 15 minute load averages and ``uptime``'s line (None where the OS has none), recorded
    before and after every run: a busy machine skews every figure."""
    try:
        up = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        up = None
    return {"load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None, "uptime": up}


# --------------------------------------------------------------------------- time
def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Union[Callable[[], object], List[Callable[[], object]]], *, repeats: int = 5, warmup: int = 1,
              device: str = "cpu", max_seconds: Optional[float] = None, target_s: Optional[float] = None,
              max_repeats: Optional[int] = None) -> dict:
    """Seconds per call of ``fn`` (or of a list of calls taken in turn: rotating input sets).

    ``warmup`` untimed calls first. ``max_seconds`` stops repeating (after 3 timed calls)
    once that much time was spent. ``target_s`` instead times one probe call and fixes the
    repeats up front: enough to fill ``target_s`` (at least ``repeats``, at most
    ``max_repeats`` and what fits in ``max_seconds``), so that CUDA calls run back to back
    and a short kernel's time is not its launch latency. CUDA events around each call.
    Returns ``{"median", "p20", "p80", "min", "repeats"}`` (seconds).
    """
    fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
    for i in range(warmup):
        fns[i % len(fns)]()
    _sync(device)
    if target_s is not None:
        probe = max(time_call(fns[1 % len(fns)], repeats=1, warmup=0, device=device)["median"], 1e-6)
        fits = int(max_seconds / probe) if max_seconds is not None else repeats + int(target_s / probe)
        repeats, max_seconds = max(1, min(max(repeats, int(target_s / probe)), max_repeats or repeats, fits)), None
    times, events, started = [], [], time.perf_counter()
    for i in range(repeats):
        if device == "cuda":
            events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            events[-1][0].record()
            fns[i % len(fns)]()
            events[-1][1].record()
            if max_seconds is not None:  # the time spent is only known once the call is done
                events[-1][1].synchronize()
        else:
            t0 = time.perf_counter()
            fns[i % len(fns)]()
            times.append(time.perf_counter() - t0)
        if max_seconds is not None and i >= 2 and time.perf_counter() - started > max_seconds:
            break
    _sync(device)
    return _summary([s.elapsed_time(e) / 1e3 for s, e in events] or times)


def _summary(times: Sequence[float]) -> dict:
    p20, p50, p80 = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return {"median": float(p50), "p20": float(p20), "p80": float(p80), "min": min(times), "repeats": len(times)}


# --------------------------------------------------------------------------- peak memory
# On CPU the figure is the peak resident set size (VmHWM) above a baseline taken right
# before the call. VmHWM can be reset by writing "5" to /proc/self/clear_refs (Linux >= 4.0),
# so one process can measure several calls; glibc's malloc_trim(0) first hands freed heap
# pages back to the OS, so memory freed by earlier calls cannot be silently reused and hide
# a new peak. Anything that is not malloc/torch's CPU allocator (e.g. a CUDA context) is
# outside what this sees, and RSS counts every allocation, tensors or not (FAISS, numpy).
def _rss_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process; without /proc, the peak since it started."""
    try:
        with open("/proc/self/status") as f:
            return 1024 * next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))
    except (OSError, ValueError, IndexError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux ru_maxrss is in KiB


def _reset_peak_rss() -> bool:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: freed pages stay mapped
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak(fn: Callable[[], object], device: str = "cpu") -> tuple:
    """Run ``fn`` once; return ``(result, extra_peak_bytes, method)``: on GPU
    ``torch.cuda.max_memory_allocated`` above the allocation before the call, on CPU the
    peak RSS during the call above the RSS just before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        return result, max(0, extra), "torch.cuda.max_memory_allocated above the allocated memory before the call"
    reset = _reset_peak_rss()
    base = _rss_bytes("VmRSS" if reset else "VmHWM")
    result = fn()
    extra = max(0, _rss_bytes("VmHWM") - base)
    how = ("(VmHWM reset via /proc/self/clear_refs, free heap trimmed first)" if reset else
           "(VmHWM could not be reset: only growth past the process's earlier peak is seen)")
    return result, extra, "peak RSS above the RSS before the call " + how


# --------------------------------------------------------------------------- one row
@dataclass
class Options:
    device: str = "cpu"
    repeats: int = 5
    warmup: int = 1
    max_seconds: Optional[float] = None
    memory: str = "auto"  # auto | subprocess | inprocess | off
    max_dense_bytes: float = 2.0 * 2**30
    seed: int = 0
    subprocess_timeout: float = 900.0
    memory_on_checked_call: bool = False  # quick/smoke: measure memory on the checked call, not a separate one
    subprocess_memory: bool = True  # memory="auto" on CPU: ops that ask for it measured in a fresh interpreter
    kernel_level: bool = False  # time the backend's call (dispatch, no validation) instead of the public op
    rotate: int = 1  # input sets taken in turn by the timed calls (more than the L2 cache holds)
    on_device: bool = False  # draw the inputs on the device (large GPU rows)
    target_s: Optional[float] = None  # repeats to fill this many seconds (up to max_repeats)
    max_repeats: Optional[int] = None
    deadline: Optional[float] = None  # time.monotonic() after which contenders are skipped ("time budget")
    alternate: bool = False  # time the contenders in turn, one call each per round (a drifting load hits all alike)


def run_case(case: Case, opts: Options, progress: Callable[[str], None] = lambda s: None,
             only: Optional[Sequence[str]] = None) -> dict:
    """Run, check and time every contender (or those named in ``only``) on one row; the row as a dict.

    Each contender's first call is the checked one; all outputs are checked against each
    other before the row's times are reported; then peak memory and the ratios. With
    ``opts.alternate`` the timed calls run in rounds, every contender once per round.
    """
    device, spec = opts.device, case.spec
    sets = [make_inputs(case, device, opts.seed + i, opts.on_device) for i in range(max(1, opts.rotate))]
    entries, outputs, rounds = {}, {}, {}
    mode = opts.memory if opts.memory != "auto" else "subprocess" if (
        opts.device == "cpu" and spec.memory_subprocess and opts.subprocess_memory) else "inprocess"
    checked_memory = mode == "inprocess" and opts.memory_on_checked_call
    for contender in [c for c in spec.contenders if only is None or c.name in only]:
        entry = entries[contender.name] = {"contender": contender.name, "family": contender.family}
        started = time.perf_counter()
        try:
            if opts.deadline is not None and time.monotonic() >= opts.deadline:
                raise Skip("time budget")
            prepared = [contender.prepare(case, inp, device, opts) for inp in sets]
            fns, output = [p.fn for p in prepared], prepared[0].output
            del prepared
            # the first call: warm-up, the output that is checked and (quick grids) the peak memory
            out, extra, method = measure_peak(fns[0], device) if checked_memory else (fns[0](), None, None)
            _sync(device)
            outputs[contender.name] = output(out)
            del out
            if mode == "inprocess" and not checked_memory:
                _, extra, method = measure_peak(fns[0], device)
            if method:
                entry.update(peak_mem_bytes=extra, mem_method=method + (" (first call)" if checked_memory else ""))
            for i in range(max(0, opts.warmup - 1)):
                fns[i % len(fns)]()
            if opts.alternate:
                rounds[contender.name] = fns  # timed below, every contender once per round
                continue
            max_s = opts.max_seconds
            if opts.deadline is not None:  # leave time for the rest of the run
                max_s = min(max_s or float("inf"), max(0.0, opts.deadline - time.monotonic()) / 2)
            t = time_call(fns, repeats=opts.repeats, warmup=0, device=device, max_seconds=max_s, target_s=opts.target_s,
                          max_repeats=opts.max_repeats)
            _timed(entry, t, case, progress, time.perf_counter() - started)
        except Exception as exc:  # not installed, refused, or a backend without this op: skipped, with why
            skipped = isinstance(exc, (Skip, BackendUnavailableError))
            entry.update(status="skipped" if skipped else "error",
                         reason=str(exc) if isinstance(exc, Skip) else f"{type(exc).__name__}: {exc}")
            outputs.pop(contender.name, None)
        finally:
            fns = None  # a contender's inputs and modules go before the next one's are made
            gc.collect()
    times = {name: [] for name in rounds}
    for i in range(opts.repeats if rounds else 0):
        for name, fns in list(rounds.items()):
            try:
                times[name].append(time_call(fns[i % len(fns)], repeats=1, warmup=0, device=device)["median"])
            except Exception as exc:
                entries[name].update(status="error", reason=f"{type(exc).__name__}: {exc}")
                del rounds[name], times[name], outputs[name]
    for name, ts in times.items():
        _timed(entries[name], _summary(ts), case, progress, sum(ts))
    rounds.clear()
    for name, chk in spec.check(case, sets[0], outputs).items():
        entries[name].update(agree=chk.agree, agrees=chk.ok, check_detail=chk.detail)
    del sets, outputs
    gc.collect()
    if mode == "subprocess":
        for name, entry in entries.items():
            if entry.get("status") == "ok":
                progress(f"  {name}: peak memory in a fresh subprocess")
                entry.update(memory_in_subprocess(case, name, opts))
    _compare(case, entries, device)
    # the rows of the original grid keep their fields
    row = {k: v for k, v in asdict(case).items() if k not in ("variant", "Q", "cdim") or v}
    row.update(label=case.label(), results=list(entries.values()), memory_mode=mode, check=spec.check_text,
               work=case.work())
    return row


def _timed(entry: dict, t: dict, case: Case, progress, spent: float):
    entry.update(status="ok", median_s=t["median"], p20_s=t["p20"], p80_s=t["p80"], min_s=t["min"],
                 repeats=t["repeats"], throughput=case.throughput(t["median"]), throughput_unit=case.spec.unit)
    progress(f"  {entry['contender']}: {t['median'] * 1e3:.2f} ms ({spent:.1f} s)")


def _compare(case: Case, entries: Dict[str, dict], device: str):
    """Ratio to the best agreeing peer, and on GPU the fraction of the roofline floor."""
    peers = [e["median_s"] for e in entries.values()
             if e["family"] == "peer" and e.get("status") == "ok" and e.get("agrees", False)]
    best, w = min(peers, default=None), case.work()
    floor = max(w["flops"] / GPU_PEAK_FLOPS[case.dtype], w["bytes"] / GPU_BANDWIDTH) if device == "cuda" else None
    for e in entries.values():
        if e.get("status") == "ok":
            e["vs_best_peer"] = e["median_s"] / best if best else None
            if floor is not None:
                e.update(floor_s=floor, floor_fraction=floor / e["median_s"])


# A fresh interpreter per measurement: its allocator has served nothing yet, so the peak
# above the baseline (taken after the inputs and the module exist) is the call's own.
_PROBE = "import sys; from vqkernels.bench.runner import _memory_probe_main; _memory_probe_main(sys.argv[1])"


def memory_in_subprocess(case: Case, name: str, opts: Options) -> dict:
    """Peak memory of contender ``name``'s call on ``case``, measured in a fresh interpreter."""
    spec = json.dumps({"case": asdict(case), "contender": name, "device": opts.device, "seed": opts.seed,
                       "max_dense_bytes": opts.max_dense_bytes})
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, spec], capture_output=True, text=True,
                              timeout=opts.subprocess_timeout)
    except subprocess.TimeoutExpired:
        return {"peak_mem_bytes": None, "mem_method": f"subprocess timed out after {opts.subprocess_timeout:g} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"peak_mem_bytes": None, "mem_method": f"subprocess failed: {tail[0][:200]}"}
    result = json.loads(lines[-1])
    return {"peak_mem_bytes": result["bytes"], "mem_method": "fresh subprocess: " + result["method"]}


def _memory_probe_main(spec_json: str):
    spec = json.loads(spec_json)
    case, device = Case(**spec["case"]), spec["device"]
    opts = Options(device=device, max_dense_bytes=spec["max_dense_bytes"])
    contender = next(c for c in SPECS[case.op].contenders if c.name == spec["contender"])
    # Load the code paths (imports, kernels, thread pools) on a tiny row first, so the
    # one-off costs of a cold interpreter are not charged to the call.
    # (k-means rows keep N >= K.)
    tiny = Case(**{**spec["case"], "N": min(case.N, max(64, case.K if case.iters else 0))})
    contender.prepare(tiny, make_inputs(tiny, device, spec["seed"]), device, opts).fn()
    prepared = contender.prepare(case, make_inputs(case, device, spec["seed"]), device, opts)
    _, extra, method = measure_peak(prepared.fn, device)
    print(json.dumps({"bytes": extra, "method": method}), flush=True)
