"""Codebooks saved by other VQ libraries, in ``vqkernels.Quantizer``'s layout.

``Quantizer.load_state_dict`` calls :func:`convert_foreign_state_` (which calls
:func:`convert_state_dict`) when the state has no ``embed`` of its own, so a whole model's
checkpoint (the quantizer under any prefix) loads into a model that uses ``Quantizer``
instead; ``Quantizer.from_pretrained_state`` (:func:`build_from_state`) builds the module
from the shapes first. Layouts understood (keys relative to the quantizer):

* ``vqkernels``: ``embed``, ``cluster_size``, ``initted``, ``quantizing``, ``steps`` (+ ``embed_avg``
  with EMA learning, ``reservoir``/``reservoir_seen`` with Deferred Quantization).
* ``vector-quantize-pytorch`` (``VectorQuantize``): ``_codebook.embed``
  ``[1, K, D]`` (newer) or ``[K, D]`` (older), ``_codebook.embed_avg``, ``_codebook.cluster_size``
  ``[1, K]`` / ``[K]``, ``_codebook.initted`` (bool scalar, or float ``[1]`` in older versions),
  plus ``project_in`` / ``project_out`` when ``heads * codebook_dim != dim``. Heads: ``[H, K, D]`` /
  ``[H, K]`` with ``separate_codebook_per_head`` (loaded as a ``Quantizer`` with separate
  codebooks); heads sharing a codebook are read from ``project_in``'s shape. Its bare
  ``Codebook`` (the same keys without ``_codebook.``) is understood too.
* ``taming-transformers`` (``VectorQuantizer`` / ``VectorQuantizer2``): ``embedding.weight [K, D]``.
* ``encodec`` / audiocraft (``EuclideanCodebook``): ``embed [K, D]``, ``embed_avg``,
  ``cluster_size [K]``, ``inited [1]``; under ``_codebook.`` in their ``VectorQuantization``,
  whose ``project_in`` / ``project_out`` load too.

Statistics a layout lacks are filled consistently: ``cluster_size`` ones and
``embed_avg = embed * cluster_size`` (as a fresh EMA layer holds). The loaded module is
quantizing (a Deferred Quantization layer is past its switch) with ``steps = 0``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, MutableMapping, NamedTuple, Optional, Set

import torch

from .errors import UnknownLayoutError

VQKERNELS = "vqkernels"
VECTOR_QUANTIZE_PYTORCH = "vector-quantize-pytorch"
TAMING = "taming-transformers"
ENCODEC = "encodec"

LAYOUTS: Dict[str, str] = {
    VQKERNELS: "embed, cluster_size, initted, quantizing, steps [, embed_avg, reservoir, reservoir_seen]",
    VECTOR_QUANTIZE_PYTORCH: "_codebook.embed [1, K, D] or [K, D], _codebook.embed_avg, _codebook.cluster_size, "
    "_codebook.initted [, project_in.*, project_out.*] (VectorQuantize; heads: _codebook.embed [H, K, D] with "
    "separate codebooks, or project_in.weight [H * D, dim] with a shared one)",
    TAMING: "embedding.weight [K, D] (VectorQuantizer / VectorQuantizer2)",
    ENCODEC: "embed [K, D], embed_avg, cluster_size [K], inited [1] (EuclideanCodebook; "
    "_codebook.* [, project_in.*, project_out.*] in VectorQuantization)",
}

# Source defaults that differ from Quantizer's, used by Quantizer.from_pretrained_state.
# taming: gradient-learned codebook, beta = 0.25 on the commitment term (legacy loss),
# channel-first feature maps; encodec: EMA decay 0.99, dead codes below 2 re-seeded.
SOURCE_DEFAULTS: Dict[str, Dict[str, object]] = {
    VQKERNELS: {},
    VECTOR_QUANTIZE_PYTORCH: {},
    TAMING: {"learning": "gradient", "commitment_weight": 0.25, "channel_last": False},
    ENCODEC: {"decay": 0.99, "dead_code_threshold": 2.0},
}


class Converted(NamedTuple):
    layout: str  #: one of :data:`LAYOUTS`
    entries: Dict[str, torch.Tensor]  #: vqkernels keys (relative to the quantizer) -> tensors
    consumed: List[str]  #: the source keys (absolute) these replace


def _relative(state: Mapping[str, object], prefix: str) -> Dict[str, object]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _describe(keys: List[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "") if keys else "(none)"


def unknown_layout_error(state: Mapping[str, object], prefix: str, why: str) -> UnknownLayoutError:
    """The error for a state under ``prefix`` that cannot be loaded: ``why``, the keys found
    (with shapes), the layouts understood, and other prefixes that hold a codebook."""
    keys = sorted(_relative(state, prefix))
    shapes = [f"{k} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else k for k, v in ((k, state[prefix + k]) for k in keys)]
    understood = "\n".join(f"  {name}: {keys_}" for name, keys_ in LAYOUTS.items())
    hint = ""
    candidates = sorted(
        {k[: -len(tail)] for k in state for tail in _ANCHORS if (k == tail or k.endswith("." + tail)) and k[: -len(tail)] != prefix}
    )
    if candidates:
        hint = f"\nThe state holds codebooks under other prefixes: {', '.join(repr(c) for c in candidates[:10])}"
    where = f" under prefix {prefix!r}" if prefix else ""
    return UnknownLayoutError(
        f"{why}{where}. Keys found: {_describe(shapes)}.\nLayouts understood (keys relative to the quantizer):\n{understood}{hint}"
    )


_ANCHORS = ("_codebook.embed", "embedding.weight", "embed")


def detect_layout(state: Mapping[str, object], prefix: str = "") -> Optional[str]:
    """The layout of the quantizer state under ``prefix``, or ``None`` when none matches."""
    keys = set(_relative(state, prefix))
    if "embed" in keys and "quantizing" in keys:
        return VQKERNELS
    if "_codebook.embed" in keys:
        return ENCODEC if "_codebook.inited" in keys else VECTOR_QUANTIZE_PYTORCH
    if "embed" in keys and "inited" in keys:
        return ENCODEC
    if "embed" in keys and "initted" in keys:
        return VECTOR_QUANTIZE_PYTORCH  # its bare Codebook module
    if "embedding.weight" in keys:
        return TAMING
    if "embed" in keys:
        return VQKERNELS
    return None


def _codes(t: torch.Tensor, key: str, state, prefix) -> torch.Tensor:
    """``[K, D]`` for one codebook (``[1, K, D]`` loses its axis), ``[H, K, D]`` for separate
    codebooks per head (kept: a ``Quantizer(heads=H, separate_codebook_per_head=True)``'s layout)."""
    t = t.detach()
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() not in (2, 3):
        raise unknown_layout_error(state, prefix, f"{key} has shape {tuple(t.shape)}; expected [K, D], [1, K, D] or [heads, K, D]")
    return t


def _sizes(t: torch.Tensor, shape, key: str, state, prefix) -> torch.Tensor:
    """Cluster sizes in the codebook's leading ``shape`` (``[K]`` or ``[H, K]``)."""
    t = t.detach()
    if t.numel() != shape.numel():
        raise unknown_layout_error(
            state, prefix, f"{key} has shape {tuple(t.shape)}; expected {tuple(shape)} entries to match the codebook"
        )
    return t.reshape(shape)


def _flag(t) -> torch.Tensor:
    """``initted`` / ``inited``: a bool scalar (vector-quantize-pytorch >= 1.x) or float ``[1]``."""
    t = torch.as_tensor(t).detach().reshape(-1)
    return torch.tensor(bool(t[0]) if t.numel() else True)


def convert_state_dict(
    state: Mapping[str, object],
    prefix: str = "",
    *,
    learning: str = "ema",
    deferred: bool = False,
) -> Converted:
    """Translate the quantizer state under ``prefix`` into vqkernels' layout.

    Args:
        state: a state dict (a whole model's is fine: only keys under ``prefix`` are read).
        prefix: where the quantizer sits in it, e.g. ``"quantize."`` or ``"vq."``.
        learning: the target's ``learning`` (``"gradient"`` targets have no ``embed_avg``).
        deferred: the target has Deferred Quantization's ``reservoir`` buffers.

    Returns:
        :class:`Converted` ``(layout, entries, consumed)``: ``entries`` (keys relative to the
        quantizer) replace the ``consumed`` source keys; other keys (``project_in.*``,
        ``project_out.*``) are already named as ``Quantizer``'s and stay.

    Raises:
        UnknownLayoutError: listing the keys found and the layouts understood.

    Example:
        >>> theirs = vector_quantize_pytorch.VectorQuantize(dim=64, codebook_size=512)
        >>> layout, entries, consumed = convert_state_dict(theirs.state_dict())
        >>> layout, entries["embed"].shape
        ('vector-quantize-pytorch', torch.Size([512, 64]))
    """
    layout = detect_layout(state, prefix)
    if layout is None:
        raise unknown_layout_error(state, prefix, "No quantizer state in a known layout")
    rel = _relative(state, prefix)
    if layout == VQKERNELS:
        return Converted(layout, {}, [])
    if layout == TAMING:
        extra = sorted(k for k in rel if k.startswith("embedding.") and k != "embedding.weight") + (["used"] if "used" in rel else [])
        if extra:
            raise unknown_layout_error(state, prefix, f"taming-transformers state with {extra} (index remapping) is not supported")
        embed = _codes(rel["embedding.weight"], "embedding.weight", state, prefix)
        if embed.dim() != 2:
            raise unknown_layout_error(state, prefix, f"embedding.weight has shape {tuple(embed.shape)}; expected [K, D]")
        cluster_size = torch.ones(embed.shape[0], dtype=torch.float32)
        initted = torch.tensor(True)
        consumed = ["embedding.weight"]
    else:
        inner = "_codebook." if "_codebook.embed" in rel else ""
        flag = "inited" if layout == ENCODEC else "initted"
        known = ("embed", "embed_avg", "cluster_size", flag)
        codebook_keys = [k[len(inner) :] for k in rel if k.startswith(inner)] if inner else [k for k in rel if "." not in k]
        extra = sorted(k for k in codebook_keys if k not in known)
        if extra:
            raise unknown_layout_error(
                state, prefix, f"{layout} codebook state with {[inner + k for k in extra]} (e.g. affine parameters) is not supported"
            )
        embed = _codes(rel[inner + "embed"], inner + "embed", state, prefix)
        if embed.dim() == 3 and layout != VECTOR_QUANTIZE_PYTORCH:
            raise unknown_layout_error(state, prefix, f"{inner}embed has shape {tuple(embed.shape)}; expected [K, D]")
        cluster_size = (
            _sizes(rel[inner + "cluster_size"], embed.shape[:-1], inner + "cluster_size", state, prefix)
            if inner + "cluster_size" in rel
            else torch.ones(embed.shape[:-1], dtype=torch.float32)
        )
        initted = _flag(rel[inner + flag]) if inner + flag in rel else torch.tensor(True)
        consumed = [inner + k for k in known if inner + k in rel]
    entries: Dict[str, torch.Tensor] = {
        "embed": embed.clone(),
        "cluster_size": cluster_size.clone(),
        "initted": initted,
        "quantizing": torch.tensor(True),
        "steps": torch.zeros((), dtype=torch.int64),
    }
    if learning == "ema":
        avg_key = ("_codebook." if "_codebook.embed" in rel else "") + "embed_avg"
        if avg_key in rel:
            entries["embed_avg"] = _codes(rel[avg_key], avg_key, state, prefix).clone().reshape(embed.shape)
        else:
            entries["embed_avg"] = embed * cluster_size.to(embed.dtype).unsqueeze(-1)
    if deferred:
        entries["reservoir"] = embed.new_zeros(embed.shape[:-2] + (0, embed.shape[-1]))
        entries["reservoir_seen"] = torch.zeros((), dtype=torch.int64)
    return Converted(layout, entries, [prefix + k for k in consumed])


def infer_config(state: Mapping[str, object], prefix: str = "") -> Dict[str, object]:
    """``Quantizer`` arguments the state determines: ``dim``, ``codebook_size``,
    ``codebook_dim``, ``heads`` and ``separate_codebook_per_head``, plus the source library's
    defaults that differ from ours (:data:`SOURCE_DEFAULTS`). Raises
    :class:`UnknownLayoutError` like :func:`convert_state_dict`.

    Heads: separate codebooks show as ``embed [H, K, D]``; heads sharing one codebook show only
    through ``project_in.weight [H * D, dim]``, so without a projection (``dim = H * D``) the
    state reads as one head: pass ``heads=H`` to ``from_pretrained_state``."""
    converted = convert_state_dict(state, prefix)
    rel = _relative(state, prefix)
    embed = converted.entries["embed"] if converted.entries else _codes(rel["embed"], "embed", state, prefix)
    K, codebook_dim = embed.shape[-2:]
    heads = embed.shape[0] if embed.dim() == 3 else 1
    dim = heads * codebook_dim
    if "project_in.weight" in rel:
        projected, dim = (int(v) for v in rel["project_in.weight"].shape)
        if heads == 1 and projected != codebook_dim:
            if projected % codebook_dim:
                raise unknown_layout_error(
                    state, prefix,
                    f"project_in.weight projects to {projected} features, not a multiple of the codebook's {codebook_dim}",
                )
            heads = projected // codebook_dim  # heads sharing one codebook
    config: Dict[str, object] = {"dim": int(dim), "codebook_size": int(K)}
    if dim != codebook_dim:
        config["codebook_dim"] = int(codebook_dim)
    if heads > 1:
        config["heads"] = int(heads)
        config["separate_codebook_per_head"] = embed.dim() == 3
    if converted.layout == VQKERNELS and "embed_avg" not in rel:
        config["learning"] = "gradient"
    config.update(SOURCE_DEFAULTS[converted.layout])
    return config


def convert_foreign_state_(
    state_dict: MutableMapping[str, Any],
    prefix: str,
    *,
    own: Set[str],
    learning: str = "ema",
    deferred: bool = False,
    error_msgs: List[str],
) -> None:
    """Rewrite another library's quantizer state under ``prefix`` into ours, in place (the
    first step of ``Quantizer._load_from_state_dict``).

    Args:
        state_dict: the state torch is loading (keys of the whole model).
        own: the first key components of the target (``embed``, ``cluster_size``, ...,
            ``project_in``): keys under ``prefix`` outside them are foreign.
        learning, deferred: the target's (see :func:`convert_state_dict`).
        error_msgs: torch's list; an unknown layout is reported there, as torch reports
            its own loading errors.
    """
    if prefix + "embed" in state_dict and prefix + "quantizing" in state_dict:
        return  # ours
    if detect_layout(state_dict, prefix) in (None, VQKERNELS):
        # (torch passes strict=True here whatever the caller asked, so judge by the keys:)
        # foreign keys and no codebook is a layout we do not know; no keys at all is
        # torch's "missing keys", which load_state_dict(strict=False) accepts.
        foreign = [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :].split(".", 1)[0] not in own]
        if foreign and prefix + "embed" not in state_dict:
            error_msgs.append(str(unknown_layout_error(state_dict, prefix, "No quantizer state in a known layout")))
        return
    try:
        converted = convert_state_dict(state_dict, prefix, learning=learning, deferred=deferred)
    except UnknownLayoutError as e:
        error_msgs.append(str(e))
        return
    for key in converted.consumed:
        state_dict.pop(key)
    for key, value in converted.entries.items():
        state_dict[prefix + key] = value


def build_from_state(cls, state: Mapping[str, object], prefix: str = "", *, strict: bool = True, **kwargs):
    """``cls`` (a ``Quantizer`` class) built from :func:`infer_config` of ``state`` (``kwargs``
    override it) and loaded from ``state``; see ``Quantizer.from_pretrained_state``."""
    config = infer_config(state, prefix)
    if "heads" in kwargs and "dim" not in kwargs and "project_in.weight" not in _relative(state, prefix):
        # shared heads without a projection: the input is the heads' codes side by side
        config["codebook_dim"] = config.get("codebook_dim", config["dim"])
        config["dim"] = kwargs["heads"] * config["codebook_dim"]
    config.update(kwargs)
    module = cls(**config)
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    module.load_state_dict(own, strict=strict)
    return module


__all__ = [
    "LAYOUTS",
    "UnknownLayoutError",
    "Converted",
    "detect_layout",
    "convert_state_dict",
    "infer_config",
    "unknown_layout_error",
    "convert_foreign_state_",
    "build_from_state",
]
