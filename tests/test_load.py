"""sfumato.load / Pipeline.save against diffusers on tiny random pipelines of each family.

Round trips (issue 2): diffusers folder -> sfumato.load -> save single file -> diffusers
``from_single_file(config=folder)`` gives back bit-identical weights; our loader on that file equals our
loader on the folder; and the same through our diffusers writer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sfumato
from sfumato.errors import CheckpointError, InvalidParameterError, UnknownModelError
from sfumato.weights import io

from . import tiny

pytestmark = pytest.mark.skipif(not tiny.SHARED_BPE.exists(), reason="needs ../shared/clip-bpe beside the repo")

FAMILIES = ["sd1", "sd2-v", "sdxl", "sdxl-refiner"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: tiny.build(f, root / f, seed=i) for i, f in enumerate(FAMILIES)}


def _diffusers_pipe(family: str, path: Path, *, single_file: bool = False, config: Path | None = None):
    import diffusers

    cls = {"sd1": diffusers.StableDiffusionPipeline, "sd2-v": diffusers.StableDiffusionPipeline,
           "sdxl": diffusers.StableDiffusionXLPipeline, "sdxl-refiner": diffusers.StableDiffusionXLImg2ImgPipeline}[family]
    if single_file:
        return cls.from_single_file(str(path), config=str(config), local_files_only=True)
    return cls.from_pretrained(str(path), local_files_only=True)


def _components(pipe) -> dict[str, torch.nn.Module]:
    names = ["unet", "vae", "text_encoder", "text_encoder_2"]
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    a = {k: v for k, v in a.items() if not k.endswith("position_ids")}
    b = {k: v for k, v in b.items() if not k.endswith("position_ids")}
    assert sorted(a) == sorted(b), f"{what}: key sets differ: {sorted(set(a) ^ set(b))[:10]}"
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"


def _ours_equal(p, q) -> None:
    assert p.spec == q.spec
    for m, n in zip(p.modules(), q.modules()):
        _assert_same_weights(m.state_dict(), n.state_dict(), type(m).__name__)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip_through_diffusers(folders, tmp_path, family):
    folder = folders[family]
    pipe = sfumato.load(folder)
    assert pipe.spec.family == family
    out = pipe.save(tmp_path / "x.safetensors")

    ref = _diffusers_pipe(family, folder)
    back = _diffusers_pipe(family, out, single_file=True, config=folder)
    for name, module in _components(ref).items():
        _assert_same_weights(module.state_dict(), _components(back)[name].state_dict(), f"{family} {name}")

    _ours_equal(sfumato.load(out), pipe)


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_round_trip(folders, tmp_path, family):
    pipe = sfumato.load(folders[family])
    out = pipe.save(tmp_path / "d", format="diffusers")
    ref, back = _diffusers_pipe(family, folders[family]), _diffusers_pipe(family, out)
    for name, module in _components(ref).items():
        _assert_same_weights(module.state_dict(), _components(back)[name].state_dict(), f"{family} {name}")
    assert back.scheduler.config.prediction_type == ref.scheduler.config.prediction_type
    _ours_equal(sfumato.load(out), pipe)


def test_spec_read_from_folder(folders):
    sd2 = sfumato.load(folders["sd2-v"])
    assert sd2.spec.prediction == "v" and sd2.spec.text_encoders[0].pad_id == 0
    assert sfumato.load(folders["sd2-v"], prediction="eps").spec.prediction == "eps"
    sd1 = sfumato.load(folders["sd1"])
    assert sd1.spec.prediction == "eps" and sd1.spec.text_encoders[0].pad_id == 49407
    assert sd1.spec.latent_scale == pytest.approx(0.18215)


def test_half_and_dtypes(folders, tmp_path):
    pipe = sfumato.load(folders["sd1"])
    out = pipe.save(tmp_path / "h.safetensors", half=True)
    with io.open_checkpoint(out) as ckpt:
        assert {ckpt.dtype(k) for k in ckpt.keys()} == {torch.float16}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        p = sfumato.load(out, dtype=dtype)
        assert p.dtype == dtype and p.vae.encoder.conv_in.weight.dtype == dtype
        want = pipe.unet.out[2].weight.to(torch.float16).to(dtype)
        assert torch.equal(p.unet.out[2].weight, want)
    with pytest.raises(InvalidParameterError, match="dtype"):
        sfumato.load(out, dtype="int8")


def _rewrite(src: Path, dst: Path, edit) -> Path:
    with io.open_checkpoint(src) as ckpt:
        sd = {k: ckpt.get(k) for k in ckpt.keys()}
    edit(sd)
    io.write_safetensors(dst, sd)
    return dst


def test_strict_errors_name_file_and_keys(folders, tmp_path):
    good = sfumato.load(folders["sd1"]).save(tmp_path / "good.safetensors")
    key = "model.diffusion_model.input_blocks.1.1.proj_in.bias"
    missing = _rewrite(good, tmp_path / "missing.safetensors", lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=r"missing\.safetensors.*missing key.*input_blocks\.1\.1\.proj_in\.bias"):
        sfumato.load(missing)
    # a key that detection itself reads is reported by detection, still naming file and key
    no_out = _rewrite(good, tmp_path / "noout.safetensors", lambda sd: sd.pop("model.diffusion_model.out.2.weight"))
    with pytest.raises(CheckpointError, match=r"noout\.safetensors.*missing 'out\.2\.weight'"):
        sfumato.load(no_out)

    extra = _rewrite(good, tmp_path / "extra.safetensors", lambda sd: sd.update({"model.diffusion_model.bogus": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"extra\.safetensors.*bogus"):
        sfumato.load(extra)

    stray = _rewrite(good, tmp_path / "stray.safetensors", lambda sd: sd.update({"something.else": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"stray\.safetensors.*something\.else"):
        sfumato.load(stray)

    def reshape(sd):
        sd["first_stage_model.decoder.conv_out.bias"] = torch.zeros(5)

    wrong = _rewrite(good, tmp_path / "wrong.safetensors", reshape)
    with pytest.raises(CheckpointError, match=r"wrong\.safetensors.*decoder\.conv_out"):
        sfumato.load(wrong)

    nothing = _rewrite(good, tmp_path / "nounet.safetensors",
                       lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("model.diffusion_model.")])
    with pytest.raises(UnknownModelError, match="nounet"):
        sfumato.load(nothing)

    with pytest.raises(CheckpointError, match="no such file"):
        sfumato.load(tmp_path / "absent.safetensors")


def test_training_checkpoint_ema(folders, tmp_path):
    """A Lightning-style .ckpt with raw and EMA UNet weights: EMA by default, raw on request, both saved."""
    pipe = sfumato.load(folders["sd1"])
    from sfumato.weights.save import _ema_flat, single_file_state_dict

    sd = single_file_state_dict(pipe)
    raw = {k: (v + 1.0 if k.startswith("model.diffusion_model.") else v) for k, v in sd.items()}
    ema = {_ema_flat(k): v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    ckpt = tmp_path / "train.ckpt"
    torch.save({"state_dict": {**raw, **ema, "model_ema.decay": torch.tensor(0.9999),
                               "model_ema.num_updates": torch.tensor(10)}, "global_step": 10}, ckpt)

    p_ema = sfumato.load(ckpt)
    assert torch.equal(p_ema.unet.out[2].weight, pipe.unet.out[2].weight)
    p_raw = sfumato.load(ckpt, use_ema=False)
    assert torch.equal(p_raw.unet.out[2].weight, pipe.unet.out[2].weight + 1.0)

    both = p_ema.save(tmp_path / "both.safetensors", ema_only=False)
    with io.open_checkpoint(both) as f:
        assert torch.equal(f.get("model.diffusion_model.out.2.weight"), raw["model.diffusion_model.out.2.weight"])
        assert torch.equal(f.get(_ema_flat("model.diffusion_model.out.2.weight")), pipe.unet.out[2].weight)
    pruned = p_ema.save(tmp_path / "pruned.safetensors")
    with io.open_checkpoint(pruned) as f:
        assert not any(k.startswith("model_ema.") for k in f.keys())


def test_separate_vae(folders, tmp_path):
    pipe = sfumato.load(folders["sd1"])
    other = sfumato.load(folders["sd2-v"]).vae
    vae_file = tmp_path / "vae.safetensors"
    io.write_safetensors(vae_file, {k: v.contiguous() for k, v in other.state_dict().items()})
    p = sfumato.load(folders["sd1"], vae=vae_file)
    _assert_same_weights(p.vae.state_dict(), other.state_dict(), "vae override")
    assert not torch.equal(p.vae.decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight)
    # the diffusers layout of a VAE file and a vae folder load the same weights
    p2 = sfumato.load(folders["sd1"], vae=folders["sd2-v"] / "vae" / "diffusion_pytorch_model.safetensors")
    p3 = sfumato.load(folders["sd1"], vae=folders["sd2-v"] / "vae")
    _assert_same_weights(p2.vae.state_dict(), other.state_dict(), "diffusers-layout vae file")
    _assert_same_weights(p3.vae.state_dict(), other.state_dict(), "vae folder")


def test_save_refuses_bad_arguments(folders, tmp_path):
    pipe = sfumato.load(folders["sd1"])
    with pytest.raises(InvalidParameterError, match="format"):
        pipe.save(tmp_path / "x", format="onnx")
    with pytest.raises(InvalidParameterError, match=".safetensors"):
        pipe.save(tmp_path / "x.ckpt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(InvalidParameterError, match="not empty"):
        pipe.save(tmp_path / "full", format="diffusers")


def test_model_index_of_saved_folder(folders, tmp_path):
    out = sfumato.load(folders["sdxl-refiner"]).save(tmp_path / "r", format="diffusers")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["text_encoder"] == [None, None] and index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
