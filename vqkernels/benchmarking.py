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
    try:
        import vqkernels

        info["vqkernels"] = vqkernels.__version__
    except Exception:  # pragma: no cover - the package is importing us
        info["vqkernels"] = None
    for name in ("triton", "faiss", "vector_quantize_pytorch", "flash_kmeans", "fast_pytorch_kmeans", "numpy"):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, "__version__", None) or _dist_version(name) or "installed"
        except Exception:
            info[name] = None
    info["load_average"] = load_average()
    return info


# Distribution names of modules whose import name differs, for the version lookup.
_DISTRIBUTIONS = {
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss"),
    "vector_quantize_pytorch": ("vector-quantize-pytorch",),
    "flash_kmeans": ("flash-kmeans",),
    "fast_pytorch_kmeans": ("fast-pytorch-kmeans",),
}


def _dist_version(module: str) -> Optional[str]:
    from importlib import metadata

    for dist in _DISTRIBUTIONS.get(module, (module,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def load_average() -> Optional[list]:
    """1, 5 and 15 minute load averages (None where the OS has none): a busy machine skews every figure."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


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


# --------------------------------------------------------------------------- peak memory
# On CPU the figure is the peak resident set size (VmHWM) above a baseline taken right
# before the call. VmHWM can be reset by writing "5" to /proc/self/clear_refs (Linux >= 4.0),
# so one process can measure several calls; glibc's malloc_trim(0) first hands freed heap
# pages back to the OS, so memory freed by earlier calls cannot be silently reused and hide
# a new peak. Anything that is not malloc/torch's CPU allocator (e.g. a CUDA context) is
# outside what this sees, and RSS counts every allocation, tensors or not (FAISS, numpy).

def current_rss_bytes() -> int:
    """Resident memory of this process now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def high_water_rss_bytes() -> int:
    """Peak resident memory since the process started or :func:`reset_peak_rss` (VmHWM)."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> bool:
    """Collect garbage and return free malloc pages to the OS (glibc malloc_trim); False if unavailable."""
    import gc

    gc.collect()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def measure_peak_rss(fn: Callable[[], object]) -> tuple:
    """Run ``fn`` once; return ``(result, extra_peak_bytes, method)``.

    ``extra_peak_bytes`` is the peak RSS during the call above the RSS just before it.
    """
    trimmed = release_free_memory()
    reset = reset_peak_rss()
    base = current_rss_bytes() if reset else high_water_rss_bytes()
    result = fn()
    extra = max(0, high_water_rss_bytes() - base)
    method = "peak RSS above the RSS before the call"
    if reset:
        method += " (VmHWM reset via /proc/self/clear_refs"
        method += ", free heap trimmed first)" if trimmed else ")"
    else:
        method += " (VmHWM could not be reset: only growth past the process's earlier peak is seen)"
    return result, extra, method


def measure_peak_cuda(fn: Callable[[], object], device=None) -> tuple:
    """Run ``fn`` once on the GPU; return ``(result, extra_peak_bytes, method)`` from
    ``torch.cuda.max_memory_allocated`` above the allocated memory before the call."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    extra = max(0, torch.cuda.max_memory_allocated(device) - base)
    return result, extra, "torch.cuda.max_memory_allocated above the allocated memory before the call"
