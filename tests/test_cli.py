"""The ``sfumato`` command line, run in-process through ``main([...])`` (and once as ``python -m sfumato``),
on a tiny random SD 1.x model: info, models, convert, generate / img2img / inpaint end to end, exit codes
and one-line error messages. Also the image files it writes (atomic, numbered, refusing to overwrite)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import sfumato
from sfumato.cli import Progress, legacy_model_hash, main
from sfumato.errors import SfumatoError
from sfumato.images import (
    ImageReadError,
    OutputExistsError,
    load_image,
    load_mask,
    next_numbered_path,
    save_image,
)
from sfumato.metadata import params_from_infotext, read_parameters

from . import tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, Path]:
    """The tiny SD 1.x model as a diffusers folder and as an original-layout single file."""
    if not tiny.SHARED_BPE.exists():
        pytest.skip("needs ../shared/clip-bpe beside the repo")
    root = tmp_path_factory.mktemp("cli")
    folder = tiny.build("sd1", root / "folder")
    single = sfumato.load(folder).save(root / "tiny-sd1.safetensors")
    return {"folder": folder, "file": single}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def _has(module: str, *names: str) -> bool:
    """Whether ``module`` imports and has ``names`` (parts of the library that land in later issues)."""
    try:
        mod = __import__(module, fromlist=["_"])
    except ImportError:
        return False
    return all(hasattr(mod, n) for n in names)


needs_sampling = pytest.mark.skipif(not _has("sfumato.sampling", "SAMPLERS", "resolve_sampler"),
                                    reason="sfumato.sampling not landed")
needs_generate = pytest.mark.skipif(
    not (_has("sfumato.sampling", "SAMPLERS", "resolve_sampler") and _has("sfumato.pipeline", "GenerationResult")),
    reason="Pipeline.generate not landed")


# --- the command itself ------------------------------------------------------------------------------

def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "sfumato", "--help"], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    for command in ("generate", "img2img", "inpaint", "info", "models", "convert"):
        assert command in r.stdout


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["generate", "--steps", "many"]) == 2
    assert "invalid int value" in capsys.readouterr().err


# --- info --------------------------------------------------------------------------------------------

def test_info(tmp_path, capsys):
    text = "a cat, sitting\nNegative prompt: dog\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8"
    path = save_image(Image.new("RGB", (8, 8)), tmp_path / "a.png", parameters=text)
    assert run(capsys, "info", path) == (0, text + "\n", "")
    code, out, _ = run(capsys, "info", path, "--json")
    assert code == 0 and json.loads(out)["Prompt"] == "a cat, sitting" and json.loads(out)["Seed"] == "1"

    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(bare)
    code, out, err = run(capsys, "info", bare)
    assert (code, out) == (1, "") and err == f"sfumato: {bare}: no generation parameters stored in this image\n"

    code, _, err = run(capsys, "info", tmp_path / "absent.png")
    assert code == 2 and err == f"sfumato: error: {tmp_path / 'absent.png'}: no such file\n"
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    code, _, err = run(capsys, "info", junk)
    assert code == 2 and err.startswith("sfumato: error: ") and "not an image" in err and err.count("\n") == 1


# --- models / convert --------------------------------------------------------------------------------

def test_models_single_file(model, capsys):
    path = model["file"]
    code, out, _ = run(capsys, "models", path, "--json")
    assert code == 0
    d = json.loads(out)
    pipe = sfumato.load(path)
    assert (d["family"], d["prediction"], d["dtypes"], d["ema_weights"]) == ("sd1", "eps", ["float32"], False)
    counts = {name: c["parameters"] for name, c in d["components"].items()}
    expected = {"UNet": pipe.unet, "VAE": pipe.vae, "text encoder 0": pipe.text_encoders[0]}
    assert counts == {k: sum(p.numel() for p in m.parameters()) for k, m in expected.items()}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (d["sha256"], d["model_hash"]) == (digest, digest[:10])
    data = path.read_bytes()
    assert d["legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]

    code, out, _ = run(capsys, "models", path)
    assert code == 0 and "family:      sd1" in out and f"model hash:  {digest[:10]}" in out
    assert "legacy hash:" in out and f"{counts['UNet']:,}" in out


def test_legacy_hash_of_a_small_file(tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)  # shorter than the 1 MiB offset: the hash of nothing, as A1111 computes
    assert legacy_model_hash(small) == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"


def test_models_folder_and_errors(model, tmp_path, capsys):
    code, out, _ = run(capsys, "models", model["folder"], "--json")
    d = json.loads(out)
    assert code == 0 and d["family"] == "sd1" and "sha256" not in d
    assert d["components"]["UNet"]["parameters"] == json.loads(run(capsys, "models", model["file"], "--json",
                                                                   "--no-hash")[1])["components"]["UNet"]["parameters"]
    code, _, err = run(capsys, "models", tmp_path / "absent.safetensors")
    assert code == 2 and err == f"sfumato: error: {tmp_path / 'absent.safetensors'}: no such file or folder\n"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    code, _, err = run(capsys, "models", bad)
    assert code == 2 and err.startswith(f"sfumato: error: {bad}") and err.count("\n") == 1


def test_convert(model, tmp_path, capsys):
    out = tmp_path / "half.safetensors"
    code, stdout, _ = run(capsys, "convert", model["folder"], out, "--half")
    assert code == 0 and stdout == f"{out}\n"
    assert json.loads(run(capsys, "models", out, "--json", "--no-hash")[1])["dtypes"] == ["float16"]
    ref, conv = sfumato.load(model["file"]), sfumato.load(out)
    w = ref.unet.out[2].weight
    assert torch.equal(conv.unet.out[2].weight, w.half().float()), "fp16 round of the weights"

    before = out.read_bytes()
    code, _, err = run(capsys, "convert", model["folder"], out)
    assert code == 2 and err == f"sfumato: error: {out}: already exists; pass --overwrite to replace it\n"
    assert out.read_bytes() == before
    assert run(capsys, "convert", model["folder"], out, "--overwrite")[0] == 0
    assert json.loads(run(capsys, "models", out, "--json", "--no-hash")[1])["dtypes"] == ["float32"]

    folder = tmp_path / "diffusers-copy"
    assert run(capsys, "convert", model["file"], folder)[0] == 0  # no suffix: a diffusers folder
    assert (folder / "model_index.json").is_file()
    code, _, err = run(capsys, "convert", model["file"], tmp_path / "x.ckpt")
    assert code == 2 and ".safetensors" in err


# --- errors before any work --------------------------------------------------------------------------

def test_generate_errors(tmp_path, capsys, monkeypatch):
    absent = tmp_path / "absent.safetensors"
    code, out, err = run(capsys, "generate", "p", "--model", absent, "--outdir", tmp_path / "o", "-q")
    assert (code, out) == (2, "") and err == f"sfumato: error: {absent}: no such file or folder\n"
    # an installation without the built-in model's file: a clear one-line error, not a traceback
    import importlib.resources
    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path / "site-packages" / package)
    code, _, err = run(capsys, "generate", "p", "--outdir", tmp_path / "o", "-q")
    assert code == 2 and err.startswith("sfumato: error: ") and "built-in model" in err and err.count("\n") == 1
    monkeypatch.undo()

    existing = tmp_path / "taken.png"
    existing.write_bytes(b"keep me")
    code, _, err = run(capsys, "generate", "p", "--model", absent, "-o", existing)
    assert code == 2
    assert err == f"sfumato: error: {existing}: already exists; pass overwrite=True (--overwrite) to replace it\n"
    assert existing.read_bytes() == b"keep me"
    code, _, err = run(capsys, "generate", "p", "--model", absent, "-o", tmp_path / "x.gif2")
    assert code == 2 and "unknown image extension" in err
    code, _, err = run(capsys, "img2img", tmp_path / "nope.png", "p", "--model", absent)
    assert code == 2 and err == f"sfumato: error: {tmp_path / 'nope.png'}: no such file\n"


@needs_sampling
def test_bad_parameters_fail_before_loading(tmp_path, capsys):
    absent = tmp_path / "absent.safetensors"  # never reached: parameters are checked first
    code, _, err = run(capsys, "generate", "p", "--model", absent, "--sampler", "no_such_sampler", "-q")
    assert code == 2 and "no_such_sampler" in err and err.count("\n") == 1
    code, _, err = run(capsys, "generate", "p", "--model", absent, "--width", "500", "-q")
    assert code == 2 and "width=500" in err
    code, _, err = run(capsys, "generate", "p", "--model", absent, "--steps", "0", "-q")
    assert code == 2 and "steps=0" in err


# --- generation end to end ---------------------------------------------------------------------------

@needs_generate
def test_generate_img2img_inpaint(model, tmp_path, capsys):
    """Five runs of the command (each loads the model): numbered outputs with their infotext, the same
    seed giving the same pixels, a batch to -o, img2img over an existing file with --overwrite, inpaint."""
    outdir = tmp_path / "outputs"
    common = ["--model", model["file"], "--steps", "2", "--width", "64", "--height", "64"]
    code, out, err = run(capsys, "generate", "a red, round ball", "--seed", "7", "--outdir", outdir, *common)
    assert code == 0
    # stderr is not a terminal here: status lines and one progress line per run, no carriage returns
    assert "loading" in err and "2/2 steps in" in err and "\r" not in err
    first = outdir / "00001-7.png"
    assert out == f"{first}\n"
    p = params_from_infotext(read_parameters(first))
    assert (p.prompt, p.seed, p.steps, p.width, p.height) == ("a red, round ball", 7, 2, 64, 64)
    assert p.extra["Model"] == "tiny-sd1" and p.extra["Model hash"] == hashlib.sha256(
        model["file"].read_bytes()).hexdigest()[:10]

    # the same seed again: the next number, the same pixels
    code, out, err = run(capsys, "generate", "a red, round ball", "--seed", "7", "--outdir", outdir, "-q", *common)
    assert (code, out, err) == (0, f"{outdir / '00002-7.png'}\n", "")
    with Image.open(first) as a, Image.open(outdir / "00002-7.png") as b:
        assert a.tobytes() == b.tobytes()

    # -o with a batch, then refusing to overwrite it (before loading anything)
    target = tmp_path / "b.png"
    code, out, _ = run(capsys, "generate", "p", "--batch", "2", "-o", target, "--seed", "3", "-q", *common)
    assert code == 0 and out.split() == [str(tmp_path / "b-1.png"), str(tmp_path / "b-2.png")]
    code, _, err = run(capsys, "generate", "p", "--batch", "2", "-o", target, "-q", *common)
    assert code == 2 and "b-1.png: already exists" in err and "loading" not in err

    over = tmp_path / "i.png"
    over.write_bytes(b"old")
    code, out, _ = run(capsys, "img2img", first, "oil painting", "--strength", "0.5", "-o", over, "--overwrite",
                       "--seed", "1", "-q", *common)
    assert code == 0 and params_from_infotext(read_parameters(over)).strength == 0.5

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    code, out, _ = run(capsys, "inpaint", first, "a blue cube", "--mask", tmp_path / "mask.png", "--mask-blur", "2",
                       "--fill", "latent_noise", "-o", tmp_path / "in.png", "--seed", "1", "-q", *common)
    assert code == 0
    with Image.open(tmp_path / "in.png") as im:
        assert im.size == (64, 64)
        assert "Denoising strength: 1," in im.info["parameters"]


# --- progress ----------------------------------------------------------------------------------------

class _Step:
    def __init__(self, i: int, total: int) -> None:
        self.i, self.total = i, total


def test_progress_terminal_and_log():
    t = iter([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    tty = io.StringIO()
    bar = Progress(tty, tty=True, width=10, clock=lambda: next(t))
    for i in range(2):
        bar(_Step(i, 4))
    bar.close()
    assert tty.getvalue() == ("\r 25%|##        | 1/4 [00:01<00:03, 1.00it/s]"
                              "\r 50%|#####     | 2/4 [00:02<00:02, 1.00it/s]\n")

    t = iter([0.0, 1.0, 2.0, 8.0, 9.0, 100.0])
    log = io.StringIO()
    lines = Progress(log, tty=False, interval=5.0, clock=lambda: next(t))
    for i in range(4):
        lines(_Step(i, 4))
    lines(_Step(0, 2))  # a second run restarts the clock at the previous run's last report
    assert log.getvalue().splitlines() == [
        "step 1/4 (25%), 1.00it/s, ETA 00:03",
        "step 3/4 (75%), 3.50s/it, ETA 00:04",  # speed from the first report on: (8 - 1) / 2
        "4/4 steps in 9.0s (2.67s/it)",
        "step 1/2 (50%), 91.00s/it, ETA 01:31",
    ]
    quiet = io.StringIO()
    Progress(quiet, enabled=False)(_Step(0, 1))
    assert quiet.getvalue() == ""


# --- image files -------------------------------------------------------------------------------------

def test_save_image_is_atomic_and_refuses_overwrite(tmp_path):
    img = Image.new("RGB", (8, 8), (200, 0, 0))
    path = save_image(img, tmp_path / "sub" / "a.png", parameters="x")
    assert path.parent.is_dir()
    with pytest.raises(OutputExistsError, match="already exists"):
        save_image(Image.new("RGB", (8, 8)), path, parameters=None)
    with Image.open(path) as im:
        assert im.getpixel((0, 0)) == (200, 0, 0)
    save_image(Image.new("RGB", (8, 8)), path, parameters=None, overwrite=True)
    with Image.open(path) as im:
        assert im.getpixel((0, 0)) == (0, 0, 0) and "parameters" not in im.info

    class Exploding(Image.Image):
        def save(self, *a, **k):  # fails half-way through writing
            a[0].write(b"\x89PNG partial")
            raise OSError(28, "No space left on device")

    boom = Exploding()
    with pytest.raises(SfumatoError, match="No space left"):
        save_image(boom, tmp_path / "b.png", parameters=None)
    with pytest.raises(SfumatoError, match="No space left"):
        save_image(boom, path, parameters=None, overwrite=True)
    assert sorted(os.listdir(tmp_path / "sub")) == ["a.png"]  # nor a temporary file
    assert not (tmp_path / "b.png").exists()
    with Image.open(path) as im:
        assert im.getpixel((0, 0)) == (0, 0, 0)


def test_next_numbered_path(tmp_path):
    assert next_numbered_path(tmp_path / "absent", 5) == tmp_path / "absent" / "00001-5.png"
    for name in ("00007-123.png", "00003.jpg", "grid-0009.png", "notes.txt", "00002-1-extra.webp"):
        (tmp_path / name).write_bytes(b"")
    assert next_numbered_path(tmp_path, 42) == tmp_path / "00008-42.png"
    assert next_numbered_path(tmp_path, 42, ext=".jpg").name == "00008-42.jpg"


def test_load_image_modes(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = load_image(rgba)
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)
    half = load_image(Image.new("RGBA", (1, 1), (0, 0, 0, 128))).getpixel((0, 0))
    assert all(abs(c - 127) <= 1 for c in half)  # composited on white
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert load_image(pal).getpixel((0, 0)) == (10, 20, 30)
    assert load_image(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert load_image(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.new("I;16", (2, 2))
    deep.putpixel((0, 0), 65535)
    deep.save(tmp_path / "deep.png")
    img = load_image(tmp_path / "deep.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 1)) == (0, 0, 0)

    with pytest.raises(ImageReadError, match="no such file"):
        load_image(tmp_path / "absent.png")
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(ImageReadError, match="not an image"):
        load_image(tmp_path / "junk.png")
    good = tmp_path / "good.png"
    Image.effect_noise((64, 64), 50).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageReadError, match="cut.png"):
        load_image(tmp_path / "cut.png")


def test_load_mask_alpha_or_luminance():
    strokes = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    strokes.putpixel((1, 1), (0, 0, 0, 255))  # a black stroke on a transparent layer
    m = load_mask(strokes)
    assert m.mode == "L" and m.getpixel((1, 1)) == 255 and m.getpixel((0, 0)) == 0
    opaque = Image.new("RGBA", (4, 4), (255, 255, 255, 255))
    assert load_mask(opaque).getpixel((0, 0)) == 255  # fully opaque: luminance
    assert load_mask(Image.new("RGB", (2, 2), (0, 0, 0))).getpixel((0, 0)) == 0
