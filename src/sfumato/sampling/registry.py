"""The sampler and schedule registries: names (ours and AUTOMATIC1111's labels) -> functions.

Every sampler is a pure function ``sample_x(denoiser, x, sigmas, *, generator=None, callback=None,
**knobs) -> Tensor`` (k-diffusion style): ``denoiser(x, sigma) -> x0`` with ``sigma`` a 0-d tensor, ``x``
in the variance-exploding scale (x = x0 + sigma * eps), randomness only from ``generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports to ``callback`` after each step."""

    i: int  # step index, 0-based
    total: int  # number of steps
    sigma: float  # noise level the step started from
    x: torch.Tensor  # the sample after the step
    denoised: torch.Tensor  # the x0 prediction of the step


@dataclass(frozen=True)
class SamplerInfo:
    """A sampler and what the spine needs to know to drive it."""

    fn: Callable[..., torch.Tensor]
    label: str  # AUTOMATIC1111's name, e.g. "DPM++ 2M"
    knobs: tuple[str, ...] = ()  # keyword knobs it accepts: "eta", "s_churn", "s_tmin", "s_tmax", "s_noise", "discrete"
    stochastic: bool = False  # draws noise from the generator while sampling
    vp_init: bool = False  # reference starts from unit-variance VP noise: x_T = noise * sqrt(sigmas[0]**2 + 1)
    final_sigma: str = "zero"  # "zero", or "min": the schedule ends at the training sigma_min (diffusers DDIM/PNDM)
    default_schedule: str = "normal"
    # AUTOMATIC1111 builds the schedule for steps + 1 and drops its next-to-last sigma (DPM2, DPM2 a,
    # DPM++ 3M SDE), so that the last step goes straight from a higher sigma to 0
    discard_next_to_last_sigma: bool = False


Callback = Callable[[StepInfo], None]


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Unit normal noise shaped like x, drawn on the generator's device (a CPU generator gives the same
    numbers on every machine, as diffusers' ``randn_tensor``), then moved to x's device."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma (Karras et al. 2022, eq. 3 with sigma(t) = t)."""
    return (x - denoised) / sigma


def report(callback: Callback | None, i: int, total: int, sigma: float | torch.Tensor, x: torch.Tensor,
           denoised: torch.Tensor) -> None:
    """Tell ``callback`` about step ``i``. The callback may edit ``x`` in place (inpainting blends the known
    region back this way); samplers continue from that same tensor."""
    if callback is not None:
        callback(StepInfo(i=i, total=total, sigma=float(sigma), x=x, denoised=denoised))
