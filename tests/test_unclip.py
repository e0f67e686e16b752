"""SD 2.1 unCLIP image variations (issue 9) on a tiny random model against diffusers'
``StableUnCLIPImg2ImgPipeline``: the CLIP image encoder, the embedding's noise augmentation (cosine
schedule, standardised by the embedding statistics, the level's sinusoidal embedding appended) and zeros
for the unconditional rows: same seed -> same image, max|diff| <= 1/255. The model loads from the diffusers
folder and from an original-layout single file (``embedder.model.visual.*``, ``noise_augmentor.*``), and
the folder sfumato writes loads in diffusers."""

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


def _image(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size + 8, 3)) * 255).astype(np.uint8))


def _diff(a, b) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny.build_zoo("unclip", tmp_path_factory.mktemp("unclip") / "unclip", seed=0)


def _reference(path: Path):
    import diffusers

    ref = diffusers.StableUnCLIPImg2ImgPipeline.from_pretrained(str(path))
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("noise_level,cfg,prompt", [(0, 7.0, ""), (300, 4.0, "a red boat"), (50, 1.0, "x")])
def test_variations_match_diffusers(folder, noise_level, cfg, prompt):
    ours = sfumato.load(folder)
    assert ours.spec.family == "sd2-unclip-l" and ours.image_encoder is not None
    image = _image(1)
    got = ours.variations(image, prompt, noise_level=noise_level, cfg_scale=cfg, width=SIZE, height=SIZE, steps=4,
                          sampler="euler", schedule="leading", seed=5)
    want = _reference(folder)(image=image, prompt=prompt, noise_level=noise_level, guidance_scale=cfg, width=SIZE,
                              height=SIZE, num_inference_steps=4,
                              generator=torch.Generator().manual_seed(5)).images[0]
    d = _diff(got.images[0], want)
    assert d <= 1, f"variations noise {noise_level} cfg {cfg}: max|diff| {d}/255 against diffusers"
    assert f"Noise level: {noise_level}" in got.infotexts[0]


def test_the_image_steers_the_variation(folder):
    ours = sfumato.load(folder)
    kw = dict(width=SIZE, height=SIZE, steps=3, sampler="euler", seed=2)
    a = ours.variations(_image(1), **kw).images[0]
    b = ours.variations(_image(2), **kw).images[0]
    assert _diff(a, b) > 2, "a different image must give a different variation"


def test_single_file_and_diffusers_round_trips(folder, tmp_path):
    ours = sfumato.load(folder)
    kw = dict(noise_level=100, width=SIZE, height=SIZE, steps=3, sampler="euler", schedule="leading", seed=4)
    want = ours.variations(_image(3), "a cat", **kw).images[0]
    single = ours.save(tmp_path / "unclip.safetensors")
    from sfumato.weights import io

    with io.open_checkpoint(single) as ckpt:
        keys = set(ckpt.keys())
    assert "embedder.model.visual.conv1.weight" in keys and "noise_augmentor.data_mean" in keys
    again = sfumato.load(single)
    assert again.spec.family == "sd2-unclip-l"
    assert _diff(again.variations(_image(3), "a cat", **kw).images[0], want) == 0
    written = ours.save(tmp_path / "folder", format="diffusers")
    ref = _reference(written)(image=_image(3), prompt="a cat", noise_level=100, guidance_scale=10.0, width=SIZE,
                              height=SIZE, num_inference_steps=3, generator=torch.Generator().manual_seed(4)).images[0]
    assert _diff(ref, want) <= 1, "diffusers must read the folder sfumato writes and make the same image"


def test_variations_refusals(folder):
    ours = sfumato.load(folder)
    with pytest.raises(InvalidParameterError, match="noise_level=1000 is out of range: allowed integers 0..999"):
        ours.variations(_image(0), noise_level=1000)
    with pytest.raises(InvalidParameterError, match="conditioned on an image.s CLIP embedding: use variations"):
        ours.generate("x", width=SIZE, height=SIZE, steps=2)
    other = sfumato.load()
    with pytest.raises(InvalidParameterError, match="variations needs an unCLIP model"):
        other.variations(_image(0))


def test_cli_variations(folder, tmp_path):
    from sfumato.cli import main

    _image(7).save(tmp_path / "in.png")
    assert main(["variations", str(tmp_path / "in.png"), "a boat", "--model", str(folder), "--noise-level", "40",
                 "--width", "64", "--height", "64", "--steps", "3", "--seed", "1", "--sampler", "euler", "-q",
                 "-o", str(tmp_path / "v.png")]) == 0
    want = sfumato.load(folder).variations(_image(7), "a boat", noise_level=40, width=64, height=64, steps=3, seed=1,
                                           sampler="euler")
    out = Image.open(tmp_path / "v.png")
    assert _diff(out.convert("RGB"), want.images[0]) == 0 and "Noise level: 40" in out.info["parameters"]
