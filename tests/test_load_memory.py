"""Loading an SD1.5-size checkpoint keeps peak memory near the file size (no double copy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from sfumato.config import get_preset
from sfumato.models.unet import UNetModel
from sfumato.models.vae import AutoencoderKL
from sfumato.text.encoder import CLIPTextEncoder
from sfumato.weights import io
from sfumato.weights.load import UNET_PREFIX, VAE_PREFIX

_CHILD = r"""
import json, sys
import sfumato, torch
pipe = sfumato.load(sys.argv[1], dtype=torch.float16)
n = sum(p.numel() * p.element_size() for m in pipe.modules() for p in m.state_dict().values())
# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's peak.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
print(json.dumps({"peak": hwm, "model": n}))
"""


def write_sd15_size_checkpoint(path: Path, seed: int = 0) -> int:
    """Random fp16 weights with the real SD 1.5 keys and shapes (about 2 GB); returns the parameter count."""
    spec = get_preset("sd1")
    with torch.device("meta"):
        parts = {UNET_PREFIX: UNetModel(spec.unet), VAE_PREFIX: AutoencoderKL(spec.vae),
                 spec.text_encoders[0].ckpt_prefix: CLIPTextEncoder(spec.text_encoders[0].config)}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, module in parts.items():
        for k, v in module.state_dict().items():
            sd[prefix + k] = (torch.randn(v.shape, generator=g) * 0.02).to(torch.float16)
    io.write_safetensors(path, sd)
    return sum(v.numel() for v in sd.values())


def test_sd15_size_load_peak_rss_under_1_3x_file(tmp_path):
    path = tmp_path / "sd15-random.safetensors"
    n_params = write_sd15_size_checkpoint(path)
    assert n_params > 1_000_000_000  # the real size: UNet 860M + VAE 84M + CLIP-L 123M
    size = path.stat().st_size
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = res["peak"] / size
    assert res["model"] >= 0.99 * size - 1_000_000, "the whole file should be in the model"
    assert ratio < 1.3, f"peak RSS {res['peak'] / 2**30:.2f} GiB is {ratio:.2f}x the {size / 2**30:.2f} GiB file"
