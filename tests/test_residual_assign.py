"""vqkernels.residual_assign: every backend against an fp64 stage-by-stage loop written here.

Random data: each stage's pick is checked along the backend's OWN residual (the fp64
residual of its earlier picks), within assign's tolerance of that stage's minimum, so a
legal near-tie flip does not fail the test; fp64 inputs and integer grids (exact in every
dtype) must match the loop exactly, ties to the lowest index at every stage.
"""
import pytest
import torch

import vqkernels
from vqkernels.errors import BackendUnavailableError
from vqkernels.ops import _dispatch, _metrics
from vqkernels.ops.assign import tolerance

from conftest import FAST_BACKEND_CASES, backend_cases, dtypes_for, interpreted

METRICS = ("l2", "cosine", "dot")


def fp64_loop(x, codebooks, metric):
    """The definition, in fp64: indices [N, Q], quantized [N, D], distances [N, Q]."""
    residual, codes = x.double(), codebooks.double()
    quantized = torch.zeros_like(residual)
    indices, distances = [], []
    for q in range(codes.shape[0]):
        d = _metrics.distance_matrix(_metrics.normalized(residual, metric), codes[q], metric)
        best, idx = d.min(-1)  # first minimum: the lowest index
        residual = residual - codes[q][idx]
        quantized = quantized + codes[q][idx]
        indices.append(idx)
        distances.append(best)
    return torch.stack(indices, 1), quantized, torch.stack(distances, 1)


def check_along_own_residual(result, x, codebooks, metric):
    """Each stage's pick is within tolerance of the minimum for the residual of the picks made so far."""
    indices, quantized, distances = result
    N, Q = indices.shape
    residual, codes = x.double(), codebooks.double()
    picked_sum = torch.zeros_like(residual)
    rows = torch.arange(N)
    for q in range(Q):
        stage_in = _metrics.normalized(residual, metric)
        d = _metrics.distance_matrix(stage_in, codes[q], metric)  # [N, K]
        assert ((indices[:, q] >= 0) & (indices[:, q] < codes.shape[1])).all(), f"stage {q}: index out of range"
        chosen = d[rows, indices[:, q]]
        tol = tolerance(stage_in, codes[q], metric, rtol_key=torch.float32 if x.dtype != torch.float64 else None)
        excess = chosen - d.min(-1).values
        assert (excess <= tol).all(), f"stage {q}: pick off the minimum by {excess.max().item():.3g} > {tol.max().item():.3g}"
        torch.testing.assert_close(distances[:, q].double(), chosen, rtol=1e-4, atol=1e-4 * (1 + d.abs().max().item()))
        residual = residual - codes[q][indices[:, q]]
        picked_sum = picked_sum + codes[q][indices[:, q]]
    atol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-1}[x.dtype]
    torch.testing.assert_close(quantized.double(), picked_sum.to(x.dtype).double(), rtol=atol, atol=atol)


def _shapes(backend, device):
    if interpreted(backend, device):
        return [(23, 3, 9, 5), (1, 1, 1, 3), (5, 2, 3, 257)]  # D > 256: the stages through Triton's assign
    return [(300, 4, 37, 13), (1, 1, 1, 3), (64, 1, 16, 8), (50, 3, 1, 7), (200, 8, 64, 32), (40, 2, 20, 1300)]


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("metric", METRICS)
def test_random_inputs_every_dtype(backend, device, metric):
    g = torch.Generator().manual_seed(1)
    for dtype in dtypes_for(backend, device):
        for N, Q, K, D in _shapes(backend, device):
            x = torch.randn(N, D, generator=g).to(dtype)
            codebooks = (torch.randn(Q, K, D, generator=g) * 0.7 ** torch.arange(Q).view(Q, 1, 1)).to(dtype)
            if metric == "cosine":  # unit codes, as the quantizer's codebooks hold them
                codebooks = torch.nn.functional.normalize(codebooks.float(), dim=-1).to(dtype)
            result = vqkernels.residual_assign(x.to(device), codebooks.to(device), metric, backend=backend)
            result = [t.cpu() for t in result]
            assert result[0].dtype == torch.int64 and result[0].shape == (N, Q)
            assert result[1].dtype == dtype and result[1].shape == (N, D)
            assert result[2].dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and result[2].shape == (N, Q)
            check_along_own_residual(result, x, codebooks, metric)
            if dtype == torch.float64:
                want = fp64_loop(x, codebooks, metric)
                assert torch.equal(result[0], want[0])


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("metric", METRICS)
def test_ties_at_every_stage_go_to_the_lowest_index(backend, device, metric):
    """Every codebook holds each code twice (an exact tie at every stage, whatever the
    rounding); for l2 and dot, integer grids add ties between distinct codes, exact in every dtype."""
    g = torch.Generator().manual_seed(2)
    N, Q, D, half = (17, 3, 3, 12) if interpreted(backend, device) else (200, 5, 40, 40)  # duplicates span code tiles
    for dtype in dtypes_for(backend, device):
        x = torch.randint(-4, 5, (N, D), generator=g).to(dtype)
        if metric == "cosine":
            base = torch.randint(0, 2, (Q, half, D), generator=g) * 2 - 1  # +-1: equal norms
        else:
            base = torch.randint(-2, 3, (Q, half, D), generator=g)
        codebooks = torch.cat([base, base], 1).to(dtype)
        result = [t.cpu() for t in vqkernels.residual_assign(x.to(device), codebooks.to(device), metric, backend=backend)]
        indices, quantized = result[0], result[1]
        assert (indices < half).all(), f"{dtype}: a duplicate's higher index won a tie"
        check_along_own_residual(result, x, codebooks, metric)
        if metric != "cosine":  # integer scores: every tie is exact, so the picks are the loop's
            want = fp64_loop(x, codebooks, metric)
            assert torch.equal(indices, want[0]), f"{dtype}: indices differ from the fp64 loop"
            assert torch.equal(quantized.double(), want[1]), f"{dtype}: quantized differs"


@pytest.mark.parametrize("backend,device", backend_cases())
def test_non_finite_rows_get_minus_one_at_every_stage(backend, device):
    g = torch.Generator().manual_seed(3)
    N, Q, K, D = (9, 2, 5, 3) if interpreted(backend, device) else (40, 3, 11, 6)
    x = torch.randn(N, D, generator=g)
    codebooks = torch.randn(Q, K, D, generator=g)
    bad = torch.zeros(N, dtype=torch.bool)
    bad[[0, 4, N - 1]] = True
    x_bad = x.clone()
    x_bad[0, 1], x_bad[4, 0], x_bad[N - 1, 2] = float("nan"), float("inf"), float("-inf")
    for metric in METRICS:
        got = [t.cpu() for t in vqkernels.residual_assign(x_bad.to(device), codebooks.to(device), metric, backend=backend)]
        clean = [t.cpu() for t in vqkernels.residual_assign(x[~bad].to(device), codebooks.to(device), metric, backend=backend)]
        assert (got[0][bad] == -1).all()
        assert got[1][bad].isnan().all() and got[2][bad].isnan().all()
        assert torch.equal(got[0][~bad], clean[0])  # other rows are unaffected
        torch.testing.assert_close(got[1][~bad], clean[1])
        torch.testing.assert_close(got[2][~bad], clean[2])


@pytest.mark.parametrize("backend,device", backend_cases())
def test_empty_input(backend, device):
    x, codebooks = torch.randn(0, 4), torch.randn(2, 3, 4)
    indices, quantized, distances = vqkernels.residual_assign(x.to(device), codebooks.to(device), backend=backend)
    assert indices.shape == (0, 2) and quantized.shape == (0, 4) and distances.shape == (0, 2)


def test_matches_q_separate_assign_calls():
    """The unfused path (one assign per stage, the residual updated in between) gives the same codes."""
    g = torch.Generator().manual_seed(4)
    x, codebooks = torch.randn(500, 16, generator=g), torch.randn(6, 64, 16, generator=g) * 0.5
    for metric in METRICS:
        residual, picks = x.clone(), []
        for q in range(6):
            picks.append(vqkernels.assign(_metrics.normalized(residual, metric), codebooks[q], metric, backend="chunked").indices)
            residual = residual - codebooks[q][picks[-1]]
        got = vqkernels.residual_assign(x, codebooks, metric, backend="chunked")
        assert torch.equal(got.indices, torch.stack(picks, 1))
        torch.testing.assert_close(got.quantized, x - residual)


def test_bad_inputs_raise_clear_errors():
    x, codebooks = torch.randn(10, 4), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"codebooks must be \[Q, K, D\]"):
        vqkernels.residual_assign(x, codebooks[0])
    with pytest.raises(ValueError, match=r"x must be \[N, D\]"):
        vqkernels.residual_assign(x.view(2, 5, 4), codebooks)
    with pytest.raises(ValueError, match="x has 3 features"):
        vqkernels.residual_assign(x[:, :3], codebooks)
    with pytest.raises(TypeError, match="dtype"):
        vqkernels.residual_assign(x.double(), codebooks)
    with pytest.raises(TypeError, match="floating"):
        vqkernels.residual_assign(x.long(), codebooks.long())
    with pytest.raises(ValueError, match="device"):
        vqkernels.residual_assign(x, codebooks.to("meta"))
    with pytest.raises(ValueError, match="metric"):
        vqkernels.residual_assign(x, codebooks, "manhattan")
    with pytest.raises(ValueError, match="not a vqkernels backend"):
        vqkernels.residual_assign(x, codebooks, backend="fast")
    with pytest.raises(ValueError, match="Q >= 1 stages"):
        vqkernels.residual_assign(x, codebooks[:0])
    with pytest.raises(ValueError, match="K >= 1 codes"):
        vqkernels.residual_assign(x, codebooks[:, :0])
    bad = codebooks.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="codebooks"):
        vqkernels.residual_assign(x, bad)
    with pytest.raises(BackendUnavailableError, match="dtype float64"):
        vqkernels.residual_assign(x.double(), codebooks.double(), backend="triton")


def test_opcheck_and_compile():
    g = torch.Generator().manual_seed(5)
    x, codebooks = torch.randn(50, 8, generator=g), torch.randn(3, 16, 8, generator=g)
    for metric in METRICS:
        torch.library.opcheck(torch.ops.vqkernels.residual_assign.default, (x, codebooks, metric, "chunked", True))

    def f(x, codebooks):
        indices, quantized, distances = vqkernels.residual_assign(x * 2, codebooks)
        return indices, quantized + 1, distances.sum(1)

    want = f(x, codebooks)
    for backend in ("aot_eager", "inductor"):
        got = torch.compile(f, fullgraph=True, backend=backend)(x, codebooks)
        assert torch.equal(want[0], got[0])
        torch.testing.assert_close(want[1], got[1])
        torch.testing.assert_close(want[2], got[2])


# --------------------------------------------------------------------------- CUDA compile check
# (tests/test_cuda_build.py's nvcc build also compiles csrc/residual_assign.cu with every
# other translation unit; here its kernels and the glue of csrc/residual_assign_ops.cpp,
# which that file's link check does not include.)

def _tcb():
    import test_cuda_build

    if test_cuda_build.NVCC is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compile-checked on this machine")
    return test_cuda_build


def test_cuda_kernel_compiles_for_every_arch_without_spills(tmp_path):
    tcb = _tcb()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in tcb.ARCHS]
    res = tcb._run([tcb.NVCC, *tcb.NVCC_FLAGS, *gencode, "-Xptxas", "-v", "-c", str(tcb.CSRC / "residual_assign.cu"),
                    "-o", str(tmp_path / "residual_assign.o")])
    assert res["rc"] == 0, tcb._fail_message(res)
    table = tcb.parse_ptxas(res["out"])
    names = tcb._demangle(sorted({n for n, _ in table}))
    found = {(names[n], arch): v for (n, arch), v in table.items()}
    for t in ("__half", "__nv_bfloat16", "float"):
        for a in tcb.ARCHS:
            v = found.get((f"vqk::residual_assign_kernel<{t}>", f"sm_{a}"))
            assert v is not None, f"residual_assign_kernel<{t}> missing for sm_{a}: {sorted(found)}"
            assert v["spill_stores"] == 0 and v["spill_loads"] == 0, (t, a, v)
            assert v["smem"] == 0, "the kernel's shared memory is dynamic (sized by D)"


def test_cuda_glue_compiles_links_and_registers(tmp_path):
    """csrc/residual_assign_ops.cpp compiles, links with the launcher, and once loaded into
    this (CPU) torch with libc10_cuda stubbed out, registers residual_assign_cuda with its
    schema and a CUDA kernel: a schema/signature mismatch would otherwise first fail when
    the extension loads on a GPU machine."""
    import shutil
    import subprocess
    import sys

    tcb = _tcb()
    cmd, why = tcb._glue_command(tmp_path / "residual_assign_ops.o")
    if cmd is None:
        pytest.skip(why)
    glue = list(cmd)
    glue[glue.index(str(tcb.CSRC / "vq_ops.cpp"))] = str(tcb.CSRC / "residual_assign_ops.cpp")
    res = tcb._run(glue)
    assert res["rc"] == 0, tcb._fail_message(res)
    if torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build here: the GPU tests load the real extension instead")
    (tmp_path / "stubs.cpp").write_text(tcb.C10_CUDA_STUBS)
    stubs = [a for a in cmd if not a.startswith("-DTORCH_EXTENSION_NAME")]
    stubs[stubs.index(str(tcb.CSRC / "vq_ops.cpp"))] = str(tmp_path / "stubs.cpp")
    stubs[stubs.index(str(tmp_path / "residual_assign_ops.o"))] = str(tmp_path / "stubs.o")
    launcher = [tcb.NVCC, *tcb.NVCC_FLAGS, "-gencode=arch=compute_90,code=sm_90", "-c",
                str(tcb.CSRC / "residual_assign.cu"), "-o", str(tmp_path / "residual_assign.o")]
    for step in (stubs, launcher):
        res = tcb._run(step)
        assert res["rc"] == 0, tcb._fail_message(res)
    cuda_lib = tcb._cuda_include_dir().parent / "lib64"
    if not (cuda_lib / "libcudart.so").exists():
        pytest.skip(f"no libcudart.so in {cuda_lib} to link against")
    torch_lib = tcb.Path(torch.__file__).parent / "lib"
    so = tmp_path / "residual_assign_check.so"
    cxx = shutil.which("c++") or shutil.which("g++")
    objs = [tmp_path / n for n in ("residual_assign_ops.o", "residual_assign.o", "stubs.o")]
    link = tcb._run([cxx, "-shared", "-o", str(so), *map(str, objs), f"-L{cuda_lib}", "-lcudart",
                     f"-Wl,-rpath,{cuda_lib}", f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch",
                     f"-Wl,-rpath,{torch_lib}"])
    assert link["rc"] == 0, tcb._fail_message(link)
    code = f"""
import torch, vqkernels
torch.ops.load_library({str(so)!r})
op = torch.ops.vqkernels.residual_assign_cuda.default
assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")
print(op._schema)
try:
    op(torch.randn(3, 4), torch.randn(2, 5, 4), "l2")
except NotImplementedError as exc:
    assert "CPU" in str(exc)
    print("cpu-refused")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "residual_assign_cuda(Tensor x, Tensor codebooks, str metric) -> (Tensor, Tensor, Tensor)" in proc.stdout
    assert "cpu-refused" in proc.stdout


def test_triton_runs_all_stages_in_one_launch(monkeypatch):
    """D <= MAX_RESIDENT_D: one kernel launch for all Q stages, never the per-stage assign."""
    triton_ra = pytest.importorskip("vqkernels.ops.residual_assign.triton")
    if _dispatch.BACKENDS["triton"].unavailable("cpu") is not None and not torch.cuda.is_available():
        pytest.skip("the triton backend cannot run here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    launches = []
    kernel = triton_ra._residual_assign_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_ra, "_residual_assign_kernel", Counting())
    monkeypatch.setattr(triton_ra._assign_triton, "assign", lambda *a: pytest.fail("per-stage assign called"))
    x, codebooks = torch.randn(20, 6, device=device), torch.randn(4, 18, 6, device=device)
    got = vqkernels.residual_assign(x, codebooks, backend="triton")
    assert len(launches) == 1
    want = vqkernels.residual_assign(x, codebooks, backend="reference")
    assert torch.equal(got.indices, want.indices)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_stages_of_different_sizes(backend, device):
    """A list of [K_q, D] codebooks: picks stay inside each stage's own codes, as the fp64 loop."""
    g = torch.Generator().manual_seed(6)
    sizes, N, D = ((3, 9, 5), 11, 4) if interpreted(backend, device) else ((5, 128, 40, 1), 300, 12)
    x = torch.randint(-4, 5, (N, D), generator=g).float()
    books = [torch.randint(-3, 4, (k, D), generator=g).float() for k in sizes]
    got = vqkernels.residual_assign(x.to(device), [b.to(device) for b in books], "l2", backend=backend)
    indices = got.indices.cpu()
    for q, k in enumerate(sizes):
        assert (indices[:, q] < k).all(), f"stage {q} picked a padding copy"
        residual = x.double() - sum(books[p].double()[indices[:, p]] for p in range(q))
        d = _metrics.distance_matrix(residual, books[q].double(), "l2")
        assert torch.equal(indices[:, q], d.argmin(-1)), f"stage {q}"  # integer grid: exact, first minimum


def test_stages_of_different_sizes_bad_inputs():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="empty sequence"):
        vqkernels.residual_assign(x, [])
    with pytest.raises(ValueError, match=r"codebooks\[1\] has 3 features"):
        vqkernels.residual_assign(x, [torch.randn(5, 4), torch.randn(6, 3)])
    with pytest.raises(ValueError, match=r"codebooks\[1\] must be \[K_q, D\]"):
        vqkernels.residual_assign(x, [torch.randn(5, 4), torch.randn(2, 6, 4)])
    with pytest.raises(TypeError, match=r"codebooks\[1\] has dtype"):
        vqkernels.residual_assign(x, [torch.randn(5, 4), torch.randn(6, 4).double()])


@pytest.mark.parametrize("backend,device", FAST_BACKEND_CASES)
def test_ibq_size_codebooks(backend, device):
    """K = 262,144 (issue #13 item 9) at a small N: tiled over K, no N x K matrix."""
    if interpreted(backend, device):
        pytest.skip("the Triton interpreter is too slow for K = 262,144")
    g = torch.Generator().manual_seed(7)
    x, codebooks = torch.randn(6, 8, generator=g), torch.randn(2, 262144, 8, generator=g) * 0.5
    result = [t.cpu() for t in vqkernels.residual_assign(x.to(device), codebooks.to(device), backend=backend)]
    check_along_own_residual(result, x, codebooks, "l2")
