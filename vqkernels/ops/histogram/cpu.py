"""``histogram`` on the ``cpu`` backend: chunked's torch calls, on purpose.

The C++ CPU extension implements ``assign`` only; for this op chunked's vectorised torch
calls are what the extension would do (see docs/design.md, "cpu backend"), so the
backend runs them rather than a slower twin. Forcing ``backend="cpu"`` still requires
the extension to be loaded, like every op of a backend.
"""
from .chunked import histogram  # noqa: F401
