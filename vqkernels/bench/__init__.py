"""``vqkernels bench``: every vqkernels backend and every installed peer, side by side, checked.

    vqkernels bench [--device cpu|cuda] [--quick | --smoke] [--ops assign,histogram,stats,ema,step,kmeans,
                    residual_step,residual_encode] [--json PATH] [--plot PATH] [--kernel-level] [--alternate]

One harness: :mod:`.specs` is the op registry (an op's benchmark is one :class:`OpSpec`: grids,
inputs, contenders, agreement check), :mod:`.runner` the one timer, peak-memory probe, machine
description and row run (check, then time), :mod:`.report` the table, targets, JSON and plot.
``benchmarks/cpu_assign.py`` and ``benchmarks/gpu_bench.py`` are thin callers of it. Contenders,
checks, JSON fields and the re-measuring commands: docs/bench.md.
"""
from .report import Table, add_arguments, options_from_args, parse_ops, plot, run, targets
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
