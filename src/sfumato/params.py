"""Generation parameters: one dataclass that the Python API, the CLI, the HTTP server and the PNG
metadata all speak, validated once at the boundary with messages that name the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from sfumato.errors import InvalidParameterError

INPAINT_FILLS = ("original", "latent_noise", "latent_nothing", "fill")
EMPHASIS = ("original", "none")
IMG2IMG_MODES = ("diffusers", "a1111")
INT8_MODES = ("none", "unet", "unet+vae")  # what runs in int8 (sfumato.models.quant)


@dataclass(frozen=True)
class GenerationParams:
    """Everything that determines an image (besides the model and the input images)."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "euler"
    schedule: str = "automatic"  # "automatic": the sampler's own default (AUTOMATIC1111's "Automatic")
    seed: int | None = None  # None: a random seed, recorded in the result's info
    subseed: int | None = None
    subseed_strength: float = 0.0
    batch_size: int = 1
    clip_skip: int = 1  # AUTOMATIC1111 numbering: 1 = the model's own layer, 2 = one earlier
    eta: float | None = None  # ancestral / DDIM noise; None = the sampler's default
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    guidance_rescale: float = 0.0
    image_cfg_scale: float | None = None  # instruct-pix2pix: the image's guidance weight (None: not an edit)
    emphasis: str = "original"  # AUTOMATIC1111 "Original" emphasis normalisation, or "none" ("No norm")
    # img2img / inpainting
    strength: float | None = None  # denoising strength; None for txt2img
    img2img_mode: str = "diffusers"  # which steps strength selects: "diffusers" or "a1111" (see pipeline)
    mask_blur: int = 4
    inpaint_fill: str = "original"
    inpaint_full_res: bool = False
    inpaint_padding: int = 32
    # SDXL (diffusers' names and defaults). Sizes are (height, width) as diffusers takes them.
    prompt_2: str | None = None  # the second text encoder's prompt (None: ``prompt``)
    negative_prompt_2: str | None = None  # (None: ``negative_prompt``)
    original_size: tuple[int, int] | None = None  # None: (height, width)
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None  # None: (height, width)
    negative_original_size: tuple[int, int] | None = None  # each negative_* None: its positive value
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0  # refiner only
    negative_aesthetic_score: float = 2.5  # refiner only
    # ensemble of experts: stop at / start from this fraction of the noise schedule (0..1 of 1000 timesteps)
    denoising_start: float | None = None
    denoising_end: float | None = None
    # DeepCache (a fast path, off by default): the whole UNet on every N-th step only, the shallow blocks
    # from input block 0 to ``deepcache_depth`` on the others (sfumato.models.unet.StepCache); 1 = off
    deepcache: int = 1
    deepcache_depth: int = 1
    # int8 (a fast path, off by default, CPU float32 only): the UNet's (and ControlNets') big linears and
    # convs run as int8 products on the CPU's integer units (sfumato.models.quant); "unet+vae" also the
    # autoencoder's decode
    int8: str = "none"
    # token merging (ToMe, a fast path, off by default): this fraction of the self-attention tokens at the
    # highest resolution merged (sfumato.models.tome); 0 = off, at most 0.75
    tome: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, carried into the metadata

    def replace(self, **changes: Any) -> GenerationParams:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def model_cfg(spec) -> float:  # noqa: ANN001 - a ModelSpec (config imports nothing from here)
    """The guidance scale a model of ``spec`` generates with when none is given: its own
    (``ModelSpec.default_cfg``, e.g. the built-in model's 2), else :class:`GenerationParams`' default."""
    return spec.default_cfg if spec.default_cfg is not None else GenerationParams.cfg_scale


def _int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidParameterError(f"{name}={value} is out of range: allowed {allowed}")
    return value


def _float(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameterError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if v != v or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise InvalidParameterError(f"{name}={value} is out of range: allowed [{lo}, {hi}]")
    return v


def _pair(name: str, value: Any, lo: int) -> tuple[int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
        raise InvalidParameterError(f"{name} must be two integers (height, width), got {value!r}")
    for v in value:
        if not lo <= v <= 16384:
            raise InvalidParameterError(f"{name}={tuple(value)} is out of range: each value in [{lo}, 16384]")
    return (int(value[0]), int(value[1]))


def _fraction(name: str, value: Any) -> float:
    v = _float(name, value, 0.0, 1.0)
    if not 0.0 < v < 1.0:
        raise InvalidParameterError(f"{name}={value} is out of range: allowed strictly between 0 and 1")
    return v


def validate(p: GenerationParams, *, size_multiple: int = 8) -> GenerationParams:
    """Check every field; return the params with names normalised. Raises InvalidParameterError."""
    from sfumato.sampling import resolve_sampler

    for name in ("prompt", "negative_prompt"):
        if not isinstance(getattr(p, name), str):
            raise InvalidParameterError(f"{name} must be a string, got {type(getattr(p, name)).__name__}")
    for name in ("width", "height"):
        v = _int(name, getattr(p, name), size_multiple, 8192)
        if v % size_multiple:
            lower = v // size_multiple * size_multiple
            raise InvalidParameterError(
                f"{name}={v} is not a multiple of {size_multiple} (this model's latent grid); "
                f"use {max(lower, size_multiple)} or {lower + size_multiple}")
    _int("steps", p.steps, 1, 10000)
    _float("cfg_scale", p.cfg_scale, 0.0, 100.0)
    _int("batch_size", p.batch_size, 1, 64)
    _int("clip_skip", p.clip_skip, 1, 12)
    if p.seed is not None:
        _int("seed", p.seed, -1, 2**64 - 1)
    if p.subseed is not None:
        _int("subseed", p.subseed, -1, 2**64 - 1)
    _float("subseed_strength", p.subseed_strength, 0.0, 1.0)
    if p.eta is not None:
        _float("eta", p.eta, 0.0, 10.0)
    _float("s_churn", p.s_churn, 0.0)
    _float("s_noise", p.s_noise, 0.0)
    _float("s_tmin", p.s_tmin, 0.0)
    if p.s_tmax != float("inf"):
        _float("s_tmax", p.s_tmax, 0.0)
    _float("guidance_rescale", p.guidance_rescale, 0.0, 1.0)
    if p.image_cfg_scale is not None:
        _float("image_cfg_scale", p.image_cfg_scale, 0.0, 100.0)
    _int("deepcache", p.deepcache, 1, 100)
    _int("deepcache_depth", p.deepcache_depth, 0, 64)
    if p.int8 not in INT8_MODES:
        raise InvalidParameterError(f"int8 {p.int8!r} is not one of {', '.join(INT8_MODES)}")
    _float("tome", p.tome, 0.0, 0.75)
    if p.emphasis.lower() not in EMPHASIS:
        raise InvalidParameterError(f"emphasis {p.emphasis!r} is not one of {', '.join(EMPHASIS)}")
    if p.strength is not None:
        _float("strength", p.strength, 0.0, 1.0)
    _int("mask_blur", p.mask_blur, 0, 256)
    _int("inpaint_padding", p.inpaint_padding, 0, 4096)
    if p.img2img_mode not in IMG2IMG_MODES:
        raise InvalidParameterError(f"img2img_mode {p.img2img_mode!r} is not one of {', '.join(IMG2IMG_MODES)}")
    if p.inpaint_fill not in INPAINT_FILLS:
        raise InvalidParameterError(f"inpaint_fill {p.inpaint_fill!r} is not one of {', '.join(INPAINT_FILLS)}")
    for name in ("prompt_2", "negative_prompt_2"):
        if getattr(p, name) is not None and not isinstance(getattr(p, name), str):
            raise InvalidParameterError(f"{name} must be a string or None, got {type(getattr(p, name)).__name__}")
    pairs = {}
    for name in ("original_size", "target_size", "negative_original_size", "negative_target_size"):
        if getattr(p, name) is not None:
            pairs[name] = _pair(name, getattr(p, name), 1)
    for name in ("crops_coords_top_left", "negative_crops_coords_top_left"):
        if getattr(p, name) is not None:
            pairs[name] = _pair(name, getattr(p, name), 0)
    _float("aesthetic_score", p.aesthetic_score, 0.0, 10.0)
    _float("negative_aesthetic_score", p.negative_aesthetic_score, 0.0, 10.0)
    for name in ("denoising_start", "denoising_end"):
        if getattr(p, name) is not None:
            _fraction(name, getattr(p, name))
    if p.denoising_start is not None and p.denoising_end is not None and p.denoising_start >= p.denoising_end:
        raise InvalidParameterError(f"denoising_start={p.denoising_start} must be below denoising_end="
                                    f"{p.denoising_end}")
    sampler, schedule = resolve_sampler(p.sampler, p.schedule)
    return replace(p, sampler=sampler, schedule=schedule, emphasis=p.emphasis.lower(), **pairs)
