"""Pixel-side helpers of the spine: PIL <-> tensors, masks, the inpainting crop and the outpainting canvas.

Conversions follow diffusers' ``VaeImageProcessor`` (``2x - 1`` on input, ``(x / 2 + 0.5).clamp(0, 1)`` and
``round(x * 255)`` on output) so images equal the reference's byte for byte.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from sfumato.errors import InvalidParameterError


def to_rgb(image: Image.Image, *, what: str = "image") -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels are composited on white (what a viewer shows)."""
    if not isinstance(image, Image.Image):
        raise InvalidParameterError(f"{what} must be a PIL image, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1], resized with Lanczos when its size differs."""
    image = to_rgb(image)
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0


def depth_to_tensor(depth: Any) -> torch.Tensor:
    """A depth map -> (1, H, W) float32: an (H, W) or (1, H, W) array or tensor, or a greyscale image (8, 16
    or 32 bit; an RGB one is read as its luminance)."""
    if isinstance(depth, Image.Image):
        arr = np.asarray(depth.convert("L") if depth.mode in ("RGB", "RGBA", "P", "LA") else depth, dtype=np.float32)
        t = torch.from_numpy(arr.copy())
    elif isinstance(depth, np.ndarray):
        t = torch.from_numpy(depth.astype(np.float32))
    elif isinstance(depth, torch.Tensor):
        t = depth.detach().float().cpu()
    else:
        raise InvalidParameterError(f"depth_map must be an array, tensor or image, got {type(depth).__name__}")
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2 or min(t.shape) < 1 or not torch.isfinite(t).all():
        raise InvalidParameterError(f"depth_map must be one finite (H, W) map, got shape {tuple(t.shape)}")
    return t[None]


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounding as diffusers does."""
    x = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in x]


def mask_to_tensor(mask: Image.Image, width: int, height: int, *, blur: int = 0) -> torch.Tensor:
    """Mask (white = repaint) -> (1, 1, H, W) in [0, 1]; blurred by ``blur`` px, else binarised at 0.5."""
    if not isinstance(mask, Image.Image):
        raise InvalidParameterError(f"mask must be a PIL image, got {type(mask).__name__}")
    if mask.mode in ("RGBA", "LA"):
        mask = mask.getchannel("A") if mask.mode == "LA" else mask.convert("L")
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    t = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    if blur == 0:
        t = (t >= 0.5).float()
    return t


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel mask (1, 1, H, W) -> latent-grid mask, nearest as diffusers' inpainting pipeline."""
    h, w = mask.shape[-2] // factor, mask.shape[-1] // factor
    return torch.nn.functional.interpolate(mask, size=(h, w))


def mask_bbox(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """AUTOMATIC1111's "inpaint at full resolution" region: the mask's bounding box plus ``padding``,
    grown to the aspect ratio of the output size and kept inside the image. None if the mask is empty."""
    box = mask.convert("L").point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    iw, ih = mask.size
    x1, y1, x2, y2 = max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, iw), min(y2 + padding, ih)
    ratio_crop = (x2 - x1) / max(y2 - y1, 1)
    ratio_out = width / height
    if ratio_crop > ratio_out:  # too wide: grow height
        want = (x2 - x1) / ratio_out
        grow = want - (y2 - y1)
        y1, y2 = y1 - grow / 2, y2 + grow / 2
        if y1 < 0:
            y2, y1 = y2 - y1, 0
        if y2 > ih:
            y1, y2 = y1 - (y2 - ih), ih
        y1 = max(y1, 0)
    else:
        want = (y2 - y1) * ratio_out
        grow = want - (x2 - x1)
        x1, x2 = x1 - grow / 2, x2 + grow / 2
        if x1 < 0:
            x2, x1 = x2 - x1, 0
        if x2 > iw:
            x1, x2 = x1 - (x2 - iw), iw
        x1 = max(x1, 0)
    return int(x1), int(y1), int(x2), int(y2)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """AUTOMATIC1111's "fill": replace the masked area with colours smeared in from its surroundings."""
    image, mask_l = to_rgb(image), mask.convert("L")
    keep = Image.eval(mask_l, lambda v: 255 - v)
    result = Image.new("RGB", image.size, (0, 0, 0))
    result.paste(image, mask=keep)
    for radius in (256, 64, 16, 4, 1):
        blurred = result.filter(ImageFilter.GaussianBlur(radius))
        base = Image.composite(result, blurred, keep)
        result = base
    return result


def outpaint_canvas(image: Image.Image, left: int, right: int, up: int, down: int) -> tuple[Image.Image, Image.Image]:
    """A larger canvas with the image pasted in and the new borders filled from its edges, and the mask
    of the new area (white = to paint)."""
    for name, v in (("left", left), ("right", right), ("up", up), ("down", down)):
        if not isinstance(v, int) or v < 0:
            raise InvalidParameterError(f"outpaint {name}={v!r} must be a non-negative integer (pixels)")
    if left + right + up + down == 0:
        raise InvalidParameterError("outpaint needs at least one of left, right, up, down > 0")
    image = to_rgb(image)
    w, h = image.size
    canvas = image.resize((w + left + right, h + up + down), Image.BILINEAR)  # edge colours as a start
    canvas.paste(image, (left, up))
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, up, left + w, up + h))
    return fill_masked(canvas, mask), mask
