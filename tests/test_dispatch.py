"""Backend selection: automatic choice, forcing by argument or environment, clear refusals."""
import pytest
import torch

import vqkernels
from vqkernels.ops import _dispatch


def test_cpu_auto_choice_is_cpu_then_chunked(monkeypatch):
    monkeypatch.delenv("VQKERNELS_BACKEND", raising=False)
    expected = "cpu" if _dispatch.BACKENDS["cpu"].unavailable("cpu") is None else "chunked"
    assert _dispatch.select("assign", torch.device("cpu"), torch.float32) == expected
    assert _dispatch.select("assign", torch.device("cpu"), torch.float64) == "chunked"


def test_environment_forces_backend(monkeypatch):
    monkeypatch.setenv("VQKERNELS_BACKEND", "reference")
    assert _dispatch.select("assign", torch.device("cpu"), torch.float32) == "reference"
    monkeypatch.setenv("VQKERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="VQKERNELS_BACKEND='nonsense'"):
        vqkernels.assign(torch.randn(3, 2), torch.randn(2, 2))


def test_forced_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.delenv("VQKERNELS_BACKEND", raising=False)
    with pytest.raises(vqkernels.BackendUnavailableError, match="'cuda' was requested.*CUDA tensors"):
        vqkernels.assign(torch.randn(3, 2), torch.randn(2, 2), backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(vqkernels.BackendUnavailableError, match="TRITON_INTERPRET"):
        vqkernels.assign(torch.randn(3, 2), torch.randn(2, 2), backend="triton")


def test_forced_dtype_refusal_names_the_dtype():
    with pytest.raises(vqkernels.BackendUnavailableError, match="float64 is not supported"):
        _dispatch.select("assign", torch.device("cpu"), torch.float64, "triton")


def test_reference_is_never_chosen_automatically():
    for order in _dispatch.PRIORITY.values():
        assert "reference" not in order


def test_availability_lists_every_backend_with_reasons():
    table = _dispatch.availability("cpu")
    assert set(table) == {"reference", "chunked", "triton", "cuda", "cpu"}
    assert table["reference"] is None and table["chunked"] is None
    assert isinstance(table["cuda"], str) and table["cuda"]


def test_import_does_not_pull_heavy_modules():
    import subprocess
    import sys

    code = "import sys, vqkernels; print(sorted(m for m in ('triton', 'matplotlib', 'faiss', 'vqkernels._C') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_unverified_cuda_extension_is_opt_in_only():
    # The CUDA kernels have not yet passed gpu_check.sh on a GPU: never chosen automatically.
    assert "cuda" not in _dispatch.PRIORITY["cuda"]
    assert _dispatch.PRIORITY["cuda"][0] == "triton"


def test_eager_calls_do_not_enter_torch_library_machinery():
    # Eager calls run each op's implementation directly (_dispatch.custom_op): torch.library's
    # custom-op path imports torch._dynamo on its first call (about 2 s) and costs tens of
    # microseconds per call. Every public op, once, in a fresh process.
    import subprocess
    import sys

    code = (
        "import sys, torch, vqkernels\n"
        "x = torch.randn(16, 3); c = torch.randn(4, 3); i = vqkernels.assign(x, c).indices\n"
        "vqkernels.residual_assign(x, torch.randn(2, 4, 3))\n"
        "vqkernels.histogram(i, 4); n, s = vqkernels.cluster_stats(x, i, 4)\n"
        "vqkernels.ema_update_(torch.ones(4), c.clone(), c.clone(), n.float(), s, decay=0.9)\n"
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_a_triton_older_than_the_tested_ones_is_refused_with_a_warning(monkeypatch):
    """Triton 3.0 (torch 2.4's) could not compile or interpret the kernels: a forced triton
    backend says why; the automatic choice warns once and moves on, never tries it."""
    triton = pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.0.0")
    x, c = torch.randn(6, 3), torch.randn(4, 3)
    with pytest.raises(vqkernels.BackendUnavailableError, match=r"triton 3\.0\.0 is older than 3\.4"):
        vqkernels.assign(x, c, backend="triton")
    monkeypatch.setitem(_dispatch.PRIORITY, "cpu", ("triton", "chunked"))
    monkeypatch.setattr(_dispatch, "_logged", set())
    with pytest.warns(RuntimeWarning, match="skipping the 'triton' backend: too old: triton 3.0.0"):
        assert _dispatch.select("assign", torch.device("cpu"), torch.float32) == "chunked"
    monkeypatch.setattr(triton, "__version__", "3.4.0")
    assert _dispatch.BACKENDS["triton"].unavailable("cpu") is None
