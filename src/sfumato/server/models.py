"""Checkpoints the server can name, and the loaded models a worker keeps within a memory budget.

``Registry`` lists checkpoints under AUTOMATIC1111-style titles (the file or folder name relative to
``--models-dir``; the ``--model`` given on the command line is always listed first). A name matches a
title, a file stem, or a title followed by `` [hash]`` as AUTOMATIC1111's own titles are written. Each
checkpoint's native image size and guidance scale (``ModelSpec.default_size``, ``default_cfg``) are detected
from its headers, without loading it, once per file (``Registry.default_size``, ``default_cfg``), so the web
page can default to them.

``ModelCache`` belongs to one worker (one device) and is used from its thread only: it loads on first use
and evicts the least recently used models while the sum of their parameter bytes exceeds the budget
(the model in use is never evicted, so one model larger than the budget still runs). It also gives each
pipeline the add-ons of :class:`AddonDirs`: the LoRA folder for ``<lora:name:w>`` tags, every embedding
of the embeddings folder that fits (re-read when the folder's files change) and the ControlNets a job
names (loaded once per model, their bytes counted with it).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from sfumato.errors import SfumatoError
from sfumato.params import model_cfg

log = logging.getLogger("sfumato.server")

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt")
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")


class UnknownNameError(SfumatoError):
    """A request named a model (or sampler...) the server does not have; the message lists the valid ones."""


@dataclass(frozen=True)
class Checkpoint:
    title: str  # AUTOMATIC1111's "title": what sd_model_checkpoint holds
    model_name: str  # the stem
    path: Path


class Registry:
    """The checkpoints on offer: ``default`` (``--model``, or the built-in model when it is installed)
    plus every checkpoint file or diffusers folder directly inside ``models_dir``."""

    def __init__(self, default: Path | None, models_dir: Path | None = None) -> None:
        self.default_path = default
        self.models_dir = models_dir
        self._lock = threading.Lock()
        self._items: list[Checkpoint] = []
        self._specs: dict[tuple[str, int], object] = {}  # (path, mtime_ns) -> ModelSpec, None: unknown
        self.refresh()

    def refresh(self) -> None:
        """Read ``models_dir`` again (what each file is, is detected when it is first listed)."""
        items: list[Checkpoint] = []
        if self.default_path is not None:
            items.append(_checkpoint(self.default_path, self.default_path.name))
        if self.models_dir is not None and self.models_dir.is_dir():
            for entry in sorted(self.models_dir.iterdir()):
                is_model = (entry.suffix in CHECKPOINT_SUFFIXES and entry.is_file()) or (
                    entry.is_dir() and (entry / "model_index.json").is_file())
                if is_model and all(c.path.resolve() != entry.resolve() for c in items):
                    items.append(_checkpoint(entry, entry.name))
        with self._lock:
            self._items = items

    def all(self) -> list[Checkpoint]:
        """Every checkpoint, models and upscalers."""
        with self._lock:
            return list(self._items)

    def list(self) -> list[Checkpoint]:
        """The models to generate with (every checkpoint but the upscalers)."""
        return [c for c in self.all() if not is_upscaler(self.spec(c))]

    def upscalers(self) -> list[Checkpoint]:
        """The SD x4 upscaler checkpoints, offered by their ``model_name`` (stem) as upscalers."""
        return [c for c in self.all() if is_upscaler(self.spec(c))]

    @property
    def default(self) -> Checkpoint | None:
        items = self.list()
        return items[0] if items else None

    def find(self, name: str | None, *, upscaler: bool = False) -> Checkpoint:
        """The model ``name`` names (None: the default), or with ``upscaler`` the upscaler (None: the
        first). Raises UnknownNameError listing the valid names."""
        items = self.upscalers() if upscaler else self.list()
        what = "upscaler model" if upscaler else "model"
        if name is None or name == "":
            if not items:
                raise UnknownNameError(f"no {what} is available: " + (
                    "put an SD x4 upscaler checkpoint in --models-dir" if upscaler else
                    "start the server with --model PATH (the built-in model is not installed)"))
            return items[0]
        key = _HASH_SUFFIX.sub("", str(name)).strip()
        for c in items:
            if key in (c.title, c.model_name, str(c.path)):
                return c
        valid = ", ".join(c.model_name if upscaler else c.title for c in items) or "(none)"
        others = self.list() if upscaler else self.upscalers()
        if any(key in (c.title, c.model_name, str(c.path)) for c in others):
            if upscaler:
                raise UnknownNameError(f"{name!r} is a model to generate with, not an upscaler; valid upscalers: "
                                       f"{valid}")
            raise UnknownNameError(f"{name!r} is an upscaler: use it as upscaler_1 / hr_upscaler or in an "
                                   f"\"upscale\" job; valid models: {valid}")
        raise UnknownNameError(f"unknown {what} {name!r}; valid: {valid}")

    def upscaler_names(self) -> dict[str, str]:
        """Every spelling an upscaler model answers to (its name, title or path) -> its name."""
        out: dict[str, str] = {}
        for c in self.upscalers():
            for key in (str(c.path), c.title, c.model_name):
                out[key] = c.model_name
        return out

    def spec(self, ckpt: Checkpoint):  # noqa: ANN201 - ModelSpec | None
        """``ckpt``'s :class:`~sfumato.config.ModelSpec` from its key names and shapes
        (``detect.detect_file``; no weights are read), detected once per file version; None when the file
        cannot be read or matches no known family (loading it would say why)."""
        from sfumato.weights.detect import detect_file

        try:
            key = (str(ckpt.path.resolve()), ckpt.path.stat().st_mtime_ns)
        except OSError:
            return None
        with self._lock:
            if key in self._specs:
                return self._specs[key]
        try:
            spec = detect_file(ckpt.path)
        except Exception as e:  # noqa: BLE001 - a listing must survive any unreadable or unknown file
            log.warning("cannot tell what %s is: %s", ckpt.path, e)
            spec = None
        with self._lock:
            self._specs[key] = spec
        return spec

    def default_size(self, ckpt: Checkpoint) -> int | None:
        """``ckpt``'s native width and height (``ModelSpec.default_size``), or None (see :meth:`spec`)."""
        spec = self.spec(ckpt)
        return None if spec is None else spec.default_size

    def default_cfg(self, ckpt: Checkpoint) -> float | None:
        """The guidance scale ``ckpt`` generates with when none is given (``ModelSpec.default_cfg``, else
        the generation default), or None when what the file is cannot be told (see :meth:`spec`)."""
        spec = self.spec(ckpt)
        return None if spec is None else model_cfg(spec)


def is_upscaler(spec) -> bool:  # noqa: ANN001 - a ModelSpec or None
    """Whether a checkpoint of ``spec`` is an SD x4 upscaler (the low-res image concatenated to the latent)."""
    return spec is not None and spec.concat == "low_res"


@dataclass(frozen=True)
class AddonDirs:
    """Folders of add-ons the server offers (None: none of that kind)."""

    lora: Path | None = None
    embeddings: Path | None = None
    controlnet: Path | None = None


def controlnet_files(folder: Path | None) -> dict[str, Path]:
    """ControlNets directly in ``folder``, by name: files by stem, diffusers folders (with config.json) by
    folder name."""
    if folder is None or not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix.lower() in CONTROLNET_SUFFIXES:
            out.setdefault(entry.stem, entry)
        elif entry.is_dir() and (entry / "config.json").is_file():
            out.setdefault(entry.name, entry)
    return out


def find_controlnet(folder: Path | None, name: str) -> Path:
    """The ControlNet ``name`` names (a name, or the extension's "name [hash]" title)."""
    if folder is None:
        raise UnknownNameError(f"ControlNet {name!r}: this server has no ControlNet folder (start it with "
                               "--controlnet-dir DIR)")
    files = controlnet_files(folder)
    key = _HASH_SUFFIX.sub("", name).strip()
    if key not in files:
        raise UnknownNameError(f"unknown ControlNet {name!r}; valid: {', '.join(files) or '(none)'}")
    return files[key]


def _embeddings_signature(folder: Path | None) -> tuple:
    """The embedding files of ``folder`` with their mtimes: a change means the embeddings must be reloaded."""
    from sfumato.adapters.embeddings import embedding_files

    return tuple((str(p), p.stat().st_mtime_ns) for p in embedding_files(folder))


def _checkpoint(path: Path, title: str) -> Checkpoint:
    stem = path.name if path.is_dir() else path.stem
    return Checkpoint(title=title, model_name=stem, path=path)


def pipeline_bytes(pipe) -> int:
    """Bytes of a pipeline's parameters and buffers (shared modules counted once)."""
    return modules_bytes(pipe.modules())


def modules_bytes(modules) -> int:
    """Bytes of the parameters and buffers of ``modules`` (a tensor shared between them counted once)."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


class ModelCache:
    """Loaded pipelines of one device, least recently used first, within ``budget`` bytes."""

    def __init__(self, device: str, dtype: str | None, budget: int, addons: AddonDirs | None = None,
                 memory=None) -> None:  # noqa: ANN001 - a sfumato.MemoryOptions for every pipeline it loads
        self.device, self.dtype, self.budget, self.memory = device, dtype, budget, memory
        self.addons = addons or AddonDirs()
        self._models: OrderedDict[tuple[str, ...], tuple[object, int]] = OrderedDict()
        self._embeddings: dict[int, tuple] = {}  # id(pipe) -> the embeddings folder's signature loaded
        self._controlnets: dict[tuple[int, str, int], object] = {}  # (id(pipe), path, mtime) -> ControlNet

    def get(self, ckpt: Checkpoint, *, share_with: Checkpoint | None = None, in_use: tuple = ()):
        """The pipeline of ``ckpt`` (loaded if needed). ``share_with``: load it as a refiner sharing the
        autoencoder and text encoders of that (already loaded) base model. ``in_use``: checkpoints the job
        also holds (never evicted for this one)."""
        import sfumato

        key = (str(ckpt.path),) if share_with is None else (str(ckpt.path), "refiner-of", str(share_with.path))
        held = {(str(c.path),) for c in in_use}
        if key in self._models:
            self._models.move_to_end(key)
            self._evict(keep={key, *held})
            pipe = self._models[key][0]
            self._sync_embeddings(pipe)
            return pipe
        share = self.get(share_with) if share_with is not None else None
        log.info("loading %s on %s", ckpt.path, self.device)
        pipe = sfumato.load(ckpt.path, device=self.device, dtype=self.dtype, share=share, memory=self.memory)
        pipe.lora_dir = self.addons.lora  # <lora:name:w> prompt tags
        self._sync_embeddings(pipe)
        self._models[key] = (pipe, pipeline_bytes(pipe))
        self._evict(keep={key, *held, (str(share_with.path),) if share_with is not None else key})
        return pipe

    def _sync_embeddings(self, pipe) -> None:
        """Load the embeddings folder into ``pipe`` (again, from scratch, when its files changed)."""
        from sfumato.adapters.embeddings import load_embedding_dir, unload_embeddings

        folder = self.addons.embeddings
        sig = _embeddings_signature(folder)
        if self._embeddings.get(id(pipe)) == sig:
            return
        unload_embeddings(pipe)
        if folder is not None and folder.is_dir():
            loaded, skipped = load_embedding_dir(pipe, folder)
            log.info("embeddings for %s: %d loaded, %d skipped", pipe.model_name, len(loaded), len(skipped))
        self._embeddings[id(pipe)] = sig

    def controlnet(self, pipe, name: str):
        """The ControlNet ``name`` (in the ControlNet folder) loaded for ``pipe``'s UNet, once per model."""
        path = find_controlnet(self.addons.controlnet, name)
        key = (id(pipe), str(path), path.stat().st_mtime_ns)
        if key not in self._controlnets:
            log.info("loading ControlNet %s for %s", path.name, pipe.model_name)
            self._controlnets = {k: v for k, v in self._controlnets.items() if k[:2] != key[:2]}  # a stale copy
            cn = pipe.load_controlnet(path)
            self._controlnets[key] = cn
            for k, (p, size) in self._models.items():
                if p is pipe:
                    self._models[k] = (p, size + modules_bytes([cn]))
        return self._controlnets[key]

    def _evict(self, keep: set[tuple[str, ...]]) -> None:
        while sum(size for _, size in self._models.values()) > self.budget:
            victim = next((k for k in self._models if k not in keep), None)
            if victim is None:
                break
            log.info("unloading %s (model memory budget %.1f GB)", victim[0], self.budget / 1e9)
            gone = id(self._models.pop(victim)[0])
            self._embeddings.pop(gone, None)
            self._controlnets = {k: v for k, v in self._controlnets.items() if k[0] != gone}
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def loaded(self) -> list[str]:
        return [k[0] for k in self._models]
