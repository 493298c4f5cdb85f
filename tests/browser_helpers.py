"""Headless Chromium for the browser tests: the system's browser (Debian's `chromium` package, which
`make test` installs where it can), driven by Playwright without Playwright's own browser download.

Without a browser the tests skip, saying how to install one; with QUILL_REQUIRE_BROWSER=1 (set by
`.ci/run`) they fail instead, so CI cannot pass without running them.
"""
from __future__ import annotations

import os
import shutil

import pytest

INSTALL_HINT = ("the browser tests need Chromium: `sudo apt-get install chromium` (Debian/Ubuntu; `make test` "
                "installs it when it may), or QUILL_CHROMIUM=/path/to/chromium, and `pip install playwright`")
# Flags that keep a headless Chromium quiet and self-contained in containers and CI: no sandbox
# (containers often lack the namespaces it needs), no GPU, no background traffic to Google.
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def find_chromium() -> str | None:
    for candidate in (os.environ.get("QUILL_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


def _unavailable(reason: str):
    if os.environ.get("QUILL_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}; {INSTALL_HINT}")
    pytest.skip(f"{reason}; {INSTALL_HINT}")


def launch_browser():
    """(playwright, browser): a headless Chromium, or the test skips (fails under QUILL_REQUIRE_BROWSER=1)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed")
    executable = find_chromium()
    if executable is None:
        _unavailable("no Chromium found")
    playwright = sync_playwright().start()
    try:
        # Playwright gives every launch a fresh temporary profile (its --user-data-dir).
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=LAUNCH_ARGS)
    except Exception:
        playwright.stop()
        raise
    return playwright, browser
