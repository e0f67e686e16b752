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


def _field(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([torch.sin(xx / 7) + torch.cos(yy / 5), xx / w - yy / h])[None]  # (1, 2, h, w), smooth


def _window_edges(tiling, n: int) -> set[int]:
    return {s for s in tiling.starts(n) if s > 0} | {s + tiling.size for s in tiling.starts(n) if s + tiling.size < n}


def test_tiling_is_exact_for_local_operators_away_from_window_edges():
    """A 3x3 convolution tiled equals it untiled wherever the window edge (where the window's zero padding
    differs from the true neighbours) is more than a pixel away: the blend itself adds no error."""
    from sfumato.pipeline import Tiling

    x, extra = _field(70, 90), torch.randn(1, 1, 70, 90, generator=torch.Generator().manual_seed(0))
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def fn(x, e):
        with torch.no_grad():
            return conv(torch.cat([x, e], 1))

    t = Tiling(24, 8)
    got, want = t.apply(fn, x, extra), fn(x, extra)
    near = torch.zeros(70, 90, dtype=torch.bool)
    for e in _window_edges(t, 70):
        near[max(e - 1, 0):e + 1] = True
    for e in _window_edges(t, 90):
        near[:, max(e - 1, 0):e + 1] = True
    err = (got - want).abs()[0].amax(0)
    assert err[~near].max() < 1e-5, f"tiled vs untiled away from window edges: max|diff| {err[~near].max():.2e}"
    assert err[near].max() > 1e-4, "the window edges see zero padding: a test that cannot see them proves nothing"


@pytest.mark.parametrize("overlap,seamless", [(8, True), (0, False)])
def test_tiling_blend_leaves_no_seam(overlap, seamless):
    """A window-global operator (GroupNorm-like: each window minus its mean) shows every seam a tiling makes:
    with the feathered overlap the largest step across a window edge is no larger than the largest step
    elsewhere; without overlap (control) the edges jump."""
    from sfumato.pipeline import Tiling

    x = _field(64, 96)
    t = Tiling(32, overlap)
    out = t.apply(lambda x, e: x - x.mean(dim=(-2, -1), keepdim=True), x)[0]
    step_x = (out[..., 1:] - out[..., :-1]).abs().amax(dim=(0, 1))  # per column boundary c|c+1
    edges = [e - 1 for e in _window_edges(t, 96)]
    others = [i for i in range(95) if i not in edges]
    at_edges, elsewhere = float(step_x[edges].max()), float(step_x[others].max())
    assert (at_edges <= elsewhere * 1.01) == seamless, f"overlap {overlap}: step {at_edges:.3f} at window edges, " \
                                                       f"{elsewhere:.3f} elsewhere"


def test_tiled_upscale(folders):
    """The x4 upscaler tiled: a tile as large as the image is the untiled path (bit for bit); smaller tiles
    give the full-size image, recorded in the infotext, differing from the untiled one no more at the window
    edges than elsewhere (the tiny random model differs everywhere: attention and group norms see one window;
    measured mean |diff| 12/255 on this random model, far less on a trained one)."""
    up = sfumato.load(folders["upscaler"])
    yy, xx = np.mgrid[0:48, 0:48]
    low = Image.fromarray(np.stack([xx * 5, yy * 5, (xx + yy) * 2], -1).astype(np.uint8))
    kw = dict(steps=3, cfg_scale=7.0, sampler="euler", seed=3, noise_level=20)
    whole = up.upscale(low, "x", tile_size=None, **kw)
    assert "Tile size" not in whole.infotexts[0]
    assert _diff(up.upscale(low, "x", tile_size=48, **kw).images[0], whole.images[0]) == 0
    tiled = up.upscale(low, "x", tile_size=24, tile_overlap=8, **kw)
    assert tiled.images[0].size == (192, 192) and "Tile size: 24, Tile overlap: 8" in tiled.infotexts[0]
    d = np.abs(np.asarray(tiled.images[0], np.float32) - np.asarray(whole.images[0], np.float32)).mean(axis=(0, 2))
    from sfumato.pipeline import Tiling

    edges = [4 * e for e in _window_edges(Tiling(24, 8), 48)]
    assert d[edges].max() <= 1.5 * np.median(d), f"tiled vs untiled at window edges {d[edges]}, median {np.median(d)}"
    with pytest.raises(InvalidParameterError, match="tile overlap 20 is out of range: allowed integers 0..12"):
        up.upscale(low, "x", tile_size=24, tile_overlap=20, **kw)


def test_depth2img_estimates_depth_like_diffusers(folders, tmp_path):
    """No depth map given: the folder's MiDaS DPT-Hybrid (a tiny random one) estimates it from the image,
    as StableDiffusionDepth2ImgPipeline does with its depth_estimator and DPTImageProcessor."""
    import diffusers
    from transformers import DPTImageProcessorPil

    from tests.test_depth import reference

    torch.manual_seed(0)
    ref = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(
        str(folders["depth"]), depth_estimator=reference(), feature_extractor=DPTImageProcessorPil(
            size={"height": 64, "width": 64}))
    ref.save_pretrained(tmp_path / "depth-est", safe_serialization=True)
    ref.set_progress_bar_config(disable=True)
    ours = sfumato.load(tmp_path / "depth-est")
    assert ours.depth_model is not None
    image = _image(6)
    got = ours.depth2img(image, "a room", "blurry", strength=0.7, steps=4, cfg_scale=6.0, sampler="euler",
                         schedule="leading", seed=8).images[0]
    want = ref("a room", image=image, negative_prompt="blurry", strength=0.7, num_inference_steps=4,
               guidance_scale=6.0, generator=torch.Generator().manual_seed(8)).images[0]
    d = _diff(got, want)
    assert d <= 1, f"depth2img with estimated depth: max|diff| {d}/255 against diffusers"
    flat = ours.depth2img(image, "a room", "blurry", strength=0.7, steps=4, cfg_scale=6.0, sampler="euler",
                          schedule="leading", seed=8, depth_map=np.indices((64, 64))[1].astype(np.float32)).images[0]
    assert _diff(got, flat) > 2, "the estimated depth must be what conditions the image"
    # written back as a diffusers folder, the estimator and its preprocessing go along: diffusers reads it
    written = ours.save(tmp_path / "written", format="diffusers")
    back = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(str(written))
    back.set_progress_bar_config(disable=True)
    again = back("a room", image=image, negative_prompt="blurry", strength=0.7, num_inference_steps=4,
                 guidance_scale=6.0, generator=torch.Generator().manual_seed(8)).images[0]
    assert _diff(again, want) <= 1, "diffusers must read the depth folder sfumato writes"


def test_cli_upscale_and_estimated_depth(folders, tmp_path):
    from sfumato.cli import main

    _image(4, 24).save(tmp_path / "small.png")
    common = ["--steps", "3", "--seed", "2", "--sampler", "euler", "-q"]
    assert main(["upscale", str(tmp_path / "small.png"), "sharp", "--model", str(folders["upscaler"]),
                 "--noise-level", "30", "--tile", "16", "--tile-overlap", "4", *common,
                 "-o", str(tmp_path / "u.png")]) == 0
    want = sfumato.load(folders["upscaler"]).upscale(_image(4, 24), "sharp", noise_level=30, tile_size=16,
                                                     tile_overlap=4, steps=3, seed=2, sampler="euler")
    out = Image.open(tmp_path / "u.png")
    assert out.size == (96, 96) and _diff(out.convert("RGB"), want.images[0]) == 0
    assert "Noise level: 30" in out.info["parameters"] and "Tile size: 16" in out.info["parameters"]
    assert main(["upscale", str(tmp_path / "small.png"), "--model", str(folders["upscaler"]), "--width", "64",
                 *common, "-o", str(tmp_path / "bad.png")]) == 2
    # a depth model without an estimator and no --depth: a clear refusal, exit 2
    assert main(["depth2img", str(tmp_path / "small.png"), "x", "--model", str(folders["depth"]), *common,
                 "-o", str(tmp_path / "d.png")]) == 2


def test_upscaler_folder_we_write_loads_in_diffusers(folders, tmp_path):
    import diffusers

    written = sfumato.load(folders["upscaler"]).save(tmp_path / "up", format="diffusers")
    ref = diffusers.StableDiffusionUpscalePipeline.from_pretrained(str(written))
    assert ref.low_res_scheduler.config.beta_schedule == "scaled_linear" and ref.config.max_noise_level == 350
