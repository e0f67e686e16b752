"""Noise schedules: the DDPM training schedule as sigmas, and the step sigmas a sampler walks.

``DiscreteSchedule`` is the trained model's view of noise (k-diffusion ``external.DiscreteSchedule``):
T = 1000 training timesteps t, each with ``alphas_cumprod[t]`` and ``sigma(t) = sqrt((1 - a) / a)``.

Every entry of ``SCHEDULES`` is ``fn(steps, discrete, *, final="zero", **kw) -> Tensor``: ``steps + 1``
float32 sigmas from high to low; the last is 0, or the training ``sigma_min`` when ``final == "min"``
(diffusers' DDIM/PNDM end there: their last "previous" alpha is ``alphas_cumprod[0]``).

=============  ==============================  ===================================================
ours           AUTOMATIC1111 label             reference
=============  ==============================  ===================================================
normal         "Uniform", "Normal"             k-diffusion ``DiscreteSchedule.get_sigmas``: t evenly from
                                               T-1 to 0, sigma log-interpolated. diffusers has no
                                               equal: "linspace" takes the same t but interpolates
                                               sigma linearly (it differs between integer t).
karras         "Karras"                        Karras et al. 2022 eq. 5, rho = 7, between the model's
                                               sigma_min/max (k-diffusion ``get_sigmas_karras``);
                                               diffusers ``use_karras_sigmas=True`` equals it with
                                               ``timestep_spacing="linspace"`` (with "leading" it takes
                                               sigma_max from t = T - T/n + 1 instead).
exponential    "Exponential", "Polyexponential" sigma evenly in log (``get_sigmas_exponential``;
                                               diffusers ``use_exponential_sigmas``, same caveat); A1111's
                                               Polyexponential default (rho = 1) is the same schedule.
sgm_uniform    "SGM Uniform"                   t evenly over n + 1 points, last dropped (sgm discretization)
simple         "Simple"                        every T/n-th table sigma from the top (ComfyUI, A1111)
beta           "Beta"                          Lee et al. 2024, "Beta Sampling is All You Need": sigma
                                               at the Beta(0.6, 0.6) quantiles between sigma_min and
                                               sigma_max (A1111; diffusers ``use_beta_sigmas``; ComfyUI
                                               instead quantizes the quantiles to table timesteps)
kl_optimal     "KL Optimal"                    Sabour et al. 2024 (AYS paper, Thm. 3.1): evenly in
                                               arctan(sigma)
ays            "Align Your Steps"              Sabour et al. 2024: NVIDIA's 10-step timesteps
                                               (``ModelSpec.ays_timesteps``), log-sigma interpolated
                                               to n + 1 points; the last is replaced by 0 as ComfyUI
                                               does (A1111 interpolates to n points and appends 0)
leading        "DDIM" (closest)                diffusers ``timestep_spacing="leading"``, steps_offset=1
linspace       -                               diffusers ``timestep_spacing="linspace"``
trailing       -                               diffusers ``timestep_spacing="trailing"`` (Lin et al. 2023)
=============  ==============================  ===================================================

``leading``/``linspace``/``trailing`` reproduce ``EulerDiscreteScheduler`` sigmas exactly (the same
numpy arithmetic). diffusers' multistep schedulers (DPMSolver, UniPC) space "leading" and "linspace"
over n + 1 points instead, and DDIM rounds "linspace"; their samplers map sigmas back to timesteps.
A1111's "DDIM" schedule (t = 1, 1 + T//n, ...) can have one step more than asked (e.g. 31 for 30);
"leading" is the same timesteps cut to exactly n steps. "Automatic" picks the sampler's default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sfumato.config import NoiseScheduleConfig
from sfumato.errors import InvalidParameterError

__all__ = [
    "DiscreteSchedule",
    "discrete_schedule",
    "SCHEDULES",
    "SCHEDULE_LABELS",
    "FINALS",
    "beta_ppf",
]

FINALS = ("zero", "min")


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """The training noise levels of a discrete-time (DDPM) model, and the map sigma <-> timestep.

    ``alphas_cumprod`` holds diffusers' float32 values widened to float64 (exact), so VP samplers
    (DDIM, PLMS, UniPC, LCM) reproduce diffusers' arithmetic; ``sigmas`` is float32 ascending like
    diffusers' and k-diffusion's tables. ``sigma_to_t`` interpolates linearly in log sigma, as
    k-diffusion and diffusers' ``_sigma_to_t`` do, so ``sigma_to_t(sigmas[k]) == k`` exactly.
    """

    alphas_cumprod: torch.Tensor  # (T,) float64
    sigmas: torch.Tensor  # (T,) float32, ascending in t
    log_sigmas: torch.Tensor  # (T,) float64 logs of the float32 sigmas

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.shape[0]

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of each sigma (k-diffusion ``DiscreteSchedule.sigma_to_t``).

        Computed on the CPU in float64 (MPS has no float64; sigma is a handful of numbers) and
        returned on sigma's device and dtype. Outside the table the result is clamped to [0, T-1].
        """
        s = sigma.detach().to("cpu", torch.float64)
        log_sigma = s.log().reshape(-1)
        # the last table entry <= log_sigma (k-diffusion's cumsum/argmax, as a binary search)
        low_idx = torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1
        low_idx = low_idx.clamp(min=0, max=self.num_timesteps - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        dtype = sigma.dtype if sigma.is_floating_point() else torch.float32
        return t.reshape(sigma.shape).to(sigma.device, dtype)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma of a (fractional) timestep: log-linear interpolation in the table (k-diffusion)."""
        tt = t.detach().to("cpu", torch.float64).clamp(0, self.num_timesteps - 1)
        low_idx, high_idx, w = tt.floor().long(), tt.ceil().long(), tt.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        dtype = t.dtype if t.is_floating_point() else torch.float32
        return log_sigma.exp().to(t.device, dtype)


def discrete_schedule(cfg: NoiseScheduleConfig) -> DiscreteSchedule:
    """Build the training schedule exactly as diffusers does (float32 betas and cumprod)."""
    n = cfg.num_timesteps
    if cfg.beta_schedule == "scaled_linear":
        # LDM's schedule: linear in sqrt(beta)
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021's cosine schedule (LDM's "cosine", s = 0.008, betas capped at 0.999): the
        # unCLIP image-embedding noise augmentation's; computed in float64 as diffusers does, then float32
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    else:
        raise InvalidParameterError(
            f"beta_schedule {cfg.beta_schedule!r} is not supported; use 'scaled_linear', 'linear' or "
            "'squaredcos_cap_v2'"
        )
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float32, as diffusers
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return DiscreteSchedule(
        alphas_cumprod=alphas_cumprod.double(), sigmas=sigmas, log_sigmas=sigmas.double().log()
    )


# --- schedules -----------------------------------------------------------------------------------


def _finish(
    sigmas: torch.Tensor | np.ndarray | Sequence[float], discrete: DiscreteSchedule, final: str
) -> torch.Tensor:
    """Append the final noise level (0, or the training sigma_min) and return float32 like the references."""
    if final not in FINALS:
        raise InvalidParameterError(f"final sigma {final!r} is not one of {', '.join(FINALS)}")
    last = 0.0 if final == "zero" else discrete.sigma_min
    if isinstance(sigmas, torch.Tensor):
        s = sigmas.detach().to("cpu", torch.float64)
    else:
        s = torch.from_numpy(np.array(sigmas, dtype=np.float64))  # a copy: no negative strides
    return torch.cat([s, s.new_tensor([last])]).float()


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidParameterError(f"steps must be a positive integer, got {steps!r}")


def get_sigmas_normal(steps: int, discrete: DiscreteSchedule, *, final: str = "zero") -> torch.Tensor:
    """k-diffusion ``DiscreteSchedule.get_sigmas``: t evenly from T-1 down to 0, sigma log-interpolated."""
    _check_steps(steps)
    t = torch.linspace(discrete.num_timesteps - 1, 0, steps, dtype=torch.float64)
    return _finish(discrete.t_to_sigma(t), discrete, final)


def get_sigmas_sgm_uniform(steps: int, discrete: DiscreteSchedule, *, final: str = "zero") -> torch.Tensor:
    """sgm's uniform discretization: t evenly over steps + 1 points from T-1 to 0, the last dropped."""
    _check_steps(steps)
    t = torch.linspace(discrete.num_timesteps - 1, 0, steps + 1, dtype=torch.float64)[:-1]
    return _finish(discrete.t_to_sigma(t), discrete, final)


def get_sigmas_karras(
    steps: int, discrete: DiscreteSchedule, *, final: str = "zero", rho: float = 7.0
) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: evenly spaced in sigma^(1/rho) between the model's sigma_max and sigma_min."""
    _check_steps(steps)
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = discrete.sigma_min ** (1 / rho), discrete.sigma_max ** (1 / rho)
    return _finish((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho, discrete, final)


def get_sigmas_exponential(steps: int, discrete: DiscreteSchedule, *, final: str = "zero") -> torch.Tensor:
    """Evenly spaced in log sigma between the model's sigma_max and sigma_min (k-diffusion)."""
    _check_steps(steps)
    log_sigmas = np.linspace(math.log(discrete.sigma_max), math.log(discrete.sigma_min), steps)
    return _finish(np.exp(log_sigmas), discrete, final)


def get_sigmas_simple(steps: int, discrete: DiscreteSchedule, *, final: str = "zero") -> torch.Tensor:
    """Every (T/steps)-th sigma of the training table from the top (ComfyUI/A1111 "simple")."""
    _check_steps(steps)
    stride = discrete.num_timesteps / steps
    idx = [discrete.num_timesteps - 1 - int(k * stride) for k in range(steps)]
    return _finish(discrete.sigmas.double()[idx], discrete, final)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) by its continued fraction (modified Lentz;
    Press et al., Numerical Recipes, 6.4), using the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the
    fraction converges slowly."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * f / a


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of the Beta(a, b) distribution (scipy's ``stats.beta.ppf``), by bisection on the
    monotone CDF to float64 resolution; runtime code does not depend on scipy."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def get_sigmas_beta(
    steps: int, discrete: DiscreteSchedule, *, final: str = "zero", alpha: float = 0.6, beta: float = 0.6
) -> torch.Tensor:
    """Lee et al. 2024, "Beta Sampling is All You Need": sigma_min + (sigma_max - sigma_min) * q for the
    Beta(alpha, beta) quantiles q of 1 - linspace(0, 1, steps) (A1111 and diffusers' ``use_beta_sigmas``)."""
    _check_steps(steps)
    qs = [beta_ppf(float(u), alpha, beta) for u in 1 - np.linspace(0, 1, steps)]
    lo, hi = discrete.sigma_min, discrete.sigma_max
    return _finish([lo + q * (hi - lo) for q in qs], discrete, final)


def get_sigmas_kl_optimal(steps: int, discrete: DiscreteSchedule, *, final: str = "zero") -> torch.Tensor:
    """Evenly spaced in arctan(sigma) from sigma_max to sigma_min (the "KL optimal" schedule of
    A1111 PR #15608 / ComfyUI)."""
    _check_steps(steps)
    w = np.linspace(0, 1, steps)
    angles = w * math.atan(discrete.sigma_min) + (1 - w) * math.atan(discrete.sigma_max)
    return _finish(np.tan(angles), discrete, final)


def get_sigmas_ays(
    steps: int,
    discrete: DiscreteSchedule,
    *,
    final: str = "zero",
    ays_timesteps: Sequence[int] = (999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0),
) -> torch.Tensor:
    """Align Your Steps (Sabour et al. 2024): the model's optimized 10-step schedule, given as training
    timesteps (``ModelSpec.ays_timesteps``), log-linearly interpolated to steps + 1 noise levels
    (NVIDIA's ``loglinear_interp``). It ends at sigma_min; with ``final="zero"`` that last level is
    replaced by 0, as ComfyUI does, so 10 steps walk NVIDIA's table exactly."""
    _check_steps(steps)
    table = discrete.sigmas.double()[list(ays_timesteps)].numpy()  # high -> low
    xs = np.linspace(0, 1, len(table))
    ys = np.log(table[::-1])
    sigmas = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, ys))[::-1]
    return _finish(sigmas[:-1], discrete, final)


def _diffusers_sigmas(timesteps: np.ndarray, discrete: DiscreteSchedule) -> np.ndarray:
    """diffusers' ``np.interp`` of the float32 sigma table at (float32) timesteps: linear in sigma."""
    table = discrete.sigmas.numpy()
    return np.interp(timesteps, np.arange(0, len(table)), table)


def get_sigmas_leading(
    steps: int, discrete: DiscreteSchedule, *, final: str = "zero", steps_offset: int = 1
) -> torch.Tensor:
    """diffusers ``timestep_spacing="leading"`` (the SD configs' default, with ``steps_offset=1``):
    t = k * (T // n) + offset, as ``EulerDiscreteScheduler.set_timesteps`` computes it."""
    _check_steps(steps)
    ratio = discrete.num_timesteps // steps
    timesteps = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.float32)
    timesteps += steps_offset
    return _finish(_diffusers_sigmas(timesteps, discrete), discrete, final)


def get_sigmas_linspace(steps: int, discrete: DiscreteSchedule, *, final: str = "zero") -> torch.Tensor:
    """diffusers ``timestep_spacing="linspace"``: t evenly from T-1 to 0, sigma linearly interpolated."""
    _check_steps(steps)
    timesteps = np.linspace(0, discrete.num_timesteps - 1, steps, dtype=np.float32)[::-1].copy()
    return _finish(_diffusers_sigmas(timesteps, discrete), discrete, final)


def get_sigmas_trailing(steps: int, discrete: DiscreteSchedule, *, final: str = "zero") -> torch.Tensor:
    """diffusers ``timestep_spacing="trailing"`` (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Table 2): t = T - k * T/n - 1, starting at T - 1."""
    _check_steps(steps)
    ratio = discrete.num_timesteps / steps
    timesteps = np.arange(discrete.num_timesteps, 0, -ratio).round().copy().astype(np.float32) - 1
    return _finish(_diffusers_sigmas(timesteps, discrete), discrete, final)


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "normal": get_sigmas_normal,
    "karras": get_sigmas_karras,
    "exponential": get_sigmas_exponential,
    "sgm_uniform": get_sigmas_sgm_uniform,
    "simple": get_sigmas_simple,
    "beta": get_sigmas_beta,
    "kl_optimal": get_sigmas_kl_optimal,
    "ays": get_sigmas_ays,
    "leading": get_sigmas_leading,
    "linspace": get_sigmas_linspace,
    "trailing": get_sigmas_trailing,
}

# AUTOMATIC1111's labels and scheduler names (compared lower-case) -> ours; "automatic" is resolved
# per sampler by ``sfumato.sampling.resolve_sampler``.
SCHEDULE_LABELS: dict[str, str] = {
    "uniform": "normal",
    "normal": "normal",
    "karras": "karras",
    "exponential": "exponential",
    "polyexponential": "exponential",
    "sgm uniform": "sgm_uniform",
    "sgmuniform": "sgm_uniform",
    "simple": "simple",
    "beta": "beta",
    "kl optimal": "kl_optimal",
    "align your steps": "ays",
    "align_your_steps": "ays",
    "ddim": "leading",
    "ddim_uniform": "leading",
}


def split_for_experts(sigmas: torch.Tensor, discrete: DiscreteSchedule, *, start: float | None = None,
                      end: float | None = None) -> torch.Tensor:
    """The part of a ``steps + 1`` sigma schedule one expert of an ensemble runs (SDXL base -> refiner).

    diffusers' ``denoising_end`` / ``denoising_start``: with ``T`` training timesteps, the cutoff is
    ``round(T - fraction * T)``; ``end`` keeps the steps whose timestep is ``>= cutoff`` (the base's high
    noise), ``start`` the steps below it (the refiner's). The timestep of a step is its first sigma's, as
    ``sigma_to_t`` maps it. The kept sigmas include the one the last kept step ends at, so the base hands
    over its latents at exactly the sigma the refiner starts from.
    """
    n_train = discrete.num_timesteps
    t = discrete.sigma_to_t(sigmas[:-1].double())
    out = sigmas
    if start is not None:
        cutoff = int(round(n_train - start * n_train))
        below = int((t < cutoff).sum())
        if below == 0:
            raise InvalidParameterError(f"denoising_start={start} leaves no step of {len(sigmas) - 1} "
                                        f"(every timestep is at or above {cutoff}); use a smaller value")
        out = sigmas[len(sigmas) - 1 - below:]
    if end is not None:
        cutoff = int(round(n_train - end * n_train))
        t_out = discrete.sigma_to_t(out[:-1].double())
        above = int((t_out >= cutoff).sum())
        if above == 0:
            raise InvalidParameterError(f"denoising_end={end} leaves no step of {len(out) - 1} "
                                        f"(every timestep is below {cutoff}); use a larger value")
        out = out[:above + 1]
    return out
