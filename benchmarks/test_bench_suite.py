"""The ``vqkernels bench`` suite as pytest-benchmark tests, for those who prefer it.

    pytest benchmarks/ --benchmark-only                               # the quick grid
    VQKERNELS_BENCH_GRID=full pytest benchmarks/ --benchmark-only     # the full grid
    VQKERNELS_BENCH_OPS=assign,step VQKERNELS_BENCH_DEVICE=cuda pytest benchmarks/ --benchmark-only

Same grid, contenders and checks as ``vqkernels bench`` (the op specs of vqkernels/bench/);
one benchmark per (row, contender), grouped by row so pytest-benchmark's table puts the
contenders of a row side by side. Before a row is timed, every contender runs once and
the results are checked against each other (exact distance of each pick against the best
pick, within the dtype tolerance): a vqkernels contender that disagrees fails its test,
a peer that disagrees is timed and flagged in ``extra_info`` (``agrees: false``).
Peak memory stays with ``vqkernels bench`` (its in-process/subprocess probes).
tests/test_bench_cli.py runs this file on the smoke grid (``--benchmark-disable``).
"""
import os
import warnings

import pytest
import torch

pytest.importorskip("pytest_benchmark")  # the `benchmark` fixture; without it there is nothing to run

from vqkernels import bench

DEVICE = os.environ.get("VQKERNELS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
GRID = os.environ.get("VQKERNELS_BENCH_GRID", "quick")
OPS = bench.parse_ops(os.environ.get("VQKERNELS_BENCH_OPS", ",".join(bench.OPS)))
OPTS = bench.Options(device=DEVICE, max_dense_bytes=bench.report.DEFAULT_MAX_DENSE_GIB[DEVICE] * 2**30)
ROUNDS = {"smoke": 1, "quick": 3, "full": 5}.get(GRID, 3)

CASES = bench.grid(GRID, DEVICE, OPS) if DEVICE != "cuda" or torch.cuda.is_available() else []
PARAMS = [
    pytest.param(case, contender, id=f"{case.op}-{case.label().replace(' ', '-')}-{contender.name}")
    for case in CASES
    for contender in bench.contenders(case.op)
]

_checked = {}  # the current row's inputs and checks (rows run in order; one kept at a time)


def _checked_row(case):
    """Run every contender of ``case`` once and check them against each other (cached for the row)."""
    if case not in _checked:
        _checked.clear()
        inputs = bench.make_inputs(case, DEVICE, OPTS.seed)
        outputs, skipped = {}, {}
        for contender in bench.contenders(case.op):
            try:
                prepared = contender.prepare(case, inputs, DEVICE, OPTS)
            except bench.Skip as skip:
                skipped[contender.name] = str(skip)
                continue
            outputs[contender.name] = prepared.output(prepared.fn())
            del prepared
        _checked[case] = (inputs, bench.check_outputs(case, inputs, outputs), skipped)
    return _checked[case]


@pytest.mark.parametrize("case, contender", PARAMS)
def test_bench(benchmark, case, contender):
    inputs, checks, skipped = _checked_row(case)
    if contender.name in skipped:
        pytest.skip(skipped[contender.name])
    check = checks[contender.name]
    if contender.family == "vqkernels":
        assert check.ok, f"{contender.name} disagrees with the best pick on {case.label()}: {check.agree:.4f} {check.detail}"
    elif not check.ok:
        warnings.warn(f"{contender.name} disagrees with the best pick on {case.label()}: {check.agree:.4f}")
    prepared = contender.prepare(case, inputs, DEVICE, OPTS)
    benchmark.group = f"{case.op} {case.label()}"
    benchmark.extra_info.update(
        op=case.op, N=case.N, K=case.K, D=case.D, dtype=case.dtype, metric=case.metric, iters=case.iters,
        family=contender.family, agrees=check.ok, agree_fraction=check.agree, throughput_unit=case.spec.unit,
    )
    sync = (lambda: torch.cuda.synchronize()) if DEVICE == "cuda" else (lambda: None)

    def call():
        prepared.fn()
        sync()

    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["throughput"] = case.throughput(benchmark.stats.stats.median)
