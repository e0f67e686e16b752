"""Key tables and config translation between the LDM UNet layout (ours) and diffusers' ``UNet2DConditionModel``.

Ours are the original checkpoint keys below ``model.diffusion_model.`` (see ``sfumato.models.unet``).
The renames are literal data; ``unet_key_map`` expands them over levels and blocks from a
``UNetConfig``; the same role as ComfyUI's ``comfy/utils.py`` ``unet_to_diffusers`` and diffusers'
``convert_ldm_unet_checkpoint`` (``diffusers/loaders/single_file_utils.py``). No tensor needs a
reshape: both layouts store identical shapes (1x1-conv vs Linear projections follow
``use_linear_proj`` on both sides). Transformer internals (``transformer_blocks.K.attn1.to_q`` ...)
carry the same names in both layouts, so only their container is renamed.

Configs: ``unet_config_from_diffusers`` / ``unet_config_to_diffusers`` translate a diffusers
``unet/config.json``; ``unet_config_from_state_dict`` reads the architecture from LDM shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from sfumato.config import UNetConfig
from sfumato.errors import CheckpointError

__all__ = [
    "unet_key_map",
    "unet_from_diffusers",
    "unet_to_diffusers",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "unet_config_from_state_dict",
]

# --- rename table (LDM module path -> diffusers module path) --------------------------------------

TOP_LEVEL: dict[str, str] = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# ``label_emb`` by what feeds it: an ADM vector (diffusers' name depends on adm_kind) or class labels.
ADM_EMBED: dict[str, str] = {"label_emb.0.0": "{name}.linear_1", "label_emb.0.2": "{name}.linear_2"}
ADM_EMBED_NAME: dict[str, str] = {"text_time": "add_embedding", "image": "class_embedding"}
CLASS_EMBED: dict[str, str] = {"label_emb": "class_embedding"}

RESNET_PARTS: dict[str, str] = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
DOWN_RESNET: tuple[str, str] = ("input_blocks.{n}.0", "down_blocks.{i}.resnets.{j}")
DOWN_ATTENTION: tuple[str, str] = ("input_blocks.{n}.1", "down_blocks.{i}.attentions.{j}")
DOWNSAMPLE: tuple[str, str] = ("input_blocks.{n}.0.op", "down_blocks.{i}.downsamplers.0.conv")
MID_RESNETS: dict[str, str] = {"middle_block.0": "mid_block.resnets.0", "middle_block.2": "mid_block.resnets.1"}
MID_ATTENTION: tuple[str, str] = ("middle_block.1", "mid_block.attentions.0")
UP_RESNET: tuple[str, str] = ("output_blocks.{n}.0", "up_blocks.{i}.resnets.{j}")  # i = levels - 1 - level
UP_ATTENTION: tuple[str, str] = ("output_blocks.{n}.1", "up_blocks.{i}.attentions.{j}")
UPSAMPLE: tuple[str, str] = ("output_blocks.{n}.{m}.conv", "up_blocks.{i}.upsamplers.0.conv")  # m = 2 after attention

# What may follow an attention container (same in both layouts) or any other module.
ATTENTION_PARAM = re.compile(
    r"(norm|proj_in|proj_out|transformer_blocks\.\d+\.(norm[123]|attn[12]\.to_[qkv]|attn[12]\.to_out\.0"
    r"|ff\.net\.0\.proj|ff\.net\.2))\.(weight|bias)"
)
MODULE_PARAM = re.compile(r"weight|bias")

# diffusers block types for a level with / without transformers.
DOWN_BLOCK = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK = "UNetMidBlock2DCrossAttn"
SIZE_EMBED_DIM = 256  # width of each SDXL size-conditioning number's sinusoidal embedding

# diffusers config fields whose value is fixed by the LDM architecture: anything else cannot load.
FIXED_DIFFUSERS_FIELDS: dict[str, Any] = {
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
    "dual_cross_attention": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embeddings_concat": False,
    "attention_type": "default",
    "cross_attention_norm": None,
    "num_attention_heads": None,
}


# --- the key map ----------------------------------------------------------------------------------


def unet_key_map(cfg: UNetConfig) -> dict[str, tuple[str, bool]]:
    """LDM module path -> (diffusers module path, is a SpatialTransformer container), for ``cfg``."""
    m: dict[str, tuple[str, bool]] = {k: (v, False) for k, v in TOP_LEVEL.items()}
    if cfg.adm_in_channels is not None:
        if cfg.adm_kind not in ADM_EMBED_NAME:
            raise ValueError(f"UNetConfig.adm_kind must be one of {sorted(ADM_EMBED_NAME)}, got {cfg.adm_kind!r}")
        name = ADM_EMBED_NAME[cfg.adm_kind]
        m.update({k: (v.format(name=name), False) for k, v in ADM_EMBED.items()})
    elif cfg.num_classes is not None:
        m.update({k: (v, False) for k, v in CLASS_EMBED.items()})

    def resnet(ldm: str, dif: str) -> None:
        m.update({f"{ldm}.{a}": (f"{dif}.{b}", False) for a, b in RESNET_PARTS.items()})

    levels = len(cfg.channel_mult)
    n = 1
    for i in range(levels):
        for j in range(cfg.num_res_blocks[i]):
            resnet(DOWN_RESNET[0].format(n=n), DOWN_RESNET[1].format(i=i, j=j))
            if cfg.transformer_depth[i]:
                m[DOWN_ATTENTION[0].format(n=n)] = (DOWN_ATTENTION[1].format(i=i, j=j), True)
            n += 1
        if i != levels - 1:
            m[DOWNSAMPLE[0].format(n=n)] = (DOWNSAMPLE[1].format(i=i), False)
            n += 1
    if cfg.mid_block:
        for ldm, dif in MID_RESNETS.items():
            resnet(ldm, dif)
        m[MID_ATTENTION[0]] = (MID_ATTENTION[1], True)
    n = 0
    for i, level in enumerate(reversed(range(levels))):
        for j in range(cfg.num_res_blocks[level] + 1):
            resnet(UP_RESNET[0].format(n=n), UP_RESNET[1].format(i=i, j=j))
            has_attn = cfg.transformer_depth[level] > 0
            if has_attn:
                m[UP_ATTENTION[0].format(n=n)] = (UP_ATTENTION[1].format(i=i, j=j), True)
            if level and j == cfg.num_res_blocks[level]:
                m[UPSAMPLE[0].format(n=n, m=2 if has_attn else 1)] = (UPSAMPLE[1].format(i=i), False)
            n += 1
    return m


def _rename(sd: Mapping[str, Tensor], table: Mapping[str, tuple[str, bool]], what: str) -> dict[str, Tensor]:
    """Rename each key by its longest module-path prefix in ``table``; unknown keys raise, all listed."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            hit = table.get(".".join(parts[:cut]))
            if hit is not None:
                rest = ".".join(parts[cut:])
                if (ATTENTION_PARAM if hit[1] else MODULE_PARAM).fullmatch(rest):
                    out[f"{hit[0]}.{rest}"] = value
                    break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{what}: {len(unknown)} unknown UNet key(s) for this config: {', '.join(unknown)}")
    return out


def unet_from_diffusers(sd: dict[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict -> ours (LDM names); tensors are not copied."""
    inverse = {dif: (ldm, attn) for ldm, (dif, attn) in unet_key_map(cfg).items()}
    return _rename(sd, inverse, "diffusers UNet")


def unet_to_diffusers(sd: dict[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Our (LDM-named) UNet state dict -> diffusers ``UNet2DConditionModel`` names; tensors are not copied."""
    return _rename(sd, unet_key_map(cfg), "LDM UNet")


# --- configs --------------------------------------------------------------------------------------


def _per_level(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise CheckpointError(f"diffusers UNet config: {name} {value} needs {n} entries")
        return list(value)
    return [value] * n


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """A ``config.json`` that diffusers' ``UNet2DConditionModel.from_config`` builds into the same network.

    ``attention_head_dim`` is diffusers' historical misnomer for the number of heads: an int for a
    fixed head count, else the per-level head counts. diffusers has no separate middle-block depth
    (it reuses the last level's ``transformer_layers_per_block``), so a config whose last level has
    transformers of a depth other than the middle's cannot be written and raises ``ValueError``.
    """
    if cfg.context_dim is None:
        raise ValueError("diffusers' UNet2DConditionModel needs a cross-attention width (context_dim)")
    boc = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [d > 0 for d in cfg.transformer_depth]
    # levels without transformers ignore their entry: fill with the common depth when there is one,
    # so uniform models get the plain int official configs use
    used = {d for d in cfg.transformer_depth if d} | ({cfg.transformer_depth_middle} if cfg.mid_block else set())
    fill = used.pop() if len(used) == 1 else 1
    layers = [d if d else fill for d in cfg.transformer_depth]
    if cfg.mid_block:
        if attn[-1] and layers[-1] != cfg.transformer_depth_middle:
            raise ValueError(
                f"diffusers cannot express a middle depth {cfg.transformer_depth_middle} different from the "
                f"last level's {cfg.transformer_depth[-1]}"
            )
        layers[-1] = cfg.transformer_depth_middle
    nrb = list(cfg.num_res_blocks)
    d: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": boc,
        "down_block_types": [DOWN_BLOCK[a] for a in attn],
        "up_block_types": [UP_BLOCK[a] for a in reversed(attn)],
        "mid_block_type": MID_BLOCK if cfg.mid_block else None,
        "layers_per_block": nrb[0] if len(set(nrb)) == 1 else nrb,
        "transformer_layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "cross_attention_dim": cfg.context_dim,
        "attention_head_dim": cfg.num_heads if cfg.num_heads is not None else [c // cfg.heads_for(c)[1] for c in boc],
        "use_linear_projection": cfg.use_linear_proj,
        "upcast_attention": cfg.upcast_attention,
        "only_cross_attention": list(cfg.disable_self_attn) if cfg.disable_self_attn is not None else False,
        "class_embed_type": None,
        "addition_embed_type": None,
        "addition_time_embed_dim": None,
        "projection_class_embeddings_input_dim": None,
        "num_class_embeds": cfg.num_classes,
        **{k: v for k, v in FIXED_DIFFUSERS_FIELDS.items() if k != "num_attention_heads"},
    }
    if cfg.adm_in_channels is not None:
        if cfg.adm_kind == "text_time":
            d.update(addition_embed_type="text_time", addition_time_embed_dim=SIZE_EMBED_DIM)
        elif cfg.adm_kind == "image":
            d["class_embed_type"] = "projection"
        else:
            raise ValueError(f"UNetConfig.adm_kind must be 'text_time' or 'image', got {cfg.adm_kind!r}")
        d["projection_class_embeddings_input_dim"] = cfg.adm_in_channels
    return d


def unet_config_from_diffusers(d: dict) -> UNetConfig:
    """A diffusers ``unet/config.json`` (as a dict) -> ``UNetConfig``.

    Variants the LDM architecture cannot express (LCM's ``time_cond_proj_dim``, other block types,
    Kandinsky-style embeddings ...) raise ``CheckpointError`` naming the setting.
    """
    bad = [f"{k}={d[k]!r}" for k, v in FIXED_DIFFUSERS_FIELDS.items() if k in d and d[k] != v]
    if bad:
        raise CheckpointError(f"diffusers UNet config: unsupported settings {', '.join(bad)}")
    boc = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(boc)
    down = list(d.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = list(d.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    if any(t not in DOWN_BLOCK for t in down) or any(t not in UP_BLOCK for t in up) or len(down) != n:
        raise CheckpointError(f"diffusers UNet config: unsupported block types {down} / {up}")
    attn = [DOWN_BLOCK.index(t) == 1 for t in down]
    if [UP_BLOCK.index(t) == 1 for t in reversed(up)] != attn:
        raise CheckpointError(f"diffusers UNet config: up blocks {up} do not mirror down blocks {down}")
    mid_type = d.get("mid_block_type", MID_BLOCK)
    if mid_type not in (MID_BLOCK, None):
        raise CheckpointError(f"diffusers UNet config: unsupported mid_block_type {mid_type!r}")
    mc = boc[0]
    if any(c % mc for c in boc):
        raise CheckpointError(f"diffusers UNet config: block_out_channels {boc} are not multiples of {mc}")

    layers = _per_level(d.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    if any(isinstance(x, (list, tuple)) for x in layers) or d.get("reverse_transformer_layers_per_block"):
        raise CheckpointError("diffusers UNet config: per-block (asymmetric) transformer depths are not supported")
    heads = d.get("attention_head_dim", 8)
    if isinstance(heads, int):
        num_heads, head_dim = heads, None
    else:
        heads = _per_level(heads, n, "attention_head_dim")
        dims = {c // h for c, h in zip(boc, heads)}
        if len(dims) == 1 and all(c % h == 0 for c, h in zip(boc, heads)):
            num_heads, head_dim = None, dims.pop()
        elif len(set(heads)) == 1:
            num_heads, head_dim = heads[0], None
        else:
            raise CheckpointError(f"diffusers UNet config: head counts {heads} fit neither a fixed count nor width")
    context = d.get("cross_attention_dim", 1280)
    if isinstance(context, (list, tuple)):
        if len(set(context)) != 1:
            raise CheckpointError(f"diffusers UNet config: per-level cross_attention_dim {context} not supported")
        context = context[0]
    only_cross = d.get("only_cross_attention", False)
    disable_self = tuple(bool(x) for x in _per_level(only_cross, n, "only_cross_attention")) if only_cross else None

    adm_in = adm_kind = None
    class_type, add_type = d.get("class_embed_type"), d.get("addition_embed_type")
    if class_type not in (None, "projection") or add_type not in (None, "text_time"):
        raise CheckpointError(f"diffusers UNet config: class_embed_type {class_type!r} / "
                              f"addition_embed_type {add_type!r} not supported")
    if class_type and add_type:
        raise CheckpointError("diffusers UNet config: both class_embed_type and addition_embed_type are set")
    if class_type or add_type:
        adm_in = d.get("projection_class_embeddings_input_dim")
        if adm_in is None:
            raise CheckpointError("diffusers UNet config: projection_class_embeddings_input_dim is missing")
        adm_kind = "image" if class_type else "text_time"
        if add_type and d.get("addition_time_embed_dim") != SIZE_EMBED_DIM:
            raise CheckpointError(f"diffusers UNet config: addition_time_embed_dim must be {SIZE_EMBED_DIM}")
    num_classes = d.get("num_class_embeds") if class_type is None else None

    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        model_channels=mc,
        channel_mult=tuple(c // mc for c in boc),
        num_res_blocks=tuple(_per_level(d.get("layers_per_block", 2), n, "layers_per_block")),
        transformer_depth=tuple(x if a else 0 for x, a in zip(layers, attn)),
        mid_block=mid_type is not None,
        # diffusers' middle block reuses the last level's depth; without one the field is moot
        transformer_depth_middle=layers[-1] if mid_type is not None else 1,
        num_heads=num_heads,
        head_dim=head_dim,
        context_dim=context,
        use_linear_proj=bool(d.get("use_linear_projection", False)),
        adm_in_channels=adm_in,
        adm_kind=adm_kind,
        num_classes=num_classes,
        disable_self_attn=disable_self,
        upcast_attention=bool(d.get("upcast_attention") or False),
    )


# --- architecture from shapes ---------------------------------------------------------------------


def _depth(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    k = 0
    while f"{prefix}.transformer_blocks.{k}.attn1.to_q.weight" in shapes:
        k += 1
    return k


def unet_config_from_state_dict(shapes: Mapping[str, tuple[int, ...]]) -> UNetConfig:
    """Infer the architecture from LDM key names and shapes alone (keys relative to the UNet).

    The level structure is read from the output blocks (every level has ``num_res_blocks + 1`` of
    them there, the last one carrying the upsampler), then checked against the input blocks.

    Not in the shapes, so chosen by convention (callers override from a preset when they know better):
    - the head split: ``head_dim=64`` with linear projections (SD 2.x, SDXL), else ``num_heads=8``
      (SD 1.x). The x4 upscaler has linear projections but 8 heads: its preset says so.
    - ``adm_kind`` stays None: the UNet alone cannot tell SDXL's size vector from unCLIP's image
      embedding; the family detector sets it.
    - ``upcast_attention`` is False (a numerics choice, not a weight).
    - ``disable_self_attn`` is True where ``attn1.to_k`` reads a width other than the level's own
      (it reads the context); a level without transformers takes the nearest such level's flag, which
      reproduces the upscaler's official ``(True, True, True, False)``.
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"UNet state dict: missing {key!r}; not an LDM UNet?")
        return tuple(shapes[key])

    mc, in_channels = shape("input_blocks.0.0.weight")[:2]
    out_channels = shape("out.2.weight")[0]

    levels: list[tuple[int, int, int, bool]] = []  # (channels, blocks, depth, only_cross), deepest first
    n = 0
    blocks = 0
    while f"output_blocks.{n}.0.in_layers.0.weight" in shapes:
        ch = shape(f"output_blocks.{n}.0.out_layers.3.weight")[0]
        depth = _depth(shapes, f"output_blocks.{n}.1")
        only_cross = depth > 0 and shape(f"output_blocks.{n}.1.transformer_blocks.0.attn1.to_k.weight")[1] != ch
        blocks += 1
        upsample = any(f"output_blocks.{n}.{m}.conv.weight" in shapes for m in (1, 2))
        n += 1
        if upsample or f"output_blocks.{n}.0.in_layers.0.weight" not in shapes:
            levels.append((ch, blocks - 1, depth, only_cross))
            blocks = 0
    if not levels:
        raise CheckpointError("UNet state dict: no output_blocks found; not an LDM UNet?")
    levels.reverse()
    n_input = 1 + sum(lv[1] for lv in levels) + len(levels) - 1
    if f"input_blocks.{n_input - 1}.0.in_layers.0.weight" not in shapes or any(
        k.startswith(f"input_blocks.{n_input}.") for k in shapes
    ):
        raise CheckpointError(f"UNet state dict: input blocks do not mirror the {n} output blocks")

    attn_keys = [k for k in shapes if k.endswith("attn2.to_k.weight")]
    proj_keys = [k for k in shapes if k.endswith("proj_in.weight")]
    linear = bool(proj_keys) and len(shapes[proj_keys[0]]) == 2
    flags = [lv[3] for lv in levels]
    attn_levels = [i for i, lv in enumerate(levels) if lv[2] > 0]
    if any(flags) and attn_levels:
        flags = [flags[min(attn_levels, key=lambda a: abs(a - i))] for i in range(len(levels))]
    mid = "middle_block.0.in_layers.0.weight" in shapes
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=mc,
        channel_mult=tuple(lv[0] // mc for lv in levels),
        num_res_blocks=tuple(lv[1] for lv in levels),
        transformer_depth=tuple(lv[2] for lv in levels),
        mid_block=mid,
        transformer_depth_middle=_depth(shapes, "middle_block.1") if mid else 1,
        num_heads=None if linear else 8,
        head_dim=64 if linear else None,
        context_dim=shapes[attn_keys[0]][1] if attn_keys else None,
        use_linear_proj=linear,
        adm_in_channels=shape("label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in shapes else None,
        num_classes=shape("label_emb.weight")[0] if "label_emb.weight" in shapes else None,
        disable_self_attn=tuple(flags) if any(flags) else None,
    )
