"""The latent-diffusion UNet: one class for SD 1.x, SD 2.x, SDXL, the x4 upscaler and unCLIP.

Mirrors ``UNetModel`` of Stability's ``ldm/modules/diffusionmodules/openaimodel.py`` (and its sgm
copy) so that ``state_dict()`` keys are exactly the original checkpoint keys below
``model.diffusion_model.``: ``time_embed``, ``label_emb``, ``input_blocks.N.M``, ``middle_block``,
``output_blocks.N.M``, ``out``. Where LDM has a parameter-free layer (SiLU, Dropout) at an index we
keep an ``nn.Identity``/activation there, so indices line up. Every variant is a ``UNetConfig``;
this module never looks at a family name. Reference: Rombach et al., "High-Resolution Image
Synthesis with Latent Diffusion Models" (2022); Podell et al., "SDXL" (2023).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sfumato.config import UNetConfig
from sfumato.models import tome
from sfumato.models.ops import attention, group_norm

__all__ = ["UNetModel", "StepCache", "timestep_embedding"]

# LDM's ``normalization()`` (ResBlocks, output head) is GroupNorm32 with torch's default eps; the
# SpatialTransformer's ``Normalize`` uses 1e-6. Diffusers matches both.
_RES_EPS = 1e-5
_ATTN_EPS = 1e-6


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """LDM sinusoidal embedding (cos half, then sin half) of (B,) timesteps -> (B, dim) float32.

    Also embeds each size-conditioning number that makes up an ADM ``y`` (256 wide per number).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(channels, eps=_RES_EPS), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # index 2 is LDM's Dropout, kept as Identity so the conv stays ``out_layers.3``
        self.out_layers = nn.Sequential(
            group_norm(out_channels, eps=_RES_EPS), nn.SiLU(), nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (over ``x`` itself when context is None)."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, upcast: bool) -> None:
        super().__init__()
        inner = heads * dim_head
        kv_dim = query_dim if context_dim is None else context_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())  # .1 was Dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if context is None else context
        out = attention(self.to_q(x), self.to_k(kv), self.to_v(kv), self.heads, upcast=self.upcast)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): half of the projection gates the other half."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention (or, with ``only_cross``, attention to the context), cross-attention, GEGLU MLP."""

    def __init__(
        self, dim: int, heads: int, dim_head: int, context_dim: int | None, only_cross: bool, upcast: bool
    ) -> None:
        super().__init__()
        self.only_cross = only_cross
        self.attn1 = CrossAttention(dim, context_dim if only_cross else None, heads, dim_head, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, upcast)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """``hw``: the token grid, for token merging (``tome.token_merging``) of the self-attention."""
        merging = tome.active()
        plan = merging.plan(x, *hw) if merging is not None and hw is not None and not self.only_cross else None
        if plan is None:
            x = self.attn1(self.norm1(x), context if self.only_cross else None) + x
        else:
            merge, unmerge = plan
            x = unmerge(self.attn1(merge(self.norm1(x)))) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Image features -> tokens -> ``depth`` transformer blocks -> image features, plus a residual."""

    def __init__(self, channels: int, depth: int, cfg: UNetConfig, only_cross: bool) -> None:
        super().__init__()
        heads, dim_head = cfg.heads_for(channels)
        inner = heads * dim_head
        self.use_linear = cfg.use_linear_proj
        self.norm = group_norm(channels, eps=_ATTN_EPS)
        # 1x1 convs or Linear layers: the same maths, but the checkpoint's weight shapes differ
        self.proj_in = nn.Linear(channels, inner) if self.use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, cfg.context_dim, only_cross, cfg.upcast_attention)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if self.use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context, (h, w))
        if self.use_linear:
            x = self.proj_out(x)
        # contiguous: the transposed view would be channels-last, and every conv after it would then
        # re-lay its weights out on each call (measured 1.3-1.9x slower UNet steps on CPU)
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # ``size`` is the next skip's size, so odd latent sizes (which Downsample rounds up) still line up
        x = F.interpolate(x, size=size, mode="nearest") if size else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


def _run_block(
    block: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """LDM's ``TimestepEmbedSequential``: hand each layer the inputs it takes."""
    for layer in block:
        if isinstance(layer, ResBlock):
            h = layer(h, emb)
        elif isinstance(layer, SpatialTransformer):
            h = layer(h, context)
        elif isinstance(layer, Upsample):
            h = layer(h, size)
        else:
            h = layer(h)
    return h


def build_embeddings(cfg: UNetConfig) -> tuple[nn.Sequential, nn.Module | None]:
    """``time_embed`` and ``label_emb`` (an ADM vector's MLP, class-label embedding, or None)."""
    if cfg.adm_in_channels is not None and cfg.num_classes is not None:
        raise ValueError("UNetConfig: adm_in_channels and num_classes are exclusive (both feed label_emb)")
    mc, ted = cfg.model_channels, cfg.time_embed_dim
    time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
    if cfg.adm_in_channels is not None:
        # LDM's num_classes="sequential": Sequential(Sequential(Linear, SiLU, Linear)) -> label_emb.0.{0,2}
        label_emb: nn.Module | None = nn.Sequential(
            nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        )
    elif cfg.num_classes is not None:
        label_emb = nn.Embedding(cfg.num_classes, ted)
    else:
        label_emb = None
    return time_embed, label_emb


def build_input_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The down path (``input_blocks``) and the channels of each block's output (the skips)."""
    mc, ted = cfg.model_channels, cfg.time_embed_dim
    no_self = cfg.disable_self_attn or (False,) * len(cfg.channel_mult)
    blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
    skip_chans = [mc]  # channels of every input block output, popped by the output blocks
    ch = mc
    last = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks[level]):
            layers: list[nn.Module] = [ResBlock(ch, ted, mc * mult)]
            ch = mc * mult
            if cfg.transformer_depth[level] > 0:
                layers.append(SpatialTransformer(ch, cfg.transformer_depth[level], cfg, no_self[level]))
            blocks.append(nn.ModuleList(layers))
            skip_chans.append(ch)
        if level != last:
            blocks.append(nn.ModuleList([Downsample(ch)]))
            skip_chans.append(ch)
    return blocks, skip_chans


def build_middle_block(cfg: UNetConfig, ch: int) -> nn.ModuleList | None:
    if not cfg.mid_block:
        return None
    return nn.ModuleList([
        ResBlock(ch, cfg.time_embed_dim, ch),
        SpatialTransformer(ch, cfg.transformer_depth_middle, cfg, False),
        ResBlock(ch, cfg.time_embed_dim, ch),
    ])


def embed(model: nn.Module, cfg: UNetConfig, x: torch.Tensor, timesteps: torch.Tensor,
          y: torch.Tensor | None) -> torch.Tensor:
    """The time (+ label) embedding a UNet or ControlNet hands every ResBlock: (B, 4 * model_channels)."""
    t = timesteps.reshape(-1).expand(x.shape[0])
    emb = model.time_embed(timestep_embedding(t, cfg.model_channels).to(x.dtype))
    if model.label_emb is not None:
        assert y is not None
        emb = emb + model.label_emb(y if cfg.num_classes is not None else y.to(emb.dtype))
    return emb


class StepCache:
    """DeepCache (Ma, Fang and Wang, CVPR 2024): reuse the UNet's deep features across sampler calls.

    Adjacent denoising steps change the deep, low-resolution features little. Every ``interval``-th call
    runs the whole UNet and keeps the feature entering the last ``depth + 1`` output blocks; the calls
    between run only the input blocks ``0..depth`` (the stem and the first ``depth`` blocks of the
    highest-resolution level) and those output blocks, with the kept feature in place of everything
    deeper. ``depth`` 1 on SD 1.5 skips about 80% of a call's FLOPs. One cache per generation: it counts
    calls, and a batch or size change forces a full call.
    """

    def __init__(self, interval: int, depth: int = 1) -> None:
        if interval < 1 or depth < 0:
            raise ValueError(f"StepCache: interval >= 1 and depth >= 0, got {interval}, {depth}")
        self.interval, self.depth = interval, depth
        self.calls, self.full_calls = 0, 0
        self.feature: torch.Tensor | None = None
        self._size: tuple[int, ...] = ()

    def _reuse(self, x: torch.Tensor) -> bool:
        reuse = (self.calls % self.interval != 0 and self.feature is not None
                 and self.feature.shape[0] == x.shape[0] and self._size == tuple(x.shape[-2:]))
        self.calls += 1
        self.full_calls += not reuse
        self._size = tuple(x.shape[-2:])
        return reuse


class UNetModel(nn.Module):
    """The LDM UNet; state dict keys are the original checkpoint's, below ``model.diffusion_model.``."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # training only: recompute each block's activations in the backward pass instead of keeping them
        # (torch.utils.checkpoint), trading about a third more compute for most of the activation memory
        self.gradient_checkpointing = False
        mc, ted = cfg.model_channels, cfg.time_embed_dim
        no_self = cfg.disable_self_attn or (False,) * len(cfg.channel_mult)
        self.time_embed, self.label_emb = build_embeddings(cfg)
        self.input_blocks, skip_chans = build_input_blocks(cfg)
        ch = skip_chans[-1]
        self.middle_block = build_middle_block(cfg, ch)

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            out_ch = mc * cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks[level] + 1):
                layers = [ResBlock(ch + skip_chans.pop(), ted, out_ch)]
                ch = out_ch
                if cfg.transformer_depth[level] > 0:
                    layers.append(SpatialTransformer(ch, cfg.transformer_depth[level], cfg, no_self[level]))
                if level and i == cfg.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                self.output_blocks.append(nn.ModuleList(layers))

        self.out = nn.Sequential(
            group_norm(ch, eps=_RES_EPS), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        )

    def _check_inputs(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None, y: torch.Tensor | None
    ) -> None:
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet: x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        b = x.shape[0]
        if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] not in (1, b)):
            raise ValueError(f"UNet: timesteps must be a scalar or ({b},), got {tuple(timesteps.shape)}")
        if cfg.context_dim is None:
            if context is not None:
                raise ValueError("UNet: this model has no cross-attention; context must be None")
        elif context is None or context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"UNet: context must be ({b}, L, {cfg.context_dim}), got {got}")
        if cfg.adm_in_channels is not None:
            if y is None or y.shape != (b, cfg.adm_in_channels):
                got = None if y is None else tuple(y.shape)
                raise ValueError(f"UNet: y must be a ({b}, {cfg.adm_in_channels}) vector, got {got}")
        elif cfg.num_classes is not None:
            if y is None or y.shape != (b,) or y.is_floating_point():
                got = None if y is None else f"{tuple(y.shape)} {y.dtype}"
                raise ValueError(f"UNet: y must be ({b},) integer class labels, got {got}")
        elif y is not None:
            raise ValueError("UNet: this model takes no y (no adm_in_channels / num_classes)")

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        cache: StepCache | None = None,
        control: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, in_channels, H, W), timesteps (B,), context (B, L, context_dim), y (B, adm) or (B,) labels
        -> (B, out_channels, H, W). ``cache``: skip the deep blocks on most calls (:class:`StepCache`).
        ``control``: ControlNet residuals, one per input block and one for the middle (last), added to
        the skips and the middle block's output as LDM's ``ControlledUnetModel`` does."""
        self._check_inputs(x, timesteps, context, y)
        emb = embed(self, self.cfg, x, timesteps, y)  # (B, 4*mc)
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ValueError(f"UNet: control needs {len(self.input_blocks) + 1} residuals, got {len(control)}")

        shallow = len(self.input_blocks) if cache is None else min(cache.depth + 1, len(self.input_blocks))
        first_kept = len(self.output_blocks) - shallow  # the output blocks a cached call still runs
        reuse = cache is not None and cache._reuse(x)
        h = x
        hs = []
        run = self._checkpointed if self.gradient_checkpointing and self.training and torch.is_grad_enabled() \
            else _run_block
        for block in self.input_blocks[:shallow] if reuse else self.input_blocks:
            h = run(block, h, emb, context)
            hs.append(h)
        if control is not None:
            hs = [a + b for a, b in zip(hs, control)]
        if reuse:
            h = cache.feature
        elif self.middle_block is not None:
            h = run(self.middle_block, h, emb, context)
            if control is not None:
                h = h + control[-1]
        for i in range(first_kept if reuse else 0, len(self.output_blocks)):
            if cache is not None and not reuse and i == first_kept:
                cache.feature = h
            h = torch.cat([h, hs.pop()], dim=1)
            h = run(self.output_blocks[i], h, emb, context, tuple(hs[-1].shape[-2:]) if hs else None)
        return self.out(h)

    @staticmethod
    def _checkpointed(block: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                      size: tuple[int, int] | None = None) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(_run_block, block, h, emb, context, size, use_reentrant=False)
