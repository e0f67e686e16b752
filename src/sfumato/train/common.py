"""What both training stages share: data as tensors, a deterministic data order, EMA weights, the learning
rate schedule, mixed precision, checkpoints that resume bit for bit, progress lines and the loss curve.

Determinism: every random draw of a run (data order aside) comes from one seeded CPU ``torch.Generator``
whose state is saved in the checkpoint, and the data order is a pure function of (seed, sample number),
so a run resumed from a checkpoint continues exactly as the uninterrupted run would have (on the same
hardware and thread count). EMA with warm-up follows diffusers' ``EMAModel`` (decay
``min(d, (1 + n) / (10 + n))``, Polyak averaging as in Ho et al. 2020); the schedule is linear warm-up then
cosine decay (Loshchilov & Hutter 2017, SGDR).
"""

from __future__ import annotations

import math
import os
import pickle
import platform
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from sfumato.errors import CheckpointError, InvalidParameterError

__all__ = [
    "EMA",
    "MIXED_PRECISION",
    "GradScaler",
    "TrainProgress",
    "as_captioned",
    "as_images",
    "autocast",
    "batch_indices",
    "check_resume",
    "hardware",
    "images_grid",
    "load_checkpoint",
    "lr_at",
    "plot_losses",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "set_threads",
    "to_float",
]

MIXED_PRECISION = ("no", "bf16", "fp16")


# --- machine -----------------------------------------------------------------------------------------

def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` intra-op threads (default: the CPUs this process may run on) and return the count."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def hardware(device: torch.device | str = "cpu") -> str:
    """One line naming the machine a run used, for logs and reports."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


# --- data ----------------------------------------------------------------------------------------------

def as_images(images: Any) -> torch.Tensor:
    """Images as one (N, 3, H, W) tensor: uint8 stays uint8 (a quarter of float32's memory; batches are
    converted by :func:`to_float`), float is taken to be in [-1, 1]. Accepts a tensor (N, 3, H, W), a numpy
    array (N, H, W, 3) or (N, 3, H, W), an object with ``.images`` (``scenes.SceneData``), or a sequence of
    PIL images, numpy arrays or (3, H, W) tensors."""
    if hasattr(images, "images") and not isinstance(images, torch.Tensor):
        images = images.images
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
        if images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
    elif not isinstance(images, torch.Tensor):
        items = list(images)
        if not items:
            raise InvalidParameterError("no training images given")
        images = torch.stack([_one_image(x) for x in items])
    if images.ndim != 4 or images.shape[1] != 3:
        raise InvalidParameterError(f"training images must be (N, 3, H, W), got {tuple(images.shape)}")
    if len(images) == 0:
        raise InvalidParameterError("no training images given")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise InvalidParameterError(f"training images must be uint8 or float, got {images.dtype}")
    return images.contiguous()


def _one_image(x: Any) -> torch.Tensor:
    if isinstance(x, Image.Image):
        x = np.asarray(x.convert("RGB"))
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t.permute(2, 0, 1) if t.ndim == 3 and t.shape[-1] == 3 else t
    if isinstance(x, torch.Tensor):
        return x
    raise InvalidParameterError(f"a training image must be a PIL image, array or tensor, got {type(x).__name__}")


def as_captioned(dataset: Any) -> tuple[torch.Tensor, list[str]]:
    """(images, captions) from ``scenes.SceneData``, an ``(images, captions)`` pair, or a sequence of
    ``(image, caption)`` pairs."""
    if hasattr(dataset, "images") and hasattr(dataset, "captions"):
        images, captions = dataset.images, list(dataset.captions)
    elif isinstance(dataset, tuple) and len(dataset) == 2 and not isinstance(dataset[1], str):
        images, captions = dataset[0], list(dataset[1])
    else:
        pairs = list(dataset)
        images, captions = [p[0] for p in pairs], [p[1] for p in pairs]
    images = as_images(images)
    if len(captions) != len(images) or not all(isinstance(c, str) for c in captions):
        raise InvalidParameterError(f"need one caption string per image: {len(images)} images, {len(captions)} captions")
    return images, captions


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """A batch from :func:`as_images` as float32 in [-1, 1] (uint8 maps as the pipeline's ``2x - 1``)."""
    if batch.dtype == torch.uint8:
        return batch.float() / 127.5 - 1.0
    return batch.float()


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(n, generator=g)


def batch_indices(first: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Dataset indices of samples ``first .. first + batch_size - 1`` of the run's stream: each epoch is a
    fresh permutation of ``range(n)`` drawn from (seed, epoch), so the order needs no saved state."""
    out = []
    for k in range(first, first + batch_size):
        epoch, pos = divmod(k, n)
        out.append(int(_permutation(n, seed, epoch)[pos]))
    return torch.tensor(out, dtype=torch.long)


# --- optimisation --------------------------------------------------------------------------------------

def lr_at(step: int, lr: float, total: int, warmup: int, final_fraction: float = 0.1) -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warm-up over ``warmup`` steps, then a
    cosine from ``lr`` down to ``final_fraction * lr`` at ``total``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of the parameters of named modules, kept in float32.

    ``update(n)`` after optimiser step ``n`` (0-based) uses decay ``min(decay, (1 + n) / (10 + n))``: the
    warm-up lets the average follow the fast early changes instead of remembering the random init.
    """

    def __init__(self, modules: dict[str, nn.Module], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise InvalidParameterError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.modules = modules
        self.shadow = {name: {k: v.detach().float().clone() for k, v in m.state_dict().items()}
                       for name, m in modules.items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = self.decay_at(step)
        for name, m in self.modules.items():
            shadow = self.shadow[name]
            for k, v in m.state_dict().items():
                if v.is_floating_point():
                    shadow[k].lerp_(v.detach().float(), 1.0 - d)
                else:
                    shadow[k].copy_(v)

    def copy_to(self, name: str, module: nn.Module) -> nn.Module:
        """Load the average of ``name`` into ``module`` (cast to its dtype) and return it."""
        sd = module.state_dict()
        module.load_state_dict({k: v.to(sd[k].dtype) for k, v in self.shadow[name].items()})
        return module

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.shadow

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        if set(state) != set(self.shadow):
            raise CheckpointError(f"EMA state holds {sorted(state)}, this run trains {sorted(self.shadow)}")
        for name, sd in state.items():
            for k, v in sd.items():
                self.shadow[name][k].copy_(v)


def autocast(device: torch.device, mixed_precision: str) -> AbstractContextManager:
    """Autocast to bf16/fp16 on CUDA; a no-op elsewhere (CPU training runs in fp32: CPU autocast is slower
    than fp32 on most CPUs and bf16 gradients of a small model lose too much)."""
    if mixed_precision not in MIXED_PRECISION:
        raise InvalidParameterError(f"mixed_precision {mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}")
    if device.type != "cuda" or mixed_precision == "no":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)


def GradScaler(device: torch.device, mixed_precision: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 autocast on CUDA (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and mixed_precision == "fp16")


# --- checkpoints ------------------------------------------------------------------------------------------

def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """The run's generator and torch's global generators, as tensors (``torch.load(weights_only=True)`` reads them)."""
    state: dict[str, Any] = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(generator: torch.Generator, state: dict[str, Any]) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """``torch.save`` of plain dicts, tensors and numbers, written to a temporary file and renamed into
    place, so an interrupted save leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, read with ``weights_only=True`` (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such training checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:  # truncated or foreign
        raise CheckpointError(f"{path}: not a readable training checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("kind") != kind:
        got = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: a {got!r} checkpoint, not a {kind!r} one")
    return state


def check_resume(state: dict[str, Any], hparams: dict[str, Any], path: str | os.PathLike) -> None:
    """The settings that fix the data order and the random draws must match the checkpoint's, or the
    resumed run would not continue the interrupted one."""
    saved = state.get("hparams", {})
    diff = {k: (saved.get(k), v) for k, v in hparams.items() if saved.get(k) != v}
    if diff:
        raise CheckpointError(f"{path}: cannot resume with different " +
                              ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in diff.items()))


# --- reporting --------------------------------------------------------------------------------------------

def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class TrainProgress:
    """Training progress on ``stream``: step, smoothed loss, speed and time left.

    A terminal gets one line redrawn in place; a log file a line at most every ``interval`` seconds and
    one at the end. Speed is measured from the first reported step, so start-up costs do not skew the ETA.
    """

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, enabled: bool = True,
                 interval: float = 10.0) -> None:
        self.label, self.total = label, total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self._t0: float | None = None
        self._last_print = -math.inf
        self._avg: float | None = None
        self._mid_line = False
        self.rate = 0.0  # optimiser steps per second, measured from the first report on

    def __call__(self, step: int, loss: float) -> None:
        """Report that optimiser step ``step`` (1-based count of steps done) ended with ``loss``."""
        now = time.monotonic()
        self._avg = loss if self._avg is None else 0.95 * self._avg + 0.05 * loss
        if self._t0 is None:
            self._t0, self._first = now, step
        done = step - self._first
        rate = self.rate = done / (now - self._t0) if done > 0 and now > self._t0 else 0.0
        if not self.enabled:
            return
        left = (self.total - step) / rate if rate > 0 else 0.0
        speed = f"{rate:.2f}it/s" if rate >= 1 or rate == 0 else f"{1 / rate:.2f}s/it"
        line = (f"{self.label} {step}/{self.total} loss {self._avg:.4f} {speed} "
                f"ETA {_clock(left) if rate > 0 else '?'}")
        if self.tty:
            self._mid_line = step < self.total
            self.stream.write("\r" + line + ("" if self._mid_line else "\n"))
        elif step >= self.total or now - self._last_print >= self.interval:
            self.stream.write(line + "\n")
            self._last_print = now
        else:
            return
        self.stream.flush()

    def close(self) -> None:
        if self._mid_line:
            self._mid_line = False
            self.stream.write("\n")
            self.stream.flush()


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values (1, 2, 5 x 10^k) inside [10^lo, 10^hi]; only the decades when those are many."""
    ticks = [m * 10.0**k for k in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if lo <= math.log10(t) <= hi]
    return [t for t in ticks if math.log10(t) % 1 == 0] if len(ticks) > 8 else ticks


def plot_losses(losses: Sequence[float], path: str | os.PathLike, *, title: str = "loss",
                size: tuple[int, int] = (640, 360)) -> Path:
    """Draw the loss curve (log scale; raw in grey, moving average in blue) as a PNG with PIL alone."""
    path = Path(path)
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, w - 16, 28, h - 36
    values = np.asarray([v for v in losses if math.isfinite(v) and v > 0], dtype=np.float64)
    draw.text((left, 8), f"{title}, {len(losses)} steps", fill=(0, 0, 0))
    if len(values) >= 2:
        logs = np.log10(values)
        lo, hi = float(logs.min()), float(logs.max())
        pad = max(hi - lo, 0.1) * 0.05
        lo, hi = lo - pad, hi + pad
        window = max(1, len(values) // 50)
        smooth = np.convolve(logs, np.ones(window) / window, mode="valid")

        def xy(i: float, v: float, n: int) -> tuple[float, float]:
            return (left + (right - left) * i / max(1, n - 1), bottom - (bottom - top) * (v - lo) / (hi - lo))

        for tick in _log_ticks(lo, hi):
            y = xy(0, math.log10(tick), 2)[1]
            draw.line([left, y, right, y], fill=(225, 225, 225))
            draw.text((4, y - 6), f"{tick:g}", fill=(90, 90, 90))
        draw.line([xy(i, v, len(logs)) for i, v in enumerate(logs)], fill=(190, 190, 190))
        offset = (window - 1) / 2
        draw.line([xy(i + offset, v, len(logs)) for i, v in enumerate(smooth)], fill=(30, 80, 200), width=2)
        draw.text((right - 170, top + 6), f"last {window}: {values[-window:].mean():.4g}", fill=(0, 0, 0))
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    n = len(losses)
    for frac in (0.0, 0.5, 1.0):
        label = f"{round(frac * n)}"
        x = left + (right - left) * frac - (len(label) * 6 if frac == 1.0 else 0)
        draw.text((x, bottom + 6), label, fill=(0, 0, 0))
    draw.text((left + (right - left) // 2 - 40, bottom + 20), "optimiser step", fill=(90, 90, 90))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def images_grid(rows: Iterable[Sequence[Image.Image]]) -> Image.Image:
    """Paste rows of equally sized images into one grid image."""
    rows = [list(r) for r in rows if r]
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im, (x * w, y * h))
    return grid


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in pieces of ``size``."""
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))
