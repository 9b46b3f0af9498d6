"""Loads the compiled CUDA extension ``vqkernels._C`` defensively.

Never imported at ``import vqkernels``; the first use of the ``cuda`` backend asks
:func:`unavailable_reason`, which tries once and keeps the reason for ``vqkernels info``.
(The JIT build path arrives with the CUDA sources.)
"""
from __future__ import annotations

import importlib
from typing import Optional

_state = {"tried": False, "module": None, "reason": None, "how": None}


def load():
    """The loaded extension module, or None (see :func:`unavailable_reason`)."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["module"] = importlib.import_module("vqkernels._C")
            _state["how"] = "built"
        except ImportError as exc:
            _state["reason"] = f"the CUDA extension vqkernels._C is not built ({exc})"
        except Exception as exc:  # an ABI mismatch and the like: a real failure, reported
            _state["reason"] = f"loading vqkernels._C failed: {type(exc).__name__}: {exc}"
    return _state["module"]


def unavailable_reason() -> Optional[str]:
    return None if load() is not None else _state["reason"]


def status() -> str:
    """One line for ``vqkernels info``: built / JIT / unavailable and why."""
    if load() is not None:
        return _state["how"]
    return f"unavailable: {_state['reason']}"
