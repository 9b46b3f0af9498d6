"""``vqkernels diagnose CHECKPOINT [--embeddings FILE] [--plot PNG]``: codebook health of a saved quantizer.

Reads a state dict (``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` through
``torch.load(weights_only=True)``, or ``.safetensors``), finds the quantizers in it (any
prefix; a whole model's or a Lightning checkpoint's nested ``state_dict`` is fine), builds
each through the package's own loaders (``Quantizer.from_pretrained_state``,
``ResidualQuantizer.from_pretrained_state``, ...) and prints the codebook-health table per
codebook (head / stage). With ``--embeddings`` (the quantizer's inputs ``[N, dim]`` as
``.npy`` or ``.pt``) it also prints the usage, shrinkage and coverage report per head /
stage and writes the PNG.

Files are never unpickled beyond tensors and plain containers: a pickle that asks for any
other object (a custom class, a ``__reduce__`` call) is refused with an error.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
from typing import Any, Dict, List, Mapping, NamedTuple, Optional

import torch

from . import diagnostics
from .checkpoints import LAYOUTS, detect_layout
from .errors import UnknownLayoutError

# formats understood: suffix -> reader
STATE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
EMBEDDING_SUFFIXES = (".npy", ".pt", ".pth")

KINDS = {
    "vqkernels-residual": "vqkernels ResidualQuantizer / GroupedResidualQuantizer (codebook_state.embed [C, K, D])",
    "residual-vq": "residual stack (layers.<q>._codebook.embed: vector-quantize-pytorch ResidualVQ; "
    "EnCodec's ResidualVectorQuantization when ResidualQuantizer.from_pretrained_state reads it)",
    "grouped-residual-vq": "vector-quantize-pytorch GroupedResidualVQ (rvqs.<g>.layers.<q>._codebook.embed)",
    "dac": "DAC residual quantizer (quantizers.<q>.codebook.weight, in_proj/out_proj with weight norm; "
    "when ResidualQuantizer.from_pretrained_state reads it)",
    "quantizer": "one quantizer: " + "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items()),
}


class DiagnoseError(ValueError):
    """A file ``vqkernels diagnose`` cannot read or use (the message says what was found and expected)."""


# ---------------------------------------------------------------------------- safe loading
def _torch_load(path: str, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiagnoseError(
            f"refused to load {what} {path!r}: it asks the unpickler for Python objects other than tensors and plain "
            f"containers, which vqkernels never loads (torch.load(weights_only=True) stopped: {first}). If you trust "
            "the file, load it yourself and re-save only tensors: torch.save(model.state_dict(), 'state.pt')"
        ) from None
    except FileNotFoundError:
        raise DiagnoseError(f"{what} {path!r} does not exist") from None
    except Exception as exc:  # a corrupt or foreign file fails anywhere inside the unpickler (even IndexError)
        raise DiagnoseError(
            f"cannot read {what} {path!r} as a PyTorch file ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
            f"expected a torch.save file of tensors, or a .safetensors file"
        ) from None


def _safetensors_load(path: str) -> Dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise DiagnoseError(
            f"{path!r} is a .safetensors file, which needs the safetensors package: pip install safetensors"
        ) from None
    if not os.path.exists(path):
        raise DiagnoseError(f"checkpoint {path!r} does not exist")
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for a bad header
        raise DiagnoseError(f"cannot read {path!r} as safetensors ({type(exc).__name__}: {exc})") from None


def _flatten(obj: Any, prefix: str, out: Dict[str, torch.Tensor]) -> None:
    """Nested mappings -> dotted keys (a Lightning checkpoint's ``state_dict``, ``{"model": ...}``); tensors only."""
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out)


def load_state(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint as a flat ``{key: tensor}`` dict, loaded safely."""
    if str(path).endswith(".safetensors"):
        return _safetensors_load(path)
    obj = _torch_load(path, "checkpoint")
    state: Dict[str, torch.Tensor] = {}
    _flatten(obj, "", state)
    if not state:
        found = f"a {type(obj).__name__}" + (f" with keys {sorted(map(str, obj))[:20]}" if isinstance(obj, Mapping) else "")
        raise DiagnoseError(f"{path!r} holds no tensors ({found}); expected a state dict (a mapping of names to tensors)")
    return state


def load_embeddings(path: str) -> torch.Tensor:
    """Embeddings ``[N, dim]`` (or ``[..., dim]``) from ``.npy`` (no pickled objects) or ``.pt`` (one tensor)."""
    if str(path).endswith(".npy"):
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise DiagnoseError(f"embeddings {path!r} does not exist") from None
        except ValueError as exc:  # an object array needs pickle, which is refused
            raise DiagnoseError(f"refused or cannot read embeddings {path!r} as .npy ({exc}); expected a numeric array [N, dim]") from None
        except OSError as exc:
            raise DiagnoseError(f"cannot read embeddings {path!r} as .npy ({exc}); expected a numeric array [N, dim]") from None
        if not np.issubdtype(array.dtype, np.number):
            raise DiagnoseError(f"embeddings {path!r} has dtype {array.dtype}; expected a numeric array [N, dim]")
        t = torch.from_numpy(array)
    elif str(path).endswith((".pt", ".pth")):
        obj = _torch_load(path, "embeddings")
        if isinstance(obj, Mapping):
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if len(tensors) != 1:
                raise DiagnoseError(
                    f"embeddings {path!r} holds a mapping with {len(tensors)} tensors ({sorted(map(str, tensors))[:10]}); "
                    "expected one tensor [N, dim]"
                )
            obj = next(iter(tensors.values()))
        if not isinstance(obj, torch.Tensor):
            raise DiagnoseError(f"embeddings {path!r} holds a {type(obj).__name__}; expected a tensor [N, dim]")
        t = obj
    else:
        raise DiagnoseError(f"embeddings {path!r}: unknown file type; expected one of {', '.join(EMBEDDING_SUFFIXES)}")
    if t.dim() < 2 or t.is_complex() or t.dtype == torch.bool:
        raise DiagnoseError(f"embeddings {path!r} has shape {tuple(t.shape)} and dtype {t.dtype}; expected real numbers [N, dim]")
    return t.float().reshape(-1, t.shape[-1])


# ---------------------------------------------------------------------------- detection
class Found(NamedTuple):
    prefix: str
    kind: str  #: a key of :data:`KINDS`
    layout: str  #: e.g. the checkpoints layout of a single quantizer


_PATTERNS = (  # (kind, regex whose group 1 is the prefix); earlier wins at the same prefix
    ("grouped-residual-vq", re.compile(r"^(.*?)rvqs\.0\.layers\.0\._codebook\.embed$")),
    ("residual-vq", re.compile(r"^(.*?)layers\.0\._codebook\.embed$")),
    ("vqkernels-residual", re.compile(r"^(.*?)codebook_state\.embed$")),
    ("dac", re.compile(r"^(.*?)quantizers\.0\.codebook\.weight$")),
    ("quantizer", re.compile(r"^(.*?)_codebook\.embed$")),
    ("quantizer", re.compile(r"^(.*?)embed$")),
)


def find_quantizers(state: Mapping[str, torch.Tensor]) -> List[Found]:
    """Every quantizer in ``state``, outermost first (a residual stack's stages are not listed
    again as quantizers of their own)."""
    found: Dict[str, Found] = {}
    for key in sorted(state):
        for kind, pattern in _PATTERNS:
            m = pattern.match(key)
            if not m:
                continue
            prefix = m.group(1)
            if prefix and not prefix.endswith("."):
                continue  # "...my_embed" is not a quantizer's embed
            if kind == "quantizer":
                layout = detect_layout(state, prefix)
                if layout is None or (key == prefix + "embed" and not _plain_codebook(state, prefix)):
                    continue
            else:
                layout = kind
            if prefix not in found or _rank(kind) < _rank(found[prefix].kind):
                found[prefix] = Found(prefix, kind, layout)
            break
    if not found:  # taming's embedding.weight matches any nn.Embedding: only when nothing else does
        for key in sorted(state):
            if key.endswith("embedding.weight") and state[key].dim() == 2:
                prefix = key[: -len("embedding.weight")]
                if (not prefix or prefix.endswith(".")) and detect_layout(state, prefix) is not None:
                    found[prefix] = Found(prefix, "quantizer", detect_layout(state, prefix))
    prefixes = sorted(found, key=len)
    outer = [p for i, p in enumerate(prefixes) if not any(p.startswith(q) for q in prefixes[:i])]
    return [found[p] for p in outer]


def _rank(kind: str) -> int:
    return [k for k, _ in _PATTERNS].index(kind)


def _plain_codebook(state, prefix) -> bool:
    """``<prefix>embed`` is a quantizer's codebook (its flag or statistics sit beside it)."""
    return any(prefix + k in state for k in ("quantizing", "initted", "inited", "cluster_size"))


def describe_keys(state: Mapping[str, torch.Tensor], limit: int = 25) -> str:
    keys = sorted(state)
    shown = ", ".join(f"{k} {tuple(state[k].shape)}" for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ---------------------------------------------------------------------------- building
def _vqkernels_residual(state, prefix: str, groups: Optional[int], num_quantizers: Optional[int], metric: Optional[str],
                        codebook_sizes: Optional[tuple] = None):
    from .residual import GroupedResidualQuantizer, ResidualQuantizer

    rel = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    embed = rel["codebook_state.embed"]
    if embed.dim() != 3:
        raise DiagnoseError(f"{prefix}codebook_state.embed has shape {tuple(embed.shape)}; expected [C, K, D] (C = groups * stages)")
    C, K, D = embed.shape
    projected = sorted({int(m.group(1)) for k in rel for m in [re.match(r"project_in\.(\d+)\.weight$", k)] if m})
    G = groups or (len(projected) if projected else 1)
    if codebook_sizes is not None:
        if num_quantizers is not None and num_quantizers != len(codebook_sizes):
            raise DiagnoseError(f"--codebook-sizes gives {len(codebook_sizes)} stages but --num-quantizers is {num_quantizers}")
        num_quantizers = len(codebook_sizes)
        if max(codebook_sizes) != K:
            raise DiagnoseError(f"--codebook-sizes {list(codebook_sizes)}: the largest must be the stored width K={K}")
    shared = num_quantizers is not None and C == G and num_quantizers > 1
    Q = num_quantizers or C // G
    if C != (G if shared else G * Q):
        raise DiagnoseError(
            f"{prefix}codebook_state.embed holds C={C} codebooks; expected groups * num_quantizers = {G} * {Q} "
            "(pass --groups / --num-quantizers to match the module)"
        )
    group_dim = int(rel["project_in.0.weight"].shape[1]) if projected else D
    kwargs: Dict[str, Any] = dict(codebook_dim=D, shared_codebook=shared)
    if "codebook_state.embed_avg" not in rel:
        kwargs["learning"] = "gradient"
    if "deferral.embed" in rel:
        kwargs["deferred_steps"] = 1
        if "deferral.reservoir" in rel and rel["deferral.reservoir"].shape[-2] > 0:
            kwargs["reservoir_size"] = int(rel["deferral.reservoir"].shape[-2])
    if metric:
        kwargs["metric"] = metric
    sizes = K if codebook_sizes is None or len(set(codebook_sizes)) == 1 else tuple(codebook_sizes)
    try:
        module = (GroupedResidualQuantizer(group_dim * G, G, Q, sizes, **kwargs) if G > 1
                  else ResidualQuantizer(group_dim, Q, sizes, **kwargs))
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise DiagnoseError(f"cannot build a vqkernels residual quantizer for the state under {prefix!r}: {exc}") from None
    try:
        module.load_state_dict(rel, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise DiagnoseError(
            f"a vqkernels residual quantizer under {prefix!r} (groups={G}, num_quantizers={Q}, K={K}, codebook_dim={D}) "
            f"does not load: {exc}"
        ) from None
    return module.eval()


def build(state: Mapping[str, torch.Tensor], found: Found, *, heads: Optional[int] = None, groups: Optional[int] = None,
          num_quantizers: Optional[int] = None, metric: Optional[str] = None,
          codebook_sizes: Optional[tuple] = None) -> torch.nn.Module:
    """The vqkernels module for one :class:`Found` quantizer, through the package's loaders."""
    from .quantizer import Quantizer
    from .residual import GroupedResidualQuantizer, ResidualQuantizer

    extra = {} if metric is None else {"metric": metric}
    try:
        if found.kind == "vqkernels-residual":
            return _vqkernels_residual(state, found.prefix, groups, num_quantizers, metric, codebook_sizes)
        if found.kind == "grouped-residual-vq":
            return GroupedResidualQuantizer.from_pretrained_state(state, found.prefix, **extra).eval()
        if found.kind in ("residual-vq", "dac"):
            return ResidualQuantizer.from_pretrained_state(state, found.prefix, **extra).eval()
        if heads is not None:
            extra["heads"] = heads
        rel = {k[len(found.prefix):]: v for k, v in state.items() if k.startswith(found.prefix)}
        return Quantizer.from_pretrained_state(rel, **extra).eval()
    except DiagnoseError:
        raise
    except (UnknownLayoutError, ValueError, TypeError, RuntimeError, NotImplementedError, KeyError) as exc:
        raise DiagnoseError(
            f"found a quantizer under prefix {found.prefix!r} ({_kind_name(found)}), but the package's loader cannot "
            f"read it: {exc}"
        ) from None


def has_statistics(state: Mapping[str, torch.Tensor], prefix: str) -> bool:
    """The source state holds EMA cluster sizes (taming's layout, for one, has none)."""
    return any(k.startswith(prefix) and k.endswith("cluster_size") and not k.startswith(prefix + "deferral.") for k in state)


# ---------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="state dict: .pt/.pth/.bin/.ckpt (torch.save) or .safetensors")
    parser.add_argument("--embeddings", default=None, help="the quantizer's inputs [N, dim] as .npy or .pt: adds the usage, "
                        "shrinkage and coverage report and the PNG")
    parser.add_argument("--plot", default=None, metavar="PNG", help="where the PNG goes (with --embeddings; "
                        "default ./vqkernels_out/diagnose.png)")
    parser.add_argument("--no-plot", action="store_true", help="no PNG")
    parser.add_argument("--prefix", default=None, help="the quantizer's key prefix in the state dict (default: every quantizer found)")
    parser.add_argument("--heads", type=int, default=None, help="heads of a shared-codebook multi-head quantizer (when its "
                        "projection does not tell)")
    parser.add_argument("--groups", type=int, default=None, help="groups of a vqkernels residual state (default: from its projections, else 1)")
    parser.add_argument("--num-quantizers", type=int, default=None, help="stages of a vqkernels residual state (default: C / groups)")
    parser.add_argument("--codebook-sizes", default=None, metavar="K1,K2,...", help="per-stage codebook sizes of a "
                        "vqkernels residual state (stored max-K wide; the state does not record them)")
    parser.add_argument("--metric", choices=diagnostics.METRICS, default=None, help="the codebook's metric (state dicts "
                        "do not record it; default l2)")
    parser.add_argument("--dead-threshold", type=float, default=1.0, help="a code whose EMA cluster size is below this "
                        "is counted dead in the table without embeddings (default 1.0)")


def _kind_name(found: Found) -> str:
    return found.layout if found.kind == "quantizer" else KINDS[found.kind].split(" (")[0]


def _prefix_label(prefix: str) -> str:
    return repr(prefix) if prefix else "(root)"


def diagnose(args: argparse.Namespace, out=None) -> int:
    out = sys.stdout if out is None else out
    if args.plot is not None and args.embeddings is None:
        raise DiagnoseError("--plot needs --embeddings (the PNG shows the embeddings with the codes)")
    if not args.dead_threshold >= 0:
        raise DiagnoseError(f"--dead-threshold must be >= 0, got {args.dead_threshold}")
    sizes = None
    if args.codebook_sizes is not None:
        try:
            sizes = tuple(int(v) for v in args.codebook_sizes.split(","))
        except ValueError:
            sizes = ()
        if not sizes or min(sizes) < 1:
            raise DiagnoseError(f"--codebook-sizes must be positive integers separated by commas, got {args.codebook_sizes!r}")
    for name in ("heads", "groups", "num_quantizers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DiagnoseError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    state = load_state(args.checkpoint)
    found = find_quantizers(state)
    if args.prefix is not None:
        chosen = [f for f in found if f.prefix == args.prefix]
        if not chosen:
            raise DiagnoseError(
                f"no quantizer under --prefix {args.prefix!r}; quantizers found under: "
                f"{', '.join(_prefix_label(f.prefix) for f in found) or '(none)'}"
            )
        found = chosen
    if not found:
        expected = "\n".join(f"  {k}: {v}" for k, v in KINDS.items())
        raise DiagnoseError(
            f"no quantizer found in {args.checkpoint!r}. Keys found: {describe_keys(state)}.\nLayouts understood "
            f"(under any prefix):\n{expected}"
        )
    if args.embeddings is not None and len(found) > 1:
        raise DiagnoseError(
            f"{len(found)} quantizers found (under {', '.join(_prefix_label(f.prefix) for f in found)}); "
            "pass --prefix to say which one the embeddings belong to"
        )
    for f in found:
        module = build(state, f, heads=args.heads, groups=args.groups, num_quantizers=args.num_quantizers, metric=args.metric,
                       codebook_sizes=sizes)
        units = diagnostics.units_of(module)
        print(f"quantizer under {_prefix_label(f.prefix)}: {_kind_name(f)} "
              f"-> {type(module).__name__}, {len(units.labels)} unit(s), {units.codes.shape[0]} codebook(s) of "
              f"K={units.codes.shape[1]}, D={units.codes.shape[2]}, metric {units.metric}", file=out)
        stats = has_statistics(state, f.prefix)
        health = diagnostics.codebook_health(module, statistics=stats, dead_threshold=args.dead_threshold)
        print(diagnostics.format_health_table(health), file=out)
        if not stats:
            print("(no EMA cluster sizes in this layout: usage needs --embeddings)", file=out)
        if args.embeddings is None:
            continue
        emb = load_embeddings(args.embeddings)
        if emb.shape[-1] != module.dim:
            raise DiagnoseError(
                f"embeddings {args.embeddings!r} have {emb.shape[-1]} features (shape {tuple(emb.shape)}); expected the "
                f"quantizer's input size: [N, dim={module.dim}]"
            )
        emb = emb.to(units.codes.dtype)
        print(f"\nOn {emb.shape[0]} embeddings from {args.embeddings!r}:", file=out)
        report = diagnostics.report(emb, module, print_table=False)
        print(diagnostics.format_table({"overall": report}), file=out)
        if "units" in report:
            print(diagnostics.format_unit_table({os.path.basename(args.checkpoint): report}), file=out)
        if not args.no_plot:
            path = args.plot or os.path.join("vqkernels_out", "diagnose.png")
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                diagnostics.plot(emb, module, path, title=os.path.basename(args.checkpoint))
                print(f"plot: {path}", file=out)
            except ImportError as exc:
                print(f"(no plot: {exc})", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vqkernels diagnose``; 2 with a message on stderr for a file it cannot use."""
    try:
        return diagnose(args)
    except DiagnoseError as exc:
        print(f"vqkernels diagnose: {exc}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqkernels diagnose", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
