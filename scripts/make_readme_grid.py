"""The README's grid of built-in model images (docs/builtin-grid.png), each prompt written under its image.

    python scripts/make_readme_grid.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

import sfumato

PROMPTS = [
    "a red circle on a white background", "a blue square in the top left corner",
    "a large yellow star on a black background", "a small green ring at the bottom",
    "a purple triangle, grey background", "an orange circle in the bottom right corner",
    "two shapes: a red star and a blue ring", "a pink square in the centre, green background",
]
CELL, SCALE, LABEL = 64, 3, 36
OUT = Path(__file__).resolve().parents[1] / "docs" / "builtin-grid.png"


def main() -> None:
    pipe = sfumato.load()
    cols = 4
    rows = (len(PROMPTS) + cols - 1) // cols
    w, h = CELL * SCALE, CELL * SCALE + LABEL
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    draw = ImageDraw.Draw(grid)
    for i, prompt in enumerate(PROMPTS):
        image = pipe.generate(prompt, seed=100 + i).images[0].resize((w, w), Image.NEAREST)
        x, y = (i % cols) * w, (i // cols) * h
        grid.paste(image, (x, y))
        words, lines = prompt.split(), [""]
        for word in words:
            if draw.textlength(lines[-1] + " " + word) > w - 8:
                lines.append(word)
            else:
                lines[-1] = (lines[-1] + " " + word).strip()
        for j, line in enumerate(lines[:3]):
            draw.text((x + 4, y + w + 2 + 11 * j), line, fill="black")
    OUT.parent.mkdir(exist_ok=True)
    grid.save(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
