"""Compiler flags of the CUDA extension, written once for every build of it.

Read by setup.py (``pip install``, through ``runpy`` on this file's path, because the
package cannot be imported while it is being built), by :mod:`vqkernels._extension` (the
JIT build) and by tests/test_cuda_build.py (the nvcc compile check), so the check compiles
exactly what users get. This module must import nothing, from the package or elsewhere.

torch's build helpers add their own flags on top: the C++ standard its headers need and
``COMMON_NVCC_FLAGS`` (no implicit half/bfloat16 conversions, relaxed constexpr).

No ``--use_fast_math``: it turns ``/`` and ``sqrtf`` into approximations (and flushes
denormals), but the winner's exact distance (cosine's norms and division) and the EMA
codebook division are promised in IEEE fp32.
"""

#: Host compiler flags (csrc/vq_ops.cpp).
CXX_FLAGS = ["-O3"]

#: nvcc flags (csrc/*.cu); -lineinfo keeps profilers able to map SASS back to source lines.
NVCC_FLAGS = ["-O3", "-lineinfo"]

#: GPU architectures a ``pip install`` builds for when TORCH_CUDA_ARCH_LIST is unset; the
#: tensor-core assign kernel needs sm_80+. The compile check builds these too.
CUDA_ARCH_LIST = "8.0;9.0"

#: Include folders, relative to the csrc/ folder of the sources.
INCLUDE_SUBDIRS = [".", "kernels"]


def cuda_archs():
    """``CUDA_ARCH_LIST`` as nvcc's compute capabilities, e.g. ``["80", "90"]``."""
    return [a.replace(".", "") for a in CUDA_ARCH_LIST.split(";")]

#: The CPU extension (csrc/cpu/, ``vqkernels._C_cpu``). setup.py builds a wheel that must
#: run on any CPU of the architecture: portable flags, OpenMP for torch's parallel_for.
CPU_CXX_FLAGS = ["-O3", "-fopenmp", "-Wno-psabi"]
#: The JIT build compiles on the machine that runs it, so it may target that CPU (AVX-512
#: or AVX2 vectors). -Wno-psabi: GCC notes the vector-extension ABI, irrelevant inside one .so.
CPU_JIT_CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-Wno-psabi"]
#: Linker flags of both CPU builds.
CPU_LDFLAGS = ["-fopenmp"]
#: Folder of the CPU sources, relative to csrc/.
CPU_SUBDIR = "cpu"
