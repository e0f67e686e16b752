"""Textual inversion (issue 8): AUTOMATIC1111 and diffusers embedding files made here for tiny SD 1.x and SDXL
models give the same images as diffusers' ``load_textual_inversion`` (max|diff| <= 1/255) and change the
image; widths that do not fit are refused; unloading restores the tokenizer and token tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sfumato
from sfumato.errors import CheckpointError, InvalidParameterError
from sfumato.text.tokenizer import get_tokenizer
from sfumato.weights.io import write_safetensors
from tests import tiny

SIZE = 32
KW = dict(width=SIZE, height=SIZE, steps=3, cfg_scale=5.0, sampler="euler", schedule="leading", seed=6)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti")
    return {fam: tiny.build(fam, root / fam, seed=30 + i) for i, fam in enumerate(("sd1", "sdxl"))}


def _vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def _ref_image(ref, prompt: str):
    return ref(prompt, num_inference_steps=3, guidance_scale=5.0, width=SIZE, height=SIZE,
               generator=torch.Generator().manual_seed(6)).images[0]


def _diff(a, b) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


@pytest.mark.parametrize("fmt,n", [("a1111-pt", 2), ("a1111-safetensors", 3), ("diffusers", 1)])
def test_sd1_embedding_formats_match_diffusers(folders, tmp_path, fmt, n):
    folder = folders["sd1"]
    ref = tiny.reference_pipeline(folder)
    v = _vectors(n, ref.text_encoder.config.hidden_size, seed=n)
    if fmt == "a1111-pt":
        path = tmp_path / "shiny.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "shiny", "step": 100}, path)
    elif fmt == "a1111-safetensors":
        path = tmp_path / "shiny.safetensors"
        write_safetensors(path, {"emb_params": v})
    else:
        path = tmp_path / "learned_embeds.safetensors"
        write_safetensors(path, {"shiny": v[0]})
    ours = sfumato.load(folder)
    before = ours.generate("a shiny cat", **KW).images[0]
    emb = ours.load_embedding(path)
    assert emb.token == "shiny" and emb.vectors[0].shape == (n, v.shape[1])
    got = ours.generate("a shiny cat", **KW)
    ref.load_textual_inversion(str(path), token="shiny")
    want = _ref_image(ref, "a shiny cat")
    assert _diff(got.images[0], want) <= 1, f"{fmt}: max|diff| {_diff(got.images[0], want)}/255"
    assert _diff(got.images[0], before) > 0, "the embedding must change the image"
    assert f"TI hashes: \"shiny: {emb.hash}\"" in got.infotexts[0] or f"TI hashes: shiny: {emb.hash}" in got.infotexts[0]
    assert get_tokenizer().token_id("shiny") is None, "the shared tokenizer must not change"


def test_sdxl_clip_l_clip_g_pair_matches_diffusers(folders, tmp_path):
    folder = folders["sdxl"]
    ref = tiny.reference_pipeline(folder)
    wl, wg = ref.text_encoder.config.hidden_size, ref.text_encoder_2.config.hidden_size
    cl, cg = _vectors(2, wl, 1), _vectors(2, wg, 2)
    path = tmp_path / "glowzz.safetensors"
    write_safetensors(path, {"clip_l": cl, "clip_g": cg})
    ours = sfumato.load(folder)
    ours.load_embedding(path)
    got = ours.generate("a glowzz lamp", **KW).images[0]
    ref.load_textual_inversion(cl, token="glowzz", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(cg, token="glowzz", text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    want = _ref_image(ref, "a glowzz lamp")
    assert _diff(got, want) <= 1, f"SDXL pair: max|diff| {_diff(got, want)}/255"


def test_wrong_width_and_bad_files_are_refused_and_unload_restores(folders, tmp_path):
    ours = sfumato.load(folders["sd1"])
    width = ours.text_encoders[0].cfg.width
    write_safetensors(tmp_path / "wide.safetensors", {"emb_params": _vectors(1, width + 32, 0)})
    with pytest.raises(InvalidParameterError, match=rf"embedding width {width + 32} .* does not fit text encoder 0 "
                                                    rf"of this sd1 model \(width {width}\)"):
        ours.load_embedding(tmp_path / "wide.safetensors")
    write_safetensors(tmp_path / "pair.safetensors", {"clip_l": _vectors(1, width, 0), "clip_g": _vectors(1, 8, 0)})
    with pytest.raises(InvalidParameterError, match="clip_l/clip_g embedding does not fit this sd1 model"):
        ours.load_embedding(tmp_path / "pair.safetensors")
    write_safetensors(tmp_path / "junk.safetensors", {"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="not a textual-inversion embedding"):
        ours.load_embedding(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no such embedding file"):
        ours.load_embedding(tmp_path / "absent.pt")

    table = ours.text_encoders[0].text_model.embeddings.token_embedding
    rows, tok = table.weight.shape[0], ours.tokenizer
    plain = ours.generate("a shiny cat", **KW).images[0]
    write_safetensors(tmp_path / "shiny.safetensors", {"emb_params": _vectors(2, width, 3)})
    ours.load_embedding(tmp_path / "shiny.safetensors")
    assert table.weight.shape[0] == rows + 2 and ours.tokenizer is not tok
    with pytest.raises(InvalidParameterError, match="already in the vocabulary"):
        ours.load_embedding(tmp_path / "shiny.safetensors")
    ours.unload_embeddings()
    assert ours.tokenizer is tok and ours.text_encoders[0].text_model.embeddings.token_embedding.weight.shape[0] == rows
    assert _diff(ours.generate("a shiny cat", **KW).images[0], plain) == 0


def test_cli_embedding_options(folders, tmp_path, capsys):
    from PIL import Image

    from sfumato.cli import main

    width = sfumato.load(folders["sd1"]).text_encoders[0].cfg.width
    emb_dir = tmp_path / "emb"
    emb_dir.mkdir()
    write_safetensors(emb_dir / "shiny.safetensors", {"emb_params": _vectors(2, width, 5)})
    write_safetensors(emb_dir / "other.safetensors", {"emb_params": _vectors(1, width + 8, 5)})  # skipped
    common = ["--model", str(folders["sd1"]), "--width", "32", "--height", "32", "--steps", "3", "--seed", "6", "-q"]
    assert main(["generate", "a shiny cat", *common, "--embeddings-dir", str(emb_dir), "-o", str(tmp_path / "a.png")]) == 0
    assert main(["generate", "a shiny cat", *common, "--embedding", str(emb_dir / "shiny.safetensors"),
                 "-o", str(tmp_path / "b.png")]) == 0
    api = sfumato.load(folders["sd1"])
    api.load_embedding(emb_dir / "shiny.safetensors")
    want = np.asarray(api.generate("a shiny cat", width=32, height=32, steps=3, seed=6).images[0])
    for name in ("a.png", "b.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / name).convert("RGB")), want), name
    assert main(["generate", "x", *common, "--embedding", str(tmp_path / "absent.pt"), "-o", str(tmp_path / "c.png")]) == 2
    assert "--embedding" in capsys.readouterr().err


def test_server_lists_and_uses_an_embeddings_folder(folders, tmp_path):
    """`sfumato serve --embeddings-dir`: /sdapi/v1/embeddings lists what fits the current model (an SDXL
    pair is skipped for SD 1.x, with its width), prompts use them by file name with their TI hash recorded,
    and a file added later is picked up by the next job without a restart."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    import base64
    import io

    from PIL import Image

    from sfumato.server.app import ServerConfig

    from .server_util import running

    emb = tmp_path / "embeddings"
    emb.mkdir()
    width = sfumato.load(folders["sd1"]).text_encoders[0].text_model.embeddings.token_embedding.weight.shape[1]
    write_safetensors(emb / "shiny.safetensors", {"emb_params": _vectors(2, width, seed=1)})
    write_safetensors(emb / "xlpair.safetensors", {"clip_l": _vectors(1, width, seed=2),
                                                  "clip_g": _vectors(1, width + 32, seed=3)})
    (emb / "notes.txt").write_text("not an embedding")
    config = ServerConfig(model=folders["sd1"], data_dir=tmp_path / "data", embeddings_dir=emb)
    body = {"prompt": "a shiny cat", "width": SIZE, "height": SIZE, "steps": 3, "seed": 6, "sampler_name": "Euler",
            "cfg_scale": 5.0}
    with running(config) as srv:
        listed = httpx.get(srv.url + "/sdapi/v1/embeddings", timeout=30).json()
        assert listed["loaded"] == {"shiny": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                              "shape": width, "vectors": 2}}
        assert list(listed["skipped"]) == ["xlpair"] and listed["skipped"]["xlpair"]["shape"] == width
        r = httpx.post(srv.url + "/sdapi/v1/txt2img", json=body, timeout=120).json()
        write_safetensors(emb / "glossy.safetensors", {"emb_params": _vectors(1, width, seed=4)})
        later = httpx.post(srv.url + "/sdapi/v1/txt2img", json={**body, "prompt": "a glossy cat"}, timeout=120).json()
        assert httpx.post(srv.url + "/sdapi/v1/refresh-embeddings", timeout=30).status_code == 200
    api = sfumato.load(folders["sd1"])
    api.load_embedding(emb / "shiny.safetensors")
    api.load_embedding(emb / "glossy.safetensors")
    for res, prompt in ((r, "a shiny cat"), (later, "a glossy cat")):
        want = api.generate(prompt, width=SIZE, height=SIZE, steps=3, seed=6, sampler="euler", cfg_scale=5.0)
        got = Image.open(io.BytesIO(base64.b64decode(res["images"][0]))).convert("RGB")
        assert _diff(got, want.images[0]) == 0, prompt
        assert "TI hashes" in json.loads(res["info"])["infotexts"][0]
