"""AUTOMATIC1111's web API requests -> a :class:`Task` for the worker, and results -> its response shapes.

Field names and defaults are stable-diffusion-webui's (``modules/api/models.py``,
``StableDiffusionProcessingTxt2Img`` / ``...Img2Img``); the native job API takes the same fields. Values
are checked here, before queueing, so a bad request is answered at once: a wrong value raises
:class:`~sfumato.errors.InvalidParameterError` (HTTP 422, naming the field and what is allowed), an
unknown sampler, schedule or model :class:`~sfumato.server.models.UnknownNameError` (400, listing the
valid names), undecodable base64 or image data ``RequestError(400)``, an image over the pixel limit
``RequestError(413)``.

``hr_upscaler`` names a latent upscaler, an image upscaler ("None", "Lanczos", "Nearest") or one of the
server's SD x4 upscaler models (``parse``'s ``model_upscalers``; :mod:`sfumato.server.extras` runs it).

Fields sfumato has no feature for (``restore_faces``, ``tiling``, ``styles``, scripts, ``resize_mode``
other than 0 "Just resize", ``image_cfg_scale``, ``initial_noise_multiplier``) are accepted and ignored,
as the web UI ignores what an absent extension would have read.

``alwayson_scripts.controlnet.args`` is read as the sd-webui-controlnet extension's API reads it (one
object per unit: ``image`` / ``input_image``, ``module``, ``model``, ``weight``, ``guidance_start``,
``guidance_end``, ``control_mode``, ``resize_mode``, ``threshold_a`` / ``threshold_b``, ``enabled``);
``processor_res``, ``pixel_perfect`` and ``low_vram`` are accepted and ignored (preprocessors run at the
image's own size). A unit without an image takes the img2img init image, as the extension does.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from sfumato.errors import InvalidParameterError, SfumatoError
from sfumato.params import GenerationParams, validate
from sfumato.server.models import UnknownNameError

# webui's defaults for the fields sfumato reads (api/models.py + processing.py)
TXT2IMG_DEFAULTS: dict[str, Any] = {
    "prompt": "", "negative_prompt": "", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None, "sampler_index": "Euler",
    "scheduler": None, "batch_size": 1, "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512,
    "height": 512, "restore_faces": None, "tiling": None, "do_not_save_samples": False,
    "do_not_save_grid": False, "eta": None, "s_min_uncond": None, "s_churn": None, "s_tmax": None,
    "s_tmin": None, "s_noise": None, "override_settings": None, "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None, "refiner_switch_at": None, "disable_extra_networks": False,
    "comments": None, "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0,
    "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
    "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "", "denoising_strength": None, "script_name": None, "script_args": [],
    "send_images": True, "save_images": False, "alwayson_scripts": {}, "infotext": None,
}
IMG2IMG_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in TXT2IMG_DEFAULTS.items() if not k.startswith(("hr_", "enable_hr", "firstphase"))},
    "init_images": None, "resize_mode": 0, "image_cfg_scale": None, "mask": None, "mask_blur_x": 4,
    "mask_blur_y": 4, "mask_blur": None, "inpainting_fill": 0, "inpaint_full_res": True,
    "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0, "initial_noise_multiplier": None,
    "denoising_strength": 0.75, "include_init_images": False,
}
# img2img "Masked content": 0 fill, 1 original, 2 latent noise, 3 latent nothing
INPAINT_FILLS = ("fill", "original", "latent_noise", "latent_nothing")
LATENT_UPSCALERS = {  # webui's latent_upscale_modes: (torch interpolate mode, antialias)
    "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE_UPSCALERS = {"None": None, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}


class RequestError(SfumatoError):
    """A request the server cannot take, with the HTTP status to answer (400 malformed, 413 too large)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_image_pixels: int = 4096 * 4096  # decoded input images (init images, masks, png-info)
    max_output_pixels: int = 2048 * 2048  # width * height of one output image (after a hires pass)
    max_batch: int = 16  # batch_size * n_iter


@dataclass(frozen=True)
class UpscalerOptions:
    """How the server runs an SD x4 upscaler model as an upscaler (extras, hires fix): ``sfumato serve
    --upscaler-steps`` / ``--upscaler-noise-level``; the prompt is the generation's (empty in extras)."""

    steps: int = 20
    noise_level: int = 20
    cfg_scale: float = 9.0  # Pipeline.upscale's default


@dataclass(frozen=True)
class Hires:
    """The hires fix: a txt2img pass, an upscale (latent or image), an img2img pass at the larger size."""

    width: int
    height: int
    scale: float
    upscaler: str
    steps: int  # second-pass steps (0: the first pass's)
    strength: float
    sampler: str | None  # None: the first pass's sampler and schedule
    schedule: str | None
    prompt: str
    negative_prompt: str


@dataclass(frozen=True)
class ControlRequest:
    """One ControlNet unit of a request, checked; the worker loads ``model`` and preprocesses ``image``."""

    model: str  # a ControlNet name (the extension's "name [hash]" title also matches)
    image: Image.Image
    module: str = "none"
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"  # sfumato.adapters.controlnet.CONTROL_MODES
    resize: str = "crop"  # the extension's default, "Crop and Resize"
    threshold_a: float | None = None
    threshold_b: float | None = None


_UNIT_FIELDS = {"enabled", "image", "input_image", "mask", "module", "model", "weight", "guidance_start",
                "guidance_end", "guidance", "control_mode", "resize_mode", "threshold_a", "threshold_b",
                "processor_res", "pixel_perfect", "low_vram", "guessmode", "lowvram", "save_detected_map",
                "hr_option", "is_ui", "batch_images", "input_mode", "effective_region_mask", "inpaint_crop_input_image"}


@dataclass
class Task:
    """One request, checked and ready for a worker. ``params.seed`` is resolved (never -1)."""

    kind: str  # "txt2img" | "img2img" | "extras" | a zoo method (sfumato.server.zoo.KINDS)
    params: GenerationParams
    n_iter: int = 1
    model: str | None = None  # a Registry title; None: the options' sd_model_checkpoint
    refiner: str | None = None
    refiner_switch_at: float | None = None
    hires: Hires | None = None
    image: Image.Image | None = None
    mask: Image.Image | None = None
    save: bool = False
    send_images: bool = True
    echo: dict[str, Any] = field(default_factory=dict)  # the request with defaults, as "parameters"
    controls: list[ControlRequest] = field(default_factory=list)
    upscalers: tuple[str, ...] = ()  # upscaler models (Registry.upscalers names) the job runs besides ``model``
    upscaler_options: UpscalerOptions = field(default_factory=UpscalerOptions)
    method_kw: dict[str, Any] = field(default_factory=dict)  # a zoo method's own keywords (checked), by name
    extras: Any = None  # kind "extras": a sfumato.server.extras.ExtrasRequest


def decode_image(data: Any, field_name: str, limits: Limits) -> Image.Image:
    """A base64 image (raw or a ``data:`` URL) -> PIL image. Malformed: 400; over the pixel limit: 413."""
    if not isinstance(data, str) or not data:
        raise RequestError(400, f"{field_name} must be a base64-encoded image string")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{field_name} is not valid base64") from None
    try:
        img = Image.open(io.BytesIO(raw))
        w, h = img.size  # read from the header, before decoding any pixels
    except Exception:  # noqa: BLE001 - PIL raises many kinds for bad data
        raise RequestError(400, f"{field_name} is not a readable image (PNG, JPEG, WebP...)") from None
    if w * h > limits.max_image_pixels:
        raise RequestError(413, f"{field_name} is {w}x{h} = {w * h} pixels; this server accepts at most "
                                f"{limits.max_image_pixels} pixels per image")
    try:
        img.load()
    except Exception:  # noqa: BLE001
        raise RequestError(400, f"{field_name} is a truncated or corrupt image") from None
    return img


def encode_png(img: Image.Image, parameters: str | None) -> str:
    """PNG bytes (with the ``parameters`` text chunk, as webui's API sends them) as raw base64."""
    from sfumato.metadata import png_info

    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=png_info(parameters) if parameters else None)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _int(body: dict, name: str, lo: int, hi: int) -> int:
    v = body[name]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InvalidParameterError(f"{name}={v!r} is out of range: allowed an integer in [{lo}, {hi}]")
    return v


def _float(body: dict, name: str, lo: float, hi: float) -> float:
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise InvalidParameterError(f"{name}={v!r} is out of range: allowed a number in [{lo}, {hi}]")
    return float(v)


def _str(body: dict, name: str) -> str:
    v = body[name]
    if v is None:
        return ""
    if not isinstance(v, str):
        raise InvalidParameterError(f"{name} must be a string, got {type(v).__name__}")
    return v


def _seed(value: Any, name: str) -> int:
    if value is None or value == -1:
        return secrets.randbelow(4294967294)  # webui's random.randrange(4294967294)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise InvalidParameterError(f"{name}={value!r} is out of range: allowed -1 (random) or an integer in "
                                    f"[0, {2**32 - 1}]")
    return value


def resolve_sampler_name(sampler: Any, schedule: Any) -> tuple[str, str]:
    """Our (sampler, schedule) for webui's names; unknown ones raise UnknownNameError listing the valid."""
    from sfumato.sampling import resolve_sampler

    if not isinstance(sampler, str) or (schedule is not None and not isinstance(schedule, str)):
        raise InvalidParameterError("sampler_name and scheduler must be strings")
    try:
        return resolve_sampler(sampler, schedule)
    except InvalidParameterError as e:
        raise UnknownNameError(str(e)) from None


def parse(kind: str, body: Any, options: dict[str, Any], limits: Limits,
          model_upscalers: dict[str, str] | None = None) -> Task:
    """A webui txt2img / img2img request body -> Task (raises as the module docstring says).
    ``model_upscalers``: the server's upscaler models, every name they answer to -> their name
    (``Registry.upscaler_names``), which ``hr_upscaler`` may name besides the latent and image upscalers."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    defaults = TXT2IMG_DEFAULTS if kind == "txt2img" else IMG2IMG_DEFAULTS
    req = {**defaults, **{k: v for k, v in body.items() if k in defaults or k == "type"}}
    overrides = req["override_settings"] or {}
    if not isinstance(overrides, dict):
        raise InvalidParameterError("override_settings must be an object of option names to values")
    opts = {**options, **overrides}

    sampler = req["sampler_name"] or req["sampler_index"] or "Euler"
    sampler, schedule = resolve_sampler_name(sampler, req["scheduler"] or "automatic")
    batch = _int(req, "batch_size", 1, limits.max_batch)
    n_iter = _int(req, "n_iter", 1, limits.max_batch)
    if batch * n_iter > limits.max_batch:
        raise InvalidParameterError(f"batch_size * n_iter = {batch * n_iter} is out of range: this server "
                                    f"allows at most {limits.max_batch} images per request")
    clip_skip = opts.get("CLIP_stop_at_last_layers", 1)
    s_tmax = req["s_tmax"]
    kw: dict[str, Any] = {
        "prompt": _str(req, "prompt"), "negative_prompt": _str(req, "negative_prompt"),
        "width": req["width"], "height": req["height"], "steps": req["steps"], "cfg_scale": req["cfg_scale"],
        "sampler": sampler, "schedule": schedule, "seed": _seed(req["seed"], "seed"),
        "subseed_strength": req["subseed_strength"], "batch_size": batch, "clip_skip": clip_skip,
        "eta": req["eta"], "s_churn": req["s_churn"] or 0.0, "s_tmin": req["s_tmin"] or 0.0,
        "s_tmax": float("inf") if not s_tmax else s_tmax,  # webui: 0 means no upper bound
        "s_noise": 1.0 if req["s_noise"] is None else req["s_noise"],
    }
    if isinstance(kw["subseed_strength"], (int, float)) and kw["subseed_strength"] > 0:
        kw["subseed"] = _seed(req["subseed"], "subseed")
    task = Task(kind=kind, params=GenerationParams(), n_iter=n_iter, save=bool(req["save_images"]),
                send_images=bool(req["send_images"]))
    if kind == "img2img":
        kw.update(_img2img_fields(req, task, limits))
    p = validate(GenerationParams(**kw))
    for name in ("width", "height"):
        if getattr(p, name) > 8192:
            raise InvalidParameterError(f"{name} is out of range: allowed [8, 8192]")
    if p.width * p.height > limits.max_output_pixels:
        raise InvalidParameterError(f"width x height = {p.width}x{p.height} is out of range: this server "
                                    f"allows at most {limits.max_output_pixels} pixels per image")
    task.params = p
    task.model = opts.get("sd_model_checkpoint") or None
    if task.model is not None and not isinstance(task.model, str):
        raise InvalidParameterError("override_settings.sd_model_checkpoint must be a string")
    if req["refiner_checkpoint"] not in (None, "", "None"):
        task.refiner = str(req["refiner_checkpoint"])
        switch = 0.8 if req["refiner_switch_at"] is None else req["refiner_switch_at"]
        if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0.0 < switch < 1.0:
            raise InvalidParameterError(f"refiner_switch_at={switch!r} is out of range: allowed strictly "
                                        "between 0 and 1")
        task.refiner_switch_at = float(switch)
    if kind == "txt2img" and req["enable_hr"]:
        task.hires = _hires(req, p, limits, model_upscalers or {})
        if task.hires.upscaler not in LATENT_UPSCALERS and task.hires.upscaler not in IMAGE_UPSCALERS:
            task.upscalers = (task.hires.upscaler,)
    task.controls = _controlnet_units(req["alwayson_scripts"], task, limits)
    echo = dict(req)
    if kind == "img2img" and not req["include_init_images"]:
        echo["init_images"] = None
        echo["mask"] = None
    task.echo = echo
    return task


def _img2img_fields(req: dict, task: Task, limits: Limits) -> dict[str, Any]:
    images = req["init_images"]
    if not isinstance(images, list) or not images:
        raise InvalidParameterError("init_images must be a list of at least one base64 image")
    task.image = decode_image(images[0], "init_images[0]", limits)
    kw: dict[str, Any] = {"strength": req["denoising_strength"], "img2img_mode": "a1111"}
    if req["mask"] is not None:
        mask = decode_image(req["mask"], "mask", limits)
        invert = _int(req, "inpainting_mask_invert", 0, 1)
        mask = mask.convert("L") if mask.mode not in ("RGBA", "LA") else mask.getchannel("A")
        if invert:
            from PIL import ImageOps

            mask = ImageOps.invert(mask)
        if mask.size != task.image.size:
            mask = mask.resize(task.image.size, Image.LANCZOS)
        task.mask = mask
        fill = _int(req, "inpainting_fill", 0, 3)
        blur = req["mask_blur"] if req["mask_blur"] is not None else req["mask_blur_x"]
        kw.update(mask_blur=blur, inpaint_fill=INPAINT_FILLS[fill],
                  inpaint_full_res=bool(req["inpaint_full_res"]), inpaint_padding=req["inpaint_full_res_padding"])
    return kw


def _enum(name: str, value: Any, table: dict[str, str], where: str) -> str:
    """One of the extension's enums (``table``: our name -> its label), given by index, label or our name."""
    ours = list(table)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(ours):
        return ours[value]
    if isinstance(value, str):
        for name_, label in table.items():
            if value.lower() in (label.lower(), name_):
                return name_
    raise InvalidParameterError(f"{where}.{name}={value!r} is not one of " +
                                ", ".join(f"{i} {label!r}" for i, label in enumerate(table.values())))


def _controlnet_units(scripts: Any, task: Task, limits: Limits) -> list[ControlRequest]:
    """``alwayson_scripts["controlnet"]["args"]`` (the key in any case) -> checked units; disabled ones
    and units whose model is "None" are skipped, as the extension skips them."""
    if not scripts:
        return []
    if not isinstance(scripts, dict):
        raise InvalidParameterError("alwayson_scripts must be an object of script names to {\"args\": [...]}")
    entry = next((v for k, v in scripts.items() if str(k).lower() == "controlnet"), None)
    if entry is None:
        return []
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, list):
        raise InvalidParameterError("alwayson_scripts.controlnet.args must be a list of unit objects")
    from sfumato.adapters.controlnet import CONTROL_MODES, RESIZE_MODES, check_preprocessor

    units = []
    for i, unit in enumerate(args):
        where = f"alwayson_scripts.controlnet.args[{i}]"
        if not isinstance(unit, dict):
            raise InvalidParameterError(f"{where} must be an object")
        if not unit.get("enabled", True) or unit.get("model") in (None, "", "None", "none"):
            continue
        unknown = sorted(set(unit) - _UNIT_FIELDS)
        if unknown:
            raise InvalidParameterError(f"{where}: unknown field(s) {', '.join(unknown)}")
        if not isinstance(unit["model"], str):
            raise InvalidParameterError(f"{where}.model must be a ControlNet name")
        raw = unit.get("image", unit.get("input_image"))
        if isinstance(raw, dict):  # {"image": b64, "mask": b64}: the UI's sketch pad
            raw = raw.get("image")
        if raw in (None, ""):
            if task.image is None:
                raise InvalidParameterError(f"{where} has no image (txt2img needs one per ControlNet unit)")
            image = task.image
        else:
            image = decode_image(raw, f"{where}.image", limits)
        module = unit.get("module") or "none"
        try:
            check_preprocessor(module)
        except InvalidParameterError as e:
            raise UnknownNameError(f"{where}.module: {e}") from None
        vals = {}
        for name, default, lo, hi in (("weight", 1.0, 0.0, 10.0), ("guidance_start", 0.0, 0.0, 1.0),
                                      ("guidance_end", 1.0, 0.0, 1.0)):
            v = unit.get(name, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise InvalidParameterError(f"{where}.{name}={v!r} is out of range: allowed [{lo}, {hi}]")
            vals[name] = float(v)
        if vals["guidance_start"] >= vals["guidance_end"]:
            raise InvalidParameterError(f"{where}: guidance_start {vals['guidance_start']:g} must be below "
                                        f"guidance_end {vals['guidance_end']:g}")
        thresholds = []
        for name in ("threshold_a", "threshold_b"):
            v = unit.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise InvalidParameterError(f"{where}.{name}={v!r} must be a number")
            thresholds.append(None if v is None or v < 0 else float(v))  # the extension sends -1 for "default"
        mode = _enum("control_mode", unit.get("control_mode", 0), CONTROL_MODES, where)
        if unit.get("guessmode"):  # the extension's pre-1.1 field
            mode = "control"
        units.append(ControlRequest(
            model=unit["model"], image=image, module=module, weight=vals["weight"], start=vals["guidance_start"],
            end=vals["guidance_end"], mode=mode,
            resize=_enum("resize_mode", unit.get("resize_mode", 1), RESIZE_MODES, where),
            threshold_a=thresholds[0], threshold_b=thresholds[1]))
    return units


def _hires(req: dict, p: GenerationParams, limits: Limits, model_upscalers: dict[str, str]) -> Hires:
    scale = _float(req, "hr_scale", 1.0, 8.0)
    rx, ry = _int(req, "hr_resize_x", 0, 8192), _int(req, "hr_resize_y", 0, 8192)
    if rx == 0 and ry == 0:
        w, h = int(p.width * scale), int(p.height * scale)
    elif ry == 0:
        w, h = rx, int(rx * p.height / p.width)
    elif rx == 0:
        w, h = int(ry * p.width / p.height), ry
    else:
        w, h = rx, ry
    w, h = max(8, w // 8 * 8), max(8, h // 8 * 8)
    if w * h > limits.max_output_pixels:
        raise InvalidParameterError(f"hires size {w}x{h} is out of range: this server allows at most "
                                    f"{limits.max_output_pixels} pixels per image (lower hr_scale)")
    upscaler = req["hr_upscaler"] or "Latent"
    if upscaler not in LATENT_UPSCALERS and upscaler not in IMAGE_UPSCALERS:
        if not isinstance(upscaler, str) or upscaler not in model_upscalers:
            valid = [*LATENT_UPSCALERS, *IMAGE_UPSCALERS, *dict.fromkeys(model_upscalers.values())]
            raise UnknownNameError(f"unknown hr_upscaler {upscaler!r}; valid: {', '.join(valid)}")
        upscaler = model_upscalers[upscaler]
    strength = req["denoising_strength"]
    strength = 0.7 if strength is None else strength  # webui's txt2img hires default
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise InvalidParameterError(f"denoising_strength={strength!r} is out of range: allowed [0, 1]")
    sampler = schedule = None
    if req["hr_sampler_name"] not in (None, "", "Use same sampler"):
        sampler, schedule = resolve_sampler_name(req["hr_sampler_name"], req["hr_scheduler"] or "automatic")
    return Hires(width=w, height=h, scale=scale, upscaler=upscaler,
                 steps=_int(req, "hr_second_pass_steps", 0, 10000), strength=float(strength), sampler=sampler,
                 schedule=schedule, prompt=_str(req, "hr_prompt") or p.prompt,
                 negative_prompt=_str(req, "hr_negative_prompt") or p.negative_prompt)


def info_json(task: Task, outcome: Any) -> str:
    """webui's ``info`` string: the processed job as JSON (``Processed.js()``)."""
    from sfumato.metadata import VERSION, _sampler_label

    p = task.params
    n = len(outcome.images)
    seeds = outcome.seeds or [p.seed]
    info = {
        "prompt": p.prompt, "all_prompts": [p.prompt] * n, "negative_prompt": p.negative_prompt,
        "all_negative_prompts": [p.negative_prompt] * n, "seed": seeds[0], "all_seeds": seeds,
        "subseed": p.subseed if p.subseed is not None else -1,
        "all_subseeds": [p.subseed if p.subseed is not None else -1] * n,
        "subseed_strength": p.subseed_strength, "width": p.width, "height": p.height,
        "sampler_name": _sampler_label(p.sampler), "cfg_scale": p.cfg_scale, "steps": p.steps,
        "batch_size": p.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": outcome.model_name, "sd_model_hash": outcome.model_hash, "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": p.strength if p.strength is not None else (
            task.hires.strength if task.hires else 0),
        "extra_generation_params": outcome.extra, "index_of_first_image": 0, "infotexts": outcome.infotexts,
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(outcome.started)),
        "clip_skip": p.clip_skip, "is_using_inpainting_conditioning": outcome.inpainting_model,
        "version": VERSION, "state": outcome.state,
    }
    return json.dumps(info, ensure_ascii=False)
