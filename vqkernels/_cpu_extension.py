"""Loads the CPU extension defensively: the built ``vqkernels._C_cpu``, else a JIT build.

Never imported at ``import vqkernels``; the first use of the ``cpu`` backend (or
``vqkernels info``) asks :func:`unavailable_reason`, which tries once and keeps the reason.

1. ``vqkernels._C_cpu``, built by ``pip install --no-build-isolation .`` where a C++
   compiler and torch were present (portable flags, ``_build_flags.CPU_CXX_FLAGS``).
2. Otherwise JIT-compile ``csrc/cpu/*.cpp`` (``vqkernels/csrc/cpu`` in an installed
   package) with ``torch.utils.cpp_extension.load`` and ``-march=native`` into
   ``$VQKERNELS_CACHE/cpu/<torch>-cpu-<hash>`` (default ``~/.cache/vqkernels/...``, the
   hash of the sources and flags); later processes with the same sources reuse it. ``VQKERNELS_JIT=0`` turns this off.
3. Otherwise the backend is unavailable and the reason says why (a compiler error is
   kept, shortened, so ``vqkernels info`` and a forced ``backend="cpu"`` show it).

The ops are registered as ``torch.ops.vqkernels.assign_cpu`` (csrc/cpu/assign_cpu.cpp),
``histogram_cpu`` and ``cluster_stats_cpu`` (csrc/cpu/stats_cpu.cpp).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Optional

from . import _build_flags
from . import _extension_loader as _loader

_JIT_NAME = "vqkernels_C_cpu"
_state = {"tried": False, "module": None, "reason": None, "how": None}
_lock = threading.Lock()


def _sources_dir() -> Optional[Path]:
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc" / _build_flags.CPU_SUBDIR, here.parent / "csrc" / _build_flags.CPU_SUBDIR):
        if any(candidate.glob("*.cpp")):
            return candidate
    return None


def _sources_hash(src: Path) -> str:
    """Hash of the sources and flags: a changed source gets its own build folder, because a
    new process given a folder with a built library reuses it without comparing sources."""
    h = hashlib.sha1(repr(_build_flags.CPU_JIT_CXX_FLAGS + _build_flags.CPU_LDFLAGS).encode())
    for p in sorted(src.glob("*.cpp")) + sorted(src.glob("*.h")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:12]


def _cache_dir(torch, src: Path) -> Path:
    env = os.environ.get("VQKERNELS_CACHE", "").strip()
    root = Path(env).expanduser() / "cpu" if env else Path.home() / ".cache" / "vqkernels"
    return root / f"{torch.__version__}-cpu-{_sources_hash(src)}".replace("+", "_")


def compiler_available() -> bool:
    """True when a C++ compiler for the JIT build is on PATH (tests: a present compiler must build)."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def _jit_unavailable() -> Optional[str]:
    if os.environ.get("VQKERNELS_JIT", "1").strip() == "0":
        return "VQKERNELS_JIT=0 disables the JIT build"
    if _sources_dir() is None:
        return "the CPU sources (vqkernels/csrc/cpu or csrc/cpu) are not found, so the JIT build is impossible"
    if not compiler_available():
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')}) was found for the JIT build"
    from torch.utils import cpp_extension  # imports setuptools: only on this path

    if not cpp_extension.is_ninja_available():
        return "ninja was not found for the JIT build (pip install ninja)"
    return None


def _jit_build(torch) -> tuple:
    src = _sources_dir()
    try:
        build_dir = _cache_dir(torch, src)
    except OSError as exc:  # an unreadable source
        return False, f"the JIT build failed ({type(exc).__name__}: {exc})"
    return _loader.jit_build(build_dir, _JIT_NAME, "vqkernels: compiling the CPU extension (first use, ~1 min)...",
                             sources=sorted(str(p) for p in src.glob("*.cpp")),
                             extra_cflags=list(_build_flags.CPU_JIT_CXX_FLAGS),
                             extra_ldflags=list(_build_flags.CPU_LDFLAGS))


def _load_locked():
    import torch

    _loader.load_built_or_jit(_state, "vqkernels._C_cpu", "the CPU extension", _jit_unavailable,
                              lambda: _jit_build(torch))


def load():
    """The loaded extension (module or torch.ops namespace), or None (see :func:`unavailable_reason`)."""
    return _loader.load_once(_state, _lock, lambda: _load_locked(), "the CPU extension")


def unavailable_reason() -> Optional[str]:
    """None when the extension is loaded, else why not (tries to load once)."""
    return None if load() is not None else _state["reason"]


def status() -> str:
    """One line for ``vqkernels info``: ``built``, ``JIT (cache dir)`` or ``unavailable: reason``."""
    return _loader.status_line(_state, load())


def ops():
    """``torch.ops.vqkernels`` with the ``*_cpu`` ops loaded, or raise BackendUnavailableError."""
    return _loader.torch_ops(_state, load(), "cpu")
