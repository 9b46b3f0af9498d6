"""``vqkernels bench``: every vqkernels backend and every installed peer, side by side, checked.

    vqkernels bench [--device cpu|cuda] [--quick | --smoke] [--ops assign,histogram,stats,ema,step,kmeans]
                    [--json PATH] [--plot PATH] [--kernel-level]

One harness in three parts; ``vqkernels bench``, ``benchmarks/cpu_assign.py`` and
``benchmarks/gpu_bench.py`` are thin callers of it:

* :mod:`.specs` -- the op registry. Each :class:`OpSpec` declares its grids, its inputs,
  its contenders (one per vqkernels backend, and every peer) and its agreement check.
  Adding an op's benchmark means adding one spec.
* :mod:`.runner` -- the one timer (warm-up, medians, 20th/80th percentiles, CUDA events,
  rotating input sets), the one peak-memory probe (GPU: ``torch.cuda.max_memory_allocated``;
  CPU: peak RSS above the baseline, in process with the high-water mark reset, or in a
  fresh interpreter per contender), the one machine description, and :func:`run_case`,
  which checks every contender's output against the others before their times count.
* :mod:`.report` -- the table, the JSON document and the plot, and the command.

Workloads: ``assign`` (l2 and cosine), ``histogram``, ``stats`` (``cluster_stats``),
``ema`` (``ema_update_``), ``step`` (a Quantizer training step: encoder forward, quantize,
loss, backward and the EMA update) and ``kmeans`` (fixed Lloyd iterations from the same
initial centroids). Peers, each only where installed and able to run:
``torch.cdist(x, c).argmin(1)``; vector-quantize-pytorch's ``VectorQuantize`` (eval forward
in ``assign`` rows, training step in ``step`` rows: same K, D, decay, eps and codebook,
straight-through gradient, no k-means init); FAISS (``IndexFlatL2`` / ``IndexFlatIP`` k=1,
``faiss.Kmeans``); flash-kmeans (GPU); fast-pytorch-kmeans; plain-torch histogram /
statistics / EMA. Checks: each pick's exact fp64 distance (:mod:`vqkernels.ops._metrics`)
against the best pick of all contenders within :func:`vqkernels.ops.assign.tolerance`
(ties allowed); statistics against fp64; k-means by the inertia of the returned
centroids. A contender that does not agree is marked and is never the "best peer".

JSON (``--json``, schema ``vqkernels.bench/1``, as written by the harness before it was
split): ``machine`` (python, platform, processor, cpu_count, torch, torch_threads, cuda,
time, vqkernels, the peers' versions, load_average; new: hostname, extension and on GPU
gpu, capability, sm_count, memory_gib, l2_bytes), ``load_average_after``, ``settings``
(new: kernel_level), ``notes``, ``elapsed_s``, ``targets`` and ``rows``: the Case fields
(op, N, K, D, dtype, metric, iters; ``variant`` only where set), label, memory_mode,
check, ``work`` on GPU, and ``results``: contender, family, status (ok / skipped / error),
reason, median_s, p20_s, p80_s, repeats (new: min_s), throughput, throughput_unit,
peak_mem_bytes, mem_method, agree, agrees, check_detail, vs_best_peer, and on GPU floor_s
and floor_fraction. Percentiles are now interpolated (were nearest-rank).

``benchmarks/gpu_bench.py`` keeps its JSON (schema 1: created, config, versions, machine,
extension, ceilings, rows with status, note, median_ms, p20_ms, p80_ms, min_ms, reps,
bytes_min, gbytes_per_s, mem_peak_mib, flops, tflops, floor_ms, x_floor,
frac_of_measured_mm, agree_with, agree_frac) with these successors: ``versions`` and
``machine`` are both this package's machine description; ``agree_frac`` is the fraction of
rows whose pick is as near as the best pick of every provider at that shape (ties
allowed; was index equality with the ``agree_with`` provider, which stays the shape's
first provider), and ``agrees`` is new; ``triton_config`` is gone
(``TRITON_PRINT_AUTOTUNING=1``, set by gpu_check.sh, prints the chosen configs).
``benchmarks/cpu_assign.py`` keeps its JSON (machine, assign rows with median, p20, p80,
repeats, rows_per_s, agree per contender, chunked_over_faiss, memory).
"""
from .report import Table, add_arguments, main, options_from_args, parse_ops, plot, run, targets
from .runner import Options, machine_info, measure_peak, memory_in_subprocess, run_case, time_call
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


__all__ = ["Case", "Check", "Contender", "DECAY", "EPS", "OPS", "OpSpec", "Options", "Prepared", "SPECS", "Skip",
           "Table", "add_arguments", "assignment_agreement", "check_outputs", "contenders", "grid", "machine_info",
           "main", "make_inputs", "measure_peak", "memory_in_subprocess", "options_from_args", "parse_ops",
           "pick_distances", "plot", "register", "run", "run_case", "targets", "time_call"]
