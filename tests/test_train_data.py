"""The fine-tuning dataset layer (``sfumato.train.data``): scanning and checking folders, buckets, batch
order, and loading examples. All on tiny images built in tmp_path."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfumato.errors import InvalidParameterError
from sfumato.train.data import (
    Item,
    assign_bucket,
    bucket_batches,
    load_example,
    make_buckets,
    scan_dataset,
)


def _image(path: Path, w: int, h: int, seed: int = 0, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(a).save(path, **save)
    return path


def _captioned(path: Path, w: int, h: int, caption: str, seed: int = 0) -> Path:
    _image(path, w, h, seed)
    path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _error(folder: Path, **kw) -> str:
    with pytest.raises(InvalidParameterError) as e:
        scan_dataset(folder, **kw)
    return str(e.value)


# --- scanning -------------------------------------------------------------------------------------------

def test_kohya_layout_gives_repeats_and_captions(tmp_path):
    _captioned(tmp_path / "10_sks dog" / "b.png", 32, 24, "  sks dog\non grass \n")
    _captioned(tmp_path / "10_sks dog" / "deep" / "a.JPG", 24, 32, "sks dog, sitting")
    _captioned(tmp_path / "3_style" / "c.webp", 16, 16, "\ufeffa painting")
    _captioned(tmp_path / "loose.bmp", 8, 8, "no repeats")
    _image(tmp_path / "3_style" / ".hidden.png", 4, 4)  # skipped, though it has no caption
    (tmp_path / "3_style" / "notes.md").write_text("not an image")
    (tmp_path / "3_style" / "orphan.txt").write_text("a caption without an image")

    ds = scan_dataset(tmp_path)
    rel = [i.path.relative_to(tmp_path).as_posix() for i in ds.items]
    assert rel == ["10_sks dog/b.png", "10_sks dog/deep/a.JPG", "3_style/c.webp", "loose.bmp"]
    assert [i.caption for i in ds.items] == ["sks dog on grass", "sks dog, sitting", "a painting", "no repeats"]
    assert [i.repeats for i in ds.items] == [10, 10, 3, 1]
    assert [(i.width, i.height) for i in ds.items] == [(32, 24), (24, 32), (16, 16), (8, 8)]
    assert len(ds) == 4 and ds.samples_per_epoch == 24

    flat = scan_dataset(tmp_path, repeats_from_folder_names=False)
    assert [i.repeats for i in flat.items] == [1, 1, 1, 1]


def test_other_caption_extension(tmp_path):
    _image(tmp_path / "a.png", 8, 8)
    (tmp_path / "a.caption").write_text("from .caption")
    assert scan_dataset(tmp_path, caption_ext="caption").items[0].caption == "from .caption"


def test_exif_orientation_swaps_the_measured_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: shown as 24 wide, 40 high
    _image(tmp_path / "r.jpg", 40, 24, exif=exif.tobytes())
    (tmp_path / "r.txt").write_text("turned")
    item = scan_dataset(tmp_path).items[0]
    assert (item.width, item.height) == (24, 40)
    ex = load_example(item, (24, 40))
    assert ex.original_size == (40, 24) and ex.pixels.shape == (3, 40, 24)


def test_template_mode_needs_no_caption_files(tmp_path):
    _image(tmp_path / "5_x" / "a.png", 8, 8)
    _image(tmp_path / "b.png", 8, 8)
    (tmp_path / "b.txt").write_text("ignored in template mode")
    ds = scan_dataset(tmp_path, template="a painting in the style of {}", placeholder="<sfm>")
    assert [i.caption for i in ds.items] == ["a painting in the style of <sfm>"] * 2
    assert [i.repeats for i in ds.items] == [5, 1]


@pytest.mark.parametrize("template, placeholder, expect", [
    ("a photo of sks", "sks", "has no {}"),
    ("a photo of {}", None, "needs a non-empty placeholder"),
    ("a photo of {}", "  ", "needs a non-empty placeholder"),
    (None, "sks", "without a template"),
])
def test_bad_template_is_an_error(tmp_path, template, placeholder, expect):
    _captioned(tmp_path / "a.png", 8, 8, "fine")
    assert expect in _error(tmp_path, template=template, placeholder=placeholder)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "10_dog").mkdir()
    (tmp_path / "10_dog" / "a.gif").write_bytes(b"GIF89a")  # not a training format
    msg = _error(tmp_path)
    assert "no images" in msg and str(tmp_path) in msg and ".png" in msg
    assert "no such folder" in _error(tmp_path / "missing")


def test_every_bad_file_is_named_in_one_error(tmp_path):
    _captioned(tmp_path / "good.png", 16, 16, "fine")
    png = _captioned(tmp_path / "1_x" / "truncated.png", 16, 16, "cut short")
    png.write_bytes(png.read_bytes()[:60])
    jpg = _captioned(tmp_path / "1_x" / "truncated.jpg", 64, 64, "cut short")
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])  # passes Image.verify, fails decoding
    (tmp_path / "text.png").write_text("I am not a picture")
    (tmp_path / "text.txt").write_text("caption of a fake")
    _image(tmp_path / "uncaptioned.png", 8, 8)
    _captioned(tmp_path / "blank.png", 8, 8, " \n\t ")
    _image(tmp_path / "latin1.png", 8, 8)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    _captioned(tmp_path / "0_none" / "zero.png", 8, 8, "never seen")

    msg = _error(tmp_path)
    lines = msg.splitlines()
    assert "7 problems" in lines[0] and str(tmp_path) in lines[0]
    expected = {
        "1_x/truncated.png": "corrupt or truncated",
        "1_x/truncated.jpg": "corrupt or truncated",
        "text.png": "not an image",
        "uncaptioned.png": "uncaptioned.txt is missing",
        "blank.png": "blank.txt is empty",
        "latin1.png": "not UTF-8",
        "0_none/zero.png": "0 repeats",
    }
    for name, what in expected.items():
        assert any(line.strip().startswith(name + ":") and what in line for line in lines), (name, msg)
    assert "good.png" not in msg
    # a template removes the caption problems but not the image ones
    msg = _error(tmp_path, template="a photo of {}", placeholder="sks")
    assert "uncaptioned" not in msg and "text.png" in msg and "truncated.jpg" in msg


def test_verify_alone_misses_the_truncated_jpeg(tmp_path):
    """Documents why the scan decodes by default."""
    jpg = _captioned(tmp_path / "t.jpg", 64, 64, "cut short")
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    assert len(scan_dataset(tmp_path, decode=False)) == 1
    assert "t.jpg" in _error(tmp_path)


# --- buckets --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution, step", [(512, 64), (1024, 64), (768, 32)])
def test_buckets_bound_the_pixel_count_and_are_maximal(resolution, step):
    lo, hi = resolution // 2, resolution * 2
    buckets = make_buckets(resolution, min_size=lo, max_size=hi, step=step)
    area = resolution**2
    assert (resolution, resolution) in buckets and list(buckets) == sorted(set(buckets))
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert lo <= w <= hi and lo <= h <= hi
        assert w * h <= area
        assert (h, w) in buckets
        # no side can grow by a step without passing the area or the size limit
        grow_h = h + step > hi or w * (h + step) > area
        grow_w = w + step > hi or (w + step) * h > area
        assert grow_h or grow_w, (w, h)
    assert min(w * h for w, h in buckets) >= 0.75 * area
    assert max(w / h for w, h in buckets) == hi / lo  # 4:1 reached at these limits


def test_bucket_defaults_and_bad_arguments():
    assert make_buckets(512) == make_buckets(512, min_size=256, max_size=1024)
    for kw in ({"step": 60}, {"step": 0}, {"min_size": 300}, {"min_size": 640}, {"max_size": 448}):
        with pytest.raises(InvalidParameterError):
            make_buckets(512, **kw)


@pytest.mark.parametrize("size, bucket", [
    ((1000, 1000), (512, 512)),
    ((1920, 1080), (640, 384)),  # 1.78 -> 1.67 (768x320 is 2.4)
    ((1080, 1920), (384, 640)),
    ((3000, 2000), (640, 384)),  # 1.5: log distance to 576x448 (1.29) is 0.154, to 640x384 (1.67) 0.105
    ((5000, 1000), (1024, 256)),
    ((100, 4000), (256, 1024)),
])
def test_assign_bucket_picks_the_nearest_aspect(size, bucket):
    buckets = make_buckets(512)
    got = assign_bucket(*size, buckets)
    assert got == bucket
    best = min(abs(math.log(b[0] / b[1]) - math.log(size[0] / size[1])) for b in buckets)
    assert abs(math.log(got[0] / got[1]) - math.log(size[0] / size[1])) == best


def test_assign_bucket_is_symmetric_in_log_ratio():
    # kohya's plain w/h distance would send 1:2 and 2:1 images to buckets of different shape
    # (1.45 is nearer 1 than 2 by difference, nearer 2 by ratio; 1/1.45 is nearer 1/2 either way)
    buckets = ((256, 256), (512, 256), (256, 512))
    assert assign_bucket(145, 100, buckets) == (512, 256)
    assert assign_bucket(100, 145, buckets) == (256, 512)


# --- batches --------------------------------------------------------------------------------------------

def _items() -> list[Item]:
    sizes = [(100, 100)] * 5 + [(200, 100)] * 4 + [(100, 200)] * 3 + [(90, 110)]
    return [Item(Path(f"{k}.png"), f"c{k}", 1 + k % 3, w, h) for k, (w, h) in enumerate(sizes)]


def test_batches_never_mix_buckets_and_cover_every_repeat():
    items, buckets = _items(), make_buckets(512)
    batches = bucket_batches(items, 4, seed=7, epoch=0, buckets=buckets)
    seen = Counter()
    for b in batches:
        assert 1 <= len(b.indices) <= 4
        assert {assign_bucket(items[i].width, items[i].height, buckets) for i in b.indices} == {b.bucket}
        seen.update(b.indices)
    assert seen == Counter({i: it.repeats for i, it in enumerate(items)})
    # per bucket, only the last batch may be short
    per_bucket = Counter(b.bucket for b in batches)
    short = Counter(b.bucket for b in batches if len(b.indices) < 4)
    assert all(v <= 1 for v in short.values()) and len(per_bucket) == 4  # 90x110 has its own bucket


def test_batches_are_reproducible_and_change_with_epoch_and_seed():
    items, buckets = _items(), make_buckets(512)
    a = bucket_batches(items, 3, seed=1, epoch=2, buckets=buckets)
    assert a == bucket_batches(items, 3, seed=1, epoch=2, buckets=buckets)
    assert a != bucket_batches(items, 3, seed=1, epoch=3, buckets=buckets)
    assert a != bucket_batches(items, 3, seed=2, epoch=2, buckets=buckets)
    state = torch.random.get_rng_state()
    random.seed(0)
    assert bucket_batches(items, 3, seed=1, epoch=2, buckets=buckets) == a  # the global RNGs play no part
    assert torch.equal(state, torch.random.get_rng_state())


def test_bad_batch_arguments():
    with pytest.raises(InvalidParameterError):
        bucket_batches(_items(), 0, 0, 0, buckets=make_buckets(512))
    with pytest.raises(InvalidParameterError):
        bucket_batches([], 2, 0, 0, buckets=make_buckets(512))


# --- examples -------------------------------------------------------------------------------------------

def _item(tmp_path: Path, w: int, h: int) -> Item:
    path = _image(tmp_path / "x.png", w, h, seed=3)
    return Item(path, "x", 1, w, h)


def test_centre_crop_covers_the_bucket_and_keeps_range(tmp_path):
    item = _item(tmp_path, 96, 48)  # covering 64x64 resizes it to 128x64
    ex = load_example(item, (64, 64))
    assert ex.pixels.shape == (3, 64, 64) and ex.pixels.dtype == torch.float32
    assert -1.0 <= ex.pixels.min() < -0.9 and 0.9 < ex.pixels.max() <= 1.0
    assert ex.original_size == (48, 96) and ex.target_size == (64, 64)
    assert ex.crops_coords_top_left == (0, 32) and not ex.flipped
    # an exact-size image is passed through untouched: pixels are 2x - 1 of the file's bytes
    same = load_example(_item(tmp_path, 40, 24), (40, 24))
    raw = torch.from_numpy(np.asarray(Image.open(tmp_path / "x.png"), dtype=np.float32))
    assert torch.allclose(same.pixels, (raw / 127.5 - 1).permute(2, 0, 1))


def test_random_crop_and_flip_are_deterministic_given_rng(tmp_path):
    item = _item(tmp_path, 120, 40)
    a = load_example(item, (48, 32), random_crop=True, flip=True, rng=random.Random(5))
    b = load_example(item, (48, 32), random_crop=True, flip=True, rng=random.Random(5))
    assert torch.equal(a.pixels, b.pixels) and a.crops_coords_top_left == b.crops_coords_top_left
    lefts = {load_example(item, (48, 32), random_crop=True, rng=random.Random(s)).crops_coords_top_left
             for s in range(12)}
    assert len(lefts) > 3 and all(top == 0 and 0 <= left <= 96 - 48 for top, left in lefts)
    with pytest.raises(InvalidParameterError):
        load_example(item, (48, 32), random_crop=True)


def test_flip_really_mirrors_and_moves_the_crop(tmp_path):
    item = _item(tmp_path, 120, 40)
    flips = {}
    for s in range(20):
        rng_plain, rng_flip = random.Random(s), random.Random(s)
        plain = load_example(item, (48, 32), random_crop=True, rng=rng_plain)
        ex = load_example(item, (48, 32), random_crop=True, flip=True, rng=rng_flip)
        flips[ex.flipped] = (plain, ex)
    assert set(flips) == {True, False}
    plain, ex = flips[True]
    assert torch.equal(ex.pixels, plain.pixels.flip(-1))
    assert not torch.equal(ex.pixels, plain.pixels)
    (top, left), (ftop, fleft) = plain.crops_coords_top_left, ex.crops_coords_top_left
    assert ftop == top and fleft == (96 - 48) - left  # resized width 96, bucket width 48
    plain, ex = flips[False]
    assert torch.equal(ex.pixels, plain.pixels) and ex.crops_coords_top_left == plain.crops_coords_top_left
