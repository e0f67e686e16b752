"""The benchmark scripts in bench/ run end to end on tiny configs, each as a subprocess on one thread.

What they print is checked for its fields and for the numbers that do not depend on the machine: the
two checkpoint layouts hold the same model, sfumato and diffusers draw the same image from the same
weights (<= 2/255), and the FLOP counter sees every attention call. No time is ever asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sfumato
from sfumato.weights import io

BENCH = Path(__file__).resolve().parents[1] / "bench"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(script: str, *args, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], capture_output=True, text=True,
                         env=ENV, timeout=600)
    if ok:
        assert out.returncode == 0, f"{script} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _checkpoints_module():
    spec = importlib.util.spec_from_file_location("bench_checkpoints", BENCH / "checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    _run("checkpoints.py", "--tiny", "--out", root, "--preset", "sd1", "sdxl")
    return root


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_checkpoints_write_one_model_in_both_layouts(ckpts, family):
    single, folder = ckpts / f"tiny-{family}-fp32.safetensors", ckpts / f"tiny-{family}-fp32"
    assert single.is_file() and (folder / "model_index.json").is_file()
    a, b = sfumato.load(single), sfumato.load(folder)
    assert a.spec == b.spec == _checkpoints_module().tiny_spec(family)
    stds = []
    for m, n in zip(a.modules(), b.modules()):
        sa, sb = m.state_dict(), n.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{family} {k}: the layouts differ"
            assert torch.isfinite(sa[k]).all(), k
            if sa[k].ndim >= 2:
                stds.append(float(sa[k].float().std()))
    assert min(stds) > 0, "a weight matrix is constant"
    image = a.generate("a red circle", width=32, height=32, steps=2, seed=1).images[0]
    assert np.asarray(image, dtype=np.float32).std() > 0, "flat image"


def test_checkpoints_skip_existing_and_refuse_other_settings(ckpts):
    single = ckpts / "tiny-sd1-fp32.safetensors"
    before = single.stat().st_mtime_ns
    out = _run("checkpoints.py", "--tiny", "--out", ckpts, "--preset", "sd1")
    assert out.stdout.count("skip") == 2 and single.stat().st_mtime_ns == before
    other = _run("checkpoints.py", "--tiny", "--out", ckpts, "--preset", "sd1", "--seed", "1", ok=False)
    assert other.returncode != 0 and "other or unknown settings" in other.stderr
    assert single.stat().st_mtime_ns == before


def test_checkpoints_half(tmp_path):
    _run("checkpoints.py", "--tiny", "--out", tmp_path, "--preset", "sd2-v", "--half", "--layout", "single_file")
    path = tmp_path / "tiny-sd2-v-fp16.safetensors"
    with io.open_checkpoint(path) as ckpt:
        assert {ckpt.dtype(k) for k in ckpt.keys()} == {torch.float16}
    assert not (tmp_path / "tiny-sd2-v-fp16").exists()
    assert sfumato.load(path).spec.family == "sd2-v"


@pytest.mark.parametrize("family,layout", [("sd1", "single_file"), ("sdxl", "diffusers")])
def test_compare_same_image_and_every_field(ckpts, tmp_path, family, layout):
    model = ckpts / (f"tiny-{family}-fp32" + (".safetensors" if layout == "single_file" else ""))
    fast = ["--fast", "deepcache=2", "--fast", "deepcache=3,tome=0.5,memory.offload=true"] if family == "sd1" else []
    out = _run("compare.py", "--model", model, "--size", 32, "--steps", 3, "--json", tmp_path / "r.json",
               "--out", tmp_path, *fast)
    for label in ("import s", "load s", "text encoding s", "s/step (median)", "VAE decode s", "end-to-end s",
                  "peak RSS GB", "peak RSS generating GB", "max pixel diff"):
        assert label in out.stdout, f"no {label!r} in:\n{out.stdout}"
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["family"] == family
    for side in ("sfumato", "diffusers"):
        s = r[side]
        assert s["n_steps"] == 3 and len(s["steps_s"]) == 3 and s["image_ok"]
        for key in ("load_s", "text_s", "step_s", "decode_s", "e2e_s", "peak_rss_gb", "gen_rss_gb"):
            assert s[key] > 0, f"{side} {key} = {s[key]}"
        assert s["peak_gpu_gb"] is None
        assert (tmp_path / f"{side}.png").is_file()
    assert set(r["ratio"]) >= {"load_s", "text_s", "step_s", "decode_s", "e2e_s", "peak_rss_gb"}
    assert r["max_pixel_diff"] <= 2, f"{family} {layout}: max |diff| = {r['max_pixel_diff']}/255"
    if fast:  # two fast paths: their own timings, and their images scored against sfumato's exact one
        assert [f["options"] for f in r["fast"]] == [{"deepcache": 2},
                                                     {"deepcache": 3, "tome": 0.5, "memory.offload": True}]
        assert out.stdout.count("fast path") == 2 and out.stdout.count("PSNR") == 2
        for f in r["fast"]:
            assert f["n_steps"] == 3 and f["image_ok"] and f["step_s"] > 0 and f["max_diff"] > 0 and f["psnr_db"] > 10
    else:
        assert r["fast"] == []


def test_memory_modes_bench(ckpts, tmp_path):
    """bench/memory.py on the tiny SD 1.x folder: every mode runs on both sides; sfumato's tiles equal
    diffusers' (same tiles and blend: PSNR >= 60 dB), and the tiled decode is near the whole one."""
    out = _run("memory.py", "--model", ckpts / "tiny-sd1-fp32", "--size", 64, "--tile", 32,
               "--json", tmp_path / "m.json")
    r = json.loads((tmp_path / "m.json").read_text())
    assert set(r["results"]) == {"sfumato whole", "diffusers whole", "sfumato tiled", "diffusers tiled",
                                 "sfumato attn-slice"}, out.stdout
    assert all(v["peak_rss_gb"] > 0 and v["decode_s"] > 0 for v in r["results"].values())
    assert r["psnr_db"]["sfumato tiled vs diffusers tiled"] >= 60
    assert r["psnr_db"]["sfumato"] > 10 and "RSS ratio" in out.stdout


def test_train_memory_bench(ckpts, tmp_path):
    """bench/train_memory.py on the tiny SD 1.x folder: LoRA and DreamBooth steps run on both sides (with
    gradient checkpointing too) and report peak RSS, seconds and a finite loss; a single file is refused."""
    out = _run("train_memory.py", "--model", ckpts / "tiny-sd1-fp32", "--size", 64, "--steps", 2,
               "--checkpointing", "--json", tmp_path / "t.json")
    r = json.loads((tmp_path / "t.json").read_text())
    assert set(r["results"]) == {"lora", "dreambooth"} and r["checkpointing"], out.stdout
    for sides in r["results"].values():
        for v in sides.values():
            assert v["peak_rss_gb"] > 0 and v["seconds"] > 0 and np.isfinite(v["loss"])
    assert "peak GB" in out.stdout and "s/step" in out.stdout
    bad = _run("train_memory.py", "--model", ckpts / "tiny-sd1-fp32.safetensors", ok=False)
    assert bad.returncode == 2 and "must be a diffusers folder" in bad.stderr


def test_suite_runs_its_steps_and_logs_them(tmp_path):
    """bench/suite.py on tiny weights: the chosen steps run in order, each command and its output in the
    log with the commit; an unknown step name is refused."""
    log = tmp_path / "suite.txt"
    _run("suite.py", "--tiny", "--out", tmp_path / "w", "--size", 64, "--only", "weights,compare folder,roofline",
         "--log", log)
    text = log.read_text()
    assert text.startswith("# sfumato bench suite") and "commit" in text and "FAILED" not in text
    assert text.index("## weights") < text.index("## compare folder") < text.index("## roofline")
    assert "max pixel diff" in text and "of peak" in text and "## memory" not in text
    bad = _run("suite.py", "--only", "everything", ok=False)
    assert bad.returncode == 2 and "unknown steps ['everything']" in bad.stderr


def test_roofline_counts_attention(tmp_path):
    _run("roofline.py", "--tiny", "--preset", "sd1", "--size", 32, "--json", tmp_path / "r.json")
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["peak"]["flops_per_s"] > 0
    # By hand, tiny SD 1.x at 32 px (16x16 latent, CFG batch 2, 77 context tokens): three transformer
    # blocks at level 0 (one down, two up; 32 channels, 256 tokens) and one in the middle (64 channels,
    # 64 tokens); each self- and cross-attention costs 4 * B * Lq * Lk * C.
    level0 = 3 * (4 * 2 * 256 * 256 * 32 + 4 * 2 * 256 * 77 * 32)
    middle = 4 * 2 * 64 * 64 * 64 + 4 * 2 * 64 * 77 * 64
    unet, vae = r["unet"], r["vae_decode"]
    assert unet["attention_flops"] == unet["attention_counted"] == level0 + middle
    assert unet["attention_calls"] == 8 and not unet["attention_analytic_used"]
    assert vae["attention_flops"] == vae["attention_counted"] == 4 * 256 * 256 * 64  # one 64-channel block
    assert unet["flops"] > unet["attention_flops"] and vae["flops"] > vae["attention_flops"]
    for net in (unet, vae):
        assert net["seconds"] > 0 and net["fraction_of_peak"] > 0
        assert sum(net["by_op"].values()) == net["flops"]

    _run("roofline.py", "--tiny", "--preset", "sd1", "--size", 32, "--meta", "--json", tmp_path / "m.json")
    m = json.loads((tmp_path / "m.json").read_text())
    assert "peak" not in m and m["unet"]["flops"] == unet["flops"] and m["vae_decode"]["flops"] == vae["flops"]


def test_upscale_bench(tmp_path):
    """bench/upscale.py on a tiny x4 upscaler written by bench/checkpoints.py: both layouts hold one model,
    sfumato and diffusers upscale the synthetic image alike (<= 1/255, as tests/test_zoo.py), and the
    sfumato-only tiled mode runs one UNet call per window."""
    ckpt = _checkpoints_module()
    paths = ckpt.write_checkpoints("sd2-upscaler", tmp_path, tiny=True, log=lambda *a: None)
    single, folder = paths["single_file"], paths["diffusers"]
    a, b = sfumato.load(single), sfumato.load(folder)
    assert a.spec == b.spec == ckpt.tiny_spec("sd2-upscaler")
    out = _run("upscale.py", "--model", folder, "--size", 16, "--steps", 2, "--json", tmp_path / "u.json")
    for label in ("load s", "s/step (median)", "VAE decode s", "end-to-end s", "peak RSS GB", "max pixel diff"):
        assert label in out.stdout, f"no {label!r} in:\n{out.stdout}"
    r = json.loads((tmp_path / "u.json").read_text())
    for side in ("sfumato", "diffusers"):
        s = r[side]
        assert s["n_steps"] == 2 and s["image_ok"] and s["out_size"] == [64, 64]
        assert all(s[k] > 0 for k in ("load_s", "step_s", "decode_s", "e2e_s", "peak_rss_gb")), s
    assert set(r["ratio"]) >= {"load_s", "step_s", "decode_s", "e2e_s", "peak_rss_gb"}
    assert r["max_pixel_diff"] <= 1, f"upscale: max |diff| = {r['max_pixel_diff']}/255 against diffusers"

    _run("upscale.py", "--model", single, "--sfumato-only", "--size", 32, "--tile", 16, "--tile-overlap", 4,
         "--steps", 1, "--cfg", 1, "--json", tmp_path / "t.json")
    t = json.loads((tmp_path / "t.json").read_text())
    assert "diffusers" not in t and t["max_pixel_diff"] is None
    assert t["sfumato"]["out_size"] == [128, 128] and t["sfumato"]["image_ok"]
    assert t["sfumato"]["unet_calls"] == 9  # 32 px in 16 px windows overlapping 4: starts 0, 12, 16 on each axis


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_personalise_examples_and_overrides(tmp_path):
    """bench/personalise.py's examples alternate small and large (random sizes on request), each captioned
    with the token; --set parses values by the FinetuneConfig field's type and names bad fields."""
    import argparse

    from sfumato.train.scenes import SIZES

    mod = _bench_module("personalise")
    scenes = mod.write_examples(tmp_path / "b", "crescent", 6, seed=1)
    captions = [p.read_text() for p in sorted((tmp_path / "b").glob("*.txt"))]
    assert len(captions) == 6 and all(mod.TOKEN in c and "crescent" not in c for c in captions)
    assert [s.shapes[0].size for s in scenes] == list(SIZES) * 3
    assert {s.shapes[0].kind for s in scenes} == {"crescent"}
    random_sizes = mod.write_examples(tmp_path / "r", "crescent", 40, seed=1, balanced=False)
    assert len(list((tmp_path / "r").glob("*.png"))) == 40
    assert [s.shapes[0].size for s in random_sizes] != list(SIZES) * 20

    ap = argparse.ArgumentParser()
    assert mod.parse_overrides(ap, ["rank=16", "lora_conv=true", "snr_gamma=5", "alpha=8"]) == dict(
        rank=16, lora_conv=True, snr_gamma=5.0, alpha=8.0)
    for bad in ("bogus=1", "rank=x", "rank=1.5", "lora_conv=maybe", "method=lora", "rank", "validation_prompts=a"):
        with pytest.raises(SystemExit):
            mod.parse_overrides(ap, [bad])


def _check_rate(row: list[str], prompts: int) -> None:
    """A personalise.py row's rate is the per-size hits (large then small) over ``prompts``."""
    at = next(i for i, cell in enumerate(row) if cell.endswith("%"))
    sizes = [tuple(map(int, cell.split("/"))) for cell in row[at + 1:-2]]
    assert sizes and sum(t for _, t in sizes) == prompts
    assert int(row[at][:-1]) == round(100 * sum(h for h, _ in sizes) / prompts)


def test_personalise_runs_end_to_end(tmp_path):
    """bench/personalise.py on the built-in model, a few steps: every row printed, --set reaches the config
    (the LoRA file has rank 2), the prior's class images and the examples are written."""
    out = _run("personalise.py", "--methods", "lora", "--steps", 2, "--examples", 2, "--prior-images", 4,
               "--eval", 2, "--old", 2, "--set", "rank=2", "--set", "seed=1", "--out", tmp_path, "--threads", 1)
    lines = out.stdout.splitlines()
    assert "rank=2; seed=1" in lines[0] and lines[1].startswith("untrained: crescent in ")
    row = next(line.split() for line in lines if line.startswith("lora "))
    assert row[1] == "2" and row[2:5] == ["renders", "4", "x1"]
    _check_rate(row, 2)
    assert len(list((tmp_path / "examples").glob("*.png"))) == 2
    assert len(list((tmp_path / "lora-class").glob("*.png"))) == 4
    from safetensors.torch import load_file

    down = [v for k, v in load_file(tmp_path / "lora" / "lora.safetensors").items() if k.endswith("lora_down.weight")]
    assert down and all(v.shape[0] == 2 for v in down)

    again = _run("personalise.py", "--methods", "lora", "--rescore", "--eval", 3, "--eval-seed", 3, "--old", 2,
                 "--out", tmp_path, "--threads", 1).stdout
    row = next(line.split() for line in again.splitlines() if line.startswith("lora "))
    assert "of 3 token prompts" in again and row[1] == "-"
    _check_rate(row, 3)
    assert _run("personalise.py", "--methods", "dreambooth", "--rescore", "--out", tmp_path, ok=False).returncode == 2
