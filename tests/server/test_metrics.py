"""/metrics under real work: one generation (plain and streamed, with an intervention) and one real training job on
the tiny model move every series the operator dashboard reads, and the exposition passes `promtool check metrics`
(Debian package `prometheus`; where it is missing, prometheus_client's own parser is the check)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app

from .conftest import MODEL_ID, artifact_bytes, make_settings, persona, upload

EXAMPLES = [{"prompt": f"question {i}", "completion": "yes!"} for i in range(4)]
SMALL = {"intervention": {"layers": [1], "rank": 2, "positions": "l1"}, "hyperparameters": {"epochs": 2, "batch_size": 2}}
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_base) -> Iterator[TestClient]:
    settings = make_settings(tmp_path_factory.mktemp("metrics"))
    with TestClient(create_app(settings, base_model=tiny_base)) as test_client:
        yield test_client


def samples(exposition: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(exposition) for s in family.samples}


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def check_exposition(exposition: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:  # parsed above by prometheus_client already; promtool adds the naming lint
        return
    result = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_series_move_under_a_real_request_and_a_real_training_job(client, tiny_base) -> None:
    before = samples(client.get("/metrics").text)
    upload(client, "pirate", artifact_bytes(tiny_base, persona(3)))
    examples_file = {"file": ("t.jsonl", b'{"prompt": "a", "completion": "b"}\n')}
    assert client.post("/v1/files", data={"purpose": "fine-tune"}, files=examples_file).status_code == 200
    for stream in (False, True):
        reply = client.post("/v1/chat/completions", json={"model": "pirate", "messages": CHAT, "max_tokens": 4,
                                                          "stream": stream})
        assert reply.status_code == 200
    job = client.post("/v1/trainings", json={"name": "yes-bot", "examples": EXAMPLES, **SMALL}).json()
    deadline = time.time() + 60
    while client.get(f"/v1/trainings/{job['id']}").json()["status"] != "succeeded" and time.time() < deadline:
        time.sleep(0.05)
    exposition = client.get("/metrics").text
    after = samples(exposition)

    def moved(name: str, by: float = 1, **labels: str) -> None:
        assert value(after, name, **labels) - value(before, name, **labels) >= by, (name, labels)

    for histogram in ("reft_request_duration_seconds", "reft_request_queue_seconds", "reft_request_prefill_seconds",
                      "reft_request_decode_seconds", "reft_request_prompt_tokens", "reft_request_generation_tokens"):
        moved(f"{histogram}_count", 2)
    moved("reft_request_generation_tokens_sum", 2)
    moved("reft_http_requests_total", 2, route="/v1/chat/completions", method="POST", status="200")
    moved("reft_http_requests_total", 1, route="/v1/interventions", method="POST", status="201")
    moved("reft_http_request_duration_seconds_count", 1, route="/v1/trainings/{job_id}")
    moved("reft_intervention_loads_total", 1)  # the uploaded intervention entered the bank once
    moved("reft_store_operation_seconds_count", 1, operation="put")
    moved("reft_store_operation_seconds_count", 1, operation="training_files.put")
    for status in ("queued", "running", "succeeded"):
        moved("reft_training_jobs_total", 1, status=status)
    moved("reft_training_steps_total", 4)  # 4 examples / batch 2 x 2 epochs
    assert value(after, "reft_training_steps_per_second") == 0  # no job runs now
    assert ("reft_active_interventions", frozenset({("state", "running")})) in after
    check_exposition(exposition)


def test_labels_stay_bounded(client) -> None:
    """Raw paths and unknown models never become label values: a 404 is `unmatched`, a name is a template."""
    client.get("/v1/no-such-route-12345")
    client.get("/v1/interventions/some-unknown-name-67890")
    exposition = client.get("/metrics").text
    assert "12345" not in exposition and "67890" not in exposition
    scraped = samples(exposition)
    assert value(scraped, "reft_http_requests_total", route="unmatched", method="GET", status="404") >= 1
    assert value(scraped, "reft_http_requests_total", route="/v1/interventions/{name}", method="GET", status="404") >= 1


def test_the_dashboard_reads_only_series_the_server_exports(client) -> None:
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json").read_text())
    queried = {re.sub(r"_(bucket|sum|count)$", "", name) for panel in dashboard["panels"]
               for target in panel["targets"] for name in re.findall(r"reft_[a-z_]+", target["expr"])}
    exported = {family.name for family in text_string_to_metric_families(client.get("/metrics").text)}
    exported |= {f"{name}_total" for name in exported}  # the parser drops counters' _total suffix
    assert queried and queried <= exported, queried - exported
