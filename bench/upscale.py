"""The SD 2 x4 upscaler: sfumato against diffusers' StableDiffusionUpscalePipeline on one checkpoint.

A fixed synthetic low-res image of ``--size`` pixels (gradients, discs and stripes, the same numbers on
every run) is upscaled 4x by both sides, each in its own subprocess (so import cost and peak RSS are its
own), with the same prompt, negative prompt, seed, noise level, steps and cfg on the parity recipe of
tests/test_zoo.py (Euler on the "leading" schedule, steps_offset 1; same generator seed -> same image):

- sfumato: ``sfumato.load(PATH)`` then ``Pipeline.upscale(image, ..., sampler="euler", schedule="leading")``;
- diffusers: ``StableDiffusionUpscalePipeline.from_pretrained`` for a folder / ``from_single_file`` (config:
  the folder beside the file) for a file, its scheduler replaced by ``EulerDiscreteScheduler`` (leading,
  steps_offset 1).

Stages, as ``bench/compare.py`` times them (forward hooks on the UNet and the VAE decoder, step callbacks):
load s, before denoising s (call start -> first UNet call: text encoder, the low-res image's noise), s/step
(median), VAE decode s, end-to-end s (image in -> PIL image out), peak RSS (ru_maxrss, load included).
Ratios are sfumato / diffusers (below 1: sfumato is faster or smaller); then the largest difference of the
two uint8 images (untiled: <= 1/255 expected, as tests/test_zoo.py; with ``--tile`` sfumato runs tiled and
the difference is the tiling's, not a parity figure).

``--sfumato-only``: sfumato alone, tiled (default: its own choice, 128 px windows above 256 px inputs; or
``--tile``), e.g. 512 -> 2048 px at 1 step cfg 1: seconds and peak RSS. diffusers is not run there: its
upscaler has no tiled UNet (the whole 512x512 latent, 256 channels at the first level, in every call) and
its VAE decodes the 2048 px image in one piece unless ``enable_vae_tiling()`` is called (bench/memory.py
measured a whole 2048 px decode of the smaller-latent SD 1.5 VAE at about 10 GB and 20 minutes here).

    python bench/checkpoints.py --preset sd2-upscaler       # ~/.cache/sfumato/bench/sd2-upscaler-fp32{.safetensors,/}
    B=~/.cache/sfumato/bench
    python bench/upscale.py --model $B/sd2-upscaler-fp32 --size 64 --steps 3             # folder vs from_pretrained
    python bench/upscale.py --model $B/sd2-upscaler-fp32.safetensors --size 64 --steps 3 # file vs from_single_file
    python bench/upscale.py --model $B/sd2-upscaler-fp32 --sfumato-only --size 512 --steps 1 --cfg 1

Upscaler folders sfumato wrote before it saved ``low_res_scheduler`` (and ``max_noise_level``) in
model_index.json are refused by ``from_pretrained``; for those the diffusers side passes the upscaler's own
augmentation scheduler (DDPM, scaled_linear 1e-4..0.02, 1000 steps, what the released folder holds)
itself and says so. Needs diffusers + transformers (the test extra).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import StageTimer, _dtype, _image_ok, _memory, load_reference, max_pixel_diff  # noqa: E402

PROMPT = "a sharp photo of a lighthouse on a cliff, fine detail"
NEGATIVE = "blurry, low quality"
ROWS = [("import_s", "import s"), ("load_s", "load s"), ("text_s", "before denoising s"),
        ("step_s", "s/step (median)"), ("decode_s", "VAE decode s"), ("e2e_s", "end-to-end s"),
        ("total_s", "import + load + e2e s"), ("peak_rss_gb", "peak RSS GB")]
# the released upscaler's low_res_scheduler (its augmentation noise): what a folder without one gets
LOW_RES_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", num_train_timesteps=1000)


def synthetic_image(size: int):
    """The fixed low-res input: colour gradients, three discs and fine stripes (detail for the upscaler)."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    img = np.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy, 0.8 - 0.5 * xx * yy], -1)
    for cx, cy, r, colour in ((0.3, 0.35, 0.18, (0.9, 0.2, 0.1)), (0.7, 0.6, 0.22, (0.1, 0.3, 0.8)),
                              (0.45, 0.8, 0.1, (0.95, 0.9, 0.2))):
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = colour
    stripes = (np.floor(xx * size / 2) % 2 == 0) & (yy > 0.85)
    img[stripes] *= 0.4
    return Image.fromarray((img.clip(0, 1) * 255).round().astype(np.uint8))


def _run_timed(call, timer: StageTimer, image_path: str) -> dict:
    timer.reset()
    start = timer.now()
    image = call().images[0]
    end = timer.now()
    image.save(image_path)
    return {**timer.report(start, end), "out_size": list(image.size)}


def worker_sfumato(args: argparse.Namespace) -> dict:
    import torch
    from PIL import Image

    t0 = time.perf_counter()
    import sfumato

    import_s = time.perf_counter() - t0
    low = Image.open(args.input).convert("RGB")
    t0 = time.perf_counter()
    pipe = sfumato.load(args.model, device=args.device, dtype=_dtype(args.dtype))
    timer = StageTimer(args.device, pipe.unet, pipe.vae)
    load_s = timer.now() - t0
    unet_calls = [0]
    pipe.unet.register_forward_pre_hook(lambda m, a: unet_calls.__setitem__(0, unet_calls[0] + 1))
    with torch.inference_mode():
        r = _run_timed(lambda: pipe.upscale(low, PROMPT, NEGATIVE, noise_level=args.noise_level, steps=args.steps,
                                            cfg_scale=args.cfg, tile_size=args.tile, tile_overlap=args.tile_overlap,
                                            sampler="euler", schedule="leading", seed=args.seed,
                                            callback=lambda s: timer.step()),
                       timer, args.image)
    return {"import_s": import_s, "load_s": load_s, **r, "unet_calls": unet_calls[0], **_memory(args.device)}


def worker_diffusers(args: argparse.Namespace) -> dict:
    import torch
    from PIL import Image

    t0 = time.perf_counter()
    import diffusers
    import transformers  # noqa: F401 - its import is part of what a diffusers user pays

    import_s = time.perf_counter() - t0
    low = Image.open(args.input).convert("RGB")
    cls = diffusers.StableDiffusionUpscalePipeline
    folder = args.model if args.model.is_dir() else args.config
    kw: dict = {"torch_dtype": _dtype(args.dtype)}
    patched = folder is not None and "low_res_scheduler" not in json.loads((folder / "model_index.json").read_text())
    if patched:  # what sfumato's writer leaves out (see the module docstring)
        kw["low_res_scheduler"] = diffusers.DDPMScheduler(**LOW_RES_SCHEDULER)
    pipe, timer, load_s = load_reference(cls, args, kw)
    with torch.inference_mode():
        r = _run_timed(lambda: pipe(PROMPT, image=low, negative_prompt=NEGATIVE, noise_level=args.noise_level,
                                    num_inference_steps=args.steps, guidance_scale=args.cfg,
                                    generator=torch.Generator().manual_seed(args.seed),
                                    callback=lambda i, t, latents: timer.step(), callback_steps=1),
                       timer, args.image)
    return {"import_s": import_s, "load_s": load_s, **r, "low_res_scheduler_passed": patched,
            **_memory(args.device)}


def _worker(side: str, args: argparse.Namespace, input_png: Path, image: Path, config: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--model", str(args.model), "--input", str(input_png),
           "--image", str(image), "--size", str(args.size), "--steps", str(args.steps), "--device", args.device,
           "--dtype", args.dtype, "--seed", str(args.seed), "--cfg", str(args.cfg),
           "--noise-level", str(args.noise_level), "--tile-overlap", str(args.tile_overlap)]
    if args.tile is not None and side == "sfumato":
        cmd += ["--tile", str(args.tile)]
    if config is not None:
        cmd += ["--config", str(config)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"{side} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    r = json.loads(line[len("RESULT "):])
    r["ready_s"] = r["import_s"] + r["load_s"]
    r["total_s"] = r["ready_s"] + r["e2e_s"]
    r["image_ok"] = _image_ok(image)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True,
                    help="x4 upscaler: single .safetensors file or diffusers folder")
    ap.add_argument("--size", type=int, default=64, help="low-res input side in pixels (output 4x; default 64)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cfg", type=float, default=9.0)
    ap.add_argument("--noise-level", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tile", type=int, help="sfumato's tile_size in input pixels (default: its own choice)")
    ap.add_argument("--tile-overlap", type=int, default=32)
    ap.add_argument("--sfumato-only", action="store_true", help="run sfumato alone (a size diffusers cannot "
                    "run here, e.g. --size 512 tiled)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    ap.add_argument("--config", type=Path, help="diffusers folder for from_single_file's config "
                    "(default: the folder beside --model with its name, if there)")
    ap.add_argument("--out", type=Path, help="keep the input and both images in this folder")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", choices=("sfumato", "diffusers"), help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        fn = worker_sfumato if args.worker == "sfumato" else worker_diffusers
        print("RESULT " + json.dumps(fn(args)), flush=True)
        return 0

    from sfumato.weights.detect import detect_file

    spec = detect_file(args.model)  # headers only
    if spec.concat != "low_res":
        raise SystemExit(f"{args.model}: a {spec.family} model; upscale.py needs the x4 upscaler (sd2-upscaler)")
    config = args.config
    if config is None and args.model.is_file() and (args.model.with_suffix("") / "model_index.json").is_file():
        config = args.model.with_suffix("")
    import torch

    sides = ("sfumato",) if args.sfumato_only else ("sfumato", "diffusers")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="sfumato-upscale-") as tmp:
        folder = Path(args.out or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        input_png = folder / f"input-{args.size}.png"
        synthetic_image(args.size).save(input_png)
        for side in sides:
            try:
                results[side] = _worker(side, args, input_png, folder / f"{side}.png", config)
            except RuntimeError as e:
                print(e, file=sys.stderr)
                return 1
        diff = None if args.sfumato_only else max_pixel_diff(folder / "sfumato.png", folder / "diffusers.png")

    s = results["sfumato"]
    out = 4 * args.size
    layout = "diffusers folder" if args.model.is_dir() else "single file"
    tiling = f"sfumato tile {args.tile} px" if args.tile is not None else "sfumato's default tiling"
    print(f"{spec.family} ({args.model.name}, {layout}), {args.size} -> {out} px, {args.steps} Euler steps, "
          f"cfg {args.cfg}, noise level {args.noise_level}, {args.dtype} on {args.device}, "
          f"{torch.get_num_threads()} torch thread(s), {tiling} (overlap {args.tile_overlap})")
    ratios: dict[str, float] = {}
    if args.sfumato_only:
        print(f"{'':22} {'sfumato':>10}")
        for key, label in ROWS:
            if s.get(key) is not None:
                print(f"{label:22} {s[key]:10.3f}")
        print(f"UNet calls: {s['unet_calls']} ({s['unet_calls'] // max(s['n_steps'], 1)} per step: one per window)")
        print(f"diffusers: not run (StableDiffusionUpscalePipeline has no UNet tiling: every call takes the whole "
              f"{args.size}x{args.size} latent, and by default its VAE decodes {out} px in one piece)")
    else:
        d = results["diffusers"]
        print(f"{'':22} {'sfumato':>10} {'diffusers':>10} {'sfumato/diffusers':>18}")
        for key, label in ROWS:
            if s.get(key) is None or d.get(key) is None:
                continue
            ratios[key] = s[key] / d[key] if d[key] else float("nan")
            print(f"{label:22} {s[key]:10.3f} {d[key]:10.3f} {ratios[key]:18.3f}")
        what = "tiled vs untiled, not a parity figure" if args.tile is not None else "untiled"
        print(f"max pixel diff: {diff}/255 (uint8, {out}x{out}x3, {what})"
              f"{'' if s['image_ok'] and d['image_ok'] else '; an image is flat (BAD)'}")
        if d.get("low_res_scheduler_passed"):
            print("note: the folder has no low_res_scheduler in model_index.json (StableDiffusionUpscalePipeline "
                  "refuses it); the diffusers side passed DDPMScheduler(scaled_linear, 1e-4..0.02) itself")
    if args.json:
        args.json.write_text(json.dumps({"family": spec.family, "model": str(args.model), "size": args.size,
                                         "out_size": out, "steps": args.steps, "cfg": args.cfg,
                                         "noise_level": args.noise_level, "tile": args.tile,
                                         "sfumato_only": args.sfumato_only, "device": args.device,
                                         "dtype": args.dtype, **results, "ratio": ratios,
                                         "max_pixel_diff": diff}, indent=2) + "\n")
    ok = all(r["image_ok"] and r["out_size"] == [out, out] for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
