"""``vqkernels bench``: every vqkernels backend and every installed peer, side by side, checked.

    vqkernels bench [--device cpu|cuda] [--quick | --smoke] [--ops assign,histogram,stats,ema,step,kmeans]
                    [--json PATH] [--plot PATH] [--kernel-level]

One harness; ``vqkernels bench``, ``benchmarks/cpu_assign.py`` and ``benchmarks/gpu_bench.py``
are thin callers of it. :mod:`.specs` is the op registry: each :class:`OpSpec` declares its
grids, inputs, contenders (one per vqkernels backend, and every peer) and agreement check,
so adding an op's benchmark means adding one spec. :mod:`.runner` holds the one timer
(warm-up, medians, 20th/80th percentiles, CUDA events, rotating input sets), the one
peak-memory probe (GPU: ``torch.cuda.max_memory_allocated``; CPU: peak RSS above the
baseline, in process with the high-water mark reset or in a fresh interpreter), the one
machine description, and :func:`run_case`, which checks every contender's output against
the others before their times count. :mod:`.report` writes the table, JSON and plot.

Workloads: ``assign`` (l2, cosine), ``histogram``, ``stats`` (``cluster_stats``), ``ema``
(``ema_update_``), ``step`` (a Quantizer training step: encoder forward, quantize, loss,
backward, EMA update) and ``kmeans`` (fixed Lloyd iterations from the same centroids).
Peers where installed: ``torch.cdist(x, c).argmin(1)``; vector-quantize-pytorch's
``VectorQuantize`` (eval forward; training step with the same K, D, decay, eps and codebook,
straight-through, no k-means init); FAISS (``IndexFlatL2`` / ``IndexFlatIP`` k=1,
``faiss.Kmeans``); flash-kmeans (GPU); fast-pytorch-kmeans; plain-torch histogram /
statistics / EMA. Checks: each pick's exact fp64 distance (:mod:`vqkernels.ops._metrics`)
against the best pick of all contenders within :func:`vqkernels.ops.assign.tolerance`
(ties allowed); statistics against fp64; k-means by inertia. A contender that disagrees
is marked and is never the "best peer".

JSON of ``--json`` (schema ``vqkernels.bench/1``, the fields of the harness before the
split): ``machine`` (python, platform, processor, cpu_count, torch, torch_threads, cuda,
time, vqkernels, the peers' versions, load_average; new: hostname, extension, and on GPU
gpu, capability, sm_count, memory_gib, l2_bytes), ``load_average_after``, ``settings``
(new: kernel_level), ``notes``, ``elapsed_s``, ``targets``, ``rows``: op, N, K, D, dtype,
metric, iters (``variant`` where set), label, memory_mode, check, ``work`` on GPU, and
``results``: contender, family, status (ok / skipped / error), reason, median_s, p20_s,
p80_s (now interpolated), repeats (new: min_s), throughput, throughput_unit,
peak_mem_bytes, mem_method, agree, agrees, check_detail, vs_best_peer; on GPU floor_s,
floor_fraction. ``benchmarks/cpu_assign.py`` keeps its JSON. ``benchmarks/gpu_bench.py``
keeps its JSON (schema 1) with these successors: ``versions`` and ``machine`` are both the
machine description above; ``agree_frac`` is the fraction of rows whose pick is as near
as the best pick of every provider at the shape (was index equality with ``agree_with``,
still the shape's first provider); ``agrees`` is new; ``triton_config`` is gone
(gpu_check.sh's ``TRITON_PRINT_AUTOTUNING=1`` prints the chosen configs).
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
