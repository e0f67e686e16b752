"""CLIP vision encoder (SD 2.1 unCLIP image encoder): parity with transformers'
CLIPVisionModelWithProjection on tiny random weights, diffusers-folder loading, the OpenAI/OpenCLIP
single-file key map (round trip and against an independent OpenCLIP-layout forward), strict loading,
the presets against transformers' full-size modules, and preprocessing against CLIPImageProcessor.

Measured on CPU fp32 (torch 2.13, transformers 5.24), tiny configs, outputs of magnitude up to ~17:
against transformers' sdpa attention every output is identical (max|diff| 0.0); against its eager
attention image_embeds 2.1e-6, last_hidden_state 6.7e-6, penultimate state 3.8e-6 (quick_gelu and
gelu); the independent OpenCLIP-layout forward 2.4e-6; preprocessing 0.0 on seven odd images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPVisionConfig as HFVisionConfig, CLIPVisionModelWithProjection

from sfumato.errors import CheckpointError
from sfumato.models import ops
from sfumato.models.clip_vision import (
    CLIP_MEAN,
    CLIP_STD,
    VISION_PRESETS,
    CLIPVisionConfig,
    CLIPVisionEncoder,
    VisionEncoderOutput,
    preprocess,
)
from sfumato.weights import io
from sfumato.weights.keymap_clip_vision import (
    OPEN_CLIP_VISION_PREFIX,
    build_vision_encoder,
    vision_config_from_diffusers,
    vision_from_openclip,
    vision_to_openclip,
)
from tests import tiny

TOL = 1e-5
TINY = CLIPVisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_width=96, projection_dim=48)
TINY_GELU = CLIPVisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_width=96,
                             projection_dim=48, activation="gelu")


def hf_config(cfg: CLIPVisionConfig, attn: str = "eager") -> HFVisionConfig:
    """The transformers config of ``cfg``, written independently of keymap_clip_vision."""
    return HFVisionConfig(
        hidden_size=cfg.width, intermediate_size=cfg.mlp_width, projection_dim=cfg.projection_dim,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_channels=3, image_size=cfg.image_size,
        patch_size=cfg.patch_size, hidden_act=cfg.activation, layer_norm_eps=cfg.layer_norm_eps,
        attn_implementation=attn,
    )


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    tiny.randomize(model, seed)


def reference(cfg: CLIPVisionConfig, attn: str = "eager", seed: int = 0) -> CLIPVisionModelWithProjection:
    model = CLIPVisionModelWithProjection(hf_config(cfg, attn)).eval()
    randomize(model, seed)
    return model


def pixels(cfg: CLIPVisionConfig, batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("cfg", [TINY, TINY_GELU], ids=["quick_gelu", "gelu"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_matches_transformers(cfg: CLIPVisionConfig, attn: str) -> None:
    """image_embeds, last_hidden_state and the penultimate hidden state through an identity map.

    Measured max|diff|: 0.0 everywhere against sdpa attention (same kernel); against eager attention
    image_embeds <= 2.1e-6, last_hidden_state <= 6.7e-6, penultimate <= 3.8e-6 (|hidden| up to ~17)."""
    hf = reference(cfg, attn)
    ours = build_vision_encoder(cfg, hf.state_dict(), source="test")
    x = pixels(cfg)
    with torch.no_grad():
        want = hf(pixel_values=x, output_hidden_states=True)
        got = ours(x)
        penultimate = ours(x, layer=-2).hidden
        first = ours(x, layer=1).hidden
    assert isinstance(got, VisionEncoderOutput)
    assert got.image_embeds.shape == (3, cfg.projection_dim)
    assert got.hidden.shape == (3, cfg.positions, cfg.width)
    assert maxdiff(got.image_embeds, want.image_embeds) <= TOL
    assert maxdiff(got.hidden, want.last_hidden_state) <= TOL
    assert maxdiff(penultimate, want.hidden_states[-2]) <= TOL
    assert maxdiff(first, want.hidden_states[1]) <= TOL


def test_diffusers_folder_loads_through_identity_map(tmp_path) -> None:
    """An ``image_encoder/`` folder as diffusers writes it: config.json + model.safetensors."""
    hf = reference(TINY_GELU)
    hf.save_pretrained(tmp_path)
    cfg = vision_config_from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    assert cfg == TINY_GELU
    ours = build_vision_encoder(cfg, io.read_tensors(tmp_path / "model.safetensors"), source=str(tmp_path))
    x = pixels(cfg)
    with torch.no_grad():
        assert maxdiff(ours(x).image_embeds, hf(pixel_values=x).image_embeds) <= TOL


def test_presets_match_transformers_full_size_modules() -> None:
    """Every key and shape of the real ViT-L/14 and ViT-H/14 image encoders, built on meta (no memory).

    The published configs: openai/clip-vit-large-patch14 (vision) and
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the image encoders of the unCLIP-L / -H folders."""
    l14, h14 = VISION_PRESETS["clip-vit-l-14"], VISION_PRESETS["open-clip-vit-h-14"]
    assert (l14.width, l14.layers, l14.heads, l14.mlp_width, l14.projection_dim, l14.activation) == (
        1024, 24, 16, 4096, 768, "quick_gelu")
    assert (h14.width, h14.layers, h14.heads, h14.mlp_width, h14.projection_dim, h14.activation) == (
        1280, 32, 16, 5120, 1024, "gelu")
    for cfg in (l14, h14):
        assert (cfg.image_size, cfg.patch_size, cfg.positions) == (224, 14, 257)
        with torch.device("meta"):
            hf = CLIPVisionModelWithProjection(hf_config(cfg))
        with ops.meta_device():
            ours = CLIPVisionEncoder(cfg)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    with ops.meta_device():
        h = CLIPVisionEncoder(h14)
    # The unCLIP-H image_encoder's published parameter count.
    assert sum(p.numel() for p in h.parameters()) == 632_076_800


def open_clip_forward(sd: dict[str, torch.Tensor], cfg: CLIPVisionConfig, x: torch.Tensor) -> torch.Tensor:
    """OpenCLIP's VisionTransformer.forward (= OpenAI CLIP's), written from its code on its own keys:
    nn.MultiheadAttention's packed in_proj, ``x @ proj``. Independent of our modules and key map."""
    act = (lambda t: t * torch.sigmoid(1.702 * t)) if cfg.activation == "quick_gelu" else F.gelu
    eps, d = cfg.layer_norm_eps, cfg.width

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (d,), sd[name + ".weight"], sd[name + ".bias"], eps)

    x = F.conv2d(x, sd["conv1.weight"], stride=cfg.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([sd["class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + sd["positional_embedding"]
    x = ln(x, "ln_pre").transpose(0, 1)  # (L, B, D): OpenCLIP's LND
    for i in range(cfg.layers):
        r = f"transformer.resblocks.{i}."
        h = ln(x, r + "ln_1")
        attn, _ = F.multi_head_attention_forward(
            h, h, h, d, cfg.heads, sd[r + "attn.in_proj_weight"], sd[r + "attn.in_proj_bias"], None, None, False,
            0.0, sd[r + "attn.out_proj.weight"], sd[r + "attn.out_proj.bias"], training=False, need_weights=False)
        x = x + attn
        h = ln(x, r + "ln_2")
        x = x + F.linear(act(F.linear(h, sd[r + "mlp.c_fc.weight"], sd[r + "mlp.c_fc.bias"])),
                         sd[r + "mlp.c_proj.weight"], sd[r + "mlp.c_proj.bias"])
    return ln(x[0], "ln_post") @ sd["proj"]


@pytest.mark.parametrize("cfg", [TINY, TINY_GELU], ids=["quick_gelu", "gelu"])
def test_openclip_layout_round_trip_and_semantics(cfg: CLIPVisionConfig) -> None:
    """ours -> OpenCLIP layout -> ours is bit-exact, and the OpenCLIP-layout tensors, run by an
    independent OpenCLIP forward, give transformers' image_embeds (measured max|diff| <= 2.4e-6, |embeds| up to ~5)."""
    hf = reference(cfg)
    sd = hf.state_dict()
    theirs = vision_to_openclip(sd)
    assert set(theirs) >= {"conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight",
                           "transformer.resblocks.1.attn.in_proj_weight", "transformer.resblocks.1.attn.in_proj_bias",
                           "transformer.resblocks.1.mlp.c_fc.weight", "ln_post.bias", "proj"}
    assert theirs["proj"].shape == (cfg.width, cfg.projection_dim)
    assert theirs["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * cfg.width, cfg.width)
    back = vision_from_openclip(theirs, cfg.layers)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)

    x = pixels(cfg)
    with torch.no_grad():
        want = hf(pixel_values=x).image_embeds
        assert maxdiff(open_clip_forward(theirs, cfg, x), want) <= TOL
        # As an unCLIP single file stores it: the vision tower among other embedder.model.* keys.
        file = {OPEN_CLIP_VISION_PREFIX + k: v for k, v in theirs.items()}
        file |= {"embedder.model.token_embedding.weight": torch.zeros(8, 4),
                 "embedder.model.logit_scale": torch.ones(())}
        n = len(OPEN_CLIP_VISION_PREFIX)
        visual = {k[n:]: v for k, v in file.items() if k.startswith(OPEN_CLIP_VISION_PREFIX)}
        ours = build_vision_encoder(cfg, vision_from_openclip(visual, cfg.layers), source="test.ckpt")
        assert maxdiff(ours(x).image_embeds, want) <= TOL


def test_openclip_rename_is_strict() -> None:
    theirs = vision_to_openclip(reference(TINY).state_dict())
    with pytest.raises(CheckpointError, match="unknown keys.*attn_pool"):
        vision_from_openclip(theirs | {"attn_pool.query": torch.zeros(1)}, TINY.layers)
    with pytest.raises(CheckpointError, match="missing keys.*ln_post.bias"):
        vision_from_openclip({k: v for k, v in theirs.items() if k != "ln_post.bias"}, TINY.layers)
    # A file with fewer blocks than the config is rejected, not read as a shallower model.
    shallow = {k: v for k, v in theirs.items() if not k.startswith("transformer.resblocks.1.")}
    with pytest.raises(CheckpointError, match="missing keys.*resblocks.1"):
        vision_from_openclip(shallow, TINY.layers)


def test_strict_loading_names_unknown_missing_and_misshapen_keys() -> None:
    sd = reference(TINY).state_dict()
    with pytest.raises(CheckpointError, match="unexpected key.*vision_model.extra"):
        build_vision_encoder(TINY, sd | {"vision_model.extra": torch.zeros(1)}, source="f")
    with pytest.raises(CheckpointError, match="missing key.*visual_projection.weight"):
        build_vision_encoder(TINY, {k: v for k, v in sd.items() if k != "visual_projection.weight"}, source="f")
    with pytest.raises(CheckpointError, match="wrong shape.*visual_projection.weight"):
        build_vision_encoder(TINY_GELU, sd | {"visual_projection.weight": torch.zeros(7, TINY.width)}, source="f")
    # transformers' position_ids buffer, saved by old writers, is not a weight.
    build_vision_encoder(TINY, sd | {"vision_model.embeddings.position_ids": torch.arange(TINY.positions)[None]},
                         source="f")


def test_wrong_image_size_and_bad_configs_are_errors() -> None:
    ours = build_vision_encoder(TINY, reference(TINY).state_dict(), source="test")
    with pytest.raises(ValueError, match="takes 32x32"):
        ours(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        CLIPVisionConfig(image_size=30, patch_size=8)
    with pytest.raises(CheckpointError, match="lacks projection_dim"):
        vision_config_from_diffusers({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "intermediate_size": 96, "hidden_act": "gelu"})


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)

    def noise(w: int, h: int, c: int) -> np.ndarray:
        # Smooth gradient plus noise: bicubic overshoot and clipping both get exercised.
        ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, c))
        return np.clip(ramp + rng.normal(0, 60, (h, w, c)), 0, 255).astype(np.uint8)

    return [
        Image.fromarray(noise(300, 200, 3)),           # landscape, downscale
        Image.fromarray(noise(199, 457, 3)),           # portrait, odd sizes, truncated long side
        Image.fromarray(noise(224, 224, 3)),           # already the right size
        Image.fromarray(noise(97, 131, 3)),            # upscale
        Image.fromarray(noise(1001, 225, 4), "RGBA"),  # alpha over white, extreme aspect
        Image.fromarray(noise(250, 250, 1)[..., 0], "L"),  # greyscale -> RGB
        Image.fromarray(noise(120, 90, 1)[..., 0], "L").convert("P"),  # palette
    ]


def test_preprocess_matches_clip_image_processor() -> None:
    """Same PIL bicubic resize on 8-bit pixels, same crop offsets, same normalisation as transformers'
    CLIPImageProcessor (its PIL backend, what the unCLIP pipelines get without torchvision).
    Measured max|diff| 0.0 on all seven images (RGB, RGBA, L, P; down- and upscaled; odd sizes): the
    resize is the same PIL call on the same sizes, so no resampling tolerance is needed; 1e-6 only
    leaves room for float rounding (transformers rescales in float64, we in float32)."""
    ref = CLIPImageProcessorPil()  # defaults = openai/clip-vit-large-patch14's preprocessor_config
    assert tuple(ref.image_mean) == CLIP_MEAN and tuple(ref.image_std) == CLIP_STD
    images = _images()
    want = ref(images=images, return_tensors="pt").pixel_values
    got = preprocess(images)
    assert got.shape == want.shape == (len(images), 3, 224, 224)
    assert got.dtype == torch.float32
    assert maxdiff(got, want) <= 1e-6
    assert preprocess(images[1]).shape == (1, 3, 224, 224)
