"""The playground's files as the server serves them, and as a wheel ships them (no browser needed here; the page
itself is tested in Chromium under tests/browser)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from server.playground import HEADERS, STATIC_DIR
from tests.server.process import ROOT

FILES = sorted(p.relative_to(STATIC_DIR).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file())
# an address the browser would fetch: scheme-relative or absolute, anywhere in the text
EXTERNAL = re.compile(r"(?:https?:)?//[a-z0-9-]+(?:\.[a-z0-9-]+)+", re.IGNORECASE)
SVG_NAMESPACE = 'xmlns="http://www.w3.org/2000/svg"'  # a name, never fetched


def test_the_page_is_served_at_playground_and_the_root_redirects_there(client) -> None:
    root = client.get("/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/playground/"
    bare = client.get("/playground", follow_redirects=False)
    assert bare.status_code in (307, 308) and bare.headers["location"].endswith("/playground/")
    page = client.get("/")
    assert page.status_code == 200 and page.url.path == "/playground/"
    assert page.headers["content-type"].startswith("text/html") and "<title>reft-serve playground</title>" in page.text


@pytest.mark.parametrize("name", FILES)
def test_every_file_is_served_with_its_type_and_the_pages_headers(client, name: str) -> None:
    response = client.get(f"/playground/{name}")
    assert response.status_code == 200 and response.content == (STATIC_DIR / name).read_bytes()
    for header, value in HEADERS.items():
        assert response.headers[header] == value
    expected = {".js": "javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}
    assert expected[Path(name).suffix] in response.headers["content-type"]  # module scripts need a JS type


@pytest.mark.parametrize("name", FILES)
def test_no_file_refers_to_anything_outside_this_server(name: str) -> None:
    text = (STATIC_DIR / name).read_text(encoding="utf-8").replace(SVG_NAMESPACE, "")
    assert not EXTERNAL.findall(text), f"{name} refers to another origin"
    for specifier in re.findall(r"""\bimport\b[^"'()]*?["']([^"']+)["']|\bimport\(\s*["']([^"']+)""", text):
        target = next(s for s in specifier if s)
        assert target.startswith("./") and (STATIC_DIR / name).parent.joinpath(target).resolve().is_file(), target
    for target in re.findall(r"""\b(?:src|href)="([^"]+)\"""", text):
        assert not target.startswith(("/", "data:")) or target == "data:,", target
        assert (STATIC_DIR / name).parent.joinpath(target).resolve().is_file(), target


def test_the_files_ship_in_the_wheel(tmp_path) -> None:
    """package-data: an installed reft-serve (not only this checkout) serves the page. Built from a copy of the
    sources, since setuptools reuses a checkout's build/ directory (stale files there would pass the test)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    for package in ("server", "reft_core", "adapters_store"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("reft_serve-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n.removeprefix("server/static/") for n in archive.namelist() if n.startswith("server/static/")}
    assert shipped == set(FILES)
