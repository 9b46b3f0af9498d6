"""The tolerances that decide pass or fail, pinned.

``check_assign`` (tests/helpers.py) and the near-tie tests take the argmin tolerance from
the code under test (``vqkernels.ops.assign.ARGMIN_RTOL`` / ``tolerance``). Loosening them
would loosen every assign check at once, silently; pinned here, it is a visible, deliberate
change to this file.
"""
import pytest
import torch

from vqkernels.ops.assign import ARGMIN_RTOL, chunked, tolerance

PINNED_RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, "tf32": 4e-3}


def test_argmin_rtol_values_are_pinned():
    assert ARGMIN_RTOL == PINNED_RTOL


# x = (3, 4): |x|^2 = 25; the largest code (0, 2): max|c|^2 = 4; so the l2 / dot scale is 29
X = [[3.0, 4.0]]
CODES = [[1.0, 0.0], [0.0, 2.0]]


@pytest.mark.parametrize(
    "dtype,key,metric,want",
    [
        (torch.float32, None, "l2", 2e-5 * 29),
        (torch.float32, None, "dot", 2e-5 * 29),
        (torch.float32, None, "cosine", 4 * 2e-5),  # cosine distances live in [0, 2]: no norm scale
        (torch.float16, None, "l2", 2e-5 * 29),  # fp16 / bf16 accumulate in fp32
        (torch.bfloat16, None, "l2", 2e-5 * 29),
        (torch.float64, None, "l2", 1e-12 * 29),
        (torch.float64, None, "cosine", 4 * 1e-12),
        (torch.float32, "tf32", "l2", 4e-3 * 29),
    ],
)
def test_tolerance_formula_is_pinned(dtype, key, metric, want):
    x, codes = torch.tensor(X, dtype=dtype), torch.tensor(CODES, dtype=dtype)
    got = tolerance(x, codes, metric, key)
    assert got.shape == (1,) and got.dtype == torch.float64
    assert abs(float(got[0]) - want) <= 1e-9 * want, f"tolerance({dtype}, {key}, {metric}) = {float(got[0])}, pinned {want}"


def test_tolerance_is_per_row_and_uses_the_largest_code():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    codes = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
    got = tolerance(x, codes, "l2")
    torch.testing.assert_close(got, 2e-5 * torch.tensor([4.0, 29.0, 104.0], dtype=torch.float64), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- chunked assign
# The chunked backend's rounding bound decides which rows its exact pass 2 re-decides: a
# smaller bound would let rounded scores pick a farther code. Its tile budget decides its
# memory (O(tile), never N x K). Both pinned, as the tolerances above.

@pytest.mark.parametrize(
    "dtype,precision,want",
    [
        (torch.float32, "highest", (6 * 16 + 16) * 2.0**-24),
        (torch.float32, "high", (6 * 16 + 16) * 2.0**-24 + 8 * 2.0**-11),  # tf32 rounds the inputs
        (torch.float32, "medium", (6 * 16 + 16) * 2.0**-24 + 8 * 2.0**-8),  # bf16 rounds the inputs
        (torch.float64, "highest", (6 * 16 + 16) * 2.0**-53),
        (torch.float16, "highest", (6 * 16 + 16) * 2.0**-11),
        (torch.bfloat16, "highest", (6 * 16 + 16) * 2.0**-8),
    ],
)
def test_chunked_score_error_bound_is_pinned(dtype, precision, want):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        got = chunked.score_error_bound(dtype, 16)
    finally:
        torch.set_float32_matmul_precision(before)
    assert got == pytest.approx(want, rel=1e-12), f"score_error_bound({dtype}, 16) at {precision!r}"


@pytest.mark.parametrize(
    "args,want",
    [
        ((10000, 1000, 8, "cpu"), (1048, 1000)),  # 2**20 scores on CPU
        ((10000, 1000, 8, "cuda"), (10000, 1000)),  # 2**26 on GPU
        ((10000, 1000, 8, "xpu"), (4194, 1000)),  # 2**22 elsewhere
        ((10000, 5000, 8, "cpu", 4), (256, 1024)),  # four codebooks share the budget
        ((30, 5000, 8, "cpu"), (30, 1024)),  # never more rows than N
        ((100000, 50, 2**20, "cpu"), (8, 50)),  # wide rows: the row tile bounds tile_n
        ((100000, 5000, 8, "cpu"), (1024, 1024)),
        ((1, 10, 8, "cpu"), (1, 10)),  # one row: one-row tiles
    ],
)
def test_chunked_tile_sizes_are_pinned(args, want, monkeypatch):
    monkeypatch.delenv("VQKERNELS_CHUNK_ELEMENTS", raising=False)
    got = chunked.tile_sizes(*args)
    assert got == want and all(type(v) is int for v in got), got


def test_chunked_tile_budget_follows_the_environment(monkeypatch):
    monkeypatch.setenv("VQKERNELS_CHUNK_ELEMENTS", "4096")
    assert chunked.tile_sizes(10000, 1000, 8, "cpu") == (256, 16)
    monkeypatch.setenv("VQKERNELS_CHUNK_ELEMENTS", "64")
    assert chunked.tile_sizes(10000, 1000, 8, "cpu") == (64, 16)  # at least 64 rows per tile
    assert chunked.tile_sizes(64, 1000, 8, "cpu") == (64, 16)  # ... also when N is exactly 64
    assert chunked.tile_sizes(100, 50, 2**17, "cpu") == (64, 16)  # 64 rows of 2**17 fill the row tile exactly
    assert chunked.tile_sizes(100, 50, 2**17 + 1, "cpu") == (4, 16)  # past it: the budget's 4 rows


# --------------------------------------------------------------------------- precision claims
# Which arithmetic each fast assign path claims, and the tolerance key its picks are judged
# by: (backend, input dtype, torch.get_float32_matmul_precision()) -> (claim, key). The
# Triton claims are checked against the launcher's choice here and against the sm_90 PTX
# the GPU will run (below); the CUDA ones against the kernels' own instructions.
CLAIMS = {
    ("triton", torch.float32, "highest"): ("ieee: fp32 products and sums, no tensor cores", torch.float32),
    ("triton", torch.float32, "high"): ("tf32x3: three tf32 tensor-core products per pair", "tf32"),
    ("triton", torch.float32, "medium"): ("tf32: one tf32 tensor-core product (10-bit mantissas)", "tf32"),
    ("triton", torch.float16, "any"): ("f16 tensor-core products (exact), fp32 accumulation", torch.float32),
    ("triton", torch.bfloat16, "any"): ("bf16 tensor-core products (exact), fp32 accumulation", torch.float32),
    ("cuda", torch.float32, "any"): ("SIMT fp32 FMAs, whatever the matmul setting", torch.float32),
    ("cuda", torch.float16, "any"): ("mma.sync f16 products (exact), fp32 accumulation; SIMT fp32 for D <= 8",
                                     torch.float32),
    ("cuda", torch.bfloat16, "any"): ("mma.sync bf16 products (exact), fp32 accumulation; SIMT fp32 for D <= 8",
                                      torch.float32),
}
_TRITON_DOT = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("setting", ["highest", "high", "medium"])
def test_triton_launcher_makes_the_claimed_precision(dtype, setting):
    """The Triton launcher's tl.dot input_precision and its tolerance key, per matmul setting."""
    pytest.importorskip("triton")
    from vqkernels.ops import _triton_utils as tu

    claim, key = CLAIMS[("triton", dtype, setting if dtype == torch.float32 else "any")]
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        precision, tf32 = tu.dot_precision(dtype), tu.uses_tf32(dtype)
    finally:
        torch.set_float32_matmul_precision(before)
    assert precision == (_TRITON_DOT[setting] if dtype == torch.float32 else "ieee"), claim
    assert tf32 == (key == "tf32"), f"{claim}: judged by {key!r}, but uses_tf32 says {tf32}"


_PTX_SCRIPT = r"""
import re, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vqkernels.ops.assign import triton as A
for name, prec in [("float32", "ieee"), ("float32", "tf32"), ("float32", "tf32x3"), ("bfloat16", "ieee"),
                   ("float16", "ieee")]:
    sig = A._assign_signature(getattr(torch, name))
    consts = dict(PRECISION=prec, BLOCK_D=32, ONE_CHUNK=True, EVEN_D=False, TWO_PART=False, SPLIT=False, EPI_D=16,
                  INTERP=False, BLOCK_N=64, BLOCK_K=32)
    fn = A._assign_kernel
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items() if v.startswith("*")}
    k = triton.compile(ASTSource(fn, dict(sig, **{c: "constexpr" for c in consts}), constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
    ops = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.(\w+)\.(\w+)\.(\w+)", k.asm["ptx"])
    types = sorted({".".join(o) for o in ops})
    print(f"RESULT {name} {prec} {len(ops)} {','.join(types) or '-'}")
"""


def test_triton_sm90_ptx_makes_the_claimed_precision():
    """Compiled for sm_90 (BLOCK_D = 32: 4 k8 / 2 k16 steps per tile), the fp32 "highest" kernel
    has no tensor-core instruction, tf32 one tf32 wgmma per k-step, tf32x3 three, and the 16-bit
    kernels their own type, all accumulating in fp32: the interpreter cannot show this."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    from test_triton_kernels import _sm90_compile_env

    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=_sm90_compile_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = {tuple(line.split()[1:3]): tuple(line.split()[3:5]) for line in proc.stdout.splitlines()
           if line.startswith("RESULT")}
    assert got == {
        ("float32", "ieee"): ("0", "-"),
        ("float32", "tf32"): ("4", "f32.tf32.tf32"),
        ("float32", "tf32x3"): ("12", "f32.tf32.tf32"),
        ("bfloat16", "ieee"): ("2", "f32.bf16.bf16"),
        ("float16", "ieee"): ("2", "f32.f16.f16"),
    }, got


def test_cuda_kernels_make_the_claimed_precision():
    """The CUDA assign kernels' arithmetic, read from their source: 16-bit tensor-core
    fragments accumulate in fp32, the SIMT tile is fp32 FMAs (no tf32 anywhere), the 16-bit
    inputs switch to tensor cores above D = 8 (compiled and run: test_cuda_build)."""
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    assign = (csrc / "kernels" / "assign.cuh").read_text()
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in assign, CLAIMS[("cuda", torch.float16, "any")]
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in assign, CLAIMS[("cuda", torch.bfloat16, "any")]
    assert "tf32" not in assign, CLAIMS[("cuda", torch.float32, "any")]
    assert "acc[i][j] = fmaf(a[i], b[j], acc[i][j])" in assign, CLAIMS[("cuda", torch.float32, "any")]
    assert "constexpr int64_t kSimtMaxD = 8;" in (csrc / "launch.h").read_text()
