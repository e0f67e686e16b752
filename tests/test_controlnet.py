"""ControlNet (issue 8): a tiny random SD 1.x ControlNet, loaded from a diffusers folder and from an original
single file, against diffusers' ``ControlNetModel`` and ``StableDiffusionControlNetPipeline``: the same
residuals (relative max|diff| <= 1e-5) and the same images (max|diff| <= 1/255) with one and two
ControlNets, start/end ranges, guess mode and img2img; canny edges; refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato
from sfumato.adapters.controlnet import ControlUnit, canny
from sfumato.errors import CheckpointError, InvalidParameterError
from sfumato.weights.io import write_safetensors
from tests import tiny

SIZE = 64  # an 8x VAE: 8x8 latents; the ControlNet's hint encoder downsamples 8x too


def _random_controlnets(base: Path, seeds: tuple[int, ...]) -> list[Path]:
    """diffusers ControlNets copied from ``base``'s UNet with every weight randomised (its zero convs start
    at 0, which would hide the residuals), saved beside it as ``<base>-cn<seed>``."""
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")
    out = []
    for seed in seeds:
        cn = diffusers.ControlNetModel.from_unet(unet)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in cn.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.ndim > 1 else 0.02))
        folder = base.with_name(f"{base.name}-cn{seed}")
        cn.save_pretrained(folder, safe_serialization=True)
        out.append(folder)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn")
    sd1 = tiny.build("sd1", root / "sd1", seed=40, vae_blocks=(32, 32, 64, 64))
    nets = _random_controlnets(sd1, (1, 2))
    # the first one also as an original (cldm) single file, written from our own loaded copy
    m = sfumato.load(sd1).load_controlnet(nets[0])
    write_safetensors(root / "cn1-original.safetensors", {f"control_model.{k}": v for k, v in m.state_dict().items()})
    xl = tiny.build("sdxl", root / "sdxl", seed=41, vae_blocks=(32, 32, 64, 64))
    return {"base": sd1, "nets": nets, "single": root / "cn1-original.safetensors",
            "xl": xl, "xl_nets": _random_controlnets(xl, (3, 4))}


def _control_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))


def _diff(a, b) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


@torch.no_grad()
@pytest.mark.parametrize("source", ["folder", "single"])
def test_residuals_match_diffusers(setup, source):
    import diffusers

    ours = sfumato.load(setup["base"])
    cn = ours.load_controlnet(setup["nets"][0] if source == "folder" else setup["single"])
    ref = diffusers.ControlNetModel.from_pretrained(str(setup["nets"][0])).eval()
    g = torch.Generator().manual_seed(3)
    x, hint = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, SIZE, SIZE, generator=g)
    t, ctx = torch.tensor([300, 700]), torch.randn(2, 77, 64, generator=g)
    got = cn(x, hint, t, ctx)
    down, mid = ref(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
    want = [*down, mid]
    assert len(got) == len(want)
    worst = max((a - b).abs().max().item() / b.abs().max().item() for a, b in zip(got, want))
    assert worst <= 1e-5, f"{source}: relative max|diff| {worst:.2e}"


def _reference(setup, nets, kind="txt2img"):
    import diffusers

    cns = [diffusers.ControlNetModel.from_pretrained(str(p)) for p in nets]
    cls = (diffusers.StableDiffusionControlNetPipeline if kind == "txt2img"
           else diffusers.StableDiffusionControlNetImg2ImgPipeline)
    pipe = cls.from_pretrained(str(setup["base"]), controlnet=cns if len(cns) > 1 else cns[0],
                               safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("case", ["one", "range", "two", "guess"])
def test_txt2img_matches_diffusers(setup, case):
    ours = sfumato.load(setup["base"])
    n = 2 if case == "two" else 1
    nets = setup["nets"][:n]
    images = [_control_image(i) for i in range(n)]
    weights, starts, ends = [0.8, 0.5][:n], [0.0, 0.2][:n], [1.0, 0.9][:n]
    if case == "range":
        starts, ends = [0.25], [0.75]
    units = [ControlUnit(ours.load_controlnet(p), im, w, s, e, name=p.name)
             for p, im, w, s, e in zip(nets, images, weights, starts, ends)]
    kw = dict(width=SIZE, height=SIZE, steps=4, cfg_scale=5.0, sampler="euler", schedule="leading", seed=5)
    got = ours.generate("a red circle", "blurry", controlnet=units, guess_mode=case == "guess", **kw)
    plain = ours.generate("a red circle", "blurry", **kw)
    ref = _reference(setup, nets)
    one = n == 1
    want = ref("a red circle", negative_prompt="blurry", image=images[0] if one else images, num_inference_steps=4,
               guidance_scale=5.0, width=SIZE, height=SIZE, generator=torch.Generator().manual_seed(5),
               controlnet_conditioning_scale=weights[0] if one else weights,
               control_guidance_start=starts[0] if one else starts, control_guidance_end=ends[0] if one else ends,
               guess_mode=case == "guess").images[0]
    d, moved = _diff(got.images[0], want), _diff(got.images[0], plain.images[0])
    assert d <= 1 and moved > 2, f"{case}: max|diff| {d}/255 against diffusers, ControlNet moved the image {moved}/255"
    assert f"ControlNet 0: \"Module: none, Model: {nets[0].name}, Weight: {weights[0]:g}" in got.infotexts[0]
    assert f"Control Mode: {'Guess' if case == 'guess' else 'Balanced'}\"" in got.infotexts[0]


@pytest.mark.parametrize("n", [1, 2])
def test_sdxl_matches_diffusers(setup, n):
    import diffusers

    ours = sfumato.load(setup["xl"])
    nets, images, weights = setup["xl_nets"][:n], [_control_image(10 + i) for i in range(n)], [0.9, 0.6][:n]
    units = [ControlUnit(ours.load_controlnet(p), im, w) for p, im, w in zip(nets, images, weights)]
    kw = dict(width=SIZE, height=SIZE, steps=4, cfg_scale=5.0, sampler="euler", schedule="leading", seed=8)
    got = ours.generate("a red circle", "blurry", controlnet=units, **kw).images[0]
    plain = ours.generate("a red circle", "blurry", **kw).images[0]
    cns = [diffusers.ControlNetModel.from_pretrained(str(p)) for p in nets]
    ref = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(str(setup["xl"]),
                                                                        controlnet=cns if n > 1 else cns[0])
    ref.set_progress_bar_config(disable=True)
    want = ref("a red circle", negative_prompt="blurry", image=images if n > 1 else images[0], num_inference_steps=4,
               guidance_scale=5.0, width=SIZE, height=SIZE, generator=torch.Generator().manual_seed(8),
               controlnet_conditioning_scale=weights if n > 1 else weights[0]).images[0]
    d, moved = _diff(got, want), _diff(got, plain)
    assert d <= 1 and moved > 2, f"SDXL x{n}: max|diff| {d}/255 against diffusers, ControlNet moved it {moved}/255"


@torch.no_grad()
@pytest.mark.parametrize("layout", ["diffusers-file", "original-file"])
def test_sdxl_single_files_match_diffusers(setup, tmp_path, layout):
    """SDXL ControlNets published as one file: the diffusers layout without config.json (as lllyasviel's
    ``diffusers_xl_canny_small``, whose transformer depths, read from its keys, are not its base's) and the
    original (cldm) layout; residuals against diffusers' ``ControlNetModel`` (relative max|diff| <= 1e-5)."""
    import diffusers

    from sfumato.models.unet import timestep_embedding

    ours = sfumato.load(setup["xl"])
    full = diffusers.ControlNetModel.from_pretrained(str(setup["xl_nets"][0]))
    ref = diffusers.ControlNetModel.from_config({**full.config, "transformer_layers_per_block": [1, 1]}).eval()
    g = torch.Generator().manual_seed(12)
    for p in ref.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.ndim > 1 else 0.02))
    path = tmp_path / "xl-small.safetensors"
    write_safetensors(path, {k: v.contiguous() for k, v in ref.state_dict().items()})
    if layout == "original-file":
        loaded = ours.load_controlnet(path)
        path = tmp_path / "xl-small-cldm.safetensors"
        write_safetensors(path, {f"control_model.{k}": v for k, v in loaded.state_dict().items()})
        with pytest.raises(CheckpointError):  # an original file takes its base's depths: this one does not fit
            ours.load_controlnet(path)
        ref, path = full, tmp_path / "xl-full-cldm.safetensors"
        write_safetensors(path, {f"control_model.{k}": v
                                 for k, v in ours.load_controlnet(setup["xl_nets"][0]).state_dict().items()})
    cn = ours.load_controlnet(path)
    x, hint = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, SIZE, SIZE, generator=g)
    t, ctx = torch.tensor([200, 800]), torch.randn(2, 77, ours.spec.unet.context_dim, generator=g)
    pooled = torch.randn(2, ours.spec.unet.adm_in_channels - 6 * 256, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 64, 8, 0, 64, 64]])
    y = torch.cat([pooled, timestep_embedding(ids.flatten(), 256).reshape(2, -1)], dim=1)  # as the pipeline builds it
    got = cn(x, hint, t, ctx, y)
    down, mid = ref(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
    want = [*down, mid]
    assert len(got) == len(want)
    worst = max((a - b).abs().max().item() / b.abs().max().item() for a, b in zip(got, want))
    assert worst <= 1e-5, f"{layout}: relative max|diff| {worst:.2e}"


def test_img2img_matches_diffusers(setup):
    ours = sfumato.load(setup["base"])
    unit = ControlUnit(ours.load_controlnet(setup["nets"][1]), _control_image(7), 1.0)
    init = _control_image(8)
    got = ours.img2img(init, "a house", strength=0.6, steps=5, cfg_scale=4.0, sampler="euler", schedule="leading",
                       seed=2, controlnet=unit).images[0]
    ref = _reference(setup, setup["nets"][1:], kind="img2img")
    want = ref("a house", image=init, control_image=unit.image, strength=0.6, num_inference_steps=5,
               guidance_scale=4.0, controlnet_conditioning_scale=1.0, generator=torch.Generator().manual_seed(2)).images[0]
    assert _diff(got, want) <= 1, f"img2img: max|diff| {_diff(got, want)}/255"


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_matches_diffusers(setup, strength):
    """Inpainting with a ControlNet on an ordinary (4-channel) model: diffusers'
    ``StableDiffusionControlNetInpaintPipeline`` blends the known latents back after every step as ours does."""
    import diffusers

    ours = sfumato.load(setup["base"])
    unit = ControlUnit(ours.load_controlnet(setup["nets"][0]), _control_image(11), 0.9)
    init = _control_image(12)
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[8:40, 16:56] = 255
    mask = Image.fromarray(m)
    kw = dict(strength=strength, steps=6, cfg_scale=5.0, sampler="euler", schedule="leading", seed=4, mask_blur=0)
    got = ours.inpaint(init, mask, "a house", controlnet=unit, **kw).images[0]
    plain = ours.inpaint(init, mask, "a house", **kw).images[0]
    ref = diffusers.StableDiffusionControlNetInpaintPipeline.from_pretrained(
        str(setup["base"]), controlnet=diffusers.ControlNetModel.from_pretrained(str(setup["nets"][0])),
        safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    want = ref("a house", image=init, mask_image=mask, control_image=unit.image, strength=strength,
               num_inference_steps=6, guidance_scale=5.0, controlnet_conditioning_scale=0.9, height=SIZE, width=SIZE,
               generator=torch.Generator().manual_seed(4)).images[0]
    d, moved = _diff(got, want), _diff(got, plain)
    assert d <= 1 and moved > 2, f"inpaint {strength}: max|diff| {d}/255 against diffusers, ControlNet moved it {moved}/255"


@torch.no_grad()
def test_control_modes_scale_and_mask_the_residuals(setup):
    """AUTOMATIC1111's control modes: "prompt" scales residual i of n by 0.825 ** (n - 1 - i) (its soft
    injection); "control" does the same on the conditional rows only, zeros on the negative ones."""
    from sfumato.pipeline import _control_residuals

    ours = sfumato.load(setup["base"])
    cn = ours.load_controlnet(setup["nets"][0])
    g = torch.Generator().manual_seed(9)
    x, hint = torch.randn(4, 4, 8, 8, generator=g), torch.rand(1, 3, SIZE, SIZE, generator=g)
    t, ctx = torch.tensor([500] * 4), torch.randn(4, 77, 64, generator=g)
    state = {"step": 0, "run_start": 0, "run_steps": 4}

    def residuals(mode: str) -> list[torch.Tensor]:
        unit = ControlUnit(cn, _control_image(0), 0.7, mode=mode)
        return _control_residuals([(unit, hint)], state, x, t, ctx, None, 2, 2, True, False)

    plain, prompt, control = residuals("balanced"), residuals("prompt"), residuals("control")
    n = len(plain)
    for i in range(n):
        s = 0.825 ** (n - 1 - i)
        assert torch.allclose(prompt[i], plain[i] * s, rtol=1e-5, atol=1e-7), f"residual {i}"
        assert not control[i][:2].any(), f"residual {i}: the negative rows must get no control"
        assert torch.allclose(control[i][2:], prompt[i][2:], rtol=1e-5, atol=1e-6), f"residual {i}"
    with pytest.raises(InvalidParameterError, match="mode='strong' is not one of balanced, prompt, control"):
        ControlUnit(cn, _control_image(0), mode="strong")


def test_control_mode_on_images_and_without_guidance(setup):
    """Without guidance there are no negative rows, so "control" equals "prompt" exactly; with it, both
    differ from "balanced" and from each other; the infotext names the mode as the extension does."""
    ours = sfumato.load(setup["base"])
    cn = ours.load_controlnet(setup["nets"][0])
    kw = dict(width=SIZE, height=SIZE, steps=3, sampler="euler", seed=6)

    def image(mode: str, cfg: float):
        r = ours.generate("a tree", controlnet=ControlUnit(cn, _control_image(3), mode=mode), cfg_scale=cfg, **kw)
        return r.images[0], r.infotexts[0]

    assert _diff(image("control", 1.0)[0], image("prompt", 1.0)[0]) == 0
    (b, _), (p, text), (c, _) = image("balanced", 5.0), image("prompt", 5.0), image("control", 5.0)
    assert _diff(b, p) > 0 and _diff(p, c) > 0 and _diff(b, c) > 0
    assert "Control Mode: My prompt is more important" in text


def test_resize_modes_and_preprocessors():
    from sfumato.adapters.controlnet import fit_image, preprocess

    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    wide.paste((0, 0, 255), (32, 0, 64, 32))  # red left half, blue right half
    crop = np.asarray(fit_image(wide, 32, 32, "crop"))  # scaled to 64x32 (covers), centre 32 columns kept
    assert (crop[:, :14, 0] > 200).all() and (crop[:, 18:, 2] > 200).all()
    fill = np.asarray(fit_image(wide, 32, 32, "fill"))  # scaled to 32x16, black bars above and below
    assert not fill[:7].any() and not fill[-7:].any() and (fill[10:22, :14, 0] > 200).all()
    stretch = np.asarray(fit_image(wide, 32, 32, "stretch"))
    assert (stretch[:, :14, 0] > 200).all() and (stretch[:, 18:, 2] > 200).all() and stretch.shape == (32, 32, 3)

    square = Image.new("RGB", (64, 64), (0, 0, 0))
    square.paste((255, 255, 255), (16, 16, 48, 48))
    assert np.array_equal(np.asarray(preprocess(square, "canny")), np.asarray(canny(square, 100, 200)))
    assert np.array_equal(np.asarray(preprocess(square, "canny", 50, 80)), np.asarray(canny(square, 50, 80)))
    assert np.array_equal(np.asarray(preprocess(square, "invert")), 255 - np.asarray(square))
    with pytest.raises(InvalidParameterError, match="preprocessor 'depth_midas' is not available; available: none, "
                                                    "canny, invert"):
        preprocess(square, "depth_midas")


def test_inpaint_full_res_crops_the_control_image(setup):
    """"Inpaint at full resolution" with a ControlNet: the control image is cropped to the mask's region
    with the init image; outside the mask the image stays the original."""
    ours = sfumato.load(setup["base"])
    unit = ControlUnit(ours.load_controlnet(setup["nets"][0]), _control_image(21).resize((128, 128)), 1.0,
                       resize="crop")
    init = _control_image(22).resize((128, 128))
    m = np.zeros((128, 128), np.uint8)
    m[16:48, 16:48] = 255
    kw = dict(steps=3, cfg_scale=4.0, sampler="euler", seed=1, mask_blur=0, inpaint_full_res=True, padding=8,
              width=SIZE, height=SIZE)
    got = ours.inpaint(init, Image.fromarray(m), "a cat", controlnet=unit, **kw).images[0]
    plain = ours.inpaint(init, Image.fromarray(m), "a cat", **kw).images[0]
    assert got.size == (128, 128)
    outside = np.asarray(got, np.int16)[64:], np.asarray(init, np.int16)[64:]
    assert np.abs(outside[0] - outside[1]).max() == 0, "the unmasked area must stay the original"
    assert _diff(got, plain) > 2, "the ControlNet must change the inpainted region"


def test_canny_finds_the_edges_of_a_square():
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.paste((255, 255, 255), (16, 16, 48, 48))
    edges = np.asarray(canny(img))[..., 0] > 0
    assert edges[20:44, 14:19].any(axis=1).all() and edges[20:44, 45:50].any(axis=1).all()  # left and right sides
    assert not edges[24:40, 24:40].any() and not edges[:8].any(), "no edges inside the square or far outside"
    assert set(np.unique(np.asarray(canny(img)))) <= {0, 255}
    with pytest.raises(InvalidParameterError, match="canny thresholds"):
        canny(img, 200, 100)


def test_refusals(setup, tmp_path):
    ours = sfumato.load(setup["base"])
    cn = ours.load_controlnet(setup["single"])
    with pytest.raises(InvalidParameterError, match="weight=11"):
        ControlUnit(cn, _control_image(0), weight=11)
    with pytest.raises(InvalidParameterError, match="start 0.5 must be below end 0.5"):
        ControlUnit(cn, _control_image(0), start=0.5, end=0.5)
    with pytest.raises(InvalidParameterError, match="guess_mode needs a controlnet"):
        ours.generate("x", width=SIZE, height=SIZE, steps=1, guess_mode=True)
    sd = {k: v for k, v in cn.state_dict().items()}
    k = next(k for k in sd if k.endswith("attn2.to_k.weight"))
    sd[k] = torch.zeros(sd[k].shape[0], 96)
    write_safetensors(tmp_path / "wide.safetensors", sd)
    with pytest.raises(CheckpointError, match="cross-attention width 96; sd1 has 64"):
        ours.load_controlnet(tmp_path / "wide.safetensors")
    write_safetensors(tmp_path / "not.safetensors", {"a": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        ours.load_controlnet(tmp_path / "not.safetensors")


def test_cli_controlnet(setup, tmp_path, capsys):
    from sfumato.cli import main

    image = tmp_path / "control.png"
    _control_image(3).save(image)
    common = ["--model", str(setup["base"]), "--width", str(SIZE), "--height", str(SIZE), "--steps", "3",
              "--seed", "4", "-q"]
    assert main(["generate", "a cat", *common, "--controlnet", str(setup["single"]), str(image),
                 "--control-weight", "0.7", "--control-range", "0:0.8", "--control-mode", "control",
                 "-o", str(tmp_path / "a.png")]) == 0
    ours = sfumato.load(setup["base"])
    unit = ControlUnit(ours.load_controlnet(setup["single"]), Image.open(image).convert("RGB"), 0.7, 0.0, 0.8,
                       mode="control")
    want = ours.generate("a cat", width=SIZE, height=SIZE, steps=3, seed=4, controlnet=unit).images[0]
    assert _diff(Image.open(tmp_path / "a.png").convert("RGB"), want) == 0
    assert "Control Mode: ControlNet is more important" in Image.open(tmp_path / "a.png").info["parameters"]
    assert main(["generate", "a cat", *common, "--guess-mode", "-o", str(tmp_path / "b.png")]) == 2
    assert "--guess-mode needs --controlnet" in capsys.readouterr().err
    assert main(["generate", "a cat", *common, "--controlnet", str(tmp_path / "absent"), str(image),
                 "-o", str(tmp_path / "c.png")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_server_controlnet_as_the_webui_extension(setup, tmp_path):
    """AUTOMATIC1111 clients drive ControlNet through ``alwayson_scripts.controlnet``: the server lists its
    ControlNet folder and preprocessors, runs a unit named with the extension's "name [hash]" title exactly
    as the Python API does, preprocesses with /controlnet/detect, and answers bad units with the valid names
    while it keeps serving."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    import base64
    import io
    import shutil

    from sfumato.server.app import ServerConfig

    from .server_util import running

    cns = tmp_path / "controlnet"
    cns.mkdir()
    shutil.copy(setup["single"], cns / "edges.safetensors")
    shutil.copytree(setup["nets"][1], cns / "depthy")

    def b64(im: Image.Image) -> str:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    control = _control_image(30)
    unit = {"image": b64(control), "module": "none", "model": "edges [0123abcd]", "weight": 0.8,
            "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": "My prompt is more important",
            "resize_mode": 0, "processor_res": 512, "threshold_a": -1, "threshold_b": -1}
    body = {"prompt": "a red circle", "negative_prompt": "blurry", "width": SIZE, "height": SIZE, "steps": 3,
            "seed": 5, "sampler_name": "Euler", "cfg_scale": 5.0, "alwayson_scripts": {"ControlNet": {"args": [unit]}}}
    config = ServerConfig(model=setup["base"], data_dir=tmp_path / "data", controlnet_dir=cns)
    with running(config) as srv:
        assert httpx.get(srv.url + "/controlnet/model_list", timeout=30).json() == {"model_list": ["depthy", "edges"]}
        modules = httpx.get(srv.url + "/controlnet/module_list", timeout=30).json()["module_list"]
        assert modules == ["none", "canny", "invert"]
        r = httpx.post(srv.url + "/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        bad_model = httpx.post(srv.url + "/sdapi/v1/txt2img", timeout=60, json={
            **body, "alwayson_scripts": {"controlnet": {"args": [{**unit, "model": "openpose"}]}}})
        assert bad_model.status_code == 400 and "openpose" in bad_model.text and "depthy, edges" in bad_model.text
        bad_module = httpx.post(srv.url + "/sdapi/v1/txt2img", timeout=60, json={
            **body, "alwayson_scripts": {"controlnet": {"args": [{**unit, "module": "depth_midas"}]}}})
        assert bad_module.status_code == 400 and "depth_midas" in bad_module.text and "canny" in bad_module.text
        bad_weight = httpx.post(srv.url + "/sdapi/v1/txt2img", timeout=60, json={
            **body, "alwayson_scripts": {"controlnet": {"args": [{**unit, "weight": -1}]}}})
        assert bad_weight.status_code == 422 and "weight=-1" in bad_weight.text
        square = Image.new("RGB", (SIZE, SIZE))
        square.paste((255, 255, 255), (16, 16, 48, 48))
        detected = httpx.post(srv.url + "/controlnet/detect", timeout=60, json={
            "controlnet_module": "canny", "controlnet_input_images": [b64(square)], "controlnet_threshold_a": 50,
            "controlnet_threshold_b": 120}).json()
        again = httpx.post(srv.url + "/sdapi/v1/txt2img", json=body, timeout=120)
        assert again.status_code == 200, "failed requests leave the server serving"
    ours = sfumato.load(setup["base"])
    want = ours.generate("a red circle", "blurry", width=SIZE, height=SIZE, steps=3, seed=5, sampler="euler",
                         cfg_scale=5.0, controlnet=ControlUnit(ours.load_controlnet(setup["single"]), control, 0.8,
                                                               mode="prompt", name="edges [0123abcd]"))
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
    assert _diff(got, want.images[0]) == 0
    info = r.json()["info"]
    assert "ControlNet 0" in info and "Control Mode: My prompt is more important" in info
    edges = Image.open(io.BytesIO(base64.b64decode(detected["images"][0]))).convert("RGB")
    assert np.array_equal(np.asarray(edges), np.asarray(canny(square, 50, 120)))
