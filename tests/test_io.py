"""Checkpoint reading: safetensors / torch zip / legacy pickle round trips, corrupt files, malicious
pickles that must never run, EMA key selection, atomic safetensors writes."""

from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sfumato.config import PRESETS
from sfumato.errors import CheckpointError, UnsafePickleError
from sfumato.weights import io

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.diffusion_model.w32": torch.randn(3, 5, generator=g),
        "model.diffusion_model.w16": torch.randn(7, generator=g).half(),
        "first_stage_model.wbf": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "ints": torch.arange(6, dtype=torch.int64),
    }


def _save(kind: str, path: Path, obj) -> None:
    if kind == "safetensors":
        io.write_safetensors(path, obj)
    elif kind == "zip":
        torch.save(obj, path)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("kind,suffix", [("safetensors", ".safetensors"), ("zip", ".ckpt"), ("legacy", ".pt")])
def test_round_trip_every_dtype(tmp_path, kind, suffix):
    """Every stored dtype reads back bit-exactly as stored, and cast to each requested dtype equals
    torch's own ``.to(dtype)`` exactly (max|diff| = 0)."""
    sd = _tensors()
    path = tmp_path / f"m{suffix}"
    _save(kind, path, sd)
    with io.open_checkpoint(path) as ckpt:
        assert sorted(ckpt.keys()) == sorted(sd)
        for k, ref in sd.items():
            assert k in ckpt and ckpt.shape(k) == tuple(ref.shape) and ckpt.dtype(k) == ref.dtype
            got = ckpt.get(k)
            assert got.dtype == ref.dtype and torch.equal(got, ref), k
            for dt in DTYPES:
                cast = ckpt.get(k, dtype=dt)
                assert cast.dtype == dt and cast.is_contiguous()
                diff = (cast.float() - ref.to(dt).float()).abs().max().item() if ref.numel() else 0.0
                assert torch.equal(cast, ref.to(dt)), f"{k} as {dt}: max|diff| {diff}"
        assert "nope" not in ckpt
        with pytest.raises(CheckpointError, match="nope"):
            ckpt.shape("nope")
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.get("scalar")


@pytest.mark.parametrize("kind,suffix", [("safetensors", ".safetensors"), ("zip", ".ckpt"), ("legacy", ".pt")])
def test_shared_reads_map_the_file_copy_on_write(tmp_path, kind, suffix):
    """``share=True`` gives the stored bytes without a copy (the tensor's memory lies inside the file's
    mapping) and bit-equal to a plain read; it outlives ``close``; writing to it never reaches the file;
    a cast or an empty tensor falls back to an ordinary read (so do the legacy format's unaligned storages)."""
    sd = _tensors()
    path = tmp_path / f"m{suffix}"
    _save(kind, path, sd)
    before = path.read_bytes()
    with io.open_checkpoint(path) as ckpt:
        shared = {k: ckpt.get(k, share=True) for k in sd}
        cast = ckpt.get("model.diffusion_model.w16", dtype=torch.float32, share=True)
        mapping = ckpt._map
    assert mapping is not None
    base = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
    for k, ref in sd.items():
        t = shared[k]
        assert t.dtype == ref.dtype and t.shape == ref.shape and torch.equal(t, ref), k
        inside = base <= t.data_ptr() < base + len(mapping)
        if kind != "legacy":
            assert inside == (ref.numel() > 0), f"{k}: mapped {inside}"
    assert cast.dtype == torch.float32 and torch.equal(cast, sd["model.diffusion_model.w16"].float())
    assert not (base <= cast.data_ptr() < base + len(mapping))
    shared["model.diffusion_model.w32"].add_(1.0)
    assert path.read_bytes() == before
    with io.open_checkpoint(path) as ckpt:
        assert torch.equal(ckpt.get("model.diffusion_model.w32"), sd["model.diffusion_model.w32"])


def test_casting_read_is_chunked(tmp_path, monkeypatch):
    """A tensor larger than the staging buffer is cast chunk by chunk, correctly at every boundary."""
    monkeypatch.setattr(io, "_STAGING_BYTES", 64)
    t = torch.randn(1000).half()
    io.write_safetensors(tmp_path / "a.safetensors", {"t": t})
    with io.open_checkpoint(tmp_path / "a.safetensors") as ckpt:
        assert torch.equal(ckpt.get("t", dtype=torch.float32), t.float())


def test_views_and_shared_storage_in_pickles(tmp_path):
    """torch.save keeps views of one storage; each reads back as its own contiguous tensor."""
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    sd = {"whole": base, "rows": base[2:4], "cols": base[:, 1:3], "t": base.t(), "strided": base[::2, ::3]}
    path = tmp_path / "views.pt"
    torch.save(sd, path)
    with io.open_checkpoint(path) as ckpt:
        for k, ref in sd.items():
            got = ckpt.get(k)
            assert got.is_contiguous() and torch.equal(got, ref), k
            assert torch.equal(ckpt.get(k, torch.float16), ref.half()), k
    io.write_safetensors(tmp_path / "views.safetensors", sd)  # shared storage needs no care on write
    with safe_open(tmp_path / "views.safetensors", framework="pt") as f:
        for k, ref in sd.items():
            assert torch.equal(f.get_tensor(k), ref), k


def test_safetensors_interop_with_the_reference_library(tmp_path):
    """Files we write load in the safetensors library; files it writes load here, metadata included."""
    sd = _tensors(1)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    io.write_safetensors(ours, sd, {"format": "pt", "note": "x"})
    with safe_open(ours, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
        for k, ref in sd.items():
            assert torch.equal(f.get_tensor(k), ref), k
    save_file({k: v.contiguous() for k, v in sd.items()}, theirs, metadata={"modelspec.title": "t"})
    with io.open_checkpoint(theirs) as ckpt:
        assert ckpt.metadata == {"modelspec.title": "t"}
        for k, ref in sd.items():
            assert torch.equal(ckpt.get(k), ref), k


def test_lightning_checkpoint_with_callbacks_and_numpy(tmp_path):
    """An LDM training file: state_dict, global_step, a pickled Lightning ModelCheckpoint callback
    (class used as a dict key and an instance with numpy scalars) loads without Lightning installed."""
    mod_names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    mods = {n: types.ModuleType(n) for n in mod_names}

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.monitor = "val/loss"
            self.best_model_score = torch.tensor(0.125)
            self.best_k = np.float64(0.25)
            self.count = np.int64(3)

    ModelCheckpoint.__module__ = mod_names[-1]
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mods[mod_names[-1]].ModelCheckpoint = ModelCheckpoint
    sd = _tensors()
    path = tmp_path / "last.ckpt"
    sys.modules.update(mods)
    try:
        torch.save({"epoch": 6, "global_step": 875000, "pytorch-lightning_version": "1.4.2",
                    "state_dict": sd, "callbacks": {ModelCheckpoint: ModelCheckpoint()},
                    "optimizer_states": [{"lr": 1e-4}], "lr_schedulers": []}, path)
    finally:
        for n in mod_names:
            sys.modules.pop(n)
    assert "pytorch_lightning" not in sys.modules
    with io.open_checkpoint(path) as ckpt:
        assert ckpt.metadata == {"epoch": "6", "global_step": "875000", "pytorch-lightning_version": "1.4.2"}
        assert sorted(ckpt.keys()) == sorted(sd)
        assert torch.equal(ckpt.get("first_stage_model.wbf"), sd["first_stage_model.wbf"])
    assert "pytorch_lightning" not in sys.modules


# --- corrupt and missing files ---------------------------------------------------------------------

def test_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.safetensors"):
        io.open_checkpoint(tmp_path / "nothere.safetensors")
    with pytest.raises(CheckpointError, match="folder"):
        io.open_checkpoint(tmp_path)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.ckpt"):
        io.open_checkpoint(tmp_path / "empty.ckpt")
    (tmp_path / "text.ckpt").write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="text.ckpt"):
        io.open_checkpoint(tmp_path / "text.ckpt")


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "cut.safetensors"
    io.write_safetensors(path, _tensors())
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=rf"cut\.safetensors.*truncated: header says {len(data) - header} "
                                              rf"bytes of data, file has {len(data) - header - 10}"):
        io.open_checkpoint(path)
    path.write_bytes(data[: header - 5])  # the header itself is cut
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated"):
        io.open_checkpoint(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*too small"):
        io.open_checkpoint(path)


def test_corrupt_safetensors_headers(tmp_path):
    path = tmp_path / "bad.safetensors"
    io.write_safetensors(path, {"a": torch.ones(4)})
    good = path.read_bytes()
    n = int.from_bytes(good[:8], "little")

    def with_header(text: str) -> bytes:
        blob = text.encode()
        return len(blob).to_bytes(8, "little") + blob + good[8 + n:]

    cases = {
        "not valid JSON": good[:8] + b"\xff" + good[9:],
        "not a JSON object": with_header("[1, 2]"),
        "malformed": with_header('{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}'),
        "needs 16 bytes": with_header('{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}'),
        "malformed: ": with_header('{"a": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}'),
        "header length": (10**12).to_bytes(8, "little") + good[8:],
    }
    for what, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"bad\.safetensors.*{what}"):
            io.open_checkpoint(path)


def test_truncated_and_corrupt_torch_zip(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": _tensors()}, path)
    data = bytearray(path.read_bytes())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt.*truncated"):
        io.open_checkpoint(path)
    pkl = data.find(b"state_dict")  # inside data.pkl: the zip's CRC catches it
    path.write_bytes(data[:pkl] + b"X" + data[pkl + 1:])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt"):
        io.open_checkpoint(path)


def test_truncated_legacy_pickle(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(_tensors(), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(CheckpointError, match=r"cut\.pt.*truncated"):
        io.open_checkpoint(path)


# --- malicious pickles -----------------------------------------------------------------------------

class _TouchViaSystem:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _TouchViaExec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _raw_global_pickle(module: str, name: str, marker: Path) -> bytes:
    """A protocol-0 pickle calling ``module.name('<marker>')``: GLOBAL, MARK, STRING, TUPLE, REDUCE."""
    return f"c{module}\n{name}\n(S'{marker}'\ntR.".encode()


@pytest.mark.parametrize("how", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("payload", [_TouchViaSystem, _TouchViaExec])
def test_malicious_pickles_are_refused_before_running(tmp_path, how, payload):
    marker = tmp_path / "pwned"
    obj = {"state_dict": {"w": torch.ones(2)}, "callbacks": payload(marker)}
    path = tmp_path / "evil.ckpt"
    if how == "zip":
        torch.save(obj, path)
    elif how == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    assert not marker.exists()
    # protocol 2 spells builtins "__builtin__"
    expected = r"posix\.system" if payload is _TouchViaSystem else r"(__builtin__|builtins)\.exec"
    # a plain pickle.dump reaches the tensor's nested torch.load (_load_from_bytes) before the payload
    rejected = r"torch\.storage\._load_from_bytes" if how == "pickle" else expected
    with pytest.raises(UnsafePickleError, match=rf"evil\.ckpt.*{rejected}"):
        io.open_checkpoint(path)
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("module,name", [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("subprocess", "check_call"),
    ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"), ("builtins", "__import__"),
    ("functools", "partial"), ("torch", "load"), ("torch.storage", "_load_from_bytes"),
    ("os", "FloatStorage"), ("torch.serialization", "StorageType"), ("pytorch_lightning", "Trainer"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("numpy", "load"), ("pickle", "loads"),
])
def test_every_other_global_is_refused(tmp_path, module, name):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(_raw_global_pickle(module, name, marker))
    with pytest.raises(UnsafePickleError, match=rf"evil\.pt.*{module}\.{name}"):
        io.open_checkpoint(path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script, used only to make the file
def test_torchscript_archives_are_refused(tmp_path):
    """torch.load would hand these to torch.jit.load; they are code, not checkpoints."""
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(CheckpointError, match=r"scripted\.pt.*TorchScript"):
        io.open_checkpoint(path)


def test_payload_hidden_inside_an_allowed_rebuild(tmp_path):
    """A torch zip whose tensor rebuild names os.system as the rebuild function is refused too."""
    marker = tmp_path / "pwned"
    path = tmp_path / "nested.ckpt"

    class Nested:
        def __reduce__(self):
            return torch._tensor._rebuild_from_type_v2, (os.system, torch.Tensor, (f"touch {marker}",), {})

    torch.save({"w": torch.ones(2), "x": Nested()}, path)
    with pytest.raises(UnsafePickleError, match=r"nested\.ckpt.*posix\.system"):
        io.open_checkpoint(path)
    assert not marker.exists()


# --- EMA ---------------------------------------------------------------------------------------------

def test_select_ema_prefers_ema_twins():
    keys = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.bias",
            "model_ema.diffusion_modelinput_blocks00weight", "model_ema.diffusion_modelout2bias",
            "model_ema.decay", "model_ema.num_updates", "first_stage_model.encoder.conv_in.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight", "betas"]
    routes = io.select_ema(keys)
    assert routes == {
        "model.diffusion_model.input_blocks.0.0.weight": "model_ema.diffusion_modelinput_blocks00weight",
        "model.diffusion_model.out.2.bias": "model_ema.diffusion_modelout2bias",
        "first_stage_model.encoder.conv_in.weight": "first_stage_model.encoder.conv_in.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight":
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "betas": "betas",
    }
    raw = io.select_ema(keys, use_ema=False)
    assert set(raw) == set(routes) and all(k == v for k, v in raw.items())


def test_select_ema_partial_twins_and_no_ema():
    keys = ["model.diffusion_model.a.weight", "model.diffusion_model.b.weight", "model_ema.diffusion_modelaweight"]
    assert io.select_ema(keys) == {"model.diffusion_model.a.weight": "model_ema.diffusion_modelaweight",
                                   "model.diffusion_model.b.weight": "model.diffusion_model.b.weight"}
    plain = ["model.diffusion_model.out.2.weight", "first_stage_model.x"]
    assert io.select_ema(plain) == {k: k for k in plain}


def test_select_ema_maps_an_ema_only_file_back():
    names = ["input_blocks.11.0.in_layers.0.weight", "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias",
             "output_blocks.10.2.conv.weight", "label_emb.0.0.weight", "label_emb.weight",
             "middle_block.1.proj_in.weight",
             "time_embed.2.bias", "out.0.weight", "input_blocks.3.0.op.weight",
             "output_blocks.5.1.transformer_blocks.9.ff.net.0.proj.weight", "input_blocks.4.0.skip_connection.bias",
             "output_blocks.2.1.transformer_blocks.1.norm3.weight"]
    keys = [io.ema_key("model.diffusion_model." + n) for n in names] + ["model_ema.decay", "first_stage_model.x"]
    for use_ema in (True, False):
        routes = io.select_ema(keys, use_ema=use_ema)
        assert routes == {"first_stage_model.x": "first_stage_model.x",
                          **{"model.diffusion_model." + n: io.ema_key("model.diffusion_model." + n) for n in names}}
    with pytest.raises(CheckpointError, match="model_ema.diffusion_modelmysteryweight"):
        io.select_ema(["model_ema.diffusion_modelmysteryweight"])


@pytest.mark.parametrize("family", ["sd1", "sd2-upscaler", "sd2-unclip-h", "sdxl", "sdxl-refiner"])
def test_ema_names_round_trip_for_every_unet_key(family):
    """Dots are restored correctly for every key of the real-size UNets (two-digit block indices,
    10 transformer blocks, the upscaler's class embedding)."""
    from sfumato.models.unet import UNetModel

    with torch.device("meta"):
        keys = ["model.diffusion_model." + k for k in UNetModel(PRESETS[family].unet).state_dict()]
    routes = io.select_ema([io.ema_key(k) for k in keys])
    assert sorted(routes) == sorted(keys)


# --- atomic writes -------------------------------------------------------------------------------------

def test_write_is_atomic_when_it_fails_midway(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    io.write_safetensors(path, {"old": torch.zeros(3)})
    before = path.read_bytes()
    calls = []
    real = io._tensor_bytes

    def fail_on_second(t):
        calls.append(t)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(t)

    monkeypatch.setattr(io, "_tensor_bytes", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        io.write_safetensors(path, {"a": torch.ones(1000), "b": torch.ones(1000), "c": torch.ones(10)})
    assert len(calls) == 2, "the failure must happen after part of the data was written"
    assert path.read_bytes() == before, "the old file must survive a failed write untouched"
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        io.write_safetensors(tmp_path / "new.safetensors", {"a": torch.ones(10), "b": torch.ones(10)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"], "no temp file, no half file"


def test_write_leaves_no_temp_files_and_refuses_bad_input(tmp_path):
    path = tmp_path / "m.safetensors"
    io.write_safetensors(path, {"a": torch.ones(2)}, {"k": "v"})
    io.write_safetensors(path, {"b": torch.ones(3)})  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    with io.open_checkpoint(path) as ckpt:
        assert ckpt.keys() == ["b"] and ckpt.metadata == {}
    with pytest.raises(ValueError, match="metadata"):
        io.write_safetensors(path, {"a": torch.ones(2)}, {"k": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="'m'"):
        io.write_safetensors(path, {"m": torch.empty(2, device="meta")})
