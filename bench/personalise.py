"""Personalisation on the built-in model: teach it a shape it has never seen, with each method.

The built-in model was trained on circles, squares, triangles, stars and rings only. Here it is shown a
handful of renderings of a novel kind (``scenes.NOVEL_KINDS``: a crescent by default) captioned with a rare
token in place of the kind's name ("a large red zwx at the top, white background"), and trained by each
method (``sfumato.train.personalise``). Then for prompts with the token (new colours, sizes, places and
backgrounds: scenes the examples did not show) the analyser (``sfumato.train.score``) says how often the
image shows the novel kind, before training (the baseline, near 0) and after, and how well the model still
draws the old kinds: all-five accuracy on the quality bench's one-shape prompts, before and after (the
change in points; DreamBooth's prior preservation should keep it within 5).

Prior preservation (DreamBooth and LoRA; ``--prior``): ``renders`` gives the trainer renderings of the
model's own training distribution (old kinds only, varied captions, no held-out combination) as class
images (``FinetuneConfig.class_data``: kohya's regularisation images); ``drawn`` has the model draw its
class images from one-shape prompts of the old kinds (DreamBooth's paper); ``none`` trains on the
examples alone.

    python bench/personalise.py                                  # all four methods, defaults below
    python bench/personalise.py --methods lora --steps 200 --eval 40
    python bench/personalise.py --methods lora --set rank=16 --out runs    # any FinetuneConfig field
    python bench/personalise.py --methods lora --out runs --rescore --eval 100 --eval-seed 3   # score again

Every figure comes from this run; nothing is read from a file. Seeds are fixed, so a run is repeatable on
one machine.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import sfumato
from sfumato.train.scenes import describe, iter_dataset, render, sample_scene
from sfumato.train.score import analyse, score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from builtin_quality import bench_scenes  # noqa: E402

TOKEN = "zwx"
# per method: steps, learning rate and the method's own settings, chosen for the 11M-parameter built-in model
PLANS = {
    "textual-inversion": dict(steps=800, lr=3e-2, init_word="circle", vectors=4),
    # prior: where prior preservation's class images come from (see the module docstring), how many, and
    # the weight of their loss; turned into FinetuneConfig fields by prior_settings()
    "lora": dict(steps=1200, lr=1e-3, rank=8, prior="renders", prior_images=256, prior_weight=1.0),
    "dreambooth": dict(steps=1200, lr=2e-4, prior="renders", prior_images=256, prior_weight=1.0),
    "finetune": dict(steps=600, lr=1e-4, ema_decay=0.99),
}


def output_of(root: Path, method: str) -> Path:
    """Where ``finetune`` writes ``method``'s file in this script's run folder ``root``."""
    from sfumato.train.personalise import FinetuneConfig

    token = TOKEN if method == "textual-inversion" else None
    return root / method / FinetuneConfig(method=method, token=token).output_name()


def trained(method: str, output: Path):
    """The built-in model with ``method``'s file applied: an embedding, a LoRA, or the trained model itself."""
    if method in ("dreambooth", "finetune"):
        return sfumato.load(output)
    pipe = sfumato.load()
    if method == "lora":
        pipe.load_lora(output, 1.0)
    else:
        pipe.load_embedding(output)
    return pipe


def write_examples(folder: Path, kind: str, n: int, seed: int, balanced: bool = True) -> list:
    """``n`` one-shape renderings of ``kind``, captioned with the token in the kind's place; ``balanced``:
    small and large alternate (as a user picks examples that show the subject at each size) instead of each
    drawn at random."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    from sfumato.train.scenes import SIZES, caption

    scenes = []
    for i in range(n):
        scene = sample_scene(rng, two_shapes=0.0, kinds=(kind,))
        while balanced and scene.shapes[0].size != SIZES[i % len(SIZES)]:
            scene = sample_scene(rng, two_shapes=0.0, kinds=(kind,))
        render(scene).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption(scene, rng, names={kind: TOKEN}) + "\n")
        scenes.append(scene)
    return scenes


def prior_settings(source: str, n: int, weight: float, folder: Path) -> dict:
    """FinetuneConfig's prior-preservation fields for ``n`` class images of the old kinds from ``source``."""
    if source == "none" or not n:
        return {}
    if source == "renders":  # the model's training distribution: old kinds, varied captions, no held-out combo
        folder.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        for i, (image, text, _) in enumerate(iter_dataset(n, seed=7)):
            Image.fromarray(image).save(folder / f"{i:04d}.png")
            (folder / f"{i:04d}.txt").write_text(text + "\n")
        return dict(class_data=str(folder), prior_weight=weight)
    rng = random.Random(3)  # drawn: the model's own images of one-shape prompts of the old kinds
    return dict(class_prompt=tuple(describe(sample_scene(rng, two_shapes=0.0)) for _ in range(n)), class_images=n,
                prior_weight=weight)


def novel_rate(pipe, kind: str, n: int, seed: int) -> tuple[float, dict[str, tuple[int, int]]]:
    """Fraction of ``n`` token prompts (scenes not among the examples) whose image shows ``kind``, and per
    size the (hits, prompts) behind it."""
    rng = random.Random(seed)
    by_size: dict[str, list[int]] = {}
    for i in range(n):
        scene = sample_scene(rng, two_shapes=0.0, kinds=(kind,))
        image = pipe.generate(describe(scene, names={kind: TOKEN}), seed=5000 + i).images[0]
        found = analyse(image).shapes
        tally = by_size.setdefault(scene.shapes[0].size, [0, 0])
        tally[0] += bool(found) and found[0].kind == kind
        tally[1] += 1
    return sum(h for h, _ in by_size.values()) / n, {size: tuple(t) for size, t in sorted(by_size.items())}


def sizes_text(by_size: dict[str, tuple[int, int]]) -> str:
    """``{"large": (32, 32), "small": (6, 18)}`` -> ``"32/32 6/18"`` (large, then small)."""
    return " ".join(f"{h}/{t}" for _, (h, t) in sorted(by_size.items()))


def ceiling(pipe, kind: str, n: int, seed: int) -> float:
    """The same count on the autoencoder's round trip of each prompt's own rendering: no diffusion model on
    these latents can draw the kind more recognisably than its autoencoder reproduces it."""
    import numpy as np
    import torch
    from PIL import Image

    rng = random.Random(seed)
    hits = 0
    for _ in range(n):
        scene = sample_scene(rng, two_shapes=0.0, kinds=(kind,))
        x = torch.from_numpy(np.array(render(scene))).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.inference_mode():
            y = pipe.vae.decode(pipe.vae.encode(x).mean)
        arr = ((y[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        found = analyse(Image.fromarray(arr)).shapes
        hits += bool(found) and found[0].kind == kind
    return hits / n


def old_accuracy(pipe, n: int) -> float:
    """All-five accuracy on the first ``n`` of the quality bench's prompts (old kinds only)."""
    scenes = bench_scenes()[:n]
    right = 0
    for i, (scene, _) in enumerate(scenes):
        right += all(score(pipe.generate(describe(scene), seed=1000 + i).images[0], scene).values())
    return right / len(scenes)


def parse_overrides(ap: argparse.ArgumentParser, items: list[str]) -> dict:
    """``--set FIELD=VALUE`` items as FinetuneConfig fields, each value parsed as its field's type."""
    import dataclasses

    from sfumato.train.personalise import FinetuneConfig

    fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in fields or name == "method":
            ap.error(f"--set {item!r}: expected FIELD=VALUE with FIELD a FinetuneConfig field "
                     f"({', '.join(n for n in fields if n != 'method')})")
        kind = str(fields[name].type).split(" |")[0]  # "int", "float | None", "bool", "str | None", ...
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                ap.error(f"--set {item!r}: {name} takes true or false")
            out[name] = text.lower() in ("true", "1")
        elif kind in ("int", "float"):
            try:
                out[name] = int(text) if kind == "int" else float(text)
            except ValueError:
                ap.error(f"--set {item!r}: {name} takes {'an integer' if kind == 'int' else 'a number'}")
        elif kind == "str":
            out[name] = text
        else:
            ap.error(f"--set {item!r}: {name} ({fields[name].type}) cannot be set from the command line")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(PLANS), help="comma-separated (default: all four)")
    ap.add_argument("--kind", default="crescent", help="the novel kind to teach (default: crescent; the built-in "
                    "autoencoder blurs small hexagons towards circles, capping hexagon at about 67%%)")
    # 24: with 8 the examples show the shape in too few colours and backgrounds for the 11M-parameter model
    # to draw it in unseen ones (LoRA 52% against 78%, DreamBooth 48% against 70%; bench/RESULTS.md)
    ap.add_argument("--examples", type=int, default=24, help="example images (default: 24)")
    ap.add_argument("--unbalanced", action="store_true", help="draw each example's size at random instead of "
                    "alternating small and large")
    ap.add_argument("--steps", type=int, help="override every method's steps")
    ap.add_argument("--lr", type=float, help="override every method's learning rate")
    ap.add_argument("--prior", choices=("renders", "drawn", "none"), help="override the class images' source "
                    "for DreamBooth and LoRA (default: each method's plan)")
    ap.add_argument("--prior-images", type=int, help="override the number of class images")
    ap.add_argument("--prior-weight", type=float, help="override the prior loss weight")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a FinetuneConfig field for every method, e.g. --set rank=16 --set lora_conv=true")
    ap.add_argument("--batch", type=int, default=4, help="batch size (default: 4)")
    ap.add_argument("--eval", type=int, default=50, help="token prompts scored per model (default: 50)")
    ap.add_argument("--old", type=int, default=60, help="old-kind prompts scored per model (default: 60)")
    ap.add_argument("--eval-seed", type=int, default=2, help="seed of the token prompts' scenes (default: 2)")
    ap.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--rescore", action="store_true", help="train nothing: score the methods' files already in "
                    "--out (e.g. on more prompts, --eval 100, or other ones, --eval-seed 3)")
    ap.add_argument("--threads", type=int, help="torch threads")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in PLANS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(PLANS)}")

    from sfumato.train.common import hardware, set_threads
    from sfumato.train.personalise import FinetuneConfig, finetune

    threads = set_threads(args.threads)
    if args.rescore and not args.out:
        ap.error("--rescore needs --out: the folder of an earlier run")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sfumato-personalise-"))
    data = root / "examples"
    overrides = parse_overrides(ap, args.set)
    if args.rescore:
        missing = [str(output_of(root, m)) for m in methods if not output_of(root, m).is_file()]
        if missing:
            ap.error(f"--rescore: no {', '.join(missing)}")
    else:
        write_examples(data, args.kind, args.examples, seed=1, balanced=not args.unbalanced)
    what = (f"score the files trained in {root}" if args.rescore else
            f"teach '{args.kind}' as '{TOKEN}' from {args.examples} examples "
            f"({'random sizes' if args.unbalanced else 'small and large alternating'})")
    print(f"# personalisation on the built-in model: {what}; {hardware()}, {threads} threads"
          + "".join(f"; {k}={v}" for k, v in overrides.items()))
    base = sfumato.load()
    t0 = time.perf_counter()
    (baseline, _), base_old = novel_rate(base, args.kind, args.eval, args.eval_seed), old_accuracy(base, args.old)
    print(f"untrained: {args.kind} in {baseline:.0%} of {args.eval} token prompts; old kinds all-five "
          f"{base_old:.3f} ({time.perf_counter() - t0:.0f} s to score); autoencoder ceiling for {args.kind}: "
          f"{ceiling(base, args.kind, args.eval, args.eval_seed):.0%}")
    print(f"{'method':<18}{'steps':>6}{'prior':>18}{'train s':>9}{'final loss':>11}{args.kind + ' rate':>14}"
          f"{'large small':>13}{'old all-five':>14}{'change':>9}")
    for method in methods:
        plan = dict(PLANS[method])
        if args.steps:
            plan["steps"] = args.steps
        if args.lr:
            plan["lr"] = args.lr
        plan.update(overrides)
        prior = "-"
        if "prior" in plan:
            for key, value in (("prior", args.prior), ("prior_images", args.prior_images),
                               ("prior_weight", args.prior_weight)):
                if value is not None:
                    plan[key] = value
            source, n, weight = plan.pop("prior"), plan.pop("prior_images"), plan.pop("prior_weight")
            if not args.rescore:
                plan.update(prior_settings(source, n, weight, root / f"{method}-class"))
            prior = f"{source} {n} x{weight:g}" if source != "none" and n else "none"
        if args.rescore:
            steps, seconds, loss = "-", "-", "-"
        else:
            cfg = FinetuneConfig(**{"method": method, "batch_size": args.batch, "seed": 0,
                                    "token": TOKEN if method == "textual-inversion" else None, **plan})
            res = finetune(sfumato.load(), data, cfg, out_dir=root / method, progress=False)
            steps, seconds, loss = res.step, f"{res.seconds:.0f}", f"{res.losses[-1]:.4f}"
        pipe = trained(method, output_of(root, method))
        (rate, by_size), old = novel_rate(pipe, args.kind, args.eval, args.eval_seed), old_accuracy(pipe, args.old)
        print(f"{method:<18}{steps:>6}{prior:>18}{seconds:>9}{loss:>11}{rate:>14.0%}{sizes_text(by_size):>13}"
              f"{old:>14.3f}{(old - base_old) * 100:>+8.1f}p", flush=True)
    print(f"(runs in {root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
