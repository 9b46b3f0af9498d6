"""What the CUDA (``_extension``) and CPU (``_cpu_extension``) loaders share: try the built
module, else a JIT build, once per process, and keep the reason when neither works.

Each loader module keeps its own ``_state`` dict and lock and passes its JIT steps in, so a
broken build is reported by ``vqkernels info`` and by a forced backend, never raised at import.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional


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
