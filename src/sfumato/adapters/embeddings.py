"""Textual-inversion embeddings (Gal et al. 2022) as published, used by name in prompts.

Formats, by key:

- AUTOMATIC1111 ``.pt``: ``string_to_param`` -> ``{"*": (n, width)}`` (read by the restricted unpickler of
  :mod:`sfumato.weights.io`, never ``torch.load``); AUTOMATIC1111 ``.safetensors``: ``emb_params`` (n, width);
- diffusers ``learned_embeds``: one ``{token: (width,) or (n, width)}`` entry;
- SDXL: ``clip_l`` (n, 768) and ``clip_g`` (n, 1280), one per text encoder.

``pipe.load_embedding(path, token=None)`` adds the token (default: the file's stem, as AUTOMATIC1111
names embeddings) to this pipeline's own tokenizer with ``n`` ids (diffusers' ``token``, ``token_1`` ...),
and appends the vectors to each text encoder's token embedding; the token in a prompt stands for all
``n``. A width that does not fit a text encoder (an SD 1.x 768 embedding on SD 2.x's 1024) is refused with
both widths named. ``pipe.unload_embeddings()`` restores the tokenizer and the embedding tables.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sfumato.adapters import pipe_state
from sfumato.errors import CheckpointError, InvalidParameterError

if TYPE_CHECKING:
    from sfumato.pipeline import Pipeline

__all__ = ["Embedding", "add_token_rows", "read_embedding", "fit_embedding", "load_embedding", "unload_embeddings", "load_embedding_dir",
           "embedding_files", "survey_embeddings"]

_WIDTH_FAMILY = {768: "SD 1.x (CLIP ViT-L/14)", 1024: "SD 2.x (OpenCLIP ViT-H/14)", 1280: "SDXL's OpenCLIP bigG"}


@dataclass
class Embedding:
    """Vectors per text encoder width role: ``vectors[i]`` goes to text encoder ``i``."""

    token: str
    vectors: list[Tensor]
    path: Path | None
    hash: str | None  # AUTOMATIC1111's short hash: SHA-256 of the file, 12 hex digits


@dataclass
class EmbeddingState:
    loaded: list[Embedding] = field(default_factory=list)
    originals: list[Tensor] = field(default_factory=list)  # each encoder's token embedding before any
    tokenizer: object | None = None  # the pipeline's tokenizer before any


def _as_matrix(t: Tensor, what: str) -> Tensor:
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[0] < 1 or not t.is_floating_point():
        raise CheckpointError(f"{what}: an embedding is (vectors, width) floats, got {tuple(t.shape)} {t.dtype}")
    return t.float()


def read_embedding(path: str | os.PathLike) -> tuple[dict[str, Tensor], str | None]:
    """{"": (n, w)} for one-encoder files, {"clip_l": ..., "clip_g": ...} for SDXL pairs; and the token a
    diffusers file names (None for AUTOMATIC1111 files, which are named by their file)."""
    from sfumato.weights import io

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such embedding file")
    tensors = io.read_tensors(path)
    where = str(path)
    if "clip_l" in tensors or "clip_g" in tensors:
        if not {"clip_l", "clip_g"} <= set(tensors):
            raise CheckpointError(f"{where}: an SDXL embedding needs both clip_l and clip_g")
        return {k: _as_matrix(tensors[k], where) for k in ("clip_l", "clip_g")}, None
    if "emb_params" in tensors:
        return {"": _as_matrix(tensors["emb_params"], where)}, None
    params = [k for k in tensors if k.startswith("string_to_param.")]
    if params:
        if len(params) != 1:
            raise CheckpointError(f"{where}: {len(params)} string_to_param entries; one expected")
        return {"": _as_matrix(tensors[params[0]], where)}, None
    floats = [k for k, t in tensors.items() if t.is_floating_point()]
    if len(floats) == 1:
        return {"": _as_matrix(tensors[floats[0]], where)}, floats[0]
    raise CheckpointError(f"{where}: not a textual-inversion embedding (no string_to_param, emb_params, clip_l/"
                          f"clip_g or single learned_embeds entry; keys: {', '.join(sorted(tensors)[:8])})")


def _state(pipe: Pipeline) -> EmbeddingState:
    return pipe_state(pipe, "_embeddings", EmbeddingState)


def _token_table(encoder: nn.Module) -> nn.Embedding:
    return encoder.text_model.embeddings.token_embedding


def fit_embedding(found: dict[str, Tensor], widths: list[int], family: str, path: Path) -> list[Tensor]:
    """The vectors of :func:`read_embedding`'s ``found`` per text encoder of a model whose encoders have
    ``widths`` (token-embedding widths); raises naming what the file was made for when it does not fit."""
    if "" in found:
        if len(widths) != 1:
            raise InvalidParameterError(f"{path}: a one-encoder embedding ({_describe(found[''])}) cannot serve "
                                        f"this {family} model's {len(widths)} text encoders "
                                        f"(it needs a clip_l / clip_g pair)")
        vectors = [found[""]]
    else:
        if len(widths) != 2:
            raise InvalidParameterError(f"{path}: an SDXL clip_l/clip_g embedding does not fit this "
                                        f"{family} model ({len(widths)} text encoder)")
        vectors = [found["clip_l"], found["clip_g"]]
    for i, (v, w) in enumerate(zip(vectors, widths)):
        if v.shape[1] != w:
            raise InvalidParameterError(f"{path}: embedding width {v.shape[1]} (made for {_describe(v)}) does "
                                        f"not fit text encoder {i} of this {family} model (width {w})")
    if len({v.shape[0] for v in vectors}) != 1:
        raise CheckpointError(f"{path}: clip_l and clip_g hold different numbers of vectors")
    return vectors


def load_embedding(pipe: Pipeline, path: str | os.PathLike, token: str | None = None) -> Embedding:
    """Read an embedding file and make ``token`` (default: the file stem or the diffusers file's token)
    usable in ``pipe``'s prompts."""
    path = Path(path)
    found, named = read_embedding(path)
    token = token or named or path.stem
    encoders = pipe.text_encoders
    vectors = fit_embedding(found, [_token_table(e).weight.shape[1] for e in encoders], pipe.spec.family, path)
    add_token_rows(pipe, token, vectors)
    emb = Embedding(token, vectors, path, hashlib.sha256(path.read_bytes()).hexdigest()[:12])
    _state(pipe).loaded.append(emb)
    return emb


def add_token_rows(pipe: Pipeline, token: str, vectors: list[Tensor], *, trainable: bool = False) -> list[int]:
    """Give ``token`` ``len(vectors[i])`` new ids in ``pipe``'s own tokenizer (a copy; the shared one stays as
    it was) and append ``vectors[i]`` to text encoder ``i``'s token table; :func:`unload_embeddings` undoes
    it. ``trainable``: the tables become float32 parameters that take gradients (textual-inversion training).
    Returns the new ids."""
    encoders = pipe.text_encoders
    state = _state(pipe)
    if state.tokenizer is None:
        state.tokenizer = pipe.tokenizer
        state.originals = [_token_table(e).weight.data for e in encoders]
        pipe.tokenizer = copy.deepcopy(pipe.tokenizer)
    ids = pipe.tokenizer.add_tokens(token, vectors[0].shape[0])
    for e, v in zip(encoders, vectors):
        table = _token_table(e)
        if table.weight.shape[0] != ids[0]:
            raise InvalidParameterError(f"text encoder has {table.weight.shape[0]} token rows, tokenizer "
                                        f"{ids[0]}: the tables are out of step")
        w = table.weight.data
        rows = torch.cat([w, v.to(w.device, w.dtype)])
        table.weight = nn.Parameter(rows.float() if trainable else rows, requires_grad=trainable)
        table.num_embeddings = table.weight.shape[0]
    return ids


def _describe(v: Tensor) -> str:
    return _WIDTH_FAMILY.get(v.shape[1], f"a {v.shape[1]}-wide text encoder")


def unload_embeddings(pipe: Pipeline) -> None:
    """Forget every loaded embedding: the pipeline's tokenizer and token tables as they were loaded."""
    state = _state(pipe)
    if state.tokenizer is None:
        return
    pipe.tokenizer = state.tokenizer
    for e, w in zip(pipe.text_encoders, state.originals):
        table = _token_table(e)
        table.weight = nn.Parameter(w, requires_grad=False)
        table.num_embeddings = w.shape[0]
    pipe._embeddings = EmbeddingState()


def used_embeddings(pipe: Pipeline, prompts: list[str]) -> list[Embedding]:
    """The loaded embeddings whose token appears in any of ``prompts`` (for the infotext's ``TI hashes``)."""
    state = getattr(pipe, "_embeddings", None)
    if state is None:
        return []
    text = " ".join(p.lower() for p in prompts)
    return [e for e in state.loaded if e.token.lower() in text]


EMBEDDING_EXTENSIONS = (".pt", ".safetensors", ".bin")


def embedding_files(folder: str | os.PathLike | None) -> list[Path]:
    """Embedding files under ``folder`` (recursively, sorted), as :func:`load_embedding_dir` reads them."""
    if folder is None or not Path(folder).is_dir():
        return []
    return [p for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.suffix.lower() in EMBEDDING_EXTENSIONS]


def survey_embeddings(folder: str | os.PathLike | None, widths: list[int], family: str) -> tuple[dict, dict]:
    """AUTOMATIC1111's ``/sdapi/v1/embeddings`` answer for a model with text-encoder ``widths``, without
    loading it: {"loaded": {name: info}, "skipped": {name: info}}, info = {"step", "sd_checkpoint",
    "sd_checkpoint_name", "shape" (width), "vectors"}; a file that is no embedding is left out."""
    loaded, skipped = {}, {}
    for path in embedding_files(folder):
        try:
            found, _ = read_embedding(path)
        except CheckpointError:
            continue
        first = next(iter(found.values()))
        info = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": int(first.shape[1]),
                "vectors": int(first.shape[0])}
        try:
            fit_embedding(found, widths, family, path)
        except (CheckpointError, InvalidParameterError):
            skipped[path.stem] = info
        else:
            loaded[path.stem] = info
    return loaded, skipped


def load_embedding_dir(pipe: Pipeline, folder: str | os.PathLike) -> tuple[list[Embedding], dict[str, str]]:
    """Load every embedding file under ``folder`` that fits ``pipe`` (as AUTOMATIC1111 does at start-up):
    the loaded ones, and {file name: why} for those skipped (another family's width, not an embedding)."""
    loaded, skipped = [], {}
    for path in embedding_files(folder):
        try:
            loaded.append(load_embedding(pipe, path))
        except (CheckpointError, InvalidParameterError) as e:
            skipped[path.stem] = str(e)
    return loaded, skipped
