"""Content-addressed artifact files under `<root>/artifacts/<hh>/<sha256>.safetensors`, written atomically.

A file's name is the sha256 of its bytes, so files are immutable once written and identical content is stored
once. Writes go through `reft_core.atomic_io` (temp file in the same directory, fsync, rename, fsync directory): a
crash leaves either no file or a complete one, plus at most a `*.partial` temp file that `gc` removes.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from reft_core.atomic_io import write_atomically

TEMP_SUFFIX = ".partial"
SUFFIX = ".safetensors"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256_hex(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class ArtifactFiles:
    def __init__(self, root: Path) -> None:
        self.root = root / "artifacts"

    def path_for(self, file_sha256: str) -> Path:
        assert _HEX64.fullmatch(file_sha256), file_sha256  # addresses come from our own index, never from users
        return self.root / file_sha256[:2] / f"{file_sha256}{SUFFIX}"

    def write(self, payload: bytes) -> str:
        """Store `payload` (or reuse an intact identical file); return its sha256, the file's address."""
        file_sha256 = sha256_hex(payload)
        target = self.path_for(file_sha256)
        if self._intact(target, file_sha256):
            return file_sha256
        # a copy that exists but fails its hash is corrupt: the rename below replaces it with good bytes
        self._make_dir(target.parent)
        write_atomically(target, payload, temp_suffix=TEMP_SUFFIX)
        return file_sha256

    def read(self, file_sha256: str) -> bytes:
        """The file's bytes, unchecked (raises FileNotFoundError); callers compare them to the address."""
        return self.path_for(file_sha256).read_bytes()

    def all_files(self) -> list[Path]:
        return sorted(self.root.glob(f"*/*{SUFFIX}")) if self.root.exists() else []

    def temp_files(self) -> list[Path]:
        return sorted(self.root.glob(f"*/.*{TEMP_SUFFIX}")) if self.root.exists() else []

    @staticmethod
    def _intact(path: Path, file_sha256: str) -> bool:
        try:
            return sha256_hex(path.read_bytes()) == file_sha256
        except FileNotFoundError:
            return False

    def _make_dir(self, directory: Path) -> None:
        """Create a shard directory durably: fsync its parent so the new entry survives a crash too."""
        if directory.is_dir():
            return
        directory.mkdir(parents=True, exist_ok=True)
        parent = os.open(directory.parent, os.O_RDONLY)
        try:
            os.fsync(parent)
        finally:
            os.close(parent)
