"""AUTOMATIC1111 "parameters" text: goldens byte for byte, parsing real-world strings, round trips, files.

The goldens follow stable-diffusion-webui v1.10 ``create_infotext`` (key order, keys left out at their
defaults, JSON quoting of values with ``,`` ``:`` or newlines) and the shape of infotexts it wrote;
the parsing cases are infotexts as versions 1.0, 1.6 and 1.10 wrote them.
"""

from __future__ import annotations

import math

import pytest
from PIL import Image

from sfumato.errors import InvalidParameterError
from sfumato.metadata import (
    VERSION,
    infotext,
    params_from_infotext,
    parse_infotext,
    png_info,
    quote,
    read_parameters,
)
from sfumato.params import GenerationParams, validate

MODEL = {"model_name": "v1-5-pruned-emaonly", "model_hash": "6ce0161689"}


def text(p: GenerationParams, seed: int, **kw) -> str:
    kw.setdefault("version", None)
    kw.setdefault("model_name", None)
    kw.setdefault("model_hash", None)
    return infotext(p, seed=seed, **kw)


# --- goldens -----------------------------------------------------------------------------------------

GOLDENS = [
    pytest.param(
        GenerationParams(prompt="a photo of a cat"), 1234, {**MODEL, "version": "v1.10.1"},
        "a photo of a cat\n"
        "Steps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1",
        id="defaults"),
    pytest.param(
        GenerationParams(prompt="masterpiece, a castle on a hill", negative_prompt="blurry, lowres", steps=30,
                         cfg_scale=7.5, sampler="dpmpp_2m", schedule="karras", width=768, height=512), 42, MODEL,
        "masterpiece, a castle on a hill\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 768x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly",
        id="negative-prompt"),
    pytest.param(
        GenerationParams(prompt="line one,\nline two", negative_prompt="neg one\nneg two", sampler="euler_a"), 7, {},
        "line one,\nline two\n"
        "Negative prompt: neg one\nneg two\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 7, Size: 512x512",
        id="multi-line"),
    pytest.param(
        GenerationParams(prompt="p", extra={"Lora hashes": "add_detail: 7c6bad76eb54, epi: 1a2b3c4d5e6f",
                                            "Note": 'say "hi"', "Quoted": 'he said "x", ok', "Lines": "a\nb"}),
        1, {"model_name": "my, model", "model_hash": None},
        'p\n'
        'Steps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, '
        'Model: "my, model", Lora hashes: "add_detail: 7c6bad76eb54, epi: 1a2b3c4d5e6f", Note: say "hi", '
        'Quoted: "he said \\"x\\", ok", Lines: "a\\nb"',
        id="quoting"),
    pytest.param(
        GenerationParams(prompt="p", clip_skip=2, cfg_scale=5.0), 3, MODEL,
        "p\n"
        "Steps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 5, Seed: 3, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2",
        id="clip-skip"),
    pytest.param(
        GenerationParams(prompt="oil painting", strength=0.75, steps=25), 99, MODEL,
        "oil painting\n"
        "Steps: 25, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 99, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75",
        id="img2img"),
    pytest.param(
        GenerationParams(prompt="p", subseed=999, subseed_strength=0.25, clip_skip=2), 5, MODEL,
        "p\n"
        "Steps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 5, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Variation seed: 999, Variation seed strength: 0.25, "
        "Clip skip: 2",
        id="variation-seed"),
    pytest.param(
        GenerationParams(prompt="a red door", strength=0.75, mask_blur=4, inpaint_full_res=True, inpaint_padding=32,
                         inpaint_fill="fill"), 11, {**MODEL, "inpaint": True},
        "a red door\n"
        "Steps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 11, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Mask blur: 4, "
        "Inpaint area: Only masked, Masked area padding: 32, Masked content: fill",
        id="inpaint"),
    pytest.param(
        GenerationParams(prompt="p", sampler="euler_a", eta=0.67, emphasis="none", guidance_rescale=0.7), 1, {},
        "p\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, "
        "Emphasis: No norm, Eta: 0.67, Guidance rescale: 0.7",
        id="eta-emphasis"),
    pytest.param(
        GenerationParams(prompt="p", sampler="ddim", schedule="leading", eta=0.0), 1, {},
        "p\n"
        "Steps: 20, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512",
        id="ddim-default-eta"),
    pytest.param(
        GenerationParams(prompt="p", extra={"RNG": "CPU", "Hires upscale": 2.0}), 1,
        {**MODEL, "extra": {"VAE": "ft-mse"}},
        "p\n"
        "Steps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE: ft-mse, RNG: CPU, Hires upscale: 2",
        id="extra-keys-in-fixed-slots"),
]


@pytest.mark.parametrize(("params", "seed", "kw", "expected"), GOLDENS)
def test_infotext_golden(params, seed, kw, expected):
    assert text(params, seed, **kw) == expected


def test_default_version_and_seed_argument():
    t = infotext(GenerationParams(prompt="p", seed=1), seed=2, model_name=None, model_hash=None)
    assert t.endswith(f", Seed: 2, Size: 512x512, Version: {VERSION}")
    assert VERSION.startswith("sfumato ")


def test_quote_rule():
    assert quote("plain") == "plain"
    assert quote('with "quotes"') == 'with "quotes"'  # quotes alone are not quoted (A1111's rule)
    assert quote("a, b") == '"a, b"'
    assert quote("k: v") == '"k: v"'
    assert quote("é, ü") == '"é, ü"'  # ensure_ascii=False
    assert quote(7.0) == "7" and quote(7.5) == "7.5" and quote(0.1) == "0.1" and quote(20) == "20"


# --- parsing real-world strings ----------------------------------------------------------------------

# The example in parse_generation_parameters' docstring (a v1.0-era infotext: old 8-hex model hash).
A1111_V1 = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
    "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn "
    "face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)
# v1.6: sampler label with the schedule in it, a LoRA, clip skip.
A1111_V16 = (
    "portrait of a woman, (freckles:1.2), soft light <lora:add_detail:0.6>\n"
    "Negative prompt: (worst quality, low quality:1.4), watermark\n"
    "Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 3037462344, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, "
    'Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.6.0'
)
# v1.10: separate schedule type, hires fix, ENSD-free.
A1111_V110 = (
    "a lighthouse at dusk, dramatic sky\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Hires upscale: 2, "
    "Hires upscaler: Latent, Version: v1.10.1"
)
# v1.10 inpaint at full resolution, "latent noise", blur 0 (left out).
A1111_INPAINT = (
    "a cat sitting on a bench\n"
    "Steps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.5, Seed: 123, Size: 512x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Inpaint area: Only masked, "
    "Masked area padding: 32, Masked content: latent noise, Version: v1.10.1"
)


def test_parse_docstring_example():
    d = parse_infotext(A1111_V1)
    assert d["Prompt"].startswith("girl with an artist's beret") and d["Prompt"].endswith("detailed, intricate")
    assert d["Negative prompt"].startswith("ugly, fat") and d["Negative prompt"].endswith("messy drawing")
    assert {k: d[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash")} == {
        "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size": "512x512",
        "Model hash": "45dee52b"}
    p = params_from_infotext(A1111_V1)
    assert (p.sampler, p.steps, p.cfg_scale, p.seed, p.width, p.height) == ("euler_a", 20, 7.0, 965400086, 512, 512)
    assert p.extra == {"Model hash": "45dee52b"}


def test_parse_combined_sampler_label_and_quoted_value():
    d = parse_infotext(A1111_V16)
    assert d["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert d["Negative prompt"] == "(worst quality, low quality:1.4), watermark"
    p = params_from_infotext(A1111_V16)
    assert (p.sampler, p.schedule, p.cfg_scale, p.clip_skip, p.seed) == ("dpmpp_2m", "karras", 6.5, 2, 3037462344)
    assert (p.width, p.height) == (512, 768)
    assert p.extra == {"Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly",
                       "Lora hashes": "add_detail: 7c6bad76eb54"}  # Version dropped


def test_parse_v110_and_write_back_identically():
    p = params_from_infotext(A1111_V110)
    assert (p.sampler, p.schedule, p.strength) == ("dpmpp_2m", "karras", 0.7)
    assert p.extra == {"Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Hires upscale": "2",
                       "Hires upscaler": "Latent"}
    assert text(p, p.seed, version="v1.10.1") == A1111_V110


def test_parse_inpaint():
    p = params_from_infotext(A1111_INPAINT)
    assert (p.inpaint_full_res, p.inpaint_padding, p.inpaint_fill, p.mask_blur) == (True, 32, "latent_noise", 0)
    assert p.schedule == "automatic"  # the sampler's default, resolved by validate()
    assert text(p, p.seed, version="v1.10.1", inpaint=True) == A1111_INPAINT


def test_parse_prompt_only_and_edge_lines():
    # fewer than three key: value pairs on the last line: all prompt
    assert parse_infotext("a sign that says: hello, world") == {
        "Prompt": "a sign that says: hello, world", "Negative prompt": ""}
    d = parse_infotext("  spaced prompt  \nSteps: 5, Sampler: Euler, Seed: 1\n")
    assert d["Prompt"] == "spaced prompt" and d["Steps"] == "5"
    # no prompt at all
    d = parse_infotext("Steps: 5, Sampler: Euler, CFG scale: 3, Seed: 1, Size: 64x64")
    assert d["Prompt"] == "" and d["Size"] == "64x64"
    assert params_from_infotext("Steps: 5, Sampler: Euler, CFG scale: 3, Seed: 1, Size: 64x64").width == 64


def test_schedule_labels_read_back():
    def schedule(sampler: str, label: str) -> tuple[str, str]:
        p = params_from_infotext(f"p\nSteps: 2, Sampler: {sampler}, Schedule type: {label}, CFG scale: 7")
        return p.sampler, p.schedule

    assert schedule("Euler", "Uniform") == ("euler", "normal")
    assert schedule("DPM++ 2M", "Automatic") == ("dpmpp_2m", "automatic")
    assert schedule("DPM++ 2M", "Karras") == ("dpmpp_2m", "karras")
    assert schedule("DDIM", "DDIM") == ("ddim", "leading")
    assert schedule("Euler", "SGM Uniform") == ("euler", "sgm_uniform")
    assert schedule("Euler", "Some Future Schedule") == ("euler", "Some Future Schedule")  # kept for validate()
    assert text(GenerationParams(prompt="p", sampler="ddim", schedule="leading"), 1).count("Schedule type: Automatic")


def test_parse_errors_name_the_key():
    with pytest.raises(InvalidParameterError, match="Steps.*'many'"):
        params_from_infotext("p\nSteps: many, Sampler: Euler, CFG scale: 7")
    with pytest.raises(InvalidParameterError, match="Size.*WIDTHxHEIGHT"):
        params_from_infotext("p\nSteps: 2, Sampler: Euler, Size: big")
    # an unknown sampler is kept for validate() to report, not an error here
    assert params_from_infotext("p\nSteps: 2, Sampler: Some New Sampler, CFG scale: 7").sampler == "Some New Sampler"


# --- round trips -------------------------------------------------------------------------------------

ROUND_TRIP = [
    GenerationParams(prompt="a, b: c", negative_prompt="x\ny", seed=5),
    GenerationParams(prompt="p", sampler="dpmpp_2m", schedule="karras", cfg_scale=4.5, steps=7, width=640,
                     height=384, seed=2**32 - 1, clip_skip=3),
    GenerationParams(prompt="p", seed=1, subseed=77, subseed_strength=0.5, strength=0.3),
    GenerationParams(prompt="p", seed=1, sampler="euler", s_churn=0.5, s_tmin=0.1, s_tmax=10.0, s_noise=1.003),
    GenerationParams(prompt="p", seed=1, sampler="euler_a", eta=0.5, emphasis="none", guidance_rescale=0.7),
    GenerationParams(prompt="p", seed=1, sampler="ddim", eta=0.3),
    GenerationParams(prompt="p", seed=1, extra={"Hires upscale": "2", "Lora hashes": "a: 1, b: 2"}),
    GenerationParams(prompt="p", seed=1, sampler="euler", schedule="leading"),  # A1111's "DDIM" schedule
    GenerationParams(prompt="p", seed=1, sampler="euler", schedule="trailing"),  # no A1111 label: our name
    GenerationParams(prompt="p", seed=1, sampler="lcm", cfg_scale=1.5),
]


@pytest.mark.parametrize("p", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_round_trip_params_text_params(p):
    t = text(p, p.seed)
    back = params_from_infotext(t)
    assert back == p, f"{t!r}\n{back}"
    assert validate(back) == validate(p)
    assert text(back, back.seed) == t


def test_resolved_default_schedules_read_back_as_automatic():
    """A validated params object carries the resolved default ("leading" for DDIM): it is written as
    "Automatic" where AUTOMATIC1111 has no label for it, and validates back to the same schedule."""
    for p in (GenerationParams(prompt="p", seed=1, sampler="ddim", schedule="leading"),
              GenerationParams(prompt="p", seed=1, sampler="lcm"), GenerationParams(prompt="p", seed=1)):
        p = validate(p)
        assert validate(params_from_infotext(text(p, 1))) == p


@pytest.mark.parametrize(("blur", "full_res", "fill"), [(4, True, "fill"), (0, False, "latent_nothing"),
                                                         (8, False, "original")])
def test_round_trip_inpaint(blur, full_res, fill):
    p = GenerationParams(prompt="p", seed=1, strength=0.6, mask_blur=blur, inpaint_full_res=full_res,
                         inpaint_fill=fill, inpaint_padding=48 if full_res else 32)
    assert params_from_infotext(text(p, 1, inpaint=True)) == p


def test_model_kwargs_outrank_imported_extra():
    p = params_from_infotext(A1111_V16)
    t = text(p, 1, model_name="other", model_hash="0123456789")
    assert "Model hash: 0123456789, Model: other, Clip skip: 2" in t and "6ce0161689" not in t
    t = text(p, 1, model_name="a-folder", model_hash=None)  # a folder has no file hash: drop the imported one
    assert "Model: a-folder, Clip skip: 2" in t and "Model hash" not in t
    assert "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly," in text(p, 1)  # no model given: kept


def test_sigma_tmax_infinite_is_left_out():
    t = text(GenerationParams(prompt="p", sampler="euler", s_tmax=math.inf, s_churn=1.0), 1)
    assert t.endswith("Sigma churn: 1") and "tmax" not in t


# --- files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp"])
def test_file_round_trip(tmp_path, ext):
    from sfumato.images import save_image

    t = text(GenerationParams(prompt="café 猫, «quotes»", negative_prompt="x"), 1, **MODEL)
    path = save_image(Image.new("RGB", (16, 8), (1, 2, 3)), tmp_path / f"a{ext}", parameters=t)
    assert read_parameters(path) == t
    with Image.open(path) as im:
        assert read_parameters(im) == t


def test_png_chunk_is_named_parameters(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(path, pnginfo=png_info("latin-1 text"))
    with Image.open(path) as im:
        assert im.text == {"parameters": "latin-1 text"}
    assert read_parameters(Image.new("RGB", (4, 4))) is None
