"""Files written so that a crash or a power loss leaves the old content or the new, never a
partial one; the sha256 of a file; evotune's cache folder.

A foundation of ``trainer/``: it imports nothing of evotune.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk, where the OS can."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:                       # not openable as a directory here (some platforms)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` (or ``path`` itself) and every directory on the way, so
    that what a commit point (``state.json``) vouches for survives a power loss."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    for d in {f.parent for f in files} | ({path} if path.is_dir() else set()):
        fsync_dir(d)


def write_bytes_atomic(path: Path, write) -> None:
    """Atomic, durable write of a file whose content ``write(tmp_path)`` produces (e.g.
    ``np.savez``): a temp file in the same folder, fsync, rename, fsync of the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, rename over ``path``, then fsync the
    folder: a reader (or a resume after a crash or a power loss) sees the old file or the new
    one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes 0600 files; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def cache_root() -> Path:
    """evotune's cache folder: ``$EVOTUNE_CACHE``, else ``~/.cache/evotune`` (converted models,
    base-model features and pool tokens each have a subfolder)."""
    return Path(os.environ.get("EVOTUNE_CACHE") or Path.home() / ".cache" / "evotune").expanduser()


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
