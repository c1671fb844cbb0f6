"""Content-addressed artifact files under `<root>/artifacts/<hh>/<sha256>.safetensors`, written atomically.

Files are written atomically (reft_core.atomic_io), so a crash leaves either no file or a complete one. Files are
immutable once written; identical content is stored once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from reft_core.atomic_io import write_atomically

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
        write_atomically(target, payload, temp_suffix=TEMP_SUFFIX)
        return file_sha256

    def read(self, file_sha256: str) -> bytes:
        return self.path_for(file_sha256).read_bytes()

    def all_files(self) -> list[Path]:
        return list(self.root.glob("*/*.safetensors")) if self.root.exists() else []

    def temp_files(self) -> list[Path]:
        return list(self.root.glob(f"*/.*{TEMP_SUFFIX}")) if self.root.exists() else []


