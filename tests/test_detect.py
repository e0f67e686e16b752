"""Family and architecture detection from keys and shapes, on the real sizes of every preset (built on
the meta device, so nothing is allocated), resized community models, and prediction-type resolution."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sfumato.config import PRESETS, ModelSpec, UNetConfig, replace
from sfumato.errors import InvalidParameterError, UnknownModelError
from sfumato.models.unet import UNetModel
from sfumato.models.vae import AutoencoderKL
from sfumato.text.encoder import CLIPTextEncoder
from sfumato.weights.detect import UNET_PREFIX, VAE_PREFIX, detect_spec, resolve_prediction, with_prediction
from sfumato.weights.keymap_clip import clip_to_open_clip

Shapes = dict[str, tuple[int, ...]]


def _module_shapes(module: torch.nn.Module) -> Shapes:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def file_shapes(spec: ModelSpec) -> Shapes:
    """Keys and shapes of an original single file of ``spec``, as the released files have them: our
    modules built on meta, prefixed, OpenCLIP towers renamed, plus the extra keys real files carry."""
    with torch.device("meta"):
        parts = {UNET_PREFIX: _module_shapes(UNetModel(spec.unet)), VAE_PREFIX: _module_shapes(AutoencoderKL(spec.vae))}
        for te in spec.text_encoders:
            enc = CLIPTextEncoder(te.config).state_dict()
            if te.ckpt_layout == "open_clip":
                sd = {k: tuple(v.shape) for k, v in clip_to_open_clip(enc, te.config).items()}
                sd["logit_scale"] = ()
                sd.setdefault("text_projection", (te.config.width, te.config.width))  # SD 2.x carries an unused one
            else:
                sd = {k: tuple(v.shape) for k, v in enc.items()}
                sd["text_model.embeddings.position_ids"] = (1, te.config.max_positions)
            parts[te.ckpt_prefix] = sd
    shapes = {prefix + k: v for prefix, sd in parts.items() for k, v in sd.items()}
    shapes.update({"betas": (1000,), "alphas_cumprod": (1000,), "model_ema.decay": ()})
    return shapes


def _diff(a: object, b: object, path: str = "spec") -> list[str]:
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        return [d for f in dataclasses.fields(a)
                for d in _diff(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")]
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.parametrize("family", list(PRESETS))
def test_every_preset_is_detected_from_its_real_size_keys(family):
    preset = PRESETS[family]
    shapes = file_shapes(preset)
    spec = detect_spec(shapes)
    if family == "sd2-v":  # same keys as sd2: the prediction type decides
        assert spec.family == "sd2" and spec.prediction == "eps"
        spec = detect_spec(shapes, prediction="v")
    assert spec == preset, "; ".join(_diff(spec, preset))


def test_resized_community_unet_keeps_its_own_architecture():
    """BK-SDM-Small-like: one ResBlock per down level and no middle block, still SD 1.x."""
    small = replace(PRESETS["sd1"].unet, num_res_blocks=(1, 1, 1, 1), mid_block=False)
    spec = detect_spec(file_shapes(replace(PRESETS["sd1"], unet=small)))
    assert spec.family == "sd1"
    assert spec.unet == small, "; ".join(_diff(spec.unet, small, "unet"))
    assert spec.unet.num_res_blocks == (1, 1, 1, 1) and not spec.unet.mid_block


def test_tiny_sd2_clamps_the_text_layer_and_reads_widths():
    sd2 = PRESETS["sd2"]
    te = sd2.text_encoders[0]
    tiny_text = replace(te, config=replace(te.config, width=64, layers=2, heads=1, mlp_width=128))
    tiny = replace(sd2, unet=UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1),
                                        transformer_depth=(1, 0), num_heads=None, head_dim=64, context_dim=64,
                                        use_linear_proj=True, upcast_attention=True),
                   vae=replace(sd2.vae, ch=32, ch_mult=(1, 2), num_res_blocks=1), text_encoders=(tiny_text,))
    spec = detect_spec(file_shapes(tiny))
    assert spec.family == "sd2"
    assert spec.text_encoders[0].layer == 2, "SD 2.x's 23rd layer clamps to the file's 2 layers"
    assert spec.text_encoders[0].config == tiny_text.config
    assert spec.unet == tiny.unet and spec.vae == tiny.vae


def test_old_clip_layout_without_text_model_level():
    shapes = file_shapes(PRESETS["sd1"])
    prefix = PRESETS["sd1"].text_encoders[0].ckpt_prefix
    old = {(prefix + k[len(prefix + "text_model."):] if k.startswith(prefix) else k): v for k, v in shapes.items()}
    assert not any(k.startswith(prefix + "text_model.") for k in old)
    assert detect_spec(old) == PRESETS["sd1"]


def test_unknown_layouts_name_what_is_missing():
    sd1 = file_shapes(PRESETS["sd1"])
    no_unet = r"no UNet: no key starts with model\.diffusion_model\..*sd1, sd1-inpaint"
    with pytest.raises(UnknownModelError, match=no_unet):
        detect_spec({k: v for k, v in sd1.items() if not k.startswith(UNET_PREFIX)})
    with pytest.raises(UnknownModelError, match=r"no VAE: no key starts with first_stage_model\."):
        detect_spec({k: v for k, v in sd1.items() if not k.startswith(VAE_PREFIX)})
    no_text = r"text encoders under none match no known family.*cond_stage_model\.model\."
    with pytest.raises(UnknownModelError, match=no_text):
        detect_spec({k: v for k, v in sd1.items() if not k.startswith("cond_stage_model.")})
    six = dict(sd1)
    six[UNET_PREFIX + "input_blocks.0.0.weight"] = (320, 6, 3, 3)
    with pytest.raises(UnknownModelError, match=r"6 input channels.*sd1 \(4 input channels\), sd1-inpaint \(9"):
        detect_spec(six)
    sd2_text = {k: v for k, v in file_shapes(PRESETS["sd2"]).items() if k.startswith("cond_stage_model.")}
    mixed = {**{k: v for k, v in sd1.items() if not k.startswith("cond_stage_model.")}, **sd2_text}
    with pytest.raises(UnknownModelError, match=r"768-wide context and the text encoders give 1024"):
        detect_spec(mixed)


# --- prediction type ----------------------------------------------------------------------------------

def test_prediction_argument_and_aliases(tmp_path):
    f = tmp_path / "m.safetensors"
    assert resolve_prediction(f, "sd2", prediction="epsilon", metadata={})[0] == "eps"
    assert resolve_prediction(f, "sd2", prediction="v_prediction", metadata={"global_step": "875000"})[0] == "v"
    with pytest.raises(InvalidParameterError, match="'x0'.*eps, epsilon, v, v_prediction"):
        resolve_prediction(f, "sd2", prediction="x0", metadata={})


@pytest.mark.parametrize("text,expected", [
    ('model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: "v"\n', "v"),
    ("model:\n  params:\n    parameterization: v  # 768 model\n", "v"),
    ("model:\n  params:\n    linear_start: 0.00085\n", "eps"),
    ('model:\n  params:\n    # parameterization: "v"\n', "eps"),
])
def test_yaml_sidecar(tmp_path, text, expected):
    f = tmp_path / "model.safetensors"
    (tmp_path / "model.yaml").write_text(text)
    pred, source = resolve_prediction(f, "sd2", prediction=None, metadata={"global_step": "875000"})
    assert pred == expected and "model.yaml" in source
    assert resolve_prediction(f, "sd2", prediction="eps", metadata={})[0] == "eps", "the argument wins"


def test_scheduler_config_of_a_folder(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    assert resolve_prediction(tmp_path, "sd2", prediction=None, metadata={})[0] == "v"
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    assert resolve_prediction(tmp_path, "sd2", prediction=None, metadata={})[0] == "eps"


def test_metadata_and_family_defaults(tmp_path):
    f = tmp_path / "m.safetensors"
    assert resolve_prediction(f, "sd2", prediction=None, metadata={"global_step": "875000"})[0] == "eps"
    assert resolve_prediction(f, "sd2", prediction=None, metadata={"global_step": "110000"})[0] == "v"
    assert resolve_prediction(f, "sd2", prediction=None, metadata={})[0] == "v"
    assert resolve_prediction(f, "sd2-v", prediction=None, metadata={})[0] == "v"
    assert resolve_prediction(f, "sdxl", prediction=None, metadata={"modelspec.prediction_type": "v"})[0] == "v"
    assert resolve_prediction(f, "sd2", prediction=None, metadata={"ss_v_parameterization": "False"})[0] == "eps"
    for family in ("sd1", "sd2-inpaint", "sd2-depth", "sdxl", "sdxl-refiner"):
        assert resolve_prediction(f, family, prediction=None, metadata={"global_step": "875000"})[0] == "eps", family
    for family in ("sd2-upscaler", "sd2-unclip-l", "sd2-unclip-h"):
        assert resolve_prediction(f, family, prediction=None, metadata={})[0] == "v", family


def test_with_prediction_switches_the_sd2_twin():
    spec = detect_spec(file_shapes(PRESETS["sd2"]))
    v = with_prediction(spec, "v_prediction")
    assert (v.family, v.prediction, v.default_size) == ("sd2-v", "v", 768)
    back = with_prediction(v, "eps")
    assert back == spec
    sd1 = with_prediction(PRESETS["sd1"], "v")  # a v-prediction SD 1.x fine-tune keeps its family
    assert (sd1.family, sd1.prediction) == ("sd1", "v")
