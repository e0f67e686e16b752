"""SDXL-size speed and memory, sfumato against diffusers, measured in one run.

Each side runs in its own subprocess (so its peak RSS is its own): it builds the real-size SDXL base
architecture with random weights (UNet 2.6B, CLIP-L, OpenCLIP bigG, VAE; the same configs on both sides,
diffusers' taken from sfumato's preset through the key-map config translators), then generates one
image at ``--size`` with ``--steps`` Euler steps and classifier-free guidance. It reports seconds per
denoising step (median over the steps after the first), the VAE decode, and peak RSS; the parent prints
both and the ratios sfumato / diffusers (below 1 = sfumato is faster or smaller).

    python bench/sdxl.py                       # 256 px, 4 steps, fp32 on the CPU
    python bench/sdxl.py --size 512 --device cuda --dtype fp16

Needs diffusers + transformers (the test extra). Takes ~14 GB of RAM per side in fp32.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARED_BPE = Path(__file__).resolve().parents[2] / "shared" / "clip-bpe"


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def worker_sfumato(args: argparse.Namespace) -> dict:
    import torch

    from sfumato.config import PRESETS
    from sfumato.models.unet import UNetModel
    from sfumato.models.vae import AutoencoderKL
    from sfumato.pipeline import Pipeline
    from sfumato.text.encoder import CLIPTextEncoder
    from sfumato.text.tokenizer import get_tokenizer

    torch.manual_seed(0)
    spec = PRESETS["sdxl"]
    t0 = time.perf_counter()
    pipe = Pipeline(spec=spec, unet=UNetModel(spec.unet), vae=AutoencoderKL(spec.vae),
                    text_encoders=[CLIPTextEncoder(te.config) for te in spec.text_encoders],
                    tokenizer=get_tokenizer()).to(args.device, _dtype(args.dtype))
    build = time.perf_counter() - t0
    stamps: list[float] = []
    t0 = time.perf_counter()
    res = pipe.generate("a photo of a lighthouse at dusk", "blurry", steps=args.steps, width=args.size,
                        height=args.size, sampler="euler", seed=0, cfg_scale=5.0,
                        callback=lambda s: stamps.append(_sync(args.device)))
    total = time.perf_counter() - t0
    return _report(build, stamps, total, res.images[0])


def worker_diffusers(args: argparse.Namespace) -> dict:
    import diffusers
    import torch
    import transformers

    from sfumato.config import PRESETS
    from sfumato.weights.keymap_clip import text_config_to_diffusers
    from sfumato.weights.keymap_unet import unet_config_to_diffusers
    from sfumato.weights.keymap_vae import vae_config_to_diffusers

    torch.manual_seed(0)
    spec = PRESETS["sdxl"]
    t0 = time.perf_counter()
    unet = diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(spec.unet))
    vae = diffusers.AutoencoderKL.from_config(vae_config_to_diffusers(spec.vae, scaling_factor=spec.latent_scale))
    encoders, tokenizers = [], []
    for te in spec.text_encoders:
        cfg = transformers.CLIPTextConfig(**{k: v for k, v in text_config_to_diffusers(
            te.config, with_projection=te.pooled).items() if not k.startswith("_") and k != "architectures"})
        cls = transformers.CLIPTextModelWithProjection if te.pooled else transformers.CLIPTextModel
        encoders.append(cls(cfg))
        tokenizers.append(transformers.CLIPTokenizer.from_pretrained(
            str(SHARED_BPE), pad_token="!" if te.pad_id == 0 else "<|endoftext|>", model_max_length=77))
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1)
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                               tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                               scheduler=scheduler).to(args.device, _dtype(args.dtype))
    pipe.set_progress_bar_config(disable=True)
    build = time.perf_counter() - t0
    stamps: list[float] = []

    def on_step(p, i, t, kw):
        stamps.append(_sync(args.device))
        return kw

    t0 = time.perf_counter()
    with torch.inference_mode():
        image = pipe("a photo of a lighthouse at dusk", negative_prompt="blurry", num_inference_steps=args.steps,
                     height=args.size, width=args.size, guidance_scale=5.0, callback_on_step_end=on_step,
                     generator=torch.Generator().manual_seed(0)).images[0]
    total = time.perf_counter() - t0
    return _report(build, stamps, total, image)


def _sync(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def _report(build: float, stamps: list[float], total: float, image) -> dict:
    import numpy as np

    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    pixels = np.asarray(image)
    return {"build_s": build, "step_s": statistics.median(steps) if steps else float("nan"), "total_s": total,
            "peak_rss_gb": _peak_rss_gb(), "image_ok": bool(np.isfinite(pixels).all() and pixels.std() > 0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    ap.add_argument("--worker", choices=("sfumato", "diffusers"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        fn = worker_sfumato if args.worker == "sfumato" else worker_diffusers
        print("RESULT " + json.dumps(fn(args)), flush=True)
        return 0

    results = {}
    for side in ("sfumato", "diffusers"):
        cmd = [sys.executable, __file__, "--worker", side, "--size", str(args.size), "--steps", str(args.steps),
               "--device", args.device, "--dtype", args.dtype]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if out.returncode or line is None:
            print(f"{side} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[side] = json.loads(line[len("RESULT "):])
    print(f"SDXL base, {args.size}x{args.size}, {args.steps} Euler steps, cfg 5, {args.dtype} on {args.device}")
    print(f"{'':10} {'s/step':>8} {'total s':>8} {'peak RSS GB':>12} {'build s':>8} image")
    for side, r in results.items():
        print(f"{side:10} {r['step_s']:8.2f} {r['total_s']:8.2f} {r['peak_rss_gb']:12.2f} {r['build_s']:8.1f} "
              f"{'ok' if r['image_ok'] else 'BAD'}")
    s, d = results["sfumato"], results["diffusers"]
    print(f"ratio sfumato/diffusers: step time {s['step_s'] / d['step_s']:.3f}, total {s['total_s'] / d['total_s']:.3f}, "
          f"peak RSS {s['peak_rss_gb'] / d['peak_rss_gb']:.3f}")
    return 0 if s["image_ok"] and d["image_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
