"""Page helpers of the browser tests: the App server process and the steps the scenarios share.

Selectors are the App's ``data-cy`` test ids where it has them (Playwright's test-id attribute is set
to ``data-cy``), else roles and visible texts.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture then skips the tests (fails them in CI) and says why
    expect = None

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "browser"
PLUGIN = "@ntt/no-time-to-train"
# Debian's chromium, headless, with nothing reaching out (flags as in the team's environment notes)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 800}
SERVER_START_S = 90
TIMEOUT_MS = 30_000  # one UI step; the first run in a server also imports torch and loads the models


def chromium_path() -> str | None:
    """``$NTT_CHROMIUM``, else Debian's ``chromium`` on the PATH."""
    return os.environ.get("NTT_CHROMIUM") or shutil.which("chromium")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppServer:
    """``python -m fiftyone.server.main`` on a free loopback port, with this session's environment."""

    def __init__(self, env: dict, log_path: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "wb") as log:
            command = [sys.executable, "-m", "fiftyone.server.main", "--port", str(self.port), "--address", "127.0.0.1"]
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + SERVER_START_S
        while not self._serves():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the App server did not start; its log:\n{self.log_tail()}")
            time.sleep(0.25)

    def _serves(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def torch_loaded(self) -> bool:
        """Whether the server process has mapped libtorch (i.e. imported torch)."""
        maps = Path(f"/proc/{self.process.pid}/maps").read_text()
        return re.search(r"/libtorch[_a-z]*\.so", maps) is not None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# The App asks Google Fonts for its web fonts; this machine has no internet, so they are answered
# with empty style sheets (the App falls back to local fonts). Nothing else is stubbed: any other
# request that fails shows up as a console error and fails the test.
FONTS = re.compile(r"^https://fonts\.(googleapis|gstatic)\.com/")


class App:
    """One browser page on the App, with the steps the scenarios share."""

    def __init__(self, page, server: AppServer, name: str):
        self.page, self.server, self.name = page, server, name
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("console", lambda message: message.type == "error" and self.errors.append(f"console: {message.text}"))

    def open(self, dataset, view: str | None = None) -> None:
        """The dataset's grid (a saved view's, if ``view``), once its samples are drawn."""
        url = f"{self.server.url}/datasets/{dataset.name}" + (f"?view={view}" if view else "")
        self.page.goto(url, wait_until="load")  # never "networkidle": the App keeps a connection open
        self.page.get_by_test_id("fo-grid").get_by_test_id("looker").first.wait_for()

    def reload(self) -> None:
        self.page.reload(wait_until="load")
        self.page.get_by_test_id("fo-grid").get_by_test_id("looker").first.wait_for()

    def operator_browser(self):
        """The operator browser, opened with the backquote key."""
        self.page.keyboard.press("Escape")
        self.page.keyboard.press("`")
        browser = self.page.get_by_test_id("operators-browser")
        browser.wait_for()
        return browser

    def operator_form(self, label: str):
        """The form of the operator whose label is ``label``, from the operator browser."""
        self.operator_browser()
        self.page.keyboard.type(label)
        self.page.keyboard.press("Enter")
        prompt = self.page.get_by_test_id("operators-prompt-modal")
        prompt.get_by_role("button", name="Execute").wait_for()
        return prompt

    @staticmethod
    def field(prompt, label: str):
        """The input of the form field titled ``label``."""
        return prompt.locator(
            f"xpath=//p[normalize-space()='{label}']/ancestor::div[contains(@class,'MuiGrid-item')][1]//input"
        )

    def set_field(self, prompt, label: str, value) -> None:
        """Type ``value`` into the field ``label`` and wait until the form has been resolved again."""
        self.field(prompt, label).fill(str(value))
        self.field(prompt, label).press("Tab")
        self.settle(prompt)

    def settle(self, prompt) -> None:
        """Wait for the form's pending validation (a spinner in the footer) to end."""
        self.page.wait_for_timeout(300)
        prompt.locator(".MuiDialogActions-root .MuiCircularProgress-root").wait_for(state="detached")

    def execute(self, prompt, timeout: float = 90_000):
        """Click Execute; return the prompt once it shows the run's output (or its error)."""
        prompt.get_by_role("button", name="Execute").click()
        prompt.get_by_role("button", name="Close").wait_for(timeout=timeout)
        return prompt

    def sidebar_checkbox(self, field: str):
        return self.page.get_by_test_id("sidebar").get_by_test_id(f"checkbox-{field}")

    def screenshot(self, name: str, locator=None) -> Path:
        path = ARTIFACTS / f"{self.name}-{name}.png"
        (locator or self.page).screenshot(path=path)
        return path


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
