"""Timing and machine-description helpers shared by ``vqkernels bench`` and benchmarks/.

Medians over repeats after warm-up; CUDA events on GPU. Speed is measured here, never
asserted in tests.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Optional

import torch


def time_call(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, device: str = "cpu",
              max_seconds: Optional[float] = None) -> dict:
    """Run ``fn`` ``warmup`` times, then up to ``repeats`` times; seconds per call.

    Returns ``{"median": s, "p20": s, "p80": s, "repeats": n}``. ``max_seconds`` stops
    repeating early (after at least 3 timed calls) once that much time was spent.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    started = time.perf_counter()
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if max_seconds is not None and len(times) >= 3 and time.perf_counter() - started > max_seconds:
            break
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"median": statistics.median(times), "p20": q(0.2), "p80": q(0.8), "repeats": len(times)}


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def machine_info() -> dict:
    """Machine, versions and threads, recorded next to every figure."""
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for name in ("triton", "faiss", "vector_quantize_pytorch", "flash_kmeans", "numpy"):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, "__version__", "installed")
        except Exception:
            info[name] = None
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
