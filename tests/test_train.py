"""The trainer on a tiny model (UNet 32 channels, 2x autoencoder, 1-layer text encoder) and 16 synthetic
scenes at 32 px: both stages reduce their loss, a run resumed from a checkpoint equals the uninterrupted
run bit for bit, a seed reproduces a run bit for bit, the exported file loads through ``sfumato.load`` and
generates, and the noising and v target match diffusers' ``DDPMScheduler`` (measured max|diff| 0.0 for
both in fp32; bound 1e-6).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sfumato
from sfumato.config import BUILTIN, TextEncoderConfig, UNetConfig, VAEConfig
from sfumato.errors import CheckpointError, InvalidParameterError
from sfumato.sampling import discrete_schedule
from sfumato.train import scenes
from sfumato.train.common import EMA, batch_indices, lr_at
from sfumato.train.diffusion_stage import CHECKPOINT, add_noise, diffusion_target, min_snr_weight, train_diffusion
from sfumato.train.trainer import export_pipeline
from sfumato.train.vae_stage import VAE_CHECKPOINT, train_vae
from sfumato.weights import io

# Detected as "builtin" by sfumato.load (same text-encoder prefix, 32-wide UNet heads, 64-wide text heads).
TINY = replace(
    BUILTIN,
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(0, 1),
                    transformer_depth_middle=1, num_heads=None, head_dim=32, context_dim=64, use_linear_proj=True),
    vae=VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1),
    text_encoders=(replace(BUILTIN.text_encoders[0],
                           config=TextEncoderConfig(width=64, layers=1, heads=1, mlp_width=128, activation="gelu")),),
    default_size=32,
)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, list[str]]:
    scene_data = scenes.dataset(16, seed=0, workers=1)
    x = torch.from_numpy(scene_data.images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (16, 3, 64, 64)
    return F.avg_pool2d(x, 2), scene_data.captions  # 32 px keeps the test fast


@pytest.fixture(scope="module")
def trained_vae(data):
    # four images, each batch all of them: the loss of a few steps is then comparable from step to step
    return train_vae(TINY.vae, data[0][:4], steps=20, batch_size=4, lr=3e-3, seed=0, progress=False)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """max|diff| over all weights (0.0 when bit-identical)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# --- pieces -----------------------------------------------------------------------------------------------

def test_data_order_is_a_permutation_per_epoch() -> None:
    first = batch_indices(0, 10, 10, seed=3)
    second = batch_indices(10, 10, 10, seed=3)
    assert sorted(first.tolist()) == list(range(10)) and sorted(second.tolist()) == list(range(10))
    assert first.tolist() != second.tolist()  # each epoch is reshuffled
    assert batch_indices(5, 10, 10, seed=3).tolist() == first[5:].tolist() + second[:5].tolist()


def test_lr_schedule_and_ema_warmup() -> None:
    assert lr_at(0, 1.0, 100, 10) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, 10) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 100, 10) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 100, 10) == pytest.approx(0.1)
    ema = EMA({"m": torch.nn.Linear(2, 2)}, 0.999)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.999


def test_noising_and_v_target_match_diffusers() -> None:
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn((6, 4, 8, 8), generator=g), torch.randn((6, 4, 8, 8), generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    alphas_cumprod = discrete_schedule(BUILTIN.schedule).alphas_cumprod.float()
    x_t, alpha, sigma = add_noise(x0, eps, alphas_cumprod, t)
    d_noise = float((x_t - ref.add_noise(x0, eps, t)).abs().max())
    d_v = float((diffusion_target(x0, eps, alpha, sigma, "v") - ref.get_velocity(x0, eps, t)).abs().max())
    assert d_noise <= 1e-6, f"x_t vs diffusers add_noise: max|diff| {d_noise:.3g}"
    assert d_v <= 1e-6, f"v vs diffusers get_velocity: max|diff| {d_v:.3g}"
    assert diffusion_target(x0, eps, alpha, sigma, "eps") is eps


def test_min_snr_weights_match_diffusers_training_utils() -> None:
    """Min-SNR-gamma weights as diffusers' training scripts compute them (``compute_snr``, then
    min(snr, gamma) / snr for eps and / (snr + 1) for v)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = torch.tensor([0, 1, 30, 250, 500, 998, 999])
    _, alpha, sigma = add_noise(torch.zeros(7, 1, 1, 1), torch.zeros(7, 1, 1, 1),
                                discrete_schedule(BUILTIN.schedule).alphas_cumprod.float(), t)
    snr = compute_snr(ref, t)
    for gamma in (1.0, 5.0):
        clipped = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        for prediction, want in (("eps", clipped / snr), ("v", clipped / (snr + 1))):
            got = min_snr_weight(alpha, sigma, gamma, prediction).flatten()
            d = float(((got - want) / want).abs().max())
            assert d <= 1e-5, f"min-SNR {prediction} gamma {gamma}: max relative diff {d:.3g}"


# --- the autoencoder stage --------------------------------------------------------------------------------

def test_vae_training_reduces_loss_and_measures_scale(trained_vae) -> None:
    first, last = _mean(trained_vae.losses[:4]), _mean(trained_vae.losses[-4:])
    assert last < 0.8 * first, f"autoencoder loss {first:.4f} -> {last:.4f}"
    assert trained_vae.latent_std > 0 and trained_vae.latent_scale == pytest.approx(1 / trained_vae.latent_std)


def test_vae_resume_is_bit_identical(data, tmp_path) -> None:
    kw = {"steps": 4, "batch_size": 4, "lr": 2e-3, "seed": 0, "progress": False}
    whole = train_vae(TINY.vae, data[0], **kw)
    train_vae(TINY.vae, data[0], out_dir=tmp_path, stop_at=2, **kw)
    resumed = train_vae(TINY.vae, data[0], out_dir=tmp_path, resume_from=tmp_path / VAE_CHECKPOINT, **kw)
    diff = _same_weights(whole.vae, resumed.vae)
    assert diff == 0.0, f"resumed autoencoder differs from the uninterrupted run: max|diff| {diff:.3g}"
    assert whole.losses == resumed.losses and whole.latent_std == resumed.latent_std
    assert (tmp_path / "vae.safetensors").is_file() and (tmp_path / "vae_loss.png").is_file()


def test_decoder_only_keeps_the_encoder_bit_for_bit(data, trained_vae) -> None:
    """Decoder-only fine-tuning (as Stability's ft-MSE VAE was made) moves the decoder, lowers the loss on
    the images and leaves the encoder, quant_conv and the latent scale exactly as they were."""
    import copy

    start = copy.deepcopy(trained_vae.vae)
    tuned = train_vae(TINY.vae, data[0][:4], steps=10, batch_size=4, lr=3e-3, seed=1, progress=False,
                      vae=copy.deepcopy(start), decoder_only=True, latent_std=trained_vae.latent_std)
    before, after = start.state_dict(), tuned.vae.state_dict()
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same == (k.startswith(("encoder.", "quant_conv."))), f"{k}: {'unchanged' if same else 'moved'}"
    assert tuned.latent_std == trained_vae.latent_std
    first, last = _mean(tuned.losses[:3]), _mean(tuned.losses[-3:])
    assert last < first, f"decoder fine-tuning loss {first:.4f} -> {last:.4f}"
    with pytest.raises(InvalidParameterError, match="decoder_only"):
        train_vae(TINY.vae, data[0][:4], steps=1, batch_size=4, decoder_only=True, progress=False)


# --- the diffusion stage ----------------------------------------------------------------------------------

def _diffusion(data, vae, **kw):
    args = {"steps": 4, "batch_size": 4, "lr": 1e-3, "seed": 0, "latent_scale": vae.latent_scale,
            "progress": False, "ema_decay": 0.9}
    return train_diffusion(TINY, vae.vae, data, **{**args, **kw})


def test_diffusion_training_reduces_loss(data, trained_vae) -> None:
    run = _diffusion(data, trained_vae, steps=24, batch_size=8)
    first, last = _mean(run.losses[:4]), _mean(run.losses[-4:])
    assert last < 0.7 * first, f"diffusion loss {first:.4f} -> {last:.4f}"


def test_diffusion_resume_and_seed_are_bit_identical(data, trained_vae, tmp_path) -> None:
    whole = _diffusion(data, trained_vae, out_dir=tmp_path / "whole", checkpoint_every=2)
    again = _diffusion(data, trained_vae)
    _diffusion(data, trained_vae, out_dir=tmp_path / "split", stop_at=2)
    resumed = _diffusion(data, trained_vae, out_dir=tmp_path / "split", resume_from=tmp_path / "split" / CHECKPOINT)
    other_seed = _diffusion(data, trained_vae, seed=1)

    for name, run in (("same seed", again), ("resumed", resumed)):
        assert run.losses == whole.losses, f"{name}: losses {run.losses} != {whole.losses}"
        for what, a, b in (("UNet", run.unet, whole.unet), ("EMA UNet", run.unet_ema, whole.unet_ema),
                           ("text encoder", run.text_encoders[0], whole.text_encoders[0]),
                           ("EMA text encoder", run.text_encoders_ema[0], whole.text_encoders_ema[0])):
            diff = _same_weights(a, b)
            assert diff == 0.0, f"{name}: {what} max|diff| {diff:.3g} (expected bit-identical)"
    assert _same_weights(other_seed.unet, whole.unet) > 0, "another seed must give other weights"

    state = torch.load(tmp_path / "whole" / CHECKPOINT, weights_only=True)  # plain tensors and dicts only
    assert state["step"] == 4 and set(state["ema"]) == {"unet", "text_encoder.0"}
    with Image.open(tmp_path / "whole" / "loss.png") as im:
        assert im.size == (640, 360)
    with pytest.raises(CheckpointError, match="batch_size"):
        _diffusion(data, trained_vae, batch_size=2, resume_from=tmp_path / "whole" / CHECKPOINT)


def test_timestep_range_is_honoured_and_checked(data, trained_vae, monkeypatch) -> None:
    """``timestep_range`` draws every training timestep from lo..hi; an empty or out-of-schedule range is refused."""
    import sfumato.train.diffusion_stage as stage

    seen = []
    real = stage.add_noise
    monkeypatch.setattr(stage, "add_noise", lambda x0, eps, ac, t: seen.append(t.clone()) or real(x0, eps, ac, t))
    _diffusion(data, trained_vae, timestep_range=(900, 949))
    t = torch.cat(seen)
    assert t.min() >= 900 and t.max() <= 949 and len(t.unique()) > 4
    for bad in ((10, 5), (-1, 10), (0, 1000)):
        with pytest.raises(InvalidParameterError, match="timestep_range"):
            _diffusion(data, trained_vae, timestep_range=bad)


def test_export_loads_and_generates(data, trained_vae, tmp_path) -> None:
    run = _diffusion(data, trained_vae, steps=2, prediction="v")
    path = export_pipeline(run.spec, run.unet_ema, trained_vae.vae, run.text_encoders_ema, tmp_path / "m.safetensors")
    with io.open_checkpoint(path) as ckpt:
        meta = ckpt.metadata
    assert float(meta["sfumato.latent_scale"]) == trained_vae.latent_scale

    pipe = sfumato.load(path)
    assert pipe.spec.family == "builtin" and pipe.spec.prediction == "v"
    half = {k: v.half().float() for k, v in run.unet_ema.state_dict().items()}
    diff = max(float((pipe.unet.state_dict()[k] - half[k]).abs().max()) for k in half)
    assert diff == 0.0, f"loaded UNet vs fp16 EMA weights: max|diff| {diff:.3g}"
    image = pipe.generate("a red circle", steps=2, width=32, height=32, seed=0).images[0]
    assert image.size == (32, 32) and image.mode == "RGB"


def test_cli_trains_resumes_and_exports(tmp_path) -> None:
    """`sfumato train vae` then `sfumato train diffusion` (and `--resume`) at the built-in sizes, two steps each."""
    from sfumato.cli import main

    out = tmp_path / "run"
    common = ["--out", str(out), "--n-images", "4", "--batch", "2", "-q", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert main(["train", "vae", *common, "--steps", "2"]) == 0
        vae_file = out / "vae.safetensors"
        with io.open_checkpoint(vae_file) as ckpt:
            assert float(ckpt.metadata["sfumato.latent_scale"]) > 0
        assert main(["train", "diffusion", *common, "--vae", str(vae_file), "--steps", "2"]) == 0
        assert main(["train", "diffusion", *common, "--vae", str(vae_file), "--steps", "3", "--resume"]) == 0
        assert main(["train", "diffusion", *common, "--vae", str(vae_file), "--steps", "3", "--seed", "1",
                     "--resume"]) == 2  # another seed cannot continue this run
    finally:
        torch.set_num_threads(threads)
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 3
    pipe = sfumato.load(out / "model.safetensors")
    assert pipe.spec.family == "builtin" and pipe.dtype == torch.float32


def test_cli_continues_a_model_with_init(tmp_path, capsys) -> None:
    """`sfumato train diffusion --init builtin`: starts from the built-in model's weights (its autoencoder,
    latent scale and prediction kept), with Min-SNR weighting and offset noise; without --vae or --init it
    is a clear error."""
    from sfumato.cli import main

    common = ["--n-images", "4", "--batch", "2", "-q", "--threads", "1", "--steps", "2"]
    threads = torch.get_num_threads()
    try:
        assert main(["train", "diffusion", "--out", str(tmp_path / "x"), *common]) == 2
        assert "--init" in capsys.readouterr().err
        assert main(["train", "diffusion", "--out", str(tmp_path / "run"), *common, "--init", "builtin", "--lr",
                     "1e-4", "--snr-gamma", "5", "--offset-noise", "0.1"]) == 0
        assert main(["train", "diffusion", "--out", str(tmp_path / "bad"), *common, "--init", "builtin",
                     "--snr-gamma", "0"]) == 2
    finally:
        torch.set_num_threads(threads)
    base, tuned = sfumato.load(), sfumato.load(tmp_path / "run" / "model.safetensors")
    assert (tuned.spec.family, tuned.spec.prediction, tuned.spec.latent_scale) == \
        (base.spec.family, base.spec.prediction, base.spec.latent_scale)
    assert all(torch.equal(a, b) for a, b in zip(base.vae.state_dict().values(), tuned.vae.state_dict().values()))
    pairs = list(zip(base.unet.state_dict().values(), tuned.unet.state_dict().values()))
    moved = max(float((a - b).abs().max()) for a, b in pairs)
    assert 0 < moved < 0.01, f"two steps at lr 1e-4 from the built-in weights moved them by {moved}"
    with io.open_checkpoint(tmp_path / "run" / "model.safetensors") as ckpt:
        assert ckpt.metadata["sfumato.train.init"] == "builtin"


def test_cli_fine_tunes_a_models_decoder(tmp_path, capsys) -> None:
    """`sfumato train vae --init builtin --decoder-only`: the written model.safetensors is the built-in model
    with a new decoder (UNet, text encoder, encoder and latent scale unchanged up to fp16 storage), and it
    resumes; --decoder-only without --init is a clear error."""
    from sfumato.cli import main

    out = tmp_path / "dec"
    common = ["--n-images", "4", "--batch", "2", "-q", "--threads", "1", "--lr", "1e-3"]
    threads = torch.get_num_threads()
    try:
        assert main(["train", "vae", "--out", str(tmp_path / "x"), *common, "--steps", "1", "--decoder-only"]) == 2
        assert "--init" in capsys.readouterr().err
        assert main(["train", "vae", "--out", str(out), *common, "--steps", "2", "--init", "builtin",
                     "--decoder-only"]) == 0
        assert main(["train", "vae", "--out", str(out), *common, "--steps", "3", "--init", "builtin",
                     "--decoder-only", "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    base, tuned = sfumato.load(), sfumato.load(out / "model.safetensors")
    assert tuned.spec.family == "builtin" and tuned.spec.latent_scale == base.spec.latent_scale
    for a, b in ((base.unet, tuned.unet), (base.text_encoders[0], tuned.text_encoders[0])):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    sa, sb = base.vae.state_dict(), tuned.vae.state_dict()
    moved = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved), sorted(moved)[:5]
    assert torch.load(out / VAE_CHECKPOINT, weights_only=True)["step"] == 3
    with io.open_checkpoint(out / "model.safetensors") as ckpt:
        assert ckpt.metadata["sfumato.train.decoder_only"] == "true"


def test_vae_crops_lie_on_the_latent_grid_and_bad_crops_are_refused() -> None:
    from sfumato.errors import InvalidParameterError
    from sfumato.train.vae_stage import _random_crop

    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    crops = _random_crop(x, 16, 4, g)
    assert crops.shape == (2, 3, 16, 16)
    for img, crop in zip(x, crops):
        corner = int(crop[0, 0, 0] - img[0, 0, 0])  # the flat index of the window's corner in channel 0
        r, c = divmod(corner, 32)
        assert r % 4 == 0 and c % 4 == 0 and r <= 16 and c <= 16
        assert torch.equal(crop, img[:, r:r + 16, c:c + 16])
    again = _random_crop(x, 16, 4, torch.Generator().manual_seed(0))
    assert torch.equal(crops, again)
    images = torch.zeros((2, 32, 32, 3), dtype=torch.uint8).numpy()
    for bad in (0, 5, 48):  # the tiny VAE downscales by 2
        with pytest.raises(InvalidParameterError, match=f"crop {bad} "):
            train_vae(TINY.vae, images, steps=1, batch_size=2, crop=bad, progress=False)
