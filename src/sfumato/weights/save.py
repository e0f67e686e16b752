"""Saving a pipeline: the original single-file layout (what users download and share) or a diffusers folder.

Both writers take the weights of the loaded networks as they are, rename them through the same
tables the loader uses, and write every file atomically (temp file + rename).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sfumato.errors import InvalidParameterError
from sfumato.weights import io
from sfumato.weights.keymap_clip import clip_to_open_clip, text_config_to_diffusers
from sfumato.weights.keymap_unet import unet_config_to_diffusers, unet_to_diffusers
from sfumato.weights.keymap_vae import vae_config_to_diffusers, vae_to_diffusers
from sfumato.weights.load import UNET_PREFIX, VAE_PREFIX

if TYPE_CHECKING:
    from sfumato.pipeline import Pipeline

FORMATS = ("single_file", "diffusers")

# diffusers pipeline class of each family, for model_index.json.
DIFFUSERS_PIPELINES: dict[str, str] = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sd2-v": "StableDiffusionPipeline",
    "sd1-inpaint": "StableDiffusionInpaintPipeline",
    "sd2-inpaint": "StableDiffusionInpaintPipeline",
    "sd1-pix2pix": "StableDiffusionInstructPix2PixPipeline",
    "sd2-depth": "StableDiffusionDepth2ImgPipeline",
    "sd2-upscaler": "StableDiffusionUpscalePipeline",
    "sd2-unclip-l": "StableUnCLIPImg2ImgPipeline",
    "sd2-unclip-h": "StableUnCLIPImg2ImgPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sdxl-inpaint": "StableDiffusionXLInpaintPipeline",
    "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline",
}


def _cast(sd: dict[str, torch.Tensor], half: bool) -> dict[str, torch.Tensor]:
    if not half:
        return {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    return {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in sd.items()}


def _ema_flat(key: str) -> str:
    """LDM's EMA name of ``model.diffusion_model.<name>``: 'model_ema.' + name without 'model.' and dots."""
    return "model_ema." + key[len("model."):].replace(".", "")


def single_file_state_dict(pipe: Pipeline, *, ema_only: bool = True) -> dict[str, torch.Tensor]:
    """Every weight of ``pipe`` under its original single-file key."""
    spec = pipe.spec
    out = {UNET_PREFIX + k: v for k, v in pipe.unet.state_dict().items()}
    out.update({VAE_PREFIX + k: v for k, v in pipe.vae.state_dict().items()})
    for te, enc in zip(spec.text_encoders, pipe.text_encoders):
        sd = enc.state_dict()
        if te.ckpt_layout == "open_clip":
            sd = clip_to_open_clip(sd, te.config)
        out.update({te.ckpt_prefix + k: v for k, v in sd.items()})
    if pipe.image_encoder is not None:
        from sfumato.weights.keymap_clip_vision import vision_to_openclip
        from sfumato.weights.load import IMAGE_ENCODER_PREFIX, NOISE_AUGMENTOR_PREFIX

        out.update({IMAGE_ENCODER_PREFIX + k: v for k, v in vision_to_openclip(pipe.image_encoder.state_dict()).items()})
        out.update({NOISE_AUGMENTOR_PREFIX + k: v for k, v in pipe.noise_augmentor.state_dict().items()})
    if pipe.depth_model is not None:
        from sfumato.weights.load import DEPTH_MODEL_PREFIX

        out.update({DEPTH_MODEL_PREFIX + k: v for k, v in pipe.depth_model.state_dict().items()})
    if not ema_only and pipe.ema is not None and pipe.source is not None and pipe.source.is_file():
        out.update(_other_unet_copy(pipe, out))
    return out


def _other_unet_copy(pipe: Pipeline, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Both UNet copies of a training checkpoint: the loaded one plus the other, read from the source."""
    unet_keys = [k for k in current if k.startswith(UNET_PREFIX)]
    extra: dict[str, torch.Tensor] = {}
    with io.open_checkpoint(pipe.source) as ckpt:
        for k in unet_keys:
            if pipe.ema == "ema":  # loaded EMA: it goes to model_ema.*, raw weights back from the file
                extra[_ema_flat(k)] = current[k]
                extra[k] = ckpt.get(k, dtype=current[k].dtype)
            else:
                extra[_ema_flat(k)] = ckpt.get(_ema_flat(k), dtype=current[k].dtype)
    return extra


def save(pipe: Pipeline, path: str | os.PathLike, *, format: str = "single_file", half: bool = False,
         ema_only: bool = True) -> Path:
    """Write ``pipe`` to ``path`` as ``format`` ("single_file" or "diffusers"); returns the path."""
    if format not in FORMATS:
        raise InvalidParameterError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    path = Path(path)
    if format == "single_file":
        if path.suffix != ".safetensors":
            raise InvalidParameterError(f"{path}: single files are written as .safetensors; give that suffix")
        meta = {"format": "pt", "sfumato.family": pipe.spec.family, "sfumato.prediction": pipe.spec.prediction}
        io.write_safetensors(path, _cast(single_file_state_dict(pipe, ema_only=ema_only), half), meta)
        return path
    _save_diffusers(pipe, path, half=half)
    return path


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _save_diffusers(pipe: Pipeline, folder: Path, *, half: bool) -> None:
    """A diffusers folder, written into a temporary sibling and renamed into place when complete."""
    if folder.exists() and any(folder.iterdir()):
        raise InvalidParameterError(f"{folder}: exists and is not empty; choose a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _write_diffusers_tree(pipe, tmp, half=half)
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_diffusers_tree(pipe: Pipeline, root: Path, *, half: bool) -> None:
    spec = pipe.spec
    index: dict = {"_class_name": DIFFUSERS_PIPELINES.get(spec.family, "StableDiffusionPipeline"),
                   "_diffusers_version": "0.30.0"}

    unet_json = {**unet_config_to_diffusers(spec.unet), "sample_size": spec.default_size // spec.vae.downscale}
    _write_json(root / "unet" / "config.json", unet_json)
    io.write_safetensors(root / "unet" / "diffusion_pytorch_model.safetensors",
                         _cast(unet_to_diffusers(pipe.unet.state_dict(), spec.unet), half))
    index["unet"] = ["diffusers", "UNet2DConditionModel"]

    _write_json(root / "vae" / "config.json", vae_config_to_diffusers(
        spec.vae, scaling_factor=spec.latent_scale, shift_factor=spec.latent_shift or None,
        sample_size=spec.default_size, force_upcast=spec.vae_upcast or not spec.size_conditioning))
    io.write_safetensors(root / "vae" / "diffusion_pytorch_model.safetensors",
                         _cast(vae_to_diffusers(pipe.vae.state_dict(), spec.vae), half))
    index["vae"] = ["diffusers", "AutoencoderKL"]

    names = _text_encoder_names(spec)
    for name in ("text_encoder", "text_encoder_2"):
        index[name] = [None, None]
        index[name.replace("text_encoder", "tokenizer")] = [None, None]
    for name, te, enc in zip(names, spec.text_encoders, pipe.text_encoders):
        sd, cfg = _diffusers_text(te, enc)
        cls = "CLIPTextModelWithProjection" if te.pooled else "CLIPTextModel"
        _write_json(root / name / "config.json", text_config_to_diffusers(cfg, with_projection=te.pooled))
        io.write_safetensors(root / name / "model.safetensors", _cast(sd, half))
        index[name] = ["transformers", cls]
        tok = name.replace("text_encoder", "tokenizer")
        _write_tokenizer(root / tok, pipe.tokenizer, te.pad_id)
        index[tok] = ["transformers", "CLIPTokenizer"]

    if pipe.image_encoder is not None:
        _write_unclip(pipe, root, index, half)
    if pipe.depth_model is not None:  # depth2img's estimator, as transformers' DPTForDepthEstimation
        from sfumato.weights.keymap_depth import (
            depth_config_to_transformers,
            depth_to_transformers,
            preprocessing_to_transformers,
        )

        cfg = pipe.depth_model.cfg
        _write_json(root / "depth_estimator" / "config.json", depth_config_to_transformers(cfg))
        io.write_safetensors(root / "depth_estimator" / "model.safetensors",
                             _cast(depth_to_transformers(pipe.depth_model.state_dict(), cfg), half))
        _write_json(root / "feature_extractor" / "preprocessor_config.json",
                    preprocessing_to_transformers(pipe.depth_model.preprocessing))
        index.update(depth_estimator=["transformers", "DPTForDepthEstimation"],
                     feature_extractor=["transformers", "DPTImageProcessor"])
    if spec.concat == "low_res":  # the x4 upscaler's noise augmentation: its own DDPM schedule, 350 levels
        sched = spec.schedule
        _write_json(root / "low_res_scheduler" / "scheduler_config.json",
                    {"_class_name": "DDPMScheduler", "beta_schedule": sched.beta_schedule,
                     "beta_start": sched.beta_start, "beta_end": sched.beta_end,
                     "num_train_timesteps": sched.num_timesteps})
        index.update(low_res_scheduler=["diffusers", "DDPMScheduler"], max_noise_level=350)
    _write_json(root / "scheduler" / "scheduler_config.json", _scheduler_config(spec))
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    if spec.text_encoders and len(spec.text_encoders) == 1 and not spec.size_conditioning and not spec.image_encoder:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
        index.setdefault("feature_extractor", [None, None])
    if spec.size_conditioning == "refiner":
        index["requires_aesthetics_score"] = True
    if spec.size_conditioning:
        index["force_zeros_for_empty_prompt"] = spec.zero_empty_negative
    _write_json(root / "model_index.json", index)


def _write_unclip(pipe: Pipeline, root: Path, index: dict, half: bool) -> None:
    """unCLIP's image encoder, embedding statistics, augmentation schedule and image processor, as
    ``StableUnCLIPImg2ImgPipeline`` folders hold them."""
    from sfumato.models.clip_vision import CLIP_MEAN, CLIP_STD
    from sfumato.weights.keymap_clip_vision import vision_config_to_diffusers

    cfg, aug = pipe.image_encoder.cfg, pipe.noise_augmentor
    _write_json(root / "image_encoder" / "config.json", vision_config_to_diffusers(cfg))
    io.write_safetensors(root / "image_encoder" / "model.safetensors", _cast(pipe.image_encoder.state_dict(), half))
    _write_json(root / "image_normalizer" / "config.json",
                {"_class_name": "StableUnCLIPImageNormalizer", "embedding_dim": aug.dim})
    io.write_safetensors(root / "image_normalizer" / "diffusion_pytorch_model.safetensors",
                         _cast({"mean": aug.data_mean, "std": aug.data_std}, half))
    sched = aug.schedule
    _write_json(root / "image_noising_scheduler" / "scheduler_config.json",
                {"_class_name": "DDPMScheduler", "beta_schedule": sched.beta_schedule, "beta_start": sched.beta_start,
                 "beta_end": sched.beta_end, "num_train_timesteps": sched.num_timesteps})
    _write_json(root / "feature_extractor" / "preprocessor_config.json",
                {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                 "size": {"shortest_edge": cfg.image_size}, "resample": 3, "do_center_crop": True,
                 "crop_size": {"height": cfg.image_size, "width": cfg.image_size}, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
                 "image_std": list(CLIP_STD), "do_convert_rgb": True})
    index.update(image_encoder=["transformers", "CLIPVisionModelWithProjection"],
                 image_normalizer=["stable_diffusion", "StableUnCLIPImageNormalizer"],
                 image_noising_scheduler=["diffusers", "DDPMScheduler"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])


def _text_encoder_names(spec) -> list[str]:
    """diffusers folder of each encoder: the pooled (OpenCLIP bigG) one is always ``text_encoder_2``."""
    return ["text_encoder_2" if te.pooled else "text_encoder" for te in spec.text_encoders]


def _diffusers_text(te, enc) -> tuple[dict[str, torch.Tensor], object]:
    """Weights and config as diffusers stores them: layers past the context layer are dropped when the
    family never reads them (SD 2.x keeps 23 of OpenCLIP-H's 24 layers, as the official diffusers copy),
    and so is a projection a plain ``CLIPTextModel`` cannot hold."""
    from dataclasses import replace

    cfg = te.config
    sd = dict(enc.state_dict())
    if not te.pooled:
        keep = te.layer if te.layer > 0 else cfg.layers
        if keep < cfg.layers:
            sd = {k: v for k, v in sd.items() if not _layer_at_or_after(k, keep)}
        sd.pop("text_projection.weight", None)
        cfg = replace(cfg, layers=min(keep, cfg.layers), projection_dim=None)
    return sd, cfg


def _layer_at_or_after(key: str, n: int) -> bool:
    prefix = "text_model.encoder.layers."
    return key.startswith(prefix) and int(key[len(prefix):].split(".", 1)[0]) >= n


def _scheduler_config(spec) -> dict:
    s = spec.schedule
    return {
        "_class_name": "EulerDiscreteScheduler",
        "beta_schedule": s.beta_schedule,
        "beta_start": s.beta_start,
        "beta_end": s.beta_end,
        "num_train_timesteps": s.num_timesteps,
        "prediction_type": {"eps": "epsilon", "v": "v_prediction"}[spec.prediction],
        "timestep_spacing": "leading",
        "steps_offset": 1,
    }


def _write_tokenizer(folder: Path, tokenizer, pad_id: int) -> None:
    """vocab.json + merges.txt from the vendored BPE data, and the special tokens transformers expects."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer.vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    pad = tokenizer.decode_token(pad_id)
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": pad}
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(folder / "tokenizer_config.json",
                {**specials, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"})
