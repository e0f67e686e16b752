"""AutoencoderKL and its diffusers key table, checked against diffusers' ``AutoencoderKL`` on tiny configs.

Measured (CPU, torch 2.13 / diffusers 0.42.1): encoder mean/logvar and decoder output are bit-identical
to diffusers in fp32 (max|diff| = 0) on every config below, and agree to ~3e-14 in fp64. Asserted
bounds: 1e-5 fp32, 1e-12 fp64. For scale: either implementation is ~1e-5 from the fp64 result on the
4-level config (random weights amplify activations to |x| ~ 6), so layout-dependent fp32 rounding
alone could approach the fp32 bound; the fp64 check is the one that isolates the maths.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from sfumato.config import PRESETS, VAEConfig
from sfumato.errors import CheckpointError, InvalidParameterError
from sfumato.models.vae import AutoencoderKL, DiagonalGaussian
from sfumato.weights.keymap_vae import (
    LEGACY_ATTENTION,
    vae_config_from_diffusers,
    vae_config_from_state_dict,
    vae_config_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
)

TOL = 1e-5
TOL64 = 1e-12

# (diffusers config, the VAEConfig it means, input (H, W))
TINY = {
    "2-level": (
        dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32, latent_channels=4),
        VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
        (32, 48),  # not square: catches H/W mix-ups in the attention reshape
    ),
    "3-level (x4 upscaler shape)": (
        dict(block_out_channels=[32, 64, 128], layers_per_block=2, norm_num_groups=32, latent_channels=4),
        VAEConfig(ch=32, ch_mult=(1, 2, 4), num_res_blocks=2),
        (32, 32),
    ),
    "4-level (SD shape)": (
        dict(block_out_channels=[32, 32, 64, 64], layers_per_block=2, norm_num_groups=32, latent_channels=4),
        VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=2),
        (64, 64),
    ),
    "groups 8, 3 latents": (
        dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, latent_channels=3),
        VAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, embed_dim=3, norm_groups=8),
        (16, 24),
    ),
}


def make_reference(dcfg: dict, seed: int = 0) -> DiffusersAutoencoderKL:
    """A random diffusers VAE whose norm affines and biases are perturbed too.

    Default init leaves every GroupNorm at weight 1, bias 0, which would hide swapped norm keys.
    """
    n = len(dcfg["block_out_channels"])
    torch.manual_seed(seed)
    ref = DiffusersAutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n, **dcfg
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return ref


def load_ours(ref: DiffusersAutoencoderKL, cfg: VAEConfig) -> AutoencoderKL:
    """Build ours on the meta device and load the converted reference weights strictly."""
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
    ours.load_state_dict(vae_from_diffusers(ref.state_dict(), cfg), strict=True, assign=True)
    return ours.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item()


def meta_vae(cfg: VAEConfig) -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(cfg)


@pytest.mark.parametrize("name", list(TINY))
@torch.no_grad()
def test_parity_with_diffusers(name: str) -> None:
    dcfg, cfg, (h, w) = TINY[name]
    ref = make_reference(dcfg)
    assert vae_config_from_diffusers(ref.config) == cfg
    ours = load_ours(ref, cfg)

    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref_post = ref.encode(x).latent_dist
    post = ours.encode(x)
    for field in ("mean", "logvar"):
        d = max_diff(getattr(post, field), getattr(ref_post, field))
        assert d <= TOL, f"{name}: encoder {field} max|diff| {d:.2e} > {TOL:.0e}"

    f = cfg.downscale
    z = torch.randn(2, cfg.embed_dim, h // f, w // f, generator=torch.Generator().manual_seed(2))
    d = max_diff(ours.decode(z), ref.decode(z).sample)
    assert d <= TOL, f"{name}: decoder max|diff| {d:.2e} > {TOL:.0e}"

    # Same seed -> same posterior sample as diffusers, which draws eps the same way.
    s_ref = ref_post.sample(generator=torch.Generator().manual_seed(3))
    d = max_diff(post.sample(generator=torch.Generator().manual_seed(3)), s_ref)
    assert d <= TOL, f"{name}: posterior sample max|diff| {d:.2e} > {TOL:.0e}"
    d = max_diff(post.kl(), ref_post.kl())
    assert d <= TOL * post.kl().abs().max().item(), f"{name}: kl max|diff| {d:.2e}"

    rec, _ = ours(x, sample_posterior=False)
    d = max_diff(rec, ref(x, sample_posterior=False).sample)
    assert d <= TOL, f"{name}: forward (mode) max|diff| {d:.2e} > {TOL:.0e}"

    # fp64: the maths agree independently of fp32 kernel and memory-layout choices.
    ref, ours, x, z = ref.double(), ours.double(), x.double(), z.double()
    d = max(
        max_diff(ours.encode(x).mean, ref.encode(x).latent_dist.mean),
        max_diff(ours.decode(z), ref.decode(z).sample),
    )
    assert d <= TOL64, f"{name}: fp64 encoder/decoder max|diff| {d:.2e} > {TOL64:.0e}"


def test_state_dict_round_trip_and_legacy_names() -> None:
    dcfg, cfg, _ = TINY["3-level (x4 upscaler shape)"]
    sd = make_reference(dcfg).state_dict()
    back = vae_to_diffusers(vae_from_diffusers(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(back[k], v), k

    # Pre-0.14 diffusers names (query/key/value/proj_attn) read the same.
    modern_to_legacy = {v: k for k, v in LEGACY_ATTENTION.items()}
    legacy = {}
    for k, v in sd.items():
        for new, old in modern_to_legacy.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = v
    assert legacy.keys() != sd.keys()
    a, b = vae_from_diffusers(sd, cfg), vae_from_diffusers(legacy, cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # A folder carrying both spellings of one weight is ambiguous.
    with pytest.raises(CheckpointError, match="duplicates"):
        q = sd["encoder.mid_block.attentions.0.to_q.weight"]
        vae_from_diffusers({**sd, "encoder.mid_block.attentions.0.query.weight": q}, cfg)


def test_unknown_keys_raise() -> None:
    dcfg, cfg, _ = TINY["2-level"]
    sd = make_reference(dcfg).state_dict()
    with pytest.raises(CheckpointError, match=r"encoder\.bogus\.weight"):
        vae_from_diffusers({**sd, "encoder.bogus.weight": torch.zeros(1)}, cfg)
    ours = vae_from_diffusers(sd, cfg)
    with pytest.raises(CheckpointError, match=r"decoder\.up\.9\.block\.0\.conv1\.weight"):
        vae_to_diffusers({**ours, "decoder.up.9.block.0.conv1.weight": torch.zeros(1)}, cfg)
    # A key valid for a deeper config is unknown for this one (the table is expanded from cfg).
    with pytest.raises(CheckpointError, match="down_blocks.0.resnets.1"):
        vae_from_diffusers({**sd, "encoder.down_blocks.0.resnets.1.conv1.weight": torch.zeros(1)}, cfg)


@pytest.mark.parametrize("name", list(TINY))
def test_agrees_with_diffusers_single_file_converter(name: str) -> None:
    """Our LDM -> diffusers table gives what diffusers' own ``convert_ldm_vae_checkpoint`` gives."""
    dcfg, cfg, _ = TINY[name]
    ldm = vae_from_diffusers(make_reference(dcfg).state_dict(), cfg)
    n = len(cfg.ch_mult)
    config = {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
    theirs = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ldm.items()}, config)
    ours = vae_to_diffusers(ldm, cfg)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("cfg", sorted({s.vae for s in PRESETS.values()}, key=repr), ids=repr)
def test_real_size_tables_match_diffusers(cfg: VAEConfig) -> None:
    """Every preset VAE: our meta model's keys map onto diffusers' model built from our config.json."""
    dconf = vae_config_to_diffusers(cfg, scaling_factor=0.18215)
    assert vae_config_from_diffusers(dconf) == cfg
    with torch.device("meta"):
        ref = DiffusersAutoencoderKL.from_config(dconf)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = meta_vae(cfg).state_dict()
    mapped = {k: tuple(v.shape) for k, v in vae_to_diffusers(ours, cfg).items()}
    assert mapped == ref_shapes
    back = vae_from_diffusers(ref.state_dict(), cfg)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in ours.items()}

    n = len(cfg.ch_mult)
    config = {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
    theirs = convert_ldm_vae_checkpoint(dict(ours), config)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == mapped


def test_config_from_state_dict_real_size() -> None:
    sd_vae = meta_vae(VAEConfig()).state_dict()
    assert sum(v.numel() for v in sd_vae.values()) == 83_653_863  # the SD 1.x/2.x/XL VAE
    shapes = {k: tuple(v.shape) for k, v in sd_vae.items()}
    assert vae_config_from_state_dict(shapes) == VAEConfig()
    prefixed = {f"first_stage_model.{k}": v for k, v in shapes.items()}
    prefixed["model.diffusion_model.out.0.weight"] = (320,)
    assert vae_config_from_state_dict(prefixed) == VAEConfig()

    upscaler = VAEConfig(ch_mult=(1, 2, 4))
    shapes = {k: tuple(v.shape) for k, v in meta_vae(upscaler).state_dict().items()}
    assert vae_config_from_state_dict(shapes) == upscaler
    odd = VAEConfig(ch=64, ch_mult=(1, 3), num_res_blocks=3, z_channels=8, embed_dim=6)
    shapes = {k: tuple(v.shape) for k, v in meta_vae(odd).state_dict().items()}
    assert vae_config_from_state_dict(shapes) == odd

    del shapes["post_quant_conv.weight"]
    with pytest.raises(CheckpointError, match="post_quant_conv"):
        vae_config_from_state_dict(shapes)


def test_config_to_diffusers_fields() -> None:
    cfg = PRESETS["sdxl"].vae
    d = vae_config_to_diffusers(cfg, scaling_factor=0.13025, sample_size=1024)
    assert d["block_out_channels"] == [128, 256, 512, 512]
    assert d["layers_per_block"] == 2 and d["latent_channels"] == 4 and d["norm_num_groups"] == 32
    assert d["scaling_factor"] == 0.13025 and d["sample_size"] == 1024
    with pytest.raises(ValueError, match="z_channels == embed_dim"):
        vae_config_to_diffusers(VAEConfig(z_channels=8), scaling_factor=1.0)
    with pytest.raises(CheckpointError, match="act_fn"):
        vae_config_from_diffusers({**d, "act_fn": "gelu"})
    with pytest.raises(CheckpointError, match="block types"):
        vae_config_from_diffusers({**d, "up_block_types": ["UpDecoderBlock2D"] * 3})


def test_diagonal_gaussian() -> None:
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(2, 8, 4, 5, generator=g)
    moments[0, 4, 0, 0] = 50.0  # beyond the clamp
    post = DiagonalGaussian.from_moments(moments)
    ref = DiagonalGaussianDistribution(moments)
    assert post.logvar.max().item() == 20.0
    assert torch.equal(post.mean, ref.mean) and torch.equal(post.logvar, ref.logvar)
    torch.testing.assert_close(post.std, ref.std, rtol=0, atol=0)
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    c = post.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, ref.sample(torch.Generator().manual_seed(7)))
    assert torch.equal(post.mode(), post.mean)
    assert post.kl().shape == (2,)
    torch.testing.assert_close(post.kl(), ref.kl(), rtol=1e-6, atol=0)


def test_wrong_input_raises_value_error() -> None:
    _, cfg, _ = TINY["2-level"]
    vae = AutoencoderKL(cfg)
    with pytest.raises(ValueError, match="multiple of 2"):
        vae.encode(torch.zeros(1, 3, 33, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    big = meta_vae(VAEConfig())
    with pytest.raises(ValueError, match="multiple of 8"):
        big.encode(torch.zeros(1, 3, 64, 60, device="meta"))


@pytest.mark.parametrize("tile,overlap,size", [(8, 0.25, (20, 28)), (8, 0.5, (24, 24)), (6, 0.25, (13, 17))])
@torch.no_grad()
def test_tiled_decode_and_encode_match_diffusers(tile: int, overlap: float, size: tuple[int, int]) -> None:
    """Tiled decode/encode use diffusers' tiles and blend: same windows, same cross-fade, same result (fp32
    max|diff| <= 1e-5; measured 0), on sizes that leave partial tiles at the right and bottom edges."""
    dcfg, cfg, _ = TINY["2-level"]
    ref = make_reference(dcfg)
    ours = load_ours(ref, cfg)
    f = cfg.downscale
    ref.enable_tiling()
    ref.tile_latent_min_size, ref.tile_sample_min_size, ref.tile_overlap_factor = tile, tile * f, overlap
    h, w = size
    z = torch.randn(2, cfg.embed_dim, h, w, generator=torch.Generator().manual_seed(4))
    d = max_diff(ours.decode_tiled(z, tile=tile, overlap=overlap), ref.decode(z).sample)
    assert d <= TOL, f"tiled decode max|diff| {d:.2e} > {TOL:.0e}"
    x = torch.rand(1, 3, h * f, w * f, generator=torch.Generator().manual_seed(5)) * 2 - 1
    post, ref_post = ours.encode_tiled(x, tile=tile * f, overlap=overlap), ref.encode(x).latent_dist
    for field in ("mean", "logvar"):
        d = max_diff(getattr(post, field), getattr(ref_post, field))
        assert d <= TOL, f"tiled encode {field} max|diff| {d:.2e} > {TOL:.0e}"


@torch.no_grad()
def test_tiled_decode_has_no_seam_and_stays_close_to_the_whole_decode() -> None:
    """The built-in model's trained autoencoder decodes a scene upscaled to 256 px whole and in 64 px tiles
    (its latents 4x smaller, tiles of 16 with overlap 4). Tiles differ from the whole decode only through each tile's own receptive field and GroupNorm
    statistics: PSNR >= 30 dB (measured 34.3; a mosaic of unrelated 64 px scenes, one per tile, gives 24 dB:
    per-tile GroupNorm statistics, as in diffusers). A seam is a step in the error image (tiled - whole) between neighbouring
    columns or rows at a tile border: there it is no larger than the largest step elsewhere. Decoding
    the same windows with hard cuts instead of the cross-fade fails that measure, so it can fail."""
    import numpy as np

    from sfumato.train.scenes import iter_dataset
    from sfumato.weights.load import load

    pipe = load()
    vae = pipe.vae.float()
    from PIL import Image

    scene = next(iter_dataset(1, 3))[0]
    big = np.array(Image.fromarray(scene).resize((256, 256), Image.Resampling.BICUBIC))
    z = vae.encode(torch.from_numpy(big).permute(2, 0, 1)[None].float() / 127.5 - 1).mean  # (1, 4, 64, 64)
    whole = vae.decode(z).clamp(-1, 1)
    tiled = vae.decode_tiled(z, tile=16, overlap=0.25).clamp(-1, 1)
    mse = ((tiled - whole) / 2).pow(2).mean().item()
    psnr = 10 * np.log10(1 / mse)
    assert psnr >= 30, f"tiled vs whole decode: PSNR {psnr:.1f} dB < 30"

    f, stride = vae.cfg.downscale, 12
    borders = [k * stride * f for k in range(1, 64 // stride + 1) if k * stride < 64]

    def seam_ratio(img: torch.Tensor) -> float:
        err = img - whole
        ratios = []
        for dim in (2, 3):
            n = err.shape[dim]
            step = (err.narrow(dim, 1, n - 1) - err.narrow(dim, 0, n - 1)).abs()
            step = step.amax(dim=tuple(d for d in range(4) if d != dim))  # (n-1,): step into index i+1
            at = torch.zeros(n - 1, dtype=torch.bool)
            at[torch.tensor(borders) - 1] = True
            ratios.append((step[at].max() / step[~at].max()).item())
        return max(ratios)

    assert seam_ratio(tiled) <= 1.0, f"seam: a border step is {seam_ratio(tiled):.2f}x the largest elsewhere"
    cut = torch.zeros_like(whole)
    keep = stride * f
    for i in range(0, 64, stride):
        for j in range(0, 64, stride):
            out = vae.decode(z[:, :, i:i + 16, j:j + 16]).clamp(-1, 1)
            cut[:, :, i * f:i * f + keep, j * f:j * f + keep] = out[:, :, :keep, :keep]
    assert seam_ratio(cut) > 1.0


def test_tiling_rejects_bad_tiles() -> None:
    ours = load_ours(make_reference(TINY["2-level"][0]), TINY["2-level"][1])
    z = torch.zeros(1, 4, 20, 20)
    for kwargs, match in [(dict(tile=0), "tile"), (dict(tile=8, overlap=1.0), "overlap"),
                          (dict(tile=8, overlap=0.0), "overlap")]:
        with pytest.raises(InvalidParameterError, match=match):
            ours.decode_tiled(z, **kwargs)
    with pytest.raises(InvalidParameterError, match="multiple of 2"):
        ours.encode_tiled(torch.zeros(1, 3, 40, 40), tile=15)
