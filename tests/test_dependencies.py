"""Installs that keep working: our calls into transformers raise no deprecation warnings, the pins in
constraints.txt satisfy pyproject's ranges and are what the tests run on, and the Docker images use them."""

from __future__ import annotations

import re
import tomllib
import warnings
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from reft_core.config import InterventionConfig
from reft_core.examples import TokenizedExample
from reft_core.generate import generate
from reft_core.trainer import TrainingConfig, train_intervention
from server.engine.engine import Engine
from server.engine.types import GenerationRequest, InterventionRef, SamplingParams
from tests import tiny
from tests.reft_core.conftest import random_intervention

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_our_calls_into_transformers_raise_no_deprecation_warning() -> None:
    model, tokenizer = tiny.tiny_llama(), tiny.tiny_tokenizer()
    persona = random_intervention(InterventionConfig(layers=(1, 2), rank=2, positions="f1+l1"), seed=1, scale=3.0)
    examples = [TokenizedExample((5, 6, 7, 8), (9, 10, 257)), TokenizedExample((1, 2, 3), (4, 257))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(model, [[5, 6, 7], [8, 9]], [persona, None], max_new_tokens=3, pad_token_id=257)
        train_intervention(model, InterventionConfig(layers=(1, 3), rank=2, positions="f1+l1"), examples,
                           TrainingConfig(epochs=2, batch_size=2))
        engine = Engine(model, tokenizer)
        requests = [GenerationRequest("a", (5, 6, 7), SamplingParams(max_tokens=3, temperature=0),
                                      InterventionRef("p", "k", persona)),
                    GenerationRequest("b", (1, 2), SamplingParams(max_tokens=3, temperature=0))]
        engine.run_until_idle((r, lambda event: None) for r in requests)
    deprecations = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecations, [f"{w.filename}:{w.lineno}: {w.message}" for w in deprecations]


def test_the_pins_satisfy_the_declared_ranges_and_are_what_we_test_on() -> None:
    pins = _pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + project["optional-dependencies"]["ray"]:
        requirement = Requirement(spec)
        name = requirement.name.lower().replace("_", "-")
        if name in pins:
            assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {spec}"
    for name in ("transformers", "fastapi", "uvicorn", "pydantic", "safetensors", "ray"):
        assert name in pins, f"{name} is not pinned"
        assert metadata.version(name) == pins[name], f"tests run on {name} {metadata.version(name)}, pin {pins[name]}"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_docker_images_install_with_the_constraints(dockerfile: str) -> None:
    text = (ROOT / "docker" / dockerfile).read_text()
    assert "COPY constraints.txt" in text
    installs = re.findall(r"pip3? install[^&\n]*", text)
    assert installs
    for command in installs:
        assert "-c constraints.txt" in command or "--no-deps" in command, command


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_docker_images_run_as_a_user_and_check_health(dockerfile: str) -> None:
    text = (ROOT / "docker" / dockerfile).read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert text.index("USER") < text.index("ENTRYPOINT")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, flags=re.MULTILINE), "no HEALTHCHECK on /health"
