"""Damage a stored artifact on either backend, as a disk fault or a bad restore would (for corruption tests)."""

from __future__ import annotations

import os

from adapters_store import ArtifactStore
from adapters_store.local import LocalBackend


def corrupt_artifact(store: ArtifactStore, file_sha256: str) -> None:
    """Flip the last byte of the stored bytes at that address."""
    if isinstance(store.backend, LocalBackend):
        path = store.files.path_for(file_sha256)
        os.chmod(path, 0o644)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        return
    with store.backend.db.transaction() as cur:  # type: ignore[attr-defined]
        cur.execute("UPDATE blobs SET payload = overlay(payload placing "
                    "set_byte('\\x00'::bytea, 0, get_byte(payload, length(payload) - 1) # 255) "
                    "from length(payload)) WHERE file_sha256=%s", (file_sha256,))
