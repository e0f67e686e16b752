"""The SD 2 model zoo (issue 9) on tiny random models against diffusers: instruct-pix2pix editing
(``StableDiffusionInstructPix2PixPipeline``, three-way guidance), depth-to-image with a given depth map
(``StableDiffusionDepth2ImgPipeline``) and the x4 upscaler (``StableDiffusionUpscalePipeline``): same seed ->
same image, max|diff| <= 1/255."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato
from sfumato.errors import InvalidParameterError
from tests import tiny

SIZE = 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    import diffusers

    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    pix = diffusers.StableDiffusionInstructPix2PixPipeline(
        vae=tiny._vae((32, 32, 64, 64)), text_encoder=tiny._text(), tokenizer=tiny._tokenizer("<|endoftext|>"),
        unet=tiny.sd1_unet(8), scheduler=tiny._scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pix.save_pretrained(root / "pix2pix", safe_serialization=True)
    depth = diffusers.StableDiffusionDepth2ImgPipeline(
        vae=tiny._vae((32, 32, 64, 64)), text_encoder=tiny._text(layers=3, act="gelu", pad_id=0),
        tokenizer=tiny._tokenizer("!"), unet=tiny.sd2_unet(5), scheduler=tiny._scheduler(), depth_estimator=None,
        feature_extractor=None)
    depth.save_pretrained(root / "depth", safe_serialization=True)
    # the x4 upscaler's layout, tiny: 7 input channels, 1000 noise-level classes, self-attention off where the
    # official one has it off, a 4x autoencoder with its scaling factor, v-prediction, both schedules LDM's
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=7, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, use_linear_projection=True, num_class_embeds=1000,
        only_cross_attention=(True, False), norm_num_groups=32).eval()
    up = diffusers.StableDiffusionUpscalePipeline(
        vae=tiny._vae((32, 32, 64), scaling_factor=0.08333), text_encoder=tiny._text(layers=3, act="gelu", pad_id=0),
        tokenizer=tiny._tokenizer("!"), unet=unet, max_noise_level=350,
        low_res_scheduler=diffusers.DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear"),
        scheduler=diffusers.EulerDiscreteScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                                                   prediction_type="v_prediction", timestep_spacing="leading",
                                                   steps_offset=1))
    up.save_pretrained(root / "upscaler", safe_serialization=True)
    return {"pix2pix": root / "pix2pix", "depth": root / "depth", "upscaler": root / "upscaler"}


def _image(seed: int, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))


def _diff(a, b) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


@pytest.mark.parametrize("cfg,image_cfg", [(7.5, 1.5), (4.0, 1.0), (1.0, 1.5)])
def test_edit_matches_diffusers(folders, cfg, image_cfg):
    import diffusers

    ours = sfumato.load(folders["pix2pix"])
    assert ours.spec.family == "sd1-pix2pix"
    image = _image(1)
    got = ours.edit(image, "make it snowy", "blurry", image_cfg_scale=image_cfg, cfg_scale=cfg, steps=4,
                    sampler="euler", schedule="leading", seed=3)
    ref = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
        str(folders["pix2pix"]), safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    want = ref("make it snowy", image=image, negative_prompt="blurry", num_inference_steps=4, guidance_scale=cfg,
               image_guidance_scale=image_cfg, generator=torch.Generator().manual_seed(3)).images[0]
    d = _diff(got.images[0], want)
    assert d <= 1, f"edit cfg {cfg} image cfg {image_cfg}: max|diff| {d}/255 against diffusers"
    if cfg > 1:
        assert f"Image CFG scale: {image_cfg:g}" in got.infotexts[0]


@pytest.mark.parametrize("depth_kind", ["array", "image"])
def test_depth2img_matches_diffusers(folders, depth_kind):
    import diffusers

    ours = sfumato.load(folders["depth"])
    assert ours.spec.family == "sd2-depth"
    image = _image(2)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    depth = (np.hypot(yy - 20.0, xx - 40.0) * 3).astype(np.float32)  # a cone: nearest away from the centre
    given = depth if depth_kind == "array" else Image.fromarray(depth.round().astype(np.uint8))
    got = ours.depth2img(image, "a room", "blurry", strength=0.7, depth_map=given, steps=5, cfg_scale=6.0,
                         sampler="euler", schedule="leading", seed=8).images[0]
    flat = ours.depth2img(image, "a room", "blurry", strength=0.7, depth_map=depth.max() - depth, steps=5,
                          cfg_scale=6.0, sampler="euler", schedule="leading", seed=8).images[0]
    ref = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(str(folders["depth"]), depth_estimator=None,
                                                                     feature_extractor=None)
    ref.set_progress_bar_config(disable=True)
    ref_depth = torch.from_numpy(np.asarray(given, dtype=np.float32).copy())[None]
    want = ref("a room", image=image, depth_map=ref_depth, negative_prompt="blurry", strength=0.7,
               num_inference_steps=5, guidance_scale=6.0, generator=torch.Generator().manual_seed(8)).images[0]
    d = _diff(got, want)
    assert d <= 1, f"depth2img ({depth_kind}): max|diff| {d}/255 against diffusers"
    assert _diff(got, flat) > 2, "the depth map must change the image"


@pytest.mark.parametrize("noise_level", [20, 150])
def test_upscale_matches_diffusers(folders, noise_level):
    import diffusers

    ours = sfumato.load(folders["upscaler"])
    assert ours.spec.family == "sd2-upscaler"
    low = _image(5, 16)
    got = ours.upscale(low, "a sharp photo", "blurry", noise_level=noise_level, steps=4, cfg_scale=7.0,
                       sampler="euler", schedule="leading", seed=9)
    assert got.images[0].size == (64, 64)
    ref = diffusers.StableDiffusionUpscalePipeline.from_pretrained(str(folders["upscaler"]))
    ref.set_progress_bar_config(disable=True)
    want = ref("a sharp photo", image=low, negative_prompt="blurry", noise_level=noise_level, num_inference_steps=4,
               guidance_scale=7.0, generator=torch.Generator().manual_seed(9)).images[0]
    d = _diff(got.images[0], want)
    assert d <= 1, f"upscale noise level {noise_level}: max|diff| {d}/255 against diffusers"
    assert f"Noise level: {noise_level}" in got.infotexts[0]


def test_zoo_refusals(folders):
    pix, depth = sfumato.load(folders["pix2pix"]), sfumato.load(folders["depth"])
    with pytest.raises(InvalidParameterError, match="depth2img needs a depth model.*sd1-pix2pix"):
        pix.depth2img(_image(0), "x", depth_map=np.ones((8, 8)))
    with pytest.raises(InvalidParameterError, match="edit needs an instruct-pix2pix model.*sd2-depth"):
        depth.edit(_image(0), "x")
    with pytest.raises(InvalidParameterError, match="needs its extra input: use edit"):
        pix.generate("x", width=SIZE, height=SIZE, steps=2)
    with pytest.raises(InvalidParameterError, match="depth2img needs depth_map"):
        depth.depth2img(_image(0), "x")
    with pytest.raises(InvalidParameterError, match="flat"):
        depth.depth2img(_image(0), "x", depth_map=np.ones((8, 8)))
    with pytest.raises(InvalidParameterError, match="one finite"):
        depth.depth2img(_image(0), "x", depth_map=np.ones((2, 8, 8)))
    with pytest.raises(InvalidParameterError, match="image_cfg_scale"):
        pix.edit(_image(0), "x", image_cfg_scale=-1)
    up = sfumato.load(folders["upscaler"])
    with pytest.raises(InvalidParameterError, match="noise_level=351 is out of range"):
        up.upscale(_image(0, 16), "x", noise_level=351)
    with pytest.raises(InvalidParameterError, match="use upscale"):
        up.generate("x", width=SIZE, height=SIZE, steps=2)


def test_cli_edit_and_depth2img(folders, tmp_path):
    from sfumato.cli import main

    _image(4).save(tmp_path / "in.png")
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    Image.fromarray((yy * 3).astype(np.uint8)).save(tmp_path / "depth.png")
    common = ["--steps", "3", "--seed", "2", "--sampler", "euler", "-q"]
    assert main(["edit", str(tmp_path / "in.png"), "add a hat", "--model", str(folders["pix2pix"]), "--image-cfg",
                 "1.2", "--cfg", "5", *common, "-o", str(tmp_path / "e.png")]) == 0
    want = sfumato.load(folders["pix2pix"]).edit(_image(4), "add a hat", image_cfg_scale=1.2, cfg_scale=5.0, steps=3,
                                                 seed=2, sampler="euler")
    assert _diff(Image.open(tmp_path / "e.png").convert("RGB"), want.images[0]) == 0
    assert "Image CFG scale: 1.2" in Image.open(tmp_path / "e.png").info["parameters"]
    assert main(["depth2img", str(tmp_path / "in.png"), "a room", "--model", str(folders["depth"]), "--depth",
                 str(tmp_path / "depth.png"), "--strength", "0.6", *common, "-o", str(tmp_path / "d.png")]) == 0
    want = sfumato.load(folders["depth"]).depth2img(_image(4), "a room", strength=0.6, steps=3, seed=2,
                                                    sampler="euler", depth_map=Image.open(tmp_path / "depth.png"))
    assert _diff(Image.open(tmp_path / "d.png").convert("RGB"), want.images[0]) == 0
    assert main(["edit", str(tmp_path / "in.png"), "x", "--model", str(folders["pix2pix"]), "--image-cfg", "-2",
                 *common, "-o", str(tmp_path / "bad.png")]) == 2
