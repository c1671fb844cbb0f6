"""Composed personas over HTTP: `model: "a+b"` (pins allowed per part) in chat, streamed and not, and completions,
equal to the plain-hook reference that applies the parts in order; the order matters; an unknown part is a 404
that names it; the bank's size is exported."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.builders import composed_reference_generate

from .conftest import artifact_bytes, make_settings, persona, upload

CHAT = [{"role": "user", "content": "hello there"}]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base) -> Iterator[dict]:
    """`a` and `b` edit the same layers and positions; `a` has a second version."""
    a1, a2, b = persona(21), persona(22), persona(23)
    with TestClient(create_app(make_settings(tmp_path_factory.mktemp("compose")), base_model=tiny_base)) as client:
        upload(client, "a", artifact_bytes(tiny_base, a1))
        upload(client, "b", artifact_bytes(tiny_base, b))
        replaced = client.put("/v1/interventions/a", files={"file": ("a.safetensors", artifact_bytes(tiny_base, a2))})
        assert replaced.status_code == 200, replaced.text
        yield {"client": client, "base": tiny_base, "a@1": a1, "a": a2, "b": b}


def body(model: str, **extra) -> dict:
    return {"model": model, "messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, **extra}


def reference(world: dict, parts: list[str]) -> str:
    tok = world["base"].tokenizer
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tokens = composed_reference_generate(world["base"].model, ids, [world[p] for p in parts], MAX_TOKENS)
    return tok.decode(tokens, skip_special_tokens=True)


def chat(world: dict, model: str) -> str:
    response = world["client"].post("/v1/chat/completions", json=body(model))
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    return response.json()["choices"][0]["message"]["content"]


def streamed(world: dict, model: str) -> str:
    with world["client"].stream("POST", "/v1/chat/completions", json=body(model, stream=True)) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    chunks = [json.loads(line[len("data: "):]) for line in lines]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_composed_chat_equals_the_reference_streamed_and_not(world) -> None:
    expected = reference(world, ["a", "b"])
    assert chat(world, "a+b") == expected
    assert streamed(world, "a+b") == expected
    assert chat(world, "a@1+b") == streamed(world, "a@1+b") == reference(world, ["a@1", "b"])
    assert chat(world, "b+a") == reference(world, ["b", "a"]) != expected  # they overlap: order matters
    assert chat(world, "a") != expected  # b really applied


def test_an_unknown_part_is_a_404_naming_it(world) -> None:
    for model, part in (("a+ghost", "ghost"), ("a@9+b", "a@9"), ("b+a+Bad!", "Bad!")):
        response = world["client"].post("/v1/chat/completions", json=body(model))
        assert response.status_code == 404, response.text
        assert response.json()["error"]["message"] == f"The model '{part}' does not exist"


def test_bank_bytes_are_exported(world) -> None:
    chat(world, "a+b")
    metrics = world["client"].get("/metrics").text
    [line] = [line for line in metrics.splitlines() if line.startswith("reft_bank_bytes ")]
    assert float(line.split()[1]) > 0
