"""What the CUDA (``_extension``) and CPU (``_cpu_extension``) loaders share: try the built
module, else a JIT build, once per process, and keep the reason when neither works.

Each loader module keeps its own ``_state`` dict and lock and passes its JIT steps in, so a
broken build is reported by ``vqkernels info`` and by a forced backend, never raised at import.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from typing import Callable, Optional

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock, a stale baton is left alone
    fcntl = None


def load_built_or_jit(state: dict, built: str, what: str, jit_unavailable: Callable[[], Optional[str]],
                      jit_build: Callable[[], tuple]) -> None:
    """Fill ``state`` (module, how, reason): the built module ``built``, else the JIT build.
    ``what`` names the extension in messages ("the CPU extension")."""
    built_failure = None
    try:
        state["module"] = importlib.import_module(built)
        state["how"] = "built"
        return
    except ModuleNotFoundError as exc:
        if exc.name != built:  # the module exists but imports something missing
            built_failure = f"loading {built} failed: ModuleNotFoundError: {exc}"
    except Exception as exc:  # an ABI mismatch (undefined symbol) and the like: worth reporting
        built_failure = f"loading {built} failed: {type(exc).__name__}: {exc}"
    prefix = built_failure if built_failure else f"{what} {built} is not built"
    reason = jit_unavailable()
    if reason is not None:
        state["reason"] = f"{prefix}, and {reason}"
        return
    ok, detail = jit_build()
    if not ok:
        state["reason"] = f"{prefix}, and {detail}"
        return
    import torch

    state["module"] = torch.ops.vqkernels
    state["how"] = f"JIT ({detail})" + (f"; {built_failure}" if built_failure else "")


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold an exclusive lock on ``build_dir`` for one JIT build, and clear a stale ``lock`` file.

    torch's JIT build guards its folder with a ``lock`` file that only the builder deletes: a
    build killed midway (Ctrl-C during "compiling...", a timeout, the OOM killer) leaves it
    behind, and every later process waits for it forever. Our lock is an OS lock (flock),
    released when its holder dies however it dies, and every vqkernels build takes it first;
    so once it is held, a ``lock`` file in the folder belongs to no live build."""
    if fcntl is None:
        yield
        return
    with open(build_dir / "vqkernels-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # waits while another process builds here
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def jit_build(build_dir: Path, name: str, announce: str, **load_kwargs) -> tuple:
    """``torch.utils.cpp_extension.load`` of ``name`` into ``build_dir`` under :func:`_build_lock`;
    ``(True, build_dir)`` or ``(False, reason)``. ``announce`` is printed before a first build."""
    from torch.utils import cpp_extension

    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with _build_lock(build_dir):
            if not any(build_dir.glob(f"{name}*.so")):
                print(announce, file=sys.stderr, flush=True)
            cpp_extension.load(name=name, build_directory=str(build_dir), is_python_module=False, verbose=False,
                               **load_kwargs)
    except Exception as exc:  # a compiler error, an unwritable cache, ...
        detail = " ".join(str(exc).split())[-400:]
        return False, f"the JIT build in {build_dir} failed ({type(exc).__name__}: {detail})"
    return True, str(build_dir)


def load_once(state: dict, lock, load_locked: Callable[[], None], what: str):
    """The loaded extension (module or torch.ops namespace) or None; tries once per process."""
    if not state["tried"]:
        with lock:
            if not state["tried"]:
                try:
                    load_locked()
                except Exception as exc:  # never let a loader bug escape to the caller
                    state["module"] = None
                    state["reason"] = f"loading {what} failed: {type(exc).__name__}: {exc}"
                state["tried"] = True
    return state["module"]


def status_line(state: dict, loaded) -> str:
    """One line for ``vqkernels info``: ``built``, ``JIT (cache dir)`` or ``unavailable: reason``."""
    return state["how"] if loaded is not None else f"unavailable: {state['reason']}"


def torch_ops(state: dict, loaded, backend: str):
    """``torch.ops.vqkernels`` when the extension is loaded, else BackendUnavailableError."""
    if loaded is None:
        from .errors import BackendUnavailableError

        raise BackendUnavailableError(f"the vqkernels '{backend}' backend cannot run: {state['reason']}")
    import torch

    return torch.ops.vqkernels
