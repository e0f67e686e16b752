"""File hashes as AUTOMATIC1111 shows them, computed once per file version.

The "Model hash" of an infotext is the first 10 hex digits of the checkpoint file's SHA-256: reading a
whole 2-7 GB file costs seconds on every ``sfumato generate``. ``sha256_file`` keeps each digest in
``<cache dir>/hashes.json`` keyed by the resolved path, size and modification time (AUTOMATIC1111 keeps
its ``cache.json`` the same way), so a file is hashed again only when it changes. The cache dir is
``$SFUMATO_CACHE_DIR``, else ``$XDG_CACHE_HOME/sfumato``, else ``~/.cache/sfumato``; an unreadable or
unwritable cache only costs the re-hash, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

__all__ = ["cache_dir", "legacy_model_hash", "sha256_file"]

_LOCK = threading.Lock()


def cache_dir() -> Path:
    if os.environ.get("SFUMATO_CACHE_DIR"):
        return Path(os.environ["SFUMATO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sfumato"


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _read(cache: Path) -> dict[str, str]:
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}


def _write(cache: Path, data: dict[str, str]) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".hashes-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(tmp, cache)  # atomic: a reader sees the old or the new file, never half of one
    except OSError:
        pass


def sha256_file(path: str | os.PathLike, *, use_cache: bool = True) -> str:
    """The file's SHA-256 as hex (AUTOMATIC1111's "Model hash" is its first 10 digits)."""
    path = Path(path)
    key = _key(path) if use_cache else ""
    cache = cache_dir() / "hashes.json"
    if use_cache:
        with _LOCK:
            hit = _read(cache).get(key)
        if hit is not None and len(hit) == 64:
            return hit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if use_cache:
        with _LOCK:
            data = _read(cache)
            data[key] = digest
            _write(cache, data)
    return digest


def legacy_model_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's old 8-hex model hash (``sd_models.model_hash``): SHA-256 of the 64 KiB at offset
    1 MiB, first 8 hex digits. Collides easily; shown because old infotexts carry it."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
