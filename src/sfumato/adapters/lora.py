"""LoRA add-ons as published: kohya / AUTOMATIC1111 files, diffusers / PEFT files, LyCORIS LoHa / LoKr / full diff,
DoRA in both layouts.

A LoRA adds ``weight * alpha / rank * up @ down`` to a Linear or Conv2d weight (Hu et al. 2021; conv
LoRA, kohya's "LoCon", has a k x k ``down`` conv and a 1x1 ``up``). Formats, by key:

- kohya / AUTOMATIC1111: ``lora_unet_<module>`` (SD 1.x/2.x name the UNet module as diffusers does,
  ``down_blocks_0_attentions_0_...``; SDXL files as the original checkpoint does, ``input_blocks_4_1_...``;
  both are accepted for every family), ``lora_te_<module>`` (``lora_te1_`` / ``lora_te2_`` for SDXL's two
  encoders), each with ``.lora_down.weight``, ``.lora_up.weight`` and an optional ``.alpha`` (default:
  the rank, a scale of 1). Module names are dotted paths with ``.`` written as ``_``.
- diffusers / PEFT: ``unet.<diffusers module>.lora_A.weight`` / ``.lora_B.weight``, ``text_encoder.`` and
  ``text_encoder_2.`` prefixes (optionally ``base_model.model.`` inside), an optional ``.alpha``.

DoRA (weight-decomposed LoRA, Liu et al. 2024) adds a magnitude per row or column: the weight becomes
``m * W' / ||W'||`` for the merged ``W' = W + update`` (:func:`weight_decompose`). The two layouts put the
user's weight ``w`` in different places, and each follows its own reference:

- kohya / LyCORIS ``.dora_scale`` (LyCORIS ``weight_decompose``, with any of LoRA, LoHa, LoKr, full):
  AUTOMATIC1111's ``network.py`` ``apply_weight_decompose``: ``w * (m * (W + s*delta) / ||W + s*delta|| - W)``,
  ``s = alpha / rank``, the norm per input column when ``dora_scale`` is ``(1, in, ...)`` (LyCORIS's first
  layout, the only one AUTOMATIC1111 reads) and per output row when it is ``(out, 1, ...)`` (LyCORIS
  ``wd_on_out``, normed as LyCORIS's own ``apply_weight_decompose`` does). diffusers' SD / SDXL
  ``load_lora_weights`` drops ``dora_scale`` (with a warning) and applies such a file as a plain LoRA, so
  AUTOMATIC1111 is the reference here.
- PEFT ``.lora_magnitude_vector`` (``use_dora=True``; ``(out,)``, ``(1, out, 1, 1)`` for convs): PEFT's
  ``DoraLinearLayer`` / ``DoraConv2dLayer`` as diffusers loads them, ``m * (W + w*s*BA) / ||W + w*s*BA||`` with
  the norm per output row (``w`` scales the update inside the norm, as ``set_adapters`` sets PEFT's scaling).
  A weight of 0 turns the file off here, where PEFT would still rescale ``W`` to ``m``.

Each DoRA update is computed from the original weight, so several stacked DoRA files do not depend on their
order (PEFT's rule; AUTOMATIC1111 feeds each network the weight the previous one left). Tucker-decomposed
LyCORIS files (``hada_t1``/``hada_t2``, ``lokr_t2``, ``lora_mid``) are refused.

Every key must name a module of the loaded model (unmatched keys are an error that lists them), every
delta must have its weight's shape, and a LoRA made for another family (its cross-attention or text width
says which) is refused with a message naming both. Applying never loses the base weights: each touched
weight keeps its original tensor, and the weight in use is rebuilt as original + the sum of the loaded
LoRAs' deltas (computed in fp32), so unloading restores the original tensor itself, bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sfumato.adapters import pipe_state
from sfumato.errors import CheckpointError, InvalidParameterError

if TYPE_CHECKING:
    from sfumato.pipeline import Pipeline

__all__ = ["LoraFile", "LoraHandle", "read_lora", "load_lora", "unload_loras", "extract_lora_tags",
           "find_lora", "addnet_hash", "LORA_EXTENSIONS"]

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")
_KOHYA = re.compile(r"(lora_unet|lora_te[12]?)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha|hada_w[12]_[ab]|"
                    r"lokr_w[12](?:_[ab])?|diff|diff_b|hada_t[12]|lokr_t2|lora_mid\.weight|dora_scale)")
_PEFT = re.compile(r"(unet|text_encoder|text_encoder_2)\.(?:base_model\.model\.)?(.+)\.(lora_A\.weight|lora_B\.weight|"
                   r"lora\.down\.weight|lora\.up\.weight|alpha|lora_magnitude_vector(?:\.weight)?)")
_PART = {"lora_down.weight": "down", "lora_A.weight": "down", "lora.down.weight": "down",
         "lora_up.weight": "up", "lora_B.weight": "up", "lora.up.weight": "up",
         "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude"}
_UNSUPPORTED = {"hada_t1", "hada_t2", "lokr_t2", "lora_mid.weight"}
# cross-attention width -> the family a UNet LoRA was made for, for the refusal message
_CONTEXT_FAMILY = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}


@dataclass(frozen=True)
class LoraPatch:
    """One module's update: ``module`` is a path below ``Pipeline`` ("unet.input_blocks.1.1...",
    "text_encoders.0.text_model...."), ``attr`` "weight" or "bias", ``part`` "unet" or "te" (which weight
    of a pair scales it), ``kind`` the formula over ``factors`` (:meth:`delta`); with DoRA, ``magnitude``
    shaped ``(out, 1, ...)`` or ``(1, in, ...)`` and ``dora`` where the user's weight goes (:meth:`update`)."""

    module: str
    part: str
    kind: str  # "lora", "loha", "lokr" or "full"
    factors: dict[str, Tensor]
    alpha: float | None
    attr: str = "weight"
    magnitude: Tensor | None = None
    dora: str | None = None  # "a1111": w scales the finished update; "peft": w scales delta inside the norm

    @property
    def rank(self) -> int | None:
        f = self.factors
        if self.kind == "lora":
            return f["down"].shape[0]
        if self.kind == "loha":
            return f["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            for k in ("lokr_w1_b", "lokr_w2_b"):
                if k in f:
                    return f[k].shape[0]
        return None

    def delta(self, shape: torch.Size) -> Tensor:
        """The update in fp32, shaped like the weight (``shape``), before the user's weight:
        LoRA ``up @ down``, LoHa ``(w1a @ w1b) * (w2a @ w2b)`` (Hadamard), LoKr ``kron(w1, w2)`` (each factor
        whole or as ``_a @ _b``), each times ``alpha / rank`` (1 without an alpha or a rank, as
        AUTOMATIC1111 and LyCORIS scale them); full ``diff`` as it is."""
        f = {k: v.float() for k, v in self.factors.items()}
        if self.kind == "full":
            return f["diff"].reshape(shape)
        if self.kind == "lora":
            d = f["up"].flatten(1) @ f["down"].flatten(1)  # (out, r) @ (r, in*kh*kw)
        elif self.kind == "loha":
            d = (f["hada_w1_a"] @ f["hada_w1_b"].flatten(1)) * (f["hada_w2_a"] @ f["hada_w2_b"].flatten(1))
        else:
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"].flatten(1)
            if len(shape) == 4 and w2.ndim == 2 and w2.shape[1] != shape[1] // w1.shape[1]:
                w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
            if w2.ndim == 4:
                w1 = w1[:, :, None, None]
            d = torch.kron(w1, w2)
        rank = self.rank if self.kind != "lora" else f["down"].shape[0]
        scale = self.alpha / rank if (self.alpha is not None and rank) else 1.0
        return d.reshape(shape) * scale

    def update(self, original: Tensor, weight: float) -> Tensor:
        """What the user's ``weight`` adds to ``original`` (fp32, on its device): ``weight * delta``; with
        DoRA ``weight * (decompose(W + delta) - W)`` (AUTOMATIC1111) or ``decompose(W + weight * delta) - W``
        (PEFT), ``W`` the original in fp32."""
        d = self.delta(original.shape).to(original.device)
        if self.magnitude is None:
            return d * weight
        w0 = original.float()
        m = self.magnitude.float().to(original.device)
        if self.dora == "peft":
            return weight_decompose(w0 + weight * d, m) - w0
        return (weight_decompose(w0 + d, m) - w0) * weight


def weight_decompose(w: Tensor, magnitude: Tensor) -> Tensor:
    """DoRA's reparametrisation (Liu et al. 2024): ``magnitude * w / ||w||``, the norm per output row for a
    ``magnitude`` shaped ``(out, 1, ...)``, per input column (over outputs and kernel taps) for ``(1, in, ...)``."""
    dims = tuple(i for i in range(w.ndim) if magnitude.shape[i] == 1)
    return w * (magnitude / torch.linalg.vector_norm(w, dim=dims, keepdim=True))


def _dora_magnitude(m: Tensor, shape: torch.Size, peft: bool) -> Tensor | None:
    """A file's DoRA magnitude in the broadcast shape :func:`weight_decompose` reads, or None if it does not fit
    ``shape``: PEFT's ``(out,)`` / ``(1, out, 1, 1)`` become ``(out, 1, ...)``; LyCORIS's ``dora_scale`` must
    already be ``(out, 1, ...)`` or ``(1, in, ...)`` (with ``out == in`` its shape still says which)."""
    ones = (1,) * (len(shape) - 1)
    if peft:
        return m.reshape(shape[0], *ones) if m.numel() == shape[0] else None
    rows, cols = (shape[0], *ones), (1, shape[1], *ones[1:])
    return m if tuple(m.shape) in (rows, cols) else None


@dataclass
class LoraFile:
    """A LoRA read and matched to a pipeline's modules; ``hash``: AUTOMATIC1111's short hash (12 hex)."""

    name: str
    path: Path | None
    patches: list[LoraPatch]
    hash: str | None = None


@dataclass
class LoraHandle:
    """A loaded LoRA with its weights; ``pipe.unload_lora(handle)`` or ``pipe.unload_loras()`` removes it."""

    lora: LoraFile
    unet_weight: float
    te_weight: float
    from_prompt: bool = False

    @property
    def name(self) -> str:
        return self.lora.name


@dataclass
class LoraState:
    """Per pipeline: the loaded handles, and the original tensor of every weight any of them touched."""

    handles: list[LoraHandle] = field(default_factory=list)
    originals: dict[tuple[str, str], Tensor] = field(default_factory=dict)  # (module path, attr) -> tensor


# --- reading --------------------------------------------------------------------------------------------

def addnet_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's LoRA hash (``Lora hashes`` in the infotext): SHA-256 of a safetensors file's tensor
    data, the header skipped (kohya's "addnet" hash), of the whole file for other formats; 12 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if str(path).lower().endswith(".safetensors"):
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def _module_names(pipe: Pipeline) -> dict[str, str]:
    """Every LoRA-able module (Linear, Conv2d) by the names files use -> its path below the pipeline."""
    from sfumato.weights.keymap_unet import unet_key_map

    table = unet_key_map(pipe.unet.cfg)
    names: dict[str, str] = {}
    for name, mod in pipe.unet.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        path = f"unet.{name}"
        names[f"lora_unet_{name.replace('.', '_')}"] = path
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            hit = table.get(".".join(parts[:cut]))
            if hit is not None:
                dname = ".".join([hit[0], *parts[cut:]])
                names[f"lora_unet_{dname.replace('.', '_')}"] = path
                names[f"unet.{dname}"] = path
                break
    encoders = pipe.text_encoders
    prefixes = (["lora_te", "lora_te1"], ["lora_te2"]) if len(encoders) > 1 else (["lora_te", "lora_te1"],)
    peft = ("text_encoder", "text_encoder_2")
    for i, enc in enumerate(encoders):
        for name, mod in enc.named_modules():
            if isinstance(mod, nn.Linear) and name.startswith("text_model."):
                path = f"text_encoders.{i}.{name}"
                for pre in prefixes[i]:
                    names[f"{pre}_{name.replace('.', '_')}"] = path
                names[f"{peft[i]}.{name}"] = path
                names[f"{peft[i]}.{name[len('text_model.'):]}"] = path  # transformers 5 names, no text_model
    return names


def _group(tensors: Mapping[str, Tensor], source: str) -> dict[str, dict[str, Tensor]]:
    """{file module name: {part: tensor}} (parts "down", "up", "alpha", "hada_w1_a", "lokr_w1", "diff",
    "dora_scale", "magnitude"...); keys of no known format are an error, and so are the Tucker-decomposed
    LyCORIS variants sfumato does not apply."""
    groups: dict[str, dict[str, Tensor]] = {}
    unknown, unsupported = [], []
    for key, t in tensors.items():
        m = _KOHYA.fullmatch(key)
        if m is not None:
            if m.group(3) in _UNSUPPORTED:
                unsupported.append(key)
            groups.setdefault(f"{m.group(1)}_{m.group(2)}", {})[_PART.get(m.group(3), m.group(3))] = t
            continue
        m = _PEFT.fullmatch(key)
        if m is not None:
            groups.setdefault(f"{m.group(1)}.{m.group(2)}", {})[_PART.get(m.group(3), m.group(3))] = t
            continue
        unknown.append(key)
    if unsupported:
        raise CheckpointError(f"{source}: {len(unsupported)} key(s) of LyCORIS variants sfumato does not apply "
                              f"(Tucker-decomposed LoHa/LoKr/LoCon: hada_t1/hada_t2, lokr_t2, lora_mid): "
                              f"{', '.join(sorted(unsupported)[:8])}")
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} key(s) of no LoRA format sfumato reads: "
                              f"{', '.join(sorted(unknown)[:8])}{' ...' if len(unknown) > 8 else ''}")
    if not groups:
        raise CheckpointError(f"{source}: no LoRA weights in the file")
    return groups


def _made_for(groups: Mapping[str, Mapping[str, Tensor]]) -> str | None:
    """The family a file's UNet cross-attention key/value LoRAs were made for, by their input width."""
    for name, parts in groups.items():
        if re.search(r"attn2[._]to_[kv]$", name) and "down" in parts:
            width = parts["down"].shape[1]
            return f"{_CONTEXT_FAMILY.get(width, 'another model')} (cross-attention width {width})"
    return None


def read_lora(pipe: Pipeline, source: str | os.PathLike | Mapping[str, Tensor], name: str | None = None) -> LoraFile:
    """Read a LoRA file (or state dict) and match every key to a module of ``pipe``'s model."""
    if isinstance(source, Mapping):
        path, tensors, label = None, dict(source), name or "lora"
    else:
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such LoRA file")
        from sfumato.weights.io import read_tensors

        tensors, label = read_tensors(path), name or path.stem
    where = str(path) if path is not None else label
    groups = _group(tensors, where)
    names = _module_names(pipe)
    modules = dict(pipe_modules(pipe))
    family = _made_for(groups)
    context = pipe.unet.cfg.context_dim
    if family is not None and f"width {context})" not in family:
        raise CheckpointError(f"{where}: this LoRA was made for {family}; the loaded model is "
                              f"{pipe.spec.family} (cross-attention width {context})")
    patches, unmatched, problems = [], [], []
    for fname, parts in sorted(groups.items()):
        target = names.get(fname)
        if target is None:
            unmatched.append(fname)
            continue
        part = "unet" if target.startswith("unet.") else "te"
        alpha = float(parts.pop("alpha")) if "alpha" in parts else None
        scale, peft_m = parts.pop("dora_scale", None), parts.pop("magnitude", None)
        kind = _kind(parts)
        if kind is None:
            problems.append(f"{fname}: an incomplete or mixed set of weights ({', '.join(sorted(parts))})")
            continue
        module = modules[target]
        bias = parts.pop("diff_b", None)
        shape = module.weight.shape
        dora = None if scale is None and peft_m is None else "a1111" if scale is not None else "peft"
        magnitude = None
        if dora is not None:
            found = scale if scale is not None else peft_m
            magnitude = _dora_magnitude(found, shape, peft=dora == "peft")
            if magnitude is None:
                problems.append(f"{fname}: DoRA magnitude {tuple(found.shape)} does not fit the weight {tuple(shape)}")
                continue
        patch = LoraPatch(target, part, kind, parts, alpha, magnitude=magnitude, dora=dora)
        try:
            fits = tuple(patch.delta(shape).shape) == tuple(shape)
        except RuntimeError:
            fits = False
        if not fits or (kind == "lora" and parts["down"].ndim == 4 and module.weight.ndim == 4
                        and parts["down"].shape[2:] != shape[2:]):
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(parts.items()))
            problems.append(f"{fname}: {shapes} does not fit the weight {tuple(shape)}")
            continue
        patches.append(patch)
        if bias is not None:
            if getattr(module, "bias", None) is None or bias.shape != module.bias.shape:
                problems.append(f"{fname}: diff_b {tuple(bias.shape)} does not fit the module's bias")
                continue
            patches.append(LoraPatch(target, part, "full", {"diff": bias}, None, attr="bias"))
    if unmatched:
        raise CheckpointError(f"{where}: {len(unmatched)} LoRA module(s) match nothing in this "
                              f"{pipe.spec.family} model: {', '.join(unmatched[:8])}"
                              f"{' ...' if len(unmatched) > 8 else ''}")
    if problems:
        raise CheckpointError(f"{where}: this LoRA does not fit the {pipe.spec.family} model: "
                              + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
    return LoraFile(label, path, patches, addnet_hash(path) if path is not None else None)


_KINDS = {"lora": {"down", "up"}, "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, "full": {"diff"}}


def _kind(parts: Mapping[str, Tensor]) -> str | None:
    keys = set(parts) - {"diff_b"}
    for kind, need in _KINDS.items():
        if keys == need:
            return kind
    w1 = keys & {"lokr_w1", "lokr_w1_a", "lokr_w1_b"}
    w2 = keys & {"lokr_w2", "lokr_w2_a", "lokr_w2_b"}
    if keys == w1 | w2 and w1 in ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"}) and \
            w2 in ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"}):
        return "lokr"
    return None


def pipe_modules(pipe: Pipeline) -> Iterable[tuple[str, nn.Module]]:
    yield from ((f"unet.{n}", m) for n, m in pipe.unet.named_modules() if n)
    for i, enc in enumerate(pipe.text_encoders):
        yield from ((f"text_encoders.{i}.{n}", m) for n, m in enc.named_modules() if n)


# --- applying -------------------------------------------------------------------------------------------

def _state(pipe: Pipeline) -> LoraState:
    return pipe_state(pipe, "_lora", LoraState)


def _rebuild(pipe: Pipeline, targets: Iterable[tuple[str, str]], modules: Mapping[str, nn.Module]) -> None:
    """Set each (module, attr) in ``targets`` to its original + the updates of every loaded handle (in load
    order, each from the original, summed in fp32); a target no handle touches any more gets its original
    tensor back."""
    state = _state(pipe)
    targets = set(targets)
    touching: dict[tuple[str, str], list[tuple[LoraHandle, LoraPatch]]] = {t: [] for t in targets}
    for h in state.handles:
        for p in h.lora.patches:
            if (p.module, p.attr) in touching:
                touching[(p.module, p.attr)].append((h, p))
    for (path, attr), found in touching.items():
        module = modules[path]
        original = state.originals[(path, attr)]
        total, touched = None, bool(found)
        for h, p in found:
            w = h.unet_weight if p.part == "unet" else h.te_weight
            if w != 0.0:
                d = p.update(original, w)
                total = d if total is None else total + d
        if total is None:
            setattr(module, attr, nn.Parameter(original, requires_grad=False))
            if not touched:
                del state.originals[(path, attr)]
        else:
            new = (original.float() + total.to(original.device)).to(original.dtype)
            setattr(module, attr, nn.Parameter(new, requires_grad=False))


def load_lora(pipe: Pipeline, source: str | os.PathLike | Mapping[str, Tensor] | LoraFile,
              weight: float | tuple[float, float] = 1.0, *, name: str | None = None,
              from_prompt: bool = False) -> LoraHandle:
    """Apply a LoRA to ``pipe`` with ``weight`` (or ``(unet_weight, text_encoder_weight)``)."""
    unet_w, te_w = _weights(weight)
    lora = source if isinstance(source, LoraFile) else read_lora(pipe, source, name)
    state = _state(pipe)
    modules = dict(pipe_modules(pipe))
    for p in lora.patches:
        state.originals.setdefault((p.module, p.attr), getattr(modules[p.module], p.attr).data)
    handle = LoraHandle(lora, unet_w, te_w, from_prompt)
    state.handles.append(handle)
    _rebuild(pipe, ((p.module, p.attr) for p in lora.patches), modules)
    return handle


def unload_loras(pipe: Pipeline, handles: Iterable[LoraHandle] | None = None) -> None:
    """Remove ``handles`` (default: every loaded LoRA); weights no LoRA touches any more get their
    original tensors back."""
    state = _state(pipe)
    gone = list(state.handles) if handles is None else list(handles)
    for h in gone:
        if h not in state.handles:
            raise InvalidParameterError(f"LoRA {h.name!r} is not loaded on this pipeline")
    state.handles = [h for h in state.handles if h not in gone]
    _rebuild(pipe, ((p.module, p.attr) for h in gone for p in h.lora.patches), dict(pipe_modules(pipe)))


def _weights(weight: float | tuple[float, float]) -> tuple[float, float]:
    pair = tuple(weight) if isinstance(weight, (tuple, list)) else (weight, weight)
    if len(pair) != 2 or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w != w for w in pair):
        raise InvalidParameterError(f"LoRA weight must be a number or a (unet, text_encoder) pair, got {weight!r}")
    if any(abs(w) > 100 for w in pair):
        raise InvalidParameterError(f"LoRA weight {weight!r} is out of range: allowed [-100, 100]")
    return float(pair[0]), float(pair[1])


# --- <lora:name:weight> in prompts ----------------------------------------------------------------------

_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>")


@dataclass(frozen=True)
class LoraTag:
    name: str
    unet_weight: float
    te_weight: float


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """AUTOMATIC1111's ``<lora:name>``, ``<lora:name:w>``, ``<lora:name:te_w:unet_w>`` and named
    ``te=``/``unet=`` arguments: the prompt without the tags, and the tags (the same name twice: the last)."""
    tags: dict[str, LoraTag] = {}

    def take(m: re.Match) -> str:
        name, rest = m.group(1).strip(), [a for a in m.group(2).split(":")[1:]]
        positional, named = [], {}
        for a in rest:
            k, sep, v = a.partition("=")
            if sep:
                named[k.strip()] = v
            else:
                positional.append(a)
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise InvalidParameterError(f"prompt tag {m.group(0)!r}: weights must be numbers") from None
        tags[name] = LoraTag(name, unet, te)
        return ""

    return _TAG.sub(take, prompt), list(tags.values())


def find_lora(folder: str | os.PathLike | None, name: str) -> Path:
    """The LoRA file called ``name`` (file stem, or a path relative to the folder) under ``folder``."""
    if folder is None:
        raise InvalidParameterError(f"<lora:{name}> in the prompt needs a LoRA folder (lora_dir / --lora-dir)")
    root = Path(folder)
    direct = [root / f"{name}{ext}" for ext in ("", *LORA_EXTENSIONS)]
    hits = [p for p in direct if p.is_file()] or sorted(
        p for p in root.rglob("*") if p.suffix.lower() in LORA_EXTENSIONS and p.stem == name)
    if not hits:
        raise InvalidParameterError(f"<lora:{name}>: no {'/'.join(LORA_EXTENSIONS)} file named {name!r} in {root}")
    return hits[0]
