"""File hashes: AUTOMATIC1111's values, cached per file version (path, size, mtime), atomically stored."""

from __future__ import annotations

import hashlib
import json
import os

from sfumato.hashes import cache_dir, sha256_file


def test_sha256_is_cached_per_file_version(tmp_path, monkeypatch):
    monkeypatch.setenv("SFUMATO_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 3_000_000)
    want = hashlib.sha256(b"a" * 3_000_000).hexdigest()
    assert sha256_file(f) == want
    assert list(json.loads((cache_dir() / "hashes.json").read_text()).values()) == [want]

    # same size and mtime: the cached digest is used (the file is not read again)
    st = f.stat()
    f.write_bytes(b"b" * 3_000_000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_file(f) == want
    assert sha256_file(f, use_cache=False) == hashlib.sha256(b"b" * 3_000_000).hexdigest()
    # a new version of the file (mtime moves): hashed again
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert sha256_file(f) == hashlib.sha256(b"b" * 3_000_000).hexdigest()
    assert len(json.loads((cache_dir() / "hashes.json").read_text())) == 2


def test_a_broken_or_unwritable_cache_only_costs_the_rehash(tmp_path, monkeypatch):
    f = tmp_path / "m.ckpt"
    f.write_bytes(b"xyz")
    monkeypatch.setenv("SFUMATO_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "hashes.json").write_text("{not json")
    assert sha256_file(f) == hashlib.sha256(b"xyz").hexdigest()
    assert json.loads((tmp_path / "cache" / "hashes.json").read_text())  # rewritten, valid
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("SFUMATO_CACHE_DIR", str(blocked))
    assert sha256_file(f) == hashlib.sha256(b"xyz").hexdigest()
