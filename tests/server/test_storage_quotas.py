"""Storage quotas over HTTP: concurrent uploads cannot overshoot them, retained versions count, and the files of
deleted interventions and dropped versions do not stay on disk."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app

from .conftest import artifact_bytes, make_settings, persona, upload


def artifact_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "store" / "artifacts").glob("*/*"))


def stored_artifacts(client: TestClient) -> set[str]:
    """Addresses of every artifact the app's store keeps (files, or rows on PostgreSQL), referenced or not."""
    return client.app.state.services.store.blob_addresses()  # type: ignore[attr-defined]


@pytest.fixture
def quota_client(tmp_path, tiny_base) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, max_interventions_per_tenant=5, max_versions_per_intervention=3)
    with TestClient(create_app(settings, base_model=tiny_base)) as client:
        yield client


def test_24_concurrent_uploads_under_a_quota_of_5_store_exactly_5(quota_client, tiny_base, tmp_path) -> None:
    payloads = [artifact_bytes(tiny_base, persona(seed)) for seed in range(24)]
    statuses: list[int] = []
    start = threading.Barrier(len(payloads))

    def post(index: int) -> None:
        start.wait()
        response = quota_client.post("/v1/interventions", data={"name": f"n{index}"},
                                     files={"file": ("a.safetensors", payloads[index])})
        statuses.append(response.status_code)
        if response.status_code == 403:
            assert response.json()["error"]["code"] == "storage_quota_exceeded"

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [201] * 5 + [403] * 19
    assert len(quota_client.get("/v1/interventions").json()["data"]) == 5
    assert len(stored_artifacts(quota_client)) == 5


def test_replaces_and_a_delete_leave_no_unreferenced_file(quota_client, tiny_base, tmp_path) -> None:
    upload(quota_client, "p", artifact_bytes(tiny_base, persona(0)))
    for seed in range(1, 9):
        response = quota_client.put("/v1/interventions/p", files={"file": ("a.safetensors",
                                                                           artifact_bytes(tiny_base, persona(seed)))})
        assert response.status_code == 200 and response.json()["version"] == seed + 1
    assert len(stored_artifacts(quota_client)) == 3  # the retained versions only
    assert quota_client.delete("/v1/interventions/p").status_code == 200
    assert stored_artifacts(quota_client) == set()


def test_the_bytes_quota_counts_retained_versions(tmp_path, tiny_base) -> None:
    size = len(artifact_bytes(tiny_base, persona(0)))
    settings = make_settings(tmp_path, max_bytes_per_tenant=2 * size, max_versions_per_intervention=5)
    with TestClient(create_app(settings, base_model=tiny_base)) as client:
        upload(client, "p", artifact_bytes(tiny_base, persona(0)))
        files = {"file": ("a.safetensors", artifact_bytes(tiny_base, persona(1)))}
        assert client.put("/v1/interventions/p", files=files).status_code == 200
        refused = client.put("/v1/interventions/p", files={"file": ("a.safetensors",
                                                                     artifact_bytes(tiny_base, persona(2)))})
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "storage_quota_exceeded"
        assert client.get("/v1/interventions/p").json()["version"] == 2


def test_unreferenced_files_are_collected_at_start(tmp_path, tiny_base) -> None:
    settings = make_settings(tmp_path, store=None)  # files on disk: the local store
    with TestClient(create_app(settings, base_model=tiny_base)) as client:
        kept = upload(client, "kept", artifact_bytes(tiny_base, persona(0)))
    orphan = tmp_path / "data" / "store" / "artifacts" / "ab" / f"{'ab' * 32}.safetensors"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"left by a crash between a commit and the file's removal")
    with TestClient(create_app(settings, base_model=tiny_base)) as client:
        assert client.get("/v1/interventions/kept").json()["digest"] == kept["digest"]
        deadline = time.monotonic() + 10  # collected beside serving, not before it (100k files take seconds)
        while orphan.exists():
            assert time.monotonic() < deadline, "the unreferenced file was not removed after the start"
            time.sleep(0.05)
        assert len(artifact_files(tmp_path / "data")) == 1
