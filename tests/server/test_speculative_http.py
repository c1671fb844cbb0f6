"""Speculative decoding switched on through the server's settings: the same completions, streamed or not, and the
drafts show in /metrics."""

from __future__ import annotations

import json
import re

from fastapi.testclient import TestClient

from server.app import create_app

from .conftest import make_settings

BODY = {"prompt": "abcabcabcabcabc", "max_tokens": 40, "min_tokens": 40, "ignore_eos": True, "temperature": 0}


def completions(client: TestClient) -> tuple[str, str]:
    model = client.get("/v1/models").json()["data"][0]["id"]
    whole = client.post("/v1/completions", json={**BODY, "model": model})
    assert whole.status_code == 200, whole.text
    with client.stream("POST", "/v1/completions", json={**BODY, "model": model, "stream": True}) as stream:
        chunks = [json.loads(line[6:]) for line in stream.iter_lines()
                  if line.startswith("data: {")]
    return whole.json()["choices"][0]["text"], "".join(c["choices"][0]["text"] for c in chunks)


def test_speculative_setting_keeps_completions_and_reports_drafts(tmp_path, tiny_base) -> None:
    with TestClient(create_app(make_settings(tmp_path / "plain"), base_model=tiny_base)) as client:
        plain = completions(client)
    speculative = make_settings(tmp_path / "speculative", speculative_tokens=4, speculative_min_acceptance=0)
    with TestClient(create_app(speculative, base_model=tiny_base)) as client:
        assert completions(client) == plain
        metrics = client.get("/metrics").text
    drafted = float(re.search(r"^reft_speculative_draft_tokens_total (\S+)$", metrics, re.M).group(1))
    accepted = float(re.search(r"^reft_speculative_accepted_tokens_total (\S+)$", metrics, re.M).group(1))
    assert drafted >= accepted > 0
