"""sfumato's trainer: the two stages (``vae_stage``, ``diffusion_stage``), export to the original
single-file layout, and ``train_builtin``, which makes the built-in model from synthetic scenes on a CPU
budget.

    vae = train_vae(spec.vae, data.images, steps=800, out_dir="run")
    dm = train_diffusion(spec, vae.vae, data, latent_scale=vae.latent_scale, steps=1500, out_dir="run")
    export_pipeline(dm.spec, dm.unet_ema, vae.vae, dm.text_encoders_ema, "run/model.safetensors")

The recipe is LDM's (Rombach et al. 2022): a KL autoencoder first, then the diffusion model on its
frozen latents, scaled to unit variance.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sfumato.config import BUILTIN, ModelSpec
from sfumato.errors import CheckpointError, InvalidParameterError
from sfumato.models.unet import UNetModel
from sfumato.models.vae import AutoencoderKL
from sfumato.text.encoder import CLIPTextEncoder
from sfumato.text.tokenizer import get_tokenizer
from sfumato.train.common import hardware, images_grid, set_threads
from sfumato.train.diffusion_stage import (
    CHECKPOINT,
    TrainedDiffusion,
    encode_text,
    tokenize_captions,
    train_diffusion,
)
from sfumato.train.vae_stage import (
    NORM_GROUPS_KEY,
    VAE_CHECKPOINT,
    VAE_FILE,
    TrainedVAE,
    load_trained_vae,
    train_vae,
    vae_loss,
)
from sfumato.weights import io
from sfumato.weights.save import single_file_state_dict

__all__ = [
    "MODEL_FILE",
    "SAMPLE_PROMPTS",
    "BuiltinRun",
    "export_pipeline",
    "measure_step_times",
    "train_builtin",
    "train_diffusion",
    "train_vae",
]

MODEL_FILE = "model.safetensors"
SAMPLE_PROMPTS = ("a red circle", "a large blue square on a white background", "a small yellow star in the top left",
                  "a green triangle on a black background", "a pink ring", "an orange square and a purple circle")


def export_pipeline(spec: ModelSpec, unet_ema: UNetModel, vae: AutoencoderKL,
                    text_encoder: CLIPTextEncoder | Sequence[CLIPTextEncoder], path: str | os.PathLike, *,
                    half: bool = True, latent_scale: float | None = None,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write the trained model as an original-layout single ``.safetensors`` (what ``sfumato.load`` and other
    SD tools read), fp16 when ``half``.

    The weights are laid out by ``sfumato.weights.save.single_file_state_dict``, the table ``Pipeline.save``
    writes with; this adds metadata ``Pipeline.save`` has no argument for: ``sfumato.latent_scale`` (the
    trained VAE's, also baked into the returned spec), and ``modelspec.prediction_type`` so a v-prediction
    model is read as one (``sfumato.weights.detect.resolve_prediction``).
    """
    from sfumato.pipeline import Pipeline

    path = Path(path)
    if path.suffix != ".safetensors":
        raise InvalidParameterError(f"{path}: the model is written as .safetensors; give that suffix")
    if latent_scale is not None:
        spec = replace(spec, latent_scale=float(latent_scale))
    encoders = [text_encoder] if isinstance(text_encoder, torch.nn.Module) else list(text_encoder)
    pipe = Pipeline(spec=spec, unet=unet_ema, vae=vae, text_encoders=encoders, tokenizer=get_tokenizer())
    sd = {k: (v.detach().to(torch.float16) if half and v.is_floating_point() else v.detach()).cpu().contiguous()
          for k, v in single_file_state_dict(pipe).items()}
    meta = {"format": "pt", "sfumato.family": spec.family, "sfumato.prediction": spec.prediction,
            "modelspec.prediction_type": {"eps": "epsilon", "v": "v"}[spec.prediction],
            "sfumato.latent_scale": repr(spec.latent_scale), NORM_GROUPS_KEY: str(spec.vae.norm_groups),
            **(metadata or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_safetensors(path, sd, meta)
    return path


# --- the built-in model ----------------------------------------------------------------------------------

@dataclass
class BuiltinRun:
    """What ``train_builtin`` made, and how long each part took."""

    path: Path
    spec: ModelSpec  # with the measured latent scale
    vae: TrainedVAE
    diffusion: TrainedDiffusion
    seconds: float
    vae_steps: int
    diffusion_steps: int
    step_times: dict[str, float]  # seconds per optimiser step measured before training
    hardware: str


def _time_steps(fn: Callable[[], torch.Tensor], params: list[torch.nn.Parameter], reps: int) -> float:
    """Seconds per optimiser step of ``fn``'s loss, after one warm-up step."""
    opt = torch.optim.AdamW(params, lr=1e-5)
    for i in range(reps + 1):
        if i == 1:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        fn().backward()
        opt.step()
    return (time.perf_counter() - t0) / reps


def measure_step_times(spec: ModelSpec, *, vae_batch: int, diffusion_batch: int, reps: int = 3,
                       size: int | None = None, vae_crop: int | None = None) -> dict[str, float]:
    """Seconds per training step of each stage at ``spec``'s sizes on this machine (throwaway random models,
    random data: the cost does not depend on the values)."""
    size = size or spec.default_size
    g = torch.Generator().manual_seed(0)
    vae = AutoencoderKL(spec.vae)
    x = torch.rand((vae_batch, 3, vae_crop or size, vae_crop or size), generator=g) * 2 - 1
    vae_s = _time_steps(lambda: vae_loss(vae, x, g, 1e-6, 0.0), list(vae.parameters()), reps)
    unet = UNetModel(spec.unet)
    encoders = [CLIPTextEncoder(te.config) for te in spec.text_encoders]
    f = spec.vae.downscale
    z = torch.randn((diffusion_batch, spec.unet.in_channels, size // f, size // f), generator=g)
    t = torch.randint(0, spec.schedule.num_timesteps, (diffusion_batch,), generator=g)
    ids = [tokenize_captions(get_tokenizer(), ["a red circle"] * diffusion_batch, te.pad_id) for te in spec.text_encoders]

    def diffusion_loss() -> torch.Tensor:
        return (unet(z, t, context=encode_text(encoders, spec.text_encoders, ids)) - z).pow(2).mean()

    params = [p for m in [unet, *encoders] for p in m.parameters()]
    return {"vae": vae_s, "diffusion": _time_steps(diffusion_loss, params, reps)}


def train_builtin(
    out_dir: str | os.PathLike,
    *,
    minutes: float = 35.0,
    seed: int = 0,
    n_images: int = 10000,
    spec: ModelSpec = BUILTIN,
    vae_batch: int = 32,
    vae_crop: int | None = 32,
    vae_lr: float = 2e-3,
    diffusion_batch: int = 32,
    diffusion_lr: float = 5e-4,
    offset_noise: float = 0.1,
    ema_decay: float = 0.995,
    vae_fraction: float = 0.3,
    vae_steps: int | None = None,
    diffusion_steps: int | None = None,
    prediction: str | None = None,
    threads: int | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> BuiltinRun:
    """Train sfumato's built-in model from scratch on ``n_images`` synthetic scenes and write
    ``out_dir/model.safetensors`` (fp16, original layout), with ``samples.png`` beside it.

    Step counts not given are chosen to fill ``minutes`` of wall time on this machine: the step time of
    each stage is measured first, ``vae_fraction`` of the training time goes to the autoencoder and the
    rest to the diffusion model, after reserving time for rendering, latent encoding and export. The
    chosen counts are logged and kept in ``plan.json``, so a run can be repeated exactly with them.

    ``resume`` continues an interrupted run in ``out_dir`` with its ``plan.json``: a finished autoencoder
    (``vae.safetensors``) is reused, an unfinished one resumes from ``vae_checkpoint.pt``, and the diffusion
    stage from ``checkpoint.pt``; the result is the one the uninterrupted run would have given.
    """
    from sfumato.train import scenes

    t_start = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan_file = out / "plan.json"
    prediction = prediction or spec.prediction
    if resume:
        if not plan_file.is_file():
            raise CheckpointError(f"{plan_file}: no plan of an earlier run to resume")
        plan = json.loads(plan_file.read_text())
        seed, n_images, vae_steps, diffusion_steps = (plan[k] for k in ("seed", "n_images", "vae_steps",
                                                                         "diffusion_steps"))
        prediction, vae_batch, diffusion_batch = plan["prediction"], plan["vae_batch"], plan["diffusion_batch"]
        vae_crop = plan.get("vae_crop")
        log(f"resuming {out}: {plan}")
    set_threads(threads)
    log(f"hardware: {hardware()}")
    if spec.vae.ch // spec.vae.norm_groups < 2:
        log(f"warning: the autoencoder's GroupNorm has {spec.vae.norm_groups} groups over {spec.vae.ch} channels, "
            "an instance norm that erases each image's flat colours; it learns slowly (use fewer groups)")
    data = scenes.dataset(n_images, seed)
    log(f"{n_images} scenes rendered in {time.monotonic() - t_start:.1f}s")

    step_times = measure_step_times(spec, vae_batch=vae_batch, diffusion_batch=diffusion_batch, vae_crop=vae_crop)
    log(f"step times: autoencoder {step_times['vae']:.2f}s (batch {vae_batch}), diffusion "
        f"{step_times['diffusion']:.2f}s (batch {diffusion_batch})")
    # Reserve what is not training: latent encoding (the encoder's forward pass costs about a sixth of a
    # VAE training step per image, measured), export and sample images; then split what remains.
    encode_s = n_images / vae_batch * step_times["vae"] / 6
    budget = minutes * 60 - (time.monotonic() - t_start) - encode_s - 30
    if vae_steps is None:
        vae_steps = max(50, int(budget * vae_fraction / step_times["vae"]))
    if diffusion_steps is None:
        left = budget - vae_steps * step_times["vae"]
        diffusion_steps = max(100, int(left / step_times["diffusion"]))
    log(f"plan: {vae_steps} autoencoder steps, {diffusion_steps} diffusion steps "
        f"(repeat with --vae-steps {vae_steps} --steps {diffusion_steps} --seed {seed})")
    plan_file.write_text(json.dumps({"seed": seed, "n_images": n_images, "vae_steps": vae_steps,
                                     "diffusion_steps": diffusion_steps, "prediction": prediction,
                                     "vae_batch": vae_batch, "vae_crop": vae_crop,
                                     "diffusion_batch": diffusion_batch}, indent=2) + "\n")

    if resume and (out / VAE_FILE).is_file():
        trained, scale = load_trained_vae(out / VAE_FILE)
        assert scale is not None
        vae = TrainedVAE(vae=trained, latent_std=1.0 / scale, latent_scale=scale, path=out / VAE_FILE)
        log(f"autoencoder: reusing {out / VAE_FILE}")
    else:
        vae_ckpt = out / VAE_CHECKPOINT
        vae = train_vae(spec.vae, data.images, steps=vae_steps, batch_size=vae_batch, lr=vae_lr, crop=vae_crop,
                        seed=seed, out_dir=out, checkpoint_every=max(100, vae_steps // 4), progress=progress,
                        resume_from=vae_ckpt if resume and vae_ckpt.is_file() else None)
        log(f"autoencoder: {vae_steps} steps, {vae.seconds:.0f}s in this call, final loss {vae.losses[-1]:.4f}; "
            f"latent std {vae.latent_std:.4f} -> latent_scale {vae.latent_scale:.5f}")
    ckpt = out / CHECKPOINT
    dm = train_diffusion(spec, vae.vae, data, steps=diffusion_steps, batch_size=diffusion_batch, lr=diffusion_lr,
                         ema_decay=ema_decay, offset_noise=offset_noise,
                         prediction=prediction, seed=seed, out_dir=out, latent_scale=vae.latent_scale,
                         checkpoint_every=max(100, diffusion_steps // 10), progress=progress,
                         resume_from=ckpt if resume and ckpt.is_file() else None)
    tail = dm.losses[-50:]
    log(f"diffusion: {diffusion_steps} steps, {dm.seconds:.0f}s in this call, loss of the last {len(tail)} {sum(tail) / len(tail):.4f}")
    path = export_pipeline(dm.spec, dm.unet_ema, vae.vae, dm.text_encoders_ema, out / MODEL_FILE, metadata={
        "sfumato.train.vae_steps": str(vae_steps), "sfumato.train.steps": str(diffusion_steps),
        "sfumato.train.seed": str(seed), "sfumato.train.n_images": str(n_images)})
    _save_samples(dm, vae.vae, out / "samples.png", seed=seed)
    seconds = time.monotonic() - t_start
    log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); total {seconds / 60:.1f} min on {hardware()}")
    return BuiltinRun(path=path, spec=dm.spec, vae=vae, diffusion=dm, seconds=seconds, vae_steps=vae_steps,
                      diffusion_steps=diffusion_steps, step_times=step_times, hardware=hardware())


def _save_samples(dm: TrainedDiffusion, vae: AutoencoderKL, path: Path, *, seed: int) -> None:
    """One image per sample prompt from the EMA weights (euler, 20 steps, CFG 5), in one row."""
    from sfumato.pipeline import Pipeline

    pipe = Pipeline(spec=dm.spec, unet=dm.unet_ema, vae=vae, text_encoders=list(dm.text_encoders_ema),
                    tokenizer=get_tokenizer())
    images = [pipe.generate(p, steps=20, cfg_scale=5.0, seed=seed + i).images[0]
              for i, p in enumerate(SAMPLE_PROMPTS)]
    images_grid([images]).save(path)

