"""``sfumato train``: the command line over :mod:`sfumato.train.trainer`, on synthetic scenes.

    sfumato train builtin --out run --minutes 35          # both stages, then run/model.safetensors
    sfumato train vae --out run --steps 800               # run/vae.safetensors (latent scale in its metadata)
    sfumato train diffusion --vae run/vae.safetensors --out run --steps 1500 [--resume]
    sfumato train diffusion --init builtin --out run2 --steps 1000   # continue training a model
    sfumato train vae --init builtin --decoder-only --out run3 --steps 600  # a sharper decoder, same latents
    sfumato train lora --data pics --caption "a photo of {}" --token sks --out run4   # also textual-inversion,
                                                                                     # dreambooth, finetune

Argument parsing only imports the standard library; torch and the trainer load when a command runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="training seed: weights init, noise, order (default: 0)")
    p.add_argument("--n-images", type=int, default=10000, help="synthetic scenes to train on (default: 10000)")
    p.add_argument("--data-seed", type=int, default=0, help="which synthetic dataset (default: 0)")
    p.add_argument("--threads", type=int, help="torch threads (default: the CPUs available)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")


def _stage(p: argparse.ArgumentParser, *, steps: int, batch: int, lr: float) -> None:
    p.add_argument("--steps", type=int, default=steps, help=f"optimiser steps (default: {steps})")
    p.add_argument("--batch", type=int, default=batch, help=f"batch size (default: {batch})")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {lr:g})")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (default: 250)")
    p.add_argument("--resume", nargs="?", const="", metavar="CKPT", help="continue a checkpoint (default: the "
                   "one in --out)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="autocast on CUDA (the CPU trains in fp32; default: no)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` subcommands, added to ``parser`` (the ``sfumato train`` parser)."""
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)

    b = sub.add_parser("builtin", help="train the built-in model: autoencoder, then diffusion; export it")
    _common(b)
    b.add_argument("--minutes", type=float, default=35.0, help="wall-time budget (default: 35)")
    b.add_argument("--vae-steps", type=int, help="autoencoder steps (default: fit the budget)")
    b.add_argument("--steps", type=int, help="diffusion steps (default: fit the budget)")
    b.add_argument("--prediction", choices=("eps", "v"), help="what the UNet predicts (default: the built-in "
                   "preset's, v)")
    b.add_argument("--resume", action="store_true", help="continue the interrupted run in --out (its plan.json)")

    v = sub.add_parser("vae", help="train the autoencoder; writes vae.safetensors")
    _common(v)
    _stage(v, steps=1800, batch=32, lr=2e-3)
    v.add_argument("--crop", type=int, default=32, help="train on random CROP x CROP windows; 0: whole images "
                   "(default: 32)")
    v.add_argument("--kl-weight", type=float, default=1e-6, help="KL weight in LDM's units (default: 1e-6)")
    v.add_argument("--init", metavar="MODEL", help="continue this autoencoder: a model (file, folder or "
                   "'builtin') or a VAE file; for a model, also writes model.safetensors with the new autoencoder")
    v.add_argument("--decoder-only", action="store_true", help="train only the decoder (needs --init): the "
                   "latents stay as they were, so the model's UNet keeps working")

    d = sub.add_parser("diffusion", help="train the UNet and text encoder on a trained autoencoder's latents; "
                       "writes checkpoint.pt and model.safetensors")
    _common(d)
    _stage(d, steps=1500, batch=32, lr=3e-4)
    d.add_argument("--vae", metavar="PATH", help="the autoencoder (vae.safetensors of `train vae`); required "
                   "without --init")
    d.add_argument("--init", metavar="MODEL", help="start from this model's UNet, text encoder, autoencoder and "
                   "latent scale (a checkpoint file or folder; 'builtin': the built-in model) instead of random "
                   "weights")
    d.add_argument("--prediction", choices=("eps", "v"), help="what the UNet predicts (default: the --init "
                   "model's, else the built-in preset's, v)")
    d.add_argument("--offset-noise", type=float, default=0.0, help="offset-noise std (default: 0)")
    d.add_argument("--snr-gamma", type=float, help="Min-SNR-gamma loss weighting, e.g. 5 (default: plain MSE)")
    d.add_argument("--timestep-range", type=int, nargs=2, metavar=("LO", "HI"),
                   help="draw training timesteps uniformly from LO..HI inclusive (default: the whole schedule)")
    d.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step (default: 1)")
    d.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay (default: 0.999)")
    d.add_argument("--caption-dropout", type=float, default=0.1, help="empty-prompt fraction, for CFG (default: 0.1)")
    d.add_argument("--freeze-text-encoder", action="store_true", help="keep the text encoder fixed")

    for method, what in (("textual-inversion", "learn a new token's embedding; writes <token>.safetensors"),
                         ("dreambooth", "fine-tune the UNet on a subject, with prior preservation; writes "
                          "model.safetensors"),
                         ("lora", "train a LoRA; writes lora.safetensors (kohya / AUTOMATIC1111 layout)"),
                         ("finetune", "fine-tune the whole UNet with EMA; writes model.safetensors")):
        _personalise(sub.add_parser(method, help=what), method)


def _personalise(p: argparse.ArgumentParser, method: str) -> None:
    p.add_argument("--model", metavar="PATH", help="the model to train (file or diffusers folder; default: the "
                   "built-in model)")
    p.add_argument("--data", required=True, metavar="DIR", help="images with .txt captions beside them (kohya's "
                   "N_name folders repeat N times), or any images with --caption")
    p.add_argument("--caption", metavar="TEMPLATE", help="one caption for every image, '{}' standing for --token "
                   "(e.g. 'a photo of {}')")
    p.add_argument("--token", required=method == "textual-inversion", help="the new word (textual inversion) / "
                   "the rare token filling --caption")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--name", help="output file stem (default: the token, 'lora' or 'model')")
    p.add_argument("--steps", type=int, default=500, help="optimiser steps (default: 500)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the method's, "
                   "sfumato.train.personalise.DEFAULT_LR)")
    p.add_argument("--resolution", type=int, help="training size (default: the model's)")
    p.add_argument("--no-buckets", action="store_true", help="square crops only, no aspect-ratio buckets")
    p.add_argument("--random-crop", action="store_true", help="random instead of centred crops")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--snr-gamma", type=float, help="Min-SNR-gamma weighting, e.g. 5")
    p.add_argument("--offset-noise", type=float, default=0.0, help="offset-noise std (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default: 100)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--validate-every", type=int, default=0, help="render --validation-prompt every N steps")
    p.add_argument("--validation-prompt", action="append", default=[], metavar="PROMPT", help="repeatable")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no", help="autocast on CUDA")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, about a third more time")
    p.add_argument("--threads", type=int, help="torch threads (default: the CPUs available)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    if method == "textual-inversion":
        p.add_argument("--init-word", default="*", help="the word the new vectors start from (default: '*')")
        p.add_argument("--vectors", type=int, default=1, help="vectors per token (default: 1)")
    if method in ("lora", "dreambooth"):
        p.add_argument("--train-text-encoder", action="store_true", help="train the text encoder too")
        p.add_argument("--class-prompt", action="append", help="prior preservation: the subject's class, e.g. "
                       "'a photo of a dog' (repeatable: the class images cycle through the prompts)")
        p.add_argument("--class-images", type=int, default=0, help="class images to generate (default: 0)")
        p.add_argument("--class-data", help="prior preservation from your own captioned class images (a folder "
                       "as --data; kohya's regularisation images) instead of generated ones")
        p.add_argument("--prior-weight", type=float, default=1.0, help="prior loss weight (default: 1)")
    if method == "lora":
        p.add_argument("--rank", type=int, default=4, help="LoRA rank (default: 4)")
        p.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank)")
        p.add_argument("--conv", action="store_true", help="also the res-block convs (LoCon)")
        p.add_argument("--peft", action="store_true", help="write diffusers' PEFT layout instead of kohya's")
    if method == "finetune":
        p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay (default: 0.999)")


def _run_personalise(args: argparse.Namespace, log) -> int:  # noqa: ANN001
    import sfumato
    from sfumato.train.common import set_threads
    from sfumato.train.personalise import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        method=args.stage, steps=args.steps, batch_size=args.batch, grad_accum=args.grad_accum, lr=args.lr,
        resolution=args.resolution, buckets=not args.no_buckets, random_crop=args.random_crop, flip=args.flip,
        snr_gamma=args.snr_gamma, offset_noise=args.offset_noise, seed=args.seed, caption_template=args.caption,
        token=args.token, init_word=getattr(args, "init_word", "*"), vectors=getattr(args, "vectors", 1),
        rank=getattr(args, "rank", 4), alpha=getattr(args, "alpha", None), lora_conv=getattr(args, "conv", False),
        train_text_encoder=getattr(args, "train_text_encoder", False), peft_format=getattr(args, "peft", False),
        class_prompt=tuple(args.class_prompt) if getattr(args, "class_prompt", None) else None, class_images=getattr(args, "class_images", 0),
        class_data=getattr(args, "class_data", None),
        prior_weight=getattr(args, "prior_weight", 1.0), ema_decay=getattr(args, "ema_decay", 0.999),
        checkpoint_every=args.checkpoint_every, validate_every=args.validate_every,
        validation_prompts=tuple(args.validation_prompt), mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing)
    cfg.check()  # before the model loads
    from sfumato.train.data import scan_dataset

    data = scan_dataset(args.data, template=cfg.caption_template, placeholder=cfg.token if cfg.caption_template
                        else None)
    log(f"{len(data.items)} images, {data.samples_per_epoch} samples per epoch; {set_threads(args.threads)} threads")
    pipe = sfumato.load(args.model, device=args.device, dtype="fp32")
    res = finetune(pipe, data, cfg, out_dir=args.out, resume=args.resume, name=args.name, progress=not args.quiet)
    log(f"{res.step} steps, final loss {res.losses[-1]:.4f}, {res.seconds:.1f}s")
    print(res.output)
    return 0


def _resume(args: argparse.Namespace, name: str) -> Path | None:
    if args.resume is None:
        return None
    return Path(args.resume) if args.resume else Path(args.out) / name


def _init_autoencoder(init: str):  # noqa: ANN202 - (Pipeline | None, AutoencoderKL, float | None)
    """``--init`` of ``train vae``: a model (its pipeline, autoencoder and latent scale) or a VAE file."""
    import sfumato
    from sfumato.errors import UnknownModelError
    from sfumato.train.vae_stage import load_trained_vae

    try:
        pipe = sfumato.load(None if init == "builtin" else init, dtype="fp32")
    except UnknownModelError:  # no UNet: a standalone autoencoder
        if Path(init).is_dir():
            raise
        vae, scale = load_trained_vae(init)  # a standalone autoencoder file
        return None, vae, scale
    return pipe, pipe.vae, pipe.spec.latent_scale


def run(args: argparse.Namespace) -> int:
    """Run ``sfumato train STAGE``; prints what it wrote, the wall time and the hardware."""
    from sfumato.config import BUILTIN
    from sfumato.train import scenes
    from sfumato.train.common import hardware, set_threads
    from sfumato.train.trainer import MODEL_FILE, export_pipeline, train_builtin
    from sfumato.train.vae_stage import VAE_CHECKPOINT, load_trained_vae, measure_latent_std, train_vae

    t0 = time.monotonic()
    out = Path(args.out)

    def log(message: str) -> None:
        print(f"sfumato: {message}", file=sys.stderr, flush=True)

    if args.stage in ("textual-inversion", "dreambooth", "lora", "finetune"):
        return _run_personalise(args, log)
    if args.stage == "builtin":
        result = train_builtin(out, minutes=args.minutes, seed=args.seed, n_images=args.n_images,
                               vae_steps=args.vae_steps, diffusion_steps=args.steps, prediction=args.prediction,
                               threads=args.threads, resume=args.resume, progress=not args.quiet, log=log)
        print(result.path)
        return 0

    if args.stage == "diffusion" and args.init is None and args.vae is None:  # before rendering any scene
        log("error: give the autoencoder (--vae PATH) or a model to start from (--init MODEL)")
        return 2
    if args.stage == "vae" and args.decoder_only and args.init is None:
        log("error: --decoder-only fine-tunes a trained autoencoder: give it with --init MODEL")
        return 2
    threads = set_threads(args.threads)
    data = scenes.dataset(args.n_images, args.data_seed)
    log(f"{args.n_images} scenes (dataset {args.data_seed}) ready; {threads} threads")
    if args.stage == "vae":
        pipe, vae, std = None, None, None
        if args.init is not None:
            pipe, vae, scale = _init_autoencoder(args.init)
            std = None if scale is None else 1.0 / scale
            log(f"starting from {args.init}'s autoencoder" + ("" if scale is None else f" (latent scale {scale:.5f})"))
        res = train_vae(vae.cfg if vae is not None else BUILTIN.vae, data.images, steps=args.steps,
                        batch_size=args.batch, lr=args.lr, kl_weight=args.kl_weight, crop=args.crop or None,
                        seed=args.seed, out_dir=out, checkpoint_every=args.checkpoint_every,
                        resume_from=_resume(args, VAE_CHECKPOINT), device=args.device,
                        mixed_precision=args.mixed_precision, vae=vae, decoder_only=args.decoder_only,
                        latent_std=std, progress=not args.quiet)
        log(f"latent std {res.latent_std:.5f} -> latent_scale {res.latent_scale:.5f}")
        print(res.path)
        if pipe is not None and not args.decoder_only:
            log("no model.safetensors: a retrained encoder moves the latents the model's UNet was trained on "
                "(fine-tune with --decoder-only to keep them)")
        elif pipe is not None:  # the model with its new decoder
            print(export_pipeline(pipe.spec, pipe.unet, res.vae.cpu(), pipe.text_encoders, out / MODEL_FILE,
                                  latent_scale=res.latent_scale,
                                  metadata={"sfumato.train.init": str(args.init),
                                            "sfumato.train.vae_steps": str(len(res.losses)),
                                            "sfumato.train.decoder_only": str(args.decoder_only).lower()}))
    else:
        from sfumato.train.diffusion_stage import CHECKPOINT, train_diffusion

        spec, nets = BUILTIN, {}
        if args.init is not None:
            import sfumato

            pipe = sfumato.load(None if args.init == "builtin" else args.init, dtype="fp32")
            spec, vae, scale = pipe.spec, pipe.vae, pipe.spec.latent_scale
            nets = {"unet": pipe.unet, "text_encoders": pipe.text_encoders}
            log(f"starting from {args.init} ({spec.family}, {spec.prediction}-prediction, latent scale {scale:.5f})")
        else:
            vae, scale = load_trained_vae(args.vae)
        if scale is None:
            scale = 1.0 / measure_latent_std(vae, data.images, seed=args.seed)
            log(f"{args.vae} stores no latent scale; measured {scale:.5f}")
        res = train_diffusion(spec, vae, data, steps=args.steps, batch_size=args.batch, lr=args.lr,
                              prediction=args.prediction or spec.prediction, caption_dropout=args.caption_dropout,
                              offset_noise=args.offset_noise, snr_gamma=args.snr_gamma,
                              timestep_range=args.timestep_range, **nets,
                              ema_decay=args.ema_decay, grad_accum=args.grad_accum,
                              mixed_precision=args.mixed_precision, seed=args.seed, out_dir=out,
                              resume_from=_resume(args, CHECKPOINT), checkpoint_every=args.checkpoint_every,
                              train_text_encoder=not args.freeze_text_encoder, latent_scale=scale,
                              device=args.device, progress=not args.quiet)
        path = export_pipeline(res.spec, res.unet_ema, vae, res.text_encoders_ema, out / MODEL_FILE,
                               metadata={"sfumato.train.steps": str(res.step), "sfumato.train.seed": str(args.seed),
                                         **({"sfumato.train.init": str(args.init)} if args.init else {})})
        print(path)
    seconds = time.monotonic() - t0
    took = f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f} min"
    log(f"done in {took} on {hardware(args.device)}")
    return 0
