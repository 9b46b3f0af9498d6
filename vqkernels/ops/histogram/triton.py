"""Triton backend of ``histogram``: the kernels and launcher live in ``ops/_triton_histogram.py``,
shared with ``cluster_stats``'s Triton backend (no op imports another op's backend)."""
from .._triton_histogram import compile_cases, histogram

__all__ = ["histogram", "compile_cases"]
