"""The l2 shift of the Triton and CUDA assign launchers: one rule, read by both.

Both kernels rank codes by the expanded score ``||c||^2 - 2 x.c``. When a common offset
dominates a codebook (``||m||^2`` large next to the codes' spread around their mean
``m``), that difference cancels: at an offset of norm 1e4 the fp32 rounding of ``x.c``
(about ``u |x| |c|`` = 6) dwarfs distances of 13-53. l2 distances do not change when x
and the codes are shifted by the same vector, so the launchers then score ``x - m``
against ``c - m``: shifted copies in the input dtype, made before the launch, with the
kernels unchanged. The winner's exact distance is still computed on the original x and
codes.

Why copies and not a shift inside the kernels: the Triton assign variants run at 240-255
registers and the CUDA mma kernel at its 128-register cap; a shift applied as each tile is
loaded spilled ~10 Triton variants on sm_90 and the CUDA mma kernel (72 / 36 bytes).

Every l2 call shifts, with no host sync (the training step syncs nowhere, issue #14; the
chunked backend centres the same way): where a codebook's offset does not dominate, its
shift is exactly 0, and ``x - 0`` rounds to ``x`` in every dtype, so its picks and
distances are bit for bit the unshifted ones. The price is paid by every l2 call: one pass
over x and the codebook for the copies, and the split epilogue (docs/gpu_expectations.md).

The shift is the codebook mean rounded to 8 significant bits (bfloat16): it removes all
but ~2^-9 of the offset (the cancellation shrinks by ~2^16), and data on a coarse grid
(small integers plus an offset) stay exact after the shift, so exact ties between codes
stay exact ties and still go to the lowest index. It is applied only where the offset
dominates, otherwise it is exactly 0:

* fp32 inputs: ``||m||^2 > 4 * spread`` (the chunked backend's threshold);
* fp16 / bf16 inputs: ``||m||^2 > 2^15 * spread``. Their shifted operands are rounded to
  the input dtype, which costs up to 2^-9 of the centred values where a feature of ``m``
  is not large next to the data; unshifted, the products are exact and only the fp32
  accumulation rounds (``2^-24 ||m||^2``). The shift pays only past 2^15.

``spread = mean_k ||c_k - m||^2``, taken as ``mean_k ||c_k||^2 - ||m||^2`` (one pass, no
``[C, K, D]`` temporary; its rounding only moves the threshold a little). A codebook with a
NaN or Inf code fails the comparison and is not shifted.
"""
from __future__ import annotations

import torch

_THRESHOLD = {torch.float32: 4.0, torch.float16: 2.0**15, torch.bfloat16: 2.0**15}


def l2_centre(codebook: torch.Tensor) -> torch.Tensor:
    """``codebook [C, K, D]`` -> the shift ``[C, D]`` (float32, all zeros where it is not applied)."""
    K = codebook.shape[1]
    threshold = _THRESHOLD.get(codebook.dtype, 4.0)
    mean = codebook.mean(1, dtype=torch.float32)  # [C, D]
    mean_sq = torch.linalg.vector_norm(codebook, dim=(1, 2), dtype=torch.float32).square() / K  # [C]
    m_sq = mean.square().sum(-1)
    # m_sq > t * (mean_sq - m_sq), written without the subtraction
    dominated = (1.0 + threshold) * m_sq > threshold * mean_sq
    rounded = mean.to(torch.bfloat16).float()
    return torch.where(dominated.unsqueeze(-1), rounded, torch.zeros_like(rounded)).contiguous()


def shifted(t: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``t [C, M, D] - centre [C, D]`` per codebook, computed in fp32 and rounded once to ``t``'s dtype
    (type promotion reads 16-bit ``t`` as fp32 on the fly: one fp32 temporary, not two)."""
    return (t - centre.unsqueeze(1)).to(t.dtype).contiguous()
