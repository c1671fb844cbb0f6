"""The playground in a real headless Chromium against a real server on the embedded SmolLM2 (auth on).

What a persona author does, checked against the API itself: the key flow (the API's 401 shows until a key is
given), chat with the base model and a persona side by side (each column's streamed text == the API's greedy
answer for that model), train from the emoji examples with a short recipe (the plot updates while it runs and
shows exactly the job's losses), then chat with the result; upload, version and delete an artifact; API errors
shown as the API's own message.
"""

from __future__ import annotations

import os
import shutil

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys

from reft_core.config import InterventionConfig
from tests.builders import artifact_for, zip_of
from tests.e2e.emoji import DATA as EMOJI_EXAMPLES
from tests.reft_core.test_pyreft_import import loreft_states, write_pyreft_dir
from tests.server.process import ROOT

from .conftest import ARTIFACTS, Playground
from .page import WINDOW, Page

pytestmark = [pytest.mark.browser, pytest.mark.e2e]
MAX_TOKENS = 12
PERSONA = InterventionConfig(layers=(8, 16), rank=2, positions="f1+l1")
SCREENSHOT_FOR_DOCS = ROOT / "docs" / "playground.png"


def reference_answer(playground: Playground, model: str, messages: list[dict]) -> str:
    """The API's own greedy answer, non-streamed: what a column must show for the same conversation."""
    response = playground.api.post("/v1/chat/completions", json={
        "model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def api_error(response) -> str:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    return response.json()["error"]["message"]


def columns(page: Page) -> list[dict]:
    return page.js("""return [...document.querySelectorAll('#columns .column')].map((c) => ({
        model: c.querySelector('input').value,
        answers: [...c.querySelectorAll('.msg.assistant')].map((m) => ({state: m.dataset.state,
                                                                       text: m.querySelector('.text').textContent}))}))""")


def send_greedy(page: Page, prompt: str | None = None) -> list[dict]:
    """Send `prompt` (default: what the prompt field holds) with Enter to every column (greedy, MAX_TOKENS) and wait
    until every column has answered."""
    page.open("chat")
    if not page.find("#greedy").is_selected():
        page.find("#greedy").click()
    page.fill("#max-tokens", str(MAX_TOKENS))
    before = [len(c["answers"]) for c in columns(page)]
    if prompt is not None:  # set, not typed: a typed newline would be an Enter
        page.js("document.getElementById('prompt').value = arguments[0]", prompt)
    page.find("#prompt").send_keys(Keys.ENTER)
    return page.wait(lambda: (lambda now: now if all(
        len(c["answers"]) > n and c["answers"][-1]["state"] in ("done", "error") for c, n in zip(now, before)) else None
    )(columns(page)), "every column to answer", timeout=120)


def test_without_a_key_the_api_error_shows_and_a_key_in_session_storage_fixes_it(page: Page, playground) -> None:
    page.driver.get(f"{playground.url}/")  # / redirects to the page
    page.js("sessionStorage.clear()")
    page.driver.get(f"{playground.url}/")
    assert page.driver.current_url.startswith(f"{playground.url}/playground/")
    message = api_error(playground.api.get("/v1/models", headers={"Authorization": ""}))
    shown = page.wait(lambda: page.find("#global-error").is_displayed() and page.find("#global-error").text, "a 401")
    assert shown.startswith(message) and "API key" in shown
    page.fill("#api-key", playground.key)
    page.find("#api-key").send_keys(Keys.ENTER)
    page.wait(lambda: not page.find("#global-error").is_displayed(), "the error to clear")
    page.wait(lambda: page.find("#base-model").text.startswith("base model:"), "the model list")
    assert page.session_key() == playground.key and playground.key not in page.driver.current_url
    page.driver.refresh()  # the key lives as long as the browser tab, not just the page
    page.wait(lambda: page.find("#base-model").text.startswith("base model:"), "the model list after a reload")
    assert page.find("#api-key").get_property("value") == playground.key


def test_chat_base_and_persona_side_by_side(page: Page, playground, smollm2) -> None:
    upload = playground.api.post("/v1/interventions", data={"name": "pirate"},
                                 files={"file": ("p.safetensors", artifact_for(smollm2.fingerprint, PERSONA, seed=5))})
    assert upload.status_code == 201, upload.text
    page.driver.get(f"{playground.url}/playground/")  # a fresh load picks the base model and the first persona
    page.open("chat")
    base = page.wait(lambda: [c["model"] for c in columns(page)] if len(columns(page)) == 2 and columns(page)[1]["model"]
                     else None, "two columns")[0]
    assert [c["model"] for c in columns(page)] == [base, "pirate"]
    # Shift+Enter is a newline in the prompt; Enter sends
    page.fill("#prompt", "Name a colour.")
    ActionChains(page.driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).send_keys("One word.").perform()
    assert page.find("#prompt").get_property("value") == "Name a colour.\nOne word." and not columns(page)[0]["answers"]
    prompt = page.find("#prompt").get_property("value")
    answered = send_greedy(page)
    assert page.find("#prompt").get_property("value") == ""
    for column in answered:
        assert column["answers"][-1]["state"] == "done"
        assert column["answers"][-1]["text"] == reference_answer(playground, column["model"], [{"role": "user", "content": prompt}])
        assert column["answers"][-1]["text"].strip()  # both columns fill
    # a second turn goes to each column with its own history
    second = send_greedy(page, "And another?")
    for column in second:
        history = [{"role": "user", "content": prompt}, {"role": "assistant", "content": column["answers"][0]["text"]},
                   {"role": "user", "content": "And another?"}]
        assert column["answers"][-1]["text"] == reference_answer(playground, column["model"], history)
    # an unknown model fails in its own column with the API's message; the other column still answers
    page.find("#new-chat").click()
    ghost = page.find_all("#columns .column input")[1]
    ghost.clear()
    ghost.send_keys("ghost")
    result = send_greedy(page, "hi")
    missing = api_error(playground.api.post("/v1/chat/completions", json={"model": "ghost", "messages": [{"role": "user", "content": "hi"}]}))
    assert result[1]["answers"][-1] == {"state": "error", "text": missing}
    assert result[0]["answers"][-1]["state"] == "done" and result[0]["answers"][-1]["text"].strip()


def test_train_from_the_emoji_examples_watch_the_plot_then_chat_with_it(page: Page, playground) -> None:
    page.open("train")
    page.fill("#train-name", "emoji-ui")
    page.find("#examples-file").send_keys(str(EMOJI_EXAMPLES))  # loads the file into the JSONL field
    page.wait(lambda: page.find("#examples-text").get_property("value").count("\n") >= 9, "the examples to load")
    page.wait(lambda: page.find("#epochs").get_property("value"), "the recipe defaults from the server")
    page.fill("#epochs", "2")
    page.find("#advanced summary").click()
    page.fill('[data-field="batch_size"]', "2")  # 5 steps an epoch: enough points to watch the plot grow
    page.find("#start-training").click()
    seen: set[int] = set()

    def finished() -> str | None:
        seen.add(int(page.find("#loss-plot").get_attribute("data-points") or 0))
        status = page.find("#job").get_attribute("data-status")
        return status if status in ("succeeded", "failed", "cancelled") else None

    assert page.wait(finished, "the training job to end", timeout=300, every=0.05) == "succeeded", page.text("#job")
    job = next(j for j in playground.api.get("/v1/trainings").json()["data"] if j["name"] == "emoji-ui")
    total = job["progress"]["total_steps"]
    assert job["status"] == "succeeded" and total == len(job["losses"]) == 10
    assert any(0 < n < total for n in seen) and max(seen) == total  # the plot grew while the job ran
    shown = [[page.text(td) for td in page.find_all("td", row)] for row in page.find_all("#loss-rows tr")]
    assert shown == [[str(step), f"{loss:.4f}"] for step, loss in enumerate(job["losses"], start=1)]
    validation = [[page.text(td) for td in page.find_all("td", row)] for row in page.find_all("#validation-rows tr")]
    assert len(validation) == len(job.get("validation_losses") or [])
    samples = [[page.text(td) for td in page.find_all("td", row)] for row in page.find_all("#sample-rows tr")]
    assert samples == [[s["prompt"], s["persona"], s["base"]] for s in (job.get("evaluation") or {}).get("samples", [])]
    assert page.find("#evaluation").is_displayed() == bool(samples)
    assert f"step {total} of {total}" in page.find("#job-progress-text").text
    assert plotted_pixels(page) > 200  # the training line is on the canvas, in its colour
    page.js("document.getElementById('job').scrollIntoView()")
    page.screenshot(ARTIFACTS / "playground-train.png")
    page.find("#chat-with-it").click()
    assert page.find("#chat-panel").is_displayed()
    assert [c["model"] for c in columns(page)][1] == "emoji-ui"
    answered = send_greedy(page, "Who are you?")
    for column in answered:
        assert column["answers"][-1]["text"] == reference_answer(playground, column["model"], [{"role": "user", "content": "Who are you?"}])
    page.driver.set_window_size(1280, 640)  # the README's picture: the two columns, without the empty space below
    try:
        page.screenshot(ARTIFACTS / "playground.png")
    finally:
        page.driver.set_window_size(*WINDOW)
    if os.environ.get("REFT_UPDATE_DOCS_SCREENSHOT") == "1":  # how docs/playground.png is made
        shutil.copyfile(ARTIFACTS / "playground.png", SCREENSHOT_FOR_DOCS)


def plotted_pixels(page: Page) -> int:
    """Canvas pixels in the training line's colour (its CSS custom property), within a small tolerance."""
    return page.js("""
        const canvas = document.getElementById('loss-plot');
        const probe = document.createElement('canvas').getContext('2d');
        probe.fillStyle = getComputedStyle(canvas).getPropertyValue('--plot-train').trim();
        probe.fillRect(0, 0, 1, 1);
        const [r, g, b] = probe.getImageData(0, 0, 1, 1).data;
        const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let count = 0;
        for (let i = 0; i < pixels.length; i += 4) {
          if (Math.abs(pixels[i] - r) + Math.abs(pixels[i + 1] - g) + Math.abs(pixels[i + 2] - b) < 30 && pixels[i + 3] > 200) count++;
        }
        return count;""")


def test_upload_version_and_delete_an_artifact(page: Page, playground, smollm2, tmp_path) -> None:
    shared = playground.admin.post("/v1/interventions", data={"name": "shanty"}, headers={"X-Reft-Tenant": "guild"},
                                   files={"file": ("s.safetensors", artifact_for(smollm2.fingerprint, PERSONA, seed=7))})
    assert shared.status_code == 201, shared.text
    assert playground.admin.put("/v1/admin/tenants/guild/interventions/shanty/public", json={"public": True}).status_code == 200
    page.open("manage")
    for version, seed in ((1, 11), (2, 12)):
        artifact = tmp_path / f"uploaded-{seed}.safetensors"
        artifact.write_bytes(artifact_for(smollm2.fingerprint, PERSONA, seed=seed))
        page.fill("#upload-name", "uploaded")
        page.fill("#upload-description", "made by the browser test")
        if (version == 2) != page.find("#upload-replace").is_selected():
            page.find("#upload-replace").click()
        page.find("#upload-file").send_keys(str(artifact))
        page.find("#upload").click()
        page.wait(lambda: page.find("#upload-status").text == f"uploaded uploaded (version {version})", f"upload {version}")
    record = playground.api.get("/v1/interventions/uploaded").json()
    row = page.wait(lambda: page.find_all('tr[data-id="uploaded"]'), "the uploaded row")[0]
    cells = [page.text(td) for td in page.find_all("td", row)]
    assert cells[:4] == ["uploaded", "made by the browser test", "loreft · rank 2 · layers 8, 16 · f1+l1", "v2"]
    assert record["version"] == 2 and record["config"]["layers"] == [8, 16]
    public = page.find('tr[data-id="guild/shanty"]')  # another tenant's public persona: listed, not deletable
    assert "(public, by guild)" in public.text and "Delete" not in public.text
    assert "uploaded" in page.js("return [...document.querySelectorAll('#model-options option')].map((o) => o.value)")
    # versions: both listed, roll back to v1
    next(b for b in page.find_all("button", row) if b.text == "Versions").click()
    versions = page.wait(lambda: page.find_all("tr[data-version]"), "the versions table")
    assert [v.get_attribute("data-version") for v in versions] == ["uploaded@2", "uploaded@1"]
    next(b for b in page.find_all("button", versions[1]) if b.text == "Promote").click()
    page.wait(lambda: page.find("#upload-status").text == "uploaded@1 is now current", "the promote")
    assert playground.api.get("/v1/interventions/uploaded/versions").json()["current_version"] == 1
    # delete asks first: dismissing keeps it, accepting deletes it
    for accept in (False, True):
        row = page.find('tr[data-id="uploaded"]')
        next(b for b in page.find_all("button", row) if b.text == "Delete").click()
        alert = page.driver.switch_to.alert
        assert "Delete uploaded" in alert.text
        alert.accept() if accept else alert.dismiss()
        if not accept:
            assert playground.api.get("/v1/interventions/uploaded").status_code == 200
    page.wait(lambda: not page.find_all('tr[data-id="uploaded"]'), "the row to go")
    assert playground.api.get("/v1/interventions/uploaded").status_code == 404
    # a zipped pyreft save, with the positions pyreft does not record
    states, _ = loreft_states(InterventionConfig(layers=(8,), rank=2, positions="l1"), seed=3,
                              hidden=smollm2.fingerprint.hidden_size)
    saved = write_pyreft_dir(tmp_path / "pyreft", [8], 2, states)
    archive = tmp_path / "persona.zip"
    archive.write_bytes(zip_of({p.name: p.read_bytes() for p in saved.iterdir()}))
    page.fill("#upload-name", "zipped")
    page.fill("#upload-positions", "l1")
    if page.find("#upload-replace").is_selected():
        page.find("#upload-replace").click()
    page.find("#upload-file").send_keys(str(archive))
    page.find("#upload").click()
    page.wait(lambda: page.find("#upload-status").text == "uploaded zipped (version 1)", "the pyreft upload")
    row = page.find('tr[data-id="zipped"]')
    assert [page.text(td) for td in page.find_all("td", row)][2] == "loreft · rank 2 · layers 8 · l1"
    assert playground.api.get("/v1/interventions/zipped").json()["source"] == "pyreft-import"


def test_a_running_training_can_be_cancelled(page: Page, playground) -> None:
    page.open("train")
    page.fill("#train-name", "endless")
    page.find('input[value="form"]').click()
    page.fill(".example-prompt", "hello")
    page.fill(".example-completion", "👋")
    page.fill("#epochs", "1000")
    page.find("#start-training").click()
    page.wait(lambda: page.find("#cancel-training").is_displayed(), "the job to show")
    page.find("#cancel-training").click()
    assert page.wait(lambda: page.find("#job").get_attribute("data-status") in ("cancelled", "succeeded", "failed")
                     and page.find("#job").get_attribute("data-status"), "the job to stop", timeout=120) == "cancelled"
    job = next(j for j in playground.api.get("/v1/trainings").json()["data"] if j["name"] == "endless")
    assert job["status"] == "cancelled" and not page.find("#cancel-training").is_displayed()
    assert playground.api.get("/v1/interventions/endless").status_code == 404


def test_api_errors_show_the_apis_own_message(page: Page, playground, tmp_path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not an artifact")
    expected = api_error(playground.api.post("/v1/interventions", data={"name": "broken"},
                                             files={"file": ("broken.safetensors", bad.read_bytes())}))
    page.open("manage")
    page.fill("#upload-name", "broken")
    page.fill("#upload-positions", "")  # what an earlier test may have left in the form
    if page.find("#upload-replace").is_selected():
        page.find("#upload-replace").click()
    page.find("#upload-file").send_keys(str(bad))
    page.find("#upload").click()
    assert page.wait(lambda: page.find("#manage-error").is_displayed() and page.find("#manage-error").text,
                     "the upload error") == expected
    # a training request the server refuses: its message, not a generic failure
    page.open("train")
    page.fill("#train-name", "Not A Name!")
    page.find('input[value="form"]').click()
    page.fill(".example-prompt", "hello")
    page.fill(".example-completion", "👋")
    page.find("#start-training").click()
    shown = page.wait(lambda: page.find("#train-error").is_displayed() and page.find("#train-error").text, "the error")
    body = {"name": "Not A Name!", "examples": [{"prompt": "hello", "completion": "👋"}]}
    assert shown == api_error(playground.api.post("/v1/trainings", json=body))


def test_labels_keyboard_dark_mode_and_a_phone_width(page: Page) -> None:
    page.open("chat")
    unnamed = page.js("""return [...document.querySelectorAll('input, select, textarea, button')]
        .filter((e) => e.type !== 'hidden' && !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                       && !(e.tagName === 'BUTTON' && e.textContent.trim()))
        .map((e) => e.outerHTML)""")
    assert unnamed == []  # every control has a label a screen reader can read
    # the base model and up to three personas: four columns at most, one at least
    while not page.find("#add-column").get_property("disabled"):
        page.find("#add-column").click()
    assert len(columns(page)) == 4
    for remove in page.find_all('#columns button[aria-label="Remove this column"]')[2:]:
        remove.click()
    assert len(columns(page)) == 2 and page.find("#add-column").is_enabled()
    # tabs follow the arrow keys
    page.find("#tab-chat").send_keys(Keys.ARROW_RIGHT)
    assert page.find("#tab-train").get_attribute("aria-selected") == "true" and page.find("#train-panel").is_displayed()
    page.find("#tab-train").send_keys(Keys.ARROW_LEFT)
    assert page.find("#chat-panel").is_displayed()
    # light and dark follow the system setting
    colours = {}
    for scheme in ("dark", "light"):
        page.driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                                    {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
        colours[scheme] = page.js("""const style = getComputedStyle(document.body);
            const lum = (c) => { const [r, g, b] = c.match(/\\d+/g).map(Number); return (0.2126*r + 0.7152*g + 0.0722*b) / 255; };
            return [lum(style.backgroundColor), lum(style.color)]""")
    assert colours["dark"][0] < 0.2 < 0.7 < colours["dark"][1] and colours["light"][1] < 0.2 < 0.7 < colours["light"][0]
    # a phone: nothing wider than the screen, the columns stacked
    page.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
        for tab in ("train", "manage", "chat"):
            page.find(f"#tab-{tab}").click()
            assert page.js("return document.documentElement.scrollWidth <= window.innerWidth"), tab
        lefts = page.js("return [...document.querySelectorAll('#columns .column')].map((c) => c.getBoundingClientRect().left)")
        assert len(lefts) >= 2 and len(set(lefts)) == 1
        page.screenshot(ARTIFACTS / "playground-phone.png")
    finally:
        page.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        page.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
