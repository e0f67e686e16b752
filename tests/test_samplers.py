"""Euler, Heun, DPM2, LMS and DPM++ 2M against diffusers' schedulers, the denoiser, and the registry.

Parity runs an analytic network (no UNet) through diffusers' loop (``scale_model_input``, model,
``step``) and through ``make_denoiser`` + our sampler from the same noise, in float64, for eps and v
prediction, 7 and 20 steps, on the SD config's "leading" spacing and on Karras sigmas. Measured
max|diff| / max|x0| <= 4e-7 in every case (diffusers keeps its sigmas in float32, hence not 1e-15).
The initial x follows the spine's rule (``vp_init`` / "leading"), so the SamplerInfo flags are tested too.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
)

from sfumato.config import NoiseScheduleConfig
from sfumato.errors import InvalidParameterError
from sfumato.sampling import SAMPLERS, SCHEDULES, StepInfo, make_denoiser, resolve_sampler
from sfumato.sampling.samplers import lms_coefficient, sample_euler
from sfumato.sampling.schedules import discrete_schedule

DISCRETE = discrete_schedule(NoiseScheduleConfig())
SD_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
)
REFERENCES = {
    "euler": (EulerDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
# diffusers feeds these schedulers round(sigma_to_t(sigma)) for Karras sigmas (not the interpolated
# midpoints of KDPM2); our denoiser passes the exact fractional t, so the test rounds those t the same way
ROUNDS_KARRAS_TIMESTEPS = ("dpm2", "dpmpp_2m")


def analytic_model(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for the UNet's eps or v output, depending on the input and the timestep."""
    t = torch.as_tensor(t, dtype=x_in.dtype).reshape(-1, *([1] * (x_in.ndim - 1)))
    return 0.3 * x_in + 0.1 * torch.sin(t / 100) * torch.cos(x_in)


def run_diffusers(scheduler, noise: torch.Tensor) -> torch.Tensor:
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(analytic_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


def _noise() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("steps", [7, 20])
@pytest.mark.parametrize("schedule", ["leading", "karras"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_sampler_matches_diffusers(name, prediction, schedule, steps):
    cls, extra = REFERENCES[name]
    spacing = {"timestep_spacing": "leading"} if schedule == "leading" else {
        "timestep_spacing": "linspace", "use_karras_sigmas": True}
    ref = cls(**SD_CONFIG, **extra, **spacing, prediction_type="epsilon" if prediction == "eps" else "v_prediction")
    ref.set_timesteps(steps)
    noise = _noise()
    expected = run_diffusers(ref, noise)

    info = SAMPLERS[name]
    ref_sigmas = torch.unique_consecutive(ref.sigmas.float())  # Heun/KDPM2 list each level twice
    if name == "dpmpp_2m" and schedule == "leading":
        # DPMSolverMultistepScheduler spaces "leading" over steps + 1 points; run on its own sigmas
        sigmas = ref_sigmas
    else:
        sigmas = SCHEDULES[schedule](steps, DISCRETE)  # not get_sigmas: A1111's DPM2 drops a sigma
        assert torch.equal(sigmas, ref_sigmas), f"schedule differs from diffusers: {sigmas} vs {ref_sigmas}"
    model = analytic_model
    if schedule == "karras" and name in ROUNDS_KARRAS_TIMESTEPS:
        levels = DISCRETE.sigma_to_t(sigmas[:-1]).float()

        def model(x_in, t):
            on_level = (t[:, None] - levels[None]).abs().amin(dim=1) < 1e-3
            return analytic_model(x_in, torch.where(on_level, t.round(), t))

    sigma0 = float(sigmas[0])
    x = noise * ((sigma0**2 + 1) ** 0.5 if info.vp_init or schedule == "leading" else sigma0)  # the spine's rule
    got = info.fn(make_denoiser(model, DISCRETE, prediction), x, sigmas)
    diff = (got - expected).abs().max().item()
    rel = diff / expected.abs().max().item()
    assert rel < 1e-6, f"{name} {prediction} {schedule} {steps} steps: max|diff| {diff:.3g} (relative {rel:.3g})"


def test_lms_coefficients_match_diffusers():
    ref = LMSDiscreteScheduler(**SD_CONFIG, timestep_spacing="leading")
    ref.set_timesteps(12)
    sigmas = ref.sigmas.double().tolist()
    worst = 0.0
    for i in range(12):
        order = min(i + 1, 4)
        for j in range(order):
            worst = max(worst, abs(lms_coefficient(sigmas, order, i, j) - ref.get_lms_coefficient(order, i, j)))
    # measured 6.5e-8: diffusers evaluates the Lagrange basis on float32 sigma tensors inside scipy's quad
    assert worst < 1e-6, f"LMS coefficient max|diff| {worst}"


def test_denoiser_preconditioning_and_dtypes():
    seen = {}

    def model(x_in, t):
        seen.update(dtype=x_in.dtype, t=t, x_in=x_in.float())
        return torch.ones_like(x_in)

    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    sigma = DISCRETE.sigmas[500]
    for prediction, expected in [("eps", x - sigma), ("v", x / (sigma**2 + 1) - sigma / (sigma**2 + 1) ** 0.5)]:
        out = make_denoiser(model, DISCRETE, prediction)(x, sigma)
        assert (out - expected).abs().max() < 1e-6, prediction
        assert seen["t"].shape == (3,) and seen["t"].dtype == torch.float32 and bool((seen["t"] == 500).all())
        assert (seen["x_in"] - x / (sigma**2 + 1) ** 0.5).abs().max() < 1e-7
    # an fp16 network: its input is cast down, the x0 maths stays in float32
    out = make_denoiser(model, DISCRETE, "eps", dtype=torch.float16)(x, sigma)
    assert seen["dtype"] == torch.float16 and out.dtype == torch.float32
    with pytest.raises(InvalidParameterError):
        make_denoiser(model, DISCRETE, "x0")


def test_euler_churn_is_deterministic_for_a_seed():
    den = make_denoiser(analytic_model, DISCRETE, "eps")
    sigmas = SCHEDULES["karras"](8, DISCRETE)
    x = _noise().float() * sigmas[0]

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return sample_euler(den, x, sigmas, generator=g, **kw), g

    a, _ = run(7, s_churn=1.0)
    b, _ = run(7, s_churn=1.0)
    c, _ = run(8, s_churn=1.0)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    plain, g = run(7)
    assert not torch.allclose(a, plain)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(7).get_state()), "s_churn=0 drew noise"
    # s_tmin/s_tmax keep churn to a window of sigmas
    windowed, _ = run(7, s_churn=1.0, s_tmin=100.0)
    assert torch.equal(windowed, plain)


def test_callback_reports_every_step():
    den = make_denoiser(analytic_model, DISCRETE, "eps")
    sigmas = SCHEDULES["normal"](5, DISCRETE)
    for name in ("euler", "heun", "dpm2", "lms", "dpmpp_2m"):
        infos: list[StepInfo] = []
        out = SAMPLERS[name].fn(den, _noise().float() * sigmas[0], sigmas, callback=infos.append)
        assert [s.i for s in infos] == list(range(5)) and all(s.total == 5 for s in infos), name
        assert infos[0].sigma == pytest.approx(float(sigmas[0])) and torch.equal(infos[-1].x, out), name


def test_registry_names_and_labels():
    labels = {
        "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpm2": "DPM2", "dpm2_a": "DPM2 a",
        "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE",
        "dpmpp_3m_sde": "DPM++ 3M SDE", "dpmpp_2s_a": "DPM++ 2S a", "lms": "LMS", "ddim": "DDIM",
        "plms": "PLMS", "unipc": "UniPC", "lcm": "LCM",
    }
    assert {name: info.label for name, info in SAMPLERS.items()} == labels
    for info in SAMPLERS.values():
        assert info.default_schedule in SCHEDULES, info.label


@pytest.mark.parametrize(
    "sampler,schedule,expected",
    [
        ("euler", None, ("euler", "normal")),
        ("Euler a", "Automatic", ("euler_a", "normal")),
        ("DPM++ 2M", None, ("dpmpp_2m", "karras")),
        ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),
        ("dpm++ 2m karras", "normal", ("dpmpp_2m", "karras")),  # the combined label fixes the schedule
        ("DPM++ SDE Karras", None, ("dpmpp_sde", "karras")),
        ("LMS Karras", None, ("lms", "karras")),
        ("DPM2 a Karras", None, ("dpm2_a", "karras")),
        ("DPM++ 2M SDE Exponential", None, ("dpmpp_2m_sde", "exponential")),
        ("DPM++ 2M SDE", "automatic", ("dpmpp_2m_sde", "exponential")),
        ("k_dpmpp_2m_ka", None, ("dpmpp_2m", "karras")),
        ("k_euler_a", None, ("euler_a", "normal")),
        ("DPM2", None, ("dpm2", "karras")),
        ("Heun", "Uniform", ("heun", "normal")),
        ("UniPC", "SGM Uniform", ("unipc", "sgm_uniform")),
        ("DDIM", None, ("ddim", "leading")),
        ("euler", "Align Your Steps", ("euler", "ays")),
    ],
)
def test_resolve_sampler(sampler, schedule, expected):
    assert resolve_sampler(sampler, schedule) == expected


def test_resolve_sampler_rejects_unknown_names():
    with pytest.raises(InvalidParameterError, match="dpmpp_2m") as err:
        resolve_sampler("DPM++ 4M")
    assert "DPM++ 2M" in str(err.value)
    with pytest.raises(InvalidParameterError, match="karras"):
        resolve_sampler("euler", "quadratic")
    with pytest.raises(InvalidParameterError):
        resolve_sampler("Euler Fancy")
