"""Backend registry, selection, and :func:`call`, the one path from a public op to a backend.

Every op has one folder, ``vqkernels/ops/<op>/`` (``assign``, ``histogram``,
``cluster_stats``, ``ema_update``), holding one module per backend; each backend module
defines a function named after the op. The public function and the custom op carry the
same name (``ema_update_`` with PyTorch's trailing underscore for in-place). This module
knows which backends exist, what each supports, *why* one refuses, and picks one:

* ``backend="name"`` (or the ``VQKERNELS_BACKEND`` environment variable) forces a backend;
  if it cannot run these tensors the call raises :class:`BackendUnavailableError` with
  the reason. Nothing falls back silently.
* ``backend=None`` takes the first backend in the device's priority order that can run
  the tensors (CUDA: triton -> chunked, cuda opt-in for now; CPU: cpu -> chunked). The choice is
  logged once per (op, device, dtype) on the ``vqkernels`` logger, and a backend skipped
  because it *failed* (rather than was simply not installed) is warned about once.

The backend contract (what :func:`call` passes; every backend, every op): the codebook
axis is always present, ``C >= 1``, ``N >= 1``, tensors contiguous:

* ``assign(x [C, N, D], codebook [C, K, D], metric) -> (indices int64 [C, N], distances [C, N])``
* ``histogram(indices [C, N], K, weights [C, N] | None) -> counts [C, K]``
* ``cluster_stats(x [C, N, D], indices [C, N], K, deterministic) -> (counts [C, K], sums [C, K, D])``
* ``ema_update(cluster_size [C, K], embed_avg [C, K, D], codebook [C, K, D], counts, sums, decay, eps)``
* ``residual_assign(x [N, D], codebooks [Q, K, D], metric) -> (indices int64 [N, Q], quantized [N, D], distances [N, Q])``
  (no codebook axis: Q stages in sequence, ``N >= 1``)

Backend modules are imported lazily, so ``import vqkernels`` never imports triton or the
compiled extension.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import typing
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.torch_version import TorchVersion

from ..errors import BackendUnavailableError

logger = logging.getLogger("vqkernels")

ENV_VAR = "VQKERNELS_BACKEND"


def _always(_device_type: str) -> Optional[str]:
    return None


# The oldest Triton the kernels are tested with (full suite on 3.4, 3.6, 3.9; 3.0's compiler and
# interpreter could not run them). An older one is refused with a warning, not tried.
MIN_TRITON = (3, 4)
_TOO_OLD = "too old: "  # a reason that starts so is warned about when the automatic choice skips it


@functools.lru_cache(maxsize=None)  # asked on every automatic choice on CUDA; a parse is ~7 us
def _older_than_min_triton(version: str) -> bool:
    return TorchVersion(version) < MIN_TRITON  # torch's PEP 440 comparison ("3.6.0+git..." included)


def _triton_unavailable(device_type: str) -> Optional[str]:
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device_type == "cpu" and not interpret:
        return "triton runs on CUDA tensors (on CPU only under TRITON_INTERPRET=1)"
    if device_type not in ("cpu", "cuda"):
        return f"triton backend does not support device type {device_type!r}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    try:
        triton = importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc}); install with `pip install vqkernels[triton]`"
    version = str(getattr(triton, "__version__", "0"))
    if _older_than_min_triton(version):
        return (f"{_TOO_OLD}triton {version} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest vqkernels' "
                "Triton kernels are tested with (torch pins triton: a newer torch brings a newer one)")
    return None


def _cuda_unavailable(device_type: str) -> Optional[str]:
    if device_type != "cuda":
        return "the CUDA extension runs on CUDA tensors only"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    from vqkernels import _extension

    return _extension.unavailable_reason()


def _cpu_unavailable(device_type: str) -> Optional[str]:
    if device_type != "cpu":
        return "the C++ CPU extension runs on CPU tensors only"
    from vqkernels import _cpu_extension

    return _cpu_extension.unavailable_reason()


@dataclass(frozen=True)
class Backend:
    name: str
    dtypes: tuple
    unavailable: Callable[[str], Optional[str]]  # device type -> reason, None when usable
    failure_is_error: bool = False  # True where "unavailable" can mean "broken", worth a warning

    def refusal(self, device_type: str, dtype: Optional[torch.dtype]) -> Optional[str]:
        """Why this backend cannot run tensors of this device type and dtype (None: it can)."""
        reason = self.unavailable(device_type)
        if reason is not None:
            return reason
        if dtype is not None and dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"dtype {str(dtype).replace('torch.', '')} is not supported (supports {names})"
        return None


_LOW = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = {
    "reference": Backend("reference", _LOW + (torch.float64,), _always),
    "chunked": Backend("chunked", _LOW + (torch.float64,), _always),
    "triton": Backend("triton", _LOW, _triton_unavailable),
    "cuda": Backend("cuda", _LOW, _cuda_unavailable, failure_is_error=True),
    "cpu": Backend("cpu", _LOW, _cpu_unavailable, failure_is_error=True),
}
# Automatic choice, fastest first. ``reference`` is never chosen automatically. The
# ``cuda`` extension backend is opt-in (backend="cuda" / VQKERNELS_BACKEND=cuda) until its
# kernels have passed benchmarks/gpu_check.sh on a GPU: an automatic choice must not hand
# unverified kernels to a training run, nor stall it with a first-use JIT compile.
# On CPU the C++ ``cpu`` backend runs assign, histogram and cluster_stats; its ema_update
# is chunked's torch calls (as fast); fp64 goes to chunked.
PRIORITY = {"cuda": ("triton", "chunked"), "cpu": ("cpu", "chunked")}
_DEFAULT_PRIORITY = ("chunked",)


def automatic_order(device_type: str) -> tuple:
    """Backends tried, in order, when none is requested (``vqkernels info`` prints it)."""
    return PRIORITY.get(device_type, _DEFAULT_PRIORITY)

_logged: set = set()


def requested_backend(backend: Optional[str]) -> str:
    """The backend name asked for by argument or environment ('' means automatic)."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "")
    name = name.strip().lower()
    if name in ("", "auto"):
        return ""
    if name not in BACKENDS:
        source = "backend=" if backend is not None else f"{ENV_VAR}="
        raise ValueError(f"{source}{name!r} is not a vqkernels backend; expected one of {sorted(BACKENDS)} or None")
    return name


def select(op: str, device: torch.device, dtype: Optional[torch.dtype], backend: Optional[str] = None) -> str:
    """Name of the backend that runs ``op`` on tensors of this device and dtype."""
    device_type = torch.device(device).type
    name = requested_backend(backend)
    if name:
        reason = BACKENDS[name].refusal(device_type, dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"vqkernels backend {name!r} was requested for {op} on {device_type}/{dtype} but cannot run: {reason}"
            )
        return name
    reasons = {}
    for candidate in automatic_order(device_type):
        b = BACKENDS[candidate]
        reason = b.refusal(device_type, dtype)
        if reason is None:
            key = (op, device_type, dtype, candidate)
            if key not in _logged:
                _logged.add(key)
                logger.info("vqkernels: %s on %s/%s uses the %r backend", op, device_type, dtype, candidate)
            return candidate
        reasons[candidate] = reason
        worth_warning = (b.failure_is_error and "failed" in reason) or reason.startswith(_TOO_OLD)
        if worth_warning and (candidate, reason) not in _logged:
            _logged.add((candidate, reason))
            warnings.warn(f"vqkernels: skipping the {candidate!r} backend: {reason}", RuntimeWarning, stacklevel=3)
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise BackendUnavailableError(f"no vqkernels backend can run {op} on {device_type}/{dtype} ({detail})")


def implementation(op: str, backend: str) -> Callable:
    """The function implementing ``op`` in ``backend`` (imports the backend module on first use)."""
    module = importlib.import_module(f"vqkernels.ops.{op}.{backend}")
    try:
        return getattr(module, op)
    except AttributeError:
        raise BackendUnavailableError(f"the {backend!r} backend has no implementation of {op}") from None


def call(op: str, backend: str, device: torch.device, dtype: Optional[torch.dtype], *args):
    """Run ``op`` on the backend selected for (device, dtype) -- the one call path of every op.

    ``backend`` is the requested name ('' or None: automatic); ``dtype`` is the dtype that
    decides support (None when the op has no floating input, as an unweighted histogram).
    """
    name = select(op, device, dtype, backend or None)
    return implementation(op, name)(*args)


def _traced(args) -> bool:
    """The call must go through the registered custom op: torch.compile / export is tracing,
    a fake or functional mode is active, or a tensor is a subclass or on the meta device."""
    if torch.compiler.is_compiling():
        return True
    for key in (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.FUNCTIONAL):
        if torch._C._get_dispatch_mode(key) is not None:
            return True
    return any(isinstance(a, torch.Tensor) and (type(a) is not torch.Tensor or a.is_meta) for a in args)


def register_op(name: str, mutates_args) -> Callable:
    """``torch.library.custom_op(name, mutates_args=...)`` with the implementation's annotations
    resolved first: ``from __future__ import annotations`` makes them strings, which torch < 2.5
    cannot infer a schema from (``import vqkernels`` failed on torch 2.4)."""

    def register(impl: Callable):
        hints = typing.get_type_hints(impl)
        if hints.get("return") is type(None):  # `-> None` resolves to NoneType; the inference wants None
            hints["return"] = None
        impl.__annotations__ = hints
        return torch.library.custom_op(name, mutates_args=mutates_args)(impl)

    return register


def custom_op(name: str, mutates_args):
    """``torch.library.custom_op`` for an op's implementation, returning a caller that runs the
    implementation directly in plain eager calls. The custom op (what torch.compile, export and
    fake tensors see) costs tens of microseconds per call in torch.library's Python machinery,
    which is the whole cost of an op at small sizes; eager it adds nothing, since the buffers
    need no autograd and the implementation is the op's. ``caller.op`` is the registered op."""

    def wrap(impl: Callable) -> Callable:
        op = register_op(name, mutates_args)(impl)

        def caller(*args):
            return op(*args) if _traced(args) else impl(*args)

        caller.op = op
        caller.register_fake = op.register_fake
        caller.__doc__, caller.__name__ = impl.__doc__, impl.__name__
        return caller

    return wrap


def availability(device_type: str) -> dict:
    """{backend: None | reason} for a device type; used by ``vqkernels info``."""
    return {name: b.unavailable(device_type) for name, b in BACKENDS.items()}
