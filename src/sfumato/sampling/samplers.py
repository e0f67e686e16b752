"""The deterministic ODE samplers: Euler, Heun, DPM2, LMS and DPM++ 2M.

The algorithms are k-diffusion's (Crowson, ``k_diffusion/sampling.py``), written for the one signature
``sample_x(denoiser, x, sigmas, *, generator=None, callback=None, **knobs) -> Tensor``. They integrate
the probability-flow ODE of Karras et al. 2022 (EDM) in the variance-exploding space
``x = x0 + sigma * eps``: ``dx/dsigma = (x - D(x, sigma)) / sigma``. ``denoiser(x, sigma)`` returns x0.

Each mirrors a diffusers scheduler (with ``s_churn == 0``) and is tested against it:
Euler = ``EulerDiscreteScheduler``, Heun = ``HeunDiscreteScheduler``, DPM2 = ``KDPM2DiscreteScheduler``,
LMS = ``LMSDiscreteScheduler``, DPM++ 2M = ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
solver_order=2)``. Only ``s_churn > 0`` draws noise (from ``generator``); it follows k-diffusion
(noise added before the network call), not diffusers' Euler, which adds it after.
"""

from __future__ import annotations


import numpy as np
import torch

from sfumato.sampling.denoisers import Denoiser
from sfumato.sampling.registry import Callback, SamplerInfo, randn_like, report, to_d

__all__ = [
    "SAMPLERS",
    "sample_euler",
    "sample_heun",
    "sample_dpm_2",
    "sample_lms",
    "sample_dpmpp_2m",
    "lms_coefficient",
]

_CHURN_KNOBS = ("s_churn", "s_tmin", "s_tmax", "s_noise")





def _churn(
    x: torch.Tensor,
    sigma: torch.Tensor,
    steps: int,
    generator: torch.Generator | None,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Karras et al. 2022, Algorithm 2, lines 4-6: raise the noise level to sigma_hat = sigma (1 + gamma)
    by adding fresh noise. Noise is drawn only when gamma > 0, so s_churn = 0 consumes no randomness."""
    gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= float(sigma) <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (gamma + 1)
    x = x + randn_like(x, generator) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler steps of the probability-flow ODE, with optional churn (Karras et al. 2022, Algorithm 2
    without the Heun correction). One network evaluation per step."""
    sigmas = sigmas.to(x.device)
    n = len(sigmas) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sigmas[i], n, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
        report(callback, i, n, float(sigmas[i]), x, denoised)
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 2): an Euler predictor, then the
    trapezoid rule with the derivative at the predicted point. The last step to sigma = 0 is plain
    Euler (the derivative there is undefined). Two evaluations per step, one for the last."""
    sigmas = sigmas.to(x.device)
    n = len(sigmas) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sigmas[i], n, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if float(sigmas[i + 1]) == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], denoiser(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
        report(callback, i, n, float(sigmas[i]), x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver-2 style midpoint steps (Lu et al. 2022, "DPM-Solver", Algorithm 1 with r = 1/2) in
    sigma, with the churn of Karras et al. 2022: the derivative is taken at the geometric mean of the
    two noise levels. The last step to sigma = 0 is plain Euler."""
    sigmas = sigmas.to(x.device)
    n = len(sigmas) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sigmas[i], n, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        if float(sigmas[i + 1]) == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid))
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
        report(callback, i, n, float(sigmas[i]), x, denoised)
    return x


def lms_coefficient(sigmas: list[float], order: int, i: int, j: int) -> float:
    """Weight of the derivative j steps back in the order-``order`` linear multistep step i -> i+1:
    the integral over [sigma_i, sigma_{i+1}] of its Lagrange basis polynomial through the last
    ``order`` sigmas. The polynomial has degree order - 1, so Gauss-Legendre with ``order`` nodes is
    exact (k-diffusion and diffusers integrate numerically with scipy's quad to the same value)."""
    nodes, weights = np.polynomial.legendre.leggauss(max(order, 1))
    a, b = sigmas[i], sigmas[i + 1]
    tau = (b - a) / 2 * nodes + (b + a) / 2
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float((b - a) / 2 * np.dot(weights, basis))


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth in sigma, with variable step sizes) of order up to ``order``
    over the previous derivatives (Karras et al. 2022 / k-diffusion ``sample_lms``; diffusers
    ``LMSDiscreteScheduler``). One evaluation per step. ``generator`` is unused."""
    sigmas = sigmas.to(x.device)
    sigmas_list = sigmas.double().tolist()  # the coefficients are computed in float64 like the references
    n = len(sigmas) - 1
    ds: list[torch.Tensor] = []
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(sigmas_list, cur_order, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        report(callback, i, n, sigmas_list[i], x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): the second-order multistep
    solver in data prediction, in the log-SNR time lambda = -log sigma. The first step and the last
    (to sigma = 0) are first order, as diffusers' defaults (``lower_order_final``,
    ``final_sigmas_type="zero"``). ``generator`` is unused."""
    sigmas = sigmas.to(x.device)
    n = len(sigmas) - 1
    old_denoised: torch.Tensor | None = None
    h_last: torch.Tensor | None = None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        # t = -log(sigma); at sigma_next = 0, h = inf and the step lands on denoised
        h = sigma.log() - sigma_next.log()
        if old_denoised is None or float(sigma_next) == 0:
            x = (sigma_next / sigma) * x - (-h).expm1() * denoised
        else:
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - (-h).expm1() * denoised_d
        old_denoised, h_last = denoised, h
        report(callback, i, n, float(sigma), x, denoised)
    return x


SAMPLERS: dict[str, SamplerInfo] = {
    "euler": SamplerInfo(sample_euler, "Euler", _CHURN_KNOBS),
    "heun": SamplerInfo(sample_heun, "Heun", _CHURN_KNOBS),
    "dpm2": SamplerInfo(
        sample_dpm_2, "DPM2", _CHURN_KNOBS, default_schedule="karras", discard_next_to_last_sigma=True
    ),
    "lms": SamplerInfo(sample_lms, "LMS", ("order",)),
    # diffusers' DPMSolverMultistepScheduler starts from unit-variance VP noise (init_noise_sigma = 1)
    "dpmpp_2m": SamplerInfo(sample_dpmpp_2m, "DPM++ 2M", vp_init=True, default_schedule="karras"),
}
