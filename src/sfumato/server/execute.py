"""Running one :class:`~sfumato.server.a1111.Task` on a loaded pipeline: ``n_iter`` iterations, the hires
fix, progress, previews, interrupt / skip / cancel.

Iteration ``k`` uses seed ``seed + k * batch_size`` (webui's first seed of iteration ``k``); within a
batch every image comes from the one seed's noise stream, as :meth:`Pipeline.generate` makes it (its
infotext says "Batch pos"). Interrupt and skip are raised from the sampler callback; the step's x0
prediction is decoded, so an interrupted job still returns an image, as webui does. Interrupt stops the
job, skip only the current iteration, cancel stops it without images.

Hires fix (webui's ``enable_hr``): the txt2img pass at (width, height), an upscale to the hires size and
an img2img pass on the same pipeline. Latent upscalers interpolate the final latents
(``torch.nn.functional.interpolate``) and the second pass starts from them noised to
``denoising_strength`` (the spine's ``denoising_start`` hand-off, fresh noise from the seed); image
upscalers ("Lanczos", "Nearest", "None" = Lanczos) decode, resize and run :meth:`Pipeline.img2img`; an SD x4
upscaler model (``hr_upscaler`` naming one) upscales the decoded image with the generation's prompt
(``extras.model_upscale``) before the resize, as a pass of its own (interrupt and skip wait for the
img2img pass, whose x0 the base model can decode).

The zoo's job types ("upscale", "edit", "depth2img") call their :class:`~sfumato.pipeline.Pipeline` method
per iteration; an "extras" task (webui's Extras upscaling) runs ``extras.run_extras`` once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from sfumato.errors import InvalidParameterError
from sfumato.params import GenerationParams, validate
from sfumato.server.a1111 import IMAGE_UPSCALERS, LATENT_UPSCALERS, Task
from sfumato.server.extras import model_upscale


class Stop(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised from the sampler callback: ``reason`` "interrupt", "skip" or "cancel"."""

    def __init__(self, reason: str, denoised: torch.Tensor | None) -> None:
        super().__init__(reason)
        self.reason, self.denoised = reason, denoised


@dataclass
class Outcome:
    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    model_name: str
    model_hash: str | None
    started: float
    state: str = "done"  # or "interrupted" (images up to the interrupt)
    inpainting_model: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Control:
    """What a job exposes to the run: stop flags (set from request threads) and a progress sink."""

    interrupted: bool = False
    skipped: bool = False
    cancelled: bool = False

    def on_step(self, pass_no: int, passes: int, iteration: int, info: Any, spec: Any) -> None:
        """Called after every sampler step (``info`` a :class:`sfumato.sampling.StepInfo`)."""


def execute(task: Task, pipe, refiner, control: Control, *, controls: list | None = None,
            upscalers: dict[str, Any] | None = None) -> Outcome:
    """Run every iteration of ``task`` on ``pipe`` (and ``refiner``), reporting to ``control``; ``controls``:
    the task's ControlNet units (:class:`sfumato.adapters.controlnet.ControlUnit`), in every pass;
    ``upscalers``: the upscaler models ``task.upscalers`` names, loaded."""
    if task.kind == "extras":
        return _extras(task, upscalers or {}, control)
    addons = {"controlnet": controls} if controls else {}
    p = task.params
    per_iter = 1 if task.hires is None else 3 if task.upscalers else 2
    passes = task.n_iter * per_iter
    out = Outcome(images=[], infotexts=[], seeds=[], model_name=pipe.model_name, model_hash=pipe.model_hash(),
                  started=time.time(), inpainting_model=pipe.spec.concat == "inpaint")
    for it in range(task.n_iter):
        ip = p.replace(seed=p.seed + it * p.batch_size)

        def callback(k: int, *, stoppable: bool = True) -> Callable:
            """Pass ``k``'s step callback; ``stoppable`` False: only cancel stops it (its x0 is not the
            base model's to decode)."""
            def cb(s) -> None:
                control.on_step(it * per_iter + k, passes, it, s, pipe.spec)
                if control.cancelled:
                    raise Stop("cancel", None)
                if not stoppable:
                    return
                if control.interrupted:
                    raise Stop("interrupt", s.denoised)
                if control.skipped:
                    control.skipped = False
                    raise Stop("skip", s.denoised)
            return cb

        try:
            images, texts, extra = _iteration(task, pipe, refiner, ip, callback, addons, upscalers or {})
        except Stop as stop:
            if stop.reason == "cancel":
                raise
            images, texts, extra = _partial(pipe, ip, stop.denoised), None, {}
            if stop.reason == "interrupt":
                out.state = "interrupted"
        if texts is None:
            texts = _infotexts(pipe, ip, len(images), {}, inpaint=task.mask is not None)
        out.images += images
        out.infotexts += texts
        out.seeds += [ip.seed] * len(images)
        out.extra = extra
        if out.state == "interrupted":
            break
    return out


def _kwargs(p: GenerationParams, *drop: str) -> dict[str, Any]:
    skip = {"prompt", "negative_prompt", "width", "height", "strength", *drop}
    return {k: v for k, v in p.to_dict().items() if k not in skip}


def _extras(task: Task, upscalers: dict[str, Any], control: Control) -> Outcome:
    from sfumato.server.extras import run_extras

    started = time.time()

    def on_step(pass_no: int, passes: int, info: Any, spec: Any) -> None:
        control.on_step(pass_no, passes, 0, info, spec)
        if control.cancelled or control.interrupted:  # an upscale half done has nothing to show
            raise Stop("cancel", None)

    images, texts = run_extras(task, upscalers, on_step)
    return Outcome(images=images, infotexts=texts, seeds=[task.params.seed] * len(images),
                   model_name=task.extras.upscaler_1 or "None", model_hash=None, started=started)


def _iteration(task: Task, pipe, refiner, p: GenerationParams, callback: Callable[[int], Callable],
               addons: dict[str, Any], upscalers: dict[str, Any]):
    experts = {"refiner": refiner, "refiner_switch_at": task.refiner_switch_at} if refiner is not None else {}
    experts.update(addons)
    size = {"width": p.width, "height": p.height}
    if task.kind == "edit":
        res = pipe.edit(task.image, p.prompt, p.negative_prompt, image_cfg_scale=p.image_cfg_scale,
                        cfg_scale=p.cfg_scale, callback=callback(0), **size,
                        **_kwargs(p, "cfg_scale", "image_cfg_scale"))
    elif task.kind == "depth2img":
        res = pipe.depth2img(task.image, p.prompt, p.negative_prompt, strength=p.strength, callback=callback(0),
                             **size, **task.method_kw, **_kwargs(p))
    elif task.kind == "variations":
        res = pipe.variations(task.image, p.prompt, p.negative_prompt, cfg_scale=p.cfg_scale, callback=callback(0),
                              **size, **task.method_kw, **_kwargs(p, "cfg_scale"))
    elif task.kind == "upscale":
        res = pipe.upscale(task.image, p.prompt, p.negative_prompt, steps=p.steps, cfg_scale=p.cfg_scale,
                           callback=callback(0), **task.method_kw, **_kwargs(p, "steps", "cfg_scale"))
    elif task.kind == "img2img" and task.mask is not None:
        kw = _kwargs(p, "mask_blur", "inpaint_fill", "inpaint_full_res", "inpaint_padding")
        res = pipe.inpaint(task.image, task.mask, p.prompt, p.negative_prompt, strength=p.strength,
                           mask_blur=p.mask_blur, fill=p.inpaint_fill, inpaint_full_res=p.inpaint_full_res,
                           padding=p.inpaint_padding, callback=callback(0), **size, **experts, **kw)
    elif task.kind == "img2img":
        res = pipe.img2img(task.image, p.prompt, p.negative_prompt, strength=p.strength, callback=callback(0),
                           **size, **experts, **_kwargs(p))
    elif task.hires is None:
        res = pipe.generate(p.prompt, p.negative_prompt, callback=callback(0), **size, **experts, **_kwargs(p))
    else:
        if refiner is not None:
            raise InvalidParameterError("enable_hr with refiner_checkpoint is not supported; use one of them")
        return _hires(task, pipe, p, callback, addons, upscalers)
    return res.images, res.infotexts, {}


def _hires(task: Task, pipe, p: GenerationParams, callback: Callable[..., Callable], addons: dict[str, Any],
           upscalers: dict[str, Any]):
    from sfumato.pipeline import decode, run

    h = task.hires
    f = pipe.spec.vae.downscale
    second = validate(p.replace(width=h.width, height=h.height, steps=h.steps or p.steps, prompt=h.prompt,
                                negative_prompt=h.negative_prompt, sampler=h.sampler or p.sampler,
                                schedule=h.schedule or p.schedule), size_multiple=f)
    from sfumato.pipeline import _control_fields

    extra: dict[str, Any] = {"Denoising strength": h.strength, "Hires upscale": h.scale,
                             "Hires steps": h.steps or None, "Hires upscaler": h.upscaler,
                             **_control_fields(addons.get("controlnet"), False)}
    if h.upscaler in upscalers:
        o = task.upscaler_options
        extra.update({"Hires upscaler steps": o.steps, "Hires upscaler noise level": o.noise_level})
    if h.prompt != p.prompt:
        extra["Hires prompt"] = h.prompt
    if h.negative_prompt != p.negative_prompt:
        extra["Hires negative prompt"] = h.negative_prompt
    if h.upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[h.upscaler]
        controls = {"controls": addons["controlnet"]} if addons else {}
        first = run(pipe, validate(p, size_multiple=f), callback=callback(0), output="latents", **controls)
        x = first.latents.float() / math.sqrt(1 + float(_sigmas(pipe, first.params)[-1]) ** 2)
        up = torch.nn.functional.interpolate(x, size=(h.height // f, h.width // f), mode=mode,
                                             antialias=antialias)
        if h.strength <= 0:
            with torch.inference_mode():
                images = decode(pipe, up)
        else:
            start = min(max(1.0 - h.strength, 1e-3), 0.999)
            p2 = validate(second.replace(denoising_start=start), size_multiple=f)
            sigma0 = float(_sigmas(pipe, p2, start=start)[0])
            g = torch.Generator("cpu").manual_seed(p.seed)
            noise = torch.randn(up.shape, generator=g)
            res = run(pipe, p2, handoff=(up.cpu() + noise * sigma0).to(pipe.device), generator=g,
                      callback=callback(1), **controls)
            images = res.images
    else:
        first = pipe.generate(p.prompt, p.negative_prompt, width=p.width, height=p.height, callback=callback(0),
                              **_kwargs(p), **addons)
        model = upscalers.get(h.upscaler) if h.upscaler not in IMAGE_UPSCALERS else None
        images = []
        for im in first.images:
            if model is None:
                big = im.resize((h.width, h.height), IMAGE_UPSCALERS[h.upscaler] or Image.LANCZOS)
            else:  # the x4 upscaler conditioned on the generation's prompt, as diffusers' upscaler is
                big, _ = model_upscale(model, im, h.width, h.height, task.upscaler_options, prompt=p.prompt,
                                       negative_prompt=p.negative_prompt, seed=p.seed,
                                       callback=callback(1, stoppable=False))
            res = pipe.img2img(big, second.prompt, second.negative_prompt, strength=h.strength,
                               width=h.width, height=h.height, callback=callback(2 if model is not None else 1),
                               **_kwargs(second.replace(batch_size=1, img2img_mode="a1111")), **addons)
            images += res.images
    return images, _infotexts(pipe, p, len(images), extra), extra


def _sigmas(pipe, p: GenerationParams, *, start: float | None = None) -> torch.Tensor:
    from sfumato.sampling import SAMPLERS, discrete_schedule, get_sigmas, split_for_experts

    discrete = discrete_schedule(pipe.spec.schedule)
    sigmas = get_sigmas(p.schedule, p.steps, discrete, sampler=SAMPLERS[p.sampler],
                        ays_timesteps=pipe.spec.ays_timesteps)
    return split_for_experts(sigmas, discrete, start=start) if start is not None else sigmas


def _infotexts(pipe, p: GenerationParams, n: int, extra: dict[str, Any], *, inpaint: bool = False) -> list[str]:
    from sfumato.metadata import infotext

    return [infotext(p, seed=p.seed, model_name=pipe.model_name, model_hash=pipe.model_hash(), inpaint=inpaint,
                     extra={**extra, **({"Batch size": n, "Batch pos": i} if n > 1 else {})}) for i in range(n)]


def _partial(pipe, p: GenerationParams, denoised: torch.Tensor | None) -> list[Image.Image]:
    """The images an interrupted step's x0 prediction decodes to."""
    from sfumato.pipeline import decode

    if denoised is None:
        return []
    with torch.inference_mode():
        return decode(pipe, denoised)


# --- previews ------------------------------------------------------------------------------------

# Linear maps from 4-channel latents to RGB (webui's "Approx cheap" factors, keyed by the latent scale the
# autoencoder was trained with): a preview costs a matrix product, not a VAE decode.
_CHEAP_RGB = {
    0.18215: ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473)),
    0.13025: ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
              (-0.3730, -0.2499, -0.2088)),
}


def preview(latent: torch.Tensor, spec: Any) -> Image.Image:
    """A rough RGB picture of the first latent of a batch (B, C, h, w), upsampled to the pixel size."""
    x = latent[0].detach().float().cpu()  # (C, h, w)
    table = _CHEAP_RGB.get(round(spec.latent_scale, 5), _CHEAP_RGB[0.18215])
    if x.shape[0] == len(table):
        rgb = torch.einsum("chw,cr->rhw", x, torch.tensor(table))
    else:  # an unknown latent format: the channel mean as grey
        rgb = x.mean(0, keepdim=True).expand(3, -1, -1) * 0.5
    arr = ((rgb.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    f = spec.vae.downscale
    img = Image.fromarray(arr)
    return img.resize((img.width * f, img.height * f), Image.NEAREST)
