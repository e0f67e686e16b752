"""Which model a single file holds, from its key names and tensor shapes alone (never weight values).

The family comes from a signature compared against every preset in ``config.PRESETS``: which text
encoders are present (by their key prefix), the UNet's input channels, and what its ``label_emb`` is
(none, a Linear over the ``y`` vector and its width, or a class Embedding). The architecture is then
read from the shapes (``keymap_*.*_config_from_state_dict``) and replaces the preset's, so resized
community models (fewer blocks, layers or channels) load with their own; the preset contributes only
what shapes cannot tell (attention head split, ``adm_kind``, text-encoder layer choice and padding).

Two presets differ only in prediction type (SD 2.x "sd2" eps and "sd2-v"): keys cannot tell them
apart, so detection returns the eps one and :func:`resolve_prediction` decides from the user, a
sidecar ``.yaml``, a diffusers scheduler config or file metadata (cf. ComfyUI ``model_detection.py``,
diffusers ``single_file_utils.py``, AUTOMATIC1111 ``sd_models_config.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from sfumato.config import PRESETS, ModelSpec, TextEncoderSpec, get_preset
from sfumato.errors import CheckpointError, InvalidParameterError, UnknownModelError
from sfumato.weights import io
from sfumato.weights.keymap_clip import clip_to_open_clip, text_config_from_diffusers, text_config_from_state_dict
from sfumato.weights.keymap_unet import unet_config_from_diffusers, unet_config_from_state_dict, unet_from_diffusers
from sfumato.weights.keymap_vae import vae_config_from_diffusers, vae_config_from_state_dict, vae_from_diffusers

__all__ = ["detect_spec", "detect_file", "resolve_prediction", "with_prediction", "normalize_prediction"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
_PREDICTIONS = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v"}
# SD 2.0 / 2.1 512-base (eps) was released at this step; the 768 v releases were not (diffusers uses it too).
_EPS_RELEASE_STEP = "875000"
_V_YAML = re.compile(r"""^[^#\n]*\bparameterization\s*:\s*["']?v["']?\s*(#.*)?$""", re.MULTILINE)


def normalize_prediction(prediction: str) -> str:
    """"eps" | "v", accepting diffusers' "epsilon" and "v_prediction"."""
    try:
        return _PREDICTIONS[prediction]
    except (KeyError, TypeError):
        raise InvalidParameterError(
            f"prediction {prediction!r} is not supported; use one of {', '.join(_PREDICTIONS)}") from None


# --- presets as signatures ---------------------------------------------------------------------------

def _prediction_twins(family: str) -> list[ModelSpec]:
    """Presets equal to ``family``'s except for prediction type (and the default size that goes with it)."""
    base = replace(get_preset(family), family="", prediction="", default_size=0)
    return [p for p in PRESETS.values() if replace(p, family="", prediction="", default_size=0) == base]


def _label_kind(spec: ModelSpec) -> str | None:
    if spec.unet.num_classes is not None:
        return "embedding"
    return "linear" if spec.unet.adm_in_channels is not None else None


def _detectable() -> list[ModelSpec]:
    """One preset per key signature: of prediction twins, the eps one (the other is chosen later)."""
    out = []
    for p in PRESETS.values():
        twins = _prediction_twins(p.family)
        if p is min(twins, key=lambda t: (t.prediction != "eps", t.family)):
            out.append(p)
    return out


def _text_prefixes(spec: ModelSpec) -> frozenset[str]:
    return frozenset(t.ckpt_prefix for t in spec.text_encoders)


def _describe(spec: ModelSpec) -> str:
    label = _label_kind(spec)
    extra = {None: "", "embedding": ", class embedding",
             "linear": f", label_emb Linear over {spec.unet.adm_in_channels}"}[label]
    return f"{spec.family} ({spec.unet.in_channels} input channels{extra})"


# --- detection -----------------------------------------------------------------------------------------

def _strip(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


def _family(shapes: Mapping[str, tuple[int, ...]]) -> ModelSpec:
    """The preset whose key signature the file has, or UnknownModelError naming what does not fit."""
    known = ", ".join(PRESETS)
    unet = _strip(shapes, UNET_PREFIX)
    if not unet:
        raise UnknownModelError(f"no UNet: no key starts with {UNET_PREFIX} (known families: {known})")
    if "input_blocks.0.0.weight" not in unet:
        raise UnknownModelError(f"not an LDM UNet: no {UNET_PREFIX}input_blocks.0.0.weight (known families: {known})")
    if not any(k.startswith(VAE_PREFIX) for k in shapes):
        raise UnknownModelError(f"no VAE: no key starts with {VAE_PREFIX} (known families: {known})")

    candidates = _detectable()
    all_prefixes = {pre for p in candidates for pre in _text_prefixes(p)}
    present = frozenset(pre for pre in all_prefixes if any(k.startswith(pre) for k in shapes))
    same_text = [p for p in candidates if _text_prefixes(p) == present]
    if not same_text:
        combos = sorted({" + ".join(sorted(_text_prefixes(p))) for p in candidates})
        found = " + ".join(sorted(present)) or "none"
        raise UnknownModelError(f"text encoders under {found} match no known family; known layouts: "
                                f"{'; '.join(combos)} (known families: {known})")

    in_channels = unet["input_blocks.0.0.weight"][1]
    label = "embedding" if "label_emb.weight" in unet else "linear" if "label_emb.0.0.weight" in unet else None
    adm = unet["label_emb.0.0.weight"][1] if label == "linear" else None
    matches = [p for p in same_text if p.unet.in_channels == in_channels and _label_kind(p) == label]
    if len(matches) > 1:  # only the y width tells these apart (unCLIP-L 1536 vs unCLIP-H 2048)
        matches = [p for p in matches if p.unet.adm_in_channels == adm]
    if len(matches) != 1:
        have = f"{in_channels} input channels" + {None: "", "embedding": ", class embedding",
                                                  "linear": f", label_emb Linear over {adm}"}[label]
        raise UnknownModelError(
            f"UNet with {have} and text encoders {' + '.join(sorted(present))} matches no known family; "
            f"with these text encoders: {', '.join(_describe(p) for p in same_text)}")
    return matches[0]


def _text_spec(te: TextEncoderSpec, shapes: Mapping[str, tuple[int, ...]]) -> TextEncoderSpec:
    """The preset's use of an encoder (layer, padding, prefix) with the file's architecture."""
    sub = _strip(shapes, te.ckpt_prefix)
    if te.ckpt_layout == "hf" and not any(k.startswith("text_model.") for k in sub):
        # Early SD 1.x files were saved by a transformers whose CLIPTextModel had no `text_model.` level.
        sub = {"text_model." + k if not k.startswith("text_projection") else k: v for k, v in sub.items()}
    try:
        cfg = text_config_from_state_dict(sub, te.ckpt_layout, activation=te.config.activation)
    except CheckpointError as e:
        raise UnknownModelError(f"text encoder under {te.ckpt_prefix}: {e}") from None
    if te.config.projection_dim is not None and cfg.projection_dim is None:
        raise UnknownModelError(f"text encoder under {te.ckpt_prefix} has no text_projection; "
                                "its pooled output is part of this family's conditioning")
    # A projection the family never uses (SD 2.x's OpenCLIP one) is not built, like a diffusers folder.
    projection = cfg.projection_dim if te.config.projection_dim is not None else None
    cfg = replace(cfg, projection_dim=projection, layer_norm_eps=te.config.layer_norm_eps)
    # A positive layer counts layers applied (SD 2.x: 23 of 24); a shallower file has fewer to apply.
    layer = min(te.layer, cfg.layers) if te.layer > 0 else max(te.layer, -cfg.layers)
    return replace(te, config=cfg, layer=layer)


def detect_spec(shapes: Mapping[str, tuple[int, ...]], *, prediction: str | None = None) -> ModelSpec:
    """The ``ModelSpec`` of an original-layout single file from its keys and shapes (after EMA selection).

    Families: UNet under ``model.diffusion_model.``, VAE under ``first_stage_model.``, text encoders under
    ``cond_stage_model.transformer.`` (CLIP-L, transformers names, with or without the ``text_model.``
    level of early files), ``cond_stage_model.model.`` (OpenCLIP-H), ``conditioner.embedders.0.transformer.``
    + ``conditioner.embedders.1.model.`` (SDXL) or ``conditioner.embedders.0.model.`` alone (SDXL refiner).
    Then input channels (9 inpaint, 8 pix2pix, 5 depth, 7 x4 upscaler with its class embedding) and the
    ``label_emb`` width (1536 / 2048 unCLIP-L / -H, 2816 SDXL, 2560 refiner) pick the preset.

    SD 2.x eps and v files have the same keys: without ``prediction`` this returns "sd2" (eps); pass the
    result of :func:`resolve_prediction` (or use :func:`with_prediction`) to get "sd2-v".
    """
    preset = _family(shapes)
    try:
        unet = unet_config_from_state_dict(_strip(shapes, UNET_PREFIX))
        vae = vae_config_from_state_dict(_strip(shapes, VAE_PREFIX))
    except CheckpointError as e:
        raise UnknownModelError(f"looks like {preset.family}, but {e}") from None
    unet = replace(unet, num_heads=preset.unet.num_heads, head_dim=preset.unet.head_dim,
                   adm_kind=preset.unet.adm_kind, upcast_attention=preset.unet.upcast_attention)
    vae = replace(vae, norm_groups=preset.vae.norm_groups)  # group counts are not in the shapes
    text = tuple(_text_spec(te, shapes) for te in preset.text_encoders)
    width = sum(t.config.width for t in text)
    if unet.context_dim is not None and unet.context_dim != width:
        raise UnknownModelError(f"looks like {preset.family}, but the UNet cross-attends to {unet.context_dim}-wide "
                                f"context and the text encoders give {width}")
    spec = replace(preset, unet=unet, vae=vae, text_encoders=text)
    return spec if prediction is None else with_prediction(spec, prediction)


def detect_file(path: str | Path, *, prediction: str | None = None, use_ema: bool = True) -> ModelSpec:
    """The ``ModelSpec`` of the checkpoint at ``path`` from its headers only, never its tensor data.

    The same steps as ``sfumato.load`` up to building the networks: a single file's key names and shapes
    (the safetensors header, or the index of a pickle), EMA selection, :func:`detect_spec`, then
    :func:`resolve_prediction`. A diffusers folder's component files are indexed the same way and renamed
    to the original layout on ``meta`` tensors (shapes without storage). Family, prediction and
    ``default_size`` are what loading finds; for a folder, loading also takes head counts and the latent
    scale from its ``config.json`` files. Costs milliseconds for a multi-gigabyte file (the server lists
    each model's native size with it). Raises ``CheckpointError`` (or ``UnknownModelError``) as loading would.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    metadata: Mapping[str, str] = {}
    if path.is_dir():
        shapes = _diffusers_shapes(path)
    else:
        with io.open_checkpoint(path) as ckpt:
            routes = io.select_ema(ckpt.keys(), use_ema=use_ema)
            shapes = {k: ckpt.shape(src) for k, src in routes.items()}
            metadata = ckpt.metadata
    try:
        spec = detect_spec(shapes)
    except CheckpointError as e:
        raise type(e)(f"{path}: {e}") from None
    pred, _ = resolve_prediction(path, spec.family, prediction=prediction, metadata=metadata)
    return with_prediction(spec, pred)


def _diffusers_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Original-layout keys and shapes of a diffusers folder, converted as ``load`` converts its tensors."""
    from sfumato.weights.load import _component_files, _read_json, _text_layouts, _text_model_level

    def meta(component: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in _component_files(component):
            with io.open_checkpoint(f) as ckpt:
                out.update({k: torch.empty(ckpt.shape(k), device="meta") for k in ckpt.keys()})
        return out

    index = _read_json(folder / "model_index.json")
    unet_cfg = unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"))
    vae_cfg = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"))
    shapes = {UNET_PREFIX + k: tuple(v.shape)
              for k, v in unet_from_diffusers(meta(folder / "unet"), unet_cfg).items()}
    shapes.update({VAE_PREFIX + k: tuple(v.shape)
                   for k, v in vae_from_diffusers(meta(folder / "vae"), vae_cfg).items()})
    names = [n for n in ("text_encoder", "text_encoder_2") if n in index and index[n] and index[n][0] is not None]
    cfgs = [text_config_from_diffusers(_read_json(folder / n / "config.json")) for n in names]
    for (prefix, layout), cfg, name in zip(_text_layouts(cfgs, names), cfgs, names):
        sd = _text_model_level(meta(folder / name))
        keyed = clip_to_open_clip(sd, cfg) if layout == "open_clip" else sd
        shapes.update({prefix + k: tuple(v.shape) for k, v in keyed.items()})
    return shapes


def with_prediction(spec: ModelSpec, prediction: str) -> ModelSpec:
    """``spec`` predicting ``prediction``; for SD 2.x that also switches family ("sd2" <-> "sd2-v") and the
    default size that goes with it."""
    prediction = normalize_prediction(prediction)
    twin = next((t for t in _prediction_twins(spec.family) if t.prediction == prediction), None)
    if twin is None:
        return replace(spec, prediction=prediction)
    return replace(spec, family=twin.family, prediction=prediction, default_size=twin.default_size)


# --- prediction type -------------------------------------------------------------------------------------

def resolve_prediction(path: Path, spec_family: str, *, prediction: str | None,
                       metadata: Mapping[str, str]) -> tuple[str, str]:
    """(prediction, where it came from) for a model at ``path`` detected as ``spec_family``.

    First that answers:

    1. ``prediction``, the caller's ("eps" | "v"; "epsilon" / "v_prediction" accepted);
    2. a ``.yaml`` beside a single file with the same stem, as AUTOMATIC1111 reads it: a line
       ``parameterization: "v"`` means v, any other yaml means eps;
    3. for a diffusers folder, ``scheduler/scheduler_config.json`` ``prediction_type``;
    4. file metadata: ``modelspec.prediction_type`` (Stability's model-spec) or ``ss_v_parameterization``
       (kohya trainers); for SD 2.x, ``global_step`` 875000 is the 512-base eps release;
    5. the family default. Plain SD 2.x single files default to **v**: the 768-v releases are what
       most people have, and diffusers' single-file loader defaults to v as well. Every other family
       takes its preset's value.
    """
    if prediction is not None:
        return normalize_prediction(prediction), "the prediction argument"
    path = Path(path)
    if path.is_dir():
        sched = path / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            try:
                value = json.loads(sched.read_text()).get("prediction_type", "epsilon")
            except (OSError, ValueError, AttributeError) as e:
                raise CheckpointError(f"{sched}: cannot read prediction_type ({e})") from None
            if value not in _PREDICTIONS:
                raise CheckpointError(f"{sched}: prediction_type {value!r} is not supported "
                                      f"(sfumato runs epsilon and v_prediction)")
            return _PREDICTIONS[value], f"{sched} (prediction_type {value})"
    else:
        sidecar = path.with_suffix(".yaml")
        if sidecar.is_file():
            try:
                v = bool(_V_YAML.search(sidecar.read_text(errors="replace")))
            except OSError as e:
                raise CheckpointError(f"{sidecar}: cannot read ({e})") from None
            return ("v", f"{sidecar} (parameterization: v)") if v else ("eps", f"{sidecar} (no v parameterization)")

    if metadata.get("modelspec.prediction_type") in _PREDICTIONS:
        value = metadata["modelspec.prediction_type"]
        return _PREDICTIONS[value], f"metadata modelspec.prediction_type = {value}"
    if metadata.get("ss_v_parameterization", "").lower() in ("true", "false"):
        value = metadata["ss_v_parameterization"]
        return ("v" if value.lower() == "true" else "eps"), f"metadata ss_v_parameterization = {value}"
    twins = _prediction_twins(spec_family)
    if len(twins) > 1 and metadata.get("global_step") == _EPS_RELEASE_STEP:
        return "eps", f"metadata global_step = {_EPS_RELEASE_STEP} (the SD 2.x 512-base eps release)"
    if any(t.prediction == "v" for t in twins) and len(twins) > 1:
        return "v", f"the default for {spec_family} files whose keys cannot tell (the 768-v releases)"
    return get_preset(spec_family).prediction, f"the {spec_family} preset"
