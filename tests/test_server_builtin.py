"""The server with no --model serves the built-in model: an AUTOMATIC1111 client (webuiapi) generates
at the model's size and gets the same pixels and infotext as the library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .server_util import running

webuiapi = pytest.importorskip("webuiapi")

_SHIPPED = (Path(__file__).resolve().parents[1] / "src" / "sfumato" / "data" / "builtin" / "model.safetensors").is_file()
pytestmark = pytest.mark.skipif(not _SHIPPED, reason="built-in model not shipped")


def test_default_server_model_is_the_builtin(tmp_path):
    import sfumato
    from sfumato.cli import _builtin_or_none
    from sfumato.server.app import ServerConfig

    default = _builtin_or_none()  # what `sfumato serve` without --model serves
    assert default is not None
    with running(ServerConfig(model=default, data_dir=tmp_path / "data")) as srv:
        api = webuiapi.WebUIApi(port=srv.port, sampler="Euler", steps=20)
        r = api.txt2img(prompt="a red circle on a white background", width=64, height=64, seed=7, cfg_scale=7)
        models = api.get_sd_models()
    direct = sfumato.load().generate("a red circle on a white background", width=64, height=64, steps=20,
                                     cfg_scale=7, sampler="euler", seed=7, eta=1.0)
    assert np.array_equal(np.asarray(r.image.convert("RGB")), np.asarray(direct.images[0]))
    assert r.info["infotexts"][0] == direct.infotexts[0]
    assert any(m["model_name"] == "model" or "builtin" in str(m).lower() for m in models), models


def test_webuiapi_drives_every_route_on_the_builtin(tmp_path):
    """img2img, inpainting, progress with a preview, interrupt, options and png-info through AUTOMATIC1111's
    client, on the model a fresh install serves; the images equal the library's."""
    import threading
    import time

    from PIL import Image

    import sfumato
    from sfumato.cli import _builtin_or_none
    from sfumato.server.app import ServerConfig

    pipe = sfumato.load()
    init = pipe.generate("a blue square on a yellow background", width=64, height=64, steps=8, seed=3).images[0]
    with running(ServerConfig(model=_builtin_or_none(), data_dir=tmp_path / "data")) as srv:
        api = webuiapi.WebUIApi(port=srv.port, sampler="Euler", steps=8)
        r = api.img2img(images=[init], prompt="a red star on a yellow background", width=64, height=64, seed=5,
                        denoising_strength=0.6, cfg_scale=7)
        direct = pipe.img2img(init, "a red star on a yellow background", strength=0.6, steps=8, cfg_scale=7,
                              sampler="euler", seed=5, eta=1.0, img2img_mode="a1111")
        assert np.array_equal(np.asarray(r.image.convert("RGB")), np.asarray(direct.images[0]))
        assert r.info["infotexts"][0] == direct.infotexts[0]

        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        r = api.img2img(images=[init], mask_image=mask, prompt="a green circle", width=64, height=64, seed=6,
                        denoising_strength=1.0, inpainting_fill=1, mask_blur=0)
        out, src = np.asarray(r.image.convert("RGB")).astype(int), np.asarray(init).astype(int)
        assert np.abs(out[:8] - src[:8]).max() <= 1 and np.abs(out[20:44, 20:44] - src[20:44, 20:44]).mean() > 3

        info = api.png_info(r.image)
        assert info.info == r.info["infotexts"][0] and info.json["parameters"]["Seed"] == "6"
        assert api.get_options()["sd_model_checkpoint"] == "model.safetensors"
        api.set_options({"CLIP_stop_at_last_layers": 2})
        assert api.get_options()["CLIP_stop_at_last_layers"] == 2
        assert "Clip skip: 2" in api.txt2img(prompt="a ring", width=64, height=64, seed=1).info["infotexts"][0]
        api.set_options({"CLIP_stop_at_last_layers": 1})

        done = {}
        t = threading.Thread(target=lambda: done.update(r=api.txt2img(prompt="a star", width=64, height=64,
                                                                       seed=2, steps=5000)))
        t.start()
        deadline = time.monotonic() + 60
        while not ((p := api.get_progress())["progress"] > 0 and p["current_image"]):
            assert time.monotonic() < deadline, "no progress reported"
            time.sleep(0.05)
        assert p["state"]["sampling_steps"] == 5000 and p["eta_relative"] > 0
        api.interrupt()
        t.join(60)
        assert done["r"].info["state"] == "interrupted" and done["r"].image.size == (64, 64)
