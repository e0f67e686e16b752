"""The native job API and what survives a server: SQLite history across a restart, re-queued jobs, a
crashed (killed) server's running job marked failed, cancellation, event streams; authentication with
--listen; the per-device LRU model cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .server_util import free_port, running

httpx = pytest.importorskip("httpx")

SIZE = 32
JOB = {"type": "txt2img", "prompt": "a boat", "width": SIZE, "height": SIZE, "steps": 3, "seed": 7,
       "sampler_name": "Euler"}
LONG = {**JOB, "steps": 5000}


def _config(models: Path, data: Path, **kw):
    from sfumato.server.app import ServerConfig

    return ServerConfig(model=models / "sd1", models_dir=models, data_dir=data, **kw)


def _wait_state(url: str, job_id: str, states: tuple[str, ...], timeout: float = 60, **kw) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = httpx.get(f"{url}/api/v1/jobs/{job_id}", timeout=30, **kw).json()
        if d["state"] in states:
            return d
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {states}: {d}")


def test_job_api_events_images_and_history_across_restart(tiny_models, tmp_path):
    from sd_parsers import ParserManager

    from sfumato.metadata import read_parameters

    data = tmp_path / "data"
    with running(_config(tiny_models, data)) as srv:
        r = httpx.post(srv.url + "/api/v1/jobs", json=JOB, timeout=30)
        assert r.status_code == 202
        job_id = r.json()["id"]
        events = []
        with httpx.stream("GET", f"{srv.url}/api/v1/jobs/{job_id}/events", timeout=60) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                elif line.startswith("data: "):
                    last = json.loads(line[6:])
        assert events[-1] == "end" and last["state"] == "done"
        assert "progress" in events
        d = httpx.get(f"{srv.url}/api/v1/jobs/{job_id}").json()
        assert d["state"] == "done" and d["progress"] == 1.0 and d["seeds"] == [7] and len(d["images"]) == 1
        png = httpx.get(srv.url + d["images"][0]).content
        path = tmp_path / "out.png"
        path.write_bytes(png)
        assert read_parameters(path) == d["infotexts"][0]
        assert ParserManager().parse(path).samplers[0].parameters["seed"] == "7"

        # a long job and one queued behind it; shutting down cancels the running one, keeps the queued one
        long_id = httpx.post(srv.url + "/api/v1/jobs", json=LONG).json()["id"]
        queued_id = httpx.post(srv.url + "/api/v1/jobs", json={**JOB, "seed": 8}).json()["id"]
        _wait_state(srv.url, long_id, ("running",))
        assert httpx.get(f"{srv.url}/api/v1/jobs/{queued_id}").json()["state"] == "queued"

    with running(_config(tiny_models, data)) as srv:  # same data folder: the history is there
        d = httpx.get(f"{srv.url}/api/v1/jobs/{job_id}").json()
        assert d["state"] == "done" and httpx.get(srv.url + d["images"][0]).content == png
        assert httpx.get(f"{srv.url}/api/v1/jobs/{long_id}").json()["state"] == "cancelled"
        d = _wait_state(srv.url, queued_id, ("done", "failed"))
        assert d["state"] == "done" and d["seeds"] == [8]  # queued again after the restart, and run
        listed = [j["id"] for j in httpx.get(srv.url + "/api/v1/jobs").json()]
        assert {job_id, long_id, queued_id} <= set(listed)


def test_cancel_running_and_queued_jobs(tiny_models, tmp_path):
    from sfumato.server.app import ServerConfig

    models = tmp_path / "models"
    models.mkdir()
    (models / "broken.safetensors").write_bytes(b"not a checkpoint")
    with running(ServerConfig(model=tiny_models / "sd1", models_dir=models, data_dir=tmp_path / "data")) as srv:
        long_id = httpx.post(srv.url + "/api/v1/jobs", json=LONG).json()["id"]
        queued_id = httpx.post(srv.url + "/api/v1/jobs", json=JOB).json()["id"]
        _wait_state(srv.url, long_id, ("running",))
        d = httpx.delete(f"{srv.url}/api/v1/jobs/{queued_id}", timeout=30).json()
        assert d["state"] == "cancelled"
        png = _wait_preview(srv.url, long_id)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        d = httpx.delete(f"{srv.url}/api/v1/jobs/{long_id}", timeout=30).json()
        assert d["state"] == "cancelled" and d["images"] == []
        assert httpx.delete(f"{srv.url}/api/v1/jobs/{long_id}").status_code == 409
        assert httpx.get(f"{srv.url}/api/v1/jobs/nope").status_code == 404
        assert httpx.delete(f"{srv.url}/api/v1/jobs/nope").status_code == 404
        r = httpx.post(srv.url + "/api/v1/jobs", json={**JOB, "type": "teleport"})
        assert r.status_code == 422 and "txt2img, img2img" in r.json()["detail"]
        # a job failing while it runs is recorded, and the worker goes on
        broken = {**JOB, "override_settings": {"sd_model_checkpoint": "broken.safetensors"}}
        bad = httpx.post(srv.url + "/api/v1/jobs", json=broken).json()["id"]
        d = _wait_state(srv.url, bad, ("done", "failed"))
        assert d["state"] == "failed" and "broken.safetensors" in d["error"]
        r = httpx.post(srv.url + "/sdapi/v1/txt2img", json=broken, timeout=30)
        assert r.status_code == 500 and "broken.safetensors" in r.json()["detail"]  # the server's own fault
        assert _wait_state(srv.url, httpx.post(srv.url + "/api/v1/jobs", json=JOB).json()["id"],
                           ("done",))["seeds"] == [7]


def _wait_preview(url: str, job_id: str) -> bytes:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/api/v1/jobs/{job_id}/preview.png")
        if r.status_code == 200:
            return r.content
        time.sleep(0.05)
    raise AssertionError("no preview")


def test_crashed_server_marks_its_running_job_failed(tiny_models, tmp_path):
    data = tmp_path / "data"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sfumato", "serve", "--model", str(tiny_models / "sd1"),
                             "--data-dir", str(data), "--port", str(port), "--device", "cpu"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/api/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the server process did not start"
            time.sleep(0.1)
        job_id = httpx.post(url + "/api/v1/jobs", json=LONG).json()["id"]
        _wait_state(url, job_id, ("running",))
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash: no shutdown code runs
        proc.wait(30)
        proc.stderr.close()
    with running(_config(tiny_models, data)) as srv:
        d = httpx.get(f"{srv.url}/api/v1/jobs/{job_id}").json()
        assert d["state"] == "failed" and "crash" in d["error"]


def test_listen_needs_credentials_and_every_route_checks_them(tiny_models, tmp_path):
    from sfumato.cli import main

    assert main(["serve", "--listen", "--model", str(tiny_models / "sd1"), "--data-dir", str(tmp_path)]) == 2

    webuiapi = pytest.importorskip("webuiapi")
    config = _config(tiny_models, tmp_path / "data", host="0.0.0.0", api_keys=("s3cret",),
                     api_auth=(("ann", "pw"),))
    with running(config) as srv:
        for method, path in [("GET", "/sdapi/v1/progress"), ("POST", "/sdapi/v1/txt2img"),
                             ("GET", "/sdapi/v1/options"), ("GET", "/api/v1/jobs"), ("POST", "/api/v1/jobs"),
                             ("GET", "/api/v1/jobs/x/events"), ("GET", "/api/v1/health"), ("GET", "/nope")]:
            assert httpx.request(method, srv.url + path).status_code == 401, path
            assert httpx.request(method, srv.url + path, headers={"X-API-Key": "wrong"}).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.get(srv.url + "/api/v1/health", headers=ok).status_code == 200
        assert httpx.get(srv.url + "/api/v1/health", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert httpx.get(srv.url + "/api/v1/health?api_key=s3cret").status_code == 200
        assert httpx.get(srv.url + "/api/v1/health", auth=("ann", "nope")).status_code == 401

        api = webuiapi.WebUIApi(port=srv.port, username="ann", password="pw", sampler="Euler", steps=2)
        r = api.txt2img(prompt="p", width=SIZE, height=SIZE, seed=1)
        assert r.image.size == (SIZE, SIZE)
        with pytest.raises(RuntimeError, match="401"):
            webuiapi.WebUIApi(port=srv.port, steps=2).txt2img(prompt="p", width=SIZE, height=SIZE)


def test_web_ui_is_served_without_outside_resources(tiny_models, tmp_path):
    import re

    with running(_config(tiny_models, tmp_path / "data")) as srv:
        r = httpx.get(srv.url + "/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        local = re.findall(r'(?:src|href)="([^"]*)"', r.text)
        assert local and all(u.startswith(("/static/", "#")) for u in local), local
        js = httpx.get(srv.url + "/static/app.js")
        css = httpx.get(srv.url + "/static/style.css")
        assert js.status_code == css.status_code == 200 and "javascript" in js.headers["content-type"]
        assert "/api/v1/jobs" in js.text and "EventSource" in js.text and "/sdapi/v1/png-info" in js.text
        for text in (r.text, js.text, css.text):
            assert "http://" not in text and "https://" not in text and "//cdn" not in text and "@import" not in text


def test_static_assets_are_public_but_the_page_and_api_are_not(tiny_models, tmp_path):
    with running(_config(tiny_models, tmp_path / "data", api_keys=("k",))) as srv:
        assert httpx.get(srv.url + "/static/app.js").status_code == 200
        assert httpx.post(srv.url + "/static/app.js").status_code == 401
        assert httpx.get(srv.url + "/").status_code == 401
        assert httpx.get(srv.url + "/?api_key=k").status_code == 200
        assert httpx.get(srv.url + "/staticx").status_code == 401


def test_job_listing_has_parameters_and_mode_for_img2img_and_inpaint(tiny_models, tmp_path):
    import base64
    import io

    from PIL import Image

    def b64(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    init = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    mask = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))  # a painted canvas: the mask is its alpha
    mask.paste((255, 0, 0, 255), (8, 8, 24, 24))
    jobs = {"txt2img": JOB,
            "img2img": {**JOB, "type": "img2img", "init_images": [b64(init)], "denoising_strength": 0.6},
            "inpaint": {**JOB, "type": "img2img", "init_images": [b64(init)], "mask": b64(mask),
                        "mask_blur": 2, "inpainting_fill": 1}}
    with running(_config(tiny_models, tmp_path / "data")) as srv:
        ids = {mode: httpx.post(srv.url + "/api/v1/jobs", json=body, timeout=30).json()["id"]
               for mode, body in jobs.items()}
        for job_id in ids.values():
            assert _wait_state(srv.url, job_id, ("done", "failed"))["state"] == "done"
        listed = {j["id"]: j for j in httpx.get(srv.url + "/api/v1/jobs").json()}
        for mode, job_id in ids.items():
            j = listed[job_id]
            assert j["mode"] == mode and len(j["images"]) == 1
            p = j["parameters"]
            assert p["prompt"] == "a boat" and p["seed"] == 7 and p["steps"] == 3
            assert "init_images" not in p and "mask" not in p  # the listing stays small
        assert listed[ids["img2img"]]["parameters"]["denoising_strength"] == 0.6
        assert "Mask blur: 2" in listed[ids["inpaint"]]["infotexts"][0]
        img = Image.open(io.BytesIO(httpx.get(srv.url + listed[ids["inpaint"]]["images"][0]).content))
        assert img.size == (SIZE, SIZE)


def test_cors_is_off_unless_asked(tiny_models, tmp_path):
    origin = {"Origin": "http://example.com"}
    with running(_config(tiny_models, tmp_path / "a")) as srv:
        assert "access-control-allow-origin" not in httpx.get(srv.url + "/api/v1/health", headers=origin).headers
    with running(_config(tiny_models, tmp_path / "b", cors_origins=("http://example.com",))) as srv:
        r = httpx.get(srv.url + "/api/v1/health", headers=origin)
        assert r.headers["access-control-allow-origin"] == "http://example.com"


def test_model_cache_evicts_the_least_recently_used(tiny_models):
    from sfumato.server.models import ModelCache, Registry, UnknownNameError, pipeline_bytes

    reg = Registry(tiny_models / "sd1", tiny_models)
    a, b = reg.find("sd1"), reg.find("sd1b")
    with pytest.raises(UnknownNameError, match="valid: sd1, sd1b"):
        reg.find("sd2")
    cache = ModelCache("cpu", None, budget=0)
    first = cache.get(a)
    size = pipeline_bytes(first)
    cache.budget = int(size * 1.5)  # room for one
    assert cache.get(a) is first
    cache.get(b)
    assert cache.loaded() == [str(b.path)]
    cache.budget = size * 3
    cache.get(a)
    assert cache.loaded() == [str(b.path), str(a.path)]
    cache.get(b)  # b is now the most recent: a goes first
    cache.budget = int(size * 1.5)
    cache.get(b)
    assert cache.loaded() == [str(b.path)]


def test_model_cache_loads_with_the_servers_memory_options(tiny_models):
    """serve --offload: every model the cache loads carries the offload mode; GPU devices refuse it."""
    from sfumato.pipeline import MemoryOptions
    from sfumato.server.app import ServerConfig, ServerConfigError
    from sfumato.server.models import ModelCache, Registry

    reg = Registry(tiny_models / "sd1", tiny_models)
    cache = ModelCache("cpu", None, budget=0, memory=MemoryOptions(offload="sequential"))
    pipe = cache.get(reg.find("sd1"))
    assert pipe.memory.offload == "sequential"
    assert pipe.generate("a red circle", steps=2, width=64, height=64, seed=1).images[0].size == (64, 64)
    ServerConfig(offload="sequential").check()
    with pytest.raises(ServerConfigError, match="--offload model releases idle weights from RAM on the CPU; "
                                                "the devices are cuda:0"):
        ServerConfig(offload="model", devices=("cuda:0",)).check()
    with pytest.raises(ServerConfigError, match="--offload 'all' is not one of none, model, sequential"):
        ServerConfig(offload="all").check()


def test_switching_checkpoints_frees_the_evicted_model(tiny_models):
    """Switching back and forth within a one-model budget keeps one pipeline alive: every evicted one is
    garbage (no reference kept by the cache, the registry or a worker), so memory does not grow."""
    import gc
    import weakref

    from sfumato.server.models import ModelCache, Registry, pipeline_bytes

    reg = Registry(tiny_models / "sd1", tiny_models)
    a, b = reg.find("sd1"), reg.find("sd1b")
    cache = ModelCache("cpu", None, budget=0)
    cache.budget = int(pipeline_bytes(cache.get(a)) * 1.5)
    refs = []
    for ckpt in [b, a, b, a, b]:
        refs.append(weakref.ref(cache.get(ckpt)))
    gc.collect()
    alive = [r() is not None for r in refs]
    assert alive == [False, False, False, False, True], alive
    assert cache.loaded() == [str(b.path)]


def test_jobs_run_one_at_a_time_in_order_of_arrival(tiny_models, tmp_path):
    with running(_config(tiny_models, tmp_path / "data")) as srv:
        ids = [httpx.post(srv.url + "/api/v1/jobs", json={**JOB, "seed": s}, timeout=30).json()["id"]
               for s in range(5)]
        jobs = [_wait_state(srv.url, i, ("done", "failed")) for i in ids]
    assert [j["state"] for j in jobs] == ["done"] * 5 and [j["seeds"] for j in jobs] == [[s] for s in range(5)]
    for earlier, later in zip(jobs, jobs[1:]):
        assert earlier["created"] <= later["created"]
        assert earlier["finished"] <= later["started"], "a job started before the one ahead of it finished"


def test_refresh_checkpoints_finds_new_files(tiny_models, tmp_path):
    import shutil

    from sfumato.server.app import ServerConfig

    models = tmp_path / "models"
    models.mkdir()
    with running(ServerConfig(model=tiny_models / "sd1", models_dir=models, data_dir=tmp_path / "data")) as srv:
        names = [m["title"] for m in httpx.get(srv.url + "/sdapi/v1/sd-models").json()]
        assert names == ["sd1"]
        shutil.copytree(tiny_models / "sd1b", models / "extra")
        (models / "notes.txt").write_text("not a model")
        assert httpx.get(srv.url + "/sdapi/v1/sd-models").json()[-1]["title"] == "sd1", "listed before a refresh"
        assert httpx.post(srv.url + "/sdapi/v1/refresh-checkpoints").status_code == 200
        names = [m["title"] for m in httpx.get(srv.url + "/sdapi/v1/sd-models").json()]
        assert names == ["sd1", "extra"]
        r = httpx.post(srv.url + "/sdapi/v1/txt2img", timeout=60, json={
            "prompt": "a boat", "width": SIZE, "height": SIZE, "steps": 2, "seed": 1,
            "override_settings": {"sd_model_checkpoint": "extra"}})
        assert r.status_code == 200 and json.loads(r.json()["info"])["sd_model_name"] == "extra"


def test_serve_command_defaults_and_options(monkeypatch, tmp_path, capsys):
    """`sfumato serve`: loopback port 7860 by default; --listen binds every interface and needs credentials;
    --api-auth, --api-key, --cors-allow-origins and --db reach the server's configuration."""
    import sfumato.server.app as app_module
    from sfumato.cli import main

    seen = []
    monkeypatch.setattr(app_module, "serve", seen.append)
    monkeypatch.delenv("SFUMATO_API_KEY", raising=False)
    assert main(["serve", "--data-dir", str(tmp_path)]) == 0
    c = seen[-1]
    assert (c.host, c.port, c.auth_required, c.cors_origins) == ("127.0.0.1", 7860, False, ())
    assert c.model is not None and c.model.name == "model.safetensors"  # the built-in model
    assert main(["serve", "--listen", "--data-dir", str(tmp_path)]) == 2
    assert "--api-key" in capsys.readouterr().err and len(seen) == 1
    assert main(["serve", "--listen", "--api-auth", "ann:pw1,bob:pw2", "--api-key", "k1", "--cors-allow-origins",
                 "http://a.test, http://b.test", "--db", str(tmp_path / "j.sqlite3"), "--port", "9000",
                 "--data-dir", str(tmp_path)]) == 0
    c = seen[-1]
    assert (c.host, c.port, c.api_auth, c.api_keys) == ("0.0.0.0", 9000, (("ann", "pw1"), ("bob", "pw2")), ("k1",))
    assert c.cors_origins == ("http://a.test", "http://b.test") and c.db_path == tmp_path / "j.sqlite3"
    assert main(["serve", "--api-auth", "nopassword", "--data-dir", str(tmp_path)]) == 2


def test_model_list_gives_each_models_native_size_without_loading_it(tiny_models, tmp_path, monkeypatch):
    """GET /sdapi/v1/sd-models: `default_size` and `default_cfg` from each checkpoint's headers (built-in 64
    and cfg 2, SD 1.x 512 and 7), detected
    once per checkpoint, never by loading the weights; an unreadable file is still listed, with no size."""
    import sfumato
    import sfumato.weights.detect as detect
    from sfumato.server.app import ServerConfig
    from sfumato.weights.load import builtin_checkpoint

    assert sfumato.load(tiny_models / "sd1").spec.default_size == 512  # what the listing must agree with
    models = tmp_path / "models"
    models.mkdir()
    (models / "sd1").symlink_to(tiny_models / "sd1", target_is_directory=True)
    (models / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    calls = []
    real = detect.detect_file
    monkeypatch.setattr(detect, "detect_file", lambda path, **kw: calls.append(path) or real(path, **kw))

    def no_loading(*args, **kwargs):
        raise AssertionError("listing the models loaded one")

    monkeypatch.setattr(sfumato, "load", no_loading)
    with running(ServerConfig(model=builtin_checkpoint(), models_dir=models, data_dir=tmp_path / "data")) as srv:
        for _ in range(2):
            r = httpx.get(srv.url + "/sdapi/v1/sd-models", timeout=30)
            assert r.status_code == 200, r.text
            sizes = {m["title"]: m["default_size"] for m in r.json()}
            assert sizes == {"model.safetensors": 64, "broken.safetensors": None, "sd1": 512}
            cfgs = {m["title"]: m["default_cfg"] for m in r.json()}  # the built-in model's own, else 7
            assert cfgs == {"model.safetensors": 2.0, "broken.safetensors": None, "sd1": 7.0}
        assert len(calls) == 3, "each checkpoint is detected once, then the Registry's cache answers"
        assert httpx.get(srv.url + "/api/v1/health").json()["loaded_models"] == []


def test_chunked_bodies_over_the_limit_are_refused(tiny_models, tmp_path):
    """A body sent without Content-Length (chunked) is counted as it arrives: over --max-body it is a 413,
    under it the request goes through; the server keeps serving."""
    limit = 4096
    with running(_config(tiny_models, tmp_path / "data", max_body=limit)) as srv:
        def chunks(n):
            def gen():
                yield b'{"prompt": "' + b"x" * n + b'", '
                yield b'"width": 32, "height": 32, "steps": 2, "seed": 1}'
            return gen()

        r = httpx.post(srv.url + "/sdapi/v1/txt2img", content=chunks(2 * limit), timeout=30)
        assert r.status_code == 413 and str(limit) in r.json()["detail"]
        r = httpx.post(srv.url + "/sdapi/v1/txt2img", content=chunks(10), timeout=60)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
