"""Durable file writes: every file fastskip writes (result tables, sweep parts,
manifests, caches) appears complete or not at all.

    with atomic_path("table.parquet") as tmp:
        write_something(tmp)          # to a temporary file in the same folder
    # now fsynced and renamed into place; on an exception the temporary is removed
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file or folder to disk (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path next to ``path``; when the block ends without an error the
    file written there is fsynced and renamed onto ``path`` (and the rename made
    durable), else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_path(path.parent)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))


def replace_folder(staging: Path, folder: Path) -> None:
    """Move a finished ``staging`` folder onto ``folder`` in one rename (an older
    ``folder`` is moved aside first and deleted), durably."""
    import shutil
    import tempfile

    fsync_path(staging)
    if folder.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(staging, folder)
    fsync_path(folder.parent)
