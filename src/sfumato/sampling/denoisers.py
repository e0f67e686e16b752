"""Preconditioning: a discrete-time eps- or v-prediction network as a denoiser D(x, sigma) -> x0.

Follows k-diffusion ``external.py`` (``DiscreteEpsDDPMDenoiser``, ``DiscreteVDDPMDenoiser``) and the
preconditioning table of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models" (EDM), with sigma_data = 1:

    x_in = c_in * x,   c_in = 1 / sqrt(sigma^2 + 1)          (the VP-scaled latent the net was trained on)
    eps:  D = x - sigma * F(x_in, t)
    v:    D = c_skip * x + c_out * F(x_in, t),  c_skip = 1 / (sigma^2 + 1),  c_out = -sigma / sqrt(sigma^2 + 1)

with t = sigma_to_t(sigma), the fractional training timestep. The scalings are computed in at least
float32 whatever dtype the network runs in, so fp16 networks do not round the sampler's state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sfumato.errors import InvalidParameterError
from sfumato.sampling.schedules import DiscreteSchedule

__all__ = ["Denoiser", "make_denoiser", "PREDICTIONS"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PREDICTIONS = ("eps", "v")


def make_denoiser(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    discrete: DiscreteSchedule,
    prediction: str,
    *,
    dtype: torch.dtype | None = None,
) -> Denoiser:
    """Wrap ``model(x_in, t) -> eps | v`` (the network closed over its conditioning) as D(x, sigma) -> x0.

    ``model`` receives ``x_in`` (B, C, H, W) in ``dtype`` (default: x's compute dtype) and ``t`` of
    shape (B,) in float32; ``sigma`` may be 0-d or (B,). The result has x's dtype.
    """
    if prediction not in PREDICTIONS:
        raise InvalidParameterError(f"prediction {prediction!r} is not one of {', '.join(PREDICTIONS)}")

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device)
        t = discrete.sigma_to_t(sigma).float().reshape(-1).expand(x.shape[0])  # (B,)
        s = sigma.to(compute).reshape(-1, *([1] * (x.ndim - 1)))  # (B or 1, 1, 1, 1)
        xc = x.to(compute)
        c_in = (s**2 + 1) ** -0.5
        out = model((xc * c_in).to(dtype or compute), t).to(compute)
        if prediction == "eps":
            x0 = xc - s * out
        else:
            x0 = xc / (s**2 + 1) - s * c_in * out
        return x0.to(x.dtype)

    return denoise
