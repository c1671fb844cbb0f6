"""Safe unpacking of uploaded pyreft archives (.zip or .tar.gz) into a private temporary directory.

Archives are hostile until checked: members with absolute paths, `..`, links or device files are refused, and
extraction writes only regular files, flattened to their base names, since a pyreft save is a flat directory.
Work is bounded while it happens, not after: members are read one at a time and counting stops at the member cap;
declared sizes are charged against the unpacked-bytes cap before a member is read, and a tar.gz's decompressed
stream is capped too (skipping a member still inflates it). Whatever reading the untrusted bytes raises (bad CRC,
broken deflate, truncated gzip, a lying header) becomes the typed 422, never a 500.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from server.errors import APIError
from server.settings import Settings

_ALLOWED_NAME = ("config.json",)
_ZIP_DIRECTORY_ENTRY = b"PK\x01\x02"  # signature of every central-directory record
_TAR_OVERHEAD_PER_MEMBER = 3 * 512  # a header block, a PAX/long-name block, and padding of the data


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


class _Budget:
    """What is left of an archive's allowance: members seen and (declared) unpacked bytes."""

    def __init__(self, settings: Settings) -> None:
        self.max_members, self.max_bytes = settings.max_archive_members, settings.max_archive_unpacked_bytes
        self.members, self.bytes = 0, 0

    def add_member(self, size: int) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise _refuse(f"more than {self.max_members} members")
        self.bytes += max(size, 0)
        if self.bytes > self.max_bytes:
            raise _refuse(f"unpacks to more than the {self.max_bytes} bytes allowed")


@contextmanager
def unpack_archive(payload: bytes, settings: Settings) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="reft-import-") as tmp:
        directory = Path(tmp)
        for target, data in _members(payload, _Budget(settings)):
            path = directory / target
            if path.exists():  # two members flatten to one name: which one pyreft meant is unknowable
                raise _refuse(f"two members are named {target!r}")
            path.write_bytes(data)
        yield directory


def _members(payload: bytes, budget: _Budget) -> Iterator[tuple[str, bytes]]:
    """(base name, bytes) of each member to extract; any failure to read the archive is the typed 422."""
    read = _zip_members if kind_of(payload) == "zip" else _tar_members
    try:
        yield from read(payload, budget)
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile/tarfile/zlib/gzip raise many types on hostile bytes
        raise _refuse(f"unreadable archive ({type(exc).__name__}: {str(exc)[:200]})") from None


def _zip_members(payload: bytes, budget: _Budget) -> Iterator[tuple[str, bytes]]:
    # ZipFile parses the whole central directory up front; counting its record signatures first (a fast byte scan,
    # never an undercount) refuses a directory of a million entries before any of them is parsed
    if payload.count(_ZIP_DIRECTORY_ENTRY) > budget.max_members:
        raise _refuse(f"more than {budget.max_members} members")
    archive = zipfile.ZipFile(io.BytesIO(payload))
    for info in archive.infolist():
        budget.add_member(info.file_size)
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise _refuse(f"member {info.filename[:100]!r} is a symbolic link")
        target = _checked_name(info.filename)
        if target is None:
            continue
        with archive.open(info) as handle:  # stops at the declared size; the CRC is checked at its end
            data = handle.read(info.file_size + 1)
        if len(data) != info.file_size:
            raise _refuse(f"member {info.filename[:100]!r} does not have its declared size")
        yield target, data


def _tar_members(payload: bytes, budget: _Budget) -> Iterator[tuple[str, bytes]]:
    limit = budget.max_bytes + (budget.max_members + 1) * _TAR_OVERHEAD_PER_MEMBER + tarfile.RECORDSIZE
    stream = _CappedReader(gzip.GzipFile(fileobj=io.BytesIO(payload)), limit)
    # "r|": a stream, one header at a time, so counting stops at the cap (getmembers() would parse them all)
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for info in archive:
            budget.add_member(info.size)
            if info.isdir():
                continue
            if not info.isfile():
                raise _refuse(f"member {info.name[:100]!r} is not a regular file")
            target = _checked_name(info.name)
            if target is None:
                continue
            handle = archive.extractfile(info)
            assert handle is not None  # a regular file always has data
            data = handle.read(info.size)
            if len(data) != info.size:
                raise _refuse(f"member {info.name[:100]!r} is truncated")
            yield target, data


class _CappedReader(io.RawIOBase):
    """A read-only stream that refuses to produce more than `limit` bytes (a gzip bomb stops there)."""

    def __init__(self, inner: BinaryIO, limit: int) -> None:
        super().__init__()
        self._inner, self._left = inner, limit

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        want = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        data = self._inner.read(want)
        self._left -= len(data)
        if self._left < 0:
            raise _refuse("decompresses to more than the unpacked size allowed")
        return data
