"""Tiny random-weight reference models built with diffusers + transformers (test-only).

Each builder makes a diffusers pipeline folder of one family, with real key layouts and tiny shapes.
SDXL's two encoders get different widths, as the real ones (768, 1280) have: diffusers' single-file
loader tells them apart by width.
The shapes agree with what sfumato infers from shapes alone (SD 1.x: 8 heads; SD 2.x / SDXL: head
width 64; text encoders: head width 64), so a single file and a folder give the same spec.
"""

from __future__ import annotations

from pathlib import Path

import torch

SHARED_BPE = Path(__file__).resolve().parents[2] / "shared" / "clip-bpe"

TIME_EMBED = 256  # SDXL's Fourier width per size-conditioning number


def _tokenizer(pad: str):
    from transformers import CLIPTokenizer

    # transformers 5 ignores vocab_file/merges_file keywords; from_pretrained on the folder reads them
    return CLIPTokenizer.from_pretrained(str(SHARED_BPE), pad_token=pad, model_max_length=77)


def _text(width: int = 64, layers: int = 2, *, act: str = "quick_gelu", projection: int | None = None,
          pad_id: int = 49407):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=width // 64, max_position_embeddings=77,
                         hidden_act=act, bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_id,
                         projection_dim=projection or width)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval()


def _vae(blocks=(32, 64), scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    n = len(blocks)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=blocks, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         latent_channels=4, norm_num_groups=32, sample_size=32,
                         scaling_factor=scaling_factor).eval()


def _scheduler(prediction: str = "epsilon"):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  prediction_type=prediction, timestep_spacing="leading", steps_offset=1)


def sd1_unet(in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32).eval()


def sd2_unet(in_channels: int = 4, **kw):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(1, 2), use_linear_projection=True, upcast_attention=True,
        norm_num_groups=32, **kw).eval()


def sdxl_unet(context: int, pooled: int, n_ids: int, depths=(0, 2)):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, depths[1]), cross_attention_dim=context, attention_head_dim=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=pooled + n_ids * TIME_EMBED, norm_num_groups=32).eval()


def build(family: str, folder: Path, seed: int = 0, vae_blocks: tuple[int, ...] = (32, 64)) -> Path:
    """Save a tiny random diffusers pipeline of ``family`` ("sd1", "sd2-v", "sdxl", "sdxl-refiner") to ``folder``;
    ``vae_blocks``: the autoencoder's widths, one 2x level each ((32, 32, 64, 64) downsamples 8x as SD does)."""
    import diffusers

    torch.manual_seed(seed)
    if family == "sd1":
        pipe = diffusers.StableDiffusionPipeline(
            vae=_vae(vae_blocks), text_encoder=_text(), tokenizer=_tokenizer("<|endoftext|>"), unet=sd1_unet(),
            scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif family in ("sd2", "sd2-v"):
        pipe = diffusers.StableDiffusionPipeline(
            vae=_vae(vae_blocks), text_encoder=_text(layers=3, act="gelu", pad_id=0), tokenizer=_tokenizer("!"),
            unet=sd2_unet(), scheduler=_scheduler("v_prediction" if family == "sd2-v" else "epsilon"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif family == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=_vae(vae_blocks, scaling_factor=0.13025), text_encoder=_text(),
            text_encoder_2=_text(128, act="gelu", projection=128, pad_id=0, layers=3),
            tokenizer=_tokenizer("<|endoftext|>"), tokenizer_2=_tokenizer("!"),
            unet=sdxl_unet(context=192, pooled=128, n_ids=6), scheduler=_scheduler())
    elif family == "sdxl-refiner":
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=_vae(vae_blocks, scaling_factor=0.13025), text_encoder=None, text_encoder_2=_text(act="gelu", projection=64, pad_id=0, layers=3),
            tokenizer=None, tokenizer_2=_tokenizer("!"), unet=sdxl_unet(context=64, pooled=64, n_ids=5),
            scheduler=_scheduler(), requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False)  # as the released refiner's model_index.json
    else:
        raise ValueError(family)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def reference_pipeline(folder: Path):
    """diffusers' pipeline for a folder ``build`` wrote (SDXL or SD), progress bars off."""
    import diffusers

    xl = "sdxl" in folder.name
    cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    kw = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(str(folder), local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randomize(model: torch.nn.Module, seed: int = 0, *, embedding_scale: float = 0.2) -> None:
    """Random weights everywhere, LayerNorms included (around 1), so a swapped or missed tensor shows;
    parameters named ``*embedding*`` get ``embedding_scale``, the others 0.2."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif "embedding" in name:
                p.copy_(embedding_scale * noise)
            else:
                p.copy_(0.2 * noise)


def build_zoo(kind: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random SD 2 zoo pipeline ("pix2pix", "depth", "upscaler" or "unclip") as a diffusers folder: the
    layouts of the official instruct-pix2pix, 512-depth and x4-upscaler models at tiny widths (the upscaler:
    7 input channels, 1000 noise-level classes, self-attention off where the official one has it off, a 4x
    autoencoder with its scaling factor, v-prediction, LDM's schedules)."""
    import diffusers

    torch.manual_seed(seed)
    if kind == "pix2pix":
        pipe = diffusers.StableDiffusionInstructPix2PixPipeline(
            vae=_vae((32, 32, 64, 64)), text_encoder=_text(), tokenizer=_tokenizer("<|endoftext|>"),
            unet=sd1_unet(8), scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    elif kind == "depth":
        pipe = diffusers.StableDiffusionDepth2ImgPipeline(
            vae=_vae((32, 32, 64, 64)), text_encoder=_text(layers=3, act="gelu", pad_id=0), tokenizer=_tokenizer("!"),
            unet=sd2_unet(5), scheduler=_scheduler(), depth_estimator=None, feature_extractor=None)
    elif kind == "upscaler":
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=7, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
            use_linear_projection=True, num_class_embeds=1000, only_cross_attention=(True, False),
            norm_num_groups=32).eval()
        pipe = diffusers.StableDiffusionUpscalePipeline(
            vae=_vae((32, 32, 64), scaling_factor=0.08333), text_encoder=_text(layers=3, act="gelu", pad_id=0),
            tokenizer=_tokenizer("!"), unet=unet, max_noise_level=350,
            low_res_scheduler=diffusers.DDPMScheduler(beta_start=0.0001, beta_end=0.02,
                                                      beta_schedule="scaled_linear"),
            scheduler=diffusers.EulerDiscreteScheduler(
                beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", prediction_type="v_prediction",
                timestep_spacing="leading", steps_offset=1))
    elif kind == "unclip":
        pipe = _unclip()
    else:
        raise ValueError(kind)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _unclip():
    """unCLIP-L's shape where it picks the family (a 768-wide image embedding, so a 1536-wide ADM vector)
    and ViT-L's head count and activation; everything else tiny. Random embedding statistics."""
    import diffusers
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=16,
        intermediate_size=64, projection_dim=768, hidden_act="quick_gelu")).eval()
    randomize(encoder, 1)
    norm = StableUnCLIPImageNormalizer(embedding_dim=768)
    with torch.no_grad():
        norm.mean.normal_(0, 0.3)
        norm.std.uniform_(0.5, 1.5)
    return diffusers.StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        image_encoder=encoder, image_normalizer=norm,
        image_noising_scheduler=diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=_tokenizer("!"), text_encoder=_text(layers=3, act="gelu", pad_id=0),
        unet=sd2_unet(class_embed_type="projection", projection_class_embeddings_input_dim=1536),
        scheduler=_scheduler("v_prediction"), vae=_vae((32, 32, 64, 64)))
