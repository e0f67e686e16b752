"""Memory modes (issue 7), on the built-in model: VAE and attention slicing exact up to rounding, VAE tiling bounded and close to the whole decode, offload exact with one component's mapped weights resident at a time; bad options are refused at the boundary."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import sfumato
from sfumato.cli import main
from sfumato.errors import InvalidParameterError
from sfumato.models import ops
from sfumato.pipeline import MemoryOptions


@pytest.fixture(scope="module")
def pipe():
    return sfumato.load()


def _arrays(res) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.int16) for im in res.images]


def _generate(pipe, memory: MemoryOptions, **kw):
    pipe.memory = memory
    try:
        return pipe.generate("a large red circle on the left, white background", seed=3, steps=6, **kw)
    finally:
        pipe.memory = MemoryOptions()


def test_vae_slicing_is_exact_up_to_rounding(pipe, monkeypatch):
    calls = []
    decode = type(pipe.vae).decode
    monkeypatch.setattr(type(pipe.vae), "decode", lambda self, z: calls.append(z.shape[0]) or decode(self, z))
    base = _arrays(_generate(pipe, MemoryOptions(), batch_size=3))
    assert calls == [3]
    calls.clear()
    sliced = _arrays(_generate(pipe, MemoryOptions(vae_slicing=True), batch_size=3))
    assert calls == [1, 1, 1]
    assert max(np.abs(a - b).max() for a, b in zip(base, sliced)) <= 1  # batch-size-dependent conv kernels


def test_attention_slicing_is_exact_up_to_rounding(pipe):
    q, k, v = (torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(i)) for i in range(3))
    whole = ops.attention(q, k, v, 2)
    with ops.attention_slicing(5):
        sliced = ops.attention(q, k, v, 2)
    assert (sliced - whole).abs().max().item() <= 1e-6
    base = _arrays(_generate(pipe, MemoryOptions()))[0]
    got = _arrays(_generate(pipe, MemoryOptions(attention_slice=7)))[0]
    assert np.abs(got - base).max() <= 1, "attention slicing moved a pixel by more than 1/255"


def test_vae_tiling_decodes_in_tiles_close_to_the_whole_image(pipe):
    """128 px on a 64 px-native model: 32x32 latents in 16x16 tiles at stride 12 -> 3x3 tile decodes, each
    tile-sized; the image stays within 25 dB PSNR of the untiled one (a tile per 64 px region of unrelated
    content is the hard case for per-tile normalisation; see tests/test_vae.py for the seam measure)."""
    base = _arrays(_generate(pipe, MemoryOptions(), width=128, height=128))[0]
    shapes = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape[2:])))
    try:
        tiled = _arrays(_generate(pipe, MemoryOptions(vae_tiling=True), width=128, height=128))[0]
    finally:
        hook.remove()
    assert len(shapes) == 9 and max(shapes) == (16, 16), shapes
    mse = ((tiled - base) / 255.0) ** 2
    psnr = 10 * np.log10(1 / mse.mean())
    assert psnr >= 25, f"tiled vs whole: {psnr:.1f} dB"


def test_vae_tiling_encodes_img2img_input_in_tiles(pipe):
    from PIL import Image

    shapes = []
    hook = pipe.vae.encoder.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape[2:])))
    image = Image.new("RGB", (128, 128), (200, 30, 30))
    pipe.memory = MemoryOptions(vae_tiling=True)
    try:
        res = pipe.img2img(image, "a red square", seed=1, steps=4, strength=0.5)
    finally:
        pipe.memory = MemoryOptions()
        hook.remove()
    assert res.images[0].size == (128, 128)
    assert len(shapes) == 9 and max(shapes) == (64, 64), shapes


@pytest.mark.parametrize("kwargs,match", [
    (dict(vae_tile=100), "vae_tile must be a multiple of 64 pixels, at least 64; got 100"),
    (dict(vae_tile=0), "vae_tile"),
    (dict(vae_tile_overlap=0.9), r"vae_tile_overlap must be in \(0, 0.5\], got 0.9"),
    (dict(attention_slice=0), "attention_slice must be a positive number of tokens or None, got 0"),
    (dict(attention_slice=True), "attention_slice"),
    (dict(offload="yes"), "offload must be one of 'none', 'model', 'sequential' .or True for 'model'., got 'yes'"),
    (dict(offload=1), "offload must be one of"),
])
def test_bad_memory_options_are_refused(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        MemoryOptions(**kwargs)


def test_cli_memory_flags(tmp_path, capsys):
    out = tmp_path / "tiled.png"
    code = main(["generate", "a blue star", "--width", "128", "--height", "128", "--steps", "3", "--vae-tiling",
                 "--vae-slicing", "--attention-slice", "64", "--offload", "-o", str(out), "-q"])
    assert code == 0 and out.is_file()
    code = main(["generate", "a blue star", "--width", "64", "--height", "64", "--steps", "2", "--offload",
                 "sequential", "-o", str(tmp_path / "seq.png"), "-q"])
    assert code == 0 and (tmp_path / "seq.png").is_file()
    code = main(["generate", "a blue star", "--vae-tile", "100", "-o", str(tmp_path / "x.png"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "vae_tile must be a multiple of 64" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """The built-in model saved in float32 and loaded again: its weights are mapped from the file (the
    built-in file itself is float16, converted on load, so nothing of it is mapped)."""
    path = tmp_path_factory.mktemp("fp32") / "model.safetensors"
    sfumato.load().save(path)
    return sfumato.load(path)


def test_offload_is_exact_and_keeps_one_component_resident(mapped, monkeypatch):
    """offload: the same pixels; the text encoder's and the UNet's mapped pages released after the run, the
    autoencoder's (the last to run) resident; the components ran in spine order."""
    from sfumato.weights import pages

    te, unet, vae = mapped.text_encoders[0], mapped.unet, mapped.vae
    for m in (te, unet, vae):
        resident, total = pages.resident_bytes(m)
        assert total > 0 and resident == total
    exact = _arrays(_generate(mapped, MemoryOptions()))
    switches = []
    real = pages.idle_release

    @contextlib.contextmanager
    def spy(components, **kw):
        with real(components, **kw) as state:
            yield state
        switches.append(state["switches"])

    monkeypatch.setattr(pages, "idle_release", spy)
    got = _arrays(_generate(mapped, MemoryOptions(offload=True)))
    assert all(np.array_equal(a, b) for a, b in zip(got, exact))
    assert switches == [["CLIPTextEncoder", "UNetModel", "AutoencoderKL"]]
    assert pages.resident_bytes(te)[0] == 0 and pages.resident_bytes(unet)[0] == 0
    resident, total = pages.resident_bytes(vae)
    assert resident == total
    # hooks are gone after the run: a plain generation leaves everything resident again
    _generate(mapped, MemoryOptions())
    assert pages.resident_bytes(unet)[0] == pages.resident_bytes(unet)[1]


def test_sequential_offload_is_exact_with_one_layer_group_resident(mapped, monkeypatch, tmp_path):
    """offload="sequential": the same pixels, while no more than a few layer groups of the UNet are ever
    resident at once (groups of at most 2 MB here, so the 44 MB UNet splits into dozens); loading with the
    option maps nothing in."""
    from sfumato.weights import pages

    exact = _arrays(_generate(mapped, MemoryOptions()))
    monkeypatch.setattr(pages, "UNIT_BYTES", 2 << 20)
    groups = pages.units(mapped.unet)
    assert len(groups) > 20 and all(not isinstance(g, torch.nn.ModuleList) for g in groups)
    unet_total = pages.resident_bytes(mapped.unet)[1]
    seen, real_release = [], pages.release

    def release(module):
        seen.append(pages.resident_bytes(mapped.unet)[0])
        return real_release(module)

    monkeypatch.setattr(pages, "release", release)
    got = _arrays(_generate(mapped, MemoryOptions(offload="sequential")))
    assert all(np.array_equal(a, b) for a, b in zip(got, exact))
    assert len(seen) > 2 * len(groups), "every group released after each UNet call"
    during = seen[len(mapped.modules()):]  # after the entry's release of every component (all resident then)
    assert seen[0] == unet_total and 0 < max(during) < unet_total / 4, (max(during), unet_total)
    assert pages.resident_bytes(mapped.unet)[0] == 0
    monkeypatch.setattr(pages, "release", real_release)

    path = tmp_path / "model.safetensors"
    mapped.save(path)
    lazy = sfumato.load(path, memory=MemoryOptions(offload="sequential"))
    assert lazy.memory.offload == "sequential"
    assert all(pages.resident_bytes(m)[0] == 0 < pages.resident_bytes(m)[1] for m in lazy.modules())
    assert all(np.array_equal(a, b) for a, b in zip(_arrays(_generate(lazy, lazy.memory)), exact))
    with pytest.raises(InvalidParameterError, match="memory must be a sfumato.MemoryOptions, got dict"):
        sfumato.load(path, memory={"offload": "model"})


def test_release_never_drops_a_changed_page(mapped):
    """A weight changed in place (a private copy-on-write page) keeps its value through release: only
    unchanged file pages leave; the untouched rest of the UNet is released."""
    from sfumato.weights import pages

    big = max(mapped.unet.parameters(), key=lambda p: p.numel())
    before = big.detach().clone()
    try:
        with torch.no_grad():
            big.data[0].add_(1.0)
        changed = big.detach().clone()
        released = pages.release(mapped.unet)
        resident, total = pages.resident_bytes(mapped.unet)
        assert released > 0 and 0 < resident < total // 10
        assert torch.equal(big.detach(), changed) and not torch.equal(changed, before)
    finally:
        with torch.no_grad():
            big.data.copy_(before)
