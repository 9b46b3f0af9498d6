"""What is specific to the C++ ``cpu`` backend (csrc/cpu/, vqkernels/_cpu_extension.py).

The backend-parametrised suites (test_ops, test_assign_ties, test_codebook_axis, ...)
run it against the reference like every backend; here: that it builds where a compiler
is present, how a broken build is reported, and the shapes that reach its tile and path
boundaries (both kernels: fused for D <= 16, BLAS tiles above).
"""
import subprocess
import sys

import pytest
import torch

import vqkernels
from vqkernels import _cpu_extension
from vqkernels.errors import BackendUnavailableError
from vqkernels.ops import _dispatch
from vqkernels.ops.assign import reference

from helpers import check_assign, check_assign_centred, randn

DIMS = (1, 3, 4, 8, 17, 32, 33, 64, 130)


def test_extension_builds_where_a_compiler_is_present():
    # A skip here would hide a broken build in CI (pip install -e . leaves the JIT to run).
    if not _cpu_extension.compiler_available():
        pytest.skip("no C++ compiler on PATH")
    assert _cpu_extension.unavailable_reason() is None, _cpu_extension.status()
    assert _dispatch.automatic_order("cpu")[0] == "cpu"
    assert _dispatch.select("assign", torch.device("cpu"), torch.float32) == "cpu"


def _cpu_ready():
    reason = _cpu_extension.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def broken(monkeypatch):
    """A loader whose build failed, as a compiler error would leave it."""
    monkeypatch.setitem(_cpu_extension._state, "tried", True)
    monkeypatch.setitem(_cpu_extension._state, "module", None)
    monkeypatch.setitem(_cpu_extension._state, "reason", "the JIT build in /x failed (RuntimeError: error: boom)")


def test_broken_build_forced_backend_raises_with_reason(broken):
    with pytest.raises(BackendUnavailableError, match="'cpu'.*boom"):
        vqkernels.assign(torch.randn(4, 3), torch.randn(5, 3), backend="cpu")


def test_broken_build_automatic_choice_warns_and_uses_chunked(broken):
    _dispatch._logged.clear()
    with pytest.warns(RuntimeWarning, match="skipping the 'cpu' backend.*boom"):
        name = _dispatch.select("assign", torch.device("cpu"), torch.float32)
    assert name == "chunked"


def test_broken_build_reported_by_info(broken):
    from vqkernels.cli import info_lines

    lines = [l for l in info_lines() if "_C_cpu" in l]
    assert lines and "unavailable" in lines[0] and "boom" in lines[0]


def test_import_never_builds_or_loads():
    code = "import vqkernels, sys; from vqkernels import _cpu_extension as e; print(e._state['tried'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_loader_failure_is_a_reason_not_an_exception(monkeypatch):
    monkeypatch.setitem(_cpu_extension._state, "tried", False)
    monkeypatch.setitem(_cpu_extension._state, "module", None)

    def boom():
        raise OSError("disk on fire")

    monkeypatch.setattr(_cpu_extension, "_load_locked", boom)
    assert "disk on fire" in _cpu_extension.unavailable_reason()
    assert _cpu_extension.status().startswith("unavailable")


@pytest.mark.parametrize("fused_max_d", [None, "0"])
def test_both_paths_at_one_shape(fused_max_d, tmp_path):
    """D = 16 through the fused kernel and, with VQKERNELS_CPU_FUSED_MAX_D=0, the BLAS tiles."""
    if not _cpu_extension.compiler_available():
        pytest.skip("no C++ compiler on PATH")
    code = (
        "import torch, vqkernels\n"
        "from vqkernels.ops.assign import reference\n"
        "g = torch.Generator().manual_seed(3)\n"
        "x, c = torch.randn(2, 300, 16, generator=g), torch.randn(2, 700, 16, generator=g)\n"
        "c[:, 650] = c[:, 5]\n"  # a tie across tiles
        "x[:, 7] = c[:, 5]\n"
        "for m in ('l2', 'dot', 'cosine'):\n"
        "    i, d = vqkernels.assign(x, c, m, backend='cpu')\n"
        "    ri, rd = reference.assign(x, c, m)\n"
        "    assert torch.equal(i, ri), m\n"
        "    assert torch.allclose(d, rd, atol=1e-5), m\n"
        "    assert (i[:, 7] == 5).all()\n"
        "print('ok')\n"
    )
    env = dict(__import__("os").environ)
    if fused_max_d is not None:
        env["VQKERNELS_CPU_FUSED_MAX_D"] = fused_max_d
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_dims_against_reference(D, metric):
    _cpu_ready()
    C, N, K = 2, 37, 203  # N not a multiple of the row block / row group, K not of the tile
    x, c = randn(C, N, D, seed=D), randn(C, K, D, seed=100 + D)
    i, d = vqkernels.assign(x, c, metric, backend="cpu")
    for h in range(C):
        check_assign(x[h], c[h], metric, i[h], d[h])


@pytest.mark.parametrize("D", [4, 8, 16, 32, 64])
def test_ties_between_distinct_codes_across_tiles(D):
    """Codes that tie exactly with x (mirror images around it) in different tiles: the lowest wins."""
    _cpu_ready()
    K = 5000  # several tiles of both kernels
    x = torch.zeros(3, D)
    c = 50.0 + randn(K, D, seed=D)  # far, distinct filler codes
    e = torch.zeros(D)
    e[0] = 1.0
    c[4000], c[1200], c[4999] = e, -e, e  # |x - c|^2 = 1 for all three, distinct codes
    x[1, 1] = 0.25  # still equidistant from e and -e
    x[2, 0] = 0.5  # nearer e: copies 4000 and 4999 tie, in different tiles
    i, _ = vqkernels.assign(x, c, "l2", backend="cpu")
    ri, _ = reference.assign(x, c, "l2")
    assert i.tolist() == [1200, 1200, 4000]
    assert torch.equal(i, ri)


@pytest.mark.parametrize("D", [3, 4, 8, 16, 33, 64, 130])
def test_integer_data_exact_ties_between_distinct_codes(D):
    """Small-integer data: every distance is an exact integer, so many distinct codes tie
    exactly; the expanded-form scores (both kernels) round them apart, the exact re-check
    of the codes within the rounding margin must still return the reference's lowest index."""
    _cpu_ready()
    g = torch.Generator().manual_seed(D)
    x = torch.randint(-2, 3, (400, D), generator=g).float() + 0.5
    c = torch.randint(-2, 3, (3000, D), generator=g).float() + 0.5
    i, d = vqkernels.assign(x, c, "l2", backend="cpu")
    ri, rd = reference.assign(x, c, "l2")
    assert torch.equal(i, ri)
    assert torch.equal(d, rd)


@pytest.mark.parametrize("D", [4, 16, 32, 64])
def test_large_offset_inputs(D):
    _cpu_ready()
    off = 1.0e4
    x, c = randn(500, D, seed=1) + off, randn(300, D, seed=2) + off
    i, d = vqkernels.assign(x, c, "l2", backend="cpu")
    check_assign_centred(x, c, i)
    if D <= 16:  # the fused kernel's direct differences are exact: same pick as the reference
        ri, rd = reference.assign(x, c, "l2")
        assert torch.equal(i, ri)
        assert torch.allclose(d, rd, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [8, 64])
def test_half_inputs_match_reference_in_fp32(dtype, D):
    _cpu_ready()
    x, c = randn(2, 129, D, seed=5).to(dtype), randn(2, 77, D, seed=6).to(dtype)
    for metric in ("l2", "cosine", "dot"):
        i, d = vqkernels.assign(x, c, metric, backend="cpu")
        ri, rd = reference.assign(x, c, metric)
        assert d.dtype == torch.float32
        assert torch.equal(i, ri), metric
        assert torch.allclose(d, rd, atol=1e-4, rtol=1e-5), metric


@pytest.mark.parametrize("shape", [(1, 1, 8), (1, 5, 1), (3, 1, 33), (4, 1000, 4)])
def test_k1_n1_and_codebook_axis(shape):
    _cpu_ready()
    C, N, D = shape
    K = 1 if N != 1 else 9
    x, c = randn(C, N, D, seed=7), randn(C, K, D, seed=8)
    i, d = vqkernels.assign(x, c, backend="cpu")
    ri, rd = reference.assign(x, c, "l2")
    assert i.shape == (C, N) and torch.equal(i, ri)
    assert torch.allclose(d, rd, atol=1e-5)


def test_nan_rows_do_not_crash_the_kernel():
    _cpu_ready()
    x, c = randn(64, 8, seed=9), randn(40, 8, seed=10)
    x[3, 2] = float("nan")
    x[9] = float("inf")
    raw_i, raw_d = torch.ops.vqkernels.assign_cpu(x.unsqueeze(0), c.unsqueeze(0), "l2")
    assert ((raw_i >= 0) & (raw_i < 40)).all()  # some in-range index, never garbage
    i, d = vqkernels.assign(x, c, backend="cpu")
    assert i[3] == -1 and i[9] == -1 and torch.isnan(d[3])
    ok = torch.ones(64, dtype=torch.bool)
    ok[[3, 9]] = False
    assert torch.equal(i[ok], reference.assign(x[ok], c, "l2")[0])


def test_bad_inputs_to_the_raw_op_raise():
    _cpu_ready()
    op = torch.ops.vqkernels.assign_cpu
    with pytest.raises(RuntimeError, match="metric"):
        op(torch.randn(1, 2, 3), torch.randn(1, 4, 3), "l1")
    with pytest.raises(RuntimeError, match="disagree"):
        op(torch.randn(1, 2, 3), torch.randn(1, 4, 5), "l2")
    with pytest.raises(RuntimeError, match="not supported"):
        op(torch.randn(1, 2, 3, dtype=torch.float64), torch.randn(1, 4, 3, dtype=torch.float64), "l2")


def test_more_near_ties_than_the_shortlist_keeps():
    """BLAS path: 20 codes within the score's rounding margin of the best before the true
    nearest (code 20), so the shortlist overflows; a later near code must not make the
    kernel forget the dropped ones."""
    _cpu_ready()
    D, K = 64, 900  # two code tiles at D = 64
    u = torch.nn.functional.normalize(randn(K, D, seed=11), dim=-1)
    radius = torch.full((K,), 2.0)
    radius[:20] = 1.0 + 1e-6 * (21 - torch.arange(20, dtype=torch.float32))  # near, not nearest
    radius[20] = 1.0  # the nearest
    radius[850] = 1.0 + 25e-6  # near again, in the second tile
    c = u * radius.view(-1, 1)
    x = torch.zeros(1, D)
    i, d = vqkernels.assign(x, c, "l2", backend="cpu")
    ri, rd = reference.assign(x, c, "l2")
    assert ri.item() == 20
    assert i.item() == 20 and torch.allclose(d, rd, rtol=1e-6)


@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("D", [33, 64])
def test_ties_of_rows_far_from_a_tight_codebook(metric, D):
    """BLAS path: rows far from a tight codebook (|x'| >> |c'|), so the score's rounding error
    is set by |x'| |c'|; the margin must count the row's |x'|^2, or codes tying exactly with
    the nearest (its dimension-rolled copies: every row is constant) are rounded out of the
    shortlist and a higher index wins."""
    _cpu_ready()
    g = torch.Generator().manual_seed(D)
    x = (8.0 + torch.randint(-2, 3, (600, 1), generator=g).float()).expand(600, D).contiguous()
    base = 0.5 + torch.randint(-2, 3, (700, D), generator=g).float() / 16  # exact sums: exact ties
    c = torch.cat([base.roll(s, dims=1) for s in (0, 1, 5)])  # distinct codes, tied distances
    i, d = vqkernels.assign(x, c, metric, backend="cpu")
    ri, rd = reference.assign(x, c, metric)
    assert torch.equal(i, ri)
    assert torch.equal(d, rd)


# The fused kernel (D <= 16) walks the codes in tiles of 128 subblocks of one vector of
# codes (2048 codes under AVX-512, 1024 with 8-lane vectors) and rescans a subblock only
# where its minimum score is within a row's margin: these shapes reach every boundary.
FUSED_K = 2 * 2048 + 37  # three tiles (two or five with 8 lanes), the last subblock partial


@pytest.mark.parametrize("D", [3, 4, 8, 16])
@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_fused_winner_in_the_last_partial_subblock(D, metric):
    _cpu_ready()
    x, c = randn(2, 70, D, seed=20 + D), randn(2, FUSED_K, D, seed=40 + D)
    x[0, :10] = c[0, -1] + 1e-3 * randn(10, D, seed=60 + D)  # the last code is the nearest
    i, d = vqkernels.assign(x, c, metric, backend="cpu")
    for h in range(2):
        check_assign(x[h], c[h], metric, i[h], d[h])
    if metric == "l2":
        assert (i[0, :10] == FUSED_K - 1).all()


@pytest.mark.parametrize("K", [1, 5, 16, 2049, FUSED_K])
@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_fused_all_codes_equal(K, metric):
    """Every code ties exactly (every subblock of every tile is rescanned): index 0 wins."""
    _cpu_ready()
    x = randn(33, 4, seed=1)
    c = randn(1, 4, seed=2).expand(K, 4).contiguous()
    i, d = vqkernels.assign(x, c, metric, backend="cpu")
    ri, rd = reference.assign(x, c, metric)
    assert (i == 0).all()
    assert torch.allclose(d, rd, atol=1e-6)


@pytest.mark.parametrize("D", [4, 8, 16])
def test_fused_near_ties_before_the_nearest_in_a_later_tile(D):
    """20 codes within the score's rounding margin of the nearest one, in the first tile;
    the nearest (code 4500) in the last; another near code in the middle tile."""
    _cpu_ready()
    K = FUSED_K
    u = torch.nn.functional.normalize(randn(K, D, seed=12), dim=-1)
    radius = torch.full((K,), 2.0)
    radius[:20] = 1.0 + 1e-6 * (21 - torch.arange(20, dtype=torch.float32))
    radius[4100] = 1.0
    radius[2100] = 1.0 + 3e-6
    c = u * radius.view(-1, 1)
    x = torch.zeros(2, D)
    x[1] = 1e-4 * u[4100]  # nearer still to code 4100
    i, d = vqkernels.assign(x, c, "l2", backend="cpu")
    ri, rd = reference.assign(x, c, "l2")
    assert ri.tolist() == [4100, 4100]
    assert torch.equal(i, ri) and torch.allclose(d, rd, rtol=1e-6)


def test_fused_non_finite_codes_never_win_nor_poison_the_others():
    """Raw op (the public one rejects such codebooks): a NaN code never wins (nor, in l2, an
    infinite one) and neither spoils the l2 centring of the finite codes."""
    _cpu_ready()
    D, K = 8, 300
    x, c = randn(1, 40, D, seed=13), randn(1, K, D, seed=14)
    c[0, 0, 3] = float("nan")
    c[0, 299, 0] = float("nan")
    for metric in ("l2", "dot", "cosine"):
        cm = c.clone()
        if metric == "l2":
            cm[0, 100] = float("inf")
            cm[0, 200, 1] = -float("inf")
        finite = torch.isfinite(cm[0]).all(-1)
        i, d = torch.ops.vqkernels.assign_cpu(x, cm, metric)
        ri, rd = reference.assign(x[0], cm[0, finite], metric)
        assert torch.equal(i[0], finite.nonzero()[:, 0][ri]), metric
        assert torch.allclose(d[0], rd, atol=1e-5), metric


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_fused_runs_of_copies_of_the_nearest_code(metric):
    """A run of copies of one code spanning subblocks and tiles (the kernel keeps only the
    first of a run in play): the first copy wins, as the reference's lowest index."""
    _cpu_ready()
    D, K = 8, FUSED_K
    c = randn(K, D, seed=15)
    c[1000:3000] = c[1000].clone()  # across a tile boundary
    c[3500:] = 0.0  # a constant tail, the last subblock partial
    x = randn(64, D, seed=16)
    x[:8] = c[1000] + 1e-3 * randn(8, D, seed=17)
    x[8:16] = 1e-3 * randn(8, D, seed=18)  # nearest to the zero tail (l2)
    i, d = vqkernels.assign(x, c, metric, backend="cpu")
    ri, rd = reference.assign(x, c, metric)
    assert torch.equal(i, ri) and torch.allclose(d, rd, atol=1e-5)
    if metric == "l2":
        assert (i[:8] == 1000).all() and (i[8:16] == 3500).all()


@pytest.mark.parametrize("D", [3, 8, 16])
def test_finite_row_with_overflowing_norm_still_gets_its_nearest_code(D):
    # |x|^2 overflows fp32 while x and every dot score stay finite: the row's rounding margin is
    # infinite, which once made the D <= 16 kernel treat it as a non-finite row (index 0).
    torch.manual_seed(0)
    codebook = torch.randn(37, D)
    x = torch.zeros(2, D)
    x[0, :2] = 1e20
    x[1, -1] = -3e19
    got = vqkernels.assign(x, codebook, "dot", backend="cpu")
    want = (-(x.double() @ codebook.double().T)).argmin(1)
    assert got.indices.tolist() == want.tolist()
    assert torch.isfinite(got.distances).all()


def test_a_build_killed_midway_does_not_hang_later_processes(tmp_path):
    """torch's JIT build guards its folder with a ``lock`` file that only the builder deletes; a
    build killed midway (Ctrl-C during the first-use compile) used to leave it, and every later
    first use of the backend waited for it forever. The loader's own OS lock makes it stale."""
    _cpu_ready()
    how = _cpu_extension.status()
    if not how.startswith("JIT ("):
        pytest.skip(f"the extension is not a JIT build here ({how})")
    import os
    import shutil
    from pathlib import Path

    built = Path(how[len("JIT ("):].split(")")[0])
    folder = tmp_path / "cache" / "cpu" / built.name
    shutil.copytree(built, folder)  # mtimes kept: ninja finds nothing to rebuild
    (folder / "lock").touch()  # what the killed build left
    code = ("import torch, vqkernels\n"
            "print(vqkernels.assign(torch.randn(9, 3), torch.randn(4, 3), backend='cpu').indices.shape)\n")
    env = dict(os.environ, VQKERNELS_CACHE=str(tmp_path / "cache"))
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the first use of the cpu backend hung on the stale lock file of a killed build")
    assert proc.returncode == 0 and "torch.Size([9])" in proc.stdout, proc.stderr[-2000:]
    assert not (folder / "lock").exists()


def test_the_build_lock_waits_for_a_live_build(tmp_path):
    """A ``lock`` file is only cleared once no other process builds in the folder."""
    import time

    from vqkernels import _extension_loader

    if _extension_loader.fcntl is None:
        pytest.skip("no fcntl: the stale lock is left alone")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, pathlib, sys, time\n"
        f"d = pathlib.Path({str(tmp_path)!r})\n"
        "h = open(d / 'vqkernels-build.lock', 'w'); fcntl.flock(h, fcntl.LOCK_EX)\n"
        "(d / 'lock').touch(); print('building', flush=True); time.sleep(1.5)\n"
        "(d / 'lock').unlink(); (d / 'done').touch()\n")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "building"
    started = time.monotonic()
    with _extension_loader._build_lock(tmp_path):
        waited = time.monotonic() - started
        assert (tmp_path / "done").exists()  # entered only after the live build ended
    assert holder.wait(timeout=30) == 0 and waited > 0.5
