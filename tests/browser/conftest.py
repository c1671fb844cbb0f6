"""Browser tests of the playground page: one real `reft-serve serve` process on the embedded SmolLM2 (auth on, a
tenant key in the page) and one headless Chromium, shared by every browser test and closed after the last one
(package scope: the rest of the suite does not carry their memory).

The browser is Debian's `chromium` + `chromium-driver` (`.ci/run` installs them). Without them these tests skip
locally, saying so, and fail where the browser is required (`CI` set, or REFT_REQUIRE_BROWSER=1). A failing test
leaves a screenshot, the page's text and the browser's console log in `test-artifacts/` (gitignored).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from selenium.webdriver.remote.webdriver import WebDriver

from tests.server.process import ROOT, server_process

from .page import Page, browser_required, missing_browser, safe_name, start_chromium

ARTIFACTS = ROOT / "test-artifacts"
ADMIN_KEY = "playground-admin-key"


@dataclass
class Playground:
    url: str
    key: str  # the tenant "studio"'s API key, what a user pastes into the page
    api: httpx.Client  # the same tenant, straight to the API (for reference answers)
    admin: httpx.Client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="package")
def driver() -> Iterator[WebDriver]:
    missing = missing_browser()
    if missing:
        message = (f"no browser for the playground tests ({', '.join(missing)} missing): "
                   "apt-get install chromium chromium-driver")
        if browser_required():
            pytest.fail(message)
        pytest.skip(message)
    browser = start_chromium()
    yield browser
    browser.quit()


@pytest.fixture(scope="package")
def playground(tmp_path_factory, driver) -> Iterator[Playground]:  # noqa: ARG001 - no server without a browser
    root = tmp_path_factory.mktemp("playground")
    key_file = root / "admin.key"
    key_file.write_text(ADMIN_KEY)
    # the first run ever converts the embedded GGUF model (~40 s on 2 cores): allow for it
    with server_process(None, root / "data", "--auth", "on", "--admin-key-file", str(key_file),
                        ready_timeout=240) as (_, url):
        with httpx.Client(base_url=url, headers=bearer(ADMIN_KEY), timeout=120) as admin:
            for tenant in ("studio", "guild"):
                assert admin.post("/v1/admin/tenants", json={"name": tenant}).status_code == 201
            key = admin.post("/v1/admin/tenants/studio/keys").json()["key"]
            with httpx.Client(base_url=url, headers=bearer(key), timeout=300) as api:
                yield Playground(url, key, api, admin)


@pytest.fixture(scope="package")
def page(driver, playground) -> Page:
    return Page(driver, playground.url, playground.key)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ARG001 - the hook's signature
    """On a failure, keep what the browser showed: a screenshot, the page's text and the console log."""
    outcome = yield
    report = outcome.get_result()
    browser: WebDriver | None = item.funcargs.get("driver") if hasattr(item, "funcargs") else None
    if browser is None and hasattr(item, "funcargs") and isinstance(item.funcargs.get("page"), Page):
        browser = item.funcargs["page"].driver
    if report.failed and report.when in ("setup", "call") and browser is not None:
        ARTIFACTS.mkdir(exist_ok=True)
        stem = str(ARTIFACTS / safe_name(item.nodeid))
        try:
            browser.save_screenshot(f"{stem}.png")
            Path(f"{stem}.txt").write_text(browser.execute_script("return document.body.innerText"))
            Path(f"{stem}.console.json").write_text(json.dumps(browser.get_log("browser"), indent=1))
        except Exception as exc:  # noqa: BLE001 - a dead browser must not hide the test's own failure
            report.sections.append(("screenshot", f"could not save the browser's state: {exc}"))
        else:
            report.sections.append(("screenshot", f"saved {stem}.png (and .txt, .console.json)"))
