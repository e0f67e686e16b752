"""Parity of the VP multistep samplers (sampling/multistep.py) with diffusers' schedulers.

Both sides run the same analytic "network" (no UNet): diffusers in its scheduler loop
(``scale_model_input``, model, ``step``) over its own timesteps, ours as ``make_denoiser(model)`` over
the sigmas of those timesteps, from the same unit VP noise and, for the stochastic ones, the same CPU
generator stream. The final VP latents are compared. Latents are float64, so what remains is
diffusers' float32 arithmetic on its alphas/sigmas: measured max|diff| <= 1.7e-6 over all cases here
(final latents of magnitude up to ~4); with diffusers' UniPC sigmas widened to float64 it is <= 2e-14.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, PNDMScheduler, UniPCMultistepScheduler

from sfumato.config import NoiseScheduleConfig
from sfumato.errors import InvalidParameterError
from sfumato.sampling.denoisers import make_denoiser
from sfumato.sampling.multistep import (
    SAMPLERS,
    lcm_sigmas,
    sample_ddim,
    sample_lcm,
    sample_plms,
    sample_unipc,
)
from sfumato.sampling.schedules import SCHEDULES, discrete_schedule

DISCRETE = discrete_schedule(NoiseScheduleConfig())
# Stable Diffusion's scheduler_config.json, as the pipelines load it with ``from_config``
SD_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "skip_prk_steps": True,
    "timestep_spacing": "leading",
}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
SHAPE = (2, 4, 8, 8)
STEPS = (1, 2, 5, 10, 20, 25)
TOL = 1e-5


def _scheduler(cls: type, prediction_type: str = "epsilon", **config: object):
    return cls.from_config({**SD_CONFIG, "prediction_type": prediction_type, **config})


def _model(prediction_type: str):
    """A nonlinear, t-dependent stand-in for the UNet whose x0 stays of unit scale (x_vp, t) -> eps | v."""
    acp = DISCRETE.alphas_cumprod

    def model(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).to(x_vp.dtype).reshape(-1, 1, 1, 1)  # diffusers: int, ours: float (B,)
        wiggle = 0.1 * torch.sin(t / 100) * torch.cos(3 * x_vp)
        if prediction_type == "epsilon":
            return (1 - acp[t.round().long()]).to(x_vp.dtype) ** 0.5 * x_vp + wiggle
        return -0.2 * x_vp + wiggle

    return model


def _gen() -> torch.Generator:
    """The sampling-time generator; both sides get a fresh one with the same seed."""
    return torch.Generator().manual_seed(1)


def _noise(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _reference(scheduler, timesteps, x_vp: torch.Tensor, prediction_type: str, **step_kwargs) -> torch.Tensor:
    model = _model(prediction_type)
    x = x_vp * scheduler.init_noise_sigma
    for t in timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **step_kwargs).prev_sample
    return x


def _ours(sample, sigmas: torch.Tensor, x_vp: torch.Tensor, prediction_type: str, **knobs) -> torch.Tensor:
    """The spine's contract: VP start, x / sqrt(1 + sigma_last^2) at the end."""
    denoiser = make_denoiser(_model(prediction_type), DISCRETE, PREDICTIONS[prediction_type])
    x = sample(denoiser, x_vp * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, **knobs)
    return x / math.sqrt(1 + float(sigmas[-1]) ** 2)


def _sigmas_at(timesteps: torch.Tensor, final: float) -> torch.Tensor:
    """Sigmas of integer timesteps, then the final level (0 or the training sigma_min)."""
    return torch.cat([DISCRETE.sigmas[timesteps], torch.tensor([final])])


def _check(ref: torch.Tensor, ours: torch.Tensor, what: str, tol: float = TOL) -> None:
    err = (ref - ours).abs().max().item()
    assert err <= tol, f"{what}: max|diff| {err:.3g} > {tol:g} (|ref| max {ref.abs().max().item():.3g})"


def test_sigma_to_t_round_trip_is_exact():
    """The samplers' t (LCM's scalings, the denoiser's model input) comes back from sigma exactly."""
    t = torch.arange(DISCRETE.num_timesteps, dtype=torch.float64)
    assert torch.equal(DISCRETE.sigma_to_t(DISCRETE.sigmas.double()), t)


@pytest.mark.parametrize("prediction_type", list(PREDICTIONS))
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("steps", STEPS)
def test_ddim_matches_diffusers(prediction_type: str, eta: float, steps: int):
    """DDIMScheduler(set_alpha_to_one=False, steps_offset=1, leading); eta > 0 shares the noise stream.
    Measured max|diff| <= 1.3e-6."""
    scheduler = _scheduler(DDIMScheduler, prediction_type)
    scheduler.set_timesteps(steps)
    ref = _reference(scheduler, scheduler.timesteps, _noise(), prediction_type, eta=eta, generator=_gen())
    sigmas = _sigmas_at(scheduler.timesteps, DISCRETE.sigma_min)  # ends at alphas_cumprod[0]
    ours = _ours(sample_ddim, sigmas, _noise(), prediction_type, eta=eta, generator=_gen())
    _check(ref, ours, f"DDIM eta {eta} {steps} steps {prediction_type}")


@pytest.mark.parametrize("prediction_type", list(PREDICTIONS))
@pytest.mark.parametrize("steps", STEPS)
def test_plms_matches_diffusers(prediction_type: str, steps: int):
    """PNDMScheduler(skip_prk_steps=True): our sigmas are its distinct timesteps; its list repeats the
    second one (the warm-up's Heun evaluation). Measured max|diff| <= 6.7e-7."""
    scheduler = _scheduler(PNDMScheduler, prediction_type)
    scheduler.set_timesteps(steps)
    distinct = torch.unique_consecutive(scheduler.timesteps)
    expected = torch.cat([distinct[:1], distinct[1:2], distinct[1:]]) if steps > 1 else distinct
    assert torch.equal(scheduler.timesteps, expected)
    ref = _reference(scheduler, scheduler.timesteps, _noise(), prediction_type)
    sigmas = _sigmas_at(distinct, DISCRETE.sigma_min)
    ours = _ours(sample_plms, sigmas, _noise(), prediction_type, prediction=PREDICTIONS[prediction_type])
    _check(ref, ours, f"PLMS {steps} steps {prediction_type}")


def test_plms_v_models_combine_v_like_diffusers():
    """diffusers' PNDM averages v outputs, not eps: combining eps differs visibly on a v model."""
    scheduler = _scheduler(PNDMScheduler, "v_prediction")
    scheduler.set_timesteps(10)
    ref = _reference(scheduler, scheduler.timesteps, _noise(), "v_prediction")
    sigmas = _sigmas_at(torch.unique_consecutive(scheduler.timesteps), DISCRETE.sigma_min)
    ours = _ours(sample_plms, sigmas, _noise(), "v_prediction", prediction="eps")
    assert (ref - ours).abs().max().item() > 1e-3


@pytest.mark.parametrize("prediction_type", list(PREDICTIONS))
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("steps", STEPS)
def test_unipc_matches_diffusers(prediction_type: str, spacing: str, steps: int):
    """UniPCMultistepScheduler defaults (bh2, order 2, predict_x0, lower_order_final, final sigma 0),
    from an SD config ("leading", SDXL's) and diffusers' default spacing ("linspace", which an SD 1.x
    config without ``timestep_spacing`` gets). Measured max|diff| <= 1.7e-6."""
    scheduler = _scheduler(UniPCMultistepScheduler, prediction_type, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    assert torch.equal(scheduler.sigmas, _sigmas_at(scheduler.timesteps, 0.0))
    ref = _reference(scheduler, scheduler.timesteps, _noise(), prediction_type)
    ours = _ours(sample_unipc, scheduler.sigmas, _noise(), prediction_type)
    _check(ref, ours, f"UniPC {spacing} {steps} steps {prediction_type}")


UNIPC_VARIANTS = [(3, "bh2", True), (3, "bh1", False), (2, "bh1", True)]  # (order, B(h), lower_order_final)


@pytest.mark.parametrize(("order", "variant", "final_low"), UNIPC_VARIANTS)
@pytest.mark.parametrize("steps", [5, 25])
def test_unipc_variants_match_diffusers_in_float64(order: int, variant: str, final_low: bool, steps: int):
    """Order 3 and B(h) = h: with diffusers' sigmas widened to float64 (its float32 B(h) coefficients
    lose ~1e-5 at order 3) the two agree to rounding: measured max|diff| <= 1.6e-14. Ends at sigma_min,
    as diffusers' bh1 step to sigma 0 is 0 * inf = nan (ours returns x0 there)."""
    config = {"solver_order": order, "solver_type": variant, "lower_order_final": final_low}
    scheduler = _scheduler(UniPCMultistepScheduler, **config)
    scheduler.set_timesteps(steps)
    scheduler.sigmas = scheduler.sigmas.double()
    scheduler.sigmas[-1] = DISCRETE.sigma_min
    ref = _reference(scheduler, scheduler.timesteps, _noise(), "epsilon")
    knobs = {"order": order, "variant": variant, "lower_order_final": final_low}
    ours = _ours(sample_unipc, scheduler.sigmas, _noise(), "epsilon", **knobs)
    _check(ref, ours, f"UniPC order {order} {variant} {steps} steps", tol=1e-12)


@pytest.mark.parametrize("prediction_type", list(PREDICTIONS))
@pytest.mark.parametrize("steps", (1, 2, 4, 8, 25))
@pytest.mark.parametrize("scaling", [10.0, 0.02])
def test_lcm_matches_diffusers(prediction_type: str, steps: int, scaling: float):
    """LCMScheduler (original_inference_steps 50) on the same noise stream. Its default
    timestep_scaling 10 makes c_skip <= 7e-6, so scaling 0.02 checks the boundary scalings too.
    Measured max|diff| <= 9.5e-7."""
    scheduler = _scheduler(LCMScheduler, prediction_type, timestep_scaling=scaling)
    scheduler.set_timesteps(steps)
    sigmas = lcm_sigmas(steps, DISCRETE)
    assert torch.equal(sigmas, _sigmas_at(scheduler.timesteps, 0.0))
    ref = _reference(scheduler, scheduler.timesteps, _noise(), prediction_type, generator=_gen())
    knobs = {"discrete": DISCRETE, "timestep_scaling": scaling, "generator": _gen()}
    ours = _ours(sample_lcm, sigmas, _noise(), prediction_type, **knobs)
    _check(ref, ours, f"LCM {steps} steps {prediction_type} scaling {scaling}")


@pytest.mark.parametrize("steps", STEPS)
def test_leading_schedule_is_what_ddim_and_pndm_visit(steps: int):
    """The spine's "leading" schedule ending at sigma_min (``final_sigma="min"``) is the sigma list the
    parity tests above hand to DDIM and PLMS."""
    ddim, pndm = _scheduler(DDIMScheduler), _scheduler(PNDMScheduler)
    ddim.set_timesteps(steps)
    pndm.set_timesteps(steps)
    leading = SCHEDULES["leading"](steps, DISCRETE, final=SAMPLERS["ddim"].final_sigma)
    assert torch.equal(leading, _sigmas_at(ddim.timesteps, DISCRETE.sigma_min))
    assert torch.equal(leading, _sigmas_at(torch.unique_consecutive(pndm.timesteps), DISCRETE.sigma_min))


def _img2img_start(scheduler, timestep: torch.Tensor) -> torch.Tensor:
    """The pipelines' ``prepare_latents``: the image latent noised to the first timestep (VP)."""
    image = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return scheduler.add_noise(image, _noise(), timestep.reshape(1))


@pytest.mark.parametrize("prediction_type", list(PREDICTIONS))
@pytest.mark.parametrize(("steps", "strength"), [(10, 0.5), (25, 0.75), (5, 0.9)])
def test_img2img_tails_match_diffusers(prediction_type: str, steps: int, strength: float):
    """``StableDiffusionImg2ImgPipeline``: ``set_timesteps(steps)`` then the tail from
    ``t_start = steps - int(steps * strength)`` (``set_begin_index`` for UniPC, whose history starts
    empty there); ours gets ``sigmas[t_start:]``. PNDM is checked against its own fresh warm-up from
    the tail (its list re-built with the repeat), since the pipeline's slice of PNDM's list, made as if
    it had one timestep per step, drops the repeat. Measured max|diff| <= 1.6e-6."""
    t_start = steps - int(steps * strength)
    p = PREDICTIONS[prediction_type]

    ddim = _scheduler(DDIMScheduler, prediction_type)
    ddim.set_timesteps(steps)
    tail = ddim.timesteps[t_start:]
    x_vp = _img2img_start(ddim, tail[0])
    sigmas = _sigmas_at(ddim.timesteps, DISCRETE.sigma_min)[t_start:]
    ours = _ours(sample_ddim, sigmas, x_vp, prediction_type)
    _check(_reference(ddim, tail, x_vp, prediction_type), ours, "DDIM tail")

    unipc = _scheduler(UniPCMultistepScheduler, prediction_type)
    unipc.set_timesteps(steps)
    tail = unipc.timesteps[t_start * unipc.order :]
    unipc.set_begin_index(t_start * unipc.order)
    x_vp = _img2img_start(unipc, tail[0])
    ours = _ours(sample_unipc, unipc.sigmas[t_start:], x_vp, prediction_type)
    _check(_reference(unipc, tail, x_vp, prediction_type), ours, "UniPC tail")

    pndm = _scheduler(PNDMScheduler, prediction_type)
    pndm.set_timesteps(steps)
    distinct = torch.unique_consecutive(pndm.timesteps)[t_start:]
    warm_up = torch.cat([distinct[:1], distinct[1:2], distinct[1:]])
    x_vp = _img2img_start(pndm, distinct[0])
    ours = _ours(sample_plms, _sigmas_at(distinct, DISCRETE.sigma_min), x_vp, prediction_type, prediction=p)
    _check(_reference(pndm, warm_up, x_vp, prediction_type), ours, "PLMS tail")


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.9])
def test_lcm_img2img_matches_diffusers(strength: float):
    """``LatentConsistencyModelImg2ImgPipeline`` sets LCM's timesteps with ``strength``; so does
    ``lcm_sigmas``. Measured max|diff| <= 1.3e-7."""
    scheduler = _scheduler(LCMScheduler)
    scheduler.set_timesteps(4, strength=strength)
    sigmas = lcm_sigmas(4, DISCRETE, strength=strength)
    assert torch.equal(sigmas, _sigmas_at(scheduler.timesteps, 0.0))
    x_vp = _img2img_start(scheduler, scheduler.timesteps[0])
    ref = _reference(scheduler, scheduler.timesteps, x_vp, "epsilon", generator=_gen())
    ours = _ours(sample_lcm, sigmas, x_vp, "epsilon", discrete=DISCRETE, generator=_gen())
    _check(ref, ours, f"LCM img2img strength {strength}")


def test_float32_latents_match_diffusers():
    """The same runs in float32 (25 steps, 8 for LCM): rounding of the two arithmetics, measured
    max|diff| <= 3.1e-6."""
    cases = {
        "DDIM": (DDIMScheduler, sample_ddim, 25, lambda ts: _sigmas_at(ts, DISCRETE.sigma_min)),
        "UniPC": (UniPCMultistepScheduler, sample_unipc, 25, lambda ts: _sigmas_at(ts, 0.0)),
        "LCM": (LCMScheduler, sample_lcm, 8, lambda ts: _sigmas_at(ts, 0.0)),
    }
    for name, (cls, sample, steps, sigmas_of) in cases.items():
        scheduler = _scheduler(cls)
        scheduler.set_timesteps(steps)
        gen = {"generator": _gen()} if name == "LCM" else {}
        ref = _reference(scheduler, scheduler.timesteps, _noise(torch.float32), "epsilon", **gen)
        knobs = {"discrete": DISCRETE, "generator": _gen()} if name == "LCM" else {}
        ours = _ours(sample, sigmas_of(scheduler.timesteps), _noise(torch.float32), "epsilon", **knobs)
        assert ours.dtype == torch.float32
        _check(ref, ours, f"{name} float32")
    scheduler = _scheduler(PNDMScheduler)
    scheduler.set_timesteps(25)
    ref = _reference(scheduler, scheduler.timesteps, _noise(torch.float32), "epsilon")
    sigmas = _sigmas_at(torch.unique_consecutive(scheduler.timesteps), DISCRETE.sigma_min)
    _check(ref, _ours(sample_plms, sigmas, _noise(torch.float32), "epsilon"), "PLMS float32")


def test_callback_sees_every_step():
    seen = []
    sigmas = lcm_sigmas(4, DISCRETE)
    denoiser = make_denoiser(_model("epsilon"), DISCRETE, "eps")
    cases = [(sample_ddim, {}), (sample_plms, {}), (sample_unipc, {}), (sample_lcm, {"discrete": DISCRETE})]
    for sample, knobs in cases:
        seen.clear()
        sample(denoiser, _noise() * 15, sigmas, callback=seen.append, **knobs)
        assert [(s.i, s.total) for s in seen] == [(i, 4) for i in range(4)], sample.__name__
        assert [s.sigma for s in seen] == sigmas[:-1].tolist()


def test_lcm_sigmas_rejects_more_steps_than_the_distillation_grid():
    with pytest.raises(InvalidParameterError):
        lcm_sigmas(51, DISCRETE)
    with pytest.raises(InvalidParameterError):
        lcm_sigmas(20, DISCRETE, strength=0.3)  # 15 grid points


def test_registry_entries():
    labels = {"ddim": "DDIM", "plms": "PLMS", "unipc": "UniPC", "lcm": "LCM"}
    assert {k: v.label for k, v in SAMPLERS.items()} == labels
    for name, info in SAMPLERS.items():
        assert info.vp_init, name  # every one of these diffusers schedulers has init_noise_sigma 1
        assert set(info.knobs) <= set(inspect.signature(info.fn).parameters), name
    assert SAMPLERS["ddim"].final_sigma == SAMPLERS["plms"].final_sigma == "min"
    assert SAMPLERS["unipc"].final_sigma == SAMPLERS["lcm"].final_sigma == "zero"
