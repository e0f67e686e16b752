"""Ancestral and SDE samplers: Euler a, DPM2 a, DPM++ 2S a, DPM++ SDE, DPM++ 2M SDE, DPM++ 3M SDE.

The algorithms are k-diffusion's (Crowson, ``k_diffusion/sampling.py``), written for our signature
``sample_x(denoiser, x, sigmas, *, generator=None, callback=None, **knobs) -> Tensor`` in the
variance-exploding space ``x = x0 + sigma * eps``; ``denoiser(x, sigma)`` returns x0.

All randomness comes from ``generator``, one ``randn`` of ``x``'s shape per use, in the order the
reference draws it, so a CPU generator gives the same stream as diffusers' ``randn_tensor`` in
``EulerAncestralDiscreteScheduler``, ``KDPM2AncestralDiscreteScheduler`` and
``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")``. k-diffusion's SDE samplers draw
from a torchsde Brownian tree instead; we do not depend on torchsde, and use Gaussian increments from
the generator with the same joint distribution (see ``sample_dpmpp_sde``).
"""

from __future__ import annotations


import torch

from sfumato.errors import InvalidParameterError
from sfumato.sampling.denoisers import Denoiser
from sfumato.sampling.registry import Callback, SamplerInfo, randn_like, report, to_d

__all__ = [
    "SAMPLERS",
    "get_ancestral_step",
    "sample_dpm_2_ancestral",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
    "sample_euler_ancestral",
]






def get_ancestral_step(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step sigma_from -> sigma_to into a deterministic step to ``sigma_down`` and fresh noise
    of std ``sigma_up``, with ``sigma_down**2 + sigma_up**2 == sigma_to**2`` (k-diffusion).

    eta = 1 is the DDPM ancestral step (Ho et al. 2020): ``sigma_up`` is the std of the posterior
    q(x_to | x_from, x0); eta = 0 is the deterministic ODE step (sigma_up = 0).
    """
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_up = torch.minimum(sigma_to, sigma_up)
    # clamp: rounding can make the difference a hair below zero when sigma_up == sigma_to
    sigma_down = (sigma_to**2 - sigma_up**2).clamp(min=0) ** 0.5
    return sigma_down, sigma_up


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler a: ancestral sampling with Euler steps (k-diffusion ``sample_euler_ancestral``).

    Each step follows the ODE of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based
    Generative Models") down to ``sigma_down`` and adds noise of std ``sigma_up`` (DDPM ancestral
    step, Ho et al. 2020). One noise draw per step except the last (sigma -> 0); diffusers'
    ``EulerAncestralDiscreteScheduler`` draws the same numbers (its last draw is multiplied by 0).
    """
    sigmas = sigmas.to(x.device)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if eta and sigma_next > 0:
            x = x + randn_like(x, generator) * s_noise * sigma_up
        report(callback, i, total, sigma, x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM2 a: ancestral sampling with DPM-Solver-2 midpoint steps (k-diffusion ``sample_dpm_2_ancestral``).

    The deterministic part is the second-order midpoint step of DPM-Solver (Lu et al. 2022,
    "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps")
    on the Karras ODE, the midpoint taken at the geometric mean of sigma and ``sigma_down``; then
    noise of std ``sigma_up``. The last step (sigma_down = 0) is plain Euler. Two model calls per
    step, one noise draw per step but the last, as diffusers' ``KDPM2AncestralDiscreteScheduler``.
    """
    sigmas = sigmas.to(x.device)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = sigma.log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid))
            x = x + d_2 * (sigma_down - sigma)
        if eta and sigma_next > 0:
            x = x + randn_like(x, generator) * s_noise * sigma_up
        report(callback, i, total, sigma, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM++ 2S a: ancestral sampling with DPM-Solver++(2S) steps (k-diffusion ``sample_dpmpp_2s_ancestral``).

    DPM-Solver++(2S) is the single-step second-order data-prediction solver of Lu et al. 2022,
    "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", in
    t = -log(sigma) with the intermediate point at r = 1/2, run down to ``sigma_down``; then noise of
    std ``sigma_up``. The last step is Euler. No diffusers scheduler implements it.
    """
    sigmas = sigmas.to(x.device)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            h = sigma.log() - sigma_down.log()  # step in t = -log(sigma)
            sigma_s = (sigma.log() - 0.5 * h).exp()
            x_2 = (sigma_s / sigma) * x - (-0.5 * h).expm1() * denoised
            denoised_2 = denoiser(x_2, sigma_s)
            x = (sigma_down / sigma) * x - (-h).expm1() * denoised_2
        if eta and sigma_next > 0:
            x = x + randn_like(x, generator) * s_noise * sigma_up
        report(callback, i, total, sigma, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> torch.Tensor:
    """DPM++ SDE: stochastic DPM-Solver++ with a second-order single step (k-diffusion ``sample_dpmpp_sde``).

    Each step from sigma to sigma_next is two ancestral DPM-Solver++ sub-steps (Lu et al. 2022,
    "DPM-Solver++"): first to the intermediate level sigma_s = sigma**(1-r) * sigma_next**r with the
    first denoised value, then from sigma to sigma_next with a blend of both denoised values (r = 1/2:
    the average). The last step (sigma_next = 0) is Euler.

    Noise: k-diffusion draws each sub-step's noise from one torchsde Brownian tree W over sigma, as
    ``(W(b) - W(a)) / sqrt(|b - a|)``; the first sub-step's interval [sigma_s, sigma] lies inside the
    second's [sigma_next, sigma], so the two noises are correlated. Without torchsde we draw the two
    independent Brownian increments z1 over [sigma_s, sigma] and z2 over [sigma_next, sigma_s] from
    ``generator`` and form the first noise as z1 and the second as
    ``(sqrt(sigma - sigma_s) * z1 + sqrt(sigma_s - sigma_next) * z2) / sqrt(sigma - sigma_next)``:
    the same joint distribution as the tree's (steps use disjoint intervals, hence independent
    noise), though not the same numbers as k-diffusion for a given seed.
    """
    sigmas = sigmas.to(x.device)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
        else:
            # t = -log(sigma); sub-step 1 goes from t to s = t + r * h
            t, t_next = -sigma.log(), -sigma_next.log()
            h = t_next - t
            sigma_s = (-(t + r * h)).exp()
            z1 = randn_like(x, generator) if eta else None

            sigma_down, sigma_up = get_ancestral_step(sigma, sigma_s, eta)
            x_2 = (sigma_down / sigma) * x - (t + sigma_down.log()).expm1() * denoised
            if z1 is not None:
                x_2 = x_2 + z1 * s_noise * sigma_up
            denoised_2 = denoiser(x_2, sigma_s)

            fac = 1 / (2 * r)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
            x = (sigma_down / sigma) * x - (t + sigma_down.log()).expm1() * denoised_d
            if z1 is not None:
                z2 = randn_like(x, generator)
                noise = ((sigma - sigma_s).sqrt() * z1 + (sigma_s - sigma_next).sqrt() * z2) / (
                    sigma - sigma_next
                ).sqrt()
                x = x + noise * s_noise * sigma_up
        report(callback, i, total, sigma, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> torch.Tensor:
    """DPM++ 2M SDE: the second-order multistep SDE solver SDE-DPM-Solver++(2M) of Lu et al. 2022,
    "DPM-Solver++", section 5 (k-diffusion ``sample_dpmpp_2m_sde``).

    ``eta`` scales the noise (eta = 1: the reverse SDE; eta = 0: DPM-Solver++(2M), the ODE).
    ``solver_type`` picks the second-order correction: "midpoint" (k-diffusion's and diffusers'
    default) or "heun". The first step is first order, the last (sigma_next = 0) returns the
    denoised value. One noise draw per step but the last, the same numbers as diffusers'
    ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")`` draws.
    """
    if solver_type not in ("midpoint", "heun"):
        raise InvalidParameterError(f"solver_type {solver_type!r} is not supported; use 'midpoint' or 'heun'")
    sigmas = sigmas.to(x.device)
    total = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()  # step in lambda = -log(sigma)
            eta_h = eta * h
            phi_1 = (-h - eta_h).expm1().neg()
            x = sigma_next / sigma * (-eta_h).exp() * x + phi_1 * denoised
            if old_denoised is not None:
                d = (h / h_last) * (denoised - old_denoised)  # D1 of the paper: h * d(denoised)/d(lambda)
                if solver_type == "heun":
                    x = x + (phi_1 / (-h - eta_h) + 1) * d
                else:
                    x = x + 0.5 * phi_1 * d
            if eta:
                x = x + randn_like(x, generator) * sigma_next * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        report(callback, i, total, sigma, x, denoised)
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM++ 3M SDE: third-order multistep SDE-DPM-Solver++ (Lu et al. 2022, "DPM-Solver++";
    k-diffusion ``sample_dpmpp_3m_sde``).

    The exponential integrator of the reverse SDE (eta = 1; eta = 0 gives the ODE solver
    DPM-Solver++(3M)) with the denoised values of the last three steps; the order ramps 1, 2, 3 over
    the first steps, and the last step (sigma_next = 0) returns the denoised value. One noise draw
    per step but the last. diffusers' third-order "sde-dpmsolver++" update has the constant of its
    second-derivative coefficient with the opposite sign (``- 0.5`` where the integral of
    ``2 e^{-2(h-u)} u^2 / 2`` over [0, h], divided by h^2, gives ``+ 0.5``), so only the eta = 0
    case matches diffusers; this follows k-diffusion.
    """
    sigmas = sigmas.to(x.device)
    total = len(sigmas) - 1
    denoised_1, denoised_2 = None, None
    h_1, h_2 = None, None
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if eta:
                x = x + randn_like(x, generator) * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        report(callback, i, total, sigma, x, denoised)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


_KNOBS = ("eta", "s_noise")

# Default schedules and discard_next_to_last_sigma are AUTOMATIC1111's (modules/sd_samplers_kdiffusion.py,
# v1.9+). vp_init: diffusers' DPMSolverMultistepScheduler starts from unit-variance VP noise
# (init_noise_sigma = 1); its Euler-ancestral, KDPM2-ancestral and DPMSolverSDE schedulers start from
# sigma_max with "linspace" or "trailing" spacing, which the spine's ``schedule == "leading"`` rule covers.
SAMPLERS: dict[str, SamplerInfo] = {
    "euler_a": SamplerInfo(sample_euler_ancestral, "Euler a", _KNOBS, stochastic=True),
    "dpm2_a": SamplerInfo(
        sample_dpm_2_ancestral,
        "DPM2 a",
        _KNOBS,
        stochastic=True,
        default_schedule="karras",
        discard_next_to_last_sigma=True,
    ),
    "dpmpp_2s_a": SamplerInfo(
        sample_dpmpp_2s_ancestral, "DPM++ 2S a", _KNOBS, stochastic=True, default_schedule="karras"
    ),
    "dpmpp_sde": SamplerInfo(
        sample_dpmpp_sde, "DPM++ SDE", _KNOBS, stochastic=True, default_schedule="karras"
    ),
    "dpmpp_2m_sde": SamplerInfo(
        sample_dpmpp_2m_sde,
        "DPM++ 2M SDE",
        _KNOBS,
        stochastic=True,
        vp_init=True,
        default_schedule="exponential",
    ),
    "dpmpp_3m_sde": SamplerInfo(
        sample_dpmpp_3m_sde,
        "DPM++ 3M SDE",
        _KNOBS,
        stochastic=True,
        vp_init=True,
        default_schedule="exponential",
        discard_next_to_last_sigma=True,
    ),
}
