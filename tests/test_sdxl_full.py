"""The real-size SDXL base architecture (random weights) through the whole spine: slow tier, run with
``pytest -m slow`` (and by bench/sdxl.py's configuration), never by CI. One step at 256 px in fp32 on
the CPU: the latent and image shapes, no NaN, and memory within 15% over the weights themselves.
On a CUDA machine the same in fp16, where the SDXL VAE must decode in fp32 (its safeguard)."""

from __future__ import annotations

import resource

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def _build(device: str, dtype: torch.dtype):
    from sfumato.config import PRESETS
    from sfumato.models.unet import UNetModel
    from sfumato.models.vae import AutoencoderKL
    from sfumato.pipeline import Pipeline
    from sfumato.text.encoder import CLIPTextEncoder
    from sfumato.text.tokenizer import get_tokenizer

    torch.manual_seed(0)
    spec = PRESETS["sdxl"]
    return Pipeline(spec=spec, unet=UNetModel(spec.unet), vae=AutoencoderKL(spec.vae),
                    text_encoders=[CLIPTextEncoder(te.config) for te in spec.text_encoders],
                    tokenizer=get_tokenizer()).to(device, dtype)


def _weights_bytes(pipe) -> int:
    return sum(p.numel() * p.element_size() for m in pipe.modules() for p in m.parameters())


def test_sdxl_real_size_one_step_cpu_fp32():
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pipe = _build("cpu", torch.float32)
    n_unet = sum(p.numel() for p in pipe.unet.parameters())
    assert 2.55e9 < n_unet < 2.6e9, n_unet  # SDXL's UNet: 2.567B parameters
    shapes = []
    res = pipe.generate("a lighthouse", "blurry", steps=1, width=256, height=256, sampler="euler", seed=0,
                        cfg_scale=5.0, callback=lambda s: shapes.append((tuple(s.x.shape), bool(torch.isfinite(s.x).all()))))
    assert shapes == [((1, 4, 32, 32), True)]
    image = np.asarray(res.images[0])
    assert image.shape == (256, 256, 3) and image.std() > 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    weights = _weights_bytes(pipe)
    assert peak < 1.15 * weights, f"peak RSS growth {peak / 2**30:.2f} GiB for {weights / 2**30:.2f} GiB of weights"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sdxl_real_size_fp16_gpu_decodes_vae_in_fp32():
    pipe = _build("cuda", torch.float16)
    seen = []
    pipe.vae.decoder.conv_in.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    res = pipe.generate("a lighthouse", steps=2, width=512, height=512, sampler="euler", seed=0)
    assert seen == [torch.float32] and pipe.vae.decoder.conv_in.weight.dtype == torch.float16
    assert np.asarray(res.images[0]).std() > 0
