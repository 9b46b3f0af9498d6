"""``vqkernels demo``: early vs deferred quantization on synthetic data, on a laptop CPU.

Reproduces the synthetic finding of "Early Quantization Shrinks Codebook" (Zhao et al.,
2026). Data: a mixture of equal-size, well-separated Gaussian classes. Model: a small MLP
VQ-VAE whose codebook is much larger than the number of classes. Two arms, trained with
the same seed, data order and step budget:

* **early**: the codebook is k-means-initialised from the *untrained* encoder's outputs
  at step 0 and the model is a VQ-VAE from then on;
* **deferred**: the same model with ``deferred_steps`` set: a plain autoencoder first,
  then k-means on a reservoir of *mature* embeddings, then VQ-VAE.

Everything printed is measured in the run: reconstruction MSE through the quantizer, code
usage over the held-out set, variance ratio, coverage distances, effective ranks, classes
covered. ``--capacity-sweep`` trains encoders of increasing width instead and reports the
embeddings' effective rank (the paper's second finding: a narrow encoder collapses them).
``--residual`` swaps the quantizer for a :class:`~vqkernels.ResidualQuantizer` (``--stages``
stages, 4 by default) and reports every diagnostic per stage: the early arm k-means-initialises
the stages one after another on the first training batch of the untrained encoder, the
deferred arm on the reservoir of mature embeddings at the switch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import diagnostics
from .quantizer import Quantizer
from .residual import ResidualQuantizer


@dataclass
class DemoConfig:
    steps: int = 1000
    codebook_size: int = 256
    seed: int = 0
    classes: int = 8
    input_dim: int = 32
    latent_dim: int = 16
    hidden: int = 64
    batch_size: int = 256
    train_rows: int = 16384
    eval_rows: int = 4096
    separation: float = 2.0  # std of the class means per input dimension (classes have unit std)
    deferred_fraction: float = 0.5  # share of the step budget spent in the continuous phase
    lr: float = 2e-3
    commitment_weight: float = 0.25
    decay: float = 0.95
    device: str = "cpu"
    residual: bool = False  # a ResidualQuantizer of `stages` stages instead of a Quantizer (--residual)
    stages: int = 4


def make_data(cfg: DemoConfig, generator: torch.Generator):
    """Equal-size Gaussian classes: train/eval rows ``[N, input_dim]`` and labels ``[N]``."""
    means = torch.randn(cfg.classes, cfg.input_dim, generator=generator) * cfg.separation

    def sample(n):
        labels = torch.arange(n) % cfg.classes
        labels = labels[torch.randperm(n, generator=generator)]
        x = means[labels] + torch.randn(n, cfg.input_dim, generator=generator)
        return x, labels

    return sample(cfg.train_rows), sample(cfg.eval_rows)


def mlp(sizes: List[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VQVAE(nn.Module):
    def __init__(self, cfg: DemoConfig, deferred_steps: int, hidden: Optional[int] = None):
        super().__init__()
        h = cfg.hidden if hidden is None else hidden
        self.encoder = mlp([cfg.input_dim, h, h, cfg.latent_dim])
        self.decoder = mlp([cfg.latent_dim, h, h, cfg.input_dim])
        vq_class = (lambda dim, K, **kw: ResidualQuantizer(dim, cfg.stages, K, **kw)) if cfg.residual else Quantizer
        self.vq = vq_class(
            cfg.latent_dim,
            cfg.codebook_size,
            init="kmeans",
            decay=cfg.decay,
            commitment_weight=cfg.commitment_weight,
            deferred_steps=deferred_steps,
        )

    def forward(self, x):
        z = self.encoder(x)
        q, indices, vq_loss = self.vq(z)
        return self.decoder(q), z, indices, vq_loss.sum()  # a residual stack returns one loss per stage


def train_arm(cfg: DemoConfig, data, deferred_steps: int, progress=None, hidden: Optional[int] = None) -> Dict:
    """Train one arm; returns its model, eval embeddings/indices and diagnostics."""
    (x_train, _), (x_eval, y_eval) = data
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)  # same initial weights, k-means seeds and batch order in both arms
    model = VQVAE(cfg, deferred_steps, hidden).to(device)
    x_train, x_eval = x_train.to(device), x_eval.to(device)
    opt = _adam(model.parameters(), cfg.lr)
    order = torch.Generator().manual_seed(cfg.seed + 1)
    n = x_train.shape[0]
    perm = torch.randperm(n, generator=order)
    pos = 0
    model.train()
    if deferred_steps == 0 and not cfg.residual:
        # early quantization: k-means on the untrained encoder's outputs, before any update
        # (a residual stack does the same stage by stage on its first training batch: init="kmeans")
        with torch.no_grad():
            sample = model.encoder(x_train[perm[: 4 * cfg.codebook_size].to(device)])
        model.vq.init_codebook(sample, batch_rows=cfg.batch_size)
    for step in range(cfg.steps):
        if pos + cfg.batch_size > n:
            perm, pos = torch.randperm(n, generator=order), 0
        xb = x_train[perm[pos : pos + cfg.batch_size].to(device)]
        pos += cfg.batch_size
        recon, _, _, vq_loss = model(xb)
        loss = F.mse_loss(recon, xb) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step, float(loss.detach()) if step % 50 == 0 else None)
    return evaluate(cfg, model, x_eval, y_eval)


def _adam(params, lr):
    params = list(params)
    # the fused kernel (one call for every tensor) matters here: the model is so small that
    # the per-tensor Python loop of the default Adam would cost as much as the VQ step
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, foreach=True)


@torch.no_grad()
def evaluate(cfg: DemoConfig, model: VQVAE, x_eval, y_eval) -> Dict:
    model.eval()
    monitor = diagnostics.CodebookMonitor(model.vq if cfg.residual else cfg.codebook_size)
    recon_err, embeddings, indices = 0.0, [], []
    for start in range(0, x_eval.shape[0], cfg.batch_size):
        xb = x_eval[start : start + cfg.batch_size]
        recon, z, idx, _ = model(xb)
        recon_err += float(F.mse_loss(recon, xb, reduction="sum"))
        monitor.update(idx)
        embeddings.append(z)
        indices.append(idx)
    emb, idx = torch.cat(embeddings), torch.cat(indices)
    stats = diagnostics.report(
        emb,
        model.vq,
        indices=idx,
        labels=y_eval,
        monitor=monitor,
        extra={"recon_mse": recon_err / x_eval.numel()},
        print_table=False,
    )
    return {"model": model, "embeddings": emb.cpu(), "indices": idx.cpu(), "labels": y_eval.cpu(), "report": stats,
            "counts": monitor.counts.cpu()}


class _Progress:
    """tqdm when installed, else a one-line counter on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled, self.bar = total, desc, enabled, None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", leave=True, file=sys.stderr)
        except ImportError:
            self.bar = None

    def __call__(self, step: int, loss: Optional[float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")
        elif step % 100 == 0 or step == self.total - 1:
            print(f"\r{self.desc}: {step + 1}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def run_comparison(cfg: DemoConfig, progress: bool = True) -> Dict[str, Dict]:
    """Train both arms; returns ``{"early": result, "deferred": result}``."""
    data = make_data(cfg, torch.Generator().manual_seed(cfg.seed))
    deferred_steps = int(round(cfg.steps * cfg.deferred_fraction))
    results = {}
    for name, t in (("early", 0), ("deferred", deferred_steps)):
        bar = _Progress(cfg.steps, f"{name:>8} quantization", enabled=progress)
        results[name] = train_arm(cfg, data, t, bar)
        bar.close()
    return results


def run_capacity_sweep(cfg: DemoConfig, widths=(2, 4, 8, 32, 128), progress: bool = True) -> Dict[int, Dict]:
    """Deferred VQ-VAEs with encoders/decoders of increasing hidden width."""
    data = make_data(cfg, torch.Generator().manual_seed(cfg.seed))
    deferred_steps = int(round(cfg.steps * cfg.deferred_fraction))
    results = {}
    for w in widths:
        bar = _Progress(cfg.steps, f"width {w:>4}", enabled=progress)
        results[w] = train_arm(cfg, data, deferred_steps, bar, hidden=w)
        bar.close()
    return results


# ---------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vqkernels demo``."""
    d = DemoConfig()
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per arm (default {d.steps}; 200 with --quick)")
    parser.add_argument("--codebook-size", type=int, default=None, help=f"codes K (default {d.codebook_size}; 64 with --quick)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of data, weights and batch order (default 0)")
    parser.add_argument("--out", default="./vqkernels_out", help="directory for the PNG (default ./vqkernels_out)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    parser.add_argument("--capacity-sweep", action="store_true", help="train encoders of increasing width and report effective ranks")
    parser.add_argument("--residual", action="store_true", help="a residual VQ-VAE: early vs deferred, every diagnostic per stage")
    parser.add_argument("--stages", type=int, default=None, help="residual stages with --residual (default 4)")
    parser.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds (for tests)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads during the demo (default 1: the model is tiny)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = DemoConfig(seed=args.seed, device=args.device)
    if getattr(args, "quick", False):
        cfg.steps, cfg.codebook_size, cfg.train_rows, cfg.eval_rows = 200, 64, 2048, 1024
    if args.steps is not None:
        cfg.steps = args.steps
    if getattr(args, "residual", False):
        cfg.residual = True
        if getattr(args, "stages", None) is not None:
            cfg.stages = args.stages
        if args.codebook_size is None:  # the early arm initialises on one batch: K <= batch size
            cfg.codebook_size = 16 if getattr(args, "quick", False) else 64
    if args.codebook_size is not None:
        cfg.codebook_size = args.codebook_size
    return cfg


def _check(cfg: DemoConfig) -> Optional[str]:
    if cfg.residual and cfg.stages < 1:
        return f"--stages must be >= 1, got {cfg.stages}"
    if cfg.steps < 2:
        return f"--steps must be >= 2, got {cfg.steps}"
    if cfg.codebook_size < 2:
        return f"--codebook-size must be >= 2, got {cfg.codebook_size}"
    if cfg.residual and cfg.codebook_size > cfg.batch_size:
        return (f"--codebook-size {cfg.codebook_size} is too large for --residual: the early arm k-means-initialises "
                f"every stage on its first batch of {cfg.batch_size} rows (expected K <= {cfg.batch_size})")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda was requested but no CUDA device is available"
    reservoir = 4 * cfg.codebook_size
    seen = int(round(cfg.steps * cfg.deferred_fraction)) * cfg.batch_size
    if seen < cfg.codebook_size or cfg.train_rows < reservoir:
        return (f"--codebook-size {cfg.codebook_size} is too large for this run: k-means needs K rows "
                f"({seen} rows seen in the continuous phase, {cfg.train_rows} training rows)")
    return None


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vqkernels demo``; returns the exit code."""
    cfg = config_from_args(args)
    problem = _check(cfg)
    if getattr(args, "stages", None) is not None and not cfg.residual:
        problem = "--stages needs --residual"
    if problem:
        print(f"vqkernels demo: {problem}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    # The model is tiny: one thread per op is fastest (more threads only add synchronisation,
    # and oversubscribe a busy laptop). Restored afterwards, as run() may be called in-process.
    torch.set_num_threads(max(1, getattr(args, "threads", None) or 1))
    try:
        if getattr(args, "capacity_sweep", False):
            return _run_sweep(cfg, args)
        return _run_comparison(cfg, args)
    finally:
        torch.set_num_threads(threads)


def _run_comparison(cfg: DemoConfig, args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    results = run_comparison(cfg, progress=not getattr(args, "no_progress", False))
    reports = {name: r["report"] for name, r in results.items()}
    deferred_steps = int(round(cfg.steps * cfg.deferred_fraction))
    print()
    model = f"residual MLP VQ-VAE ({cfg.stages} stages, " if cfg.residual else "MLP VQ-VAE ("
    print(
        f"Early vs deferred quantization: {cfg.classes} Gaussian classes in {cfg.input_dim}-D, {model}"
        f"latent {cfg.latent_dim}-D), K={cfg.codebook_size}, {cfg.steps} steps per arm "
        f"(deferred: {deferred_steps} continuous + {cfg.steps - deferred_steps} quantized), seed {cfg.seed}"
    )
    print(f"Measured on {cfg.eval_rows} held-out rows{' (overall: all stages together)' if cfg.residual else ''}:")
    print(diagnostics.format_table(reports))
    if cfg.residual:
        print("Per stage (each stage's usage, and its codes against the residual it quantizes):")
        print(diagnostics.format_unit_table(reports))
    early, deferred = reports["early"], reports["deferred"]
    if deferred["utilisation"] > early["utilisation"]:
        verdict = "deferred quantization uses more of the codebook"
    else:
        verdict = "no utilisation gain from deferring in this run"
    print(f"-> utilisation {early['utilisation']:.3f} (early) vs {deferred['utilisation']:.3f} (deferred): {verdict}")
    if not getattr(args, "no_plot", False):
        path = _plot(results, args.out, "residual_early_vs_deferred.png" if cfg.residual else "early_vs_deferred.png", cfg)
        if path:
            print(f"plot: {path}")
    print(f"time: {time.perf_counter() - t0:.1f} s")
    return 0


def _run_sweep(cfg: DemoConfig, args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    results = run_capacity_sweep(cfg, progress=not getattr(args, "no_progress", False))
    print()
    print(
        f"Encoder capacity sweep (deferred quantization, K={cfg.codebook_size}, latent {cfg.latent_dim}-D, "
        f"{cfg.steps} steps, seed {cfg.seed}):"
    )
    print(diagnostics.format_table({f"width {w}": r["report"] for w, r in results.items()}))
    if not getattr(args, "no_plot", False):
        runs = {f"width {w}": r for w, r in results.items()}
        path = _plot(runs, args.out, "capacity_sweep.png", cfg)
        if path:
            print(f"plot: {path}")
    print(f"time: {time.perf_counter() - t0:.1f} s")
    return 0


def _plot(results, out_dir, filename, cfg) -> Optional[str]:
    try:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, filename)
        runs = {
            name: dict(embeddings=r["embeddings"], counts=r["counts"], labels=r["labels"],
                       # a residual stack is drawn per stage: the module tells the plot its stages
                       codebook=r["model"].vq.cpu() if cfg.residual else r["model"].vq.codebook.detach().cpu(),
                       indices=r["indices"] if cfg.residual else None)
            for name, r in results.items()
        }
        stages = f"residual, {cfg.stages} stages, " if cfg.residual else ""
        return diagnostics.plot_comparison(runs, path, suptitle=f"{stages}K={cfg.codebook_size}, seed {cfg.seed}")
    except ImportError as exc:
        print(f"(no plot: {exc})", file=sys.stderr)
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqkernels demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
