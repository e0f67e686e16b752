"""The KL-regularised autoencoder that maps images to latents and back.

Mirrors LDM ``ldm.models.autoencoder.AutoencoderKL`` and the ``Encoder``/``Decoder`` of
``ldm.modules.diffusionmodules.model`` (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"), with attribute names equal to the original checkpoint keys below
``first_stage_model.`` so a single-file checkpoint loads through an identity map. The diffusers
layout goes through ``sfumato.weights.keymap_vae``.

Only what the released VAEs use is built: no attention outside the middle block (their
``attn_resolutions`` is empty), no time embedding, no dropout (inference only; LDM trains at 0.0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfumato.config import VAEConfig
from sfumato.errors import InvalidParameterError
from sfumato.models.ops import attention, group_norm

__all__ = ["AutoencoderKL", "DiagonalGaussian"]

# LDM clamps the predicted log-variance so exp() cannot overflow or vanish.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass
class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, exp(logvar)), as LDM's ``DiagonalGaussianDistribution``."""

    mean: Tensor  # (B, embed_dim, h, w)
    logvar: Tensor  # (B, embed_dim, h, w)

    def __post_init__(self) -> None:
        self.logvar = self.logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """Split quant_conv's output (B, 2*embed_dim, h, w) into mean and log-variance."""
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return cls(mean, logvar)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * eps, with eps drawn from ``generator`` on the mean's device and dtype."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over C, H, W -> (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + torch.exp(self.logvar) - 1.0 - self.logvar, dim=[1, 2, 3])


class ResnetBlock(nn.Module):
    """LDM ``ResnetBlock`` without time embedding: two GroupNorm-SiLU-conv stages plus a skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # LDM only creates the 1x1 projection where the width changes; the key exists only then.
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """LDM ``AttnBlock``: single-head self-attention over all pixels, projections as 1x1 convs."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # (B, C, H*W) -> (B, H*W, C): pixels are the tokens. Normalising, projecting and adding the
        # residual in this order and layout is diffusers' AttnProcessor2_0, so fp32 results match
        # it bit for bit whatever the input's memory format (LDM's bmm form differs in rounding only).
        tokens = self.norm(x.flatten(2)).transpose(1, 2)
        # A 1x1 conv is a per-token linear map: apply it to the token matrix as one GEMM.
        q, k, v = (F.linear(tokens, p.weight.flatten(1), p.bias) for p in (self.q, self.k, self.v))
        out = attention(q, k, v, 1)  # (B, H*W, C); softmax scale C^-1/2 as LDM
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding only right and bottom, as LDM (not a symmetric pad of 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """``mid.block_1``, ``mid.attn_1``, ``mid.block_2`` at the lowest resolution."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution: ``block.J`` resnets, then ``downsample`` except at the last level."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution: ``block.J`` resnets, then ``upsample`` except at level 0."""

    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels: list[DownLevel] = []
        block_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
            last = i == len(cfg.ch_mult) - 1
            levels.append(DownLevel(blocks, None if last else Downsample(block_in)))
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(block_in, g)
        self.norm_out = group_norm(block_in, g)
        # double_z: the encoder predicts mean and log-variance.
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f).

    ``up`` is indexed by resolution like ``down``: ``up.{L-1}`` (lowest resolution) runs first,
    so levels are applied in reverse index order, and each has ``num_res_blocks + 1`` resnets.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, g)
        levels: list[UpLevel] = []
        for i in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
            levels.insert(0, UpLevel(blocks, None if i == 0 else Upsample(block_in)))
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """LDM's ``AutoencoderKL``: encoder + quant_conv -> posterior; post_quant_conv + decoder -> image.

    Latents here are unscaled; the pipeline multiplies by ``ModelSpec.latent_scale``.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Image (B, in_channels, H, W) in [-1, 1], H and W multiples of ``cfg.downscale``."""
        self._check_image(x)
        moments = self.quant_conv(self.encoder(x))  # (B, 2*embed_dim, H/f, W/f)
        return DiagonalGaussian.from_moments(moments)

    def _check_image(self, x: Tensor) -> None:
        f = self.cfg.downscale
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise InvalidParameterError(
                f"VAE encode expects (B, {self.cfg.in_channels}, H, W) images, got shape {tuple(x.shape)}"
            )
        if x.shape[2] % f or x.shape[3] % f:
            raise InvalidParameterError(
                f"VAE encode: image size {x.shape[3]}x{x.shape[2]} (WxH) must be a multiple of {f}"
            )

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents (B, embed_dim, h, w) -> image (B, out_ch, h*f, w*f), roughly in [-1, 1]."""
        self._check_latents(z)
        return self.decoder(self.post_quant_conv(z))

    def _check_latents(self, z: Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.cfg.embed_dim:
            raise InvalidParameterError(
                f"VAE decode expects (B, {self.cfg.embed_dim}, h, w) latents, got shape {tuple(z.shape)}"
            )

    def encode_tiled(self, x: Tensor, tile: int = 512, overlap: float = 0.25) -> DiagonalGaussian:
        """:meth:`encode` in overlapping ``tile`` x ``tile`` pixel windows, blended where they overlap: memory
        bounded by one tile whatever the image size. Same tiles and blend as diffusers' tiled encode
        (``tile_sample_min_size`` = ``tile``, ``tile_overlap_factor`` = ``overlap``); images no larger
        than a tile take the plain path."""
        self._check_image(x)
        f = self.cfg.downscale
        if tile % f or tile <= 0:
            raise InvalidParameterError(f"VAE tile must be a positive multiple of {f} pixels, got {tile}")
        if x.shape[2] <= tile and x.shape[3] <= tile:
            return self.encode(x)
        moments = _tiled(lambda t: self.quant_conv(self.encoder(t)), x, tile, tile // f, overlap)
        return DiagonalGaussian.from_moments(moments)

    def decode_tiled(self, z: Tensor, tile: int = 64, overlap: float = 0.25) -> Tensor:
        """:meth:`decode` in overlapping ``tile`` x ``tile`` latent windows, blended where they overlap, one
        tile in memory at a time (plus two rows of decoded tiles): a 2048 px image decodes in the memory
        of a 512 px one (``tile`` 64). Same tiles and blend as diffusers' ``tiled_decode``
        (``tile_latent_min_size`` = ``tile``, ``tile_overlap_factor`` = ``overlap``); latents no larger
        than a tile take the plain path."""
        self._check_latents(z)
        if tile <= 0:
            raise InvalidParameterError(f"VAE tile must be a positive number of latent pixels, got {tile}")
        if z.shape[2] <= tile and z.shape[3] <= tile:
            return self.decode(z)
        return _tiled(lambda t: self.decoder(self.post_quant_conv(t)), z, tile, tile * self.cfg.downscale, overlap)

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction and posterior, as LDM's training forward."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


def _ramp(n: int) -> tuple[Tensor, Tensor]:
    """Blend weights y / n and 1 - y / n for y < n, each rounded once from double (as a Python-float blend)."""
    up = [y / n for y in range(n)]
    return torch.tensor(up, dtype=torch.float64), torch.tensor([1 - u for u in up], dtype=torch.float64)


def _blend(a: Tensor, b: Tensor, extent: int, dim: int) -> None:
    """Cross-fade the first ``extent`` rows (dim 2) or columns (dim 3) of ``b`` from the last of ``a``, in place."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return
    up, down = _ramp(extent)
    shape = (-1, 1) if dim == 2 else (-1,)
    up, down = up.to(b.dtype).reshape(shape), down.to(b.dtype).reshape(shape)
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * down + head * up)


def _tiled(fn, x: Tensor, tile_in: int, tile_out: int, overlap: float) -> Tensor:
    """``fn`` (an f-times resampling conv net) over overlapping ``tile_in`` windows of ``x`` at stride
    ``tile_in * (1 - overlap)``; each output tile cross-fades linearly over ``tile_out * overlap`` rows
    and columns from its upper and left neighbours (already blended) and keeps its first
    ``tile_out * (1 - overlap)``. Rows are decoded and stitched one at a time."""
    if not 0.0 < overlap < 1.0:
        raise InvalidParameterError(f"VAE tile overlap must be between 0 and 1 (exclusive), got {overlap}")
    stride = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    if stride <= 0:
        raise InvalidParameterError(f"VAE tile {tile_in} with overlap {overlap} leaves no stride")
    out_rows, above = [], None
    for i in range(0, x.shape[2], stride):
        row = [fn(x[:, :, i : i + tile_in, j : j + tile_in]) for j in range(0, x.shape[3], stride)]
        for j, t in enumerate(row):
            if above is not None:
                _blend(above[j], t, extent, 2)
            if j > 0:
                _blend(row[j - 1], t, extent, 3)
        out_rows.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
        above = row
    return torch.cat(out_rows, dim=2)
