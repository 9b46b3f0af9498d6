"""Codebook-health diagnostics: usage, shrinkage, coverage, collapse.

The diagnostic suite of "Early Quantization Shrinks Codebook" (Zhao et al., 2026), with
our formulas (see DESIGN.md):

* usage: utilisation = used codes / K; entropy (nats) of the usage distribution;
  perplexity = exp(entropy); normalised perplexity = perplexity / K; dead codes = K - used.
  Measure it over a stream of batches (:class:`CodebookMonitor`): the perplexity of one
  batch is capped by the batch size, so per-batch numbers mislead.
* shrinkage: variance ratio = trace Cov(codebook) / trace Cov(embeddings) (1 when the
  codes spread like the data, << 1 when they huddle in a corner of it).
* coverage: mean distance embedding -> nearest code and code -> nearest embedding, both
  through the :func:`vqkernels.assign` op (Euclidean for l2, ``1 - cos`` for cosine).
* collapse: effective rank = exp(entropy of the normalised singular values) of the centred
  embeddings and of the centred codebook (Roy & Vetterli, 2007).
* per-class coverage (with labels): a class is covered when it is the majority class of
  at least one used code.

Everything takes tensors; :func:`report` returns a dict and prints a table, :func:`plot`
writes a PNG (needs matplotlib: ``pip install vqkernels[plot]``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, NamedTuple, Optional, Union

import torch

from .ops import assign, histogram
from .ops._metrics import CENTROID_METRICS
from .ops._validation import check_codebook_size, check_finite, check_indices_in_range, check_metric, check_tensor

METRICS = CENTROID_METRICS


# ---------------------------------------------------------------------------- entropy
def entropy(weights: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy (nats, float64) of the distribution proportional to ``weights [..., K]`` along
    ``dim`` (usage counts, EMA cluster sizes, singular values) -> ``[...]``; 0 where every
    weight is 0. On device, no host sync: the one formula behind usage perplexity, the
    monitor's per-batch perplexity and the effective rank.

    Example:
        >>> float(entropy(torch.tensor([1, 1, 0, 2])))  # p = (1/4, 1/4, 0, 1/2)
        1.0397207708399179
    """
    w = weights.to(torch.float64)
    total = w.sum(dim, keepdim=True)
    p = w / torch.where(total > 0, total, torch.ones_like(total))
    return -(p * p.clamp_min(1e-300).log()).sum(dim)


def perplexity(weights: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``exp(entropy(weights))`` (float64, in ``[1, K]``; 1 where every weight is 0)."""
    return entropy(weights, dim).exp()


# ---------------------------------------------------------------------------- usage
class Usage(NamedTuple):
    codebook_size: int
    total: int  #: rows counted (masked rows excluded)
    used_codes: int
    dead_codes: int  #: codes never chosen
    utilisation: float  #: used_codes / K
    entropy: float  #: of the usage distribution, in nats
    perplexity: float  #: exp(entropy), in [1, K]
    normalised_perplexity: float  #: perplexity / K, in (0, 1]


def usage_from_counts(counts: torch.Tensor) -> Usage:
    """Usage statistics from a histogram ``counts [K]`` (from :func:`vqkernels.histogram`)."""
    check_tensor("counts", counts, dims=(1,))
    if counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError(f"counts must be a real integer or floating tensor, got dtype {counts.dtype}")
    K = counts.shape[0]
    if K < 1:
        raise ValueError(f"counts must hold one count per code (K >= 1), got shape {tuple(counts.shape)}")
    c = counts.detach().to(torch.float64)
    check_finite("counts", c)
    if bool((c < 0).any()):
        raise ValueError(f"counts holds a negative count ({float(c.min())}); expected counts >= 0")
    total = float(c.sum())
    used = int((c > 0).sum())
    h = float(entropy(c))
    ppl = math.exp(h) if total > 0 else 0.0
    return Usage(K, int(round(total)), used, K - used, used / K, h, ppl, ppl / K)


def usage(indices: torch.Tensor, codebook_size: int) -> Usage:
    """Usage statistics of code ``indices [...]`` (negative = masked, ignored) over ``K`` codes.

    Example:
        >>> usage(torch.tensor([0, 1, 1, 3]), codebook_size=4).utilisation
        0.75
    """
    check_tensor("indices", indices, integer=True)
    check_codebook_size("codebook_size", codebook_size)
    return usage_from_counts(histogram(indices, codebook_size))


class CodebookMonitor:
    """Accumulates code usage over a stream of batches (counts stay on the device, no syncs).

    Per-batch perplexity is bounded by the batch size (a batch of 256 rows cannot show a
    perplexity above 256 whatever K is), which is why users see it move with the batch
    size. The monitor reports usage over everything it has seen, plus the mean per-batch
    perplexity for comparison.

    Args:
        codebook_size: number of codes ``K``.
        device: where the counts live (default: the first batch's device).

    Example:
        >>> monitor = CodebookMonitor(512)
        >>> handle = monitor.attach(quantizer)  # or call monitor.update(indices) yourself
        >>> ...  # train
        >>> monitor.usage().perplexity
    """

    def __init__(self, codebook_size: int, device: Optional[Union[str, torch.device]] = None):
        check_codebook_size("codebook_size", codebook_size)
        self.codebook_size = codebook_size
        self.device = None if device is None else torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.counts = None if self.device is None else torch.zeros(self.codebook_size, dtype=torch.int64, device=self.device)
        self.batches = 0
        self._batch_perplexity_sum = None

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> None:
        """Add one batch of indices ``[...]`` (negative = masked)."""
        batch = histogram(indices.detach(), self.codebook_size)
        if self.counts is None:
            self.counts = torch.zeros_like(batch)
        self.counts += batch.to(self.counts.device)
        ppl = perplexity(batch)
        self._batch_perplexity_sum = ppl if self._batch_perplexity_sum is None else self._batch_perplexity_sum + ppl
        self.batches += 1

    def attach(self, quantizer: torch.nn.Module, training_only: bool = True):
        """Record every forward of ``quantizer`` (its ``indices`` output); returns the hook handle."""

        def hook(module, _inputs, output):
            if training_only and not module.training:
                return
            indices = output[1]
            if bool(getattr(module, "is_quantizing", True)):
                self.update(indices)

        return quantizer.register_forward_hook(hook)

    def usage(self) -> Usage:
        """Usage over every batch seen since the last reset."""
        if self.counts is None:
            return usage_from_counts(torch.zeros(self.codebook_size, dtype=torch.int64))
        return usage_from_counts(self.counts)

    def mean_batch_perplexity(self) -> float:
        """Mean of the per-batch perplexities (biased low by the batch size; for comparison)."""
        return 0.0 if not self.batches else float(self._batch_perplexity_sum) / self.batches

    def summary(self) -> Dict[str, float]:
        u = self.usage()._asdict()
        u["batches"] = self.batches
        u["mean_batch_perplexity"] = self.mean_batch_perplexity()
        return u


# ---------------------------------------------------------------------------- shrinkage / coverage / collapse
def _rows(name: str, x: torch.Tensor) -> torch.Tensor:
    check_tensor(name, x, floating=True, min_dim=1)
    return x.detach().reshape(-1, x.shape[-1])


def total_variance(x: torch.Tensor) -> float:
    """trace Cov(x) of rows ``[..., D]`` (population covariance)."""
    rows = _rows("x", x).to(torch.float64)
    if rows.shape[0] == 0:
        return float("nan")
    return float((rows - rows.mean(0)).pow(2).sum(1).mean())


def variance_ratio(codebook: torch.Tensor, embeddings: torch.Tensor) -> float:
    """trace Cov(codebook) / trace Cov(embeddings): ~1 when the codes spread like the data,
    well below 1 when the codebook has shrunk into part of it."""
    _check_same_features(_rows("embeddings", embeddings), _rows("codebook", codebook))
    denominator = total_variance(embeddings)
    return total_variance(codebook) / denominator if denominator > 0 else float("nan")


class Coverage(NamedTuple):
    embedding_to_code: float  #: mean distance from each embedding to its nearest code
    code_to_embedding: float  #: mean distance from each code to its nearest embedding


def _check_same_features(embeddings: torch.Tensor, codebook: torch.Tensor) -> None:
    """Embeddings and codes must live in the same space (rows ``[N, D]`` and ``[K, D]``)."""
    if embeddings.shape[-1] != codebook.shape[-1]:
        raise ValueError(
            f"embeddings has {embeddings.shape[-1]} features but codebook has {codebook.shape[-1]} "
            f"(shape {tuple(codebook.shape)}); expected embeddings of shape [..., {codebook.shape[-1]}]"
        )
    if embeddings.device != codebook.device:
        raise ValueError(f"codebook is on {codebook.device} but embeddings is on {embeddings.device}; expected the same device")


def _distance(d: torch.Tensor, metric: str) -> torch.Tensor:
    # assign returns squared l2; report Euclidean distances, which read in the data's units
    return d.clamp_min(0).sqrt() if metric == "l2" else d


def coverage(embeddings: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", *, backend: Optional[str] = None) -> Coverage:
    """Both directions of nearest-neighbour distance between embeddings and codes.

    A large code -> embedding distance means codes sit where no data is (dead, stranded
    codes); a large embedding -> code distance means data the codebook does not reach.
    ``metric`` is ``"l2"`` or ``"cosine"``. No embeddings (N = 0): both distances are NaN.
    """
    check_metric(metric, METRICS)
    e = _rows("embeddings", embeddings).float()
    c = _rows("codebook", codebook).float()
    _check_same_features(e, c)
    if c.shape[0] < 1:
        raise ValueError(f"codebook must hold at least one code (K >= 1), got shape {tuple(codebook.shape)}")
    if e.shape[0] == 0:
        return Coverage(float("nan"), float("nan"))
    to_code = assign(e, c, metric, backend=backend).distances
    to_embedding = assign(c, e, metric, backend=backend).distances
    return Coverage(float(_distance(to_code, metric).mean()), float(_distance(to_embedding, metric).mean()))


def effective_rank(x: torch.Tensor, center: bool = True) -> float:
    """exp(entropy of the normalised singular values) of the rows ``[..., D]`` (in [1, D])."""
    rows = _rows("x", x).to(torch.float64)
    if center:
        rows = rows - rows.mean(0)
    s = torch.linalg.svdvals(rows)
    if not s.sum() > 0:
        return 0.0
    return float(perplexity(s))


def class_coverage(indices: torch.Tensor, labels: torch.Tensor, codebook_size: int) -> Dict[str, Any]:
    """Which classes the codebook represents, from each row's code and class label.

    A code belongs to the class that uses it most; a class is *covered* when it owns at
    least one code. Returns ``{"classes", "classes_covered", "per_class": [...]}`` with,
    per class, its label, rows, codes used by it, and codes it owns.
    """
    check_tensor("indices", indices, integer=True)
    check_tensor("labels", labels)
    check_codebook_size("codebook_size", codebook_size)
    idx = indices.detach().reshape(-1)
    lab = labels.detach().reshape(-1).to(idx.device)
    if lab.shape != idx.shape:
        raise ValueError(f"labels has {lab.numel()} entries but indices has {idx.numel()}; expected one label per row")
    # checked here, not left to the joint histogram below, whose message would name a joint index
    check_indices_in_range("indices", idx, codebook_size)
    classes, lab = torch.unique(lab, return_inverse=True)
    C, K = classes.numel(), codebook_size
    # joint (code, class) histogram in one histogram-op call; masked rows stay negative
    joint = torch.where(idx >= 0, idx * C + lab, torch.full_like(idx, -1))
    table = histogram(joint, K * C).view(K, C)
    used = table.sum(1) > 0
    owner = table.argmax(1)
    owned = torch.bincount(owner[used], minlength=C)
    per_class = []
    for c in range(C):
        per_class.append(
            {
                "label": classes[c].item(),
                "rows": int(table[:, c].sum()),
                "codes_used": int((table[:, c] > 0).sum()),
                "codes_owned": int(owned[c]),
            }
        )
    return {"classes": C, "classes_covered": int((owned > 0).sum()), "per_class": per_class}


# ---------------------------------------------------------------------------- report
_ROWS = (
    ("recon_mse", "reconstruction MSE", "{:.4f}"),
    ("utilisation", "utilisation (used / K)", "{:.3f}"),
    ("used_codes", "used codes", "{:d}"),
    ("dead_codes", "dead codes", "{:d}"),
    ("perplexity", "perplexity", "{:.1f}"),
    ("normalised_perplexity", "normalised perplexity", "{:.3f}"),
    ("mean_batch_perplexity", "mean per-batch perplexity", "{:.1f}"),
    ("variance_ratio", "variance ratio tr Cov(C)/tr Cov(E)", "{:.3f}"),
    ("embedding_to_code", "mean dist embedding -> code", "{:.3f}"),
    ("code_to_embedding", "mean dist code -> embedding", "{:.3f}"),
    ("embedding_to_code_relative", "  embedding -> code / spread(E)", "{:.3f}"),
    ("code_to_embedding_relative", "  code -> embedding / spread(E)", "{:.3f}"),
    ("effective_rank_embeddings", "effective rank, embeddings", "{:.2f}"),
    ("effective_rank_codebook", "effective rank, codebook", "{:.2f}"),
    ("classes_covered", "classes covered", "{}"),
)


def _codebook_and_space(codebook, embeddings, metric):
    """Accept a Quantizer for ``codebook``: its codes, its metric, embeddings mapped into its space."""
    check_tensor("embeddings", embeddings, floating=True, min_dim=1)
    if isinstance(codebook, torch.nn.Module):
        quantizer = codebook
        if not hasattr(quantizer, "to_codebook_space"):
            raise TypeError("codebook must be a [K, D] tensor or a vqkernels.Quantizer")
        if embeddings.shape[-1] != quantizer.dim:
            raise ValueError(
                f"embeddings has {embeddings.shape[-1]} features (shape {tuple(embeddings.shape)}); expected the "
                f"quantizer's input size dim={quantizer.dim} (channel-last)"
            )
        with torch.no_grad():
            embeddings = quantizer.to_codebook_space(embeddings.detach())
        return quantizer.codebook.detach(), embeddings, quantizer.metric
    if not isinstance(codebook, torch.Tensor):
        raise TypeError(f"codebook must be a [K, D] tensor or a vqkernels.Quantizer, got {type(codebook).__name__}")
    check_tensor("codebook", codebook, floating=True, dims=(2,))
    check_metric(metric, METRICS)
    return codebook.detach(), embeddings, metric


def report(
    embeddings: torch.Tensor,
    codebook: Union[torch.Tensor, torch.nn.Module],
    *,
    indices: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    monitor: Optional[CodebookMonitor] = None,
    metric: str = "l2",
    extra: Optional[Mapping[str, Any]] = None,
    print_table: bool = True,
    title: Optional[str] = None,
    backend: Optional[str] = None,
) -> Dict[str, Any]:
    """Every diagnostic for one codebook and a set of embeddings; prints a table.

    Args:
        embeddings: ``[..., D]`` encoder outputs (a Quantizer's inputs when ``codebook`` is one).
        codebook: ``[K, D]`` codes, or a :class:`vqkernels.Quantizer` (its codes, metric and
            input projection are used).
        indices: the embeddings' codes ``[...]``; default: nearest codes by :func:`vqkernels.assign`.
        labels: optional class label per embedding: adds per-class coverage.
        monitor: a :class:`CodebookMonitor`: usage comes from its stream instead of ``indices``.
        metric: ``"l2"`` or ``"cosine"`` (ignored when ``codebook`` is a Quantizer).
        extra: more entries to put in the dict and the table (e.g. ``recon_mse``).
        print_table: print the table.

    Returns:
        a dict with the keys of :class:`Usage`, ``variance_ratio``, ``embedding_to_code``,
        ``code_to_embedding`` (and both ``*_relative``: divided by the embeddings' RMS spread
        ``sqrt(tr Cov(E))``, l2 only), ``effective_rank_embeddings``, ``effective_rank_codebook`` and,
        with labels, ``classes``, ``classes_covered``, ``per_class``.

    Example:
        >>> stats = report(encoder(x), quantizer, labels=y)
    """
    codes, emb, metric = _codebook_and_space(codebook, embeddings, metric)
    emb = _rows("embeddings", emb).float()
    codes = _rows("codebook", codes).float()
    _check_same_features(emb, codes)
    K = codes.shape[0]
    if indices is None:
        indices = assign(emb, codes, metric, backend=backend).indices
    else:
        check_tensor("indices", indices, integer=True)
        if indices.numel() != emb.shape[0]:
            raise ValueError(
                f"indices has {indices.numel()} entries (shape {tuple(indices.shape)}) but embeddings has "
                f"{emb.shape[0]} rows; expected one code per embedding"
            )
    out: Dict[str, Any] = dict(extra or {})
    if monitor is not None:
        out.update(monitor.summary())
    else:
        out.update(usage(indices, K)._asdict())
    out["variance_ratio"] = variance_ratio(codes, emb)
    cov = coverage(emb, codes, metric, backend=backend)
    out["embedding_to_code"], out["code_to_embedding"] = cov.embedding_to_code, cov.code_to_embedding
    # the same distances in units of the embeddings' RMS spread sqrt(tr Cov(E)), comparable
    # across models whose embeddings have different scales
    spread = math.sqrt(total_variance(emb)) if metric == "l2" else 1.0
    out["embedding_to_code_relative"] = cov.embedding_to_code / spread if spread > 0 else float("nan")
    out["code_to_embedding_relative"] = cov.code_to_embedding / spread if spread > 0 else float("nan")
    out["effective_rank_embeddings"] = effective_rank(emb)
    out["effective_rank_codebook"] = effective_rank(codes)
    if labels is not None:
        cc = class_coverage(indices, labels, K)
        out["classes"] = cc["classes"]
        out["classes_covered"] = f"{cc['classes_covered']} / {cc['classes']}"
        out["per_class"] = cc["per_class"]
    if print_table:
        print(format_table({title or "value": out}))
    return out


def format_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """A side-by-side text table of reports (one column per report, one row per metric)."""
    names = list(reports)
    rows = []
    for key, label, fmt in _ROWS:
        if not any(key in r for r in reports.values()):
            continue
        cells = []
        for n in names:
            v = reports[n].get(key)
            if v is None:
                cells.append("-")
            elif isinstance(v, float) and fmt == "{:d}":
                cells.append(str(int(v)))
            else:
                try:
                    cells.append(fmt.format(v))
                except (ValueError, TypeError):
                    cells.append(str(v))
        rows.append((label, cells))
    w0 = max([len("metric")] + [len(r[0]) for r in rows])
    widths = [max([len(n)] + [len(r[1][i]) for r in rows]) for i, n in enumerate(names)]
    line = "-" * (w0 + sum(w + 3 for w in widths))
    out = [f"{'metric':<{w0}}" + "".join(f"   {n:>{w}}" for n, w in zip(names, widths)), line]
    for label, cells in rows:
        out.append(f"{label:<{w0}}" + "".join(f"   {c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(out)


# ---------------------------------------------------------------------------- plots
def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "vqkernels.diagnostics.plot needs matplotlib, which is not installed: "
            "pip install 'vqkernels[plot]' (or pip install matplotlib)"
        ) from None
    return Figure, FigureCanvasAgg


def _pca_2d(embeddings: torch.Tensor, codebook: torch.Tensor):
    """Project both onto the embeddings' top-2 principal axes."""
    e = embeddings.double()
    mean = e.mean(0)
    _, _, v = torch.linalg.svd(e - mean, full_matrices=False)
    basis = v[:2].t()
    if basis.shape[1] < 2:  # 1-D data: pad a zero axis
        basis = torch.cat([basis, torch.zeros_like(basis)], 1)
    return ((e - mean) @ basis).numpy(), ((codebook.double() - mean) @ basis).numpy()


def _draw(ax_hist, ax_pca, embeddings, codebook, counts, labels, title, max_points):
    K = codebook.shape[0]
    counts = counts.detach().cpu().to(torch.float64)
    order = torch.sort(counts, descending=True).values.numpy()
    ax_hist.bar(range(K), order, width=1.0, color="tab:blue")
    used = int((counts > 0).sum())
    ax_hist.set_title(f"{title}: code usage (sorted), {used}/{K} used", fontsize=9)
    ax_hist.set_xlabel("code rank")
    ax_hist.set_ylabel("count")
    e = embeddings.detach().cpu().float()
    lab = None if labels is None else labels.detach().cpu().reshape(-1)
    if e.shape[0] > max_points:
        keep = torch.randperm(e.shape[0], generator=torch.Generator().manual_seed(0))[:max_points]
        e = e[keep]
        lab = None if lab is None else lab[keep]
    pe, pc = _pca_2d(e, codebook.detach().cpu().float())
    colour = dict(color="tab:blue") if lab is None else dict(c=lab.numpy(), cmap="tab10")
    ax_pca.scatter(pe[:, 0], pe[:, 1], s=3, alpha=0.35, label="embeddings", **colour)
    alive = (counts > 0).numpy()
    ax_pca.scatter(pc[alive, 0], pc[alive, 1], s=14, marker="x", color="black", linewidths=0.8, label="used codes")
    if (~alive).any():
        ax_pca.scatter(pc[~alive, 0], pc[~alive, 1], s=14, marker="x", color="red", linewidths=0.8, label="dead codes")
    ax_pca.set_title(f"{title}: PCA of embeddings, codebook on top", fontsize=9)
    ax_pca.legend(loc="best", fontsize=7, markerscale=2)


def plot(
    embeddings: torch.Tensor,
    codebook: Union[torch.Tensor, torch.nn.Module],
    path: str,
    *,
    indices: Optional[torch.Tensor] = None,
    counts: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    metric: str = "l2",
    title: str = "codebook",
    max_points: int = 5000,
) -> str:
    """Write a PNG: usage histogram (sorted) and a 2-D PCA of the embeddings with the codes on top.

    ``counts`` (a histogram, e.g. ``monitor.counts``) or ``indices`` give the usage; default:
    the embeddings' nearest codes. Needs matplotlib (``pip install vqkernels[plot]``).
    Returns ``path``.
    """
    return plot_comparison(
        {title: dict(embeddings=embeddings, codebook=codebook, indices=indices, counts=counts, labels=labels, metric=metric)},
        path,
        max_points=max_points,
    )


def plot_comparison(runs: Mapping[str, Mapping[str, Any]], path: str, *, suptitle: Optional[str] = None, max_points: int = 5000) -> str:
    """One row per run (usage histogram | PCA), e.g. early vs deferred quantization.

    ``runs`` maps a name to a dict with ``embeddings``, ``codebook`` and optionally
    ``indices``, ``counts``, ``labels``, ``metric`` (as for :func:`plot`).
    """
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(11, 4.2 * len(runs)), layout="constrained")  # leaves room for the suptitle
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(runs), 2, squeeze=False)
    for row, (name, run) in enumerate(runs.items()):
        codes, emb, metric = _codebook_and_space(run["codebook"], run["embeddings"], run.get("metric", "l2"))
        emb = _rows("embeddings", emb).float()
        codes = _rows("codebook", codes).float()
        counts = run.get("counts")
        if counts is None:
            idx = run.get("indices")
            if idx is None:
                idx = assign(emb, codes, metric).indices
            counts = histogram(idx, codes.shape[0])
        _draw(axes[row][0], axes[row][1], emb, codes, counts, run.get("labels"), name, max_points)
    if suptitle:
        fig.suptitle(suptitle)
    fig.savefig(path, dpi=110)
    return path


__all__ = [
    "entropy",
    "perplexity",
    "Usage",
    "usage",
    "usage_from_counts",
    "CodebookMonitor",
    "total_variance",
    "variance_ratio",
    "Coverage",
    "coverage",
    "effective_rank",
    "class_coverage",
    "report",
    "format_table",
    "plot",
    "plot_comparison",
]
