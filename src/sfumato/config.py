"""Model variants as data: frozen dataclass configs for every network, and the named presets.

Model and sampler code read these fields, never a family name. A ``ModelSpec`` says how a family
wires its networks together (which text-encoder layer is the context, prediction type, latent scale,
extra input channels, SDXL micro-conditioning); presets name the official releases, while
``sfumato.weights.detect`` builds specs from tensor shapes so resized community models load too.

Field meanings follow the original LDM / sgm configs (``openaimodel.py``, ``autoencoder.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = [
    "UNetConfig",
    "VAEConfig",
    "TextEncoderConfig",
    "TextEncoderSpec",
    "NoiseScheduleConfig",
    "ModelSpec",
    "PRESETS",
    "get_preset",
    "replace",
]


@dataclass(frozen=True)
class UNetConfig:
    """The LDM ``UNetModel`` (openaimodel.py): one class for every family.

    Per-level tuples have one entry per ``channel_mult`` entry. A level with
    ``transformer_depth == 0`` has no attention. The up path has ``num_res_blocks + 1``
    blocks per level, as in LDM.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)  # per level; 0 = no attention at that level
    mid_block: bool = True  # False for block-removed distillations (BK-SDM-small/tiny)
    transformer_depth_middle: int = 1
    num_heads: int | None = 8  # fixed head count (SD 1.x) ...
    head_dim: int | None = None  # ... or fixed head width (SD 2.x, SDXL); exactly one is set
    context_dim: int | None = 768  # cross-attention input width
    use_linear_proj: bool = False  # SpatialTransformer proj_in/out as Linear (SD 2.x, SDXL) or 1x1 conv
    adm_in_channels: int | None = None  # width of the ``y`` vector fed to ``label_emb`` (SDXL, unCLIP)
    adm_kind: str | None = None  # what ``y`` is made of: "text_time" (SDXL) or "image" (unCLIP)
    num_classes: int | None = None  # nn.Embedding class labels (x4 upscaler noise level)
    disable_self_attn: tuple[bool, ...] | None = None  # per level: attn1 attends to context too (x4 upscaler)
    upcast_attention: bool = False  # attention softmax in fp32 (SD 2.x)

    def __post_init__(self) -> None:
        n = len(self.channel_mult)
        if len(self.num_res_blocks) != n or len(self.transformer_depth) != n:
            raise ValueError(
                f"UNetConfig: num_res_blocks {self.num_res_blocks} and transformer_depth "
                f"{self.transformer_depth} need one entry per level of channel_mult {self.channel_mult}"
            )
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("UNetConfig: set exactly one of num_heads and head_dim")
        if self.disable_self_attn is not None and len(self.disable_self_attn) != n:
            raise ValueError("UNetConfig: disable_self_attn needs one entry per level")

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of an attention layer over ``channels``."""
        if self.head_dim is not None:
            return channels // self.head_dim, self.head_dim
        assert self.num_heads is not None
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """The LDM ``AutoencoderKL`` (Encoder/Decoder of ``ldm.modules.diffusionmodules.model``)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # len(ch_mult) - 1 downsamplings: 8x for 4 levels
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text transformer: CLIP ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14 differ only here."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    max_positions: int = 77
    activation: str = "quick_gelu"  # OpenAI CLIP; OpenCLIP models use "gelu"
    projection_dim: int | None = None  # text_projection (pooled output) present, e.g. bigG 1280
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class TextEncoderSpec:
    """How a family uses one text encoder.

    ``layer`` picks the hidden state used as cross-attention context: negative counts from the
    end (-1 = last layer), positive is an absolute count of layers applied (SD 2.x uses 23 of
    OpenCLIP-H's 24, so a diffusers copy truncated to 23 layers reads the same layer).
    """

    config: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    layer: int = -1
    final_norm: bool = True  # apply final_layer_norm to that hidden state
    pad_id: int = 49407  # CLIP-L pads with EOS; OpenCLIP with 0 ("!")
    pooled: bool = False  # its projected pooled output is part of ``y`` (SDXL)
    ckpt_prefix: str = "cond_stage_model.transformer."  # key prefix in original single files
    ckpt_layout: str = "hf"  # "hf" (transformers names) or "open_clip" (fused qkv, resblocks)


@dataclass(frozen=True)
class NoiseScheduleConfig:
    """The DDPM training schedule (betas); samplers derive sigmas from it."""

    beta_schedule: str = "scaled_linear"  # or "linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_timesteps: int = 1000


@dataclass(frozen=True)
class ModelSpec:
    """Everything the pipeline needs to know about a model, as data."""

    family: str
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: tuple[TextEncoderSpec, ...]
    prediction: str = "eps"  # "eps" or "v"
    latent_scale: float = 0.18215
    latent_shift: float = 0.0
    schedule: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    size_conditioning: str | None = None  # "base" (orig size, crop, target) or "refiner" (.., aesthetic)
    concat: str | None = None  # extra UNet input: "inpaint", "depth", "pix2pix", "low_res"
    # unCLIP: the CLIP image encoder whose (noise-augmented) embedding is the UNet's ADM vector, by its
    # name in sfumato.models.clip_vision.VISION_PRESETS
    image_encoder: str | None = None
    default_size: int = 512
    default_cfg: float | None = None  # the guidance scale generation uses when none is given (None: 7)
    # An empty negative prompt is all zeros (context and pooled) instead of the encoded "": SDXL base as
    # released (diffusers' force_zeros_for_empty_prompt, AUTOMATIC1111's force_zero_negative_prompt)
    zero_empty_negative: bool = False
    # The autoencoder overflows in fp16 (the SDXL VAE; diffusers' force_upcast): decode/encode in fp32
    # when the pipeline runs in half precision
    vae_upcast: bool = False
    # Align Your Steps (Sabour et al. 2024): NVIDIA's 10-step schedule for this model, as training
    # timesteps (their published form); the "ays" schedule interpolates it to any step count
    ays_timesteps: tuple[int, ...] = (999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0)

    @property
    def context_dim(self) -> int:
        return sum(t.config.width for t in self.text_encoders)


# --- presets -------------------------------------------------------------------------------------

CLIP_L = TextEncoderConfig()
OPENCLIP_H = TextEncoderConfig(width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu")
OPENCLIP_BIGG = TextEncoderConfig(
    width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu", projection_dim=1280
)

_SD1_TEXT = TextEncoderSpec(CLIP_L, layer=-1, final_norm=True, pad_id=49407)
_SD2_TEXT = TextEncoderSpec(
    OPENCLIP_H, layer=23, final_norm=True, pad_id=0,
    ckpt_prefix="cond_stage_model.model.", ckpt_layout="open_clip",
)
_SDXL_TEXT = (
    TextEncoderSpec(CLIP_L, layer=-2, final_norm=False, pad_id=49407,
                    ckpt_prefix="conditioner.embedders.0.transformer."),
    TextEncoderSpec(OPENCLIP_BIGG, layer=-2, final_norm=False, pad_id=0, pooled=True,
                    ckpt_prefix="conditioner.embedders.1.model.", ckpt_layout="open_clip"),
)
_REFINER_TEXT = (
    TextEncoderSpec(OPENCLIP_BIGG, layer=-2, final_norm=False, pad_id=0, pooled=True,
                    ckpt_prefix="conditioner.embedders.0.model.", ckpt_layout="open_clip"),
)

_SD1_UNET = UNetConfig()
_SD2_UNET = UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_proj=True,
                       upcast_attention=True)
_SDXL_UNET = UNetConfig(
    channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2), transformer_depth=(0, 2, 10),
    transformer_depth_middle=10, num_heads=None, head_dim=64, context_dim=2048,
    use_linear_proj=True, adm_in_channels=2816, adm_kind="text_time",
)
_REFINER_UNET = UNetConfig(
    model_channels=384, transformer_depth=(0, 4, 4, 0), transformer_depth_middle=4,
    num_heads=None, head_dim=64, context_dim=1280, use_linear_proj=True,
    adm_in_channels=2560, adm_kind="text_time",
)
_UPSCALER_UNET = UNetConfig(
    in_channels=7, model_channels=256, channel_mult=(1, 2, 2, 4), transformer_depth=(0, 1, 1, 1),
    num_heads=8, context_dim=1024, use_linear_proj=True, num_classes=1000,
    disable_self_attn=(True, True, True, False),
)

_VAE = VAEConfig()

# sfumato's own small model (trained by `sfumato train`, shipped in the package): the same classes at a
# size that trains on a CPU (about 11M parameters, 22 MB in fp16). 64 px images, a 4x autoencoder (16x16x4 latents), a 3-layer CLIP-architecture
# text encoder over the real CLIP tokenizer, trained from scratch with the UNet. Its text encoder sits
# under sgm's `conditioner.embedders.0.transformer.` prefix, a key signature no official release has.
BUILTIN = ModelSpec(
    "builtin",
    UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 1), transformer_depth=(0, 1, 1),
               transformer_depth_middle=1, num_heads=None, head_dim=64, context_dim=64, use_linear_proj=True),
    VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
    (TextEncoderSpec(TextEncoderConfig(width=64, layers=3, heads=1, mlp_width=256, activation="gelu"),
                     layer=-1, final_norm=True, pad_id=49407, ckpt_prefix="conditioner.embedders.0.transformer."),),
    prediction="v",  # v: eps-prediction barely learned flat backgrounds in a CPU-sized run (see the model card)
    latent_scale=0.49899,  # the trained autoencoder's 1 / latent std (0.498988, printed by `sfumato train`)
    default_size=64,
    default_cfg=2.0,  # chosen on the quality bench's seen prompts (all five right: 0.85 at 2-2.5, 0.68 at 7)
)
_UPSCALER_VAE = VAEConfig(ch_mult=(1, 2, 4))
# the x4 upscaler's LDM config says linear_start 1e-4, linear_end 0.02 with LDM's "linear" schedule, which is
# linear in sqrt(beta): diffusers' "scaled_linear" (for its diffusion and its noise augmentation alike)
_UPSCALER_SCHEDULE = NoiseScheduleConfig(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
_AYS_SDXL = (999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0)

PRESETS: dict[str, ModelSpec] = {
    s.family: s
    for s in (
        ModelSpec("sd1", _SD1_UNET, _VAE, (_SD1_TEXT,)),
        ModelSpec("sd1-inpaint", replace(_SD1_UNET, in_channels=9), _VAE, (_SD1_TEXT,), concat="inpaint"),
        ModelSpec("sd1-pix2pix", replace(_SD1_UNET, in_channels=8), _VAE, (_SD1_TEXT,), concat="pix2pix"),
        ModelSpec("sd2", _SD2_UNET, _VAE, (_SD2_TEXT,)),
        ModelSpec("sd2-v", _SD2_UNET, _VAE, (_SD2_TEXT,), prediction="v", default_size=768),
        ModelSpec("sd2-inpaint", replace(_SD2_UNET, in_channels=9), _VAE, (_SD2_TEXT,), concat="inpaint"),
        ModelSpec("sd2-depth", replace(_SD2_UNET, in_channels=5), _VAE, (_SD2_TEXT,), concat="depth"),
        ModelSpec("sd2-upscaler", _UPSCALER_UNET, _UPSCALER_VAE, (_SD2_TEXT,), prediction="v",
                  latent_scale=0.08333, schedule=_UPSCALER_SCHEDULE, concat="low_res", default_size=128),
        ModelSpec("sd2-unclip-l", replace(_SD2_UNET, adm_in_channels=1536, adm_kind="image"), _VAE,
                  (_SD2_TEXT,), prediction="v", default_size=768, image_encoder="clip-vit-l-14"),
        ModelSpec("sd2-unclip-h", replace(_SD2_UNET, adm_in_channels=2048, adm_kind="image"), _VAE,
                  (_SD2_TEXT,), prediction="v", default_size=768, image_encoder="open-clip-vit-h-14"),
        ModelSpec("sdxl", _SDXL_UNET, _VAE, _SDXL_TEXT, latent_scale=0.13025, size_conditioning="base",
                  default_size=1024, zero_empty_negative=True, vae_upcast=True, ays_timesteps=_AYS_SDXL),
        ModelSpec("sdxl-inpaint", replace(_SDXL_UNET, in_channels=9), _VAE, _SDXL_TEXT,
                  latent_scale=0.13025, size_conditioning="base", concat="inpaint", default_size=1024,
                  zero_empty_negative=True, vae_upcast=True, ays_timesteps=_AYS_SDXL),
        # the refiner's released diffusers config encodes "" (force_zeros_for_empty_prompt: false)
        ModelSpec("sdxl-refiner", _REFINER_UNET, _VAE, _REFINER_TEXT, latent_scale=0.13025,
                  size_conditioning="refiner", default_size=1024, vae_upcast=True, ays_timesteps=_AYS_SDXL),
        BUILTIN,
    )
}


def get_preset(family: str) -> ModelSpec:
    """The preset for ``family``; a clear error lists the known names."""
    try:
        return PRESETS[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(sorted(PRESETS))}") from None
