"""ControlNet (Zhang, Rao and Agrawala, ICCV 2023): a trainable copy of the UNet's down path and middle
block, fed the noisy latent plus an encoded control image, whose zero-convolution outputs are added to
the UNet's skips and middle block.

Mirrors ``ControlNet`` of lllyasviel's ``cldm/cldm.py`` (and sgm's copy for SDXL) so that state-dict keys
are the original file's below ``control_model.``: ``time_embed``, ``label_emb``, ``input_hint_block.N``,
``input_blocks``, ``zero_convs.N.0``, ``middle_block``, ``middle_block_out.0``. The down path is built by the
same functions as the UNet's (``models/unet.py``), from the same :class:`UNetConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sfumato.config import UNetConfig
from sfumato.models.unet import _run_block, build_embeddings, build_input_blocks, build_middle_block, embed

__all__ = ["ControlNetModel", "ControlNetConfig", "HINT_CHANNELS"]

# the hint encoder's widths (cldm's input_hint_block): 3 -> 16 -> 32 -> 96 -> 256 -> model_channels, 8x down
HINT_CHANNELS = (16, 32, 96, 256)


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig
    hint_channels: int = 3


class ControlNetModel(nn.Module):
    def __init__(self, cfg: ControlNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        u = cfg.unet
        self.time_embed, self.label_emb = build_embeddings(u)
        layers: list[nn.Module] = []
        ch = cfg.hint_channels
        for i, out in enumerate(HINT_CHANNELS):
            if i == 0:
                layers += [nn.Conv2d(ch, out, 3, padding=1), nn.SiLU()]
            else:
                layers += [nn.Conv2d(ch, out, 3, padding=1, stride=2), nn.SiLU()]
            ch = out
            if i < len(HINT_CHANNELS) - 1:
                layers += [nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(ch, u.model_channels, 3, padding=1))
        self.input_hint_block = nn.Sequential(*layers)
        self.input_blocks, chans = build_input_blocks(u)
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1)) for c in chans)
        self.middle_block = build_middle_block(u, chans[-1])
        self.middle_block_out = nn.Sequential(nn.Conv2d(chans[-1], chans[-1], 1))

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor | None = None, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """x (B, C, h, w) noisy latent, hint (B, hint_channels, 8h, 8w) control image in [0, 1] -> the residuals
        for the UNet: one per input block, then the middle block's."""
        u = self.cfg.unet
        if hint.ndim != 4 or hint.shape[1] != self.cfg.hint_channels or hint.shape[-2:] != (8 * x.shape[-2],
                                                                                             8 * x.shape[-1]):
            raise ValueError(f"ControlNet: hint must be (B, {self.cfg.hint_channels}, {8 * x.shape[-2]}, "
                             f"{8 * x.shape[-1]}), got {tuple(hint.shape)}")
        emb = embed(self, u, x, timesteps, y)
        guided = self.input_hint_block(hint.to(x.dtype))
        outs = []
        h = x
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = _run_block(block, h, emb, context)
            if i == 0:
                h = h + guided
            outs.append(zero(h))
        h = _run_block(self.middle_block, h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs
