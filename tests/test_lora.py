"""LoRA (issue 8): kohya and PEFT files made here for tiny SD 1.x and SDXL models, applied by sfumato and by
diffusers' ``load_lora_weights`` (PEFT): same UNet and text-encoder outputs (max|diff| stated), same
image; unloading restores the base weights bit for bit; wrong files fail with the documented errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato
from sfumato.adapters.lora import addnet_hash, extract_lora_tags
from sfumato.errors import CheckpointError, InvalidParameterError
from sfumato.weights.io import write_safetensors
from tests import tiny

# fp32 module outputs, ours (merged weights) against PEFT's separate low-rank path, relative to the largest
# output value (outputs reach ~5-20 here; merging rounds differently: measured up to 1.1e-5 relative with
# 2 threads, 2e-6 with 1; a wrong scale or module is off by order 1)
TOL = 3e-5
SIZE = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {fam: tiny.build(fam, root / fam, seed=20 + i) for i, fam in enumerate(("sd1", "sdxl"))}


def _targets(ref, *, conv: bool, unet_names: str) -> dict[str, torch.nn.Module]:
    """Modules a kohya LoRA names: attention and feed-forward linears (+ resnet convs) of the UNet, the
    text encoders' attention and MLP linears. ``unet_names``: "diffusers" or "original" (SDXL files)."""
    from sfumato.weights.keymap_unet import unet_config_from_diffusers, unet_key_map

    out = {}
    back = {v[0]: k for k, v in unet_key_map(unet_config_from_diffusers(dict(ref.unet.config))).items()}
    for name, m in ref.unet.named_modules():
        attn = ".attentions." in name and isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
        res = conv and ".resnets." in name and isinstance(m, torch.nn.Conv2d) and name.endswith(("conv1", "conv2"))
        if not (attn or res):
            continue
        key = name
        if unet_names == "original":
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                if ".".join(parts[:cut]) in back:
                    key = ".".join([back[".".join(parts[:cut])], *parts[cut:]])
                    break
        out[f"lora_unet_{key.replace('.', '_')}"] = m
    encoders = [ref.text_encoder] + ([ref.text_encoder_2] if getattr(ref, "text_encoder_2", None) else [])
    prefixes = ["lora_te"] if len(encoders) == 1 else ["lora_te1", "lora_te2"]
    for pre, enc in zip(prefixes, encoders):
        for name, m in enc.named_modules():
            if isinstance(m, torch.nn.Linear) and name.startswith("text_model.encoder."):
                out[f"{pre}_{name.replace('.', '_')}"] = m
    return out


def kohya_lora(ref, *, rank=4, seed=0, conv=True, unet_names="diffusers", alpha=2.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, m in _targets(ref, conv=conv, unet_names=unet_names).items():
        w = m.weight
        if w.ndim == 4:
            down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * 0.3
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.3
        else:
            down, up = torch.randn(rank, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], rank, generator=g) * 0.3
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def peft_lora(ref, *, rank=4, seed=1) -> dict[str, torch.Tensor]:
    """diffusers' own LoRA layout (what ``save_lora_weights`` writes): no alphas, scale 1."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in ref.unet.named_modules():
        if ".attentions." in name and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            sd[f"unet.{name}.lora_A.weight"] = torch.randn(rank, m.weight.shape[1], generator=g) * 0.3
            sd[f"unet.{name}.lora_B.weight"] = torch.randn(m.weight.shape[0], rank, generator=g) * 0.3
    for name, m in ref.text_encoder.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
            sd[f"text_encoder.{name}.lora_A.weight"] = torch.randn(rank, m.weight.shape[1], generator=g) * 0.3
            sd[f"text_encoder.{name}.lora_B.weight"] = torch.randn(m.weight.shape[0], rank, generator=g) * 0.3
    return sd


def _save(sd, path):
    write_safetensors(path, sd)
    return path


@torch.no_grad()
def _compare_networks(ours, ref, family: str) -> float:
    """max|diff| / max|ref| of the UNet and of every text encoder's last hidden state, ours against diffusers'."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    worst = 0.0
    encoders = [ref.text_encoder] + ([ref.text_encoder_2] if family == "sdxl" else [])
    for enc_ours, enc_ref in zip(ours.text_encoders, encoders):
        a = enc_ours(ids, layer=-1, final_norm=True).hidden
        b = enc_ref(ids, output_hidden_states=True).last_hidden_state
        worst = max(worst, (a - b).abs().max().item() / b.abs().max().item())
    cfg = ours.unet.cfg
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([500, 500])
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g)
    kw = {}
    y = None
    if family == "sdxl":
        y = torch.randn(2, cfg.adm_in_channels, generator=g)
        pooled = ref.text_encoder_2.config.projection_dim
        kw["added_cond_kwargs"] = {"text_embeds": y[:, :pooled],
                                   "time_ids": torch.zeros(2, (cfg.adm_in_channels - pooled) // tiny.TIME_EMBED)}
        # time ids of 0 embed to the same Fourier features on both sides: feed ours the same vector
        from sfumato.models.unet import timestep_embedding

        y = torch.cat([y[:, :pooled], timestep_embedding(torch.zeros(2 * kw["added_cond_kwargs"]["time_ids"].shape[1]),
                                                          tiny.TIME_EMBED).reshape(2, -1)], dim=1)
    a = ours.unet(x, t, context=ctx, y=y)
    b = ref.unet(x, t, encoder_hidden_states=ctx, **kw).sample
    return max(worst, (a - b).abs().max().item() / b.abs().max().item())


@pytest.mark.parametrize("family,fmt,unet_names,conv", [
    ("sd1", "kohya", "diffusers", True), ("sd1", "peft", None, False), ("sdxl", "kohya", "original", True),
    ("sdxl", "kohya", "diffusers", False)])
@pytest.mark.parametrize("weight", [0.5, 1.0])
def test_lora_matches_diffusers(folders, tmp_path, family, fmt, unet_names, conv, weight):
    folder = folders[family]
    ref = tiny.reference_pipeline(folder)
    sd = kohya_lora(ref, conv=conv, unet_names=unet_names) if fmt == "kohya" else peft_lora(ref)
    path = _save(sd, tmp_path / "style.safetensors")
    ours = sfumato.load(folder)
    base_diff = _compare_networks(ours, ref, family)
    handle = ours.load_lora(path, weight=weight)
    assert len(handle.lora.patches) == len({k.rsplit(".", 2)[0] for k in sd if not k.endswith(".alpha")})
    ref.load_lora_weights(str(tmp_path), weight_name="style.safetensors", adapter_name="style")
    ref.set_adapters(["style"], adapter_weights=[weight])
    d = _compare_networks(ours, ref, family)
    assert d <= TOL, f"{family} {fmt}: max|diff| {d:.2e} > {TOL:.0e} (before the LoRA: {base_diff:.2e})"


def test_two_loras_with_separate_weights_match_diffusers_and_change_the_image(folders, tmp_path):
    folder = folders["sd1"]
    ref = tiny.reference_pipeline(folder)
    a = _save(kohya_lora(ref, seed=1), tmp_path / "a.safetensors")
    b = _save(kohya_lora(ref, seed=2, conv=False), tmp_path / "b.safetensors")
    ours = sfumato.load(folder)
    kw = dict(width=SIZE, height=SIZE, steps=4, cfg_scale=5.0, sampler="euler", schedule="leading", seed=3)
    before = ours.generate("a red circle", **kw).images[0]
    ours.load_lora(a, weight=0.7)
    ours.load_lora(b, weight=(0.4, 0.4))
    got = ours.generate("a red circle", **kw)
    ref.load_lora_weights(str(tmp_path), weight_name="a.safetensors", adapter_name="a")
    ref.load_lora_weights(str(tmp_path), weight_name="b.safetensors", adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    assert _compare_networks(ours, ref, "sd1") <= TOL
    want = ref("a red circle", num_inference_steps=4, guidance_scale=5.0, width=SIZE, height=SIZE,
               generator=torch.Generator().manual_seed(3)).images[0]
    diff = np.abs(np.asarray(got.images[0], np.int16) - np.asarray(want, np.int16)).max()
    moved = np.abs(np.asarray(got.images[0], np.int16) - np.asarray(before, np.int16)).max()
    assert diff <= 2 and moved > 10, f"image max|diff| {diff}/255, LoRAs moved it by {moved}/255"
    text = got.infotexts[0]
    assert f"Lora hashes: \"a: {addnet_hash(a)}, b: {addnet_hash(b)}\"" in text


def test_unload_restores_the_base_weights_bit_for_bit(folders, tmp_path):
    ours = sfumato.load(folders["sdxl"])
    def weights():  # both text encoders have the same key names: key by module too
        return {f"{i}.{k}": v for i, m in enumerate(ours.modules()) for k, v in m.state_dict().items()}

    before = {k: v.clone() for k, v in weights().items()}
    tensors = {v.data_ptr() for v in weights().values()}
    ref = tiny.reference_pipeline(folders["sdxl"])
    a = ours.load_lora(_save(kohya_lora(ref, unet_names="original"), tmp_path / "a.safetensors"), weight=0.8)
    ours.load_lora(_save(kohya_lora(ref, seed=4, conv=False), tmp_path / "b.safetensors"), weight=(1.0, 0.0))
    changed = [k for k, v in weights().items() if not torch.equal(v, before[k])]
    assert changed
    ours.unload_lora(a)
    assert len(ours.loras) == 1
    ours.unload_loras()
    after = weights()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {v.data_ptr() for v in after.values()} == tensors, "unload must give back the original tensors themselves"
    with pytest.raises(InvalidParameterError, match="not loaded"):
        ours.unload_lora(a)


def test_wrong_family_unknown_keys_and_bad_files_are_refused(folders, tmp_path):
    sd1, sdxl = sfumato.load(folders["sd1"]), sfumato.load(folders["sdxl"])
    ref_xl = tiny.reference_pipeline(folders["sdxl"])
    xl_file = _save(kohya_lora(ref_xl, unet_names="original"), tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match=r"made for another model \(cross-attention width 192\); the loaded model is sd1 \(cross-attention width 64\)"):
        sd1.load_lora(xl_file)
    sd = kohya_lora(tiny.reference_pipeline(folders["sd1"]), conv=False)
    sd["lora_unet_no_such_block_proj.lora_down.weight"] = torch.zeros(4, 8)
    sd["lora_unet_no_such_block_proj.lora_up.weight"] = torch.zeros(8, 4)
    with pytest.raises(CheckpointError, match="1 LoRA module.*match nothing.*lora_unet_no_such_block_proj"):
        sd1.load_lora(_save(sd, tmp_path / "extra.safetensors"))
    tucker = {"lora_unet_x.hada_t1": torch.zeros(2, 2, 3, 3)}
    with pytest.raises(CheckpointError, match="LyCORIS variants sfumato does not apply.*hada_t1"):
        sd1.load_lora(_save(tucker, tmp_path / "tucker.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        sd1.load_lora(tmp_path / "corrupt.safetensors")
    with pytest.raises(CheckpointError, match="no such LoRA file"):
        sd1.load_lora(tmp_path / "absent.safetensors")
    with pytest.raises(InvalidParameterError, match="LoRA weight"):
        sdxl.load_lora(xl_file, weight="strong")
    assert sd1.loras == [] and sdxl.loras == []


def test_prompt_tags_load_from_the_lora_folder_and_follow_the_prompt(folders, tmp_path):
    ours = sfumato.load(folders["sd1"])
    ref = tiny.reference_pipeline(folders["sd1"])
    _save(kohya_lora(ref, seed=7), tmp_path / "ink.safetensors")
    ours.lora_dir = tmp_path
    kw = dict(width=SIZE, height=SIZE, steps=3, seed=1)
    plain = ours.generate("a red circle", **kw)
    tagged = ours.generate("a red circle <lora:ink:0.6>", **kw)
    assert [(h.name, h.unet_weight, h.te_weight) for h in ours.loras] == [("ink", 0.6, 0.6)]
    explicit = sfumato.load(folders["sd1"])
    explicit.load_lora(tmp_path / "ink.safetensors", 0.6)
    same = explicit.generate("a red circle", **kw)
    assert np.array_equal(np.asarray(tagged.images[0]), np.asarray(same.images[0]))
    assert not np.array_equal(np.asarray(tagged.images[0]), np.asarray(plain.images[0]))
    assert tagged.infotexts[0].startswith("a red circle <lora:ink:0.6>") and "Lora hashes: \"ink: " in tagged.infotexts[0]
    again = ours.generate("a red circle", **kw)  # the tag is gone: so is the LoRA
    assert ours.loras == [] and np.array_equal(np.asarray(again.images[0]), np.asarray(plain.images[0]))
    with pytest.raises(InvalidParameterError, match="no .* file named 'nope'"):
        ours.generate("x <lora:nope:1>", **kw)


def test_extract_lora_tags():
    text, tags = extract_lora_tags("a cat <lora:ink:0.5>, <lora:soft> and <lora:two:0.2:0.9> <lora:n:te=0.1:unet=0.3>")
    assert text == "a cat ,  and  "
    assert [(t.name, t.te_weight, t.unet_weight) for t in tags] == [
        ("ink", 0.5, 0.5), ("soft", 1.0, 1.0), ("two", 0.2, 0.9), ("n", 0.1, 0.3)]
    with pytest.raises(InvalidParameterError, match="numbers"):
        extract_lora_tags("<lora:x:strong>")




def test_cli_lora_options(folders, tmp_path, capsys):
    from sfumato.cli import main

    folder = folders["sd1"]
    lora = _save(kohya_lora(tiny.reference_pipeline(folder), seed=8), tmp_path / "ink.safetensors")
    common = ["--model", str(folder), "--width", "32", "--height", "32", "--steps", "3", "--seed", "2", "-q"]
    assert main(["generate", "a red circle", *common, "--lora", f"{lora}:0.6:0.3", "-o", str(tmp_path / "a.png")]) == 0
    assert main(["generate", "a red circle <lora:ink:0.6:0.3>", *common, "--lora-dir", str(tmp_path),
                 "-o", str(tmp_path / "b.png")]) == 0
    api = sfumato.load(folder)
    api.load_lora(lora, (0.3, 0.6))  # the tag's order is te, unet; --lora's is unet, te
    want = api.generate("a red circle", width=32, height=32, steps=3, seed=2).images[0]
    b = np.asarray(Image.open(tmp_path / "b.png").convert("RGB"))
    assert np.array_equal(b, np.asarray(want))
    a = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))
    assert not np.array_equal(a, b)
    capsys.readouterr()
    assert main(["generate", "x", *common, "--lora", str(tmp_path / "absent.safetensors:0.5"), "-o",
                 str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "absent.safetensors" in err and not (tmp_path / "c.png").exists()


def test_server_lists_loras_and_applies_prompt_tags(folders, tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from sfumato.server.app import ServerConfig

    from .server_util import running

    loras = tmp_path / "loras"
    loras.mkdir()
    _save(kohya_lora(tiny.reference_pipeline(folders["sd1"]), seed=9), loras / "ink.safetensors")
    config = ServerConfig(model=folders["sd1"], data_dir=tmp_path / "data", lora_dir=loras)
    with running(config) as srv:
        listed = httpx.get(srv.url + "/sdapi/v1/loras", timeout=30).json()
        assert [e["name"] for e in listed] == ["ink"]
        body = {"prompt": "a red circle <lora:ink:0.6>", "width": SIZE, "height": SIZE, "steps": 3, "seed": 4,
                "sampler_name": "Euler"}
        r = httpx.post(srv.url + "/sdapi/v1/txt2img", json=body, timeout=120).json()
        bad = httpx.post(srv.url + "/sdapi/v1/txt2img", json={**body, "prompt": "x <lora:nope:1>"}, timeout=60)
        assert bad.status_code in (400, 422) and "nope" in bad.text
        again = httpx.post(srv.url + "/sdapi/v1/txt2img", json=body, timeout=120)
        assert again.status_code == 200, "a failed job leaves the server serving"
    api = sfumato.load(folders["sd1"])
    api.load_lora(loras / "ink.safetensors", 0.6)
    want = api.generate("a red circle", width=SIZE, height=SIZE, steps=3, seed=4, sampler="euler", eta=1.0)
    import base64
    import io

    got = Image.open(io.BytesIO(base64.b64decode(r["images"][0]))).convert("RGB")
    assert np.array_equal(np.asarray(got), np.asarray(want.images[0]))
    assert "Lora hashes" in json.loads(r["info"])["infotexts"][0]


def test_lycoris_loha_lokr_and_full_diff_apply_their_formulas(folders, tmp_path):
    """LyCORIS files (kohya naming): LoHa on a 3x3 conv and a linear, LoKr with a whole w1 and a
    decomposed w2, a full diff with a bias diff. Each weight must become W + w * scale * formula, the
    formula written out here from the LyCORIS definitions (scale alpha / rank; 1 for full)."""
    ours = sfumato.load(folders["sd1"])
    unet = ours.unet
    g = torch.Generator().manual_seed(0)
    conv = "input_blocks.1.0.in_layers.2"  # a 3x3 conv (diffusers: down_blocks.0.resnets.0.conv1)
    lin = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    ff = "input_blocks.1.1.transformer_blocks.0.ff.net.2"
    wc, wl, wf = (unet.get_submodule(n).weight.detach().clone() for n in (conv, lin, ff))
    bf = unet.get_submodule(ff).bias.detach().clone()
    r = 2
    cout, cin = wc.shape[:2]
    loha = {k: torch.randn(*s, generator=g) for k, s in {
        "hada_w1_a": (cout, r), "hada_w1_b": (r, cin * 9), "hada_w2_a": (cout, r), "hada_w2_b": (r, cin * 9)}.items()}
    out, inn = wl.shape
    w1 = torch.randn(2, 2, generator=g)
    w2a, w2b = torch.randn(out // 2, r, generator=g), torch.randn(r, inn // 2, generator=g)
    diff, diff_b = torch.randn(*wf.shape, generator=g), torch.randn(*bf.shape, generator=g)
    sd = {f"lora_unet_down_blocks_0_resnets_0_conv1.{k}": v for k, v in loha.items()}
    sd["lora_unet_down_blocks_0_resnets_0_conv1.alpha"] = torch.tensor(1.0)
    qname = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd.update({f"{qname}.lokr_w1": w1, f"{qname}.lokr_w2_a": w2a, f"{qname}.lokr_w2_b": w2b,
               f"{qname}.alpha": torch.tensor(4.0)})
    fname = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"
    sd.update({f"{fname}.diff": diff, f"{fname}.diff_b": diff_b})
    handle = ours.load_lora(_save(sd, tmp_path / "lyco.safetensors"), weight=0.5)
    assert sorted(p.kind for p in handle.lora.patches) == ["full", "full", "loha", "lokr"]
    want_c = wc + 0.5 * (1.0 / r) * ((loha["hada_w1_a"] @ loha["hada_w1_b"]) *
                                     (loha["hada_w2_a"] @ loha["hada_w2_b"])).reshape(wc.shape)
    want_l = wl + 0.5 * (4.0 / r) * torch.kron(w1, w2a @ w2b)
    for name, want in ((conv, want_c), (lin, want_l), (ff, wf + 0.5 * diff)):
        got = unet.get_submodule(name).weight
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), f"{name}: max|diff| {(got - want).abs().max():.2e}"
    assert torch.allclose(unet.get_submodule(ff).bias, bf + 0.5 * diff_b, atol=1e-6)
    ours.unload_loras()
    assert torch.equal(unet.get_submodule(conv).weight, wc) and torch.equal(unet.get_submodule(ff).bias, bf)


# --- DoRA -----------------------------------------------------------------------------------------------

def _peft_dora(ref, *, seed=3):
    """A DoRA file as PEFT trains and diffusers' ``save_lora_weights`` writes it (``use_dora=True``): UNet
    attention linears and resnet 3x3 convs, text-encoder q/v; PEFT sets each magnitude to ``||W + s*BA||``,
    so it is scaled by a random factor per row to make the magnitude matter. Returns the state dict and a
    copy of the text encoder with the adapter in PEFT's own layers (the text-encoder reference)."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet, te = copy.deepcopy(ref.unet), copy.deepcopy(ref.text_encoder)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, use_dora=True, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, use_dora=True, init_lora_weights=False,
                                       target_modules=["q_proj", "v_proj"]), te)
    with torch.no_grad():
        for net in (unet, te):
            for name, p in net.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(0.6 + 0.8 * torch.rand(p.shape))
    sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    sd.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(te).items()})
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}, te


@pytest.mark.parametrize("weight", [0.5, 1.0])
def test_peft_dora_matches_diffusers(folders, tmp_path, weight):
    """PEFT / diffusers DoRA (``lora_magnitude_vector``): the UNet (attention linears and 3x3 convs) against
    diffusers' ``load_lora_weights`` + ``set_adapters`` (PEFT's DoRA layers), the text encoder against PEFT's
    layers directly (transformers 5's ``load_adapter`` does not load text-encoder magnitudes: it expects
    ``lora_magnitude_vector.<name>.weight``). Measured max|diff| / max|ref|: 2.1e-6 at 0.5, 2.2e-6 at 1.0 (fp32).
    The same file without its magnitudes (read as a plain LoRA) is off by 3.7e-1 / 3.6e-1."""
    folder = folders["sd1"]
    ref = tiny.reference_pipeline(folder)
    sd, te = _peft_dora(ref)
    assert any(k.endswith("conv1.lora_magnitude_vector") for k in sd)
    path = _save(sd, tmp_path / "dora.safetensors")
    ours = sfumato.load(folder)
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    ours.load_lora(path, weight=weight)
    ref.load_lora_weights(str(tmp_path), weight_name="dora.safetensors", adapter_name="dora")
    ref.set_adapters(["dora"], adapter_weights=[weight])
    for m in te.modules():
        if hasattr(m, "set_scale"):
            m.set_scale("default", weight)
    both = SimpleNamespace(unet=ref.unet, text_encoder=te)
    d = _compare_networks(ours, both, "sd1")
    assert d <= TOL, f"PEFT DoRA at {weight}: max|diff| {d:.2e} > {TOL:.0e}"
    ours.unload_loras()
    assert all(torch.equal(v, before[k]) for k, v in ours.unet.state_dict().items())
    plain = {k: v for k, v in sd.items() if "magnitude" not in k}
    ours.load_lora(plain, weight=weight)
    off = _compare_networks(ours, both, "sd1")
    assert off > 100 * TOL, f"without magnitudes the file should not match DoRA (max|diff| {off:.2e})"


def _a1111_dora(w, updown, dora_scale, multiplier):
    """AUTOMATIC1111's ``extensions-builtin/Lora/network.py`` ``apply_weight_decompose`` on ``updown`` (already
    times alpha / rank) and the user's multiplier after it, written out; a ``(out, 1, ...)`` ``dora_scale``
    is normed per row as LyCORIS ``wd_on_out`` does."""
    merged = updown + w
    dims = w.ndim - 1
    if dora_scale.shape[0] == 1:
        norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(merged.shape[1], *[1] * dims).transpose(0, 1))
    else:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *[1] * dims)
    return w + (merged * (dora_scale / norm) - w) * multiplier


def test_kohya_dora_follows_automatic1111(folders, tmp_path):
    """kohya / LyCORIS DoRA (``dora_scale``; diffusers drops it, so the reference is AUTOMATIC1111's formula,
    :func:`_a1111_dora`): per-column scales on a square linear and a 3x3 conv, a per-row (``wd_on_out``) scale
    on a non-square linear, a LoHa with a scale, a text-encoder linear; unet weight 0.7, te 0.4. A second
    DoRA file on the same linear adds its own update, computed from the original weight. Measured max|diff|
    of the weights against the formula: 3.0e-8 (fp32; updates up to 0.54). Unloading restores them bit for bit."""
    ours = sfumato.load(folders["sd1"])
    g = torch.Generator().manual_seed(11)
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
    targets = {  # file name -> (our module, scale layout, kind)
        f"{attn}attn1_to_q": ("unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q", "col", "lora"),
        f"{attn}attn2_to_k": ("unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k", "row", "lora"),
        "lora_unet_down_blocks_0_resnets_0_conv1": ("unet.input_blocks.1.0.in_layers.2", "col", "lora"),
        f"{attn}ff_net_2": ("unet.input_blocks.1.1.transformer_blocks.0.ff.net.2", "row", "loha"),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
            ("text_encoders.0.text_model.encoder.layers.0.self_attn.q_proj", "col", "lora"),
    }
    modules = dict(ours.unet.named_modules(prefix="unet"))
    modules.update(ours.text_encoders[0].named_modules(prefix="text_encoders.0"))
    originals = {path: modules[path].weight.detach().clone() for path, _, _ in targets.values()}

    def dora_file(names, seed_alpha):
        sd, want = {}, {}
        for fname in names:
            path, layout, kind = targets[fname]
            w = originals[path]
            r, alpha = 4, seed_alpha
            if kind == "lora":
                down = torch.randn(r, *w.shape[1:], generator=g) * 0.3
                up = torch.randn(w.shape[0], r, *([1] * (w.ndim - 2)), generator=g) * 0.3
                sd.update({f"{fname}.lora_down.weight": down, f"{fname}.lora_up.weight": up})
                updown = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
            else:
                f = {k: torch.randn(*s, generator=g) * 0.3 for k, s in {
                    "hada_w1_a": (w.shape[0], r), "hada_w1_b": (r, w.shape[1]),
                    "hada_w2_a": (w.shape[0], r), "hada_w2_b": (r, w.shape[1])}.items()}
                sd.update({f"{fname}.{k}": v for k, v in f.items()})
                updown = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
            updown = updown * (alpha / r)
            ones = [1] * (w.ndim - 1)
            if layout == "col":  # trained magnitudes: the base weight's column (row) norms, moved
                m = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *ones[1:])
            else:
                m = w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *ones)
            m = m * (0.6 + 0.8 * torch.rand(m.shape, generator=g))
            sd[f"{fname}.alpha"], sd[f"{fname}.dora_scale"] = torch.tensor(alpha), m
            want[path] = (updown, m)
        return sd, want

    sd_a, want_a = dora_file(list(targets), 2.0)
    sd_b, want_b = dora_file([f"{attn}attn1_to_q"], 4.0)
    a = ours.load_lora(_save(sd_a, tmp_path / "a.safetensors"), weight=(0.7, 0.4))
    assert sorted(p.dora for p in a.lora.patches) == ["a1111"] * len(targets)
    ours.load_lora(_save(sd_b, tmp_path / "b.safetensors"), weight=0.5)
    worst = 0.0
    for path, (updown, m) in want_a.items():
        w = originals[path]
        want = _a1111_dora(w, updown, m, 0.4 if path.startswith("text_encoders") else 0.7)
        if path in want_b:
            want = want + _a1111_dora(w, *want_b[path], 0.5) - w
        got = modules[path].weight.detach()
        worst = max(worst, (got - want).abs().max().item())
    assert worst <= 1e-6, f"kohya DoRA weights: max|diff| {worst:.2e} against AUTOMATIC1111's formula"
    ours.unload_loras()
    assert all(torch.equal(modules[path].weight, w) for path, w in originals.items())
    bad = dict(sd_b)
    bad[f"{attn}attn1_to_q.dora_scale"] = torch.ones(32)
    with pytest.raises(CheckpointError, match=r"DoRA magnitude \(32,\) does not fit the weight \(32, 32\)"):
        ours.load_lora(bad)
    assert ours.loras == []
