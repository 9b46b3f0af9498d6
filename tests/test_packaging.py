"""The sdist carries csrc/ (so a GPU machine can build the extension from it) and the wheel
carries the CUDA sources as package data (so the JIT loader works after a plain install)."""
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_build_sdist_and_wheel_are_complete(tmp_path):
    pytest.importorskip("build", reason="the `build` package (test extra) is needed to build distributions")
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
