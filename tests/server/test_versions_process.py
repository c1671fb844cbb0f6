"""A real `reft-serve` process killed with SIGKILL while clients promote versions back and forth: after a restart
the name has exactly one current version, it is the last acknowledged promote or the one in flight, and it serves."""

from __future__ import annotations

import random
import threading
import time

import httpx

from reft_core.artifact import encode_artifact

from .conftest import persona
from .process import server_process
from .test_process_faults import FINGERPRINT

CHAT = [{"role": "user", "content": "hi"}]


class Promoter:
    """Promotes versions 1..3 of `p` in a loop; remembers the last acknowledged one and the one in flight."""

    def __init__(self, url: str, seed: int) -> None:
        self.url, self.rng = url, random.Random(seed)
        self.acknowledged: int | None = None
        self.in_flight: int | None = None
        self.promotes = 0
        self.refused: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while True:
                self.in_flight = self.rng.randrange(1, 4)
                try:
                    response = client.post(f"{self.url}/v1/interventions/p/versions/{self.in_flight}/promote")
                except httpx.HTTPError:
                    return  # the server was killed
                if response.status_code != 200:
                    self.refused.append(response.text)
                    continue
                self.acknowledged, self.promotes = response.json()["version"], self.promotes + 1


def greedy(client: httpx.Client, url: str, model: str) -> str:
    body = {"model": model, "messages": CHAT, "max_tokens": 4, "temperature": 0}
    response = client.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_sigkill_during_promotes_keeps_exactly_one_current_version(tiny_model_dir, tmp_path) -> None:
    data_dir = tmp_path / "data"
    with server_process(tiny_model_dir, data_dir) as (_, url):
        for version, seed in enumerate((4, 5, 6), start=1):
            files = {"file": ("a.safetensors", encode_artifact(persona(seed), FINGERPRINT)[0])}
            response = (httpx.post(f"{url}/v1/interventions", data={"name": "p"}, files=files) if version == 1
                        else httpx.put(f"{url}/v1/interventions/p", files=files))
            assert response.status_code in (200, 201) and response.json()["version"] == version
    expected: set[int] = set()
    for round_number in range(3):
        with server_process(tiny_model_dir, data_dir) as (process, url):
            check_one_current(url, expected)
            promoter = Promoter(url, seed=round_number)
            promoter.thread.start()
            time.sleep(0.3 + random.Random(round_number).random() * 0.7)
            process.kill()  # SIGKILL: no drain, no cleanup, possibly inside the promote's transaction
            process.wait(10)
            promoter.thread.join(10)
            assert promoter.promotes > 0 and not promoter.refused, promoter.refused[:3]
            expected = {v for v in (promoter.acknowledged, promoter.in_flight) if v is not None}
    with server_process(tiny_model_dir, data_dir) as (_, url):
        check_one_current(url, expected)


def check_one_current(url: str, expected: set[int]) -> None:
    with httpx.Client(timeout=30) as client:
        listed = client.get(f"{url}/v1/interventions/p/versions").json()
        current = [v["version"] for v in listed["data"] if v["current"]]
        assert len(current) == 1 and [v["version"] for v in listed["data"]] == [3, 2, 1]
        assert current[0] == listed["current_version"] == client.get(f"{url}/v1/interventions/p").json()["version"]
        assert not expected or current[0] in expected  # an acknowledged promote survives; nothing else appears
        assert greedy(client, url, "p") == greedy(client, url, f"p@{current[0]}")
