"""Helpers shared by the Triton kernels of every op (imported only by ``ops/<op>/triton.py``).

Nothing here runs at ``import vqkernels``: the dispatcher imports a Triton backend module
on first use, and that module imports this one.

* :func:`interpreting` — True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors,
  slowly): launchers then use one small fixed config instead of autotuning, because
  timing configs in the interpreter measures Python, not the kernel.
* :func:`dot_precision` — the ``tl.dot(input_precision=...)`` that honours
  ``torch.get_float32_matmul_precision()`` for fp32 inputs.
* :func:`num_programs` — a persistent-style grid size (a few programs per SM).
* :func:`smem_bytes_ok` — config pruning by a shared-memory estimate.
* :func:`block_and` — ``mask & scalar_condition`` in a form the interpreter accepts.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Largest shared memory we plan a config for. Hopper allows 227 KiB per block; staying
# under 200 KiB leaves room for the compiler's own scratch (reductions, layout changes).
SMEM_BUDGET = 200 * 1024

# torch.get_float32_matmul_precision() -> tl.dot input_precision for fp32 operands.
# "highest" promises fp32 products (no tensor-core rounding): "ieee". "high" allows a
# little rounding: "tf32x3" (three tf32 products, about fp32 accuracy at a third of the
# tf32 rate). "medium" allows tf32: one tf32 product, 10-bit mantissas.
_FP32_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for a ``tl.dot`` on ``dtype`` operands (a constexpr of the kernels).

    fp16/bf16 products are exact in the fp32 accumulator, so the setting only matters
    for fp32; they get "ieee", which Triton ignores for 16-bit operands, so that one
    compiled variant serves every precision setting.
    """
    if dtype != torch.float32:
        return "ieee"
    return _FP32_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")


def uses_tf32(dtype: torch.dtype) -> bool:
    """True when fp32 ``assign`` scores are computed with tf32-rounded operands."""
    return dtype == torch.float32 and dot_precision(dtype) != "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 for CPU tensors (the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def num_programs(device: torch.device, work_items: int, per_sm: int = 4) -> int:
    """Grid size for a grid-stride kernel: enough programs to fill the GPU, no more than the work."""
    return max(1, min(work_items, per_sm * sm_count(device)))


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def smem_bytes_ok(nbytes: int) -> bool:
    return nbytes <= SMEM_BUDGET


def device_guard(t: torch.Tensor):
    """Context that makes ``t``'s CUDA device current (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return _NullContext()


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@triton.jit
def block_and(block_mask, cond):
    """``block_mask & cond`` for a scalar ``cond``, broadcast explicitly (the interpreter
    rejects a mask built from a block and a scalar boolean)."""
    return block_mask & ((block_mask.to(tl.int32) * 0 + cond.to(tl.int32)) != 0)
