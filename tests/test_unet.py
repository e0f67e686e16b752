"""UNet parity against diffusers' ``UNet2DConditionModel`` on tiny random weights, plus the key table,
config translation and shape-based config inference for every preset.

Measured on CPU fp32 (torch 2.13, diffusers 0.42.1): max|ours - diffusers| between 1.8e-6 and 3.6e-6
across the ten tiny families (outputs of magnitude ~2); the bound asserted is 1e-5.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
import warnings

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)

from sfumato.config import PRESETS, UNetConfig, replace
from sfumato.errors import CheckpointError
from sfumato.models.unet import UNetModel, timestep_embedding
from sfumato.weights.keymap_unet import (
    unet_config_from_diffusers,
    unet_config_from_state_dict,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)

TOL = 1e-5
POOLED = 32  # tiny stand-in for SDXL's 1280-wide pooled text embedding

_SD1 = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=(2, 2, 2),
                  transformer_depth=(1, 1, 0), num_heads=2, context_dim=32)
_SD2 = replace(_SD1, num_heads=None, head_dim=8, context_dim=48, use_linear_proj=True, upcast_attention=True)
TINY: dict[str, UNetConfig] = {
    "sd1": _SD1,
    "sd2": _SD2,
    "sdxl": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=(2, 2, 2),
                       transformer_depth=(0, 2, 3), transformer_depth_middle=3, num_heads=None, head_dim=8,
                       context_dim=64, use_linear_proj=True, adm_in_channels=POOLED + 6 * 256, adm_kind="text_time"),
    "sdxl-refiner": UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=(1, 1, 1, 1),
                               transformer_depth=(0, 2, 2, 0), transformer_depth_middle=2, num_heads=None,
                               head_dim=16, context_dim=48, use_linear_proj=True,
                               adm_in_channels=POOLED + 5 * 256, adm_kind="text_time"),
    "sd1-inpaint": replace(_SD1, in_channels=9),
    "sd2-depth": replace(_SD2, in_channels=5),
    "sd1-pix2pix": replace(_SD1, in_channels=8),
    "sd2-upscaler": UNetConfig(in_channels=7, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=(2, 2, 2),
                               transformer_depth=(0, 1, 1), num_heads=2, context_dim=48, use_linear_proj=True,
                               num_classes=1000, disable_self_attn=(True, True, False)),
    "sd2-unclip": replace(_SD2, adm_in_channels=40, adm_kind="image"),
    # block-removed distillation (BK-SDM): no middle block, fewer blocks on some levels
    "no-mid": replace(_SD1, num_res_blocks=(1, 2, 1), mid_block=False),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These models are tiny: with 2 threads on a busy 2-core machine, OpenMP synchronisation made each
    forward ~20x slower (3.4 s vs 0.1 s measured); one thread, restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm scales around 1), so swapped or missed tensors change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))


def _pair(cfg: UNetConfig, seed: int = 0) -> tuple[UNet2DConditionModel, UNetModel]:
    ref = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg)).eval()
    _randomize(ref, seed)
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict(), cfg), strict=True)
    return ref, ours


def _inputs(cfg: UNetConfig, b: int = 2, hw: tuple[int, int] = (8, 8)) -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, cfg.in_channels, *hw, generator=g)
    context = torch.randn(b, 5, cfg.context_dim, generator=g)
    t = torch.tensor([999.0, 17.5])[:b]
    kw: dict = {"ref": {}, "y": None}
    if cfg.adm_kind == "text_time":
        n_ids = (cfg.adm_in_channels - POOLED) // 256
        text_embeds = torch.randn(b, POOLED, generator=g)
        time_ids = torch.tensor([[1024.0, 768, 0, 32, 1024, 1024, 6.0][:n_ids]] * b)
        kw["ref"] = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}
        kw["y"] = torch.cat([text_embeds, timestep_embedding(time_ids.flatten(), 256).reshape(b, -1)], dim=1)
    elif cfg.adm_kind == "image":
        kw["y"] = torch.randn(b, cfg.adm_in_channels, generator=g)
        kw["ref"] = {"class_labels": kw["y"]}
    elif cfg.num_classes is not None:
        kw["y"] = torch.tensor([20, 350])[:b]
        kw["ref"] = {"class_labels": kw["y"]}
    return {"x": x, "t": t, "context": context, **kw}


@pytest.mark.parametrize("family", list(TINY))
def test_parity_with_diffusers(family: str) -> None:
    cfg = TINY[family]
    ref, ours = _pair(cfg)
    # odd sizes: upsample to the skip's size, as diffusers does. The deepest level keeps >= 2x2 pixels:
    # at 1x1 a 32-group norm normalises 2 numbers and fp32 rounding is amplified past 1e-5.
    hw = (10, 6) if family == "sd1" else (2 ** len(cfg.channel_mult),) * 2
    inp = _inputs(cfg, hw=hw)
    with torch.no_grad():
        expected = ref(inp["x"], inp["t"], encoder_hidden_states=inp["context"], **inp["ref"]).sample
        got = ours(inp["x"], inp["t"], inp["context"], inp["y"])
    diff = (got - expected).abs().max().item()
    assert got.shape == expected.shape == (2, cfg.out_channels, *hw)
    assert diff <= TOL, f"{family}: max|diff| {diff:.2e} > {TOL:.0e} (fp32, output scale {expected.abs().max():.2f})"
    if family == "sd1":  # the weights matter: a perturbed copy must disagree, or the test could not fail
        with torch.no_grad():
            ours.out[2].bias.add_(0.1)
            assert (ours(inp["x"], inp["t"], inp["context"], inp["y"]) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd2-upscaler", "sd2-unclip", "no-mid"])
def test_key_round_trip_bit_exact(family: str) -> None:
    cfg = TINY[family]
    sd = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg)).state_dict()
    back = unet_to_diffusers(unet_from_diffusers(sd, cfg), cfg)
    assert list(back) == list(sd)
    assert all(back[k] is sd[k] for k in sd)


def test_unknown_keys_raise() -> None:
    cfg = TINY["sd1"]
    sd = UNetModel(cfg).state_dict()
    sd["input_blocks.1.1.transformer_blocks.0.attn1.bogus.weight"] = torch.zeros(1)
    sd["nonsense.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="bogus.*nonsense|nonsense.*bogus"):
        unet_to_diffusers(sd, cfg)
    with pytest.raises(CheckpointError, match="2 unknown"):
        unet_from_diffusers({"conv_in.weight": torch.zeros(1), "mid_block.foo.weight": torch.zeros(1),
                             "down_blocks.9.resnets.0.conv1.weight": torch.zeros(1)}, cfg)


def _unique_unets() -> dict[str, UNetConfig]:
    seen: dict[UNetConfig, str] = {}
    for name, spec in PRESETS.items():
        seen.setdefault(spec.unet, name)
    return {name: cfg for cfg, name in seen.items()}


@pytest.mark.parametrize("family", list(PRESETS) + [f"tiny-{k}" for k in TINY])
def test_config_round_trip(family: str) -> None:
    cfg = TINY[family[5:]] if family.startswith("tiny-") else PRESETS[family].unet
    assert unet_config_from_diffusers(unet_config_to_diffusers(cfg)) == cfg


@pytest.mark.parametrize("family", list(_unique_unets()))
def test_preset_diffusers_shapes_on_meta(family: str) -> None:
    """The diffusers config builds a model whose (renamed) shapes equal ours, at the real preset size."""
    cfg = PRESETS[family].unet
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg))
        ours = UNetModel(cfg)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in unet_to_diffusers(ours.state_dict(), cfg).items()}
    assert mine == theirs, f"{family}: key/shape mismatch {sorted(set(mine.items()) ^ set(theirs.items()))[:6]}"


@pytest.mark.parametrize("family", list(PRESETS))
def test_config_from_state_dict(family: str) -> None:
    cfg = PRESETS[family].unet
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in UNetModel(cfg).state_dict().items()}
    got = unet_config_from_state_dict(shapes)
    # documented conventions: heads by projection kind, adm_kind and upcast left to the detector/preset
    linear = cfg.use_linear_proj
    expected = replace(cfg, num_heads=None if linear else 8, head_dim=64 if linear else None,
                       adm_kind=None, upcast_attention=False)
    assert got == expected
    # the head convention reproduces every official preset except the x4 upscaler's (8 heads, linear proj)
    heads_match = (cfg.num_heads, cfg.head_dim) == (expected.num_heads, expected.head_dim)
    assert heads_match == (family != "sd2-upscaler")


def test_config_from_state_dict_tiny_variants() -> None:
    for family in ("no-mid", "sd2-upscaler", "sdxl-refiner"):
        cfg = TINY[family]
        shapes = {k: tuple(v.shape) for k, v in UNetModel(cfg).state_dict().items()}
        got = unet_config_from_state_dict(shapes)
        assert replace(got, num_heads=cfg.num_heads, head_dim=cfg.head_dim, adm_kind=cfg.adm_kind) == cfg, family


# The original Stability yaml ``unet_config.params`` (v1-inference, v2-inference-v, sd_xl_base,
# sd_xl_refiner, x4-upscaling, v2-1-stable-unclip-h-inference), typed in by hand.
_LDM_YAML = {
    "sd1": dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, transformer_depth=1, context_dim=768),
    "sd2-v": dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                  num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64, use_linear_in_transformer=True,
                  transformer_depth=1, context_dim=1024),
    "sdxl": dict(adm_in_channels=2816, num_classes="sequential", in_channels=4, out_channels=4, model_channels=320,
                 attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64,
                 use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048),
    "sdxl-refiner": dict(adm_in_channels=2560, num_classes="sequential", in_channels=4, out_channels=4,
                         model_channels=384, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                         num_head_channels=64, use_linear_in_transformer=True, transformer_depth=4,
                         context_dim=[1280, 1280, 1280, 1280]),
    "sd2-upscaler": dict(num_classes=1000, in_channels=7, out_channels=4, model_channels=256,
                         attention_resolutions=[2, 4, 8], num_res_blocks=2, channel_mult=[1, 2, 2, 4],
                         disable_self_attentions=[True, True, True, False], num_heads=8, transformer_depth=1,
                         context_dim=1024, use_linear_in_transformer=True),
    "sd2-unclip-h": dict(num_classes="sequential", adm_in_channels=2048, in_channels=4, out_channels=4,
                         model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                         channel_mult=[1, 2, 4, 4], num_head_channels=64, use_linear_in_transformer=True,
                         transformer_depth=1, context_dim=1024),
}


@pytest.mark.parametrize("family", list(_LDM_YAML))
def test_presets_match_diffusers_reading_of_original_yaml(family: str) -> None:
    original = {"model": {"params": {"unet_config": {"params": _LDM_YAML[family]},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    with warnings.catch_warnings():  # image_size is deprecated there; passing it avoids a checkpoint look-up
        warnings.simplefilter("ignore")
        theirs = create_unet_diffusers_config_from_ldm(original, {}, image_size=512)
    ours = unet_config_to_diffusers(PRESETS[family].unet)
    for key, value in theirs.items():
        if key == "sample_size":
            continue
        if key == "transformer_layers_per_block" and isinstance(value, list):
            attn = [t.startswith("CrossAttn") for t in ours["down_block_types"]]
            value = [v for v, a in zip(value, attn) if a]
            mine = [v for v, a in zip(ours[key], attn) if a]
            assert mine == value, family
            continue
        assert ours[key] == value, f"{family}: {key} ours {ours[key]!r} vs diffusers' {value!r}"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sd2-upscaler", "sd2-unclip"])
def test_table_agrees_with_diffusers_single_file_converter(family: str) -> None:
    cfg = TINY[family]
    sd = UNetModel(cfg).state_dict()
    theirs = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in sd.items()},
                                         unet_config_to_diffusers(cfg))
    mine = unet_to_diffusers(sd, cfg)
    assert sorted(mine) == sorted(theirs)
    assert all(mine[k] is theirs[k] for k in mine)


def test_wrong_inputs_raise_value_error() -> None:
    cfg = TINY["sdxl"]
    unet = UNetModel(cfg)
    inp = _inputs(cfg)
    x, t, c, y = inp["x"], inp["t"], inp["context"], inp["y"]
    cases = {
        "x must be": (x[:, :3], t, c, y),
        "timesteps": (x, t[None], c, y),
        "context must be": (x, t, c[..., :-1], y),
        "context must be ": (x, t, None, y),
        "y must be": (x, t, c, None),
        "y must be ": (x, t, c, y[:, :-1]),
    }
    for match, args in cases.items():
        with pytest.raises(ValueError, match=match.strip()):
            unet(*args)
    labels = UNetModel(TINY["sd2-upscaler"])
    li = _inputs(TINY["sd2-upscaler"])
    with pytest.raises(ValueError, match="integer class labels"):
        labels(li["x"], li["t"], li["context"], li["y"].float())
    with pytest.raises(ValueError, match="takes no y"):
        UNetModel(TINY["sd1"])(x[:, :4], t, torch.randn(2, 7, 32), y)


def test_meta_construction_and_assign_load() -> None:
    cfg = TINY["sdxl"]
    src = UNetModel(cfg)
    with torch.device("meta"):
        unet = UNetModel(cfg)
    unet.load_state_dict(src.state_dict(), assign=True, strict=True)
    inp = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(unet(inp["x"], inp["t"], inp["context"], inp["y"]),
                           src(inp["x"], inp["t"], inp["context"], inp["y"]))


def test_unsupported_diffusers_configs_raise() -> None:
    d = unet_config_to_diffusers(TINY["sd1"])
    for key, value in {"time_cond_proj_dim": 256, "norm_num_groups": 16, "class_embed_type": "timestep",
                       "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 3}.items():
        with pytest.raises(CheckpointError, match=key if key != "down_block_types" else "block types"):
            unet_config_from_diffusers({**d, key: value})


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_activations_stay_in_the_default_memory_format(family: str) -> None:
    """Every block hands on contiguous (NCHW) activations: a channels-last tensor leaking out of a
    transformer block makes each later convolution re-lay its weights out on every call (measured
    1.3-1.9x slower SD1.5 steps on this CPU)."""
    model = UNetModel(TINY[family]).eval()
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((type(mod).__name__, out.is_contiguous())))
             for m in model.modules() if type(m).__name__ in ("SpatialTransformer", "ResBlock")]
    inputs = _inputs(TINY[family])
    with torch.no_grad():
        model(inputs["x"], inputs["t"], context=inputs["context"])
    for h in hooks:
        h.remove()
    assert seen and all(ok for _, ok in seen), [name for name, ok in seen if not ok]
