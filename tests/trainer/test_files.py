"""Atomic, durable file writes: the old content or the new, never a partial file."""

from __future__ import annotations

import json
import os

import pytest

from evotune.trainer import files as files_mod
from evotune.trainer.files import write_json_atomic


def test_write_json_atomic_writes_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "state.json"
    write_json_atomic(path, {"a": [1, 2], "b": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": [1, 2], "b": "é"}
    assert os.listdir(path.parent) == ["state.json"]


def test_write_json_atomic_uses_the_usual_file_mode(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "state.json"
    write_json_atomic(path, {})
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_json_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomic(path, {"round": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"round": 2, "bad": object()})
    assert json.loads(path.read_text()) == {"round": 1}
    assert os.listdir(tmp_path) == ["state.json"]


def test_write_json_atomic_failure_at_rename_keeps_old_file_and_removes_temp(tmp_path,
                                                                             monkeypatch):
    path = tmp_path / "state.json"
    write_json_atomic(path, {"round": 1})

    def fail(src, dst):
        raise OSError("disk gone")
    monkeypatch.setattr(files_mod.os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        write_json_atomic(path, {"round": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"round": 1}
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_writes_fsync_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real(fd)))
    write_json_atomic(tmp_path / "state.json", {"a": 1})
    assert str(tmp_path) in synced                      # the folder: the rename is durable
    assert any(p.startswith(str(tmp_path / ".state.json.")) for p in synced)   # the data


def test_file_hash_reads_every_block(tmp_path):
    # Over 1 MiB, so the file is read in more than one block; compared with one sha256 call.
    import hashlib
    data = bytes(range(256)) * 5000 + b"tail"
    path = tmp_path / "pool.jsonl"
    path.write_bytes(data)
    assert files_mod.file_hash(path) == hashlib.sha256(data).hexdigest()
