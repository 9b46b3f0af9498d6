"""``vqkernels bench``: every vqkernels backend and every installed peer, side by side, checked.

    vqkernels bench [--device cpu|cuda] [--quick | --smoke] [--ops assign,histogram,stats,ema,step,kmeans]
                    [--json PATH] [--plot PATH]

Workloads (``--ops``): ``assign`` (l2 and cosine), ``histogram``, ``stats``
(``cluster_stats``), ``ema`` (``ema_update_``), ``step`` (a full Quantizer training step:
encoder forward, quantize, loss, backward and the EMA update of a training-mode forward)
and ``kmeans`` (a fixed number of Lloyd iterations from the same initial centroids).

Contenders, each only where installed and able to run: every vqkernels backend available
on the device; ``torch.cdist(x, c).argmin(1)``; vector-quantize-pytorch's ``VectorQuantize``
(eval forward in the ``assign`` rows, training step in the ``step`` rows: same K, D,
decay, eps and codebook, straight-through gradient, no k-means init); FAISS
(``IndexFlatL2`` / ``IndexFlatIP`` k=1 search, ``faiss.Kmeans``); flash-kmeans (GPU);
fast-pytorch-kmeans; plus plain-torch versions of histogram / statistics / EMA.

Every row is checked before its times mean anything: each contender's pick is compared,
by its exact fp64 distance, with the best pick of all contenders (ties and the dtype
tolerance of :func:`vqkernels.ops.assign.tolerance` allowed); statistics against an fp64
computation; k-means by the inertia of the returned centroids. A contender that does not
agree is marked in the table and the JSON, and is never the "best peer".

Per row: median seconds over repeats after warm-up (CUDA events on GPU), throughput, peak
memory (GPU: ``torch.cuda.max_memory_allocated``; CPU: peak RSS above the baseline, in a
fresh subprocess per contender for ``step`` rows, else in process with the peak reset
before the call: see :mod:`vqkernels.benchmarking`), the ratio to the best agreeing peer,
and on GPU the fraction of the roofline floor. Output: a table on stdout (progress on
stderr), ``--json`` with machine, versions and every figure, ``--plot`` a PNG of throughput
against K per contender.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .benchmarking import machine_info, measure_peak_cuda, measure_peak_rss, time_call

OPS = ("assign", "histogram", "stats", "ema", "step", "kmeans")
_OP_TITLES = {
    "assign": "assign (nearest code)",
    "histogram": "histogram (code usage)",
    "stats": "cluster_stats (per-code counts and sums)",
    "ema": "ema_update_ (EMA statistics and codebook)",
    "step": "Quantizer training step (encoder fwd + quantize + loss + backward + EMA update)",
    "kmeans": "kmeans (fixed Lloyd iterations, same initial centroids)",
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# The "step" contenders' shared hyper-parameters (both modules get the same).
DECAY, EPS = 0.99, 1e-5

# GPU roofline: the floor of a row is max(flops / peak rate, bytes / bandwidth). 790 TFLOP/s
# is H100/H200-class dense bf16 as reachable in practice; fp32 inputs are held to the TF32
# rate (half of it), the floor a tf32 matmul could reach.
GPU_PEAK_FLOPS = {"bf16": 790e12, "fp16": 790e12, "fp32": 395e12, "fp64": 67e12}
GPU_BANDWIDTH = 4.3e12

# Contenders that materialise an N x K (or K x N) matrix are skipped when one such fp32
# matrix would exceed this (--max-dense-gib); the reference backend (direct differences,
# the definition of correct: direct differences, one-hot matrices) where its cost,
# _reference_cost(), exceeds _REFERENCE_MAX_COST for the device.
_DEFAULT_MAX_DENSE_GIB = {"cpu": 2.0, "cuda": 24.0}
_REFERENCE_MAX_COST = {"cpu": 1 << 25, "cuda": 1 << 34}


def _reference_cost(case: "Case") -> int:
    """Elements the reference backend touches: N*K*D (assign), N*K (one-hot histogram/stats)."""
    if case.op in ("assign", "step", "kmeans"):
        return case.N * case.K * case.D * max(1, case.iters)
    if case.op in ("histogram", "stats"):
        return case.N * case.K
    return case.K * case.D


# --------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Case:
    """One row of the table: an op on one shape."""

    op: str
    N: int
    K: int
    D: int
    dtype: str = "fp32"
    metric: str = "l2"
    iters: int = 0  # kmeans only

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def label(self) -> str:
        parts = []
        if self.op == "assign":
            parts.append(self.metric)
        if self.op != "ema":
            parts.append(f"N={self.N}")
        parts.append(f"K={self.K}")
        if self.op != "histogram":
            parts.append(f"D={self.D}")
        if self.op == "kmeans":
            parts.append(f"it={self.iters}")
        if self.op not in ("histogram",):
            parts.append(self.dtype)
        return " ".join(parts)

    def series(self) -> str:
        """The plot panel this row belongs to (everything but K)."""
        return " ".join(p for p in (self.label().split()) if not p.startswith("K="))

    def work(self) -> dict:
        """(flops, bytes) of the op at its minimum, for the GPU floor."""
        N, K, D = self.N, self.K, self.D
        e = self.torch_dtype.itemsize
        assign_bytes = e * (N * D + K * D) + 12 * N
        stats_bytes = e * N * D + 8 * N + 4 * K * (D + 1)
        ema_bytes = 4 * 5 * K * (D + 1) + e * K * D
        if self.op == "assign":
            return {"flops": 2 * N * K * D, "bytes": assign_bytes}
        if self.op == "histogram":
            return {"flops": 0, "bytes": 8 * N + 8 * K}
        if self.op == "stats":
            return {"flops": N * D, "bytes": stats_bytes}
        if self.op == "ema":
            return {"flops": 4 * K * D, "bytes": ema_bytes}
        if self.op == "step":  # the assignment dominates; encoder fwd/bwd is 6 N D^2
            return {"flops": 2 * N * K * D + 6 * N * D * D,
                    "bytes": assign_bytes + stats_bytes + ema_bytes + 6 * 4 * N * D}
        if self.op == "kmeans":
            return {"flops": self.iters * (2 * N * K * D + N * D), "bytes": self.iters * (assign_bytes + stats_bytes)}
        raise ValueError(self.op)

    def throughput_unit(self) -> str:
        return {"ema": "codes/s", "kmeans": "row-iters/s"}.get(self.op, "rows/s")

    def throughput(self, seconds: float) -> float:
        if self.op == "ema":
            return self.K / seconds
        if self.op == "kmeans":
            return self.N * self.iters / seconds
        return self.N / seconds


def _assign_cases(N, Ks, Ds, dtypes=("fp32",), metrics=("l2",)):
    return [Case("assign", N, K, D, dt, m) for m in metrics for dt in dtypes for D in Ds for K in Ks]


def _grid_cpu(name: str) -> List[Case]:
    if name == "smoke":
        return [
            Case("assign", 256, 64, 8), Case("assign", 256, 64, 8, metric="cosine"),
            Case("histogram", 1024, 64, 1), Case("stats", 512, 64, 8), Case("ema", 0, 64, 8),
            Case("step", 128, 256, 8), Case("kmeans", 512, 16, 8, iters=2),
        ]
    if name == "quick":
        return (
            _assign_cases(2048, (256, 1024, 4096), (8, 64))
            + _assign_cases(2048, (1024,), (64,), metrics=("cosine",))
            + [Case("histogram", 262144, 4096, 1), Case("stats", 16384, 1024, 64), Case("ema", 0, 16384, 64)]
            + [Case("step", 256, K, 32) for K in (1024, 16384, 65536)]
            + [Case("kmeans", 8192, 256, 32, iters=5)]
        )
    return (
        _assign_cases(8192, (1024, 4096, 16384), (8, 32, 64))
        + _assign_cases(8192, (1024, 16384), (64,), metrics=("cosine",))
        + _assign_cases(8192, (4096,), (64,), dtypes=("bf16",))
        + [Case("histogram", 1 << 20, K, 1) for K in (1024, 65536)]
        + [Case("stats", 65536, K, 64) for K in (1024, 16384, 65536)]
        + [Case("ema", 0, K, 64) for K in (1024, 16384, 65536)]
        + [Case("step", 4096, K, 64) for K in (1024, 4096, 16384, 65536)]
        + [Case("kmeans", 32768, K, 32, iters=5) for K in (256, 1024, 4096)]
    )


def _grid_cuda(name: str) -> List[Case]:
    if name == "smoke":
        return _grid_cpu("smoke")
    if name == "quick":
        return (
            _assign_cases(65536, (1024, 16384), (64,), dtypes=("fp32", "bf16"))
            + _assign_cases(65536, (16384,), (64,), dtypes=("bf16",), metrics=("cosine",))
            + [Case("histogram", 1 << 22, 16384, 1), Case("stats", 1 << 20, 16384, 64), Case("ema", 0, 65536, 64)]
            + [Case("step", 16384, K, 64) for K in (1024, 16384, 65536)]
            + [Case("kmeans", 1 << 18, 1024, 64, iters=10)]
        )
    return (
        _assign_cases(65536, (1024, 4096, 16384, 65536), (64, 256), dtypes=("fp32", "bf16"))
        + _assign_cases(65536, (4096, 65536), (64,), dtypes=("bf16",), metrics=("cosine",))
        + [Case("histogram", 1 << 24, K, 1) for K in (1024, 65536)]
        + [Case("stats", 1 << 22, K, 64) for K in (1024, 65536)]
        + [Case("ema", 0, K, 256) for K in (16384, 65536)]
        + [Case("step", 16384, K, 64) for K in (1024, 4096, 16384, 65536)]
        + [Case("kmeans", 1 << 20, K, 128, iters=10) for K in (1024, 8192)]
    )


def grid(name: str = "quick", device: str = "cpu", ops=OPS) -> List[Case]:
    """The cases of grid ``name`` ("full", "quick", "smoke") for ``device``, restricted to ``ops``."""
    if name not in ("full", "quick", "smoke"):
        raise ValueError(f"grid must be 'full', 'quick' or 'smoke', got {name!r}")
    cases = _grid_cuda(name) if device == "cuda" else _grid_cpu(name)
    return [c for c in cases if c.op in ops]


# --------------------------------------------------------------------------- inputs
def make_inputs(case: Case, device: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """The row's inputs, drawn on the CPU from a seeded generator (same on every device)."""
    g = torch.Generator().manual_seed(seed)
    N, K, D, dt = case.N, case.K, case.D, case.torch_dtype
    inp: Dict[str, torch.Tensor] = {}
    if case.op == "assign":
        inp["x"] = torch.randn(N, D, generator=g).to(dt)
        inp["codebook"] = torch.randn(K, D, generator=g).to(dt)
    elif case.op == "histogram":
        # skewed usage (as a real codebook's), so some bins are hot and many are cold
        inp["indices"] = (torch.rand(N, generator=g).pow(2) * K).long().clamp_max(K - 1)
    elif case.op == "stats":
        inp["x"] = torch.randn(N, D, generator=g).to(dt)
        inp["indices"] = torch.randint(0, K, (N,), generator=g)
    elif case.op == "ema":
        rows = max(4 * K, 1024)
        inp["counts"] = torch.bincount(torch.randint(0, K, (rows,), generator=g), minlength=K).float()
        inp["sums"] = torch.randn(K, D, generator=g) * inp["counts"].unsqueeze(1).sqrt()
        inp["cluster_size"] = torch.rand(K, generator=g) * 4
        inp["embed_avg"] = torch.randn(K, D, generator=g)
        inp["codebook"] = torch.randn(K, D, generator=g).to(dt)
    elif case.op == "step":
        bound = 1 / math.sqrt(D)  # nn.Linear's default init range
        inp["weight"] = (torch.rand(D, D, generator=g) * 2 - 1) * bound
        inp["bias"] = (torch.rand(D, generator=g) * 2 - 1) * bound
        inp["x"] = torch.randn(N, D, generator=g)
        inp["target"] = torch.randn(N, D, generator=g)
        inp["codes"] = torch.randn(K, D, generator=g) * (1 / math.sqrt(3))  # the encoder outputs' scale
    elif case.op == "kmeans":
        centres = torch.randn(max(1, K // 4), D, generator=g) * 2
        x = centres[torch.randint(0, centres.shape[0], (N,), generator=g)] + torch.randn(N, D, generator=g)
        inp["x"] = x.to(dt)
        inp["init"] = inp["x"][torch.randperm(N, generator=g)[:K]].float().clone()
    else:
        raise ValueError(f"unknown op {case.op!r}")
    return {k: v.to(device) for k, v in inp.items()}


# --------------------------------------------------------------------------- contenders
class Skip(Exception):
    """A contender that cannot run this row (not installed, wrong device, too big): the reason."""


@dataclass
class Prepared:
    fn: Callable[[], Any]  #: the timed call
    output: Callable[[Any], Any] = lambda out: out  #: what the check compares, from fn's result


@dataclass
class Contender:
    name: str
    family: str  #: "vqkernels" or "peer"
    prepare: Callable[..., Prepared]  #: (case, inputs, device, opts) -> Prepared, or raise Skip


@dataclass
class Options:
    device: str = "cpu"
    repeats: int = 5
    warmup: int = 1
    max_seconds: Optional[float] = None
    memory: str = "auto"  # auto | subprocess | inprocess | off
    max_dense_bytes: float = 2.0 * 2**30
    seed: int = 0
    subprocess_timeout: float = 900.0
    memory_on_checked_call: bool = False  # quick/smoke: measure memory on the checked call, not a separate one
    step_memory_subprocess: bool = True  # memory="auto": step rows on CPU in a fresh subprocess per contender


def _import(module: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # not installed, or broken: the row says which
        raise Skip(f"{module} is not installed ({type(exc).__name__})") from None


def _dense_guard(case: Case, opts: Options, what: str, count: int = 1):
    need = count * case.N * case.K * 4
    if need > opts.max_dense_bytes:
        raise Skip(f"{what} would materialise {need / 2**30:.1f} GiB (> --max-dense-gib {opts.max_dense_bytes / 2**30:g})")


def _backend_guard(name: str, case: Case, device: str, dtype: Optional[torch.dtype]):
    from .ops import _dispatch

    reason = _dispatch.BACKENDS[name].refusal(device, dtype)
    if reason is not None:
        raise Skip(reason)
    if name == "triton" and device == "cpu":
        raise Skip("the Triton interpreter (TRITON_INTERPRET=1) is for tests, not timing")
    if name == "reference" and _reference_cost(case) > _REFERENCE_MAX_COST.get(device, 1 << 25):
        raise Skip("the reference backend (the definition of correct, not a fast path) is timed on small rows only")


def _backends(op: str) -> List[str]:
    from .ops import _dispatch

    return list(_dispatch.BACKENDS)


# ---- assign
def _vq_assign(backend):
    def prepare(case, inp, device, opts):
        _backend_guard(backend, case, device, case.torch_dtype)
        from .ops import assign

        x, c = inp["x"], inp["codebook"]
        return Prepared(lambda: assign(x, c, case.metric, backend=backend).indices)

    return prepare


def _cdist_assign(case, inp, device, opts):
    _dense_guard(case, opts, "torch.cdist")
    x, c = inp["x"], inp["codebook"]
    if case.metric == "cosine":
        return Prepared(lambda: torch.cdist(F.normalize(x, dim=1), F.normalize(c, dim=1)).argmin(1))
    return Prepared(lambda: torch.cdist(x, c).argmin(1))


def _faiss_assign(case, inp, device, opts):
    faiss = _import("faiss")
    x, c = inp["x"], inp["codebook"]
    D, cosine = case.D, case.metric == "cosine"
    if device == "cuda":
        if not hasattr(faiss, "StandardGpuResources"):
            raise Skip("this faiss build has no GPU index (faiss-cpu)")
        importlib.import_module("faiss.contrib.torch_utils")  # lets the GPU index take torch tensors
        res = faiss.StandardGpuResources()

        def fn():
            xs, cs = x.float(), c.float()
            if cosine:
                xs, cs = F.normalize(xs, dim=1), F.normalize(cs, dim=1)
            index = faiss.GpuIndexFlatIP(res, D) if cosine else faiss.GpuIndexFlatL2(res, D)
            index.add(cs)
            return index.search(xs, 1)[1][:, 0]

        return Prepared(fn)

    def fn():
        xs, cs = x.float(), c.float()
        if cosine:
            xs, cs = F.normalize(xs, dim=1), F.normalize(cs, dim=1)
        index = faiss.IndexFlatIP(D) if cosine else faiss.IndexFlatL2(D)
        index.add(cs.contiguous().numpy())
        return torch.from_numpy(index.search(xs.contiguous().numpy(), 1)[1][:, 0])

    return Prepared(fn)


def _vqp_module(case, codes, device, training):
    vqp = _import("vector_quantize_pytorch")
    vq = vqp.VectorQuantize(
        dim=case.D, codebook_size=case.K, decay=DECAY, eps=EPS, kmeans_init=False,
        use_cosine_sim=case.metric == "cosine", rotation_trick=False, commitment_weight=1.0,
    ).to(device)
    vq.train(training)
    try:
        with torch.no_grad():
            book = vq._codebook
            src = F.normalize(codes.float(), dim=1) if case.metric == "cosine" else codes.float()
            book.embed.copy_(src.reshape(book.embed.shape))
            book.embed_avg.copy_(src.reshape(book.embed_avg.shape))
            book.cluster_size.fill_(1.0)
    except Exception as exc:
        raise Skip(f"cannot load the shared codebook into VectorQuantize ({type(exc).__name__}: {exc})") from None
    return vq


def _vqp_assign(case, inp, device, opts):
    _dense_guard(case, opts, "VectorQuantize (cdist + argmax)")
    x = inp["x"]
    vq = _vqp_module(case, inp["codebook"], device, training=False)

    def fn():
        with torch.no_grad():
            return vq(x.unsqueeze(0))[1].reshape(-1)

    return Prepared(fn)


def _flash_kmeans_assign(case, inp, device, opts):
    if device != "cuda":
        raise Skip("flash-kmeans runs on CUDA only")
    if case.metric != "l2":
        raise Skip("flash-kmeans' assignment kernel here is the Euclidean one")
    mod = _import("flash_kmeans.assign_euclid_triton")
    assign_triton = getattr(mod, "euclid_assign_triton", None)
    if assign_triton is None:
        raise Skip("this flash-kmeans has no euclid_assign_triton")
    x, c = inp["x"].unsqueeze(0), inp["codebook"].unsqueeze(0)

    def fn():
        x_sq = x.float().pow(2).sum(-1).to(x.dtype)
        return assign_triton(x, c, x_sq)[0]

    return Prepared(fn)


# ---- histogram
def _vq_histogram(backend):
    def prepare(case, inp, device, opts):
        _backend_guard(backend, case, device, None)
        from .ops import histogram

        idx = inp["indices"]
        return Prepared(lambda: histogram(idx, case.K, backend=backend))

    return prepare


def _bincount_histogram(case, inp, device, opts):
    idx = inp["indices"]
    return Prepared(lambda: torch.bincount(idx, minlength=case.K))


# ---- cluster_stats
def _vq_stats(backend):
    def prepare(case, inp, device, opts):
        _backend_guard(backend, case, device, case.torch_dtype)
        from .ops import cluster_stats

        x, idx = inp["x"], inp["indices"]
        return Prepared(lambda: tuple(cluster_stats(x, idx, case.K, backend=backend)))

    return prepare


def _index_add_stats(case, inp, device, opts):
    x, idx = inp["x"], inp["indices"]

    def fn():
        counts = torch.bincount(idx, minlength=case.K).float()
        sums = torch.zeros(case.K, case.D, device=x.device).index_add_(0, idx, x.float())
        return counts, sums

    return Prepared(fn)


def _one_hot_stats(case, inp, device, opts):
    """vector-quantize-pytorch's way: a dense one-hot [N, K] and a matmul."""
    _dense_guard(case, opts, "one_hot + matmul", count=2)
    x, idx = inp["x"], inp["indices"]

    def fn():
        onehot = F.one_hot(idx, case.K).float()
        return onehot.sum(0), onehot.t() @ x.float()

    return Prepared(fn)


# ---- ema_update_
def _ema_state(inp):
    return {k: inp[k].clone() for k in ("cluster_size", "embed_avg", "codebook")}


def _vq_ema(backend):
    def prepare(case, inp, device, opts):
        _backend_guard(backend, case, device, case.torch_dtype)
        from .ops import ema_update_

        s = _ema_state(inp)
        counts, sums = inp["counts"], inp["sums"]
        return Prepared(
            lambda: ema_update_(s["cluster_size"], s["embed_avg"], s["codebook"], counts, sums, DECAY, EPS, backend=backend),
            output=lambda cb: cb.clone(),
        )

    return prepare


def _torch_ema(case, inp, device, opts):
    """The same update written as vector-quantize-pytorch writes it (eager torch)."""
    s = _ema_state(inp)
    counts, sums, K = inp["counts"], inp["sums"], case.K

    def fn():
        s["cluster_size"].lerp_(counts, 1 - DECAY)
        s["embed_avg"].lerp_(sums, 1 - DECAY)
        n = s["cluster_size"].sum()
        smoothed = (s["cluster_size"] + EPS) / (n + K * EPS) * n
        s["codebook"].copy_(s["embed_avg"] / smoothed.unsqueeze(1))
        return s["codebook"]

    return Prepared(fn, output=lambda cb: cb.clone())


# ---- Quantizer training step
def _encoder(inp, device):
    D = inp["weight"].shape[0]
    enc = torch.nn.Linear(D, D).to(device)
    with torch.no_grad():
        enc.weight.copy_(inp["weight"])
        enc.bias.copy_(inp["bias"])
    return enc


def _training_step(enc, vq, x, target):
    def fn():
        z = enc(x)
        quantized, indices, vq_loss = vq(z.unsqueeze(0))[:3]
        loss = F.mse_loss(quantized.squeeze(0), target) + vq_loss.sum()
        loss.backward()
        enc.zero_grad(set_to_none=True)
        return indices.detach().reshape(-1)

    return fn


def _vq_step(backend):
    def prepare(case, inp, device, opts):
        _backend_guard(backend, case, device, torch.float32)
        try:
            from .quantizer import Quantizer
        except Exception as exc:
            raise Skip(f"vqkernels.quantizer is not importable ({type(exc).__name__}: {exc})") from None
        q = Quantizer(case.D, case.K, decay=DECAY, eps=EPS, learning="ema", metric=case.metric,
                      init="uniform", backend=backend).to(device).train()
        q.codebook = inp["codes"]
        return Prepared(_training_step(_encoder(inp, device), q, inp["x"], inp["target"]))

    return prepare


def _vqp_step(case, inp, device, opts):
    _dense_guard(case, opts, "VectorQuantize (cdist + one-hot)", count=2)
    vq = _vqp_module(case, inp["codes"], device, training=True)
    return Prepared(_training_step(_encoder(inp, device), vq, inp["x"], inp["target"]))


# ---- kmeans
def _vq_kmeans(backend):
    def prepare(case, inp, device, opts):
        _backend_guard(backend, case, device, case.torch_dtype)
        from .ops import kmeans

        x, init = inp["x"], inp["init"]
        return Prepared(lambda: kmeans(x, case.K, case.iters, metric=case.metric, tol=0.0, init_centroids=init,
                                       backend=backend).centroids)

    return prepare


def _faiss_kmeans(case, inp, device, opts):
    faiss = _import("faiss")
    if device != "cpu":
        raise Skip("faiss.Kmeans is timed on CPU (its GPU path needs faiss-gpu and host arrays)")
    x = inp["x"].float().contiguous().numpy()
    init = inp["init"].contiguous().numpy()

    def fn():
        km = faiss.Kmeans(case.D, case.K, niter=case.iters, seed=0, verbose=False, spherical=case.metric == "cosine",
                          min_points_per_centroid=1, max_points_per_centroid=max(1, x.shape[0]))
        km.train(x, init_centroids=init)
        return torch.from_numpy(km.centroids.copy())

    return Prepared(fn)


def _fast_pytorch_kmeans(case, inp, device, opts):
    mod = _import("fast_pytorch_kmeans")
    _dense_guard(case, opts, "fast_pytorch_kmeans' K x N mask")
    x, init = inp["x"].float(), inp["init"]

    def fn():
        km = mod.KMeans(n_clusters=case.K, max_iter=case.iters, tol=-1.0, verbose=0,
                        mode="cosine" if case.metric == "cosine" else "euclidean")
        km.fit_predict(x, centroids=init.clone())
        return km.centroids

    return Prepared(fn)


def _flash_kmeans(case, inp, device, opts):
    if device != "cuda":
        raise Skip("flash-kmeans runs on CUDA only")
    mod = _import("flash_kmeans")
    fn_name = "batch_kmeans_Cosine" if case.metric == "cosine" else "batch_kmeans_Euclid"
    run = getattr(mod, fn_name, None)
    if run is None:
        raise Skip(f"this flash-kmeans has no {fn_name}")
    x, init = inp["x"].unsqueeze(0), inp["init"].to(inp["x"].dtype).unsqueeze(0)

    def fn():
        # tol=0: the shift test `shift < tol` never passes, so exactly `iters` iterations run
        return run(x, case.K, max_iters=case.iters, tol=0.0, init_centroids=init.clone(), verbose=False)[1][0]

    return Prepared(fn)


def contenders(op: str) -> List[Contender]:
    """Every contender for ``op``, vqkernels backends first; availability is decided per row."""
    backends = _backends(op)
    if op == "assign":
        return ([Contender(f"vqkernels[{b}]", "vqkernels", _vq_assign(b)) for b in backends] + [
            Contender("faiss.IndexFlat", "peer", _faiss_assign),
            Contender("torch.cdist+argmin", "peer", _cdist_assign),
            Contender("vqp.VectorQuantize(eval)", "peer", _vqp_assign),
            Contender("flash_kmeans.assign", "peer", _flash_kmeans_assign),
        ])
    if op == "histogram":
        return [Contender(f"vqkernels[{b}]", "vqkernels", _vq_histogram(b)) for b in backends] + [
            Contender("torch.bincount", "peer", _bincount_histogram)]
    if op == "stats":
        return [Contender(f"vqkernels[{b}]", "vqkernels", _vq_stats(b)) for b in backends] + [
            Contender("torch.index_add_", "peer", _index_add_stats),
            Contender("one_hot+matmul (vqp's way)", "peer", _one_hot_stats)]
    if op == "ema":
        return [Contender(f"vqkernels[{b}]", "vqkernels", _vq_ema(b)) for b in backends] + [
            Contender("torch eager (vqp's formulas)", "peer", _torch_ema)]
    if op == "step":
        return [Contender(f"vqkernels.Quantizer[{b}]", "vqkernels", _vq_step(b)) for b in backends] + [
            Contender("vqp.VectorQuantize(train)", "peer", _vqp_step)]
    if op == "kmeans":
        return [Contender(f"vqkernels.kmeans[{b}]", "vqkernels", _vq_kmeans(b)) for b in backends] + [
            Contender("faiss.Kmeans", "peer", _faiss_kmeans),
            Contender("fast_pytorch_kmeans", "peer", _fast_pytorch_kmeans),
            Contender("flash_kmeans", "peer", _flash_kmeans),
        ]
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


# --------------------------------------------------------------------------- checks
@dataclass
class Check:
    agree: float  #: fraction of rows / codes that agree
    ok: bool
    detail: str = ""


def _matmul_rtol_key(x: torch.Tensor):
    if x.is_cuda and x.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return None


def pick_distances(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact fp64 distance ``[N]`` of each row to its picked code (inf for an invalid pick)."""
    xf = x.double()
    cf = codebook.double()
    idx = indices.to(x.device).long().reshape(-1)
    valid = (idx >= 0) & (idx < cf.shape[0])
    picked = cf[idx.clamp(0, cf.shape[0] - 1)]
    if metric == "cosine":
        d = 1 - (F.normalize(xf, dim=1) * F.normalize(picked, dim=1)).sum(1)
    elif metric == "dot":
        d = -(xf * picked).sum(1)
    else:
        d = (xf - picked).pow(2).sum(1)
    return torch.where(valid, d, torch.full_like(d, float("inf")))


def assignment_agreement(x, codebook, picks: Dict[str, torch.Tensor], metric: str = "l2") -> Dict[str, Check]:
    """Compare every contender's pick with the best pick of any contender, row by row.

    A pick agrees when its exact distance is within the dtype tolerance
    (:func:`vqkernels.ops.assign.tolerance`) of the best exact distance in that row, so
    ties and rounding are allowed and no contender is taken as the truth.
    """
    from .ops.assign import tolerance

    if not picks:
        return {}
    dist = {name: pick_distances(x, codebook, idx, metric) for name, idx in picks.items()}
    best = torch.stack(list(dist.values())).min(0).values
    tol = tolerance(x, codebook, metric, rtol_key=_matmul_rtol_key(x)).to(best)
    checks = {}
    for name, d in dist.items():
        agree = (d <= best + tol)
        frac = float(agree.double().mean()) if agree.numel() else 1.0
        bad = (~agree).nonzero().flatten()[:3].tolist()
        detail = "" if not bad else f"first disagreeing rows {bad}: excess {[float(d[i] - best[i]) for i in bad]}"
        checks[name] = Check(frac, frac == 1.0, detail)
    return checks


def _check_assign(case, inp, outputs):
    return assignment_agreement(inp["x"], inp["codebook"], outputs, case.metric)


def _check_histogram(case, inp, outputs):
    truth = torch.bincount(inp["indices"], minlength=case.K)
    checks = {}
    for name, counts in outputs.items():
        same = counts.to(truth.device).long().reshape(-1) == truth
        checks[name] = Check(float(same.double().mean()), bool(same.all()))
    return checks


def _check_stats(case, inp, outputs):
    x, idx = inp["x"].double(), inp["indices"]
    counts = torch.bincount(idx, minlength=case.K).double()
    sums = torch.zeros(case.K, case.D, dtype=torch.float64, device=x.device).index_add_(0, idx, x)
    scale = torch.zeros(case.K, dtype=torch.float64, device=x.device).index_add_(0, idx, x.abs().sum(1))
    tol = 1e-5 * scale.unsqueeze(1) + 1e-6  # fp32 summation of the rows of one code
    checks = {}
    for name, (c, s) in outputs.items():
        good = (c.double().to(x.device) == counts) & ((s.double().to(x.device) - sums).abs() <= tol).all(1)
        checks[name] = Check(float(good.double().mean()), bool(good.all()))
    return checks


def _check_ema(case, inp, outputs):
    cs = inp["cluster_size"].double() * DECAY + inp["counts"].double() * (1 - DECAY)
    ea = inp["embed_avg"].double() * DECAY + inp["sums"].double() * (1 - DECAY)
    n = cs.sum()
    truth = ea / ((cs + EPS) / (n + case.K * EPS) * n).unsqueeze(1)
    rtol = 1e-4 if case.torch_dtype in (torch.float32, torch.float64) else 1e-2
    checks = {}
    for name, cb in outputs.items():
        good = ((cb.double().to(truth.device) - truth).abs() <= rtol * truth.abs() + rtol).all(1)
        checks[name] = Check(float(good.double().mean()), bool(good.all()))
    return checks


def _check_step(case, inp, outputs):
    z = torch.addmm(inp["bias"].double(), inp["x"].double(), inp["weight"].double().t())
    return assignment_agreement(z, inp["codes"], outputs, case.metric)


def _check_kmeans(case, inp, outputs, rtol: float = 0.01):
    """k-means runs diverge legitimately (ties, empty clusters): compare the inertia of each
    contender's centroids, recomputed exactly, with the best one (within 1%)."""
    from .ops import assign

    x = inp["x"].float()
    inertia = {}
    for name, centroids in outputs.items():
        c = centroids.to(x.device).float()
        if not torch.isfinite(c).all():
            inertia[name] = float("inf")
            continue
        idx = assign(x, c, case.metric, backend="reference" if x.shape[0] * case.K * case.D <= 1 << 24 else None).indices
        inertia[name] = float(pick_distances(x, c, idx, case.metric).sum())
    best = min(inertia.values()) if inertia else 0.0
    checks = {}
    for name, value in inertia.items():
        ok = value <= best * (1 + rtol) + 1e-9
        checks[name] = Check(1.0 if ok else 0.0, ok, f"inertia {value:.6g} ({value / best - 1:+.2%} vs best)" if best else "")
    return checks


CHECKS = {"assign": _check_assign, "histogram": _check_histogram, "stats": _check_stats, "ema": _check_ema,
          "step": _check_step, "kmeans": _check_kmeans}


def check_outputs(case: Case, inputs, outputs: Dict[str, Any]) -> Dict[str, Check]:
    """The row's check: ``{contender: Check}`` for every contender that produced an output."""
    return CHECKS[case.op](case, inputs, outputs)


# --------------------------------------------------------------------------- measuring
def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _memory_mode(case: Case, opts: Options) -> str:
    if opts.memory != "auto":
        return opts.memory
    if opts.device == "cuda":
        return "inprocess"
    return "subprocess" if case.op == "step" and opts.step_memory_subprocess else "inprocess"


def _measure_memory(fn, device: str):
    if device == "cuda":
        return measure_peak_cuda(fn)
    return measure_peak_rss(fn)


def run_case(case: Case, opts: Options, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Run, check and time every contender on one row; the row as a JSON-ready dict."""
    device = opts.device
    inputs = make_inputs(case, device, opts.seed)
    entries: Dict[str, dict] = {}
    outputs: Dict[str, Any] = {}
    mode = _memory_mode(case, opts)
    for contender in contenders(case.op):
        entry = {"contender": contender.name, "family": contender.family}
        entries[contender.name] = entry
        try:
            prepared = contender.prepare(case, inputs, device, opts)
        except Skip as skip:
            entry.update(status="skipped", reason=str(skip))
            continue
        except Exception as exc:
            entry.update(status="error", reason=f"{type(exc).__name__}: {exc}")
            continue
        started = time.perf_counter()
        try:
            if mode == "inprocess" and opts.memory_on_checked_call:
                out, extra, method = _measure_memory(prepared.fn, device)
                entry.update(peak_mem_bytes=extra, mem_method=method + " (first call)")
            else:
                out = prepared.fn()  # first call: warm-up, and the output that is checked
            _sync(device)
            outputs[contender.name] = prepared.output(out)
            del out
            if mode == "inprocess" and not opts.memory_on_checked_call:
                _, extra, method = _measure_memory(prepared.fn, device)
                entry.update(peak_mem_bytes=extra, mem_method=method)
            timing = time_call(prepared.fn, repeats=opts.repeats, warmup=max(0, opts.warmup - 1), device=device,
                               max_seconds=opts.max_seconds)
        except Exception as exc:
            entry.update(status="error", reason=f"{type(exc).__name__}: {exc}")
            outputs.pop(contender.name, None)
            continue
        finally:
            del prepared
            gc.collect()
        entry.update(status="ok", median_s=timing["median"], p20_s=timing["p20"], p80_s=timing["p80"],
                     repeats=timing["repeats"], throughput=case.throughput(timing["median"]),
                     throughput_unit=case.throughput_unit())
        progress(f"  {contender.name}: {timing['median'] * 1e3:.2f} ms ({time.perf_counter() - started:.1f} s)")
    checks = check_outputs(case, inputs, outputs)
    for name, chk in checks.items():
        entries[name].update(agree=chk.agree, agrees=chk.ok, check_detail=chk.detail)
    del inputs, outputs
    gc.collect()
    if mode == "subprocess":
        for name, entry in entries.items():
            if entry.get("status") == "ok":
                progress(f"  {name}: peak memory in a fresh subprocess")
                entry.update(_memory_in_subprocess(case, name, opts))
    _compare(case, entries, device)
    row = asdict(case)
    row.update(label=case.label(), results=list(entries.values()), memory_mode=mode, check=_CHECK_TEXT[case.op])
    if device == "cuda":
        row.update(work=case.work())
    return row


_CHECK_TEXT = {
    "assign": "exact fp64 distance of each pick <= best pick of any contender + dtype tolerance",
    "step": "first step's picks (same encoder, same codebook): exact distance <= best + dtype tolerance",
    "histogram": "counts equal torch.bincount exactly",
    "stats": "counts exact, sums within 1e-5 * sum|x| of fp64",
    "ema": "codebook within 1e-4 (fp32) of the fp64 update",
    "kmeans": "inertia of the returned centroids (recomputed exactly) within 1% of the best contender's",
}


def _compare(case: Case, entries: Dict[str, dict], device: str):
    """Ratio to the best agreeing peer, and on GPU the fraction of the roofline floor."""
    peers = [e["median_s"] for e in entries.values()
             if e["family"] == "peer" and e.get("status") == "ok" and e.get("agrees", False)]
    best = min(peers) if peers else None
    floor = None
    if device == "cuda":
        w = case.work()
        floor = max(w["flops"] / GPU_PEAK_FLOPS[case.dtype], w["bytes"] / GPU_BANDWIDTH)
    for e in entries.values():
        if e.get("status") != "ok":
            continue
        e["vs_best_peer"] = e["median_s"] / best if best else None
        if floor is not None:
            e["floor_s"] = floor
            e["floor_fraction"] = floor / e["median_s"]


# A fresh interpreter per measurement: its allocator has served nothing yet, so the peak
# above the baseline (taken after the inputs and the module exist) is the call's own.
_PROBE = "import sys; from vqkernels.bench import _memory_probe_main; _memory_probe_main(sys.argv[1])"


def _memory_in_subprocess(case: Case, name: str, opts: Options) -> dict:
    spec = json.dumps({"case": asdict(case), "contender": name, "device": opts.device, "seed": opts.seed,
                       "max_dense_bytes": opts.max_dense_bytes})
    env = dict(os.environ)
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, spec], capture_output=True, text=True,
                              timeout=opts.subprocess_timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"peak_mem_bytes": None, "mem_method": f"subprocess timed out after {opts.subprocess_timeout:g} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"peak_mem_bytes": None, "mem_method": f"subprocess failed: {tail[0][:200]}"}
    result = json.loads(lines[-1])
    return {"peak_mem_bytes": result["bytes"], "mem_method": "fresh subprocess: " + result["method"]}


def _memory_probe_main(spec_json: str):
    spec = json.loads(spec_json)
    case = Case(**spec["case"])
    device = spec["device"]
    opts = Options(device=device, max_dense_bytes=spec["max_dense_bytes"])
    contender = next(c for c in contenders(case.op) if c.name == spec["contender"])
    # Load the code paths (imports, kernels, thread pools) on a tiny row first, so the
    # one-off costs of a cold interpreter are not charged to the call.
    tiny = Case(**{**spec["case"], "N": min(case.N, max(64, case.K if case.op == "kmeans" else 0))})
    warm = contender.prepare(tiny, make_inputs(tiny, device, spec["seed"]), device, opts)
    warm.fn()
    del warm
    inputs = make_inputs(case, device, spec["seed"])
    prepared = contender.prepare(case, inputs, device, opts)
    _, extra, method = _measure_memory(prepared.fn, device)
    print(json.dumps({"bytes": extra, "method": method}), flush=True)


# --------------------------------------------------------------------------- output
def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt_rate(r: Optional[float]) -> str:
    if r is None:
        return "-"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if r >= scale:
            return f"{r / scale:.2f}{unit}"
    return f"{r:.1f}"


def _fmt_bytes(b: Optional[int]) -> str:
    if b is None:
        return "-"
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.1f} MiB"


class Table:
    """Prints the table row by row as results arrive (long runs show progress as they go)."""

    def __init__(self, device: str, stream=None):
        self.device = device
        self.stream = stream or sys.stdout
        self.op = None
        self.skipped: Dict[str, str] = {}
        self.lines: List[str] = []
        gpu = device == "cuda"
        self.columns = [("shape", 28, "<"), ("contender", 30, "<"), ("median", 10, ">"), ("throughput", 16, ">"),
                        ("peak mem", 10, ">"), ("/best peer", 10, ">")] + ([("of floor", 8, ">")] if gpu else []) + [
                        ("check", 0, "<")]

    def _emit(self, line: str = ""):
        self.lines.append(line)
        print(line, file=self.stream, flush=True)

    def _fmt(self, cells) -> str:
        out = []
        for (name, width, align), cell in zip(self.columns, cells):
            out.append(f"{cell:{align}{width}}" if width else cell)
        return "  ".join(out).rstrip()

    def header(self, title_lines: List[str]):
        for line in title_lines:
            self._emit(line)

    def row(self, row: dict):
        if row["op"] != self.op:
            self.close_op()
            self.op = row["op"]
            self._emit("")
            self._emit(f"== {_OP_TITLES[row['op']]}")
            self._emit(f"   check: {row['check']}; peak memory: "
                       + ("peak RSS above baseline, fresh subprocess per contender"
                          if row["memory_mode"] == "subprocess" else
                          "torch.cuda.max_memory_allocated" if self.device == "cuda" else
                          "peak RSS above baseline, in process (VmHWM reset)" if row["memory_mode"] == "inprocess"
                          else "not measured"))
            self._emit(self._fmt([c[0] for c in self.columns]))
        first = True
        for e in row["results"]:
            if e.get("status") == "skipped":
                self.skipped.setdefault(e["contender"], e["reason"])
                continue
            shape = row["label"] if first else ""
            first = False
            if e.get("status") == "error":
                self._emit(self._fmt([shape, e["contender"], "-", "-", "-", "-"] + (["-"] if self.device == "cuda" else [])
                                     + [f"ERROR {e['reason'][:80]}"]))
                continue
            ratio = e.get("vs_best_peer")
            check = "ok" if e.get("agrees") else f"DISAGREES ({e.get('agree', 0):.4f} agree) {e.get('check_detail', '')}"
            cells = [shape, e["contender"], _fmt_time(e["median_s"]),
                     f"{_fmt_rate(e['throughput'])} {e['throughput_unit']}",
                     _fmt_bytes(e.get("peak_mem_bytes")), f"{ratio:.2f}x" if ratio else "-"]
            if self.device == "cuda":
                cells.append(f"{e['floor_fraction']:.1%}" if e.get("floor_fraction") else "-")
            cells.append(check)
            self._emit(self._fmt(cells))

    def close_op(self):
        if self.skipped:
            self._emit("   not run: " + "; ".join(f"{k} ({v})" for k, v in self.skipped.items()))
        self.skipped = {}


def _result(row: dict, name_prefix: str, family: str = None) -> Optional[dict]:
    """The ok result of the first contender in ``row`` whose name starts with ``name_prefix``."""
    found = [e for e in row["results"] if e["contender"].startswith(name_prefix) and e.get("status") == "ok"
             and (family is None or e["family"] == family)]
    return min(found, key=lambda e: e["median_s"]) if found else None


def targets(rows: List[dict], device: str) -> List[dict]:
    """The issue's CPU targets, measured (never asserted): assign vs FAISS, step vs vqp."""
    out = []
    if device != "cpu":
        return out
    for row in rows:
        if row["op"] == "assign" and row["metric"] == "l2" and row["dtype"] == "fp32":
            ours, faiss = _result(row, "vqkernels[chunked]"), _result(row, "faiss.")
            if ours and faiss:
                ratio = ours["median_s"] / faiss["median_s"]
                goal = "<= 1.5x FAISS" if row["D"] >= 32 else "as close to FAISS as possible"
                met = ratio <= 1.5 if row["D"] >= 32 else None
                out.append({"target": f"assign chunked / faiss.IndexFlatL2, {row['label']}", "value": ratio,
                            "unit": "x time", "goal": goal, "met": met})
        if row["op"] == "step":
            ours, vqp = _result(row, "vqkernels.Quantizer", "vqkernels"), _result(row, "vqp.")
            if ours and vqp:
                speed = vqp["median_s"] / ours["median_s"]
                out.append({"target": f"step speed-up over vqp, {row['label']}", "value": speed, "unit": "x",
                            "goal": ">= 10x at K >= 4096" if row["K"] >= 4096 else "(K < 4096: reported only)",
                            "met": speed >= 10 if row["K"] >= 4096 else None})
                if ours.get("peak_mem_bytes") and vqp.get("peak_mem_bytes"):
                    mem = vqp["peak_mem_bytes"] / ours["peak_mem_bytes"]
                    out.append({"target": f"step peak-memory ratio vqp / ours, {row['label']}", "value": mem,
                                "unit": "x", "goal": ">= 10x at K = 65536" if row["K"] >= 65536 else "(reported only)",
                                "met": mem >= 10 if row["K"] >= 65536 else None})
    return out


def _target_lines(tgts: List[dict]) -> List[str]:
    if not tgts:
        return []
    lines = ["", "== targets (measured on this run, not asserted)"]
    for t in tgts:
        state = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        lines.append(f"   {t['target']:<62} {t['value']:8.2f}{t['unit'][0] if t['unit'] == 'x' else ' ' + t['unit']}"
                     f"   goal {t['goal']}: {state}")
    return lines


def plot(rows: List[dict], path: Path, title: str = "") -> Optional[str]:
    """Throughput against K per contender, one panel per op and shape; None, or why no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"matplotlib is not installed ({type(exc).__name__}); pip install matplotlib"
    panels: Dict[str, List[dict]] = {}
    for row in rows:
        panels.setdefault(f"{row['op']}: {Case(**{k: row[k] for k in ('op', 'N', 'K', 'D', 'dtype', 'metric', 'iters')}).series()}", []).append(row)
    # vqkernels backends keep one colour in every panel (solid lines); peers take the rest (dashed)
    backend_colour = {"chunked": "C0", "triton": "C2", "cuda": "C3", "reference": "C7"}
    peer_colours = ["C1", "C4", "C5", "C6", "C8", "C9"]
    n = max(1, len(panels))
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    for ax, (name, prow) in zip(axes.flat, panels.items()):
        series: Dict[str, list] = {}
        unit = "rows/s"
        for row in sorted(prow, key=lambda r: r["K"]):
            for e in row["results"]:
                if e.get("status") == "ok":
                    series.setdefault(e["contender"], []).append((row["K"], e["throughput"], e.get("agrees", True)))
                    unit = e["throughput_unit"]
        peers = iter(peer_colours * 2)
        for contender, pts in series.items():
            ks, ys, agrees = zip(*pts)
            ours = contender.startswith("vqkernels")
            backend = contender.rsplit("[", 1)[-1].rstrip("]") if ours else ""
            ax.plot(ks, ys, marker="o", label=contender, color=backend_colour.get(backend, "k") if ours else next(peers),
                    linestyle="-" if ours else "--")
            bad = [(k, y) for k, y, a in pts if not a]
            if bad:
                ax.scatter(*zip(*bad), marker="x", s=80, color="red", zorder=5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("K (codes)")
        ax.set_ylabel(unit)
        ax.set_title(name, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title + ("  (red x: disagrees with the best pick)" if title else ""), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------- CLI
def _parse_ops(text: str) -> tuple:
    aliases = {"cluster_stats": "stats", "ema_update": "ema", "ema_update_": "ema", "train": "step", "all": None}
    ops = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part in aliases and aliases[part] is None:
            return OPS
        op = aliases.get(part, part)
        if op not in OPS:
            raise argparse.ArgumentTypeError(f"unknown op {part!r}; expected a comma-separated subset of {','.join(OPS)}")
        if op not in ops:
            ops.append(op)
    if not ops:
        raise argparse.ArgumentTypeError("--ops is empty")
    return tuple(ops)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``vqkernels bench`` options (also used by ``python -m vqkernels.bench``)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to benchmark (default: cuda when available, else cpu)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small grid that runs in about a minute on a 2-core CPU")
    size.add_argument("--smoke", action="store_true", help="a tiny grid that runs in seconds (CI)")
    parser.add_argument("--ops", type=_parse_ops, default=OPS, metavar="LIST",
                        help=f"comma-separated workloads (default: all of {','.join(OPS)})")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every figure here")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH", help="PNG: throughput against K per contender")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per contender (default 5; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls before timing, the checked first call included (default 1; 2 on cuda)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop repeating a contender (after 3 calls) once this much time is spent")
    parser.add_argument("--memory", choices=("auto", "subprocess", "inprocess", "off"), default="auto",
                        help="how peak memory is measured (auto: in process; on CPU the full grid's step rows in a "
                             "fresh subprocess per contender)")
    parser.add_argument("--max-dense-gib", type=float, default=None,
                        help="skip contenders whose N x K fp32 matrix exceeds this (default 2 on cpu, 24 on cuda)")
    parser.add_argument("--seed", type=int, default=0)


def options_from_args(args) -> tuple:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    grid_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    defaults = {"smoke": (1, 1.0), "quick": (3, 2.0), "full": (5, 20.0)}[grid_name]
    opts = Options(
        device=device,
        repeats=args.repeats or defaults[0],
        warmup=args.warmup if args.warmup is not None else (2 if device == "cuda" else 1),
        max_seconds=args.max_seconds if args.max_seconds is not None else defaults[1],
        memory=args.memory,
        max_dense_bytes=(args.max_dense_gib if args.max_dense_gib is not None else _DEFAULT_MAX_DENSE_GIB[device]) * 2**30,
        seed=args.seed,
        memory_on_checked_call=grid_name != "full",
        step_memory_subprocess=grid_name == "full",
    )
    return grid_name, opts


def run(args) -> int:
    """``vqkernels bench``: run the grid, print the table, write JSON and plot.

    Returns 0; 1 when a vqkernels contender disagreed with the best pick or raised (peers'
    failures are only reported); 2 when the device is missing.
    """
    grid_name, opts = options_from_args(args)
    if opts.device == "cuda" and not torch.cuda.is_available():
        print("vqkernels bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    cases = grid(grid_name, opts.device, args.ops)
    machine = machine_info()  # imports every installed peer, so their objects exist before the freeze
    # Objects alive now (torch, the peers' modules) are never garbage: freezing them keeps the
    # gc.collect() before each memory measurement in milliseconds instead of a third of a second.
    gc.freeze()
    try:
        return _run(args, grid_name, opts, cases, machine)
    finally:
        gc.unfreeze()


def _run(args, grid_name, opts, cases, machine) -> int:
    started = time.perf_counter()
    table = Table(opts.device)
    gpu = f", {machine.get('gpu')}" if opts.device == "cuda" else ""
    table.header([
        f"vqkernels bench: {grid_name} grid on {opts.device}{gpu} | {machine['processor']}, {machine['cpu_count']} cpus, "
        f"torch {machine['torch']} ({machine['torch_threads']} threads) | load average {machine['load_average']}",
        f"median of up to {opts.repeats} timed calls after {opts.warmup} warm-up (the first is the checked call)"
        + (", CUDA events" if opts.device == "cuda" else "")
        + "; /best peer = time / fastest agreeing non-vqkernels contender",
    ])
    rows = []

    def progress(msg):
        print(msg, file=sys.stderr, flush=True)

    for i, case in enumerate(cases, 1):
        progress(f"[{i}/{len(cases)}] {case.op} {case.label()}")
        row = run_case(case, opts, progress)
        rows.append(row)
        table.row(row)
    table.close_op()
    tgts = targets(rows, opts.device)
    for line in _target_lines(tgts):
        table._emit(line)
    if tgts and grid_name != "full":
        table._emit(f"   (the targets are set for the full grid's shapes; {grid_name} rows are small and only indicative)")
    elapsed = time.perf_counter() - started
    load_after = machine_info()["load_average"]
    table._emit("")
    table._emit(f"ran {len(cases)} rows in {elapsed:.1f} s; load average before {machine['load_average']}, after {load_after}")
    if args.plot:
        why = plot(rows, args.plot, title=f"vqkernels bench ({grid_name}, {opts.device}, {machine['processor']})")
        table._emit(f"plot: {args.plot}" if why is None else f"no plot: {why}")
    if args.json:
        doc = {
            "schema": "vqkernels.bench/1",
            "machine": machine,
            "load_average_after": load_after,
            "settings": {"grid": grid_name, "ops": list(args.ops), "device": opts.device, "repeats": opts.repeats,
                         "warmup": opts.warmup, "max_seconds": opts.max_seconds, "memory": opts.memory,
                         "max_dense_bytes": opts.max_dense_bytes, "seed": opts.seed, "decay": DECAY, "eps": EPS,
                         "float32_matmul_precision": torch.get_float32_matmul_precision()},
            "notes": {
                "time": "median seconds over the timed calls after warm-up (CUDA events on GPU)",
                "peak_mem_bytes": ("GPU: torch.cuda.max_memory_allocated above the allocation before the call. CPU: "
                                   "peak RSS above the RSS right before the call; rows with memory_mode 'subprocess' "
                                   "measure each contender in a fresh interpreter after inputs and module exist, "
                                   "'inprocess' rows reset VmHWM and trim the heap first; see each result's mem_method"),
                "vs_best_peer": "median / median of the fastest non-vqkernels contender that agrees, in the same row",
                "floor": {"peak_flops": GPU_PEAK_FLOPS, "bandwidth_bytes_per_s": GPU_BANDWIDTH,
                          "formula": "max(flops / peak_flops[dtype], bytes / bandwidth); fraction = floor / median"},
            },
            "elapsed_s": elapsed,
            "rows": rows,
            "targets": tgts,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, default=str))
        table._emit(f"json: {args.json}")
    bad = [f"{r['label']}: {e['contender']} " + ("disagrees" if e.get("status") == "ok" else f"failed: {e['reason']}")
           for r in rows for e in r["results"] if e["family"] == "vqkernels"
           and (e.get("status") == "error" or (e.get("status") == "ok" and not e.get("agrees", False)))]
    if bad:
        print("vqkernels contenders that disagree with the best pick or failed: " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqkernels.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
