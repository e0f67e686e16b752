"""CLIP text encoder: parity with transformers' CLIPTextModel / CLIPTextModelWithProjection on tiny
random weights, the OpenCLIP key map (round trip and against diffusers' own converter), config
inference, and meta-device loading.

Measured on CPU fp32 (torch 2.13, transformers 5.23), against transformers' eager attention: every
hidden state, last_hidden_state and pooled text_embeds agree to max|diff| <= 4.1e-6 (quick_gelu and
gelu, both pad styles, both transformers pooling rules; outputs of magnitude ~2-10); against its
sdpa attention the difference is 0.0. The OpenCLIP key maps are bit-exact.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sfumato.config import PRESETS, TextEncoderConfig
from sfumato.errors import CheckpointError
from sfumato.text.encoder import CLIPTextEncoder, TextEncoderOutput, resolve_layer
from sfumato.weights.keymap_clip import (
    OPEN_CLIP_IGNORED_KEYS,
    clip_from_open_clip,
    clip_to_open_clip,
    text_config_from_diffusers,
    text_config_from_state_dict,
    text_config_to_diffusers,
)
from tests import tiny

BOS, EOS = 49406, 49407
TOL = 1e-5
# Full CLIP vocabulary so ids contain the real BOS/EOS (pooling reads the EOS position), small width.
TINY = TextEncoderConfig(vocab_size=49408, width=32, layers=3, heads=4, mlp_width=48, max_positions=77)
TINY_PROJ = TextEncoderConfig(
    vocab_size=49408, width=32, layers=3, heads=4, mlp_width=48, max_positions=77, activation="gelu",
    projection_dim=24,
)


def hf_config(cfg: TextEncoderConfig, eos_token_id: int = EOS, attn: str = "eager") -> CLIPTextConfig:
    """The transformers config of ``cfg``, written independently of keymap_clip."""
    return CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_width,
        max_position_embeddings=cfg.max_positions, hidden_act=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.projection_dim or cfg.width,
        bos_token_id=BOS, eos_token_id=eos_token_id, pad_token_id=1, attn_implementation=attn,
    )


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    tiny.randomize(model, seed, embedding_scale=0.5)


def hf_state_dict(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers' state dict in the on-disk layout: transformers >= 5.6 flattened CLIPTextModel
    (no ``text_model.`` level) while files and CLIPTextModelWithProjection keep it."""
    sd = ref.state_dict()
    if not any(k.startswith("text_model.") for k in sd):
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


def ours_from(ref: torch.nn.Module, cfg: TextEncoderConfig) -> CLIPTextEncoder:
    ours = CLIPTextEncoder(cfg).eval()
    ours.load_state_dict(hf_state_dict(ref), strict=True)  # identity key map
    return ours


def token_ids(pad: int) -> torch.Tensor:
    """Two 77-token prompts of different lengths: BOS, words, EOS, then ``pad``."""
    g = torch.Generator().manual_seed(1)
    ids = torch.full((2, 77), pad, dtype=torch.long)
    for row, n in enumerate((5, 40)):
        ids[row, 0] = BOS
        ids[row, 1 : n + 1] = torch.randint(1, BOS, (n,), generator=g)
        ids[row, n + 1] = EOS
    return ids


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- parity with transformers -------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_every_hidden_state_matches_clip_text_model(activation: str, attn: str) -> None:
    """transformers' eager attention (explicit mask + softmax) is the independent reference;
    its sdpa path runs the same kernel as ours and agrees bit for bit."""
    cfg = TextEncoderConfig(**{**TINY.__dict__, "activation": activation})
    ref = CLIPTextModel(hf_config(cfg, attn=attn)).eval()
    assert ref.config._attn_implementation == attn
    randomize(ref)
    ours = ours_from(ref, cfg)
    ids = token_ids(pad=EOS)
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        for k in range(1, cfg.layers + 1):
            got = ours(ids, layer=k, final_norm=False)
            assert got.pooled is None
            d = maxdiff(got.hidden, want.hidden_states[k])
            assert d <= TOL, f"layer {k}: max|diff| {d:.2e}"
            # The same layer counted from the end.
            d = maxdiff(ours(ids, layer=k - cfg.layers - 1, final_norm=False).hidden, want.hidden_states[k])
            assert d <= TOL, f"layer {k - cfg.layers - 1}: max|diff| {d:.2e}"
        d = maxdiff(ours(ids).hidden, want.last_hidden_state)
        assert d <= TOL, f"last_hidden_state: max|diff| {d:.2e}"
        # clip skip 2 as AUTOMATIC1111 (SD 1.x): penultimate layer through final_layer_norm.
        skip2 = ours(ids, layer=resolve_layer(-1, cfg.layers, clip_skip=2)).hidden
        final_layer_norm = getattr(ref, "text_model", ref).final_layer_norm  # flattened in transformers >= 5.6
        d = maxdiff(skip2, final_layer_norm(want.hidden_states[-2]))
        assert d <= TOL, f"clip skip 2: max|diff| {d:.2e}"


@pytest.mark.parametrize("pad", [0, EOS], ids=["pad0-openclip", "padEOS-clipL"])
@pytest.mark.parametrize("eos_token_id", [2, EOS], ids=["legacy-argmax", "first-eos"])
def test_pooled_matches_clip_text_model_with_projection(pad: int, eos_token_id: int) -> None:
    """transformers pools at argmax(ids) when its config says eos_token_id == 2 (the official SD
    repos), else at the first ``ids == eos_token_id``. argmax returns the first maximum, so both
    are the first EOS for either pad style; ours (argmax, or eos_index) agrees with both."""
    ref = CLIPTextModelWithProjection(hf_config(TINY_PROJ, eos_token_id)).eval()
    randomize(ref)
    ours = ours_from(ref, TINY_PROJ)
    ids = token_ids(pad)
    first_eos = (ids == EOS).int().argmax(dim=-1)
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        for eos_index in (None, first_eos):
            got = ours(ids, eos_index=eos_index)
            d = maxdiff(got.pooled, want.text_embeds)
            assert d <= TOL, f"pooled (eos_index={eos_index}): max|diff| {d:.2e}"
            d = maxdiff(got.hidden, want.last_hidden_state)
            assert d <= TOL, f"last_hidden_state: max|diff| {d:.2e}"
        # SDXL's read: penultimate layer without final norm, pooled from the last.
        got = ours(ids, layer=-2, final_norm=False)
        d = max(maxdiff(got.hidden, want.hidden_states[-2]), maxdiff(got.pooled, want.text_embeds))
        assert d <= TOL, f"layer -2 + pooled: max|diff| {d:.2e}"
        # eos_index is honoured: another position gives that position's projected feature.
        other = torch.tensor([3, 10])
        d = maxdiff(ours(ids, eos_index=other).pooled, ref.text_projection(want.last_hidden_state[[0, 1], other]))
        assert d <= TOL, f"pooled at eos_index {other.tolist()}: max|diff| {d:.2e}"
        assert maxdiff(ours(ids, eos_index=other).pooled, want.text_embeds) > 1e-3


def test_runs_only_the_layers_needed() -> None:
    calls: list[int] = []

    def run(cfg: TextEncoderConfig, layer: int) -> int:
        model = CLIPTextEncoder(cfg)
        calls.clear()
        for i, blk in enumerate(model.text_model.encoder.layers):
            blk.register_forward_hook(lambda *_, i=i: calls.append(i))
        out = model(token_ids(EOS), layer=layer)
        assert isinstance(out, TextEncoderOutput)
        return len(calls)

    assert run(TINY, 1) == 1
    assert run(TINY, -2) == 2
    assert run(TINY_PROJ, 1) == 3  # the pooled output needs the last layer


def test_resolve_layer() -> None:
    assert resolve_layer(-1, 12) == 12
    assert resolve_layer(-2, 12) == 11
    assert resolve_layer(-12, 12) == 1
    assert resolve_layer(23, 24) == 23  # SD 2.x
    assert resolve_layer(23, 23) == 23  # ... and diffusers' truncated copy of it
    assert resolve_layer(-1, 12, clip_skip=2) == 11
    assert resolve_layer(23, 24, clip_skip=3) == 21
    for layer, n, skip in ((0, 12, 1), (13, 12, 1), (-13, 12, 1), (-1, 12, 0), (2, 12, 3)):
        with pytest.raises(ValueError, match="clip_skip|out of range"):
            resolve_layer(layer, n, skip)


def test_no_position_ids_buffer_and_sequence_limit() -> None:
    model = CLIPTextEncoder(TINY)
    assert not any("position_ids" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="activation"):
        CLIPTextEncoder(TextEncoderConfig(**{**TINY.__dict__, "activation": "relu"}))


# --- OpenCLIP layout ---------------------------------------------------------------------------


def random_sd(cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    model = CLIPTextEncoder(cfg)
    randomize(model, seed=2)
    return model.state_dict()


@pytest.mark.parametrize("cfg", [TINY, TINY_PROJ], ids=["no-projection", "projection"])
def test_open_clip_round_trip_is_bit_exact(cfg: TextEncoderConfig) -> None:
    sd = random_sd(cfg)
    oc = clip_to_open_clip(sd, cfg)
    d = cfg.width
    assert oc["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * d, d)
    assert oc["transformer.resblocks.0.attn.in_proj_bias"].shape == (3 * d,)
    assert oc["positional_embedding"].shape == (cfg.max_positions, d)
    if cfg.projection_dim:
        assert oc["text_projection"].shape == (d, cfg.projection_dim)  # used as x @ text_projection
    back = clip_from_open_clip({**oc, "logit_scale": torch.tensor(4.6)}, cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize(
    "prefix,cfg",
    [("cond_stage_model.model.", TINY), ("conditioner.embedders.1.model.", TINY_PROJ)],
    ids=["sd2", "sdxl-bigG"],
)
def test_open_clip_matches_diffusers_converter(prefix: str, cfg: TextEncoderConfig) -> None:
    """diffusers' convert_open_clip_checkpoint reads our OpenCLIP dict back to our exact weights.

    SD 2.x files carry an OpenCLIP projection and logit_scale SD 2.x never uses: both converters
    drop them (diffusers via SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)."""
    sd = random_sd(cfg)
    oc = clip_to_open_clip(sd, cfg)
    if cfg.projection_dim is None:
        oc["text_projection"] = torch.randn(cfg.width, cfg.width)
    oc["logit_scale"] = torch.tensor(4.6)
    checkpoint = {prefix + k: v for k, v in oc.items()}
    ref = CLIPTextModelWithProjection(hf_config(cfg)) if cfg.projection_dim else CLIPTextModel(hf_config(cfg))
    theirs = convert_open_clip_checkpoint(ref, checkpoint, prefix=prefix)
    assert theirs.keys() == sd.keys()
    assert all(torch.equal(theirs[k], sd[k]) for k in sd)
    ours = clip_from_open_clip({k.removeprefix(prefix): v for k, v in checkpoint.items()}, cfg)
    assert all(torch.equal(ours[k], sd[k]) for k in sd)


def test_open_clip_strictness() -> None:
    oc = clip_to_open_clip(random_sd(TINY_PROJ), TINY_PROJ)
    assert "logit_scale" in OPEN_CLIP_IGNORED_KEYS
    with pytest.raises(CheckpointError, match=r"transformer\.resblocks\.0\.attn\.bogus"):
        clip_from_open_clip({**oc, "transformer.resblocks.0.attn.bogus": torch.zeros(1)}, TINY_PROJ)
    with pytest.raises(CheckpointError, match=r"transformer\.resblocks\.3\.ln_1\.weight"):
        clip_from_open_clip({**oc, "transformer.resblocks.3.ln_1.weight": torch.zeros(32)}, TINY_PROJ)
    with pytest.raises(CheckpointError, match="missing keys.*text_projection"):
        clip_from_open_clip({k: v for k, v in oc.items() if k != "text_projection"}, TINY_PROJ)
    bad = {**oc, "transformer.resblocks.1.attn.in_proj_bias": torch.zeros(33)}
    with pytest.raises(CheckpointError, match="fused q/k/v"):
        clip_from_open_clip(bad, TINY_PROJ)
    with pytest.raises(CheckpointError, match="text_model.embeddings.position_ids"):
        clip_to_open_clip({**random_sd(TINY), "text_model.embeddings.position_ids": torch.arange(77)}, TINY)


# --- configs -----------------------------------------------------------------------------------


def shapes_of(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_config_from_state_dict_tiny() -> None:
    for cfg in (TINY, TINY_PROJ):
        sd = random_sd(cfg)
        kw = {"head_dim": cfg.width // cfg.heads, "activation": cfg.activation}
        assert text_config_from_state_dict(shapes_of(sd), "hf", **kw) == cfg
        assert text_config_from_state_dict(shapes_of(clip_to_open_clip(sd, cfg)), "open_clip", **kw) == cfg
    with pytest.raises(ValueError, match="layout"):
        text_config_from_state_dict({}, "ldm")
    with pytest.raises(CheckpointError, match="lacks"):
        text_config_from_state_dict({}, "hf")


@pytest.mark.parametrize(
    "preset,layouts",
    [("sd1", ("hf",)), ("sd2", ("hf", "open_clip")), ("sdxl-refiner", ("hf", "open_clip"))],
)
def test_config_from_state_dict_presets(preset: str, layouts: tuple[str, ...]) -> None:
    """Real-size CLIP-L, OpenCLIP-H and bigG, built on the meta device, with default head_dim and activation."""
    cfg = PRESETS[preset].text_encoders[0].config
    with torch.device("meta"):
        sd = CLIPTextEncoder(cfg).state_dict()
        by_layout = {"hf": sd, "open_clip": clip_to_open_clip(sd, cfg)}
    for layout in layouts:
        assert text_config_from_state_dict(shapes_of(by_layout[layout]), layout) == cfg


@pytest.mark.parametrize("cfg", [TINY, TINY_PROJ], ids=["CLIPTextModel", "WithProjection"])
def test_diffusers_config_round_trip_builds_transformers_model(cfg: TextEncoderConfig) -> None:
    with_projection = cfg.projection_dim is not None
    d = text_config_to_diffusers(cfg, with_projection=with_projection)
    d = json.loads(json.dumps(d))  # what a config.json holds
    assert text_config_from_diffusers(d) == cfg
    hf_cfg = CLIPTextConfig.from_dict(d)
    ref = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(hf_cfg)
    assert shapes_of(hf_state_dict(ref)) == shapes_of(CLIPTextEncoder(cfg).state_dict())
    assert hf_cfg.eos_token_id == EOS and hf_cfg.hidden_act == cfg.activation


def test_diffusers_config_reads_official_shapes() -> None:
    """Field subsets of the official SD 1.5 and SDXL text_encoder_2 config.json files."""
    sd15 = {"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
            "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
            "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77, "eos_token_id": 2}
    assert text_config_from_diffusers(sd15) == PRESETS["sd1"].text_encoders[0].config
    bigg = {"architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
            "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
            "projection_dim": 1280, "vocab_size": 49408, "max_position_embeddings": 77}
    assert text_config_from_diffusers(bigg) == PRESETS["sdxl"].text_encoders[1].config
    with pytest.raises(CheckpointError, match="hidden_size"):
        text_config_from_diffusers({k: v for k, v in sd15.items() if k != "hidden_size"})
    with pytest.raises(CheckpointError, match="hidden_act"):
        text_config_from_diffusers({**sd15, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="projection_dim"):
        text_config_to_diffusers(TINY, with_projection=True)


# --- meta device -------------------------------------------------------------------------------


def test_meta_construction_and_assign_load() -> None:
    ref = CLIPTextEncoder(TINY_PROJ).eval()
    randomize(ref, seed=3)
    with torch.device("meta"):
        model = CLIPTextEncoder(TINY_PROJ)
    assert all(p.is_meta for p in model.parameters())
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    model.eval()
    ids = token_ids(0)
    with torch.no_grad():
        a, b = model(ids, layer=-2), ref(ids, layer=-2)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.pooled, b.pooled)
