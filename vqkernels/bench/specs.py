"""The op registry: one :class:`OpSpec` per benchmarked op (grid, inputs, contenders, check).

Adding an op's benchmark means adding one spec here with :func:`register`; the runner,
the table, the JSON, the plot and the CLI pick it up by name. A contender is one
declaration: ``ours(name, build)`` for one per vqkernels backend, ``Contender(name, "peer",
build)`` for a peer; ``build(case, inputs, device|backend, opts)`` returns the timed call.
The shared builders (peers, guards, checks, targets) come first, then one section per op.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import vqkernels
from vqkernels.ops import _dispatch
from vqkernels.ops._metrics import normalized, paired_distance
from vqkernels.ops.assign import tolerance

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DECAY, EPS = 0.99, 1e-5  # the EMA hyper-parameters every contender gets
# Elements the reference backend (the definition of correct, not a fast path) may touch per call.
# On CUDA 2^34 was too many: the reference cluster_stats' int64 one-hot at N = 2^20, K = 2^14 asked
# for 128 GiB on the H200 (gpu_check.sh, 2026-12-04).
REFERENCE_MAX_COST = {"cpu": 1 << 25, "cuda": 1 << 32}


@dataclass(frozen=True)
class Case:
    """One row of the table: an op on one shape (``variant``: e.g. deterministic cluster_stats)."""

    op: str
    N: int
    K: int
    D: int
    dtype: str = "fp32"
    metric: str = "l2"
    iters: int = 0  # kmeans only
    variant: str = ""
    Q: int = 0  # residual rows: stages
    cdim: int = 0  # residual rows: codebook_dim when it differs from D (projections in and out)

    @property
    def spec(self) -> "OpSpec":
        return SPECS[self.op]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def label(self) -> str:
        names = {"N": "N=", "K": "K=", "D": "D=", "iters": "it=", "Q": "Q=", "cdim": "cdim="}
        parts = [f"{names.get(f, '')}{getattr(self, f)}" for f in self.spec.label if getattr(self, f) != 0]
        return " ".join(parts + ([self.variant] if self.variant else []))

    def work(self) -> dict:
        """``{"flops", "bytes"}`` of the op at its minimum, for the GPU floor."""
        flops, nbytes = self.spec.work(self, self.torch_dtype.itemsize)
        return {"flops": flops, "bytes": nbytes}

    def throughput(self, seconds: float) -> float:
        return self.spec.count(self) / seconds


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
class Check:
    agree: float  #: fraction of rows / codes that agree
    ok: bool
    detail: str = ""


@dataclass
class OpSpec:
    name: str
    title: str
    check_text: str
    label: tuple  #: Case fields shown in the row label, in order
    grids: Dict[str, List[Case]]  #: "smoke", "cpu-quick", "cpu-full", "cuda-quick", "cuda-full"
    inputs: Callable[[Case, torch.Generator], Dict[str, torch.Tensor]]
    contenders: List[Contender]
    check: Callable[[Case, dict, dict], Dict[str, Check]]
    work: Callable[[Case, int], tuple]  #: (case, element size) -> (flops, bytes)
    reference_cost: Callable[[Case], int]
    unit: str = "rows/s"
    count: Callable[[Case], float] = lambda case: case.N  #: units per call, for the throughput
    memory_subprocess: bool = False  #: full CPU grid: peak memory in a fresh interpreter per contender
    aliases: tuple = ()  #: other names --ops accepts
    targets: Callable[[dict], List[dict]] = lambda row: []  #: the issues' goals, measured on a row (never asserted)


SPECS: Dict[str, OpSpec] = {}


def register(spec):
    """Add an :class:`OpSpec` (or a function that builds one, as a decorator) to the registry."""
    spec = spec if isinstance(spec, OpSpec) else spec()
    SPECS[spec.name] = spec
    return spec


def grid(name: str = "quick", device: str = "cpu", ops=None) -> List[Case]:
    """The cases of grid ``name`` ("full", "quick", "smoke") for ``device``, restricted to ``ops``."""
    if name not in ("full", "quick", "smoke"):
        raise ValueError(f"grid must be 'full', 'quick' or 'smoke', got {name!r}")
    key = "smoke" if name == "smoke" else f"{'cuda' if device == 'cuda' else 'cpu'}-{name}"
    return [c for op, spec in SPECS.items() if ops is None or op in ops for c in spec.grids[key]]


def make_inputs(case: Case, device: str, seed: int = 0, on_device: bool = False) -> Dict[str, torch.Tensor]:
    """The row's inputs from a seeded generator: on the CPU (the same numbers on every device),
    or with ``on_device`` on ``device`` itself (large GPU rows, where CPU drawing is slow)."""
    where = torch.device(device if on_device else "cpu")
    g = torch.Generator(where).manual_seed(seed)
    with where:  # factory functions without a device argument draw on `where`
        inp = case.spec.inputs(case, g)
    return {k: v.to(device) for k, v in inp.items()}


# --------------------------------------------------------------------------- shared builders
def import_peer(module: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # not installed, or broken: the row says which
        raise Skip(f"{module} is not installed ({type(exc).__name__})") from None


def dense_guard(case: Case, opts, what: str, count: int = 1):
    need = count * case.N * case.K * 4
    if need > opts.max_dense_bytes:
        raise Skip(f"{what} would materialise {need / 2**30:.1f} GiB (> --max-dense-gib {opts.max_dense_bytes / 2**30:g})")


def _cases(op, N, Ks, Ds, dtypes=("fp32",), metrics=("l2",), **kw) -> List[Case]:
    return [Case(op, N, K, D, dt, m, **kw) for m in metrics for dt in dtypes for D in Ds for K in Ks]


def ours(fmt: str, build: Callable, dtype: Callable[[Case], Optional[torch.dtype]] = lambda c: c.torch_dtype):
    """One contender per vqkernels backend: ``build(case, inputs, backend, opts) -> Prepared``.

    A backend that refuses the device or dtype, Triton in the CPU interpreter, and the
    reference backend on rows above its cost limit are skipped with the reason.
    """
    def make(backend):
        def prepare(case, inp, device, opts):
            reason = _dispatch.BACKENDS[backend].refusal(device, dtype(case))
            if reason is not None:
                raise Skip(reason)
            if backend == "triton" and device == "cpu":
                raise Skip("the Triton interpreter (TRITON_INTERPRET=1) is for tests, not timing")
            if backend == "reference" and case.spec.reference_cost(case) > REFERENCE_MAX_COST.get(device, 1 << 25):
                raise Skip("the reference backend (the definition of correct, not a fast path) is timed on small rows only")
            return build(case, inp, backend, opts)

        return Contender(fmt.format(backend), "vqkernels", prepare)

    return [make(b) for b in _dispatch.BACKENDS]


def op_or_kernel(public: Callable, kernel: Callable, output=lambda out: out) -> Callable:
    """A ``build`` for :func:`ours`: ``public(case, inp, b)`` (the public op), or with
    ``--kernel-level`` ``kernel(case, inp, b)``: the backend's own call through
    ``_dispatch.call`` (no validation), which takes the codebook axis C first ([1, ...] views)."""
    return lambda case, inp, b, opts: Prepared(
        lambda: (kernel if opts.kernel_level else public)(case, inp, b), output)


def _kernel(op: str, backend: str, like: torch.Tensor, dtype, *args):
    return _dispatch.call(op, backend, like.device, dtype, *args)


# --------------------------------------------------------------------------- checks
def pick_distances(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact fp64 distance ``[N]`` of each row ``x [N, D]`` to its picked code (inf for an invalid pick)."""
    cf = codebook.double()
    idx = indices.to(x.device).long().reshape(-1)
    valid = (idx >= 0) & (idx < cf.shape[0])
    d = paired_distance(x.double(), cf[idx.clamp(0, cf.shape[0] - 1)], metric)
    return torch.where(valid, d, torch.full_like(d, float("inf")))


def _agreement(ok: torch.Tensor, excess=None, what: str = "rows") -> Check:
    """A Check from ``ok [N]`` (which rows, or codes, agree): the fraction, and the first that do not."""
    frac, bad = float(ok.double().mean()) if ok.numel() else 1.0, (~ok).nonzero().flatten()[:3].tolist()
    more = "" if excess is None else f": excess {[float(excess[i]) for i in bad]}"
    return Check(frac, frac == 1.0, f"first disagreeing {what} {bad}{more}" if bad else "")


def assignment_agreement(x, codebook, picks: Dict[str, torch.Tensor], metric: str = "l2") -> Dict[str, Check]:
    """Compare every contender's pick ``[N]`` with the best pick of any contender, row by row.

    A pick agrees when its exact distance is within the dtype tolerance
    (:func:`vqkernels.ops.assign.tolerance`) of the best exact distance in that row, so
    ties and rounding are allowed and no contender is taken as the truth.
    """
    if not picks:
        return {}
    dist = {name: pick_distances(x, codebook, idx, metric) for name, idx in picks.items()}
    best = torch.stack(list(dist.values())).min(0).values
    tf32 = x.is_cuda and x.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    tol = tolerance(x, codebook, metric, rtol_key="tf32" if tf32 else None).to(best)
    return {name: _agreement(d <= best + tol, d - best) for name, d in dist.items()}


def _per_code(outputs: dict, good: Callable[[Any], torch.Tensor]) -> Dict[str, Check]:
    """One Check per contender from ``good(output) -> bool [K]``: which codes agree."""
    return {name: _agreement(good(out), what="codes") for name, out in outputs.items()}


# --------------------------------------------------------------------------- targets (measured, never asserted)
def best_result(row: dict, prefix: str, family: Optional[str] = None) -> Optional[dict]:
    """The fastest ok result in ``row`` whose contender name starts with ``prefix``."""
    found = [e for e in row["results"] if e["contender"].startswith(prefix) and e.get("status") == "ok"
             and (family is None or e["family"] == family)]
    return min(found, key=lambda e: e["median_s"]) if found else None


def _target(row, what, value, goal=None, met=None, unit="x"):
    return {"target": f"{what}, {row['label']}", "value": value, "unit": unit, "goal": goal or "(reported only)",
            "met": met}


def ratio_targets(*pairs):
    """Targets from ``pairs`` of (ours prefix, theirs prefix, what, goal(row) -> limit or None): the
    time ratio ours / theirs on each row."""
    def targets(row) -> List[dict]:
        out = []
        for mine, theirs, what, limit in pairs:
            a, b, lim = best_result(row, mine, "vqkernels"), best_result(row, theirs), limit(row)
            if a and b:
                r = a["median_s"] / b["median_s"]
                out.append(_target(row, what, r, lim and f"<= {lim:g}x", lim and r <= lim, "x time"))
        return out
    return targets


def _plain_torch(what: str, limit: float = 1.2):
    """Issue #14: every op within 1.2x of the plainest torch code that computes the same thing."""
    return lambda row: ratio_targets(("vqkernels", what, f"{row['op']} ours / {what}", lambda r: limit))(row)


def _speedup_targets(prefix: str, peer: str, goal: Callable[[dict], Optional[float]]):
    """Speed-up and peak-memory ratio over vector-quantize-pytorch (issue #14: >= 15x at N >= 16384,
    >= 10x at N >= 4096, never slower at N <= 256; peak memory >= 10x less at K = 65536)."""
    def targets(row):
        mine, vqp, out = best_result(row, prefix, "vqkernels"), best_result(row, peer), []
        if mine and vqp:
            speed, lim = vqp["median_s"] / mine["median_s"], goal(row)
            out.append(_target(row, f"{row['op']} speed-up over vqp", speed, lim and f">= {lim:g}x", lim and speed >= lim))
            if mine.get("peak_mem_bytes") and vqp.get("peak_mem_bytes"):
                mem, big = vqp["peak_mem_bytes"] / mine["peak_mem_bytes"], row["K"] >= 65536
                out.append(_target(row, f"{row['op']} peak-memory ratio vqp / ours", mem, big and ">= 10x at K = 65536",
                                   mem >= 10 if big else None))
        return out
    return targets


# --------------------------------------------------------------------------- vector-quantize-pytorch, the main peer
def _vqp_codebook(prefix: str, codes: torch.Tensor) -> dict:
    """``codes [K, D]`` as one vector-quantize-pytorch codebook's state (EMA sums = codes, sizes 1)."""
    return {f"{prefix}_codebook.{k}": v for k, v in (("embed", codes[None]), ("embed_avg", codes[None].clone()),
            ("cluster_size", codes.new_ones(1, codes.shape[0])), ("initted", codes.new_ones(())))}


def _vqp(cls: str, case: Case, state: dict, device, training: bool, **kw):
    """vector-quantize-pytorch's ``cls`` (VectorQuantize, ResidualVQ) with our hyper-parameters, loaded with ``state``."""
    module = getattr(import_peer("vector_quantize_pytorch"), cls)(
        dim=case.D, codebook_size=case.K, decay=DECAY, eps=EPS, kmeans_init=False, use_cosine_sim=case.metric == "cosine",
        rotation_trick=False, commitment_weight=1.0, **kw)
    module.load_state_dict(state)
    return module.to(device).train(training)


def _vqp_eval(what: str, module: Callable, stages: Callable[[Case], int] = lambda case: 1):
    """A peer: ``module(case, inp, device)``'s eval forward, its indices ``[N, stages]``, unless its dense
    N x K matrices (``what``) pass --max-dense-gib."""
    def build(case, inp, device, opts):
        dense_guard(case, opts, what)
        m = module(case, inp, device)
        return Prepared(torch.no_grad()(lambda: m(inp["x"].unsqueeze(0))[1].reshape(-1, stages(case))))
    return build


# The minimum work of the ops, for the GPU floor: (flops, bytes) at element size e
def _assign_work(case, e):
    return 2 * case.N * case.K * case.D, e * (case.N + case.K) * case.D + 12 * case.N


def _stats_work(case, e):
    return case.N * case.D, e * case.N * case.D + 8 * case.N + 4 * case.K * (case.D + 1)


def _ema_work(case, e):
    return 4 * case.K * case.D, 4 * 5 * case.K * (case.D + 1) + e * case.K * case.D


# --------------------------------------------------------------------------- assign
# Issue #14's CPU shapes (N, K, D) (benchmarks/cpu_assign.py); the cpu backend at most 1.0x FAISS at the first four.
CPU_TARGET_SHAPES = [(65536, 32768, 4), (65536, 1024, 8), (65536, 8192, 32), (16384, 16384, 64), (16384, 1024, 64)]


@register
def _assign() -> OpSpec:
    def faiss_flat(case, inp, device, opts):
        faiss, x, c, cosine = import_peer("faiss"), inp["x"], inp["codebook"], case.metric == "cosine"
        if device == "cuda":
            if not hasattr(faiss, "StandardGpuResources"):
                raise Skip("this faiss build has no GPU index (faiss-cpu)")
            importlib.import_module("faiss.contrib.torch_utils")  # lets the GPU index take torch tensors
            res = faiss.StandardGpuResources()
        else:
            faiss.omp_set_num_threads(torch.get_num_threads())  # threads equal: FAISS runs as many as torch

        def fn():  # timed with the index build
            xs, cs = normalized(x.float(), case.metric).contiguous(), normalized(c.float(), case.metric).contiguous()
            if device == "cuda":
                index = faiss.GpuIndexFlatIP(res, case.D) if cosine else faiss.GpuIndexFlatL2(res, case.D)
                index.add(cs)
                return index.search(xs, 1)[1][:, 0]
            index = faiss.IndexFlatIP(case.D) if cosine else faiss.IndexFlatL2(case.D)
            index.add(cs.numpy())
            return torch.from_numpy(index.search(xs.numpy(), 1)[1][:, 0])
        return Prepared(fn)

    def flash_assign(case, inp, device, opts):
        if device != "cuda" or case.metric != "l2":
            raise Skip("flash-kmeans runs on CUDA only" if device != "cuda" else
                       "flash-kmeans' assignment kernel here is the Euclidean one")
        run = getattr(import_peer("flash_kmeans.assign_euclid_triton"), "euclid_assign_triton", None)
        if run is None:
            raise Skip("this flash-kmeans has no euclid_assign_triton")
        x, c = inp["x"].unsqueeze(0), inp["codebook"].unsqueeze(0)
        x_sq = x.float().pow(2).sum(-1).to(x.dtype)  # once per input set, as their k-means does
        return Prepared(lambda: run(x, c, x_sq)[0])

    def cdist(case, inp, device, opts):
        dense_guard(case, opts, "torch.cdist")
        x, c = normalized(inp["x"], case.metric), normalized(inp["codebook"], case.metric)
        return Prepared(lambda: torch.cdist(x, c).argmin(1))

    def vector_quantize(case, inp, device):
        return _vqp("VectorQuantize", case, _vqp_codebook("", normalized(inp["codebook"].float().cpu(), case.metric)),
                    device, training=False)

    # l2, fp32: chunked <= 1.5x FAISS at D >= 32 (issue #9); the cpu backend <= 1.0x FAISS at
    # issue #14's shapes, and never slower than chunked
    l2_targets = ratio_targets(
        ("vqkernels[chunked]", "faiss.", "assign chunked / faiss.IndexFlatL2", lambda r: 1.5 if r["D"] >= 32 else None),
        ("vqkernels[cpu]", "faiss.", "assign cpu / faiss.IndexFlatL2",
         lambda r: 1.0 if (r["N"], r["K"], r["D"]) in CPU_TARGET_SHAPES[:4] else None),
        ("vqkernels[cpu]", "vqkernels[chunked]", "assign cpu / chunked", lambda r: 1.0))
    targets = lambda row: l2_targets(row) if row["metric"] == "l2" and row["dtype"] == "fp32" else []  # noqa: E731
    big_k = [Case("assign", 4096, 262144, D) for D in (8, 256)]  # IBQ-size codebooks (issue #13)
    return OpSpec(
        "assign", "assign (nearest code)", "exact fp64 distance of each pick <= best pick of any contender + dtype tolerance",
        ("metric", "N", "K", "D", "dtype"),
        {"smoke": [Case("assign", 256, 64, 8), Case("assign", 256, 64, 8, metric="cosine")],
         "cpu-quick": _cases("assign", 2048, (256, 1024, 4096), (8, 64)) + _cases("assign", 2048, (1024,), (64,),
                                                                                  metrics=("cosine",)),
         "cpu-full": (_cases("assign", 8192, (1024, 4096, 16384), (8, 32, 64)) + big_k
                      + _cases("assign", 8192, (1024, 16384), (64,), metrics=("cosine",))
                      + _cases("assign", 8192, (4096,), (64,), dtypes=("bf16",))),
         "cuda-quick": (_cases("assign", 65536, (1024, 16384), (64,), dtypes=("fp32", "bf16"))
                        + _cases("assign", 65536, (16384,), (64,), dtypes=("bf16",), metrics=("cosine",))),
         "cuda-full": (_cases("assign", 65536, (1024, 4096, 16384, 65536, 262144), (64, 256), dtypes=("fp32", "bf16"))
                       + _cases("assign", 65536, (262144,), (8,), dtypes=("bf16",))
                       + _cases("assign", 65536, (4096, 65536), (64,), dtypes=("bf16",), metrics=("cosine",)))},
        lambda case, g: {"x": torch.randn(case.N, case.D, generator=g).to(case.torch_dtype),
                         "codebook": torch.randn(case.K, case.D, generator=g).to(case.torch_dtype)},
        ours("vqkernels[{}]", op_or_kernel(
            lambda case, inp, b: vqkernels.assign(inp["x"], inp["codebook"], case.metric, backend=b).indices,
            lambda case, inp, b: _kernel("assign", b, inp["x"], inp["x"].dtype, inp["x"][None], inp["codebook"][None],
                                         case.metric)[0][0]))
        + [Contender("faiss.IndexFlat", "peer", faiss_flat), Contender("torch.cdist+argmin", "peer", cdist),
           Contender("vqp.VectorQuantize(eval)", "peer", _vqp_eval("VectorQuantize (cdist + argmax)", vector_quantize)),
           Contender("flash_kmeans.assign", "peer", flash_assign)],
        lambda case, inp, outputs: assignment_agreement(inp["x"], inp["codebook"], outputs, case.metric),
        _assign_work, lambda case: case.N * case.K * case.D, targets=targets)


# --------------------------------------------------------------------------- histogram
register(OpSpec(
    "histogram", "histogram (code usage)", "counts equal torch.bincount exactly", ("N", "K"),
    {"smoke": [Case("histogram", 1024, 64, 1)], "cpu-quick": [Case("histogram", 262144, 4096, 1)],
     "cpu-full": [Case("histogram", 1 << 20, K, 1) for K in (1024, 65536)],
     "cuda-quick": [Case("histogram", 1 << 22, 16384, 1)],
     "cuda-full": [Case("histogram", 1 << 24, K, 1) for K in (1024, 65536)]},
    # skewed usage (as a real codebook's), so some bins are hot and many are cold
    lambda case, g: {"indices": (torch.rand(case.N, generator=g).pow(2) * case.K).long().clamp_max(case.K - 1)},
    ours("vqkernels[{}]", op_or_kernel(
        lambda case, inp, b: vqkernels.histogram(inp["indices"], case.K, backend=b),
        lambda case, inp, b: _kernel("histogram", b, inp["indices"], None, inp["indices"][None], case.K, None)[0]),
        dtype=lambda c: None)
    + [Contender("torch.bincount", "peer", lambda case, inp, device, opts: Prepared(
        lambda: torch.bincount(inp["indices"], minlength=case.K)))],
    lambda case, inp, outputs: _per_code(outputs, lambda counts: counts.to(inp["indices"].device).long().reshape(-1)
                                         == torch.bincount(inp["indices"], minlength=case.K)),
    lambda case, e: (0, 8 * case.N + 8 * case.K), lambda case: case.N * case.K, targets=_plain_torch("torch.bincount")))


# --------------------------------------------------------------------------- cluster_stats
@register
def _stats() -> OpSpec:
    def one_hot(case, inp, device, opts):
        """vector-quantize-pytorch's way: a dense one-hot [N, K] and a matmul."""
        dense_guard(case, opts, "one_hot + matmul", count=2)
        x, idx = inp["x"], inp["indices"]
        return Prepared(lambda: (lambda oh: (oh.sum(0), oh.t() @ x.float()))(F.one_hot(idx, case.K).float()))

    def check(case, inp, outputs):
        x, idx = inp["x"].double(), inp["indices"]
        counts = torch.bincount(idx, minlength=case.K).double()
        sums = torch.zeros(case.K, case.D, dtype=torch.float64, device=x.device).index_add_(0, idx, x)
        scale = torch.zeros(case.K, dtype=torch.float64, device=x.device).index_add_(0, idx, x.abs().sum(1))
        tol = 1e-5 * scale.unsqueeze(1) + 1e-6  # fp32 summation of the rows of one code
        return _per_code(outputs, lambda cs: (cs[0].double().to(x.device) == counts)
                         & ((cs[1].double().to(x.device) - sums).abs() <= tol).all(1))

    det = lambda case: case.variant == "deterministic"  # noqa: E731
    return OpSpec(
        "stats", "cluster_stats (per-code counts and sums)", "counts exact, sums within 1e-5 * sum|x| of fp64",
        ("N", "K", "D", "dtype"),
        {"smoke": [Case("stats", 512, 64, 8)], "cpu-quick": [Case("stats", 16384, 1024, 64)],
         "cpu-full": [Case("stats", 65536, K, 64) for K in (1024, 16384, 65536)],
         "cuda-quick": [Case("stats", 1 << 20, 16384, 64)],
         "cuda-full": [Case("stats", 1 << 22, K, 64) for K in (1024, 65536)]},
        lambda case, g: {"x": torch.randn(case.N, case.D, generator=g).to(case.torch_dtype),
                         "indices": torch.randint(0, case.K, (case.N,), generator=g)},
        ours("vqkernels[{}]", op_or_kernel(
            lambda case, inp, b: tuple(vqkernels.cluster_stats(inp["x"], inp["indices"], case.K, deterministic=det(case),
                                                               backend=b)),
            lambda case, inp, b: tuple(t[0] for t in _kernel("cluster_stats", b, inp["x"], inp["x"].dtype, inp["x"][None],
                                                             inp["indices"][None], case.K, det(case)))))
        + [Contender("torch.index_add_", "peer", lambda case, inp, device, opts: Prepared(lambda: (
            torch.bincount(inp["indices"], minlength=case.K).float(),
            torch.zeros(case.K, case.D, device=inp["x"].device).index_add_(0, inp["indices"], inp["x"].float())))),
           Contender("one_hot+matmul (vqp's way)", "peer", one_hot)],
        check, _stats_work, lambda case: case.N * case.K, aliases=("cluster_stats",),
        targets=_plain_torch("torch.index_add_"))



# --------------------------------------------------------------------------- ema_update_
@register
def _ema() -> OpSpec:
    def state(inp):
        return {k: inp[k].clone() for k in ("cluster_size", "embed_avg", "codebook")}

    def ours_(case, inp, b, opts):
        s, counts, sums = state(inp), inp["counts"], inp["sums"]
        if opts.kernel_level:
            args = [t.unsqueeze(0) for t in (s["cluster_size"], s["embed_avg"], s["codebook"], counts, sums)]
            return Prepared(lambda: _kernel("ema_update", b, counts, case.torch_dtype, *args, DECAY, EPS)
                            or s["codebook"], output=lambda cb: cb.clone())
        return Prepared(lambda: vqkernels.ema_update_(s["cluster_size"], s["embed_avg"], s["codebook"], counts, sums,
                                                      DECAY, EPS, backend=b), output=lambda cb: cb.clone())

    def eager(case, inp, device, opts):
        """The same update written as vector-quantize-pytorch writes it (eager torch)."""
        s, counts, sums, K = state(inp), inp["counts"], inp["sums"], case.K

        def fn():
            s["cluster_size"].lerp_(counts, 1 - DECAY)
            s["embed_avg"].lerp_(sums, 1 - DECAY)
            n = s["cluster_size"].sum()
            return s["codebook"].copy_(s["embed_avg"] / ((s["cluster_size"] + EPS) / (n + K * EPS) * n).unsqueeze(1))
        return Prepared(fn, output=lambda cb: cb.clone())

    def inputs(case, g):
        K, D = case.K, case.D
        counts = torch.bincount(torch.randint(0, K, (max(4 * K, 1024),), generator=g), minlength=K).float()
        return {"counts": counts, "sums": torch.randn(K, D, generator=g) * counts.unsqueeze(1).sqrt(),
                "cluster_size": torch.rand(K, generator=g) * 4, "embed_avg": torch.randn(K, D, generator=g),
                "codebook": torch.randn(K, D, generator=g).to(case.torch_dtype)}

    def check(case, inp, outputs):
        cs = inp["cluster_size"].double() * DECAY + inp["counts"].double() * (1 - DECAY)
        ea = inp["embed_avg"].double() * DECAY + inp["sums"].double() * (1 - DECAY)
        n = cs.sum()
        truth = ea / ((cs + EPS) / (n + case.K * EPS) * n).unsqueeze(1)
        rtol = 1e-4 if case.torch_dtype in (torch.float32, torch.float64) else 1e-2
        return _per_code(outputs, lambda cb: ((cb.double().to(truth.device).reshape(truth.shape) - truth).abs()
                                              <= rtol * truth.abs() + rtol).all(1))

    return OpSpec(
        "ema", "ema_update_ (EMA statistics and codebook)", "codebook within 1e-4 (fp32) of the fp64 update",
        ("K", "D", "dtype"),
        {"smoke": [Case("ema", 0, 64, 8)], "cpu-quick": [Case("ema", 0, 16384, 64)],
         "cpu-full": [Case("ema", 0, K, 64) for K in (1024, 16384, 65536)],
         "cuda-quick": [Case("ema", 0, 65536, 64)], "cuda-full": [Case("ema", 0, K, 256) for K in (16384, 65536)]},
        inputs, ours("vqkernels[{}]", ours_) + [Contender("torch eager (vqp's formulas)", "peer", eager)],
        check, _ema_work, lambda case: case.K * case.D, unit="codes/s", count=lambda case: case.K,
        aliases=("ema_update", "ema_update_"), targets=_plain_torch("torch eager"))


# --------------------------------------------------------------------------- Quantizer training step
def _training_step(inp, device, vq):
    D = inp["weight"].shape[0]
    enc = torch.nn.Linear(D, D).to(device)
    with torch.no_grad():
        enc.weight.copy_(inp["weight"])
        enc.bias.copy_(inp["bias"])
    x, target = inp["x"], inp["target"]

    def fn():
        quantized, indices, vq_loss = vq(enc(x).unsqueeze(0))[:3]
        (F.mse_loss(quantized.squeeze(0), target) + vq_loss.sum()).backward()
        enc.zero_grad(set_to_none=True)
        return indices.detach().reshape(-1)
    return Prepared(fn)


@register
def _step() -> OpSpec:
    def ours_(case, inp, b, opts):
        q = vqkernels.Quantizer(case.D, case.K, decay=DECAY, eps=EPS, learning="ema", metric=case.metric,
                                init="uniform", backend=b).to(inp["x"].device).train()
        q.codebook = inp["codes"]
        return _training_step(inp, inp["x"].device, q)

    def vqp_step(case, inp, device, opts):
        dense_guard(case, opts, "VectorQuantize (cdist + one-hot)", count=2)
        vq = _vqp("VectorQuantize", case, _vqp_codebook("", normalized(inp["codes"].float().cpu(), case.metric)),
                  device, training=True)
        return _training_step(inp, device, vq)

    def inputs(case, g):
        N, D, bound = case.N, case.D, 1 / math.sqrt(case.D)  # nn.Linear's default init range
        return {"weight": (torch.rand(D, D, generator=g) * 2 - 1) * bound,
                "bias": (torch.rand(D, generator=g) * 2 - 1) * bound,
                "x": torch.randn(N, D, generator=g), "target": torch.randn(N, D, generator=g),
                "codes": torch.randn(case.K, D, generator=g) * (1 / math.sqrt(3))}  # the encoder outputs' scale

    def work(case, e):  # the assignment dominates; encoder fwd/bwd is 6 N D^2
        nbytes = _assign_work(case, e)[1] + _stats_work(case, e)[1] + _ema_work(case, e)[1] + 24 * case.N * case.D
        return 2 * case.N * case.K * case.D + 6 * case.N * case.D ** 2, nbytes

    def goal(row):
        return 15.0 if row["N"] >= 16384 else 10.0 if row["N"] >= 4096 else 1.0 if row["N"] <= 256 else None

    return OpSpec(
        "step", "Quantizer training step (encoder fwd + quantize + loss + backward + EMA update)",
        "first step's picks (same encoder, same codebook): exact distance <= best + dtype tolerance",
        ("N", "K", "D", "dtype"),
        {"smoke": [Case("step", 128, 256, 8)], "cpu-quick": [Case("step", 256, K, 32) for K in (1024, 16384, 65536)],
         "cpu-full": [Case("step", N, K, 64) for N in (4096, 16384) for K in (1024, 4096, 16384, 65536)],
         "cuda-quick": [Case("step", 16384, K, 64) for K in (1024, 16384, 65536)],
         "cuda-full": [Case("step", 16384, K, 64) for K in (1024, 4096, 16384, 65536)]},
        inputs, ours("vqkernels.Quantizer[{}]", ours_, dtype=lambda c: torch.float32)
        + [Contender("vqp.VectorQuantize(train)", "peer", vqp_step)],
        lambda case, inp, outputs: assignment_agreement(
            torch.addmm(inp["bias"].double(), inp["x"].double(), inp["weight"].double().t()), inp["codes"], outputs,
            case.metric),
        work, lambda case: case.N * case.K * case.D, memory_subprocess=True, aliases=("train",),
        targets=_speedup_targets("vqkernels.Quantizer", "vqp.", goal))


# --------------------------------------------------------------------------- kmeans
@register
def _kmeans() -> OpSpec:
    def faiss_kmeans(case, inp, device, opts):
        faiss = import_peer("faiss")
        if device != "cpu":
            raise Skip("faiss.Kmeans is timed on CPU (its GPU path needs faiss-gpu and host arrays)")
        faiss.omp_set_num_threads(torch.get_num_threads())
        x, init = inp["x"].float().contiguous().numpy(), inp["init"].contiguous().numpy()

        def fn():
            km = faiss.Kmeans(case.D, case.K, niter=case.iters, seed=0, verbose=False, spherical=case.metric == "cosine",
                              min_points_per_centroid=1, max_points_per_centroid=max(1, x.shape[0]))
            km.train(x, init_centroids=init)
            return torch.from_numpy(km.centroids.copy())
        return Prepared(fn)

    def fast_pytorch_kmeans(case, inp, device, opts):
        mod = import_peer("fast_pytorch_kmeans")
        dense_guard(case, opts, "fast_pytorch_kmeans' K x N mask")

        def fn():
            km = mod.KMeans(n_clusters=case.K, max_iter=case.iters, tol=-1.0, verbose=0,
                            mode="cosine" if case.metric == "cosine" else "euclidean")
            km.fit_predict(inp["x"].float(), centroids=inp["init"].clone())
            return km.centroids
        return Prepared(fn)

    def flash_kmeans(case, inp, device, opts):
        if device != "cuda":
            raise Skip("flash-kmeans runs on CUDA only")
        fn_name = "batch_kmeans_Cosine" if case.metric == "cosine" else "batch_kmeans_Euclid"
        run = getattr(import_peer("flash_kmeans"), fn_name, None)
        if run is None:
            raise Skip(f"this flash-kmeans has no {fn_name}")
        x, init = inp["x"].unsqueeze(0), inp["init"].to(inp["x"].dtype).unsqueeze(0)
        # tol=0: the shift test `shift < tol` never passes, so exactly `iters` iterations run
        return Prepared(lambda: run(x, case.K, max_iters=case.iters, tol=0.0, init_centroids=init.clone(),
                                    verbose=False)[1][0])

    def inputs(case, g):
        N, K, D = case.N, case.K, case.D
        centres = torch.randn(max(1, K // 4), D, generator=g) * 2
        x = (centres[torch.randint(0, centres.shape[0], (N,), generator=g)] + torch.randn(N, D, generator=g)).to(
            case.torch_dtype)
        return {"x": x, "init": x[torch.randperm(N, generator=g)[:K]].float().clone()}

    def check(case, inp, outputs, rtol: float = 0.01):
        """k-means runs diverge legitimately (ties, empty clusters): compare the inertia of each
        contender's centroids, recomputed exactly, with the best one (within 1%)."""
        x, inertia = inp["x"].float(), {}
        for name, centroids in outputs.items():
            c = centroids.to(x.device).float()
            backend = "reference" if x.shape[0] * case.K * case.D <= 1 << 24 else None
            inertia[name] = float("inf") if not torch.isfinite(c).all() else float(pick_distances(
                x, c, vqkernels.assign(x, c, case.metric, backend=backend).indices, case.metric).sum())
        best = min(inertia.values()) if inertia else 0.0
        oks = {name: value <= best * (1 + rtol) + 1e-9 for name, value in inertia.items()}
        return {name: Check(float(ok), ok, f"inertia {inertia[name]:.6g} ({inertia[name] / best - 1:+.2%} vs best)"
                            if best else "") for name, ok in oks.items()}

    def work(case, e):
        (af, ab), (_, sb) = _assign_work(case, e), _stats_work(case, e)
        return case.iters * (af + case.N * case.D), case.iters * (ab + sb)

    return OpSpec(
        "kmeans", "kmeans (fixed Lloyd iterations, same initial centroids)",
        "inertia of the returned centroids (recomputed exactly) within 1% of the best contender's",
        ("N", "K", "D", "iters", "dtype"),
        {"smoke": [Case("kmeans", 512, 16, 8, iters=2)], "cpu-quick": [Case("kmeans", 8192, 256, 32, iters=5)],
         "cpu-full": [Case("kmeans", 32768, K, 32, iters=5) for K in (256, 1024, 4096)],
         "cuda-quick": [Case("kmeans", 1 << 18, 1024, 64, iters=10)],
         "cuda-full": [Case("kmeans", 1 << 20, K, 128, iters=10) for K in (1024, 8192)]},
        inputs, ours("vqkernels.kmeans[{}]", lambda case, inp, b, opts: Prepared(lambda: vqkernels.kmeans(
            inp["x"], case.K, case.iters, metric=case.metric, tol=0.0, init_centroids=inp["init"], backend=b).centroids))
        + [Contender("faiss.Kmeans", "peer", faiss_kmeans),
           Contender("fast_pytorch_kmeans", "peer", fast_pytorch_kmeans), Contender("flash_kmeans", "peer", flash_kmeans)],
        check, work, lambda case: case.N * case.K * case.D * max(1, case.iters),
        unit="row-iters/s", count=lambda case: case.N * case.iters,
        targets=ratio_targets(("vqkernels.kmeans", "faiss.Kmeans", "kmeans ours / faiss.Kmeans", lambda r: 1.5)))


# --------------------------------------------------------------------------- residual quantizers
def _rvq_state(case, inp) -> dict:
    """The row's codes and projections as a vector-quantize-pytorch ``ResidualVQ`` state dict: both
    contenders load the same one (ours through ``from_pretrained_state``, which needs no vqp)."""
    state = {k: v for k, v in inp.items() if k.startswith("project_")}
    for q, codes in enumerate(inp["codes"]):
        state.update(_vqp_codebook(f"layers.{q}.", codes))
    return state


def _rq(case, inp, b, training):
    rq = vqkernels.ResidualQuantizer.from_pretrained_state(_rvq_state(case, inp), decay=DECAY, eps=EPS,
                                                           metric=case.metric, backend=b)
    return rq.to(inp["x"].device).train(training)


def _rvq(case, inp, device, training=False):
    return _vqp("ResidualVQ", case, _rvq_state(case, inp), device, training, num_quantizers=case.Q,
                codebook_dim=case.cdim or None)


def _project(inp, x):
    return F.linear(x, inp["project_in.weight"].to(x), inp["project_in.bias"].to(x)) if "project_in.weight" in inp else x


def _residual_inputs(case, g):
    """Stage q's codes at scale 2^-q (what each stage leaves shrinks); unit codes for cosine."""
    d, rand = case.cdim or case.D, lambda *shape: torch.rand(*shape, generator=g) * 2 - 1
    codes = torch.randn(case.Q, case.K, d, generator=g) * 0.5 ** torch.arange(case.Q).view(-1, 1, 1)
    inp = {"x": torch.randn(case.N, case.D, generator=g), "codes": normalized(codes, case.metric)}
    if case.cdim:  # nn.Linear's default init range
        inp.update({"project_in.weight": rand(d, case.D) / math.sqrt(case.D), "project_in.bias": rand(d) / math.sqrt(case.D),
                    "project_out.weight": rand(case.D, d) / math.sqrt(d), "project_out.bias": torch.zeros(case.D)})
    return inp


def _residual_check(case, inp, outputs) -> Dict[str, Check]:
    """Greedy residual encoding, judged on each contender's own path: at every stage its pick is
    within the dtype tolerance of the nearest code to the residual its earlier picks leave."""
    z, codes, checks = _project(inp, inp["x"].double()), inp["codes"].double(), {}
    for name, out in outputs.items():
        idx, residual, ok = out.to(z.device).reshape(-1, case.Q), z, torch.ones(z.shape[0], dtype=torch.bool)
        for q, cq in enumerate(codes):
            stage = normalized(residual, case.metric)
            best = vqkernels.assign(stage, cq, case.metric, backend="chunked").indices
            ok &= (pick_distances(stage, cq, idx[:, q], case.metric) <= pick_distances(stage, cq, best, case.metric)
                   + tolerance(stage.float(), cq.float(), case.metric).to(z)).cpu()
            residual = residual - cq[idx[:, q].clamp(0, case.K - 1)]
        checks[name] = _agreement(ok)
    return checks


# EnCodec-like (Q = 8, K = 1024, D = 128) and DAC-like (Q = 9, K = 1024, 8-D l2-normalised codes) stacks
_ENCODEC, _DAC = dict(K=1024, D=128, Q=8), dict(K=1024, D=1024, Q=9, cdim=8, metric="cosine")


def _residual_spec(op, title, contenders, extra=None, **kw) -> OpSpec:
    grids = {"smoke": [Case(op, 128, 64, 16, Q=3), Case(op, 128, 64, 32, Q=2, cdim=8, metric="cosine")],
             **{g: [Case(op, N, **_ENCODEC), Case(op, N, **_DAC)] for g, N in (
                 ("cpu-quick", 2048), ("cpu-full", 8192), ("cuda-quick", 8192), ("cuda-full", 65536))}}
    for g, cases in (extra or {}).items():
        grids[g] += [replace(c, op=op) for c in cases]
    return register(OpSpec(
        op, title, "every stage's pick within the dtype tolerance of the nearest code to the residual the "
        "contender's earlier picks leave (fp64)", ("N", "K", "D", "Q", "cdim", "metric"), grids, _residual_inputs,
        contenders, _residual_check, lambda case, e: (
            2 * case.N * case.K * (case.cdim or case.D) * case.Q,
            e * (case.N * case.D + case.Q * case.K * (case.cdim or case.D)) + 8 * case.N * case.Q),
        lambda case: case.N * case.K * (case.cdim or case.D) * case.Q, **kw))


def _residual_step(case, inp, device, module):
    x = inp["x"].clone().requires_grad_()  # the stack's forward and backward, no encoder around it

    def fn():
        quantized, indices, losses = module(x.unsqueeze(0))[:3]
        (quantized.square().mean() + losses.sum()).backward()
        x.grad = None
        module.zero_grad(set_to_none=True)
        return indices.detach().reshape(-1, case.Q)
    return Prepared(fn)


def _rvq_step(case, inp, device, opts):
    dense_guard(case, opts, "ResidualVQ (cdist + one-hot per stage)", count=2)
    return _residual_step(case, inp, device, _rvq(case, inp, device, training=True))


# issue #13: at least the 6x that eight chained Quantizers already reach over ResidualVQ on CPU
_residual_spec("residual_step", "ResidualQuantizer training step (forward + backward + EMA update of every stage)",
               ours("vqkernels.RQ(train)[{}]", lambda case, inp, b, opts: _residual_step(
                   case, inp, inp["x"].device, _rq(case, inp, b, True)), dtype=lambda c: torch.float32)
               + [Contender("vqp.ResidualVQ(train)", "peer", _rvq_step)], memory_subprocess=True,
               aliases=("rvq_step",), targets=_speedup_targets("vqkernels.RQ", "vqp.", lambda row: 6.0))


def _fused(case, inp, b, opts):
    op = getattr(vqkernels, "residual_assign", None)
    if op is None:
        raise Skip("this vqkernels has no residual_assign")
    return Prepared(lambda: op(_project(inp, inp["x"]), inp["codes"], metric=case.metric, backend=b)[0])


def _separate(case, inp, b, opts):
    """One assign call per stage, the residual updated in between (the unfused path)."""
    def fn():
        residual, picks = _project(inp, inp["x"]), []
        for codes in inp["codes"]:
            picks.append(vqkernels.assign(normalized(residual, case.metric), codes, case.metric, backend=b).indices)
            residual = residual - codes[picks[-1]]
        return torch.stack(picks, 1)
    return Prepared(fn)


def _rq_eval(case, inp, b, opts):
    rq = _rq(case, inp, b, False)
    return Prepared(torch.no_grad()(lambda: rq(inp["x"]).indices))


# IBQ-size codebooks (issue #13); on CPU the D = 256 row is small (N = 512, Q = 2): 137 GFLOP a call
_RBIG = [Case("", 4096, 262144, 8, Q=4), Case("", 512, 262144, 256, Q=2)]
_residual_spec(
    "residual_encode", "residual encode (eval: Q stages of nearest codes)",
    ours("vqkernels.RQ(eval)[{}]", _rq_eval) + ours("vqkernels.residual_assign[{}]", _fused)
    + ours("vqkernels.assign xQ[{}]", _separate)
    + [Contender("vqp.ResidualVQ(eval)", "peer", _vqp_eval("ResidualVQ (cdist per stage)", _rvq, lambda case: case.Q))],
    {"cpu-full": _RBIG, "cuda-full": [replace(c, N=65536, Q=4) for c in _RBIG]},
    aliases=("rvq_encode", "residual_assign"), targets=ratio_targets(
        ("vqkernels.residual_assign", "vqkernels.assign xQ", "residual_assign / Q separate assigns", lambda r: 1.0),
        ("vqkernels.RQ(eval)", "vqp.", "residual encode ours / ResidualVQ", lambda r: None)))


OPS = tuple(SPECS)
