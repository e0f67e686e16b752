"""DPT-Hybrid depth-estimator key maps, configs and loading: SD 2 depth2img's MiDaS model.

Our ``DPTDepthModel`` uses the original MiDaS/timm names, the layout of the weights SD 2's
``512-depth-ema.ckpt`` keeps under ``depth_model.model.`` (``ldm.modules.midas.api.MiDaSInference``
holding ``DPTDepthModel(backbone="vitb_rn50_384", non_negative=True)`` as ``model``), so that file needs
no renaming beyond dropping the prefix and the timm ImageNet classifier (``IGNORED_ORIGINAL_KEYS``),
which MiDaS never runs and transformers' conversion drops too.

A diffusers depth2img folder instead has ``depth_estimator/`` (transformers ``DPTForDepthEstimation``,
``is_hybrid=True``: config.json + weights) and ``feature_extractor/preprocessor_config.json``
(``DPTImageProcessor``). The renames between the two layouts, all one-to-one except timm's fused
``attn.qkv`` = transformers' query/key/value, are:

    pretrained.model.{cls_token, pos_embed}           dpt.embeddings.{cls_token, position_embeddings}
    pretrained.model.patch_embed.backbone.stem.conv   dpt.embeddings.backbone.bit.embedder.convolution
    pretrained.model.patch_embed.backbone.stem.norm   dpt.embeddings.backbone.bit.embedder.norm
    ...backbone.stages.S.blocks.B.<name>              dpt.embeddings.backbone.bit.encoder.stages.S.layers.B.<name>
    pretrained.model.patch_embed.proj                 dpt.embeddings.projection
    pretrained.model.blocks.N.{norm1, norm2}          dpt.encoder.layer.N.{layernorm_before, layernorm_after}
    pretrained.model.blocks.N.attn.qkv                dpt.encoder.layer.N.attention.attention.{query, key, value}
    pretrained.model.blocks.N.attn.proj               dpt.encoder.layer.N.attention.output.dense
    pretrained.model.blocks.N.mlp.{fc1, fc2}          dpt.encoder.layer.N.{intermediate, output}.dense
    pretrained.model.norm                             dpt.layernorm
    pretrained.act_postprocess{3,4}.0.project.0       neck.reassemble_stage.readout_projects.{2,3}.0
    pretrained.act_postprocess{3,4}.3                 neck.reassemble_stage.layers.{2,3}.projection
    pretrained.act_postprocess4.4                     neck.reassemble_stage.layers.3.resize
    scratch.layer{1..4}_rn                            neck.convs.{0..3}
    scratch.refinenet{4,3,2,1}                        neck.fusion_stage.layers.{0,1,2,3}
      .resConfUnit{1,2}.conv{1,2}, .out_conv            .residual_layer{1,2}.convolution{1,2}, .projection
    scratch.output_conv.{0,2,4}                       head.head.{0,2,4}

All rename functions take keys relative to the model (file prefixes removed).
References: transformers ``models/dpt/convert_dpt_hybrid_to_pytorch.py`` (``rename_key``,
``read_in_q_k_v``, ``remove_ignore_keys_``), ``configuration_dpt.py``, ``bit/configuration_bit.py``;
isl-org/MiDaS ``midas/dpt_depth.py`` and ``midas/vit.py``; Stability-AI/stablediffusion
``configs/stable-diffusion/v2-midas-inference.yaml`` and ``ldm/modules/midas/api.py``; diffusers
``StableDiffusionDepth2ImgPipeline``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from sfumato.errors import CheckpointError
from sfumato.models import ops
from sfumato.models.depth import DepthPreprocessing, DPTConfig, DPTDepthModel
from sfumato.weights.keymap_clip import check_keys, fuse_qkv, split_qkv
from sfumato.weights.load import assign_weights

__all__ = [
    "DEPTH_MODEL_PREFIX",
    "IGNORED_ORIGINAL_KEYS",
    "build_depth_estimator",
    "depth_config_from_transformers",
    "depth_config_to_transformers",
    "depth_from_transformers",
    "depth_key_map",
    "depth_to_transformers",
    "preprocessing_from_transformers",
    "preprocessing_to_transformers",
]

# Where SD 2's 512-depth-ema.ckpt keeps the MiDaS model.
DEPTH_MODEL_PREFIX = "depth_model.model."

# timm's ImageNet classifier on the ViT, stored in MiDaS files but never run (nor kept by transformers).
IGNORED_ORIGINAL_KEYS: tuple[str, ...] = ("pretrained.model.head.weight", "pretrained.model.head.bias")

# reshape name -> (original tensor -> transformers tensors, transformers tensors -> original tensor).
_RESHAPES: dict[str, tuple[Callable[[Tensor], tuple[Tensor, ...]], Callable[..., Tensor]]] = {
    "copy": (lambda t: (t,), lambda t: t),
    "qkv": (split_qkv, fuse_qkv),
}

Row = tuple[str, tuple[str, ...], str]  # (original key, transformers key(s), reshape name)

_WB = ("weight", "bias")
_VIT = "pretrained.model."
_BIT = "pretrained.model.patch_embed.backbone."
_HF_BIT = "dpt.embeddings.backbone.bit."


def _pairs(ours: str, theirs: str, params: tuple[str, ...] = _WB) -> list[Row]:
    return [(f"{ours}.{p}", (f"{theirs}.{p}",), "copy") for p in params]


def _top_rows() -> list[Row]:
    rows: list[Row] = [
        (_VIT + "cls_token", ("dpt.embeddings.cls_token",), "copy"),
        (_VIT + "pos_embed", ("dpt.embeddings.position_embeddings",), "copy"),
        (_BIT + "stem.conv.weight", (_HF_BIT + "embedder.convolution.weight",), "copy"),
    ]
    rows += _pairs(_BIT + "stem.norm", _HF_BIT + "embedder.norm")
    rows += _pairs(_VIT + "patch_embed.proj", "dpt.embeddings.projection")
    rows += _pairs(_VIT + "norm", "dpt.layernorm")
    for n, i in ((3, 2), (4, 3)):
        rows += _pairs(f"pretrained.act_postprocess{n}.0.project.0", f"neck.reassemble_stage.readout_projects.{i}.0")
        rows += _pairs(f"pretrained.act_postprocess{n}.3", f"neck.reassemble_stage.layers.{i}.projection")
    rows += _pairs("pretrained.act_postprocess4.4", "neck.reassemble_stage.layers.3.resize")
    for n in range(1, 5):
        rows += _pairs(f"scratch.layer{n}_rn", f"neck.convs.{n - 1}", ("weight",))
        ours, theirs = f"scratch.refinenet{n}", f"neck.fusion_stage.layers.{4 - n}"  # fused coarse (4) to fine
        rows += _pairs(f"{ours}.out_conv", f"{theirs}.projection")
        for u in (1, 2):
            for c in (1, 2):
                rows += _pairs(f"{ours}.resConfUnit{u}.conv{c}", f"{theirs}.residual_layer{u}.convolution{c}")
    for i in (0, 2, 4):
        rows += _pairs(f"scratch.output_conv.{i}", f"head.head.{i}")
    return rows


def _bottleneck_rows(stage: int, block: int) -> list[Row]:
    ours = f"{_BIT}stages.{stage}.blocks.{block}"
    theirs = f"{_HF_BIT}encoder.stages.{stage}.layers.{block}"
    rows: list[Row] = []
    if block == 0:  # a stage's first block carries the projection shortcut
        rows += _pairs(f"{ours}.downsample.conv", f"{theirs}.downsample.conv", ("weight",))
        rows += _pairs(f"{ours}.downsample.norm", f"{theirs}.downsample.norm")
    for n in (1, 2, 3):
        rows += _pairs(f"{ours}.conv{n}", f"{theirs}.conv{n}", ("weight",))
        rows += _pairs(f"{ours}.norm{n}", f"{theirs}.norm{n}")
    return rows


def _block_rows(i: int) -> list[Row]:
    ours, theirs = f"{_VIT}blocks.{i}", f"dpt.encoder.layer.{i}"
    rows = _pairs(f"{ours}.norm1", f"{theirs}.layernorm_before")
    rows += [(f"{ours}.attn.qkv.{p}", tuple(f"{theirs}.attention.attention.{t}.{p}" for t in ("query", "key", "value")),
              "qkv") for p in _WB]
    rows += _pairs(f"{ours}.attn.proj", f"{theirs}.attention.output.dense")
    rows += _pairs(f"{ours}.norm2", f"{theirs}.layernorm_after")
    rows += _pairs(f"{ours}.mlp.fc1", f"{theirs}.intermediate.dense")
    rows += _pairs(f"{ours}.mlp.fc2", f"{theirs}.output.dense")
    return rows


def depth_key_map(cfg: DPTConfig) -> list[Row]:
    """The rename table expanded for ``cfg``: (original key, transformers key(s), reshape) per tensor."""
    rows = _top_rows()
    for stage, depth in enumerate(cfg.stage_depths):
        for block in range(depth):
            rows += _bottleneck_rows(stage, block)
    for i in range(cfg.layers):
        rows += _block_rows(i)
    return rows


def depth_from_transformers(sd: Mapping[str, Tensor], cfg: DPTConfig) -> dict[str, Tensor]:
    """transformers ``DPTForDepthEstimation`` (hybrid) layout -> our (original MiDaS) layout. Strict."""
    rows = depth_key_map(cfg)
    check_keys(sd, {k for _, theirs, _ in rows for k in theirs}, "transformers DPT", against="depth estimator")
    return {ours: _RESHAPES[how][1](*(sd[k] for k in theirs)) for ours, theirs, how in rows}


def depth_to_transformers(sd: Mapping[str, Tensor], cfg: DPTConfig) -> dict[str, Tensor]:
    """Our (original MiDaS) layout -> transformers ``DPTForDepthEstimation`` layout. Strict; the
    ``IGNORED_ORIGINAL_KEYS`` (timm's classifier) are dropped if present."""
    sd = {k: v for k, v in sd.items() if k not in IGNORED_ORIGINAL_KEYS}
    rows = depth_key_map(cfg)
    check_keys(sd, {ours for ours, _, _ in rows}, "MiDaS DPT", against="depth estimator")
    out: dict[str, Tensor] = {}
    for ours, theirs, how in rows:
        t = sd[ours]
        if how == "qkv" and t.shape[0] % 3:
            raise CheckpointError(f"{ours} has shape {tuple(t.shape)}; a fused q/k/v needs a multiple of 3 rows")
        out.update(zip(theirs, _RESHAPES[how][0](t), strict=True))
    return out


def _expect(d: Mapping[str, Any], key: str, allowed: tuple[Any, ...], what: str) -> None:
    if key in d and d[key] not in allowed:
        raise CheckpointError(f"{what} has {key}={d[key]!r}; sfumato's DPT-Hybrid supports {allowed}")


_REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "neck_hidden_sizes")


def depth_config_from_transformers(d: dict) -> DPTConfig:
    """A ``depth_estimator/config.json`` (transformers ``DPTConfig`` with ``is_hybrid``) -> ``DPTConfig``.

    Everything our one architecture fixes is checked (hybrid, readout "project", reassemble factors
    (-, -, 1, 0.5), GELU, no fusion batch norm, BiT bottleneck with "same" padding); anything else is a
    ``CheckpointError``. Missing optional fields take transformers' defaults (for an absent
    ``backbone_config``, the BiT-R50 stages DPT-Hybrid fills in); ``embedding_type: "hybrid"``, the
    spelling of early hybrid configs, counts as ``is_hybrid``."""
    what = "depth estimator config.json"
    missing = [k for k in _REQUIRED_FIELDS if not d.get(k)]
    if missing:
        raise CheckpointError(f"{what} lacks {', '.join(missing)}")
    if not (d.get("is_hybrid") or d.get("embedding_type") == "hybrid"):
        raise CheckpointError(f"{what} is not a DPT-Hybrid (is_hybrid is not true)")
    for key, allowed in (("readout_type", ("project",)), ("hidden_act", ("gelu",)), ("qkv_bias", (True,)),
                         ("add_projection", (False,)), ("use_batch_norm_in_fusion_residual", (False,)),
                         ("use_bias_in_fusion_residual", (None, True)), ("head_in_index", (-1,)),
                         ("num_channels", (3,)), ("neck_ignore_stages", ([0, 1],))):
        _expect(d, key, allowed, what)
    # The hybrid passes the two ResNet maps through unchanged and reads only the last two factors.
    factors = list(d.get("reassemble_factors", (4, 2, 1, 0.5)))
    if len(factors) != 4 or factors[2:] != [1, 0.5]:
        raise CheckpointError(f"{what} has reassemble_factors={factors}; DPT-Hybrid's last two are 1 and 0.5")
    bb = d.get("backbone_config") or {}
    bwhat = what + " backbone_config"
    for key, allowed in (("model_type", ("bit",)), ("layer_type", ("bottleneck",)),
                         ("global_padding", ("same", "SAME")), ("hidden_act", ("relu",)), ("width_factor", (1,)),
                         ("embedding_dynamic_padding", (True,)), ("num_channels", (3,))):
        _expect(bb, key, allowed, bwhat)
    depths = tuple(bb.get("depths", (3, 4, 9)))
    widths = tuple(bb.get("hidden_sizes", (256, 512, 1024, 2048)))[: len(depths)]
    if bb.get("output_stride", 32) < 4 * 2 ** (len(depths) - 1):
        raise CheckpointError(f"{bwhat} has output_stride={bb['output_stride']}; dilated stages are not supported")
    outs = bb.get("out_features")
    if outs is not None and list(outs) != [f"stage{i}" for i in range(1, len(depths) + 1)]:
        raise CheckpointError(f"{bwhat} has out_features={outs}; DPT-Hybrid reads every stage")
    indices = tuple(d.get("backbone_out_indices", (2, 5, 8, 11)))
    shape = d.get("backbone_featmap_shape")
    if len(indices) != 4:
        raise CheckpointError(f"{what} has backbone_out_indices={list(indices)}; DPT reads four maps")
    if shape is not None and len(widths) and shape[1] != widths[-1]:
        raise CheckpointError(f"{what} has backbone_featmap_shape={shape} but the last stage has {widths[-1]} "
                              "channels")
    image_size, patch_size = d.get("image_size", 384), d.get("patch_size", 16)
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise CheckpointError(f"{what} has image_size={image_size!r}, patch_size={patch_size!r}; square only")
    try:
        return DPTConfig(
            image_size=image_size, patch_size=patch_size, stem_width=bb.get("embedding_size", 64),
            stage_widths=widths, stage_depths=depths, groups=bb.get("num_groups", 32),
            width=d["hidden_size"], layers=d["num_hidden_layers"], heads=d["num_attention_heads"],
            mlp_width=d["intermediate_size"], layer_norm_eps=d.get("layer_norm_eps", 1e-12),
            hooks=(indices[2], indices[3]), neck_widths=tuple(d["neck_hidden_sizes"]),
            features=d.get("fusion_hidden_size", 256))
    except ValueError as e:
        raise CheckpointError(f"{what}: {e}") from e


def preprocessing_from_transformers(d: dict) -> DepthPreprocessing:
    """A ``feature_extractor/preprocessor_config.json`` (``DPTImageProcessor``) -> ``DepthPreprocessing``.

    Absent fields take ``DPTImageProcessor``'s defaults (which are SD 2 depth's). Padding
    (``do_pad`` with ``size_divisor``) is not supported."""
    what = "preprocessor_config.json"
    if d.get("do_pad") and d.get("size_divisor") not in (None, 1):
        raise CheckpointError(f"{what} asks for padding to a multiple of {d['size_divisor']}; not supported")
    size = d.get("size", {"height": 384, "width": 384})
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if "height" not in size or "width" not in size:
        raise CheckpointError(f"{what} has size={size}; DPT needs height and width")
    base = DepthPreprocessing()
    return DepthPreprocessing(
        size=(size["height"], size["width"]),
        keep_aspect_ratio=d.get("keep_aspect_ratio", base.keep_aspect_ratio),
        ensure_multiple_of=d.get("ensure_multiple_of", base.ensure_multiple_of),
        resample=d.get("resample", base.resample),
        do_resize=d.get("do_resize", base.do_resize),
        do_rescale=d.get("do_rescale", base.do_rescale),
        rescale_factor=d.get("rescale_factor", base.rescale_factor),
        do_normalize=d.get("do_normalize", base.do_normalize),
        mean=tuple(d.get("image_mean", base.mean)),
        std=tuple(d.get("image_std", base.std)),
    )


def depth_config_to_transformers(cfg: DPTConfig) -> dict[str, Any]:
    """``DPTConfig`` -> a transformers ``DPTForDepthEstimation`` config.json dict (is_hybrid, BiT backbone),
    the inverse of :func:`depth_config_from_transformers`."""
    backbone = {"model_type": "bit", "embedding_size": cfg.stem_width, "hidden_sizes": list(cfg.stage_widths),
                "depths": list(cfg.stage_depths), "num_groups": cfg.groups, "layer_type": "bottleneck",
                "global_padding": "same", "embedding_dynamic_padding": True, "hidden_act": "relu",
                "out_features": [f"stage{i}" for i in range(1, len(cfg.stage_depths) + 1)]}
    return {"architectures": ["DPTForDepthEstimation"], "model_type": "dpt", "is_hybrid": True,
            "hidden_size": cfg.width, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
            "intermediate_size": cfg.mlp_width, "hidden_act": "gelu", "image_size": cfg.image_size,
            "patch_size": cfg.patch_size, "num_channels": 3, "qkv_bias": True, "layer_norm_eps": cfg.layer_norm_eps,
            "backbone_out_indices": [0, 1, *cfg.hooks], "neck_hidden_sizes": list(cfg.neck_widths),
            "reassemble_factors": [1, 1, 1, 0.5], "fusion_hidden_size": cfg.features, "readout_type": "project",
            "neck_ignore_stages": [0, 1], "head_in_index": -1, "add_projection": False,
            "use_batch_norm_in_fusion_residual": False,
            "backbone_featmap_shape": [1, cfg.stage_widths[-1], cfg.grid, cfg.grid], "backbone_config": backbone}


def preprocessing_to_transformers(prep: DepthPreprocessing) -> dict[str, Any]:
    """``DepthPreprocessing`` -> a ``DPTImageProcessor`` preprocessor_config.json dict."""
    return {"image_processor_type": "DPTImageProcessor", "size": {"height": prep.size[0], "width": prep.size[1]},
            "keep_aspect_ratio": prep.keep_aspect_ratio, "ensure_multiple_of": prep.ensure_multiple_of,
            "resample": int(prep.resample), "do_resize": prep.do_resize, "do_rescale": prep.do_rescale,
            "rescale_factor": prep.rescale_factor, "do_normalize": prep.do_normalize,
            "image_mean": list(prep.mean), "image_std": list(prep.std), "do_pad": False}


def build_depth_estimator(
    cfg: DPTConfig,
    tensors: Mapping[str, Tensor],
    *,
    source: str,
    dtype: torch.dtype | None = None,
) -> DPTDepthModel:
    """Build on ``meta`` and load ``tensors`` (original MiDaS layout, no ``depth_model.model.`` prefix)
    strictly: every key used, shapes checked; only ``IGNORED_ORIGINAL_KEYS`` may be extra.

    For a diffusers ``depth_estimator/`` pass ``depth_from_transformers(tensors, cfg)``."""
    tensors = {k: (v.to(dtype) if dtype is not None else v) for k, v in tensors.items()
               if k not in IGNORED_ORIGINAL_KEYS}
    with ops.meta_device():
        model = DPTDepthModel(cfg)
    assign_weights(model, tensors, source=source, what="depth estimator")
    return model.eval()
