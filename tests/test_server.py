"""The server's AUTOMATIC1111 API, driven by the ``webuiapi`` client against a real uvicorn server on a
tiny random SD 1.x model: images and infotexts (read back with ``sd-parsers``), options and model
switching, progress / interrupt / skip, hires fix, 20 concurrent requests, bad input and fuzzed bodies."""

from __future__ import annotations

import base64
import io
import json
import random
import threading
import time

import numpy as np
import pytest
from PIL import Image

from .server_util import b64_png as _b64
from .server_util import decode_b64 as _decode
from .server_util import running

webuiapi = pytest.importorskip("webuiapi")
httpx = pytest.importorskip("httpx")

SIZE = 32
STEPS = 3


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    from sfumato.server.a1111 import Limits
    from sfumato.server.app import ServerConfig

    config = ServerConfig(model=tiny_models / "sd1", models_dir=tiny_models,
                          data_dir=tmp_path_factory.mktemp("server-data"), max_body=2 * 2**20,
                          limits=Limits(max_image_pixels=128 * 128, max_output_pixels=256 * 256, max_batch=16))
    with running(config) as srv:
        srv.api = webuiapi.WebUIApi(port=srv.port, sampler="Euler", steps=STEPS)
        yield srv


@pytest.fixture(scope="module")
def pipe(tiny_models):
    import sfumato

    return sfumato.load(tiny_models / "sd1")


def _post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def _reset_options(server):
    server.api.set_options({"sd_model_checkpoint": "sd1", "CLIP_stop_at_last_layers": 1})


def test_txt2img_matches_the_library_and_carries_its_infotext(server, pipe):
    from sd_parsers import ParserManager

    r = server.api.txt2img(prompt="a red cube", negative_prompt="blurry", width=SIZE, height=SIZE, seed=1234,
                           cfg_scale=5)
    assert len(r.images) == 1 and r.image.size == (SIZE, SIZE)
    direct = pipe.generate("a red cube", "blurry", width=SIZE, height=SIZE, steps=STEPS, cfg_scale=5,
                           sampler="euler", seed=1234, eta=1.0)
    assert np.array_equal(np.asarray(r.image.convert("RGB")), np.asarray(direct.images[0]))
    assert r.info["all_seeds"] == [1234] and r.info["sampler_name"] == "Euler"
    assert r.info["infotexts"][0] == direct.infotexts[0] == r.image.info["parameters"]
    assert r.parameters["prompt"] == "a red cube" and r.parameters["steps"] == STEPS

    parsed = ParserManager().parse(r.image)
    assert parsed.full_prompt == "a red cube" and parsed.full_negative_prompt == "blurry"
    sampler = parsed.samplers[0]
    assert sampler.name == "Euler"
    assert sampler.parameters["seed"] == "1234" and sampler.parameters["steps"] == str(STEPS)
    assert sampler.parameters["cfg_scale"] == "5" and parsed.metadata["Size"] == f"{SIZE}x{SIZE}"


def test_random_seed_is_resolved_and_recorded(server):
    r = server.api.txt2img(prompt="x", width=SIZE, height=SIZE, seed=-1, batch_size=2)
    seeds = r.info["all_seeds"]
    assert len(r.images) == 2 and seeds[0] >= 0 and f"Seed: {seeds[0]}," in r.info["infotexts"][1]
    assert "Batch pos: 1" in r.info["infotexts"][1]


def test_img2img_and_inpainting_fields(server):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    r = server.api.img2img(images=[init], prompt="a dog", width=SIZE, height=SIZE, seed=3,
                           denoising_strength=0.5)
    assert r.image.size == (SIZE, SIZE) and "Denoising strength: 0.5" in r.info["infotexts"][0]
    assert r.parameters["init_images"] is None  # webui sends them back only with include_init_images

    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 24, 24))
    r = server.api.img2img(images=[init], mask_image=mask, prompt="a dog", width=SIZE, height=SIZE, seed=3,
                           inpainting_fill=2, inpaint_full_res=False, mask_blur=2, denoising_strength=1.0)
    text = r.info["infotexts"][0]
    assert "Masked content: latent noise" in text and r.image.size == (SIZE, SIZE)
    out = np.asarray(r.image.convert("RGB")).astype(int)
    keep = np.ones((SIZE, SIZE), bool)
    keep[2:30, 2:30] = False  # beyond the blurred edge of the mask: the input image, pasted back
    assert np.abs(out[keep] - np.asarray(init)[keep]).max() <= 1
    inside = np.asarray(mask) > 0
    assert np.abs(out[inside] - np.asarray(init)[inside]).mean() > 5  # inside: repainted


def test_png_info_options_and_model_switching(server):
    api = server.api
    try:
        r = api.txt2img(prompt="p", width=SIZE, height=SIZE, seed=5)
        info = api.png_info(r.image)
        assert info.info == r.info["infotexts"][0]
        assert info.json["parameters"]["Seed"] == "5" and info.json["parameters"]["Prompt"] == "p"

        assert api.get_options()["sd_model_checkpoint"] == "sd1"
        assert sorted(api.util_get_model_names()) == ["sd1", "sd1b"]
        api.set_options({"sd_model_checkpoint": "sd1b", "CLIP_stop_at_last_layers": 2})
        r2 = api.txt2img(prompt="p", width=SIZE, height=SIZE, seed=5)
        assert "Model: sd1b" in r2.info["infotexts"][0] and "Clip skip: 2" in r2.info["infotexts"][0]
        assert r2.info["sd_model_name"] == "sd1b"
        r3 = api.txt2img(prompt="p", width=SIZE, height=SIZE, seed=5,
                         override_settings={"sd_model_checkpoint": "sd1 [0123456789]", "CLIP_stop_at_last_layers": 1})
        assert "Model: sd1," in r3.info["infotexts"][0]
        assert np.array_equal(np.asarray(r3.image), np.asarray(r.image))
        assert api.get_options()["sd_model_checkpoint"] == "sd1b"  # override_settings are per request
    finally:
        _reset_options(server)
    bad = _post(server, "/sdapi/v1/options", {"sd_model_checkpoint": "nope"})
    assert bad.status_code == 400 and "sd1b" in bad.json()["detail"]
    bad = _post(server, "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 40})
    assert bad.status_code == 422 and "[1, 12]" in bad.json()["detail"]

    names = api.util_get_sampler_names()
    assert "Euler a" in names and "DPM++ 2M" in names
    assert "karras" in api.util_get_scheduler_names()
    assert api.get_loras() == [] and httpx.get(server.url + "/sdapi/v1/embeddings").json()["loaded"] == {}
    assert httpx.post(server.url + "/sdapi/v1/refresh-checkpoints").status_code == 200


def test_refiner_checkpoint(server):
    r = _post(server, "/sdapi/v1/txt2img", {"prompt": "q", "width": SIZE, "height": SIZE, "seed": 9, "steps": 4,
                                            "refiner_checkpoint": "sd1b", "refiner_switch_at": 0.5})
    assert r.status_code == 200, r.text
    text = json.loads(r.json()["info"])["infotexts"][0]
    assert "Refiner: sd1b" in text and "Refiner switch at: 0.5" in text


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix(server, upscaler):
    r = server.api.txt2img(prompt="h", width=SIZE, height=SIZE, seed=2, enable_hr=True, hr_scale=1.5,
                           hr_upscaler=upscaler, hr_second_pass_steps=2, denoising_strength=0.6)
    assert r.image.size == (48, 48)
    text = r.info["infotexts"][0]
    assert f"Hires upscaler: {upscaler}" in text and "Hires upscale: 1.5" in text and "Hires steps: 2" in text
    assert "Size: 32x32" in text and "Denoising strength: 0.6" in text


def _in_thread(fn):
    out = {}

    def target():
        try:
            out["result"] = fn()
        except Exception as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    return t, out


def _wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_progress_interrupt_and_skip(server):
    api = server.api
    t, out = _in_thread(lambda: api.txt2img(prompt="long", width=SIZE, height=SIZE, seed=4, steps=2000))
    prog = _wait_for(lambda: (p := api.get_progress())["progress"] > 0 and p["current_image"] and p)
    assert prog["state"]["sampling_steps"] == 2000 and 0 < prog["state"]["sampling_step"] < 2000
    assert 0 < prog["progress"] < 1 and prog["eta_relative"] > 0
    assert _decode(prog["current_image"]).size == (SIZE, SIZE)
    api.interrupt()
    t.join(30)
    assert "error" not in out, out
    r = out["result"]
    assert len(r.images) == 1 and r.info["state"] == "interrupted"  # webui returns the image so far
    assert api.get_progress()["state"]["job"] == ""

    # skip ends only the current iteration: the second still runs (and is then interrupted)
    t, out = _in_thread(lambda: api.txt2img(prompt="long", width=SIZE, height=SIZE, seed=4, steps=2000, n_iter=2))
    _wait_for(lambda: api.get_progress()["state"]["sampling_step"] > 0)
    api.skip()
    _wait_for(lambda: (s := api.get_progress()["state"])["job_no"] == 1 and s["sampling_step"] > 0)
    api.interrupt()
    t.join(30)
    assert "error" not in out, out
    assert out["result"].info["all_seeds"] == [4, 5]


def test_twenty_concurrent_requests(server, pipe):
    seeds = [100 + i // 2 if i < 10 else 200 + i for i in range(20)]  # pairs of equal seeds, then distinct ones

    def one(seed):
        r = _post(server, "/sdapi/v1/txt2img", {"prompt": "a tree", "width": SIZE, "height": SIZE,
                                                "steps": STEPS, "seed": seed, "sampler_name": "Euler"})
        assert r.status_code == 200, r.text
        return np.asarray(_decode(r.json()["images"][0]).convert("RGB"))

    threads = [_in_thread(lambda s=s: one(s)) for s in seeds]
    for t, _ in threads:
        t.join(120)
    images = []
    for _, out in threads:
        assert "error" not in out, out
        images.append(out["result"])
    by_seed: dict[int, np.ndarray] = {}
    for seed, img in zip(seeds, images):
        if seed in by_seed:
            assert np.array_equal(by_seed[seed], img)
        by_seed[seed] = img
    distinct = list(by_seed.values())
    assert len({a.tobytes() for a in distinct}) == len(distinct) == 15
    for seed in (100, 214, 219):
        direct = pipe.generate("a tree", width=SIZE, height=SIZE, steps=STEPS, sampler="euler", seed=seed)
        assert np.array_equal(by_seed[seed], np.asarray(direct.images[0]))


@pytest.mark.parametrize("body, status, words", [
    ({"steps": 0}, 422, ["steps", "[1, 10000]"]),
    ({"width": 33}, 422, ["width", "multiple of 8"]),
    ({"cfg_scale": 1000}, 422, ["cfg_scale", "100"]),
    ({"batch_size": 17}, 422, ["batch_size", "[1, 16]"]),
    ({"width": 512, "height": 512}, 422, ["width x height", "65536"]),
    ({"sampler_name": "Euler z"}, 400, ["unknown sampler", "DPM++ 2M"]),
    ({"scheduler": "fancy"}, 400, ["unknown schedule", "karras"]),
    ({"override_settings": {"sd_model_checkpoint": "missing"}}, 400, ["unknown model", "sd1b"]),
    ({"enable_hr": True, "hr_upscaler": "ESRGAN"}, 400, ["hr_upscaler", "Lanczos"]),
    ({"prompt": ["a"]}, 422, ["prompt"]),
])
def test_bad_txt2img_fields(server, body, status, words):
    r = _post(server, "/sdapi/v1/txt2img", {"width": SIZE, "height": SIZE, "steps": 1, **body})
    assert r.status_code == status, r.text
    for w in words:
        assert w in r.json()["detail"]


def test_bad_images_and_sizes(server):
    png = _b64(Image.new("RGB", (SIZE, SIZE)))
    cases = [
        ({"init_images": ["not base64!"]}, 400, "init_images[0] is not valid base64"),
        ({"init_images": [base64.b64encode(b"hello").decode()]}, 400, "not a readable image"),
        ({"init_images": []}, 422, "init_images"),
        ({"init_images": [png], "mask": "%%%"}, 400, "mask is not valid base64"),
        ({"init_images": [_b64(Image.new("RGB", (256, 256)))]}, 413, "16384 pixels"),
        ({"init_images": [png], "inpainting_fill": 7, "mask": png}, 422, "inpainting_fill"),
    ]
    for body, status, words in cases:
        r = _post(server, "/sdapi/v1/img2img", {"width": SIZE, "height": SIZE, "steps": 1, **body})
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["detail"]
    big = httpx.post(server.url + "/sdapi/v1/txt2img", content=b"{" + b" " * (3 * 2**20) + b"}",
                     headers={"content-type": "application/json"}, timeout=60)
    assert big.status_code == 413
    r = httpx.post(server.url + "/sdapi/v1/txt2img", content=b"{not json", timeout=60)
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    r = httpx.post(server.url + "/sdapi/v1/png-info", json={"image": "@@"}, timeout=60)
    assert r.status_code == 400
    # still serving
    assert _post(server, "/sdapi/v1/txt2img", {"width": SIZE, "height": SIZE, "steps": 1}).status_code == 200


def test_fuzzed_bodies_never_crash_it(server):
    rng = random.Random(0)
    pool = [None, -1, 0, 1, 2, 2.5, -3.5, 1e308, 10**20, True, False, "", "x", "Euler", "1", [], [1], {}, {"a": 1}]
    fields = ["prompt", "negative_prompt", "steps", "cfg_scale", "sampler_name", "scheduler", "seed", "subseed",
              "subseed_strength", "batch_size", "n_iter", "eta", "s_churn", "s_tmax", "s_noise", "enable_hr",
              "hr_scale", "hr_upscaler", "denoising_strength", "hr_second_pass_steps", "override_settings",
              "refiner_checkpoint", "refiner_switch_at", "send_images", "hr_sampler_name", "mask", "init_images",
              "inpainting_fill", "mask_blur", "inpaint_full_res_padding", "inpainting_mask_invert", "styles"]
    statuses = set()
    for i in range(40):
        body = {k: rng.choice(pool) for k in rng.sample(fields, rng.randint(1, 8))}
        body.update(width=16, height=16)
        if isinstance(body.get("steps"), int) and not isinstance(body.get("steps"), bool) and body["steps"] > 2:
            body["steps"] = 2
        route = rng.choice(["/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/api/v1/jobs"])
        r = _post(server, route, body)
        statuses.add(r.status_code)
        assert r.status_code in (200, 202, 400, 413, 422), (route, body, r.text)
        if r.status_code >= 400:
            assert isinstance(r.json()["detail"], str)
    for raw in [b"", b"null", b"[]", b"\xff\xfe", b'{"width": 16', json.dumps([{"a": 1}]).encode()]:
        r = httpx.post(server.url + "/sdapi/v1/txt2img", content=raw, timeout=60)
        assert r.status_code in (200, 400, 422), (raw, r.text)
    assert {200, 422} <= statuses
    assert httpx.get(server.url + "/api/v1/health").json()["ok"]
