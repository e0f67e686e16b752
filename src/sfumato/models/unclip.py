"""unCLIP's image-embedding noise augmentation (SD 2.1 unCLIP L and H; Ramesh et al. 2022 condition the
decoder on a noised CLIP image embedding so that it tolerates a prior's imperfect embeddings).

The CLIP image embedding is standardised with the training set's per-dimension statistics
(``data_mean``, ``data_std``), noised to ``noise_level`` on a cosine DDPM schedule (q_sample), brought
back to the embedding's scale, and concatenated with the sinusoidal embedding of the noise level
(cos half first, as LDM's ``timestep_embedding``): the UNet's ADM vector ``y`` (twice the embedding width:
1536 for unCLIP-L, 2048 for unCLIP-H).

Attribute names follow the original single files (``noise_augmentor.data_mean`` / ``data_std``, LDM's
``CLIPEmbeddingNoiseAugmentation``); diffusers keeps the same two tensors as ``image_normalizer/``
(``StableUnCLIPImageNormalizer``: ``mean`` / ``std``) and the schedule as ``image_noising_scheduler/``.
"""

from __future__ import annotations

import torch
from torch import nn

from sfumato.config import NoiseScheduleConfig
from sfumato.models.unet import timestep_embedding

__all__ = ["NOISE_AUGMENT_SCHEDULE", "ImageNoiseAugmentor"]

# LDM's noise_schedule_config for unCLIP (timesteps 1000, beta_schedule "squaredcos_cap_v2"); the
# released diffusers folders' image_noising_scheduler says the same.
NOISE_AUGMENT_SCHEDULE = NoiseScheduleConfig(beta_schedule="squaredcos_cap_v2", num_timesteps=1000)


class ImageNoiseAugmentor(nn.Module):
    """Embedding statistics plus the augmentation schedule: ``forward(embeds, noise_level, noise) -> y``."""

    def __init__(self, dim: int, schedule: NoiseScheduleConfig = NOISE_AUGMENT_SCHEDULE) -> None:
        super().__init__()
        self.dim, self.schedule = dim, schedule
        self.register_buffer("data_mean", torch.zeros(1, dim))
        self.register_buffer("data_std", torch.ones(1, dim))

    @property
    def max_noise_level(self) -> int:
        return self.schedule.num_timesteps - 1

    def forward(self, embeds: torch.Tensor, noise_level: int, noise: torch.Tensor) -> torch.Tensor:
        from sfumato.sampling import discrete_schedule

        abar = discrete_schedule(self.schedule).alphas_cumprod[noise_level].float()
        mean, std = self.data_mean.to(embeds), self.data_std.to(embeds)
        z = (embeds - mean) / std
        z = abar.sqrt() * z + (1 - abar).sqrt() * noise.to(embeds)
        z = z * std + mean
        level = timestep_embedding(torch.full((embeds.shape[0],), noise_level, device=embeds.device), self.dim)
        return torch.cat([z, level.to(z.dtype)], dim=1)
