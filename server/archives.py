"""Safe unpacking of uploaded pyreft archives (.zip or .tar.gz) into a private temporary directory.

Archives are hostile until checked: members with absolute paths, `..`, links or device files are refused; the
member count and the total unpacked size are bounded before anything is extracted (zip bombs), and extraction
writes only regular files, flattened to their base names, since a pyreft save is a flat directory.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from server.errors import APIError
from server.settings import Settings

_ALLOWED_NAME = ("config.json",)
Member = tuple[str, int, Callable[[], bytes]]  # name, declared size, reader


def _refuse(message: str) -> APIError:
    return APIError(422, f"invalid pyreft archive: {message}", code="invalid_pyreft_archive", param="file")


def _checked_name(name: str) -> str | None:
    """The base name to extract to, None to skip (directories), or raise for dangerous paths."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or any(ord(c) < 32 for c in name):
        raise _refuse(f"member {name[:100]!r} has an unsafe path")
    if name.endswith("/"):
        return None
    base = path.name
    if base in _ALLOWED_NAME or (base.startswith("intkey_") and base.endswith(".bin")):
        return base
    return None  # other files (README, model cards) are ignored


def kind_of(payload: bytes) -> str:
    if payload[:4] == b"PK\x03\x04":
        return "zip"
    if payload[:2] == b"\x1f\x8b":
        return "tar.gz"
    return "unknown"


@contextmanager
def unpack_archive(payload: bytes, settings: Settings) -> Iterator[Path]:
    members = _zip_members(payload) if kind_of(payload) == "zip" else _tar_members(payload)
    if len(members) > settings.max_archive_members:
        raise _refuse(f"more than {settings.max_archive_members} members")
    total = sum(size for _, size, _ in members)
    if total > settings.max_archive_unpacked_bytes:
        raise _refuse(f"unpacks to {total} bytes, more than the {settings.max_archive_unpacked_bytes} allowed")
    with tempfile.TemporaryDirectory(prefix="reft-import-") as tmp:
        directory = Path(tmp)
        written = 0
        for name, _, read in members:
            target = _checked_name(name)
            if target is None:
                continue
            data = read()
            written += len(data)
            if written > settings.max_archive_unpacked_bytes:  # declared sizes can lie
                raise _refuse("unpacked size exceeds the limit")
            (directory / target).write_bytes(data)
        yield directory


def _zip_members(payload: bytes) -> list[Member]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(payload))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError) as exc:
        raise _refuse(f"not a readable zip file ({exc})") from None
    members = []
    for info in infos:
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise _refuse(f"member {info.filename[:100]!r} is a symbolic link")
        _checked_name(info.filename)

        def read(info: zipfile.ZipInfo = info) -> bytes:
            with archive.open(info) as handle:  # read at most declared size + 1 to catch lying headers
                data = handle.read(info.file_size + 1)
            if len(data) > info.file_size:
                raise _refuse(f"member {info.filename[:100]!r} is larger than declared")
            return data

        members.append((info.filename, info.file_size, read))
    return members


def _tar_members(payload: bytes) -> list[Member]:
    try:
        archive = tarfile.open(fileobj=io.BytesIO(payload), mode="r:*")
        infos = archive.getmembers()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise _refuse(f"not a readable .zip or .tar.gz file ({exc})") from None
    members = []
    for info in infos:
        if info.isdir():
            continue
        if not info.isfile():
            raise _refuse(f"member {info.name[:100]!r} is not a regular file")
        _checked_name(info.name)

        def read(info: tarfile.TarInfo = info) -> bytes:
            handle = archive.extractfile(info)
            assert handle is not None
            return handle.read(info.size)

        members.append((info.name, info.size, read))
    return members
