"""The sdist carries csrc/ (so a GPU machine can build the extension from it) and the wheel
carries the CUDA sources as package data (so the JIT loader works after a plain install)."""
import ast
import importlib.util
import os
import runpy
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_build_sdist_and_wheel_are_complete(tmp_path):
    # find_spec of build.__main__, not an import of `build`: a `build/` folder in the checkout
    # (left by `setup.py build_ext`) imports as a namespace package where pypa-build is absent
    if importlib.util.find_spec("build") is None or importlib.util.find_spec("build.__main__") is None:
        pytest.skip("the `build` package (test extra) is needed to build distributions")
    cmd = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "VQKERNELS_BUILD_CUDA": "0"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sdist = next(tmp_path.glob("*.tar.gz"))
    wheel = next(tmp_path.glob("*.whl"))
    with tarfile.open(sdist) as tar:
        sdist_names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    with zipfile.ZipFile(wheel) as zf:
        wheel_names = set(zf.namelist())
    sources = [str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file() and p.suffix in (".cu", ".cuh", ".cpp", ".h")]
    assert sources, "no CUDA sources found under csrc/"
    for src in sources:
        assert src in sdist_names, f"sdist lacks {src}"
        assert "vqkernels/" + src in wheel_names, f"wheel lacks vqkernels/{src}"
    package = [str(p.relative_to(ROOT)) for p in (ROOT / "vqkernels").rglob("*.py")]
    for module in package:
        assert module in wheel_names, f"wheel lacks {module}"
    for needed in ("setup.py", "pyproject.toml", "README.md"):
        assert needed in sdist_names
    assert any(n.endswith("entry_points.txt") for n in wheel_names)


def test_compile_flags_are_written_once():
    """setup.py, the JIT build and the nvcc compile check take their flags from
    vqkernels/_build_flags.py, which imports nothing: setup.py reads it by path, before the
    package can be imported."""
    flags_file = ROOT / "vqkernels" / "_build_flags.py"
    tree = ast.parse(flags_file.read_text())
    imports = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not imports, f"_build_flags.py must import nothing, found {imports}"
    flags = runpy.run_path(str(flags_file))
    # IEEE division and sqrt: the winner's exact distance and the EMA division rely on them.
    assert "--use_fast_math" not in flags["NVCC_FLAGS"], flags["NVCC_FLAGS"]
    users = [ROOT / "setup.py", ROOT / "vqkernels" / "_extension.py", ROOT / "tests" / "test_cuda_build.py"]
    for user in users:
        text = user.read_text()
        assert "_build_flags" in text, f"{user.name} does not read vqkernels/_build_flags.py"
        for flag in {*flags["CXX_FLAGS"], *flags["NVCC_FLAGS"], "--use_fast_math"}:
            assert f'"{flag}"' not in text, f"{user.name} spells out the compile flag {flag!r} again"


def test_cpu_extension_flags_are_written_once():
    """The CPU extension's flags live in _build_flags too: setup.py builds portable code (a
    wheel runs on any CPU of the architecture), the JIT build may target its own CPU."""
    flags = runpy.run_path(str(ROOT / "vqkernels" / "_build_flags.py"))
    assert not any(f.startswith("-march") for f in flags["CPU_CXX_FLAGS"]), flags["CPU_CXX_FLAGS"]
    assert "-march=native" in flags["CPU_JIT_CXX_FLAGS"]
    assert "-ffast-math" not in flags["CPU_CXX_FLAGS"] + flags["CPU_JIT_CXX_FLAGS"]  # exact distances, IEEE ties
    for user in (ROOT / "setup.py", ROOT / "vqkernels" / "_cpu_extension.py"):
        text = user.read_text()
        assert "CPU_" in text and ("_build_flags" in text or "FLAGS[" in text), f"{user.name} does not read the CPU flags"
        for flag in {*flags["CPU_CXX_FLAGS"], *flags["CPU_JIT_CXX_FLAGS"], *flags["CPU_LDFLAGS"]}:
            assert f'"{flag}"' not in text, f"{user.name} spells out the compile flag {flag!r} again"
