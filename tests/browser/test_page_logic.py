"""The page's pure modules, run by the browser's own JavaScript engine: folding a training job's events (both
formats give the same state) and parsing server-sent events however the bytes are split into chunks."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .page import Page

pytestmark = [pytest.mark.browser, pytest.mark.e2e]
IN_BROWSER = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LOSS = st.floats(0.001, 20, allow_nan=False)


@st.composite
def jobs(draw) -> dict:
    """A job's history: epochs of steps with a loss each, maybe a validation loss per epoch, and how it ended."""
    epochs, per_epoch = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    total = epochs * per_epoch
    status = draw(st.sampled_from(["succeeded", "failed", "cancelled"]))
    steps = total if status == "succeeded" else draw(st.integers(0, total))
    return {"epochs": epochs, "per_epoch": per_epoch, "total": total, "status": status, "steps": steps,
            "snapshot": draw(st.sampled_from(["nested", "flat", "job"])),
            "losses": draw(st.lists(LOSS, min_size=steps, max_size=steps)),
            "validation": draw(st.one_of(st.none(), st.lists(LOSS, min_size=epochs, max_size=epochs)))}


def record_stream(job: dict) -> list[dict]:
    """The first format: the whole job record in every event (as the server sends today)."""
    record = {"object": "training.job", "id": "ftjob-1", "name": "p", "intervention": "p", "status": "queued",
              "spec": {"hyperparameters": {"epochs": job["epochs"]}}, "progress": {}, "losses": [], "error": None,
              "result_version": None}
    events = [dict(record)]
    record = {**record, "status": "running", "progress": {"step": 0, "total_steps": job["total"], "epoch": 0}}
    events.append(dict(record))
    for step, loss in enumerate(job["losses"], start=1):
        epoch = (step - 1) // job["per_epoch"] + 1
        record = {**record, "losses": job["losses"][:step], "progress": progress(job, step, epoch, loss)}
        if job["validation"] is not None and step % job["per_epoch"] == 0:
            record["validation_losses"] = job["validation"][:epoch]
        events.append(dict(record))
    events.append(final_fields(job, record))
    return events


def delta_stream(job: dict) -> list[dict]:
    """The second format: a snapshot, then typed deltas."""
    first = record_stream(job)[1]
    events = [{"nested": {"type": "snapshot", "job": first}, "flat": {"type": "snapshot", **first},
               "job": {"type": "job", **first}}[job["snapshot"]]]
    for step, loss in enumerate(job["losses"], start=1):
        epoch = (step - 1) // job["per_epoch"] + 1
        events.append({"type": "step", **progress(job, step, epoch, loss)})
        if step % job["per_epoch"] == 0:
            events.append({"type": "epoch", "epoch": epoch,
                           "validation_loss": None if job["validation"] is None else job["validation"][epoch - 1]})
    final = final_fields(job, {})
    events.append({"type": "status", **{k: final[k] for k in ("status", "error", "result_version")}})
    return events


def progress(job: dict, step: int, epoch: int, loss: float) -> dict:
    return {"step": step, "total_steps": job["total"], "epoch": epoch, "loss": loss, "elapsed_s": step * 0.5,
            "remaining_s": (job["total"] - step) * 0.5}


def final_fields(job: dict, record: dict) -> dict:
    return {**record, "status": job["status"], "error": "boom" if job["status"] == "failed" else None,
            "result_version": 1 if job["status"] == "succeeded" else None}


FOLD = """const [events] = args; let state = m.initialState();
          for (const event of events) state = m.applyEvent(state, event);
          return {state, series: m.plotSeries(state)};"""


@IN_BROWSER
@given(job=jobs())
def test_both_event_formats_fold_to_the_same_state(page: Page, job: dict) -> None:
    page.open()
    records = page.import_module("/playground/js/training_state.js", FOLD, record_stream(job))
    deltas = page.import_module("/playground/js/training_state.js", FOLD, delta_stream(job))
    assert records == deltas
    state = records["state"]
    assert state["losses"] == job["losses"] and state["status"] == job["status"]
    completed_epochs = job["steps"] // job["per_epoch"]
    expected = [] if job["validation"] is None else job["validation"][:completed_epochs]
    assert [p["loss"] for p in state["validation"]] == expected
    # the plot: a point per step, validation at the end of its epoch
    assert records["series"]["train"] == [[step, loss] for step, loss in enumerate(job["losses"], start=1)]
    assert [x for x, _ in records["series"]["validation"]] == [e * job["per_epoch"] for e in range(1, len(expected) + 1)]


def test_an_unknown_event_type_changes_nothing(page: Page) -> None:
    page.open()
    job = {"epochs": 1, "per_epoch": 2, "total": 2, "status": "succeeded", "steps": 2, "losses": [2.0, 1.0],
           "validation": None, "snapshot": "nested"}
    plain = page.import_module("/playground/js/training_state.js", FOLD, record_stream(job))
    noisy = record_stream(job)
    noisy.insert(2, {"type": "heartbeat", "status": "failed", "losses": []})
    assert page.import_module("/playground/js/training_state.js", FOLD, noisy) == plain


EVENTS = st.lists(st.fixed_dictionaries({
    "data": st.lists(st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12),
                     min_size=1, max_size=3),
    "id": st.one_of(st.none(), st.from_regex(r"[0-9]{1,4}", fullmatch=True)),
    "comment": st.booleans(),
}), min_size=1, max_size=6)


@IN_BROWSER
@given(events=EVENTS, cuts=st.lists(st.integers(0, 400), max_size=8), crlf=st.booleans())
def test_sse_parsing_does_not_depend_on_how_the_stream_is_chunked(page: Page, events, cuts, crlf) -> None:
    newline = "\r\n" if crlf else "\n"
    text, expected, last_id = "", [], None
    for event in events:
        if event["comment"]:
            text += f": keep-alive{newline}"
        if event["id"] is not None:
            text += f"id: {event['id']}{newline}"
            last_id = event["id"]
        text += "".join(f"data: {line}{newline}" for line in event["data"]) + newline
        expected.append({"id": last_id, "event": "message", "data": "\n".join(event["data"])})
    bounds = sorted({0, len(text), *[c for c in cuts if c < len(text)]})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    parsed = page.import_module("/playground/js/sse.js", """const [chunks] = args; const parser = new m.SSEParser();
        return chunks.flatMap((chunk) => parser.push(chunk));""", chunks)
    assert parsed == expected, json.dumps(chunks)
