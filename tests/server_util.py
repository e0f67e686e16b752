"""Helpers for the server tests: a real uvicorn server on a free loopback port, in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    url: str
    port: int
    app: object


@contextlib.contextmanager
def running(config) -> Iterator[Running]:
    """Serve ``config`` (a ServerConfig) on 127.0.0.1 until the block ends; the workers stop with it."""
    import uvicorn

    from sfumato.server.app import create_app

    port = free_port()
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield Running(url=f"http://127.0.0.1:{port}", port=port, app=app)
    finally:
        server.should_exit = True
        thread.join(30)


def b64_png(img) -> str:
    """An image as the base64 PNG the AUTOMATIC1111 API carries."""
    import base64
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_b64(b64: str):
    """A base64 image from a response."""
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))
