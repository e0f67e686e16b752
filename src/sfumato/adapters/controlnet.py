"""ControlNet add-ons: loading them as published, preparing control images, and the units a generation uses.

Files: an original single file (lllyasviel's ``control_v11p_sd15_canny.pth`` and kin: keys below
``control_model.``, or without the prefix) or a diffusers ``ControlNetModel`` folder / single file
(``controlnet_cond_embedding.*``, ``controlnet_down_blocks.*`` ...), renamed through the UNet's key table
plus the three ControlNet-only names below. An original file takes the architecture of the model it is
used with (ControlNets copy their base UNet's down path); a folder's ``config.json`` names its own (the
small SDXL ControlNets are shallower). Loading is strict and a ControlNet made for another family (its
cross-attention width says which) is refused by name.

A :class:`ControlUnit` is one ControlNet with its control image, weight and the fraction of the steps it
acts on (``start``..``end``); several units add their residuals. Guess mode (diffusers' ``guess_mode``)
feeds the ControlNet the conditional half of the guidance batch only, its residuals scaled from 0.1 at
the first skip to 1 at the middle block. A unit's ``mode`` is the AUTOMATIC1111 ControlNet extension's
"Control Mode": "balanced" (plain residuals), "prompt" ("My prompt is more important": residual ``i`` of
``n`` scaled by ``0.825 ** (n - 1 - i)``, the extension's soft injection) and "control" ("ControlNet is
more important": the same scales, applied to the conditional rows of the guidance batch only).

Control images are fitted to the output size by ``resize``: "stretch" (diffusers; the extension's "Just
Resize"), "crop" ("Crop and Resize": scaled to cover, centre-cropped) or "fill" ("Resize and Fill":
scaled to fit, the border filled with black). :data:`PREPROCESSORS` turns a photo into a control image
where that needs no network (canny edges, inversion); depth, pose, lineart or scribble maps come in as
images made elsewhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sfumato.config import UNetConfig
from sfumato.errors import CheckpointError, InvalidParameterError
from sfumato.models.controlnet import ControlNetConfig, ControlNetModel

__all__ = ["ControlUnit", "load_controlnet", "canny", "control_tensor", "CONTROL_MODES", "RESIZE_MODES",
           "PREPROCESSORS", "check_preprocessor", "preprocess", "fit_image"]

_PREFIX = "control_model."
# our names -> the AUTOMATIC1111 ControlNet extension's labels (its API takes the label or its index; the
# infotext writes the label)
CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                 "control": "ControlNet is more important"}
RESIZE_MODES = {"stretch": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}


@dataclass
class ControlUnit:
    """One ControlNet in a generation: ``image`` is the control image (an edge map, depth map, pose...) as
    the ControlNet expects it; ``weight`` scales its residuals over ``start``..``end`` of the steps."""

    model: ControlNetModel
    image: Image.Image
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    name: str = "controlnet"
    mode: str = "balanced"  # CONTROL_MODES
    resize: str = "stretch"  # RESIZE_MODES
    module: str = "none"  # the preprocessor that made ``image``, recorded in the infotext

    def __post_init__(self) -> None:
        if not isinstance(self.model, ControlNetModel):
            raise InvalidParameterError("ControlUnit.model must be a ControlNet from sfumato.load_controlnet")
        if not isinstance(self.image, Image.Image):
            raise InvalidParameterError(f"ControlUnit.image must be a PIL image, got {type(self.image).__name__}")
        for field_, v, lo, hi in (("weight", self.weight, 0.0, 10.0), ("start", self.start, 0.0, 1.0),
                                  ("end", self.end, 0.0, 1.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise InvalidParameterError(f"ControlUnit.{field_}={v!r} is out of range: allowed [{lo}, {hi}]")
        if self.start >= self.end:
            raise InvalidParameterError(f"ControlUnit: start {self.start} must be below end {self.end}")
        for field_, v, allowed in (("mode", self.mode, CONTROL_MODES), ("resize", self.resize, RESIZE_MODES)):
            if v not in allowed:
                raise InvalidParameterError(f"ControlUnit.{field_}={v!r} is not one of {', '.join(allowed)}")


# --- loading ----------------------------------------------------------------------------------------------

def _hint_renames() -> dict[str, str]:
    """diffusers ControlNet-only module names -> cldm's."""
    m = {"controlnet_cond_embedding.conv_in": "input_hint_block.0",
         "controlnet_cond_embedding.conv_out": "input_hint_block.14",
         "controlnet_mid_block": "middle_block_out.0"}
    m.update({f"controlnet_cond_embedding.blocks.{j}": f"input_hint_block.{2 + 2 * j}" for j in range(6)})
    return m


def _from_diffusers(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    from sfumato.weights.keymap_unet import unet_from_diffusers

    own, rest = {}, {}
    hints = _hint_renames()
    for k, v in sd.items():
        module, _, param = k.rpartition(".")
        if module in hints:
            own[f"{hints[module]}.{param}"] = v
        elif module.startswith("controlnet_down_blocks."):
            own[f"zero_convs.{module.split('.')[1]}.0.{param}"] = v
        else:
            rest[k] = v
    return {**unet_from_diffusers(rest, cfg), **own}


def _config_from_diffusers(d: dict) -> ControlNetConfig:
    from sfumato.weights.keymap_unet import unet_config_from_diffusers

    down = list(d.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = ["CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in reversed(down)]
    if tuple(d.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) != (16, 32, 96, 256):
        raise CheckpointError(f"ControlNet config: conditioning_embedding_out_channels "
                              f"{d['conditioning_embedding_out_channels']} not supported")
    if d.get("global_pool_conditions"):
        raise CheckpointError("ControlNet config: global_pool_conditions (shuffle) is not supported")
    return ControlNetConfig(unet_config_from_diffusers({**d, "up_block_types": up}),
                            hint_channels=d.get("conditioning_channels", 3))


def _depths_from_diffusers_keys(sd: dict[str, torch.Tensor], base: UNetConfig) -> UNetConfig:
    """A diffusers-layout single file has no config.json: its transformer depth per level (and in the middle)
    is read from its keys, as the small and mid SDXL ControlNets (``diffusers_xl_*_small``) are shallower than
    their base; the rest of the architecture is the base model's."""
    def depth(prefix: str) -> int:
        ks = [int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)]
        return max(ks) + 1 if ks else 0

    levels = tuple(depth(f"down_blocks.{i}.attentions.0.transformer_blocks.") for i in range(len(base.channel_mult)))
    return replace(base, transformer_depth=levels,
                   transformer_depth_middle=depth("mid_block.attentions.0.transformer_blocks.") or base.transformer_depth_middle)


def load_controlnet(path: str | os.PathLike, base: UNetConfig, *, dtype: torch.dtype = torch.float32,
                    family: str = "this model") -> ControlNetModel:
    """A ControlNet for a model whose UNet is ``base`` (its ``family`` names it in errors)."""
    from sfumato.weights.io import read_tensors
    from sfumato.weights.load import _build, _read_component, assign_weights

    path = Path(path)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path}: a diffusers ControlNet folder needs config.json")
        cfg = _config_from_diffusers(json.loads(cfg_file.read_text()))
        sd = _from_diffusers(_read_component(path, dtype), cfg.unet)
    elif path.is_file():
        sd = read_tensors(path, dtype, share=True)
        if any(k.startswith("controlnet_cond_embedding.") for k in sd):
            cfg = ControlNetConfig(_depths_from_diffusers_keys(sd, replace(base, in_channels=4)),
                                   hint_channels=sd["controlnet_cond_embedding.conv_in.weight"].shape[1])
            sd = _from_diffusers(sd, cfg.unet)
        else:
            if any(k.startswith(_PREFIX) for k in sd):
                sd = {k[len(_PREFIX):]: v for k, v in sd.items() if k.startswith(_PREFIX)}
            if "input_hint_block.0.weight" not in sd:
                raise CheckpointError(f"{path}: not a ControlNet (no input_hint_block / controlnet_cond_embedding)")
            cfg = ControlNetConfig(replace(base, in_channels=sd["input_blocks.0.0.weight"].shape[1]),
                                   hint_channels=sd["input_hint_block.0.weight"].shape[1])
    else:
        raise CheckpointError(f"{path}: no such ControlNet file or folder")
    k = next((k for k in sd if k.endswith("attn2.to_k.weight")), None)
    if k is not None and base.context_dim is not None and sd[k].shape[1] != base.context_dim:
        raise CheckpointError(f"{path}: this ControlNet was made for a model with cross-attention width "
                              f"{sd[k].shape[1]}; {family} has {base.context_dim}")
    model = _build(lambda: ControlNetModel(cfg))
    assign_weights(model, sd, source=str(path), what="ControlNet")
    return model.eval().requires_grad_(False)


# --- control images -------------------------------------------------------------------------------------

def fit_image(image: Image.Image, width: int, height: int, resize: str = "stretch") -> Image.Image:
    """``image`` (RGB) at ``width`` x ``height`` by a :data:`RESIZE_MODES` rule (Lanczos resampling)."""
    im = image.convert("RGB")
    if im.size == (width, height):
        return im
    if resize == "stretch":
        return im.resize((width, height), Image.Resampling.LANCZOS)
    cover = resize == "crop"
    scale = (max if cover else min)(width / im.width, height / im.height)
    w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
    scaled = im.resize((w, h), Image.Resampling.LANCZOS)
    if cover:
        left, top = (w - width) // 2, (h - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    out = Image.new("RGB", (width, height))
    out.paste(scaled, ((width - w) // 2, (height - h) // 2))
    return out


def control_tensor(image: Image.Image, width: int, height: int, resize: str = "stretch") -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] at the output size; "stretch" resizes as diffusers' ``prepare_image`` does."""
    im = fit_image(image, width, height, resize)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def _invert(image: Image.Image, _low: float, _high: float) -> Image.Image:
    return Image.fromarray(255 - np.asarray(image.convert("RGB")))


def _none(image: Image.Image, _low: float, _high: float) -> Image.Image:
    return image.convert("RGB")


def _canny(image: Image.Image, low: float, high: float) -> Image.Image:
    return canny(image, int(low), int(high))


# name -> (image, threshold a, threshold b) -> control image; the names and the thresholds' defaults are the
# AUTOMATIC1111 ControlNet extension's (canny: low 100, high 200)
PREPROCESSORS = {"none": (_none, None, None), "canny": (_canny, 100, 200), "invert": (_invert, None, None)}


def check_preprocessor(module: str) -> None:
    """Raise (naming the available ones) unless ``module`` is a :data:`PREPROCESSORS` name."""
    if module not in PREPROCESSORS:
        raise InvalidParameterError(f"ControlNet preprocessor {module!r} is not available; available: "
                                    f"{', '.join(PREPROCESSORS)} (send a depth, pose, lineart or scribble map "
                                    "made elsewhere as the image, with module 'none')")


def preprocess(image: Image.Image, module: str = "none", threshold_a: float | None = None,
               threshold_b: float | None = None) -> Image.Image:
    """A photo -> the control image a ControlNet expects, by a :data:`PREPROCESSORS` name."""
    check_preprocessor(module)
    fn, a, b = PREPROCESSORS[module]
    return fn(image, a if threshold_a is None else threshold_a, b if threshold_b is None else threshold_b)


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges (white on black, RGB) as ControlNet's canny models were trained on: 5x5 Gaussian
    (sigma 1.4), Sobel gradients, non-maximum suppression, hysteresis between ``low`` and ``high`` (on
    the 0..255 gradient magnitude scale of OpenCV's L1 Sobel, the preprocessor's defaults)."""
    if not 0 <= low < high:
        raise InvalidParameterError(f"canny thresholds must satisfy 0 <= low < high, got {low}, {high}")
    g = np.asarray(image.convert("L"), dtype=np.float64)
    x = np.arange(-2, 3)
    k = np.exp(-(x**2) / (2 * 1.4**2))
    k /= k.sum()
    pad = np.pad(g, 2, mode="reflect")
    g = sum(k[i] * pad[i:i + g.shape[0], 2:-2] for i in range(5))
    pad = np.pad(g, ((0, 0), (2, 2)), mode="reflect")
    g = sum(k[i] * pad[:, i:i + g.shape[1]] for i in range(5))
    p = np.pad(g, 1, mode="reflect")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.abs(gx) + np.abs(gy)
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180) % 180
    m = np.pad(mag, 1)
    h, w = mag.shape
    neighbours = {0: ((0, 1), (0, -1)), 45: ((-1, 1), (1, -1)), 90: ((1, 0), (-1, 0)), 135: ((-1, -1), (1, 1))}
    direction = (np.round(angle / 45) % 4 * 45).astype(int)
    keep = np.zeros_like(mag, dtype=bool)
    for d, ((dy1, dx1), (dy2, dx2)) in neighbours.items():
        a = m[1 + dy1:1 + dy1 + h, 1 + dx1:1 + dx1 + w]
        b = m[1 + dy2:1 + dy2 + h, 1 + dx2:1 + dx2 + w]
        keep |= (direction == d) & (mag >= a) & (mag >= b)
    strong = keep & (mag >= high)
    weak = keep & (mag >= low)
    edges = strong.copy()
    while True:  # hysteresis: weak pixels 8-connected to an edge become edges
        grown = np.zeros_like(edges)
        e = np.pad(edges, 1)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= e[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        new = edges | (grown & weak)
        if (new == edges).all():
            break
        edges = new
    out = (edges * 255).astype(np.uint8)
    return Image.fromarray(np.stack([out] * 3, axis=-1))
