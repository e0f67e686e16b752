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
