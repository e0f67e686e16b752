"""Text conditioning (sfumato.text.conditioning) on tiny random CLIP text encoders and the real tokenizer.

Plain prompts must equal the encoder's own output bit for bit, and transformers' CLIPTextModel /
CLIPTextModelWithProjection read the way the reference pipelines read them (diffusers' SD 1.x
``last_hidden_state``, A1111's clip skip ``final_layer_norm(hidden_states[-n])``, SDXL's
``hidden_states[-2]`` and ``text_embeds``). Measured on CPU fp32 (torch 2.13, transformers 5.23, sdpa
attention on both sides): max|diff| = 0.0 for every comparison with transformers here.
Emphasis is checked against A1111's formula (``z * w`` then ``* mean(z) / mean(z * w)``).
"""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sfumato.config import TextEncoderConfig, TextEncoderSpec
from sfumato.errors import InvalidParameterError
from sfumato.text.conditioning import Conditioning, cat, encode_prompt, encode_prompts, pad_to_same_length
from sfumato.text.encoder import CLIPTextEncoder
from sfumato.text.prompt import tokenize_chunks
from sfumato.text.tokenizer import get_tokenizer

BOS, EOS = 49406, 49407
TOL = 1e-5
CLIP_L = TextEncoderConfig(width=64, layers=2, heads=4, mlp_width=128)
BIG_G = TextEncoderConfig(width=128, layers=2, heads=4, mlp_width=256, activation="gelu", projection_dim=32)
SD1 = TextEncoderSpec(CLIP_L, layer=-1, final_norm=True, pad_id=EOS)
SD2 = TextEncoderSpec(CLIP_L, layer=1, final_norm=True, pad_id=0)  # absolute layer count, as SD 2.x's 23 of 24
SDXL = (
    TextEncoderSpec(CLIP_L, layer=-2, final_norm=False, pad_id=EOS),
    TextEncoderSpec(BIG_G, layer=-2, final_norm=False, pad_id=0, pooled=True),
)
LONG = ", ".join(["a photo of a cat"] * 20)  # 99 tokens: two chunks


def reference(cfg: TextEncoderConfig, seed: int) -> CLIPTextModel | CLIPTextModelWithProjection:
    hf = CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_width, max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.activation, layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.projection_dim or cfg.width,
        bos_token_id=BOS, eos_token_id=EOS, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if cfg.projection_dim else CLIPTextModel)(hf).eval()
    with torch.no_grad():  # LayerNorms away from identity, so a missing final norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def ours_from(ref: torch.nn.Module, cfg: TextEncoderConfig) -> CLIPTextEncoder:
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    if not any(k.startswith("text_model.") for k in sd):  # transformers >= 5.6 flattens CLIPTextModel
        sd = {k if k.startswith("text_projection") else f"text_model.{k}": v for k, v in sd.items()}
    ours = CLIPTextEncoder(cfg).eval()
    ours.load_state_dict(sd, strict=True)
    return ours


def final_norm(ref: torch.nn.Module) -> torch.nn.Module:
    return getattr(ref, "text_model", ref).final_layer_norm


@pytest.fixture(scope="module")
def models():
    torch.set_grad_enabled(False)
    ref_l, ref_g = reference(CLIP_L, 0), reference(BIG_G, 1)
    yield ref_l, ours_from(ref_l, CLIP_L), ref_g, ours_from(ref_g, BIG_G)
    torch.set_grad_enabled(True)


def ids_of(text: str, pad_id: int = EOS) -> torch.Tensor:
    return torch.tensor([get_tokenizer()(text, pad_id=pad_id).ids])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_plain_prompt_is_the_encoder_output(models) -> None:
    ref, ours, _, _ = models
    cond = encode_prompt([ours], [SD1], get_tokenizer(), "a photo of a cat")
    assert cond.context.shape == (1, 77, 64) and cond.pooled is None
    assert torch.equal(cond.context, ours(ids_of("a photo of a cat")).hidden)
    d = max_diff(cond.context, ref(ids_of("a photo of a cat")).last_hidden_state)
    assert d <= TOL, f"SD1 context vs transformers last_hidden_state: max|diff| = {d}"
    # Editing and alternation syntax is the schedule's business: here brackets without weights stay 1.0.
    assert torch.equal(encode_prompt([ours], [SD1], get_tokenizer(), "").context, ours(ids_of("")).hidden)


def test_clip_skip(models) -> None:
    """A1111 SD 1.x: clip skip n reads hidden_states[-n] and applies the final LayerNorm."""
    ref, ours, _, _ = models
    out = ref(ids_of("a cat"), output_hidden_states=True)
    cond = encode_prompt([ours], [SD1], get_tokenizer(), "a cat", clip_skip=2)
    d = max_diff(cond.context, final_norm(ref)(out.hidden_states[-2]))
    assert d <= TOL, f"clip_skip=2 vs final_layer_norm(hidden_states[-2]): max|diff| = {d}"
    assert max_diff(cond.context, out.last_hidden_state) > 1e-2  # a different layer indeed
    # SD 2.x style: an absolute layer with 0 padding.
    cond = encode_prompt([ours], [SD2], get_tokenizer(), "a cat")
    d = max_diff(cond.context, final_norm(ref)(ref(ids_of("a cat", 0), output_hidden_states=True).hidden_states[1]))
    assert d <= TOL, f"SD2-style layer 1 of 2 with final norm: max|diff| = {d}"
    with pytest.raises(InvalidParameterError, match="clip_skip"):
        encode_prompt([ours], [SD1], get_tokenizer(), "a cat", clip_skip=3)


@pytest.mark.parametrize("emphasis", ["original", "none"])
def test_weighted_prompt(models, emphasis: str) -> None:
    _, ours, _, _ = models
    z = ours(ids_of("a cat dog")).hidden  # the weighted prompt tokenizes to the same ids
    cond = encode_prompt([ours], [SD1], get_tokenizer(), "a (cat:1.5) [dog]", emphasis=emphasis)
    w = torch.ones(77)
    w[2], w[3] = 1.5, 1 / 1.1
    weighted = z * w[:, None]
    expected = weighted * (z.mean() / weighted.mean()) if emphasis == "original" else weighted
    d = max_diff(cond.context, expected)
    assert d <= 1e-6, f"emphasis {emphasis}: max|diff| = {d}"
    ratio = cond.context[0, 2] / z[0, 2]
    if emphasis == "original":
        assert abs(cond.context.mean().item() - z.mean().item()) <= 1e-6
        assert not torch.allclose(ratio, torch.full_like(ratio, 1.5))  # renormalised
    else:
        assert torch.allclose(ratio, torch.full_like(ratio, 1.5))
        assert torch.equal(cond.context[0, 4:], z[0, 4:])
    with pytest.raises(InvalidParameterError, match="emphasis"):
        encode_prompt([ours], [SD1], get_tokenizer(), "a", emphasis="no norm")


def test_long_prompt_and_break(models) -> None:
    _, ours, _, _ = models
    tok = get_tokenizer()
    chunks = tokenize_chunks(tok, LONG, pad_id=EOS)
    cond = encode_prompt([ours], [SD1], tok, LONG)
    assert cond.context.shape == (1, 154, 64)
    for k, chunk in enumerate(chunks):
        assert torch.equal(cond.context[:, 77 * k : 77 * (k + 1)], ours(torch.tensor([chunk.ids])).hidden)
    cond = encode_prompt([ours], [SD1], tok, "a cat BREAK a dog")
    assert cond.context.shape == (1, 154, 64)
    assert torch.equal(cond.context[:, 77:], ours(ids_of("a dog")).hidden)


def test_two_encoders(models) -> None:
    """SDXL-like: features concatenated, each encoder at its penultimate layer without the final norm, pooled
    from the projected encoder on chunk 0 (0-padded), as diffusers' SDXL pipeline reads them."""
    ref_l, ours_l, ref_g, ours_g = models
    tok = get_tokenizer()
    cond = encode_prompt([ours_l, ours_g], SDXL, tok, "a photo of a cat")
    assert cond.context.shape == (1, 77, 192) and cond.pooled.shape == (1, 32)
    out_l = ref_l(ids_of("a photo of a cat"), output_hidden_states=True)
    out_g = ref_g(ids_of("a photo of a cat", 0), output_hidden_states=True)
    expected = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    d, dp = max_diff(cond.context, expected), max_diff(cond.pooled, out_g.text_embeds)
    assert d <= TOL and dp <= TOL, f"SDXL context max|diff| = {d}, pooled max|diff| = {dp}"

    long = encode_prompt([ours_l, ours_g], SDXL, tok, LONG)
    assert long.context.shape == (1, 154, 192)
    first = tokenize_chunks(tok, LONG, pad_id=0)[0]
    assert torch.equal(long.pooled, ours_g(torch.tensor([first.ids])).pooled)
    chunks = zip(tokenize_chunks(tok, LONG, pad_id=EOS), tokenize_chunks(tok, LONG, pad_id=0))
    for i, (chunk_l, chunk_g) in enumerate(chunks):
        part = long.context[:, 77 * i : 77 * (i + 1)]
        assert torch.equal(part[..., :64], ours_l(torch.tensor([chunk_l.ids]), layer=-2, final_norm=False).hidden)
        assert torch.equal(part[..., 64:], ours_g(torch.tensor([chunk_g.ids]), layer=-2, final_norm=False).hidden)


def test_batch_restores_the_mean_over_the_batch(models) -> None:
    """A1111 encodes a prompt's schedule as one batch: missing chunks are the empty prompt's, and the
    emphasis mean is taken over everything in the batch."""
    _, ours, _, _ = models
    tok = get_tokenizer()
    batch = encode_prompts([ours], [SD1], tok, ["(a cat:1.3)", LONG])
    assert batch.context.shape == (2, 154, 64)
    long_chunks = [torch.tensor([c.ids]) for c in tokenize_chunks(tok, LONG, pad_id=EOS)]
    # First chunk position: the weights of prompt 0 rescale prompt 1's unweighted chunk too.
    z = torch.cat([ours(ids_of("a cat")).hidden, ours(long_chunks[0]).hidden])
    w = torch.ones(2, 77)
    w[0, 1:3] = 1.3
    weighted = z * w[..., None]
    d = max_diff(batch.context[:, :77], weighted * (z.mean() / weighted.mean()))
    assert d <= 1e-6, f"first chunk of the batch: max|diff| = {d}"
    assert max_diff(batch.context[1, :77], z[1]) > 1e-4
    # Second chunk position: no weights; prompt 0 has no second chunk, so it gets the empty prompt's.
    assert torch.equal(batch.context[1:, 77:], ours(long_chunks[1]).hidden)
    assert torch.equal(batch.context[:1, 77:], encode_prompt([ours], [SD1], tok, "").context)


def test_pad_to_same_length_and_cat(models) -> None:
    _, ours_l, _, ours_g = models
    tok = get_tokenizer()
    cond = encode_prompt([ours_l, ours_g], SDXL, tok, LONG)
    uncond = encode_prompt([ours_l, ours_g], SDXL, tok, "blurry")
    empty = encode_prompt([ours_l, ours_g], SDXL, tok, "")
    padded_cond, padded_uncond = pad_to_same_length([cond, uncond], empty)
    assert padded_cond is cond
    assert padded_uncond.context.shape == (1, 154, 192)
    assert torch.equal(padded_uncond.context[:, :77], uncond.context)
    assert torch.equal(padded_uncond.context[:, 77:], empty.context)
    assert torch.equal(padded_uncond.pooled, uncond.pooled)
    both = cat([padded_cond, padded_uncond])
    assert both.context.shape == (2, 154, 192) and both.pooled.shape == (2, 32)
    with pytest.raises(ValueError, match="different lengths"):
        cat([cond, uncond])
    odd = Conditioning(context=torch.zeros(1, 100, 192), pooled=None)
    with pytest.raises(ValueError, match="multiple"):
        pad_to_same_length([cond, odd], empty)
