"""SDXL end to end against diffusers' StableDiffusionXL{,Img2Img,Inpaint}Pipeline on tiny random models.

The tiny refiner shares the base's OpenCLIP-bigG encoder and VAE, as the released pair does, so the
hand-off and the in-memory sharing are both exercised. Same seed -> same uint8 image: the bound is
1/255 (measured: 0 or 1 level, fp32 rounding at the last uint8 step).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato
from sfumato.errors import InvalidParameterError

from . import tiny

pytestmark = pytest.mark.skipif(not tiny.SHARED_BPE.exists(), reason="needs ../shared/clip-bpe beside the repo")

SIZE = 32  # the tiny VAE downsamples 2x: a 16x16 latent
STEPS = 10


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import diffusers

    root = tmp_path_factory.mktemp("sdxl")
    base = tiny.build("sdxl", root / "base", seed=21)
    torch.manual_seed(22)
    ref_base = diffusers.StableDiffusionXLPipeline.from_pretrained(str(base), local_files_only=True)
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=ref_base.vae, text_encoder=None, text_encoder_2=ref_base.text_encoder_2, tokenizer=None,
        tokenizer_2=ref_base.tokenizer_2, unet=tiny.sdxl_unet(context=128, pooled=128, n_ids=5),
        scheduler=tiny._scheduler(), requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    refiner.save_pretrained(root / "refiner", safe_serialization=True)
    return base, root / "refiner"


@pytest.fixture(scope="module")
def ours(folders):
    base = sfumato.load(folders[0])
    return base, sfumato.load(folders[1], share=base)


def _ref(folder, kind: str, sampler: str = "euler"):
    import diffusers

    cls = {"txt2img": diffusers.StableDiffusionXLPipeline, "img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionXLInpaintPipeline}[kind]
    pipe = cls.from_pretrained(str(folder), local_files_only=True)
    if sampler == "euler_a":
        pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _maxdiff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def _image(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def test_detected_families_and_shared_modules(ours):
    base, refiner = ours
    assert base.spec.family == "sdxl" and refiner.spec.family == "sdxl-refiner"
    assert base.spec.zero_empty_negative and not refiner.spec.zero_empty_negative
    assert refiner.vae is base.vae
    assert refiner.text_encoders[0] is base.text_encoders[1]
    assert refiner.unet is not base.unet


def test_sharing_only_takes_equal_weights(folders):
    base = sfumato.load(folders[0])
    with torch.no_grad():
        base.vae.decoder.conv_out.bias.add_(1.0)
    refiner = sfumato.load(folders[1], share=base)
    assert refiner.vae is not base.vae
    assert refiner.text_encoders[0] is base.text_encoders[1]


@pytest.mark.parametrize("sampler", ["euler", "euler_a"])
def test_txt2img_micro_conditioning_and_prompt_2(folders, ours, sampler):
    ref = _ref(folders[0], "txt2img", sampler)
    cond = dict(original_size=(64, 48), crops_coords_top_left=(8, 4), target_size=(40, 32),
                negative_original_size=(16, 24), negative_crops_coords_top_left=(2, 6), negative_target_size=(32, 32))
    want = ref("a red circle", prompt_2="oil painting of a lake", negative_prompt="blurry",
               negative_prompt_2="dark", num_inference_steps=STEPS, guidance_scale=5.0, height=SIZE, width=SIZE,
               generator=torch.Generator().manual_seed(4), **cond).images[0]
    got = ours[0].generate("a red circle", "blurry", prompt_2="oil painting of a lake", negative_prompt_2="dark",
                           steps=STEPS, cfg_scale=5.0, sampler=sampler, schedule="leading", seed=4, width=SIZE,
                           height=SIZE, **cond).images[0]
    d = _maxdiff(got, want)
    assert d <= 1, f"sdxl txt2img {sampler}: max |diff| = {d}/255"
    plain = ours[0].generate("a red circle", "blurry", steps=STEPS, cfg_scale=5.0, sampler=sampler,
                             schedule="leading", seed=4, width=SIZE, height=SIZE).images[0]
    assert _maxdiff(plain, got) > 1, "micro-conditioning and prompt_2 changed nothing"


def test_empty_negative_is_zeroed_on_the_base(folders, ours):
    ref = _ref(folders[0], "txt2img")
    want = ref("a blue square", num_inference_steps=STEPS, guidance_scale=6.0, height=SIZE, width=SIZE,
               generator=torch.Generator().manual_seed(1)).images[0]  # negative_prompt=None: zeros
    got = ours[0].generate("a blue square", steps=STEPS, cfg_scale=6.0, sampler="euler", schedule="leading",
                           seed=1, width=SIZE, height=SIZE).images[0]
    d = _maxdiff(got, want)
    assert d <= 1, f"zeroed negative: max |diff| = {d}/255"
    encoded = ref("a blue square", negative_prompt="", num_inference_steps=STEPS, guidance_scale=6.0,
                  height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(1)).images[0]
    assert _maxdiff(encoded, want) > 1, "zeroing the negative made no difference: the test proves nothing"


@pytest.mark.parametrize("switch", [0.8, 0.7])
@pytest.mark.parametrize("sampler", ["euler", "euler_a"])
def test_base_to_refiner_handoff(folders, ours, switch, sampler):
    base_ref, refiner_ref = _ref(folders[0], "txt2img", sampler), _ref(folders[1], "img2img", sampler)
    g = torch.Generator().manual_seed(9)
    latents = base_ref("a green star", negative_prompt="ugly", num_inference_steps=STEPS, guidance_scale=5.0,
                       height=SIZE, width=SIZE, denoising_end=switch, output_type="latent", generator=g).images
    want = refiner_ref("a green star", negative_prompt="ugly", image=latents, num_inference_steps=STEPS,
                       guidance_scale=5.0, denoising_start=switch, generator=g, aesthetic_score=7.0,
                       negative_aesthetic_score=2.0).images[0]
    res = ours[0].generate("a green star", "ugly", steps=STEPS, cfg_scale=5.0, sampler=sampler, schedule="leading",
                           seed=9, width=SIZE, height=SIZE, refiner=ours[1], refiner_switch_at=switch,
                           aesthetic_score=7.0, negative_aesthetic_score=2.0)
    d = _maxdiff(res.images[0], want)
    assert d <= 1, f"hand-off at {switch} ({sampler}): max |diff| = {d}/255"
    assert f"Refiner switch at: {switch}" in res.infotexts[0] and "Refiner: refiner" in res.infotexts[0]
    alone = ours[0].generate("a green star", "ugly", steps=STEPS, cfg_scale=5.0, sampler=sampler,
                             schedule="leading", seed=9, width=SIZE, height=SIZE).images[0]
    assert _maxdiff(alone, res.images[0]) > 1, "the refiner changed nothing"


def test_refiner_steps_are_reported_in_one_count(ours):
    seen = []
    ours[0].generate("a ring", steps=STEPS, sampler="euler", schedule="leading", seed=1, width=SIZE, height=SIZE,
                     refiner=ours[1], refiner_switch_at=0.7, callback=lambda s: seen.append((s.i, s.total)))
    assert seen == [(i, STEPS) for i in range(STEPS)]


def test_refiner_as_img2img(folders, ours):
    ref = _ref(folders[1], "img2img")
    image = _image(2)
    want = ref("a small house", image=image, strength=0.3, num_inference_steps=STEPS, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(3)).images[0]
    got = ours[1].img2img(image, "a small house", strength=0.3, steps=STEPS, cfg_scale=5.0, sampler="euler",
                          schedule="leading", seed=3).images[0]
    d = _maxdiff(got, want)
    assert d <= 1, f"refiner img2img: max |diff| = {d}/255"


def test_base_img2img(folders, ours):
    ref = _ref(folders[0], "img2img")
    image = _image(4)
    want = ref("a cat", negative_prompt="blurry", image=image, strength=0.6, num_inference_steps=STEPS,
               guidance_scale=5.0, generator=torch.Generator().manual_seed(5), original_size=(48, 48),
               target_size=(32, 40)).images[0]
    got = ours[0].img2img(image, "a cat", "blurry", strength=0.6, steps=STEPS, cfg_scale=5.0, sampler="euler",
                          schedule="leading", seed=5, original_size=(48, 48), target_size=(32, 40)).images[0]
    d = _maxdiff(got, want)
    assert d <= 1, f"sdxl img2img: max |diff| = {d}/255"


def _mask():
    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m[8:24, 4:20] = 255
    return Image.fromarray(m)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_base_inpaint(folders, ours, strength):
    ref = _ref(folders[0], "inpaint")
    image, mask = _image(6), _mask()
    want = ref("a tree", negative_prompt="fog", image=image, mask_image=mask, strength=strength, height=SIZE,
               width=SIZE, num_inference_steps=STEPS, guidance_scale=6.0,
               generator=torch.Generator().manual_seed(8)).images[0]
    got = ours[0].inpaint(image, mask, "a tree", "fog", strength=strength, steps=STEPS, cfg_scale=6.0,
                          sampler="euler", schedule="leading", seed=8, mask_blur=0).images[0]
    d = _maxdiff(got, want)
    assert d <= 1, f"sdxl inpaint strength {strength}: max |diff| = {d}/255"


def test_refiner_after_inpainting_keeps_the_unmasked_area(ours):
    from PIL import ImageFilter

    image, mask = _image(7), _mask()
    res = ours[0].inpaint(image, mask, "a tree", steps=STEPS, sampler="euler", seed=2, mask_blur=2,
                          refiner=ours[1], refiner_switch_at=0.8)
    out = np.asarray(res.images[0], dtype=np.int16)
    keep = np.asarray(mask.filter(ImageFilter.GaussianBlur(2))) == 0  # untouched by the blurred mask
    assert keep.sum() > 300
    assert np.abs(out[keep] - np.asarray(image, dtype=np.int16)[keep]).max() == 0
    inside = np.asarray(mask) > 0
    assert np.abs(out[inside] - np.asarray(image, dtype=np.int16)[inside]).mean() > 5
    # the refiner's steps reached the masked area (not only the base's); diffusers is no reference here: its
    # inpaint refiner re-noises the handed-over latents outside the mask instead of the original image's
    alone = np.asarray(ours[0].inpaint(image, mask, "a tree", steps=STEPS, sampler="euler", seed=2, mask_blur=2
                                       ).images[0], dtype=np.int16)
    assert np.abs(out[inside] - alone[inside]).max() > 1 and np.abs(out[keep] - alone[keep]).max() == 0
    assert "Refiner switch at: 0.8" in res.infotexts[0] and "Mask blur: 2" in res.infotexts[0]


@pytest.mark.parametrize(("kw", "match"), [
    ({"refiner_switch_at": 1.5}, "refiner_switch_at=1.5"),
    ({"refiner_switch_at": 0.8, "refiner": None}, "needs a refiner"),
    ({"original_size": (0, 5)}, r"original_size=\(0, 5\)"),
    ({"crops_coords_top_left": (1, 2, 3)}, "two integers"),
    ({"denoising_end": 1.0}, "denoising_end=1.0"),
    ({"aesthetic_score": 11}, "aesthetic_score=11"),
    ({"prompt_2": "a AND b AND c"}, "prompt_2 has 3 AND parts"),
    ({"denoising_end": 0.0001}, "denoising_end=0.0001 leaves no step"),
])
def test_bad_sdxl_input_is_a_clear_error(ours, kw, match):
    kw = {"refiner": ours[1], **kw} if "refiner_switch_at" in kw and "refiner" not in kw else kw
    with pytest.raises(InvalidParameterError, match=match):
        ours[0].generate("a AND b", steps=4, seed=1, width=SIZE, height=SIZE, **kw)


def test_refiner_must_share_the_latent_space(ours, tmp_path):
    sd1 = sfumato.load(tiny.build("sd1", tmp_path / "sd1"))
    with pytest.raises(InvalidParameterError, match="latent space"):
        ours[0].generate("x", steps=4, seed=1, width=SIZE, height=SIZE, refiner=sd1)


def test_half_precision_vae_decodes_in_fp32(folders, caplog):
    base = sfumato.load(folders[0], dtype="bf16")
    seen = []
    hook = base.vae.decoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    base.generate("a", steps=2, seed=1, width=SIZE, height=SIZE, sampler="euler")
    assert seen == [torch.float32] and base.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    # A VAE without the upcast flag (an fp16-fix VAE) decodes in its dtype and retries in fp32 on overflow.
    import dataclasses

    from sfumato import pipeline

    base.spec = dataclasses.replace(base.spec, vae_upcast=False)
    seen.clear()
    real = base.vae.decode
    base.vae.decode = lambda z: real(z) * (float("inf") if z.dtype == torch.bfloat16 else 1.0)
    pipeline._WARNED.discard("vae-overflow")
    with caplog.at_level(logging.WARNING, logger="sfumato"):
        images = base.generate("a", steps=2, seed=1, width=SIZE, height=SIZE, sampler="euler").images
        base.generate("b", steps=2, seed=1, width=SIZE, height=SIZE, sampler="euler")
    hook.remove()
    assert seen == [torch.bfloat16, torch.float32] * 2
    assert sum("overflowed" in r.message for r in caplog.records) == 1
    assert np.asarray(images[0]).std() > 0


def test_cli_refiner_and_micro_conditioning(folders, ours, tmp_path, capsys):
    from sfumato.cli import main
    from sfumato.metadata import params_from_infotext, read_parameters

    out = tmp_path / "xl.png"
    code = main(["generate", "a boat", "--model", str(folders[0]), "--refiner", str(folders[1]), "--switch-at",
                 "0.7", "--original-size", "48x64", "--crop", "4,8", "--aesthetic-score", "7", "--prompt-2",
                 "a lake", "--steps", "6", "-W", "32", "-H", "32", "--seed", "3", "--sampler", "euler",
                 "-o", str(out), "-q"])
    assert code == 0
    text = read_parameters(out)
    for part in ("Refiner: refiner", "Refiner switch at: 0.7", "Original size: 48x64", 'Crop top left: "4,8"',
                 "Aesthetic score: 7", "Prompt 2: a lake"):
        assert part in text, (part, text)
    p = params_from_infotext(text)
    assert (p.original_size, p.crops_coords_top_left, p.prompt_2) == ((64, 48), (8, 4), "a lake")
    want = ours[0].generate("a boat", prompt_2="a lake", steps=6, width=32, height=32, seed=3, sampler="euler",
                            original_size=(64, 48), crops_coords_top_left=(8, 4), aesthetic_score=7.0,
                            refiner=ours[1], refiner_switch_at=0.7).images[0]
    assert _maxdiff(Image.open(out).convert("RGB"), want) == 0
    capsys.readouterr()
    for bad, match in ((["--crop", "4x8"], "--crop '4x8' is not LEFT,TOP"),
                       (["--switch-at", "0.5"], "--switch-at needs --refiner"),
                       (["--original-size", "big"], "--original-size 'big' is not WIDTHxHEIGHT")):
        assert main(["generate", "x", "--model", str(folders[0]), "-o", str(tmp_path / "bad.png"), "-q", *bad]) == 2
        assert match in capsys.readouterr().err


def test_prompt_2_chunks_stay_aligned_with_the_prompt(ours):
    from sfumato.text.conditioning import encode_prompt

    base = ours[0]
    long_2 = " ".join(["a tall lighthouse"] * 30)  # 90 tokens: two chunks for the second encoder only
    c = encode_prompt(base.text_encoders, base.spec.text_encoders, base.tokenizer, "a (red:1.3) circle",
                      text_2=long_2)
    widths = [te.config.width for te in base.spec.text_encoders]
    assert c.context.shape == (1, 154, sum(widths))
    empty = encode_prompt(base.text_encoders[:1], base.spec.text_encoders[:1], base.tokenizer, "")
    # the first encoder's second chunk is the empty prompt's chunk, so the features line up per token
    assert torch.equal(c.context[:, 77:, :widths[0]], empty.context)
    alone = encode_prompt(base.text_encoders, base.spec.text_encoders, base.tokenizer, "a (red:1.3) circle")
    assert torch.equal(c.context[:, :77, :widths[0]], alone.context[:, :, :widths[0]])
    assert not torch.equal(c.context[:, :77, widths[0]:], alone.context[:, :, widths[0]:])


def test_fp16_fix_vae_override_decodes_in_half(folders, tmp_path):
    import json
    import shutil

    fixed = tmp_path / "vae-fix"
    shutil.copytree(folders[0] / "vae", fixed)
    cfg = json.loads((fixed / "config.json").read_text())
    (fixed / "config.json").write_text(json.dumps({**cfg, "force_upcast": False}))
    pipe = sfumato.load(folders[0], dtype="bf16", vae=fixed)
    assert not pipe.spec.vae_upcast
    seen = []
    pipe.vae.decoder.conv_in.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    pipe.generate("a", steps=2, seed=1, width=SIZE, height=SIZE, sampler="euler")
    assert seen == [torch.bfloat16]
    assert sfumato.load(folders[0], dtype="bf16", vae=folders[0] / "vae").spec.vae_upcast


def test_refiner_img2img_non_default_crop_and_aesthetic_scores(folders, ours):
    """The refiner's negative crop defaults to (0, 0) as diffusers' does, and non-default aesthetic scores
    reach the UNet (each measured to move the image by several levels, so the parity bound has teeth)."""
    ref = _ref(folders[1], "img2img")
    image = _image(3)
    kw = dict(crops_coords_top_left=(8, 4), aesthetic_score=7.5, negative_aesthetic_score=1.5)
    want = ref("a small house", negative_prompt="blurry", image=image, strength=0.5, num_inference_steps=STEPS,
               guidance_scale=5.0, generator=torch.Generator().manual_seed(3), **kw).images[0]
    got = ours[1].img2img(image, "a small house", "blurry", strength=0.5, steps=STEPS, cfg_scale=5.0,
                          sampler="euler", schedule="leading", seed=3, **kw).images[0]
    d = _maxdiff(got, want)
    assert d <= 1, f"refiner img2img with crop and aesthetic scores: max |diff| = {d}/255"
    common = dict(strength=0.5, steps=STEPS, cfg_scale=5.0, sampler="euler", schedule="leading", seed=3)
    plain = ours[1].img2img(image, "a small house", "blurry", crops_coords_top_left=(8, 4), **common).images[0]
    assert _maxdiff(plain, got) > 1, "the aesthetic scores changed nothing"
    both = ours[1].img2img(image, "a small house", "blurry", negative_crops_coords_top_left=(8, 4), **kw,
                           **common).images[0]
    assert _maxdiff(both, got) > 1, "the negative crop changed nothing"


def test_txt2img_negative_sizes_without_a_negative_crop(folders, ours):
    """diffusers' txt2img: with both negative sizes given, the negative crop defaults to (0, 0), not to
    the positive crop."""
    ref = _ref(folders[0], "txt2img")
    cond = dict(crops_coords_top_left=(8, 4), negative_original_size=(16, 24), negative_target_size=(32, 32))
    want = ref("a red circle", negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=5.0,
               height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(4), **cond).images[0]
    got = ours[0].generate("a red circle", "blurry", steps=STEPS, cfg_scale=5.0, sampler="euler",
                           schedule="leading", seed=4, width=SIZE, height=SIZE, **cond).images[0]
    d = _maxdiff(got, want)
    assert d <= 1, f"sdxl txt2img, negative sizes only: max |diff| = {d}/255"



def test_prompt_language_in_prompt_2_reaches_only_the_second_encoder(ours):
    """Emphasis, prompt editing and AND parts of ``prompt_2`` act on the bigG half of the context (and its
    pooled vector); the CLIP-L half follows ``prompt`` alone; the two editing schedules merge per step."""
    from sfumato.params import GenerationParams
    from sfumato.pipeline import _Conds, conditioning
    from sfumato.text.conditioning import encode_prompt

    base = ours[0]
    w1 = base.spec.text_encoders[0].config.width

    def enc(text, text_2):
        return encode_prompt(base.text_encoders, base.spec.text_encoders, base.tokenizer, text, text_2=text_2)

    p = GenerationParams(prompt="[a cat:a dog:0.3] on grass", prompt_2="a (lake:1.5) [at dawn:at dusk:0.6]",
                         steps=10, negative_prompt="blurry", negative_prompt_2="[dark:grainy:0.5]")
    conds = conditioning(base, p)
    ((weight, sched),) = conds.parts
    assert weight == 1.0 and [end for end, _ in sched] == [3, 6, 10]  # edits at steps 3 (prompt) and 6 (prompt_2)
    expected = [("a cat on grass", "a (lake:1.5) at dawn"), ("a dog on grass", "a (lake:1.5) at dawn"),
                ("a dog on grass", "a (lake:1.5) at dusk")]
    for (_, got), (text, text_2) in zip(sched, expected):
        want = enc(text, text_2)
        assert torch.equal(got.context, want.context) and torch.equal(got.pooled, want.pooled)
    assert [end for end, _ in conds.negative] == [5, 10]
    assert torch.equal(_Conds.at(conds.negative, 6).context, enc("blurry", "grainy").context)

    plain = enc("a dog on grass", "a lake at dusk")
    weighted = sched[-1][1]
    assert torch.equal(weighted.context[..., :w1], plain.context[..., :w1])  # CLIP-L: prompt only
    assert (weighted.context[..., w1:] - plain.context[..., w1:]).abs().max() > 1e-3  # emphasis on bigG

    anded = conditioning(base, GenerationParams(prompt="a cat AND a dog :0.5", prompt_2="oil AND ink", steps=10))
    assert [w for w, _ in anded.parts] == [1.0, 0.5]
    for (_, s), (text, text_2) in zip(anded.parts, [("a cat", "oil"), ("a dog", "ink")]):
        assert torch.equal(s[0][1].context, enc(text, text_2).context)


def test_cli_img2img_with_refiner_and_every_negative_option(folders, ours, tmp_path):
    """Every SDXL option of the CLI reaches the pipeline and the PNG metadata, on img2img with a refiner."""
    from sfumato.cli import main
    from sfumato.metadata import params_from_infotext, read_parameters

    src, out = tmp_path / "in.png", tmp_path / "xl-i2i.png"
    _image(11).save(src)
    code = main(["img2img", str(src), "a boat", "--model", str(folders[0]), "--refiner", str(folders[1]),
                 "--switch-at", "0.6", "--strength", "0.7", "--negative", "fog", "--negative-2", "dark",
                 "--target-size", "40x32", "--negative-original-size", "24x16", "--negative-target-size", "32x32",
                 "--negative-crop", "6,2", "--negative-aesthetic-score", "1.5", "--steps", "6", "--seed", "5",
                 "--sampler", "euler", "-o", str(out), "-q"])
    assert code == 0
    text = read_parameters(out)
    for part in ("Negative prompt 2: dark", "Target size: 40x32", "Negative original size: 24x16",
                 "Negative target size: 32x32", 'Negative crop top left: "6,2"', "Negative aesthetic score: 1.5",
                 "Refiner switch at: 0.6"):
        assert part in text, (part, text)
    p = params_from_infotext(text)
    assert (p.target_size, p.negative_original_size, p.negative_crops_coords_top_left) == ((32, 40), (16, 24), (2, 6))
    want = ours[0].img2img(Image.open(src), "a boat", "fog", negative_prompt_2="dark", strength=0.7, steps=6,
                           seed=5, sampler="euler", target_size=(32, 40), negative_original_size=(16, 24),
                           negative_target_size=(32, 32), negative_crops_coords_top_left=(2, 6),
                           negative_aesthetic_score=1.5, refiner=ours[1], refiner_switch_at=0.6).images[0]
    assert _maxdiff(Image.open(out).convert("RGB"), want) == 0
    plain = ours[0].img2img(Image.open(src), "a boat", "fog", strength=0.7, steps=6, seed=5, sampler="euler",
                            refiner=ours[1], refiner_switch_at=0.6).images[0]
    assert _maxdiff(plain, want) > 1, "the negative options changed nothing"
