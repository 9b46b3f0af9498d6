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

Several codebooks: a multi-head :class:`~vqkernels.Quantizer`, a
:class:`~vqkernels.ResidualQuantizer` or a :class:`~vqkernels.GroupedResidualQuantizer` is
reported per *unit* ("head h", "stage q", "group g stage q": what that head / stage
quantizes, against its codebook) and overall (used / dead codes over all codebooks; entropy
the mean of the codebooks' entropies, perplexity its exp; variance ratio pooled:
sum of tr Cov(codes) / sum of tr Cov(the rows each codebook quantizes)). :func:`codebook_health`
reads a quantizer's state alone (EMA usage, duplicates, spread), as ``vqkernels diagnose`` does.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Union

import torch

from .ops import assign, histogram
from .ops._metrics import CENTROID_METRICS, normalized
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


# ---------------------------------------------------------------------------- stages and heads
class Units(NamedTuple):
    """How a quantizer's codebooks are used: one *unit* per head or residual stage.

    ``labels[u]`` names unit ``u`` ("head h", "stage q", "group g stage q"); it quantizes
    against codebook ``codebook_of[u]`` of ``codes [C, K, D]`` (several units share one
    codebook with a shared head codebook or ``shared_codebook=True``). Codebook ``c`` holds
    ``sizes[c]`` codes (per-stage sizes are stored ``K = max`` wide: ``codes[c, :sizes[c]]``).
    """

    kind: str  #: "quantizer" or "residual"
    labels: List[str]
    codebook_of: List[int]
    codes: torch.Tensor  #: [C, K, D], detached
    metric: str
    groups: int = 1
    stages: int = 1
    sizes: Optional[List[int]] = None  #: codes per codebook (default: K for all)

    def size(self, c: int) -> int:
        return int(self.codes.shape[1]) if self.sizes is None else self.sizes[c]

    def unit_codes(self, u: int) -> torch.Tensor:
        """The codes ``[K_u, D]`` of unit ``u``'s codebook (without padding)."""
        c = self.codebook_of[u]
        return self.codes[c, : self.size(c)]


def units_of(module: torch.nn.Module) -> Units:
    """The :class:`Units` of a :class:`vqkernels.Quantizer` (heads) or a (grouped) residual quantizer."""
    from .quantizer import Quantizer
    from .residual import GroupedResidualQuantizer, ResidualQuantizer

    if isinstance(module, (ResidualQuantizer, GroupedResidualQuantizer)):
        G, Q = module.groups, module.num_quantizers
        codes = module.codebook_state.codes().detach()
        grouped = isinstance(module, GroupedResidualQuantizer)
        labels = [f"group {g} stage {q}" if grouped else f"stage {q}" for g in range(G) for q in range(Q)]
        of = [g if module.shared_codebook else g * Q + q for g in range(G) for q in range(Q)]
        per_stage = list(getattr(module, "codebook_sizes", None) or [module.codebook_size] * Q)
        sizes = [per_stage[0]] * G if module.shared_codebook else [per_stage[q] for _ in range(G) for q in range(Q)]
        return Units("residual", labels, of, codes, module.metric, G, Q, sizes)
    if isinstance(module, Quantizer):
        H = int(getattr(module, "heads", 1))
        codes = module.codebook_state.codes().detach()
        if H == 1:
            return Units("quantizer", ["codebook"], [0], codes, module.metric)
        # C is the head axis when the heads have separate codebooks (C = H), else C = 1
        of = [h if codes.shape[0] == H else 0 for h in range(H)]
        return Units("quantizer", [f"head {h}" for h in range(H)], of, codes, module.metric, 1, H)
    raise TypeError(
        f"expected a vqkernels Quantizer, ResidualQuantizer or GroupedResidualQuantizer, got {type(module).__name__}"
    )


def unit_indices(units: Units, indices: torch.Tensor) -> torch.Tensor:
    """A module's ``indices`` output -> ``[U, N]`` (one row per unit): ``[...]`` (one head),
    ``[..., H]`` (heads), ``[..., Q]`` (residual), ``[G, ..., Q]`` (grouped residual)."""
    check_tensor("indices", indices, integer=True)
    U = len(units.labels)
    if U == 1 and units.kind == "quantizer":
        return indices.reshape(1, -1)
    G, last = units.groups, units.stages
    if indices.dim() < 1 or indices.shape[-1] != last or (G > 1 and (indices.dim() < 2 or indices.shape[0] != G)):
        want = f"[groups={G}, ..., num_quantizers={last}]" if G > 1 else f"[..., {'heads' if units.kind == 'quantizer' else 'num_quantizers'}={last}]"
        raise ValueError(f"indices has shape {tuple(indices.shape)}; expected {want}")
    return indices.reshape(G, -1, last).permute(0, 2, 1).reshape(U, -1)


@torch.no_grad()
def unit_inputs(module: torch.nn.Module, embeddings: torch.Tensor, indices: Optional[torch.Tensor] = None,
                *, backend: Optional[str] = None):
    """What each unit quantizes, for module inputs ``embeddings [..., dim]``: ``(inputs [U, N, D],
    indices [U, N])``. Heads: the head's slice of the codebook space. Residual stages: the
    running residual (normalised for cosine) after the earlier stages' codes are subtracted,
    as the module's forward computes it. ``indices`` (the module's output) are used when given,
    else each unit's nearest codes by :func:`vqkernels.assign`."""
    units = units_of(module)
    dim = module.dim
    check_tensor("embeddings", embeddings, floating=True, min_dim=1)
    if embeddings.shape[-1] != dim:
        raise ValueError(
            f"embeddings has {embeddings.shape[-1]} features (shape {tuple(embeddings.shape)}); expected the "
            f"quantizer's input size dim={dim} (channel-last)"
        )
    flat = embeddings.detach().reshape(-1, dim).to(units.codes.device)
    given = None if indices is None else unit_indices(units, indices.to(flat.device))
    if given is not None and given.shape[1] != flat.shape[0]:
        raise ValueError(f"indices give {given.shape[1]} rows but embeddings has {flat.shape[0]}; expected one code per embedding")
    codes, metric = units.codes.float(), units.metric
    U, D = len(units.labels), codes.shape[-1]
    inputs = flat.new_empty((U, flat.shape[0], D), dtype=torch.float32)
    out_idx = torch.empty((U, flat.shape[0]), dtype=torch.int64, device=flat.device)

    def nearest(u, rows):
        return given[u].long() if given is not None else assign(rows, units.unit_codes(u).float(), metric, backend=backend).indices

    if units.kind == "quantizer":
        z = module.to_codebook_space(flat).float().reshape(flat.shape[0], U, D)
        for u in range(U):
            inputs[u], out_idx[u] = z[:, u], nearest(u, z[:, u])
        return inputs, out_idx
    G, Q = units.groups, units.stages
    xg = flat.reshape(-1, G, dim // G)
    for g in range(G):
        residual = module.project_in[g](xg[:, g].to(units.codes.dtype)).float()
        for q in range(Q):
            u = g * Q + q
            stage_in = normalized(residual, metric)
            idx = nearest(u, stage_in)
            picked = codes[units.codebook_of[u]][idx.clamp_min(0)] * (idx >= 0).unsqueeze(-1)
            inputs[u], out_idx[u] = stage_in, idx
            residual = residual - picked
    return inputs, out_idx


def _unit_usage(counts: List[torch.Tensor]) -> Usage:
    """Usage over several codebooks (``counts[c]``: ``[K_c]``): used/dead codes over all their
    codes; entropy the mean of the codebooks' entropies, perplexity its exp, normalised
    perplexity ``exp(mean(H_c - log K_c))`` (so one codebook gives exactly :func:`usage_from_counts`)."""
    per = [usage_from_counts(c) for c in counts]
    C, codes = len(per), sum(p.codebook_size for p in per)
    used = sum(p.used_codes for p in per)
    h = sum(p.entropy for p in per) / C
    total = sum(p.total for p in per)
    ppl = math.exp(h) if total > 0 else 0.0
    norm = math.exp(h - sum(math.log(p.codebook_size) for p in per) / C) if total > 0 else 0.0
    return Usage(codes, total, used, codes - used, used / codes, h, ppl, norm)


def _by_codebook(units: Units, counts: torch.Tensor) -> List[torch.Tensor]:
    """Unit counts ``[U, K]`` -> counts per codebook ``[K_c]`` (units sharing a codebook added)."""
    C = units.codes.shape[0]
    out = torch.zeros((C, counts.shape[1]), dtype=counts.dtype, device=counts.device)
    out.index_add_(0, torch.tensor(units.codebook_of, device=counts.device), counts)
    return [out[c, : units.size(c)] for c in range(C)]


class CodebookMonitor:
    """Accumulates code usage over a stream of batches (counts stay on the device, no syncs).

    Per-batch perplexity is bounded by the batch size (a batch of 256 rows cannot show a
    perplexity above 256 whatever K is), which is why users see it move with the batch
    size. The monitor reports usage over everything it has seen, plus the mean per-batch
    perplexity for comparison.

    Args:
        codebook_size: number of codes ``K``, or the quantizer itself (a multi-head
            :class:`~vqkernels.Quantizer`, :class:`~vqkernels.ResidualQuantizer` or
            :class:`~vqkernels.GroupedResidualQuantizer`): then usage is kept per head /
            stage (``counts [U, K]``, :meth:`unit_usage`) and :meth:`usage` is the overall one.
        device: where the counts live (default: the first batch's device).

    Example:
        >>> monitor = CodebookMonitor(quantizer)  # or CodebookMonitor(512)
        >>> handle = monitor.attach(quantizer)  # or call monitor.update(indices) yourself
        >>> ...  # train
        >>> monitor.usage().perplexity, monitor.unit_usage()["stage 1"].dead_codes
    """

    def __init__(self, codebook_size: Union[int, torch.nn.Module], device: Optional[Union[str, torch.device]] = None):
        self.units: Optional[Units] = None
        if isinstance(codebook_size, torch.nn.Module):
            self.units = units_of(codebook_size)
            codebook_size = int(self.units.codes.shape[1])
        check_codebook_size("codebook_size", codebook_size)
        self.codebook_size = codebook_size
        self.labels = ["codebook"] if self.units is None else list(self.units.labels)
        self.device = None if device is None else torch.device(device)
        self.reset()

    @property
    def _per_unit(self) -> bool:
        return self.units is not None and (len(self.labels) > 1 or self.units.kind == "residual")

    def reset(self) -> None:
        shape = (len(self.labels), self.codebook_size) if self._per_unit else (self.codebook_size,)
        self.counts = None if self.device is None else torch.zeros(shape, dtype=torch.int64, device=self.device)
        self.batches = 0
        self._batch_perplexity_sum = None

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> None:
        """Add one batch of indices (negative = masked) in the module's layout: ``[...]``,
        ``[..., heads]``, ``[..., Q]`` or ``[G, ..., Q]``."""
        indices = indices.detach()
        if self._per_unit:
            batch = histogram(unit_indices(self.units, indices), self.codebook_size, codebook_axis=True)
        else:
            batch = histogram(indices, self.codebook_size)
        if self.counts is None:
            self.counts = torch.zeros_like(batch)
        self.counts += batch.to(self.counts.device)
        ppl = perplexity(batch)  # [U] per unit, or a scalar
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

    def _counts(self) -> torch.Tensor:
        if self.counts is None:
            shape = (len(self.labels), self.codebook_size) if self._per_unit else (self.codebook_size,)
            return torch.zeros(shape, dtype=torch.int64)
        return self.counts

    def codebook_counts(self) -> List[torch.Tensor]:
        """Counts per codebook, ``[K_c]`` each (units sharing a codebook added together)."""
        counts = self._counts()
        if not self._per_unit:
            return [counts]
        return _by_codebook(self.units, counts)

    def usage(self) -> Usage:
        """Usage over every batch seen since the last reset (overall, over all codebooks)."""
        if not self._per_unit:
            return usage_from_counts(self._counts())
        return _unit_usage(self.codebook_counts())

    def unit_usage(self) -> Dict[str, Usage]:
        """Usage per head / stage (one entry, ``"codebook"``, for a single codebook)."""
        counts = self._counts().reshape(len(self.labels), -1)
        if not self._per_unit:
            return {self.labels[0]: usage_from_counts(counts[0])}
        units = self.units
        return {label: usage_from_counts(counts[u, : units.size(units.codebook_of[u])]) for u, label in enumerate(self.labels)}

    def mean_batch_perplexity(self) -> float:
        """Mean of the per-batch perplexities (biased low by the batch size; for comparison);
        with several units, the mean over units too."""
        return 0.0 if not self.batches else float(torch.as_tensor(self._batch_perplexity_sum).mean()) / self.batches

    def unit_mean_batch_perplexity(self) -> Dict[str, float]:
        if not self.batches:
            return {label: 0.0 for label in self.labels}
        sums = torch.as_tensor(self._batch_perplexity_sum).reshape(-1).expand(len(self.labels))
        return {label: float(sums[u]) / self.batches for u, label in enumerate(self.labels)}

    def summary(self) -> Dict[str, Any]:
        u = self.usage()._asdict()
        u["batches"] = self.batches
        u["mean_batch_perplexity"] = self.mean_batch_perplexity()
        if self._per_unit:
            ppl = self.unit_mean_batch_perplexity()
            u["units"] = {k: dict(v._asdict(), mean_batch_perplexity=ppl[k]) for k, v in self.unit_usage().items()}
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


def _is_multi(module) -> bool:
    """A module whose usage is reported per head / stage (several heads, or a residual stack)."""
    if not isinstance(module, torch.nn.Module) or not hasattr(module, "codebook_state"):
        return False
    units = units_of(module)
    return units.kind == "residual" or len(units.labels) > 1


def _report_units(embeddings, module, indices, labels, monitor, extra, backend) -> Dict[str, Any]:
    """:func:`report` of a multi-head or residual module: per unit, and overall."""
    units = units_of(module)
    inputs, idx = unit_inputs(module, embeddings, indices, backend=backend)
    U, K = len(units.labels), units.codes.shape[1]
    codes, metric = units.codes.float(), units.metric
    if monitor is not None:
        if monitor.units is None or monitor.labels != units.labels or monitor.codebook_size != K:
            raise ValueError(
                f"monitor counts {monitor.labels} over K={monitor.codebook_size}; expected one made for this module "
                f"(CodebookMonitor(module): {units.labels} over K={K})"
            )
        counts, batch_ppl = monitor._counts().reshape(U, K), monitor.unit_mean_batch_perplexity()
    else:
        counts, batch_ppl = histogram(idx, K, codebook_axis=True), None
    out: Dict[str, Any] = dict(extra or {})
    per_unit: Dict[str, Dict[str, Any]] = {}
    for u, label in enumerate(units.labels):
        c = units.unit_codes(u).float()
        Ku = c.shape[0]
        r: Dict[str, Any] = usage_from_counts(counts[u, :Ku])._asdict()
        if batch_ppl is not None:
            r["mean_batch_perplexity"] = batch_ppl[label]
        r["variance_ratio"] = variance_ratio(c, inputs[u])
        cov = coverage(inputs[u], c, metric, backend=backend)
        r["embedding_to_code"], r["code_to_embedding"] = cov.embedding_to_code, cov.code_to_embedding
        r["effective_rank_codebook"] = effective_rank(c)
        if labels is not None:
            cc = class_coverage(idx[u], labels, Ku)
            r["classes_covered"] = f"{cc['classes_covered']} / {cc['classes']}"
        per_unit[label] = r
    C = codes.shape[0]
    out.update(_unit_usage(_by_codebook(units, counts))._asdict())
    if batch_ppl is not None:
        out["mean_batch_perplexity"] = monitor.mean_batch_perplexity()
    # pooled over codebooks: sum of tr Cov(codes) / sum of tr Cov(the rows each codebook quantizes)
    num = den = 0.0
    for c in range(C):
        rows = inputs[[u for u in range(U) if units.codebook_of[u] == c]].reshape(-1, inputs.shape[-1])
        num, den = num + total_variance(codes[c, : units.size(c)]), den + total_variance(rows)
    out["variance_ratio"] = num / den if den > 0 else float("nan")
    out["effective_rank_embeddings"] = effective_rank(embeddings.detach().reshape(-1, embeddings.shape[-1]))
    out["units"] = per_unit
    return out


_UNIT_COLUMNS = (
    ("utilisation", "util", "{:.3f}"),
    ("used_codes", "used", "{:d}"),
    ("dead_codes", "dead", "{:d}"),
    ("perplexity", "ppl", "{:.1f}"),
    ("normalised_perplexity", "ppl/K", "{:.3f}"),
    ("mean_batch_perplexity", "batch ppl", "{:.1f}"),
    ("variance_ratio", "var ratio", "{:.3f}"),
    ("embedding_to_code", "emb->code", "{:.3f}"),
    ("code_to_embedding", "code->emb", "{:.3f}"),
    ("effective_rank_codebook", "rank(C)", "{:.2f}"),
    ("classes_covered", "classes", "{}"),
)


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and fmt == "{:d}":
        return str(int(value))
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def format_unit_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per head / stage of each report (``report(...)["units"]``) and an ``overall``
    row per report; columns: usage, variance ratio, coverage, codebook rank, classes covered."""
    rows = []
    for name, r in reports.items():
        for label, unit in dict(r.get("units") or {}).items():
            rows.append((name, label, unit))
        rows.append((name, "overall", r))
    columns = [c for c in _UNIT_COLUMNS if any(c[0] in r for _, _, r in rows)]
    named = any(reports)  # one unnamed report: no run column
    cells = [([name] if named else []) + [label] + [_cell(r.get(key), fmt) for key, _, fmt in columns] for name, label, r in rows]
    header = (["run"] if named else []) + ["unit"] + [head for _, head, _ in columns]
    widths = [max(len(header[i]), *(len(c[i]) for c in cells)) for i in range(len(header))]
    left = 2 if named else 1

    def line(values):
        return "   ".join(f"{v:<{w}}" if i < left else f"{v:>{w}}" for i, (v, w) in enumerate(zip(values, widths)))

    out = [line(header), "-" * len(line(header))]
    out += [line(c) for c in cells]
    return "\n".join(out)


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
            input projection are used), or a multi-head Quantizer / ResidualQuantizer /
            GroupedResidualQuantizer (reported per head / stage, see the module docstring).
        indices: the embeddings' codes ``[...]`` (a module's ``indices`` output: ``[..., heads]``,
            ``[..., Q]``, ``[G, ..., Q]``); default: nearest codes by :func:`vqkernels.assign`
            (stage by stage on the running residual for a residual stack).
        labels: optional class label per embedding: adds per-class coverage.
        monitor: a :class:`CodebookMonitor`: usage comes from its stream instead of ``indices``.
        metric: ``"l2"`` or ``"cosine"`` (ignored when ``codebook`` is a Quantizer).
        extra: more entries to put in the dict and the table (e.g. ``recon_mse``).
        print_table: print the table.

    Returns:
        a dict with the keys of :class:`Usage`, ``variance_ratio``, ``embedding_to_code``,
        ``code_to_embedding`` (and both ``*_relative``: divided by the embeddings' RMS spread
        ``sqrt(tr Cov(E))``, l2 only), ``effective_rank_embeddings``, ``effective_rank_codebook`` and,
        with labels, ``classes``, ``classes_covered``, ``per_class``. For a module with several
        units: the overall usage keys, ``variance_ratio``, ``effective_rank_embeddings`` (of the
        module's inputs) and ``units`` ``{label: {usage keys, variance_ratio, embedding_to_code,
        code_to_embedding, effective_rank_codebook[, classes_covered]}}``; the table is printed
        per unit too (:func:`format_unit_table`).

    Example:
        >>> stats = report(encoder(x), quantizer, labels=y)
    """
    if _is_multi(codebook):
        out = _report_units(embeddings, codebook, indices, labels, monitor, extra, backend)
        if print_table:
            print(format_table({title or "overall": out}))
            print(format_unit_table({title or "": out}))
        return out
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


# ---------------------------------------------------------------------------- codebook only
def codebook_health(module: torch.nn.Module, *, statistics: bool = True, dead_threshold: float = 1.0) -> Dict[str, Dict[str, Any]]:
    """Health of each codebook of a quantizer from its state alone (no embeddings needed).

    One entry per codebook (``C`` of them: per head / stage, or one shared by several):
    ``codebook_size``, ``duplicate_codes`` (codes equal to another), ``codebook_variance``
    (tr Cov of the codes), ``effective_rank_codebook`` and, when ``statistics`` (the state
    holds EMA cluster sizes, which count rows per code per step), ``ema_used_codes`` /
    ``ema_dead_codes`` (cluster size >= / < ``dead_threshold``), ``ema_perplexity`` (of the
    cluster sizes) and its ``/ K``.
    """
    if isinstance(dead_threshold, bool) or not isinstance(dead_threshold, (int, float)) or not dead_threshold >= 0:
        raise ValueError(f"dead_threshold must be a number >= 0, got {dead_threshold!r}")
    units = units_of(module)
    codes = units.codes.float()
    C, K, _ = codes.shape
    sizes = module.codebook_state.cluster_size.detach().reshape(C, K).to(torch.float64)
    out: Dict[str, Dict[str, Any]] = {}
    for c in range(C):
        K = units.size(c)
        users = [label for u, label in enumerate(units.labels) if units.codebook_of[u] == c]
        if len(users) == 1:
            name = users[0]
        elif units.kind == "residual":
            name = f"group {c} (stages share it)" if units.groups > 1 else "codebook (stages share it)"
        else:
            name = "codebook (heads share it)"
        r: Dict[str, Any] = {"codebook_size": K}
        if statistics:
            alive = sizes[c, :K] >= dead_threshold
            r["ema_used_codes"], r["ema_dead_codes"] = int(alive.sum()), K - int(alive.sum())
            r["ema_perplexity"] = float(perplexity(sizes[c, :K].clamp_min(0)))
            r["ema_normalised_perplexity"] = r["ema_perplexity"] / K
        r["duplicate_codes"] = K - int(torch.unique(codes[c, :K], dim=0).shape[0])
        r["codebook_variance"] = total_variance(codes[c, :K])
        r["effective_rank_codebook"] = effective_rank(codes[c, :K])
        out[name] = r
    return out


_HEALTH_COLUMNS = (
    ("codebook_size", "K", "{:d}"),
    ("ema_used_codes", "EMA used", "{:d}"),
    ("ema_dead_codes", "EMA dead", "{:d}"),
    ("ema_perplexity", "EMA ppl", "{:.1f}"),
    ("ema_normalised_perplexity", "EMA ppl/K", "{:.3f}"),
    ("duplicate_codes", "duplicates", "{:d}"),
    ("codebook_variance", "tr Cov(C)", "{:.4g}"),
    ("effective_rank_codebook", "rank(C)", "{:.2f}"),
)


def format_health_table(health: Mapping[str, Mapping[str, Any]]) -> str:
    """The table of :func:`codebook_health`: one row per codebook."""
    columns = [c for c in _HEALTH_COLUMNS if any(c[0] in r for r in health.values())]
    header = ["codebook"] + [head for _, head, _ in columns]
    cells = [[name] + [_cell(r.get(key), fmt) for key, _, fmt in columns] for name, r in health.items()]
    widths = [max(len(header[i]), *(len(c[i]) for c in cells)) for i in range(len(header))]

    def line(values):
        return "   ".join(f"{v:<{w}}" if i == 0 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([line(header), "-" * len(line(header))] + [line(c) for c in cells])


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
    """One row per run (usage histogram | PCA), e.g. early vs deferred quantization; a run
    whose ``codebook`` is a multi-head or residual quantizer gets one row per head / stage
    (its usage panel, and the PCA of what that head / stage quantizes with its codes).

    ``runs`` maps a name to a dict with ``embeddings``, ``codebook`` and optionally
    ``indices``, ``counts``, ``labels``, ``metric`` (as for :func:`plot`; for a module with
    several units, ``indices`` in its output layout and ``counts [U, K]`` as a
    :class:`CodebookMonitor` of it keeps).
    """
    Figure, FigureCanvasAgg = _matplotlib()
    panels = []
    for name, run in runs.items():
        counts = run.get("counts")
        if _is_multi(run["codebook"]):
            units = units_of(run["codebook"])
            inputs, idx = unit_inputs(run["codebook"], run["embeddings"], run.get("indices"))
            K = units.codes.shape[1]
            if counts is None:
                counts = histogram(idx, K, codebook_axis=True)
            counts = counts.reshape(len(units.labels), K)
            for u, label in enumerate(units.labels):
                codes = units.unit_codes(u).float()
                panels.append((f"{name}, {label}" if name else label, inputs[u], codes, counts[u, : codes.shape[0]], run.get("labels")))
            continue
        codes, emb, metric = _codebook_and_space(run["codebook"], run["embeddings"], run.get("metric", "l2"))
        emb = _rows("embeddings", emb).float()
        codes = _rows("codebook", codes).float()
        if counts is None:
            idx = run.get("indices")
            if idx is None:
                idx = assign(emb, codes, metric).indices
            counts = histogram(idx, codes.shape[0])
        panels.append((name, emb, codes, counts, run.get("labels")))
    fig = Figure(figsize=(11, 4.2 * len(panels)), layout="constrained")  # leaves room for the suptitle
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 2, squeeze=False)
    for row, (name, emb, codes, counts, labels) in enumerate(panels):
        _draw(axes[row][0], axes[row][1], emb, codes, counts, labels, name, max_points)
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
    "Units",
    "units_of",
    "unit_indices",
    "unit_inputs",
    "format_unit_table",
    "codebook_health",
    "format_health_table",
]
