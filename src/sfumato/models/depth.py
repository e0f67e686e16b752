"""The MiDaS DPT-Hybrid depth estimator: SD 2 depth2img's conditioning network, image -> relative inverse depth.

Ranftl, Bochkovskiy and Koltun 2021, "Vision Transformers for Dense Prediction" (DPT), as MiDaS v3
``dpt_hybrid`` ships it. The encoder is timm's ``vit_base_resnet50_384``: a BiT ResNet (Kolesnikov et
al. 2020) of weight-standardised convolutions with TF "same" padding and group norm (stem, then three
bottleneck stages, stride 16 in all) whose last feature map is embedded by a 1x1 conv, given a class
token and position embeddings (bilinearly resized to the input's grid), and run through ViT-Base
blocks. Four maps feed the decoder: the outputs of ResNet stages 1 and 2 as they are, and the tokens
after two chosen ViT blocks, "reassembled" into maps: the class token is concatenated to every patch
token and projected back (readout "project"), then a 1x1 conv, and for the last one a stride-2 conv.
Each map is brought to ``features`` channels (``scratch.layerN_rn``) and fused coarse to fine by
RefineNet blocks (two pre-activation residual conv units, x2 bilinear upsampling, 1x1 conv); the head
halves the channels, upsamples x2 and regresses one non-negative channel at the input resolution.

Module attributes follow the original checkpoint (MiDaS ``DPTDepthModel`` around the timm model:
``pretrained.model.patch_embed.backbone.stem.conv``, ``pretrained.model.blocks.N.attn.qkv``,
``pretrained.act_postprocess3``, ``scratch.refinenetN.resConfUnit1.conv1``, ``scratch.output_conv``),
so the weights SD 2's ``512-depth-ema.ckpt`` stores under ``depth_model.model.`` load through an
identity map; ``sfumato.weights.keymap_depth`` renames transformers' ``DPTForDepthEstimation``
(a diffusers ``depth_estimator/`` folder). In the hybrid model ``act_postprocess1``/``2`` are
parameter-free identities and are not modules here.

``preprocess`` is transformers' ``DPTImageProcessor`` (PIL backend) for the settings diffusers'
``StableDiffusionDepth2ImgPipeline`` uses: bicubic resize to 384 x 384 (or aspect-preserving,
rounded to a multiple), pixels / 255, then ``(x - 0.5) / 0.5``.

References: isl-org/MiDaS ``midas/dpt_depth.py``, ``midas/blocks.py``, ``midas/vit.py``
(``_make_vit_b_rn50_backbone``, ``forward_flex``, ``_resize_pos_embed``); timm
``models/resnetv2.py``, ``layers/std_conv.py`` (``StdConv2dSame``), ``vision_transformer_hybrid.py``;
transformers ``models/dpt/modeling_dpt.py``, ``models/bit/modeling_bit.py``,
``models/dpt/image_processing_pil_dpt.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sfumato.models import ops

__all__ = [
    "DEPTH_PRESETS",
    "DPTConfig",
    "DPTDepthModel",
    "DepthPreprocessing",
    "bottleneck_width",
    "estimate_depth",
    "pad_same",
    "preprocess",
    "resize_pos_embed",
    "resize_size",
    "standardize_weight",
]


def bottleneck_width(out_channels: int, divisor: int = 8) -> int:
    """timm/BiT ``make_div(out_channels * 0.25)``: a bottleneck's inner width, a multiple of ``divisor``."""
    value = out_channels * 0.25
    width = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return width + divisor if width < 0.9 * value else width


@dataclass(frozen=True)
class DPTConfig:
    """A DPT-Hybrid depth estimator; the defaults are MiDaS v3 ``dpt_hybrid`` (SD 2 depth2img)."""

    image_size: int = 384  # the position embeddings cover (image_size // patch_size)^2 patches
    patch_size: int = 16  # the ResNet's total stride: stem 4, then x2 per stage after the first
    stem_width: int = 64
    stage_widths: tuple[int, ...] = (256, 512, 1024)
    stage_depths: tuple[int, ...] = (3, 4, 9)
    groups: int = 32  # group norm groups in the ResNet
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    layer_norm_eps: float = 1e-6  # timm's ViT; transformers' DPTConfig says 1e-12 (read from its config.json)
    hooks: tuple[int, int] = (8, 11)  # ViT blocks whose outputs become the third and fourth maps
    neck_widths: tuple[int, int, int, int] = (256, 512, 768, 768)  # channels of the four maps
    features: int = 256  # channels through the fusion blocks

    def __post_init__(self) -> None:
        if len(self.stage_widths) != 3 or len(self.stage_depths) != 3:
            raise ValueError("DPT-Hybrid's ResNet has three stages (two feature maps, one patch-embedded)")
        if self.patch_size != 4 * 2 ** (len(self.stage_widths) - 1):
            raise ValueError(f"patch_size {self.patch_size} is not the ResNet's stride "
                             f"{4 * 2 ** (len(self.stage_widths) - 1)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if tuple(self.neck_widths[:2]) != tuple(self.stage_widths[:2]):
            raise ValueError(f"neck_widths {self.neck_widths} must start with the first two stage widths "
                             f"{self.stage_widths[:2]}: those maps are used as the ResNet makes them")
        if not 0 <= self.hooks[0] < self.hooks[1] < self.layers:
            raise ValueError(f"hooks {self.hooks} must be increasing block indices below layers={self.layers}")
        widths = [self.stem_width, *self.stage_widths, *(bottleneck_width(w) for w in self.stage_widths)]
        if any(w % self.groups for w in widths):
            raise ValueError(f"ResNet widths {widths} are not all multiples of groups={self.groups}")
        if self.features % 2:
            raise ValueError(f"features {self.features} must be even (the head halves it)")

    @property
    def grid(self) -> int:
        """Patches per side that the stored position embeddings cover."""
        return self.image_size // self.patch_size


# MiDaS v3 dpt_hybrid (dpt_hybrid-midas-501f0c75.pt), the depth model inside SD 2's 512-depth-ema.ckpt
# and, in transformers' layout, Intel/dpt-hybrid-midas (diffusers' depth_estimator/).
DEPTH_PRESETS: dict[str, DPTConfig] = {"dpt-hybrid": DPTConfig()}


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow "SAME" padding: output size ceil(size / stride), the odd pixel at the bottom/right."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    if ph or pw:
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=value)
    return x


def standardize_weight(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Weight standardisation (Qiao et al. 2019): each output filter to zero mean, unit (biased) variance.

    Computed in fp32 (eps 1e-8 underflows in fp16); written as timm does, a batch norm over filters."""
    w = weight.float()
    w = F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=eps)
    return w.reshape_as(weight).to(weight.dtype)


class StdConv2dSame(nn.Conv2d):
    """timm ``StdConv2dSame``: a bias-free conv with standardised weights and "SAME" padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, eps: float = 1e-8) -> None:
        super().__init__(in_channels, out_channels, kernel, stride=stride, padding=0, bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, standardize_weight(self.weight, self.eps).to(x.dtype), None, self.stride)


class GroupNormAct(nn.GroupNorm):
    """timm ``GroupNormAct``: group norm, then ReLU unless ``act`` is False."""

    def __init__(self, groups: int, channels: int, act: bool = True) -> None:
        super().__init__(groups, channels, eps=1e-5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.relu(x) if self.act else x


class DownsampleConv(nn.Module):
    """The projection shortcut of a stage's first block: strided 1x1 conv + group norm (no ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv = StdConv2dSame(in_channels, out_channels, 1, stride=stride)
        self.norm = GroupNormAct(groups, out_channels, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """timm ResNetV2 ``Bottleneck`` (non-pre-activation, stride on the 3x3): relu(x' + shortcut)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, first: bool) -> None:
        super().__init__()
        mid = bottleneck_width(out_channels)
        self.downsample = DownsampleConv(in_channels, out_channels, stride, groups) if first else None
        self.conv1 = StdConv2dSame(in_channels, mid, 1)
        self.norm1 = GroupNormAct(groups, mid)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride=stride)
        self.norm2 = GroupNormAct(groups, mid)
        self.conv3 = StdConv2dSame(mid, out_channels, 1)
        self.norm3 = GroupNormAct(groups, out_channels, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class ResNetStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, depth: int, stride: int, groups: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(
            Bottleneck(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1, groups, i == 0)
            for i in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Stem(nn.Module):
    """7x7/2 standardised conv, group norm + ReLU, 3x3/2 max pool, all "SAME"-padded: stride 4."""

    def __init__(self, width: int, groups: int) -> None:
        super().__init__()
        self.conv = StdConv2dSame(3, width, 7, stride=2)
        self.norm = GroupNormAct(groups, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        # timm pads with -inf; after the ReLU every window holds a value >= 0, so 0 gives the same maximum.
        return F.max_pool2d(pad_same(x, 3, 2), 3, 2)


class ResNetV2(nn.Module):
    """The hybrid ViT's convolutional front (timm ``ResNetV2``, ``preact=False``, ``stem_type="same"``)."""

    def __init__(self, cfg: DPTConfig) -> None:
        super().__init__()
        self.stem = Stem(cfg.stem_width, cfg.groups)
        ins = (cfg.stem_width, *cfg.stage_widths[:-1])
        self.stages = nn.ModuleList(
            ResNetStage(i, o, d, 1 if n == 0 else 2, cfg.groups)
            for n, (i, o, d) in enumerate(zip(ins, cfg.stage_widths, cfg.stage_depths, strict=True)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pixels -> every stage's output (strides 4, 8, 16)."""
        x = self.stem(x)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class HybridEmbed(nn.Module):
    def __init__(self, cfg: DPTConfig) -> None:
        super().__init__()
        self.backbone = ResNetV2(cfg)
        self.proj = nn.Conv2d(cfg.stage_widths[-1], cfg.width, kernel_size=1)


class Attention(nn.Module):
    def __init__(self, cfg: DPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # timm packs (3, heads, head_dim) along the features
        return self.proj(ops.attention(q, k, v, self.heads))


class Mlp(nn.Module):
    def __init__(self, cfg: DPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """timm ViT pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: DPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def resize_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + grid_h*grid_w, D): the patch part resized bilinearly, as MiDaS's
    ``_resize_pos_embed`` (align_corners False); the class token's embedding is kept."""
    cls, grid = pos_embed[:, :1], pos_embed[0, 1:]
    g = math.isqrt(grid.shape[0])
    if (grid_h, grid_w) != (g, g):
        grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
    else:
        grid = grid[None]
    return torch.cat([cls, grid], dim=1)


class VisionTransformerHybrid(nn.Module):
    """timm ``vit_base_resnet50_384`` without its ImageNet head (unused by MiDaS; see keymap_depth)."""

    def __init__(self, cfg: DPTConfig) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid**2 + 1, cfg.width))
        self.patch_embed = HybridEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        # Applied after the last block by timm, but no map DPT reads passes through it; kept for the key.
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


class ProjectReadout(nn.Module):
    """Readout "project": each patch token concatenated with the class token, Linear(2D -> D) + GELU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x[:, 1:]  # (B, N, D)
        readout = x[:, :1].expand_as(patches)
        return self.project(torch.cat([patches, readout], dim=-1))


class Pretrained(nn.Module):
    """MiDaS's ``pretrained``: the timm model plus the reassemble operations of its two ViT maps.

    ``act_postprocessN`` keep MiDaS's Sequential indices: 0 readout, 1-2 the (parameter-free) transpose
    and unflatten, 3 the 1x1 conv to the map's width, 4 (last map only) a 3x3 stride-2 conv."""

    def __init__(self, cfg: DPTConfig) -> None:
        super().__init__()
        d, (_, _, c3, c4) = cfg.width, cfg.neck_widths
        self.model = VisionTransformerHybrid(cfg)
        self.act_postprocess3 = nn.Sequential(ProjectReadout(d), nn.Identity(), nn.Identity(), nn.Conv2d(d, c3, 1))
        self.act_postprocess4 = nn.Sequential(ProjectReadout(d), nn.Identity(), nn.Identity(), nn.Conv2d(d, c4, 1),
                                              nn.Conv2d(c4, c4, 3, stride=2, padding=1))


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit: x + conv2(relu(conv1(relu(x))))."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """RefineNet fusion: (x + rcu1(skip)) -> rcu2 -> x2 bilinear (align_corners) -> 1x1 conv."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)  # unused by the coarsest block, but stored
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        return self.out_conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


class Scratch(nn.Module):
    def __init__(self, cfg: DPTConfig) -> None:
        super().__init__()
        f = cfg.features
        for n, c in enumerate(cfg.neck_widths, start=1):
            setattr(self, f"layer{n}_rn", nn.Conv2d(c, f, 3, padding=1, bias=False))
        for n in range(1, 5):
            setattr(self, f"refinenet{n}", FeatureFusionBlock(f))
        # MiDaS's head with non_negative=True; index 1 is its Interpolate, 3 and 5 are ReLUs.
        self.output_conv = nn.Sequential(
            nn.Conv2d(f, f // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(f // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
            nn.ReLU(),
        )


class DPTDepthModel(nn.Module):
    """DPT-Hybrid: pixels (B, 3, H, W), normalised to [-1, 1] (see ``preprocess``) -> relative inverse
    depth (B, H, W), non-negative, larger = nearer. H and W must be multiples of ``2 * patch_size``
    (the fourth map is the ViT grid at stride 2 and is upsampled back onto the third)."""

    def __init__(self, cfg: DPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pretrained = Pretrained(cfg)
        self.scratch = Scratch(cfg)

    def encode(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The four maps DPT fuses: (B, C_n, H / s_n, W / s_n), s = 4, 8, 16, 32."""
        b, _, h, w = pixels.shape
        step = 2 * self.cfg.patch_size
        if h % step or w % step:
            raise ValueError(f"image of {h}x{w} pixels; the depth estimator takes multiples of {step} "
                             "(see preprocess)")
        vit = self.pretrained.model
        x = pixels.to(vit.cls_token.dtype)
        layer_1, layer_2, last = vit.patch_embed.backbone(x)
        gh, gw = h // self.cfg.patch_size, w // self.cfg.patch_size
        x = vit.patch_embed.proj(last).flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        x = torch.cat([vit.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + resize_pos_embed(vit.pos_embed, gh, gw)  # (B, 1 + gh*gw, D)
        hooked = []
        for i, block in enumerate(vit.blocks[: self.cfg.hooks[1] + 1]):
            x = block(x)
            if i in self.cfg.hooks:
                hooked.append(x)
        maps = [layer_1, layer_2]
        for post, tokens in zip((self.pretrained.act_postprocess3, self.pretrained.act_postprocess4), hooked,
                                strict=True):
            y = post[0](tokens).transpose(1, 2).reshape(b, -1, gh, gw)  # (B, D, gh, gw)
            for conv in post[3:]:
                y = conv(y)
            maps.append(y)
        return maps

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.scratch
        l1, l2, l3, l4 = (conv(m) for conv, m in zip((s.layer1_rn, s.layer2_rn, s.layer3_rn, s.layer4_rn),
                                                     self.encode(pixels), strict=True))
        path = s.refinenet4(l4)
        path = s.refinenet3(path, l3)
        path = s.refinenet2(path, l2)
        path = s.refinenet1(path, l1)
        return s.output_conv(path).squeeze(1)  # (B, H, W)


@dataclass(frozen=True)
class DepthPreprocessing:
    """``DPTImageProcessor`` settings (a ``preprocessor_config.json``); defaults = SD 2 depth's."""

    size: tuple[int, int] = (384, 384)  # (height, width)
    keep_aspect_ratio: bool = False
    ensure_multiple_of: int = 1
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


def _to_rgb(image: Image.Image) -> Image.Image:
    # transformers' DPT processor does not convert (an RGBA image would give 4 channels); composite
    # transparency over white as its convert_to_rgb and sfumato's CLIP preprocessing do.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _multiple(value: float, multiple: int) -> int:
    # transformers' constrain_to_multiple_of (Python's round: halves to even) with min 0, no max.
    x = round(value / multiple) * multiple
    return math.ceil(value / multiple) * multiple if x < 0 else x


def resize_size(width: int, height: int, prep: DepthPreprocessing) -> tuple[int, int]:
    """The (width, height) ``DPTImageProcessor`` resizes a ``width`` x ``height`` image to."""
    out_h, out_w = prep.size
    scale_h, scale_w = out_h / height, out_w / width
    if prep.keep_aspect_ratio:
        # the scale closer to 1 wins, so the image changes as little as possible
        if abs(1 - scale_w) < abs(1 - scale_h):
            scale_h = scale_w
        else:
            scale_w = scale_h
    return _multiple(scale_w * width, prep.ensure_multiple_of), _multiple(scale_h * height, prep.ensure_multiple_of)


def preprocess(images: Image.Image | Sequence[Image.Image], prep: DepthPreprocessing = DepthPreprocessing()
               ) -> torch.Tensor:
    """PIL image(s) -> pixels (B, 3, H, W), float32, as transformers' ``DPTImageProcessor`` makes them.

    RGB; PIL resize of the 8-bit image (bicubic by default) to ``resize_size``; ``x * rescale_factor``
    computed in float64 and stored as float32; ``(x - mean) / std`` in float32. All images of a batch
    must come out the same size."""
    if isinstance(images, Image.Image):
        images = [images]
    if not images:
        raise ValueError("preprocess needs at least one image")
    out = []
    for image in images:
        image = _to_rgb(image)
        if prep.do_resize:
            image = image.resize(resize_size(*image.size, prep), resample=Image.Resampling(prep.resample))
        x = np.asarray(image)  # (H, W, 3) uint8
        if prep.do_rescale:
            x = (x.astype(np.float64) * prep.rescale_factor).astype(np.float32)
        x = x.astype(np.float32)
        if prep.do_normalize:
            x = (x - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
        out.append(x.transpose(2, 0, 1))
    if len({a.shape for a in out}) > 1:
        raise ValueError(f"images resize to different sizes {sorted({a.shape[1:] for a in out})}; "
                         "preprocess them one at a time")
    return torch.from_numpy(np.stack(out))  # (B, 3, H, W)


def estimate_depth(model: DPTDepthModel, image: Image.Image, prep: DepthPreprocessing = DepthPreprocessing()
                   ) -> torch.Tensor:
    """One PIL image -> relative inverse depth (H, W) at the network's resolution (``prep.size`` by
    default, 384 x 384), float32 on the model's device. Unnormalised: depth2img resizes it to the latent
    size and rescales it to [-1, 1] itself."""
    p = next(model.parameters())
    with torch.no_grad():
        return model(preprocess(image, prep).to(p.device, p.dtype))[0].float()
