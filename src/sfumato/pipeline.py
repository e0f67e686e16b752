"""The pipeline object: the loaded networks of one model and its ``ModelSpec``.

Generation (the spine: prompt -> tokens -> conditioning -> denoiser -> sampler -> VAE decode -> image)
is written once as plain functions over these components; loading and saving live in
``sfumato.weights``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sfumato.config import ModelSpec
from sfumato.models.unet import UNetModel
from sfumato.models.vae import AutoencoderKL
from sfumato.text.encoder import CLIPTextEncoder
from sfumato.text.tokenizer import CLIPTokenizer


@dataclass
class Pipeline:
    """A loaded model: its networks, tokenizer and spec (family, prediction type, latent scale...)."""

    spec: ModelSpec
    unet: UNetModel
    vae: AutoencoderKL
    text_encoders: list[CLIPTextEncoder]
    tokenizer: CLIPTokenizer
    source: Path | None = None
    ema: str | None = field(default=None)  # which UNet copy of a training checkpoint is loaded: "ema" | "raw"

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, *self.text_encoders]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Pipeline":
        for m in self.modules():
            m.to(device=device, dtype=dtype)
            m.eval().requires_grad_(False)
        return self

    def save(self, path: str | os.PathLike, *, format: str = "single_file", half: bool = False,
             ema_only: bool = True) -> Path:
        """Write the model as an original-layout ``.safetensors`` (``format="single_file"``) or a
        diffusers folder (``format="diffusers"``); ``half`` stores fp16; see :func:`sfumato.weights.save.save`."""
        from sfumato.weights.save import save

        return save(self, path, format=format, half=half, ema_only=ema_only)
