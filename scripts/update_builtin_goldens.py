"""Regenerate the golden image hashes of the built-in model (tests/golden/builtin.json).

Run only after deliberately changing the built-in model or the sampling numerics:
    python scripts/update_builtin_goldens.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

import sfumato

CASES = [
    {"prompt": "a red circle on a white background", "seed": 1},
    {"prompt": "a small blue square in the top left corner, grey background", "seed": 2},
    {"prompt": "a large yellow star on a black background", "seed": 3},
    {"prompt": "a green ring at the bottom", "seed": 4, "sampler": "dpmpp_2m", "schedule": "karras"},
]
GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden" / "builtin.json"


def image_hash(image) -> str:
    """SHA-256 of the RGB pixels (not of a PNG encoding, which depends on the zlib build)."""
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def generate_hashes() -> list[dict]:
    """One torch thread: oneDNN's convolutions split their sums by thread count, so the same model
    rounds differently on 1 and 2 threads (the goldens of 2026-12-01 moved by that alone)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = sfumato.load()
        out = []
        for case in CASES:
            kw = {k: v for k, v in case.items() if k != "prompt"}
            image = pipe.generate(case["prompt"], **kw).images[0]
            out.append({**case, "sha256": image_hash(image)})
        return out
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(generate_hashes(), indent=2) + "\n")
    print(f"wrote {GOLDEN}")
