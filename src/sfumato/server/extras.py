"""AUTOMATIC1111's "Extras" upscaling (``/sdapi/v1/extra-single-image``, ``/sdapi/v1/extra-batch-images``) and
the upscale step it shares with the hires fix.

Requests are webui's ``ExtrasSingleImageRequest`` / ``ExtrasBatchImagesRequest``; the steps are webui's
``scripts/postprocessing_upscale.py`` and ``modules/upscaler.py``: ``resize_mode`` 0 scales by
``upscaling_resize``, 1 scales to cover ``upscaling_resize_w`` x ``upscaling_resize_h`` (then, with
``upscaling_crop``, a centred crop to exactly that size); the target is rounded down to a multiple of 8,
the upscaler runs until the image covers it (at most three passes) and a Lanczos resize makes the size
exact. ``upscaler_2`` with ``extras_upscaler_2_visibility`` > 0 upscales the same input and is blended in.
Upscalers: "None" (upscaler_1 "None": the image comes back unchanged), "Lanczos", "Nearest" (PIL) and the
server's SD x4 upscaler models (:meth:`sfumato.pipeline.Pipeline.upscale`, empty prompt, steps and noise level
from :class:`~sfumato.server.a1111.UpscalerOptions`, ``seed`` a sfumato field, default 0, so an upscale
is as repeatable as webui's other upscalers). Face restoration (GFPGAN, CodeFormer) is refused when asked for.

The result keeps the input's PNG text and gets webui's ``postprocessing`` chunk ("Postprocess upscale by:
2, Postprocess upscaler: Lanczos", plus an SD upscaler's steps, noise level, CFG scale and seed).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from sfumato.errors import InvalidParameterError
from sfumato.params import GenerationParams
from sfumato.server.a1111 import IMAGE_UPSCALERS, Limits, RequestError, Task, UpscalerOptions, _float, _int, \
    _seed, decode_image
from sfumato.server.models import UnknownNameError

EXTRAS_DEFAULTS: dict[str, Any] = {  # webui's ExtrasBaseRequest, and the single / batch image fields
    "resize_mode": 0, "show_extras_results": True, "gfpgan_visibility": 0, "codeformer_visibility": 0,
    "codeformer_weight": 0, "upscaling_resize": 2, "upscaling_resize_w": 512, "upscaling_resize_h": 512,
    "upscaling_crop": True, "upscaler_1": "None", "upscaler_2": "None", "extras_upscaler_2_visibility": 0,
    "upscale_first": False, "image": "", "imageList": [], "seed": 0,
}
MODEL_PASSES = 3  # webui's Upscaler.upscale: at most three passes to reach the target


@dataclass(frozen=True)
class ExtrasRequest:
    """A checked extras request: the images and how to upscale them."""

    images: list[Image.Image]
    names: list[str]
    resize_mode: int  # 0: by ``scale``; 1: to ``width`` x ``height``
    scale: float
    width: int
    height: int
    crop: bool
    upscaler_1: str | None  # None: no upscaling
    upscaler_2: str | None
    visibility: float
    show: bool


def parse_extras(body: Any, *, batch: bool, model_upscalers: dict[str, str], options: UpscalerOptions,
                 limits: Limits) -> Task:
    """An extras request body -> Task (kind "extras"). Unknown upscaler: UnknownNameError (400) listing the
    valid names; a value out of range or face restoration asked for: InvalidParameterError (422)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    req = {**EXTRAS_DEFAULTS, **{k: v for k, v in body.items() if k in EXTRAS_DEFAULTS}}
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if _float(req, name, 0.0, 1.0) != 0:
            raise InvalidParameterError(f"{name}={req[name]!r}: sfumato has no face restoration (GFPGAN, "
                                        "CodeFormer); send 0")
    if batch:
        items = req["imageList"]
        if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
            raise InvalidParameterError("imageList must be a list of at least one {\"data\": <base64 image>, "
                                        "\"name\": <file name>}")
        images = [decode_image(i.get("data"), f"imageList[{k}].data", limits) for k, i in enumerate(items)]
        names = [str(i.get("name") or f"image{k}") for k, i in enumerate(items)]
    else:
        images, names = [decode_image(req["image"], "image", limits)], ["image"]
    mode = req["resize_mode"]
    if mode not in (0, 1) or isinstance(mode, bool):
        raise InvalidParameterError(f"resize_mode={mode!r} is not one of 0 (scale by upscaling_resize), "
                                    "1 (to upscaling_resize_w x upscaling_resize_h)")
    valid = [*IMAGE_UPSCALERS, *dict.fromkeys(model_upscalers.values())]
    names_of = []
    for field_name in ("upscaler_1", "upscaler_2"):
        v = req[field_name]
        if v in (None, "", "None"):
            names_of.append(None)
        elif isinstance(v, str) and v in IMAGE_UPSCALERS:
            names_of.append(v)
        elif isinstance(v, str) and v in model_upscalers:
            names_of.append(model_upscalers[v])
        else:
            raise UnknownNameError(f"unknown {field_name} {v!r}; valid: {', '.join(valid)}")
    ex = ExtrasRequest(
        images=images, names=names, resize_mode=mode, scale=_float(req, "upscaling_resize", 1.0, 8.0),
        width=_int(req, "upscaling_resize_w", 8, 8192), height=_int(req, "upscaling_resize_h", 8, 8192),
        crop=bool(req["upscaling_crop"]), upscaler_1=names_of[0], upscaler_2=names_of[1],
        visibility=_float(req, "extras_upscaler_2_visibility", 0.0, 1.0), show=bool(req["show_extras_results"]))
    used = _used(ex)
    for im in images:
        _check_sizes(im.size, ex, used, limits)
    return Task(kind="extras", params=GenerationParams(seed=_seed(req["seed"], "seed")), extras=ex,
                upscalers=tuple(dict.fromkeys(n for n in used if n not in IMAGE_UPSCALERS)),
                upscaler_options=options)


def _used(ex: ExtrasRequest) -> list[str]:
    """The upscalers that run (upscaler 2 only with upscaler 1 and a visibility above 0, as in webui)."""
    if ex.upscaler_1 is None:
        return []
    return [ex.upscaler_1] + ([ex.upscaler_2] if ex.upscaler_2 is not None and ex.visibility > 0 else [])


def _target(size: tuple[int, int], ex: ExtrasRequest) -> tuple[float, int, int]:
    """(scale, width, height): the scale webui's Upscaler.upscale is given and the size it makes."""
    w, h = size
    scale = ex.scale if ex.resize_mode == 0 else max(ex.width / w, ex.height / h)
    return scale, int(w * scale) // 8 * 8, int(h * scale) // 8 * 8


def _check_sizes(size: tuple[int, int], ex: ExtrasRequest, used: list[str], limits: Limits) -> None:
    _, tw, th = _target(size, ex)
    if tw < 8 or th < 8:
        raise InvalidParameterError(f"the upscaled size {tw}x{th} of a {size[0]}x{size[1]} image is too small")
    biggest = [(tw, th)]
    if any(n not in IMAGE_UPSCALERS for n in used):
        biggest += _model_sizes(size, tw, th)
    for w, h in biggest:
        if w * h > limits.max_output_pixels:
            raise InvalidParameterError(f"upscaling {size[0]}x{size[1]} makes a {w}x{h} image; this server allows at "
                                        f"most {limits.max_output_pixels} pixels per image (lower the scale)")


def _model_sizes(size: tuple[int, int], tw: int, th: int) -> list[tuple[int, int]]:
    """The sizes the x4 passes make on the way to (tw, th)."""
    w, h = size
    out = []
    for _ in range(MODEL_PASSES):
        if w >= tw and h >= th:
            break
        w, h = w * 4, h * 4
        out.append((w, h))
    return out


def model_upscale(pipe, image: Image.Image, width: int, height: int, options: UpscalerOptions, *, prompt: str = "",
                  negative_prompt: str = "", seed: int = 0,
                  callback: Callable | None = None) -> tuple[Image.Image, dict]:
    """``image`` through the x4 upscaler ``pipe`` until it covers ``width`` x ``height`` (at most three passes),
    then Lanczos to exactly that size; returns the image and the parameters for the infotext."""
    img = image.convert("RGB")
    for _ in range(MODEL_PASSES):
        if img.width >= width and img.height >= height:
            break
        img = pipe.upscale(img, prompt, negative_prompt, noise_level=options.noise_level, steps=options.steps,
                           cfg_scale=options.cfg_scale, seed=seed, callback=callback).images[0]
    if img.size != (width, height):
        img = img.resize((width, height), Image.LANCZOS)
    return img, {"steps": options.steps, "noise level": options.noise_level, "CFG scale": options.cfg_scale,
                 "seed": seed}


def upscale(image: Image.Image, scale: float, width: int, height: int, name: str, upscalers: dict[str, Any],
            options: UpscalerOptions, seed: int, callback: Callable | None) -> tuple[Image.Image, dict]:
    """webui's ``Upscaler.upscale``: ``name``'s upscale by ``scale`` until the image covers ``width`` x
    ``height``, then Lanczos to that size; returns the image and the upscaler's parameters (SD models)."""
    if name not in IMAGE_UPSCALERS:
        return model_upscale(upscalers[name], image, width, height, options, seed=seed, callback=callback)
    img = image
    resample = IMAGE_UPSCALERS[name]
    if resample is not None:
        img = img.resize((int(img.width * scale), int(img.height * scale)), resample)
    if img.size != (width, height):
        img = img.resize((width, height), Image.LANCZOS)
    return img, {}


def run_extras(task: Task, upscalers: dict[str, Any], on_step: Callable[[int, int, Any, Any], None]) -> tuple[
        list[Image.Image], list[str]]:
    """The images of an extras task and their ``postprocessing`` infotexts. ``on_step(pass_no, passes, info,
    spec)``: called after every step of an SD upscaler (it may raise to stop)."""
    from sfumato.metadata import quote

    ex = task.extras
    models = sum(n not in IMAGE_UPSCALERS for n in _used(ex))
    passes = models * sum(len(_model_sizes(im.size, *_target(im.size, ex)[1:])) for im in ex.images)
    done = [0]

    def callback(pipe) -> Callable:
        def cb(s) -> None:
            on_step(done[0], max(passes, 1), s, pipe.spec)
            if s.i + 1 == s.total:
                done[0] += 1
        return cb

    images, texts = [], []
    for im in ex.images:
        info: dict[str, Any] = {}
        out = im
        if ex.upscaler_1 is not None:
            scale, tw, th = _target(im.size, ex)
            key = "Postprocess upscale to" if ex.resize_mode == 1 else "Postprocess upscale by"
            info[key] = f"{ex.width}x{ex.height}" if ex.resize_mode == 1 else scale
            out = _one(im, scale, tw, th, ex, ex.upscaler_1, "Postprocess upscaler", info, upscalers, task, callback)
            if ex.upscaler_2 is not None and ex.visibility > 0:
                second = _one(im, scale, tw, th, ex, ex.upscaler_2, "Postprocess upscaler 2", info, upscalers, task,
                              callback)
                out = Image.blend(out.convert("RGB"), second.convert("RGB"), ex.visibility)
        out.info = {k: v for k, v in im.info.items() if isinstance(k, str) and isinstance(v, str)}
        text = ", ".join(f"{k}: {quote(v)}" for k, v in info.items())
        if text:
            out.info["postprocessing"] = text
        images.append(out)
        texts.append(text)
    return images, texts


def _one(im: Image.Image, scale: float, tw: int, th: int, ex: ExtrasRequest, name: str, key: str, info: dict,
         upscalers: dict[str, Any], task: Task, callback: Callable) -> Image.Image:
    pipe = upscalers.get(name)
    out, params = upscale(im, scale, tw, th, name, upscalers, task.upscaler_options, task.params.seed,
                          callback(pipe) if pipe is not None else None)
    if ex.resize_mode == 1 and ex.crop:
        cropped = Image.new(out.mode, (ex.width, ex.height))
        cropped.paste(out, box=(ex.width // 2 - out.width // 2, ex.height // 2 - out.height // 2))
        out = cropped
        info["Postprocess crop to"] = f"{out.width}x{out.height}"
    info[key] = name
    info.update({f"{key} {k}": v for k, v in params.items()})
    return out


def encode_png(img: Image.Image) -> str:
    """PNG bytes with every text item of ``img.info`` (as webui's API encodes them), as raw base64."""
    import base64
    import io

    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for k, v in img.info.items():
        if isinstance(k, str) and isinstance(v, str):
            meta.add_text(k, v)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def html_info(text: str) -> str:
    """webui's ``plaintext_to_html`` of the infotext."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"
