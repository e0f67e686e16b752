"""Personalisation and fine-tuning (issue 10) on the built-in model, a few steps each: the four methods run
and write files every tool loads (the embedding and the LoRA in diffusers too, changing diffusers' image
as they change ours), only what a method trains changes, a resumed run equals an uninterrupted one, and bad
data or settings fail before any training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato
from sfumato.errors import InvalidParameterError
from sfumato.train.personalise import FinetuneConfig, finetune

TEMPLATE = "a {} on white"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ft-data")
    for i in range(4):
        a = np.full((64, 64, 3), 240, np.uint8)
        a[14 + i:46, 18:44 + i] = (200, 30, 30)
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder


def _cfg(method: str, **kw) -> FinetuneConfig:
    return FinetuneConfig(method=method, steps=kw.pop("steps", 2), batch_size=2, caption_template=TEMPLATE,
                          token=kw.pop("token", "zwxshape"), **kw)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from sfumato.weights import io

    return io.read_tensors(path, torch.float32)


def _diff(a, b) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def test_lora_resume_equals_uninterrupted_run(data, tmp_path):
    whole = finetune(sfumato.load(), data, _cfg("lora", steps=3), out_dir=tmp_path / "a", progress=False)
    cut = finetune(sfumato.load(), data, _cfg("lora", steps=3), out_dir=tmp_path / "b", stop_at=1, progress=False)
    assert cut.step == 1 and cut.output == tmp_path / "b" / "checkpoint.pt"
    again = finetune(sfumato.load(), data, _cfg("lora", steps=3), out_dir=tmp_path / "b", resume=True,
                     progress=False)
    assert again.step == 3 and again.losses == whole.losses
    a, b = _weights(whole.output), _weights(again.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "loss.png").is_file()
    with pytest.raises(Exception, match="cannot resume with different"):
        finetune(sfumato.load(), data, _cfg("lora", steps=3, rank=8), out_dir=tmp_path / "b", resume=True,
                 progress=False)


def test_lora_file_loads_here_and_in_diffusers_with_the_same_effect(data, tmp_path):
    import diffusers

    pipe = sfumato.load()
    res = finetune(pipe, data, _cfg("lora", steps=2, lr=5e-3), out_dir=tmp_path / "lora", progress=False)
    keys = _weights(res.output).keys()
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    kw = dict(width=64, height=64, steps=4, cfg_scale=2.0, sampler="euler", schedule="leading", seed=3)
    base = sfumato.load().generate("a red square", **kw).images[0]
    ours = sfumato.load()
    ours.load_lora(res.output, 1.0)
    with_lora = ours.generate("a red square", **kw).images[0]
    assert _diff(base, with_lora) > 2, "the trained LoRA must change the image"
    folder = sfumato.load().save(tmp_path / "builtin-diffusers", format="diffusers")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(res.output))
    want = ref("a red square", width=64, height=64, num_inference_steps=4, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(3)).images[0]
    d = _diff(with_lora, want)
    assert d <= 2, f"the LoRA in diffusers vs here: max|diff| {d}/255"


def test_textual_inversion_trains_only_its_rows_and_loads_in_diffusers(data, tmp_path):
    import diffusers

    pipe = sfumato.load()
    before = pipe.text_encoders[0].text_model.embeddings.token_embedding.weight.detach().clone()
    res = finetune(pipe, data, _cfg("textual-inversion", steps=3, init_word="square"), out_dir=tmp_path / "ti",
                   progress=False)
    after = pipe.text_encoders[0].text_model.embeddings.token_embedding.weight.detach()
    assert torch.equal(after[: before.shape[0]], before), "only the new token's rows may change"
    init = before[pipe.tokenizer.encode("square")[0]]
    assert not torch.equal(after[before.shape[0]], init), "the new row must have learned"
    assert res.output.name == "zwxshape.safetensors" and set(_weights(res.output)) == {"emb_params"}
    kw = dict(width=64, height=64, steps=4, cfg_scale=2.0, sampler="euler", schedule="leading", seed=5)
    ours = sfumato.load()
    ours.load_embedding(res.output)
    got = ours.generate("a zwxshape on white", **kw).images[0]
    folder = sfumato.load().save(tmp_path / "builtin-diffusers", format="diffusers")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(str(res.output), token="zwxshape")
    want = ref("a zwxshape on white", width=64, height=64, num_inference_steps=4, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(5)).images[0]
    assert _diff(got, want) <= 2, "the embedding in diffusers vs here"


def test_dreambooth_with_prior_preservation_and_finetune_write_models(data, tmp_path):
    pipe = sfumato.load()
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    res = finetune(pipe, data, _cfg("dreambooth", class_prompt="a square on white", class_images=2, lr=1e-4),
                   out_dir=tmp_path / "db", progress=False)
    assert sorted(p.name for p in (tmp_path / "db" / "class_images").iterdir()) == ["0000.png", "0001.png"]
    loaded = sfumato.load(res.output)
    assert loaded.spec.family == "builtin"
    assert any(not torch.equal(v, original[k]) for k, v in loaded.unet.state_dict().items())
    ft = finetune(sfumato.load(), data, _cfg("finetune", ema_decay=0.5, lr=1e-4), out_dir=tmp_path / "ft",
                  progress=False)
    assert sfumato.load(ft.output).spec.family == "builtin"


def test_lora_with_prior_preservation_trains_on_its_class_images(data, tmp_path):
    """Prior preservation for LoRA (kohya's regularisation images): the class images are the model's own
    drawings of the class prompts and every step adds their loss, so each step's loss exceeds the same run's
    without them."""
    plain = finetune(sfumato.load(), data, _cfg("lora", lr=5e-3), out_dir=tmp_path / "plain", progress=False)
    prior = finetune(sfumato.load(), data, _cfg("lora", lr=5e-3, class_prompt=("a square on white", "a ring"),
                                                class_images=2), out_dir=tmp_path / "prior", progress=False)
    assert sorted(p.name for p in (tmp_path / "prior" / "class_images").iterdir()) == ["0000.png", "0001.png"]
    assert len(prior.losses) == len(plain.losses) and all(a > b for a, b in zip(prior.losses, plain.losses))
    drawn = np.asarray(Image.open(tmp_path / "prior" / "class_images" / "0000.png").convert("RGB"))
    want = np.asarray(sfumato.load().generate("a square on white", width=64, height=64, seed=0).images[0])
    assert _diff(drawn, want) == 0, "a class image is the model's own drawing of its prompt"


def test_prior_preservation_from_ones_own_class_images(data, tmp_path):
    """class_data: a captioned folder of class images (kohya's regularisation images) takes the place of
    drawn ones; nothing is drawn, and the class loss is added as with drawn images."""
    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(3):
        a = np.full((64, 64, 3), 240, np.uint8)
        a[20:40, 20 + i:40 + i] = (30, 30, 200)
        Image.fromarray(a).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a blue square on white\n")
    plain = finetune(sfumato.load(), data, _cfg("dreambooth", lr=1e-4), out_dir=tmp_path / "plain", progress=False)
    prior = finetune(sfumato.load(), data, _cfg("dreambooth", lr=1e-4, class_data=str(folder)),
                     out_dir=tmp_path / "prior", progress=False)
    assert not (tmp_path / "prior" / "class_images").exists()
    assert all(a > b for a, b in zip(prior.losses, plain.losses))
    (folder / "2.txt").unlink()
    with pytest.raises(InvalidParameterError, match="caption"):
        finetune(sfumato.load(), data, _cfg("lora", class_data=str(folder)), out_dir=tmp_path / "bad",
                 progress=False)
    assert not (tmp_path / "bad").exists(), "class images are checked before anything is written"


def test_bad_data_and_settings_fail_before_training(data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidParameterError, match="no images"):
        finetune(sfumato.load(), empty, _cfg("lora"), out_dir=tmp_path / "out", progress=False)
    (tmp_path / "capless").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "capless" / "a.png")
    with pytest.raises(InvalidParameterError, match="caption"):
        finetune(sfumato.load(), tmp_path / "capless", FinetuneConfig(method="lora", steps=1),
                 out_dir=tmp_path / "out", progress=False)
    with pytest.raises(InvalidParameterError, match="textual-inversion needs token"):
        finetune(sfumato.load(), data, FinetuneConfig(method="textual-inversion", caption_template=TEMPLATE),
                 out_dir=tmp_path / "out", progress=False)
    for method in ("textual-inversion", "finetune"):
        with pytest.raises(InvalidParameterError, match="prior preservation.*is for dreambooth and lora"):
            _cfg(method, class_prompt="a square", class_images=2).check()
    with pytest.raises(InvalidParameterError, match="class_data .* and class_prompt .* give one"):
        _cfg("dreambooth", class_prompt="a square", class_images=2, class_data=str(data)).check()
    with pytest.raises(InvalidParameterError, match="class_data .prior preservation. is for dreambooth and lora"):
        _cfg("finetune", class_data=str(data)).check()
    with pytest.raises(InvalidParameterError, match="prior_weight=-1.0 must be >= 0"):
        _cfg("lora", class_prompt="a square", class_images=2, prior_weight=-1.0).check()
    with pytest.raises(InvalidParameterError, match="method 'hypernetwork' is not one of"):
        FinetuneConfig(method="hypernetwork").check()
    with pytest.raises(InvalidParameterError, match="resolution 70 must be a multiple of 16"):
        finetune(sfumato.load(), data, _cfg("lora", resolution=70), out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists(), "nothing may be written before the data and settings are checked"


def test_cli_trains_and_refuses_bad_data(data, tmp_path, capsys):
    from sfumato.cli import main

    assert main(["train", "textual-inversion", "--data", str(data), "--caption", TEMPLATE, "--token", "qzshape",
                 "--init-word", "square", "--out", str(tmp_path / "ti"), "--steps", "2", "--batch", "2", "-q"]) == 0
    assert (tmp_path / "ti" / "qzshape.safetensors").is_file()
    assert str(tmp_path / "ti" / "qzshape.safetensors") in capsys.readouterr().out
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("not an image")
    assert main(["train", "lora", "--data", str(tmp_path / "bad"), "--caption", TEMPLATE, "--token", "sks",
                 "--class-prompt", "a square", "--class-images", "2", "--prior-weight", "0.5",
                 "--out", str(tmp_path / "lora"), "--steps", "2", "-q"]) == 2
    assert "x.png" in capsys.readouterr().err and not (tmp_path / "lora").exists()


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner"])
def test_sdxl_lora_and_two_encoder_embedding(family, data, tmp_path):
    """SDXL trains with its micro-conditioning; its embedding is the clip_l / clip_g pair (the refiner's one
    encoder: emb_params), read back by the embedding loader."""
    from tests import tiny

    folder = tiny.build(family, tmp_path / family)
    lora = finetune(sfumato.load(folder), data, _cfg("lora", resolution=32, lr=5e-3), out_dir=tmp_path / "lora",
                    progress=False)
    keys = _weights(lora.output).keys()
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys), "SDXL LoRAs name UNet modules as LDM does"
    pipe = sfumato.load(folder)
    pipe.load_lora(lora.output, 1.0)
    ti = finetune(sfumato.load(folder), data, _cfg("textual-inversion", resolution=32), out_dir=tmp_path / "ti",
                  progress=False)
    want = {"clip_l", "clip_g"} if family == "sdxl" else {"emb_params"}
    assert set(_weights(ti.output)) == want
    pipe.load_embedding(ti.output)
    assert pipe.generate("a zwxshape", width=32, height=32, steps=2).images[0].size == (32, 32)


def test_gradient_checkpointing_gives_the_same_gradients():
    pipe = sfumato.load()
    unet = pipe.unet.train().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700])
    ctx = torch.randn(2, 77, pipe.spec.context_dim, generator=g)
    grads = []
    for on in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = on
        unet(x, t, context=ctx).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters()})
    unet.gradient_checkpointing = False
    worst = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    assert worst <= 1e-6, f"checkpointed gradients differ by {worst:.2e}"
