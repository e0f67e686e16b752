from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Two tiny random SD 1.x diffusers folders ("sd1", "sd1b") in one models folder (built once)."""
    from . import tiny

    if not tiny.SHARED_BPE.exists():
        pytest.skip("needs ../shared/clip-bpe beside the repo")
    root = tmp_path_factory.mktemp("server-models")
    tiny.build("sd1", root / "sd1", seed=21)
    tiny.build("sd1", root / "sd1b", seed=22)
    return root


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """sfumato's cache (file hashes) goes to a temporary folder, never the user's ~/.cache; set in the
    environment so the servers the tests start in subprocesses use it too."""
    import os

    old = os.environ.get("SFUMATO_CACHE_DIR")
    os.environ["SFUMATO_CACHE_DIR"] = str(tmp_path_factory.mktemp("sfumato-cache"))
    yield
    if old is None:
        os.environ.pop("SFUMATO_CACHE_DIR", None)
    else:
        os.environ["SFUMATO_CACHE_DIR"] = old
