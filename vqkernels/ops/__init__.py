"""The public ops; each folder holds the op's definition (reference.py) beside its backends."""
from ._dispatch import BackendUnavailableError
from .assign import AssignResult, assign
from .histogram import histogram
from .kmeans import KMeansResult, kmeans
from .stats import ClusterStats, cluster_stats, ema_update_

__all__ = [
    "assign",
    "AssignResult",
    "histogram",
    "cluster_stats",
    "ClusterStats",
    "ema_update_",
    "kmeans",
    "KMeansResult",
    "BackendUnavailableError",
]
