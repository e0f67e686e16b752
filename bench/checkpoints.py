"""Random-weight checkpoints of the real sizes, in both layouts, so every benchmark runs without downloads.

For each preset (``sd1`` = SD 1.5, ``sd2-v`` = SD 2.1 768-v, ``sd2`` = SD 2.1-base, ``sdxl`` = SDXL base,
``sd2-upscaler`` = the SD 2 x4 upscaler; architectures from ``sfumato.config.PRESETS``) it builds sfumato's
own networks on the ``meta`` device, fills them with a cheap deterministic init and writes, through
``Pipeline.save`` (the same renaming tables the loader uses):

    OUT/<name>.safetensors   the original single-file layout (what users download)
    OUT/<name>/              a diffusers folder (model_index.json, unet/, vae/, text_encoder*/, ...)
    OUT/<name>.json          the settings both were written with

``<name>`` is ``<preset>-<fp32|fp16>`` (``tiny-<preset>-...`` with ``--tiny``). Both layouts hold the same
weights, so ``bench/compare.py`` gives the same image from either. A layout that already exists with the
same settings is skipped; one that exists with other settings is an error (delete it or use another --out).

Init: each tensor from its own generator (seed + CRC32 of its key, so a value does not depend on which
other tensors exist): weights and biases uniform in +-1/sqrt(fan_in) (the bound of PyTorch's default
Linear/Conv init), norm scales 1 and shifts 0. About 10 s for SDXL's 3.5B parameters on one core, where
PyTorch's default init takes minutes; activations stay in range, so the images are finite and not flat.

    python bench/checkpoints.py                           # sd1, sd2-v, sdxl in fp32 under ~/.cache/sfumato/bench
    python bench/checkpoints.py --preset sd1 --half       # fp16 files (half the disk)
    python bench/checkpoints.py --tiny --out /tmp/tiny    # tiny configs (test shapes), seconds
    python bench/checkpoints.py --preset sd2-upscaler     # the x4 upscaler (bench/upscale.py), not a default

Disk: fp32 SD 1.5 4.3 GB per layout, SD 2.1 5.2 GB, SDXL 13.9 GB, x4 upscaler 3.5 GB (half that in fp16).
Needs no diffusers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

DEFAULT_OUT = Path.home() / ".cache" / "sfumato" / "bench"
DEFAULT_PRESETS = ("sd1", "sd2-v", "sdxl")
CHOICES = ("sd1", "sd2", "sd2-v", "sdxl", "sd2-upscaler")
LAYOUTS = ("single_file", "diffusers")
INIT = "uniform-fan-in-v1"  # recorded in the settings: a changed init must not pass for an old file


def tiny_spec(family: str):
    """The preset with tiny networks, shaped as tests/tiny.py's reference models (two UNet levels, a 2x
    VAE, 64/128-wide text encoders with 64-wide heads), so detection reads back the same architecture.
    The x4 upscaler's: 7 input channels, 1000 noise-level classes, cross-attention only at the first level
    and self-attention too at the second (as the real one's middle and last levels), a 4x VAE."""
    from sfumato.config import PRESETS, TextEncoderConfig, VAEConfig

    preset = PRESETS[family]
    levels = dict(channel_mult=(1, 2), num_res_blocks=(1, 1))
    vae = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    clip_l = TextEncoderConfig(width=64, layers=2, heads=1, mlp_width=128)
    if family == "sd1":
        unet = replace(preset.unet, model_channels=32, transformer_depth=(1, 0), context_dim=64, **levels)
        texts = (replace(preset.text_encoders[0], config=clip_l),)
    elif family in ("sd2", "sd2-v"):
        unet = replace(preset.unet, model_channels=64, transformer_depth=(1, 0), context_dim=64, **levels)
        # OpenCLIP-H's context is "23 of 24 layers"; of a 3-layer encoder detection takes all 3
        texts = (replace(preset.text_encoders[0], layer=3,
                         config=replace(clip_l, layers=3, activation="gelu")),)
    elif family == "sd2-upscaler":
        unet = replace(preset.unet, model_channels=32, transformer_depth=(1, 1), transformer_depth_middle=1,
                       context_dim=64, disable_self_attn=(True, False), **levels)
        vae = VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1)
        texts = (replace(preset.text_encoders[0], layer=3, config=replace(clip_l, layers=3, activation="gelu")),)
    elif family == "sdxl":
        big_g = TextEncoderConfig(width=128, layers=3, heads=2, mlp_width=256, activation="gelu", projection_dim=128)
        unet = replace(preset.unet, model_channels=64, transformer_depth=(0, 2), transformer_depth_middle=2,
                       context_dim=64 + 128, adm_in_channels=128 + 6 * 256, **levels)
        texts = (replace(preset.text_encoders[0], config=clip_l), replace(preset.text_encoders[1], config=big_g))
    else:
        raise ValueError(f"no tiny config for {family!r}; choose from {', '.join(CHOICES)}")
    return replace(preset, unet=unet, vae=vae, text_encoders=texts)


def init_weights(module: nn.Module, *, seed: int, prefix: str = "") -> nn.Module:
    """Give every parameter of ``module`` (built on ``meta`` or not) deterministic values, on the CPU, in
    the module's dtype; see the module docstring for the scheme. Returns ``module``."""
    if any(p.is_meta for p in module.parameters()):
        module.to_empty(device="cpu")
    norms = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            own = dict(mod.named_parameters(recurse=False))
            weight = own.get("weight")
            fan_in = weight[0].numel() if weight is not None and weight.ndim >= 2 else None
            for name, p in own.items():
                key = f"{prefix}{mod_name}.{name}" if mod_name else f"{prefix}{name}"
                if isinstance(mod, norms) or (p.ndim == 1 and fan_in is None):
                    p.fill_(1.0 if name == "weight" else 0.0)
                    continue
                bound = (p[0].numel() if p.ndim >= 2 else fan_in) ** -0.5
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
                p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound, generator=g))
    return module


def build_pipeline(spec, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A :class:`sfumato.pipeline.Pipeline` of ``spec`` with :func:`init_weights` values, in ``dtype``."""
    from sfumato.models.unet import UNetModel
    from sfumato.models.vae import AutoencoderKL
    from sfumato.pipeline import Pipeline
    from sfumato.text.encoder import CLIPTextEncoder
    from sfumato.text.tokenizer import get_tokenizer

    def make(factory, prefix: str) -> nn.Module:
        with torch.device("meta"):
            m = factory().to(dtype)  # still meta: no memory until init_weights materialises it
        return init_weights(m, seed=seed, prefix=prefix).eval().requires_grad_(False)

    unet = make(lambda: UNetModel(spec.unet), "unet.")
    vae = make(lambda: AutoencoderKL(spec.vae), "vae.")
    encoders = [make(lambda te=te: CLIPTextEncoder(te.config), f"text{i}.") for i, te in enumerate(spec.text_encoders)]
    return Pipeline(spec=spec, unet=unet, vae=vae, text_encoders=encoders, tokenizer=get_tokenizer())


def checkpoint_name(family: str, *, half: bool, tiny: bool) -> str:
    return f"{'tiny-' if tiny else ''}{family}-{'fp16' if half else 'fp32'}"


def write_checkpoints(family: str, out: Path, *, half: bool = False, tiny: bool = False, seed: int = 0,
                      layouts: tuple[str, ...] = LAYOUTS, log=print) -> dict[str, Path]:
    """Write ``family``'s checkpoint in each of ``layouts`` under ``out`` (skipping those already there
    with the same settings); returns {layout: path}."""
    from sfumato import __version__
    from sfumato.config import PRESETS

    name = checkpoint_name(family, half=half, tiny=tiny)
    paths = {"single_file": out / f"{name}.safetensors", "diffusers": out / name}
    settings_path = out / f"{name}.json"
    settings = {"preset": family, "dtype": "fp16" if half else "fp32", "tiny": tiny, "seed": seed, "init": INIT}
    old = json.loads(settings_path.read_text()) if settings_path.is_file() else None
    old_settings = None if old is None else {k: old.get(k) for k in settings}
    todo = []
    for layout in layouts:
        path = paths[layout]
        if path.exists():
            if old_settings != settings:
                raise SystemExit(f"{path} exists with other or unknown settings ({old_settings} in {settings_path}, "
                                 f"want {settings}); delete it or choose another --out")
            log(f"skip {path} (exists, same settings)")
        else:
            todo.append(layout)
    if not todo:
        return {layout: paths[layout] for layout in layouts}

    out.mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps({**settings, "sfumato": __version__}, indent=2) + "\n")
    spec = tiny_spec(family) if tiny else PRESETS[family]
    t0 = time.perf_counter()
    pipe = build_pipeline(spec, seed=seed, dtype=torch.float16 if half else torch.float32)
    n = sum(p.numel() for m in pipe.modules() for p in m.parameters())
    log(f"built {family}{' (tiny)' if tiny else ''}: {n / 1e6:.1f}M parameters in {time.perf_counter() - t0:.1f} s")
    for layout in todo:
        t0 = time.perf_counter()
        pipe.save(paths[layout], format=layout, half=half)
        log(f"wrote {paths[layout]} ({layout}) in {time.perf_counter() - t0:.1f} s")
    return {layout: paths[layout] for layout in layouts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", nargs="+", choices=CHOICES, default=list(DEFAULT_PRESETS))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})")
    ap.add_argument("--half", action="store_true", help="store fp16 (default fp32)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs, for tests")
    ap.add_argument("--layout", choices=(*LAYOUTS, "both"), default="both")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    layouts = LAYOUTS if args.layout == "both" else (args.layout,)
    for family in dict.fromkeys(args.preset):
        write_checkpoints(family, args.out, half=args.half, tiny=args.tiny, seed=args.seed, layouts=layouts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
