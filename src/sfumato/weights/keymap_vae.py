"""Key tables between the LDM VAE layout (ours: keys below ``first_stage_model.``) and diffusers' VAE.

The renames are literal data; ``vae_key_map`` expands them over levels and blocks from a
``VAEConfig`` (the same role as diffusers' ``DIFFUSERS_TO_LDM_MAPPING`` plus
``convert_ldm_vae_checkpoint`` in ``diffusers/loaders/single_file_utils.py``, and ComfyUI's
``comfy/diffusers_convert.py``). The only reshape is the middle attention's projections:
LDM stores 1x1 convs (C, C, 1, 1), diffusers Linear layers (C, C).

Configs: ``vae_config_from_diffusers`` / ``vae_config_to_diffusers`` translate a diffusers
``config.json``; ``vae_config_from_state_dict`` reads a ``VAEConfig`` from LDM tensor shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

from torch import Tensor

from sfumato.config import VAEConfig
from sfumato.errors import CheckpointError

__all__ = [
    "vae_key_map",
    "vae_from_diffusers",
    "vae_to_diffusers",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
    "vae_config_from_state_dict",
]

# --- rename table (LDM module path -> diffusers module path) --------------------------------------

TOP_LEVEL: dict[str, str] = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.norm_out": "encoder.conv_norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.norm_out": "decoder.conv_norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
MID_RESNETS: dict[str, str] = {"mid.block_1": "mid_block.resnets.0", "mid.block_2": "mid_block.resnets.1"}
MID_ATTENTION: tuple[str, str] = ("mid.attn_1", "mid_block.attentions.0")
ENCODER_LEVEL: tuple[str, str] = ("encoder.down.{i}", "encoder.down_blocks.{i}")
DECODER_LEVEL: tuple[str, str] = ("decoder.up.{i}", "decoder.up_blocks.{j}")  # j = levels - 1 - i
RESNETS: tuple[str, str] = ("block.{b}", "resnets.{b}")
DOWNSAMPLE: tuple[str, str] = ("downsample.conv", "downsamplers.0.conv")
UPSAMPLE: tuple[str, str] = ("upsample.conv", "upsamplers.0.conv")

RESNET_PARTS: dict[str, str] = {
    "norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut",
}
ATTENTION_NORM: tuple[str, str] = ("norm", "group_norm")
ATTENTION_PROJECTIONS: dict[str, str] = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers before 0.14 named the attention projections differently; older folders still carry these.
LEGACY_ATTENTION: dict[str, str] = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# Block types a diffusers config must use for the LDM architecture.
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"


# --- reshapes -------------------------------------------------------------------------------------


def linear_to_conv1x1(w: Tensor) -> Tensor:
    """diffusers Linear weight (C_out, C_in) -> LDM 1x1 conv weight (C_out, C_in, 1, 1).

    Also accepts weights already shaped as convs (some old conversions kept (C, C, 1) or (C, C, 1, 1)).
    """
    return w.reshape(w.shape[0], w.shape[1], 1, 1)


def conv1x1_to_linear(w: Tensor) -> Tensor:
    """LDM 1x1 conv weight (C_out, C_in, 1, 1) -> diffusers Linear weight (C_out, C_in)."""
    return w.reshape(w.shape[0], w.shape[1])


class Rename(NamedTuple):
    diffusers: str
    to_ldm: Callable[[Tensor], Tensor] | None = None  # reshape applied diffusers -> LDM
    to_diffusers: Callable[[Tensor], Tensor] | None = None  # reshape applied LDM -> diffusers


# --- expansion over levels and blocks -------------------------------------------------------------


def vae_key_map(cfg: VAEConfig) -> dict[str, Rename]:
    """Every LDM parameter key of a VAE with ``cfg`` -> its diffusers key and reshapes."""
    modules: dict[str, str] = dict(TOP_LEVEL)  # LDM module -> diffusers module (weight + bias)
    table: dict[str, Rename] = {}

    def add_resnet(ldm: str, dif: str, c_in: int, c_out: int) -> None:
        for ldm_part, dif_part in RESNET_PARTS.items():
            # The shortcut projection exists only where the width changes.
            if ldm_part != "nin_shortcut" or c_in != c_out:
                modules[f"{ldm}.{ldm_part}"] = f"{dif}.{dif_part}"

    def add_mid(side: str, c: int) -> None:
        for ldm, dif in MID_RESNETS.items():
            add_resnet(f"{side}.{ldm}", f"{side}.{dif}", c, c)
        ldm_attn, dif_attn = (f"{side}.{p}" for p in MID_ATTENTION)
        modules[f"{ldm_attn}.{ATTENTION_NORM[0]}"] = f"{dif_attn}.{ATTENTION_NORM[1]}"
        for ldm, dif in ATTENTION_PROJECTIONS.items():
            weight = Rename(f"{dif_attn}.{dif}.weight", linear_to_conv1x1, conv1x1_to_linear)
            table[f"{ldm_attn}.{ldm}.weight"] = weight
            table[f"{ldm_attn}.{ldm}.bias"] = Rename(f"{dif_attn}.{dif}.bias")

    levels = len(cfg.ch_mult)
    block_in = cfg.ch
    for i, mult in enumerate(cfg.ch_mult):
        ldm_level, dif_level = (p.format(i=i) for p in ENCODER_LEVEL)
        for b in range(cfg.num_res_blocks):
            ldm_block, dif_block = (p.format(b=b) for p in RESNETS)
            add_resnet(f"{ldm_level}.{ldm_block}", f"{dif_level}.{dif_block}", block_in, cfg.ch * mult)
            block_in = cfg.ch * mult
        if i != levels - 1:
            modules[f"{ldm_level}.{DOWNSAMPLE[0]}"] = f"{dif_level}.{DOWNSAMPLE[1]}"
    add_mid("encoder", block_in)

    add_mid("decoder", block_in)
    for i in reversed(range(levels)):
        ldm_level, dif_level = (p.format(i=i, j=levels - 1 - i) for p in DECODER_LEVEL)
        for b in range(cfg.num_res_blocks + 1):
            ldm_block, dif_block = (p.format(b=b) for p in RESNETS)
            add_resnet(f"{ldm_level}.{ldm_block}", f"{dif_level}.{dif_block}", block_in, cfg.ch * cfg.ch_mult[i])
            block_in = cfg.ch * cfg.ch_mult[i]
        if i != 0:
            modules[f"{ldm_level}.{UPSAMPLE[0]}"] = f"{dif_level}.{UPSAMPLE[1]}"

    for ldm, dif in modules.items():
        for param in ("weight", "bias"):
            table[f"{ldm}.{param}"] = Rename(f"{dif}.{param}")
    return table


def _modern_diffusers_key(key: str) -> str:
    """Rewrite a pre-0.14 diffusers attention key (``...attentions.0.query.weight``) to today's name."""
    head, _, param = key.rpartition(".")
    prefix, _, name = head.rpartition(".")
    if name in LEGACY_ATTENTION and ".attentions." in f".{prefix}.":
        return f"{prefix}.{LEGACY_ATTENTION[name]}.{param}"
    return key


def _unknown_keys_error(direction: str, unknown: list[str]) -> CheckpointError:
    shown = ", ".join(sorted(unknown)[:12])
    more = f" (and {len(unknown) - 12} more)" if len(unknown) > 12 else ""
    return CheckpointError(f"VAE {direction}: {len(unknown)} key(s) not in the VAE key table: {shown}{more}")


def vae_from_diffusers(sd: Mapping[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKL`` state dict -> our (LDM) keys. Unknown keys raise ``CheckpointError``."""
    to_ldm = {r.diffusers: (ldm, r.to_ldm) for ldm, r in vae_key_map(cfg).items()}
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, w in sd.items():
        hit = to_ldm.get(_modern_diffusers_key(key))
        if hit is None:
            unknown.append(key)
            continue
        ldm, reshape = hit
        if ldm in out:
            raise CheckpointError(
                f"VAE from diffusers: {key!r} duplicates another key for {ldm!r} (old and new attention names)"
            )
        out[ldm] = w if reshape is None else reshape(w)
    if unknown:
        raise _unknown_keys_error("from diffusers", unknown)
    return out


def vae_to_diffusers(sd: Mapping[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """Our (LDM) VAE state dict -> diffusers ``AutoencoderKL`` keys (current names). Unknown keys raise."""
    table = vae_key_map(cfg)
    unknown = [k for k in sd if k not in table]
    if unknown:
        raise _unknown_keys_error("to diffusers", unknown)
    out: dict[str, Tensor] = {}
    for key, w in sd.items():
        r = table[key]
        out[r.diffusers] = w if r.to_diffusers is None else r.to_diffusers(w)
    return out


# --- configs --------------------------------------------------------------------------------------


def vae_config_from_diffusers(d: Mapping) -> VAEConfig:
    """A diffusers ``AutoencoderKL`` config (``vae/config.json``) -> ``VAEConfig``.

    Missing fields take diffusers' defaults, as ``from_config`` would. Variants the LDM
    architecture cannot express (other block types or activation, no quant convs, no middle
    attention) raise ``CheckpointError``.
    """
    boc = tuple(int(c) for c in d.get("block_out_channels", (64,)))
    down = tuple(d.get("down_block_types", (DOWN_BLOCK,)))
    up = tuple(d.get("up_block_types", (UP_BLOCK,)))
    problems = []
    if down != (DOWN_BLOCK,) * len(boc) or up != (UP_BLOCK,) * len(boc):
        problems.append(f"block types {down} / {up} for {len(boc)} levels (need {DOWN_BLOCK} / {UP_BLOCK})")
    if d.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn {d['act_fn']!r}")
    for flag in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not d.get(flag, True):
            problems.append(f"{flag}=False")
    ch = boc[0]
    if any(c % ch for c in boc):
        problems.append(f"block_out_channels {boc} are not multiples of the first")
    if problems:
        raise CheckpointError(f"diffusers VAE config not supported: {'; '.join(problems)}")
    latent = int(d.get("latent_channels", 4))
    return VAEConfig(
        in_channels=int(d.get("in_channels", 3)),
        out_ch=int(d.get("out_channels", 3)),
        ch=ch,
        ch_mult=tuple(c // ch for c in boc),
        num_res_blocks=int(d.get("layers_per_block", 1)),
        z_channels=latent,
        embed_dim=latent,
        norm_groups=int(d.get("norm_num_groups", 32)),
    )


def vae_config_to_diffusers(
    cfg: VAEConfig, *, scaling_factor: float, shift_factor: float | None = None, sample_size: int = 512,
    force_upcast: bool = True,
) -> dict:
    """``VAEConfig`` -> a ``config.json`` dict diffusers' ``AutoencoderKL.from_config`` accepts.

    ``sample_size`` is only diffusers' tiling tile size (512 for SD 1.x, 768/1024 for later families).
    """
    if cfg.z_channels != cfg.embed_dim:
        raise ValueError(
            f"diffusers' AutoencoderKL needs z_channels == embed_dim, got {cfg.z_channels} and {cfg.embed_dim}"
        )
    n = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_ch,
        "down_block_types": [DOWN_BLOCK] * n,
        "up_block_types": [UP_BLOCK] * n,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.embed_dim,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "force_upcast": force_upcast,
    }


def vae_config_from_state_dict(shapes: Mapping[str, tuple[int, ...]]) -> VAEConfig:
    """Read a ``VAEConfig`` from LDM VAE keys and shapes (keys with or without ``first_stage_model.``).

    GroupNorm weights do not reveal their group count, so ``norm_groups`` keeps its default (32,
    what every released VAE uses).
    """
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in shapes):
        shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"VAE state dict lacks {key!r}; is it an LDM-layout VAE?")
        return tuple(shapes[key])

    def count(pattern: str) -> int:
        n = 0
        while any(k.startswith(pattern.format(n=n) + ".") for k in shapes):
            n += 1
        return n

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = count("encoder.down.{n}")
    blocks = count("encoder.down.0.block.{n}")
    if levels == 0 or blocks == 0:
        raise CheckpointError("VAE state dict has no encoder.down.0.block.0 weights")
    ch_mult = []
    for i in range(levels):
        width = shape(f"encoder.down.{i}.block.0.conv1.weight")[0]
        if width % ch:
            raise CheckpointError(f"VAE level {i} width {width} is not a multiple of conv_in width {ch}")
        ch_mult.append(width // ch)
    z_channels, embed_dim = shape("post_quant_conv.weight")[:2]
    return VAEConfig(
        in_channels=in_channels,
        out_ch=shape("decoder.conv_out.weight")[0],
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=blocks,
        z_channels=z_channels,
        embed_dim=embed_dim,
    )
