"""Test helpers shared across test modules (a module, not conftest.py imported as a library)."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from reft_core.artifact import encode_artifact
from reft_core.config import InterventionConfig
from reft_core.fingerprint import ModelFingerprint
from reft_core.functional import direft, loreft
from reft_core.hooks import editing_layers
from reft_core.intervention import Intervention, UnitWeights
from tests import tiny


def zip_of(members: dict[str, bytes]) -> bytes:
    """A deflated zip archive of `members` (name -> bytes), built in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def sse_events(lines: Iterable[str], *, until: Callable[[dict], bool] | None = None) -> list[dict]:
    """Server-sent events from a stream's lines: {"id", "data" (parsed JSON)} per event, {"comment"} per comment
    line. Stops after the first event for which `until` holds (a stream may stay open)."""
    events: list[dict] = []
    current: dict = {}
    for line in lines:
        if line.startswith(":"):
            events.append({"comment": line[1:].strip()})
            if until is not None and until(events[-1]):
                break
        elif line.startswith("id:"):
            current["id"] = int(line[3:].strip())
        elif line.startswith("data:"):
            current["data"] = json.loads(line[5:].strip())
        elif not line and current:
            events.append(current)
            if until is not None and until(current):
                break
            current = {}
    return events


def random_intervention(config: InterventionConfig, seed: int = 0, hidden: int = tiny.HIDDEN, scale: float = 1.0) -> Intervention:
    """Seeded random LoReFT weights for `config`: R with orthonormal rows, W and b normal times `scale`."""
    generator = torch.Generator().manual_seed(seed)
    units = {}
    for unit in config.units():
        q, _ = torch.linalg.qr(torch.randn(hidden, config.rank, generator=generator))
        units[unit] = UnitWeights(
            R=q.T.contiguous(),
            W=scale * torch.randn(config.rank, hidden, generator=generator),
            b=scale * torch.randn(config.rank, generator=generator),
        )
    return Intervention(config=config, hidden_size=hidden, units=units)


def artifact_for(fingerprint: ModelFingerprint, config: InterventionConfig, seed: int = 0, scale: float = 1.0) -> bytes:
    """The bytes of a valid `.safetensors` artifact of a random intervention for the model with `fingerprint`."""
    return encode_artifact(random_intervention(config, seed, fingerprint.hidden_size, scale), fingerprint)[0]


def composed_reference_logits(model: Any, ids: list[int], parts: list[Any], prompt_len: int | None = None) -> Any:
    """Logits [T, V] of one unpadded sequence with the interventions `parts` applied in order by plain hooks (the
    reference for composed personas, independent of the bank): at each layer each part in turn edits its prompt
    positions with the unfolded formula, reading what the parts before it wrote. `prompt_len` (default: all of
    `ids`) is where the prompt ends: generated tokens are never edited, as with `intervene_on_prompt`."""
    length = len(ids) if prompt_len is None else prompt_len

    def edit_for(layer: int) -> Callable[[Any], Any]:
        def edit(h: Any) -> Any:
            for part in parts:
                formula = direft if part.config.type == "direft" else loreft
                edited = h.clone()  # one intervention's edits all read the same input (as pyreft's do)
                for unit, weights in part.units.items():
                    if unit.layer == layer:
                        for p in part.config.positions_for(unit.group, length):
                            edited[0, p] = formula(h[0, p], *weights.as_tuple())
                h = edited
            return h

        return edit

    layers = {layer for part in parts for layer in part.config.layers}
    with torch.no_grad(), editing_layers(model, {layer: edit_for(layer) for layer in layers}):
        return model(input_ids=torch.tensor([ids])).logits[0]


def composed_reference_generate(model: Any, prompt: list[int], parts: list[Any], max_new_tokens: int) -> list[int]:
    """Greedy tokens under `parts` (composed_reference_logits), re-running the whole sequence each step (no cache)."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(composed_reference_logits(model, ids, parts, len(prompt))[-1].argmax()))
    return ids[len(prompt):]


def documented(schema: dict, method: str, path: str, status: int) -> bool:
    """Whether the OpenAPI `schema` lists `status` for the operation serving `method path` (True when no operation
    serves it: unknown routes and methods are not operations)."""
    import re

    bare = path.split("?")[0]
    for template, operations in schema["paths"].items():
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), bare) and method.lower() in operations:
            return str(status) in operations[method.lower()]["responses"]
    return True


T = TypeVar("T")


def all_at_once(count: int, work: Callable[[int], T]) -> list[T]:
    """`work(0)` ... `work(count - 1)`, each on its own thread, released together by a barrier so that they race;
    their results in index order (an exception in one is raised here)."""
    barrier = threading.Barrier(count)

    def run(index: int) -> T:
        barrier.wait()
        return work(index)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))
