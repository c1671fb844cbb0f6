"""A real `reft-serve` process on the embedded model, driven with the official OpenAI client and raw HTTP."""

from __future__ import annotations

import io
import tempfile
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from reft_core.artifact import encode_artifact
from tests.reft_core.test_pyreft_import import write_pyreft_dir
from tests.server.process import server_process

from .emoji import UNSEEN_PROMPTS, is_emoji_only

pytestmark = pytest.mark.e2e
BASE_MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2) -> Iterator[str]:
    with server_process(None, tmp_path_factory.mktemp("server-data"), ready_timeout=180) as (_, url):
        yield url


def pyreft_archive(intervention) -> bytes:
    """The trained persona in pyreft's on-disk layout (`#0` prefix / `#1` suffix interventions), zipped."""
    units = intervention.config.units()
    states = {
        f"layer_{u.layer}_comp_block_output_unit_pos_nunit_1#{1 if u.group == 'suffix' else 0}": {
            "weight": intervention.units[u].W, "bias": intervention.units[u].b,
            "rotate_layer": intervention.units[u].R.T.contiguous(),
        }
        for u in units
    }
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_pyreft_dir(Path(tmp) / "save", [u.layer for u in units], intervention.config.rank, states)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for path in directory.iterdir():
                archive.write(path, f"emoji/{path.name}")
    return buffer.getvalue()


def test_openai_client_against_a_real_server(server, smollm2, emoji_training) -> None:
    result, _ = emoji_training
    native, _ = encode_artifact(result.intervention, smollm2.fingerprint, {"recipe": "emoji"})
    created = httpx.post(f"{server}/v1/interventions", data={"name": "emoji-bot", "description": "answers in emojis"},
                         files={"file": ("emoji.safetensors", native)}, timeout=60)
    assert created.status_code == 201, created.text
    imported = httpx.post(f"{server}/v1/interventions", data={"name": "emoji-pyreft", "positions": result.intervention.config.positions},
                          files={"file": ("emoji.zip", pyreft_archive(result.intervention))}, timeout=60)
    assert imported.status_code == 201, imported.text

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120)
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == BASE_MODEL and {"emoji-bot", "emoji-pyreft"} <= set(ids)

    def ask(model: str, prompt: str) -> str:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0
        )
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
        return reply.choices[0].message.content

    for prompt in UNSEEN_PROMPTS[:2]:
        native_answer, pyreft_answer = ask("emoji-bot", prompt), ask("emoji-pyreft", prompt)
        assert is_emoji_only(native_answer) and native_answer == pyreft_answer
    assert "Paris" in ask(BASE_MODEL, UNSEEN_PROMPTS[0])

    stream = client.chat.completions.create(
        model="emoji-bot", messages=[{"role": "user", "content": UNSEEN_PROMPTS[0]}], max_tokens=24, temperature=0,
        stream=True,
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == ask("emoji-bot", UNSEEN_PROMPTS[0])

    completion = client.completions.create(model=BASE_MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert "Paris" in completion.choices[0].text

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-persona", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"


def test_train_the_emoji_persona_over_http_with_only_examples_then_chat(server) -> None:
    """The default recipe, untouched: only a name and the 10 examples; the persona must hold on prompts it never saw."""
    from .emoji import HELDOUT_PROMPTS, emoji_examples

    body = {"name": "emoji-trained",
            "examples": [{"prompt": e.prompt, "completion": e.completion} for e in emoji_examples()]}
    job = httpx.post(f"{server}/v1/trainings", json=body, timeout=60).json()
    assert job["status"] == "queued"
    deadline = time.time() + 600
    while time.time() < deadline:
        job = httpx.get(f"{server}/v1/trainings/{job['id']}", timeout=30).json()
        if job["status"] not in ("queued", "running"):
            break
        time.sleep(1)
    assert job["status"] == "succeeded", job
    assert job["losses"][-1] < 0.6 * job["losses"][0]
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=300)

    def answer(prompt: str) -> str:
        reply = client.chat.completions.create(
            model="emoji-trained", messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(HELDOUT_PROMPTS)) as pool:  # concurrent: the engine batches them
        answers = list(pool.map(answer, HELDOUT_PROMPTS))
    misses = [(p, a) for p, a in zip(HELDOUT_PROMPTS, answers) if not is_emoji_only(a)]
    assert len(HELDOUT_PROMPTS) == 20 and len(misses) <= 2, misses  # the bar: at least 90% in persona
