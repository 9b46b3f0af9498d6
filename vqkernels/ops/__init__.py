"""The public ops; each folder holds the op's definition (reference.py) beside its backends.

Every op takes an optional leading codebook axis ``C`` of independent codebooks, handled in
one backend call (the rule is written once, in :func:`vqkernels.assign`'s docstring).
"""
from ..errors import BackendUnavailableError
from .assign import AssignResult, assign
from .cluster_stats import ClusterStats, cluster_stats
from .ema_update import ema_update_
from .histogram import histogram
from .kmeans import KMeansResult, kmeans
from .residual_assign import ResidualAssignResult, residual_assign

__all__ = [
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
]
