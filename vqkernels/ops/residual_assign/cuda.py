"""CUDA C++ ``residual_assign`` (csrc/kernels/residual_assign.cuh, registered by
csrc/residual_assign_ops.cpp): all Q stages for a block of 8 rows in one launch, one warp
per row, the residuals and the sums of the picked codes in shared memory, each stage's
codebook streamed through shared tiles of 32 codes that every row of the block reads.

Each lane scores its codes by their exact fp32 distance (direct difference; IEEE roots and
division for cosine), so exact ties stay ties and go to the lowest index at every stage.
Rows wider than the shared-memory budget (D > 1184) run the stages one after another with
the extension's ``assign`` kernels (Q launches), still this backend.
"""
from ... import _extension
from ..assign import cuda as _assign_cuda
from .reference import staged

MAX_RESIDENT_D = 1184  # kResidualMaxD in csrc/residual_assign_ops.cpp


def residual_assign(x, codebooks, metric):
    if x.shape[1] > MAX_RESIDENT_D:
        return staged(x, codebooks, metric, _assign_cuda.assign)
    return _extension.ops().residual_assign_cuda(x, codebooks, metric)
