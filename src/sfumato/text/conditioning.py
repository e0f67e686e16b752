"""Prompt -> the UNet's text conditioning: cross-attention ``context`` and, for SDXL, the pooled vector.

AUTOMATIC1111's ``FrozenCLIPEmbedderWithCustomWords`` (``modules/sd_hijack_clip.py``) and its emphasis
(``modules/sd_emphasis.py``), per text encoder of a :class:`~sfumato.config.ModelSpec`:

1. the prompt is cut into 77-id chunks with per-token weights (:func:`sfumato.text.prompt.tokenize_chunks`,
   with the encoder's padding id);
2. each chunk is encoded on its own at the spec's layer, moved ``clip_skip - 1`` layers earlier, with the
   final LayerNorm when the spec says so;
3. the weights scale the hidden states per token and, with emphasis ``"original"``, the chunk is rescaled so
   its mean is what it was before weighting (A1111 "Original"); ``"none"`` keeps the weighted values (A1111
   "No norm"). Chunks without weights skip this, so plain prompts equal the encoder's output bit for bit;
4. chunks are joined along the sequence (77 * k tokens), encoders along the features (SDXL: CLIP-L 768 +
   bigG 1280), and the pooled output is the pooled encoder's on the first chunk.

A1111 runs step 3 on a batch (all prompts of one schedule together), and the mean it restores is over the
whole batch; :func:`encode_prompts` does the same, :func:`encode_prompt` is the batch of one.

``clip_skip`` applies to every encoder here. A1111 applies it only where it is defined for the encoder it
wraps: SD 1.x's CLIP-L (with the final LayerNorm, as the spec says); SD 2.x and SDXL ignore it unless its
"Clip skip SDXL" option is on, so ``clip_skip=1`` reproduces A1111 for those models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sfumato.config import TextEncoderSpec
from sfumato.errors import InvalidParameterError
from sfumato.text.encoder import CLIPTextEncoder, resolve_layer
from sfumato.text.prompt import PromptChunk, tokenize_chunks
from sfumato.text.tokenizer import CLIPTokenizer

__all__ = ["EMPHASIS_MODES", "Conditioning", "cat", "encode_prompt", "encode_prompts", "pad_to_same_length"]

EMPHASIS_MODES = ("original", "none")  # A1111 "Original" and "No norm"


@dataclass
class Conditioning:
    context: torch.Tensor  # (B, 77 * k, D) cross-attention input; D = sum of the encoders' widths
    pooled: torch.Tensor | None  # (B, P) projected pooled output of the pooled encoder (SDXL), else None


def cat(conds: Sequence[Conditioning]) -> Conditioning:
    """Stack conditionings along the batch; contexts must be equally long (see :func:`pad_to_same_length`)."""
    if not conds:
        raise ValueError("cat needs at least one Conditioning")
    lengths = {c.context.shape[1] for c in conds}
    if len(lengths) > 1:
        raise ValueError(f"contexts of different lengths {sorted(lengths)} cannot be batched; pad them first")
    has_pooled = {c.pooled is not None for c in conds}
    if len(has_pooled) > 1:
        raise ValueError("cannot batch conditionings with and without a pooled vector")
    pooled = torch.cat([c.pooled for c in conds]) if has_pooled == {True} else None
    return Conditioning(context=torch.cat([c.context for c in conds]), pooled=pooled)


def pad_to_same_length(conds: Sequence[Conditioning], empty: Conditioning) -> list[Conditioning]:
    """Append copies of the empty prompt's context (one 77-token chunk) to the shorter contexts, so cond and
    uncond of different chunk counts batch together: A1111's "Pad prompt/negative prompt" (``pad_cond``).
    The pooled vectors are left as they are."""
    chunk = empty.context  # (1, L0, D)
    longest = max(c.context.shape[1] for c in conds)
    out = []
    for c in conds:
        missing = longest - c.context.shape[1]
        if missing % chunk.shape[1]:
            raise ValueError(
                f"context length {c.context.shape[1]} differs from {longest} by {missing}, "
                f"not a multiple of the empty prompt's {chunk.shape[1]}"
            )
        repeats = missing // chunk.shape[1]
        if repeats:
            fill = chunk[:1].to(c.context).repeat(c.context.shape[0], repeats, 1)
            c = Conditioning(context=torch.cat([c.context, fill], dim=1), pooled=c.pooled)
        out.append(c)
    return out


def _emphasize(z: torch.Tensor, weights: torch.Tensor, emphasis: str) -> torch.Tensor:
    """Scale each token's hidden state by its weight; "original" then restores the batch's mean.

    The weights are fp32 as in A1111 (a tensor of Python floats), so in half precision the product is
    computed in fp32 there; the result is cast back to ``z``'s dtype here."""
    weighted = z * weights.to(z.device)[..., None]  # (B, 77, D)
    if emphasis == "original":
        weighted = weighted * (z.mean() / weighted.mean())
    return weighted.to(z.dtype)


def _encode_chunks(
    encoder: CLIPTextEncoder, spec: TextEncoderSpec, batch: Sequence[PromptChunk], *, layer: int, emphasis: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk position for every prompt of the batch -> (B, 77, D) hidden states and (B, P) pooled."""
    device = next(encoder.parameters()).device
    ids = torch.tensor([c.ids for c in batch], dtype=torch.long, device=device)  # (B, 77)
    eos = torch.tensor([c.eos_index for c in batch], dtype=torch.long, device=device)  # (B,)
    out = encoder(ids, layer=layer, final_norm=spec.final_norm, eos_index=eos)
    z = out.hidden
    if any(w != 1.0 for c in batch for w in c.weights):
        z = _emphasize(z, torch.tensor([c.weights for c in batch], dtype=torch.float32), emphasis)
    return z, out.pooled


def encode_prompts(
    text_encoders: Sequence[CLIPTextEncoder],
    specs: Sequence[TextEncoderSpec],
    tokenizer: CLIPTokenizer,
    texts: Sequence[str],
    *,
    texts_2: Sequence[str] | None = None,
    clip_skip: int = 1,
    emphasis: str = "original",
) -> Conditioning:
    """Encode prompts as one A1111 batch -> ``Conditioning`` with context (B, 77 * k, D).

    ``texts_2`` (SDXL's ``prompt_2``) goes to the second and later encoders instead of ``texts``; the
    first encoder always reads ``texts``, so a one-encoder model (the SDXL refiner) ignores it, as
    diffusers does. ``k`` is the largest chunk count over every prompt and encoder; shorter prompts get
    the empty prompt's chunk in the missing places, so the encoders' chunks stay aligned when they are
    joined along the features. Emphasis restores the mean over the whole batch, as A1111 does for the
    prompts of one schedule. ``clip_skip`` counts as A1111 does (1 = the spec's layer, 2 = one earlier)
    and applies to every encoder.
    """
    if len(text_encoders) != len(specs) or not specs:
        raise ValueError(f"{len(text_encoders)} text encoders for {len(specs)} specs: need one per spec, at least one")
    if emphasis not in EMPHASIS_MODES:
        raise InvalidParameterError(f"emphasis {emphasis!r} is not one of {', '.join(EMPHASIS_MODES)}")
    if not texts:
        raise ValueError("encode_prompts needs at least one prompt")
    if texts_2 is not None and len(texts_2) != len(texts):
        raise ValueError(f"{len(texts_2)} second prompts for {len(texts)} prompts")

    per_encoder = [texts if i == 0 or texts_2 is None else texts_2 for i in range(len(specs))]
    chunked = [[tokenize_chunks(tokenizer, t, pad_id=spec.pad_id) for t in ts] for ts, spec in zip(per_encoder, specs)]
    k_max = max(len(c) for chunks in chunked for c in chunks)
    contexts: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for encoder, spec, chunks in zip(text_encoders, specs, chunked):
        try:
            layer = resolve_layer(spec.layer, len(encoder.text_model.encoder.layers), clip_skip)
        except ValueError as e:
            raise InvalidParameterError(str(e)) from None
        empty = tokenize_chunks(tokenizer, "", pad_id=spec.pad_id)[0]
        zs = []
        for k in range(k_max):
            batch = [c[k] if k < len(c) else empty for c in chunks]
            z, pool = _encode_chunks(encoder, spec, batch, layer=layer, emphasis=emphasis)
            zs.append(z)
            if k == 0 and spec.pooled and pooled is None:
                pooled = pool
        contexts.append(torch.cat(zs, dim=1))  # (B, 77 * k, D_i)
    return Conditioning(context=torch.cat(contexts, dim=-1), pooled=pooled)


def encode_prompt(
    text_encoders: Sequence[CLIPTextEncoder],
    specs: Sequence[TextEncoderSpec],
    tokenizer: CLIPTokenizer,
    text: str,
    *,
    text_2: str | None = None,
    clip_skip: int = 1,
    emphasis: str = "original",
) -> Conditioning:
    """One prompt (and its ``text_2`` for the second encoder) -> ``Conditioning`` with context
    (1, 77 * k, D) and pooled (1, P) or None."""
    return encode_prompts(text_encoders, specs, tokenizer, [text], texts_2=None if text_2 is None else [text_2],
                          clip_skip=clip_skip, emphasis=emphasis)
