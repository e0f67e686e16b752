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
    assert f"ControlNet 0: \"Model: {nets[0].name}, Weight: {weights[0]:g}" in got.infotexts[0]


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
                 "--control-weight", "0.7", "--control-range", "0:0.8", "-o", str(tmp_path / "a.png")]) == 0
    ours = sfumato.load(setup["base"])
    unit = ControlUnit(ours.load_controlnet(setup["single"]), Image.open(image).convert("RGB"), 0.7, 0.0, 0.8)
    want = ours.generate("a cat", width=SIZE, height=SIZE, steps=3, seed=4, controlnet=unit).images[0]
    assert _diff(Image.open(tmp_path / "a.png").convert("RGB"), want) == 0
    assert main(["generate", "a cat", *common, "--guess-mode", "-o", str(tmp_path / "b.png")]) == 2
    assert "--guess-mode needs --controlnet" in capsys.readouterr().err
    assert main(["generate", "a cat", *common, "--controlnet", str(tmp_path / "absent"), str(image),
                 "-o", str(tmp_path / "c.png")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
