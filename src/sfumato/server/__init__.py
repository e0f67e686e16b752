"""``sfumato serve``: an HTTP server with AUTOMATIC1111's web API, a native job API and a job history.

    sfumato serve --model v1-5-pruned-emaonly.safetensors            # http://127.0.0.1:7860
    sfumato serve --listen --api-key "$KEY" --data-dir /srv/sfumato  # all interfaces, key required

Layout (thin over the library, no model code): ``a1111.py`` turns webui request bodies into a
:class:`~sfumato.server.a1111.Task` and results into its response shapes; ``execute.py`` runs a task on a
pipeline (iterations, hires fix, interrupt, previews); ``extras.py`` webui's Extras upscaling (and the
upscale step the hires fix shares); ``zoo.py`` the native job types of the SD 2 zoo methods; ``jobs.py``
holds the SQLite job store and the worker threads; ``models.py`` the checkpoint names and the per-device LRU model cache; ``app.py`` the
FastAPI routes, auth and limits; ``static/index.html`` a minimal web UI at ``/`` (no CDN, no build step). FastAPI and uvicorn (the ``server`` extra) are imported only here.
"""

from __future__ import annotations

__all__ = ["ServerConfig", "create_app", "serve"]


def __getattr__(name: str):
    if name in __all__:
        from sfumato.server import app

        return getattr(app, name)
    raise AttributeError(name)
