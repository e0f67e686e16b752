"""The ``sfumato`` command: thin argument parsing over the library (``sfumato.load`` and the Pipeline).

    sfumato generate "a lighthouse at dusk" --model v1-5.safetensors --steps 25 --seed 1
    sfumato img2img photo.png "oil painting" --strength 0.6 --model m.safetensors
    sfumato inpaint photo.png --mask mask.png "a red door" --model m.safetensors
    sfumato info outputs/00001-1.png
    sfumato models v1-5.safetensors
    sfumato convert model.ckpt model.safetensors --half
    sfumato train builtin --out run --minutes 35
    sfumato serve --model v1-5.safetensors --data-dir ./sfumato-data

Images are written atomically with their AUTOMATIC1111 ``parameters`` text, as ``00001-<seed>.png`` in
``--outdir`` (default ``./outputs``) or to ``-o FILE`` (never over an existing file without
``--overwrite``); their paths are printed on stdout. Progress goes to stderr. Any
:class:`~sfumato.errors.SfumatoError` ends the command with one line ``sfumato: error: ...`` and exit
status 2; ``info`` on an image without parameters exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from sfumato.errors import CheckpointError, SfumatoError
from sfumato.hashes import legacy_model_hash, sha256_file  # public names of this module too
from sfumato.params import INT8_MODES

__all__ = ["main", "build_parser", "Progress", "describe_checkpoint", "legacy_model_hash", "sha256_file"]

EXIT_ERROR = 2
EXIT_NO_PARAMETERS = 1


# --- progress ----------------------------------------------------------------------------------------

def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


def _rate(per_step: float) -> str:
    if per_step <= 0:
        return "?it/s"
    return f"{1 / per_step:.2f}it/s" if per_step <= 1 else f"{per_step:.2f}s/it"


class Progress:
    """A sampler callback that reports steps, speed and time left on ``stream``.

    On a terminal: one bar redrawn in place (``45%|#####     | 9/20 [00:03<00:04, 2.51it/s]``).
    Elsewhere (a log file, CI): a plain line at most every ``interval`` seconds and one when a run
    ends, so logs show life without a line per step. A new run (the step index going back to 0, as
    a second pass does) starts a new bar.
    """

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True, tty: bool | None = None,
                 interval: float = 5.0, width: int = 24, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval, self.width, self.clock = interval, width, clock
        self._start = self._last_time = self._first = clock()
        self._last_step = -1
        self._last_print = -float("inf")
        self._mid_line = False  # a terminal bar is drawn and not yet ended by a newline

    def __call__(self, info: Any) -> None:  # a sfumato.sampling.StepInfo
        if not self.enabled:
            return
        now = self.clock()
        if info.i <= self._last_step:  # a new run: it started when the previous one reported last
            self._start = self._last_time
        if info.i == 0 or info.i <= self._last_step:
            self._first = now
        self._last_step, self._last_time = info.i, now
        done, total = info.i + 1, max(info.total, 1)
        elapsed = now - self._start
        # The speed is measured from the first step's report on once there are two: the time before it
        # also holds text encoding (and for img2img, VAE encoding), which is not per-step work.
        per_step = (now - self._first) / info.i if info.i > 0 else elapsed / done
        left = per_step * (total - done)
        if self.tty:
            fill = self.width * done // total
            bar = "#" * fill + " " * (self.width - fill)
            self.stream.write(f"\r{100 * done // total:3d}%|{bar}| {done}/{total} "
                              f"[{_clock(elapsed)}<{_clock(left)}, {_rate(per_step)}]")
            self._mid_line = done < total
            if not self._mid_line:
                self.stream.write("\n")
        elif done >= total:
            self.stream.write(f"{done}/{total} steps in {elapsed:.1f}s ({_rate(per_step)})\n")
        elif now - self._last_print >= self.interval:
            self.stream.write(f"step {done}/{total} ({100 * done // total}%), {_rate(per_step)}, "
                              f"ETA {_clock(left)}\n")
            self._last_print = now
        else:
            return
        self.stream.flush()

    def close(self) -> None:
        """End an unfinished bar (an error or interrupt mid-run) so what follows starts a new line."""
        if self._mid_line:
            self.stream.write("\n")
            self.stream.flush()
            self._mid_line = False


# --- checkpoints: hashes and a description without building the networks -----------------------------

def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def describe_checkpoint(path: str | os.PathLike, *, hashes: bool = True) -> dict[str, Any]:
    """What a checkpoint is: family, prediction type (and where that came from), parameter count and
    storage dtypes per component, hashes. A single file is read from its index alone (no weights, no
    networks); a diffusers folder is loaded, since its family is detected on the renamed layout."""
    from sfumato.weights import detect, io
    from sfumato.weights.load import IGNORED, UNET_PREFIX, VAE_PREFIX

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        return _describe_folder(path)
    ignored = [re.compile(p) for p, _ in IGNORED]
    with io.open_checkpoint(path) as ckpt:
        routes = io.select_ema(ckpt.keys())
        shapes = {k: ckpt.shape(src) for k, src in routes.items()}
        try:
            spec = detect.detect_spec(shapes)
        except CheckpointError as e:
            raise type(e)(f"{path}: {e}") from None
        prediction, why = detect.resolve_prediction(path, spec.family, prediction=None, metadata=ckpt.metadata)
        spec = detect.with_prediction(spec, prediction)
        prefixes = [("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX)]
        prefixes += [(f"text encoder {i}", te.ckpt_prefix) for i, te in enumerate(spec.text_encoders)]
        components: dict[str, dict[str, Any]] = {}
        for name, prefix in prefixes:
            keys = [k for k in routes if k.startswith(prefix) and not any(r.search(k) for r in ignored)]
            components[name] = {
                "parameters": sum(_numel(shapes[k]) for k in keys),
                "dtypes": sorted({_dtype_name(ckpt.dtype(routes[k])) for k in keys}),
            }
        ema = any(k.startswith("model_ema.") for k in ckpt.keys())
        all_dtypes = sorted({_dtype_name(ckpt.dtype(k)) for k in ckpt.keys()})
    out: dict[str, Any] = {
        "path": str(path), "bytes": path.stat().st_size, "family": spec.family, "prediction": prediction,
        "prediction_source": why, "dtypes": all_dtypes, "components": components, "ema_weights": ema,
    }
    if hashes:
        digest = sha256_file(path)
        out.update(sha256=digest, model_hash=digest[:10], legacy_hash=legacy_model_hash(path))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _describe_folder(path: Path) -> dict[str, Any]:
    import sfumato
    from sfumato.weights import detect, io

    pipe = sfumato.load(path, dtype="fp16")
    _, why = detect.resolve_prediction(path, pipe.spec.family, prediction=None, metadata={})
    components: dict[str, dict[str, Any]] = {}
    names = [("UNet", "unet", pipe.unet), ("VAE", "vae", pipe.vae)]
    names += [(f"text encoder {i}", "text_encoder" + ("" if i == 0 else f"_{i + 1}"), m)
              for i, m in enumerate(pipe.text_encoders)]
    if len(pipe.text_encoders) == 1 and not (path / "text_encoder").is_dir():
        names[-1] = ("text encoder 0", "text_encoder_2", pipe.text_encoders[0])  # SDXL refiner
    all_dtypes: set[str] = set()
    for label, sub, module in names:
        dtypes: set[str] = set()
        for f in sorted((path / sub).glob("*.safetensors")) + sorted((path / sub).glob("*.bin")):
            with io.open_checkpoint(f) as ckpt:
                dtypes |= {_dtype_name(ckpt.dtype(k)) for k in ckpt.keys()}
        all_dtypes |= dtypes
        components[label] = {"parameters": sum(p.numel() for p in module.parameters()), "dtypes": sorted(dtypes)}
    return {"path": str(path), "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
            "family": pipe.spec.family, "prediction": pipe.spec.prediction, "prediction_source": why,
            "dtypes": sorted(all_dtypes), "components": components, "ema_weights": False}


def _print_description(d: dict[str, Any], out: TextIO) -> None:
    rows = [("path", d["path"]), ("size", f"{d['bytes'] / 1e9:.2f} GB ({d['bytes']:,} bytes)"),
            ("family", d["family"]), ("prediction", f"{d['prediction']} (from {d['prediction_source']})"),
            ("dtypes", ", ".join(d["dtypes"]) or "-")]
    if d.get("ema_weights"):
        rows.append(("EMA", "the file holds EMA weights (loaded by default)"))
    for key, value in rows:
        out.write(f"{key + ':':<13}{value}\n")
    out.write("components:\n")
    total = 0
    for name, c in d["components"].items():
        total += c["parameters"]
        out.write(f"  {name:<16}{c['parameters']:>15,} parameters  {', '.join(c['dtypes'])}\n")
    out.write(f"  {'total':<16}{total:>15,} parameters\n")
    if "sha256" in d:
        out.write(f"{'sha256:':<13}{d['sha256']}\n")
        out.write(f"{'model hash:':<13}{d['model_hash']}  (AUTOMATIC1111 \"Model hash\": SHA-256, 10 hex digits)\n")
        out.write(f"{'legacy hash:':<13}{d['legacy_hash']}  (AUTOMATIC1111's old hash of 64 KiB at 1 MiB)\n")


# --- argument parsing ------------------------------------------------------------------------------

def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", metavar="PATH", help="checkpoint file (.safetensors/.ckpt) or diffusers "
                   "folder; default: the built-in model")
    p.add_argument("--vae", metavar="PATH", help="replace the checkpoint's VAE with this file or folder")
    p.add_argument("--prediction", choices=("eps", "v"), help="prediction type, for SD 2.x files that "
                   "cannot tell (default: detected)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps... (default: auto)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="weights dtype (default: fp32 on CPU, "
                   "fp16 on GPUs)")


def _offload_flag(p, help: str) -> None:  # noqa: ANN001, A002 - a parser or argument group; argparse's name
    """``--offload [model|sequential]`` (``MemoryOptions.offload``; given alone: "model")."""
    p.add_argument("--offload", nargs="?", const="model", default="none", choices=("model", "sequential"), help=help)


def _generation_options(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    mem = p.add_argument_group("memory (each off by default: slower or approximate, for big images and small machines)")
    mem.add_argument("--vae-tiling", action="store_true", help="encode/decode big images in blended tiles "
                     "(bounded memory; about 35 dB from the whole decode)")
    mem.add_argument("--vae-tile", type=int, metavar="PX", help="VAE tile size in pixels, a multiple of 64 "
                     "(default: the model's native size)")
    mem.add_argument("--vae-slicing", action="store_true", help="one image of a batch at a time through the VAE")
    mem.add_argument("--attention-slice", type=int, metavar="N", help="at most N query tokens per attention call")
    _offload_flag(mem, "idle weights leave RAM (CPU, exact): 'model' (the default when given alone) keeps only "
                  "the running component's mapped weights (peak = the largest component), 'sequential' only "
                  "the running layer group's (peak = little more than the activations; slower)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", metavar="FILE", help="write to FILE (.png, .jpg or .webp); with "
                     "--batch N, FILE-1.png ... FILE-N.png")
    out.add_argument("--outdir", metavar="DIR", default="outputs", help="write numbered files "
                     "00001-<seed>.png here (default: ./outputs)")
    p.add_argument("--negative", "-n", metavar="TEXT", default="", help="negative prompt")
    p.add_argument("--steps", type=int, help="sampling steps (default: 20)")
    p.add_argument("--cfg", type=float, dest="cfg_scale", help="classifier-free guidance scale (default: 7)")
    p.add_argument("--sampler", help="sampler: our name or AUTOMATIC1111's label (default: euler)")
    p.add_argument("--schedule", help="sigma schedule, e.g. karras (default: the sampler's)")
    p.add_argument("--seed", type=int, help="seed; -1 or none: random (printed and stored in the image)")
    p.add_argument("--width", "-W", type=int, help="width in pixels (default: the model's size)")
    p.add_argument("--height", "-H", type=int, help="height in pixels (default: the model's size)")
    p.add_argument("--batch", type=int, dest="batch_size", help="images per run (default: 1)")
    p.add_argument("--clip-skip", type=int, help="AUTOMATIC1111's clip skip: 2 uses the next-to-last "
                   "text-encoder layer (default: 1)")
    p.add_argument("--subseed", type=int, help="variation seed")
    p.add_argument("--subseed-strength", type=float, help="how much of the variation seed's noise, 0..1")
    p.add_argument("--eta", type=float, help="noise of ancestral / DDIM samplers (default: the sampler's)")
    addons = p.add_argument_group("add-ons")
    addons.add_argument("--lora", action="append", default=[], metavar="PATH[:W[:TE_W]]",
                        help="apply a LoRA file with weight W (default 1; TE_W: a separate text-encoder weight); "
                        "repeatable")
    addons.add_argument("--lora-dir", metavar="DIR", help="folder where <lora:name:w> prompt tags are looked up")
    addons.add_argument("--embedding", action="append", default=[], metavar="PATH",
                        help="textual-inversion embedding, used in prompts by its file name; repeatable")
    addons.add_argument("--embeddings-dir", metavar="DIR", help="load every embedding in DIR that fits the model")
    addons.add_argument("--controlnet", action="append", default=[], nargs=2, metavar=("MODEL", "IMAGE"),
                        help="a ControlNet (file or diffusers folder) and its control image; repeatable")
    addons.add_argument("--control-weight", action="append", type=float, metavar="W",
                        help="weight of each --controlnet in order (default 1)")
    addons.add_argument("--control-range", action="append", metavar="START:END",
                        help="fraction of the steps each --controlnet acts on (default 0:1)")
    addons.add_argument("--control-canny", action="store_true",
                        help="turn each control image into Canny edges first (for canny ControlNets)")
    addons.add_argument("--control-mode", action="append", choices=("balanced", "prompt", "control"),
                        help="control mode of each --controlnet in order, as the webui extension's "
                        "(balanced, prompt: 'my prompt is more important', control: 'ControlNet is more important')")
    addons.add_argument("--control-resize", choices=("stretch", "crop", "fill"), default="stretch",
                        help="fit control images to the output size: stretch, crop (cover) or fill (fit, pad); "
                        "default stretch")
    addons.add_argument("--guess-mode", action="store_true", help="ControlNet guess mode")
    fast = p.add_argument_group("fast paths (off by default; not the exact image)")
    fast.add_argument("--deepcache", type=int, metavar="N", help="DeepCache: the whole UNet every N-th step, its "
                      "shallow blocks only in between (default: 1, off)")
    fast.add_argument("--deepcache-depth", type=int, metavar="D", help="input blocks 1..D run on cached steps "
                      "(default: 1)")
    fast.add_argument("--int8", choices=INT8_MODES, help="int8 linears and convs on the CPU's integer units: "
                      "the UNet, or the UNet and the VAE decode (CPU float32 only; default: none)")
    fast.add_argument("--tome", type=float, metavar="RATIO", help="token merging: this fraction of the "
                      "highest-resolution self-attention tokens merged (0-0.75; default: 0, off)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o FILE")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress or status on stderr")
    xl = p.add_argument_group("SDXL")
    xl.add_argument("--prompt-2", metavar="TEXT", help="prompt of the second text encoder (default: the prompt)")
    xl.add_argument("--negative-2", metavar="TEXT", dest="negative_prompt_2",
                    help="negative prompt of the second text encoder (default: the negative prompt)")
    xl.add_argument("--refiner", metavar="PATH", help="SDXL refiner checkpoint: takes over at --switch-at")
    xl.add_argument("--switch-at", type=float, metavar="F", help="fraction of the noise schedule the base runs "
                    "before the refiner takes over (default: 0.8)")
    for flag, what in (("original-size", "original size"), ("target-size", "target size")):
        xl.add_argument(f"--{flag}", metavar="WxH", help=f"micro-conditioning {what} (default: the output size)")
        xl.add_argument(f"--negative-{flag}", metavar="WxH", help=f"{what} of the negative half (default: "
                        f"--{flag})")
    xl.add_argument("--crop", metavar="X,Y", help="micro-conditioning crop top-left, left,top (default: 0,0)")
    xl.add_argument("--negative-crop", metavar="X,Y", help="crop of the negative half (default: 0,0 on a refiner or "
                    "when both negative sizes are given, else --crop)")
    xl.add_argument("--aesthetic-score", type=float, help="refiner aesthetic score (default: 6)")
    xl.add_argument("--negative-aesthetic-score", type=float, help="refiner negative aesthetic score (default: 2.5)")


def build_parser() -> argparse.ArgumentParser:
    from sfumato import __version__

    parser = argparse.ArgumentParser(prog="sfumato", description="Stable Diffusion from scratch in PyTorch.")
    parser.add_argument("--version", action="version", version=f"sfumato {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt", nargs="?", default="")
    _generation_options(g)

    i = sub.add_parser("img2img", help="image to image")
    i.add_argument("image", metavar="IMAGE")
    i.add_argument("prompt", nargs="?", default="")
    i.add_argument("--strength", type=float, help="denoising strength, 0..1 (default: 0.75)")
    _generation_options(i)

    ip = sub.add_parser("inpaint", help="repaint the white part of a mask")
    ip.add_argument("image", metavar="IMAGE")
    ip.add_argument("prompt", nargs="?", default="")
    ip.add_argument("--mask", required=True, metavar="MASK", help="white = repaint; a mask with transparency "
                    "is read from its alpha channel")
    ip.add_argument("--strength", type=float, help="denoising strength, 0..1 (default: 1)")
    ip.add_argument("--mask-blur", type=int, help="mask feathering in pixels (default: 4)")
    ip.add_argument("--fill", choices=("original", "latent_noise", "latent_nothing", "fill"),
                    help="what the masked area starts from (default: original)")
    ip.add_argument("--full-res", action="store_true", help="inpaint the masked region at full resolution")
    ip.add_argument("--padding", type=int, help="pixels around the mask with --full-res (default: 32)")
    _generation_options(ip)

    op = sub.add_parser("outpaint", help="extend the canvas and paint the new border")
    op.add_argument("image", metavar="IMAGE")
    op.add_argument("prompt", nargs="?", default="")
    for side in ("left", "right", "up", "down"):
        op.add_argument(f"--{side}", type=int, default=0, metavar="PX", help=f"pixels to add: {side}")
    op.add_argument("--strength", type=float, help="denoising strength, 0..1 (default: 1)")
    _generation_options(op)

    ed = sub.add_parser("edit", help="edit an image by an instruction (instruct-pix2pix models)")
    ed.add_argument("image", metavar="IMAGE")
    ed.add_argument("prompt", nargs="?", default="", metavar="INSTRUCTION")
    ed.add_argument("--image-cfg", type=float, default=1.5, help="image guidance scale (default: 1.5)")
    _generation_options(ed)

    dp = sub.add_parser("depth2img", help="image to image kept to a depth map (SD 2 depth models)")
    dp.add_argument("image", metavar="IMAGE")
    dp.add_argument("prompt", nargs="?", default="")
    dp.add_argument("--depth", metavar="DEPTH", help="depth map (greyscale image, larger = nearer); default: "
                    "estimated from IMAGE by the model's MiDaS network")
    dp.add_argument("--strength", type=float, help="denoising strength, 0..1 (default: 0.8)")
    _generation_options(dp)

    up = sub.add_parser("upscale", help="4x larger with the SD 2 x4 upscaler")
    up.add_argument("image", metavar="IMAGE")
    up.add_argument("prompt", nargs="?", default="")
    up.add_argument("--noise-level", type=int, default=20, help="noise added to the input, 0..350 (default: 20)")
    up.add_argument("--tile", type=int, metavar="PX", help="denoise in tiles of PX input pixels (default: "
                    "untiled up to 256 px inputs, 128 px tiles above)")
    up.add_argument("--tile-overlap", type=int, default=32, metavar="PX", help="pixels tiles share (default: 32)")
    _generation_options(up)

    va = sub.add_parser("variations", help="variations of an image (SD 2.1 unCLIP models)")
    va.add_argument("image", metavar="IMAGE")
    va.add_argument("prompt", nargs="?", default="")
    va.add_argument("--noise-level", type=int, default=0, help="noise added to the image embedding, 0..999; "
                    "more = looser variations (default: 0)")
    _generation_options(va)

    inf = sub.add_parser("info", help="print the generation parameters stored in an image")
    inf.add_argument("image", metavar="IMAGE")
    inf.add_argument("--json", action="store_true", help="print the parsed fields as JSON")

    m = sub.add_parser("models", help="describe a checkpoint: family, prediction, sizes, hashes")
    m.add_argument("path", metavar="PATH")
    m.add_argument("--json", action="store_true", help="print as JSON")
    m.add_argument("--no-hash", action="store_true", help="skip hashing the file (fast for big files)")

    c = sub.add_parser("convert", help="convert a checkpoint to .safetensors or a diffusers folder")
    c.add_argument("input", metavar="IN")
    c.add_argument("output", metavar="OUT")
    c.add_argument("--format", choices=("single_file", "diffusers"),
                   help="default: single_file for OUT ending in .safetensors, else diffusers")
    c.add_argument("--half", action="store_true", help="store fp16")
    c.add_argument("--keep-ema", action="store_true", help="keep both UNet copies of a training checkpoint "
                   "(default: only the EMA weights)")
    c.add_argument("--prediction", choices=("eps", "v"), help="prediction type, for SD 2.x files that cannot tell")
    c.add_argument("--overwrite", action="store_true", help="replace an existing OUT")

    sv = sub.add_parser("serve", help="HTTP server: AUTOMATIC1111's API, a job API and a job history")
    sv.add_argument("--model", "-m", metavar="PATH", help="default checkpoint (default: the built-in model)")
    sv.add_argument("--models-dir", metavar="DIR", help="offer every checkpoint in DIR as well")
    sv.add_argument("--lora-dir", metavar="DIR", help="LoRA files for <lora:name:w> prompt tags")
    sv.add_argument("--embeddings-dir", metavar="DIR", help="textual-inversion embeddings, loaded into every "
                    "model they fit and used in prompts by file name")
    sv.add_argument("--controlnet-dir", metavar="DIR", help="ControlNets (files or diffusers folders) for "
                    "AUTOMATIC1111's alwayson_scripts.controlnet")
    sv.add_argument("--data-dir", metavar="DIR", default="sfumato-data", help="job database and output images "
                    "(default: ./sfumato-data)")
    sv.add_argument("--db", metavar="FILE", help="SQLite job database (default: DATA_DIR/jobs.sqlite3)")
    sv.add_argument("--port", type=int, default=7860, help="TCP port (default: 7860)")
    sv.add_argument("--listen", action="store_true", help="listen on all interfaces (0.0.0.0) instead of "
                    "127.0.0.1; needs --api-key or --api-auth")
    sv.add_argument("--api-key", action="append", default=[], metavar="KEY", help="accept this key "
                    "(Authorization: Bearer KEY or X-API-Key: KEY); repeatable; also $SFUMATO_API_KEY")
    sv.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS...]", help="HTTP basic credentials, as "
                    "AUTOMATIC1111's --api-auth")
    sv.add_argument("--cors-allow-origins", metavar="ORIGINS", help="comma-separated origins allowed by CORS "
                    "(default: CORS off)")
    sv.add_argument("--device", action="append", metavar="DEVICE", help="device with a worker thread; "
                    "repeatable (default: auto)")
    sv.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="weights dtype (default: fp32 on CPU, "
                    "fp16 on GPUs)")
    sv.add_argument("--model-memory", type=float, default=8.0, metavar="GB", help="loaded models per device "
                    "before the least recently used is unloaded (default: 8)")
    sv.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body (default: 64 MB)")
    sv.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest input image, in "
                    "pixels (default: 4096x4096)")
    sv.add_argument("--max-output-pixels", type=int, default=2048 * 2048, help="largest output image, in "
                    "pixels (default: 2048x2048)")
    sv.add_argument("--upscaler-steps", type=int, default=20, help="steps of an SD x4 upscaler model used as an "
                    "upscaler (extras, hires fix; default: 20)")
    sv.add_argument("--upscaler-noise-level", type=int, default=20, help="its noise level, 0..350 (default: 20)")
    _offload_flag(sv, "CPU: idle weights of every loaded model leave RAM ('model': all but the running "
                  "component's, 'sequential': all but the running layer group's; exact, see generate --offload)")

    from sfumato.train.command import add_arguments as add_train_arguments

    add_train_arguments(sub.add_parser("train", help="train the built-in model on synthetic scenes"))
    return parser


# --- commands ---------------------------------------------------------------------------------------

_PARAM_ARGS = ("steps", "cfg_scale", "sampler", "schedule", "seed", "batch_size", "clip_skip", "subseed",
               "subseed_strength", "eta", "deepcache", "deepcache_depth", "int8", "tome")


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def _status(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"sfumato: {message}", file=sys.stderr, flush=True)


def _wxh(flag: str, value: str | None) -> tuple[int, int] | None:
    """"WxH" -> diffusers' (height, width)."""
    from sfumato.errors import InvalidParameterError

    if value is None:
        return None
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InvalidParameterError(f"--{flag} {value!r} is not WIDTHxHEIGHT (e.g. 1024x768)")
    return int(parts[1]), int(parts[0])


def _xy(flag: str, value: str | None) -> tuple[int, int] | None:
    """"X,Y" (left, top) -> diffusers' (top, left)."""
    from sfumato.errors import InvalidParameterError

    if value is None:
        return None
    parts = value.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InvalidParameterError(f"--{flag} {value!r} is not LEFT,TOP (e.g. 0,32)")
    return int(parts[1]), int(parts[0])


def _sdxl_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = {
        "prompt_2": args.prompt_2, "negative_prompt_2": args.negative_prompt_2,
        "original_size": _wxh("original-size", args.original_size),
        "target_size": _wxh("target-size", args.target_size),
        "negative_original_size": _wxh("negative-original-size", args.negative_original_size),
        "negative_target_size": _wxh("negative-target-size", args.negative_target_size),
        "crops_coords_top_left": _xy("crop", args.crop),
        "negative_crops_coords_top_left": _xy("negative-crop", args.negative_crop),
        "aesthetic_score": args.aesthetic_score, "negative_aesthetic_score": args.negative_aesthetic_score,
    }
    return {k: v for k, v in kw.items() if v is not None}


def _params_kwargs(args: argparse.Namespace, **more: Any) -> dict[str, Any]:
    """The generation parameters given on the command line (absent ones keep the library's defaults)."""
    kw = {k: getattr(args, k) for k in _PARAM_ARGS if getattr(args, k) is not None}
    kw.update(_sdxl_kwargs(args))
    if kw.get("seed") == -1:  # AUTOMATIC1111's "random"
        del kw["seed"]
    kw.update({k: v for k, v in more.items() if v is not None})
    return kw


def _check_params(args: argparse.Namespace, kw: dict[str, Any]) -> None:
    """Validate before the (slow) model load, so a typo fails at once. The size is checked against the
    8-pixel latent grid every family has; the model's own size stands in for absent values."""
    from sfumato.params import GenerationParams, validate

    fields = {k: v for k, v in kw.items() if k in GenerationParams.field_names()}
    validate(GenerationParams(prompt=args.prompt, negative_prompt=args.negative,
                              width=args.width if args.width is not None else 512,
                              height=args.height if args.height is not None else 512, **fields))


def _control_args(args: argparse.Namespace, load_image) -> list[tuple[str, Any, float, float, float, str]]:
    """(model, image, weight, start, end, mode) per --controlnet, checked before the model loads."""
    from sfumato.errors import InvalidParameterError

    n = len(args.controlnet)
    weights, ranges, modes = args.control_weight or [], args.control_range or [], args.control_mode or []
    if len(weights) > n or len(ranges) > n or len(modes) > n:
        raise InvalidParameterError(f"{len(weights)} --control-weight, {len(ranges)} --control-range and "
                                    f"{len(modes)} --control-mode for {n} --controlnet")
    if args.guess_mode and not n:
        raise InvalidParameterError("--guess-mode needs --controlnet")
    out = []
    for i, (model, image) in enumerate(args.controlnet):
        if not Path(model).exists():
            raise InvalidParameterError(f"--controlnet {model}: no such file or folder")
        start, end = 0.0, 1.0
        if i < len(ranges):
            try:
                start, end = (float(v) for v in ranges[i].split(":"))
            except ValueError:
                raise InvalidParameterError(f"--control-range {ranges[i]!r}: expected START:END, e.g. 0:0.8") from None
        out.append((model, load_image(image), weights[i] if i < len(weights) else 1.0, start, end,
                    modes[i] if i < len(modes) else "balanced"))
    return out


def _lora_arg(text: str) -> tuple[Path, tuple[float, float]]:
    """``PATH``, ``PATH:W`` or ``PATH:W:TE_W`` -> (path, (unet weight, text-encoder weight))."""
    from sfumato.errors import InvalidParameterError

    path, weights = text, []
    while ":" in path and not Path(path).is_file():
        head, _, tail = path.rpartition(":")
        try:
            weights.insert(0, float(tail))
        except ValueError:
            break
        path = head
    if not Path(path).is_file():
        raise InvalidParameterError(f"--lora {text}: no such file {path!r} (give PATH, PATH:W or PATH:W:TE_W)")
    if len(weights) > 2:
        raise InvalidParameterError(f"--lora {text}: at most two weights (UNet, text encoder)")
    unet = weights[0] if weights else 1.0
    return Path(path), (unet, weights[1] if len(weights) > 1 else unet)


def _output_paths(args: argparse.Namespace, n: int) -> list[Path] | None:
    if args.output is None:
        return None
    out = Path(args.output)
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(n)]


def _generate(args: argparse.Namespace) -> int:
    import sfumato
    from sfumato.errors import InvalidParameterError
    from sfumato.images import check_output, load_image, load_mask, save_image, save_numbered
    from sfumato.pipeline import MemoryOptions

    more: dict[str, Any] = {}
    if args.command in ("img2img", "inpaint", "outpaint", "depth2img"):
        more["strength"] = args.strength
    if args.command == "edit":
        more["image_cfg_scale"] = args.image_cfg
    if args.command == "inpaint":
        more.update(mask_blur=args.mask_blur, inpaint_fill=args.fill, inpaint_padding=args.padding,
                    inpaint_full_res=args.full_res or None)
    kw = _params_kwargs(args, **more)
    _check_params(args, kw)
    if args.switch_at is not None and args.refiner is None:
        raise InvalidParameterError("--switch-at needs --refiner")
    if args.switch_at is not None and not 0.0 < args.switch_at < 1.0:
        raise InvalidParameterError(f"--switch-at {args.switch_at} is out of range: allowed strictly between 0 and 1")
    if args.command in ("outpaint", "upscale") and (args.width is not None or args.height is not None):
        what = "the extended canvas" if args.command == "outpaint" else "the input (4x)"
        raise InvalidParameterError(f"{args.command} takes its size from {what}; drop --width/--height")
    for path in _output_paths(args, kw.get("batch_size", 1)) or []:
        check_output(path, overwrite=args.overwrite)
    image = load_image(args.image) if args.command != "generate" else None
    mask = load_mask(args.mask) if args.command == "inpaint" else None
    loras = [_lora_arg(a) for a in args.lora]
    controls = _control_args(args, load_image)
    for flag, folder in (("--lora-dir", args.lora_dir), ("--embeddings-dir", args.embeddings_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise InvalidParameterError(f"{flag} {folder}: not a folder")
    for path in args.embedding:
        if not Path(path).is_file():
            raise InvalidParameterError(f"--embedding {path}: no such file")
    memory = MemoryOptions(vae_tiling=args.vae_tiling or args.vae_tile is not None, vae_tile=args.vae_tile,
                           vae_slicing=args.vae_slicing, attention_slice=args.attention_slice, offload=args.offload)

    _status(args, f"loading {args.model or 'the built-in model'}")
    t0 = time.monotonic()
    pipe = sfumato.load(args.model, device=_device(args.device), dtype=args.dtype, prediction=args.prediction,
                        vae=args.vae, memory=memory)
    _status(args, f"loaded {pipe.spec.family} in {time.monotonic() - t0:.1f}s")
    pipe.lora_dir = Path(args.lora_dir) if args.lora_dir else None
    for path in args.embedding:
        emb = pipe.load_embedding(path)
        _status(args, f"embedding {emb.token}: {emb.vectors[0].shape[0]} vector(s)")
    if args.embeddings_dir:
        from sfumato.adapters.embeddings import load_embedding_dir

        got, skipped = load_embedding_dir(pipe, args.embeddings_dir)
        _status(args, f"embeddings: {len(got)} loaded, {len(skipped)} skipped")
    if controls:
        from sfumato.adapters.controlnet import ControlUnit, canny

        units = []
        for (model, image, weight, start, end, mode) in controls:
            cn = pipe.load_controlnet(model)
            units.append(ControlUnit(cn, canny(image) if args.control_canny else image, weight, start, end,
                                     name=Path(model).stem, mode=mode, resize=args.control_resize,
                                     module="canny" if args.control_canny else "none"))
        kw["controlnet"] = units
        if args.guess_mode:
            kw["guess_mode"] = True
    for path, weight in loras:
        handle = pipe.load_lora(path, weight)
        _status(args, f"LoRA {handle.name}: {len(handle.lora.patches)} modules, weight {weight[0]:g}/{weight[1]:g}")
    if args.refiner is not None:
        refiner = sfumato.load(args.refiner, device=_device(args.device), dtype=args.dtype, share=pipe)
        refiner.memory = memory
        _status(args, f"loaded the refiner ({refiner.spec.family})")
        kw.update(refiner=refiner, refiner_switch_at=args.switch_at)

    progress = Progress(enabled=not args.quiet)
    size = {"width": args.width, "height": args.height}
    t0 = time.monotonic()
    try:
        if args.command == "generate":
            res = pipe.generate(args.prompt, args.negative, callback=progress, **size, **kw)
        elif args.command == "img2img":
            res = pipe.img2img(image, args.prompt, args.negative, callback=progress, **size, **kw)
        elif args.command == "inpaint":
            # the pipeline's keyword names for the mask options
            renames = {"inpaint_fill": "fill", "inpaint_padding": "padding"}
            kw = {renames.get(k, k): v for k, v in kw.items()}
            res = pipe.inpaint(image, mask, args.prompt, args.negative, callback=progress, **size, **kw)
        elif args.command == "edit":
            res = pipe.edit(image, args.prompt, args.negative, callback=progress, **size, **kw)
        elif args.command == "depth2img":
            depth = load_image(args.depth).convert("L") if args.depth is not None else None
            res = pipe.depth2img(image, args.prompt, args.negative, depth_map=depth, callback=progress, **size, **kw)
        elif args.command == "upscale":
            res = pipe.upscale(image, args.prompt, args.negative, noise_level=args.noise_level,
                               tile_size=args.tile, tile_overlap=args.tile_overlap, callback=progress, **kw)
        elif args.command == "variations":
            res = pipe.variations(image, args.prompt, args.negative, noise_level=args.noise_level,
                                  callback=progress, **size, **kw)
        else:
            res = pipe.outpaint(image, args.prompt, args.negative, left=args.left, right=args.right, up=args.up,
                                down=args.down, callback=progress, **kw)
    finally:
        progress.close()

    paths = _output_paths(args, len(res.images))
    for i, (img, text, seed) in enumerate(zip(res.images, res.infotexts, res.seeds)):
        if paths is not None:
            written = save_image(img, paths[i], parameters=text, overwrite=args.overwrite)
        else:
            written = save_numbered(img, args.outdir, seed, parameters=text)
        print(written, flush=True)
    seeds = ", ".join(str(s) for s in dict.fromkeys(res.seeds))
    _status(args, f"{len(res.images)} image(s) in {time.monotonic() - t0:.1f}s, seed {seeds}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from sfumato.metadata import parse_infotext, read_parameters

    text = read_parameters(args.image)
    if text is None:
        print(f"sfumato: {args.image}: no generation parameters stored in this image", file=sys.stderr)
        return EXIT_NO_PARAMETERS
    print(json.dumps(parse_infotext(text), indent=2, ensure_ascii=False) if args.json else text)
    return 0


def _models(args: argparse.Namespace) -> int:
    d = describe_checkpoint(args.path, hashes=not args.no_hash)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        _print_description(d, sys.stdout)
    return 0


def _convert(args: argparse.Namespace) -> int:
    import sfumato
    from sfumato.images import OutputExistsError

    out = Path(args.output)
    fmt = args.format or ("single_file" if out.suffix else "diffusers")
    if out.exists() and not args.overwrite:
        raise OutputExistsError(f"{out}: already exists; pass --overwrite to replace it")
    if not Path(args.input).exists():
        raise CheckpointError(f"{args.input}: no such file or folder")
    pipe = sfumato.load(args.input, prediction=args.prediction)
    print(pipe.save(out, format=fmt, half=args.half, ema_only=not args.keep_ema))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from sfumato.errors import InvalidParameterError

    try:
        from sfumato.server.a1111 import Limits
        from sfumato.server.app import ServerConfig, serve
    except ImportError as e:
        raise SfumatoError(f"the server needs its extra dependencies: pip install 'sfumato[server]' ({e})") from None
    keys = [k for k in [*args.api_key, os.environ.get("SFUMATO_API_KEY", "")] if k]
    pairs = []
    for item in (args.api_auth or "").split(","):
        if item.strip():
            user, sep, password = item.strip().partition(":")
            if not sep or not user or not password:
                raise InvalidParameterError(f"--api-auth {item!r} is not USER:PASSWORD")
            pairs.append((user, password))
    data = Path(args.data_dir)
    config = ServerConfig(
        host="0.0.0.0" if args.listen else "127.0.0.1", port=args.port,
        model=Path(args.model) if args.model else _builtin_or_none(), data_dir=data,
        models_dir=Path(args.models_dir) if args.models_dir else None,
        lora_dir=Path(args.lora_dir) if args.lora_dir else None, db_path=Path(args.db) if args.db else None,
        embeddings_dir=Path(args.embeddings_dir) if args.embeddings_dir else None,
        controlnet_dir=Path(args.controlnet_dir) if args.controlnet_dir else None,
        api_keys=tuple(keys), api_auth=tuple(pairs),
        cors_origins=tuple(o.strip() for o in (args.cors_allow_origins or "").split(",") if o.strip()),
        devices=tuple(_device(d) for d in (args.device or ["auto"])), dtype=args.dtype,
        model_memory=int(args.model_memory * 2**30), max_body=int(args.max_body_mb * 2**20),
        limits=Limits(max_image_pixels=args.max_image_pixels, max_output_pixels=args.max_output_pixels),
        upscaler_steps=args.upscaler_steps, upscaler_noise_level=args.upscaler_noise_level, offload=args.offload)
    if config.model is not None and not config.model.exists():
        raise CheckpointError(f"{config.model}: no such file or folder")
    for flag, folder in (("--models-dir", config.models_dir), ("--lora-dir", config.lora_dir),
                         ("--embeddings-dir", config.embeddings_dir), ("--controlnet-dir", config.controlnet_dir)):
        if folder is not None and not folder.is_dir():
            raise InvalidParameterError(f"{flag} {folder}: not a folder")
    config.check()
    serve(config)
    return 0


def _builtin_or_none() -> Path | None:
    from sfumato.weights.load import builtin_checkpoint

    try:
        return builtin_checkpoint()
    except CheckpointError as e:
        print(f"sfumato: warning: {e}", file=sys.stderr)
        return None


def _train(args: argparse.Namespace) -> int:
    from sfumato.train.command import run

    return run(args)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "generate": _generate, "img2img": _generate, "inpaint": _generate, "outpaint": _generate, "edit": _generate,
    "depth2img": _generate, "upscale": _generate, "variations": _generate,
    "info": _info, "models": _models, "convert": _convert, "train": _train, "serve": _serve,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 ``info`` found nothing, 2 error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse has printed them
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    try:
        return _COMMANDS[args.command](args)
    except SfumatoError as e:
        print(f"sfumato: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\nsfumato: interrupted", file=sys.stderr)
        return 130
