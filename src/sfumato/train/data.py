"""The image-folder dataset of the fine-tuning commands: scanning and checking a folder, aspect-ratio
buckets, the per-epoch batch order, and loading one training example (resize, crop, flip).

Layout (kohya-ss ``sd-scripts``' DreamBooth-style folders):

- images ``.png .jpg .jpeg .webp .bmp`` (any case) anywhere below the folder; names starting with "."
  (``.ipynb_checkpoints``, macOS ``._x.png`` resource forks) are skipped, the order is the sorted
  relative path, so a scan is reproducible;
- a folder named ``N_name`` gives every image below it ``N`` repeats per epoch (the nearest such folder
  between the image and the scanned folder wins; images with none get 1; ``0_name`` is an error);
- a caption is the sibling ``<stem>.txt`` (``caption_ext``), read as UTF-8 (a BOM is dropped) with runs
  of whitespace, newlines included, joined to one space (CLIP's tokenizer does the same);
- or one ``template`` with ``{}`` (``"a photo of {}"``, ``"a painting in the style of {}"``) filled with
  ``placeholder`` (the textual-inversion token or DreamBooth's "sks dog") for every image; caption files
  are then not read, since those methods train on fixed prompts.

:func:`scan_dataset` opens, verifies (``Image.verify``) and, by default, decodes every image (JPEGs at
1/8 scale through ``Image.draft``, which still reads all of the file), because ``verify`` alone passes a
truncated JPEG that would then fail hours into a run. Every problem (no images, unreadable or corrupt
image, caption missing or empty or not UTF-8, a bad template) is collected and raised together as one
:class:`~sfumato.errors.InvalidParameterError`, one line per file, before anything trains.

Buckets follow NovelAI's aspect-ratio bucketing (NovelAI, "NovelAI Improvements on Stable Diffusion",
2022) as kohya's ``make_bucket_resolutions`` implements it: for every width from ``min_size`` to
``max_size`` in ``step`` increments, the largest height (a multiple of ``step``, at most ``max_size``)
whose area is at most ``resolution**2``, and its transpose, plus the square. An image goes to the bucket
whose aspect ratio is nearest in log space (so 2:1 and 1:2 are equally far from 1:1; kohya compares the
plain ratio w/h, which favours wide buckets), is resized to cover it and cropped to it.

Each epoch (:func:`bucket_batches`) puts every item ``repeats`` times into its bucket, shuffles each
bucket, cuts it into batches (the last one of a bucket may be short: every sample is seen, none twice too
often) and shuffles the batches, all from one CPU ``torch.Generator`` seeded by a hash of (seed, epoch):
no state to save for resuming, the same order on every machine, a different order every epoch.

SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2) needs each example's ``original_size`` and
``crops_coords_top_left``; :class:`Example` carries them in the (height, width) / (top, left) order of
``sfumato.params`` and diffusers' ``add_time_ids``, measured in the resized image as diffusers'
``train_text_to_image_sdxl.py`` does, and in the frame of the (possibly flipped) image the model sees.
Sizes elsewhere in this module are (width, height), as PIL and kohya give them.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sfumato.errors import InvalidParameterError
from sfumato.images import load_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "BucketBatch",
    "Dataset",
    "Example",
    "Item",
    "assign_bucket",
    "bucket_batches",
    "load_example",
    "make_buckets",
    "scan_dataset",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEATS = re.compile(r"^(\d+)_")
_ORIENTATION = 0x0112  # EXIF tag; values 5..8 turn the image by 90 degrees
_MAX_LISTED = 50  # problems named in the error before "... and N more"


@dataclass(frozen=True)
class Item:
    """One training image: its caption, its repeats per epoch and its size as shown (EXIF orientation applied)."""

    path: Path
    caption: str
    repeats: int
    width: int
    height: int


@dataclass(frozen=True)
class Dataset:
    """The checked images of a folder, in sorted order of their paths relative to ``root``."""

    root: Path
    items: tuple[Item, ...]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def samples_per_epoch(self) -> int:
        """Images seen in one epoch, repeats counted."""
        return sum(item.repeats for item in self.items)


@dataclass(frozen=True)
class BucketBatch:
    """Indices into the dataset's items that share one bucket (width, height)."""

    bucket: tuple[int, int]
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Example:
    """One image as the model trains on it, with SDXL's size conditioning."""

    pixels: torch.Tensor  # (3, h, w) float32 in [-1, 1]
    original_size: tuple[int, int]  # (height, width) of the image file, EXIF orientation applied
    crops_coords_top_left: tuple[int, int]  # (top, left) cut off the resized image, in the frame the model sees
    target_size: tuple[int, int]  # (height, width) of the bucket
    flipped: bool


# --- scanning -------------------------------------------------------------------------------------------

def scan_dataset(
    folder: str | os.PathLike,
    *,
    caption_ext: str = ".txt",
    template: str | None = None,
    placeholder: str | None = None,
    repeats_from_folder_names: bool = True,
    decode: bool = True,
    workers: int | None = None,
) -> Dataset:
    """Find, check and caption every image below ``folder`` (see the module docstring for the layout).

    ``template`` with ``placeholder``: every caption is ``template`` with each ``{}`` replaced by
    ``placeholder``; without: each image needs its ``<stem><caption_ext>`` beside it.
    ``repeats_from_folder_names``: ``N_name`` folders give N repeats (else every image has 1).
    ``decode``: decode the pixels as well as ``verify`` (catches truncated JPEGs; costs a decode per image).
    ``workers``: threads that check images (PIL decodes without the GIL); default min(8, CPUs).
    Raises :class:`InvalidParameterError` listing every problem found.
    """
    root = Path(folder)
    problems: list[str] = []
    ext = caption_ext if caption_ext.startswith(".") else "." + caption_ext
    if template is not None:
        if "{}" not in template:
            problems.append(f"template {template!r} has no {{}} for the placeholder token")
        if placeholder is None or not placeholder.strip():
            problems.append(f"template {template!r} needs a non-empty placeholder token")
    elif placeholder is not None:
        problems.append(f"placeholder {placeholder!r} given without a template to put it in")
    if template is None and (ext == "." or ext.lower() in IMAGE_EXTENSIONS):
        problems.append(f"caption_ext {caption_ext!r} must name a text file extension such as '.txt'")
    if not root.is_dir():
        problems.append(f"{root}: no such folder" if not root.exists() else f"{root}: is a file, not a folder")
        _raise(root, problems)

    paths = _find_images(root)
    if not paths:
        problems.append(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in {root} or its subfolders")
        _raise(root, problems)

    n_workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        checked = list(pool.map(lambda p: _check_image(root / p, decode), paths))

    items = []
    for rel, size in zip(paths, checked):
        path = root / rel
        bad = []
        if isinstance(size, str):
            bad.append(size)
        repeats = _repeats(rel) if repeats_from_folder_names else 1
        if repeats < 1:
            bad.append(f"folder {rel.parent.as_posix()!r} asks for {repeats} repeats (the N of N_name must be >= 1)")
        if template is not None:
            caption = template.replace("{}", (placeholder or "").strip())
        else:
            caption = _read_caption(path.with_suffix(ext), bad)
        if bad:
            problems += [f"{rel.as_posix()}: {b}" for b in bad]
        else:
            items.append(Item(path=path, caption=caption, repeats=repeats, width=size[0], height=size[1]))
    if problems:
        _raise(root, problems)
    return Dataset(root=root, items=tuple(items))


def _find_images(root: Path) -> list[Path]:
    """Image paths relative to ``root``, sorted; hidden files and folders skipped; symlinks to files
    followed, symlinks to folders not (no loops)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        here = Path(dirpath).relative_to(root)
        found += [here / f for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found, key=lambda p: p.as_posix())


def _check_image(path: Path, decode: bool) -> tuple[int, int] | str:
    """(width, height) as shown, or what is wrong with the file."""
    try:
        with Image.open(path) as img:
            img.verify()  # structure and checksums, without decoding
        with Image.open(path) as img:  # verify leaves the image unusable: open again
            w, h = img.size
            if decode:
                img.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # JPEG only: decode at 1/8 scale
                img.load()
            if img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
                w, h = h, w
    except UnidentifiedImageError:
        return "not an image file PIL can read"
    except OSError as e:
        if not path.is_file():
            return "cannot be read (no longer a file)"
        return f"corrupt or truncated image ({e})"
    except Exception as e:  # noqa: BLE001 -- PIL's decoders also raise SyntaxError, ValueError, struct.error ...
        return f"corrupt image ({type(e).__name__}: {e})"
    if w < 1 or h < 1:
        return f"image has no pixels ({w}x{h})"
    return w, h


def _repeats(rel: Path) -> int:
    """N of the nearest ``N_name`` folder above the image (below the scanned folder), else 1."""
    for part in reversed(rel.parent.parts):
        m = _REPEATS.match(part)
        if m:
            return int(m.group(1))
    return 1


def _read_caption(path: Path, bad: list[str]) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        bad.append(f"caption file {path.name} is missing (write one beside the image, or pass a template)")
        return ""
    except UnicodeDecodeError:
        bad.append(f"caption file {path.name} is not UTF-8 text")
        return ""
    except OSError as e:
        bad.append(f"caption file {path.name} cannot be read ({e.strerror or e})")
        return ""
    caption = " ".join(text.split())
    if not caption:
        bad.append(f"caption file {path.name} is empty")
    return caption


def _raise(root: Path, problems: list[str]) -> None:
    shown = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    noun = "problem" if len(problems) == 1 else "problems"
    raise InvalidParameterError(f"training data {root}: {len(problems)} {noun}, nothing was trained:\n  "
                                + "\n  ".join(shown) + more)


# --- buckets --------------------------------------------------------------------------------------------

def make_buckets(resolution: int, *, min_size: int | None = None, max_size: int | None = None,
                 step: int = 64) -> tuple[tuple[int, int], ...]:
    """Sorted (width, height) buckets of at most ``resolution**2`` pixels, sides multiples of ``step`` in
    [``min_size``, ``max_size``] (defaults: half and twice ``resolution``, kohya's 256..1024 at 512).

    ``step`` must be a multiple of 8 (the VAE's factor); 64, the default, also keeps every level of an SD
    UNet (three 2x downsamplings of the latent) an integer size."""
    if step < 8 or step % 8:
        raise InvalidParameterError(f"bucket step must be a positive multiple of 8 (64 for SD), got {step}")
    if min_size is None:
        min_size = max(step, resolution // 2 // step * step)
    if max_size is None:
        max_size = 2 * resolution
    if any(v % step for v in (resolution, min_size, max_size)):
        raise InvalidParameterError(f"resolution {resolution}, min_size {min_size} and max_size {max_size} must be "
                                    f"multiples of the bucket step {step}")
    if not 0 < min_size <= resolution <= max_size:
        raise InvalidParameterError(f"need 0 < min_size <= resolution <= max_size, got {min_size}, {resolution}, "
                                    f"{max_size}")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    for w in range(min_size, max_size + 1, step):
        h = min(max_size, area // w // step * step)
        if h >= min_size:
            buckets |= {(w, h), (h, w)}
    return tuple(sorted(buckets))


def assign_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (width, height) whose aspect ratio is nearest to ``width / height`` in log space
    (ties: the first in ``buckets``' order)."""
    if not buckets:
        raise InvalidParameterError("no buckets to choose from")
    if width < 1 or height < 1:
        raise InvalidParameterError(f"image size must be positive, got {width}x{height}")
    r = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - r))


def bucket_batches(items: Sequence[Item], batch_size: int, seed: int, epoch: int, *,
                   buckets: Sequence[tuple[int, int]]) -> list[BucketBatch]:
    """The batches of epoch ``epoch``: every item ``repeats`` times, each batch from one bucket, at most
    ``batch_size`` long (a bucket's last batch may be shorter), in an order that is a pure function of
    (items, batch_size, seed, epoch, buckets)."""
    if batch_size < 1:
        raise InvalidParameterError(f"batch_size must be >= 1, got {batch_size}")
    if not items:
        raise InvalidParameterError("no items to batch")
    pools: dict[tuple[int, int], list[int]] = {}
    for i, item in enumerate(items):
        pools.setdefault(assign_bucket(item.width, item.height, buckets), []).extend([i] * item.repeats)
    g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    batches = []
    for bucket in sorted(pools):
        pool = pools[bucket]
        order = [pool[j] for j in torch.randperm(len(pool), generator=g).tolist()]
        batches += [BucketBatch(bucket, tuple(order[k:k + batch_size])) for k in range(0, len(order), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for (seed, epoch) without the collisions of a linear mix (seed=0, epoch=k vs seed=1, ...)."""
    digest = hashlib.sha256(f"sfumato.bucket_batches:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --- one example ----------------------------------------------------------------------------------------

def load_example(item: Item, bucket: tuple[int, int], *, random_crop: bool = False, flip: bool = False,
                 rng: random.Random | None = None) -> Example:
    """``item``'s image resized (Lanczos, aspect kept) to cover ``bucket`` (width, height), cropped to it
    (centred, or at a position drawn from ``rng``) and, with ``flip``, mirrored left-right with probability
    1/2 (drawn from ``rng``). The same ``rng`` state gives the same example."""
    if (random_crop or flip) and rng is None:
        raise InvalidParameterError("random_crop and flip draw from rng: pass a random.Random")
    bw, bh = bucket
    if bw < 1 or bh < 1:
        raise InvalidParameterError(f"bucket must be a positive (width, height), got {bucket}")
    image = load_image(item.path)  # RGB, EXIF orientation applied, as the scan measured it
    w, h = image.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.LANCZOS)
    if random_crop:
        left, top = rng.randint(0, nw - bw), rng.randint(0, nh - bh)
    else:
        left, top = (nw - bw) // 2, (nh - bh) // 2
    image = image.crop((left, top, left + bw, top + bh))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, h, w)
    flipped = flip and rng.random() < 0.5
    if flipped:
        pixels = pixels.flip(-1)
        left = nw - bw - left  # what is cut off on the left of the mirrored image was cut on the right
    return Example(pixels=pixels.contiguous(), original_size=(h, w), crops_coords_top_left=(top, left),
                   target_size=(bh, bw), flipped=flipped)
