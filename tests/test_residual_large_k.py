"""Very large codebooks (K = 262,144, IBQ-size): training steps of the Quantizer and of a
residual stack without an N x K matrix, and the stage-wise k-means initialisation on a bounded
sample with progress (at a reduced size)."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import vqkernels.residual as residual_mod
from helpers import randn
from vqkernels import ResidualQuantizer

_PROBE = textwrap.dedent('''
    import json, sys
    import torch
    from vqkernels import Quantizer, ResidualQuantizer
    torch.manual_seed(0)
    torch.set_num_threads(2)
    K, N, D = 262144, 2048, 8
    x = torch.randn(N, D)

    def status_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    def growth(fn):
        # ru_maxrss is inherited across exec (a large pytest parent hid the control's 2 GiB):
        # reset the high-water mark (clear_refs 5) and read VmHWM against the current VmRSS.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status_kib("VmRSS")
        fn()
        return (status_kib("VmHWM") - base) / 1024  # MiB

    out = {}
    for name, m in (("quantizer", Quantizer(D, K, codebook_dim=D)), ("residual", ResidualQuantizer(D, 2, K))):
        m(x[:8])  # the first step allocates the statistics' buffers

        def steps():
            for _ in range(2):
                q = m(x)[0]
                if q.requires_grad:
                    q.sum().backward()
        out[name] = growth(steps)
        out[name + "_eval"] = growth(lambda: m.eval()(x))
    # the probe's control: a real N x K matrix is seen
    # (an explicit filled matrix: cdist's internal path once showed only 292 of 2048 MiB in a full-suite run)
    out["control"] = growth(lambda: torch.full((N, K), 1.0).argmin(1))
    out["nk_mib"] = N * K * 4 / 2**20
    print(json.dumps(out))
''')


def test_k262144_training_without_an_n_by_k_matrix():
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    nk = got["nk_mib"]  # 2048 MiB
    assert got["control"] > 0.9 * nk, got  # the peak-RSS probe does see an N x K matrix
    for name in ("quantizer", "quantizer_eval", "residual", "residual_eval"):
        assert got[name] < nk / 8, f"{name}: peak memory grew by {got[name]:.0f} MiB (N x K = {nk:.0f} MiB): {got}"


def _record_kmeans(monkeypatch):
    calls = []
    real = residual_mod.kmeans

    def spy(x, K, *a, **kw):
        calls.append((x.shape[0], K, kw.get("init"), kw.get("progress")))
        return real(x, K, *a, **kw)

    monkeypatch.setattr(residual_mod, "kmeans", spy)
    return calls


def test_kmeans_init_sees_a_bounded_sample_and_reports_progress_on_stderr(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # tqdm not importable: stderr lines
    calls = _record_kmeans(monkeypatch)
    rq = ResidualQuantizer(4, 3, (8, 32, 16), init="kmeans", kmeans_iters=2, kmeans_max_rows=100, progress=True)
    rq(randn(1000, 4, seed=1))
    assert [c[:2] for c in calls] == [(100, 8), (100, 32), (100, 16)]
    err = capsys.readouterr().err
    assert "residual k-means init 1/3 (stage 0: K=8, 100 rows)" in err and "3/3 (stage 2: K=16, 100 rows)" in err
    # cluster sizes in units of the real batch (1000 rows), not of the sample
    sizes = rq.codebook_state.cluster_size.sum(-1)
    torch.testing.assert_close(sizes, torch.full((3,), 1000.0))


def test_kmeans_init_progress_uses_tqdm_when_importable(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    calls = _record_kmeans(monkeypatch)
    rq = ResidualQuantizer(4, 2, 8, init="kmeans", kmeans_iters=1, progress=True)
    rq(randn(64, 4, seed=2))
    assert all(c[3] is True for c in calls)  # k-means' own bar over its iterations
    err = capsys.readouterr().err
    assert "residual k-means init" in err and "2/2" in err and rq.codebook_state.is_initialised


def test_large_codebooks_seed_randomly_and_default_to_progress(monkeypatch, capsys):
    monkeypatch.setattr(residual_mod, "_KMEANS_PLUS_PLUS_MAX_K", 16)
    monkeypatch.setattr(residual_mod, "_PROGRESS_K", 32)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    calls = _record_kmeans(monkeypatch)
    small = ResidualQuantizer(4, 2, (16, 8), init="kmeans", kmeans_iters=1)
    assert not small.progress
    small(randn(200, 4, seed=3))
    assert [c[2] for c in calls] == ["kmeans++", "kmeans++"] and capsys.readouterr().err == ""
    calls.clear()
    big = ResidualQuantizer(4, 2, (32, 8), init="kmeans", kmeans_iters=1)
    assert big.progress and big.kmeans_max_rows == 65536
    big(randn(200, 4, seed=3))
    assert [c[2] for c in calls] == ["random", "kmeans++"] and "2/2" in capsys.readouterr().err


def test_kmeans_max_rows_below_k_is_refused():
    with pytest.raises(ValueError, match=r"kmeans_max_rows must be an int >= codebook_size=32"):
        ResidualQuantizer(4, 2, 32, kmeans_max_rows=16)
