"""``residual_assign``: the fused residual encoder, Q stages of nearest codes in one call.

Definition (``reference.py``): ``r_0 = x``; stage ``q`` assigns its input
``normalized(r_q, metric)`` (unit rows for cosine, ``r_q`` otherwise: what
:class:`vqkernels.ResidualQuantizer` feeds each stage) to ``codebooks[q]`` with
:func:`vqkernels.assign`'s rule (ties to the LOWEST index), then
``r_{q+1} = r_q - codebooks[q, idx_q]``. The residual and the sum of the picked codes are
carried in fp32 (fp64 for fp64 inputs) whatever the input dtype. Codes are subtracted as
given: for cosine pass unit-norm codes, as the quantizer's ``Codebook.codes()`` holds.

Returns ``indices int64 [N, Q]``, ``quantized [N, D]`` (``sum_q codebooks[q, idx_q]``,
added in stage order, in ``x``'s dtype) and ``distances [N, Q]`` (fp32; fp64 for fp64
inputs): each stage's winner distance to its stage input, recomputed exactly as
``assign`` does. Rows of ``x`` holding NaN/Inf get ``-1`` at every stage, NaN distances
and a NaN ``quantized`` row; a non-finite codebook is an error. No backend builds an
``N x K`` matrix. Fast backends choose with an expanded-form score, so, as for
``assign``, each stage's pick is guaranteed within :func:`vqkernels.ops.assign.tolerance`
of that stage's true minimum (given the residual of the earlier picks), not bitwise equal
to the reference's pick on near-ties; exact ties go to the lowest index everywhere.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import _dispatch, _metrics
from .._validation import (
    check_finite,
    check_metric,
    check_same_device,
    check_same_dtype,
    check_tensor,
    compute_dtype,
)


class ResidualAssignResult(NamedTuple):
    indices: torch.Tensor  #: int64 ``[N, Q]``, -1 for non-finite rows
    quantized: torch.Tensor  #: ``[N, D]`` in x's dtype, the sum of the picked codes
    distances: torch.Tensor  #: float32 (fp64 for fp64 inputs) ``[N, Q]``, each stage's winner distance


@_dispatch.custom_op("vqkernels::residual_assign", mutates_args=())  # eager calls skip torch.library's machinery
def _residual_assign_op(
    x: torch.Tensor, codebooks: torch.Tensor, metric: str, backend: str, check_codebook: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [N, D]``, ``codebooks [Q, K, D]`` -> ``indices [N, Q]``, ``quantized [N, D]``, ``distances [N, Q]``."""
    if check_codebook:
        check_finite("codebooks", codebooks.reshape(-1, codebooks.shape[-1]))
    N, D = x.shape
    Q = codebooks.shape[0]
    if N == 0:
        return (x.new_empty(0, Q, dtype=torch.int64), x.new_empty(0, D),
                x.new_empty(0, Q, dtype=compute_dtype(x.dtype)))
    indices, quantized, distances = _dispatch.call("residual_assign", backend, x.device, x.dtype, x, codebooks, metric)
    # Non-finite policy, in one place for every backend: -1 at every stage, NaN elsewhere.
    finite = torch.isfinite(x).all(-1, keepdim=True)
    indices = torch.where(finite, indices, torch.full_like(indices, -1))
    distances = torch.where(finite, distances, torch.full_like(distances, float("nan")))
    quantized = torch.where(finite, quantized, torch.full_like(quantized, float("nan"))).to(x.dtype)
    return indices, quantized, distances


@_residual_assign_op.register_fake
def _(x, codebooks, metric, backend, check_codebook):
    N, D = x.shape
    Q = codebooks.shape[0]
    return (x.new_empty(N, Q, dtype=torch.int64), x.new_empty(N, D),
            x.new_empty(N, Q, dtype=compute_dtype(x.dtype)))


def _stack_stage_codebooks(books) -> torch.Tensor:
    """Stages of different sizes ``[K_q, D]`` -> ``[Q, max K_q, D]``, each padded with copies of
    its own code 0: a copy sits at a higher index than its original, so it loses every tie
    to it (on every backend: equal codes score bit-identically) and is never picked."""
    if len(books) == 0:
        raise ValueError("codebooks is an empty sequence; expected one [K_q, D] codebook per stage")
    for q, b in enumerate(books):
        check_tensor(f"codebooks[{q}]", b, floating=True)
        if b.dim() != 2 or b.shape[0] < 1:
            raise ValueError(f"codebooks[{q}] must be [K_q, D] with K_q >= 1 (one stage's codes), got shape {tuple(b.shape)}")
        if b.shape[1] != books[0].shape[1]:
            raise ValueError(
                f"codebooks[{q}] has {b.shape[1]} features (shape {tuple(b.shape)}) but codebooks[0] has "
                f"{books[0].shape[1]}; every stage must have the same D"
            )
        check_same_device(**{"codebooks[0]": books[0], f"codebooks[{q}]": b})
        check_same_dtype(**{"codebooks[0]": books[0], f"codebooks[{q}]": b})
    K = max(b.shape[0] for b in books)
    return torch.stack([
        b if b.shape[0] == K else torch.cat([b, b[:1].expand(K - b.shape[0], -1)]) for b in books
    ]).detach()


def residual_assign(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    metric: str = "l2",
    *,
    backend: Optional[str] = None,
    check_codebook: bool = True,
) -> ResidualAssignResult:
    """Residual (multi-stage) encoding of every row of ``x``: Q nearest-code stages in one call.

    Stage ``q`` quantizes what the earlier stages left, ``r_q = x - sum_{p<q} codebooks[p, idx_p]``
    (its unit row for cosine), to ``codebooks[q]``. The Triton and CUDA backends run all
    stages for a tile of rows in one launch with the residual kept on chip; ``reference``
    and ``chunked`` (and ``cpu``) run the stages one after another with their ``assign``.

    Args:
        x: ``[N, D]`` vectors (fp16 / bf16 / fp32; fp64 on reference and chunked).
        codebooks: ``[Q, K, D]``, one codebook per stage, same dtype and device as ``x``; or a
            sequence of Q ``[K_q, D]`` codebooks of different sizes (per-stage codebook
            sizes), padded to ``max K_q`` with copies of each stage's code 0, which never win.
        metric: ``"l2"``, ``"cosine"`` or ``"dot"``.
        backend: force a backend (``"reference"``, ``"chunked"``, ``"cpu"``, ``"triton"``,
            ``"cuda"``); default: ``VQKERNELS_BACKEND`` or the fastest available.
        check_codebook: raise if the codebooks hold NaN/Inf (one host sync per call).

    Returns:
        ``ResidualAssignResult(indices int64 [N, Q], quantized [N, D], distances [N, Q])``:
        ties go to the lowest index at every stage; ``quantized`` is the sum of the picked
        codes in ``x``'s dtype; ``distances`` each stage's winner distance in fp32 (fp64 for
        fp64 inputs). Non-finite rows get ``-1`` at every stage and NaN.

    Example:
        >>> x, codebooks = torch.randn(1000, 64), torch.randn(8, 256, 64)
        >>> indices, quantized, distances = vqkernels.residual_assign(x, codebooks)
        >>> indices.shape, quantized.shape
        (torch.Size([1000, 8]), torch.Size([1000, 64]))
    """
    check_tensor("x", x, floating=True)
    sizes = None
    if isinstance(codebooks, (list, tuple)):
        sizes = [b.shape[0] if isinstance(b, torch.Tensor) else 0 for b in codebooks]
        codebooks = _stack_stage_codebooks(codebooks)
    check_tensor("codebooks", codebooks, floating=True)
    if codebooks.dim() != 3:
        raise ValueError(
            f"codebooks must be [Q, K, D] (one codebook per stage; [1, K, D] for a single stage), "
            f"got shape {tuple(codebooks.shape)}"
        )
    if x.dim() != 2:
        raise ValueError(f"x must be [N, D] (flatten leading dims first), got shape {tuple(x.shape)}")
    check_same_device(x=x, codebooks=codebooks)
    check_same_dtype(x=x, codebooks=codebooks)
    check_metric(metric, _metrics.METRICS)
    requested = _dispatch.requested_backend(backend) if backend is not None else ""
    Q, K, D = codebooks.shape
    if Q < 1 or K < 1 or D < 1:
        raise ValueError(f"codebooks must have Q >= 1 stages, K >= 1 codes and D >= 1 features, got shape {tuple(codebooks.shape)}")
    if x.shape[1] != D:
        raise ValueError(
            f"x has {x.shape[1]} features (shape {tuple(x.shape)}) but codebooks have {D} "
            f"(shape {tuple(codebooks.shape)}); expected x of shape [N, {D}]"
        )
    indices, quantized, distances = _residual_assign_op(
        x.detach().contiguous(), codebooks.detach().contiguous(), metric, requested, check_codebook
    )
    if sizes is not None and min(sizes) < codebooks.shape[1]:
        # A padding copy equals its stage's code 0, so should a backend ever pick one, code 0 is
        # the same code at the lower index: the pick the tie rule asks for.
        limit = torch.tensor(sizes, device=indices.device)
        indices = torch.where(indices >= limit, torch.zeros_like(indices), indices)
    return ResidualAssignResult(indices, quantized, distances)


__all__ = ["residual_assign", "ResidualAssignResult"]
