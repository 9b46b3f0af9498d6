"""``vqkernels demo`` in its tiny configuration: the CLI contract and the direction of the effect."""
import argparse
import re

import pytest
import torch

from vqkernels import demo


@pytest.fixture(autouse=True)
def one_thread():
    """The demo's models are tiny: one thread is fastest, as in ``vqkernels demo`` itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parse(argv):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(argv)


def table_row(text, label):
    """The numbers of the printed table's row that starts with ``label``."""
    for line in text.splitlines():
        if line.startswith(label):
            return [float(v) for v in re.findall(r"-?\d+\.\d+|-?\d+", line[len(label):])]
    raise AssertionError(f"no row {label!r} in:\n{text}")


def check_plot(png, err):
    """The PNG where matplotlib (an optional dependency) imports; otherwise no file and the reason
    on stderr (a bare GPU image has no matplotlib)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists() and "no plot" in err, err
        return
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_contract():
    args = parse(["--steps", "7", "--codebook-size", "32", "--seed", "3", "--out", "x", "--device", "cpu", "--quick"])
    assert (args.steps, args.codebook_size, args.seed, args.out, args.device) == (7, 32, 3, "x", "cpu")
    assert args.quick and not args.capacity_sweep
    defaults = parse([])
    assert defaults.out == "./vqkernels_out" and defaults.device == "cpu"
    cfg = demo.config_from_args(parse(["--quick"]))
    assert cfg.steps < demo.DemoConfig().steps and cfg.codebook_size < demo.DemoConfig().codebook_size
    assert demo.config_from_args(parse(["--quick", "--steps", "50"])).steps == 50


def test_tiny_demo_shows_deferred_beats_early(tmp_path, capsys):
    torch.set_num_threads(2)
    rc = demo.run(parse(["--quick", "--out", str(tmp_path), "--no-progress"]))
    out, err = capsys.readouterr()
    assert rc == 0, out
    assert torch.get_num_threads() == 2, "the demo restores the thread count"
    early, deferred = table_row(out, "utilisation (used / K)")
    assert deferred > early, out
    vr_early, vr_deferred = table_row(out, "variance ratio")
    assert vr_deferred > vr_early, out
    for label in ("reconstruction MSE", "perplexity", "mean dist embedding -> code", "mean dist code -> embedding",
                  "effective rank, embeddings", "effective rank, codebook", "classes covered"):
        table_row(out, label)
    check_plot(tmp_path / "early_vs_deferred.png", err)


def test_capacity_sweep_runs(capsys):
    cfg = demo.DemoConfig(steps=60, codebook_size=16, train_rows=1024, eval_rows=512)
    results = demo.run_capacity_sweep(cfg, widths=(2, 64), progress=False)
    narrow, wide = results[2]["report"], results[64]["report"]
    assert narrow["effective_rank_embeddings"] < wide["effective_rank_embeddings"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_request_without_gpu_fails_cleanly(tmp_path, capsys):
    rc = demo.run(parse(["--quick", "--device", "cuda", "--out", str(tmp_path)]))
    assert rc == 2 and "no CUDA device" in capsys.readouterr().err


def test_bad_sizes_fail_cleanly(tmp_path, capsys):
    assert demo.run(parse(["--quick", "--codebook-size", "100000", "--out", str(tmp_path)])) == 2
    assert "too large" in capsys.readouterr().err


def unit_row(text, run, unit):
    """The numbers of the per-stage table's row for ``run`` / ``unit``."""
    for line in text.splitlines():
        cells = line.split()
        if cells[:1] == [run] and " ".join(cells[1:3]) == unit:
            return [float(v) for v in cells[3:10]]
    raise AssertionError(f"no row {run} {unit!r} in:\n{text}")


def test_residual_demo_reports_every_stage(tmp_path, capsys):
    rc = demo.run(parse(["--residual", "--quick", "--out", str(tmp_path), "--no-progress"]))
    out, err = capsys.readouterr()
    assert rc == 0, out
    assert "residual MLP VQ-VAE (4 stages" in out and "K=16" in out
    for run in ("early", "deferred"):
        for q in range(4):
            util, used, dead = unit_row(out, run, f"stage {q}")[:3]
            assert used + dead == 16 and abs(util - used / 16) < 1e-3, out
    # the shrinkage the paper describes is in the first stage, which sees the raw embeddings
    assert unit_row(out, "deferred", "stage 0")[0] > unit_row(out, "early", "stage 0")[0], out
    early, deferred = table_row(out, "utilisation (used / K)")
    assert deferred > early, out
    check_plot(tmp_path / "residual_early_vs_deferred.png", err)
    cfg = demo.config_from_args(parse(["--residual", "--stages", "2"]))
    assert cfg.residual and cfg.stages == 2 and cfg.codebook_size == 64
