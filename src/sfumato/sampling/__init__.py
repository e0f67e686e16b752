"""Sampling: schedules (sigmas), preconditioning (eps/v -> x0) and the samplers, by name.

``SAMPLERS`` maps our snake_case names to ``SamplerInfo`` (the function plus what the spine needs);
``SCHEDULES`` maps schedule names to ``fn(steps, discrete, *, final) -> sigmas``. ``resolve_sampler``
accepts our names, AUTOMATIC1111's labels and aliases (any case) and its pre-1.9 labels that carried
the schedule ("DPM++ 2M Karras"); ``get_sigmas`` builds the schedule a sampler runs on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sfumato.errors import InvalidParameterError
from sfumato.sampling import ancestral, multistep, samplers
from sfumato.sampling.denoisers import Denoiser, make_denoiser
from sfumato.sampling.registry import SamplerInfo, StepInfo
from sfumato.sampling.schedules import (
    FINALS,
    SCHEDULE_LABELS,
    DiscreteSchedule,
    discrete_schedule,
    split_for_experts,
)
from sfumato.sampling.schedules import SCHEDULES as _BASE_SCHEDULES

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "DiscreteSchedule",
    "Denoiser",
    "SamplerInfo",
    "StepInfo",
    "discrete_schedule",
    "get_sigmas",
    "make_denoiser",
    "resolve_sampler",
    "resolve_schedule",
    "split_for_experts",
]

SAMPLERS: dict[str, SamplerInfo] = {**samplers.SAMPLERS, **ancestral.SAMPLERS, **multistep.SAMPLERS}


def _lcm_schedule(steps: int, discrete: DiscreteSchedule, *, final: str = "zero") -> torch.Tensor:
    """diffusers ``LCMScheduler`` timesteps (the distillation grid), ending at 0."""
    if final != "zero":
        raise InvalidParameterError("the lcm schedule ends at sigma 0 only")
    return multistep.lcm_sigmas(steps, discrete).float()


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {**_BASE_SCHEDULES, "lcm": _lcm_schedule}

# AUTOMATIC1111's aliases (``k_*``) and ComfyUI's sampler names -> ours. Labels come from SamplerInfo.
_SAMPLER_ALIASES: dict[str, str] = {
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "k_euler_ancestral": "euler_a",
    "euler_ancestral": "euler_a",
    "k_heun": "heun",
    "k_lms": "lms",
    "k_dpm_2": "dpm2",
    "dpm_2": "dpm2",
    "k_dpm_2_a": "dpm2_a",
    "dpm_2_ancestral": "dpm2_a",
    "k_dpmpp_2s_a": "dpmpp_2s_a",
    "dpmpp_2s_ancestral": "dpmpp_2s_a",
    "k_dpmpp_2m": "dpmpp_2m",
    "k_dpmpp_sde": "dpmpp_sde",
    "k_dpmpp_2m_sde": "dpmpp_2m_sde",
    "k_dpmpp_3m_sde": "dpmpp_3m_sde",
    "uni_pc": "unipc",
    "pndm": "plms",
}
# A1111's ``*_ka`` aliases of its pre-1.9 "... Karras" samplers
_KARRAS_ALIASES: dict[str, str] = {
    "k_lms_ka": "lms",
    "k_dpm_2_ka": "dpm2",
    "k_dpm_2_a_ka": "dpm2_a",
    "k_dpmpp_2s_a_ka": "dpmpp_2s_a",
    "k_dpmpp_2m_ka": "dpmpp_2m",
    "k_dpmpp_sde_ka": "dpmpp_sde",
    "k_dpmpp_2m_sde_ka": "dpmpp_2m_sde",
}


def _sampler_names() -> dict[str, str]:
    names = {name: name for name in SAMPLERS}
    names.update({info.label.lower(): name for name, info in SAMPLERS.items()})
    names.update(_SAMPLER_ALIASES)
    return names


def resolve_schedule(schedule: str, sampler: SamplerInfo | None = None) -> str:
    """Our schedule name for ``schedule`` (our names, A1111 labels, any case); "automatic" (or None)
    is the sampler's default. Raises InvalidParameterError listing the valid names."""
    key = "automatic" if schedule is None else str(schedule).strip().lower()
    if key == "automatic":
        if sampler is None:
            raise InvalidParameterError("schedule 'automatic' needs a sampler to pick its default")
        return sampler.default_schedule
    if key in SCHEDULES:
        return key
    if key in SCHEDULE_LABELS:
        return SCHEDULE_LABELS[key]
    raise InvalidParameterError(
        f"unknown schedule {schedule!r}; valid: automatic, {', '.join(SCHEDULES)} "
        f"(or AUTOMATIC1111 labels: {', '.join(sorted(SCHEDULE_LABELS))})"
    )


def resolve_sampler(sampler: str, schedule: str | None = None) -> tuple[str, str]:
    """(sampler name, schedule name) from our names or AUTOMATIC1111's labels, any case.

    A pre-1.9 combined label ("DPM++ 2M Karras", "LMS Karras", "k_dpmpp_2m_ka") fixes the schedule
    and overrides ``schedule``; otherwise ``schedule`` None or "automatic" is the sampler's default.
    """
    names = _sampler_names()
    key = str(sampler).strip().lower()
    fixed: str | None = None
    if key in _KARRAS_ALIASES:
        key, fixed = _KARRAS_ALIASES[key], "karras"
    elif key not in names:
        # "<sampler label> <schedule label>", the schedule label possibly several words
        words = key.split()
        for cut in range(len(words) - 1, 0, -1):
            base, suffix = " ".join(words[:cut]), " ".join(words[cut:])
            if base in names and suffix in SCHEDULE_LABELS:
                key, fixed = base, SCHEDULE_LABELS[suffix]
                break
    if key not in names:
        labels = ", ".join(info.label for info in SAMPLERS.values())
        raise InvalidParameterError(
            f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)} (or AUTOMATIC1111 labels: {labels})"
        )
    name = names[key]
    return name, fixed or resolve_schedule(schedule, SAMPLERS[name])


# diffusers' own spacings: they reproduce a diffusers scheduler, which does not drop a sigma
_DIFFUSERS_SPACINGS = ("leading", "linspace", "trailing", "lcm")


def get_sigmas(
    schedule: str,
    steps: int,
    discrete: DiscreteSchedule,
    *,
    sampler: SamplerInfo,
    ays_timesteps: Sequence[int] | None = None,
) -> torch.Tensor:
    """The ``steps + 1`` sigmas (float32, CPU) that ``sampler`` walks with ``schedule``.

    Ends at 0 or at sigma_min as ``sampler.final_sigma`` says. For samplers with
    ``discard_next_to_last_sigma`` (A1111's DPM2 family) the k-diffusion-style schedules are built for
    ``steps + 1`` and lose their next-to-last sigma, as AUTOMATIC1111 does. ``ays_timesteps`` is the
    model's Align Your Steps table (``ModelSpec.ays_timesteps``); it is used by the "ays" schedule only.
    """
    name = resolve_schedule(schedule, sampler)
    if sampler.final_sigma not in FINALS:
        raise InvalidParameterError(f"sampler final_sigma {sampler.final_sigma!r} is not one of {FINALS}")
    kw = {"ays_timesteps": tuple(ays_timesteps)} if name == "ays" and ays_timesteps is not None else {}
    fn = SCHEDULES[name]
    if sampler.discard_next_to_last_sigma and name not in _DIFFUSERS_SPACINGS:
        sigmas = fn(steps + 1, discrete, final=sampler.final_sigma, **kw)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return fn(steps, discrete, final=sampler.final_sigma, **kw)
