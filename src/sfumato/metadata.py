"""Image metadata in AUTOMATIC1111's "parameters" format, the text every SD tool reads back.

Format (stable-diffusion-webui ``modules/processing.py`` ``create_infotext`` and
``modules/infotext_utils.py`` ``quote`` / ``parse_generation_parameters``)::

    <prompt, possibly several lines>
    Negative prompt: <negative prompt>          (only when there is one)
    Steps: 20, Sampler: Euler, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

The last line is ``key: value`` pairs joined by ``", "`` in a fixed key order; a key whose value is
``None`` is left out. A value containing ``,``, ``:`` or a newline is written as a JSON string
(``json.dumps(..., ensure_ascii=False)``); any other value is written as it is, quotes included.
Extra keys (ours and the caller's) follow the fixed ones, except that an extra key equal to a fixed
key takes that key's place, as a Python dict update does in the original.

Numbers: a float with an integral value is written as an integer (``CFG scale: 7``, ``7.5``), which is
what the web UI writes (its sliders hand integral values over as ints); the API path would write
``7.0``. Both parse back to the same value.

In PNG files the text is the ``parameters`` text chunk (tEXt, or iTXt when it is not Latin-1, as PIL
chooses); JPEG and WebP carry it in the EXIF UserComment (``UNICODE`` + UTF-16BE), as AUTOMATIC1111
writes them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from PIL import Image, PngImagePlugin

from sfumato.errors import InvalidParameterError
from sfumato.params import GenerationParams

__all__ = ["infotext", "parse_infotext", "params_from_infotext", "png_info", "exif_bytes", "read_parameters",
           "quote", "VERSION"]


def _version() -> str:
    from sfumato import __version__

    return f"sfumato {__version__}"


VERSION = _version()

# AUTOMATIC1111's fixed keys, in create_infotext's order. Those sfumato has no value for stay None
# (left out) unless a caller's extra key fills them in place.
_FIXED_KEYS = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
    "Variation seed strength", "Seed resize from", "Denoising strength", "Conditional mask weight", "Clip skip",
    "ENSD", "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "Tiling",
)
_TAIL_KEYS = ("Version", "User")  # after the extra keys

# sd_schedulers.py labels of our schedules (sfumato.sampling.resolve_schedule reads them back).
_SCHEDULE_LABELS: dict[str, str] = {
    "normal": "Normal", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
    "simple": "Simple", "beta": "Beta", "kl_optimal": "KL Optimal", "ays": "Align Your Steps",
}
# img2img "Masked content" (A1111's inpainting_fill 0 fill, 1 original, 2 latent noise, 3 latent nothing);
# "original" is the default and is not written.
_FILL_LABELS = {"fill": "fill", "latent_noise": "latent noise", "latent_nothing": "latent nothing"}
_EMPHASIS_LABELS = {"original": "Original", "none": "No norm"}
_GUIDANCE_RESCALE_KEY = "Guidance rescale"  # sfumato's own key: AUTOMATIC1111 has no such parameter

# parse_generation_parameters' pattern for one "key: value" pair (a value is a JSON string or runs to a comma).
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


# --- writing ---------------------------------------------------------------------------------------

def _format(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def quote(value: object) -> str:
    """A value as AUTOMATIC1111 writes it: JSON-quoted when it holds ``,``, ``:`` or a newline."""
    text = _format(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _sampler_label(name: str) -> str:
    from sfumato.sampling import SAMPLERS

    info = SAMPLERS.get(name)
    return info.label if info is not None else name


def _sampler_knobs(name: str) -> tuple[str, ...] | None:
    from sfumato.sampling import SAMPLERS

    info = SAMPLERS.get(name)
    return None if info is None else info.knobs


def _schedule_label(p: GenerationParams) -> str:
    """AUTOMATIC1111's label of the schedule: "automatic" (the sampler's default, unresolved) is
    "Automatic", as is a resolved default that has no label there (DDIM's and PLMS's "leading"
    timesteps, LCM's grid); "leading" chosen for another sampler is its "DDIM" schedule; any other
    schedule without a label keeps our name."""
    from sfumato.sampling import SAMPLERS

    if p.schedule in _SCHEDULE_LABELS:
        return _SCHEDULE_LABELS[p.schedule]
    info = SAMPLERS.get(p.sampler)
    if p.schedule == "automatic" or (info is not None and p.schedule == info.default_schedule):
        return "Automatic"
    return "DDIM" if p.schedule == "leading" else p.schedule


def _sampler_extras(p: GenerationParams) -> dict[str, object]:
    """What AUTOMATIC1111's samplers add when a knob differs from its default (sd_samplers_kdiffusion.py
    / sd_samplers_timesteps.py ``initialize``): "Eta" (k-diffusion, default 1), "Eta DDIM" (default 0),
    "Sigma churn" / "Sigma tmin" / "Sigma tmax" / "Sigma noise" (defaults 0, 0, inf, 1)."""
    knobs = _sampler_knobs(p.sampler)

    def takes(knob: str) -> bool:
        return knobs is None or knob in knobs

    out: dict[str, object] = {}
    if p.eta is not None and takes("eta"):
        ddim = _sampler_label(p.sampler).startswith("DDIM")
        if p.eta != (0.0 if ddim else 1.0):
            out["Eta DDIM" if ddim else "Eta"] = p.eta
    for key, knob, value, default in (("Sigma churn", "s_churn", p.s_churn, 0.0),
                                      ("Sigma tmin", "s_tmin", p.s_tmin, 0.0),
                                      ("Sigma tmax", "s_tmax", p.s_tmax, math.inf),
                                      ("Sigma noise", "s_noise", p.s_noise, 1.0)):
        if value != default and takes(knob):
            out[key] = value
    return out


# SDXL fields, sfumato's own keys (AUTOMATIC1111 writes none of them): sizes as "WIDTHxHEIGHT" like
# "Size", crops as "LEFT,TOP" (x, y); GenerationParams holds both as diffusers' (height, width) / (top, left).
_SDXL_TEXT_KEYS = {"prompt_2": "Prompt 2", "negative_prompt_2": "Negative prompt 2"}
_SDXL_SIZE_KEYS = {"original_size": "Original size", "target_size": "Target size",
                   "negative_original_size": "Negative original size", "negative_target_size": "Negative target size"}
_SDXL_CROP_KEYS = {"crops_coords_top_left": "Crop top left", "negative_crops_coords_top_left": "Negative crop top left"}
_SDXL_SCORE_KEYS = {"aesthetic_score": ("Aesthetic score", 6.0), "negative_aesthetic_score": ("Negative aesthetic score", 2.5)}


def _sdxl_fields(p: GenerationParams) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, key in _SDXL_TEXT_KEYS.items():
        if getattr(p, name) is not None:
            out[key] = getattr(p, name)
    for name, key in _SDXL_SIZE_KEYS.items():
        if getattr(p, name) is not None:
            h, w = getattr(p, name)
            out[key] = f"{w}x{h}"
    for name, key in _SDXL_CROP_KEYS.items():
        value = getattr(p, name)
        if value is not None and (name.startswith("negative") or tuple(value) != (0, 0)):
            out[key] = f"{value[1]},{value[0]}"
    for name, (key, default) in _SDXL_SCORE_KEYS.items():
        if getattr(p, name) != default:
            out[key] = getattr(p, name)
    return out


def infotext(params: GenerationParams, *, seed: int, model_name: str | None, model_hash: str | None,
             extra: Mapping[str, object] = {}, inpaint: bool = False, version: str | None = VERSION) -> str:
    """The ``parameters`` text of one image, as AUTOMATIC1111's ``create_infotext`` writes it.

    ``seed``: the seed of this image (``params.seed`` may be None or the batch's first). ``model_name``:
    the checkpoint's file stem; ``model_hash``: the first 10 hex digits of its SHA-256. ``inpaint``: the
    image was inpainted, so the mask settings are written ("Mask blur", "Inpaint area", "Masked area
    padding", "Masked content"). ``extra``: more ``key: value`` pairs (after ``params.extra``); a value of
    None leaves its key out. ``version``: the "Version" field (None leaves it out).
    """
    p = params
    fields: dict[str, object] = dict.fromkeys(_FIXED_KEYS)
    fields.update({
        "Steps": p.steps,
        "Sampler": _sampler_label(p.sampler),
        "Schedule type": _schedule_label(p),
        "CFG scale": p.cfg_scale,
        "Image CFG scale": p.image_cfg_scale,
        "Seed": seed,
        "Size": f"{p.width}x{p.height}",
        "Variation seed": p.subseed if p.subseed_strength else None,
        "Variation seed strength": p.subseed_strength or None,
        "Denoising strength": p.strength,
        "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
    })
    # AUTOMATIC1111's extra_generation_params, in the order its img2img init, the text encoder and the
    # sampler add them.
    if inpaint:
        if p.mask_blur > 0:
            fields["Mask blur"] = p.mask_blur
        if p.inpaint_full_res:
            fields["Inpaint area"] = "Only masked"
            fields["Masked area padding"] = p.inpaint_padding
        fields["Masked content"] = _FILL_LABELS.get(p.inpaint_fill)
    if p.emphasis != "original":
        fields["Emphasis"] = _EMPHASIS_LABELS.get(p.emphasis, p.emphasis)
    fields.update(_sampler_extras(p))
    if p.guidance_rescale:
        fields[_GUIDANCE_RESCALE_KEY] = p.guidance_rescale
    if p.deepcache > 1:
        fields["DeepCache"] = p.deepcache
        fields["DeepCache depth"] = p.deepcache_depth
    if p.int8 != "none":
        fields["Int8"] = p.int8
    if p.tome > 0:
        fields["Token merging ratio"] = p.tome  # AUTOMATIC1111's key for its ToMe setting
    fields.update(_sdxl_fields(p))
    fields.update(p.extra)
    fields.update(extra)
    # The model in hand outranks a "Model hash" / "Model" carried over in params.extra from an imported
    # infotext; the two go together, so a given name drops an imported hash of another file.
    if model_name is not None or model_hash is not None:
        fields["Model hash"], fields["Model"] = model_hash, model_name
    for key in _TAIL_KEYS:
        fields[key] = fields.pop(key, None)
    if version is not None:
        fields["Version"] = version

    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    negative = f"\nNegative prompt: {p.negative_prompt}" if p.negative_prompt else ""
    return f"{p.prompt}{negative}\n{line}".strip()


# --- reading ---------------------------------------------------------------------------------------

def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def parse_infotext(text: str) -> dict[str, str]:
    """AUTOMATIC1111's ``parse_generation_parameters``, without its UI defaults: ``{"Prompt": ...,
    "Negative prompt": ..., <key>: <value as written, JSON strings unquoted>}``.

    The last line holds the parameters when it has at least three ``key: value`` pairs; otherwise it is
    part of the prompt. Lines from ``Negative prompt:`` on are the negative prompt. Values stay strings
    (``"Size": "512x512"``); :func:`params_from_infotext` converts them.
    """
    *lines, last = text.strip().split("\n")
    if len(_PARAM_RE.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:"):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM_RE.findall(last):
        out[key] = _unquote(value) if value[:1] == '"' else value
    return out


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidParameterError(f"infotext {key}: {value!r} is not an integer") from None


def _float(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InvalidParameterError(f"infotext {key}: {value!r} is not a number") from None


def _resolve_sampler(label: str, schedule_label: str | None) -> tuple[str, str | None]:
    """(sampler name, schedule name or None for the field's default) from AUTOMATIC1111's labels.

    A pre-1.9 label carrying the schedule ("DPM++ 2M Karras") fixes it; "Automatic" stays "automatic"
    (resolved when the params are validated). Labels sfumato does not know are kept as they are, for
    :func:`sfumato.params.validate` to report when the params are used."""
    from sfumato.sampling import SAMPLERS, resolve_sampler, resolve_schedule

    try:
        # a schedule the label carries wins over the one asked for: ask for two and compare
        name, one = resolve_sampler(label, "normal")
        other = resolve_sampler(label, "karras")[1]
    except InvalidParameterError:
        return label, schedule_label
    if one == other:
        return name, one
    if schedule_label is None:
        return name, None
    if schedule_label.strip().lower() == "automatic":
        return name, "automatic"
    try:
        return name, resolve_schedule(schedule_label, SAMPLERS[name])
    except InvalidParameterError:
        return name, schedule_label


# infotext key -> (GenerationParams field, converter)
_SIMPLE_FIELDS: dict[str, tuple[str, Any]] = {
    "Steps": ("steps", _int), "CFG scale": ("cfg_scale", _float), "Image CFG scale": ("image_cfg_scale", _float),
    "Seed": ("seed", _int),
    "Variation seed": ("subseed", _int), "Variation seed strength": ("subseed_strength", _float),
    "Denoising strength": ("strength", _float), "Clip skip": ("clip_skip", _int), "Eta": ("eta", _float),
    "Eta DDIM": ("eta", _float), "Sigma churn": ("s_churn", _float), "Sigma tmin": ("s_tmin", _float),
    "Sigma tmax": ("s_tmax", _float), "Sigma noise": ("s_noise", _float), "Mask blur": ("mask_blur", _int),
    "Masked area padding": ("inpaint_padding", _int), _GUIDANCE_RESCALE_KEY: ("guidance_rescale", _float),
    "DeepCache": ("deepcache", _int), "DeepCache depth": ("deepcache_depth", _int),
    "Int8": ("int8", lambda key, value: value), "Token merging ratio": ("tome", _float),
}
def _wxh(key: str, value: str) -> tuple[int, int]:
    m = _SIZE_RE.match(value.strip())
    if m is None:
        raise InvalidParameterError(f"infotext {key}: {value!r} is not WIDTHxHEIGHT")
    return int(m.group(2)), int(m.group(1))


def _xy(key: str, value: str) -> tuple[int, int]:
    m = re.match(r"^\s*(\d+)\s*,\s*(\d+)\s*$", value)
    if m is None:
        raise InvalidParameterError(f"infotext {key}: {value!r} is not LEFT,TOP")
    return int(m.group(2)), int(m.group(1))


_SDXL_READERS: dict[str, tuple[str, Any]] = {
    **{key: (name, lambda k, v: v) for name, key in _SDXL_TEXT_KEYS.items()},
    **{key: (name, _wxh) for name, key in _SDXL_SIZE_KEYS.items()},
    **{key: (name, _xy) for name, key in _SDXL_CROP_KEYS.items()},
    **{key: (name, _float) for name, (key, _) in _SDXL_SCORE_KEYS.items()},
}
_INPAINT_KEYS = ("Mask blur", "Inpaint area", "Masked area padding", "Masked content")
_DROPPED = ("Prompt", "Negative prompt", "Sampler", "Schedule type", "Size", "Version")


def params_from_infotext(text: str) -> GenerationParams:
    """The :class:`GenerationParams` an infotext describes (the inverse of :func:`infotext` for the fields
    sfumato has). Keys sfumato has no field for ("Model hash", "Model", "VAE", "Hires upscale"...) go
    into ``extra`` as strings, so writing the params again keeps them; "Version" is dropped (it names
    the program that wrote the text). Values are converted, not validated: an unknown sampler label is
    kept, for :func:`sfumato.params.validate` to report. A text with inpainting keys but no "Mask blur"
    had blur 0 (AUTOMATIC1111 writes it only when positive)."""
    d = parse_infotext(text)
    kw: dict[str, Any] = {"prompt": d["Prompt"], "negative_prompt": d["Negative prompt"]}
    extra: dict[str, Any] = {}
    for key, value in d.items():
        if key in _SIMPLE_FIELDS:
            name, convert = _SIMPLE_FIELDS[key]
            kw[name] = convert(key, value)
        elif key == "Masked content":
            fills = {v: k for k, v in _FILL_LABELS.items()} | {"original": "original"}
            if value not in fills:
                raise InvalidParameterError(f"infotext Masked content: {value!r} is not one of "
                                            f"{', '.join(sorted(fills))}")
            kw["inpaint_fill"] = fills[value]
        elif key == "Inpaint area":
            kw["inpaint_full_res"] = value == "Only masked"
        elif key == "Emphasis" and value.lower() in ("original", "no norm"):
            kw["emphasis"] = "original" if value.lower() == "original" else "none"
        elif key in _SDXL_READERS:
            name, convert = _SDXL_READERS[key]
            kw[name] = convert(key, value)
        elif key not in _DROPPED:
            extra[key] = value
    if "Size" in d:
        m = _SIZE_RE.match(d["Size"])
        if m is None:
            raise InvalidParameterError(f"infotext Size: {d['Size']!r} is not WIDTHxHEIGHT")
        kw["width"], kw["height"] = int(m.group(1)), int(m.group(2))
    if "Sampler" in d:
        kw["sampler"], schedule = _resolve_sampler(d["Sampler"], d.get("Schedule type"))
        if schedule is not None:
            kw["schedule"] = schedule
    if any(k in d for k in _INPAINT_KEYS) and "Mask blur" not in d:
        kw["mask_blur"] = 0
    return GenerationParams(**kw, extra=extra)


# --- files -----------------------------------------------------------------------------------------

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


def png_info(text: str) -> PngImagePlugin.PngInfo:
    """PNG text chunks holding ``text`` as ``parameters`` (tEXt; iTXt when it is not Latin-1)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info


def exif_bytes(text: str) -> bytes:
    """EXIF with ``text`` in UserComment (``UNICODE\\0`` + UTF-16BE, piexif's encoding), for JPEG / WebP."""
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
    return exif.tobytes()


def _user_comment(raw: bytes | str) -> str | None:
    if isinstance(raw, str):
        return raw
    head, body = raw[:8], raw[8:]
    if head == b"UNICODE\0":
        # piexif writes big-endian; some writers use little-endian with a byte order mark or without one
        if body[:2] == b"\xff\xfe":
            return body[2:].decode("utf-16-le", errors="replace")
        if body[:2] == b"\xfe\xff":
            return body[2:].decode("utf-16-be", errors="replace")
        return body.decode("utf-16-be", errors="replace")
    if head in (b"ASCII\0\0\0", b"\0" * 8):
        return body.decode("utf-8", errors="replace").rstrip("\0")
    return None


def read_parameters(image: str | os.PathLike | Image.Image) -> str | None:
    """The ``parameters`` text of an image file (PNG text chunk, or JPEG / WebP EXIF UserComment), or None.

    Raises :class:`sfumato.images.ImageReadError` when a path is not a readable image.
    """
    if isinstance(image, Image.Image):
        return _parameters_of(image)
    from sfumato.images import open_image

    with open_image(image) as img:
        return _parameters_of(img)


def _parameters_of(img: Image.Image) -> str | None:
    text = img.info.get("parameters")
    if isinstance(text, str):
        return text
    raw = img.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    return _user_comment(raw) if raw else None
