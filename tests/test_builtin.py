"""The built-in model: shipped in the package, loaded by sfumato.load() with no path, detected as its own
family, and reproducing its golden images (hashes written only by scripts/update_builtin_goldens.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import sfumato
from sfumato.weights.load import builtin_checkpoint

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "builtin.json"
_SHIPPED = (ROOT / "src" / "sfumato" / "data" / "builtin" / "model.safetensors").is_file()

# Issue 4 is open: the built-in model has not been trained to its quality targets and is not shipped yet.
pytestmark = pytest.mark.skipif(not _SHIPPED, reason="built-in model not shipped yet (issue 4 open)")


def _script():
    spec = importlib.util.spec_from_file_location("update_goldens", ROOT / "scripts" / "update_builtin_goldens.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_builtin_is_small_and_detected():
    path = builtin_checkpoint()
    assert path.stat().st_size < 25 * 2**20, f"{path.stat().st_size / 2**20:.1f} MB"
    pipe = sfumato.load()
    assert pipe.spec.family == "builtin" and pipe.spec == sfumato.PRESETS["builtin"]
    assert pipe.model_name == "model"


def test_builtin_golden_images():
    golden = json.loads(GOLDEN.read_text())
    got = _script().generate_hashes()
    assert [g["sha256"] for g in got] == [g["sha256"] for g in golden], \
        "built-in images changed; if intended, run scripts/update_builtin_goldens.py"
