"""Schedules against diffusers' schedulers and the published tables.

Measured (diffusers 0.42.1): DiscreteSchedule alphas_cumprod and sigmas equal diffusers' bit for bit;
"leading"/"linspace"/"trailing" equal EulerDiscreteScheduler's sigmas exactly for 1..50 steps;
"karras"/"exponential"/"beta" equal use_karras/exponential/beta_sigmas (linspace spacing) exactly for
2..20, 25, 31, 50 steps; beta_ppf vs scipy max|diff| 1.3e-15; sigma_to_t(t_to_sigma(t)) exact at integer t and
within 2e-13 at fractional t.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from sfumato.config import PRESETS, NoiseScheduleConfig
from sfumato.errors import InvalidParameterError
from sfumato.sampling import SAMPLERS, SCHEDULES, get_sigmas, resolve_schedule
from sfumato.sampling.schedules import SCHEDULE_LABELS, beta_ppf, discrete_schedule

SD = NoiseScheduleConfig()
LINEAR = NoiseScheduleConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
DISCRETE = discrete_schedule(SD)
STEP_COUNTS = list(range(1, 51))


def _euler(cfg: NoiseScheduleConfig = SD, **kw) -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        num_train_timesteps=cfg.num_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule, steps_offset=1, **kw,
    )


@pytest.mark.parametrize("cfg", [SD, LINEAR], ids=["scaled_linear", "linear"])
def test_discrete_schedule_matches_diffusers(cfg):
    ref, ours = _euler(cfg), discrete_schedule(cfg)
    d_alpha = (ref.alphas_cumprod.double() - ours.alphas_cumprod).abs().max().item()
    d_sigma = (ref.sigmas[:-1].flip(0) - ours.sigmas).abs().max().item()
    assert d_alpha == 0 and d_sigma == 0, f"alphas_cumprod max|diff| {d_alpha}, sigmas {d_sigma}"
    assert ours.sigma_min == pytest.approx(0.0291675, rel=1e-4) if cfg is SD else True
    assert ours.sigma_max == float(ref.sigmas[0])


def test_sigma_to_t_round_trip():
    t_int = torch.arange(1000, dtype=torch.float64)
    exact = (DISCRETE.sigma_to_t(DISCRETE.sigmas) - torch.arange(1000.0)).abs().max().item()
    assert exact == 0, f"sigma_to_t(sigmas[k]) != k: max|diff| {exact}"
    assert (DISCRETE.sigma_to_t(DISCRETE.t_to_sigma(t_int)) - t_int).abs().max().item() == 0
    t = torch.rand(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 999
    diff = (DISCRETE.sigma_to_t(DISCRETE.t_to_sigma(t)) - t).abs().max().item()
    assert diff < 1e-9, f"fractional round trip max|diff| {diff}"
    # dtype and device follow the input; out-of-range sigmas clamp to the table ends
    assert DISCRETE.sigma_to_t(torch.tensor(1.0, dtype=torch.float32)).dtype == torch.float32
    ends = DISCRETE.sigma_to_t(torch.tensor([1e-4, 100.0], dtype=torch.float64))
    assert ends.tolist() == [0.0, 999.0]


def test_diffusers_spacings_exact():
    """leading (steps_offset=1), linspace and trailing: EulerDiscreteScheduler's sigmas, bit for bit."""
    for spacing in ("leading", "linspace", "trailing"):
        ref = _euler(timestep_spacing=spacing)
        for n in STEP_COUNTS:
            ref.set_timesteps(n)
            ours = SCHEDULES[spacing](n, DISCRETE)
            assert ours.dtype == torch.float32 and ours.shape == (n + 1,)
            diff = (ref.sigmas - ours).abs().max().item()
            assert diff == 0, f"{spacing} n={n}: max|diff| {diff}"
            # and the training timesteps diffusers feeds the network come back from the sigmas
            if spacing != "linspace":  # linspace interpolates sigma linearly at fractional t (see schedules.py)
                t = DISCRETE.sigma_to_t(ours[:-1])
                assert (t - ref.timesteps).abs().max().item() == 0, f"{spacing} n={n}: timesteps differ"


@pytest.mark.parametrize(
    "name,flag",
    [("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas"), ("beta", "use_beta_sigmas")],
)
def test_sigma_shapes_match_diffusers(name, flag):
    """With linspace spacing diffusers takes sigma_min/max from the model's table, as k-diffusion does."""
    if name == "beta":
        pytest.importorskip("scipy")
    ref = _euler(timestep_spacing="linspace", **{flag: True})
    for n in [*range(2, 21), 25, 31, 50]:
        ref.set_timesteps(n)
        diff = (ref.sigmas - SCHEDULES[name](n, DISCRETE)).abs().max().item()
        assert diff == 0, f"{name} n={n}: max|diff| {diff}"


def test_beta_ppf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    worst = 0.0
    for a, b in [(0.6, 0.6), (0.5, 0.5), (2.0, 3.0), (0.3, 1.7), (5.0, 5.0)]:
        for q in np.linspace(0, 1, 101):
            worst = max(worst, abs(beta_ppf(float(q), a, b) - float(stats.beta.ppf(q, a, b))))
    assert worst < 1e-12, f"beta_ppf max|diff| {worst}"


def test_normal_equals_table_at_integer_timesteps():
    """k-diffusion's get_sigmas: t = linspace(999, 0, n); where those t are integers (n - 1 divides 999)
    it must pick the table sigmas, i.e. equal diffusers' linspace spacing."""
    for n in (2, 4, 10, 28, 38):
        ref = _euler(timestep_spacing="linspace")
        ref.set_timesteps(n)
        diff = (SCHEDULES["normal"](n, DISCRETE) - ref.sigmas).abs().max().item()
        assert diff < 1e-6, f"normal n={n}: max|diff| {diff}"


def test_simple_and_sgm_uniform():
    # "simple" takes every 1000/n-th table sigma from the top: diffusers' trailing when n divides 1000
    for n in (1, 2, 4, 5, 8, 10, 20, 25, 40, 50):
        ref = _euler(timestep_spacing="trailing")
        ref.set_timesteps(n)
        assert torch.equal(SCHEDULES["simple"](n, DISCRETE), ref.sigmas), f"simple n={n}"
    # sgm_uniform: n + 1 even timesteps from 999 to 0, the last dropped (integers when n divides 999)
    n = 27
    expected = DISCRETE.sigmas[[999 - k * 37 for k in range(n)]]
    assert torch.equal(SCHEDULES["sgm_uniform"](n, DISCRETE)[:-1], expected)


def test_align_your_steps_tables():
    """10 steps walk NVIDIA's published tables (ComfyUI ``NOISE_LEVELS``, the sigmas of the published
    timesteps); 20 steps interpolate log-linearly, so every other level is a table entry."""
    published = {
        "sd1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
                0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
        "sdxl": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
                 0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
    }
    for family, table in published.items():
        ays = PRESETS[family].ays_timesteps
        s10 = SCHEDULES["ays"](10, DISCRETE, ays_timesteps=ays)
        diff = (s10[:-1].double() - torch.tensor(table[:-1], dtype=torch.float64)).abs().max().item()
        assert diff < 1e-5 and s10[-1] == 0, f"{family}: max|diff| {diff}"
        s10_min = SCHEDULES["ays"](10, DISCRETE, final="min", ays_timesteps=ays)
        assert float(s10_min[-1]) == pytest.approx(table[-1], abs=1e-6)
        s20 = SCHEDULES["ays"](20, DISCRETE, final="min", ays_timesteps=ays)
        diff20 = (s20[::2].double() - torch.tensor(table, dtype=torch.float64)).abs().max().item()
        assert diff20 < 1e-5, f"{family} 20 steps: max|diff| {diff20}"
    sigmas = get_sigmas("ays", 10, DISCRETE, sampler=SAMPLERS["euler"], ays_timesteps=PRESETS["sdxl"].ays_timesteps)
    assert float(sigmas[1]) == pytest.approx(6.3184485287, abs=1e-5)


def test_kl_optimal_is_even_in_arctan():
    s = SCHEDULES["kl_optimal"](12, DISCRETE)[:-1].double()
    steps = s.atan().diff()
    assert (steps - steps.mean()).abs().max() < 1e-6
    assert float(s[0]) == pytest.approx(DISCRETE.sigma_max, rel=1e-6)
    assert float(s[-1]) == pytest.approx(DISCRETE.sigma_min, rel=1e-6)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_shape_and_final(name):
    for n in (1, 2, 3, 7, 20, 33):
        if name == "lcm" and n > 50:
            continue
        s = SCHEDULES[name](n, DISCRETE)
        assert s.shape == (n + 1,) and s.dtype == torch.float32, f"{name} n={n}: {s.shape} {s.dtype}"
        assert s[-1] == 0 and bool((s[:-1] > 0).all()), f"{name} n={n}: {s}"
        assert bool((s.diff() <= 0).all()), f"{name} n={n} is not descending: {s}"
        if name != "lcm":
            s_min = SCHEDULES[name](n, DISCRETE, final="min")
            assert torch.equal(s_min[:-1], s[:-1]) and float(s_min[-1]) == DISCRETE.sigma_min


def test_schedule_errors_and_labels():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InvalidParameterError):
            SCHEDULES["karras"](bad, DISCRETE)
    with pytest.raises(InvalidParameterError):
        SCHEDULES["normal"](10, DISCRETE, final="one")
    with pytest.raises(InvalidParameterError, match="karras"):
        resolve_schedule("fancy", SAMPLERS["euler"])
    with pytest.raises(InvalidParameterError):
        discrete_schedule(NoiseScheduleConfig(beta_schedule="cosine"))
    assert set(SCHEDULE_LABELS.values()) <= set(SCHEDULES)
    for label, name in [("Uniform", "normal"), ("SGM Uniform", "sgm_uniform"), ("Align Your Steps", "ays"),
                        ("KARRAS", "karras"), ("Automatic", "normal"), (None, "normal"), ("trailing", "trailing")]:
        assert resolve_schedule(label, SAMPLERS["euler"]) == name, label
    assert resolve_schedule("automatic", SAMPLERS["dpmpp_2m"]) == "karras"


def test_get_sigmas_discards_next_to_last_like_a1111():
    """DPM2 (A1111 ``discard_next_to_last_sigma``): the k-diffusion schedule for n + 1 steps without its
    next-to-last sigma; diffusers' own spacings are left alone (KDPM2DiscreteScheduler keeps them)."""
    info = SAMPLERS["dpm2"]
    assert info.discard_next_to_last_sigma
    full = SCHEDULES["karras"](11, DISCRETE)
    got = get_sigmas("automatic", 10, DISCRETE, sampler=info)
    assert torch.equal(got, torch.cat([full[:-2], full[-1:]])) and got.shape == (11,)
    assert torch.equal(get_sigmas("leading", 10, DISCRETE, sampler=info), SCHEDULES["leading"](10, DISCRETE))
    ddim = get_sigmas("leading", 10, DISCRETE, sampler=SAMPLERS["ddim"])
    assert float(ddim[-1]) == DISCRETE.sigma_min  # DDIM ends at alphas_cumprod[0]
    assert math.isclose(float(get_sigmas("Karras", 10, DISCRETE, sampler=SAMPLERS["euler"])[0]), DISCRETE.sigma_max,
                        rel_tol=1e-6)
