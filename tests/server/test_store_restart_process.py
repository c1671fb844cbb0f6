"""A real PostgreSQL restart under a real `reft-serve serve` process (the tiny model, on a PostgreSQL server of the
test's own): while the database is down, generation for personas the server has cached goes on, uploads are
refused with 503 and an OpenAI error body (never a 500, never a hang), and they work again once it is back;
every upload that was acknowledged (2xx) is there afterwards with the digest it was acknowledged with."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests import private_postgres
from tests.private_postgres import PrivatePostgres

from .conftest import artifact_bytes, persona
from .process import server_process

DOWN_S = 8.0  # long enough for several uploads to be refused (the pool waits up to 5 s for a connection)


@pytest.fixture
def database() -> Iterator[PrivatePostgres]:
    bin_dir = private_postgres.find_bin()
    if bin_dir is None:
        message = "no PostgreSQL binaries under /usr/lib/postgresql (install the `postgresql` package)"
        if private_postgres.required():
            pytest.fail(message)
        pytest.skip(message)
    server = PrivatePostgres(bin_dir)
    try:
        yield server
    finally:
        server.destroy()


@dataclass
class Outcomes:
    acknowledged: dict[str, str] = field(default_factory=dict)  # name -> digest of each 2xx upload
    refused: list[dict] = field(default_factory=list)  # the bodies of 503s
    unexpected: list[str] = field(default_factory=list)  # anything else: status and body
    replies: list[int] = field(default_factory=list)  # statuses of the chat requests on cached personas


def upload(client: httpx.Client, url: str, name: str, payload: bytes, outcomes: Outcomes) -> None:
    try:
        response = client.post(f"{url}/v1/interventions", data={"name": name},
                               files={"file": ("a.safetensors", payload)}, timeout=30)
    except httpx.HTTPError as exc:  # no answer at all is as wrong as a 500
        outcomes.unexpected.append(f"upload {name}: {exc!r}")
        return
    if response.status_code == 201:
        outcomes.acknowledged[name] = response.json()["digest"]
    elif response.status_code == 503:
        outcomes.refused.append(response.json())
    else:
        outcomes.unexpected.append(f"upload {name}: {response.status_code} {response.text[:300]}")


def chat(client: httpx.Client, url: str, model: str, outcomes: Outcomes) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    response = client.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    outcomes.replies.append(response.status_code)
    if response.status_code != 200:
        outcomes.unexpected.append(f"chat {model}: {response.status_code} {response.text[:300]}")


def test_a_postgres_restart_refuses_writes_keeps_serving_and_loses_nothing(
    database: PrivatePostgres, tiny_model_dir, tiny_base, tmp_path
) -> None:
    outcomes = Outcomes()
    with server_process(tiny_model_dir, tmp_path / "server", "--store", database.url,
                        "--set", "engine_process=false", ready_timeout=240) as (_, url), httpx.Client() as client:
        for seed, name in enumerate(("cached-a", "cached-b")):
            upload(client, url, name, artifact_bytes(tiny_base, persona(seed)), outcomes)
            chat(client, url, name, outcomes)  # resolved once: the server now has it cached
        assert set(outcomes.acknowledged) == {"cached-a", "cached-b"} and not outcomes.unexpected

        stop = threading.Event()

        def keep_uploading() -> None:
            with httpx.Client() as uploads:
                for i in range(10_000):
                    if stop.is_set():
                        return
                    upload(uploads, url, f"u{i}", artifact_bytes(tiny_base, persona(100 + i)), outcomes)

        uploader = threading.Thread(target=keep_uploading)
        uploader.start()
        try:
            time.sleep(1.0)
            database.stop()  # immediate: every connection dies mid-whatever, as in a crash
            down_until = time.monotonic() + DOWN_S
            replies_before = len(outcomes.replies)
            while time.monotonic() < down_until:
                for name in ("cached-a", "cached-b"):
                    chat(client, url, name, outcomes)
            assert len(outcomes.replies) > replies_before and set(outcomes.replies) == {200}, outcomes.unexpected
            refused_while_down = len(outcomes.refused)
            assert refused_while_down >= 1, "no upload was refused while the database was down"
            database.start()
            acknowledged_before = len(outcomes.acknowledged)
            deadline = time.monotonic() + 30
            while len(outcomes.acknowledged) < acknowledged_before + 3:  # writes work again after the restart
                assert time.monotonic() < deadline, f"uploads did not recover: {outcomes.refused[-1:]}"
                time.sleep(0.2)
        finally:
            stop.set()
            uploader.join(60)

        assert not outcomes.unexpected, outcomes.unexpected
        for body in outcomes.refused:  # OpenAI's error shape, with the store's code
            assert body["error"]["code"] == "store_unavailable" and body["error"]["type"] == "server_error", body
            assert body["error"]["message"]
        for name, digest in outcomes.acknowledged.items():  # every acknowledged upload survived the crash
            response = client.get(f"{url}/v1/interventions/{name}")
            assert response.status_code == 200 and response.json()["digest"] == digest, (name, response.text)
        listed = {item["name"] for item in client.get(f"{url}/v1/interventions").json()["data"]}
        assert set(outcomes.acknowledged) <= listed
        newest = max((n for n in outcomes.acknowledged if n.startswith("u")), key=lambda n: int(n[1:]))
        for name in ("cached-a", newest):  # a persona written after the restart resolves and generates
            chat(client, url, name, outcomes)
        assert outcomes.replies[-2:] == [200, 200]
