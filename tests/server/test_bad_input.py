"""The bad-input matrix: every malformed or hostile request gets a clear 4xx with an OpenAI-style error body, and
the server keeps answering (health and a real generation) after each one.

Unknown fields: the OpenAI-compatible generation endpoints ignore them (clients such as the OpenAI SDK send fields
we do not implement); reft-serve's own endpoints (trainings, admin) reject them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from reft_core.artifact import MANIFEST_KEY
from reft_core.config import InterventionConfig
from server.app import create_app
from tests.builders import documented, zip_of
from tests.reft_core.test_pyreft_import import loreft_states, write_pyreft_dir

from .conftest import MODEL_ID, artifact_bytes, make_settings, persona

CHAT = [{"role": "user", "content": "hi"}]
PWNED = Path("/tmp/reft-serve-pwned-marker")
MAX_REQUEST_BYTES = 64 * 1024
MAX_RANK = 4
MAX_FILE_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_base) -> Iterator[TestClient]:
    settings = make_settings(tmp_path_factory.mktemp("bad"), max_request_bytes=MAX_REQUEST_BYTES,
                             max_upload_bytes=256 * 1024, max_archive_unpacked_bytes=512 * 1024,
                             max_intervention_rank=MAX_RANK, max_file_bytes=MAX_FILE_BYTES)
    with TestClient(create_app(settings, base_model=tiny_base)) as test_client:
        test_client.base = tiny_base  # type: ignore[attr-defined]
        yield test_client


# -- payload builders ----------------------------------------------------------------------------------------------
def good_artifact(base) -> bytes:
    return artifact_bytes(base, persona(1))


def tampered_artifact(base, change: Callable[[dict[str, torch.Tensor]], None]) -> bytes:
    """A real artifact with one tensor changed and the manifest kept (so only the checks can catch it)."""
    payload = good_artifact(base)
    tensors = load_safetensors(payload)
    change(tensors)
    from safetensors import safe_open  # noqa: PLC0415 - only the metadata is needed here

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"reft-bad-{os.getpid()}.safetensors"
    path.write_bytes(payload)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    path.unlink()
    return save_safetensors(tensors, metadata={MANIFEST_KEY: metadata[MANIFEST_KEY]})


def first_key(tensors: dict) -> str:
    return sorted(tensors)[0]


def with_nan(tensors: dict) -> None:
    key = first_key(tensors)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")


def wrong_shape(tensors: dict) -> None:
    key = first_key(tensors)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])


def wrong_dtype(tensors: dict) -> None:
    key = first_key(tensors)
    tensors[key] = tensors[key].to(torch.int32)


class _Exploit:
    def __reduce__(self):  # noqa: ANN204 - what a malicious pickle does on load
        return (os.system, (f"touch {PWNED}",))


def pickle_archive(tmp: Path) -> bytes:
    config = InterventionConfig(layers=(1,), rank=2, positions="l1")
    states, _ = loreft_states(config)
    directory = write_pyreft_dir(tmp / "pyreft", [1], 2, states)
    members = {p.name: p.read_bytes() for p in directory.iterdir()}
    evil = next(name for name in members if name.startswith("intkey_"))
    members[evil] = pickle.dumps(_Exploit())
    return zip_of(members)


def pyreft_members(tmp: Path) -> dict[str, bytes]:
    """The files of a small valid pyreft save (one LoReFT layer, rank 2)."""
    config = InterventionConfig(layers=(1,), rank=2, positions="l1")
    states, _ = loreft_states(config)
    directory = write_pyreft_dir(tmp / "pyreft", [1], 2, states)
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def high_rank_artifact(base) -> bytes:
    return artifact_bytes(base, persona(1, InterventionConfig(layers=(0,), rank=MAX_RANK * 2, positions="l1")))


def high_rank_pyreft_archive(tmp: Path) -> bytes:
    config = InterventionConfig(layers=(1,), rank=MAX_RANK * 2, positions="l1")
    states, _ = loreft_states(config)
    directory = write_pyreft_dir(tmp / "pyreft", [1], MAX_RANK * 2, states)
    return zip_of({p.name: p.read_bytes() for p in directory.iterdir()})


def malformed_pickle_archive(tmp: Path) -> bytes:
    members = pyreft_members(tmp)
    members[next(name for name in members if name.startswith("intkey_"))] = b"\x80\x02."  # a pickle of nothing
    return zip_of(members)


def stored_zip(data: bytes) -> tuple[bytes, int]:
    """A zip whose config.json member is stored uncompressed; also the offset of that member's data."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("config.json", data)
    payload = buffer.getvalue()
    return payload, payload.index(data)


def zip_bad_crc() -> bytes:
    payload, offset = stored_zip(b'{"representations": []}')
    corrupt = bytearray(payload)
    corrupt[offset + 2] ^= 0x01  # the bytes no longer match the recorded CRC-32
    return bytes(corrupt)


def zip_broken_deflate() -> bytes:
    payload = zip_of({"config.json": json.dumps({"pad": list(range(2000))}).encode()})
    start = payload.index(b"config.json") + len("config.json")  # the local header's name, then deflate data
    corrupt = bytearray(payload)
    for i in range(start + 20, start + 60):
        corrupt[i] ^= 0x5A
    return bytes(corrupt)


def zip_patched_size() -> bytes:
    data = b'{"representations": []}'
    payload, offset = stored_zip(data)
    patched = bytearray(payload)
    for header, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size in both headers
        at = payload.index(header) + size_at
        patched[at:at + 4] = (len(data) - 10).to_bytes(4, "little")  # claims fewer bytes than it holds
    return bytes(patched)


def zip_bomb() -> bytes:
    return zip_of({"config.json": b"{}", "intkey_a.bin": b"\0" * (8 << 20)})  # 8 MiB of zeros, ~8 KiB zipped


def traversal_zip() -> bytes:
    return zip_of({"config.json": b"{}", "../../etc/evil.bin": b"x"})


def absolute_zip() -> bytes:
    return zip_of({"config.json": b"{}", "/etc/intkey_x.bin": b"x"})


def tar_with_symlink() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("intkey_link.bin")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(info)
    return buffer.getvalue()


def nested_json(depth: int) -> bytes:
    return b'{"model": "' + MODEL_ID.encode() + b'", "messages": ' + b"[" * depth + b"]" * depth + b"}"


# -- the matrix ----------------------------------------------------------------------------------------------------
# (id, method, path, request kwargs or a builder (client, tmp_path) -> kwargs, status, error type)
def chat(**fields) -> dict:
    return {"json": {"model": MODEL_ID, "messages": CHAT, **fields}}


def upload(name: str, payload: bytes | Callable, **form) -> Callable:
    def build(client: TestClient, tmp: Path) -> dict:
        data = payload(client.base) if callable(payload) else payload  # type: ignore[attr-defined]
        return {"data": {"name": name, **form}, "files": {"file": ("x.bin", data)}}

    return build


def archive_upload(make: Callable[[Path], bytes] | Callable[[], bytes], takes_tmp: bool = False) -> Callable:
    def build(client: TestClient, tmp: Path) -> dict:
        data = make(tmp) if takes_tmp else make()  # type: ignore[call-arg]
        return {"data": {"name": "archive", "positions": "l1"}, "files": {"file": ("a.zip", data)}}

    return build


INVALID = "invalid_request_error"
GOOD_JSONL = b'{"prompt": "a", "completion": "b"}\n'


def training_file(payload: bytes, purpose: str = "fine-tune") -> dict:
    return {"data": {"purpose": purpose}, "files": {"file": ("train.jsonl", payload)}}


def fine_tune(**fields) -> dict:
    return {"json": {"model": MODEL_ID, "training_file": "file-nope", **fields}}


CASES = [
    # generation: types, missing fields, ranges
    ("model-int", "POST", "/v1/chat/completions", {"json": {"model": 5, "messages": CHAT}}, 400, INVALID),
    ("messages-string", "POST", "/v1/chat/completions", {"json": {"model": MODEL_ID, "messages": "hi"}}, 400, INVALID),
    ("missing-model", "POST", "/v1/chat/completions", {"json": {"messages": CHAT}}, 400, INVALID),
    ("missing-messages", "POST", "/v1/chat/completions", {"json": {"model": MODEL_ID}}, 400, INVALID),
    ("empty-messages", "POST", "/v1/chat/completions", chat(messages=[]), 400, INVALID),
    ("max-tokens-negative", "POST", "/v1/chat/completions", chat(max_tokens=-5), 400, INVALID),
    ("max-tokens-zero", "POST", "/v1/chat/completions", chat(max_tokens=0), 400, INVALID),
    ("max-tokens-huge", "POST", "/v1/chat/completions", chat(max_tokens=10**12), 400, INVALID),
    ("max-tokens-string", "POST", "/v1/chat/completions", chat(max_tokens="ten"), 400, INVALID),
    ("temperature-high", "POST", "/v1/chat/completions", chat(temperature=5), 400, INVALID),
    ("temperature-negative", "POST", "/v1/chat/completions", chat(temperature=-0.1), 400, INVALID),
    ("temperature-nan-string", "POST", "/v1/chat/completions", chat(temperature="NaN"), 400, INVALID),
    ("top-p-zero", "POST", "/v1/chat/completions", chat(top_p=0), 400, INVALID),
    ("n-two", "POST", "/v1/chat/completions", chat(n=2), 400, INVALID),
    ("stream-not-bool", "POST", "/v1/chat/completions", chat(stream="maybe"), 400, INVALID),
    ("unknown-role", "POST", "/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "x"}]), 400, INVALID),
    ("content-null", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": None}]), 400, INVALID),
    ("too-many-stops", "POST", "/v1/chat/completions", chat(stop=[str(i) for i in range(10)]), 400, INVALID),
    ("prompt-beyond-context", "POST", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": "x" * 400}]), 400, INVALID),
    ("empty-text-prompt", "POST", "/v1/completions", {"json": {"model": MODEL_ID, "prompt": ""}}, 400, INVALID),
    ("token-ids-out-of-range", "POST", "/v1/completions", {"json": {"model": MODEL_ID, "prompt": [1, 99999]}}, 400,
     INVALID),
    ("unknown-model", "POST", "/v1/chat/completions", {"json": {"model": "nope", "messages": CHAT}}, 404,
     "not_found_error"),
    ("model-traversal", "POST", "/v1/chat/completions", {"json": {"model": "../../etc/passwd", "messages": CHAT}},
     404, "not_found_error"),
    ("model-deep-path", "POST", "/v1/chat/completions", {"json": {"model": "a/b/c", "messages": CHAT}}, 404,
     "not_found_error"),
    # version pins in `model`: malformed or unknown is a 404 like an unknown name, never a 500 or the base model
    ("model-version-text", "POST", "/v1/chat/completions", {"json": {"model": "x@abc", "messages": CHAT}}, 404,
     "not_found_error"),
    ("model-version-huge", "POST", "/v1/chat/completions", {"json": {"model": "x@" + "9" * 30, "messages": CHAT}},
     404, "not_found_error"),
    ("model-version-zero", "POST", "/v1/chat/completions", {"json": {"model": "x@0", "messages": CHAT}}, 404,
     "not_found_error"),
    ("model-version-negative", "POST", "/v1/completions", {"json": {"model": "x@-1", "prompt": "a"}}, 404,
     "not_found_error"),
    ("model-version-unicode-digit", "POST", "/v1/chat/completions", {"json": {"model": "x@١", "messages": CHAT}},
     404, "not_found_error"),
    ("model-double-at", "POST", "/v1/chat/completions", {"json": {"model": "x@1@2", "messages": CHAT}}, 404,
     "not_found_error"),
    ("model-only-version", "POST", "/v1/chat/completions", {"json": {"model": "@1", "messages": CHAT}}, 404,
     "not_found_error"),
    ("model-base-pinned", "POST", "/v1/chat/completions", {"json": {"model": f"{MODEL_ID}@1", "messages": CHAT}},
     404, "not_found_error"),
    ("model-owner-version-traversal", "POST", "/v1/chat/completions",
     {"json": {"model": "../x@1", "messages": CHAT}}, 404, "not_found_error"),
    # composed models (`a+b`): a part that does not resolve is a 404 like an unknown name (naming that part: tested
    # in test_composition), a malformed composition a 400
    ("composed-unknown", "POST", "/v1/chat/completions", {"json": {"model": "x+y", "messages": CHAT}}, 404,
     "not_found_error"),
    ("composed-bad-pin", "POST", "/v1/completions", {"json": {"model": "x@0+y", "prompt": "a"}}, 404,
     "not_found_error"),
    ("composed-five-parts", "POST", "/v1/chat/completions", {"json": {"model": "a+b+c+d+e", "messages": CHAT}}, 400,
     INVALID),
    ("composed-empty-part", "POST", "/v1/chat/completions", {"json": {"model": "a++b", "messages": CHAT}}, 400,
     INVALID),
    ("composed-trailing-plus", "POST", "/v1/chat/completions", {"json": {"model": "a+", "messages": CHAT}}, 400,
     INVALID),
    ("composed-base-model", "POST", "/v1/chat/completions", {"json": {"model": f"{MODEL_ID}+a", "messages": CHAT}},
     400, INVALID),
    ("composed-huge", "POST", "/v1/completions", {"json": {"model": "+".join(["a"] * 5000), "prompt": "a"}}, 400,
     INVALID),
    # version routes
    ("versions-unknown", "GET", "/v1/interventions/ghost/versions", {}, 404, "not_found_error"),
    ("versions-bad-name", "GET", "/v1/interventions/Ghost/versions", {}, 400, INVALID),
    ("versions-bad-owner", "GET", "/v1/interventions/ghost/versions?owner=..", {}, 400, INVALID),
    ("promote-unknown", "POST", "/v1/interventions/ghost/versions/1/promote", {}, 404, "not_found_error"),
    ("promote-version-text", "POST", "/v1/interventions/ghost/versions/one/promote", {}, 400, INVALID),
    ("promote-version-zero", "POST", "/v1/interventions/ghost/versions/0/promote", {}, 400, INVALID),
    ("promote-version-huge", "POST", "/v1/interventions/ghost/versions/" + "9" * 30 + "/promote", {}, 400, INVALID),
    ("promote-wrong-method", "GET", "/v1/interventions/ghost/versions/1/promote", {}, 405, INVALID),
    ("delete-version-unknown", "DELETE", "/v1/interventions/ghost/versions/1", {}, 404, "not_found_error"),
    ("delete-version-negative", "DELETE", "/v1/interventions/ghost/versions/-1", {}, 400, INVALID),
    ("delete-version-float", "DELETE", "/v1/interventions/ghost/versions/1.5", {}, 400, INVALID),
    ("artifact-version-text", "GET", "/v1/interventions/ghost/artifact?version=latest", {}, 400, INVALID),
    ("artifact-version-huge", "GET", "/v1/interventions/ghost/artifact?version=" + "9" * 30, {}, 400, INVALID),
    ("artifact-version-unknown", "GET", "/v1/interventions/ghost/artifact?version=2", {}, 404, "not_found_error"),
    ("record-version-zero", "GET", "/v1/interventions/ghost?version=0", {}, 400, INVALID),
    ("upload-replace-not-bool", "POST", "/v1/interventions", upload("x", good_artifact, replace="maybe"), 400, INVALID),
    # bodies that are not the JSON we want
    ("invalid-utf8", "POST", "/v1/chat/completions",
     {"content": b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
      "headers": {"content-type": "application/json"}}, 400, INVALID),
    ("not-json", "POST", "/v1/chat/completions", {"content": b"model=x", "headers": {"content-type": "application/json"}},
     400, INVALID),
    ("json-array", "POST", "/v1/chat/completions", {"json": [1, 2, 3]}, 400, INVALID),
    ("deeply-nested", "POST", "/v1/chat/completions",
     {"content": nested_json(20000), "headers": {"content-type": "application/json"}}, 400, INVALID),
    ("huge-json", "POST", "/v1/chat/completions",
     {"content": json.dumps({"model": MODEL_ID, "messages": CHAT, "pad": "x" * (2 * MAX_REQUEST_BYTES)}).encode(),
      "headers": {"content-type": "application/json"}}, 413, INVALID),
    ("lying-content-length", "POST", "/v1/chat/completions",
     {"content": b"{}", "headers": {"content-type": "application/json", "content-length": "abc"}}, 400, INVALID),
    # intervention names
    ("name-dotdot", "POST", "/v1/interventions", upload("../evil", good_artifact), 400, INVALID),
    ("name-absolute", "POST", "/v1/interventions", upload("/etc/passwd", good_artifact), 400, INVALID),
    ("name-control-char", "POST", "/v1/interventions", upload("bad\x01name", good_artifact), 400, INVALID),
    ("name-newline", "POST", "/v1/interventions", upload("name\n", good_artifact), 400, INVALID),
    ("name-rtl-override", "POST", "/v1/interventions", upload("abc\u202etxt", good_artifact), 400, INVALID),
    ("name-zero-width", "POST", "/v1/interventions", upload("a\u200bb", good_artifact), 400, INVALID),
    ("name-fullwidth", "POST", "/v1/interventions", upload("\uff41\uff42", good_artifact), 400, INVALID),
    ("name-too-long", "POST", "/v1/interventions", upload("a" * 65, good_artifact), 400, INVALID),
    ("name-uppercase", "POST", "/v1/interventions", upload("Emoji", good_artifact), 400, INVALID),
    # uploads that are not what they claim
    ("not-safetensors", "POST", "/v1/interventions", upload("x", b"#!/bin/sh\nrm -rf /\n"), 422, INVALID),
    ("empty-file", "POST", "/v1/interventions", upload("x", b""), 400, INVALID),
    ("safetensors-nan", "POST", "/v1/interventions", upload("x", lambda b: tampered_artifact(b, with_nan)), 422,
     INVALID),
    ("safetensors-wrong-shape", "POST", "/v1/interventions",
     upload("x", lambda b: tampered_artifact(b, wrong_shape)), 422, INVALID),
    ("safetensors-wrong-dtype", "POST", "/v1/interventions",
     upload("x", lambda b: tampered_artifact(b, wrong_dtype)), 422, INVALID),
    ("safetensors-truncated", "POST", "/v1/interventions", upload("x", lambda b: good_artifact(b)[:-7]), 422, INVALID),
    ("upload-rank-above-limit", "POST", "/v1/interventions", upload("x", high_rank_artifact), 400, INVALID),
    ("pyreft-rank-above-limit", "POST", "/v1/interventions",
     archive_upload(high_rank_pyreft_archive, takes_tmp=True), 400, INVALID),
    ("upload-too-large", "POST", "/v1/interventions", upload("x", b"\0" * (2 << 20)), 413, INVALID),
    ("pyreft-pickle-exploit", "POST", "/v1/interventions", archive_upload(pickle_archive, takes_tmp=True), 422,
     INVALID),
    ("pyreft-malformed-pickle", "POST", "/v1/interventions",
     archive_upload(malformed_pickle_archive, takes_tmp=True), 422, INVALID),
    ("zip-bad-crc", "POST", "/v1/interventions", archive_upload(zip_bad_crc), 422, INVALID),
    ("zip-broken-deflate", "POST", "/v1/interventions", archive_upload(zip_broken_deflate), 422, INVALID),
    ("zip-patched-size", "POST", "/v1/interventions", archive_upload(zip_patched_size), 422, INVALID),
    ("zip-bomb", "POST", "/v1/interventions", archive_upload(zip_bomb), 422, INVALID),
    ("zip-traversal", "POST", "/v1/interventions", archive_upload(traversal_zip), 422, INVALID),
    ("zip-absolute-member", "POST", "/v1/interventions", archive_upload(absolute_zip), 422, INVALID),
    ("tar-symlink", "POST", "/v1/interventions", archive_upload(tar_with_symlink), 422, INVALID),
    ("gzip-not-tar", "POST", "/v1/interventions", upload("x", gzip.compress(b"hello")), 422, INVALID),
    ("replace-unknown", "PUT", "/v1/interventions/ghost", upload("ghost", good_artifact), 404, "not_found_error"),
    # training jobs
    ("training-no-examples", "POST", "/v1/trainings", {"json": {"name": "t", "examples": []}}, 400, INVALID),
    ("training-empty-completion", "POST", "/v1/trainings",
     {"json": {"name": "t", "examples": [{"prompt": "a", "completion": ""}]}}, 400, INVALID),
    ("training-enormous-example", "POST", "/v1/trainings",
     {"json": {"name": "t", "examples": [{"prompt": "a" * 5000, "completion": "b"}]}}, 400, INVALID),
    ("training-rank-above-limit", "POST", "/v1/trainings",
     {"json": {"name": "t", "examples": [{"prompt": "a", "completion": "b"}], "intervention": {"rank": MAX_RANK + 1}}},
     400, INVALID),
    ("training-unknown-field", "POST", "/v1/trainings",
     {"json": {"name": "t", "examples": [{"prompt": "a", "completion": "b"}], "gpus": 8}}, 400, INVALID),
    ("training-epochs-negative", "POST", "/v1/trainings",
     {"json": {"name": "t", "examples": [{"prompt": "a", "completion": "b"}], "hyperparameters": {"epochs": -1}}},
     400, INVALID),
    ("training-bad-name", "POST", "/v1/trainings",
     {"json": {"name": "../t", "examples": [{"prompt": "a", "completion": "b"}]}}, 400, INVALID),
    ("training-replace-not-bool", "POST", "/v1/trainings",
     {"json": {"name": "t", "examples": [{"prompt": "a", "completion": "b"}], "replace": "maybe"}}, 400, INVALID),
    ("training-upload-replace-not-bool", "POST", "/v1/trainings/upload",
     {"data": {"name": "t", "replace": "maybe"}, "files": {"file": ("e.jsonl", b'{"prompt": "a", "completion": "b"}')}},
     400, INVALID),
    ("training-jsonl-garbage", "POST", "/v1/trainings/upload",
     {"data": {"name": "t"}, "files": {"file": ("e.jsonl", b"\x00\x01garbage")}}, 400, INVALID),
    ("training-unknown-job", "GET", "/v1/trainings/ftjob-nope", {}, 404, "not_found_error"),
    # training files (OpenAI's /v1/files)
    ("file-purpose-wrong", "POST", "/v1/files", training_file(GOOD_JSONL, purpose="assistants"), 400, INVALID),
    ("file-purpose-missing", "POST", "/v1/files", {"files": {"file": ("t.jsonl", GOOD_JSONL)}}, 400, INVALID),
    ("file-missing", "POST", "/v1/files", {"data": {"purpose": "fine-tune"}}, 400, INVALID),
    ("file-bad-line", "POST", "/v1/files", training_file(GOOD_JSONL + b'{"prompt": "a"}\n'), 400, INVALID),
    ("file-not-json", "POST", "/v1/files", training_file(b"prompt,completion\na,b\n"), 400, INVALID),
    ("file-not-utf8", "POST", "/v1/files", training_file(b"\xff\xfe\x00garbage"), 400, INVALID),
    ("file-empty", "POST", "/v1/files", training_file(b""), 400, INVALID),
    ("file-blank-lines-only", "POST", "/v1/files", training_file(b"\n\n  \n"), 400, INVALID),
    ("file-messages-without-answer", "POST", "/v1/files",
     training_file(b'{"messages": [{"role": "user", "content": "hi"}]}\n'), 400, INVALID),
    ("file-too-many-examples", "POST", "/v1/files", training_file(b'{"prompt":"a","completion":"b"}\n' * 1001), 400,
     INVALID),
    ("file-too-large", "POST", "/v1/files", training_file(GOOD_JSONL * (MAX_FILE_BYTES // len(GOOD_JSONL) + 1)), 413,
     INVALID),
    ("file-unknown", "GET", "/v1/files/file-nope", {}, 404, "not_found_error"),
    ("file-unknown-content", "GET", "/v1/files/file-nope/content", {}, 404, "not_found_error"),
    ("file-unknown-delete", "DELETE", "/v1/files/file-nope", {}, 404, "not_found_error"),
    ("files-limit-zero", "GET", "/v1/files?limit=0", {}, 400, INVALID),
    ("files-order-sideways", "GET", "/v1/files?order=sideways", {}, 400, INVALID),
    ("files-after-unknown", "GET", "/v1/files?after=file-nope", {}, 400, INVALID),
    # fine-tuning jobs (every refusal before a job exists; the file refusals name the parameter)
    ("ft-model-not-base", "POST", "/v1/fine_tuning/jobs", fine_tune(model="gpt-4o-mini"), 400, INVALID),
    ("ft-model-missing", "POST", "/v1/fine_tuning/jobs", {"json": {"training_file": "file-nope"}}, 400, INVALID),
    ("ft-training-file-missing", "POST", "/v1/fine_tuning/jobs", {"json": {"model": MODEL_ID}}, 400, INVALID),
    ("ft-training-file-unknown", "POST", "/v1/fine_tuning/jobs", fine_tune(), 400, INVALID),
    ("ft-validation-file-unknown", "POST", "/v1/fine_tuning/jobs", fine_tune(validation_file="file-nope"), 400,
     INVALID),
    ("ft-suffix-not-a-name", "POST", "/v1/fine_tuning/jobs", fine_tune(suffix="../Evil Name"), 400, INVALID),
    ("ft-method-dpo", "POST", "/v1/fine_tuning/jobs", fine_tune(method={"type": "dpo"}), 400, INVALID),
    ("ft-epochs-zero", "POST", "/v1/fine_tuning/jobs", fine_tune(hyperparameters={"n_epochs": 0}), 400, INVALID),
    ("ft-epochs-sometimes", "POST", "/v1/fine_tuning/jobs", fine_tune(hyperparameters={"n_epochs": "sometimes"}), 400,
     INVALID),
    ("ft-batch-size-float", "POST", "/v1/fine_tuning/jobs",
     fine_tune(method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 1.5}}}), 400, INVALID),
    ("ft-lr-multiplier-huge", "POST", "/v1/fine_tuning/jobs",
     fine_tune(hyperparameters={"learning_rate_multiplier": 1e9}), 400, INVALID),
    ("ft-hyperparameters-twice", "POST", "/v1/fine_tuning/jobs",
     fine_tune(hyperparameters={"n_epochs": 1},
               method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}), 400, INVALID),
    ("ft-seed-negative", "POST", "/v1/fine_tuning/jobs", fine_tune(seed=-1), 400, INVALID),
    ("ft-rank-zero", "POST", "/v1/fine_tuning/jobs", fine_tune(rank=0), 400, INVALID),
    ("ft-layers-empty", "POST", "/v1/fine_tuning/jobs", fine_tune(layers=[]), 400, INVALID),
    ("ft-metadata-not-strings", "POST", "/v1/fine_tuning/jobs", fine_tune(metadata={"a": 1}), 400, INVALID),
    ("ft-body-not-json", "POST", "/v1/fine_tuning/jobs",
     {"content": b"model=x", "headers": {"content-type": "application/json"}}, 400, INVALID),
    ("ft-jobs-limit-zero", "GET", "/v1/fine_tuning/jobs?limit=0", {}, 400, INVALID),
    ("ft-jobs-limit-huge", "GET", "/v1/fine_tuning/jobs?limit=101", {}, 400, INVALID),
    ("ft-jobs-after-unknown", "GET", "/v1/fine_tuning/jobs?after=ftjob-nope", {}, 400, INVALID),
    ("ft-job-unknown", "GET", "/v1/fine_tuning/jobs/ftjob-nope", {}, 404, "not_found_error"),
    ("ft-cancel-unknown", "POST", "/v1/fine_tuning/jobs/ftjob-nope/cancel", {}, 404, "not_found_error"),
    ("ft-events-unknown", "GET", "/v1/fine_tuning/jobs/ftjob-nope/events", {}, 404, "not_found_error"),
    ("ft-events-limit-text", "GET", "/v1/fine_tuning/jobs/ftjob-nope/events?limit=many", {}, 400, INVALID),
    ("ft-checkpoints-unknown", "GET", "/v1/fine_tuning/jobs/ftjob-nope/checkpoints", {}, 404, "not_found_error"),
    ("ft-checkpoints-limit-zero", "GET", "/v1/fine_tuning/jobs/ftjob-nope/checkpoints?limit=0", {}, 400, INVALID),
    ("ft-cancel-wrong-method", "GET", "/v1/fine_tuning/jobs/ftjob-nope/cancel", {}, 405, INVALID),
    # one model by its `model` string
    ("model-retrieve-unknown", "GET", "/v1/models/nope", {}, 404, "not_found_error"),
    ("model-retrieve-version-zero", "GET", "/v1/models/nope@0", {}, 404, "not_found_error"),
    ("model-retrieve-deep-path", "GET", "/v1/models/a/b/c", {}, 404, "not_found_error"),
    ("model-retrieve-uppercase", "GET", "/v1/models/Nope", {}, 404, "not_found_error"),
    ("model-delete-unknown", "DELETE", "/v1/models/nope", {}, 404, "not_found_error"),
    ("model-delete-version-unknown", "DELETE", "/v1/models/nope@1", {}, 404, "not_found_error"),
    ("model-delete-other-tenant", "DELETE", "/v1/models/acme/nope", {}, 404, "not_found_error"),
    ("model-delete-base", "DELETE", f"/v1/models/{MODEL_ID}", {}, 403, "permission_error"),
    ("training-validation-split-too-big", "POST", "/v1/trainings",
     {"json": {"name": "t", "examples": [{"prompt": "a", "completion": "b"}], "validation_split": 1.5}}, 400, INVALID),
    ("training-validation-split-leaves-nothing", "POST", "/v1/trainings",
     {"json": {"name": "t", "examples": [{"prompt": "a", "completion": "b"}], "validation_split": 0.5}}, 400, INVALID),
    ("training-validation-split-and-examples", "POST", "/v1/trainings",
     {"json": {"name": "t", "examples": [{"prompt": "a", "completion": "b"}] * 4, "validation_split": 0.5,
               "validation_examples": [{"prompt": "a", "completion": "b"}]}}, 400, INVALID),
    ("training-validation-example-empty", "POST", "/v1/trainings",
     {"json": {"name": "t", "examples": [{"prompt": "a", "completion": "b"}],
               "validation_examples": [{"prompt": "a", "completion": ""}]}}, 400, INVALID),
    ("training-nine-eval-prompts", "POST", "/v1/trainings",
     {"json": {"name": "t", "examples": [{"prompt": "a", "completion": "b"}], "eval_prompts": ["q"] * 9}}, 400, INVALID),
    ("training-eval-prompt-empty", "POST", "/v1/trainings",
     {"json": {"name": "t", "examples": [{"prompt": "a", "completion": "b"}], "eval_prompts": [""]}}, 400, INVALID),
    ("training-eval-prompt-too-long", "POST", "/v1/trainings",
     {"json": {"name": "t", "examples": [{"prompt": "a", "completion": "b"}], "eval_prompts": ["q" * 1900]}},
     400, INVALID),
    ("training-epochs-sometimes", "POST", "/v1/trainings",
     {"json": {"name": "t", "examples": [{"prompt": "a", "completion": "b"}], "hyperparameters": {"epochs": "sometimes"}}},
     400, INVALID),
    ("training-events-unknown-job", "GET", "/v1/trainings/ftjob-nope/events", {"headers": {"Last-Event-ID": "x"}},
     404, "not_found_error"),
    # the playground's static files: only what is under server/static, and errors in the API's shape
    ("playground-missing-file", "GET", "/playground/js/nothing.js", {}, 404, "not_found_error"),
    ("playground-dotdot", "GET", "/playground/%2e%2e/app.py", {}, 404, "not_found_error"),
    ("playground-encoded-slashes", "GET", "/playground/js%2f..%2f..%2fapp.py", {}, 404, "not_found_error"),
    ("playground-absolute", "GET", "/playground//etc/passwd", {}, 404, "not_found_error"),
    ("playground-post", "POST", "/playground/index.html", {"content": b"x"}, 405, INVALID),
    ("root-post", "POST", "/", {"content": b"x"}, 405, INVALID),
    ("unknown-route", "GET", "/v1/nothing-here", {}, 404, "not_found_error"),
    ("wrong-method", "DELETE", "/v1/chat/completions", {}, 405, INVALID),
]


def test_the_matrix_is_big_enough() -> None:
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id,method,path,kwargs,status,error_type", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_4xx_and_the_server_stays_healthy(
    client, tmp_path, case_id, method, path, kwargs, status, error_type
) -> None:
    PWNED.unlink(missing_ok=True)
    request = kwargs(client, tmp_path) if callable(kwargs) else kwargs
    response = client.request(method, path, **request)
    assert response.status_code == status, (case_id, response.status_code, response.text[:300])
    assert documented(client.get("/openapi.json").json(), method, path, status), "the OpenAPI schema omits it"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == error_type and body["error"]["message"]
    assert not PWNED.exists(), "an uploaded pickle executed code"
    # nothing was stored or queued by a refused request, and the server still works
    assert client.get("/v1/interventions").json()["data"] == []
    assert client.get("/v1/trainings").json()["data"] == []
    assert client.get("/v1/files").json()["data"] == []
    assert client.get("/health").json() == {"status": "ok"}
    reply = client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": CHAT, "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1


def test_a_rank_refusal_names_the_limit(client) -> None:
    response = client.post("/v1/interventions", data={"name": "wide"},
                           files={"file": ("x.bin", high_rank_artifact(client.base))})  # type: ignore[attr-defined]
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "rank_limit_exceeded"
    assert f"limit of {MAX_RANK} (max_intervention_rank)" in error["message"]
    assert client.get("/v1/interventions").json()["data"] == []
