"""Reading input images and writing results: atomic saves with the generation parameters, A1111 file names.

- :func:`save_image` writes to a temporary file in the target folder and moves it into place, so a
  crash or a full disk never leaves a partial image under the final name; without ``overwrite`` the
  final step is a hard link, which fails if the name was taken meanwhile (no check-then-write race).
- :func:`next_numbered_path` names outputs as AUTOMATIC1111 does (``modules/images.py``
  ``get_next_sequence_number``: the number continues after the highest leading number of any file in
  the folder), except that numbering starts at ``00001`` where AUTOMATIC1111 starts at ``00000``.
- :func:`load_image` returns RGB whatever the file holds; transparency is composited on white, which
  is what AUTOMATIC1111's img2img does by default (``images.flatten`` with ``img2img_background_color``
  ``#ffffff``); EXIF orientation is applied (``ImageOps.exif_transpose``, as its img2img does).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sfumato.errors import SfumatoError

__all__ = ["ImageReadError", "OutputExistsError", "check_output", "open_image", "load_image", "load_mask", "save_image",
           "next_numbered_path", "save_numbered"]


class ImageReadError(SfumatoError):
    """An input image file is missing or cannot be decoded."""


class OutputExistsError(SfumatoError, FileExistsError):
    """The output file exists and overwriting was not asked for."""


_LEADING_NUMBER = re.compile(r"^(\d+)")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


@contextlib.contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """``Image.open`` with every failure as :class:`ImageReadError` naming the file; pixels decoded."""
    path = Path(path)
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file PIL can read") from None
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read ({e.strerror or e})") from None
    with img:
        try:
            img.load()  # decode now: a truncated file fails here, not later in the pipeline
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageReadError(f"{path}: corrupt or truncated image ({e})") from None
        yield img


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer / float greyscale -> "L" by scaling (PIL's convert would clip at 255)."""
    if img.mode in _SIXTEEN_BIT or img.mode == "I":
        a = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if img.mode in _SIXTEEN_BIT or a.max(initial=0) > 255 else 1.0
        return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":  # floats in [0, 1]
        a = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8), "L")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    img = _eight_bit(img)
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """An RGB image from a path or a PIL image: EXIF orientation applied, transparency composited on
    white, palette / greyscale / CMYK / 16-bit converted. Raises :class:`ImageReadError` for bad files."""
    if isinstance(image, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(image))
    with open_image(image) as img:
        return _to_rgb(ImageOps.exif_transpose(img))


def load_mask(image: str | os.PathLike | Image.Image) -> Image.Image:
    """A mask as "L" (white = repaint). A mask with real transparency is read from its alpha channel
    (painted strokes on a transparent layer), any other from its luminance, as AUTOMATIC1111's
    ``create_binary_mask`` reads uploaded masks."""
    if not isinstance(image, Image.Image):
        with open_image(image) as img:
            return load_mask(ImageOps.exif_transpose(img))
    img = _eight_bit(image)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    return img.convert("L")


def _format_for(path: Path) -> str:
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise SfumatoError(f"{path}: unknown image extension {path.suffix!r}; use .png, .jpg or .webp")
    return fmt


def check_output(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Fail early, before any work, if ``path`` cannot be written: unknown extension, a folder, or an
    existing file without ``overwrite``. :func:`save_image` checks again when it writes."""
    path = Path(path)
    _format_for(path)
    if path.is_dir():
        raise OutputExistsError(f"{path}: is a folder; give a file name")
    if not overwrite and path.exists():
        raise OutputExistsError(f"{path}: already exists; pass overwrite=True (--overwrite) to replace it")
    return path


def save_image(image: Image.Image, path: str | os.PathLike, *, parameters: str | None,
               overwrite: bool = False) -> Path:
    """Write ``image`` to ``path`` atomically, with ``parameters`` (an infotext) embedded: a PNG
    ``parameters`` text chunk, or EXIF UserComment for JPEG / WebP. The folder is created if needed.

    Raises :class:`OutputExistsError` if ``path`` exists and ``overwrite`` is False; the existing file
    is never touched then, even if it appears while this image is being encoded.
    """
    from sfumato.metadata import exif_bytes, png_info

    path = check_output(path, overwrite=overwrite)
    fmt = _format_for(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options: dict[str, object] = {}
    if parameters is not None:
        if fmt == "PNG":
            options["pnginfo"] = png_info(parameters)
        else:
            options["exif"] = exif_bytes(parameters)
    if fmt == "JPEG":
        options["quality"] = 95  # AUTOMATIC1111's default jpeg_quality
        image = image.convert("RGB") if image.mode not in ("RGB", "L") else image

    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        # O_EXCL: never write through a link someone placed under the temporary name; mode 0666 & ~umask
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **options)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path)
    except FileExistsError:
        raise OutputExistsError(f"{path}: already exists; pass overwrite=True (--overwrite) to replace it") from None
    except OSError as e:
        raise SfumatoError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _link_no_clobber(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists. A hard link is atomic and fails on an existing
    name; file systems without hard links fall back to an exclusive create + replace."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # claims the name or raises
        os.close(fd)
        os.replace(tmp, path)


def next_numbered_path(folder: str | os.PathLike, seed: int, *, ext: str = ".png") -> Path:
    """``folder/NNNNN-<seed><ext>``: one more than the highest leading number of any file name in
    ``folder`` (any extension, as AUTOMATIC1111 counts), from ``00001``."""
    folder = Path(folder)
    highest = 0
    if folder.is_dir():
        for entry in os.scandir(folder):
            m = _LEADING_NUMBER.match(entry.name)
            if m is not None:
                highest = max(highest, int(m.group(1)))
    return folder / f"{highest + 1:05d}-{seed}{ext}"


def save_numbered(image: Image.Image, folder: str | os.PathLike, seed: int, *, parameters: str | None,
                  ext: str = ".png", attempts: int = 100) -> Path:
    """:func:`save_image` under :func:`next_numbered_path`, taking the next number if another process
    claimed this one first."""
    for _ in range(attempts):
        try:
            return save_image(image, next_numbered_path(folder, seed, ext=ext), parameters=parameters)
        except OutputExistsError:
            continue
    raise SfumatoError(f"{folder}: could not claim a numbered file name in {attempts} attempts")
