"""The CUDA extension without a GPU: compile checks, register/spill report, and the loader.

* Every kernel header (csrc/kernels/*.cuh) compiles on its own, and every launcher
  translation unit (csrc/*.cu, which instantiate every kernel template the extension ships)
  compiles with nvcc for sm_80 and sm_90 in one call with two -gencode, with the build's
  flags. ptxas -v is parsed into a registers / spill table (printed; run with -s to see it)
  and a kernel that spills (more than SPILL_LIMIT_BYTES = 0) or uses more static shared
  memory than SMEM_BUDGET_BYTES of its arch fails.
* The torch glue (csrc/vq_ops.cpp) is compiled with the host compiler against torch's
  headers where the installed torch ships its CUDA headers (the CPU wheel does, minus one
  generated config header, see _glue_command), then linked with the launcher objects into
  a shared library whose undefined symbols must not include any of ours (every launcher
  the glue calls exists with the signature it expects). With a CPU build of torch, that
  library (libc10_cuda stubbed out) is then loaded to check that the four ops register.
* On a machine without a GPU the cuda backend reports a clear reason, quickly, and a
  forced backend="cuda" raises BackendUnavailableError.
* With a GPU (marker gpu) the cuda backend is checked against the fp64 reference at tile
  edges (N, K not multiples of the tiles, K = 1, D = 1, D not a multiple of 16, splits of
  the codebook), for both assign kernels, with exact ties, and on the codebook axis (C = 3
  codebooks, per-codebook and shared, against a per-codebook loop of the reference) for
  every op. Those checks also run on the chunked CPU backend here, so the checks
  themselves are exercised on every machine.

Everything is skipped, with the reason, only where nvcc is absent.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import vqkernels
from vqkernels import BackendUnavailableError, _build_flags, _extension
from vqkernels.ops.assign import tolerance
from vqkernels.ops.histogram import reference as histogram_reference
from vqkernels.ops.cluster_stats import reference as stats_reference
from vqkernels.ops.ema_update import reference as ema_reference

from helpers import check_assign, first_mismatches

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
ARCHS = tuple(_build_flags.cuda_archs())
# The C++ standard torch's own build helpers use for this torch (C++17 or C++20).
CXX_STD = "-std=c++20" if "c++20" in Path(cpp_extension.__file__).read_text() else "-std=c++17"
# What the build compiles: the standard and COMMON_NVCC_FLAGS torch adds, then the
# package's own flags (vqkernels/_build_flags.py, which setup.py and the JIT build read).
NVCC_FLAGS = [
    CXX_STD,
    *cpp_extension.COMMON_NVCC_FLAGS,
    *_build_flags.NVCC_FLAGS,
    "-Xcompiler",
    "-fPIC",
    *[f"-I{CSRC / sub}" for sub in _build_flags.INCLUDE_SUBDIRS],
]
# Every kernel spills 0 bytes today, and any spill fails: local memory in the assign
# loops costs more than any tile change can win (the SIMT tile capped at 128 registers
# stores 324 B and loads 212 B; an in-kernel l2 shift spilled the mma kernel 72 / 36 B).
SPILL_LIMIT_BYTES = 0
# Static shared memory per block (ptxas "bytes smem"), per arch. 48 KiB is what a launch
# gets without cudaFuncSetAttribute (the launchers never opt in to more), and the mma
# kernel's two blocks per SM (2 x 42 KiB) must fit beside the L1 on sm_80. Today: mma
# 42 KiB, SIMT 35 KiB.
SMEM_BUDGET_BYTES = {"sm_80": 48 * 1024, "sm_90": 48 * 1024}

# Kernels (demangled, without arguments) that must come out of the launcher TUs, per arch.
EXPECTED_KERNELS = (
    [f"vqk::{k}<{t}>" for k in ("code_terms_kernel", "assign_simt_kernel", "assign_finalize_kernel")
     for t in ("__half", "__nv_bfloat16", "float")]
    + [f"vqk::assign_mma_kernel<{t}>" for t in ("__half", "__nv_bfloat16")]
    + [f"vqk::{k}<{i}, {w}, {o}>" for k in ("histogram_shared_kernel", "histogram_global_kernel")
       for i in ("int", "long") for w in ("vqk::NoWeight", "__half", "__nv_bfloat16", "float")
       for o in (("unsigned long long", "float") if w == "vqk::NoWeight" else ("float",))]
    + [f"vqk::cluster_sums_atomic_kernel<{t}, {i}>"
       for t in ("__half", "__nv_bfloat16", "float") for i in ("int", "long")]
    + [f"vqk::segment_keys_kernel<{i}>" for i in ("int", "long")]
    + ["vqk::segment_starts_kernel"]
    + [f"vqk::{k}<{t}>" for k in ("segment_chunk_sums_kernel", "segment_sums_kernel")
       for t in ("__half", "__nv_bfloat16", "float")]
    + [f"vqk::ema_sizes_kernel<{s}>" for s in ("float", "double")]
    + [f"vqk::ema_embed_kernel<{s}, {t}>" for s in ("float", "double") for t in ("__half", "__nv_bfloat16", "float")]
)

needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc is not on PATH: the CUDA sources cannot be compile-checked on this machine"
)


# ---------------------------------------------------------------------------------------
# Compilation (all jobs in parallel, once per session)

def _run(cmd, cwd=None):
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return {"cmd": cmd, "rc": proc.returncode, "out": proc.stdout, "seconds": time.monotonic() - start}


def _cuda_include_dir():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if NVCC is not None:
        candidates.append(str(Path(os.path.realpath(NVCC)).parents[1]))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").is_file():
            return Path(c) / "include"
    return None


def _glue_command(obj: Path):
    """(command, None) to compile vq_ops.cpp, or (None, why it cannot be compiled here)."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        return None, "no host C++ compiler (c++ / g++) on PATH"
    torch_inc = [Path(p) for p in cpp_extension.include_paths()]
    needed = ("c10/cuda/CUDAGuard.h", "c10/cuda/CUDAStream.h", "torch/library.h", "ATen/ops/sort.h")
    missing = [h for h in needed if not any((p / h).is_file() for p in torch_inc)]
    if missing:
        return None, f"this torch ({torch.__version__}) does not ship {missing}, so the glue is not compile-checked"
    cuda_inc = _cuda_include_dir()
    if cuda_inc is None:
        return None, "cuda_runtime_api.h not found (set CUDA_HOME)"
    py_inc = sysconfig.get_paths()["include"]
    if not (Path(py_inc) / "Python.h").is_file():
        return None, f"Python.h not found in {py_inc}"
    cmd = [cxx, CXX_STD, "-O0", "-fPIC", "-c", str(CSRC / "vq_ops.cpp"), "-o", str(obj), f"-I{CSRC}"]
    cmd += [f"-isystem{p}" for p in torch_inc] + [f"-isystem{cuda_inc}", f"-isystem{py_inc}"]
    cmd += [
        # A CUDA build of torch generates c10/cuda/impl/cuda_cmake_macros.h; the CPU wheel
        # lacks it. It only holds export macros, which matter for linking torch itself.
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-Wall",
        "-Werror=return-type",
    ]
    return cmd, None


# Link-time stand-ins for libc10_cuda, which a CPU build of torch does not ship, so the
# extension can be loaded on a CPU-only machine to check its op registration (schemas
# inferred from the C++ signatures must match the m.def strings; that check otherwise
# only happens when the extension is loaded on a GPU machine). Never called.
C10_CUDA_STUBS = """
#include <atomic>
#include <cstdlib>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
namespace c10::cuda {
[[noreturn]] static void stub() { std::abort(); }
DeviceIndex device_count() noexcept { return 0; }
DeviceIndex ExchangeDevice(DeviceIndex) { stub(); }
cudaError_t MaybeSetDevice(DeviceIndex) { stub(); }
cudaError_t GetDevice(DeviceIndex*) { stub(); }
cudaError_t SetDevice(DeviceIndex, const bool) { stub(); }
CUDAStream getStreamFromPool(const bool, DeviceIndex) { stub(); }
CUDAStream getStreamFromPool(const int, DeviceIndex) { stub(); }
CUDAStream getCurrentCUDAStream(DeviceIndex) { stub(); }
CUDAStream getDefaultCUDAStream(DeviceIndex) { stub(); }
void setCurrentCUDAStream(CUDAStream) { stub(); }
void c10_cuda_check_implementation(const int32_t, const char*, const char*, const uint32_t, const bool) { stub(); }
bool CUDAStream::query() const { stub(); }
void CUDAStream::synchronize() const { stub(); }
cudaStream_t CUDAStream::stream() const { stub(); }
namespace CUDACachingAllocator {
std::atomic<CUDAAllocator*> allocator;
}
}  // namespace c10::cuda
"""


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    """Compile everything in parallel; {name: result} plus the tmp dir and the glue skip reason."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compile-checked on this machine")
    tmp = tmp_path_factory.mktemp("cuda_build")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    jobs = {}
    glue_cmd, glue_skip = _glue_command(tmp / "vq_ops.o")
    if glue_cmd is not None:
        jobs["glue:vq_ops.cpp"] = glue_cmd
        if torch.version.cuda is None:  # CPU torch: no libc10_cuda to link the load check against
            (tmp / "c10_cuda_stubs.cpp").write_text(C10_CUDA_STUBS)
            stub_cmd = [a for a in glue_cmd if not a.startswith("-DTORCH_EXTENSION_NAME")]
            stub_cmd[stub_cmd.index(str(CSRC / "vq_ops.cpp"))] = str(tmp / "c10_cuda_stubs.cpp")
            stub_cmd[stub_cmd.index(str(tmp / "vq_ops.o"))] = str(tmp / "c10_cuda_stubs.o")
            jobs["stubs:c10_cuda_stubs.cpp"] = stub_cmd
    for cu in sorted(CSRC.glob("*.cu")):
        jobs[f"tu:{cu.name}"] = [NVCC, *NVCC_FLAGS, *gencode, "-Xptxas", "-v", "-c", str(cu),
                                 "-o", str(tmp / f"{cu.stem}.o")]
    for header in sorted((CSRC / "kernels").glob("*.cuh")):
        tu = tmp / f"self_contained_{header.stem}.cu"
        tu.write_text(f'#include "kernels/{header.name}"  // first and alone: the header must be self-contained\n')
        jobs[f"header:{header.name}"] = [NVCC, *NVCC_FLAGS, "-gencode=arch=compute_90,code=sm_90", "-c", str(tu),
                                         "-o", str(tmp / f"self_contained_{header.stem}.o")]
    start = time.monotonic()
    workers = max(2, os.cpu_count() or 2)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(_run, cmd) for name, cmd in jobs.items()}  # longest (glue, assign) first
        results = {name: f.result() for name, f in futures.items()}
    print(f"\ncompiled {len(jobs)} translation units in {time.monotonic() - start:.1f} s with {workers} workers")
    return {"results": results, "tmp": tmp, "glue_skip": glue_skip}


def _fail_message(res):
    return f"$ {' '.join(map(str, res['cmd']))}\n(exit {res['rc']})\n{res['out'][-6000:]}"


def parse_ptxas(text: str):
    """{(mangled kernel, arch): {"registers": int, "smem": int, "spill_stores": int, "spill_loads": int}}."""
    table = {}
    current = None
    props_for = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            current = (m.group(1), m.group(2))
            table[current] = {"registers": None, "smem": None, "spill_stores": None, "spill_loads": None}
            props_for = None
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props_for = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current and props_for == current[0]:
            table[current]["spill_stores"] = int(m.group(1))
            table[current]["spill_loads"] = int(m.group(2))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            table[current]["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)  # absent: no shared memory
            table[current]["smem"] = int(smem.group(1)) if smem else 0
    return table


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), stdout=subprocess.PIPE, text=True).stdout.splitlines()
    if len(out) != len(names):
        return {n: n for n in names}
    # "void vqk::kernel<float>(float const*, ...)" -> "vqk::kernel<float>"
    return {n: re.sub(r"^void ", "", d.split("(")[0]) for n, d in zip(names, out)}


@needs_nvcc
def test_kernel_headers_are_self_contained(build):
    headers = {k: v for k, v in build["results"].items() if k.startswith("header:")}
    assert headers, "no csrc/kernels/*.cuh found"
    for name, res in headers.items():
        assert res["rc"] == 0, f"{name} does not compile on its own:\n" + _fail_message(res)


@needs_nvcc
def test_kernels_compile_for_sm80_sm90_without_spills(build, record_property):
    tus = {k: v for k, v in build["results"].items() if k.startswith("tu:")}
    assert {"tu:assign_f16.cu", "tu:assign_bf16.cu", "tu:assign_f32.cu", "tu:stats.cu"} <= set(tus), sorted(tus)
    for name, res in tus.items():
        assert res["rc"] == 0, f"{name} failed to compile:\n" + _fail_message(res)
    table = {}
    for res in tus.values():
        table.update(parse_ptxas(res["out"]))
    assert table, "could not parse any ptxas -v output (format changed?)"
    names = _demangle(sorted({name for name, _ in table}))
    rows = sorted((names[n], arch, v) for (n, arch), v in table.items())
    width = max(len(r[0]) for r in rows)
    lines = [f"{'kernel':<{width}}  arch   regs   smem  spill st/ld (bytes)"]
    lines += [f"{k:<{width}}  {a}  {v['registers']:>4}  {v['smem']:>5}  {v['spill_stores']}/{v['spill_loads']}"
              for k, a, v in rows]
    print("\n" + "\n".join(lines))
    print("compile seconds: " + ", ".join(f"{k[3:]} {v['seconds']:.0f}" for k, v in sorted(tus.items())))
    record_property("ptxas", [(k, a, v["registers"], v["smem"], v["spill_stores"], v["spill_loads"])
                              for k, a, v in rows])

    found = {(k, a) for k, a, _ in rows}
    missing = [(k, f"sm_{a}") for k in EXPECTED_KERNELS for a in ARCHS if (k, f"sm_{a}") not in found]
    assert not missing, f"kernels missing from the build: {missing}"
    for k, a, v in rows:
        assert v["registers"] is not None and v["spill_stores"] is not None, f"incomplete ptxas report for {k} {a}"
    spilling = [(k, a, v["spill_stores"], v["spill_loads"]) for k, a, v in rows
                if v["spill_stores"] + v["spill_loads"] > SPILL_LIMIT_BYTES]
    assert not spilling, f"kernels spilling more than {SPILL_LIMIT_BYTES} bytes (stores, loads): {spilling}"
    over = [(k, a, v["smem"], SMEM_BUDGET_BYTES[a]) for k, a, v in rows if v["smem"] > SMEM_BUDGET_BYTES[a]]
    assert not over, f"kernels above the shared-memory budget (kernel, arch, bytes, budget): {over}"


_RESOLVE_PROGRAM = r"""
#include <cstdio>
#include <initializer_list>
#include "launch.h"
int main() {
  using namespace vqk;
  const Scalar kinds[] = {Scalar::kHalf, Scalar::kBFloat16, Scalar::kFloat};
  const char* names[] = {"f16", "bf16", "f32"};
  for (int t = 0; t < 3; ++t)
    for (int cc : {7, 8, 9})
      for (long D : {1L, 8L, 9L, 16L, 32L, 33L, 256L})
        std::printf("%s %d %ld %d\n", names[t], cc, D,
                    static_cast<int>(resolve_assign_kernel(kinds[t], D, cc, AssignKernel::kAuto)));
  return 0;
}
"""


def test_assign_kernel_choice_by_dtype_and_d(tmp_path):
    """launch.h's automatic choice, compiled and run on the host: fp16/bf16 with D > 8 on
    sm_80+ take the tensor-core kernel (8 < D <= 32 included); fp32, D <= 8 and pre-sm_80 the
    SIMT kernel."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    cuda_inc = _cuda_include_dir()
    if cxx is None or cuda_inc is None:
        pytest.skip("needs a host C++ compiler and cuda_runtime_api.h")
    src, exe = tmp_path / "resolve.cpp", tmp_path / "resolve"
    src.write_text(_RESOLVE_PROGRAM)
    build = subprocess.run([cxx, CXX_STD, str(src), "-o", str(exe), f"-I{CSRC}", f"-isystem{cuda_inc}"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert build.returncode == 0, build.stdout
    out = subprocess.run([str(exe)], stdout=subprocess.PIPE, text=True, check=True).stdout.split("\n")
    got = {(t, int(cc), int(D)): int(k) for t, cc, D, k in (line.split() for line in out if line)}
    mma, simt = 1, 2
    want = {(t, cc, D): mma if t != "f32" and cc >= 8 and D > 8 else simt
            for t in ("f16", "bf16", "f32") for cc in (7, 8, 9) for D in (1, 8, 9, 16, 32, 33, 256)}
    assert got == want, {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}


@needs_nvcc
def test_glue_compiles_and_links_with_the_launchers(build):
    if build["glue_skip"]:
        pytest.skip(build["glue_skip"])
    res = build["results"]["glue:vq_ops.cpp"]
    assert res["rc"] == 0, "csrc/vq_ops.cpp failed to compile:\n" + _fail_message(res)
    tmp = build["tmp"]
    objs = [tmp / "vq_ops.o"] + [tmp / f"{cu.stem}.o" for cu in sorted(CSRC.glob("*.cu"))]
    assert all(o.is_file() for o in objs), "launcher objects missing (see the compile test)"
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    so = tmp / "vq_check.so"
    link = _run([cxx, "-shared", "-o", str(so), *map(str, objs)])
    assert link["rc"] == 0, _fail_message(link)
    # torch, c10, cudart and Python stay undefined (resolved at load time); ours must not.
    nm = subprocess.run(["nm", "-C", "--undefined-only", str(so)], stdout=subprocess.PIPE, text=True).stdout
    ours = [line.strip() for line in nm.splitlines() if "vqk::" in line]
    assert not ours, f"launchers the glue calls but nobody defines (signature mismatch?): {ours}"
    defined = subprocess.run(["nm", "-D", "--defined-only", str(so)], stdout=subprocess.PIPE, text=True).stdout
    assert "PyInit__C" in defined, "the extension does not export PyInit__C (import vqkernels._C would fail)"


@needs_nvcc
def test_glue_registers_the_ops_when_loaded(build):
    """Load the extension into a CPU build of torch (libc10_cuda stubbed out) after vqkernels'
    own Python ops: the four *_cuda ops must register with their schemas and a CUDA kernel."""
    if build["glue_skip"]:
        pytest.skip(build["glue_skip"])
    if "stubs:c10_cuda_stubs.cpp" not in build["results"]:
        pytest.skip("torch is a CUDA build here: the GPU tests load the real extension instead")
    res = build["results"]["stubs:c10_cuda_stubs.cpp"]
    assert res["rc"] == 0, _fail_message(res)
    cuda_lib = _cuda_include_dir().parent / "lib64"
    if not (cuda_lib / "libcudart.so").exists():
        pytest.skip(f"no libcudart.so in {cuda_lib} to link against")
    tmp = build["tmp"]
    torch_lib = Path(torch.__file__).parent / "lib"
    so = tmp / "vq_load_check.so"
    objs = [tmp / "vq_ops.o", tmp / "c10_cuda_stubs.o"] + [tmp / f"{cu.stem}.o" for cu in sorted(CSRC.glob("*.cu"))]
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    link = _run([cxx, "-shared", "-o", str(so), *map(str, objs), f"-L{cuda_lib}", "-lcudart", f"-Wl,-rpath,{cuda_lib}",
                 f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{torch_lib}"])
    assert link["rc"] == 0, _fail_message(link)
    nm = subprocess.run(["nm", "-C", "--undefined-only", str(so)], stdout=subprocess.PIPE, text=True).stdout
    unresolved = [line.split(maxsplit=1)[-1] for line in nm.splitlines() if "c10::cuda::" in line]
    if unresolved:
        pytest.skip(f"this torch's glue needs libc10_cuda symbols the stubs lack: {unresolved}")
    code = f"""
import torch, vqkernels
torch.ops.load_library({str(so)!r})
for name in ("assign_cuda", "histogram_cuda", "cluster_stats_cuda", "ema_update_cuda"):
    op = getattr(torch.ops.vqkernels, name).default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), name
    print(op._schema)
try:
    torch.ops.vqkernels.assign_cuda(torch.randn(1, 3, 4), torch.randn(1, 2, 4), "l2")
except NotImplementedError as exc:
    assert "CPU" in str(exc)
    print("cpu-refused")
"""
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    out = proc.stdout
    assert "vqkernels::assign_cuda(Tensor x, Tensor codebook, str metric, Tensor? centre=None) -> (Tensor, Tensor)" in out, out
    assert "vqkernels::histogram_cuda(Tensor indices, int K, Tensor? weights) -> Tensor" in out, out
    assert "vqkernels::cluster_stats_cuda(Tensor x, Tensor indices, int K, bool deterministic)" in out, out
    assert "vqkernels::ema_update_cuda(Tensor(a!) cluster_size, Tensor(b!) embed_avg, Tensor(c!) codebook" in out, out
    assert "cpu-refused" in out, out


# ---------------------------------------------------------------------------------------
# The loader and the backend on a machine without a GPU

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the backend may well be available")
def test_cuda_backend_unavailable_with_a_clear_reason(monkeypatch):
    # A fresh load attempt (the state is restored afterwards) that must give its reason
    # without trying to compile: the JIT build is never attempted on a machine without a GPU.
    for key, value in {"tried": False, "module": None, "reason": None, "how": None}.items():
        monkeypatch.setitem(_extension._state, key, value)
    builds = []

    def jit_build(torch_module):
        builds.append(torch_module)
        return False, "the JIT build was attempted"

    monkeypatch.setattr(_extension, "_jit_build", jit_build)
    reason = _extension.unavailable_reason()
    assert not builds, "the JIT build was attempted on a machine without a GPU"
    assert isinstance(reason, str) and reason, "no reason given"
    if torch.version.cuda is None:
        assert "CPU build" in reason, reason
    else:
        assert "no CUDA device" in reason or "vqkernels._C" in reason, reason
    assert _extension.status() == f"unavailable: {reason}"
    with pytest.raises(BackendUnavailableError, match="cannot run"):
        _extension.ops()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_forcing_cuda_backend_on_cpu_tensors_raises():
    x, cb = torch.randn(8, 4), torch.randn(3, 4)
    idx = torch.tensor([0, 2, -1, 1])
    calls = {
        "assign": lambda: vqkernels.assign(x, cb, backend="cuda"),
        "histogram": lambda: vqkernels.histogram(idx, 3, backend="cuda"),
        "cluster_stats": lambda: vqkernels.cluster_stats(x[:4], idx, 3, backend="cuda"),
        "ema_update_": lambda: vqkernels.ema_update_(
            torch.ones(3), torch.zeros(3, 4), cb.clone(), torch.ones(3), torch.zeros(3, 4), 0.9, backend="cuda"),
    }
    for op, call in calls.items():
        with pytest.raises(BackendUnavailableError, match="cuda") as info:
            call()
        assert "CUDA" in str(info.value), f"{op}: {info.value}"


def test_import_does_not_load_the_extension():
    code = (
        "import sys, vqkernels;"
        "assert 'vqkernels._C' not in sys.modules, 'the extension was imported';"
        "ext = sys.modules.get('vqkernels._extension');"
        "assert ext is None or not ext._state['tried'], 'the extension loader ran at import';"
        "print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout


def test_sources_are_found_for_the_jit_build():
    src = _extension._sources_dir()
    assert src is not None and (src / "kernels" / "assign.cuh").is_file()
    assert sorted(p.name for p in src.glob("*.cu")), "no .cu sources next to vq_ops.cpp"


# ---------------------------------------------------------------------------------------
# Runtime checks: cuda (GPU, both assign kernels) and, to exercise the checks, chunked (CPU)

def _runtime_cases():
    cases = [pytest.param(("chunked", "cpu", "auto"), id="chunked-cpu")]
    if torch.cuda.is_available():
        for kernel in ("auto", "mma", "simt"):
            cases.append(pytest.param(("cuda", "cuda", kernel), id=f"cuda-{kernel}", marks=pytest.mark.gpu))
    return cases


@pytest.fixture(params=_runtime_cases())
def runtime(request, monkeypatch):
    backend, device, kernel = request.param
    if backend == "cuda":
        reason = _extension.unavailable_reason()
        assert reason is None, f"a GPU is present but the cuda backend is unavailable: {reason}"
        monkeypatch.setenv("VQKERNELS_CUDA_ASSIGN_KERNEL", kernel)
    return backend, device, kernel


# (N, K, D): N and K off the 128-row/code tiles, K = 1, D = 1, D below/above/off 16 and 32,
# several K tiles (and, with few row tiles, several codebook splits merged by atomicMin).
ASSIGN_SHAPES = [(1, 1, 1), (5, 1, 7), (130, 3, 33), (64, 129, 16), (257, 300, 40), (300, 517, 100), (129, 260, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_assign_tile_edges(runtime, dtype, metric):
    backend, device, kernel = runtime
    if kernel == "mma" and dtype == torch.float32:
        pytest.skip("no tensor-core path for float32")
    gen = torch.Generator().manual_seed(0)
    for N, K, D in ASSIGN_SHAPES:
        x = torch.randn(N, D, generator=gen).to(dtype).to(device)
        cb = torch.randn(K, D, generator=gen).to(dtype).to(device)
        indices, distances = vqkernels.assign(x, cb, metric, backend=backend)
        assert distances.dtype == torch.float32 and indices.shape == (N,)
        check_assign(x, cb, metric, indices, distances)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_assign_exact_ties_go_to_the_lowest_index(runtime, dtype):
    backend, device, kernel = runtime
    if kernel == "mma" and dtype == torch.float32:
        pytest.skip("no tensor-core path for float32")
    gen = torch.Generator().manual_seed(1)
    # Small integers: every score is exact in fp32, so copies of a code tie exactly; the
    # copies sit 150 codes apart, in other K tiles (and splits) than the original.
    for D in (8, 48):
        base = torch.randint(-3, 4, (150, D), generator=gen).float()
        cb = torch.cat([base, base, base]).to(dtype).to(device)
        x = torch.randint(-3, 4, (260, D), generator=gen).float().to(dtype).to(device)
        for metric in ("l2", "dot"):
            indices, distances = vqkernels.assign(x, cb, metric, backend=backend)
            late = indices[indices >= 150][:8]
            assert late.numel() == 0, f"{metric}, D={D}: a later copy won a tie: {late}"
            # Every score of these integer inputs is exact, so exact ties between distinct
            # codes must go to the lowest index too (check_assign's rule).
            check_assign(x, cb, metric, indices, distances)


def test_assign_non_finite_rows(runtime):
    backend, device, kernel = runtime
    dtype = torch.bfloat16 if kernel == "mma" else torch.float32  # the forced mma kernel takes 16-bit inputs only
    x = torch.randn(6, 40, device=device)
    x[2, 5] = float("nan")
    x[4, 0] = float("inf")
    x = x.to(dtype)
    cb = torch.randn(200, 40, device=device).to(dtype)
    indices, distances = vqkernels.assign(x, cb, backend=backend)
    assert indices[2].item() == -1 and indices[4].item() == -1
    assert torch.isnan(distances[[2, 4]]).all()
    keep = torch.tensor([0, 1, 3, 5])
    check_assign(x[keep], cb, "l2", indices[keep.to(device)], distances[keep.to(device)])


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("K", [1, 7, 20000])  # 20000: past the shared-memory histogram
def test_histogram(runtime, index_dtype, K):
    backend, device, _ = runtime
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(-2, K, (5000,), generator=gen).to(index_dtype)
    w = torch.rand(5000, generator=gen)
    want = histogram_reference.histogram(idx, K, None)
    got = vqkernels.histogram(idx.to(device), K, backend=backend)
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), want)
    for wd in (torch.float32, torch.float16):
        ww = w.to(wd)
        want_w = histogram_reference.histogram(idx, K, ww)
        got_w = vqkernels.histogram(idx.to(device), K, ww.to(device), backend=backend)
        assert got_w.dtype == torch.float32
        torch.testing.assert_close(got_w.cpu(), want_w, rtol=1e-5, atol=1e-4)


# (N, K, D, index dtype, collapsed): one row and code; D off the 32-wide slices; many codes,
# short rows; a collapsed codebook (most rows on code 1: its run spans many 256-row chunks
# of the deterministic CUDA path plus ragged ends, which other codes' rows break up).
STATS_CASES = [(1, 1, 1, torch.int64, False), (500, 7, 33, torch.int32, False), (3000, 300, 8, torch.int64, False),
               (2900, 5, 40, torch.int64, True)]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cluster_stats(runtime, deterministic, dtype):
    backend, device, _ = runtime
    gen = torch.Generator().manual_seed(3)
    for N, K, D, index_dtype, collapsed in STATS_CASES:
        x = torch.randn(N, D, generator=gen).to(dtype)
        idx = torch.randint(-1, K, (N,), generator=gen).to(index_dtype)
        if collapsed:
            idx = torch.where(torch.rand(N, generator=gen) < 0.9, torch.ones_like(idx), idx)
        want_c, want_s = stats_reference.cluster_stats(x, idx, K, deterministic)
        c, s = vqkernels.cluster_stats(x.to(device), idx.to(device), K, deterministic=deterministic, backend=backend)
        assert c.dtype == torch.float32 and s.shape == (K, D)
        torch.testing.assert_close(c.cpu(), want_c, rtol=0, atol=0)
        torch.testing.assert_close(s.cpu(), want_s, rtol=1e-5, atol=1e-4)
        if deterministic:
            c2, s2 = vqkernels.cluster_stats(x.to(device), idx.to(device), K, deterministic=True, backend=backend)
            assert torch.equal(c, c2) and torch.equal(s, s2), "deterministic cluster_stats is not bitwise reproducible"


@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("codebook_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("H", [1, 3])
def test_ema_update(runtime, stats_dtype, codebook_dtype, H):
    backend, device, _ = runtime
    gen = torch.Generator().manual_seed(4)
    K, D = 37, 20
    cs = torch.rand(H, K, generator=gen, dtype=torch.float64).to(stats_dtype) * 3
    ea = torch.randn(H, K, D, generator=gen, dtype=torch.float64).to(stats_dtype)
    cb = torch.randn(H, K, D, generator=gen).to(codebook_dtype)
    counts = torch.randint(0, 5, (H, K), generator=gen).to(stats_dtype)
    sums = torch.randn(H, K, D, generator=gen, dtype=torch.float64).to(stats_dtype)
    want = [t.clone() for t in (cs, ea, cb)]
    ema_reference.ema_update(*want, counts, sums, 0.9, 1e-5)
    got = [t.clone().to(device) for t in (cs, ea, cb)]
    vqkernels.ema_update_(*got, counts.to(device), sums.to(device), 0.9, 1e-5, backend=backend)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
    for name, g, w in zip(("cluster_size", "embed_avg", "codebook"), got, want):
        t = tol[g.dtype]
        torch.testing.assert_close(g.cpu(), w, rtol=t, atol=t, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------
# The codebook axis: C codebooks in one call, against a per-codebook loop of the reference
# (one plain call per codebook). Each codebook gets its own random data, so a kernel that
# reads or writes another codebook's slice picks wrong codes or wrong sums.

C_AXIS = 3


@pytest.mark.parametrize("shared", [False, True], ids=["per-codebook", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_codebook_axis_assign(runtime, shared, dtype, metric):
    backend, device, kernel = runtime
    if kernel == "mma" and dtype == torch.float32:
        pytest.skip("no tensor-core path for float32")
    gen = torch.Generator().manual_seed(5)
    # One row and one code; N and K off the tiles with several K tiles (and splits); D = 8
    # (the vectorised 16-bit loads, at a per-codebook offset) and D = 33 (the scalar ones).
    for N, K, D in [(1, 1, 1), (130, 300, 40), (257, 129, 8), (3, 517, 33)]:
        x = torch.randn(C_AXIS, N, D, generator=gen).to(dtype)
        cb = torch.randn(*(() if shared else (C_AXIS,)), K, D, generator=gen).to(dtype)
        indices, distances = vqkernels.assign(x.to(device), cb.to(device), metric, backend=backend)
        assert indices.shape == (C_AXIS, N) and distances.shape == (C_AXIS, N)
        assert indices.dtype == torch.int64 and distances.dtype == torch.float32
        for c in range(C_AXIS):
            cb_c = cb if shared else cb[c]
            check_assign(x[c], cb_c, metric, indices[c], distances[c])
            # and the pick's distance is the reference's minimum, up to the argmin tolerance
            want = vqkernels.assign(x[c], cb_c, metric, backend="reference").distances.double()
            gap = (distances[c].cpu().double() - want).abs()
            bound = tolerance(x[c], cb_c, metric) + 1e-5 * (1 + want.abs())
            assert bool((gap <= bound).all()), f"codebook {c}: " + first_mismatches(gap > bound, distances[c], want)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("K", [7, 20000])  # 20000: past the shared-memory histogram
def test_codebook_axis_histogram(runtime, index_dtype, K):
    backend, device, _ = runtime
    gen = torch.Generator().manual_seed(6)
    N = 3000
    idx = torch.randint(-2, K, (C_AXIS, N), generator=gen).to(index_dtype)
    idx[1, :100] = 0  # a hot code in one codebook only
    w = torch.rand(C_AXIS, N, generator=gen)
    got = vqkernels.histogram(idx.to(device), K, codebook_axis=True, backend=backend)
    want = torch.stack([vqkernels.histogram(idx[c], K, backend="reference") for c in range(C_AXIS)])
    assert got.shape == (C_AXIS, K) and got.dtype == torch.int64
    assert torch.equal(got.cpu(), want)
    got_w = vqkernels.histogram(idx.to(device), K, w.to(device), codebook_axis=True, backend=backend)
    want_w = torch.stack([vqkernels.histogram(idx[c], K, w[c], backend="reference") for c in range(C_AXIS)])
    assert got_w.shape == (C_AXIS, K) and got_w.dtype == torch.float32
    torch.testing.assert_close(got_w.cpu(), want_w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_codebook_axis_cluster_stats(runtime, deterministic, dtype):
    backend, device, _ = runtime
    gen = torch.Generator().manual_seed(7)
    for N, K, D, index_dtype, collapsed in STATS_CASES:
        x = torch.randn(C_AXIS, N, D, generator=gen).to(dtype)
        idx = torch.randint(-1, K, (C_AXIS, N), generator=gen).to(index_dtype)
        if collapsed:  # every codebook's long run of code 1 crosses chunks of the flat sorted keys
            idx = torch.where(torch.rand(C_AXIS, N, generator=gen) < 0.9, torch.ones_like(idx), idx)
        idx[0] = -1  # a codebook whose rows are all masked: zero counts and sums
        c_got, s_got = vqkernels.cluster_stats(x.to(device), idx.to(device), K, deterministic=deterministic,
                                               codebook_axis=True, backend=backend)
        assert c_got.shape == (C_AXIS, K) and s_got.shape == (C_AXIS, K, D) and c_got.dtype == torch.float32
        per_codebook = [vqkernels.cluster_stats(x[c], idx[c], K, backend="reference") for c in range(C_AXIS)]
        torch.testing.assert_close(c_got.cpu(), torch.stack([p[0] for p in per_codebook]), rtol=0, atol=0)
        torch.testing.assert_close(s_got.cpu(), torch.stack([p[1] for p in per_codebook]), rtol=1e-5, atol=1e-4)
        if deterministic:
            again = vqkernels.cluster_stats(x.to(device), idx.to(device), K, deterministic=True, codebook_axis=True,
                                            backend=backend)
            assert torch.equal(c_got, again[0]) and torch.equal(s_got, again[1]), "not bitwise reproducible"


@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("codebook_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_codebook_axis_ema_update(runtime, stats_dtype, codebook_dtype):
    backend, device, _ = runtime
    gen = torch.Generator().manual_seed(8)
    K, D = 37, 20
    # Codebook c's counts are scaled by 10^c, so its total n (per codebook) differs.
    scale = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64).view(C_AXIS, 1)
    cs = (torch.rand(C_AXIS, K, generator=gen, dtype=torch.float64) * 3 * scale).to(stats_dtype)
    ea = torch.randn(C_AXIS, K, D, generator=gen, dtype=torch.float64).to(stats_dtype)
    cb = torch.randn(C_AXIS, K, D, generator=gen).to(codebook_dtype)
    counts = (torch.randint(0, 5, (C_AXIS, K), generator=gen) * scale).to(stats_dtype)
    sums = torch.randn(C_AXIS, K, D, generator=gen, dtype=torch.float64).to(stats_dtype)
    got = [t.clone().to(device) for t in (cs, ea, cb)]
    vqkernels.ema_update_(*got, counts.to(device), sums.to(device), 0.9, 1e-5, backend=backend)
    want = [[], [], []]
    for c in range(C_AXIS):
        one = [cs[c].clone(), ea[c].clone(), cb[c].clone()]
        vqkernels.ema_update_(*one, counts[c], sums[c], 0.9, 1e-5, backend="reference")
        for acc, t in zip(want, one):
            acc.append(t)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}
    for name, g, w in zip(("cluster_size", "embed_avg", "codebook"), got, want):
        t = tol[g.dtype]
        torch.testing.assert_close(g.cpu(), torch.stack(w), rtol=t, atol=t, msg=lambda m: f"{name}: {m}")


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture
def cuda_ops():
    reason = _extension.unavailable_reason()
    assert reason is None, f"a GPU is present but the cuda backend is unavailable: {reason}"
    return _extension.ops()


@pytest.mark.gpu
@needs_gpu
def test_cuda_ops_check_the_codebook_axis(cuda_ops):
    """The C++ boundary (direct torch.ops calls) names the mismatched [C, ...] shapes."""
    ops, dev = cuda_ops, "cuda"
    x = torch.randn(3, 5, 8, device=dev)
    idx = torch.zeros(3, 5, dtype=torch.int64, device=dev)
    cases = {
        r"x has C=3 codebooks \(shape \(3, 5, 8\)\) but codebook has C=2":
            lambda: ops.assign_cuda(x, torch.randn(2, 4, 8, device=dev), "l2"),
        r"x must be \[C, N, D\] \(3 dimensions\), got shape \(5, 8\)":
            lambda: ops.assign_cuda(x[0], torch.randn(4, 8, device=dev), "l2"),
        r"x has 8 features .* but codebook has 7":
            lambda: ops.assign_cuda(x, torch.randn(3, 4, 7, device=dev), "l2"),
        r"centre applies to metric 'l2' only, got metric 'cosine'":
            lambda: ops.assign_cuda(x, torch.randn(3, 4, 8, device=dev), "cosine", torch.zeros(3, 8, device=dev)),
        r"centre must be a float32 tensor of shape \[3, 8\], got dtype .* and shape \(3, 7\)":
            lambda: ops.assign_cuda(x, torch.randn(3, 4, 8, device=dev), "l2", torch.zeros(3, 7, device=dev)),
        r"weights has shape \(2, 5\) but indices has shape \(3, 5\)":
            lambda: ops.histogram_cuda(idx, 4, torch.ones(2, 5, device=dev)),
        r"indices must hold at least one codebook \(C >= 1":
            lambda: ops.histogram_cuda(idx[:0], 4, None),
        r"at most 65535 codebooks":
            lambda: ops.histogram_cuda(torch.zeros(65536, 1, dtype=torch.int64, device=dev), 4, None),
        r"indices has shape \(2, 5\) but x has shape \(3, 5, 8\); expected indices of shape \(3, 5\)":
            lambda: ops.cluster_stats_cuda(x, idx[:2], 4, True),
        r"cluster_size has shape \(2, 4\); expected \(3, 4\)":
            lambda: ops.ema_update_cuda(torch.ones(2, 4, device=dev), torch.zeros(3, 4, 8, device=dev),
                                        torch.zeros(3, 4, 8, device=dev), torch.ones(2, 4, device=dev),
                                        torch.zeros(3, 4, 8, device=dev), 0.9, 1e-5),
    }
    for pattern, call in cases.items():
        with pytest.raises(RuntimeError, match=pattern):
            call()


@pytest.mark.gpu
@needs_gpu
def test_cuda_codebook_axis_is_one_launch_per_kernel(cuda_ops):
    """C = 5 codebooks: every kernel of every op is launched once per call, never per codebook."""
    from torch.profiler import ProfilerActivity, profile

    C, N, K, D = 5, 300, 200, 40
    x = torch.randn(C, N, D, device="cuda", dtype=torch.float16)
    cb = torch.randn(C, K, D, device="cuda", dtype=torch.float16)
    idx = torch.randint(-1, K, (C, N), device="cuda")
    stats = [torch.rand(C, K, device="cuda"), torch.randn(C, K, D, device="cuda"), cb.clone()]

    def run():
        cuda_ops.assign_cuda(x, cb, "l2")
        cuda_ops.histogram_cuda(idx, K, None)
        cuda_ops.cluster_stats_cuda(x, idx, K, False)  # a histogram launch of its own, then the sums
        cuda_ops.cluster_stats_cuda(x, idx, K, True)
        cuda_ops.ema_update_cuda(*stats, torch.ones(C, K, device="cuda"), torch.ones(C, K, D, device="cuda"), 0.9, 1e-5)
        torch.cuda.synchronize()

    run()  # warm-up: lazy initialisation stays out of the profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    names = [e.name for e in prof.events() if "vqk::" in e.name]
    # kernel (either of the alternatives) -> launches per run(); assign runs the mma or the
    # SIMT kernel (VQKERNELS_CUDA_ASSIGN_KERNEL), the histogram the shared or the global one.
    expected = {("code_terms_kernel",): 1, ("assign_mma_kernel", "assign_simt_kernel"): 1,
                ("assign_finalize_kernel",): 1, ("histogram_shared_kernel", "histogram_global_kernel"): 2,
                ("cluster_sums_atomic_kernel",): 1, ("segment_keys_kernel",): 1, ("segment_starts_kernel",): 1,
                ("segment_sums_kernel",): 1, ("ema_sizes_kernel",): 1, ("ema_embed_kernel",): 1}
    counts = {k: sum(any(f"vqk::{alt}" in n for alt in k) for n in names) for k in expected}
    assert counts == expected, f"kernel launches per call: {counts}; recorded: {names}"
