"""The browser side of the playground tests: starting Debian's Chromium through its chromedriver, and a small
`Page` object with the waits and clicks the tests share (a module, not conftest.py imported as a library)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

CHROMIUM = Path(os.environ.get("REFT_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("REFT_CHROMEDRIVER", "/usr/bin/chromedriver"))
WINDOW = (1280, 900)
T = TypeVar("T")


def missing_browser() -> list[str]:
    """The browser binaries that are not installed (empty: the tests can run)."""
    return [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]


def browser_required() -> bool:
    """CI (which installs the browser in .ci/run) must run these tests, never skip them."""
    return bool(os.environ.get("CI")) or os.environ.get("REFT_REQUIRE_BROWSER") == "1"


def start_chromium() -> WebDriver:
    """Headless Chromium from the system packages. Naming chromedriver's path makes Selenium skip Selenium Manager,
    so nothing is ever downloaded; --no-sandbox because tests may run as root (CI does), where the sandbox refuses."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                     "--disable-extensions", "--lang=en-US", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@dataclass
class Page:
    driver: WebDriver
    url: str  # the server's base URL
    api_key: str

    def open(self, tab: str = "chat") -> None:
        """The page with the API key in this tab's session storage, on `tab`, once its model list has loaded."""
        if not self.driver.current_url.startswith(self.url) or self.session_key() != self.api_key:
            self.driver.get(f"{self.url}/playground/icon.svg")  # same origin, so the same sessionStorage
            self.driver.execute_script("sessionStorage.setItem('reft-serve.api-key', arguments[0])", self.api_key)
            self.driver.get(f"{self.url}/playground/#{tab}")
            self.wait(lambda: self.find("#base-model").text.startswith("base model:"), "the model list to load")
        self.find(f"#tab-{tab}").click()

    def session_key(self) -> str | None:
        return self.driver.execute_script("return sessionStorage.getItem('reft-serve.api-key')")

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str, within: WebElement | None = None) -> list[WebElement]:
        return (within or self.driver).find_elements(By.CSS_SELECTOR, css)

    def fill(self, css: str, text: str) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(text)

    def text(self, element: WebElement | str) -> str:
        """The exact text (textContent: whitespace as rendered from the data, unlike WebElement.text)."""
        node = self.find(element) if isinstance(element, str) else element
        return node.get_property("textContent")

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, condition: Callable[[], T], what: str, timeout: float = 30, every: float = 0.1) -> T:
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
            time.sleep(every)

    def import_module(self, path: str, expression: str, *args: Any) -> Any:
        """Evaluate `expression` (a function body; `m` is the page's module at `path`, `args` the arguments) in the
        page, for the pure modules (event folding, SSE parsing) tested on the browser's own JavaScript engine."""
        script = ("const done = arguments[arguments.length - 1]; const args = Array.from(arguments).slice(0, -1);"
                  f"import({path!r}).then((m) => done({{ok: (function (m, args) {{ {expression} }})(m, args)}}))"
                  ".catch((e) => done({error: String(e && e.stack || e)}));")
        result = self.driver.execute_async_script(script, *args)
        assert "error" not in result, result["error"]
        return result["ok"]

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))


def safe_name(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid)[-150:]
