"""Browser tests: the FiftyOne App, served on loopback against this session's test database (see
tests/conftest.py) with the plugin linked through ``FIFTYONE_PLUGINS_DIR``, driven by Playwright's
Python API in Debian's chromium.

The App server's model fields default to tiny random-weight models (``NTT_SAM2`` / ``NTT_DINOV2``
in its environment). Screenshots and the server log go to ``artifacts/browser/``. Without chromium
or playwright the tests skip here and fail in CI (``CI`` set), where ``.ci/run`` installs chromium.
"""

from __future__ import annotations

import os

import pytest
from app_pages import ARTIFACTS, CHROMIUM_ARGS, FONTS, STEP_MS, VIEWPORT, App, AppServer, chromium_path, expect


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _unavailable(reason: str):
    if _in_ci():
        pytest.fail(f"{reason}; CI must run the browser tests (.ci/run installs chromium)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser():
    executable = chromium_path()
    if executable is None:
        _unavailable(
            "chromium is not installed (apt-get install -y chromium; or set NTT_CHROMIUM to a Chromium binary)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is missing (bash scripts/setup.sh --dev installs it)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in [*ARTIFACTS.glob("*.png"), *ARTIFACTS.glob("*.log")]:  # this run's artifacts only
        old.unlink()
    expect.set_options(timeout=STEP_MS)
    with sync_playwright() as playwright:
        playwright.selectors.set_test_id_attribute("data-cy")  # the App's test ids
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def server_env(tiny_models) -> dict:
    """This session's environment (test database, plugin link, offline hubs), the tiny models as the
    forms' model defaults, and "Schedule" offered in the App for `fiftyone delegated` workers."""
    sam2_dir, dinov2_dir = tiny_models
    return {
        **os.environ,
        "NTT_SAM2": str(sam2_dir),
        "NTT_DINOV2": str(dinov2_dir),
        "FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS": "true",
    }


@pytest.fixture(scope="session")
def app_server(browser, tiny_models):
    """The App server shared by the tests; its model fields default to the tiny models."""
    yield from _new_server(tiny_models, "app-server.log")


@pytest.fixture
def fresh_app_server(app_server, tiny_models):
    """A server that has not run a model yet: the shared one while that holds, else a new one."""
    if not app_server.torch_loaded():
        yield app_server
        return
    yield from _new_server(tiny_models, "app-server-fresh.log")


@pytest.fixture
def own_app_server(browser, tiny_models, request):
    """A new App server for this test alone, stopped at its end: for tests that change the server process."""
    yield from _new_server(tiny_models, f"app-server-{request.node.name}.log")


def _new_server(tiny_models, log_name: str):
    server = AppServer(server_env(tiny_models), ARTIFACTS / log_name)
    yield server
    server.stop()


@pytest.fixture
def app(browser, app_server, request):
    """A fresh page on the shared App server; at the end, no uncaught error and no console error."""
    yield from _app(browser, app_server, request)


@pytest.fixture
def fresh_app(browser, fresh_app_server, request):
    """Like ``app``, on a server that has not run a model yet."""
    yield from _app(browser, fresh_app_server, request)


@pytest.fixture
def own_app(browser, own_app_server, request):
    """Like ``app``, on a server of this test's own."""
    yield from _app(browser, own_app_server, request)


@pytest.fixture
def plain_app(browser, tmp_path, request):
    """A page on an App server of this test's own with no plugin at all: FiftyOne's own behaviour."""
    plugins = tmp_path / "no-plugins"
    plugins.mkdir()
    env = {**os.environ, "FIFTYONE_PLUGINS_DIR": str(plugins)}
    server = AppServer(env, ARTIFACTS / f"app-server-{request.node.name}.log")
    try:
        yield from _app(browser, server, request)
    finally:
        server.stop()


def _app(browser, server, request):
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(STEP_MS)
    context.route(FONTS, lambda route: route.fulfill(status=200, content_type="text/css", body=""))
    # the "Explore Enterprise" pop-up shows once per browser profile until dismissed; start as dismissed
    context.add_init_script("window.localStorage.setItem('fiftyone-enterprise-tooltip-seen', 'true')")
    page = context.new_page()
    app = App(page, server, request.node.name)
    yield app
    if getattr(request.node, "call_failed", False):
        app.screenshot("at-failure")  # what the page showed when the test failed
    context.close()
    assert app.errors == [], f"errors in the browser console: {app.errors}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.call_failed = report.failed
    return report
