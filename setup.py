"""Build script: pure Python everywhere, plus the C++ extensions where possible.

``vqkernels._C_cpu`` (csrc/cpu/, the ``cpu`` backend) is built whenever torch is importable
at build time and a C++ compiler is present; no CUDA needed. A failed CPU build is a
notice, not an install failure (the backend then JIT-compiles on first use, or reports
why it cannot). ``VQKERNELS_BUILD_CPU=0`` skips it, ``=1`` insists.

The extension is built when a CUDA build of torch and nvcc are both present at build
time; ``VQKERNELS_BUILD_CUDA=1`` insists (and fails loudly if it cannot), ``=0`` skips.
torch is deliberately *not* a build requirement: listing it would make pip's isolated
build environment download a multi-GB CUDA wheel and could build against a torch other
than the user's. To build the extension against the installed torch, use
``pip install --no-build-isolation .``. Without a build, ``vqkernels._extension`` JIT-
compiles the same sources on first use, so the CUDA sources always ship as package data.
"""
import os
import runpy
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
# The one list of compile flags (shared with the JIT build and the compile check), read by
# path: the package itself cannot be imported while it is being built.
FLAGS = runpy.run_path(str(ROOT / "vqkernels" / "_build_flags.py"))


def _notice(msg):
    print(f"vqkernels setup: {msg}", file=sys.stderr)


def _cuda_sources():
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu")) + sorted(
        str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp")
    )


def _cuda_extension():
    """Return ``(ext_modules, cmdclass)`` for the CUDA build, or empty ones with a notice."""
    flag = os.environ.get("VQKERNELS_BUILD_CUDA", "").strip()
    if flag == "0":
        _notice("VQKERNELS_BUILD_CUDA=0: installing pure Python (CUDA backend will JIT-compile on first use).")
        return [], {}
    insist = flag == "1"

    def skip(reason):
        if insist:
            raise SystemExit(f"vqkernels setup: VQKERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _notice(f"not building the CUDA extension ({reason}); installing pure Python.")
        return [], {}

    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable in the build environment; use `pip install --no-build-isolation .`")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None:
        return skip("nvcc / CUDA_HOME not found")
    sources = _cuda_sources()
    if not sources:
        return skip("no CUDA sources under csrc/")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", FLAGS["CUDA_ARCH_LIST"])
    ext = CUDAExtension(
        name="vqkernels._C",
        sources=sources,
        include_dirs=[str(CSRC / sub) for sub in FLAGS["INCLUDE_SUBDIRS"]],
        # No -std here: torch's BuildExtension adds the standard its own headers need (C++17
        # for older torch, C++20 for recent releases); a forced -std=c++17 fights the latter.
        extra_compile_args={"cxx": list(FLAGS["CXX_FLAGS"]), "nvcc": list(FLAGS["NVCC_FLAGS"])},
    )
    _notice(f"building vqkernels._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


class BuildPyWithCudaSources(build_py):
    """Ship csrc/ inside the package as vqkernels/csrc so the JIT loader finds it after install."""

    def run(self):
        super().run()
        if CSRC.is_dir():
            target = Path(self.build_lib) / "vqkernels" / "csrc"
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(CSRC, target, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


def _cpu_extension():
    """``[CppExtension]`` for vqkernels._C_cpu, or ``[]`` with a notice."""
    flag = os.environ.get("VQKERNELS_BUILD_CPU", "").strip()
    if flag == "0":
        _notice("VQKERNELS_BUILD_CPU=0: not building the CPU extension (it will JIT-compile on first use).")
        return []
    sources = sorted(str(p.relative_to(ROOT)) for p in (CSRC / FLAGS["CPU_SUBDIR"]).glob("*.cpp"))
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError:
        reason = "torch is not importable in the build environment; use `pip install --no-build-isolation .`"
    else:
        reason = None if sources else "no CPU sources under csrc/cpu/"
    if reason is not None:
        if flag == "1":
            raise SystemExit(f"vqkernels setup: VQKERNELS_BUILD_CPU=1 but the CPU extension cannot be built: {reason}")
        _notice(f"not building the CPU extension ({reason}).")
        return []
    return [
        CppExtension(
            name="vqkernels._C_cpu",
            sources=sources,
            extra_compile_args={"cxx": list(FLAGS["CPU_CXX_FLAGS"])},
            extra_link_args=list(FLAGS["CPU_LDFLAGS"]),
        )
    ]


class OptionalBuildExt:
    """build_ext that turns a failed CPU extension into a notice (the CUDA one still fails loudly)."""

    @staticmethod
    def wrap(base):
        class _BuildExt(base):
            def build_extension(self, ext):
                if ext.name != "vqkernels._C_cpu" or os.environ.get("VQKERNELS_BUILD_CPU", "").strip() == "1":
                    return super().build_extension(ext)
                try:
                    super().build_extension(ext)
                except Exception as exc:  # a compiler error: install pure Python, JIT later
                    _notice(f"building vqkernels._C_cpu failed ({type(exc).__name__}: {exc}); the cpu backend will try a JIT build on first use.")

        return _BuildExt


ext_modules, cmdclass = _cuda_extension()
_cpu = _cpu_extension()
if _cpu:
    ext_modules = ext_modules + _cpu
    if "build_ext" not in cmdclass:
        from torch.utils.cpp_extension import BuildExtension

        cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=False)
    cmdclass["build_ext"] = OptionalBuildExt.wrap(cmdclass["build_ext"])
cmdclass["build_py"] = BuildPyWithCudaSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
