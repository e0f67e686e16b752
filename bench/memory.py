"""Memory modes against diffusers: peak RSS and seconds of a big VAE decode, each mode in its own process.

The autoencoder of a diffusers folder (default: the SD 1.5-size random one ``bench/checkpoints.py``
writes) decodes one latent of ``--size`` pixels (default 1024: 128x128 latents), from the same numbers
on both sides:

    sfumato whole      AutoencoderKL.decode                 diffusers whole      vae.decode
    sfumato tiled      decode_tiled (--tile px, overlap 1/4) diffusers tiled     enable_tiling(), same tiles
    sfumato attn-slice decode inside attention_slicing(4096)

Printed: peak RSS (the worker's ru_maxrss, weights included) and decode seconds, each sfumato mode as a
ratio to diffusers' same mode, and the tiled image's PSNR against the whole decode (the whole decode is
skipped above ``--whole-max`` pixels: at 2048 px it needs about 10 GB and 20 minutes on 2 cores).

    python bench/checkpoints.py --preset sd1
    python bench/memory.py --size 1024
    python bench/memory.py --size 2048 --modes tiled      # 2048 px in bounded memory
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = Path("~/.cache/sfumato/bench/sd1-fp32").expanduser()
MODES = ("whole", "tiled", "attn-slice")


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_grad_enabled(False)
    z = torch.load(args.latents)
    if args.worker == "diffusers":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.model / "vae").eval()
        if args.mode == "tiled":
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = args.tile, args.tile // args.f
            vae.tile_overlap_factor = 0.25
        t0 = time.perf_counter()
        out = vae.decode(z).sample
    else:
        from sfumato.models import ops
        from sfumato.weights.load import load_vae

        vae = load_vae(args.model / "vae").eval()
        t0 = time.perf_counter()
        if args.mode == "tiled":
            out = vae.decode_tiled(z, tile=args.tile // args.f, overlap=0.25)
        else:
            with ops.attention_slicing(4096 if args.mode == "attn-slice" else None):
                out = vae.decode(z)
    seconds = time.perf_counter() - t0
    torch.save(out.clamp(-1, 1), args.image)
    return {"decode_s": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _psnr(a: Path, b: Path) -> float:
    import torch

    x, y = torch.load(a), torch.load(b)
    mse = float(((x - y) / 2).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="diffusers folder with a vae/ (default: "
                    f"{DEFAULT_MODEL})")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--whole-max", type=int, default=1024, help="largest size decoded whole (default 1024)")
    ap.add_argument("--tile", type=int, default=512, help="tile side in pixels (default 512, diffusers' for SD 1.5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", choices=("sfumato", "diffusers"), help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--latents", help=argparse.SUPPRESS)
    ap.add_argument("--f", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    if not (args.model / "vae").is_dir():
        raise SystemExit(f"{args.model}/vae: missing (python bench/checkpoints.py --preset sd1 writes it)")
    vae_cfg = json.loads((args.model / "vae" / "config.json").read_text())
    f = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    if args.size % f or args.tile % f:
        raise SystemExit(f"--size {args.size} and --tile {args.tile} must be multiples of the VAE's downscale {f}")
    import torch

    modes = [m for m in args.modes if m != "whole" or args.size <= args.whole_max]
    if "tiled" in modes and args.size <= args.whole_max and "whole" not in modes:
        modes.insert(0, "whole")  # the reference the tiled PSNR needs
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="sfumato-memory-") as tmp:
        latents = Path(tmp) / "z.pt"
        g = torch.Generator().manual_seed(args.seed)
        channels = vae_cfg.get("latent_channels", 4)
        torch.save(torch.randn(1, channels, args.size // f, args.size // f, generator=g), latents)
        for mode in modes:
            for side in ("sfumato", "diffusers"):
                if side == "diffusers" and mode == "attn-slice":
                    continue  # diffusers' VAE has no query slicing: compare with its whole decode
                image = Path(tmp) / f"{side}-{mode}.pt"
                cmd = [sys.executable, __file__, "--worker", side, "--mode", mode, "--model", str(args.model),
                       "--latents", str(latents), "--image", str(image), "--tile", str(args.tile), "--f", str(f)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if out.returncode or line is None:
                    print(f"{side} {mode} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}", file=sys.stderr)
                    return 1
                results[f"{side} {mode}"] = json.loads(line[len("RESULT "):])
        psnr = {}
        for side in ("sfumato", "diffusers"):
            whole, tiled = Path(tmp) / f"{side}-whole.pt", Path(tmp) / f"{side}-tiled.pt"
            if whole.exists() and tiled.exists():
                psnr[side] = _psnr(tiled, whole)
        if (Path(tmp) / "sfumato-tiled.pt").exists() and (Path(tmp) / "diffusers-tiled.pt").exists():
            psnr["sfumato tiled vs diffusers tiled"] = _psnr(Path(tmp) / "sfumato-tiled.pt",
                                                             Path(tmp) / "diffusers-tiled.pt")

    print(f"VAE decode of one {args.size}x{args.size} image ({args.model.name}), fp32, "
          f"{torch.get_num_threads()} torch thread(s)")
    print(f"{'':22} {'peak RSS GB':>12} {'decode s':>10} {'RSS ratio':>10} {'time ratio':>11}")
    for key, r in results.items():
        side, mode = key.split(" ", 1)
        ref = results.get(f"diffusers {mode if mode != 'attn-slice' else 'whole'}")
        ratio = (f"{r['peak_rss_gb'] / ref['peak_rss_gb']:10.3f} {r['decode_s'] / ref['decode_s']:11.3f}"
                 if side == "sfumato" and ref else "")
        print(f"{key:22} {r['peak_rss_gb']:12.2f} {r['decode_s']:10.1f} {ratio}")
    for key, value in psnr.items():
        print(f"PSNR tiled vs whole ({key}): {value:.1f} dB" if " vs " not in key else f"PSNR {key}: {value:.1f} dB")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "results": results, "psnr_db": psnr}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
