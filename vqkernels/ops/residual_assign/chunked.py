"""Chunked ``residual_assign``: the stages one after another with the chunked ``assign``
(tiled, no N x K matrix; each stage one call)."""
from ..assign import chunked as _assign_chunked
from .reference import staged


def residual_assign(x, codebooks, metric):
    return staged(x, codebooks, metric, _assign_chunked.assign)
