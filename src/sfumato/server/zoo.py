"""The SD 2 zoo methods as native job types (``POST /api/v1/jobs`` with ``"type"``): "upscale"
(:meth:`Pipeline.upscale`), "edit" (:meth:`Pipeline.edit`), "depth2img" (:meth:`Pipeline.depth2img`) and
"variations" (:meth:`Pipeline.variations`, ``noise_level`` 0..999).

A job takes the method's parameters by name: ``image`` (base64; webui's ``init_images: [image]`` also
works), ``prompt`` (``instruction`` for edit), ``negative_prompt``, ``image_cfg_scale`` (edit),
``strength`` (depth2img; webui's ``denoising_strength`` also works), ``depth_map`` (depth2img, a base64
greyscale image, larger = nearer; without it the model's own depth estimator runs, and a model without one
fails the job saying so), ``noise_level``, ``tile_size``, ``tile_overlap`` (upscale), and
the generation fields every job takes (``steps``, ``cfg_scale``, ``sampler_name``, ``scheduler``,
``seed``, ``batch_size``, ``n_iter``, ``width`` / ``height``: default the image's size rounded down to a
multiple of 8; the upscaler's output is always 4x). Defaults are the method's where it has its own
(edit ``cfg_scale`` 7.5, ``image_cfg_scale`` 1.5; depth2img ``strength`` 0.8; upscale ``steps`` 75,
``cfg_scale`` 9, ``noise_level`` 20, ``tile_size`` None = the method's automatic tiling, ``tile_overlap``
32) and webui's otherwise (:data:`a1111.TXT2IMG_DEFAULTS`). ``model`` names the checkpoint (upscale: an
upscaler model, by name); without it, the first checkpoint that can run the method. A field another type
takes, or none takes, is refused with the list of this type's fields.

A new method is one :data:`KINDS` entry plus its call in ``execute._iteration``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sfumato.errors import InvalidParameterError
from sfumato.server.a1111 import TXT2IMG_DEFAULTS, Limits, RequestError, Task, _int, \
    decode_image, parse


@dataclass(frozen=True)
class ZooKind:
    """One method as a job type: the models that run it and its own fields with their defaults."""

    concat: str | None  # ModelSpec.concat of the models that can run it (None: they have an image encoder)
    what: str  # those models, in words
    fields: dict[str, Any]  # the method's own fields -> default (None: none, or required)
    defaults: dict[str, Any]  # generation fields whose default is the method's, not webui's

    def fits(self, spec) -> bool:  # noqa: ANN001 - a ModelSpec
        """Whether a model of ``spec`` can run this method."""
        return spec.image_encoder is not None if self.concat is None else spec.concat == self.concat


KINDS: dict[str, ZooKind] = {
    "upscale": ZooKind("low_res", "an SD x4 upscaler model", {"noise_level": 20, "tile_size": None,
                                                               "tile_overlap": 32}, {"steps": 75, "cfg_scale": 9.0}),
    "edit": ZooKind("pix2pix", "an instruct-pix2pix model", {"instruction": None, "image_cfg_scale": 1.5},
                    {"cfg_scale": 7.5}),
    "depth2img": ZooKind("depth", "a depth model (SD 2 512-depth)", {"strength": 0.8, "depth_map": None}, {}),
    "variations": ZooKind(None, "an unCLIP model (SD 2.1 unCLIP L or H)", {"noise_level": 0}, {"cfg_scale": 10.0}),
}
_COMMON = ("type", "model", "image", "init_images", "prompt", "negative_prompt", "steps", "cfg_scale",
           "sampler_name", "sampler_index", "scheduler", "seed", "subseed", "subseed_strength", "batch_size",
           "n_iter", "width", "height", "eta", "s_churn", "s_tmin", "s_tmax", "s_noise", "override_settings",
           "denoising_strength")
IMAGE_FIELDS = ("image", "init_images", "depth_map")  # left out of job listings
FIELDS = frozenset(_COMMON) | {f for k in KINDS.values() for f in k.fields}  # what a job row keeps


def parse_zoo(kind: str, body: Any, options: dict[str, Any], limits: Limits) -> Task:
    """A native zoo job body -> Task (``task.model``: the ``model`` field or None for the first that fits)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    spec = KINDS[kind]
    allowed = set(_COMMON) | set(spec.fields)
    if kind != "depth2img":
        allowed.discard("denoising_strength")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidParameterError(f"type={kind!r} does not take {', '.join(unknown)}; its fields: "
                                    f"{', '.join(sorted(allowed))}")
    req = {**spec.fields, **spec.defaults, **body}
    raw = req.get("image")
    if raw is None and isinstance(req.get("init_images"), list) and req["init_images"]:
        raw = req["init_images"][0]
    if raw is None:
        raise InvalidParameterError(f"type={kind!r} needs image (a base64 image)")
    image = decode_image(raw, "image", limits)
    if kind == "edit":
        if req["instruction"] is not None and req.get("prompt") not in (None, "", req["instruction"]):
            raise InvalidParameterError("edit takes its instruction as instruction or prompt, not both")
        req["prompt"] = req["instruction"] if req["instruction"] is not None else req.get("prompt", "")
    if kind == "depth2img" and "strength" not in body and body.get("denoising_strength") is not None:
        req["strength"] = body["denoising_strength"]
    if kind == "upscale":
        w, h = image.width * 4, image.height * 4  # the output (the x4 upscaler's factor)
        if w * h > limits.max_output_pixels:
            raise InvalidParameterError(f"upscaling a {image.width}x{image.height} image makes {w}x{h}; this server "
                                        f"allows at most {limits.max_output_pixels} pixels per image")
        req["width"], req["height"] = max(8, w // 8 * 8), max(8, h // 8 * 8)  # checked only: the method sets it
    else:
        req.setdefault("width", max(8, image.width // 8 * 8))
        req.setdefault("height", max(8, image.height // 8 * 8))
    gen = {k: v for k, v in req.items() if k in TXT2IMG_DEFAULTS and k != "denoising_strength"}
    task = parse("txt2img", gen, options, limits)
    task.kind, task.image = kind, image
    task.model = req.get("model") if req.get("model") not in (None, "") else None
    if task.model is not None and not isinstance(task.model, str):
        raise InvalidParameterError("model must be a checkpoint name")
    overrides = req.get("override_settings") or {}
    if task.model is None and isinstance(overrides, dict) and overrides.get("sd_model_checkpoint"):
        task.model = str(overrides["sd_model_checkpoint"])
    p = task.params
    if kind == "edit":
        v = req["image_cfg_scale"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
            raise InvalidParameterError(f"image_cfg_scale={v!r} is out of range: allowed a number in [0, 100]")
        p = p.replace(image_cfg_scale=float(v))
    elif kind == "depth2img":
        v = req["strength"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise InvalidParameterError(f"strength={v!r} is out of range: allowed a number in (0, 1]")
        p = p.replace(strength=float(v))
        if req["depth_map"] is not None:  # None: the model's depth estimator (a job without one fails, saying so)
            task.method_kw["depth_map"] = decode_image(req["depth_map"], "depth_map", limits)
    elif kind == "variations":
        task.method_kw["noise_level"] = _int(req, "noise_level", 0, 999)
    elif kind == "upscale":
        task.method_kw["noise_level"] = _int(req, "noise_level", 0, 350)
        if req["tile_size"] is not None:
            task.method_kw["tile_size"] = _int(req, "tile_size", 8, 8192)
        task.method_kw["tile_overlap"] = _int(req, "tile_overlap", 0, 8192)
    task.params = p
    task.echo = {k: v for k, v in req.items() if k not in IMAGE_FIELDS}
    return task


def check_model(kind: str, ckpt_name: str, spec) -> None:  # noqa: ANN001 - a ModelSpec or None
    """Refuse a model that cannot run ``kind`` (``spec``: the checkpoint's detected spec)."""
    need = KINDS[kind]
    if spec is not None and not need.fits(spec):
        raise InvalidParameterError(f"type={kind!r} needs {need.what}; {ckpt_name!r} is {spec.family}")


def storable(body: dict[str, Any]) -> dict[str, Any]:
    """A zoo job's request as its row keeps it (and re-parses after a restart)."""
    return {k: v for k, v in body.items() if k in FIELDS}
