"""DPT-Hybrid depth estimator (SD 2 depth2img): parity with transformers' DPTForDepthEstimation
(is_hybrid) on tiny random weights through the transformers <-> MiDaS key map, diffusers-folder and
single-file loading, strict renames and loading, the real-size preset against transformers' module
(built on meta), and preprocessing against DPTImageProcessor (PIL backend: transformers' default
without torchvision, and what diffusers' depth2img pipeline gets here).

Measured on CPU fp32 (torch 2.13, transformers 5.24; transformers supports only eager attention with
a BiT backbone): predicted_depth max|diff| 2.9e-6 (|depth| up to ~2.7) for the 64 x 64 model,
5.8e-6 through preprocessing + estimate_depth (|depth| up to ~2.7); the position-embedding resize 0.0;
preprocessing 0.0 (identical arrays). Mutations checked to fail the parity test: readout concatenated
in the other order (max|diff| 3.1), weight-standardisation eps 1e-3 (0.06), fusion upsampling without
align_corners (1.3), "SAME" padding's odd pixel on the other side (4.3), hooks off by one block (1.5).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DPTConfig as HFDPTConfig, DPTForDepthEstimation, DPTImageProcessorPil

from sfumato.errors import CheckpointError
from sfumato.models import ops
from sfumato.models.depth import (
    DEPTH_PRESETS,
    DepthPreprocessing,
    DPTConfig,
    DPTDepthModel,
    estimate_depth,
    preprocess,
    resize_pos_embed,
)
from sfumato.weights import io
from sfumato.weights.keymap_depth import (
    DEPTH_MODEL_PREFIX,
    IGNORED_ORIGINAL_KEYS,
    build_depth_estimator,
    depth_config_from_transformers,
    depth_from_transformers,
    depth_to_transformers,
    preprocessing_from_transformers,
)

TOL = 1e-5
# Three BiT stages of 1, 1, 2 blocks, a 4-block ViT of width 48, 64 x 64 pixels (a 4 x 4 grid).
TINY = DPTConfig(image_size=64, patch_size=16, stem_width=16, stage_widths=(32, 64, 128), stage_depths=(1, 1, 2),
                 groups=8, width=48, layers=4, heads=4, mlp_width=96, hooks=(2, 3), neck_widths=(32, 64, 48, 48),
                 features=16)


def hf_config(cfg: DPTConfig) -> HFDPTConfig:
    """The transformers config of ``cfg``, written independently of keymap_depth."""
    backbone = dict(embedding_size=cfg.stem_width, hidden_sizes=list(cfg.stage_widths), depths=list(cfg.stage_depths),
                    num_groups=cfg.groups, layer_type="bottleneck", global_padding="same",
                    embedding_dynamic_padding=True, out_features=["stage1", "stage2", "stage3"])
    return HFDPTConfig(
        is_hybrid=True, hidden_size=cfg.width, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_width, image_size=cfg.image_size, patch_size=cfg.patch_size,
        layer_norm_eps=cfg.layer_norm_eps, backbone_out_indices=[0, 1, *cfg.hooks],
        neck_hidden_sizes=list(cfg.neck_widths), reassemble_factors=[1, 1, 1, 0.5],
        fusion_hidden_size=cfg.features, readout_type="project",
        backbone_featmap_shape=[1, cfg.stage_widths[-1], cfg.grid, cfg.grid], backbone_config=backbone,
        attn_implementation="eager")


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights ~ N(0, 1 / fan_in), so activations stay O(1) through ~30 layers and a 1e-5 bound means
    something; norm scales around 1, biases and embeddings small but non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif "token" in name or "position" in name:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


def reference(cfg: DPTConfig = TINY, seed: int = 0) -> DPTForDepthEstimation:
    model = DPTForDepthEstimation(hf_config(cfg)).eval()
    randomize(model, seed)
    return model


def pixels(cfg: DPTConfig = TINY, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def hf() -> DPTForDepthEstimation:
    return reference()


def test_matches_transformers(hf: DPTForDepthEstimation) -> None:
    """predicted_depth through the key map: measured max|diff| 2.9e-6 (|depth| up to ~2.7, ~49% of the
    pixels above the final ReLU's zero, so the comparison is not of zeros)."""
    ours = build_depth_estimator(TINY, depth_from_transformers(hf.state_dict(), TINY), source="test")
    x = pixels()
    with torch.no_grad():
        want = hf(pixel_values=x).predicted_depth
        got = ours(x)
    assert got.shape == want.shape == (2, 64, 64)
    assert (want > 0).float().mean() > 0.3 and want.abs().max() > 0.5
    assert maxdiff(got, want) <= TOL


def test_position_embeddings_resize_like_transformers(hf: DPTForDepthEstimation) -> None:
    """MiDaS resizes the position grid to the input's; transformers' _resize_pos_embed is the same
    bilinear resize (measured max|diff| 0.0), and at the stored grid it is the identity."""
    pos = torch.randn(1, 1 + TINY.grid**2, TINY.width, generator=torch.Generator().manual_seed(3))
    assert torch.equal(resize_pos_embed(pos, TINY.grid, TINY.grid), pos)
    want = hf.dpt.embeddings._resize_pos_embed(pos, 6, 2)
    assert maxdiff(resize_pos_embed(pos, 6, 2), want) <= 1e-6
    # A non-square input (transformers' DPT refuses it; MiDaS and we take any multiple of 32).
    ours = build_depth_estimator(TINY, depth_from_transformers(hf.state_dict(), TINY), source="test")
    with torch.no_grad():
        assert ours(torch.zeros(1, 3, 96, 64)).shape == (1, 96, 64)
    with pytest.raises(ValueError, match="multiples of 32"):
        ours(torch.zeros(1, 3, 48, 64))


def test_key_maps_round_trip(hf: DPTForDepthEstimation) -> None:
    """transformers -> ours -> transformers and back are bit-exact; the original names are MiDaS's."""
    sd = hf.state_dict()
    ours = depth_from_transformers(sd, TINY)
    assert {"pretrained.model.cls_token", "pretrained.model.pos_embed",
            "pretrained.model.patch_embed.backbone.stem.conv.weight",
            "pretrained.model.patch_embed.backbone.stages.2.blocks.1.conv2.weight",
            "pretrained.model.patch_embed.backbone.stages.0.blocks.0.downsample.norm.bias",
            "pretrained.model.patch_embed.proj.weight", "pretrained.model.blocks.3.attn.qkv.weight",
            "pretrained.model.blocks.0.mlp.fc2.bias", "pretrained.model.norm.weight",
            "pretrained.act_postprocess3.0.project.0.weight", "pretrained.act_postprocess4.4.weight",
            "scratch.layer4_rn.weight", "scratch.refinenet4.resConfUnit1.conv1.weight",
            "scratch.refinenet1.out_conv.bias", "scratch.output_conv.4.weight"} <= set(ours)
    assert ours["pretrained.model.blocks.0.attn.qkv.weight"].shape == (3 * TINY.width, TINY.width)
    # refinenet4 is the coarsest fusion block, transformers' first.
    assert torch.equal(ours["scratch.refinenet4.out_conv.weight"], sd["neck.fusion_stage.layers.0.projection.weight"])
    back = depth_to_transformers(ours, TINY)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with ops.meta_device():
        model = DPTDepthModel(TINY)
    assert set(model.state_dict()) == set(ours)
    again = depth_from_transformers(back, TINY)
    assert all(torch.equal(again[k], ours[k]) for k in ours)


def test_diffusers_folder_and_single_file_load(hf: DPTForDepthEstimation, tmp_path) -> None:
    """A ``depth_estimator/`` folder as diffusers writes it (config.json + model.safetensors), and the
    same weights as SD 2's 512-depth-ema.ckpt stores them (``depth_model.model.`` + timm's head)."""
    hf.save_pretrained(tmp_path)
    cfg = depth_config_from_transformers(json.loads((tmp_path / "config.json").read_text()))
    assert cfg == TINY
    tensors = depth_from_transformers(io.read_tensors(tmp_path / "model.safetensors"), cfg)
    folder = build_depth_estimator(cfg, tensors, source=str(tmp_path))
    file = {DEPTH_MODEL_PREFIX + k: v for k, v in tensors.items()}
    file |= {DEPTH_MODEL_PREFIX + "pretrained.model.head.weight": torch.zeros(1000, TINY.width),
             DEPTH_MODEL_PREFIX + "pretrained.model.head.bias": torch.zeros(1000),
             "model.diffusion_model.out.2.bias": torch.zeros(4)}
    n = len(DEPTH_MODEL_PREFIX)
    single = build_depth_estimator(TINY, {k[n:]: v for k, v in file.items() if k.startswith(DEPTH_MODEL_PREFIX)},
                                   source="512-depth-ema.ckpt")
    x = pixels()
    with torch.no_grad():
        want = hf(pixel_values=x).predicted_depth
        assert maxdiff(folder(x), want) <= TOL
        assert maxdiff(single(x), want) <= TOL


def test_renames_are_strict(hf: DPTForDepthEstimation) -> None:
    sd = hf.state_dict()
    with pytest.raises(CheckpointError, match=r"missing keys \['neck.convs.3.weight'\]"):
        depth_from_transformers({k: v for k, v in sd.items() if k != "neck.convs.3.weight"}, TINY)
    renamed = {("head.head.5.weight" if k == "head.head.4.weight" else k): v for k, v in sd.items()}
    with pytest.raises(CheckpointError, match=r"unknown keys \['head.head.5.weight'\], missing keys \['head.head.4"):
        depth_from_transformers(renamed, TINY)
    # A file with fewer ViT blocks than the config is rejected, not read as a shallower model.
    shallow = {k: v for k, v in sd.items() if not k.startswith("dpt.encoder.layer.3.")}
    with pytest.raises(CheckpointError, match=r"missing keys.*dpt.encoder.layer.3"):
        depth_from_transformers(shallow, TINY)
    ours = depth_from_transformers(sd, TINY)
    truncated = {k: v for k, v in ours.items() if not k.startswith("pretrained.model.patch_embed.backbone.stages.2.")}
    with pytest.raises(CheckpointError, match=r"missing keys.*stages\.2\.blocks\.0\.conv1\.weight"):
        depth_to_transformers(truncated, TINY)
    # timm's classifier is the only extra an original file may carry.
    extra = {k: torch.zeros(2) for k in IGNORED_ORIGINAL_KEYS}
    assert depth_to_transformers(ours | extra, TINY).keys() == sd.keys()
    with pytest.raises(CheckpointError, match="unknown keys.*pretrained.model.fc_norm.weight"):
        depth_to_transformers(ours | {"pretrained.model.fc_norm.weight": torch.zeros(2)}, TINY)


def test_strict_loading_names_unknown_missing_and_misshapen_keys(hf: DPTForDepthEstimation) -> None:
    ours = depth_from_transformers(hf.state_dict(), TINY)
    with pytest.raises(CheckpointError, match="unexpected key.*scratch.refinenet5.out_conv.bias"):
        build_depth_estimator(TINY, ours | {"scratch.refinenet5.out_conv.bias": torch.zeros(16)}, source="f")
    with pytest.raises(CheckpointError, match="missing key.*scratch.output_conv.4.bias"):
        build_depth_estimator(TINY, {k: v for k, v in ours.items() if k != "scratch.output_conv.4.bias"}, source="f")
    with pytest.raises(CheckpointError, match="wrong shape.*pretrained.model.pos_embed"):
        build_depth_estimator(TINY, ours | {"pretrained.model.pos_embed": torch.zeros(1, 10, TINY.width)}, source="f")


def test_config_from_transformers_rejects_other_architectures() -> None:
    d = hf_config(TINY).to_dict()
    assert depth_config_from_transformers(d) == TINY
    with pytest.raises(CheckpointError, match="not a DPT-Hybrid"):
        depth_config_from_transformers(d | {"is_hybrid": False})
    with pytest.raises(CheckpointError, match="reassemble_factors"):
        depth_config_from_transformers(d | {"reassemble_factors": [1, 1, 2, 0.5]})
    with pytest.raises(CheckpointError, match="use_batch_norm_in_fusion_residual"):
        depth_config_from_transformers(d | {"use_batch_norm_in_fusion_residual": True})
    with pytest.raises(CheckpointError, match="layer_type"):
        depth_config_from_transformers(d | {"backbone_config": d["backbone_config"] | {"layer_type": "preactivation"}})
    with pytest.raises(CheckpointError, match="lacks hidden_size"):
        depth_config_from_transformers({k: v for k, v in d.items() if k != "hidden_size"})
    # Early hybrid configs: embedding_type instead of is_hybrid, transformers' defaults elsewhere.
    minimal = {"embedding_type": "hybrid", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
               "intermediate_size": 3072, "neck_hidden_sizes": [256, 512, 768, 768], "layer_norm_eps": 1e-6}
    assert depth_config_from_transformers(minimal) == DEPTH_PRESETS["dpt-hybrid"]
    with pytest.raises(CheckpointError, match="neck_widths"):
        depth_config_from_transformers(d | {"neck_hidden_sizes": [16, 64, 48, 48]})


def test_preset_matches_transformers_full_size_module() -> None:
    """Every key and shape of the real DPT-Hybrid (Intel/dpt-hybrid-midas = SD 2 depth's
    depth_estimator), both built on meta: no memory, no random init."""
    preset = DEPTH_PRESETS["dpt-hybrid"]
    real = HFDPTConfig(is_hybrid=True, reassemble_factors=[1, 1, 1, 0.5], neck_hidden_sizes=[256, 512, 768, 768],
                       backbone_featmap_shape=[1, 1024, 24, 24])
    # Same architecture; transformers writes LayerNorm eps 1e-12 where timm (and the preset) has 1e-6.
    assert depth_config_from_transformers(real.to_dict()) == DPTConfig(layer_norm_eps=1e-12)
    with torch.device("meta"):
        hf = DPTForDepthEstimation(real)
    with ops.meta_device():
        ours = DPTDepthModel(preset)
    want = {k: v.shape for k, v in hf.state_dict().items()}
    assert {k: v.shape for k, v in depth_to_transformers(ours.state_dict(), preset).items()} == want
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in hf.parameters()) == 122_377_985
    assert ours.state_dict()["pretrained.model.pos_embed"].shape == (1, 577, 768)
    assert ours.state_dict()["pretrained.act_postprocess4.4.weight"].shape == (768, 768, 3, 3)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)

    def noise(w: int, h: int) -> Image.Image:
        # Smooth gradient plus noise: bicubic overshoot and clipping both get exercised.
        ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        return Image.fromarray(np.clip(ramp + rng.normal(0, 60, (h, w, 3)), 0, 255).astype(np.uint8))

    return [noise(301, 203), noise(199, 457), noise(384, 384), noise(97, 131), noise(1001, 225)]


@pytest.mark.parametrize("kwargs", [{}, {"keep_aspect_ratio": True, "ensure_multiple_of": 32},
                                    {"size": {"height": 256, "width": 320}, "keep_aspect_ratio": True,
                                     "ensure_multiple_of": 14}],
                         ids=["depth2img", "midas-aspect", "odd-multiple"])
def test_preprocess_matches_dpt_image_processor(kwargs: dict) -> None:
    """Same PIL resize on 8-bit pixels to the same size, same float64 rescale and float32 normalise as
    transformers' DPTImageProcessor: identical arrays (measured max|diff| 0.0) on odd-sized RGB images,
    down- and upscaled. Settings read from the processor's own preprocessor_config.json."""
    ref = DPTImageProcessorPil(**kwargs)
    prep = preprocessing_from_transformers(json.loads(ref.to_json_string()))
    if not kwargs:
        assert prep == DepthPreprocessing()
    for image in _images():
        want = ref(images=image, return_tensors="pt").pixel_values
        got = preprocess(image, prep)
        assert got.dtype == torch.float32
        assert got.shape == want.shape
        assert torch.equal(got, want)


def test_estimate_depth_matches_processor_plus_transformers(hf: DPTForDepthEstimation) -> None:
    """The whole path diffusers' depth2img takes: processor -> model -> predicted_depth[0]
    (measured max|diff| 5.8e-6, |depth| up to ~2.7)."""
    ours = build_depth_estimator(TINY, depth_from_transformers(hf.state_dict(), TINY), source="test")
    image = _images()[0]
    ref = DPTImageProcessorPil(size={"height": 64, "width": 64})
    with torch.no_grad():
        want = hf(**ref(images=image, return_tensors="pt")).predicted_depth[0]
    got = estimate_depth(ours, image, preprocessing_from_transformers(json.loads(ref.to_json_string())))
    assert got.shape == (64, 64)
    assert maxdiff(got, want) <= TOL
    with pytest.raises(ValueError, match="different sizes"):
        preprocess(_images()[:2], DepthPreprocessing(keep_aspect_ratio=True, ensure_multiple_of=32))
