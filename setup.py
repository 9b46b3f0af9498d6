"""Build script: pure Python everywhere, plus the CUDA extension ``vqkernels._C`` where possible.

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


ext_modules, cmdclass = _cuda_extension()
cmdclass["build_py"] = BuildPyWithCudaSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
