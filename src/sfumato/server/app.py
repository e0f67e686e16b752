"""The HTTP app: AUTOMATIC1111's ``/sdapi/v1`` routes, the native job API ``/api/v1/jobs``, auth and limits.

Every route goes through :class:`Guard` (a plain ASGI middleware, so event streams and web sockets are
covered too): the API key (``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or ``?api_key=KEY`` for
browsers' EventSource) or HTTP basic credentials when any are configured, and the body size limit
(413). The web page's own scripts and styles (``GET /static/...``, the files in the package) are public,
so a page opened with ``?api_key=KEY`` can load them; ``/`` and every API route need credentials. Errors are JSON ``{"error": <kind>, "detail": <message>}``: 400 malformed input or an unknown
sampler/model/upscaler (the message lists the valid names), 401 no or wrong credentials, 404 no such job,
413 too large, 422 a value out of range (the message names the field and the allowed range).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from sfumato.errors import InvalidParameterError, SfumatoError
from sfumato.pipeline import OFFLOAD_MODES, MemoryOptions
from sfumato.server import a1111, extras, zoo
from sfumato.server.a1111 import Limits, RequestError, UpscalerOptions
from sfumato.server.jobs import TERMINAL, Job, JobStore, Scheduler, error_status
from sfumato.server.models import AddonDirs, Registry, UnknownNameError, controlnet_files, find_controlnet


STATIC = Path(__file__).parent / "static"  # the web UI: index.html, app.js, style.css (no outside resources)


class ServerConfigError(SfumatoError):
    """The server's own settings are unsafe or inconsistent (e.g. --listen without credentials)."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    model: Path | None = None  # None: the built-in model (when installed)
    models_dir: Path | None = None
    lora_dir: Path | None = None  # LoRA files offered to <lora:name:w> prompt tags and /sdapi/v1/loras
    embeddings_dir: Path | None = None  # textual-inversion embeddings, loaded into every model they fit
    controlnet_dir: Path | None = None  # ControlNets for alwayson_scripts.controlnet and /controlnet/model_list
    data_dir: Path = Path("sfumato-data")
    db_path: Path | None = None  # None: <data_dir>/jobs.sqlite3
    api_keys: tuple[str, ...] = ()
    api_auth: tuple[tuple[str, str], ...] = ()  # HTTP basic (user, password) pairs
    cors_origins: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("cpu",)
    dtype: str | None = None
    model_memory: int = 8 * 2**30  # bytes of loaded models per device before LRU eviction
    max_body: int = 64 * 2**20
    limits: Limits = field(default_factory=Limits)
    upscaler_steps: int = 20  # an SD x4 upscaler model used as an upscaler (extras, hires fix)
    upscaler_noise_level: int = 20
    offload: str = "none"  # MemoryOptions.offload of every model loaded (CPU devices only)

    @property
    def auth_required(self) -> bool:
        return bool(self.api_keys or self.api_auth)

    def check(self) -> None:
        if not 1 <= self.upscaler_steps <= 10000:
            raise ServerConfigError(f"--upscaler-steps {self.upscaler_steps} is out of range: allowed 1..10000")
        if not 0 <= self.upscaler_noise_level <= 350:
            raise ServerConfigError(f"--upscaler-noise-level {self.upscaler_noise_level} is out of range: "
                                    "allowed 0..350")
        if self.offload not in OFFLOAD_MODES:
            raise ServerConfigError(f"--offload {self.offload!r} is not one of {', '.join(OFFLOAD_MODES)}")
        if self.offload != "none" and any(not str(d).startswith("cpu") for d in self.devices):
            raise ServerConfigError(f"--offload {self.offload} releases idle weights from RAM on the CPU; the "
                                    f"devices are {', '.join(map(str, self.devices))}")
        if self.host not in ("127.0.0.1", "localhost", "::1") and not self.auth_required:
            raise ServerConfigError(f"refusing to listen on {self.host} without authentication: give --api-key "
                                    "KEY or --api-auth USER:PASSWORD")


# --- auth and body limit ---------------------------------------------------------------------------

class Guard:
    """ASGI middleware: credentials on every HTTP and web socket request, and the body size limit."""

    def __init__(self, app, *, keys: tuple[str, ...], basic: tuple[tuple[str, str], ...], max_body: int) -> None:
        self.app, self.keys, self.basic, self.max_body = app, keys, basic, max_body

    def _authorized(self, scope) -> bool:
        if not self.keys and not self.basic:
            return True
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given: list[str] = []
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer":
            given.append(value.strip())
        if "x-api-key" in headers:
            given.append(headers["x-api-key"].strip())
        from urllib.parse import parse_qs

        given += parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key", [])
        ok = any(secrets.compare_digest(g.encode(), k.encode()) for g in given for k in self.keys)
        if scheme.lower() == "basic" and self.basic:
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return ok
            ok = ok or any(secrets.compare_digest(user.encode(), u.encode())
                           & secrets.compare_digest(password.encode(), p.encode()) for u, p in self.basic)
        return ok

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        public = scope["type"] == "http" and scope.get("method") in ("GET", "HEAD") and \
            scope.get("path", "").startswith("/static/")
        if not public and not self._authorized(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            headers = {"WWW-Authenticate": 'Basic realm="sfumato"'} if self.basic else {}
            return await _send_error(scope, receive, send, 401, "unauthorized",
                                     "missing or wrong credentials (API key or HTTP basic)", headers)
        if scope["type"] == "http":
            length = dict(scope.get("headers", [])).get(b"content-length")
            if length is not None:
                try:
                    too_big = int(length) > self.max_body
                except ValueError:
                    return await _send_error(scope, receive, send, 400, "bad_request", "bad Content-Length")
                if too_big:
                    return await _send_error(scope, receive, send, 413, "too_large", self._too_big())
            else:  # chunked: read it here, up to the limit
                chunks, size = [], 0
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        break
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_body:
                        return await _send_error(scope, receive, send, 413, "too_large", self._too_big())
                    if not message.get("more_body", False):
                        break
                body = b"".join(chunks)
                done = False

                async def replay():
                    nonlocal done
                    if done:
                        return await receive()
                    done = True
                    return {"type": "http.request", "body": body, "more_body": False}

                return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)

    def _too_big(self) -> str:
        return f"request body over this server's limit of {self.max_body} bytes"


async def _send_error(scope, receive, send, status: int, kind: str, detail: str, headers: dict | None = None) -> None:
    await JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)(scope, receive, send)


# --- the app ---------------------------------------------------------------------------------------

def default_options(registry: Registry) -> dict[str, Any]:
    default = registry.default
    return {"sd_model_checkpoint": default.title if default else None, "sd_checkpoint_hash": None,
            "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "samples_format": "png",
            "eta_noise_seed_delta": 0, "img2img_fix_steps": False}


def create_app(config: ServerConfig) -> FastAPI:
    """The FastAPI app for ``config`` (the worker threads start with the app's lifespan)."""
    from sfumato import __version__

    config.check()
    data = config.data_dir
    outputs = data / "outputs"
    registry = Registry(config.model, config.models_dir)
    options = default_options(registry)
    store = JobStore(config.db_path or data / "jobs.sqlite3")
    upscaling = UpscalerOptions(steps=config.upscaler_steps, noise_level=config.upscaler_noise_level)

    def parse(kind: str, body: Any) -> a1111.Task:
        if kind in zoo.KINDS:
            return parse_zoo(kind, body)
        if kind not in ("txt2img", "img2img"):
            raise InvalidParameterError(f"type={kind!r} is not one of {', '.join(['txt2img', 'img2img', *zoo.KINDS])}")
        task = a1111.parse(kind, body, options, config.limits, registry.upscaler_names())
        task.upscaler_options = upscaling
        for name in (task.model, task.refiner):
            if name is not None:
                registry.find(name)
        for unit in task.controls:
            find_controlnet(config.controlnet_dir, unit.model)
        if task.model is None:
            registry.find(None)
        return task

    def parse_zoo(kind: str, body: Any) -> a1111.Task:
        task = zoo.parse_zoo(kind, body, options, config.limits)
        need = zoo.KINDS[kind]
        if task.model is not None:
            ckpt = registry.find(task.model, upscaler=kind == "upscale")
        else:  # the first checkpoint that can run the method
            fits = [c for c in registry.all() if (s := registry.spec(c)) is not None and need.fits(s)]
            if not fits:
                raise UnknownNameError(f"type={kind!r} needs {need.what}; this server has none (models: "
                                       f"{', '.join(c.title for c in registry.all()) or '(none)'})")
            ckpt = fits[0]
        zoo.check_model(kind, ckpt.title, registry.spec(ckpt))
        task.model = ckpt.title
        return task

    scheduler = Scheduler(store, registry, outputs, devices=list(config.devices), dtype=config.dtype,
                          model_budget=config.model_memory, parse=parse,
                          addons=AddonDirs(config.lora_dir, config.embeddings_dir, config.controlnet_dir),
                          memory=MemoryOptions(offload=config.offload))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)
            store.close()

    app = FastAPI(title="sfumato", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.registry, app.state.options, app.state.store = scheduler, registry, options, store

    @app.exception_handler(SfumatoError)
    async def _sfumato_error(request: Request, e: SfumatoError) -> JSONResponse:
        return JSONResponse({"error": type(e).__name__, "detail": str(e)}, status_code=error_status(e))

    async def body_of(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw) if raw else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "the request body is not valid JSON") from None

    async def wait(job: Job) -> None:
        while not job.done.is_set():
            await asyncio.sleep(0.02)

    # --- AUTOMATIC1111 -----------------------------------------------------------------------

    def _unfinished(job, error: str) -> JSONResponse | None:  # noqa: ANN001 - a jobs.Job
        """The webui-style error answer for a job that failed or was cancelled; None when it is done."""
        if job.state == "failed":
            return JSONResponse({"error": error, "detail": job.error}, status_code=job.error_status or 500)
        if job.state == "cancelled":
            return JSONResponse({"error": "cancelled", "detail": f"job {job.id} was cancelled"}, status_code=409)
        return None

    async def generate(kind: str, request: Request) -> JSONResponse:
        body = await body_of(request)
        task = await asyncio.to_thread(parse, kind, body)
        job = scheduler.submit("a1111", kind, task, _storable(kind, body))
        await wait(job)
        if (failed := _unfinished(job, "GenerationError")) is not None:
            return failed
        o = job.outcome
        images = []
        if task.send_images:
            images = await asyncio.to_thread(lambda: [a1111.encode_png(im, t) for im, t in zip(o.images, o.infotexts)])
        return JSONResponse({"images": images, "parameters": task.echo, "info": a1111.info_json(task, o)})

    async def run_extras(request: Request, batch: bool) -> JSONResponse:
        body = await body_of(request)
        task = await asyncio.to_thread(lambda: extras.parse_extras(
            body, batch=batch, model_upscalers=registry.upscaler_names(), options=upscaling, limits=config.limits))
        job = scheduler.submit("a1111", "extras", task, _storable("extras", body))
        await wait(job)
        if (failed := _unfinished(job, "UpscaleError")) is not None:
            return failed
        o = job.outcome
        info = extras.html_info(o.infotexts[-1] if o.infotexts else "")
        encoded = await asyncio.to_thread(lambda: [extras.encode_png(im) for im in o.images])
        if batch:
            return JSONResponse({"html_info": info, "images": encoded if task.extras.show else []})
        return JSONResponse({"html_info": info, "image": encoded[0]})

    @app.post("/sdapi/v1/extra-single-image")
    async def extra_single_image(request: Request) -> JSONResponse:
        return await run_extras(request, batch=False)

    @app.post("/sdapi/v1/extra-batch-images")
    async def extra_batch_images(request: Request) -> JSONResponse:
        return await run_extras(request, batch=True)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request) -> JSONResponse:
        return await generate("txt2img", request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request) -> JSONResponse:
        return await generate("img2img", request)

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        running = scheduler.running()
        job = running[0] if running else None
        image = None
        if job is not None and not skip_current_image and job.latent is not None:
            from sfumato.server.execute import preview

            latent, spec = job.latent, job.spec
            image = await asyncio.to_thread(lambda: a1111.encode_png(preview(latent, spec), None))
        state = {"skipped": bool(job and job.skipped), "interrupted": bool(job and job.interrupted),
                 "stopping_generation": False, "job": f"task({job.id})" if job else "",
                 "job_count": job.task.n_iter if job else 0,
                 "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started)) if job else "0",
                 "job_no": job.iteration if job else 0, "sampling_step": job.step if job else 0,
                 "sampling_steps": job.steps if job else 0, "queued": scheduler.queued_count()}
        return {"progress": job.progress if job else 0.0, "eta_relative": job.eta() if job else 0.0,
                "state": state, "current_image": image, "textinfo": None,
                "current_task": f"task({job.id})" if job else None}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict[str, Any]:
        for job in scheduler.running():
            job.interrupted = True
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip() -> dict[str, Any]:
        for job in scheduler.running():
            job.skipped = True
        return {}

    @app.get("/sdapi/v1/options")
    async def get_options() -> dict[str, Any]:
        return options

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request) -> Any:
        body = await body_of(request)
        if not isinstance(body, dict):
            raise RequestError(400, "the options body must be a JSON object")
        if "sd_model_checkpoint" in body:
            body["sd_model_checkpoint"] = registry.find(body["sd_model_checkpoint"]).title
        if "CLIP_stop_at_last_layers" in body:
            v = body["CLIP_stop_at_last_layers"]
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 12:
                raise InvalidParameterError(f"CLIP_stop_at_last_layers={v!r} is out of range: allowed an "
                                            "integer in [1, 12]")
        options.update(body)
        return None

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        # default_size and default_cfg (sfumato's additions; AUTOMATIC1111 clients ignore extra keys): the
        # model's native width and height and the guidance it generates with, or None when its headers do not tell
        def listing() -> list[dict[str, Any]]:
            return [{"title": c.title, "model_name": c.model_name, "hash": None, "sha256": None,
                     "filename": str(c.path), "config": None, "default_size": registry.default_size(c),
                     "default_cfg": registry.default_cfg(c)}
                    for c in registry.list()]

        return await asyncio.to_thread(listing)

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints() -> None:
        await asyncio.to_thread(registry.refresh)

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict[str, Any]]:
        from sfumato.sampling import SAMPLERS

        return [{"name": info.label, "aliases": [name], "options": {}} for name, info in SAMPLERS.items()]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list[dict[str, Any]]:
        from sfumato.metadata import _SCHEDULE_LABELS
        from sfumato.sampling import SCHEDULES

        out = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                "need_inner_model": False}]
        return out + [{"name": name, "label": _SCHEDULE_LABELS.get(name, name), "aliases": None,
                       "default_rho": -1, "need_inner_model": False} for name in SCHEDULES]

    @app.get("/sdapi/v1/upscalers")
    async def upscalers() -> list[dict[str, Any]]:
        builtin = [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                   for n in a1111.IMAGE_UPSCALERS]
        models = await asyncio.to_thread(registry.upscalers)
        return builtin + [{"name": c.model_name, "model_name": c.model_name, "model_path": str(c.path),
                           "model_url": None, "scale": 4} for c in models]

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_modes() -> list[dict[str, Any]]:
        return [{"name": n} for n in a1111.LATENT_UPSCALERS]

    @app.get("/sdapi/v1/loras")
    async def loras() -> list:
        from sfumato.adapters.lora import LORA_EXTENSIONS

        root = config.lora_dir
        if root is None or not root.is_dir():
            return []
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in LORA_EXTENSIONS)
        return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}} for p in files]

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras() -> None:
        """Nothing to do: the LoRA folder is read on every request and every prompt tag."""

    @app.get("/sdapi/v1/embeddings")
    async def embeddings() -> dict[str, Any]:
        from sfumato.adapters.embeddings import survey_embeddings

        def survey() -> dict[str, Any]:
            ckpt = registry.find(options.get("sd_model_checkpoint"))
            spec = registry.spec(ckpt)
            if spec is None:
                return {"loaded": {}, "skipped": {}}
            widths = [t.config.width for t in spec.text_encoders]
            loaded, skipped = survey_embeddings(config.embeddings_dir, widths, spec.family)
            return {"loaded": loaded, "skipped": skipped}

        return await asyncio.to_thread(survey)

    @app.post("/sdapi/v1/refresh-embeddings")
    async def refresh_embeddings() -> None:
        """Nothing to do: a worker reloads the embeddings folder into its model when the files change."""

    @app.get("/controlnet/version")
    async def controlnet_version() -> dict[str, Any]:
        return {"version": 2}

    @app.get("/controlnet/model_list")
    async def controlnet_models() -> dict[str, Any]:
        return {"model_list": list(await asyncio.to_thread(controlnet_files, config.controlnet_dir))}

    @app.get("/controlnet/module_list")
    async def controlnet_modules() -> dict[str, Any]:
        from sfumato.adapters.controlnet import PREPROCESSORS

        return {"module_list": list(PREPROCESSORS), "module_detail": {
            name: {"model_free": True, "sliders": [] if a is None else [
                {"name": "Processor Resolution", "value": 512, "min": 64, "max": 2048},
                {"name": "Canny Low Threshold", "value": a, "min": 1, "max": 255},
                {"name": "Canny High Threshold", "value": b, "min": 1, "max": 255}]}
            for name, (_, a, b) in PREPROCESSORS.items()}}

    @app.post("/controlnet/detect")
    async def controlnet_detect(request: Request) -> dict[str, Any]:
        """The extension's preprocessor endpoint: ``controlnet_module``, ``controlnet_input_images`` (base64),
        ``controlnet_threshold_a`` / ``_b`` -> {"images": [base64 PNG], "info": "Success"}."""
        from sfumato.adapters.controlnet import preprocess

        body = await body_of(request)
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        images = body.get("controlnet_input_images")
        if not isinstance(images, list) or not images:
            raise InvalidParameterError("controlnet_input_images must be a list of at least one base64 image")
        module = body.get("controlnet_module") or "none"
        lo, hi = body.get("controlnet_threshold_a"), body.get("controlnet_threshold_b")
        for name, v in (("controlnet_threshold_a", lo), ("controlnet_threshold_b", hi)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise InvalidParameterError(f"{name}={v!r} must be a number")
        decoded = [a1111.decode_image(im, f"controlnet_input_images[{i}]", config.limits)
                   for i, im in enumerate(images)]
        lo = None if lo is None or lo < 0 else lo
        hi = None if hi is None or hi < 0 else hi
        out = await asyncio.to_thread(lambda: [preprocess(im, module, lo, hi) for im in decoded])
        return {"images": [a1111.encode_png(im, None) for im in out], "info": "Success"}

    @app.get("/sdapi/v1/sd-vae")
    async def sd_vae() -> list:
        return []

    @app.get("/sdapi/v1/scripts")
    async def scripts() -> dict[str, list]:
        return {"txt2img": [], "img2img": []}

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request) -> dict[str, Any]:
        from sfumato.metadata import parse_infotext, read_parameters

        body = await body_of(request)
        if not isinstance(body, dict) or "image" not in body:
            raise RequestError(400, "png-info needs {\"image\": <base64 image>}")
        img = a1111.decode_image(body["image"], "image", config.limits)
        text = read_parameters(img)
        if not text:
            return {"info": "", "items": {}, "parameters": {}}
        items = {k: v for k, v in img.info.items() if isinstance(v, str) and k != "parameters"}
        return {"info": text, "items": {"parameters": text, **items}, "parameters": parse_infotext(text)}

    # --- native job API ----------------------------------------------------------------------

    def job_json(job_id: str) -> dict[str, Any]:
        job = scheduler.get(job_id)
        if job is not None and job.state in ("queued", "running"):  # finished: the store has the result
            d = {"id": job.id, "type": job.kind, "api": job.api, "state": job.state, "created": job.created,
                 "started": job.started, "finished": job.finished, "error": job.error,
                 "mode": _mode(job.kind, job.request), "parameters": _parameters(job.request)}
            d.update(progress=job.progress, eta=job.eta(), step=job.step, steps=job.steps,
                     preview=f"/api/v1/jobs/{job.id}/preview.png" if job.latent is not None else None,
                     images=[], infotexts=[], seeds=[])
            return d
        row = store.get(job_id)
        if row is None:
            raise _NotFound(f"no job {job_id!r}")
        result = row["result"] or {}
        files = result.get("files", [])
        return {"id": row["id"], "type": row["kind"], "api": row["api"], "state": row["state"],
                "created": row["created"], "started": row["started"], "finished": row["finished"],
                "error": row["error"], "mode": _mode(row["kind"], row["request"]),
                "parameters": _parameters(row["request"]), "progress": 1.0 if row["state"] in ("done", "interrupted") else 0.0,
                "eta": 0.0, "preview": None,
                "images": [f"/api/v1/jobs/{row['id']}/images/{i}.png" for i in range(len(files))]
                if row["api"] == "native" else [],
                "infotexts": result.get("infotexts", []), "seeds": result.get("seeds", [])}

    @app.exception_handler(_NotFound)
    async def _not_found(request: Request, e: _NotFound) -> JSONResponse:
        return JSONResponse({"error": "not_found", "detail": str(e)}, status_code=404)

    @app.post("/api/v1/jobs", status_code=202)
    async def create_job(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        kind = body.get("type", "txt2img")
        task = await asyncio.to_thread(parse, kind, body)
        job = scheduler.submit("native", kind, task, _storable(kind, body))
        return {"id": job.id, "state": job.state, "url": f"/api/v1/jobs/{job.id}",
                "events": f"/api/v1/jobs/{job.id}/events"}

    @app.get("/api/v1/jobs")
    async def list_jobs(limit: int = 50) -> list[dict[str, Any]]:
        rows = store.recent(max(1, min(limit, 500)))
        return [job_json(r["id"]) for r in rows]

    @app.get("/api/v1/jobs/{job_id}")
    async def get_job(job_id: str) -> dict[str, Any]:
        return job_json(job_id)

    @app.delete("/api/v1/jobs/{job_id}")
    async def cancel_job(job_id: str) -> dict[str, Any]:
        if not scheduler.cancel(job_id):
            job_json(job_id)  # 404 if unknown
            raise RequestError(409, f"job {job_id} has already finished")
        job = scheduler.get(job_id)
        if job is not None:
            await asyncio.wait_for(wait(job), timeout=30)
        return job_json(job_id)

    @app.get("/api/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        job = scheduler.get(job_id)
        if job is None:
            job_json(job_id)  # 404 if unknown

        async def stream() -> AsyncIterator[str]:
            last = -1
            while job is not None and not job.done.is_set():
                if job.version != last:
                    last = job.version
                    yield f"event: progress\ndata: {json.dumps(job_json(job_id))}\n\n"
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.05)
            yield f"event: end\ndata: {json.dumps(job_json(job_id))}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/api/v1/jobs/{job_id}/images/{index}.png")
    async def job_image(job_id: str, index: int) -> FileResponse:
        row = store.get(job_id)
        files = (row or {}).get("result") or {}
        files = files.get("files", []) if isinstance(files, dict) else []
        if row is None or not 0 <= index < len(files):
            raise _NotFound(f"no image {index} of job {job_id!r}")
        return FileResponse(outputs / files[index], media_type="image/png")

    @app.get("/api/v1/jobs/{job_id}/preview.png")
    async def job_preview(job_id: str) -> Response:
        from sfumato.server.execute import preview

        job = scheduler.get(job_id)
        latent, spec = (job.latent, job.spec) if job is not None else (None, None)
        if latent is None:
            raise _NotFound(f"job {job_id!r} has no preview (not running)")

        def png() -> bytes:
            buf = io.BytesIO()
            preview(latent, spec).save(buf, format="PNG")
            return buf.getvalue()

        return Response(await asyncio.to_thread(png), media_type="image/png")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/v1/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "version": __version__, "queued": scheduler.queued_count(),
                "running": [j.id for j in scheduler.running()],
                "loaded_models": [m for c in scheduler.caches for m in c.loaded()]}

    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)
    app.add_middleware(Guard, keys=config.api_keys, basic=config.api_auth, max_body=config.max_body)
    return app


class _NotFound(SfumatoError):
    pass


def _storable(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """The request as recorded (and re-parsed after a restart; extras requests, never re-run, without images)."""
    if kind in zoo.KINDS:
        return zoo.storable(body)
    if kind == "extras":
        return {k: v for k, v in body.items() if k in extras.EXTRAS_DEFAULTS and k not in ("image", "imageList")}
    return {k: v for k, v in body.items() if k in a1111.IMG2IMG_DEFAULTS or k in a1111.TXT2IMG_DEFAULTS
            or k == "type"}


def _parameters(request: dict[str, Any]) -> dict[str, Any]:
    """A job's recorded request (its seed resolved) without the input images, for listings and reuse."""
    return {k: v for k, v in request.items() if k not in ("init_images", "mask", *zoo.IMAGE_FIELDS)}


def _mode(kind: str, request: dict[str, Any]) -> str:
    """txt2img, img2img, or inpaint (an img2img request with a mask)."""
    return "inpaint" if kind == "img2img" and request.get("mask") else kind


def serve(config: ServerConfig) -> None:
    """Run the server in this process until interrupted (uvicorn)."""
    import uvicorn

    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
