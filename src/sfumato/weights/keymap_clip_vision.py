"""CLIP vision-encoder key maps, configs and loading: the SD 2.1 unCLIP image encoder.

Our ``CLIPVisionEncoder`` uses transformers' ``CLIPVisionModelWithProjection`` names, so a diffusers
unCLIP folder's ``image_encoder/`` needs no renaming. The original single files
(``sd21-unclip-l.ckpt``, ``sd21-unclip-h.ckpt``) keep the image tower under ``embedder.model.visual.``
in OpenAI CLIP / OpenCLIP naming, which the two share: ``conv1``, ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj,
ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_post``, and ``proj``, a (width, projection) matrix used as
``x @ proj``. unCLIP-L's ``ClipImageEmbedder`` holds OpenAI ``clip.load("ViT-L/14")`` as ``model``;
unCLIP-H's ``FrozenOpenCLIPImageEmbedder`` holds OpenCLIP ViT-H-14 as ``model`` with the text
transformer deleted. Both leave the rest of the CLIP model (text tower pieces, ``logit_scale``)
under ``embedder.model.``; those keys are not the vision encoder's.

All rename functions take state dicts with keys relative to the encoder (the file prefix removed).
References: Stability-AI/stablediffusion ``ldm/modules/encoders/modules.py``
(``ClipImageEmbedder``, ``FrozenOpenCLIPImageEmbedder``) and ``configs/stable-diffusion/
v2-1-stable-unclip-{l,h}-inference.yaml``; ComfyUI ``supported_models.py`` (``SD21UnclipL/H``:
``clip_vision_prefix = "embedder.model.visual."``) and ``clip_vision.py`` (``convert_to_transformers``);
OpenAI CLIP ``clip/model.py`` and OpenCLIP ``open_clip/transformer.py`` (``VisionTransformer``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from sfumato.errors import CheckpointError
from sfumato.models import ops
from sfumato.models.clip_vision import CLIPVisionConfig, CLIPVisionEncoder
from sfumato.weights.keymap_clip import check_keys, fuse_qkv, split_qkv, transpose_projection
from sfumato.weights.load import assign_weights

__all__ = [
    "OPEN_CLIP_VISION_PREFIX",
    "build_vision_encoder",
    "open_clip_vision_key_map",
    "vision_config_from_diffusers",
    "vision_config_from_openclip",
    "vision_config_to_diffusers",
    "vision_from_openclip",
    "vision_to_openclip",
]

# Where SD 2.1 unCLIP single files (L and H) keep the image tower.
OPEN_CLIP_VISION_PREFIX = "embedder.model.visual."

# reshape name -> (OpenCLIP tensor -> our tensors, our tensors -> OpenCLIP tensor); keymap_clip's functions.
_RESHAPES: dict[str, tuple[Callable[[Tensor], tuple[Tensor, ...]], Callable[..., Tensor]]] = {
    "copy": (lambda t: (t,), lambda t: t),
    "qkv": (split_qkv, fuse_qkv),
    "transpose": (lambda t: (transpose_projection(t),), transpose_projection),
}

# (OpenAI/OpenCLIP key, our key(s), reshape name).
_TOP: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("conv1.weight", ("vision_model.embeddings.patch_embedding.weight",), "copy"),
    ("class_embedding", ("vision_model.embeddings.class_embedding",), "copy"),
    ("positional_embedding", ("vision_model.embeddings.position_embedding.weight",), "copy"),
    ("ln_pre.weight", ("vision_model.pre_layrnorm.weight",), "copy"),
    ("ln_pre.bias", ("vision_model.pre_layrnorm.bias",), "copy"),
    ("ln_post.weight", ("vision_model.post_layernorm.weight",), "copy"),
    ("ln_post.bias", ("vision_model.post_layernorm.bias",), "copy"),
    ("proj", ("visual_projection.weight",), "transpose"),
)
_L = "vision_model.encoder.layers.{i}."
_R = "transformer.resblocks.{i}."
_LAYER: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (_R + "ln_1.weight", (_L + "layer_norm1.weight",), "copy"),
    (_R + "ln_1.bias", (_L + "layer_norm1.bias",), "copy"),
    (_R + "attn.in_proj_weight", tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
    (_R + "attn.in_proj_bias", tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv"),
    (_R + "attn.out_proj.weight", (_L + "self_attn.out_proj.weight",), "copy"),
    (_R + "attn.out_proj.bias", (_L + "self_attn.out_proj.bias",), "copy"),
    (_R + "ln_2.weight", (_L + "layer_norm2.weight",), "copy"),
    (_R + "ln_2.bias", (_L + "layer_norm2.bias",), "copy"),
    (_R + "mlp.c_fc.weight", (_L + "mlp.fc1.weight",), "copy"),
    (_R + "mlp.c_fc.bias", (_L + "mlp.fc1.bias",), "copy"),
    (_R + "mlp.c_proj.weight", (_L + "mlp.fc2.weight",), "copy"),
    (_R + "mlp.c_proj.bias", (_L + "mlp.fc2.bias",), "copy"),
)


def open_clip_vision_key_map(layers: int) -> list[tuple[str, tuple[str, ...], str]]:
    """The rename table expanded for ``layers`` blocks: (OpenCLIP key, our key(s), reshape) per tensor."""
    rows = list(_TOP)
    for i in range(layers):
        rows += [(theirs.format(i=i), tuple(k.format(i=i) for k in ours), how) for theirs, ours, how in _LAYER]
    return rows


def _layer_count(keys: Mapping[str, Any], pattern: str) -> int:
    prefix, _, _ = pattern.partition("{i}")
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def vision_from_openclip(sd: Mapping[str, Tensor], layers: int | None = None) -> dict[str, Tensor]:
    """OpenAI CLIP / OpenCLIP ``visual.*`` layout (prefix removed) -> our (transformers) layout. Strict.

    ``layers`` defaults to the number of ``transformer.resblocks`` present; pass the config's to have
    a truncated file rejected rather than read as a shallower model.
    """
    n = _layer_count(sd, _R) if layers is None else layers
    rows = open_clip_vision_key_map(n)
    check_keys(sd, {theirs for theirs, _, _ in rows}, "OpenCLIP vision encoder", against="vision encoder")
    out: dict[str, Tensor] = {}
    for theirs, ours, how in rows:
        t = sd[theirs]
        if how == "qkv" and t.shape[0] % 3:
            raise CheckpointError(f"{theirs} has shape {tuple(t.shape)}; a fused q/k/v needs a multiple of 3 rows")
        out.update(zip(ours, _RESHAPES[how][0](t), strict=True))
    return out


def vision_to_openclip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our (transformers) layout -> OpenAI CLIP / OpenCLIP ``visual.*`` layout (prefix not added). Strict."""
    rows = open_clip_vision_key_map(_layer_count(sd, _L))
    check_keys(sd, {k for _, ours, _ in rows for k in ours}, "vision encoder", against="vision encoder")
    return {theirs: _RESHAPES[how][1](*(sd[k] for k in ours)) for theirs, ours, how in rows}


# A transformers/diffusers image_encoder config.json field -> our field (same meaning).
_DIFFUSERS_FIELDS: dict[str, str] = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    "hidden_size": "width",
    "num_hidden_layers": "layers",
    "num_attention_heads": "heads",
    "intermediate_size": "mlp_width",
    "projection_dim": "projection_dim",
    "hidden_act": "activation",
    "layer_norm_eps": "layer_norm_eps",
}
_REQUIRED_DIFFUSERS_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                              "projection_dim", "hidden_act")


def vision_config_from_diffusers(d: dict) -> CLIPVisionConfig:
    """A diffusers/transformers ``image_encoder/config.json`` (as a dict) -> ``CLIPVisionConfig``.

    The fields that tell ViT-L/14 from ViT-H/14 are required; image and patch size and the LayerNorm
    epsilon default to transformers' values for these models when absent.
    """
    missing = [k for k in _REQUIRED_DIFFUSERS_FIELDS if k not in d]
    if missing:
        raise CheckpointError(f"image encoder config.json lacks {', '.join(missing)}")
    if d.get("num_channels", 3) != 3:
        raise CheckpointError(f"image encoder config.json has num_channels={d['num_channels']}; CLIP takes RGB (3)")
    if d["hidden_act"] not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"image encoder activation {d['hidden_act']!r} is not supported (quick_gelu, gelu)")
    return CLIPVisionConfig(**{ours: d[theirs] for theirs, ours in _DIFFUSERS_FIELDS.items() if theirs in d})


def vision_config_from_openclip(shapes: Mapping[str, tuple[int, ...]], base: CLIPVisionConfig) -> CLIPVisionConfig:
    """The architecture of an OpenAI/OpenCLIP ``visual.*`` state dict (prefix removed) from its shapes; what
    shapes cannot tell (head count, activation, LayerNorm epsilon) comes from ``base``, the family's preset."""
    for k in ("conv1.weight", "positional_embedding", "proj", _R.format(i=0) + "mlp.c_fc.weight"):
        if k not in shapes:
            raise CheckpointError(f"OpenCLIP vision encoder: {k} is missing")
    width, _, patch, _ = shapes["conv1.weight"]
    grid = round((shapes["positional_embedding"][0] - 1) ** 0.5)
    return replace(base, image_size=grid * patch, patch_size=patch, width=width, layers=_layer_count(shapes, _R),
                   mlp_width=shapes[_R.format(i=0) + "mlp.c_fc.weight"][0], projection_dim=shapes["proj"][1])


def vision_config_to_diffusers(cfg: CLIPVisionConfig) -> dict[str, Any]:
    """``CLIPVisionConfig`` -> a transformers ``CLIPVisionModelWithProjection`` config.json dict."""
    d = {theirs: getattr(cfg, ours) for theirs, ours in _DIFFUSERS_FIELDS.items()}
    return {**d, "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
            "num_channels": 3}


def build_vision_encoder(
    cfg: CLIPVisionConfig,
    tensors: Mapping[str, Tensor],
    *,
    source: str,
    dtype: torch.dtype | None = None,
) -> CLIPVisionEncoder:
    """Build on ``meta`` and load ``tensors`` (transformers layout) strictly: every key used, shapes checked.

    transformers' non-persistent ``position_ids`` buffer, which old writers saved, is dropped.
    """
    tensors = {k: (v.to(dtype) if dtype is not None else v) for k, v in tensors.items()
               if not k.endswith("embeddings.position_ids")}
    with ops.meta_device():
        encoder = CLIPVisionEncoder(cfg)
    assign_weights(encoder, tensors, source=source, what="image encoder")
    return encoder.eval()
