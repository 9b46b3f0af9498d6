"""Argument checks shared by the public ops.

Shape, dtype and device checks run in Python before an op is called (they are static,
so ``torch.compile`` traces them away). Value checks (non-finite data, out-of-range
indices) need the data, so they run inside the custom op's implementation, where a
graph break cannot happen. Every message names the argument, what was given and what
was expected.
"""
from __future__ import annotations

import torch

from ._metrics import METRICS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(name: str, value, *, floating: bool = False, integer: bool = False, min_dim: int = 0, dims=None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        expected = ", ".join(_dtype_name(d) for d in FLOAT_DTYPES)
        raise TypeError(f"{name} must be a floating tensor ({expected}), got dtype {_dtype_name(value.dtype)}")
    if integer and value.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int64 or int32 tensor of code indices, got dtype {_dtype_name(value.dtype)}")
    if dims is not None and value.dim() not in dims:
        want = " or ".join(str(d) for d in dims)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(value.shape)}")
    return value


def check_same_device(**tensors):
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; expected the same device")


def check_same_dtype(**tensors):
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {_dtype_name(t.dtype)} but {first_name} has dtype {_dtype_name(first.dtype)}; "
                "expected the same dtype (cast one of them)"
            )


def check_codebook_size(name: str, K):
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"{name} must be an int, got {type(K).__name__}")
    if K < 1:
        raise ValueError(f"{name} must be >= 1 (the number of codes), got {K}")


def check_metric(metric, allowed=METRICS):
    if metric not in allowed:
        raise ValueError(f"metric must be one of {allowed}, got {metric!r}")


def check_codebook_axis(name: str, value: torch.Tensor, flag: str = "codebook_axis", extra_dims: int = 0):
    """``value`` must have a leading codebook axis: ``[C, ...]`` plus ``extra_dims`` trailing dims.

    ``flag`` is the keyword the caller used (``codebook_axis`` or its alias ``heads``), so the
    message names what the user wrote.
    """
    letter = "H" if flag == "heads" else "C"
    if value.dim() < 1 + extra_dims:
        tail = ", D" if extra_dims else ""
        raise ValueError(
            f"{flag}=True needs {name} of shape [{letter}, ...{tail}] (the codebook axis first), got shape {tuple(value.shape)}"
            + (" (a scalar)" if value.dim() == 0 else "")
        )


def leading_axis_shape(value: torch.Tensor, extra_dims: int = 0) -> tuple:
    """``value [C, ..., *extra]`` viewed as ``[C, N, *extra]``: the dims after C flattened into N."""
    C = value.shape[0]
    extra = tuple(value.shape[value.dim() - extra_dims :]) if extra_dims else ()
    n = value.numel() // max(1, C * _prod(extra)) if C else 0
    return (C, n, *extra)


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def check_finite(name: str, value: torch.Tensor, ignore_rows=None):
    """Raise if ``value`` holds NaN/Inf, naming the rows affected (needs the data: a host sync).

    ``ignore_rows`` (bool ``[N]``) marks rows whose values do not matter (masked rows).
    """
    if ignore_rows is None and all_finite(value):
        return
    finite = torch.isfinite(value)
    if value.dim() > 1:
        finite = finite.flatten(1).all(1)
    if ignore_rows is not None:
        finite = finite | ignore_rows
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        shown = bad[:8].tolist()
        more = f" and {bad.numel() - len(shown)} more" if bad.numel() > len(shown) else ""
        raise ValueError(f"{name} contains NaN or Inf (rows {shown}{more}); expected finite values")


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when every element of every tensor is finite, in one reduction per tensor and one
    host read: a sum is finite only if all its terms are (NaN and Inf propagate), so a finite
    sum is a proof; a non-finite one (which an overflow can also give) is settled by
    :func:`check_finite`'s exact per-element pass."""
    sums = [t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in tensors if t.numel()]
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


def check_indices_in_range(name: str, indices: torch.Tensor, K: int):
    """Indices must be < K; negative values mean 'masked' and are allowed (needs the data)."""
    if indices.numel() and bool((indices >= K).any()):
        worst = int(indices.max())
        raise ValueError(f"{name} holds index {worst}, expected values in [0, {K}) or negative for masked rows")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64, everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
