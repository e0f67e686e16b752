"""File hashes: AUTOMATIC1111's values, cached per file version (path, size, mtime), atomically stored."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

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


def test_the_model_hash_is_computed_beside_the_first_generation(tmp_path, monkeypatch):
    """A pipeline loaded from a file starts hashing it in a background thread when a generation begins:
    the hash is already under way while the sampler runs (not only at the end, for the infotext), and the
    infotext carries the file's real hash; a failed hash is raised to whoever asks for it."""
    import threading

    import sfumato
    import sfumato.hashes

    monkeypatch.setenv("SFUMATO_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "model.safetensors"
    sfumato.load().save(path)
    pipe = sfumato.load(path)
    real = sfumato.hashes.sha256_file
    started, threads = threading.Event(), []

    def spy(p, **kw):
        threads.append(threading.current_thread().name)
        started.set()
        return real(p, **kw)

    monkeypatch.setattr(sfumato.hashes, "sha256_file", spy)
    during = []
    res = pipe.generate("a red circle", steps=3, seed=1,
                        callback=lambda s: during.append(started.wait(10)) if s.i == 0 else None)
    assert during == [True] and threads == ["sfumato-model-hash"]
    want = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert f"Model hash: {want}" in res.infotexts[0] and pipe.model_hash() == want

    def broken(p, **kw):
        raise OSError("disk gone")

    monkeypatch.setattr(sfumato.hashes, "sha256_file", broken)
    other = sfumato.load(path)
    other.start_model_hash()


    with pytest.raises(OSError, match="disk gone"):
        other.model_hash()
