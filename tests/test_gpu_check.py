"""benchmarks/gpu_check.sh rehearsed without a GPU: everything up to the first GPU call.

The dry run goes through a FRESH virtual environment (the lent GPU machine is bare: no
package index, nothing installed but torch, triton and pytest), which sees this test's
packages through a .pth file, with pip pointed at an unreachable index and told to use
none; a wheel brought along in a wheels folder must be installed into a target folder.
The other tests drive benchmarks/gpu_smoke.py in process: a smoke check must be able to
fail, the budget must cut it short with the results already written, and the summary
must say which phase failed or timed out.
"""
import json
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_smoke  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gpu_check.sh is a bash script")


def _wheel(folder, name="vqk_dry_peer", version="0.1"):
    """A minimal pure-Python wheel (what a peer brought along in .whl/ looks like to pip)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"__version__ = '{version}'\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A fresh venv (no pip of its own) that sees this interpreter's packages via a .pth."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    parent = sysconfig.get_paths()["purelib"]
    with open(os.path.join(site, "parent_site.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({parent!r})\n")
    return str(py)


def _bare_env(python):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VQK", "TRITON_"))}
    env.pop("PYTHONPATH", None)
    # No package index: told to use none, and any index it might still try is unreachable.
    env.update(PYTHON=python, PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def test_dry_run_in_a_bare_environment(bare_python, tmp_path):
    wheels = tmp_path / "wheels"
    _wheel(str(wheels))
    out = tmp_path / "out"
    env = dict(_bare_env(bare_python), VQK_SITE=str(tmp_path / "site"))  # the default is a fresh mktemp -d
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", "--budget", "300", "--wheels", str(wheels), str(out)],
                          env=env, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    log = proc.stdout[-4000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    # every phase recorded, in order, each in its own file
    results = json.loads((out / "results.json").read_text())
    phases = {p["phase"]: p["status"] for p in results["phases"]}
    assert list(phases) == list(gpu_smoke.PHASE_ORDER), phases
    assert {k: v for k, v in phases.items() if v != "skipped"} == {"env": "ok", "wheels": "ok", "smoke": "ok"}, phases
    assert all((out / "phases" / f"{name}.json").is_file() for name in phases)
    # the environment report names the bare interpreter
    env = json.loads((out / "env.json").read_text())
    assert env["executable"].startswith(os.path.dirname(os.path.dirname(bare_python))), env["executable"]
    assert env["cuda_available"] is False and "torch" in env
    # the wheel went into the target folder under OUT, with no index
    peers = json.loads((out / "peers.json").read_text())
    assert peers["status"] == "ok" and peers["wheels"] == ["vqk_dry_peer-0.1-py3-none-any.whl"], peers
    assert peers["target"] == str(tmp_path / "site")  # outside OUT: wheels do not travel back with the results
    assert (tmp_path / "site" / "vqk_dry_peer" / "__init__.py").is_file()
    assert set(peers["peers"]) == {dist for _, dist in gpu_smoke.PEERS}
    for p in peers["peers"].values():  # each peer imports, or says why not
        assert p["status"] == "ok" or (p["status"] == "skipped" and p["reason"]), p
    # the smoke checks' CPU path ran to the end and passed
    smoke = json.loads((out / "smoke.json").read_text())
    assert smoke["done"] and smoke["checks"] and all(c["ok"] for c in smoke["checks"]), smoke
    assert {c["op"] for c in smoke["checks"]} == {"assign", "histogram", "cluster_stats", "ema_update_"}
    summary = (out / "summary.txt").read_text()
    assert "smoke" in summary and "dry run" in summary and "no CUDA device" in summary, summary


@pytest.mark.parametrize("args, message", [
    ([], "OUTDIR is required"),
    (["--frobnicate", "x"], "unknown option --frobnicate"),
    (["--budget", "soon", "x"], "--budget expects whole seconds"),
    (["a", "b"], "one OUTDIR expected"),
])
def test_bad_arguments_are_refused_before_anything_runs(args, message, tmp_path):
    proc = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=30, cwd=str(tmp_path),
                          env=dict(os.environ, PYTHON="/nonexistent/python"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "b").exists()


def test_smoke_check_can_fail(monkeypatch, tmp_path):
    # A backend that returns the wrong code must fail the smoke check, not pass it.
    from vqkernels.ops.assign import chunked

    real = chunked.assign

    def off_by_one(x, codebook, metric):
        indices, distances = real(x, codebook, metric)
        return (indices + 1) % codebook.shape[-2], distances

    monkeypatch.setattr(chunked, "assign", off_by_one)
    res = gpu_smoke.smoke("cpu", ["chunked"], ["fp32"], budget=60, out_path=str(tmp_path / "smoke.json"),
                          only="ties")
    assert res["failed"] == 1 and "not nearest" in res["checks"][0]["problem"], res
    assert json.loads((tmp_path / "smoke.json").read_text())["failed"] == 1


def test_smoke_budget_cuts_short_with_results_written(tmp_path):
    res = gpu_smoke.smoke("cpu", ["chunked", "no_such_backend"], ["fp32"], budget=0,
                          out_path=str(tmp_path / "smoke.json"))
    written = json.loads((tmp_path / "smoke.json").read_text())
    assert written["done"] and written["checks"][:1] == res["checks"][:1]
    assert len(res["checks"]) <= 1  # the budget is checked before every check
    reasons = {s["reason"] for s in res["skipped"]}
    assert "time budget spent" in reasons and any("no_such_backend" in r for r in reasons), reasons


def test_summary_reports_the_phase_that_failed(tmp_path):
    out = str(tmp_path)
    assert gpu_smoke.main(["record", "--out", out, "env", "ok", "3", "torch 2"]) == 0
    assert gpu_smoke.main(["record", "--out", out, "tests", "timeout", "150", "rc=124"]) == 0
    assert gpu_smoke.main(["summary", "--out", out, "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [p["phase"] for p in results["phases"]] == ["env", "tests"] and results["ok"] is False
    assert "tests        timeout" in (tmp_path / "summary.txt").read_text()


def test_gpu_phases_record_their_failure_on_a_cpu_machine(tmp_path):
    # VQK_ASSUME_GPU=1 walks the GPU phases here, where each fails fast: every phase must
    # still be recorded (with its reason), the failed build must switch the JIT build off
    # for the later phases, and the exit status must say that something failed.
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VQK", "TRITON_"))}
    env.update(PYTHON=sys.executable, VQK_ASSUME_GPU="1", PIP_NO_INDEX="1", VQK_BUDGET_TESTS="60",
               VQK_SITE=str(tmp_path / "site"))
    proc = subprocess.run(["bash", SCRIPT, "--budget", "400", "--wheels", str(tmp_path / "none"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 1, log
    results = json.loads((out / "results.json").read_text())
    phases = {p["phase"]: p for p in results["phases"]}
    assert list(phases) == list(gpu_smoke.PHASE_ORDER), log
    assert results["ok"] is False
    assert phases["build"]["status"] == "failed" and "VQKERNELS_JIT=0" in phases["build"]["detail"], phases["build"]
    assert (out / "build.log").is_file()
    assert phases["smoke"]["status"] == "failed" and "no CUDA device" in phases["smoke"]["detail"]
    assert phases["tests"]["status"] in ("ok", "failed") and (out / "pytest_gpu.log").is_file()
    for name in ("bench_core", "bench_suite", "bench_full"):
        assert phases[name]["status"] in ("failed", "skipped") and phases[name]["detail"], phases[name]
