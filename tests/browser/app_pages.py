"""Page helpers of the browser tests: the App server process and the steps the scenarios share.

Selectors are the App's ``data-cy`` test ids where it has them (Playwright's test-id attribute is
set to ``data-cy``), else roles and visible texts, as FiftyOne's own Playwright page objects do.
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
# Debian's chromium, headless (Playwright adds --headless), with nothing reaching out
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
STEP_MS = 30_000  # one UI step
RUN_MS = 90_000  # one immediate run; a server's first run also imports torch and loads the models

# The App asks Google Fonts for its web fonts; there is no internet here, so they are answered with
# empty style sheets (the App falls back to local fonts). Nothing else is stubbed: any other request
# that fails shows as a console error, which fails the test.
FONTS = re.compile(r"^https://fonts\.(googleapis|gstatic)\.com/")
# FiftyOne 1.22's looker, on a label field with masks whose sidebar filter is set and then reset:
# updateSampleDebounced -> loadSample(sample, transferables of its overlays) posts the sample to its
# worker with the overlays' mask ImageBitmaps as transferables, but those bitmaps were already
# transferred (detached) by the previous post; postMessage throws DataCloneError, loadSample's own
# retry without the transfer list throws it again (the sample still holds the detached bitmaps), and
# updateSampleDebounced logs it: that thumbnail's update is dropped, it keeps drawing its last state.
# Shown without any plugin in test_app_upstream.py (one error per grid thumbnail).
DETACHED_BITMAP = re.compile(
    r"^DataCloneError: Failed to execute 'postMessage' on 'Worker': An ImageBitmap is detached and could not be "
    r"cloned\.\n\s+at \w+\.loadSample "
)
# Console errors that are the App's own, known and harmless, each matched exactly:
KNOWN_CONSOLE_ERRORS = (
    DETACHED_BITMAP,
    # FiftyOne 1.22's looker logs this, and carries on, when it repaints labels whose mask buffers it
    # already handed to its worker (seen after selecting labels in the sample modal); nothing is lost.
    re.compile(r"^Error posting message to worker DataCloneError: Failed to execute 'postMessage' on 'Worker'"),
)
# Uncaught errors that are the App's own, known and harmless, each matched exactly:
KNOWN_PAGE_ERRORS = (
    # FiftyOne's router throws this from its route resource when a component reads the current route
    # while the App reloads it (seen once in CI, under load, after Evaluate reloaded the dataset while its
    # Model Evaluation panel opened); the App re-renders once the route has loaded.
    re.compile(r"^entry is loading$"),
)
# Records, in the page, each state of the modal in which the App shows what a streaming operator sends
# (its progress bar, then its output): [{"text", "value"}] with the bar's aria-valuenow, if it has one.
RECORD_SHOWN = """() => {
    window.nttShown = [];
    window.nttRecorder?.disconnect();
    window.nttRecorder = new MutationObserver(() => {
        const modal = document.querySelector("[data-cy=operators-prompt-view-modal]");
        if (!modal) return;
        const bar = modal.querySelector("[role=progressbar]");
        const state = {text: modal.innerText, value: bar ? bar.getAttribute("aria-valuenow") : null};
        const last = window.nttShown[window.nttShown.length - 1];
        if (!last || last.text !== state.text || last.value !== state.value) window.nttShown.push(state);
    });
    window.nttRecorder.observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def chromium_path() -> str | None:
    """``$NTT_CHROMIUM``, else Debian's ``chromium`` on the PATH; None unless it is an executable."""
    path = os.environ.get("NTT_CHROMIUM") or shutil.which("chromium")
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppServer:
    """``python -m fiftyone.server.main`` on a free loopback port, with the environment given."""

    def __init__(self, env: dict, log_path: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "fiftyone.server.main", "--port", str(self.port), "--address", "127.0.0.1"]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + SERVER_START_S
        while not self._serves():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the App server did not start; the end of its log:\n{self.log_tail()}")
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
        return re.search(r"/libtorch\w*\.so", maps) is not None

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


class App:
    """One browser page on the App, with the steps the scenarios share."""

    def __init__(self, page, server: AppServer, name: str):
        self.page, self.server, self.name = page, server, name
        self.errors: list[str] = []  # but the known ones
        self.console_errors: list[str] = []  # every console error, the known ones too
        page.on("pageerror", self._page_error)
        page.on("console", self._on_console)

    def _page_error(self, error) -> None:
        if not any(known.match(str(error)) for known in KNOWN_PAGE_ERRORS):
            self.errors.append(f"uncaught: {error}")

    def _on_console(self, message) -> None:
        if message.type != "error":
            return
        self.console_errors.append(message.text)
        if not any(known.match(message.text) for known in KNOWN_CONSOLE_ERRORS):
            self.errors.append(f"console: {message.text}")

    # --- the grid ---

    @property
    def grid(self):
        return self.page.get_by_test_id("fo-grid")

    def open(self, dataset, view: str | None = None, samples: bool = True) -> None:
        """The dataset (a saved view of it, if ``view``), once its first sample is drawn (if ``samples``)."""
        url = f"{self.server.url}/datasets/{dataset.name}" + (f"?view={view}" if view else "")
        self.page.goto(url, wait_until="load")  # never "networkidle": the App keeps a connection open
        self._wait_for_grid(samples)

    def reload(self) -> None:
        self.page.reload(wait_until="load")
        self._wait_for_grid(True)

    def _wait_for_grid(self, samples: bool) -> None:
        self.page.get_by_test_id("sidebar").wait_for()
        if samples:
            self.grid.locator("[data-cy=looker] canvas").first.wait_for()

    def sample_count(self) -> int:
        """The number of samples the grid says it shows."""
        text = self.page.get_by_test_id("entry-counts").inner_text()
        return int(re.search(r"([\d,]+) samples?", text).group(1).replace(",", ""))

    def sidebar_checkbox(self, field: str):
        return self.page.get_by_test_id("sidebar").get_by_test_id(f"checkbox-{field}")

    # --- operators ---

    def operator_browser(self):
        """The operator browser, opened with the backquote key."""
        self.page.keyboard.press("Escape")
        self.page.keyboard.press("`")
        browser = self.page.get_by_test_id("operators-browser")
        browser.wait_for()
        return browser

    def operator_form(self, label: str):
        """The form of the operator whose label is ``label``, chosen in the operator browser."""
        self.operator_browser()
        self.page.keyboard.type(label)
        self.page.keyboard.press("Enter")
        prompt = self.page.get_by_test_id("operators-prompt-modal")
        self.primary(prompt).wait_for()
        self.settle(prompt)
        return prompt

    @staticmethod
    def primary(prompt):
        """The form's main button: Execute, or Schedule where the operator pre-selects it (a long run)."""
        split = prompt.get_by_role("group", name="split button").get_by_role("button").first
        return split.or_(prompt.get_by_role("button", name="Execute", exact=True)).first

    def choose_execute(self, prompt):
        """Make Execute (an immediate run) the main button, choosing it in the split button's menu
        when the operator pre-selected Schedule; returns it."""
        execute = prompt.get_by_role("button", name="Execute", exact=True)
        if not execute.count():
            prompt.locator(".MuiDialogActions-root [aria-haspopup=menu]").click()
            self.page.get_by_role("menuitem").filter(has_text="Execute").click()
        return execute

    @staticmethod
    def field(prompt, label: str):
        """The input of the form field titled ``label``."""
        title = f"//p[normalize-space()='{label}']"
        return prompt.locator(f"xpath={title}/ancestor::div[contains(@class,'MuiGrid-item')][1]//input")

    def set_field(self, prompt, label: str, value) -> None:
        """Type ``value`` into the field ``label`` and wait until the form has been resolved again."""
        self.field(prompt, label).fill(str(value))
        self.field(prompt, label).press("Tab")
        self.settle(prompt)

    def settle(self, prompt) -> None:
        """Wait until the form is not being resolved (no spinner in its footer)."""
        self.page.wait_for_timeout(300)  # a change is sent to the server after a short debounce
        expect(prompt.locator(".MuiDialogActions-root .MuiCircularProgress-root")).to_have_count(0)

    def execute(self, prompt):
        """Click Execute; return once the prompt shows the run's output (or its error)."""
        self.choose_execute(prompt).click()
        prompt.get_by_role("button", name="Close").wait_for(timeout=RUN_MS)
        return prompt

    def run(self, prompt):
        """Click Execute on the form of an operator that streams its progress (``execute_as_generator``);
        return the modal that showed its progress, once it shows the run's output (or error) instead.
        :meth:`shown` then gives every state that modal went through."""
        self.page.evaluate(RECORD_SHOWN)
        self.choose_execute(prompt).click()
        shown = self.page.get_by_test_id("operators-prompt-view-modal")
        expect(prompt).to_be_hidden(timeout=RUN_MS)  # the form goes once the run has streamed everything
        expect(shown.get_by_role("progressbar")).to_have_count(0)  # the output has replaced the progress
        return shown

    def shown(self) -> list[dict]:
        return self.page.evaluate("window.nttShown")

    def schedule(self, prompt) -> None:
        """Queue the run as a delegated operation with the split button's "Schedule" choice."""
        prompt.locator(".MuiDialogActions-root [aria-haspopup=menu]").click()
        self.page.get_by_role("menuitem").filter(has_text="Schedule").click()
        prompt.get_by_role("button", name="Schedule", exact=True).click()

    # --- the sample modal ---

    def open_sample(self, index: int):
        """The sample modal of the ``index``-th sample of the grid, once its canvas is drawn."""
        self.grid.get_by_test_id("looker").nth(index).click(position={"x": 10, "y": 50})
        modal = self.page.get_by_test_id("modal")
        modal.locator("[canvas-loaded='true']").wait_for()
        return modal

    def click_label(self, modal, detection, image_size: tuple[int, int]) -> None:
        """Click the centre of ``detection``'s box on the modal's canvas (the image is fit inside it)."""
        width, height = image_size
        canvas = modal.get_by_test_id("looker").last.bounding_box()
        scale = min(canvas["width"] / width, canvas["height"] / height)
        left = canvas["x"] + (canvas["width"] - width * scale) / 2
        top = canvas["y"] + (canvas["height"] - height * scale) / 2
        x, y, w, h = detection.bounding_box
        self.page.mouse.click(left + (x + w / 2) * width * scale, top + (y + h / 2) * height * scale)

    # --- panels ---

    def open_panel(self, name: str) -> None:
        """Open the panel ``name`` next to the grid with the "New panel" button."""
        self.page.get_by_title("New panel").first.click()
        self.page.get_by_test_id(f"new-panel-option-{name}").click()

    def screenshot(self, name: str, locator=None) -> Path:
        path = ARTIFACTS / f"{self.name}-{name}.png"
        (locator or self.page).screenshot(path=path)
        return path

    def screenshot_samples(self, name: str) -> Path:
        """A screenshot of the grid's thumbnails only (not the empty grid below them)."""
        boxes = [looker.bounding_box() for looker in self.grid.get_by_test_id("looker").all()]
        left, top = min(b["x"] for b in boxes), min(b["y"] for b in boxes)
        right, bottom = max(b["x"] + b["width"] for b in boxes), max(b["y"] + b["height"] for b in boxes)
        path = ARTIFACTS / f"{self.name}-{name}.png"
        self.page.screenshot(path=path, clip={"x": left, "y": top, "width": right - left, "height": bottom - top})
        return path


def filter_reset_and_open(app, field: str) -> None:
    """Filter ``field``'s ``confidence`` in the sidebar, reset the filter, then open the first sample."""
    sidebar = app.page.get_by_test_id("sidebar")
    sidebar.get_by_test_id(f"sidebar-field-arrow-enabled-{field}").click()  # the field's attributes
    confidence = sidebar.locator("[data-cy^=numeric-filter-][data-cy$='.confidence']")
    confidence.scroll_into_view_if_needed()
    minimum = confidence.locator("input").first
    minimum.fill("0.9")
    minimum.press("Enter")
    reset = confidence.get_by_text("Reset")
    expect(reset).to_be_visible()  # the filter is on
    app.page.wait_for_timeout(1000)  # the grid redraws with it
    reset.click()
    expect(reset).to_have_count(0)
    app.page.wait_for_timeout(1000)  # and again without it
    app.open_sample(0)
    app.page.wait_for_timeout(2000)  # the grid's lookers behind the modal finish updating


BUILT = re.compile(r"Memory bank references: \d+ reference\(s\) of \d+ class\(es\)\.")  # Build's summary


def segmented(field: str, samples: int) -> re.Pattern:
    """Segment by reference's summary of a run into ``field`` over ``samples`` samples."""
    return re.compile(rf"{re.escape(field)}: \d+ instance\(s\) in {samples} sample\(s\)")


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
