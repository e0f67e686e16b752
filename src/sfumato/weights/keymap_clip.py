"""CLIP text-encoder key maps and configs: OpenCLIP single-file layout and diffusers config.json.

Our ``CLIPTextEncoder`` uses transformers' key names, so SD 1.x / SDXL ``transformer.text_model.*``
weights and diffusers folders need no renaming. OpenCLIP text towers (SD 2.x
``cond_stage_model.model.*``, SDXL ``conditioner.embedders.1.model.*``, the refiner's
``conditioner.embedders.0.model.*``) use OpenCLIP's names, a fused ``nn.MultiheadAttention``
q/k/v projection, and a ``text_projection`` matrix applied as ``x @ text_projection``.

All functions take state dicts with keys relative to the encoder (the file prefix already removed).
References: diffusers ``loaders/single_file_utils.py`` (``convert_open_clip_checkpoint``,
``DIFFUSERS_TO_LDM_MAPPING["openclip"]``); OpenCLIP ``open_clip/transformer.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from sfumato.config import TextEncoderConfig
from sfumato.errors import CheckpointError

__all__ = [
    "OPEN_CLIP_IGNORED_KEYS",
    "clip_from_open_clip",
    "clip_to_open_clip",
    "open_clip_key_map",
    "split_qkv",
    "fuse_qkv",
    "text_config_from_diffusers",
    "text_config_to_diffusers",
    "text_config_from_state_dict",
]

# OpenCLIP keys that are not part of the text encoder we run: the contrastive temperature.
OPEN_CLIP_IGNORED_KEYS: tuple[str, ...] = ("logit_scale",)

# (OpenCLIP key, our key(s), reshape). "{i}" is a layer index; the reshape names a function pair
# in _RESHAPES: "copy" (same tensor), "qkv" (one fused tensor <-> q, k, v), "transpose".
_TOP: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("token_embedding.weight", ("text_model.embeddings.token_embedding.weight",), "copy"),
    ("positional_embedding", ("text_model.embeddings.position_embedding.weight",), "copy"),
    ("ln_final.weight", ("text_model.final_layer_norm.weight",), "copy"),
    ("ln_final.bias", ("text_model.final_layer_norm.bias",), "copy"),
)
_LAYER: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("transformer.resblocks.{i}.ln_1.weight", ("text_model.encoder.layers.{i}.layer_norm1.weight",), "copy"),
    ("transformer.resblocks.{i}.ln_1.bias", ("text_model.encoder.layers.{i}.layer_norm1.bias",), "copy"),
    (
        "transformer.resblocks.{i}.attn.in_proj_weight",
        (
            "text_model.encoder.layers.{i}.self_attn.q_proj.weight",
            "text_model.encoder.layers.{i}.self_attn.k_proj.weight",
            "text_model.encoder.layers.{i}.self_attn.v_proj.weight",
        ),
        "qkv",
    ),
    (
        "transformer.resblocks.{i}.attn.in_proj_bias",
        (
            "text_model.encoder.layers.{i}.self_attn.q_proj.bias",
            "text_model.encoder.layers.{i}.self_attn.k_proj.bias",
            "text_model.encoder.layers.{i}.self_attn.v_proj.bias",
        ),
        "qkv",
    ),
    (
        "transformer.resblocks.{i}.attn.out_proj.weight",
        ("text_model.encoder.layers.{i}.self_attn.out_proj.weight",),
        "copy",
    ),
    (
        "transformer.resblocks.{i}.attn.out_proj.bias",
        ("text_model.encoder.layers.{i}.self_attn.out_proj.bias",),
        "copy",
    ),
    ("transformer.resblocks.{i}.ln_2.weight", ("text_model.encoder.layers.{i}.layer_norm2.weight",), "copy"),
    ("transformer.resblocks.{i}.ln_2.bias", ("text_model.encoder.layers.{i}.layer_norm2.bias",), "copy"),
    ("transformer.resblocks.{i}.mlp.c_fc.weight", ("text_model.encoder.layers.{i}.mlp.fc1.weight",), "copy"),
    ("transformer.resblocks.{i}.mlp.c_fc.bias", ("text_model.encoder.layers.{i}.mlp.fc1.bias",), "copy"),
    ("transformer.resblocks.{i}.mlp.c_proj.weight", ("text_model.encoder.layers.{i}.mlp.fc2.weight",), "copy"),
    ("transformer.resblocks.{i}.mlp.c_proj.bias", ("text_model.encoder.layers.{i}.mlp.fc2.bias",), "copy"),
)
# Only when the config has a projection. SD 2.x files carry an OpenCLIP projection that SD 2.x
# never uses; with ``projection_dim=None`` it is dropped like ``logit_scale``.
_PROJECTION: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("text_projection", ("text_projection.weight",), "transpose"),
)


def split_qkv(in_proj: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """nn.MultiheadAttention's fused (3D, D) weight or (3D,) bias -> q, k, v, in that order."""
    # Cloned so the three are separate storages: safetensors refuses to save shared tensors.
    q, k, v = (t.clone() for t in in_proj.chunk(3, dim=0))
    return q, k, v


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q, k, v projections -> nn.MultiheadAttention's fused ``in_proj`` (3D, D) or (3D,)."""
    return torch.cat([q, k, v], dim=0)


def transpose_projection(t: Tensor) -> Tensor:
    """OpenCLIP's (D, P) matrix used as ``x @ P`` <-> our Linear weight (P, D); self-inverse."""
    return t.t().contiguous()


# reshape name -> (OpenCLIP tensor -> our tensors, our tensors -> OpenCLIP tensor)
_RESHAPES: dict[str, tuple[Callable[[Tensor], tuple[Tensor, ...]], Callable[..., Tensor]]] = {
    "copy": (lambda t: (t,), lambda t: t),
    "qkv": (split_qkv, fuse_qkv),
    "transpose": (lambda t: (transpose_projection(t),), transpose_projection),
}


def open_clip_key_map(cfg: TextEncoderConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """The rename table expanded for ``cfg``: (OpenCLIP key, our key(s), reshape) per tensor."""
    rows = list(_TOP)
    for i in range(cfg.layers):
        rows += [(theirs.format(i=i), tuple(k.format(i=i) for k in ours), how) for theirs, ours, how in _LAYER]
    if cfg.projection_dim is not None:
        rows += _PROJECTION
    return rows


def check_keys(have: Mapping[str, Any], want: set[str], what: str, *, against: str = "text encoder",
               ignored: set[str] = frozenset()) -> None:
    """Strict renaming: ``have`` must hold exactly ``want`` (plus ``ignored``), or a ``CheckpointError``
    names the first unknown and missing keys (``what``: whose state dict; ``against``: the config's network)."""
    unknown = sorted(set(have) - want - set(ignored))
    missing = sorted(want - set(have))
    if unknown or missing:
        raise CheckpointError(f"{what} state dict does not match the {against} config: "
                              f"unknown keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''}, "
                              f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def clip_from_open_clip(sd: dict[str, Tensor], cfg: TextEncoderConfig) -> dict[str, Tensor]:
    """OpenCLIP single-file layout (prefix removed) -> our (transformers) layout. Strict."""
    rows = open_clip_key_map(cfg)
    ignored = set(OPEN_CLIP_IGNORED_KEYS)
    if cfg.projection_dim is None:
        ignored |= {theirs for theirs, _, _ in _PROJECTION}
    check_keys(sd, {theirs for theirs, _, _ in rows}, "OpenCLIP text encoder", ignored=ignored)
    out: dict[str, Tensor] = {}
    for theirs, ours, how in rows:
        t = sd[theirs]
        if how == "qkv" and t.shape[0] != 3 * cfg.width:
            raise CheckpointError(f"{theirs} has shape {tuple(t.shape)}; a fused q/k/v needs {3 * cfg.width} rows")
        out.update(zip(ours, _RESHAPES[how][0](t), strict=True))
    return out


def clip_to_open_clip(sd: dict[str, Tensor], cfg: TextEncoderConfig) -> dict[str, Tensor]:
    """Our (transformers) layout -> OpenCLIP single-file layout (prefix not added). Strict.

    ``logit_scale`` (and SD 2.x's unused projection) are not ours to write: OpenCLIP-format
    loaders such as diffusers' ``convert_open_clip_checkpoint`` do not need them.
    """
    rows = open_clip_key_map(cfg)
    check_keys(sd, {k for _, ours, _ in rows for k in ours}, "text encoder")
    return {theirs: _RESHAPES[how][1](*(sd[k] for k in ours)) for theirs, ours, how in rows}


# --- configs ----------------------------------------------------------------------------------

# A diffusers/transformers text_encoder config.json field -> our field (same meaning).
_DIFFUSERS_FIELDS: dict[str, str] = {
    "vocab_size": "vocab_size",
    "hidden_size": "width",
    "num_hidden_layers": "layers",
    "num_attention_heads": "heads",
    "intermediate_size": "mlp_width",
    "max_position_embeddings": "max_positions",
    "hidden_act": "activation",
    "layer_norm_eps": "layer_norm_eps",
}
_REQUIRED_DIFFUSERS_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_KNOWN_ACTIVATIONS = ("quick_gelu", "gelu")
# CLIP's tokenizer ids. eos_token_id = 49407 makes transformers pool at the first EOS; the legacy
# value 2 in the official SD repos makes it pool at argmax(ids) instead, the same position for
# CLIP's 49408-token vocabulary. The text model uses pad_token_id for nothing (no padding_idx).
_BOS_ID, _EOS_ID, _PAD_ID = 49406, 49407, 1


def text_config_from_diffusers(d: dict) -> TextEncoderConfig:
    """A diffusers/transformers ``text_encoder/config.json`` (as a dict) -> ``TextEncoderConfig``.

    ``projection_dim`` is kept only for ``CLIPTextModelWithProjection``: a plain ``CLIPTextModel``
    config carries the field (768 for SD 1.x) but has no projection weights.
    """
    missing = [k for k in _REQUIRED_DIFFUSERS_FIELDS if k not in d]
    if missing:
        raise CheckpointError(f"text encoder config.json lacks {missing}")
    kwargs = {ours: d[theirs] for theirs, ours in _DIFFUSERS_FIELDS.items() if theirs in d}
    if kwargs.get("activation", "quick_gelu") not in _KNOWN_ACTIVATIONS:
        raise CheckpointError(
            f"text encoder config.json hidden_act {kwargs['activation']!r} is not one of {_KNOWN_ACTIVATIONS}"
        )
    with_projection = "CLIPTextModelWithProjection" in (d.get("architectures") or ())
    projection_dim = d.get("projection_dim") if with_projection else None
    return TextEncoderConfig(**kwargs, projection_dim=projection_dim)


def text_config_to_diffusers(cfg: TextEncoderConfig, *, with_projection: bool) -> dict:
    """``TextEncoderConfig`` -> a ``config.json`` dict that transformers' ``CLIPTextConfig`` and
    diffusers accept, for ``CLIPTextModelWithProjection`` when ``with_projection`` else ``CLIPTextModel``."""
    if with_projection and cfg.projection_dim is None:
        raise ValueError("with_projection=True needs a TextEncoderConfig with projection_dim set")
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.mlp_width,
        "max_position_embeddings": cfg.max_positions,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        # A plain CLIPTextModel ignores it; the official SD 1.x config sets it to the width.
        "projection_dim": cfg.projection_dim if cfg.projection_dim is not None else cfg.width,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": _BOS_ID,
        "eos_token_id": _EOS_ID,
        "pad_token_id": _PAD_ID,
        "torch_dtype": "float32",
    }


# Signature keys per layout: (token embedding, position embedding, layer key pattern, fc1 weight,
# projection key and which axis of it is the projection width).
_SHAPE_KEYS: dict[str, dict[str, Any]] = {
    "hf": {
        "tokens": "text_model.embeddings.token_embedding.weight",
        "positions": "text_model.embeddings.position_embedding.weight",
        "layer": r"text_model\.encoder\.layers\.(\d+)\.",
        "fc1": "text_model.encoder.layers.0.mlp.fc1.weight",
        "projection": ("text_projection.weight", 0),
    },
    "open_clip": {
        "tokens": "token_embedding.weight",
        "positions": "positional_embedding",
        "layer": r"transformer\.resblocks\.(\d+)\.",
        "fc1": "transformer.resblocks.0.mlp.c_fc.weight",
        "projection": ("text_projection", 1),
    },
}


def text_config_from_state_dict(
    shapes: Mapping[str, tuple[int, ...]],
    layout: str,
    *,
    head_dim: int = 64,
    activation: str | None = None,
) -> TextEncoderConfig:
    """Infer a ``TextEncoderConfig`` from tensor shapes (keys relative to the encoder).

    ``layout`` is "hf" (transformers names) or "open_clip". Two fields are not in the shapes:

    - heads: ``width // head_dim``; CLIP text towers use 64-wide heads (CLIP-L 768/12,
      OpenCLIP-H 1024/16, bigG 1280/20), so the default is right for every SD encoder.
    - activation, unless given: OpenCLIP models use GELU; in transformers layout, 768-wide is
      OpenAI's CLIP ViT-L/14 (quick_gelu) and wider ones are OpenCLIP H/bigG (GELU). A diffusers
      folder's config.json says it outright (``text_config_from_diffusers``).

    ``projection_dim`` is set whenever a projection tensor is present; SD 2.x files carry one
    their UNet never uses (replace it with None to skip it).
    """
    if layout not in _SHAPE_KEYS:
        raise ValueError(f"unknown text encoder layout {layout!r}; known: {', '.join(_SHAPE_KEYS)}")
    names = _SHAPE_KEYS[layout]
    missing = [names[k] for k in ("tokens", "positions", "fc1") if names[k] not in shapes]
    if missing:
        raise CheckpointError(f"text encoder state dict ({layout} layout) lacks {missing}")
    vocab_size, width = shapes[names["tokens"]]
    indices = {int(m.group(1)) for k in shapes if (m := re.match(names["layer"], k))}
    if indices != set(range(len(indices))):
        raise CheckpointError(f"text encoder layer indices {sorted(indices)} are not 0..N-1")
    if width % head_dim:
        raise CheckpointError(f"text encoder width {width} is not a multiple of head_dim {head_dim}")
    projection_key, projection_axis = names["projection"]
    if activation is None:
        activation = "quick_gelu" if layout == "hf" and width == 768 else "gelu"
    return TextEncoderConfig(
        vocab_size=vocab_size,
        width=width,
        layers=len(indices),
        heads=width // head_dim,
        mlp_width=shapes[names["fc1"]][0],
        max_positions=shapes[names["positions"]][0],
        activation=activation,
        projection_dim=shapes[projection_key][projection_axis] if projection_key in shapes else None,
    )
