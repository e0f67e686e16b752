"""Training memory and speed against diffusers: LoRA and DreamBooth (full UNet) steps at SD 1.5 size.

Each (side, method) runs in its own process on the same diffusers folder (default: the SD 1.5-size random
one ``bench/checkpoints.py`` writes), batch 1, ``--size`` pixels, AdamW, the same number of steps:

    sfumato    ``sfumato.train.finetune`` (method "lora" rank 4 / "dreambooth"), latents and text
               embeddings cached, as it trains
    diffusers  the loop of diffusers' ``train_text_to_image_lora.py`` / ``train_dreambooth.py``: UNet2D-
               ConditionModel with a PEFT LoRA adapter on the same layers (attention q/k/v/out and the
               feed-forward of every transformer block) or all UNet weights trainable; latents and text
               embeddings computed once beforehand, as sfumato caches them

Printed per method: peak RSS (the worker's ru_maxrss: weights, optimiser state, activations) and seconds
per step (the loop's time over its steps; sfumato's includes caching the latents and writing the output
file), each as sfumato / diffusers, and peak RSS over the weights' bytes (the floor: the three networks in
float32). ``--checkpointing`` turns on gradient checkpointing on both sides.

    python bench/checkpoints.py --preset sd1 --layout diffusers
    python bench/train_memory.py --size 256 --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = Path("~/.cache/sfumato/bench/sd1-fp32").expanduser()
METHODS = ("lora", "dreambooth")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
CAPTION = "a photo of zwx dog"


def write_data(folder: Path, size: int, n: int = 4) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = np.full((size, size, 3), rng.integers(0, 255, 3), np.uint8)
        a[size // 4: size // 2, size // 4: 3 * size // 4] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(CAPTION + "\n")


def sfumato_worker(args: argparse.Namespace) -> dict:
    import sfumato
    from sfumato.train.personalise import FinetuneConfig, finetune

    pipe = sfumato.load(args.model)
    cfg = FinetuneConfig(method=args.method, steps=args.steps, batch_size=1, resolution=args.size, rank=4,
                         lr=1e-4 if args.method == "lora" else 5e-6, buckets=False, checkpoint_every=10 ** 6,
                         gradient_checkpointing=args.checkpointing)
    t0 = time.perf_counter()
    res = finetune(pipe, args.data, cfg, out_dir=args.tmp / "out", progress=False)
    return {"seconds": time.perf_counter() - t0, "loss": res.losses[-1]}


def diffusers_worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    m = args.model
    unet = UNet2DConditionModel.from_pretrained(m / "unet")
    vae = AutoencoderKL.from_pretrained(m / "vae")
    text = CLIPTextModel.from_pretrained(m / "text_encoder")
    tok = CLIPTokenizer.from_pretrained(m / "tokenizer")
    sched = DDPMScheduler.from_pretrained(m / "scheduler")
    vae.requires_grad_(False)
    text.requires_grad_(False)
    t0 = time.perf_counter()
    with torch.no_grad():  # computed once, as sfumato caches them
        ids = tok([CAPTION], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        context = text(ids)[0]
        lats = []
        for p in sorted(args.data.glob("*.png")):
            x = torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1)
            x = (x.float() / 127.5 - 1)[None]
            lats.append(vae.encode(x).latent_dist.sample() * vae.config.scaling_factor)
    if args.method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        params, lr = [p for p in unet.parameters() if p.requires_grad], 1e-4
    else:
        params, lr = list(unet.parameters()), 5e-6
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(params, lr=lr)
    for step in range(args.steps):
        latents = lats[step % len(lats)]
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,))
        noisy = sched.add_noise(latents, noise, t)
        loss = F.mse_loss(unet(noisy, t, context).sample.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"seconds": time.perf_counter() - t0, "loss": float(loss)}


def run_worker(args: argparse.Namespace, side: str, method: str, tmp: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--method", method, "--model", str(args.model),
           "--size", str(args.size), "--steps", str(args.steps), "--data", str(tmp / "data"), "--tmp",
           str(tmp / f"{side}-{method}")] + (["--checkpointing"] if args.checkpointing else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{side} {method} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def weight_bytes(model: Path) -> int:
    return sum(p.stat().st_size for sub in ("unet", "vae", "text_encoder") for p in (model / sub).glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a diffusers folder (SD 1.x/2.x)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on both sides")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", choices=("sfumato", "diffusers"), help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = (sfumato_worker if args.worker == "sfumato" else diffusers_worker)(args)
        res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or not (args.model / "model_index.json").is_file():
        ap.error(f"methods must be among {', '.join(METHODS)} (got {bad}); --model must be a diffusers folder "
                 f"(python bench/checkpoints.py --preset sd1 --layout diffusers)")
    floor = weight_bytes(args.model) / 1e9
    print(f"{args.model.name}: {args.size}x{args.size}, batch 1, {args.steps} AdamW steps, gradient checkpointing "
          f"{'on' if args.checkpointing else 'off'}; float32 weights {floor:.2f} GB")
    print(f"{'':12} {'':10} {'sfumato':>9} {'diffusers':>10} {'ratio':>7} {'sfumato/weights':>16}")
    results = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        write_data(tmp / "data", args.size)
        for method in methods:
            s = run_worker(args, "sfumato", method, tmp)
            d = run_worker(args, "diffusers", method, tmp)
            results[method] = {"sfumato": s, "diffusers": d}
            print(f"{method:12} {'peak GB':10} {s['peak_rss_gb']:9.2f} {d['peak_rss_gb']:10.2f} "
                  f"{s['peak_rss_gb'] / d['peak_rss_gb']:7.3f} {s['peak_rss_gb'] / floor:16.2f}")
            print(f"{'':12} {'s/step':10} {s['seconds'] / args.steps:9.2f} {d['seconds'] / args.steps:10.2f} "
                  f"{s['seconds'] / d['seconds']:7.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "steps": args.steps, "checkpointing": args.checkpointing,
                                         "weights_gb": floor, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
