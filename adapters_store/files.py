"""Content-addressed artifact files under `<root>/artifacts/<hh>/<sha256>.safetensors`, written atomically.

A file is written to a temporary name in its final directory, fsynced, renamed into place and the directory
fsynced, so a crash leaves either no file or a complete one. Files are immutable once written; identical content
is stored once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".partial"


class ArtifactFiles:
    def __init__(self, root: Path) -> None:
        self.root = root / "artifacts"

    def path_for(self, file_sha256: str) -> Path:
        return self.root / file_sha256[:2] / f"{file_sha256}.safetensors"

    def write(self, payload: bytes) -> str:
        """Store `payload`; return its sha256 (the file's address)."""
        file_sha256 = hashlib.sha256(payload).hexdigest()
        target = self.path_for(file_sha256)
        if target.exists() and target.stat().st_size == len(payload):
            return file_sha256
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{file_sha256[:16]}.", suffix=TEMP_SUFFIX, dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        return file_sha256

    def read(self, file_sha256: str) -> bytes:
        return self.path_for(file_sha256).read_bytes()

    def all_files(self) -> list[Path]:
        return list(self.root.glob("*/*.safetensors")) if self.root.exists() else []

    def temp_files(self) -> list[Path]:
        return list(self.root.glob(f"*/.*{TEMP_SUFFIX}")) if self.root.exists() else []


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
