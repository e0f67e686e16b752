"""Rules of the code base that a grep can check (STYLE.md D and the test-only references)."""

from __future__ import annotations

import re
from pathlib import Path

from sfumato.config import PRESETS

SRC = Path(__file__).resolve().parents[1] / "src" / "sfumato"


def _code_lines(path: Path) -> list[str]:
    """Source lines outside docstrings and comments (family names may be cited in prose)."""
    text = re.sub(r'("""|\'\'\')(.*?)\1', "", path.read_text(), flags=re.S)
    return [line.split("#", 1)[0] for line in text.splitlines()]


def test_models_and_sampling_read_config_fields_not_family_names():
    names = sorted({n for f in PRESETS for n in (f, f.split("-")[0])} | {"sdxl", "refiner", "upscaler"}, key=len)
    pattern = re.compile(r"""["'](%s)["']""" % "|".join(map(re.escape, names)))
    hits = []
    for folder in ("models", "sampling"):
        for f in (SRC / folder).rglob("*.py"):
            hits += [f"{f.name}: {line.strip()}" for line in _code_lines(f) if pattern.search(line)]
    assert not hits, "family names in model/sampler code:\n" + "\n".join(hits)


def test_runtime_never_imports_the_references():
    pattern = re.compile(r"^\s*(import|from)\s+(diffusers|transformers|open_clip|torchvision)\b", re.M)
    hits = [str(f) for f in SRC.rglob("*.py") if pattern.search(f.read_text())]
    assert not hits, f"runtime code imports a test-only reference: {hits}"
