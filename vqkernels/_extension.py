"""Loads the CUDA extension defensively: the built ``vqkernels._C``, else a JIT build.

Never imported at ``import vqkernels``; the first use of the ``cuda`` backend asks
:func:`unavailable_reason`, which tries once and keeps the reason for ``vqkernels info``.

1. ``vqkernels._C``, built by ``pip install --no-build-isolation .`` where a CUDA build of
   torch and nvcc were present.
2. Otherwise, with a CUDA build of torch, a GPU, nvcc and ninja: JIT-compile the same
   sources (``vqkernels/csrc`` in an installed package, ``csrc/`` in a checkout) with
   ``torch.utils.cpp_extension.load`` into ``$VQKERNELS_CACHE`` (default
   ``~/.cache/vqkernels/<torch>-cu<cuda>-sm<arch>``); later processes reuse the build.
   ``VQKERNELS_JIT=0`` turns this off.
3. Otherwise the backend is unavailable and :func:`status` says why. On a CPU-only
   machine the reason comes back at once: nvcc is never run there.

Either way the ops are registered as ``torch.ops.vqkernels.{assign,histogram,
cluster_stats,ema_update}_cuda`` (see csrc/vq_ops.cpp).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional

from . import _build_flags
from . import _extension_loader as _loader

_JIT_NAME = "vqkernels_C"
_state = {"tried": False, "module": None, "reason": None, "how": None}
_lock = threading.Lock()


def _sources_dir() -> Optional[Path]:
    """csrc/ with the CUDA sources: inside the installed package, else in the checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "vq_ops.cpp").is_file():
            return candidate
    return None


def _cache_dir(torch) -> Path:
    env = os.environ.get("VQKERNELS_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    major, minor = torch.cuda.get_device_capability()
    tag = f"{torch.__version__}-cu{torch.version.cuda}-sm{major}{minor}".replace("+", "_")
    return Path.home() / ".cache" / "vqkernels" / tag


def _jit_unavailable(torch) -> Optional[str]:
    """Why a JIT build cannot be attempted here (cheap checks only; None: it can)."""
    if os.environ.get("VQKERNELS_JIT", "1").strip() == "0":
        return "VQKERNELS_JIT=0 disables the JIT build"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (install a CUDA build of torch)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if _sources_dir() is None:
        return "the CUDA sources (vqkernels/csrc or csrc/) are not found, so the JIT build is impossible"
    from torch.utils import cpp_extension  # imports setuptools: only on this path

    if cpp_extension.CUDA_HOME is None:
        return "nvcc was not found for the JIT build (set CUDA_HOME or put nvcc on PATH)"
    if not cpp_extension.is_ninja_available():
        return "ninja was not found for the JIT build (pip install ninja)"
    return None


def _jit_build(torch) -> tuple:
    """Compile (or reuse) the JIT build; (True, cache dir) or (False, reason)."""
    src = _sources_dir()
    return _loader.jit_build(
        _cache_dir(torch), _JIT_NAME, "vqkernels: compiling the CUDA extension (first use, ~1-2 min)...",
        sources=sorted(str(p) for p in src.glob("*.cu")) + sorted(str(p) for p in src.glob("*.cpp")),
        extra_include_paths=[str(src / sub) for sub in _build_flags.INCLUDE_SUBDIRS],
        # The flags of setup.py (one list, _build_flags); the C++ standard is left to torch.
        extra_cflags=list(_build_flags.CXX_FLAGS), extra_cuda_cflags=list(_build_flags.NVCC_FLAGS))


def _load_locked():
    try:
        import torch
    except Exception as exc:  # pragma: no cover - torch is a dependency
        _state["reason"] = f"torch is not importable ({type(exc).__name__}: {exc})"
        return
    _loader.load_built_or_jit(_state, "vqkernels._C", "the CUDA extension", lambda: _jit_unavailable(torch),
                              lambda: _jit_build(torch))


def load():
    """The loaded extension (module or torch.ops namespace), or None (see :func:`unavailable_reason`)."""
    return _loader.load_once(_state, _lock, lambda: _load_locked(), "the CUDA extension")


def unavailable_reason() -> Optional[str]:
    """None when the extension is loaded, else why not (tries to load once)."""
    return None if load() is not None else _state["reason"]


def status() -> str:
    """One line for ``vqkernels info``: ``built``, ``JIT (cache dir)`` or ``unavailable: reason``."""
    return _loader.status_line(_state, load())


def ops():
    """``torch.ops.vqkernels`` with the ``*_cuda`` ops loaded, or raise BackendUnavailableError."""
    return _loader.torch_ops(_state, load(), "cuda")
