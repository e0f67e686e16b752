"""sfumato against diffusers on one checkpoint: load, text encoding, steps, VAE decode, memory, and the image.

Each side runs in its own subprocess (so import cost and peak RSS are its own) on the same weights,
prompt, seed, size and sampler (Euler on the "leading" schedule, cfg 7.5) from the same initial noise,
drawn once here in the parent and handed to both as a tensor file:

- sfumato: ``sfumato.load(PATH)`` then ``Pipeline.generate(..., latents=noise)``;
- diffusers: ``StableDiffusion[XL]Pipeline.from_single_file`` for a file / ``from_pretrained`` for a
  folder, its scheduler replaced by ``EulerDiscreteScheduler`` (leading, steps_offset 1), ``latents=noise``.

Stages, timed with ``time.perf_counter`` (after a device synchronise on CUDA) by forward hooks and the step
callbacks, in one generation call on each side:

    import         importing the library (sfumato imports most of itself lazily, inside load)
    load           checkpoint -> pipeline on the device, ready to generate
    text encoding  call start -> first UNet call (tokenising, text encoders, everything before denoising)
    s/step         median over the steps (first UNet call -> first step callback, then between callbacks)
    VAE decode     post_quant_conv + decoder forward (hooks on the modules, both sides have them)
    end-to-end     the whole generation call: prompt -> PIL image (for a single file, sfumato's includes
                   its one-time SHA-256 of the file, AUTOMATIC1111's "Model hash" in the infotext)
    peak RSS       the process's maximum resident set (ru_maxrss), load included; peak GPU memory on CUDA
    RSS generating the largest resident set seen (sampled every 5 ms) during the generation call

and the largest difference of the two uint8 images (same weights, two implementations: <= 2/255 in fp32).
Ratios are sfumato / diffusers (below 1: sfumato is faster or smaller).

    python bench/checkpoints.py --preset sd1                   # writes ~/.cache/sfumato/bench/sd1-fp32{.safetensors,/}
    python bench/compare.py --model ~/.cache/sfumato/bench/sd1-fp32.safetensors --size 512 --steps 20
    python bench/compare.py --model ~/.cache/sfumato/bench/sd1-fp32 --size 256 --steps 20          # folder
    python bench/compare.py --model sdxl-fp16.safetensors --size 1024 --steps 30 --device cuda --dtype fp16
    python bench/compare.py --model ~/.cache/sfumato/bench/sd1-fp32.safetensors --size 256 --steps 20 \
        --fast deepcache=3 --fast int8=unet,tome=0.5            # + fast paths: ratios and PSNR vs the exact image

diffusers' ``from_single_file`` needs a diffusers config for the architecture: ``--config FOLDER``, by default
the folder beside the file with the same name (what ``bench/checkpoints.py`` writes); without one it fetches
the config from the Hugging Face Hub. Needs diffusers + transformers (the test extra).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photo of a lighthouse on a cliff at dusk, dramatic sky"
NEGATIVE = "blurry, low quality"
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
             "sd2-v": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
ROWS = [("import_s", "import s"), ("load_s", "load s"), ("ready_s", "import + load s"), ("text_s", "text encoding s"),
        ("step_s", "s/step (median)"), ("decode_s", "VAE decode s"), ("e2e_s", "end-to-end s"),
        ("total_s", "import + load + e2e s"), ("peak_rss_gb", "peak RSS GB"),
        ("gen_rss_gb", "peak RSS generating GB"), ("peak_gpu_gb", "peak GPU GB")]


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


class StageTimer:
    """Time stamps from forward hooks (first UNet call, VAE decode) and the step callback."""

    def __init__(self, device: str, unet, vae) -> None:
        self.device = device
        self.reset()
        unet.register_forward_pre_hook(self._unet_called)
        first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder
        first.register_forward_pre_hook(self._decode_started)
        vae.decoder.register_forward_hook(self._decode_done)

    def reset(self) -> None:
        self.first_unet: float | None = None
        self.steps: list[float] = []
        self.decode = 0.0
        self._decode_t0: float | None = None

    def now(self) -> float:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    def step(self) -> None:
        self.steps.append(self.now())

    def _unet_called(self, module, args) -> None:
        if self.first_unet is None:
            self.first_unet = self.now()

    def _decode_started(self, module, args) -> None:
        self._decode_t0 = self.now()

    def _decode_done(self, module, args, output) -> None:
        if self._decode_t0 is not None:
            self.decode += self.now() - self._decode_t0
            self._decode_t0 = None

    def report(self, start: float, end: float) -> dict:
        stamps = [self.first_unet, *self.steps]
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        return {"text_s": self.first_unet - start, "step_s": statistics.median(steps), "steps_s": steps,
                "decode_s": self.decode, "e2e_s": end - start, "n_steps": len(steps)}


def _memory(device: str) -> dict:
    import torch

    gpu = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_gpu_gb": gpu}


def worker_sfumato(args: argparse.Namespace) -> dict:
    import torch

    t0 = time.perf_counter()
    import sfumato

    import_s = time.perf_counter() - t0
    noise = torch.load(args.noise)
    t0 = time.perf_counter()
    kw = json.loads(args.gen_kw or "{}")
    memory = {k.split(".", 1)[1]: kw.pop(k) for k in list(kw) if k.startswith("memory.")}  # memory.offload=true
    pipe = sfumato.load(args.model, device=args.device, dtype=_dtype(args.dtype),
                        memory=sfumato.MemoryOptions(**memory))
    timer = StageTimer(args.device, pipe.unet, pipe.vae)
    load_s = timer.now() - t0

    def generate(steps: int):
        return pipe.generate(PROMPT, NEGATIVE, width=args.size, height=args.size, latents=noise, steps=steps,
                             sampler="euler", schedule="leading", seed=args.seed, cfg_scale=args.cfg,
                             callback=lambda s: timer.step(), **kw)

    return _timed_run(generate, timer, args, import_s=import_s, load_s=load_s)


def load_reference(cls, args: argparse.Namespace, kw: dict):  # noqa: ANN001, ANN201 - a diffusers pipeline class
    """diffusers' pipeline ``cls`` for ``args.model`` (``from_pretrained`` for a folder, ``from_single_file``
    for a file, with ``args.config`` when given), on ``args.device``, its scheduler set to Euler on the
    "leading" schedule (steps_offset 1) as sfumato's side runs: (pipe, stage timer, load seconds)."""
    import diffusers

    t0 = time.perf_counter()
    if args.model.is_dir():
        pipe = cls.from_pretrained(str(args.model), local_files_only=True, **kw)
    elif args.config:
        pipe = cls.from_single_file(str(args.model), config=str(args.config), local_files_only=True, **kw)
    else:
        pipe = cls.from_single_file(str(args.model), **kw)
    pipe = pipe.to(args.device)
    timer = StageTimer(args.device, pipe.unet, pipe.vae)
    load_s = timer.now() - t0
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading",
                                                                  steps_offset=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe, timer, load_s


def worker_diffusers(args: argparse.Namespace) -> dict:
    import torch

    t0 = time.perf_counter()
    import diffusers
    import transformers  # noqa: F401 - its import is part of what a diffusers user pays

    import_s = time.perf_counter() - t0
    noise = torch.load(args.noise)
    cls = getattr(diffusers, PIPELINES[args.family])
    kw: dict = {"torch_dtype": _dtype(args.dtype)}
    if args.family != "sdxl":
        kw.update(safety_checker=None, requires_safety_checker=False)
    pipe, timer, load_s = load_reference(cls, args, kw)

    def on_step(p, i, t, kwargs):
        timer.step()
        return kwargs

    def generate(steps: int):
        with torch.inference_mode():
            return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, height=args.size,
                        width=args.size, guidance_scale=args.cfg, latents=noise.to(args.device, _dtype(args.dtype)),
                        generator=torch.Generator().manual_seed(args.seed), callback_on_step_end=on_step)

    return _timed_run(generate, timer, args, import_s=import_s, load_s=load_s)


def _timed_run(generate, timer, args: argparse.Namespace, *, import_s: float, load_s: float) -> dict:
    """Warm-up runs (untimed), then one timed generation; saves its image, returns every figure."""
    for _ in range(args.warmup):
        generate(2)
    timer.reset()
    with RSSSampler() as rss:
        start = timer.now()
        image = generate(args.steps).images[0]
        end = timer.now()
    image.save(args.image)
    return {"import_s": import_s, "load_s": load_s, **timer.report(start, end), **_memory(args.device),
            "gen_rss_gb": rss.peak / 2**30}


class RSSSampler:
    """The process's largest resident set (``/proc/self/statm``) seen every 5 ms within the block: the
    memory a generation holds, which the whole-process peak (load included) cannot show. 0 off Linux."""

    def __init__(self) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * resource.getpagesize())
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self._sample()

    def __enter__(self) -> RSSSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def max_pixel_diff(a: Path, b: Path) -> int:
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (a, b))
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
    return int(np.abs(x - y).max())


def psnr(a: Path, b: Path) -> float:
    """PSNR in dB of two uint8 images (inf when identical)."""
    import math

    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (a, b))
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def _fast_options(items: list[str]) -> dict:
    out = {}
    for item in (part for arg in items for part in arg.split(",") if part):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--fast {item!r}: expected KEY=VALUE, e.g. deepcache=3")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _image_ok(path: Path) -> bool:
    import numpy as np
    from PIL import Image

    return float(np.asarray(Image.open(path), dtype=np.float32).std()) > 0


def _write_noise(args: argparse.Namespace, spec, path: Path) -> None:
    import torch

    f = spec.vae.downscale
    if args.size % f:
        raise SystemExit(f"--size {args.size} must be a multiple of the VAE's downscale {f}")
    shape = (1, spec.unet.out_channels, args.size // f, args.size // f)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float32)
    # both sides start from the same numbers: round once to the run's dtype (diffusers takes latents as given)
    torch.save(noise.to(_dtype(args.dtype)).float(), path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="single .safetensors file or diffusers folder")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (256 or 512 for the issue's figures)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--config", type=Path, help="diffusers folder for from_single_file's config "
                    "(default: the folder beside --model with its name, if there)")
    ap.add_argument("--warmup", type=int, help="untimed 2-step generations before the timed one "
                    "(default 1 on CUDA, 0 on the CPU)")
    ap.add_argument("--out", type=Path, help="keep both images in this folder")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--fast", nargs="+", action="append", metavar="KEY=VALUE", help="also run sfumato with "
                    "these generation options (a fast path, e.g. deepcache=3; several: int8=unet,deepcache=3) "
                    "and report its ratios and its PSNR / max diff against sfumato's exact image; repeat "
                    "--fast for more fast paths in the same run")
    ap.add_argument("--worker", choices=("sfumato", "diffusers"), help=argparse.SUPPRESS)
    ap.add_argument("--gen-kw", help=argparse.SUPPRESS)
    ap.add_argument("--family", help=argparse.SUPPRESS)
    ap.add_argument("--noise", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.device.startswith("cuda") else 0
    if args.worker:
        fn = worker_sfumato if args.worker == "sfumato" else worker_diffusers
        print("RESULT " + json.dumps(fn(args)), flush=True)
        return 0

    from sfumato.weights.detect import detect_file

    spec = detect_file(args.model)  # headers only
    if spec.family not in PIPELINES:
        raise SystemExit(f"{args.model}: a {spec.family} model; compare.py covers {', '.join(PIPELINES)}")
    config = args.config
    if config is None and args.model.is_file() and (args.model.with_suffix("") / "model_index.json").is_file():
        config = args.model.with_suffix("")
    import torch

    with tempfile.TemporaryDirectory(prefix="sfumato-compare-") as tmp:
        images = Path(args.out or tmp)
        images.mkdir(parents=True, exist_ok=True)
        noise = Path(tmp) / "noise.pt"
        _write_noise(args, spec, noise)
        results = {}
        fasts = [_fast_options(items) for items in args.fast or []]
        for side in ("sfumato", "diffusers", *(f"fast{i}" for i in range(len(fasts)))):
            worker = "sfumato" if side.startswith("fast") else side
            cmd = [sys.executable, __file__, "--worker", worker, "--model", str(args.model), "--family", spec.family,
                   "--noise", str(noise), "--image", str(images / f"{side}.png"), "--size", str(args.size),
                   "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype,
                   "--seed", str(args.seed), "--cfg", str(args.cfg), "--warmup", str(args.warmup)]
            if config is not None:
                cmd += ["--config", str(config)]
            if side.startswith("fast"):
                cmd += ["--gen-kw", json.dumps(fasts[int(side[4:])])]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if out.returncode or line is None:
                print(f"{side} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}", file=sys.stderr)
                return 1
            r = json.loads(line[len("RESULT "):])
            r["ready_s"] = r["import_s"] + r["load_s"]
            r["total_s"] = r["ready_s"] + r["e2e_s"]
            r["image_ok"] = _image_ok(images / f"{side}.png")
            results[side] = r
        diff = max_pixel_diff(images / "sfumato.png", images / "diffusers.png")
        for i, options in enumerate(fasts):
            fr = results[f"fast{i}"]
            fr["options"] = options
            fr["psnr_db"] = psnr(images / f"fast{i}.png", images / "sfumato.png")
            fr["max_diff"] = max_pixel_diff(images / f"fast{i}.png", images / "sfumato.png")

    s, d = results["sfumato"], results["diffusers"]
    layout = "diffusers folder" if args.model.is_dir() else "single file"
    print(f"{spec.family} ({args.model.name}, {layout}), {args.size}x{args.size}, {args.steps} Euler steps, "
          f"cfg {args.cfg}, {args.dtype} on {args.device}, {torch.get_num_threads()} torch thread(s), "
          f"warm-up runs {args.warmup}")
    print(f"{'':22} {'sfumato':>10} {'diffusers':>10} {'sfumato/diffusers':>18}")
    ratios = {}
    for key, label in ROWS:
        if s.get(key) is None or d.get(key) is None:
            continue
        ratios[key] = s[key] / d[key] if d[key] else float("nan")
        print(f"{label:22} {s[key]:10.3f} {d[key]:10.3f} {ratios[key]:18.3f}")
    print(f"max pixel diff: {diff}/255 (uint8, {args.size}x{args.size}x3)"
          f"{'' if s['image_ok'] and d['image_ok'] else '; an image is flat (BAD)'}")
    for i, options in enumerate(fasts):
        fr = results[f"fast{i}"]
        print(f"fast path {options}:")
        print(f"{'':22} {'fast':>10} {'diffusers':>10} {'fast/diffusers':>18} {'fast/sfumato':>14}")
        for key, label in ROWS:
            if fr.get(key) is None or d.get(key) is None or not d[key] or not s.get(key):
                continue
            print(f"{label:22} {fr[key]:10.3f} {d[key]:10.3f} {fr[key] / d[key]:18.3f} {fr[key] / s[key]:14.3f}")
        print(f"image against sfumato's exact one: PSNR {fr['psnr_db']:.1f} dB, max diff {fr['max_diff']}/255")
    if args.json:
        args.json.write_text(json.dumps({"family": spec.family, "model": str(args.model), "size": args.size,
                                         "steps": args.steps, "device": args.device, "dtype": args.dtype,
                                         "sfumato": s, "diffusers": d, "ratio": ratios, "max_pixel_diff": diff,
                                         "fast": [results[f"fast{i}"] for i in range(len(fasts))]},
                                        indent=2) + "\n")
    return 0 if s["image_ok"] and d["image_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
