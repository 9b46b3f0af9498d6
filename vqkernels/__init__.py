"""vqkernels: fast vector quantization for PyTorch.

Fused kernels for the hot ops of a VQ layer (``assign``, ``histogram``, ``cluster_stats``,
``ema_update_``) with pure-PyTorch references, ``kmeans`` built on them, and (in
``vqkernels.quantizer`` / ``vqkernels.diagnostics``) the Quantizer module and the
codebook-collapse diagnostics. Heavy optional packages (triton, matplotlib, the CUDA
extension) are imported only when used.
"""
__version__ = "0.1.0"

from .ops import (
    AssignResult,
    BackendUnavailableError,
    ClusterStats,
    KMeansResult,
    assign,
    cluster_stats,
    ema_update_,
    histogram,
    kmeans,
    residual_assign,
    ResidualAssignResult,
)
from . import checkpoints, diagnostics, distributed
from .checkpoints import UnknownLayoutError
from .diagnostics import CodebookMonitor, report
from .quantizer import LossBreakdown, Quantizer, QuantizerOutput, QuantizerOutputWithBreakdown
from .residual import FactorizedResidualQuantizer, GroupedResidualQuantizer, ResidualOutput, ResidualQuantizer

__all__ = [
    "__version__",
    "assign",
    "AssignResult",
    "histogram",
    "cluster_stats",
    "ClusterStats",
    "ema_update_",
    "kmeans",
    "KMeansResult",
    "residual_assign",
    "ResidualAssignResult",
    "BackendUnavailableError",
    "Quantizer",
    "QuantizerOutput",
    "QuantizerOutputWithBreakdown",
    "LossBreakdown",
    "ResidualQuantizer",
    "GroupedResidualQuantizer",
    "FactorizedResidualQuantizer",
    "ResidualOutput",
    "CodebookMonitor",
    "report",
    "diagnostics",
    "checkpoints",
    "distributed",
    "UnknownLayoutError",
]
