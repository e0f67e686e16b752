"""The spine: prompt -> tokens -> conditioning -> denoiser -> sampler -> VAE decode -> image.

Written once, as plain functions over a loaded :class:`Pipeline`; txt2img, img2img, inpainting and
outpainting differ only in where the first latent comes from and what is concatenated or blended:

    cond     = conditioning(pipe, p)                       # prompt language, AND, [from:to:when]
    model    = guided_model(pipe, cond, p, extra)         # CFG over the UNet, in its output space
    den      = make_denoiser(model, discrete, prediction) # D(x, sigma) -> x0
    sigmas   = get_sigmas(schedule, steps, discrete)
    x0       = sampler(den, x_T, sigmas, generator=g)
    images   = decode(x0)

Random draws follow diffusers' order with one CPU generator seeded by ``seed`` (image latents of the
input image, initial noise, then the sampler's own noise), so a seed gives diffusers' image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import secrets
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sfumato import imageops
from sfumato.config import ModelSpec
from sfumato.errors import InvalidParameterError
from sfumato.models.unet import StepCache, UNetModel, timestep_embedding
from sfumato.models import ops, tome
from sfumato.models.vae import AutoencoderKL, DiagonalGaussian
from sfumato.params import GenerationParams, model_cfg, validate
from sfumato.text.conditioning import Conditioning, encode_prompt, pad_to_same_length
from sfumato.text.encoder import CLIPTextEncoder
from sfumato.text.prompt import get_prompt_schedule, split_and
from sfumato.text.tokenizer import CLIPTokenizer


OFFLOAD_MODES = ("none", "model", "sequential")


@dataclass(frozen=True)
class MemoryOptions:
    """Speed traded for memory, each off by default (the default is the fastest exact path).

    ``vae_tiling``: encode and decode images larger than a tile in overlapping tiles blended at their
    borders (diffusers' ``enable_vae_tiling``): memory bounded by one tile, a 2048 px image in the
    memory of a 512 px one. Not exact: each tile normalises with its own statistics (about 35 dB
    PSNR against the whole decode on the built-in model; see tests/test_vae.py). ``vae_tile``: the tile
    in pixels (None: the model's native size, as diffusers' ``sample_size``); ``vae_tile_overlap``: the
    fraction of a tile shared with each neighbour.
    ``vae_slicing``: one image of a batch at a time through the autoencoder (exact up to rounding).
    ``attention_slice``: at most this many query tokens per attention call (exact up to rounding);
    None: all at once (torch's fused attention already works in blocks on the CPU).
    ``offload``: idle weights leave memory (exact). ``"model"`` (or True): on the CPU, only the component
    running (text encoders, UNet, autoencoder, extras) keeps its mapped weight pages; the others' are
    released and mapped back from the page cache when they next run (``weights.pages.idle_release``), so
    the peak is the largest component plus activations (diffusers' ``enable_model_cpu_offload``).
    ``"sequential"``: the same one layer group at a time (a UNet res-block or transformer, about 64 MB),
    so the peak is little more than the activations, paid for with the page faults of mapping every
    weight back on every call (diffusers' ``enable_sequential_cpu_offload``). Weights count once they are
    mapped from a ``.safetensors`` file; pass the options to ``sfumato.load(memory=...)`` so that loading
    does not map them all in first. Moving components between an accelerator and CPU memory is not
    implemented (refused on a GPU pipeline).
    """

    vae_tiling: bool = False
    vae_tile: int | None = None
    vae_tile_overlap: float = 0.25
    vae_slicing: bool = False
    attention_slice: int | None = None
    offload: str | bool = "none"  # OFFLOAD_MODES; True means "model", False "none"

    def __post_init__(self) -> None:
        if self.vae_tile is not None and (isinstance(self.vae_tile, bool) or not isinstance(self.vae_tile, int)
                                          or self.vae_tile < 64 or self.vae_tile % 64):
            raise InvalidParameterError(f"vae_tile must be a multiple of 64 pixels, at least 64; got {self.vae_tile!r}")
        if not 0.0 < self.vae_tile_overlap <= 0.5:
            raise InvalidParameterError(f"vae_tile_overlap must be in (0, 0.5], got {self.vae_tile_overlap!r}")
        if self.attention_slice is not None and (isinstance(self.attention_slice, bool)
                                                 or not isinstance(self.attention_slice, int)
                                                 or self.attention_slice < 1):
            raise InvalidParameterError(f"attention_slice must be a positive number of tokens or None, "
                                        f"got {self.attention_slice!r}")
        for name in ("vae_tiling", "vae_slicing"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameterError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.offload, bool):
            object.__setattr__(self, "offload", "model" if self.offload else "none")
        if self.offload not in OFFLOAD_MODES:
            raise InvalidParameterError(f"offload must be one of {', '.join(map(repr, OFFLOAD_MODES))} (or True "
                                        f"for 'model'), got {self.offload!r}")


@dataclass
class GenerationResult:
    """Images and the parameters that made them (``params.seed`` is the seed actually used)."""

    images: list[Image.Image]
    params: GenerationParams
    seeds: list[int]
    infotexts: list[str]

    @property
    def info(self) -> dict[str, Any]:
        return self.params.to_dict()


@dataclass
class Pipeline:
    """A loaded model: its networks, tokenizer and spec (family, prediction type, latent scale...)."""

    spec: ModelSpec
    unet: UNetModel
    vae: AutoencoderKL
    text_encoders: list[CLIPTextEncoder]
    tokenizer: CLIPTokenizer
    source: Path | None = None
    ema: str | None = field(default=None)  # which UNet copy of a training checkpoint is loaded: "ema" | "raw"
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    lora_dir: Path | None = None  # where <lora:name:weight> prompt tags are looked up
    # networks some families carry besides the spine's: unCLIP's CLIP image encoder and its embedding
    # noise augmentor (``spec.image_encoder``), depth2img's MiDaS depth estimator
    image_encoder: torch.nn.Module | None = None
    noise_augmentor: torch.nn.Module | None = None
    depth_model: torch.nn.Module | None = None
    _hash: str | None = field(default=None, repr=False)
    _hash_job: Future | None = field(default=None, repr=False, compare=False)  # start_model_hash's

    def modules(self) -> list[torch.nn.Module]:
        extras = [m for m in (self.image_encoder, self.noise_augmentor, self.depth_model) if m is not None]
        return [self.unet, self.vae, *self.text_encoders, *extras]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def model_name(self) -> str:
        return self.source.stem if self.source is not None else self.spec.family

    def model_hash(self) -> str | None:
        """First 10 hex digits of the checkpoint file's SHA-256 (AUTOMATIC1111's "Model hash"); waits for
        the hash :meth:`start_model_hash` began, if any."""
        job = self._hash_job
        if self._hash is None and job is not None:
            self._hash_job = None  # a failed hash is raised once; the next call hashes again
            self._hash = job.result()
        if self._hash is None and self.source is not None and self.source.is_file():
            from sfumato.hashes import sha256_file

            self._hash = sha256_file(self.source)[:10]
        return self._hash

    def start_model_hash(self) -> None:
        """Begin hashing the checkpoint file in a background thread (the first generation with a new file
        then does not wait seconds for it at the end: hashlib reads and hashes without holding the GIL)."""
        if self._hash is not None or self._hash_job is not None or self.source is None or not self.source.is_file():
            return
        import threading

        from sfumato.hashes import sha256_file

        job: Future = Future()
        source = self.source

        def work() -> None:
            try:
                job.set_result(sha256_file(source)[:10])
            except Exception as e:  # noqa: BLE001 - handed to whoever asks for the hash
                job.set_exception(e)

        self._hash_job = job
        threading.Thread(target=work, name="sfumato-model-hash", daemon=True).start()

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        for m in self.modules():
            m.to(device=device, dtype=dtype)
            m.eval().requires_grad_(False)
        return self

    def save(self, path: str | os.PathLike, *, format: str = "single_file", half: bool = False,
             ema_only: bool = True) -> Path:
        """Write the model as an original-layout ``.safetensors`` (``format="single_file"``) or a
        diffusers folder (``format="diffusers"``); ``half`` stores fp16; see :func:`sfumato.weights.save.save`."""
        from sfumato.weights.save import save

        return save(self, path, format=format, half=half, ema_only=ema_only)

    # --- add-ons --------------------------------------------------------------------------------

    def load_lora(self, path: str | os.PathLike, weight: float | tuple[float, float] = 1.0, *,
                  name: str | None = None):
        """Apply a LoRA file (kohya/AUTOMATIC1111 or diffusers/PEFT) with ``weight``, or a (UNet, text
        encoder) pair; returns a handle for :meth:`unload_lora`. The base weights are kept: unloading
        restores them bit for bit. See :mod:`sfumato.adapters.lora`."""
        from sfumato.adapters.lora import load_lora

        return load_lora(self, path, weight, name=name)

    def unload_lora(self, handle) -> None:  # noqa: ANN001 - a LoraHandle
        from sfumato.adapters.lora import unload_loras

        unload_loras(self, [handle])

    def unload_loras(self) -> None:
        """Remove every loaded LoRA; the original weights come back exactly."""
        from sfumato.adapters.lora import unload_loras

        unload_loras(self)

    def load_embedding(self, path: str | os.PathLike, token: str | None = None):
        """Load a textual-inversion embedding (AUTOMATIC1111 ``.pt``/``.safetensors``, diffusers
        ``learned_embeds``, SDXL ``clip_l``/``clip_g``); ``token`` (default: the file name) then stands for
        its vectors in prompts. See :mod:`sfumato.adapters.embeddings`."""
        from sfumato.adapters.embeddings import load_embedding

        return load_embedding(self, path, token)

    def load_controlnet(self, path: str | os.PathLike):
        """A ControlNet (original single file or diffusers folder) for this model, on its device and dtype;
        use it in ``generate(..., controlnet=[ControlUnit(model, image, weight)])``."""
        from sfumato.adapters.controlnet import load_controlnet

        return load_controlnet(path, self.spec.unet, dtype=self.dtype, family=self.spec.family).to(self.device)

    def unload_embeddings(self) -> None:
        from sfumato.adapters.embeddings import unload_embeddings

        unload_embeddings(self)

    @property
    def loras(self) -> list:
        """The loaded LoRA handles, in load order."""
        state = getattr(self, "_lora", None)
        return list(state.handles) if state is not None else []

    # --- the public generation API: thin wrappers over the spine -------------------------------

    def generate(self, prompt: str = "", negative_prompt: str = "", *, width: int | None = None,
                 height: int | None = None, latents: torch.Tensor | None = None,
                 callback: Callable | None = None, refiner: Pipeline | None = None,
                 refiner_switch_at: float | None = None, **kw: Any) -> GenerationResult:
        """Text to image. ``latents``: initial noise (B, C, H/8, W/8) instead of drawing it from the seed.

        ``refiner``: a second expert (the SDXL refiner) takes over the latents at ``refiner_switch_at``
        of the noise schedule (default 0.8; AUTOMATIC1111's "Refiner switch at", diffusers'
        ``denoising_end`` / ``denoising_start``), without decoding in between."""
        addons = _take_controls(kw)
        p = self._params(prompt, negative_prompt, width, height, kw)
        return run_experts(self, p, refiner=refiner, switch=refiner_switch_at, latents=latents, callback=callback,
                           **addons)

    def img2img(self, image: Image.Image, prompt: str = "", negative_prompt: str = "", *,
                strength: float = 0.75, width: int | None = None, height: int | None = None,
                callback: Callable | None = None, refiner: Pipeline | None = None,
                refiner_switch_at: float | None = None, **kw: Any) -> GenerationResult:
        """Image to image: the input is encoded, noised to ``strength`` and denoised (diffusers' semantics:
        ``int(steps * strength)`` of the ``steps``-step schedule are run). ``refiner``: as in
        :meth:`generate`."""
        image = imageops.to_rgb(image)
        width, height = self._size_from(image, width, height)
        addons = _take_controls(kw)
        p = self._params(prompt, negative_prompt, width, height, {**kw, "strength": strength})
        return run_experts(self, p, refiner=refiner, switch=refiner_switch_at, image=image, callback=callback,
                           **addons)

    def inpaint(self, image: Image.Image, mask: Image.Image, prompt: str = "", negative_prompt: str = "", *,
                strength: float = 1.0, mask_blur: int = 4, fill: str = "original", inpaint_full_res: bool = False,
                padding: int = 32, width: int | None = None, height: int | None = None,
                callback: Callable | None = None, refiner: Pipeline | None = None,
                refiner_switch_at: float | None = None, **kw: Any) -> GenerationResult:
        """Repaint the white part of ``mask``. A 9-channel inpainting model is used as such; any other model
        inpaints by blending the known latents back after every step. ``refiner``: as in :meth:`generate`
        (the refiner keeps blending the known area)."""
        image = imageops.to_rgb(image)
        if not isinstance(mask, Image.Image):
            raise InvalidParameterError(f"mask must be a PIL image, got {type(mask).__name__}")
        if mask.size != image.size:
            raise InvalidParameterError(f"mask size {mask.size[0]}x{mask.size[1]} differs from the image size "
                                        f"{image.size[0]}x{image.size[1]}; they must be equal")
        width, height = self._size_from(image, width, height)
        addons = _take_controls(kw)
        p = self._params(prompt, negative_prompt, width, height,
                         {**kw, "strength": strength, "mask_blur": mask_blur, "inpaint_fill": fill,
                          "inpaint_full_res": inpaint_full_res, "inpaint_padding": padding})
        experts = {"refiner": refiner, "switch": refiner_switch_at}
        if inpaint_full_res:
            return _inpaint_full_res(self, p, image, mask, callback, experts, addons)
        return run_experts(self, p, **experts, image=image, mask=mask, callback=callback, **addons)

    def edit(self, image: Image.Image, instruction: str, negative_prompt: str = "", *, image_cfg_scale: float = 1.5,
             cfg_scale: float = 7.5, width: int | None = None, height: int | None = None,
             callback: Callable | None = None, **kw: Any) -> GenerationResult:
        """instruct-pix2pix (Brooks et al. 2023): redraw ``image`` as ``instruction`` says. The image's latent
        (the posterior mean, unscaled) is concatenated to the noisy latent, and guidance is three-way:
        ``none + cfg_scale * (text - image) + image_cfg_scale * (image - none)`` over the predictions with
        text and image, with the image only, and with neither (diffusers' guidance, used when
        ``cfg_scale > 1`` and ``image_cfg_scale >= 1``)."""
        self._need_concat("pix2pix", "an instruct-pix2pix model")
        image = imageops.to_rgb(image)
        width, height = self._size_from(image, width, height)
        p = self._params(instruction, negative_prompt, width, height,
                         {**kw, "cfg_scale": cfg_scale, "image_cfg_scale": image_cfg_scale})
        with torch.inference_mode():
            concat = encode_image(self, imageops.image_to_tensor(image, p.width, p.height), None)
        return run(self, p, concat=concat, callback=callback)

    def depth2img(self, image: Image.Image, prompt: str = "", negative_prompt: str = "", *, strength: float = 0.8,
                  depth_map: Any = None, width: int | None = None, height: int | None = None,
                  callback: Callable | None = None, **kw: Any) -> GenerationResult:
        """Depth-conditioned image to image (SD 2 ``512-depth``): img2img with the depth map, resized to the
        latent size (bicubic) and scaled to [-1, 1], concatenated to the latent. ``depth_map``: (H, W)
        relative depth as an array, tensor or greyscale image (larger = nearer, as MiDaS gives it); None:
        estimated from ``image`` by the model's MiDaS DPT-Hybrid network (``depth_model``, shipped in the
        official file and in diffusers folders as ``depth_estimator``)."""
        self._need_concat("depth", "a depth model (SD 2 512-depth)")
        image = imageops.to_rgb(image)
        width, height = self._size_from(image, width, height)
        if depth_map is None and self.depth_model is None:
            raise InvalidParameterError("depth2img needs depth_map: this model has no depth estimator (give an "
                                        "(H, W) depth map as an array or greyscale image)")
        p = self._params(prompt, negative_prompt, width, height, {**kw, "strength": strength})
        if depth_map is None:
            from sfumato.models.depth import estimate_depth

            with torch.inference_mode():
                depth_map = estimate_depth(self.depth_model, image, self.depth_model.preprocessing).float().cpu()
        depth = imageops.depth_to_tensor(depth_map)[:, None]  # (1, 1, H, W)
        f = self.spec.vae.downscale
        depth = torch.nn.functional.interpolate(depth, size=(image.height // f, image.width // f), mode="bicubic",
                                                align_corners=False)
        lo, hi = depth.amin(), depth.amax()
        if not hi > lo:
            raise InvalidParameterError("depth_map is flat (one value everywhere): it carries no depth")
        concat = 2.0 * (depth - lo) / (hi - lo) - 1.0
        if concat.shape[-2:] != (p.height // f, p.width // f):
            raise InvalidParameterError(f"depth2img: the output size {p.width}x{p.height} must be the image's "
                                        f"({image.width}x{image.height}) rounded down to a multiple of {f}")
        return run(self, p, image=image, concat=concat, callback=callback)

    def upscale(self, image: Image.Image, prompt: str = "", negative_prompt: str = "", *, noise_level: int = 20,
                steps: int = 75, cfg_scale: float = 9.0, tile_size: int | None = None, tile_overlap: int = 32,
                callback: Callable | None = None, **kw: Any) -> GenerationResult:
        """The SD 2 x4 upscaler: an image 4x larger. The low-res image, noised to ``noise_level`` (0..350) on
        the model's own schedule, is concatenated to the latent (which has the low-res size) and
        ``noise_level`` is the UNet's class label; the upscaler's VAE decodes 4x. Randomness as diffusers:
        the augmentation noise is drawn first, then the initial latent.

        Large inputs run tiled (:class:`Tiling`): windows of ``tile_size`` input pixels sharing
        ``tile_overlap`` with each neighbour, and the autoencoder decodes in tiles of the same size.
        ``tile_size`` None: untiled up to ``UPSCALE_UNTILED`` pixels a side (where the UNet's first
        attention level still fits in memory), 128-pixel tiles above. Tiled output is not identical to
        untiled (attention sees one window), but has no seams (tests/test_zoo.py measures both)."""
        self._need_concat("low_res", "the x4 upscaler")
        if tile_size is None:
            tile_size = UPSCALE_TILE if max(image.size) > UPSCALE_UNTILED else None
        tiling = (Tiling(tile_size, tile_overlap)
                  if tile_size is not None and max(image.size) > tile_size else None)
        if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level <= 350:
            raise InvalidParameterError(f"noise_level={noise_level!r} is out of range: allowed integers 0..350")
        image = imageops.to_rgb(image)
        f = self.spec.vae.downscale
        p = self._params(prompt, negative_prompt, image.width * f, image.height * f,
                         {**kw, "steps": steps, "cfg_scale": cfg_scale})
        p = p.replace(seed=_seed(p), extra={**p.extra, "Noise level": noise_level})
        g = torch.Generator("cpu").manual_seed(p.seed)
        low = imageops.image_to_tensor(image, image.width, image.height)
        from sfumato.sampling import discrete_schedule

        abar = discrete_schedule(self.spec.schedule).alphas_cumprod[noise_level].float()
        low = abar.sqrt() * low + (1 - abar).sqrt() * torch.randn(low.shape, generator=g)
        if tiling is not None:
            p = p.replace(extra={**p.extra, "Tile size": tiling.size, "Tile overlap": tiling.overlap})
        return run(self, p, concat=low, labels=torch.tensor([noise_level]), generator=g, callback=callback,
                   tiling=tiling)

    def variations(self, image: Image.Image, prompt: str = "", negative_prompt: str = "", *, noise_level: int = 0,
                   width: int | None = None, height: int | None = None, cfg_scale: float = 10.0,
                   callback: Callable | None = None, **kw: Any) -> GenerationResult:
        """SD 2.1 unCLIP image variations: new images of what ``image`` shows, from its CLIP image embedding.

        The embedding (``CLIPImageProcessor``'s preprocessing, then the model's image encoder) is noised to
        ``noise_level`` (0..999; more noise, looser variations) by the model's noise augmentor and, with the
        level's sinusoidal embedding, becomes the UNet's ADM vector; the unconditional rows of guidance get
        zeros. ``prompt`` steers the result too. The latent starts from pure noise (no image latents).
        Randomness as diffusers' ``StableUnCLIPImg2ImgPipeline``: the embedding's noise is drawn first.
        Text-to-image through a prior is not offered: no released prior ships with these models."""
        from sfumato.models.clip_vision import preprocess as clip_preprocess

        if self.image_encoder is None or self.noise_augmentor is None:
            raise InvalidParameterError(f"variations needs an unCLIP model (SD 2.1 unCLIP L or H) with its image "
                                        f"encoder; this model is {self.spec.family}")
        top = self.noise_augmentor.max_noise_level
        if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level <= top:
            raise InvalidParameterError(f"noise_level={noise_level!r} is out of range: allowed integers 0..{top}")
        image = imageops.to_rgb(image)
        p = self._params(prompt, negative_prompt, width, height, {**kw, "cfg_scale": cfg_scale})
        p = p.replace(seed=_seed(p), extra={**p.extra, "Noise level": noise_level})
        g = torch.Generator("cpu").manual_seed(p.seed)
        with torch.inference_mode():
            enc = self.image_encoder
            pixels = clip_preprocess(image, size=enc.cfg.image_size).to(self.device, self.dtype)
            embeds = enc(pixels).image_embeds.float()
            noise = torch.randn(embeds.shape, generator=g)
            y = self.noise_augmentor(embeds, noise_level, noise.to(embeds.device))
        return run(self, p, labels=y, generator=g, callback=callback)

    def _need_concat(self, kind: str, what: str) -> None:
        if self.spec.concat != kind:
            raise InvalidParameterError(f"{_CONCAT_METHODS[kind]} needs {what}; this model is {self.spec.family}")

    def outpaint(self, image: Image.Image, prompt: str = "", negative_prompt: str = "", *, left: int = 0,
                 right: int = 0, up: int = 0, down: int = 0, **kw: Any) -> GenerationResult:
        """Extend the canvas by the given pixels and paint the new border through :meth:`inpaint`."""
        canvas, mask = imageops.outpaint_canvas(image, left, right, up, down)
        kw.setdefault("fill", "original")
        w, h = canvas.size
        return self.inpaint(canvas, mask, prompt, negative_prompt, width=w - w % 8, height=h - h % 8, **kw)

    def _size_from(self, image: Image.Image, width: int | None, height: int | None) -> tuple[int, int]:
        w, h = image.size
        return (width if width is not None else w - w % 8), (height if height is not None else h - h % 8)

    def _params(self, prompt: str, negative: str, width: int | None, height: int | None,
                kw: dict[str, Any]) -> GenerationParams:
        unknown = sorted(set(kw) - set(GenerationParams.field_names()))
        if unknown:
            raise InvalidParameterError(f"unknown parameter(s) {', '.join(unknown)}; "
                                        f"known: {', '.join(GenerationParams.field_names())}")
        size = self.spec.default_size
        kw = {"cfg_scale": model_cfg(self.spec), **kw}  # unless given, the model's own recommended guidance
        p = GenerationParams(prompt=prompt, negative_prompt=negative, width=size if width is None else width,
                             height=size if height is None else height, **kw)
        return validate(p, size_multiple=self.spec.vae.downscale)


# The x4 upscaler runs untiled up to this input size (a side, pixels) and in UPSCALE_TILE windows above: its
# latent has the input's size, so untiled a 512 px input means full-size UNet activations of 256 channels
# (about 0.27 GB each) and an autoencoder whose middle attends over all 262144 latent pixels; the windows
# bound both (bench/RESULTS.md: 512 -> 2048 px in 4.8 GB peak RSS).
UPSCALE_UNTILED = 256
UPSCALE_TILE = 128


# --- the spine ---------------------------------------------------------------------------------

# ModelSpec.concat -> the Pipeline method that makes that extra UNet input (an inpainting model's is made
# by run() itself from the image and mask)
_CONCAT_METHODS = {"depth": "depth2img", "pix2pix": "edit", "low_res": "upscale"}

@dataclass
class _Conds:
    """Per-step conditioning: AND parts with weights, each a schedule [(end_step, Conditioning)]."""

    parts: list[tuple[float, list[tuple[int, Conditioning]]]]
    negative: list[tuple[int, Conditioning]]

    @staticmethod
    def at(schedule: list[tuple[int, Conditioning]], step: int) -> Conditioning:
        for end, c in schedule:
            if step < end:
                return c
        return schedule[-1][1]


def conditioning(pipe: Pipeline, p: GenerationParams) -> _Conds:
    """Encode the prompt (AND parts, prompt editing and alternation per step) and the negative prompt.

    SDXL's ``prompt_2`` goes to the second encoder: it has either one AND part (shared by every part of
    ``prompt``) or as many as ``prompt``, and its own prompt-editing schedule, merged step by step with
    ``prompt``'s. An empty negative prompt is all zeros where the spec says so (``zero_empty_negative``).
    """
    cache: dict[tuple[str, str | None], Conditioning] = {}

    def encode(texts: tuple[str, str | None]) -> Conditioning:
        if texts not in cache:
            cache[texts] = encode_prompt(pipe.text_encoders, pipe.spec.text_encoders, pipe.tokenizer, texts[0],
                                         text_2=texts[1], clip_skip=p.clip_skip, emphasis=p.emphasis)
        return cache[texts]

    def schedule(text: str, text_2: str | None) -> list[tuple[int, Conditioning]]:
        first = get_prompt_schedule(text, p.steps)
        if text_2 is None:
            return [(end, encode((t, None))) for end, t in first]
        second = get_prompt_schedule(text_2, p.steps)
        ends = sorted({end for end, _ in first} | {end for end, _ in second})
        return [(end, encode((_text_at(first, end), _text_at(second, end)))) for end in ends]

    parts_1 = split_and(p.prompt)
    parts_2 = split_and(p.prompt_2) if p.prompt_2 is not None else None
    if parts_2 is not None and len(parts_2) not in (1, len(parts_1)):
        raise InvalidParameterError(f"prompt_2 has {len(parts_2)} AND parts and prompt has {len(parts_1)}; "
                                    "prompt_2 needs one part or as many as prompt")
    parts = [(w, schedule(t, None if parts_2 is None else parts_2[min(i, len(parts_2) - 1)][0]))
             for i, (t, w) in enumerate(parts_1)]
    if pipe.spec.zero_empty_negative and p.negative_prompt == "" and not p.negative_prompt_2:
        longest = max((c for _, sched in parts for _, c in sched), key=lambda c: c.context.shape[1])
        zero = Conditioning(context=torch.zeros_like(longest.context),
                            pooled=None if longest.pooled is None else torch.zeros_like(longest.pooled))
        return _Conds(parts=parts, negative=[(p.steps, zero)])
    return _Conds(parts=parts, negative=schedule(p.negative_prompt, p.negative_prompt_2))


def _text_at(schedule: list[tuple[int, str]], end: int) -> str:
    """The text a prompt schedule uses for the step that ends at ``end`` (steps count from 1)."""
    return next(t for e, t in schedule if end <= e)


def _size_vector(pipe: Pipeline, cond: Conditioning, p: GenerationParams, batch: int, *,
                 negative: bool) -> torch.Tensor | None:
    """The ADM vector ``y``: SDXL's pooled text embedding + Fourier-embedded micro-conditioning.

    Base: (original size, crop top-left, target size); refiner: (original size, crop, aesthetic score),
    each a (height, width) / (top, left) pair as diffusers orders them, defaulting to the output size and
    (0, 0). The negative half uses the ``negative_*`` values; the negative sizes default to the positive
    ones, the negative crop to (0, 0) on the refiner or when both negative sizes are given (diffusers'
    refiner and txt2img defaults), else to the positive crop. diffusers differs in two corner cases
    where it drops a value the caller gave: its txt2img ignores a lone negative size (and the negative
    crop without both sizes), its img2img/inpaint base ignores ``negative_crops_coords_top_left``.
    """
    if pipe.spec.unet.adm_kind != "text_time":
        return None
    refiner = pipe.spec.size_conditioning == "refiner"
    size = (p.height, p.width)
    original, crop, target = p.original_size or size, p.crops_coords_top_left, p.target_size or size
    score = p.aesthetic_score
    if negative:
        both_sizes = p.negative_original_size is not None and p.negative_target_size is not None
        original = p.negative_original_size or original
        crop = p.negative_crops_coords_top_left or ((0, 0) if refiner or both_sizes else crop)
        target = p.negative_target_size or target
        score = p.negative_aesthetic_score
    ids = [*original, *crop, score] if refiner else [*original, *crop, *target]
    t = torch.tensor(ids, dtype=torch.float32, device=cond.context.device)
    emb = timestep_embedding(t, 256).reshape(1, -1).to(cond.pooled.dtype)
    return torch.cat([cond.pooled, emb], dim=1).expand(batch, -1)


@dataclass(frozen=True)
class Tiling:
    """The denoiser run in overlapping ``size`` x ``size`` latent windows (``overlap`` latent pixels shared
    with each neighbour), its outputs blended with weights that ramp linearly across each shared strip
    (MultiDiffusion, Bar-Tal et al. 2023, with feathered instead of uniform weights): memory bounded by one
    window whatever the latent size. Not exact: attention sees one window at a time."""

    size: int
    overlap: int

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 8:
            raise InvalidParameterError(f"tile size {self.size!r} is too small: allowed integers >= 8 (latent pixels)")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or not 0 <= self.overlap < self.size // 2 + 1:
            raise InvalidParameterError(f"tile overlap {self.overlap!r} is out of range: allowed integers "
                                        f"0..{self.size // 2} for {self.size}-pixel tiles")

    def starts(self, n: int) -> list[int]:
        """Window starts along an axis of ``n`` latent pixels (the last window flush with the end)."""
        if n <= self.size:
            return [0]
        stride = self.size - self.overlap
        return sorted({*range(0, n - self.size, stride), n - self.size})

    def weights(self, start: int, length: int, n: int) -> torch.Tensor:
        """Blend weights of one window along an axis: ramps over the strips shared with a neighbour, 1 elsewhere
        (so the image's own borders are not faded)."""
        w = torch.ones(length)
        ramp = torch.arange(1, self.overlap + 1, dtype=torch.float32) / (self.overlap + 1)
        if start > 0 and self.overlap:
            w[: self.overlap] = ramp
        if start + length < n and self.overlap:
            w[length - self.overlap:] = torch.minimum(w[length - self.overlap:], ramp.flip(0))
        return w

    def apply(self, fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], x: torch.Tensor,
              extra: torch.Tensor | None = None) -> torch.Tensor:
        """``fn(x, extra)`` window by window (``extra``: a spatial input cut the same way, or None), blended."""
        h, w = x.shape[-2:]
        if h <= self.size and w <= self.size:
            return fn(x, extra)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        total = torch.zeros((1, 1, h, w), dtype=torch.float32, device=x.device)
        for y0 in self.starts(h):
            for x0 in self.starts(w):
                win = (..., slice(y0, y0 + self.size), slice(x0, x0 + self.size))
                part = fn(x[win], extra[win] if extra is not None else None)
                weight = (self.weights(y0, part.shape[-2], h)[:, None] * self.weights(x0, part.shape[-1], w)[None, :])
                out[win] += part.float() * weight.to(x.device)
                total[win] += weight.to(x.device)
        return out / total


def guided_model(pipe: Pipeline, conds: _Conds, p: GenerationParams, state: dict,
                 concat: torch.Tensor | None, hints: list | None = None, guess_mode: bool = False,
                 labels: torch.Tensor | None = None,
                 tiling: Tiling | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The UNet under classifier-free guidance, as ``model(x_in, t) -> eps or v``.

    Guidance is applied to the network's output, as diffusers does (so ``guidance_rescale`` matches it);
    the negative and every AND part go through the UNet in one batch, negative first. ``cfg_scale == 1``
    with a single prompt part skips the negative pass. ``tiling``: the guided model runs window by window
    over ``x_in`` and the spatial ``concat`` (see :class:`Tiling`).
    """
    unet = pipe.unet
    dtype = pipe.dtype
    cache = StepCache(p.deepcache, p.deepcache_depth) if p.deepcache > 1 else None
    merging = tome.TokenMerging(p.tome, seed=p.seed) if p.tome > 0 else None
    pix2pix_edit = pipe.spec.concat == "pix2pix" and p.image_cfg_scale is not None
    if pix2pix_edit and len(conds.parts) != 1:
        raise InvalidParameterError("edit takes one instruction: AND-composed prompts are not supported there")

    if tiling is not None and (hints or p.deepcache > 1):
        raise InvalidParameterError("tiled denoising works without ControlNet units and step caching (deepcache)")

    def model(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if tiling is None:
            return one(x_in, t, concat)
        return tiling.apply(lambda x, c: one(x, t, c), x_in, concat)

    def one(x_in: torch.Tensor, t: torch.Tensor, concat: torch.Tensor | None) -> torch.Tensor:
        step = state["step"]
        b = x_in.shape[0]
        parts = [(w, _Conds.at(s, step)) for w, s in conds.parts]
        use_uncond = not (p.cfg_scale == 1.0 and len(parts) == 1 and parts[0][0] == 1.0)
        if pix2pix_edit:
            use_uncond = p.cfg_scale > 1.0 and p.image_cfg_scale >= 1.0  # diffusers' condition
        pix2pix = pix2pix_edit and use_uncond
        cs = ([_Conds.at(conds.negative, step)] if use_uncond else []) + [c for _, c in parts]
        if len({c.context.shape[1] for c in cs}) > 1:
            cs = pad_to_same_length(cs, encode_prompt(pipe.text_encoders, pipe.spec.text_encoders, pipe.tokenizer,
                                                      "", clip_skip=p.clip_skip, emphasis=p.emphasis))
        if pix2pix:  # (text, image), (image), (neither): the negative context twice, no image the last time
            cs = [cs[1], cs[0], cs[0]]
        n = len(cs)
        context = torch.cat([c.context.expand(b, -1, -1) for c in cs]).to(dtype)
        ys = [_size_vector(pipe, c, p, b, negative=use_uncond and (i > 0 if pix2pix else i == 0))
              for i, c in enumerate(cs)]
        y = None if ys[0] is None else torch.cat(ys).to(dtype)
        if labels is not None and labels.is_floating_point():  # an ADM vector (unCLIP's image embedding)
            vec = labels.to(x_in.device, dtype).reshape(1, -1).expand(b, -1)
            y = torch.cat([torch.zeros_like(vec) if use_uncond and i == 0 else vec for i in range(n)])
        elif labels is not None:  # class labels (the x4 upscaler's noise level): integers, one per row
            y = labels.to(x_in.device).reshape(-1)[:1].expand(n * b)
        xs = x_in.repeat(n, 1, 1, 1)
        if concat is not None:
            extra = concat.expand(b, -1, -1, -1).repeat(n, 1, 1, 1)
            if pix2pix:
                extra[2 * b:] = 0
            xs = torch.cat([xs, extra.to(xs.dtype)], dim=1)
        ts = t.reshape(-1).expand(b).repeat(n)
        if merging is not None:
            merging.begin()
        with int8_mode(pipe, p.int8 != "none"), tome.token_merging(merging):
            control = _control_residuals(hints, state, xs.to(dtype), ts, context, y, n, b, use_uncond, guess_mode)
            out = unet(xs.to(dtype), ts, context=context, y=y, cache=cache, control=control).float().chunk(n)
        if not use_uncond:
            return out[0]
        if pix2pix:
            text, image, none = out
            return none + p.cfg_scale * (text - image) + p.image_cfg_scale * (image - none)
        uncond, conds_out = out[0], out[1:]
        if len(parts) == 1 and parts[0][0] == 1.0:
            guided = uncond + p.cfg_scale * (conds_out[0] - uncond)
        else:
            guided = uncond + sum(w * p.cfg_scale * (c - uncond) for (w, _), c in zip(parts, conds_out))
        if p.guidance_rescale > 0:
            text = conds_out[0]
            dims = list(range(1, text.ndim))
            rescaled = guided * (text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
            guided = p.guidance_rescale * rescaled + (1 - p.guidance_rescale) * guided
        return guided

    return model


def _take_controls(kw: dict[str, Any]) -> dict[str, Any]:
    """Pop ``controlnet`` (a ControlUnit or a list of them) and ``guess_mode`` from generation kwargs."""
    from sfumato.adapters.controlnet import ControlUnit

    units = kw.pop("controlnet", None)
    guess = kw.pop("guess_mode", False)
    if units is None:
        if guess:
            raise InvalidParameterError("guess_mode needs a controlnet")
        return {}
    units = [units] if isinstance(units, ControlUnit) else list(units)
    if not units or not all(isinstance(u, ControlUnit) for u in units):
        raise InvalidParameterError("controlnet must be a ControlUnit or a list of them")
    if not isinstance(guess, bool):
        raise InvalidParameterError(f"guess_mode must be True or False, got {guess!r}")
    return {"controls": units, "guess_mode": guess}


def _control_residuals(hints: list | None, state: dict, xs: torch.Tensor, ts: torch.Tensor, context: torch.Tensor,
                       y: torch.Tensor | None, n: int, b: int, use_uncond: bool,
                       guess_mode: bool) -> list[torch.Tensor] | None:
    """The summed residuals of the ControlNets active at this step (diffusers' ``controlnet_keep``: a unit
    acts on run step i of N when start <= i / N and (i + 1) / N <= end), or None."""
    if not hints:
        return None
    i, steps = state["step"] - state["run_start"], max(state["run_steps"], 1)
    total = None
    for unit, hint in hints:
        if i / steps < unit.start or (i + 1) / steps > unit.end or unit.weight == 0:
            continue
        cond_only = (guess_mode or unit.mode == "control") and use_uncond
        if cond_only:  # the conditional rows only; zeros for the negative
            rows = slice(b, None)
            res = unit.model(xs[rows], hint.expand(xs.shape[0] - b, -1, -1, -1), ts[rows], context[rows],
                             None if y is None else y[rows])
        else:
            res = unit.model(xs, hint.expand(xs.shape[0], -1, -1, -1), ts, context, y)
        scales = _control_scales(len(res), guess_mode, unit.mode)
        res = [r * s * unit.weight for r, s in zip(res, scales)]
        if cond_only:
            res = [torch.cat([torch.zeros_like(r[:b]), r]) for r in res]
        total = res if total is None else [a + r for a, r in zip(total, res)]
    return total


def _control_scales(n: int, guess_mode: bool, mode: str) -> list[float]:
    """Per-residual scales (skips first, middle block last): diffusers' guess mode 0.1 -> 1 log-spaced; the
    AUTOMATIC1111 extension's soft injection ("prompt" and "control" modes) 0.825 ** (n - 1 - i)."""
    if guess_mode:
        return torch.logspace(-1, 0, n).tolist()
    if mode != "balanced":
        return [0.825 ** float(n - 1 - i) for i in range(n)]
    return [1.0] * n


def _control_fields(controls: list | None, guess_mode: bool) -> dict[str, Any]:
    """The ControlNet extension's infotext fields: ``ControlNet N: "Model: ..., Weight: ..., ..."``."""
    from sfumato.adapters.controlnet import CONTROL_MODES, RESIZE_MODES

    out: dict[str, Any] = {}
    for k, u in enumerate(controls or []):
        mode = "Guess" if guess_mode else CONTROL_MODES[u.mode]
        out[f"ControlNet {k}"] = (f"Module: {u.module}, Model: {u.name}, Weight: {u.weight:g}, Resize Mode: "
                                  f"{RESIZE_MODES[u.resize]}, Guidance Start: {u.start:g}, Guidance End: {u.end:g}, "
                                  f"Control Mode: {mode}")
    return out


def _seed(p: GenerationParams) -> int:
    return p.seed if p.seed is not None and p.seed >= 0 else secrets.randbelow(2**32)


def _noise(shape: tuple[int, ...], seed: int, p: GenerationParams, g: torch.Generator) -> torch.Tensor:
    """Initial noise from the seed's generator; variation seeds blend in noise from ``subseed`` by
    AUTOMATIC1111's slerp (per image, over its (C, H, W) noise)."""
    noise = torch.randn(shape, generator=g, dtype=torch.float32)
    if p.subseed_strength > 0:
        sub = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(p.subseed), dtype=torch.float32)
        noise = torch.stack([_slerp(p.subseed_strength, noise[i], sub[i]) for i in range(shape[0])])
    return noise


def _slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's spherical interpolation of two noise tensors (norms over dim 1, as it computes them)."""
    low_n = low / torch.norm(low, dim=1, keepdim=True)
    high_n = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def encode_image(pipe: Pipeline, image: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents, sampling the posterior with ``g`` as diffusers does; ``g`` None:
    the posterior mean, unscaled (what instruct-pix2pix concatenates)."""
    m = pipe.memory
    with _vae_precision(pipe, upcast=pipe.spec.vae_upcast) as dtype:
        parts = image.split(1) if m.vae_slicing else (image,)
        if m.vae_tiling:
            posts = [pipe.vae.encode_tiled(x.to(pipe.device, dtype), _vae_tile(pipe), m.vae_tile_overlap)
                     for x in parts]
        else:
            posts = [pipe.vae.encode(x.to(pipe.device, dtype)) for x in parts]
        posterior = posts[0] if len(posts) == 1 else DiagonalGaussian(
            torch.cat([q.mean for q in posts]), torch.cat([q.logvar for q in posts]))
        if g is None:
            return posterior.mean.float()
        z = posterior.sample(generator=g).float()
    return (z - pipe.spec.latent_shift) * pipe.spec.latent_scale


def _vae_tile(pipe: Pipeline) -> int:
    return pipe.memory.vae_tile or pipe.spec.default_size


def _vae_decode(pipe: Pipeline, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    m, f = pipe.memory, pipe.spec.vae.downscale
    parts = z.split(1) if m.vae_slicing else (z,)
    if m.vae_tiling or tile is not None:
        tile = tile if tile is not None else max(1, _vae_tile(pipe) // f)
        out = [pipe.vae.decode_tiled(x, tile, m.vae_tile_overlap) for x in parts]
    else:
        out = [pipe.vae.decode(x) for x in parts]
    return out[0] if len(out) == 1 else torch.cat(out)


def decode(pipe: Pipeline, latents: torch.Tensor, *, tile: int | None = None, int8: bool = False) -> list[Image.Image]:
    """Scaled latents -> images. A half-precision autoencoder that overflows (non-finite pixels) decodes
    again in fp32, with a warning the first time; one the spec marks (``vae_upcast``) decodes in fp32.
    ``tile``: decode in tiles of that many latent pixels whatever ``pipe.memory`` says. ``int8``: the
    decoder's big convs in int8 (a fast path; :func:`int8_mode`)."""
    z = latents / pipe.spec.latent_scale + pipe.spec.latent_shift
    with _vae_precision(pipe, upcast=pipe.spec.vae_upcast) as dtype, int8_mode(pipe, int8):
        pixels = _vae_decode(pipe, z.to(pipe.device, dtype), tile)
    if not torch.isfinite(pixels).all() and dtype != torch.float32:
        _warn_once("vae-overflow", f"the autoencoder overflowed in {dtype} (non-finite pixels); decoding in "
                   "float32 (pass an fp16-safe VAE with vae= to avoid the retry)")
        with _vae_precision(pipe, upcast=True) as dtype:
            pixels = _vae_decode(pipe, z.to(pipe.device, dtype), tile)
    return imageops.tensor_to_images(pixels)


def _offloading(pipe: Pipeline, int8: str = "none") -> contextlib.AbstractContextManager:
    """``MemoryOptions.offload``: one component's (or one layer group's) mapped weights resident at a time,
    within the block. With ``int8`` on, float weights that have packed copies are not mapped in ahead."""
    if pipe.memory.offload == "none":
        return contextlib.nullcontext()
    if pipe.device.type != "cpu":
        raise InvalidParameterError(f"offload releases idle weights from RAM on the CPU; on {pipe.device.type} "
                                    "moving components to CPU memory is not implemented (use offload='none')")
    from sfumato.weights.pages import idle_release

    packed = getattr(pipe, "_int8_weights", None)
    skip = packed.holds if int8 != "none" and packed is not None and len(packed) else None
    return idle_release(pipe.modules(), sequential=pipe.memory.offload == "sequential", skip=skip)


def check_int8(pipe: Pipeline, p: GenerationParams) -> None:
    """Refuse int8 where it cannot run: it is a CPU float32 fast path on oneDNN's int8 kernels."""
    if p.int8 == "none":
        return
    from sfumato.models.quant import int8_available

    if pipe.device.type != "cpu" or pipe.dtype != torch.float32:
        raise InvalidParameterError(f"int8={p.int8!r} runs on a CPU float32 pipeline; this one is "
                                    f"{pipe.device.type} {str(pipe.dtype).removeprefix('torch.')} (use int8='none')")
    if not int8_available():
        raise InvalidParameterError(f"int8={p.int8!r} needs torch's oneDNN int8 CPU kernels, which this torch "
                                    f"{torch.__version__} lacks (use int8='none')")


def int8_mode(pipe: Pipeline, on: bool) -> contextlib.AbstractContextManager:
    """Big linears and convs of float32 CPU tensors in int8 within the block (``models.quant``), their packed
    weights kept on the pipeline for the next call; a no-op context when not ``on``."""
    if not on:
        return contextlib.nullcontext()
    from sfumato.adapters import pipe_state
    from sfumato.models.quant import Int8Weights, int8_matmuls

    return int8_matmuls(pipe_state(pipe, "_int8_weights", Int8Weights))


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    import logging

    if key not in _WARNED:
        _WARNED.add(key)
        logging.getLogger("sfumato").warning(message)


@contextlib.contextmanager
def _vae_precision(pipe: Pipeline, *, upcast: bool):
    """Run the autoencoder in its own dtype, or in float32 for the block when ``upcast`` (cast back after)."""
    vae = pipe.vae
    dtype = vae.decoder.conv_in.weight.dtype
    if not upcast or dtype == torch.float32:
        yield dtype
        return
    vae.float()
    try:
        yield torch.float32
    finally:
        vae.to(dtype)


@dataclass
class Handoff:
    """Latents a first expert stopped at (``denoising_end``), for the next one (``denoising_start``): the
    sample at the sigma where the schedule was cut, with the generator the run drew from."""

    latents: torch.Tensor
    generator: torch.Generator
    params: GenerationParams
    seed: int


def run(pipe: Pipeline, p: GenerationParams, *, image: Image.Image | None = None, mask: Image.Image | None = None,
        latents: torch.Tensor | None = None, callback: Callable | None = None,
        generator: torch.Generator | None = None, handoff: torch.Tensor | None = None,
        output: str = "images", controls: list | None = None, guess_mode: bool = False,
        concat: torch.Tensor | None = None, labels: torch.Tensor | None = None,
        tiling: Tiling | None = None) -> GenerationResult | Handoff:
    """The spine for every mode: txt2img (no image), img2img (image), inpainting (image + mask).
    ``concat``: the extra UNet input of depth, instruct-pix2pix and x4-upscaler models (1, C, h, w), made by
    their methods; an inpainting model's is made here from the image and mask. ``labels``: the UNet's class
    labels (the upscaler's noise level: integers, the same for every row) or ADM vector (unCLIP's noised image
    embedding, (1, adm): every conditional row; the unconditional rows of guidance get zeros).

    Ensemble of experts (SDXL base -> refiner): ``p.denoising_end`` stops at that fraction of the noise
    schedule and, with ``output="latents"``, returns a :class:`Handoff` instead of decoding;
    ``p.denoising_start`` starts there, from ``handoff`` latents as they are (no noise added, no image
    encoded, ``strength`` unused), drawing from ``generator`` where the first expert left it.

    ``tiling``: the denoiser runs in overlapping latent windows and the autoencoder decodes in tiles of the
    same size (large upscales).
    """
    from sfumato.sampling import SAMPLERS, discrete_schedule, get_sigmas, make_denoiser, split_for_experts

    spec, info = pipe.spec, SAMPLERS[p.sampler]
    check_int8(pipe, p)
    pipe.start_model_hash()  # the infotext needs it at the end; meanwhile it hashes beside the sampling
    seed = _seed(p)
    p = p.replace(seed=seed)
    if p.subseed_strength > 0 and (p.subseed is None or p.subseed < 0):
        p = p.replace(subseed=secrets.randbelow(2**32))  # recorded, so the image can be made again
    if handoff is not None and p.denoising_start is None:
        raise InvalidParameterError("handoff latents need denoising_start (where the first expert stopped)")
    g = generator if generator is not None else torch.Generator("cpu").manual_seed(seed)
    b, f = p.batch_size, spec.vae.downscale
    shape = (b, spec.unet.out_channels, p.height // f, p.width // f)

    text_p = _prompt_loras(pipe, p)
    with torch.inference_mode(), ops.attention_slicing(pipe.memory.attention_slice), _offloading(pipe, p.int8):
        conds = conditioning(pipe, text_p)
        discrete = discrete_schedule(spec.schedule)
        sigmas = get_sigmas(p.schedule, p.steps, discrete, sampler=info, ays_timesteps=spec.ays_timesteps).float()
        if p.denoising_start is not None:
            start = len(sigmas) - len(split_for_experts(sigmas, discrete, start=p.denoising_start))
        else:
            start = _img2img_start(p) if image is not None else 0
        sigmas = sigmas[start:]
        if p.denoising_end is not None:
            sigmas = split_for_experts(sigmas, discrete, end=p.denoising_end)

        pixels = imageops.image_to_tensor(image, p.width, p.height) if image is not None else None
        pmask = imageops.mask_to_tensor(mask, p.width, p.height, blur=p.mask_blur) if mask is not None else None
        if pmask is not None and p.inpaint_fill == "fill":
            pixels = imageops.image_to_tensor(imageops.fill_masked(image, mask), p.width, p.height)
        blend = pmask is not None and spec.concat != "inpaint"  # a normal model inpaints by latent blending
        from_noise = image is None or (pmask is not None and start == 0)  # diffusers' is_strength_max
        # Draw order as diffusers: image latents, initial noise, masked-image latents, then the sampler's noise.
        init = (encode_image(pipe, pixels, g)
                if pixels is not None and (blend or (not from_noise and handoff is None)) else None)
        if handoff is not None:
            # the hand-off is already noisy; a blended inpaint still needs noise for the known area
            noise = torch.randn(shape, generator=g) if blend else None
        else:
            noise = _noise(shape, seed, p, g) if latents is None else latents.float().cpu()
        if concat is not None:
            concat = concat.to(pipe.device)
        elif spec.concat in _CONCAT_METHODS:
            raise InvalidParameterError(f"a {spec.family} model needs its extra input: use "
                                        f"{_CONCAT_METHODS[spec.concat]}")
        if spec.unet.adm_kind == "image" and labels is None:
            raise InvalidParameterError(f"a {spec.family} model is conditioned on an image's CLIP embedding: use "
                                        "variations")
        lmask = imageops.latent_mask(pmask, f) if pmask is not None else None
        if pmask is not None:
            if spec.concat == "inpaint":
                masked = encode_image(pipe, pixels * (pmask < 0.5), g)
                concat = torch.cat([lmask, masked], dim=1).to(pipe.device)
            else:
                torch.randn((1, spec.unet.out_channels, *shape[2:]), generator=g)  # diffusers encodes it anyway
            if init is not None and p.inpaint_fill in ("latent_noise", "latent_nothing"):
                filler = torch.randn(init.shape, generator=g) if p.inpaint_fill == "latent_noise" else 0.0
                init = lmask * filler + (1 - lmask) * init
        if len(sigmas) <= 1:  # strength 0: nothing to denoise
            return _result(pipe, p, decode(pipe, init.expand(b, -1, -1, -1), int8=p.int8 == "unet+vae"), seed,
                           inpaint=mask is not None)

        sigma0 = float(sigmas[0])
        if handoff is not None:
            x = handoff.float()
        elif from_noise:
            x = noise * (math.sqrt(sigma0**2 + 1) if info.vp_init or p.schedule == "leading" else sigma0)
        else:
            x = init + noise * sigma0
        x = x.to(pipe.device)

        # prompt schedules count the steps of the whole schedule; ControlNet ranges the steps of this run
        state = {"step": start, "run_start": start, "run_steps": len(sigmas) - 1}
        hints = None
        if controls:
            from sfumato.adapters.controlnet import control_tensor

            hints = [(u, control_tensor(u.image, p.width, p.height, u.resize).to(pipe.device, pipe.dtype))
                     for u in controls]
        den = make_denoiser(guided_model(pipe, conds, p, state, concat, hints, guess_mode, labels, tiling), discrete,
                            spec.prediction)
        blend_mask = lmask.to(pipe.device) if blend else None

        def on_step(s) -> None:
            state["step"] = start + s.i + 1
            if blend_mask is not None:
                nxt = sigmas[s.i + 1] if s.i + 1 < len(sigmas) else 0.0
                known = init.to(s.x.device) + noise.to(s.x.device) * (float(nxt) if s.i + 1 < len(sigmas) - 1 else 0.0)
                s.x.copy_((1 - blend_mask) * known + blend_mask * s.x)
            if callback is not None:
                callback(s)

        knobs = {k: v for k, v in {"eta": p.eta, "s_churn": p.s_churn, "s_tmin": p.s_tmin, "s_tmax": p.s_tmax,
                                   "s_noise": p.s_noise, "discrete": discrete, "prediction": spec.prediction}.items()
                 if k in info.knobs and v is not None}
        x = info.fn(den, x, sigmas.to(pipe.device), generator=g, callback=on_step, **knobs)
        if output == "latents":
            return Handoff(latents=x, generator=g, params=p, seed=seed)
        x = x / math.sqrt(1 + float(sigmas[-1]) ** 2)
        images = decode(pipe, x, tile=tiling.size if tiling is not None else None, int8=p.int8 == "unet+vae")
        if pmask is not None and p.mask_blur > 0:
            images = [Image.composite(im, image.resize(im.size), mask.convert("L").resize(im.size).filter(
                imageops.ImageFilter.GaussianBlur(p.mask_blur))) for im in images]
    return _result(pipe, p, images, seed, inpaint=mask is not None, extra=_control_fields(controls, guess_mode))


def run_experts(pipe: Pipeline, p: GenerationParams, *, refiner: Pipeline | None, switch: float | None,
                **kw: Any) -> GenerationResult:
    """:func:`run`, or with a ``refiner``: the base runs to ``switch`` of the noise schedule and hands its
    latents (not decoded) and generator to the refiner, which runs the rest with its own conditioning.

    The result carries the base's parameters and AUTOMATIC1111's "Refiner" and "Refiner switch at"."""
    if refiner is None:
        if switch is not None:
            raise InvalidParameterError("refiner_switch_at needs a refiner")
        return run(pipe, p, **kw)
    if not isinstance(refiner, Pipeline):
        raise InvalidParameterError(f"refiner must be a loaded Pipeline (sfumato.load), got {type(refiner).__name__}")
    switch = 0.8 if switch is None else switch
    if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0.0 < switch < 1.0:
        raise InvalidParameterError(f"refiner_switch_at={switch!r} is out of range: allowed strictly between 0 and 1")
    a, b = pipe.spec, refiner.spec
    if (a.unet.out_channels, a.latent_scale, a.latent_shift, a.schedule) != (
            b.unet.out_channels, b.latent_scale, b.latent_shift, b.schedule):
        raise InvalidParameterError(f"the refiner ({b.family}) works in another latent space or noise schedule "
                                    f"than the model ({a.family}); it cannot take over its latents")
    if p.denoising_start is not None or p.denoising_end is not None:
        raise InvalidParameterError("with a refiner, give refiner_switch_at instead of denoising_start/denoising_end")
    callback = kw.pop("callback", None)
    latents = kw.pop("latents", None)

    def report(offset: int) -> Callable | None:
        if callback is None:
            return None
        return lambda s: callback(dataclasses.replace(s, i=s.i + offset, total=p.steps))

    first = run(pipe, p.replace(denoising_end=switch), latents=latents, callback=report(0), output="latents", **kw)
    rp = validate(first.params.replace(denoising_start=switch, denoising_end=None),
                  size_multiple=refiner.spec.vae.downscale)
    done = p.steps - len(_expert_sigmas(refiner, rp)) + 1
    kw = {k: v for k, v in kw.items() if k not in ("controls", "guess_mode")}  # the refiner's UNet is another
    res = run(refiner, rp, handoff=first.latents, generator=first.generator, callback=report(done), **kw)
    refiner_label = refiner.model_name + (f" [{refiner.model_hash()}]" if refiner.model_hash() else "")
    return _result(pipe, first.params, res.images, first.seed, inpaint=kw.get("mask") is not None,
                   extra={"Refiner": refiner_label, "Refiner switch at": switch})


def _expert_sigmas(pipe: Pipeline, p: GenerationParams) -> torch.Tensor:
    from sfumato.sampling import SAMPLERS, discrete_schedule, get_sigmas, split_for_experts

    discrete = discrete_schedule(pipe.spec.schedule)
    sigmas = get_sigmas(p.schedule, p.steps, discrete, sampler=SAMPLERS[p.sampler],
                        ays_timesteps=pipe.spec.ays_timesteps)
    return split_for_experts(sigmas, discrete, start=p.denoising_start)


def _img2img_start(p: GenerationParams) -> int:
    """Index of the first sigma of an img2img run in the ``steps``-step schedule.

    "diffusers" (default): the last ``int(steps * strength)`` steps. "a1111": AUTOMATIC1111's
    ``t_enc = int(min(strength, 0.999) * steps)``, which starts one sigma higher and runs ``t_enc + 1`` steps.
    """
    if p.img2img_mode == "a1111":
        return max(p.steps - int(min(p.strength, 0.999) * p.steps) - 1, 0)
    return p.steps - min(int(p.steps * p.strength), p.steps)


def _prompt_loras(pipe: Pipeline, p: GenerationParams) -> GenerationParams:
    """``<lora:name:weight>`` tags: load the prompt's LoRAs from ``pipe.lora_dir`` (those of the previous
    prompt that it no longer names are unloaded, those it names again stay), and return the params with
    the tags taken out of the text the encoders see. A second expert (``denoising_start``) only strips them."""
    from sfumato.adapters.lora import extract_lora_tags, find_lora, load_lora, unload_loras

    prompt, tags = extract_lora_tags(p.prompt)
    prompt_2 = extract_lora_tags(p.prompt_2)[0] if p.prompt_2 is not None else None
    if p.denoising_start is None:
        want = {(t.name, t.unet_weight, t.te_weight) for t in tags}
        old = [h for h in pipe.loras if h.from_prompt]
        stale = [h for h in old if (h.name, h.unet_weight, h.te_weight) not in want]
        if stale:
            unload_loras(pipe, stale)
        have = {(h.name, h.unet_weight, h.te_weight) for h in pipe.loras if h.from_prompt}
        for t in tags:
            if (t.name, t.unet_weight, t.te_weight) not in have:
                load_lora(pipe, find_lora(pipe.lora_dir, t.name), (t.unet_weight, t.te_weight), name=t.name,
                          from_prompt=True)
    return p.replace(prompt=prompt, prompt_2=prompt_2) if (tags or prompt_2 != p.prompt_2) else p


def _lora_fields(pipe: Pipeline) -> dict[str, Any]:
    """AUTOMATIC1111's ``Lora hashes`` field: name: short hash of each loaded LoRA file."""
    named = [f"{h.name}: {h.lora.hash}" for h in pipe.loras if h.lora.hash is not None]
    return {"Lora hashes": ", ".join(named)} if named else {}


def _ti_fields(pipe: Pipeline, p: GenerationParams) -> dict[str, Any]:
    """AUTOMATIC1111's ``TI hashes``: name: short hash of each embedding the prompts use."""
    from sfumato.adapters.embeddings import used_embeddings

    used = used_embeddings(pipe, [p.prompt, p.negative_prompt, p.prompt_2 or "", p.negative_prompt_2 or ""])
    return {"TI hashes": ", ".join(f"{e.token}: {e.hash}" for e in used)} if used else {}


def _result(pipe: Pipeline, p: GenerationParams, images: list[Image.Image], seed: int, *,
            inpaint: bool, extra: dict[str, Any] | None = None) -> GenerationResult:
    """Every image of a batch comes from the one seed's noise stream: image i is reproduced by the same
    seed and batch size (its infotext says "Batch size" and "Batch pos", as AUTOMATIC1111 writes them)."""
    from sfumato.metadata import infotext

    extra = {**_lora_fields(pipe), **_ti_fields(pipe, p), **(extra or {})}
    n = len(images)
    texts = [infotext(p, seed=seed, model_name=pipe.model_name, model_hash=pipe.model_hash(), inpaint=inpaint,
                      extra={**extra, **({"Batch size": n, "Batch pos": i} if n > 1 else {})})
             for i in range(n)]
    return GenerationResult(images=images, params=p, seeds=[seed] * n, infotexts=texts)


def _inpaint_full_res(pipe: Pipeline, p: GenerationParams, image: Image.Image, mask: Image.Image,
                      callback: Callable | None, experts: dict[str, Any],
                      addons: dict[str, Any] | None = None) -> GenerationResult:
    """AUTOMATIC1111's "inpaint at full resolution": inpaint the mask's region at the output size, then
    paste it back into the untouched original through the (blurred) mask. Control images are fitted to the
    input image and cropped to the same region."""
    box = imageops.mask_bbox(mask, p.inpaint_padding, p.width, p.height)
    if box is None:
        raise InvalidParameterError("the mask is empty (all black): nothing to inpaint")
    crop, crop_mask = image.crop(box), mask.crop(box)
    if addons:
        from sfumato.adapters.controlnet import fit_image

        addons = {**addons, "controls": [
            dataclasses.replace(u, image=fit_image(u.image, image.width, image.height, u.resize).crop(box),
                                resize="stretch") for u in addons["controls"]]}
    res = run_experts(pipe, p, **experts,  # run() does not read the flag; the infotext records it
                      image=crop.resize((p.width, p.height), Image.LANCZOS),
                      mask=crop_mask.resize((p.width, p.height), Image.LANCZOS), callback=callback, **(addons or {}))
    paste_mask = mask.convert("L")
    if p.mask_blur > 0:
        paste_mask = paste_mask.filter(imageops.ImageFilter.GaussianBlur(p.mask_blur))
    out = []
    for im in res.images:
        full = image.copy()
        full.paste(im.resize((box[2] - box[0], box[3] - box[1]), Image.LANCZOS), box[:2])
        out.append(Image.composite(full, image, paste_mask))
    res.images = out
    return res
