"""Stage 2: train the latent diffusion UNet (and its text encoder) on captioned images.

The DDPM objective (Ho et al. 2020) on VAE latents (Rombach et al. 2022): for a latent x0, uniform
t in [0, T), eps ~ N(0, I) and the training schedule's alpha_bar_t,

    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    loss = || f(x_t, t, text) - target ||^2,  target = eps, or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0

(v-prediction, Salimans & Ho 2022, as diffusers' ``get_velocity``). A fraction of the captions is
replaced by the empty prompt so the model also learns the unconditional prediction that classifier-free
guidance needs (Ho & Salimans 2022). Latents are encoded once before training (posterior mean and std;
each step draws a fresh sample from them), since the VAE is frozen. The text encoder runs every step
as it does at inference: same tokenizer, same 77 tokens, same layer and final norm (``TextEncoderSpec``).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sfumato.config import ModelSpec, TextEncoderSpec
from sfumato.errors import CheckpointError, InvalidParameterError
from sfumato.models.unet import UNetModel
from sfumato.models.vae import AutoencoderKL
from sfumato.sampling import discrete_schedule
from sfumato.text.encoder import CLIPTextEncoder
from sfumato.text.tokenizer import CLIPTokenizer, get_tokenizer
from sfumato.train.common import (
    EMA,
    GradScaler,
    TrainProgress,
    as_captioned,
    autocast,
    batch_indices,
    check_resume,
    chunks,
    load_checkpoint,
    lr_at,
    plot_losses,
    rng_state,
    save_checkpoint,
    set_rng_state,
    to_float,
)

__all__ = [
    "CHECKPOINT",
    "PREDICTIONS",
    "TrainedDiffusion",
    "add_noise",
    "diffusion_target",
    "encode_latents",
    "encode_text",
    "min_snr_weight",
    "tokenize_captions",
    "train_diffusion",
]

CHECKPOINT = "checkpoint.pt"
PREDICTIONS = ("eps", "v")
_KIND = "sfumato-diffusion"


@dataclass
class TrainedDiffusion:
    """The trained networks: raw weights and their EMA, which is what gets exported."""

    spec: ModelSpec  # with this run's prediction type and latent scale
    unet: UNetModel
    text_encoders: list[CLIPTextEncoder]
    unet_ema: UNetModel
    text_encoders_ema: list[CLIPTextEncoder]  # the raw ones when the text encoders were frozen
    losses: list[float] = field(default_factory=list)  # per optimiser step
    step: int = 0
    seconds: float = 0.0  # wall time of the training loop in this call
    checkpoint: Path | None = None


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, *, batch_size: int = 64
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (N, C, h, w) float32 on the CPU of every image, unscaled."""
    p = next(vae.parameters())
    means, stds = [], []
    for s in chunks(len(images), batch_size):
        post = vae.encode(to_float(images[s]).to(p.device, p.dtype))
        means.append(post.mean.float().cpu())
        stds.append(post.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def tokenize_captions(tokenizer: CLIPTokenizer, captions: Sequence[str], pad_id: int) -> torch.Tensor:
    """(N, 77) token ids, padded with ``pad_id`` as the encoder's family pads at inference."""
    return torch.tensor([tokenizer(c, pad_id=pad_id).ids for c in captions], dtype=torch.long)


def encode_text(encoders: Sequence[CLIPTextEncoder], specs: Sequence[TextEncoderSpec],
                ids: Sequence[torch.Tensor]) -> torch.Tensor:
    """Cross-attention context (B, 77, sum of widths): each encoder's hidden state at its spec's layer, as
    ``sfumato.text.conditioning.encode_prompts`` reads it at inference (one chunk, clip skip 1, no weights)."""
    return torch.cat([enc(i, layer=s.layer, final_norm=s.final_norm).hidden
                      for enc, s, i in zip(encoders, specs, ids)], dim=-1)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DDPM forward process at integer timesteps ``t`` (B,): (x_t, alpha, sigma) with
    alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t), shaped (B, 1, 1, 1); as diffusers' ``add_noise``."""
    a = alphas_cumprod.to(x0.dtype)[t]
    alpha = a.sqrt().reshape(-1, *[1] * (x0.ndim - 1))
    sigma = (1 - a).sqrt().reshape(-1, *[1] * (x0.ndim - 1))
    return alpha * x0 + sigma * eps, alpha, sigma


def diffusion_target(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                     prediction: str) -> torch.Tensor:
    """What the network learns to output: ``eps``, or ``v = alpha * eps - sigma * x0`` (VP alpha and sigma)."""
    if prediction == "eps":
        return eps
    return alpha * eps - sigma * x0


def min_snr_weight(alpha: torch.Tensor, sigma: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"):
    the x0-space weight min(SNR, gamma) expressed for the network's target, so that the many low-noise
    timesteps stop dominating the gradient. SNR = alpha^2 / sigma^2; eps: min(SNR, gamma) / SNR;
    v: min(SNR, gamma) / (SNR + 1). Shaped like ``alpha``."""
    snr = alpha.double() ** 2 / sigma.double() ** 2
    w = snr.clamp(max=gamma) / (snr if prediction == "eps" else snr + 1)
    return w.to(alpha.dtype)


def train_diffusion(
    spec: ModelSpec,
    vae: AutoencoderKL,
    dataset: Any,
    *,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 3e-4,
    prediction: str = "eps",
    caption_dropout: float = 0.1,
    offset_noise: float = 0.0,
    snr_gamma: float | None = None,
    timestep_range: tuple[int, int] | None = None,
    ema_decay: float = 0.999,
    grad_accum: int = 1,
    mixed_precision: str = "no",
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    train_text_encoder: bool = True,
    latent_scale: float | None = None,
    sample_latents: bool = True,
    unet: UNetModel | None = None,
    text_encoders: Sequence[CLIPTextEncoder] | None = None,
    tokenizer: CLIPTokenizer | None = None,
    warmup: int | None = None,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    stop_at: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> TrainedDiffusion:
    """Train the UNet of ``spec`` (and its text encoders) on ``dataset`` encoded by the frozen ``vae``.

    ``dataset``: ``scenes.SceneData``, an ``(images, captions)`` pair or ``(image, caption)`` pairs; images
    (3, H, W) in [-1, 1] or uint8. ``steps`` optimiser steps of ``batch_size * grad_accum`` samples, AdamW
    with linear warm-up (default 5% of the steps) and cosine decay to a tenth of ``lr``, gradient norm
    clipped to ``max_grad_norm``, EMA of every trained weight (``ema_decay`` with warm-up).

    ``train_text_encoder`` (default True) trains the text encoders with the UNet. That is the right
    default for sfumato's built-in model: there are no pretrained CLIP weights offline, and a random,
    frozen text encoder gives the UNet no word meanings to condition on (only token identities mixed by
    random attention), so it must learn them from the captions. Fine-tuning a released model passes its
    ``unet`` and ``text_encoders`` and usually ``train_text_encoder=False`` (as the SD releases kept CLIP frozen).

    ``snr_gamma``: weight each sample's loss by Min-SNR-gamma (:func:`min_snr_weight`; None: plain MSE).
    ``offset_noise``: the std of a per-image, per-channel constant added to the noise (Guttenberg 2023).
    ``timestep_range``: (lo, hi) draws training timesteps uniformly from lo..hi inclusive instead of the
    whole schedule. The built-in model learned where to put a shape only from a run on the noisiest steps
    (850..999): below them the noisy latent already shows the shape's place and the caption adds nothing.

    ``latent_scale``: the VAE's (``TrainedVAE.latent_scale``), default ``spec.latent_scale``; latents are
    posterior samples (``sample_latents``) or means, times the scale. ``mixed_precision`` "bf16"/"fp16"
    autocasts on CUDA only; the CPU trains in fp32. ``out_dir`` receives ``checkpoint.pt`` (every
    ``checkpoint_every`` steps and at the end: raw and EMA weights, optimiser, loss scaler, RNG states,
    step, losses) and ``loss.png``. ``resume_from`` continues such a checkpoint exactly as the uninterrupted
    run (bit for bit on the same machine); ``stop_at`` ends this call after that many steps. Deterministic
    for a ``seed``: weights init from ``torch.manual_seed(seed)``, every draw from one seeded generator.
    """
    _check_args(spec, steps, batch_size, lr, prediction, caption_dropout, grad_accum, checkpoint_every)
    if snr_gamma is not None and not snr_gamma > 0:
        raise InvalidParameterError(f"snr_gamma must be > 0 (5 is the paper's), got {snr_gamma}")
    if not 0.0 <= offset_noise <= 1.0:
        raise InvalidParameterError(f"offset_noise must be in [0, 1], got {offset_noise}")
    device = torch.device(device)
    images, captions = as_captioned(dataset)
    n = len(images)
    scale = spec.latent_scale if latent_scale is None else float(latent_scale)
    spec = replace(spec, prediction=prediction, latent_scale=scale)
    warmup = max(1, steps // 20) if warmup is None else warmup
    out = Path(out_dir) if out_dir is not None else None
    hparams = {"batch_size": batch_size, "grad_accum": grad_accum, "seed": seed, "n_images": n,
               "prediction": prediction, "caption_dropout": caption_dropout, "latent_scale": scale,
               "train_text_encoder": train_text_encoder, "sample_latents": sample_latents, "offset_noise": offset_noise,
               "snr_gamma": snr_gamma, "timestep_range": list(timestep_range) if timestep_range else None}

    # Latents and token ids, once: the VAE and the tokenizer are fixed during training.
    vae = vae.to(device).eval().requires_grad_(False)
    mean, std = encode_latents(vae, images)  # (N, C, h, w)
    tok = tokenizer or get_tokenizer()
    te_specs = spec.text_encoders
    ids = [tokenize_captions(tok, captions, te.pad_id) for te in te_specs]  # each (N, 77)
    empty = [tokenize_captions(tok, [""], te.pad_id) for te in te_specs]  # each (1, 77)
    schedule = discrete_schedule(spec.schedule)
    alphas_cumprod = schedule.alphas_cumprod.float()  # (T,)
    n_t = len(alphas_cumprod)
    t_lo, t_hi = (int(v) for v in timestep_range) if timestep_range is not None else (0, n_t - 1)
    if not 0 <= t_lo <= t_hi < n_t:
        raise InvalidParameterError(f"timestep_range {tuple(timestep_range)} must satisfy 0 <= lo <= hi <= {n_t - 1}")

    torch.manual_seed(seed)
    unet = (unet if unet is not None else UNetModel(spec.unet)).to(device).float().train().requires_grad_(True)
    if text_encoders is None:
        text_encoders = [CLIPTextEncoder(te.config) for te in te_specs]
    encoders = [e.to(device).float().train(train_text_encoder).requires_grad_(train_text_encoder)
                for e in text_encoders]
    trained = {"unet": unet, **({f"text_encoder.{i}": e for i, e in enumerate(encoders)} if train_text_encoder else {})}
    params = [p for m in trained.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    ema = EMA(trained, ema_decay)
    scaler = GradScaler(device, mixed_precision)
    g = torch.Generator().manual_seed(seed)
    step, losses = 0, []
    if resume_from is not None:
        state = load_checkpoint(resume_from, _KIND)
        check_resume(state, hparams, resume_from)
        try:
            for name, m in trained.items():
                m.load_state_dict(state["models"][name])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{resume_from}: does not fit this model ({e})") from None
        scaler.load_state_dict(state["scaler"])
        set_rng_state(g, state["rng"])
        step, losses = int(state["step"]), state["losses"].tolist()

    def micro_batch(first: int) -> torch.Tensor:
        """Loss of ``batch_size`` samples starting at sample ``first`` of the run's stream."""
        idx = batch_indices(first, batch_size, n, seed)
        x0 = mean[idx]
        if sample_latents:
            x0 = x0 + std[idx] * torch.randn(x0.shape, generator=g)
        x0 = (x0 - spec.latent_shift) * scale  # as the pipeline's encode_image
        drop = torch.rand(batch_size, generator=g) < caption_dropout
        batch_ids = [torch.where(drop[:, None], e, i[idx]).to(device) for i, e in zip(ids, empty)]
        t = torch.randint(t_lo, t_hi + 1, (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        if offset_noise:
            # Guttenberg's offset noise: a per-image, per-channel constant added to the noise, so the model
            # learns to move the mean colour, which the training schedule's last timesteps otherwise leak
            # (scaled_linear keeps sqrt(alpha_bar) = 0.068 of the image at t = 999)
            eps = eps + offset_noise * torch.randn((*x0.shape[:2], 1, 1), generator=g)
        x_t, alpha, sigma = add_noise(x0, eps, alphas_cumprod, t)
        target = diffusion_target(x0, eps, alpha, sigma, prediction).to(device)
        with autocast(device, mixed_precision):
            with torch.set_grad_enabled(train_text_encoder):
                context = encode_text(encoders, te_specs, batch_ids)  # (B, 77, D)
            out = unet(x_t.to(device), t.to(device), context=context)
        if snr_gamma is None:
            return F.mse_loss(out.float(), target)
        return (min_snr_weight(alpha, sigma, snr_gamma, prediction).to(device) * (out.float() - target) ** 2).mean()

    def checkpoint() -> Path | None:
        if out is None:
            return None
        path = save_checkpoint(out / CHECKPOINT, {
            "kind": _KIND, "step": step, "models": {k: m.state_dict() for k, m in trained.items()},
            "ema": ema.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "rng": rng_state(g), "losses": torch.tensor(losses, dtype=torch.float64), "hparams": hparams,
        })
        plot_losses(losses, out / "loss.png", title=f"diffusion loss ({prediction}-prediction MSE)")
        return path

    bar = TrainProgress("diffusion", steps, enabled=progress)
    end = steps if stop_at is None else min(steps, stop_at)
    t0 = time.monotonic()
    try:
        while step < end:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr, steps, warmup)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(grad_accum):
                loss = micro_batch((step * grad_accum + micro) * batch_size) / grad_accum
                scaler.scale(loss).backward()
                total += loss.item()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            scaler.step(opt)
            scaler.update()
            ema.update(step)
            step += 1
            losses.append(total)
            bar(step, total)
            if step % checkpoint_every == 0 and step < end:
                checkpoint()
    finally:
        bar.close()
    seconds = time.monotonic() - t0
    path = checkpoint()

    unet_ema = ema.copy_to("unet", copy.deepcopy(unet)).eval().requires_grad_(False)
    encoders_ema = [ema.copy_to(f"text_encoder.{i}", copy.deepcopy(e)) if train_text_encoder else e
                    for i, e in enumerate(encoders)]
    for m in [unet, *encoders, *encoders_ema]:
        m.eval().requires_grad_(False)
    return TrainedDiffusion(spec=spec, unet=unet, text_encoders=encoders, unet_ema=unet_ema,
                            text_encoders_ema=encoders_ema, losses=losses, step=step, seconds=seconds,
                            checkpoint=path)


def _check_args(spec: ModelSpec, steps: int, batch_size: int, lr: float, prediction: str, caption_dropout: float,
                grad_accum: int, checkpoint_every: int) -> None:
    if min(steps, batch_size, grad_accum, checkpoint_every) < 1:
        raise InvalidParameterError(f"steps, batch_size, grad_accum and checkpoint_every must be >= 1, got "
                                    f"{steps}, {batch_size}, {grad_accum}, {checkpoint_every}")
    if not lr > 0:
        raise InvalidParameterError(f"lr must be > 0, got {lr}")
    if prediction not in PREDICTIONS:
        raise InvalidParameterError(f"prediction {prediction!r} is not one of {', '.join(PREDICTIONS)}")
    if not 0.0 <= caption_dropout <= 1.0:
        raise InvalidParameterError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
    if spec.unet.adm_in_channels is not None or spec.unet.num_classes is not None or spec.concat is not None:
        raise InvalidParameterError(f"training {spec.family}: only text-conditioned UNets without extra inputs "
                                    "(no y vector, class labels or concatenated channels) are supported")

