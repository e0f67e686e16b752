"""How close one UNet call and one VAE decode run to the machine's matmul limit.

Counts the FLOPs of one UNet call (classifier-free guidance batch 2: the negative and the positive prompt,
77-token context) and one VAE decode (batch 1) at ``--size`` with ``torch.utils.flop_counter.FlopCounterMode``
(multiply-adds as 2 FLOPs: convolutions, linear layers, attention; norms and pointwise ops are not counted),
measures this device's peak matmul rate (the best of several large ``torch.mm``), times each network, and
prints each time also as a fraction of the physical limit: (FLOPs / time) / peak.

Attention: FLOPs are counted on the ``meta`` device, where ``scaled_dot_product_attention`` runs as its math
form (two batched matmuls, which the counter counts). On CPU tensors it would not be counted: torch 2.13's
counter has no formula for ``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel sfumato's
attention runs on the CPU. Each SDPA call is also counted analytically (4 * B * heads * Lq * Lk * head_dim) and
the two are printed; if they disagree the analytic figure is used, and the output says so.

    python bench/roofline.py                              # SD 1.5 at 512 px, fp32, CPU (random weights)
    python bench/roofline.py --preset sdxl --size 1024
    python bench/roofline.py --model sd1-fp32.safetensors --size 256
    python bench/roofline.py --meta --preset sdxl          # FLOPs only: no weights, no timing
    python bench/roofline.py --tiny --size 32              # tiny configs, for tests

Threads: torch's (set OMP_NUM_THREADS); the peak is measured with the same threads as the networks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import CHOICES, init_weights, tiny_spec  # noqa: E402 - the sibling script

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sdpa_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """FLOPs of softmax(q k^T) v for (..., L, d) inputs: two matmuls, 2 * Lq * Lk * d each per head."""
    scores = q.shape[:-1].numel() * k.shape[-2]  # (..., Lq, Lk) entries
    return 2 * scores * q.shape[-1] + 2 * scores * v.shape[-1]


class _AttentionCount(TorchFunctionMode):
    """Per ``scaled_dot_product_attention`` call: the analytic FLOPs and what ``counter`` counted for it."""

    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter, self.analytic, self.counted, self.calls = counter, 0, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        self.counted += self.counter.get_total_flops() - before
        self.analytic += sdpa_flops(*args[:3])
        self.calls += 1
        return out


def count_flops(module: torch.nn.Module, *inputs, **kw) -> dict:
    """FLOPs of ``module(*inputs, **kw)`` on the meta device (module and inputs are moved there)."""
    module = module.to("meta")
    inputs = [x.to("meta") for x in inputs]
    kw = {k: None if v is None else v.to("meta") for k, v in kw.items()}
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter, _AttentionCount(counter) as attn:
        _call(module, inputs, kw)
    total = counter.get_total_flops()
    by_op: dict[str, int] = {}
    for op, n in counter.get_flop_counts()["Global"].items():
        name = str(op).replace("aten.", "")
        by_op[name] = by_op.get(name, 0) + n
    agree = abs(attn.counted - attn.analytic) <= 0.01 * max(attn.analytic, 1)
    if not agree:  # the counter missed (or miscounted) the attention kernel: use the analytic count
        total += attn.analytic - attn.counted
    return {"flops": total, "by_op": by_op, "attention_flops": attn.analytic, "attention_counted": attn.counted,
            "attention_calls": attn.calls, "attention_analytic_used": not agree}


def _call(module, inputs, kw):
    return module.decode(*inputs) if hasattr(module, "decode") else module(*inputs, **kw)


def peak_matmul(n: int, dtype: torch.dtype, device: str, repeats: int) -> dict:
    """Best rate of an (n x n) @ (n x n) ``torch.mm`` over ``repeats`` timed runs (after one warm-up)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        t0 = _now(device)
        torch.mm(a, b, out=c)
        times.append(_now(device) - t0)
    best = min(times[1:])
    return {"n": n, "seconds": best, "flops_per_s": 2 * n**3 / best}


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def time_call(module, inputs, kw, device: str, repeats: int) -> dict:
    """Median and best of ``repeats`` calls after one warm-up."""
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = _now(device)
            _call(module, inputs, kw)
            times.append(_now(device) - t0)
    return {"seconds": statistics.median(times[1:]), "best_s": min(times[1:])}


def networks(args: argparse.Namespace, dtype: torch.dtype):
    """(spec, unet, vae): from ``--model``, else built on meta and, unless ``--meta``, given random weights."""
    if args.model is not None:
        import sfumato

        pipe = sfumato.load(args.model, device=args.device, dtype=dtype)
        return pipe.spec, pipe.unet, pipe.vae
    from sfumato.config import PRESETS
    from sfumato.models.unet import UNetModel
    from sfumato.models.vae import AutoencoderKL

    spec = tiny_spec(args.preset) if args.tiny else PRESETS[args.preset]
    with torch.device("meta"):
        unet, vae = UNetModel(spec.unet).to(dtype), AutoencoderKL(spec.vae).to(dtype)
    if not args.meta:
        unet = init_weights(unet, seed=0, prefix="unet.").to(args.device)
        vae = init_weights(vae, seed=0, prefix="vae.").to(args.device)
    return spec, unet.eval().requires_grad_(False), vae.eval().requires_grad_(False)


def inputs_for(spec, size: int, dtype: torch.dtype, device: str):
    """UNet inputs for a CFG batch of 2 and the VAE's latent, at ``size`` pixels."""
    f = spec.vae.downscale
    if size % f:
        raise SystemExit(f"--size {size} must be a multiple of the VAE's downscale {f}")
    g = torch.Generator().manual_seed(0)
    u = spec.unet
    x = torch.randn(2, u.in_channels, size // f, size // f, generator=g)
    t = torch.full((2,), 500.0)
    context = torch.randn(2, 77, u.context_dim, generator=g)
    y = torch.randn(2, u.adm_in_channels, generator=g) if u.adm_in_channels else None
    z = torch.randn(1, spec.vae.embed_dim, size // f, size // f, generator=g)
    move = lambda v: None if v is None else v.to(device, dtype)  # noqa: E731
    return (move(x), t.to(device)), {"context": move(context), "y": move(y)}, (move(z),)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=CHOICES, default="sd1")
    ap.add_argument("--model", type=Path, help="time this checkpoint's networks instead of random weights")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--tiny", action="store_true", help="tiny configs, for tests")
    ap.add_argument("--meta", action="store_true", help="count FLOPs only (meta device: no weights, no timing)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls of each network (after a warm-up)")
    ap.add_argument("--mm-size", type=int, help="side of the peak-rate matmul (default 4096; 512 with --tiny)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]
    spec, unet, vae = networks(args, dtype)
    unet_in, unet_kw, vae_in = inputs_for(spec, args.size, dtype, "meta" if args.meta else args.device)

    res: dict = {"family": spec.family, "tiny": args.tiny, "size": args.size, "dtype": args.dtype,
                 "device": "meta" if args.meta else args.device, "threads": torch.get_num_threads()}
    if not args.meta:
        mm = args.mm_size or (512 if args.tiny else 4096)
        res["peak"] = peak_matmul(mm, dtype, args.device, max(args.repeats, 3))
        res["unet"] = time_call(unet, unet_in, unet_kw, args.device, args.repeats)
        res["vae_decode"] = time_call(vae, vae_in, {}, args.device, args.repeats)
    # counting moves the modules to meta: after timing
    res.setdefault("unet", {}).update(count_flops(unet, *unet_in, **unet_kw))
    res.setdefault("vae_decode", {}).update(count_flops(vae, *vae_in))

    where = "FLOPs only (meta)" if args.meta else f"{args.dtype} on {args.device}, {res['threads']} thread(s)"
    print(f"roofline: {spec.family}{' (tiny)' if args.tiny else ''}, {args.size}x{args.size}, {where}")
    peak = res.get("peak")
    if peak:
        print(f"peak matmul: {peak['n']}x{peak['n']} torch.mm, {peak['flops_per_s'] / 1e9:.1f} GFLOP/s (best of "
              f"{max(args.repeats, 3)})")
    print(f"{'':22} {'GFLOP':>10} {'attention':>10} {'seconds':>9} {'GFLOP/s':>9} {'of peak':>8}")
    for key, label in (("unet", "UNet call (CFG b=2)"), ("vae_decode", "VAE decode (b=1)")):
        r = res[key]
        line = f"{label:22} {r['flops'] / 1e9:10.2f} {r['attention_flops'] / 1e9:10.2f}"
        if peak:
            r["flops_per_s"] = r["flops"] / r["seconds"]
            r["fraction_of_peak"] = r["flops_per_s"] / peak["flops_per_s"]
            line += f" {r['seconds']:9.3f} {r['flops_per_s'] / 1e9:9.1f} {100 * r['fraction_of_peak']:7.1f}%"
        print(line)
    for key, label in (("unet", "UNet"), ("vae_decode", "VAE decode")):
        r = res[key]
        ops = ", ".join(f"{op} {n / 1e9:.2f}" for op, n in sorted(r["by_op"].items(), key=lambda kv: -kv[1]))
        note = ("; the counter missed it, the analytic count is used" if r["attention_analytic_used"]
                else "; counted = analytic")
        print(f"{label} GFLOP by op: {ops}; attention {r['attention_calls']} SDPA calls, counted "
              f"{r['attention_counted'] / 1e9:.2f}, analytic {r['attention_flops'] / 1e9:.2f}{note}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
