"""Ancestral and SDE samplers (sampling/ancestral.py).

1. Parity with diffusers' schedulers that draw the same noise from the same CPU generator, on an
   analytic model (no UNet), eps and v prediction, fp32, 20 "trailing" steps (integer timesteps, so
   diffusers' model timesteps and our ``sigma_to_t`` agree; with "linspace" diffusers interpolates
   sigma linearly between table entries and k-diffusion log-linearly, a different model input).
2. Determinism: the same seed gives bit-identical output, another seed a different one.
3. Statistics on a Gaussian problem whose exact denoiser is known: the samples have the data's mean
   and standard deviation; the Brownian-increment construction of DPM++ SDE has the right correlation.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from sfumato.config import NoiseScheduleConfig
from sfumato.sampling.ancestral import SAMPLERS, get_ancestral_step, sample_dpmpp_sde, sample_euler_ancestral
from sfumato.sampling.denoisers import make_denoiser
from sfumato.sampling.registry import StepInfo
from sfumato.sampling.samplers import sample_dpmpp_2m, sample_euler
from sfumato.sampling.schedules import SCHEDULES, discrete_schedule

SHAPE = (2, 4, 8, 8)
STEPS = 20
SEED = 1234
SCHEDULE = NoiseScheduleConfig()
DIFFUSERS_SCHEDULE = dict(
    beta_schedule=SCHEDULE.beta_schedule,
    beta_start=SCHEDULE.beta_start,
    beta_end=SCHEDULE.beta_end,
    num_train_timesteps=SCHEDULE.num_timesteps,
    timestep_spacing="trailing",
)
PREDICTION = {"eps": "epsilon", "v": "v_prediction"}


def analytic_model(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for a UNet: depends on the input and (weakly) on the timestep."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x_vp.ndim - 1)))
    return 0.3 * x_vp + 0.1 * torch.sin(t / 100) * torch.cos(x_vp)


def run_diffusers(scheduler, generator: torch.Generator) -> torch.Tensor:
    """diffusers' pipeline loop (StableDiffusionPipeline: prepare_latents, scale_model_input, step)."""
    scheduler.set_timesteps(STEPS)
    latents = randn_tensor(SHAPE, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(analytic_model(model_in, t), t, latents, generator=generator).prev_sample
    return latents


def run_ours(
    name: str, sigmas: torch.Tensor, prediction: str, generator: torch.Generator, **knobs: object
) -> torch.Tensor:
    """The spine's start (contract: VP-scaled start when ``vp_init``) and end (x_vp at sigmas[-1])."""
    info = SAMPLERS[name]
    denoiser = make_denoiser(analytic_model, discrete_schedule(SCHEDULE), prediction)
    noise = torch.randn(SHAPE, generator=generator, dtype=torch.float32)
    x = noise * ((sigmas[0] ** 2 + 1) ** 0.5 if info.vp_init else sigmas[0])
    x = info.fn(denoiser, x, sigmas, generator=generator, **knobs)
    return x / (1 + sigmas[-1] ** 2) ** 0.5


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    diff = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert diff <= tol * scale, f"max|diff| = {diff:.3e} (relative {diff / scale:.3e}, bound {tol:.0e})"


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_euler_ancestral_matches_diffusers(prediction: str) -> None:
    """Euler a vs EulerAncestralDiscreteScheduler, same generator. Measured max|diff| relative to the
    sample's max: 2.3e-7 (eps), 1.4e-7 (v)."""
    sched = EulerAncestralDiscreteScheduler(**DIFFUSERS_SCHEDULE, prediction_type=PREDICTION[prediction])
    ref = run_diffusers(sched, torch.Generator().manual_seed(SEED))
    ours = run_ours("euler_a", sched.sigmas, prediction, torch.Generator().manual_seed(SEED))
    assert_close(ours, ref, 1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpm2_ancestral_matches_diffusers(prediction: str) -> None:
    """DPM2 a vs KDPM2AncestralDiscreteScheduler, same generator. Measured relative max|diff|:
    1.8e-7 (eps), 1.3e-7 (v)."""
    sched = KDPM2AncestralDiscreteScheduler(**DIFFUSERS_SCHEDULE, prediction_type=PREDICTION[prediction])
    ref = run_diffusers(sched, torch.Generator().manual_seed(SEED))
    # diffusers interleaves each sigma with its midpoint; every other entry is the step schedule
    ours = run_ours("dpm2_a", sched.sigmas[0::2], prediction, torch.Generator().manual_seed(SEED))
    assert_close(ours, ref, 1e-5)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpmpp_2m_sde_matches_diffusers(prediction: str, solver_type: str) -> None:
    """DPM++ 2M SDE vs DPMSolverMultistepScheduler("sde-dpmsolver++"), same generator: diffusers draws
    one noise per step (its last one is multiplied by 0), as we do. Measured relative max|diff|:
    midpoint 6.2e-7 (eps) / 3.8e-7 (v), heun 5.0e-7 / 5.0e-7."""
    sched = DPMSolverMultistepScheduler(
        **DIFFUSERS_SCHEDULE,
        prediction_type=PREDICTION[prediction],
        algorithm_type="sde-dpmsolver++",
        solver_type=solver_type,
    )
    ref = run_diffusers(sched, torch.Generator().manual_seed(SEED))
    sched.set_timesteps(STEPS)
    gen = torch.Generator().manual_seed(SEED)
    ours = run_ours("dpmpp_2m_sde", sched.sigmas, prediction, gen, solver_type=solver_type)
    assert_close(ours, ref, 1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpmpp_3m_sde_at_eta_0_matches_diffusers_3m(prediction: str) -> None:
    """DPM++ 3M SDE with eta = 0 is DPM-Solver++(3M) with the Heun-type second-order start: diffusers'
    "dpmsolver++", solver_order=3, solver_type="heun". (diffusers' stochastic third-order update has
    the sign of its D2 constant flipped, so eta = 1 is checked statistically below.) 20 steps: with
    fewer than 15 diffusers also lowers the order of the second-to-last step. Measured relative
    max|diff|: 6.5e-7 (eps), 6.3e-7 (v)."""
    sched = DPMSolverMultistepScheduler(
        **DIFFUSERS_SCHEDULE,
        prediction_type=PREDICTION[prediction],
        algorithm_type="dpmsolver++",
        solver_order=3,
        solver_type="heun",
    )
    ref = run_diffusers(sched, torch.Generator().manual_seed(SEED))
    sched.set_timesteps(STEPS)
    ours = run_ours("dpmpp_3m_sde", sched.sigmas, prediction, torch.Generator().manual_seed(SEED), eta=0.0)
    assert_close(ours, ref, 1e-5)


def karras(steps: int, sigma_min: float = 0.0292, sigma_max: float = 14.6146) -> torch.Tensor:
    """Karras et al. 2022 schedule, rho = 7 (k-diffusion ``get_sigmas_karras``), float64, ending in 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / 7) + ramp * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def test_registry_entries() -> None:
    assert {n: i.label for n, i in SAMPLERS.items()} == {
        "euler_a": "Euler a",
        "dpm2_a": "DPM2 a",
        "dpmpp_2s_a": "DPM++ 2S a",
        "dpmpp_sde": "DPM++ SDE",
        "dpmpp_2m_sde": "DPM++ 2M SDE",
        "dpmpp_3m_sde": "DPM++ 3M SDE",
    }
    for name, info in SAMPLERS.items():
        assert info.stochastic and info.knobs == ("eta", "s_noise"), name
        assert info.default_schedule in SCHEDULES, f"{name}: unknown schedule {info.default_schedule!r}"


def test_get_ancestral_step() -> None:
    sigma_from, sigma_to = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64)
    for eta in (0.0, 0.5, 1.0, 3.0):
        down, up = get_ancestral_step(sigma_from, sigma_to, eta)
        assert torch.allclose(down**2 + up**2, sigma_to**2), eta
    down, up = get_ancestral_step(sigma_from, sigma_to, 0.0)
    assert down == sigma_to and up == 0
    down, up = get_ancestral_step(sigma_from, sigma_to, 1.0)
    # eta = 1 is the DDPM posterior: mean at sigma_to**2 / sigma_from, the rest of the variance as noise
    assert torch.allclose(down, sigma_to**2 / sigma_from)
    down, up = get_ancestral_step(sigma_from, sigma_to, 3.0)  # too much noise asked: capped at sigma_to
    assert up == sigma_to and down == 0


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_seed_same_output(name: str) -> None:
    sigmas = karras(8).float()
    denoiser = make_denoiser(analytic_model, discrete_schedule(SCHEDULE), "eps")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    fn = SAMPLERS[name].fn
    steps: list[StepInfo] = []
    a = fn(denoiser, x, sigmas, generator=torch.Generator().manual_seed(1), callback=steps.append)
    b = fn(denoiser, x, sigmas, generator=torch.Generator().manual_seed(1))
    c = fn(denoiser, x, sigmas, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b), f"max|diff| = {(a - b).abs().max():.3e} with the same seed"
    assert (a - c).abs().max() > 1e-3, "another seed gave the same sample"
    assert [s.i for s in steps] == list(range(8)) and all(s.total == 8 for s in steps)
    assert torch.equal(steps[-1].x, a) and steps[0].sigma == pytest.approx(float(sigmas[0]))


def test_eta_0_is_the_ode() -> None:
    """Euler a at eta = 0 is Euler, DPM++ 2M SDE at eta = 0 is DPM++ 2M: the same ODE steps and no
    noise drawn. Measured max|diff| 0 and ~1e-15 (fp64)."""
    sigmas = karras(12)
    denoiser = make_denoiser(analytic_model, discrete_schedule(SCHEDULE), "v")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    for ours, ref in (
        (sample_euler_ancestral(denoiser, x, sigmas, eta=0.0), sample_euler(denoiser, x, sigmas)),
        (SAMPLERS["dpmpp_2m_sde"].fn(denoiser, x, sigmas, eta=0.0), sample_dpmpp_2m(denoiser, x, sigmas)),
    ):
        assert_close(ours, ref, 1e-12)


MU, S = 0.5, 0.7  # data x0 ~ N(MU, S^2), independently per element
N = 100_000


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x0 + sigma * eps = x] for x0 ~ N(MU, S^2): the exact denoiser of this data."""
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samples_have_the_data_distribution(name: str) -> None:
    """Start from x_T ~ N(MU, S^2 + sigma_max^2), the exact marginal at sigma_max, and sample N = 1e5
    scalars. The mean is unbiased (every sampler is affine in x and the noise), so it may only differ
    by sampling error: bound 5 * S / sqrt(N) = 0.011. The standard deviation has sampling error
    S / sqrt(2N) (relative 0.0022; bound 5x) plus discretisation bias: measured with 40 Karras steps
    within 0.7% for the second-order samplers; Euler a is first order (-8.2% at 40 steps, -2.1% at
    200), so it gets 400 steps. Allowance 1.5%."""
    steps = 400 if name == "euler_a" else 40
    sigmas = karras(steps)
    gen = torch.Generator().manual_seed(0)
    x = MU + (S**2 + sigmas[0] ** 2) ** 0.5 * torch.randn(N, generator=gen, dtype=torch.float64)
    out = SAMPLERS[name].fn(gaussian_denoiser, x, sigmas, generator=gen)
    mean_err, std_err = (out.mean() - MU).item(), (out.std() / S - 1).item()
    assert abs(mean_err) < 5 * S / math.sqrt(N), f"mean off by {mean_err:.4f}"
    assert abs(std_err) < 5 / math.sqrt(2 * N) + 0.015, f"std off by {std_err:+.2%}"


def test_dpmpp_sde_substep_noise_is_one_brownian_path() -> None:
    """The two sub-step noises of one DPM++ SDE step must be the normalised Brownian increments over
    [sigma_s, sigma] and [sigma_next, sigma], as from k-diffusion's Brownian tree: unit variance and
    correlation sqrt((sigma - sigma_s) / (sigma - sigma_next)). With D = 0 and x = 0 the sampler's
    states are exactly those noises times sigma_up."""
    sigmas = torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64)
    sigma_s = 2.0  # geometric mean of 4 and 1 (r = 1/2)
    seen: dict[float, torch.Tensor] = {}

    def zero_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen[round(float(sigma), 6)] = x
        return torch.zeros_like(x)

    steps: list[StepInfo] = []
    x = torch.zeros(N, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    sample_dpmpp_sde(zero_denoiser, x, sigmas, generator=gen, callback=steps.append)
    z1 = seen[sigma_s] / get_ancestral_step(sigmas[0], torch.tensor(sigma_s, dtype=torch.float64))[1]
    z2 = steps[0].x / get_ancestral_step(sigmas[0], sigmas[1])[1]
    bound = 5 / math.sqrt(N)
    for z in (z1, z2):
        assert abs(z.std().item() - 1) < bound and abs(z.mean().item()) < bound
    corr = (z1 * z2).mean().item()
    assert abs(corr - math.sqrt((4.0 - sigma_s) / (4.0 - 1.0))) < bound, f"correlation {corr:.4f}"
