"""Archive unpacking: caps hold while streaming, and hostile bytes of any kind end as the typed 422."""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reft_core.config import InterventionConfig
from reft_core.pyreft_import import import_pyreft
from server.archives import unpack_archive
from server.errors import APIError, classify
from server.settings import Settings
from tests.builders import zip_of
from tests.reft_core.test_pyreft_import import loreft_states, write_pyreft_dir

SETTINGS = Settings(max_archive_members=256, max_archive_unpacked_bytes=512 * 1024)


def tar_gz(members: dict[str, bytes], **pax: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), dict(pax)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def many_empty_members_tar_gz(count: int) -> bytes:
    """A tar.gz of `count` empty members, built from one header block (tarfile would take seconds)."""
    header = tarfile.TarInfo("empty.txt").tobuf(format=tarfile.USTAR_FORMAT)
    return gzip.compress(header * count + b"\0" * tarfile.RECORDSIZE, compresslevel=1)


def unpack_status(payload: bytes) -> tuple[int, str]:
    try:
        with unpack_archive(payload, SETTINGS):
            return 200, ""
    except APIError as error:
        return error.status, error.message


def test_a_tar_gz_of_120000_members_stops_at_the_member_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = many_empty_members_tar_gz(120_000)
    headers_read = 0
    original = tarfile.TarFile.next

    def counting_next(self: tarfile.TarFile) -> tarfile.TarInfo | None:
        nonlocal headers_read
        headers_read += 1
        return original(self)

    monkeypatch.setattr(tarfile.TarFile, "next", counting_next)
    assert unpack_status(payload) == (422, "invalid pyreft archive: more than 256 members")
    assert headers_read <= SETTINGS.max_archive_members + 2  # parsing stopped at the cap, not after 120,000


def test_a_zip_directory_beyond_the_member_cap_is_refused_before_parsing(monkeypatch) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(300):
            archive.writestr(f"readme{index}.txt", b"")

    def no_parsing(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the central directory was parsed")

    monkeypatch.setattr(zipfile.ZipFile, "__init__", no_parsing)
    assert unpack_status(buffer.getvalue()) == (422, "invalid pyreft archive: more than 256 members")


def test_decompressed_bytes_are_capped_while_streaming() -> None:
    # a PAX header is not a member and has no size in the member table: only the stream cap sees its bytes
    payload = tar_gz({"config.json": b"{}"}, comment="x" * (2 << 20))
    assert len(payload) < 64 * 1024
    status, message = unpack_status(payload)
    assert status == 422 and "decompresses to more than" in message


# -- random mutations of valid archives ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pyreft_files(tmp_path_factory) -> dict[str, bytes]:
    config = InterventionConfig(layers=(1,), rank=2, positions="l1")
    states, _ = loreft_states(config)
    directory = write_pyreft_dir(tmp_path_factory.mktemp("save") / "pyreft", [1], 2, states)
    return {p.name: p.read_bytes() for p in directory.iterdir()}


MUTATIONS = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8)


@pytest.mark.parametrize("build", [zip_of, tar_gz], ids=["zip", "tar.gz"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=MUTATIONS, cut=st.none() | st.floats(0, 1))
def test_mutated_archives_import_or_give_the_typed_error(pyreft_files, build, mutations, cut) -> None:
    payload = bytearray(build(pyreft_files))
    for where, value in mutations:
        payload[int(where * len(payload))] = value
    if cut is not None:
        payload = payload[: int(cut * len(payload))]
    try:
        with unpack_archive(bytes(payload), SETTINGS) as directory:
            import_pyreft(Path(directory), positions="l1")
    except Exception as exc:  # noqa: BLE001 - the property: every failure is a typed 4xx, never anything else
        error = classify(exc)
        assert error is not None and 400 <= error.status < 500, f"{type(exc).__name__}: {exc}"
