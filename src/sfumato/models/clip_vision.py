"""The CLIP vision transformer: the image encoder of SD 2.1 unCLIP (OpenAI CLIP ViT-L/14, OpenCLIP ViT-H/14).

The two differ only in ``CLIPVisionConfig`` (width, depth, activation, projection). The architecture
is CLIP's image tower (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"; Dosovitskiy et al. 2021, ViT): non-overlapping patches embedded by a conv
without bias, a learned class token prepended, learned position embeddings, a LayerNorm before the
pre-norm transformer (``pre_layrnorm``, transformers' spelling), and the class token's final state
normalised (``post_layernorm``) and projected (``visual_projection``) to the joint embedding space:
``image_embeds``, what unCLIP conditions on.

The transformer blocks are the text tower's (``sfumato.text.encoder``) without the causal mask.
Attribute names follow transformers' ``CLIPVisionModelWithProjection`` state dict
(``vision_model.encoder.layers.N.self_attn.q_proj`` ...), so a diffusers ``image_encoder/`` folder
loads through an identity map; the original single files store OpenAI/OpenCLIP names and go through
``sfumato.weights.keymap_clip_vision``.

``preprocess`` is ``CLIPImageProcessor``'s pipeline for these models (shortest side to 224 bicubic,
centre crop, CLIP mean/std), the input diffusers' ``StableUnCLIPImg2ImgPipeline`` feeds the encoder.

Reference: transformers ``models/clip/modeling_clip.py`` (``CLIPVisionTransformer``,
``CLIPVisionModelWithProjection``) and ``image_processing_pil_clip.py``; OpenCLIP
``open_clip/transformer.py`` (``VisionTransformer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from sfumato.config import TextEncoderConfig
from sfumato.models import ops
from sfumato.text.encoder import CLIPAttention, CLIPEncoderLayer, resolve_layer

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPVisionConfig",
    "CLIPVisionEncoder",
    "VISION_PRESETS",
    "VisionEncoderOutput",
    "preprocess",
]

# CLIP's training-set statistics (OpenAI CLIP ``_transform``; transformers OPENAI_CLIP_MEAN/STD),
# used by both the OpenAI and the OpenCLIP ViT-H/14 image encoders.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """A CLIP vision transformer; OpenAI CLIP ViT-L/14 and OpenCLIP ViT-H/14 differ only here."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_width: int = 4096
    projection_dim: int = 768
    activation: str = "quick_gelu"  # OpenAI CLIP; OpenCLIP models use "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")

    @property
    def positions(self) -> int:
        """Tokens per image: one per patch plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    def block_config(self) -> TextEncoderConfig:
        """The fields the shared CLIP transformer blocks read, as the config type they are typed for."""
        return TextEncoderConfig(width=self.width, layers=self.layers, heads=self.heads, mlp_width=self.mlp_width,
                                 activation=self.activation, layer_norm_eps=self.layer_norm_eps)


# Checked against the published transformers configs: openai/clip-vit-large-patch14 (vision_config)
# and laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the image_encoder of diffusers' unCLIP-L / -H folders.
VISION_PRESETS: dict[str, CLIPVisionConfig] = {
    "clip-vit-l-14": CLIPVisionConfig(),
    "open-clip-vit-h-14": CLIPVisionConfig(width=1280, layers=32, heads=16, mlp_width=5120, projection_dim=1024,
                                           activation="gelu"),
}


@dataclass(frozen=True)
class VisionEncoderOutput:
    hidden: torch.Tensor  # (B, 1 + patches, D) state after the chosen layer, before post_layernorm
    image_embeds: torch.Tensor  # (B, projection_dim) projected, normalised class token of the last layer


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        # An Embedding (not a Parameter) so its key is ``position_embedding.weight`` as in transformers.
        self.position_embedding = nn.Embedding(cfg.positions, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixels.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"image of {h}x{w} pixels; the vision encoder takes {self.image_size}x{self.image_size} "
                             "(see preprocess)")
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixels.to(weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 1 + N, D)


class CLIPVisionAttention(CLIPAttention):
    """The text tower's attention without its causal mask: the class token and every patch see all."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(ops.attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPVisionEncoderLayer(CLIPEncoderLayer):
    """The text tower's pre-norm block with bidirectional attention (same keys, same maths otherwise)."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__(cfg)
        # Replacing the registered submodule keeps its place, so the state-dict keys are unchanged.
        self.self_attn = CLIPVisionAttention(cfg)


class CLIPVisionStack(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        block = cfg.block_config()
        self.layers = nn.ModuleList(CLIPVisionEncoderLayer(block) for _ in range(cfg.layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)  # sic: transformers' key
        self.encoder = CLIPVisionStack(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


class CLIPVisionEncoder(nn.Module):
    """CLIP image tower with projection: pixels (B, 3, S, S) -> ``VisionEncoderOutput``.

    ``forward(pixels, layer=...)`` returns ``image_embeds = visual_projection(post_layernorm(h[:, 0]))``
    of the last layer ``h`` (transformers' ``image_embeds``, OpenCLIP's ``encode_image``) and the
    hidden state after ``layer`` layers (``resolve_layer``; -1 is transformers' ``last_hidden_state``,
    -2 the penultimate state image adapters read).
    """

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, pixels: torch.Tensor, *, layer: int = -1) -> VisionEncoderOutput:
        vm = self.vision_model
        layers = vm.encoder.layers
        n = resolve_layer(layer, len(layers))
        x = vm.pre_layrnorm(vm.embeddings(pixels))  # (B, 1 + N, D)
        hidden = x
        for i, block in enumerate(layers):
            x = block(x)
            if i + 1 == n:
                hidden = x
        image_embeds = self.visual_projection(vm.post_layernorm(x[:, 0]))  # (B, P)
        return VisionEncoderOutput(hidden=hidden, image_embeds=image_embeds)


def _to_rgb(image: Image.Image) -> Image.Image:
    # Transparency is composited onto white, as transformers (>= 5) does, rather than dropped.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    # transformers' get_resize_output_image_size: the long side is truncated, not rounded.
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def preprocess(
    images: Image.Image | Sequence[Image.Image],
    *,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """PIL image(s) -> normalised pixels (B, 3, size, size), float32, as ``CLIPImageProcessor`` makes them.

    RGB (transparency over white); shortest side resized to ``size`` with PIL's bicubic filter on
    8-bit pixels, as transformers does; centre crop ``size`` x ``size`` (offset ``(extent - size) // 2``);
    scaled to [0, 1]; then ``(x - mean) / std`` per channel.

    This is the diffusers pipelines' input. Stability's original unCLIP embedders instead squash a
    [-1, 1] tensor to 224 x 224 (kornia bicubic, no crop); ``CLIPVisionEncoder`` takes either.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if not images:
        raise ValueError("preprocess needs at least one image")
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(std, dtype=np.float32)
    out = []
    for image in images:
        image = _resize_shortest_side(_to_rgb(image), size)
        w, h = image.size
        top, left = (h - size) // 2, (w - size) // 2
        x = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0  # (S, S, 3)
        out.append(((x - m) / s).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))  # (B, 3, S, S)
