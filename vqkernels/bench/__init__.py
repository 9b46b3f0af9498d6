"""``vqkernels bench``: every vqkernels backend and every installed peer, side by side, checked.

    vqkernels bench [--device cpu|cuda] [--quick | --smoke] [--ops assign,histogram,stats,ema,step,kmeans,
                    residual_step,residual_encode] [--json PATH] [--plot PATH] [--kernel-level]

One harness; ``benchmarks/cpu_assign.py`` and ``benchmarks/gpu_bench.py`` are thin views of it.
:mod:`.specs` is the op registry (each :class:`OpSpec`: grids, inputs, contenders -- one per
vqkernels backend and every peer -- and agreement check; adding an op's benchmark is adding one
spec). :mod:`.runner` holds the one timer (warm-up, medians, 20th/80th percentiles, CUDA events,
rotating input sets, alternating contenders), the one peak-memory probe (GPU:
``torch.cuda.max_memory_allocated``; CPU: peak RSS above the baseline, in process with the
high-water mark reset or in a fresh interpreter), the one machine description, and
:func:`run_case`, which checks every contender against the others before its times count.
:mod:`.report` writes the table, the targets (measured, never asserted), JSON and plot.

Peers where installed: ``torch.cdist(x, c).argmin(1)``; vector-quantize-pytorch's
``VectorQuantize`` / ``ResidualVQ`` (eval forward; training step with the same codebooks, decay,
eps, straight-through, no k-means init); FAISS (``IndexFlatL2`` / ``IndexFlatIP`` k=1, timed with
its index build, threads equal to torch's; ``faiss.Kmeans``); flash-kmeans (GPU);
fast-pytorch-kmeans; plain-torch histogram / statistics / EMA. Checks: each pick's exact fp64
distance against the best pick of all contenders within :func:`vqkernels.ops.assign.tolerance`
(ties allowed; residual rows stage by stage on each contender's own residuals); statistics
against fp64; k-means by inertia. A contender that disagrees is marked, never the "best peer".

JSON fields (``vqkernels.bench/1``; gpu_bench's schema 1) and the re-measuring commands: docs/bench.md.
"""
from .report import Table, add_arguments, main, options_from_args, parse_ops, plot, run, targets
from .runner import Options, load_now, machine_info, measure_peak, memory_in_subprocess, run_case, time_call
from .specs import (DECAY, EPS, OPS, SPECS, Case, Check, Contender, OpSpec, Prepared, Skip, assignment_agreement,
                    grid, make_inputs, pick_distances, register)


def contenders(op: str):
    """Every contender for ``op``, vqkernels backends first; availability is decided per row."""
    if op not in SPECS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    return list(SPECS[op].contenders)


def check_outputs(case: Case, inputs, outputs):
    """The row's check: ``{contender: Check}`` for every contender that produced an output."""
    return SPECS[case.op].check(case, inputs, outputs)
