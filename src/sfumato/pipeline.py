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

import hashlib
import math
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sfumato import imageops
from sfumato.config import ModelSpec
from sfumato.errors import InvalidParameterError
from sfumato.models.unet import UNetModel, timestep_embedding
from sfumato.models.vae import AutoencoderKL
from sfumato.params import GenerationParams, validate
from sfumato.text.conditioning import Conditioning, encode_prompt, pad_to_same_length
from sfumato.text.encoder import CLIPTextEncoder
from sfumato.text.prompt import get_prompt_schedule, split_and
from sfumato.text.tokenizer import CLIPTokenizer


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
    _hash: str | None = field(default=None, repr=False)

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, *self.text_encoders]

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
        """First 10 hex digits of the checkpoint file's SHA-256 (AUTOMATIC1111's "Model hash")."""
        if self._hash is None and self.source is not None and self.source.is_file():
            h = hashlib.sha256()
            with open(self.source, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            self._hash = h.hexdigest()[:10]
        return self._hash

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

    # --- the public generation API: thin wrappers over the spine -------------------------------

    def generate(self, prompt: str = "", negative_prompt: str = "", *, width: int | None = None,
                 height: int | None = None, latents: torch.Tensor | None = None,
                 callback: Callable | None = None, **kw: Any) -> GenerationResult:
        """Text to image. ``latents``: initial noise (B, C, H/8, W/8) instead of drawing it from the seed."""
        p = self._params(prompt, negative_prompt, width, height, kw)
        return run(self, p, latents=latents, callback=callback)

    def img2img(self, image: Image.Image, prompt: str = "", negative_prompt: str = "", *,
                strength: float = 0.75, width: int | None = None, height: int | None = None,
                callback: Callable | None = None, **kw: Any) -> GenerationResult:
        """Image to image: the input is encoded, noised to ``strength`` and denoised (diffusers' semantics:
        ``int(steps * strength)`` of the ``steps``-step schedule are run)."""
        image = imageops.to_rgb(image)
        width, height = self._size_from(image, width, height)
        p = self._params(prompt, negative_prompt, width, height, {**kw, "strength": strength})
        return run(self, p, image=image, callback=callback)

    def inpaint(self, image: Image.Image, mask: Image.Image, prompt: str = "", negative_prompt: str = "", *,
                strength: float = 1.0, mask_blur: int = 4, fill: str = "original", inpaint_full_res: bool = False,
                padding: int = 32, width: int | None = None, height: int | None = None,
                callback: Callable | None = None, **kw: Any) -> GenerationResult:
        """Repaint the white part of ``mask``. A 9-channel inpainting model is used as such; any other model
        inpaints by blending the known latents back after every step."""
        image = imageops.to_rgb(image)
        if not isinstance(mask, Image.Image):
            raise InvalidParameterError(f"mask must be a PIL image, got {type(mask).__name__}")
        if mask.size != image.size:
            raise InvalidParameterError(f"mask size {mask.size[0]}x{mask.size[1]} differs from the image size "
                                        f"{image.size[0]}x{image.size[1]}; they must be equal")
        width, height = self._size_from(image, width, height)
        p = self._params(prompt, negative_prompt, width, height,
                         {**kw, "strength": strength, "mask_blur": mask_blur, "inpaint_fill": fill,
                          "inpaint_full_res": inpaint_full_res, "inpaint_padding": padding})
        if inpaint_full_res:
            return _inpaint_full_res(self, p, image, mask, callback)
        return run(self, p, image=image, mask=mask, callback=callback)

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
        p = GenerationParams(prompt=prompt, negative_prompt=negative, width=size if width is None else width,
                             height=size if height is None else height, **kw)
        return validate(p, size_multiple=self.spec.vae.downscale)


# --- the spine ---------------------------------------------------------------------------------

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
    """Encode the prompt (AND parts, prompt editing and alternation per step) and the negative prompt."""
    cache: dict[str, Conditioning] = {}

    def encode(text: str) -> Conditioning:
        if text not in cache:
            cache[text] = encode_prompt(pipe.text_encoders, pipe.spec.text_encoders, pipe.tokenizer, text,
                                        clip_skip=p.clip_skip, emphasis=p.emphasis)
        return cache[text]

    def schedule(text: str) -> list[tuple[int, Conditioning]]:
        return [(end, encode(t)) for end, t in get_prompt_schedule(text, p.steps)]

    parts = [(w, schedule(t)) for t, w in split_and(p.prompt)]
    return _Conds(parts=parts, negative=schedule(p.negative_prompt))


def _size_vector(pipe: Pipeline, cond: Conditioning, p: GenerationParams, batch: int) -> torch.Tensor | None:
    """The ADM vector ``y``: SDXL's pooled text embedding + Fourier-embedded size/crop conditioning."""
    if pipe.spec.unet.adm_kind != "text_time":
        return None
    if pipe.spec.size_conditioning == "refiner":
        ids = [p.height, p.width, 0, 0, p.extra.get("aesthetic_score", 6.0)]
    else:
        ids = [p.height, p.width, 0, 0, p.height, p.width]
    t = torch.tensor(ids, dtype=torch.float32, device=cond.context.device)
    emb = timestep_embedding(t, 256).reshape(1, -1).to(cond.pooled.dtype)
    return torch.cat([cond.pooled, emb], dim=1).expand(batch, -1)


def guided_model(pipe: Pipeline, conds: _Conds, p: GenerationParams, state: dict,
                 concat: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The UNet under classifier-free guidance, as ``model(x_in, t) -> eps or v``.

    Guidance is applied to the network's output, as diffusers does (so ``guidance_rescale`` matches it);
    the negative and every AND part go through the UNet in one batch, negative first. ``cfg_scale == 1``
    with a single prompt part skips the negative pass.
    """
    unet = pipe.unet
    dtype = pipe.dtype

    def model(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = state["step"]
        b = x_in.shape[0]
        parts = [(w, _Conds.at(s, step)) for w, s in conds.parts]
        use_uncond = not (p.cfg_scale == 1.0 and len(parts) == 1 and parts[0][0] == 1.0)
        cs = ([_Conds.at(conds.negative, step)] if use_uncond else []) + [c for _, c in parts]
        if len({c.context.shape[1] for c in cs}) > 1:
            cs = pad_to_same_length(cs, encode_prompt(pipe.text_encoders, pipe.spec.text_encoders, pipe.tokenizer,
                                                      "", clip_skip=p.clip_skip, emphasis=p.emphasis))
        n = len(cs)
        context = torch.cat([c.context.expand(b, -1, -1) for c in cs]).to(dtype)
        ys = [_size_vector(pipe, c, p, b) for c in cs]
        y = None if ys[0] is None else torch.cat(ys).to(dtype)
        xs = x_in.repeat(n, 1, 1, 1)
        if concat is not None:
            xs = torch.cat([xs, concat.repeat(n, 1, 1, 1).to(xs.dtype)], dim=1)
        ts = t.reshape(-1).expand(b).repeat(n)
        out = unet(xs.to(dtype), ts, context=context, y=y).float().chunk(n)
        if not use_uncond:
            return out[0]
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


def encode_image(pipe: Pipeline, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents, sampling the posterior with ``g`` as diffusers does."""
    posterior = pipe.vae.encode(image.to(pipe.device, pipe.vae.encoder.conv_in.weight.dtype))
    z = posterior.sample(generator=g).float()
    return (z - pipe.spec.latent_shift) * pipe.spec.latent_scale


def decode(pipe: Pipeline, latents: torch.Tensor) -> list[Image.Image]:
    z = latents / pipe.spec.latent_scale + pipe.spec.latent_shift
    return imageops.tensor_to_images(pipe.vae.decode(z.to(pipe.vae.decoder.conv_in.weight.dtype)))


def run(pipe: Pipeline, p: GenerationParams, *, image: Image.Image | None = None, mask: Image.Image | None = None,
        latents: torch.Tensor | None = None, callback: Callable | None = None) -> GenerationResult:
    """The spine for every mode: txt2img (no image), img2img (image), inpainting (image + mask)."""
    from sfumato.sampling import SAMPLERS, discrete_schedule, get_sigmas, make_denoiser

    spec, info = pipe.spec, SAMPLERS[p.sampler]
    seed = _seed(p)
    p = p.replace(seed=seed)
    if p.subseed_strength > 0 and (p.subseed is None or p.subseed < 0):
        p = p.replace(subseed=secrets.randbelow(2**32))  # recorded, so the image can be made again
    g = torch.Generator("cpu").manual_seed(seed)
    b, f = p.batch_size, spec.vae.downscale
    shape = (b, spec.unet.out_channels, p.height // f, p.width // f)

    with torch.inference_mode():
        conds = conditioning(pipe, p)
        discrete = discrete_schedule(spec.schedule)
        sigmas = get_sigmas(p.schedule, p.steps, discrete, sampler=info, ays_timesteps=spec.ays_timesteps).float()
        start = _img2img_start(p) if image is not None else 0
        sigmas = sigmas[start:]

        pixels = imageops.image_to_tensor(image, p.width, p.height) if image is not None else None
        pmask = imageops.mask_to_tensor(mask, p.width, p.height, blur=p.mask_blur) if mask is not None else None
        if pmask is not None and p.inpaint_fill == "fill":
            pixels = imageops.image_to_tensor(imageops.fill_masked(image, mask), p.width, p.height)
        blend = pmask is not None and spec.concat != "inpaint"  # a normal model inpaints by latent blending
        from_noise = image is None or (pmask is not None and start == 0)  # diffusers' is_strength_max
        # Draw order as diffusers: image latents, initial noise, masked-image latents, then the sampler's noise.
        init = encode_image(pipe, pixels, g) if pixels is not None and (blend or not from_noise) else None
        noise = _noise(shape, seed, p, g) if latents is None else latents.float().cpu()
        concat = None
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
            return _result(pipe, p, decode(pipe, init.expand(b, -1, -1, -1)), seed, inpaint=mask is not None)

        sigma0 = float(sigmas[0])
        if from_noise:
            x = noise * (math.sqrt(sigma0**2 + 1) if info.vp_init or p.schedule == "leading" else sigma0)
        else:
            x = init + noise * sigma0
        x = x.to(pipe.device)

        state = {"step": 0}
        den = make_denoiser(guided_model(pipe, conds, p, state, concat), discrete, spec.prediction)
        blend_mask = lmask.to(pipe.device) if blend else None

        def on_step(s) -> None:
            state["step"] = s.i + 1
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
        x = x / math.sqrt(1 + float(sigmas[-1]) ** 2)
        images = decode(pipe, x)
        if pmask is not None and p.mask_blur > 0:
            images = [Image.composite(im, image.resize(im.size), mask.convert("L").resize(im.size).filter(
                imageops.ImageFilter.GaussianBlur(p.mask_blur))) for im in images]
    return _result(pipe, p, images, seed, inpaint=mask is not None)


def _img2img_start(p: GenerationParams) -> int:
    """Index of the first sigma of an img2img run in the ``steps``-step schedule.

    "diffusers" (default): the last ``int(steps * strength)`` steps. "a1111": AUTOMATIC1111's
    ``t_enc = int(min(strength, 0.999) * steps)``, which starts one sigma higher and runs ``t_enc + 1`` steps.
    """
    if p.img2img_mode == "a1111":
        return max(p.steps - int(min(p.strength, 0.999) * p.steps) - 1, 0)
    return p.steps - min(int(p.steps * p.strength), p.steps)


def _result(pipe: Pipeline, p: GenerationParams, images: list[Image.Image], seed: int, *,
            inpaint: bool) -> GenerationResult:
    """Every image of a batch comes from the one seed's noise stream: image i is reproduced by the same
    seed and batch size (its infotext says "Batch size" and "Batch pos", as AUTOMATIC1111 writes them)."""
    from sfumato.metadata import infotext

    n = len(images)
    texts = [infotext(p, seed=seed, model_name=pipe.model_name, model_hash=pipe.model_hash(), inpaint=inpaint,
                      extra={"Batch size": n, "Batch pos": i} if n > 1 else {}) for i in range(n)]
    return GenerationResult(images=images, params=p, seeds=[seed] * n, infotexts=texts)


def _inpaint_full_res(pipe: Pipeline, p: GenerationParams, image: Image.Image, mask: Image.Image,
                      callback: Callable | None) -> GenerationResult:
    """AUTOMATIC1111's "inpaint at full resolution": inpaint the mask's region at the output size, then
    paste it back into the untouched original through the (blurred) mask."""
    box = imageops.mask_bbox(mask, p.inpaint_padding, p.width, p.height)
    if box is None:
        raise InvalidParameterError("the mask is empty (all black): nothing to inpaint")
    crop, crop_mask = image.crop(box), mask.crop(box)
    res = run(pipe, p.replace(inpaint_full_res=False), image=crop.resize((p.width, p.height), Image.LANCZOS),
              mask=crop_mask.resize((p.width, p.height), Image.LANCZOS), callback=callback)
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
