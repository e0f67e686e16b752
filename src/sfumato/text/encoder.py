"""The CLIP text transformer: one class for OpenAI CLIP ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14.

The three differ only in ``TextEncoderConfig`` (width, depth, heads, activation, projection).
The architecture is CLIP's text tower (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision"): pre-norm causal transformer over token + learned position
embeddings. Attribute names follow transformers' ``CLIPTextModelWithProjection`` state-dict layout
(``text_model.encoder.layers.N.self_attn.q_proj`` ...), which SD 1.x single files
(``cond_stage_model.transformer.``), SDXL's first encoder and every diffusers folder use, so those
load through an identity map; OpenCLIP files go through ``sfumato.weights.keymap_clip``.

Reference: transformers ``models/clip/modeling_clip.py`` (``CLIPTextTransformer``); OpenCLIP
``open_clip/transformer.py`` (``TextTransformer``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sfumato.config import TextEncoderConfig

__all__ = ["CLIPTextEncoder", "TextEncoderOutput", "resolve_layer"]


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU; the weights were trained with it, so it is not optional."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,  # exact (erf) GELU, OpenCLIP's nn.GELU
}


def resolve_layer(layer: int, n_layers: int, clip_skip: int = 1) -> int:
    """The absolute number of transformer layers to apply to read ``layer``.

    ``layer`` < 0 counts from the end (-1 = output of the last layer), ``layer`` > 0 is an absolute
    count (``TextEncoderSpec.layer``). ``clip_skip`` counts as AUTOMATIC1111 does: 1 reads ``layer``
    itself, 2 the layer before it, and so on.
    """
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be >= 1 (1 = no skip), got {clip_skip}")
    if layer < 0 and layer >= -n_layers:
        n = n_layers + 1 + layer
    elif 0 < layer <= n_layers:
        n = layer
    else:
        raise ValueError(
            f"text encoder layer {layer} is out of range for {n_layers} layers: "
            f"use -1..-{n_layers} (from the end) or 1..{n_layers} (layers applied)"
        )
    n -= clip_skip - 1
    if n < 1:
        raise ValueError(
            f"clip_skip {clip_skip} from layer {layer} leaves no layer of the {n_layers}-layer text encoder"
        )
    return n


@dataclass(frozen=True)
class TextEncoderOutput:
    hidden: torch.Tensor  # (B, L, D) the chosen hidden state: cross-attention context
    pooled: torch.Tensor | None  # (B, projection_dim) projected EOS feature, or None without a projection


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        # An Embedding (not a Parameter) so its key is ``position_embedding.weight`` as in the
        # checkpoints; positions are always 0..L-1, so no ``position_ids`` buffer is kept.
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        max_positions = self.position_embedding.weight.shape[0]
        if length > max_positions:
            raise ValueError(f"token sequence of length {length} exceeds the encoder's {max_positions} positions")
        return self.token_embedding(ids) + self.position_embedding.weight[:length]  # (B, L, D)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape
        # (B, L, D) -> (B, H, L, d)
        q, k, v = (
            p(x).reshape(b, length, self.heads, width // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        # CLIP's text tower is causal: each token sees only itself and earlier tokens.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, width))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"unknown text encoder activation {cfg.activation!r}; known: {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[cfg.activation]
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer returning the hidden state a model family conditions on.

    ``forward(ids, layer=..., final_norm=...)`` returns the hidden state after ``layer`` layers
    (see ``resolve_layer``), with ``final_layer_norm`` applied when ``final_norm``; when the config
    has a projection it also returns the pooled output ``text_projection(final_layer_norm(h)[eos])``
    of the last layer ``h``, as CLIP (and SDXL's ``y`` vector) defines it.
    """

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.text_projection = (
            nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim is not None else None
        )

    def forward(
        self,
        ids: torch.Tensor,
        *,
        layer: int = -1,
        final_norm: bool = True,
        eos_index: torch.Tensor | None = None,
    ) -> TextEncoderOutput:
        """Encode token ids (B, L).

        ``eos_index`` (B,) is where the pooled output is read; by default the argmax of ``ids``,
        which is the first EOS (49407, the largest id of CLIP's vocabulary) for both EOS- and
        0-padded sequences, as transformers and OpenCLIP read it.
        """
        tm = self.text_model
        layers = tm.encoder.layers
        n = resolve_layer(layer, len(layers))
        # The pooled output is read after the last layer, so it needs the whole stack; otherwise
        # stop at the chosen layer (SD 2.x reads 23 of 24, SDXL the penultimate).
        stop = len(layers) if self.text_projection is not None else n
        x = tm.embeddings(ids)  # (B, L, D)
        hidden = x
        for i in range(stop):
            x = layers[i](x)
            if i + 1 == n:
                hidden = x
        if final_norm:
            hidden = tm.final_layer_norm(hidden)
        if self.text_projection is None:
            return TextEncoderOutput(hidden=hidden, pooled=None)
        if eos_index is None:
            eos_index = ids.argmax(dim=-1)
        rows = torch.arange(x.shape[0], device=x.device)
        pooled = self.text_projection(tm.final_layer_norm(x[rows, eos_index.to(x.device)]))  # (B, P)
        return TextEncoderOutput(hidden=hidden, pooled=pooled)
