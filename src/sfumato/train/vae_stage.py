"""Stage 1: train the KL autoencoder (LDM's ``AutoencoderKL``, Rombach et al. 2022, section 3 and appendix G).

Loss, per image: L1 reconstruction (+ optional L2) + ``kl_weight`` x KL(q(z|x) || N(0, I)), in LDM's
units (``kl_weight`` 1e-6 is LDM's KL-f4/f8 setting): LDM sums both terms over pixels and latents, we
divide both by the pixel count, which rescales the loss but not the balance. LDM also trains with an
LPIPS perceptual loss and a patch discriminator; neither is used here: there are no pretrained LPIPS
weights offline, and on flat synthetic shapes L1 alone gives sharp edges; the adversarial term mainly
buys texture detail, which these images do not have.

After training, the latent scale is measured as LDM chose 0.18215: ``1 / std`` of posterior samples
over the training images, so the diffusion model sees unit-variance latents.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sfumato.config import VAEConfig
from sfumato.errors import CheckpointError, InvalidParameterError
from sfumato.imageops import tensor_to_images
from sfumato.models.vae import AutoencoderKL
from sfumato.train.common import (
    EMA,
    GradScaler,
    TrainProgress,
    as_images,
    autocast,
    batch_indices,
    check_resume,
    chunks,
    images_grid,
    load_checkpoint,
    lr_at,
    plot_losses,
    rng_state,
    save_checkpoint,
    set_rng_state,
    to_float,
)
from sfumato.weights import io

__all__ = [
    "NORM_GROUPS_KEY",
    "VAE_CHECKPOINT",
    "VAE_FILE",
    "TrainedVAE",
    "load_trained_vae",
    "measure_latent_std",
    "save_vae",
    "train_vae",
    "vae_loss",
]

VAE_FILE = "vae.safetensors"
VAE_CHECKPOINT = "vae_checkpoint.pt"
NORM_GROUPS_KEY = "sfumato.vae.norm_groups"  # metadata: the VAE's GroupNorm group count
_KIND = "sfumato-vae"


@dataclass
class TrainedVAE:
    """The trained autoencoder and what the diffusion stage needs to know about its latents."""

    vae: AutoencoderKL  # the EMA weights when ``ema_decay`` was set, else the raw ones; in eval mode
    latent_std: float  # std of posterior samples over the training images
    latent_scale: float  # 1 / latent_std: ModelSpec.latent_scale for a model on these latents
    losses: list[float] = field(default_factory=list)  # per optimiser step, per pixel
    path: Path | None = None  # out_dir/vae.safetensors, when an out_dir was given
    seconds: float = 0.0  # wall time of the training loop in this call


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, g: torch.Generator, kl_weight: float,
             l2_weight: float, *, decoder_only: bool = False) -> torch.Tensor:
    """Per-pixel L1 (+ L2) reconstruction + kl_weight * KL per image / pixels per image. ``decoder_only``:
    the encoder runs without gradients (its KL term is then a constant, kept so the figures compare)."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and not decoder_only):
        posterior = vae.encode(x)
    eps = torch.randn(posterior.mean.shape, generator=g).to(posterior.mean)  # drawn on the CPU: same on any device
    recon = vae.decode(posterior.mean + posterior.std * eps).float()
    diff = recon - x
    rec = diff.abs().mean()
    if l2_weight:
        rec = rec + l2_weight * diff.pow(2).mean()
    pixels = x[0].numel()
    return rec + kl_weight * posterior.kl().float().mean() / pixels


@torch.no_grad()
def measure_latent_std(vae: AutoencoderKL, images: Any, *, seed: int = 0, max_images: int = 2048,
                       batch_size: int = 64) -> float:
    """Std of posterior samples z ~ q(z|x) over (up to ``max_images`` of) ``images``, as LDM measured it."""
    images = as_images(images)[:max_images]
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    zs = []
    for s in chunks(len(images), batch_size):
        post = vae.encode(to_float(images[s]).to(device, dtype))
        eps = torch.randn(post.mean.shape, generator=g).to(post.mean)
        zs.append((post.mean + post.std * eps).float().cpu())
    return float(torch.cat(zs).std())


def save_vae(vae: AutoencoderKL, path: str | os.PathLike, *, latent_std: float,
             metadata: dict[str, str] | None = None) -> Path:
    """The autoencoder as a standalone LDM-layout VAE file (keys ``encoder.*``, ``decoder.*``, as released
    VAEs are), float32, with its measured latent scale in the metadata (``sfumato.latent_scale``)."""
    meta = {"format": "pt", "sfumato.latent_std": repr(latent_std), "sfumato.latent_scale": repr(1.0 / latent_std),
            NORM_GROUPS_KEY: str(vae.cfg.norm_groups), **(metadata or {})}
    sd = {k: v.detach().float().cpu().contiguous() for k, v in vae.state_dict().items()}
    io.write_safetensors(path, sd, meta)
    return Path(path)


def _number(meta: dict[str, str], key: str, kind: type, path: Path) -> float | int | None:
    raw = meta.get(key)
    if raw is None:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise CheckpointError(f"{path}: metadata {key} {raw!r} is not a number") from None


def load_trained_vae(path: str | os.PathLike) -> tuple[AutoencoderKL, float | None]:
    """A VAE file (ours or any :func:`sfumato.weights.load.load_vae` reads) and the latent scale stored in its
    metadata by :func:`save_vae` (None when the file has none).

    GroupNorm weights do not show their group count, so the loader assumes 32; a file of ours says its
    count in the metadata, and the VAE is rebuilt with it.
    """
    from sfumato.weights.load import load_vae

    path = Path(path)
    vae = load_vae(path)
    meta: dict[str, str] = {}
    if path.is_file():
        with io.open_checkpoint(path) as ckpt:
            meta = dict(ckpt.metadata)
    groups = _number(meta, NORM_GROUPS_KEY, int, path)
    if groups is not None and groups != vae.cfg.norm_groups:
        rebuilt = AutoencoderKL(replace(vae.cfg, norm_groups=groups))
        rebuilt.load_state_dict(vae.state_dict())
        vae = rebuilt
    return vae.eval(), _number(meta, "sfumato.latent_scale", float, path)


def train_vae(
    cfg: VAEConfig,
    images: Any,
    *,
    steps: int = 800,
    batch_size: int = 8,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    l2_weight: float = 0.0,
    crop: int | None = None,
    warmup: int | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    ema_decay: float | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    stop_at: int | None = None,
    device: str | torch.device = "cpu",
    mixed_precision: str = "no",
    vae: AutoencoderKL | None = None,
    init_logvar: float | None = -6.0,
    decoder_only: bool = False,
    latent_std: float | None = None,
    progress: bool = True,
) -> TrainedVAE:
    """Train ``AutoencoderKL(cfg)`` (or continue ``vae``) on ``images`` for ``steps`` AdamW steps.

    ``images``: anything :func:`sfumato.train.common.as_images` takes, (N, 3, H, W) in [-1, 1] or uint8,
    H and W multiples of ``cfg.downscale``. The learning rate warms up over ``warmup`` steps (default
    5%) and decays by a cosine to a tenth. ``out_dir`` receives ``vae.safetensors``, ``vae_checkpoint.pt``
    (every ``checkpoint_every`` steps and at the end), ``vae_loss.png`` and ``vae_reconstructions.png``.
    ``resume_from`` continues a ``vae_checkpoint.pt`` bit for bit; ``stop_at`` ends this call after that
    many steps (with a checkpoint) so a run can be split. Deterministic for a ``seed`` on one machine.
    ``crop`` trains on random ``crop`` x ``crop`` windows (a multiple of the downscale, on the latent grid)
    instead of whole images: the autoencoder is convolutional and these scenes are local, so a batch of
    crops sees more distinct content per pixel computed (measured on the built-in scenes: 300 steps of 32
    crops of 32 px reached eval L1 0.054 where 8 whole 64 px images per step were still at 0.30).
    A new VAE starts with its posterior log-variance at ``init_logvar`` (None: PyTorch's init); ``vae``
    continues a given one as it is.

    ``decoder_only`` (with a trained ``vae``) fine-tunes the decoder and ``post_quant_conv`` and leaves the
    encoder and ``quant_conv`` bit for bit as they were, as Stability's ft-EMA / ft-MSE VAEs were made: the
    latents do not change, so a diffusion model trained on them keeps working with the new decoder. Its
    ``latent_std`` (the model's own, ``1 / latent_scale``) is then kept as given instead of re-measured.
    """
    _check(steps, batch_size, lr, kl_weight, checkpoint_every)
    device = torch.device(device)
    images = as_images(images)
    n = len(images)
    if images.shape[2] % cfg.downscale or images.shape[3] % cfg.downscale:
        raise InvalidParameterError(f"image size {images.shape[3]}x{images.shape[2]} is not a multiple of the "
                                    f"VAE's downscale {cfg.downscale}")
    if crop is not None and not (0 < crop <= min(images.shape[2:]) and crop % cfg.downscale == 0):
        raise InvalidParameterError(f"crop {crop} must be a positive multiple of the VAE's downscale "
                                    f"{cfg.downscale} no larger than the images ({images.shape[3]}x{images.shape[2]})")
    warmup = max(1, steps // 20) if warmup is None else warmup
    out = Path(out_dir) if out_dir is not None else None
    if decoder_only and vae is None:
        raise InvalidParameterError("decoder_only fine-tunes a trained autoencoder: pass vae=")
    hparams = {"batch_size": batch_size, "seed": seed, "n_images": n, "crop": crop, "decoder_only": decoder_only}

    torch.manual_seed(seed)
    if vae is None:
        vae = AutoencoderKL(cfg)
        if init_logvar is not None:
            # A random encoder's posterior has std ~1, which drowns its small means: the decoder then learns
            # to ignore the latents before the encoder learns to shrink the noise (LDM's KL weight barely
            # pulls either way). Starting near-deterministic (std e^-3 = 0.05) avoids that slow start.
            with torch.no_grad():
                vae.quant_conv.bias[cfg.embed_dim:].fill_(init_logvar)
    model = vae.to(device).float().train().requires_grad_(True)
    if decoder_only:
        model.encoder.requires_grad_(False).eval()
        model.quant_conv.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    ema = EMA({"vae": model}, ema_decay) if ema_decay is not None else None
    scaler = GradScaler(device, mixed_precision)
    g = torch.Generator().manual_seed(seed)
    step, losses = 0, []
    if resume_from is not None:
        state = load_checkpoint(resume_from, _KIND)
        state.setdefault("hparams", {}).setdefault("decoder_only", False)  # checkpoints from before the option
        check_resume(state, hparams, resume_from)
        model.load_state_dict(state["models"]["vae"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        set_rng_state(g, state["rng"])
        step, losses = int(state["step"]), state["losses"].tolist()

    def checkpoint() -> None:
        if out is None:
            return
        save_checkpoint(out / VAE_CHECKPOINT, {
            "kind": _KIND, "step": step, "models": {"vae": model.state_dict()},
            "ema": ema.state_dict() if ema is not None else {}, "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng_state(g), "losses": torch.tensor(losses, dtype=torch.float64),
            "hparams": hparams,
        })
        plot_losses(losses, out / "vae_loss.png", title="autoencoder loss (L1 + KL, per pixel)")

    bar = TrainProgress("vae", steps, enabled=progress)
    end = steps if stop_at is None else min(steps, stop_at)
    t0 = time.monotonic()
    try:
        while step < end:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr, steps, warmup)
            x = to_float(images[batch_indices(step * batch_size, batch_size, n, seed)]).to(device)
            if crop is not None:
                x = _random_crop(x, crop, cfg.downscale, g)
            with autocast(device, mixed_precision):
                loss = vae_loss(model, x, g, kl_weight, l2_weight, decoder_only=decoder_only)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                ema.update(step)
            step += 1
            losses.append(loss.item())
            bar(step, losses[-1])
            if step % checkpoint_every == 0 and step < end:
                checkpoint()
    finally:
        bar.close()
    seconds = time.monotonic() - t0
    checkpoint()

    if ema is not None:
        ema.copy_to("vae", model)
    model.eval().requires_grad_(False)
    std = latent_std if decoder_only and latent_std is not None else measure_latent_std(model, images, seed=seed)
    result = TrainedVAE(vae=model, latent_std=std, latent_scale=1.0 / std, losses=losses, seconds=seconds)
    if out is not None:
        result.path = save_vae(model, out / VAE_FILE, latent_std=std,
                               metadata={"sfumato.train.steps": str(step), "sfumato.train.kl_weight": repr(kl_weight)})
        _save_reconstructions(model, images[:8], out / "vae_reconstructions.png")
    return result


def _random_crop(x: torch.Tensor, size: int, grid: int, g: torch.Generator) -> torch.Tensor:
    """One ``size`` x ``size`` window per image, its corner on the ``grid`` (drawn from ``g``)."""
    h, w = x.shape[2:]
    rows = torch.randint(0, (h - size) // grid + 1, (len(x),), generator=g) * grid
    cols = torch.randint(0, (w - size) // grid + 1, (len(x),), generator=g) * grid
    return torch.stack([img[:, r:r + size, c:c + size] for img, r, c in zip(x, rows.tolist(), cols.tolist())])


@torch.no_grad()
def _save_reconstructions(vae: AutoencoderKL, images: torch.Tensor, path: Path) -> None:
    """Originals (top row) over their reconstructions from the posterior mean."""
    p = next(vae.parameters())
    x = to_float(images).to(p.device, p.dtype)
    recon = vae.decode(vae.encode(x).mode())
    images_grid([tensor_to_images(x), tensor_to_images(recon)]).save(path)


def _check(steps: int, batch_size: int, lr: float, kl_weight: float, checkpoint_every: int) -> None:
    if steps < 1 or batch_size < 1 or checkpoint_every < 1:
        raise InvalidParameterError(f"steps, batch_size and checkpoint_every must be >= 1, got {steps}, "
                                    f"{batch_size}, {checkpoint_every}")
    if not lr > 0 or kl_weight < 0:
        raise InvalidParameterError(f"need lr > 0 and kl_weight >= 0, got {lr}, {kl_weight}")

