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
