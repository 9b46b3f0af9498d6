"""Test configuration: which backends and devices run, poisoned outputs, shared checks.

Without a GPU, the Triton kernels run on the CPU under ``TRITON_INTERPRET=1`` (set here,
before triton is imported, so kernels are built as interpreted functions). With a GPU,
every backend-parametrised test also runs on CUDA (marker ``gpu``).
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vqkernels.ops import _dispatch  # noqa: E402  (after TRITON_INTERPRET is set)

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def backend_cases():
    """Every (backend, device) pair, each a pytest param with marks; a pair this machine
    cannot run is skipped with the backend's own reason. Names come from the dispatch
    table, so a new backend is parametrised without editing this file."""
    cases = []
    for device in DEVICES:
        for name, backend in _dispatch.BACKENDS.items():
            marks = [pytest.mark.gpu] if device == "cuda" else []
            reason = backend.unavailable(device)
            if reason is not None:
                marks.append(pytest.mark.skip(reason=f"{name} on {device}: {reason}"))
            cases.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return cases


FAST_BACKEND_CASES = [c for c in backend_cases() if c.values[0] != "reference"]


def interpreted(backend: str, device: str) -> bool:
    """True when the backend's kernels run in the slow Triton interpreter (keep shapes small)."""
    return backend == "triton" and device == "cpu"


def dtypes_for(backend: str, device: str):
    """Input dtypes a backend takes on a device (bf16 is absent from the Triton interpreter)."""
    b = _dispatch.BACKENDS[backend]
    return [d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16) if b.refusal(device, d) is None]


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Fill every torch.empty / empty_like with NaN (or -7 for integers) so that an element
    a kernel never wrote fails loudly instead of passing by luck."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        with torch.no_grad():  # torch's own internals also call torch.empty(requires_grad=True)
            if t.is_floating_point():
                t.fill_(float("nan"))
            elif t.dtype != torch.bool and not t.is_complex():
                t.fill_(-7)
        return t

    def empty(*args, **kwargs):
        return poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(real_empty_like(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield
