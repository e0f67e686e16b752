"""The variance-preserving samplers of diffusers, rewritten as pure functions over k-diffusion sigmas.

DDIM (Song et al. 2020), PLMS (Liu et al. 2022, PNDM), UniPC (Zhao et al. 2023) and the LCM sampler
(Luo et al. 2023) are usually written over DDPM timesteps on the VP latent ``x_vp``. Here, as in
k-diffusion, the state is the variance-exploding ``x = x_vp / alpha`` and the schedule a list of sigmas;
the VP quantities are derived where a formula needs them:

    alpha = 1 / sqrt(1 + sigma^2),   sigma_vp = sigma * alpha,   lambda = log(alpha / sigma_vp) = -log(sigma)

Each sampler reproduces diffusers' scheduler step by step (``DDIMScheduler``, ``PNDMScheduler(
skip_prk_steps=True)``, ``UniPCMultistepScheduler``, ``LCMScheduler``; diffusers 0.42) when handed
the sigmas of the timesteps that scheduler visits (``tests/test_multistep.py`` checks it). How the
spine matches diffusers' ends of the chain (``SamplerInfo``):

- start: all four schedulers have ``init_noise_sigma = 1``, i.e. x_vp = noise, so ``vp_init=True``
  (x = noise * sqrt(1 + sigmas[0]^2)).
- end: DDIM and PNDM with ``set_alpha_to_one=False`` (Stable Diffusion's config) step last to
  ``alphas_cumprod[0]``, not to 1: their sigmas end at the training sigma_min (``final_sigma="min"``)
  and the spine hands ``x / sqrt(1 + sigma_min^2)`` to the VAE, exactly diffusers' final latent.
  UniPC (``final_sigmas_type="zero"``) and LCM (its last step returns the denoised sample) end at 0.
"""

from __future__ import annotations

import math

import torch

from sfumato.errors import InvalidParameterError
from sfumato.sampling.denoisers import Denoiser
from sfumato.sampling.registry import Callback, SamplerInfo, StepInfo, randn_like
from sfumato.sampling.schedules import DiscreteSchedule

__all__ = ["sample_ddim", "sample_plms", "sample_unipc", "sample_lcm", "lcm_sigmas", "SAMPLERS"]




def _alpha(sigma: float) -> float:
    """sqrt(alphas_cumprod) of a noise level: the VP scale of the signal."""
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


# --- DDIM ----------------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM: Song, Meng and Ermon 2020, "Denoising Diffusion Implicit Models", eq. 12.

    With ``eta = 0`` a DDIM step is the Euler step in this space, x' = x0 + sigma' * eps. With
    ``eta > 0`` it moves to sigma_down and adds fresh noise of size sigma_up, where
    ``sigma_up = eta * sigma' * sqrt(sigma^2 - sigma'^2) / sigma`` is diffusers' ``DDIMScheduler``
    std ``eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))`` divided by sqrt(a'), and
    ``sigma_down = sqrt(sigma'^2 - sigma_up^2)``. Like diffusers, one noise tensor is drawn per step
    (the last included) whenever ``eta > 0``.
    """
    s = sigmas.to(x.device)
    levels = s.tolist()
    n = len(levels) - 1
    for i in range(n):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = denoiser(x, s[i])
        eps = (x - denoised) / sigma
        if eta > 0:
            sigma_up = eta * sigma_next * math.sqrt(max(sigma**2 - sigma_next**2, 0.0)) / sigma
            sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
            x = denoised + sigma_down * eps + sigma_up * randn_like(x, generator)
        else:
            x = denoised + sigma_next * eps
        if callback is not None:
            callback(StepInfo(i, n, sigma, x, denoised))
    return x


# --- PLMS (PNDM with skip_prk_steps) -------------------------------------------------------------


def _model_output(x: torch.Tensor, denoised: torch.Tensor, sigma: float, prediction: str) -> torch.Tensor:
    """The network's own output (eps or v) at (x, sigma), recovered from the x0 prediction."""
    eps = (x - denoised) / sigma
    if prediction == "eps":
        return eps
    return _alpha(sigma) * (eps - sigma * denoised)  # v = alpha * eps - sigma_vp * x0


def _plms_step(
    x: torch.Tensor, sigma: float, sigma_next: float, output: torch.Tensor, prediction: str
) -> torch.Tensor:
    """PNDM's transfer (Liu et al. eq. 9) = a DDIM step with a combined eps.

    diffusers combines the raw model outputs and turns the combination into eps at the step's start
    point (x, sigma); for v models that is not the same as combining eps, so it is done the same way.
    """
    if prediction == "v":
        alpha = _alpha(sigma)
        output = alpha * (output + sigma * alpha * x)  # eps = alpha * v + sigma_vp * x_vp
    return x + (sigma_next - sigma) * output


@torch.no_grad()
def sample_plms(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    prediction: str = "eps",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """PLMS: Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds" (PNDM).

    Reproduces diffusers' ``PNDMScheduler(skip_prk_steps=True)`` (and the LDM/AUTOMATIC1111
    ``PLMSSampler``): pseudo linear multistep (Adams-Bashforth up to 4th order) on eps, warmed up by
    one pseudo improved Euler (Heun) step. diffusers' odd timestep list ``[t0, t1, t1, t2, ...]`` for
    n steps is exactly that warm-up: the repeated t1 is the Heun correction's evaluation, so these
    sigmas are those of the n distinct timesteps (n + 1 model calls, n == 1 is a single Euler step).
    The Heun evaluation is not kept in the history, as in diffusers.

    ``prediction`` ("eps" or "v", the model's) only matters for v models: diffusers averages the raw
    v outputs and converts at the step's start point, which this reproduces; LDM's sampler averages
    eps instead, which is ``prediction="eps"`` for any model.

    Starting mid-schedule (img2img on ``sigmas[t_start:]``) warms up afresh from the first sigma. That
    is the clean semantics, not diffusers' ``StableDiffusionImg2ImgPipeline`` with PNDM, which slices
    the repeated-timestep list as if it had one entry per step (``PNDMScheduler.order == 1``), so its
    tail lacks the repeat and the sample is relabelled one level lower after the warm-up step.
    """
    if prediction not in ("eps", "v"):
        raise InvalidParameterError(f"prediction {prediction!r} is not 'eps' or 'v'")
    s = sigmas.to(x.device)
    levels = s.tolist()
    n = len(levels) - 1
    outputs: list[torch.Tensor] = []  # model outputs at the step starts, newest last (diffusers' ets)
    for i in range(n):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = denoiser(x, s[i])
        out = _model_output(x, denoised, sigma, prediction)
        outputs = [*outputs[-3:], out]
        if i == 0 and n > 1:
            x_euler = _plms_step(x, sigma, sigma_next, out, prediction)
            out_next = _model_output(x_euler, denoiser(x_euler, s[i + 1]), sigma_next, prediction)
            combined = (out_next + out) / 2
        elif len(outputs) == 1:
            combined = out
        elif len(outputs) == 2:
            combined = (3 * outputs[-1] - outputs[-2]) / 2
        elif len(outputs) == 3:
            combined = (23 * outputs[-1] - 16 * outputs[-2] + 5 * outputs[-3]) / 12
        else:
            combined = (55 * outputs[-1] - 59 * outputs[-2] + 37 * outputs[-3] - 9 * outputs[-4]) / 24
        x = _plms_step(x, sigma, sigma_next, combined, prediction)
        if callback is not None:
            callback(StepInfo(i, n, sigma, x, denoised))
    return x


# --- UniPC ---------------------------------------------------------------------------------------


def _unipc_update(
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    denoised: torch.Tensor,
    history: list[tuple[float, torch.Tensor]],
    order: int,
    variant: str,
    denoised_next: torch.Tensor | None = None,
) -> torch.Tensor:
    """One UniP (predictor) or, given ``denoised_next``, UniC (corrector) step with B(h), data prediction.

    Zhao et al. 2023 (UniP-p and UniC-p, section 3), in the form of diffusers'
    ``multistep_uni_p_bh_update`` / ``multistep_uni_c_bh_update``, divided by alpha_next to live in
    this space. ``history`` holds the
    ``order - 1`` earlier (sigma, x0) pairs, newest first.
    """
    h = math.log(sigma) - math.log(sigma_next)  # lambda_next - lambda
    hh = -h  # predict_x0
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks = [(math.log(sigma) - math.log(s_k)) / h for s_k, _ in history] + [1.0]
    d1s = [(m_k - denoised) / rk for (_, m_k), rk in zip(history, rks)]
    r_mat, b = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        r_mat.append([rk ** (k - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r_t, b_t = torch.tensor(r_mat, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x_next = (sigma_next / sigma) * x - h_phi_1 * denoised
    if denoised_next is None:
        if not d1s:
            return x_next
        # diffusers (and the paper's code) take rho = 1/2 at order 2 rather than solving
        rhos = [0.5] if order == 2 else torch.linalg.solve(r_t[:-1, :-1], b_t[:-1]).tolist()
        return x_next - b_h * sum(rho * d1 for rho, d1 in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else torch.linalg.solve(r_t, b_t).tolist()
    correction = rhos[-1] * (denoised_next - denoised)
    for rho, d1 in zip(rhos[:-1], d1s):
        correction = correction + rho * d1
    return x_next - b_h * correction


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """UniPC: Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling".

    Multistep UniP predictor with the UniC corrector applied after each model evaluation, on x0
    predictions, as diffusers' ``UniPCMultistepScheduler`` defaults (``solver_order=2``,
    ``solver_type="bh2"``, ``predict_x0=True``, ``lower_order_final=True``, no ``solver_p``,
    ``final_sigmas_type="zero"``): the order warms up from 1 and drops towards the end; the corrector
    reuses the step's model evaluation, so there is one per step. A step to sigma 0 returns x0 (the
    h -> infinity limit; diffusers gets the same at order 1). Starting mid-schedule starts with an
    empty history, as diffusers' img2img does after ``set_begin_index``.

    diffusers' UniPC spaces "leading" and "linspace" timesteps over n + 1 points (then drops t = 0),
    unlike the spine's schedules of those names; its exact run needs its own sigmas.
    """
    if variant not in ("bh1", "bh2"):
        raise InvalidParameterError(f"UniPC variant {variant!r} is not 'bh1' or 'bh2'")
    s = sigmas.to(x.device)
    levels = s.tolist()
    n = len(levels) - 1
    history: list[tuple[float, torch.Tensor]] = []  # (sigma, x0) of earlier evaluations, newest first
    x_last, order_last = x, 1
    for i in range(n):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = denoiser(x, s[i])
        if i > 0:
            prev_sigma, prev_denoised = history[0]
            x = _unipc_update(
                x_last, prev_sigma, sigma, prev_denoised, history[1:order_last], order_last, variant, denoised
            )
        history = [(sigma, denoised), *history[: order - 1]]
        this_order = min(order, n - i, i + 1) if lower_order_final else min(order, i + 1)
        x_last, order_last = x, this_order
        if sigma_next == 0:
            x = denoised
        else:
            x = _unipc_update(x, sigma, sigma_next, denoised, history[1:this_order], this_order, variant)
        if callback is not None:
            callback(StepInfo(i, n, sigma, x, denoised))
    return x


# --- LCM -----------------------------------------------------------------------------------------


def lcm_sigmas(
    steps: int, discrete: DiscreteSchedule, original_steps: int = 50, strength: float = 1.0
) -> torch.Tensor:
    """The sigmas of diffusers' ``LCMScheduler.set_timesteps`` timesteps, then 0.

    LCM's skipping-step schedule: the distillation grid t = k * T / original_steps - 1 (k = 1 ..
    original_steps * strength), descending, sampled at ``floor(linspace(0, len, steps))``. With
    ``strength < 1`` it is the img2img schedule of ``LatentConsistencyModelImg2ImgPipeline``.
    """
    k = discrete.num_timesteps // original_steps
    grid = torch.arange(int(original_steps * strength), 0, -1, dtype=torch.int64) * k - 1  # descending
    if steps < 1 or steps > min(len(grid), original_steps):
        raise InvalidParameterError(
            f"LCM steps {steps} must be between 1 and {min(len(grid), original_steps)} "
            f"(original_steps {original_steps} x strength {strength})"
        )
    index = torch.floor(torch.arange(steps, dtype=torch.float64) * (len(grid) / steps)).long()
    return torch.cat([discrete.sigmas[grid[index]], discrete.sigmas.new_zeros(1)])


@torch.no_grad()
def sample_lcm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    discrete: DiscreteSchedule,
    timestep_scaling: float = 10.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Latent Consistency Model sampling: Luo et al. 2023, "Latent Consistency Models", Algorithm 1.

    As diffusers' ``LCMScheduler`` runs an ordinary (LCM-LoRA or distilled) eps/v model: the
    consistency function f(x, t) = c_skip(t) * x_vp + c_out(t) * x0 with the boundary scalings of
    ``get_scalings_for_boundary_condition_discrete`` (sigma_data 0.5, t scaled by
    ``timestep_scaling``), then fresh noise to the next level, x' = f + sigma' * noise; the last
    step returns f without noise. t comes from ``discrete.sigma_to_t`` (exact on ``lcm_sigmas``).
    """
    s = sigmas.to(x.device)
    levels = s.tolist()
    n = len(levels) - 1
    t = discrete.sigma_to_t(sigmas[:-1].detach().to("cpu", torch.float64)).tolist()  # the last may be 0
    sigma_data = 0.5
    for i in range(n):
        sigma, sigma_next = levels[i], levels[i + 1]
        scaled_t = t[i] * timestep_scaling
        c_skip = sigma_data**2 / (scaled_t**2 + sigma_data**2)
        c_out = scaled_t / math.sqrt(scaled_t**2 + sigma_data**2)
        denoised = c_out * denoiser(x, s[i]) + c_skip * _alpha(sigma) * x
        x = denoised if i == n - 1 else denoised + sigma_next * randn_like(x, generator)
        if callback is not None:
            callback(StepInfo(i, n, sigma, x, denoised))
    return x


# AUTOMATIC1111 runs DDIM and PLMS on the same "leading" timesteps as diffusers (ddim_discretize
# "uniform": every T // n-th timestep + 1); UniPC from a Stable Diffusion config too.
SAMPLERS: dict[str, SamplerInfo] = {
    "ddim": SamplerInfo(
        sample_ddim, "DDIM", knobs=("eta",), vp_init=True, final_sigma="min", default_schedule="leading"
    ),
    "plms": SamplerInfo(
        sample_plms,
        "PLMS",
        knobs=("prediction",),
        vp_init=True,
        final_sigma="min",
        default_schedule="leading",
    ),
    "unipc": SamplerInfo(sample_unipc, "UniPC", vp_init=True, final_sigma="zero", default_schedule="leading"),
    "lcm": SamplerInfo(
        sample_lcm,
        "LCM",
        knobs=("discrete",),
        stochastic=True,
        vp_init=True,
        final_sigma="zero",
        default_schedule="lcm",
    ),
}
