"""Loading checkpoints: an original single file or a diffusers folder -> a ready ``Pipeline``.

The flow is the same for every family:

1. read key names and shapes (``io.open_checkpoint``; EMA weights chosen by ``io.select_ema``);
2. find the family and the architecture from them (``detect.detect_spec``), then the prediction type
   (``detect.resolve_prediction``: argument, ``.yaml`` sidecar, scheduler config, metadata, default);
3. build every network on the ``meta`` device (no allocation, no random init);
4. move each tensor from the file into its module in the requested dtype (``load_state_dict(assign=True)``),
   strictly: every key of the file is used or named in ``IGNORED``, every module key is present, every
   shape matches, or a ``CheckpointError`` names the file and the keys.

Original files load through an identity map (module names follow the LDM keys); OpenCLIP text encoders
and diffusers folders go through the rename tables in ``keymap_*``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from sfumato.config import ModelSpec, TextEncoderSpec, VAEConfig
from sfumato.errors import CheckpointError, InvalidParameterError
from sfumato.models import ops
from sfumato.models.unet import UNetModel
from sfumato.models.vae import AutoencoderKL
from sfumato.text.encoder import CLIPTextEncoder
from sfumato.text.tokenizer import get_tokenizer
from sfumato.weights import detect, io
from sfumato.weights.keymap_clip import (
    OPEN_CLIP_IGNORED_KEYS,
    clip_from_open_clip,
    text_config_from_diffusers,
)
from sfumato.weights.keymap_unet import unet_config_from_diffusers, unet_from_diffusers
from sfumato.weights.keymap_vae import vae_config_from_diffusers, vae_config_from_state_dict, vae_from_diffusers

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
IMAGE_ENCODER_PREFIX = "embedder.model.visual."  # unCLIP's CLIP image tower (OpenAI / OpenCLIP names)
NOISE_AUGMENTOR_PREFIX = "noise_augmentor."
DEPTH_MODEL_PREFIX = "depth_model.model."  # depth2img's MiDaS DPT-Hybrid (MiDaS / timm names)

# Keys an original file may carry that no network here uses, each with the reason.
IGNORED: tuple[tuple[str, str], ...] = (
    (r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
     r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|"
     r"posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|"
     r"logvar)$", "DDPM training buffers; the schedule is in ModelSpec.schedule"),
    (r"^model_ema\.(decay|num_updates)$", "EMA bookkeeping"),
    (r"^denoiser\.", "sgm sigma buffers; derived from the schedule"),
    (r"^low_scale_model\.", "x4 upscaler noise-augmentation schedule buffers"),
    (r"(^|\.)position_ids$", "transformers' position index buffer"),
    (r"^embedder\.model\.(?!visual\.)", "unCLIP image embedder: the CLIP model's parts outside its image tower"),
    (r"^noise_augmentor\.(?!data_mean$|data_std$)", "unCLIP noise-augmentation schedule buffers"),
    (r"^depth_model\.model\.pretrained\.model\.head\.", "timm's ImageNet classifier head of the MiDaS backbone (never run)"),
    (r"^loss\.", "autoencoder training loss (LPIPS, discriminator)"),
)
_IGNORED_RE = [(re.compile(p), why) for p, why in IGNORED]


def builtin_checkpoint() -> Path:
    """The model sfumato trained itself, shipped inside the package (``sfumato.load()`` with no path)."""
    from importlib.resources import files

    path = Path(str(files("sfumato") / "data" / "builtin" / "model.safetensors"))
    if not path.is_file():
        raise CheckpointError(f"{path}: the built-in model is missing from this installation; pass a path to "
                              "a .safetensors/.ckpt file or a diffusers folder")
    return path


def _ignored(key: str) -> bool:
    return any(r.search(key) for r, _ in _IGNORED_RE)


def _default_dtype(device: torch.device) -> torch.dtype:
    # fp32 is exact and the fast dtype on CPUs without fp16 units; GPUs get fp16.
    return torch.float32 if device.type == "cpu" else torch.float16


def _check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise InvalidParameterError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise InvalidParameterError(f"dtype {dtype!r} is not supported; use one of {', '.join(names)}")
    return names[dtype]


def assign_weights(module: nn.Module, tensors: Mapping[str, torch.Tensor], *, source: str, what: str) -> None:
    """Strictly load ``tensors`` into ``module`` (built on meta): same key set, same shapes, no copy."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: file has {tuple(tensors[k].shape)}, expected {expected[k]}"
             for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:8])}"
                        f"{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s): {'; '.join(wrong[:8])}")
    if problems:
        raise CheckpointError(f"{source}: the {what} weights do not match the detected architecture: "
                              + " | ".join(problems))
    module.load_state_dict(tensors, strict=True, assign=True)


def _build(factory: Callable[[], nn.Module]) -> nn.Module:
    with ops.meta_device():
        return factory()


class _Source:
    """Tensors by original-layout key, read lazily from one or more files, renamed where needed."""

    def __init__(self, read: Callable[[str], torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.read, self.shapes = read, dict(shapes)


def _text_weights(src: _Source, te: TextEncoderSpec, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = [k for k in src.shapes if k.startswith(te.ckpt_prefix)]
    sd = {k[len(te.ckpt_prefix):]: get(k) for k in keys if not _ignored(k)}
    if te.ckpt_layout == "open_clip":
        for k in OPEN_CLIP_IGNORED_KEYS:
            sd.pop(k, None)
        return clip_from_open_clip(sd, te.config)
    return _text_model_level(sd)


def _text_model_level(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the ``text_model.`` level where a writer left it out: very old SD 1.x files and folders
    written by transformers >= 5.6, whose CLIPTextModel (not ...WithProjection) drops it."""
    if sd and not any(k.startswith("text_model.") for k in sd):
        return {k if k == "text_projection.weight" else "text_model." + k: v for k, v in sd.items()}
    return sd


def _claimed(key: str, spec: ModelSpec) -> bool:
    prefixes = (UNET_PREFIX, VAE_PREFIX) + tuple(t.ckpt_prefix for t in spec.text_encoders)
    if spec.image_encoder is not None:
        prefixes += (IMAGE_ENCODER_PREFIX, NOISE_AUGMENTOR_PREFIX)
    if spec.concat == "depth":
        prefixes += (DEPTH_MODEL_PREFIX,)
    return key.startswith(prefixes)


def _depth_single_file(component: Callable[[str], dict[str, torch.Tensor]], source: str,
                       dtype: torch.dtype) -> dict[str, nn.Module]:
    """depth2img's MiDaS DPT-Hybrid (``depth_model.model.*``), with the original repo's input transform
    (AddMiDaS: 384 px keeping the aspect ratio, sides multiples of 32, bicubic, mean = std = 0.5)."""
    from sfumato.models.depth import DEPTH_PRESETS, DepthPreprocessing
    from sfumato.weights.keymap_depth import build_depth_estimator

    tensors = component(DEPTH_MODEL_PREFIX)
    if not tensors:
        return {}  # a depth UNet without its estimator: depth maps must be given
    model = build_depth_estimator(DEPTH_PRESETS["dpt-hybrid"], tensors, source=source, dtype=dtype)
    model.preprocessing = DepthPreprocessing(keep_aspect_ratio=True, ensure_multiple_of=32)
    return {"depth_model": model}


def _depth_diffusers(folder: Path, index: dict, dtype: torch.dtype) -> dict[str, nn.Module]:
    """A diffusers depth folder's ``depth_estimator/`` (transformers DPTForDepthEstimation) and its
    ``feature_extractor/`` preprocessing."""
    from sfumato.models.depth import DepthPreprocessing
    from sfumato.weights.keymap_depth import (
        build_depth_estimator,
        depth_config_from_transformers,
        depth_from_transformers,
        preprocessing_from_transformers,
    )

    if not index.get("depth_estimator") or index["depth_estimator"][0] is None:
        return {}
    cfg = depth_config_from_transformers(_read_json(folder / "depth_estimator" / "config.json"))
    model = build_depth_estimator(cfg, depth_from_transformers(_read_component(folder / "depth_estimator", dtype), cfg),
                                  source=f"{folder}/depth_estimator", dtype=dtype)
    prep_json = folder / "feature_extractor" / "preprocessor_config.json"
    model.preprocessing = (preprocessing_from_transformers(_read_json(prep_json)) if prep_json.is_file()
                           else DepthPreprocessing())
    return {"depth_model": model}


def _unclip_single_file(spec: ModelSpec, component: Callable[[str], dict[str, torch.Tensor]],
                        source: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    """unCLIP's image encoder (OpenCLIP layout under ``embedder.model.visual.``) and noise augmentor."""
    from sfumato.models.clip_vision import VISION_PRESETS
    from sfumato.weights.keymap_clip_vision import build_vision_encoder, vision_config_from_openclip, vision_from_openclip

    visual = component(IMAGE_ENCODER_PREFIX)
    if not visual:
        raise CheckpointError(f"{source}: a {spec.family} file needs its image encoder under {IMAGE_ENCODER_PREFIX}; "
                              "none found")
    cfg = vision_config_from_openclip({k: tuple(v.shape) for k, v in visual.items()},
                                      VISION_PRESETS[spec.image_encoder])
    encoder = build_vision_encoder(cfg, vision_from_openclip(visual, cfg.layers), source=source, dtype=dtype)
    return {"image_encoder": encoder,
            "noise_augmentor": _noise_augmentor(cfg.projection_dim, component(NOISE_AUGMENTOR_PREFIX), source)}


def _noise_augmentor(dim: int, stats: dict[str, torch.Tensor], source: str, schedule=None) -> nn.Module:
    from sfumato.models.unclip import NOISE_AUGMENT_SCHEDULE, ImageNoiseAugmentor

    aug = _build(lambda: ImageNoiseAugmentor(dim, schedule or NOISE_AUGMENT_SCHEDULE))
    assign_weights(aug, {k: v.reshape(1, -1) if v.ndim == 1 else v for k, v in stats.items()}, source=source,
                   what="noise augmentor")
    return aug


def _unclip_diffusers(folder: Path, index: dict, spec: ModelSpec, dtype: torch.dtype) -> dict[str, nn.Module]:
    """A diffusers unCLIP folder's ``image_encoder/``, ``image_normalizer/`` and ``image_noising_scheduler/``."""
    from sfumato.config import NoiseScheduleConfig
    from sfumato.weights.keymap_clip_vision import build_vision_encoder, vision_config_from_diffusers

    for name in ("image_encoder", "image_normalizer"):
        if not index.get(name) or index[name][0] is None:
            raise CheckpointError(f"{folder}: a {spec.family} folder needs {name}/ (model_index.json has none)")
    cfg = vision_config_from_diffusers(_read_json(folder / "image_encoder" / "config.json"))
    encoder = build_vision_encoder(cfg, _read_component(folder / "image_encoder", dtype),
                                   source=f"{folder}/image_encoder", dtype=dtype)
    norm = _read_component(folder / "image_normalizer", dtype)
    schedule = None
    sched_json = folder / "image_noising_scheduler" / "scheduler_config.json"
    if sched_json.is_file():
        d = _read_json(sched_json)
        schedule = NoiseScheduleConfig(beta_schedule=d.get("beta_schedule", "squaredcos_cap_v2"),
                                       beta_start=d.get("beta_start", 0.0001), beta_end=d.get("beta_end", 0.02),
                                       num_timesteps=d.get("num_train_timesteps", 1000))
    renamed = {{"mean": "data_mean", "std": "data_std"}.get(k, k): v for k, v in norm.items()}
    return {"image_encoder": encoder,
            "noise_augmentor": _noise_augmentor(cfg.projection_dim, renamed, f"{folder}/image_normalizer", schedule)}


def load(
    path: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    prediction: str | None = None,
    vae: str | os.PathLike | None = None,
    use_ema: bool = True,
    share=None,
    memory=None,
):
    """Load a Stable Diffusion checkpoint into a :class:`sfumato.pipeline.Pipeline`.

    ``path``: an original single file (``.safetensors``; ``.ckpt``/``.pt`` through a restricted unpickler)
    or a diffusers folder (``model_index.json`` + component folders). ``prediction``: "eps" or "v", for
    SD 2.x files whose keys cannot tell. ``vae``: a separate autoencoder file or folder replacing the
    checkpoint's own (e.g. the ft-MSE VAE, or the fp16-fix SDXL VAE: a replaced VAE is trusted in half
    precision unless its diffusers config says ``force_upcast``; an overflow still falls back to fp32).
    ``use_ema``: take the EMA weights of a training checkpoint. ``share``: a loaded pipeline whose
    autoencoder and text encoders this one reuses where the weights are equal (the SDXL refiner and its
    base share the bigG encoder and the VAE), so they are held in memory once. ``memory``: the pipeline's
    :class:`sfumato.pipeline.MemoryOptions`; with ``offload``, mapped weights are left out of memory until
    they first run (no peak of the whole model at load).
    """
    from sfumato.pipeline import MemoryOptions
    from sfumato.weights.io import POPULATE

    if memory is None:
        memory = MemoryOptions()
    if not isinstance(memory, MemoryOptions):
        raise InvalidParameterError(f"memory must be a sfumato.MemoryOptions, got {type(memory).__name__}")
    token = POPULATE.set(memory.offload == "none")
    try:
        pipe = _load(path, device=device, dtype=dtype, prediction=prediction, vae=vae, use_ema=use_ema)
    finally:
        POPULATE.reset(token)
    pipe.memory = memory
    if memory.offload != "none" and pipe.device.type == "cpu":
        from sfumato.weights.pages import release

        for m in pipe.modules():  # what the loader touched (a checked or converted tensor) leaves too
            release(m)
    if share is not None:
        share_modules(pipe, share)
    return pipe


def _load(path, *, device, dtype, prediction, vae, use_ema):  # noqa: ANN001, ANN202 - load()'s own
    from sfumato.pipeline import Pipeline

    if path is None:
        path = builtin_checkpoint()
    path = Path(path)
    device = torch.device(device)
    dtype = _check_dtype(dtype) or _default_dtype(device)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    ema = None
    if path.is_dir():
        spec, unet, vae_model, encoders, extras = _load_diffusers(path, dtype=dtype, prediction=prediction)
    else:
        spec, unet, vae_model, encoders, ema, extras = _load_single_file(path, dtype=dtype, prediction=prediction,
                                                                          use_ema=use_ema)
    if vae is not None:
        vae_model = load_vae(vae, dtype=dtype)
        vae_json = Path(vae) / "config.json"
        spec = replace(spec, vae_upcast=spec.vae_upcast and vae_json.is_file()
                       and bool(_read_json(vae_json).get("force_upcast", False)))
    pipe = Pipeline(spec=spec, unet=unet, vae=vae_model, text_encoders=encoders,
                    tokenizer=get_tokenizer(), source=path, ema=ema, **extras).to(device)
    return pipe


def share_modules(pipe, other) -> None:
    """Make ``pipe`` use ``other``'s autoencoder and text encoders where config, dtype, device and every
    weight are equal (the originals are dropped). The UNets are never shared."""
    from sfumato.pipeline import Pipeline

    if not isinstance(other, Pipeline):
        raise InvalidParameterError(f"share must be a loaded Pipeline, got {type(other).__name__}")

    def same(a: nn.Module, b: nn.Module) -> bool:
        if a.cfg != b.cfg:
            return False
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(
            sa[k].dtype == sb[k].dtype and sa[k].device == sb[k].device and torch.equal(sa[k], sb[k]) for k in sa)

    if same(pipe.vae, other.vae):
        pipe.vae = other.vae
    for i, enc in enumerate(pipe.text_encoders):
        match = next((o for o in other.text_encoders if same(enc, o)), None)
        if match is not None:
            pipe.text_encoders[i] = match


def _load_single_file(path: Path, *, dtype: torch.dtype, prediction: str | None, use_ema: bool):
    with io.open_checkpoint(path) as ckpt:
        routes = io.select_ema(ckpt.keys(), use_ema=use_ema)  # target key -> source key
        shapes = {k: ckpt.shape(src) for k, src in routes.items()}
        try:
            spec = detect.detect_spec(shapes)
        except CheckpointError as e:
            raise type(e)(f"{path}: {e}") from None
        pred, _ = detect.resolve_prediction(path, spec.family, prediction=prediction, metadata=ckpt.metadata)
        spec = detect.with_prediction(spec, pred)

        unused = sorted(k for k in routes if not _claimed(k, spec) and not _ignored(k))
        if unused:
            raise CheckpointError(
                f"{path}: {len(unused)} key(s) belong to no component of the detected {spec.family} model: "
                f"{', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}")

        def get(key: str) -> torch.Tensor:
            return ckpt.get(routes[key], dtype=dtype, share=True)

        def component(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: get(k) for k in routes if k.startswith(prefix) and not _ignored(k)}

        src = _Source(get, shapes)
        unet = _build(lambda: UNetModel(spec.unet))
        assign_weights(unet, component(UNET_PREFIX), source=str(path), what="UNet")
        vae = _build(lambda: AutoencoderKL(spec.vae))
        assign_weights(vae, component(VAE_PREFIX), source=str(path), what="VAE")
        encoders = []
        for i, te in enumerate(spec.text_encoders):
            enc = _build(lambda te=te: CLIPTextEncoder(te.config))
            assign_weights(enc, _text_weights(src, te, get), source=str(path), what=f"text encoder {i}")
            encoders.append(enc)
        extras = _unclip_single_file(spec, component, str(path), dtype) if spec.image_encoder else {}
        if spec.concat == "depth":
            extras.update(_depth_single_file(component, str(path), dtype))
        has_ema = any(k.startswith("model_ema.") for k in ckpt.keys() if not _ignored(k))
        took_ema = any(routes[k].startswith("model_ema.") for k in routes if k.startswith(UNET_PREFIX))
        ema = ("ema" if took_ema else "raw") if has_ema else None
    return spec, unet, vae, encoders, ema, extras


# --- diffusers folders ---------------------------------------------------------------------------

_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


def _component_files(folder: Path) -> list[Path]:
    """The weight file(s) of one diffusers component folder, fp32 before fp16 variants, sharded too."""
    for stem in _WEIGHT_NAMES:
        for variant in ("", ".fp16"):
            for ext in (".safetensors", ".bin"):
                f = folder / f"{stem}{variant}{ext}"
                if f.exists():
                    return [f]
                index = folder / f"{stem}{variant}{ext}.index.json"
                if index.exists():
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                    return [folder / s for s in shards]
    raise CheckpointError(f"{folder}: no weights found (looked for {' / '.join(_WEIGHT_NAMES)}"
                          f"[.fp16].safetensors|.bin and sharded .index.json)")


def _read_component(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in _component_files(folder):
        out.update(io.read_tensors(f, dtype, share=True))
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a diffusers folder needs it)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _load_diffusers(folder: Path, *, dtype: torch.dtype, prediction: str | None):
    from sfumato.weights.keymap_clip import clip_to_open_clip

    index = _read_json(folder / "model_index.json")
    unet_cfg = unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"))
    vae_json = _read_json(folder / "vae" / "config.json")
    vae_cfg = vae_config_from_diffusers(vae_json)
    unet_sd = unet_from_diffusers(_read_component(folder / "unet", dtype), unet_cfg)
    vae_sd = vae_from_diffusers(_read_component(folder / "vae", dtype), vae_cfg)

    text_sds, text_cfgs, text_names = [], [], []
    for name in ("text_encoder", "text_encoder_2"):
        if name in index and index[name] and index[name][0] is not None:
            text_cfgs.append(text_config_from_diffusers(_read_json(folder / name / "config.json")))
            text_sds.append(_text_model_level(_read_component(folder / name, dtype)))
            text_names.append(name)

    # Detection runs on the original layout's key/shape signature, the one source of truth for families.
    shapes: dict[str, tuple[int, ...]] = {UNET_PREFIX + k: tuple(v.shape) for k, v in unet_sd.items()}
    shapes.update({VAE_PREFIX + k: tuple(v.shape) for k, v in vae_sd.items()})
    layouts = _text_layouts(text_cfgs, text_names)
    for (prefix, layout), cfg, sd in zip(layouts, text_cfgs, text_sds):
        keyed = clip_to_open_clip(sd, cfg) if layout == "open_clip" else sd
        shapes.update({prefix + k: tuple(v.shape) for k, v in keyed.items()})
    spec = detect.detect_spec(shapes)
    pred, _ = detect.resolve_prediction(folder, spec.family, prediction=prediction, metadata={})
    spec = detect.with_prediction(spec, pred)
    # config.json is exact where shapes are not (head counts); the scaling factor is data too.
    encoders_spec = tuple(replace(te, config=cfg, pad_id=_pad_id(folder / name.replace("text_encoder", "tokenizer"),
                                                                 te.pad_id))
                          for te, cfg, name in zip(spec.text_encoders, text_cfgs, text_names))
    spec = replace(spec, unet=replace(unet_cfg, adm_kind=spec.unet.adm_kind), vae=vae_cfg,
                   text_encoders=encoders_spec,
                   latent_scale=float(vae_json.get("scaling_factor", spec.latent_scale)),
                   zero_empty_negative=bool(index.get("force_zeros_for_empty_prompt", spec.zero_empty_negative)),
                   # diffusers defaults force_upcast to true for every VAE; only SDXL pipelines read it
                   vae_upcast=spec.vae_upcast and bool(vae_json.get("force_upcast", True)))

    src = str(folder)
    unet = _build(lambda: UNetModel(spec.unet))
    assign_weights(unet, unet_sd, source=src + "/unet", what="UNet")
    vae = _build(lambda: AutoencoderKL(spec.vae))
    assign_weights(vae, vae_sd, source=src + "/vae", what="VAE")
    encoders = []
    for i, (te, sd, name) in enumerate(zip(spec.text_encoders, text_sds, text_names)):
        sd = {k: v for k, v in sd.items() if not _ignored(k)}
        enc = _build(lambda te=te: CLIPTextEncoder(te.config))
        assign_weights(enc, sd, source=f"{src}/{name}", what=f"text encoder {i}")
        encoders.append(enc)
    extras = _unclip_diffusers(folder, index, spec, dtype) if spec.image_encoder else {}
    if spec.concat == "depth":
        extras.update(_depth_diffusers(folder, index, dtype))
    return spec, unet, vae, encoders, extras


def _text_layouts(cfgs: list, names: list[str]) -> list[tuple[str, str]]:
    """Original-file prefix and layout of diffusers text encoders. OpenCLIP models are the ones with
    plain GELU (OpenAI's CLIP uses quick_gelu); a lone ``text_encoder_2`` is the refiner's bigG."""
    if names == ["text_encoder", "text_encoder_2"]:
        return [("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "open_clip")]
    if names == ["text_encoder_2"]:
        return [("conditioner.embedders.0.model.", "open_clip")]
    if len(cfgs) == 1 and cfgs[0].activation == "gelu":
        return [("cond_stage_model.model.", "open_clip")]
    return [("cond_stage_model.transformer.", "hf")] * len(cfgs)


def _pad_id(tokenizer_folder: Path, default: int) -> int:
    """The pad token id of a diffusers tokenizer folder ("!" = 0 for OpenCLIP, EOS for CLIP-L)."""
    f = tokenizer_folder / "special_tokens_map.json"
    if not f.exists():
        return default
    pad = json.loads(f.read_text()).get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    if pad is None:
        return default
    tid = get_tokenizer().token_id(pad)
    return default if tid is None else tid


# --- a VAE on its own ----------------------------------------------------------------------------

def load_vae(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A separate autoencoder: an original-layout file (keys with or without ``first_stage_model.``),
    a diffusers-layout file, or a diffusers ``vae`` folder."""
    path = Path(path)
    if path.is_dir():
        cfg = vae_config_from_diffusers(_read_json(path / "config.json"))
        sd = vae_from_diffusers(_read_component(path, dtype), cfg)
    else:
        with io.open_checkpoint(path) as ckpt:
            routes = io.select_ema(ckpt.keys())
            keys = [k for k in routes if not _ignored(k)]
            if any(".down_blocks." in k or ".up_blocks." in k for k in keys):
                raw = {k: ckpt.get(routes[k], dtype=dtype, share=True) for k in keys}
                cfg = _vae_config_from_diffusers_keys({k: tuple(v.shape) for k, v in raw.items()}, path)
                sd = vae_from_diffusers(raw, cfg)
            else:
                strip = VAE_PREFIX if all(k.startswith(VAE_PREFIX) for k in keys) else ""
                if not strip and any(k.startswith(VAE_PREFIX) for k in keys):
                    extra = [k for k in keys if not k.startswith(VAE_PREFIX)]
                    raise CheckpointError(f"{path}: not a VAE file: keys outside {VAE_PREFIX}: {', '.join(extra[:8])}")
                sd = {k[len(strip):]: ckpt.get(routes[k], dtype=dtype, share=True) for k in keys}
                cfg = vae_config_from_state_dict({k: tuple(v.shape) for k, v in sd.items()})
    model = _build(lambda: AutoencoderKL(cfg))
    assign_weights(model, sd, source=str(path), what="VAE")
    return model


def _vae_config_from_diffusers_keys(shapes: Mapping[str, tuple[int, ...]], path: Path) -> VAEConfig:
    """Architecture of a diffusers-layout VAE file that came without its config.json."""
    levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    try:
        ch = shapes["encoder.conv_in.weight"][0]
        mult = tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0] // ch for i in levels)
        blocks = 1 + max(int(m.group(1)) for k in shapes
                         if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)))
        z2 = shapes["encoder.conv_out.weight"][0]
        embed = shapes["quant_conv.weight"][0] // 2
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: not a diffusers AutoencoderKL state dict (missing {e})") from None
    return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=blocks, z_channels=z2 // 2, embed_dim=embed,
                     in_channels=shapes["encoder.conv_in.weight"][1], out_ch=shapes["decoder.conv_out.weight"][0])


def iter_named_ignored() -> Iterable[tuple[str, str]]:
    """The documented ignore list (pattern, reason), for ``sfumato models`` and the docs."""
    return iter(IGNORED)
