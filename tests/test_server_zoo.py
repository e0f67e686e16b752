"""The SD 2 zoo in the server, on tiny random models saved as single files with ``Pipeline.save``: the x4
upscaler offered as an upscaler (``/sdapi/v1/upscalers``, not ``sd-models``), webui's Extras routes
(``extra-single-image`` / ``extra-batch-images``) and the hires fix with it, and the native job types
"upscale", "edit", "depth2img" and "variations" — each the same pixels as the Python method with the same parameters."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from .server_util import b64_png as _b64
from .server_util import decode_b64 as _decode
from .server_util import running

httpx = pytest.importorskip("httpx")

UPSCALER = "x4-tiny"
STEPS = 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import sfumato

    from . import tiny

    if not tiny.SHARED_BPE.exists():
        pytest.skip("needs ../shared/clip-bpe beside the repo")
    build, root = tmp_path_factory.mktemp("zoo-build"), tmp_path_factory.mktemp("zoo-models")
    tiny.build("sd1", root / "sd1", seed=31)
    for kind, name in (("upscaler", f"{UPSCALER}.safetensors"), ("pix2pix", "pix2pix.safetensors"),
                       ("depth", "depth.safetensors"), ("unclip", "unclip.safetensors")):
        sfumato.load(tiny.build_zoo(kind, build / kind, seed=3)).save(root / name)
    return root


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    from sfumato.server.app import ServerConfig

    config = ServerConfig(model=models / "sd1", models_dir=models, data_dir=tmp_path_factory.mktemp("zoo-data"),
                          upscaler_steps=STEPS, upscaler_noise_level=30)
    with running(config) as srv:
        yield srv


@pytest.fixture(scope="module")
def pipes(models):
    import sfumato

    return {name: sfumato.load(models / f) for name, f in (
        ("sd1", "sd1"), ("up", f"{UPSCALER}.safetensors"), ("pix2pix", "pix2pix.safetensors"),
        ("depth", "depth.safetensors"), ("unclip", "unclip.safetensors"))}


def _image(seed: int, size: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def _post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=120)


def test_upscaler_models_are_upscalers_not_models(server):
    ups = httpx.get(server.url + "/sdapi/v1/upscalers", timeout=30).json()
    assert [u["name"] for u in ups] == ["None", "Lanczos", "Nearest", UPSCALER]
    assert ups[-1]["model_name"] == UPSCALER and ups[-1]["model_path"].endswith(f"{UPSCALER}.safetensors")
    assert ups[-1]["scale"] == 4 and ups[-1]["model_url"] is None
    titles = [m["title"] for m in httpx.get(server.url + "/sdapi/v1/sd-models", timeout=30).json()]
    assert titles == ["sd1", "depth.safetensors", "pix2pix.safetensors", "unclip.safetensors"]
    r = _post(server, "/sdapi/v1/options", {"sd_model_checkpoint": UPSCALER})
    assert r.status_code == 400 and "is an upscaler" in r.json()["detail"]


def test_extras_sd_upscaler_matches_the_library(server, pipes):
    low = _image(1, 8)
    r = _post(server, "/sdapi/v1/extra-single-image", {"image": _b64(low), "upscaler_1": UPSCALER,
                                                       "upscaling_resize": 4, "seed": 5})
    assert r.status_code == 200, r.text
    got = _decode(r.json()["image"])
    want = pipes["up"].upscale(low, "", noise_level=30, steps=STEPS, seed=5).images[0]
    assert got.size == (32, 32) and _same(got, want)
    text = got.info["postprocessing"]
    assert text == (f"Postprocess upscale by: 4, Postprocess upscaler: {UPSCALER}, Postprocess upscaler steps: 2, "
                    "Postprocess upscaler noise level: 30, Postprocess upscaler CFG scale: 9, "
                    "Postprocess upscaler seed: 5")
    assert text in r.json()["html_info"]
    # by 2: the x4 pass, then Lanczos down to the target (webui's Upscaler.upscale); the default seed is 0
    r = _post(server, "/sdapi/v1/extra-single-image", {"image": _b64(low), "upscaler_1": UPSCALER})
    want = pipes["up"].upscale(low, "", noise_level=30, steps=STEPS, seed=0).images[0].resize((16, 16), Image.LANCZOS)
    assert _same(_decode(r.json()["image"]), want)


def test_extras_pil_upscalers_resize_mode_and_batch(server):
    a, b = _image(2, 16), _image(3, 24)
    png = io.BytesIO()
    a.save(png, format="PNG", pnginfo=_pnginfo("a prompt, Steps: 3"))
    a_b64 = base64.b64encode(png.getvalue()).decode()
    r = _post(server, "/sdapi/v1/extra-single-image", {"image": a_b64, "upscaler_1": "Lanczos",
                                                       "upscaling_resize": 2})
    got = _decode(r.json()["image"])
    assert _same(got, a.resize((32, 32), Image.LANCZOS))
    assert got.info["parameters"] == "a prompt, Steps: 3"  # the input's own infotext is kept
    assert got.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    # resize_mode 1 with crop: scaled to cover 40x24 (2.5x), then the centre 40x24; upscaler 2 blended in
    r = _post(server, "/sdapi/v1/extra-batch-images", {
        "imageList": [{"data": _b64(a), "name": "a.png"}, {"data": _b64(b), "name": "b.png"}], "resize_mode": 1,
        "upscaling_resize_w": 40, "upscaling_resize_h": 24, "upscaler_1": "Nearest", "upscaler_2": "Lanczos",
        "extras_upscaler_2_visibility": 0.25})
    assert r.status_code == 200, r.text
    images = [_decode(x) for x in r.json()["images"]]
    for src, got in zip((a, b), images):
        s = max(40 / src.width, 24 / src.height)
        tw, th = int(src.width * s) // 8 * 8, int(src.height * s) // 8 * 8

        def up(resample, src=src, s=s, tw=tw, th=th):
            im = src.resize((int(src.width * s), int(src.height * s)), resample)
            im = im if im.size == (tw, th) else im.resize((tw, th), Image.LANCZOS)
            out = Image.new("RGB", (40, 24))
            out.paste(im, box=(20 - im.width // 2, 12 - im.height // 2))
            return out

        assert _same(got, Image.blend(up(Image.NEAREST), up(Image.LANCZOS), 0.25))
        assert got.info["postprocessing"] == ("Postprocess upscale to: 40x24, Postprocess crop to: 40x24, "
                                              "Postprocess upscaler: Nearest, Postprocess upscaler 2: Lanczos")
    r = _post(server, "/sdapi/v1/extra-single-image", {"image": _b64(a), "upscaler_1": "None"})
    assert _same(_decode(r.json()["image"]), a) and r.json()["html_info"] == "<p></p>"


def _pnginfo(text: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    return info


@pytest.mark.parametrize("body,status,words", [
    ({"upscaler_1": "ESRGAN_4x"}, 400, ["upscaler_1", "ESRGAN_4x", "Lanczos", UPSCALER]),
    ({"upscaler_1": "Lanczos", "upscaler_2": "nope"}, 400, ["upscaler_2", "nope", UPSCALER]),
    ({"resize_mode": 2}, 422, ["resize_mode=2", "0 (scale", "1 (to"]),
    ({"gfpgan_visibility": 0.5}, 422, ["gfpgan_visibility", "face restoration"]),
    ({"codeformer_visibility": 1}, 422, ["codeformer_visibility"]),
    ({"upscaling_resize": 9}, 422, ["upscaling_resize", "[1.0, 8.0]"]),
    ({"image": "%%%"}, 400, ["image", "base64"]),
])
def test_extras_bad_input(server, body, status, words):
    r = _post(server, "/sdapi/v1/extra-single-image", {"image": _b64(_image(0, 8)), "upscaler_1": "Lanczos", **body})
    assert r.status_code == status, r.text
    assert all(w in r.json()["detail"] for w in words), r.json()["detail"]


def test_bad_upscaler_then_the_server_still_serves(server):
    r = _post(server, "/sdapi/v1/extra-batch-images", {"imageList": [{"data": _b64(_image(0, 8)), "name": "x"}],
                                                       "upscaler_1": "nope"})
    assert r.status_code == 400 and UPSCALER in r.json()["detail"]
    r = _post(server, "/sdapi/v1/txt2img", {"prompt": "still here", "width": 16, "height": 16, "steps": 1})
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_hires_fix_with_the_x4_upscaler(server, pipes):
    body = {"prompt": "a hill", "negative_prompt": "fog", "width": 16, "height": 16, "steps": 2, "seed": 11,
            "sampler_name": "Euler", "enable_hr": True, "hr_scale": 2, "hr_upscaler": f"{UPSCALER}.safetensors",
            "denoising_strength": 0.5}
    r = _post(server, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    got = _decode(r.json()["images"][0])
    text = got.info["parameters"]
    assert f"Hires upscaler: {UPSCALER}," in text and "Hires upscaler noise level: 30" in text
    sd1, up = pipes["sd1"], pipes["up"]
    first = sd1.generate("a hill", "fog", width=16, height=16, steps=2, seed=11, sampler="euler").images[0]
    big = up.upscale(first, "a hill", "fog", noise_level=30, steps=STEPS, seed=11).images[0]
    want = sd1.img2img(big.resize((32, 32), Image.LANCZOS), "a hill", "fog", strength=0.5, width=32, height=32,
                       steps=2, seed=11, sampler="euler", img2img_mode="a1111").images[0]
    assert _same(got, want)
    r = _post(server, "/sdapi/v1/txt2img", {**body, "hr_upscaler": "ESRGAN"})
    assert r.status_code == 400 and UPSCALER in r.json()["detail"] and "Latent" in r.json()["detail"]


def _wait(server, job_id: str) -> dict:
    deadline = time.monotonic() + 120
    while (d := httpx.get(f"{server.url}/api/v1/jobs/{job_id}", timeout=30).json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, d
        time.sleep(0.05)
    return d


def _job(server, body) -> tuple[list[Image.Image], dict]:
    r = _post(server, "/api/v1/jobs", body)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    d = _wait(server, job_id)
    assert d["state"] == "done", d
    images = [Image.open(io.BytesIO(httpx.get(server.url + u, timeout=30).content)) for u in d["images"]]
    return images, d


def test_native_job_types_match_the_library(server, pipes):
    image = _image(4, 32)
    images, d = _job(server, {"type": "upscale", "image": _b64(_image(5, 8)), "prompt": "sharp", "steps": 2,
                              "noise_level": 40, "seed": 3})
    want = pipes["up"].upscale(_image(5, 8), "sharp", noise_level=40, steps=2, seed=3)
    assert _same(images[0], want.images[0]) and d["infotexts"] == want.infotexts and d["seeds"] == [3]
    assert d["type"] == d["mode"] == "upscale" and "image" not in d["parameters"]

    images, d = _job(server, {"type": "edit", "image": _b64(image), "instruction": "add snow", "steps": 2,
                              "image_cfg_scale": 1.2, "seed": 4, "sampler_name": "Euler", "n_iter": 2})
    for i in range(2):
        want = pipes["pix2pix"].edit(image, "add snow", image_cfg_scale=1.2, steps=2, seed=4 + i, sampler="euler")
        assert _same(images[i], want.images[0]) and d["infotexts"][i] == want.infotexts[0]
    assert d["seeds"] == [4, 5]

    yy, xx = np.mgrid[0:32, 0:32]
    depth = Image.fromarray((np.hypot(yy - 10.0, xx - 20.0) * 6).astype(np.uint8))
    images, d = _job(server, {"type": "depth2img", "image": _b64(image), "depth_map": _b64(depth), "prompt": "a room",
                              "strength": 0.6, "steps": 3, "seed": 6, "model": "depth"})
    want = pipes["depth"].depth2img(image, "a room", strength=0.6, depth_map=depth, steps=3, seed=6, sampler="euler")
    assert _same(images[0], want.images[0]) and d["infotexts"] == want.infotexts
    assert "depth_map" not in d["parameters"]
    images, d = _job(server, {"type": "variations", "image": _b64(image), "prompt": "a boat", "noise_level": 30,
                              "steps": 2, "seed": 7, "width": 64, "height": 64})
    want = pipes["unclip"].variations(image, "a boat", noise_level=30, steps=2, seed=7, width=64, height=64,
                                      sampler="euler")
    assert _same(images[0], want.images[0]) and d["infotexts"] == want.infotexts
    # no depth map and a model without a depth estimator: the job fails, saying why, and the server goes on
    r = _post(server, "/api/v1/jobs", {"type": "depth2img", "image": _b64(image), "steps": 1})
    failed = _wait(server, r.json()["id"])
    assert failed["state"] == "failed" and "depth_map" in failed["error"] and "depth estimator" in failed["error"]


@pytest.mark.parametrize("body,status,words", [
    ({"type": "edit", "instruction": "x", "noise_level": 3}, 422, ["does not take noise_level", "image_cfg_scale"]),
    ({"type": "edit", "instruction": "x", "model": "sd1"}, 422, ["needs an instruct-pix2pix model", "sd1"]),
    ({"type": "upscale", "model": "sd1"}, 400, ["not an upscaler", UPSCALER]),
    ({"type": "upscale", "noise_level": 351}, 422, ["noise_level=351", "[0, 350]"]),
    ({"type": "upscale", "tile_size": 4}, 422, ["tile_size=4", "[8, 8192]"]),
    ({"type": "edit", "instruction": "x", "image_cfg_scale": -1}, 422, ["image_cfg_scale=-1"]),
    ({"type": "edit"}, 422, ["needs image"]),
    ({"type": "teleport"}, 422, ["upscale", "edit", "depth2img", "variations"]),
    ({"type": "variations", "model": "sd1"}, 422, ["needs an unCLIP model", "sd1"]),
    ({"type": "variations", "noise_level": 1000}, 422, ["noise_level=1000", "[0, 999]"]),
])
def test_native_job_validation(server, body, status, words):
    if body["type"] != "edit" or len(body) > 1:
        body = {"image": _b64(_image(0, 8)), **body}
    r = _post(server, "/api/v1/jobs", body)
    assert r.status_code == status, r.text
    assert all(w in r.json()["detail"] for w in words), r.json()["detail"]


def test_upscaler_options_are_checked():
    from sfumato.server.app import ServerConfig, ServerConfigError

    with pytest.raises(ServerConfigError, match="--upscaler-noise-level 351"):
        ServerConfig(upscaler_noise_level=351).check()
    with pytest.raises(ServerConfigError, match="--upscaler-steps 0"):
        ServerConfig(upscaler_steps=0).check()
